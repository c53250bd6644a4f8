"""Tiny random-weight SmolVLM / Idefics3 models and inputs, built from configs in code (no downloads).

SmolVLM: sub-images of 48 px, 4 px patches -> 12 x 12 patches, pixel shuffle 3 -> 4 x 4 = 16 tokens per sub-image
(the real SmolVLM2: 384 / 14 -> 27 x 27, shuffle 3 -> 81). Idefics3: 32 px, 4 px patches -> 8 x 8, shuffle 2 ->
4 x 4 (the real one: 364 / 14 -> 26 x 26, shuffle 2 -> 169). Both: a 2-layer SigLIP-style tower, a 4-layer Llama LM.

Prompts follow the processor's structure (``_prompt_split_image`` / ``_prompt_single_image`` of transformers'
processor, re-built here from its documented format, with made-up ids for ``<fake_token_around_image>``,
``<global-img>``, ``<row_r_col_c>`` and the newline). ``pixel_values`` is (batch, sub-images, C, S, S), zero-padded
per row like the processor's, with ``pixel_attention_mask`` (1 on real sub-images, 0 on padding ones).
"""

from __future__ import annotations

import torch
from tiny_models import build_model, left_pad, llama_text

IMAGE = 120
FAKE = 121
GLOBAL = 122
NEWLINE = 123
ROW_COL = 100  # <row_r_col_c> = ROW_COL + (r - 1) * 4 + (c - 1)
SUPPRESS = [IMAGE, FAKE, GLOBAL, 2]
TOKENS = 16
#: (rows, cols) of sub-images per image over a batch (0, 0: unsplit)
MATRIX_GRIDS = [(1, 2), (0, 0), (2, 1)]


def tiny_smolvlm(attn: str = "sdpa", seed: int = 0, layers: int = 4, idefics3: bool = False):

    if idefics3:
        from transformers import Idefics3Config as Config
        from transformers import Idefics3ForConditionalGeneration as Model
        from transformers import Idefics3VisionConfig as VisionConfig
    else:
        from transformers import SmolVLMConfig as Config
        from transformers import SmolVLMForConditionalGeneration as Model
        from transformers import SmolVLMVisionConfig as VisionConfig
    torch.manual_seed(seed)
    size, scale = (32, 2) if idefics3 else (48, 3)
    vision = VisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                          image_size=size, patch_size=4)
    text = llama_text(layers, 1024, eos_token_id=2, bos_token_id=1)
    cfg = Config(vision_config=vision.to_dict(), text_config=text.to_dict(), image_token_id=IMAGE, scale_factor=scale)
    model = build_model(Model, cfg, attn)
    model.generation_config.suppress_tokens = SUPPRESS
    return model


def image_ids(rows: int, cols: int, tokens: int = TOKENS) -> list[int]:
    """The processor's token structure of one image split into rows x cols sub-images (0, 0: unsplit)."""
    ids: list[int] = []
    if rows:
        for r in range(rows):
            for c in range(cols):
                ids += [FAKE, ROW_COL + r * 4 + c] + [IMAGE] * tokens
            ids.append(NEWLINE)
        ids.append(NEWLINE)
    return ids + [FAKE, GLOBAL] + [IMAGE] * tokens + [FAKE]


def smolvlm_inputs(model, batch: int = 1, seed: int = 0, grids=None, images_per_row: int = 1) -> dict:
    """Left-padded prompts [text, (image, text) x images_per_row, text]; image i of the batch is split into
    ``grids[i]`` (default MATRIX_GRIDS cycled); pixel_values zero-padded per row to the most sub-images."""
    g = torch.Generator().manual_seed(seed)
    S = model.config.vision_config.image_size
    n_img = batch * images_per_row
    grids = grids or [MATRIX_GRIDS[i % len(MATRIX_GRIDS)] for i in range(n_img)]
    units = [r * c + 1 if r else 1 for r, c in grids]
    per_row = [sum(units[b * images_per_row:(b + 1) * images_per_row]) for b in range(batch)]
    pv = torch.zeros(batch, max(per_row), 3, S, S)
    pam = torch.zeros(batch, max(per_row), S, S, dtype=torch.long)
    rows, k = [], 0
    for b in range(batch):
        parts = [torch.randint(3, 90, (2 + b % 2,), generator=g)]
        for _ in range(images_per_row):
            parts += [torch.tensor(image_ids(*grids[k])), torch.randint(3, 90, (1,), generator=g)]
            k += 1
        parts.append(torch.randint(3, 90, (4 + 2 * b,), generator=g))
        rows.append(torch.cat(parts))
        pv[b, :per_row[b]] = torch.randn(per_row[b], 3, S, S, generator=g)
        pam[b, :per_row[b]] = 1
    ids, mask = left_pad(rows)
    return {"input_ids": ids, "attention_mask": mask, "pixel_values": pv, "pixel_attention_mask": pam}
