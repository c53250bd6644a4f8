"""Tiny checkpoints vLLM can load (weights + processor saved together), for the vLLM tests and the serving benchmark.

- the bundled demo models (``vtc/assets/tiny-llava``: LLaVA-1.5 with a CLIP tower; ``vtc/assets/tiny-1d``: the
  ordered-1D-token model), used as they are;
- :func:`save_tiny_llava`: a random-weight LLaVA-1.5 at LLaVA-1.5's token count (336 px, 14 px patches: 576 tokens)
  with the demo model's tower and LLM sizes, and a ``LlavaProcessor`` over the demo tokenizer;
- :func:`save_tiny_llava_next`: a random-weight LLaVA-NeXT (anyres) at the demo model's tower and LLM shape, with a
  ``LlavaNextProcessor`` over the demo tokenizer. vLLM's CPU attention kernels need head_dim in 32 / 64 / 80 / ...,
  so the LLM keeps the demo's head_dim 64;
- :func:`save_tiny_qwen2_vl`: a random-weight Qwen2-VL or Qwen2.5-VL (4 px patches, 2 x 2 merge, so an image of
  H x W px resized to multiples of 8 gives (H/8) x (W/8) tokens) with a ``Qwen2VLProcessor`` over the demo tokenizer
  plus Qwen's ``<|vision_start|>`` / ``<|image_pad|>`` / ``<|video_pad|>`` / ``<|vision_end|>`` tokens; the LLM
  has head_dim 64 and ``mrope_section`` [8, 12, 12].
"""

from __future__ import annotations

from pathlib import Path

import torch

from vtc.demo import GRID_MODEL_PATH

__all__ = ["save_tiny_llava", "save_tiny_llava_next", "save_tiny_qwen2_vl", "qwen_prompt", "GRID_MODEL_PATH"]


def _llama_text(tok, hidden: int, layers: int, heads: int, kv_heads: int):
    """The LLaVA savers' Llama text config over the demo tokenizer (MLP 2x wide, 2048 positions)."""
    from transformers import LlamaConfig

    return LlamaConfig(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                       num_attention_heads=heads, num_key_value_heads=kv_heads, vocab_size=len(tok),
                       max_position_embeddings=2048, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
                       rms_norm_eps=1e-6)


def _save(model, processor, tok, path: str | Path):
    """Give ``model`` the tokenizer's eos / pad ids for generation, save it and ``processor`` to ``path``; returns
    (model, processor)."""
    model.generation_config.eos_token_id = tok.eos_token_id
    model.generation_config.pad_token_id = tok.pad_token_id
    path = Path(path)
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return model, processor


def save_tiny_llava(path: str | Path, *, image_size: int = 336, patch: int = 14, vision_hidden: int = 128,
                    vision_layers: int = 4, text_hidden: int = 256, text_layers: int = 4, heads: int = 4,
                    seed: int = 0):
    """Save a random-weight ``LlavaForConditionalGeneration`` + processor to ``path``; returns (model, processor).

    Defaults: LLaVA-1.5's 336 px images of 14 px patches ((336 / 14)^2 = 576 tokens, CLS dropped, feature layer -2)
    with the bundled demo model's CLIP / Llama sizes (head_dim 64, as vLLM's CPU attention needs)."""
    from transformers import (
        AutoTokenizer,
        CLIPImageProcessor,
        CLIPVisionConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
    )

    tok = AutoTokenizer.from_pretrained(GRID_MODEL_PATH)
    torch.manual_seed(seed)
    vision = CLIPVisionConfig(hidden_size=vision_hidden, intermediate_size=4 * vision_hidden,
                              num_hidden_layers=vision_layers, num_attention_heads=4, image_size=image_size,
                              patch_size=patch, projection_dim=vision_hidden)
    text = _llama_text(tok, text_hidden, text_layers, heads, heads)
    cfg = LlavaConfig(vision_config=vision, text_config=text, image_token_id=tok.convert_tokens_to_ids("<image>"),
                      vision_feature_layer=-2, vision_feature_select_strategy="default")
    model = LlavaForConditionalGeneration(cfg).eval()
    image_processor = CLIPImageProcessor(size={"shortest_edge": image_size},
                                         crop_size={"height": image_size, "width": image_size})
    processor = LlavaProcessor(image_processor=image_processor, tokenizer=tok, patch_size=patch,
                               vision_feature_select_strategy="default", image_token="<image>",
                               num_additional_image_tokens=1)
    return _save(model, processor, tok, path)


