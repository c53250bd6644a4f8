"""Tiny random-weight Qwen3-VL (dense and MoE) models and hand-built inputs (no processor, no downloads).

DeepStack levels after vision blocks 0, 1, 2 (a 4-block tower), so the language model adds them after decoder
layers 0, 1 and 2 (of 4): LLM-side stages at layers 1-3 prune while DeepStack input is still arriving. Images as in
:mod:`tiny_models_qwen`; a video is written as the Qwen3-VL processor writes it: per frame group a timestamp
(``<t seconds>``: here the text ids ``TS`` then one id per tenth of a second) before
``<|vision_start|> <|video_pad|> x n <|vision_end|>``.
"""

from __future__ import annotations

import torch
from tiny_models_qwen import (
    CHANNELS,
    IMAGE,
    MERGE,
    PAD,
    PATCH,
    TEMPORAL,
    VEND,
    VIDEO,
    VSTART,
    _finish,
    merged_tokens,
    pack_rows,
    qwen_inputs,
    qwen_video_inputs,
)

#: text id that opens a timestamp (``<`` of ``<0.5 seconds>``)
TS = 110
DEEPSTACK = [0, 1, 2]


def _configs(layers: int, depth: int) -> tuple[dict, dict]:
    text = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=512,
                rms_norm_eps=1e-6, pad_token_id=PAD, bos_token_id=1, eos_token_id=2,
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3],
                                 "mrope_interleaved": True})
    vision = dict(depth=depth, hidden_size=32, intermediate_size=64, num_heads=4, in_channels=CHANNELS,
                  patch_size=PATCH, spatial_merge_size=MERGE, temporal_patch_size=TEMPORAL, out_hidden_size=64,
                  num_position_embeddings=16, deepstack_visual_indexes=DEEPSTACK)
    return text, vision


def tiny_qwen3_vl(attn: str = "sdpa", seed: int = 0, layers: int = 4, depth: int = 4):
    from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration

    torch.manual_seed(seed)
    text, vision = _configs(layers, depth)
    cfg = Qwen3VLConfig(text_config=text, vision_config=vision, image_token_id=IMAGE, video_token_id=VIDEO,
                        vision_start_token_id=VSTART, vision_end_token_id=VEND)
    return _finish(Qwen3VLForConditionalGeneration, cfg, attn)


def tiny_qwen3_vl_moe(attn: str = "sdpa", seed: int = 0, layers: int = 4, depth: int = 4):
    """The MoE variant: 4 experts of which 2 per token in every decoder layer."""
    from transformers import Qwen3VLMoeConfig, Qwen3VLMoeForConditionalGeneration

    torch.manual_seed(seed)
    text, vision = _configs(layers, depth)
    text.update(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, decoder_sparse_step=1)
    cfg = Qwen3VLMoeConfig(text_config=text, vision_config=vision, image_token_id=IMAGE, video_token_id=VIDEO,
                           vision_start_token_id=VSTART, vision_end_token_id=VEND)
    return _finish(Qwen3VLMoeForConditionalGeneration, cfg, attn)


def timestamp(frame: int) -> list[int]:
    """Text ids of frame group ``frame``'s timestamp (``<(frame + 0.5) seconds>``-like: fixed length)."""
    return [TS, 10 + frame, 60, TS + 1]


def build_inputs3(rows: list[list], seed: int = 0) -> dict:
    """Forward kwargs from rows of segments (text id lists, ``("image", (t, h, w))``, ``("video", (t, h, w))``),
    left-padded; a video is t frame groups, each after its timestamp."""
    g = torch.Generator().manual_seed(seed)
    seqs, types, image_grids, video_grids = [], [], [], []
    for row in rows:
        ids, tt = [], []
        for seg in row:
            if not isinstance(seg, tuple):
                ids += list(seg)
                tt += [0] * len(seg)
                continue
            kind, (t, h, w) = seg
            if kind == "image":
                n = merged_tokens((t, h, w))
                ids += [VSTART] + [IMAGE] * n + [VEND]
                tt += [0] + [1] * n + [0]
                image_grids.append((t, h, w))
                continue
            n = merged_tokens((1, h, w))
            for f in range(t):
                ts = timestamp(f)
                ids += ts + [VSTART] + [VIDEO] * n + [VEND]
                tt += [0] * (len(ts) + 1) + [2] * n + [0]
            video_grids.append((t, h, w))
        seqs.append(ids)
        types.append(tt)
    return pack_rows(seqs, types, image_grids, video_grids, g)


def qwen3_inputs(model, batch: int = 1, seed: int = 0) -> dict:
    """:func:`tiny_models_qwen.qwen_inputs`' rows (one image per row, sizes and lengths differ), left-padded."""
    return qwen_inputs(model, batch, seed, build=build_inputs3)


def qwen3_video_inputs(model, batch: int = 1, seed: int = 0, frames: int = 4) -> dict:
    """:func:`tiny_models_qwen.qwen_video_inputs`' rows, each frame group after its timestamp."""
    return qwen_video_inputs(model, batch, seed, frames, build=build_inputs3)


def split_row3(inputs: dict, b: int) -> dict:
    """Sample ``b`` of a padded batch built by ``build_inputs3`` as an unpadded batch of one."""
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    keep = mask[b].bool()
    row = {"input_ids": ids[b:b + 1][:, keep], "attention_mask": mask[b:b + 1][:, keep],
           "mm_token_type_ids": inputs["mm_token_type_ids"][b:b + 1][:, keep]}
    # items per row: images are one run each; a video's frame groups are runs, t of them per video
    for tok, pv_key, grid_key in ((IMAGE, "pixel_values", "image_grid_thw"),
                                  (VIDEO, "pixel_values_videos", "video_grid_thw")):
        if grid_key not in inputs:
            continue
        runs = ((ids[:, :-1] == VSTART) & (ids[:, 1:] == tok)).sum(1)
        grids = inputs[grid_key]
        per_item = grids[:, 0] if tok == VIDEO else torch.ones_like(grids[:, 0])
        done = torch.searchsorted(per_item.cumsum(0), runs.cumsum(0), right=True).tolist()  # items done by row
        first, last = (done[b - 1] if b else 0), done[b]
        if last == first:
            continue
        patches = grids.prod(-1).cumsum(0).tolist()
        start = patches[first - 1] if first else 0
        row[grid_key] = grids[first:last]
        row[pv_key] = inputs[pv_key][start:patches[last - 1]]
    return row
