"""Qwen2-VL and Qwen2.5-VL (``Qwen2VLForConditionalGeneration``, ``Qwen2_5_VLForConditionalGeneration``).

Written against transformers 5.24 (checked paths: ``model.model.visual`` with ``blocks`` / ``merger``, the text
model's ``rotary_emb`` returning already-composed (B, N, d) M-RoPE tables, ``get_rope_index`` taking
``mm_token_type_ids``); older layouts (``model.visual``, (3, B, N, d) rotary tables, ``rotary_pos_emb`` block
kwargs, ``visual.get_window_index``) are handled where they differ. Everything Qwen-specific lives here.

**Units.** A *unit* is what a budget applies to: one image, or one frame of a video (a temporal patch group of
``temporal_patch_size`` frames: row ``t`` of ``video_grid_thw``). Units are numbered in sequence order over the
batch (row-major: row 0 left to right, then row 1, ...), images and video frames alike; that number is the
``image_id`` of the token map (LLM side) and the ``unit_image`` of the vision-side groups. So on both sides a
budget ``k`` (int) keeps k tokens per image and k tokens **per video frame**, and a fraction keeps that fraction
of every image / frame. ``Qwen2VLAdapter(model, video_units="video")`` instead makes each whole video one unit
with layout ``Video(t, h, w)`` (for temporal methods such as pooling with ``temporal: 2``; budgets then mean what
the method says for a Video: per frame for pooling / downsample, per video for pruning methods).

**Vision side.** ``encode_images`` runs the model's own vision tower (``visual``) on ``pixel_values`` /
``pixel_values_videos`` with ``image_grid_thw`` / ``video_grid_thw`` and returns the **merged** tokens (after the
PatchMerger, i.e. already in the LLM's embedding space): layout ``Grid(h/2, w/2)`` per image or frame (``h, w`` in
patches, 2 = ``spatial_merge_size``). The PatchMerger is Qwen's projector and it also merges 2x2 patches, so there
is no per-token feature before it: ``project`` is the identity and a stage with ``feature_space: vision`` works on
the merged tokens too (documented equivalence, not an error). Units with different grids go to different groups.

Tower extras (no CLS token in Qwen's tower): ``received_attention`` (U, n) and ``keys`` (U, n, d), computed from
the input of the *scoring block* captured with a per-instance forward pre-hook during the tower call (removed
right after): the last block for Qwen2-VL; for Qwen2.5-VL the last **full-attention** block
(``fullatt_block_indexes[-1]``, which is the last block of every released checkpoint; window blocks are never used
for scoring). From that block's input x: ``norm1``, ``qkv``, the tower's 2D RoPE; per attention segment (an image,
or a video frame: the segments of ``cu_seqlens`` the block itself used) the mean query q̄ = mean_i RoPE(q_i) (so
q̄·k_j is the mean logit token j receives), p_j = softmax_j(q̄·k_j / sqrt(d)) within the segment, averaged over
heads, then averaged over each 2x2 merge group -> one score per merged token. O(N·d) per head, no N x N matrix,
works with any attention backend of the tower. ``keys``: the block's keys **before** RoPE (content only),
averaged over heads and over each 2x2 group.

**Positions.** Survivors keep their original M-RoPE triples on both sides. LLM side: the runtime gathers the
(composed) rotary tables along the sequence axis; decoding continues from the cache length of layer 0 (the full
prompt) + the model's ``rope_deltas``, untouched. Vision side: the rebuilt prompt has k placeholders per unit
(``<|vision_start|>`` / ``<|vision_end|>`` kept) and ``position_ids_for`` returns (3, B, N') ids in which every
kept visual token has the triple of its anchor in the original grid (pooled tokens: their window's anchor; in
``ImageFeatures.positions``) and every text token its original triple, so text after an image continues exactly
as in the unreduced prompt. ``generate`` extends those explicit ids by +1 per step; the model's ``rope_deltas``
is set to match so a manual decode loop (no position ids) continues correctly too.
"""

from __future__ import annotations

import inspect
from typing import Any, Literal

import torch

from ..errors import ConfigError
from ..layout import Grid, Layout, Video
from ..methods.base import VisionExtras
from ..reduction import chained_anchor
from . import register_adapter
from .base import ImageFeatures, ModelAdapter, TokenMap, VisualGroup
from .qwen_vision import CombinedScores, TowerScores, Unit, compose_mrope, segment_received_attention
from .qwen_vision import apply_vision_rope as _apply_vision_rope  # noqa: F401  (the former name, kept importable)

