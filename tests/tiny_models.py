"""Tiny random-weight models of every supported family, built from configs in code (no downloads)."""

from __future__ import annotations

import torch

IMAGE_TOKEN = 120
PAD = 0
VOCAB = 128


def tiny_llava(attn: str = "sdpa", seed: int = 0, image_size: int = 48, patch: int = 8, layers: int = 4):
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    torch.manual_seed(seed)
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                              image_size=image_size, patch_size=patch, projection_dim=32)
    text = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=layers, num_attention_heads=4,
                       num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=512, pad_token_id=PAD,
                       rms_norm_eps=1e-6)
    cfg = LlavaConfig(vision_config=vision, text_config=text, image_token_id=IMAGE_TOKEN,
                      vision_feature_layer=-2, vision_feature_select_strategy="default")
    cfg._attn_implementation = attn
    model = LlavaForConditionalGeneration(cfg).eval()
    model.set_attn_implementation(attn) if hasattr(model, "set_attn_implementation") else None
    return model


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
