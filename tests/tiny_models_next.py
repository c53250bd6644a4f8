"""Tiny random-weight LLaVA-NeXT (anyres) models and inputs, built from configs in code (no downloads).

Tower: CLIP, 48 px crops of 8 px patches -> 6 x 6 features per crop. Pinpoints: 48/96 px combinations, so an
image gets 1, 2 (1x2 or 2x1) or 4 (2x2) crops plus the base crop. Placeholder counts follow the processor's
formula (``LlavaNextProcessor._get_number_of_features``), re-implemented here independently of the adapter.
"""

from __future__ import annotations

import torch
from tiny_models import IMAGE_TOKEN, build_model, clip_vision, left_pad, llama_text

CROP = 48
PATCH = 8
PINPOINTS = [[48, 48], [48, 96], [96, 48], [96, 96]]
#: image sizes (H, W) of the matrix batch: 1x2, 2x1 and 1x2 crop grids (3 units each), with and without padding
MATRIX_SIZES = [(30, 90), (90, 30), (40, 90)]


def tiny_llava_next(attn: str = "sdpa", seed: int = 0, layers: int = 4):
    from transformers import LlavaNextConfig, LlavaNextForConditionalGeneration

    torch.manual_seed(seed)
    cfg = LlavaNextConfig(vision_config=clip_vision(CROP, PATCH), text_config=llama_text(layers, 1024),
                          image_token_id=IMAGE_TOKEN, vision_feature_layer=-2, vision_feature_select_strategy="default",
                          image_grid_pinpoints=PINPOINTS)
    return build_model(LlavaNextForConditionalGeneration, cfg, attn)


def _best_resolution(h: int, w: int, pinpoints) -> tuple[int, int]:
    """The processor's choice: maximise the effective resolution, then minimise the waste."""
    best, best_eff, best_waste = None, 0, float("inf")
    for ph, pw in pinpoints:
        scale = min(pw / w, ph / h)
        eff = min(int(w * scale) * int(h * scale), w * h)
        waste = pw * ph - eff
        if eff > best_eff or (eff == best_eff and waste < best_waste):
            best, best_eff, best_waste = (ph, pw), eff, waste
    return best


def num_crops(size, pinpoints=PINPOINTS, crop=CROP) -> int:
    """Crops of an image (H, W), without the base crop."""
    bh, bw = _best_resolution(*size, pinpoints)
    return -(-bh // crop) * -(-bw // crop)


def unpadded_grid(size, pinpoints=PINPOINTS, crop=CROP, patch=PATCH) -> tuple[int, int, int]:
    """(side, rows, cols): the base crop's side and the crop map's grid after the processor's unpad rule, for an
    image of size (H, W)."""
    h, w = size
    bh, bw = _best_resolution(h, w, pinpoints)
    side = crop // patch
    cur_h, cur_w = side * (bh // crop), side * (bw // crop)
    if w / h > cur_w / cur_h:
        new_h = int(round(h * (cur_w / w), 7))
        cur_h -= 2 * ((cur_h - new_h) // 2)
    else:
        new_w = int(round(w * (cur_h / h), 7))
        cur_w -= 2 * ((cur_w - new_w) // 2)
    return side, cur_h, cur_w


def num_image_tokens(size, pinpoints=PINPOINTS, crop=CROP, patch=PATCH) -> int:
    """Placeholders the LLaVA-NeXT processor emits for an image of size (H, W)."""
    side, cur_h, cur_w = unpadded_grid(size, pinpoints, crop, patch)
    return side * side + cur_h * cur_w + cur_h


def next_inputs(model, sizes=None, batch: int = 1, seed: int = 0, images_per_row=None):
    """Left-padded prompts [text, <image> x n_1, (text,) <image> x n_2 ..., text] with anyres pixel_values.

    sizes: image sizes (H, W) in order over the batch (default: MATRIX_SIZES cycled, one image per row);
    images_per_row: how many images each row has (default 1); ``adjacent`` rows' images follow each other
    directly when a row has more than one (no text between them), the hardest case for image ids.
    """
    g = torch.Generator().manual_seed(seed)
    images_per_row = images_per_row or [1] * batch
    n_img = sum(images_per_row)
    if sizes is None:
        sizes = [MATRIX_SIZES[i % len(MATRIX_SIZES)] for i in range(n_img)]
    assert len(sizes) == n_img
    cfg = model.config
    crop = cfg.vision_config.image_size
    pins = cfg.image_grid_pinpoints
    patches = [1 + num_crops(s, pins, crop) for s in sizes]
    P = max(patches)
    pixel_values = torch.zeros(n_img, P, 3, crop, crop)
    for i, p in enumerate(patches):
        pixel_values[i, :p] = torch.randn(p, 3, crop, crop, generator=g)
    rows, k = [], 0
    for b in range(batch):
        pre = torch.randint(1, 100, (2 + b % 2,), generator=g)
        post = torch.randint(1, 100, (4 + 2 * b,), generator=g)
        parts = [pre]
        for _ in range(images_per_row[b]):
            parts.append(torch.full((num_image_tokens(sizes[k], pins, crop, cfg.vision_config.patch_size),),
                                    IMAGE_TOKEN))
            k += 1
        parts.append(post)
        rows.append(torch.cat(parts))
    ids, mask = left_pad(rows)
    return {"input_ids": ids, "attention_mask": mask, "pixel_values": pixel_values,
            "image_sizes": torch.tensor(sizes, dtype=torch.long)}