__all__ = ["Qwen2VLAdapter", "Qwen2_5_VLAdapter", "compose_mrope", "segment_received_attention"]


# ---------------------------------------------------------------------------------------------- adapter
@register_adapter
class Qwen2VLAdapter(ModelAdapter):
    """Adapter for ``Qwen2VLForConditionalGeneration`` (see the module docstring); Qwen2.5-VL and Qwen3-VL extend it."""

    family = "qwen2_vl"
    model_class_names = ("Qwen2VLForConditionalGeneration",)
    visual_input_keys = ("pixel_values", "pixel_values_videos")
    vision_only_keys = ("image_grid_thw", "video_grid_thw", "mm_token_type_ids", "second_per_grid_ts",
                        "rope_deltas", "mm_encoder_outputs")

    def dummy_images(self, n, image_size, generator):
        """Random ``image_size`` images (default 8 x 8 merged tokens) as patch rows and ``image_grid_thw``; the
        placeholder run is ``<|vision_start|> <|image_pad|> x k <|vision_end|>``."""
        cfg, vc = self.model.config, self.model.config.vision_config
        p, m, tp = vc.patch_size, vc.spatial_merge_size, vc.temporal_patch_size
        H, W = image_size or (8 * p * m, 8 * p * m)
        if H % (p * m) or W % (p * m):
            raise ValueError(f"image size must be a multiple of {p * m} px for {type(self.model).__name__}, "
                             f"got {H} x {W}")
        grid = (1, H // p, W // p)
        run = [cfg.vision_start_token_id] + [cfg.image_token_id] * (grid[1] * grid[2] // (m * m)) \
            + [cfg.vision_end_token_id]
        pixel_values = torch.randn(n * grid[1] * grid[2], vc.in_channels * tp * p * p, generator=generator)
        return [run] * n, {"pixel_values": pixel_values, "image_grid_thw": torch.tensor([grid] * n)}

    def dummy_inputs(self, texts, **kwargs):
        out = super().dummy_inputs(texts, **kwargs)
        if "mm_token_type_ids" in inspect.signature(self.inner.forward).parameters:  # transformers >= 5.x
            out["mm_token_type_ids"] = (out["input_ids"] == self.model.config.image_token_id).int()
        return out

    def __init__(self, model, video_units: Literal["frame", "video"] = "frame") -> None:
        super().__init__(model)
        if video_units not in ("frame", "video"):
            raise ConfigError(f"{self.family}: video_units={video_units!r}; allowed: 'frame', 'video'")
        self.video_units = video_units
        self._pos_memo: tuple | None = None

    @classmethod
    def matches(cls, model) -> bool:
        names = {c.__name__ for c in type(model).__mro__}
        return "Qwen2VLForConditionalGeneration" in names and "Qwen2_5_VLForConditionalGeneration" not in names

    def vision_extras_available(self) -> frozenset[str]:
        """Qwen's ViT (and Qwen3-VL's) has no CLS token and is not a CLIP tower: the mean query's received attention
        and the keys; a stage that needs CLS attention or CDPruner's CLIP image space is refused when attached."""
        return frozenset({"received_attention", "keys"})

    # ---- language model -------------------------------------------------------------------------------------
    @property
    def inner(self):
        return self.model.model

    @property
    def language_model(self):
        inner = self.inner
        return getattr(inner, "language_model", inner)

    def _mrope_section(self) -> list[int]:
        sec = getattr(getattr(self.language_model, "rotary_emb", None), "mrope_section", None)
        if sec is None:
            cfg = self.text_config
            params = getattr(cfg, "rope_parameters", None) or getattr(cfg, "rope_scaling", None) or {}
            sec = params.get("mrope_section")
        if sec is None:
            raise ConfigError(f"{self.family}: cannot find mrope_section in the text config")
        return list(sec)

    def rope_rows(self, x: torch.Tensor, position_embeddings: Any, rows: torch.Tensor | None) -> torch.Tensor:
        """M-RoPE for rows of x (B, h, R, d). 5.2x passes composed (B, N, d) tables (the Llama-style path);
        older versions pass per-axis (3, B, N, d) tables, composed here with ``mrope_section``."""
        cos, sin = position_embeddings
        if cos.dim() == 4:
            sec = self._mrope_section()
            cos, sin = compose_mrope(cos, sec), compose_mrope(sin, sec)
        return super().rope_rows(x, (cos, sin), rows)

    # ---- visual tokens --------------------------------------------------------------------------------------
    def placeholder_token_id(self) -> int:
        return self.model.config.image_token_id

    def placeholder_mask(self, input_ids: torch.Tensor) -> torch.Tensor:
        cfg = self.model.config
        return (input_ids == cfg.image_token_id) | (input_ids == cfg.video_token_id)

    def placeholder_groups(self, input_ids: torch.Tensor, kwargs: dict) -> list[tuple[str, torch.Tensor, list[int]]]:
        """Images and videos, each item needing ``t * h * w / merge_size**2`` placeholders (from ``*_grid_thw``)."""
        cfg = self.model.config
        out = []
        for kind, key, tok in (("image", "image_grid_thw", cfg.image_token_id),
                               ("video", "video_grid_thw", cfg.video_token_id)):
            grid = kwargs.get(key)
            if grid is not None:
                out.append((kind, input_ids == tok, [int(n) for n in (grid.prod(-1) // self.merge_size ** 2).tolist()]))
        return out

    @property
    def merge_size(self) -> int:
        return int(self.model.config.vision_config.spatial_merge_size)

    def _units(self, kwargs: dict) -> tuple[list[Unit], list[Unit]]:
        """Image units and video units, each in the order of their placeholders (one host sync for the grids)."""
        m = self.merge_size
        images, videos = [], []
        for kind, key, out in (("image", "image_grid_thw", images), ("video", "video_grid_thw", videos)):
            grid = kwargs.get(key)
            if grid is None:
                continue
            offset = 0
            for i, (t, h, w) in enumerate(grid.tolist()):
                h, w = h // m, w // m
                if kind == "video" and self.video_units == "frame":
                    for f in range(t):
                        out.append(Unit(kind, i, f, (1, h, w), offset))
                        offset += h * w
                else:
                    out.append(Unit(kind, i, 0, (t, h, w), offset))
                    offset += t * h * w
        return images, videos

    def _unit_ids(self, input_ids: torch.Tensor, kwargs: dict) -> tuple[torch.Tensor, list[Unit]]:
        """(B, N) global unit id of every placeholder (-1 elsewhere) and the units in global (sequence) order.

        Units are numbered by their first placeholder in row-major order over the batch. Without grids in kwargs,
        each contiguous run of image (video) placeholders is one unit.
        """
        cfg = self.model.config
        flat = input_ids.flatten()
        dev = flat.device
        images, videos = self._units(kwargs)
        local = torch.full_like(flat, -1)
        kinds = []
        for kind, tok, units in (("image", cfg.image_token_id, images), ("video", cfg.video_token_id, videos)):
            is_tok = flat == tok
            rank = is_tok.long().cumsum(0) - 1
            if units:
                sizes = torch.tensor([u.num_tokens for u in units], device=dev)
                n_tok = int(is_tok.sum())
                if n_tok != int(sizes.sum()):
                    raise ConfigError(
                        f"{self.family}: the prompt has {n_tok} {kind} placeholder tokens but "
                        f"{kind}_grid_thw implies {int(sizes.sum())}; check the processor output"
                    )
                unit = torch.searchsorted(sizes.cumsum(0), rank.clamp(min=0), right=True)
            else:
                unit = self._runs(is_tok, input_ids.shape[1], kind, kwargs)
            base = sum(len(k[1]) for k in kinds)
            local = torch.where(is_tok, unit + base, local)
            if not units and bool(is_tok.any()):
                # placeholders without grids (LLM side inside generate): units from runs, no geometry
                n_runs = int(unit.max()) + 1
                units = [Unit(kind, -1, 0, (1, 1, 0), 0) for _ in range(n_runs)]
            kinds.append((kind, units))
        all_units = [u for _, us in kinds for u in us]
        U = len(all_units)
        if U == 0:
            return torch.full_like(input_ids, -1), []
        is_vis = local >= 0
        pos = torch.arange(flat.numel(), device=dev)
        first = torch.full((U,), flat.numel(), device=dev, dtype=torch.long)
        first.scatter_reduce_(0, local[is_vis], pos[is_vis], reduce="amin", include_self=True)
        order = first.argsort()  # global id -> local id
        rank = torch.empty_like(order)
        rank[order] = torch.arange(U, device=dev)
        gid = torch.where(is_vis, rank[local.clamp(min=0)], torch.full_like(local, -1))
        ordered = [all_units[i] for i in order.tolist()]
        return gid.view_as(input_ids), ordered

    def _runs(self, is_tok: torch.Tensor, seq_len: int, kind: str, kwargs: dict) -> torch.Tensor:
        """Unit index of every placeholder (flat, row-major) when the grids are not in kwargs.

        transformers 5.2x's ``generate`` encodes the images before the prefill and drops ``*_grid_thw`` from the
        forward kwargs, passing (4, B, N) M-RoPE ``position_ids`` instead. A unit is then a contiguous run of
        placeholders, and for per-frame video units a new frame starts where the temporal M-RoPE id changes (so
        frames whose temporal ids coincide, e.g. fractional time intervals, are merged). Without position ids the
        whole run is one unit.
        """
        idx = torch.arange(is_tok.numel(), device=is_tok.device)
        prev = torch.roll(is_tok, 1) & (idx % seq_len != 0)
        start = is_tok & ~prev
        pos = kwargs.get("position_ids")
        if kind == "video" and self.video_units == "frame" and isinstance(pos, torch.Tensor) and pos.dim() == 3 \
                and pos.shape[0] in (3, 4) and pos.shape[-1] == seq_len:
            t = pos[pos.shape[0] - 3].expand(-1, seq_len).flatten().to(is_tok.device)
            start |= is_tok & prev & (t != torch.roll(t, 1))
        return start.long().cumsum(0) - 1

    def token_map(self, input_ids: torch.Tensor, kwargs: dict) -> TokenMap:
        """Placeholders of images and videos; ``image_id`` = global unit index in sequence order (see module doc)."""
        gid, _ = self._unit_ids(input_ids, kwargs)
        is_visual = gid >= 0
        return TokenMap(is_visual=is_visual, image_id=gid, protected=torch.zeros_like(is_visual))

    def unit_layouts(self, kwargs: dict, image: int) -> list[Layout]:
        """Layout of visual unit ``image`` (global, sequence order): ``Grid(h, w)`` of merged tokens for an image
        or a video frame, ``Video(t, h, w)`` for a whole-video unit; the grid follows the resized image's aspect."""
        if kwargs.get("image_grid_thw") is None and kwargs.get("video_grid_thw") is None:
            raise NotImplementedError(f"{self.family}: unit_layouts needs image_grid_thw / video_grid_thw")
        _, units = self._unit_ids(kwargs["input_ids"], kwargs)
        if not 0 <= image < len(units):
            raise ValueError(f"{self.family}: visual unit {image} does not exist (the prompt has {len(units)})")
        t, h, w = units[image].grid
        return [Grid(h, w) if t == 1 else Video(t, h, w)]

    # ---- positions ------------------------------------------------------------------------------------------
    def _mm_token_type_ids(self, input_ids: torch.Tensor, kwargs: dict) -> torch.Tensor:
        mm = kwargs.get("mm_token_type_ids")
        if mm is not None:
            return mm
        cfg = self.model.config
        return ((input_ids == cfg.image_token_id).int() + 2 * (input_ids == cfg.video_token_id).int())

    def original_position_ids(self, kwargs: dict) -> torch.Tensor:
        """(3, B, N) M-RoPE ids of the unreduced prompt, from the model's own ``get_rope_index`` (memoised per
        input tensor, so pack_images and position_ids_for share one call)."""
        input_ids = kwargs["input_ids"]
        keys = (input_ids, kwargs.get("attention_mask"), kwargs.get("image_grid_thw"), kwargs.get("video_grid_thw"))
        if self._pos_memo is not None and all(a is b for a, b in zip(self._pos_memo[0], keys)):
            return self._pos_memo[1]
        fn = self.inner.get_rope_index
        params = inspect.signature(fn).parameters
        cand = {
            "mm_token_type_ids": self._mm_token_type_ids(input_ids, kwargs),
            "image_grid_thw": kwargs.get("image_grid_thw"),
            "video_grid_thw": kwargs.get("video_grid_thw"),
            "second_per_grid_ts": kwargs.get("second_per_grid_ts"),
            "attention_mask": kwargs.get("attention_mask"),
        }
        call = {k: v for k, v in cand.items() if k in params}
        pos, _ = fn(input_ids, **call)
        self._pos_memo = (keys, pos)
        return pos

    def _unit_positions(self, kwargs: dict) -> list[torch.Tensor]:
        """Original (3, n_u) M-RoPE ids of every unit's placeholders, units in global order."""
        input_ids = kwargs["input_ids"]
        pos = self.original_position_ids(kwargs)
        gid, units = self._unit_ids(input_ids, kwargs)
        vis = gid >= 0
        g = gid[vis]
        order = torch.sort(g, stable=True).indices
        flat = pos[:, vis][:, order]  # (3, n_visual) grouped by unit, each in sequence order
        return list(flat.split([u.num_tokens for u in units], dim=1))

    def position_ids_for(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                         images: list[ImageFeatures], kwargs: dict) -> torch.Tensor:
        """(3, B, N') ids for the rebuilt prompt: text keeps its original triples, every kept visual token the
        triple of its anchor (``ImageFeatures.positions``). Also sets the model's ``rope_deltas`` accordingly."""
        orig = self.original_position_ids(kwargs)
        o_ids = kwargs["input_ids"]
        o_mask = kwargs.get("attention_mask")
        o_valid = torch.ones_like(o_ids, dtype=torch.bool) if o_mask is None else o_mask.bool()
        B, N2 = input_ids.shape
        valid = torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
        new_vis = self.placeholder_mask(input_ids) & valid
        new_text = valid & ~new_vis
        src_text = orig[:, o_valid & ~self.placeholder_mask(o_ids)]
        out = torch.zeros(3, B, N2, dtype=orig.dtype, device=orig.device)
        if src_text.shape[1] != int(new_text.sum()):
            raise RuntimeError(f"{self.family}: rebuilt prompt has {int(new_text.sum())} text tokens, "
                               f"the original {src_text.shape[1]}")
        out[:, new_text] = src_text
        if images:
            vis_pos = torch.cat([im.positions for im in images], dim=1).to(out)
            out[:, new_vis] = vis_pos
        # what the stock model stores after a prefill: next position = rope_deltas + number of valid tokens
        n_valid = valid.sum(-1)
        self.inner.rope_deltas = (out.amax(dim=(0, 2)) + 1 - n_valid).unsqueeze(1)
        self._pos_memo = None  # the prompt is rebuilt: drop the references to this call's inputs
        return out

    # ---- vision side ----------------------------------------------------------------------------------------
    @property
    def visual(self):
        inner = self.inner
        return inner.visual if hasattr(inner, "visual") else self.model.visual

    def _score_block_index(self) -> int:
        return len(self.visual.blocks) - 1

    def _block_order(self, grid_thw: torch.Tensor) -> torch.Tensor | None:
        """Merged-group index (in the blocks' token order) of each merger output token; None: same order."""
        return None

    def _side_features(self, out) -> torch.Tensor | None:
        """(T, D') other per-token features of the tower call ``out`` that must follow every reduction of the
        merged tokens (``ImageFeatures.aux``); None: none (Qwen2-VL / 2.5-VL)."""
        return None

    def _run_tower(self, pixel_values: torch.Tensor, grid_thw: torch.Tensor
                   ) -> tuple[torch.Tensor, TowerScores, torch.Tensor | None]:
        """Merged features (T, D) exactly as the model computes them (its own tower call) + the scoring inputs
        + the side features (:meth:`_side_features`)."""
        visual = self.visual
        block = visual.blocks[self._score_block_index()]
        cap: dict[str, Any] = {}

        def grab(module, args, kwargs):
            cap["x"] = args[0] if args else kwargs["hidden_states"]
            cap["cu"] = kwargs["cu_seqlens"] if "cu_seqlens" in kwargs else args[1]
            cap["pe"] = kwargs.get("position_embeddings")
            cap["rpe"] = kwargs.get("rotary_pos_emb")

        handle = block.register_forward_pre_hook(grab, with_kwargs=True)
        try:
            dtype = visual.dtype if hasattr(visual, "dtype") else next(visual.parameters()).dtype
            out = visual(pixel_values.type(dtype), grid_thw=grid_thw)
        finally:
            handle.remove()
        merged = out if isinstance(out, torch.Tensor) else out.pooler_output
        if cap.get("pe") is not None:
            cos, sin = cap["pe"]
        else:  # older transformers: blocks get the raw rotary angles
            emb = torch.cat([cap["rpe"], cap["rpe"]], dim=-1)
            cos, sin = emb.cos(), emb.sin()
        scores = TowerScores(block, cap["x"], cap["cu"], cos, sin, self.merge_size ** 2, self._block_order(grid_thw))
        return merged, scores, self._side_features(out)

    def encode_images(self, kwargs: dict) -> list[VisualGroup]:
        _, units = self._unit_ids(kwargs["input_ids"], kwargs)
        flats, sides, extras_src, kind_offset = [], [], [], {}
        base = 0
        for kind, pv_key, grid_key in (("image", "pixel_values", "image_grid_thw"),
                                       ("video", "pixel_values_videos", "video_grid_thw")):
            pv = kwargs.get(pv_key)
            if pv is None:
                continue
            grid = kwargs.get(grid_key)
            if grid is None:
                raise ConfigError(f"{self.family}: {pv_key} given without {grid_key}")
            merged, scores, side = self._run_tower(pv, grid)
            flats.append(merged)
            sides.append(side)
            extras_src.append(scores)
            kind_offset[kind] = base
            base += merged.shape[0]
        flat = torch.cat(flats, dim=0)
        flat_side = None if sides[0] is None else torch.cat(sides, dim=0)
        scorer = CombinedScores(extras_src)
        groups: dict[tuple, list[int]] = {}
        for gid, u in enumerate(units):
            groups.setdefault(u.grid, []).append(gid)
        out = []
        dev = flat.device
        for grid, gids in groups.items():
            t, h, w = grid
            n = t * h * w
            starts = torch.tensor([kind_offset[units[g].kind] + units[g].offset for g in gids], device=dev)
            idx = starts[:, None] + torch.arange(n, device=dev)  # (U, n) rows of the flat tower output
            layout = Grid(h, w) if t == 1 else Video(t, h, w)
            extras = VisionExtras(received_attention=lambda idx=idx: scorer.received_attention()[idx],
                                  keys=lambda idx=idx: scorer.keys()[idx])
            if flat_side is not None:
                extras.other["side_features"] = lambda idx=idx: flat_side[idx]
            out.append(VisualGroup(flat[idx], layout, list(gids), [0] * len(gids), extras))
        return out

    def project(self, features: torch.Tensor) -> torch.Tensor:
        """Identity: the tower's PatchMerger is the projector (features are already in the LLM space)."""
        return features

    def pack_images(self, groups_out, kwargs: dict) -> list[ImageFeatures]:
        """One ImageFeatures per unit (global order) with the original M-RoPE triple of every output's anchor."""
        unit_pos = self._unit_positions(kwargs)
        out: list[ImageFeatures | None] = [None] * len(unit_pos)
        for group, feats, reductions in groups_out:
            U, k = feats.shape[:2]
            anchor = chained_anchor(reductions, k, U, feats.device)
            pos = torch.stack([unit_pos[g] for g in group.unit_image])  # (U, 3, n)
            pos = torch.gather(pos, 2, anchor.to(pos.device)[:, None, :].expand(-1, 3, -1))
            side = group.extras.other.get("side_features")
            side = None if side is None else side()
            for red in reductions:  # the side features follow every stage exactly (same merges, same windows)
                side = None if side is None else red.reduce_like(side, f"{self.family}'s side features")
            for u, g in enumerate(group.unit_image):
                out[g] = ImageFeatures(feats[u], torch.zeros(k, dtype=torch.bool, device=feats.device), pos[u],
                                       aux=None if side is None else side[u])
        missing = [i for i, f in enumerate(out) if f is None]
        if missing:
            raise RuntimeError(f"{self.family}: no features for visual units {missing}")
        return out  # type: ignore[return-value]


@register_adapter
class Qwen2_5_VLAdapter(Qwen2VLAdapter):
    """Qwen2.5-VL: same LLM side; the tower runs window attention in most blocks and full attention in
    ``fullatt_block_indexes``, on tokens permuted window by window (undone after the merger)."""

    family = "qwen2_5_vl"
    model_class_names = ("Qwen2_5_VLForConditionalGeneration",)

    @classmethod
    def matches(cls, model) -> bool:
        return any(c.__name__ in cls.model_class_names for c in type(model).__mro__)

    def _score_block_index(self) -> int:
        full = list(getattr(self.visual, "fullatt_block_indexes", None)
                    or getattr(self.model.config.vision_config, "fullatt_block_indexes", []) or [])
        return int(full[-1]) if full else len(self.visual.blocks) - 1

    def _block_order(self, grid_thw: torch.Tensor) -> torch.Tensor:
        visual = self.visual
        try:
            from transformers.vision_utils import get_vision_window_index

            window_index, _ = get_vision_window_index(grid_thw, spatial_merge_size=visual.spatial_merge_size,
                                                      window_size=visual.window_size, patch_size=visual.patch_size)
        except ImportError:  # older transformers: a method of the tower
            window_index, _ = visual.get_window_index(grid_thw)
        # block position p holds merged group window_index[p]; output token j is at block position argsort[j]
        return torch.argsort(window_index.to(grid_thw.device))
