"""Tiny random-weight models of every supported family, built from configs in code (no downloads)."""

from __future__ import annotations

import torch

IMAGE_TOKEN = 120
PAD = 0
VOCAB = 128


def build_model(model_class, cfg, attn: str):
    """``model_class(cfg)`` in eval mode with the attention implementation ``attn`` (set on the config and, where
    transformers has it, on the model's sub-models too)."""
    cfg._attn_implementation = attn
    model = model_class(cfg).eval()
    model.set_attn_implementation(attn) if hasattr(model, "set_attn_implementation") else None
    return model


def clip_vision(image_size: int, patch: int):
    """The tiny CLIP tower of the LLaVA models: 3 blocks, hidden 32."""
    from transformers import CLIPVisionConfig

    return CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                            image_size=image_size, patch_size=patch, projection_dim=32)


def llama_text(layers: int, max_positions: int = 512, **extra):
    """The tiny Llama LM of the LLaVA-style models: hidden 64, 4 heads (2 KV heads)."""
    from transformers import LlamaConfig

    return LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=layers, num_attention_heads=4,
                       num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=max_positions, pad_token_id=PAD,
                       rms_norm_eps=1e-6, **extra)


def tiny_llava(attn: str = "sdpa", seed: int = 0, image_size: int = 48, patch: int = 8, layers: int = 4):
    from transformers import LlavaConfig, LlavaForConditionalGeneration

    torch.manual_seed(seed)
    cfg = LlavaConfig(vision_config=clip_vision(image_size, patch), text_config=llama_text(layers),
                      image_token_id=IMAGE_TOKEN, vision_feature_layer=-2, vision_feature_select_strategy="default")
    return build_model(LlavaForConditionalGeneration, cfg, attn)


def llava_inputs(model, batch: int = 1, seed: int = 0, pad: bool = True):
    """Prompts [text..., <image> x n, text...] of different lengths per row, left-padded (the image and its
    placeholders from the adapter's ``dummy_inputs``)."""
    from vtc.models import get_adapter

    g = torch.Generator().manual_seed(seed)
    texts = [(torch.randint(1, 100, (2 + b % 2,), generator=g).tolist(),
              torch.randint(1, 100, (4 + 2 * b,), generator=g).tolist()) for b in range(batch)]
    return get_adapter(model).dummy_inputs(texts, generator=g, pad_id=PAD)


def left_pad(rows: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask) of 1D id rows, left-padded with PAD to the longest."""
    L = max(len(r) for r in rows)
    ids = torch.full((len(rows), L), PAD)
    mask = torch.zeros(len(rows), L, dtype=torch.long)
    for b, r in enumerate(rows):
        ids[b, L - len(r):] = r
        mask[b, L - len(r):] = 1
    return ids, mask


def direct_feed(model, inputs: dict, features: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(inputs_embeds, attention_mask) of the prompts of ``inputs`` (one image per row) with their placeholder run
    replaced by ``k`` placeholders, and those filled with ``features`` (B, k, D): what a vision-side stage that
    keeps k tokens per image should hand the LLM."""
    rows = []
    for ids, mask in zip(inputs["input_ids"], inputs["attention_mask"]):
        row = ids[mask.bool()]
        vis = (row == IMAGE_TOKEN).nonzero().flatten()
        rows.append(torch.cat([row[: vis[0]], torch.full((k,), IMAGE_TOKEN), row[vis[-1] + 1:]]))
    input_ids, attention_mask = left_pad(rows)
    emb = model.get_input_embeddings()(input_ids).masked_scatter((input_ids == IMAGE_TOKEN)[..., None], features)
    return emb, attention_mask
