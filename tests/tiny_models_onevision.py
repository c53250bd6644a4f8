"""Tiny random-weight LLaVA-OneVision models and inputs, built from configs in code (no downloads).

Tower: SigLIP (no CLS, ``full`` strategy), 48 px crops of 8 px patches -> 6 x 6 features per crop; a Qwen2 LM.
Pinpoints: 48/96 px combinations (1, 2 or 4 crops + the base). ``vision_aspect_ratio="anyres_max_1"`` so the
model's bilinear shrink of large crop maps happens at this tiny size (a 30 x 90 image: unpadded 4 x 12 -> 3 x 10).
Placeholder counts follow the processor's formula (``LlavaOnevisionProcessor._get_number_of_features``),
re-implemented here independently of the adapter. Video frames: 6 x 6 pooled to 3 x 3, one newline per video.
"""

from __future__ import annotations

import math

import torch
from tiny_models import PAD, VOCAB, build_model, left_pad
from tiny_models_next import _best_resolution, unpadded_grid

IMAGE = 120
VIDEO = 121
CROP = 48
PATCH = 8
PINPOINTS = [[48, 48], [48, 96], [96, 48], [96, 96]]
MATRIX_SIZES = [(30, 90), (90, 30), (40, 90)]
SUPPRESS = [IMAGE, VIDEO, 2]


def tiny_onevision(attn: str = "sdpa", seed: int = 0, layers: int = 4, aspect: str = "anyres_max_1"):
    from transformers import (
        LlavaOnevisionConfig,
        LlavaOnevisionForConditionalGeneration,
        Qwen2Config,
        SiglipVisionConfig,
    )

    torch.manual_seed(seed)
    vision = SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                                image_size=CROP, patch_size=PATCH, vision_use_head=False)
    text = Qwen2Config(hidden_size=64, intermediate_size=128, num_hidden_layers=layers, num_attention_heads=4,
                       num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=1024, pad_token_id=PAD,
                       eos_token_id=2, rms_norm_eps=1e-6)
    cfg = LlavaOnevisionConfig(vision_config=vision, text_config=text, image_token_index=IMAGE,
                               video_token_index=VIDEO, vision_feature_layer=-1,
                               vision_feature_select_strategy="full", image_grid_pinpoints=PINPOINTS,
                               vision_aspect_ratio=aspect)
    model = build_model(LlavaOnevisionForConditionalGeneration, cfg, attn)
    model.generation_config.suppress_tokens = SUPPRESS
    return model


def num_image_tokens(size, aspect: str = "anyres_max_1", pinpoints=PINPOINTS, crop=CROP, patch=PATCH) -> int:
    """Placeholders the OneVision processor emits for one image of size (H, W) (SigLIP: no CLS)."""
    side, cur_h, cur_w = unpadded_grid(size, pinpoints, crop, patch)
    unpadded, newlines = cur_h * cur_w, cur_h
    ratio = math.sqrt(cur_h * cur_w / (int(aspect[len("anyres_max_"):]) * side ** 2))
    if ratio > 1.1:
        unpadded, newlines = int(cur_h // ratio) * int(cur_w // ratio), int(cur_h // ratio)
    return side * side + unpadded + newlines


def num_video_tokens(frames: int, crop=CROP, patch=PATCH) -> int:
    return frames * math.ceil(crop // patch / 2) ** 2 + 1


def num_patches(size, pinpoints=PINPOINTS, crop=CROP) -> int:
    bh, bw = _best_resolution(*size, pinpoints)
    return 1 + -(-bh // crop) * -(-bw // crop)


def onevision_inputs(model, batch: int = 1, seed: int = 0, sizes=None, videos=None, multi: int = 1) -> dict:
    """Left-padded prompts. Each row: text, [``multi`` images], [a video of ``videos[b]`` frames], text.

    sizes: image sizes over the batch in order (default MATRIX_SIZES cycled); multi > 1 puts several images in a row
    (the model then feeds each as its base crop only); videos: frames per row (None: no video).
    """
    g = torch.Generator().manual_seed(seed)
    aspect = model.config.vision_aspect_ratio
    n_img = batch * multi
    sizes = sizes or [MATRIX_SIZES[i % len(MATRIX_SIZES)] for i in range(n_img)]
    patches = [num_patches(s) for s in sizes]
    pv = torch.zeros(n_img, max(patches), 3, CROP, CROP)
    for i, p in enumerate(patches):
        pv[i, :p] = torch.randn(p, 3, CROP, CROP, generator=g)
    rows, k = [], 0
    for b in range(batch):
        parts = [torch.randint(3, 100, (2 + b % 2,), generator=g)]
        for _ in range(multi):
            n = num_image_tokens(sizes[k], aspect) if multi == 1 else (CROP // PATCH) ** 2 + 1
            parts += [torch.full((n,), IMAGE), torch.randint(3, 100, (1,), generator=g)]
            k += 1
        if videos is not None:
            parts.append(torch.full((num_video_tokens(videos[b]),), VIDEO))
        parts.append(torch.randint(3, 100, (4 + 2 * b,), generator=g))
        rows.append(torch.cat(parts))
    ids, mask = left_pad(rows)
    out = {"input_ids": ids, "attention_mask": mask, "pixel_values": pv,
           "image_sizes": torch.tensor(sizes, dtype=torch.long)}
    if multi > 1:
        out["batch_num_images"] = torch.tensor([multi] * batch)
    if videos is not None:
        assert len(set(videos)) == 1, "the model stacks videos: one frame count per batch"
        out["pixel_values_videos"] = torch.randn(batch, videos[0], 3, CROP, CROP, generator=g)
    return out
