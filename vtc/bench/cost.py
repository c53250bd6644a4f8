"""Analytic FLOPs of a benchmark model as run (vision tower, projector, LLM prefill with the real per-layer
lengths, LM head, one decode step), from the formulas of :mod:`vtc.flops`."""

from __future__ import annotations

import dataclasses

from .. import flops as fl

__all__ = ["lm_shape", "vision_flops", "llm_seq_lens", "extend_to", "model_flops"]


def lm_shape(model, layers: int | None = None) -> fl.LMShape:
    """The LLM's shape (:meth:`vtc.flops.LMShape.from_config`), optionally at another depth."""
    shape = fl.LMShape.from_config(model.config)
    return dataclasses.replace(shape, layers=layers) if layers else shape


def vision_flops(model, inputs: dict, *, projector_rows: int | None = None, vision_layers: int | None = None) -> dict:
    """Analytic FLOPs of the vision tower and projector for ``inputs`` ({'tower', 'projector', 'total',
    'projector_rows'}). ``projector_rows``: tokens the projector receives (default: all the tower's tokens the
    model feeds); ``vision_layers``: count a tower of that depth (default: as built)."""
    cfg = model.config
    vc = cfg.vision_config
    name = type(model).__name__
    if name.startswith("Llava"):
        side = vc.image_size // vc.patch_size
        T = side * side + 1
        if name.startswith("LlavaNext"):
            from ..models.llava_next import anyres_geometry

            units = sum(anyres_geometry(s, cfg.image_grid_pinpoints, vc.image_size).num_units
                        for s in inputs["image_sizes"].tolist())
        else:
            units = inputs["pixel_values"].shape[0]
        shape = fl.ViTShape(vision_layers or vc.num_hidden_layers, vc.hidden_size, vc.intermediate_size,
                            vc.num_attention_heads)
        tower = fl.vit_flops(shape, T, units) + units * fl.patch_embed_flops(T - 1, 3 * vc.patch_size ** 2,
                                                                              vc.hidden_size)
        fed = T if cfg.vision_feature_select_strategy == "full" else T - 1
        rows = units * fed if projector_rows is None else projector_rows
        D_l = cfg.text_config.hidden_size
        projector = fl.mlp_flops(rows, [vc.hidden_size, D_l, D_l])
    elif name.startswith("Mistral3"):  # Pixtral: each image at its own size (attention within it), gated MLP
        p, m = vc.patch_size, cfg.spatial_merge_size
        shape = fl.ViTShape(vision_layers or vc.num_hidden_layers, vc.hidden_size, vc.intermediate_size,
                            vc.num_attention_heads, gated=True)
        tower, merged = 0, 0
        for H, W in inputs["image_sizes"].tolist():
            hp, wp = int(H) // p, int(W) // p
            tower += fl.vit_flops(shape, hp * wp) + fl.patch_embed_flops(hp * wp, 3 * p * p, vc.hidden_size)
            merged += (hp // m) * (wp // m)
        rows = merged if projector_rows is None else projector_rows
        D_l = cfg.text_config.hidden_size
        # the patch merger runs on every merged token before any vtc stage; the MLP on the tokens kept
        projector = fl.mlp_flops(merged, [vc.hidden_size * m * m, vc.hidden_size]) + \
            fl.mlp_flops(rows, [vc.hidden_size, D_l, D_l])
    elif name.startswith("InternVL"):  # every tile: CLS + P x P patches; pixel shuffle, then LN + 2-layer MLP
        size = vc.image_size[0] if isinstance(vc.image_size, (list, tuple)) else vc.image_size
        patch = vc.patch_size[0] if isinstance(vc.patch_size, (list, tuple)) else vc.patch_size
        side = size // patch
        T = side * side + 1
        units = inputs["pixel_values"].shape[0]
        shape = fl.ViTShape(vision_layers or vc.num_hidden_layers, vc.hidden_size, vc.intermediate_size,
                            vc.num_attention_heads)
        tower = fl.vit_flops(shape, T, units) + units * fl.patch_embed_flops(T - 1, 3 * patch ** 2, vc.hidden_size)
        group = round(1 / cfg.downsample_ratio) ** 2
        rows = units * (side * side // group) if projector_rows is None else projector_rows
        D_l = cfg.text_config.hidden_size
        projector = fl.mlp_flops(rows, [vc.hidden_size * group, D_l, D_l])
    elif name.startswith(("SmolVLM", "Idefics3")):  # every real sub-image: P x P patches (no CLS); pixel shuffle,
        side = vc.image_size // vc.patch_size       # then one linear map of the f^2-concatenated patches
        pv = inputs["pixel_values"].flatten(0, 1)
        units = int(((pv == 0).flatten(1).sum(-1) != pv[0].numel()).sum())  # all-zero sub-images are padding
        shape = fl.ViTShape(vision_layers or vc.num_hidden_layers, vc.hidden_size, vc.intermediate_size,
                            vc.num_attention_heads)
        tower = fl.vit_flops(shape, side * side, units) + units * fl.patch_embed_flops(
            side * side, 3 * vc.patch_size ** 2, vc.hidden_size)
        f = int(cfg.scale_factor)
        rows = units * (side * side // (f * f)) if projector_rows is None else projector_rows
        projector = fl.mlp_flops(rows, [vc.hidden_size * f * f, cfg.text_config.hidden_size])
    elif name.startswith("Gemma3"):  # SigLIP (no CLS) per image; the projector average-pools k x k (no matmul),
        side = vc.image_size // vc.patch_size  # then RMS-norm and one linear map of the pooled tokens
        units = inputs["pixel_values"].shape[0]
        shape = fl.ViTShape(vision_layers or vc.num_hidden_layers, vc.hidden_size, vc.intermediate_size,
                            vc.num_attention_heads)
        tower = fl.vit_flops(shape, side * side, units) + units * fl.patch_embed_flops(
            side * side, 3 * vc.patch_size ** 2, vc.hidden_size)
        rows = units * cfg.mm_tokens_per_image if projector_rows is None else projector_rows
        projector = fl.mlp_flops(rows, [vc.hidden_size, cfg.text_config.hidden_size])
    else:  # Qwen2-VL / 2.5-VL / 3-VL: attention per frame group, 2 x 2 merger (3-VL: + one per DeepStack level)
        p, m, tp = vc.patch_size, vc.spatial_merge_size, vc.temporal_patch_size
        qwen25 = hasattr(vc, "fullatt_block_indexes")
        levels = len(getattr(vc, "deepstack_visual_indexes", None) or [])
        qwen3 = hasattr(vc, "deepstack_visual_indexes")
        width = vc.hidden_size if qwen25 or qwen3 else vc.embed_dim
        out_dim = vc.out_hidden_size if qwen25 or qwen3 else vc.hidden_size
        inter = vc.intermediate_size if qwen25 or qwen3 else int(vc.embed_dim * vc.mlp_ratio)
        depth = vision_layers or vc.depth
        shape = fl.ViTShape(depth, width, inter, vc.num_heads, gated=qwen25)
        full = None
        if qwen25:
            full = [i for i in vc.fullatt_block_indexes if i < depth] if vision_layers is None else \
                sorted({i for i in vc.fullatt_block_indexes if i < depth} | {depth - 1})
        tower, rows_all = 0, 0
        for t, h, w in inputs["image_grid_thw"].tolist():
            wp = fl.window_pairs(h, w, vc.window_size // m // p, m) if qwen25 else None
            tower += fl.vit_flops(shape, h * w, t, window_pairs_per_unit=wp, full_layers=full)
            tower += fl.patch_embed_flops(t * h * w, vc.in_channels * tp * p * p, width)
            rows_all += t * h * w // (m * m)
        rows = rows_all  # the merger runs before any vtc stage on Qwen (project is the identity)
        projector = (1 + levels) * fl.mlp_flops(rows, [width * m * m, width * m * m, out_dim])
    return {"tower": tower, "projector": projector, "total": tower + projector, "projector_rows": rows}


def llm_seq_lens(prompt_len: int, num_layers: int, seq_len_per_layer: dict | None) -> list[int]:
    """Sequence length entering each decoder layer: the prompt length until the first LLM-side stage, then what
    the runtime recorded (``run.stats.seq_len_per_layer``, keys may be str after a JSON round trip)."""
    rec = {int(k): int(v) for k, v in (seq_len_per_layer or {}).items()}
    return [rec.get(i, prompt_len) for i in range(num_layers)]


def extend_to(lens: list[int], depth: int) -> list[int]:
    """Per-layer lengths of a deeper model with the same stages: the last layer's length carries on."""
    return list(lens[:depth]) + [lens[-1]] * max(0, depth - len(lens))


def model_flops(model, inputs: dict, *, prompt_len: int, seq_lens: list[int], kv_lens: list[int] | None,
                projector_rows: int | None, full_layers: int | None = None, full_vision_layers: int | None = None,
                with_vision: bool = True) -> dict:
    """Analytic FLOPs of one prefill (+ one decode step) of the whole batch."""
    B = inputs["input_ids"].shape[0]
    shape = lm_shape(model, full_layers)
    lens = extend_to(seq_lens, shape.layers)
    tc = model.config.get_text_config()
    vis = vision_flops(model, inputs, projector_rows=projector_rows, vision_layers=full_vision_layers) \
        if with_vision else {"tower": 0, "projector": 0, "total": 0, "projector_rows": 0}
    llm = B * fl.prefill_flops(shape, lens)
    head = fl.lm_head_flops(tc.hidden_size, tc.vocab_size, B)
    kv = extend_to(kv_lens or [prompt_len] * len(seq_lens), shape.layers)
    decode = B * fl.decode_flops(shape, kv) + head
    return {"vision_tower": vis["tower"], "projector": vis["projector"], "projector_rows": vis["projector_rows"],
            "llm_prefill": llm, "lm_head": head, "prefill_total": vis["total"] + llm + head,
            "decode_per_token": decode, "llm_layers": shape.layers, "seq_len_per_layer": lens}
