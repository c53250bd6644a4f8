"""LLaVA-OneVision (``LlavaOnevisionForConditionalGeneration``): SigLIP tower, anyres-max crops, video.

What differs from LLaVA-NeXT (:mod:`vtc.models.llava_next`, whose geometry and packing this reuses):

- **Tower.** SigLIP, no CLS token, ``vision_feature_select_strategy="full"``: every patch is fed. Vision-side
  scores are the attention each patch receives from the mean query of the feature block (``received_attention``;
  VisionZip's dominant score falls back to it, CLS-only methods are refused with the reason).
- **anyres_max_N.** After unpadding, a crop map of ``R x C`` tokens larger than ``1.1^2 N`` crops' worth is
  bilinearly shrunk to ``(R // ratio) x (C // ratio)`` (``ratio = sqrt(R C / (N h w))``), then one newline per
  row (:meth:`AnyresGeometry.packed`). Grid outputs of vision-side stages are packed with the same rule at the
  reduced resolution; pruned / merged outputs as in LLaVA-NeXT (base, then per crop band its tokens + newline).
- **Several images in one sample** (``batch_num_images > 1``): each image is its base crop only, ``h * w``
  tokens and one newline (no anyres).
- **Video.** ``pixel_values_videos`` (V, F, C, H, W): every frame goes through the tower and the projector, is
  bilinearly pooled 2x2 (``ceil(h / 2) x ceil(w / 2)``, the model's ``apply_pooling``), frames are concatenated
  and **one** newline ends the video. A unit is one frame (budgets per frame, on both sides): vision-side
  units are the pooled frame grids, already in the LLM space (the pooling follows the projector, so there is no
  per-token vision feature of a pooled token; ``feature_space: vision`` works on them too, like Qwen's merged
  tokens). Their tower scores / keys are taken before the pooling (``h x w``) and mapped through the same
  bilinear pooling, so a pooled token's score is the weighted mean of the patches it is made of. The video's
  newline belongs to its last frame, is protected (never pruned, never counted).

Units (images and video frames) are numbered in sequence order; that number is the image id of the token map
and the order of :meth:`pack_images`' output.
"""

from __future__ import annotations

import math

import torch
from torch.nn import functional as F

from ..errors import ConfigError
from ..layout import Grid, Layout
from ..methods.base import VisionExtras
from . import register_adapter
from .base import ImageFeatures, TokenMap, VisualGroup, pixel_input
from .llava_next import AnyresGeometry, LlavaNextAdapter, anyres_geometry

__all__ = ["LlavaOnevisionAdapter", "pool_scores"]


