"""Tiny random-weight InternVL models and inputs, built from configs in code (no downloads).

Tower: InternViT, 32 px tiles of 4 px patches -> 8 x 8 patches (+ CLS), pixel-shuffled (0.5) to 4 x 4 = 16 tokens
per tile (the real model: 448 px / 14 = 32 x 32 -> 16 x 16 = 256). LM: a 4-layer Qwen2 (1D RoPE). Prompts look like
the processor's: ``<img>``, ``T x 16`` ``<IMG_CONTEXT>`` placeholders, ``</img>`` per image, ``T`` = 1 tile or
``cols x rows`` tiles + the thumbnail; ``pixel_values`` holds all tiles of the batch, flat, in prompt order.
"""

from __future__ import annotations

import torch
from tiny_models import PAD, VOCAB, build_model, left_pad

IMAGE = 120  # <IMG_CONTEXT>
START = 121  # <img>
END = 122  # </img>
EOS = 2
SUPPRESS = [IMAGE, START, END, EOS]
TILE = 32
PATCH = 4
PER_TILE = 16
#: tiles per image over the batch rows of the matrix (row 0: 1 x 2 tiles + the thumbnail; then single tiles)
MATRIX_TILES = (3, 1, 1)


def tiny_internvl(attn: str = "sdpa", seed: int = 0, layers: int = 4, qk_norm: bool = False):
    from transformers import InternVLConfig, InternVLForConditionalGeneration, InternVLVisionConfig, Qwen2Config

    torch.manual_seed(seed)
    vision = InternVLVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                  image_size=TILE, patch_size=PATCH, use_qk_norm=qk_norm)
    text = Qwen2Config(hidden_size=64, intermediate_size=128, num_hidden_layers=layers, num_attention_heads=4,
                       num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=512, pad_token_id=PAD,
                       eos_token_id=EOS, rms_norm_eps=1e-6)
    cfg = InternVLConfig(vision_config=vision, text_config=text, image_token_id=IMAGE, image_seq_length=PER_TILE,
                         downsample_ratio=0.5)
    model = build_model(InternVLForConditionalGeneration, cfg, attn)
    model.generation_config.suppress_tokens = SUPPRESS
    return model


def internvl_inputs(model, batch: int = 1, seed: int = 0, tiles=None, images_per_row: int = 1) -> dict:
    """Left-padded prompts [text, (<img>, T x 16 placeholders, </img>, text) x images_per_row, text]; ``tiles``:
    tiles per image over the batch in order (default MATRIX_TILES cycled)."""
    g = torch.Generator().manual_seed(seed)
    n_img = batch * images_per_row
    tiles = list(tiles or [MATRIX_TILES[i % len(MATRIX_TILES)] for i in range(n_img)])
    rows, k = [], 0
    for b in range(batch):
        parts = [torch.randint(3, 100, (2 + b % 2,), generator=g)]
        for _ in range(images_per_row):
            parts += [torch.tensor([START]), torch.full((tiles[k] * PER_TILE,), IMAGE), torch.tensor([END]),
                      torch.randint(3, 100, (1,), generator=g)]
            k += 1
        parts.append(torch.randint(3, 100, (4 + 2 * b,), generator=g))
        rows.append(torch.cat(parts))
    ids, mask = left_pad(rows)
    return {"input_ids": ids, "attention_mask": mask,
            "pixel_values": torch.randn(sum(tiles), 3, TILE, TILE, generator=g)}


def internvl_row(inputs: dict, b: int) -> dict:
    """Sample b of a padded batch as an unpadded batch of one (its images' tiles out of the flat pixel_values)."""
    ids = inputs["input_ids"]
    tiles_per_row = (ids == IMAGE).sum(-1) // PER_TILE
    start = int(tiles_per_row[:b].sum())
    keep = inputs["attention_mask"][b].bool()
    return {"input_ids": ids[b:b + 1][:, keep], "attention_mask": inputs["attention_mask"][b:b + 1][:, keep],
            "pixel_values": inputs["pixel_values"][start:start + int(tiles_per_row[b])]}