def save_tiny_llava_next(path: str | Path, *, crop: int = 48, patch: int = 8, vision_hidden: int = 32,
                         text_hidden: int = 128, text_layers: int = 2, heads: int = 2, kv_heads: int = 1,
                         pinpoints=((48, 48), (48, 96), (96, 48), (96, 96)), seed: int = 0):
    """Save a random-weight ``LlavaNextForConditionalGeneration`` + processor to ``path``; returns (model, processor).

    Defaults: 48 px crops of 8 px patches (6 x 6 per crop), 1..4 crops + base, a 2-layer LLM with head_dim 64."""
    from transformers import (
        AutoTokenizer,
        CLIPVisionConfig,
        LlavaNextConfig,
        LlavaNextForConditionalGeneration,
        LlavaNextImageProcessor,
        LlavaNextProcessor,
    )

    tok = AutoTokenizer.from_pretrained(GRID_MODEL_PATH)  # "<image>" and the demo's small vocabulary
    torch.manual_seed(seed)
    vision = CLIPVisionConfig(hidden_size=vision_hidden, intermediate_size=4 * vision_hidden, num_hidden_layers=3,
                              num_attention_heads=4, image_size=crop, patch_size=patch, projection_dim=vision_hidden)
    text = _llama_text(tok, text_hidden, text_layers, heads, kv_heads)
    cfg = LlavaNextConfig(vision_config=vision, text_config=text, image_token_id=tok.convert_tokens_to_ids("<image>"),
                          vision_feature_layer=-2, vision_feature_select_strategy="default",
                          image_grid_pinpoints=[list(p) for p in pinpoints])
    model = LlavaNextForConditionalGeneration(cfg).eval()
    image_processor = LlavaNextImageProcessor(size={"shortest_edge": crop}, crop_size={"height": crop, "width": crop},
                                              image_grid_pinpoints=[list(p) for p in pinpoints])
    processor = LlavaNextProcessor(image_processor=image_processor, tokenizer=tok, patch_size=patch,
                                   vision_feature_select_strategy="default", image_token="<image>",
                                   num_additional_image_tokens=1)
    return _save(model, processor, tok, path)


QWEN_TOKENS = {"image_token": "<|image_pad|>", "video_token": "<|video_pad|>",
               "vision_start_token": "<|vision_start|>", "vision_end_token": "<|vision_end|>"}


def qwen_prompt(question: str, modality: str = "image") -> str:
    """A plain (non-chat) prompt with one image (or video) in Qwen's form."""
    pad = QWEN_TOKENS["image_token" if modality == "image" else "video_token"]
    return f"USER: <|vision_start|>{pad}<|vision_end|>{question} ASSISTANT:"


def save_tiny_qwen2_vl(path: str | Path, *, version: str = "2", vision_hidden: int = 32, vision_depth: int = 4,
                       text_hidden: int = 128, text_layers: int = 2, heads: int = 2, kv_heads: int = 1,
                       max_pixels: int = 48 * 48, seed: int = 0):
    """Save a random-weight ``Qwen2VLForConditionalGeneration`` (``version="2"``) or
    ``Qwen2_5_VLForConditionalGeneration`` (``"2.5"``: window attention over 2 x 2 merged tokens, full attention in
    blocks 1 and the last) + processor to ``path``; returns (model, processor). Images are resized to at most
    ``max_pixels`` (48 x 48 px = 36 tokens by default)."""
    from transformers import (
        AutoTokenizer,
        Qwen2_5_VLConfig,
        Qwen2_5_VLForConditionalGeneration,
        Qwen2VLConfig,
        Qwen2VLForConditionalGeneration,
        Qwen2VLImageProcessor,
        Qwen2VLProcessor,
        Qwen2VLVideoProcessor,
    )

    if version not in ("2", "2.5"):
        raise ValueError(f"version must be '2' or '2.5', got {version!r}")
    tok = AutoTokenizer.from_pretrained(GRID_MODEL_PATH, extra_special_tokens=QWEN_TOKENS)
    ids = {k: tok.convert_tokens_to_ids(v) for k, v in QWEN_TOKENS.items()}
    patch, merge, temporal = 4, 2, 2
    torch.manual_seed(seed)
    text = dict(vocab_size=len(tok), hidden_size=text_hidden, intermediate_size=2 * text_hidden,
                num_hidden_layers=text_layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                max_position_embeddings=2048, rms_norm_eps=1e-6, pad_token_id=tok.pad_token_id,
                bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                 "mrope_section": _mrope_section(text_hidden // heads)})
    common = dict(in_channels=3, patch_size=patch, spatial_merge_size=merge, temporal_patch_size=temporal)
    tokens = dict(image_token_id=ids["image_token"], video_token_id=ids["video_token"],
                  vision_start_token_id=ids["vision_start_token"], vision_end_token_id=ids["vision_end_token"])
    if version == "2":
        vision = dict(depth=vision_depth, embed_dim=vision_hidden, hidden_size=text_hidden, num_heads=2, mlp_ratio=2,
                      **common)
        cfg = Qwen2VLConfig(text_config=text, vision_config=vision, **tokens)
        model = Qwen2VLForConditionalGeneration(cfg)
    else:
        vision = dict(depth=vision_depth, hidden_size=vision_hidden, intermediate_size=2 * vision_hidden, num_heads=2,
                      out_hidden_size=text_hidden, window_size=2 * merge * patch,
                      fullatt_block_indexes=[1, vision_depth - 1], tokens_per_second=2, **common)
        cfg = Qwen2_5_VLConfig(text_config=text, vision_config=vision, **tokens)
        model = Qwen2_5_VLForConditionalGeneration(cfg)
    model.eval()
    size = {"shortest_edge": 16 * 16, "longest_edge": max_pixels}
    kw = dict(patch_size=patch, merge_size=merge, temporal_patch_size=temporal, size=size)
    processor = Qwen2VLProcessor(image_processor=Qwen2VLImageProcessor(**kw), tokenizer=tok,
                                 video_processor=Qwen2VLVideoProcessor(**kw))
    return _save(model, processor, tok, path)


def _mrope_section(head_dim: int) -> list[int]:
    """Qwen2-VL's split of the rotary half-dimension over (t, h, w): 1/4, 3/8, 3/8 (16, 24, 24 at head_dim 128)."""
    half = head_dim // 2
    t = half // 4
    h = (half - t) // 2
    return [t, h, half - t - h]
