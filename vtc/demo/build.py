"""Configs, tokenizer and processors of the two demo VLMs (random weights; training is in ``train.py``).

- ``build_tokenizer()``: word-level ``PreTrainedTokenizerFast`` over the task vocabulary with
  ``<pad>`` / ``<s>`` / ``</s>`` / ``<unk>`` / ``<image>`` and a ``<s> $A`` post-processor.
- ``build_grid_model()`` / ``build_grid_processor()``: stock ``LlavaForConditionalGeneration`` with a
  CLIP vision tower (112 px, patch 8, CLS) and a small Llama, and a ``LlavaProcessor``.
- ``build_ordered_model()`` / ``build_ordered_processor()``: ``OrderedVLMForConditionalGeneration``
  (32 ordered latent tokens) and its ``LlavaProcessor`` emitting 32 placeholders.
"""

from __future__ import annotations

from .task import CHAT_TEMPLATE, IMAGE_SIZE, vocabulary

PATCH = 8
N_LATENTS = 32
SPECIALS = ["<pad>", "<s>", "</s>", "<unk>", "<image>"]
IMAGE_TOKEN_ID = SPECIALS.index("<image>")
CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]


def build_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(SPECIALS + vocabulary())}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Whitespace(), pre_tokenizers.Punctuation()])
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", vocab["<s>"])]
    )
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=False)  # joins words with single spaces
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
        extra_special_tokens={"image_token": "<image>"},
        padding_side="left",
        model_max_length=512,
    )
    fast.add_special_tokens({"additional_special_tokens": ["<image>"]})
    return fast


def _image_processor():
    from transformers import CLIPImageProcessor

    return CLIPImageProcessor(
        size={"shortest_edge": IMAGE_SIZE},
        crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
        do_resize=True,
        do_center_crop=True,
        do_normalize=True,
        image_mean=CLIP_MEAN,
        image_std=CLIP_STD,
        do_convert_rgb=True,
    )


def vision_config():
    from transformers import CLIPVisionConfig

    return CLIPVisionConfig(
        hidden_size=128,
        intermediate_size=512,
        num_hidden_layers=4,
        num_attention_heads=4,
        image_size=IMAGE_SIZE,
        patch_size=PATCH,
        projection_dim=128,
        hidden_act="quick_gelu",
    )


def text_config(vocab_size: int):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=256,
        intermediate_size=512,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=512,
        rms_norm_eps=1e-5,
        bos_token_id=SPECIALS.index("<s>"),
        eos_token_id=SPECIALS.index("</s>"),
        pad_token_id=SPECIALS.index("<pad>"),
        tie_word_embeddings=False,
    )


def build_grid_model(tokenizer=None):
    from transformers import LlavaConfig, LlavaForConditionalGeneration

    tokenizer = tokenizer or build_tokenizer()
    n_patches = (IMAGE_SIZE // PATCH) ** 2
    cfg = LlavaConfig(
        vision_config=vision_config(),
        text_config=text_config(len(tokenizer)),
        image_token_id=IMAGE_TOKEN_ID,
        projector_hidden_act="gelu",
        vision_feature_select_strategy="default",
        vision_feature_layer=-2,
        image_seq_length=n_patches,
        tie_word_embeddings=False,
    )
    model = LlavaForConditionalGeneration(cfg)
    _set_generation_config(model, tokenizer)
    return model


def _set_generation_config(model, tokenizer) -> None:
    gc = model.generation_config
    gc.bos_token_id = tokenizer.bos_token_id
    gc.eos_token_id = tokenizer.eos_token_id
    gc.pad_token_id = tokenizer.pad_token_id
    gc.do_sample = False
    gc.max_new_tokens = 4


def _llava_processor(tokenizer, *, patch_size: int, strategy: str, additional: int):
    """A ``LlavaProcessor`` over the demo tokenizer, image processor and chat template, writing
    ``(IMAGE_SIZE / patch_size)^2 + additional`` (minus CLS for strategy ``default``) placeholders per image."""
    from transformers import LlavaProcessor

    return LlavaProcessor(image_processor=_image_processor(), tokenizer=tokenizer or build_tokenizer(),
                          patch_size=patch_size, vision_feature_select_strategy=strategy,
                          num_additional_image_tokens=additional, chat_template=CHAT_TEMPLATE, image_token="<image>")


def build_grid_processor(tokenizer=None):
    return _llava_processor(tokenizer, patch_size=PATCH, strategy="default", additional=1)


def build_ordered_model(tokenizer=None, n_latents: int = N_LATENTS):
    from .ordered_vlm import OrderedVLMConfig, OrderedVLMForConditionalGeneration

    tokenizer = tokenizer or build_tokenizer()
    cfg = OrderedVLMConfig(
        vision_config=vision_config().to_dict(),
        text_config=text_config(len(tokenizer)).to_dict(),
        image_token_id=IMAGE_TOKEN_ID,
        n_latents=n_latents,
        resampler_layers=2,
        resampler_position_bias=True,
        image_seq_length=n_latents,
    )
    model = OrderedVLMForConditionalGeneration(cfg)
    _set_generation_config(model, tokenizer)
    return model


def build_ordered_processor(tokenizer=None, n_latents: int = N_LATENTS):
    """A plain ``LlavaProcessor`` that writes ``n_latents`` placeholders per image.

    With ``patch_size = image size`` (one "patch"), ``num_additional_image_tokens = n_latents - 1`` and
    strategy ``"full"``, LlavaProcessor's count ``1 * 1 + (n_latents - 1)`` is exactly ``n_latents``.
    """
    return _llava_processor(tokenizer, patch_size=IMAGE_SIZE, strategy="full", additional=n_latents - 1)