def pool_scores(x: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """(U, h*w[, d]) per-patch values -> (U, ceil(h/2)*ceil(w/2)[, d]) through OneVision's bilinear 2x2 pooling."""
    squeeze = x.dim() == 2
    y = x[..., None] if squeeze else x
    U, _, d = y.shape
    y = y.float().view(U, h, w, d).permute(0, 3, 1, 2)
    y = F.interpolate(y, size=[math.ceil(h / 2), math.ceil(w / 2)], mode="bilinear")
    y = y.permute(0, 2, 3, 1).reshape(U, -1, d)
    return y[..., 0] if squeeze else y


@register_adapter
class LlavaOnevisionAdapter(LlavaNextAdapter):
    """Adapter for ``LlavaOnevisionForConditionalGeneration`` (see the module docstring)."""

    family = "llava_onevision"
    model_class_names = ("LlavaOnevisionForConditionalGeneration",)
    visual_input_keys = ("pixel_values", "pixel_values_videos")
    # NeXT's, plus the video sizes, the images-per-row count and the anyres_max aspect setting
    vision_only_keys = LlavaNextAdapter.vision_only_keys + ("image_sizes_videos", "batch_num_images", "vision_aspect_ratio")

    # ---- geometry -----------------------------------------------------------------------------------------------
    def _max_patches(self, kwargs: dict) -> int:
        rule = kwargs.get("vision_aspect_ratio") or self.model.config.vision_aspect_ratio
        if not str(rule).startswith("anyres_max_"):
            raise ConfigError(f"llava_onevision: vision_aspect_ratio={rule!r} is not supported (allowed: anyres_max_N)")
        return int(str(rule)[len("anyres_max_"):])

    def geometries(self, kwargs: dict) -> list[AnyresGeometry] | None:
        sizes = kwargs.get("image_sizes")
        if sizes is None or kwargs.get("pixel_values") is None:
            return None
        sizes = sizes.tolist() if isinstance(sizes, torch.Tensor) else list(sizes)
        per_row = kwargs.get("batch_num_images")
        single = [True] * len(sizes) if per_row is None else [int(n) == 1 for n in per_row for _ in range(int(n))]
        cfg = self.model.config
        top = self._max_patches(kwargs)
        out = []
        for s, patched in zip(sizes, single):
            g = anyres_geometry(s, cfg.image_grid_pinpoints, cfg.vision_config.image_size)
            out.append(AnyresGeometry(g.size, g.rows, g.cols, top) if patched else AnyresGeometry(g.size, 0, 0))
        return out

    @property
    def frame_grid(self) -> tuple[int, int]:
        """(h, w) of one video frame after the model's 2x2 pooling."""
        h, w = self.crop_grid
        return math.ceil(h / 2), math.ceil(w / 2)

    def _video_frames(self, kwargs: dict) -> list[int] | None:
        """Frames of every video of the call (None: no video)."""
        pv = kwargs.get("pixel_values_videos")
        if pv is not None:
            return [pv.shape[1]] * pv.shape[0]
        out = self._precomputed(kwargs, "video")
        if out is None:
            return None
        per_frame = self.frame_grid[0] * self.frame_grid[1]
        return [(int(t) - 1) // per_frame for t in out]

    @staticmethod
    def _precomputed(kwargs: dict, modality: str) -> list[int] | None:
        enc = kwargs.get("mm_encoder_outputs")
        out = enc.get(modality) if isinstance(enc, dict) else None
        pooled = getattr(out, "pooler_output", None)
        if pooled is None:
            return None
        if isinstance(pooled, torch.Tensor):
            return [pooled.shape[-2]] * pooled.shape[0] if pooled.dim() == 3 else [pooled.shape[0]]
        return [p.shape[0] for p in pooled]

    # ---- LLM side ----------------------------------------------------------------------------------------------
    def placeholder_mask(self, input_ids: torch.Tensor) -> torch.Tensor:
        cfg = self.model.config
        return (input_ids == cfg.image_token_id) | (input_ids == cfg.video_token_id)

    def _image_flags(self, kwargs: dict, device) -> tuple[list[int], torch.Tensor] | None:
        """(placeholders per image, newline flags over all image placeholders) or None without images."""
        geoms = self.geometries(kwargs)
        if geoms is not None:
            h, w = self.crop_grid
            extra = self._base_extra(kwargs)
            return ([g.num_tokens(h, w, extra) for g in geoms],
                    torch.cat([g.newline_mask(h, w, extra, device=device) for g in geoms]))
        packed = self._encoder_outputs(kwargs)
        if packed is None:
            return None
        return [p.shape[0] for p in packed], self._newline_rows(packed).to(device)

    def _unit_labels(self, input_ids: torch.Tensor, kwargs: dict):
        """Per placeholder (in flattened order): unit label (images 0..I-1, then the frames of every video) and
        protected flag; plus the number of images I. ConfigError when the prompt does not match the inputs."""
        cfg = self.model.config
        dev = input_ids.device
        flat = input_ids.flatten()
        is_img = flat == cfg.image_token_id
        is_vid = flat == cfg.video_token_id
        img = self._image_flags(kwargs, dev)
        frames = self._video_frames(kwargs)
        counts = img[0] if img is not None else []
        per_frame = self.frame_grid[0] * self.frame_grid[1]
        v_counts = [f * per_frame + 1 for f in frames] if frames is not None else []
        for what, found, want in (("image", int(is_img.sum()), counts), ("video", int(is_vid.sum()), v_counts)):
            if found != sum(want):
                raise ConfigError(
                    f"llava_onevision: the prompt has {found} {what} placeholder tokens but the {what} inputs imply "
                    f"{sum(want)} ({want}); build the prompt with the model's processor"
                )
        label = torch.full_like(flat, -1)
        protected = torch.zeros_like(flat, dtype=torch.bool)
        n_images = len(counts)
        if counts:
            rank = is_img.long().cumsum(0)[is_img] - 1
            label[is_img] = torch.searchsorted(torch.tensor(counts, device=dev).cumsum(0), rank, right=True)
            protected[is_img] = img[1]
        if v_counts:
            rank = is_vid.long().cumsum(0)[is_vid] - 1
            ends = torch.tensor(v_counts, device=dev).cumsum(0)
            video = torch.searchsorted(ends, rank, right=True)
            offset = rank - (ends - torch.tensor(v_counts, device=dev))[video]
            nf = torch.tensor(frames, device=dev)
            first_frame = nf.cumsum(0) - nf
            frame = torch.minimum(offset // per_frame, nf[video] - 1)
            label[is_vid] = n_images + first_frame[video] + frame
            protected[is_vid] = offset == torch.tensor(v_counts, device=dev)[video] - 1
        return label.view_as(input_ids), protected.view_as(input_ids), n_images

    def token_map(self, input_ids: torch.Tensor, kwargs: dict) -> TokenMap:
        """Images and video frames are units numbered in sequence order; newlines are protected."""
        label, protected, _ = self._unit_labels(input_ids, kwargs)
        is_visual = label >= 0
        flat = label.flatten()
        starts = torch.ones_like(flat, dtype=torch.bool)
        starts[1:] = flat[1:] != flat[:-1]
        vis = flat >= 0
        order = (starts & vis).long().cumsum(0) - 1
        image_id = torch.where(vis, order, torch.full_like(order, -1)).view_as(input_ids)
        return TokenMap(is_visual=is_visual, image_id=image_id, protected=protected & is_visual)

    def tokens_per_image(self, kwargs: dict) -> list[int] | None:
        img = self._image_flags(kwargs, "cpu")
        return img[0] if img is not None else None

    def _sequence_order(self, kwargs: dict) -> list[int]:
        """Unit labels in the order their tokens appear in the prompt."""
        label, _, _ = self._unit_labels(kwargs["input_ids"], kwargs)
        flat = label.flatten()
        starts = torch.ones_like(flat, dtype=torch.bool)
        starts[1:] = flat[1:] != flat[:-1]
        return flat[starts & (flat >= 0)].tolist()

    def unit_layouts(self, kwargs: dict, image: int, side: str = "vision") -> list[Grid]:
        """``image`` is a unit label (images first, then video frames: one pooled ``Grid`` each)."""
        geoms = self.geometries(kwargs) or []
        if image >= len(geoms):
            return [Grid(*self.frame_grid)]
        return super().unit_layouts(kwargs, image, side)

    def picture_layouts(self, kwargs: dict, image: int, side: str = "vision") -> list[Layout]:
        if image >= len(self.geometries(kwargs) or []):
            return [Grid(*self.frame_grid)]
        return super().picture_layouts(kwargs, image, side)

    # ---- vision side --------------------------------------------------------------------------------------------
    def encode_images(self, kwargs: dict) -> list[VisualGroup]:
        groups = super().encode_images(kwargs) if kwargs.get("pixel_values") is not None else []
        pv = pixel_input(kwargs, "pixel_values_videos", self.family, ("videos", "frames", "C", "H", "W"))
        if pv is None:
            return groups
        V, Fr = pv.shape[:2]
        if self._cls_in_features(kwargs):
            raise ConfigError("llava_onevision: vision_feature_select_strategy='full' on a CLS tower is not supported "
                              "for video (allowed: 'default')")
        feats, scorer = self._run_tower(pv.flatten(0, 1), kwargs)
        h, w = self.crop_grid
        if feats.shape[1] != h * w:
            raise ConfigError(f"llava_onevision: the tower gives {feats.shape[1]} tokens per frame, expected {h}x{w}")
        pooled = self.inner.apply_pooling(self.project(feats))  # the model's own projector + 2x2 pooling
        base = scorer.as_vision_extras()
        extras = VisionExtras(**{
            name: (lambda fn=fn, name=name: pool_scores(fn(), h, w))
            for name, fn in (("cls_attention", base.cls_attention), ("received_attention", base.received_attention),
                             ("keys", base.keys)) if fn is not None})
        n_images = len(self.geometries(kwargs) or [])
        units = list(range(n_images, n_images + V * Fr))
        groups.append(VisualGroup(pooled, Grid(*self.frame_grid), units, [0] * len(units), extras, space="llm"))
        return groups

    def pack_images(self, groups_out: list, kwargs: dict) -> list[ImageFeatures]:
        image_groups = [g for g in groups_out if g[0].space == "vision"]
        out = dict(enumerate(super().pack_images(image_groups, kwargs))) if image_groups else {}
        frames = self._video_frames(kwargs) or []
        last = set((torch.tensor(frames).cumsum(0) - 1 + len(out)).tolist()) if frames else set()
        newline = self.inner.image_newline
        for group, feats, reductions in groups_out:
            if group.space != "llm":
                continue
            valid = reductions[-1].valid if reductions else None
            for u, label in enumerate(group.unit_image):
                emb = feats[u] if valid is None else feats[u][valid[u]]
                prot = torch.zeros(emb.shape[0], dtype=torch.bool, device=emb.device)
                if label in last:  # one newline ends the video
                    emb = torch.cat([emb, newline.to(emb)[None]], dim=0)
                    prot = torch.cat([prot, prot.new_ones(1)])
                out[label] = ImageFeatures(emb, prot)
        return [out[label] for label in self._sequence_order(kwargs)]
