"""LLaVA-NeXT / LLaVA-1.6 (``LlavaNextForConditionalGeneration``): "anyres" multi-crop images.

What the model does with one image of size (H, W) (transformers' ``get_image_features`` /
``pack_image_features`` with ``vision_feature_select_strategy="default"``):

- the processor picks the best ``image_grid_pinpoints`` resolution (bh, bw) and cuts the resized, padded image
  into ``rows x cols = (bh / S) x (bw / S)`` crops of the tower's size S, plus one *base* crop of the whole
  image resized to S x S; ``pixel_values`` is (num_images, 1 + rows * cols (padded), C, S, S);
- the tower turns each crop into an ``h x w`` grid of patch features (CLIP-L/336: 24 x 24), the projector maps
  them to the LLM space;
- packing, per image, in this order (the image's placeholder tokens in the prompt):

  1. the base grid, ``h * w`` tokens, raster order, no newline;
  2. the crop grids tiled into one ``(rows * h) x (cols * w)`` map, cropped back to the image's aspect ratio
     (``unpad_image``: ``R x C`` remains), then each of the R rows followed by one learned ``image_newline``
     token: ``R * (C + 1)`` tokens.

  An image with no crops would get ``h * w`` base tokens and one newline at the end (the model's other branch;
  the processor always emits at least one crop).

LLM side: :meth:`LlavaNextAdapter.token_map` marks every placeholder visual with its image id (adjacent images
are told apart by the counts computed from ``image_sizes``; inside ``generate``, transformers >= 5.2x passes the
packed features as ``mm_encoder_outputs`` instead, and the counts and newline rows are read from those) and
marks the newline positions ``protected``:
LLM-side stages never prune them, and they are not candidates, so ``run.stats`` counts per sample only the
non-newline visual tokens (``tokens_in`` / ``tokens_out``), and a fractional budget is a fraction of those.

Vision side: :meth:`LlavaNextAdapter.encode_images` runs the tower once on every crop of every image and returns
one :class:`VisualGroup` whose units are all crops (base and crops, ``unit_part`` 0 is the base), each a
``Grid(h, w)``, with the tower's scoring extras (CLS attention, keys, ...). Methods reduce each unit (crop)
to their budget (a per-crop budget; ``unit_image`` / ``unit_part`` let a method split a per-image budget).
:meth:`LlavaNextAdapter.pack_images` rebuilds each image's LLM tokens from the reduced units:

- **identity** (every stage kept every token, in order): exactly the model's own packing (logits equal the
  unwrapped model's);
- **grid** (the last stage returns a ``Grid(h', w')``, e.g. ``downsample`` / pooling): the model's rule at the
  reduced resolution: base ``h' * w'`` tokens, then the ``(rows * h') x (cols * w')`` crop map unpadded with the
  same aspect rule to ``R' x C'`` and one newline after each row: ``h'w' + R'(C' + 1)`` tokens;
- **sequence** (pruning / merging: unordered ``Sequence`` outputs): the base unit's tokens in the method's
  order, then for each of the ``rows`` crop bands (crops ``r * cols ... r * cols + cols - 1``) the tokens of
  its crops, crop by crop in the method's order, followed by one newline: ``sum_k + rows`` tokens. No unpadding
  (the tokens a method kept are exactly what it was asked for; padding-area tokens it chose stay).

Newline tokens are added after the reduction, flagged ``protected`` in :class:`ImageFeatures` (so later
LLM-side stages keep them), and are never counted in the vision-side stats (which count the method's tokens
per unit). What each image occupies in the rebuilt prompt is ``run.stats.image_tokens``: the per-unit counts
plus the newlines (sequence scheme), or minus the unpadded-away tokens plus the newlines (grid scheme).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import torch

from ..errors import ConfigError
from ..layout import Grid, Layout, MultiCrop
from . import llava as _llava
from . import register_adapter
from .base import ImageFeatures, TokenMap, VisualGroup, precomputed_counts

__all__ = ["LlavaNextAdapter", "AnyresGeometry", "anyres_geometry", "unpad_box", "pack_grid", "pack_sequence"]


def unpad_box(cur_h: int, cur_w: int, orig_h: int, orig_w: int) -> tuple[int, int, int, int]:
    """(top, bottom, left, right) of the part of a ``cur_h x cur_w`` feature map that covers an image of
    ``orig_h x orig_w`` pixels once resized-and-padded to the map's aspect ratio (transformers' ``unpad_image``,
    same floating-point steps, so the same rounding)."""
    if orig_w / orig_h > cur_w / cur_h:
        scale = cur_w / orig_w
        new_h = int(round(orig_h * scale, 7))
        pad = (cur_h - new_h) // 2
        return pad, cur_h - pad, 0, cur_w
    scale = cur_h / orig_h
    new_w = int(round(orig_w * scale, 7))
    pad = (cur_w - new_w) // 2
    return 0, cur_h, pad, cur_w - pad


def _best_resolution(size: tuple[int, int], pinpoints: list) -> tuple[int, int]:
    """The pinpoint (height, width) the processor resizes an image of ``size`` (H, W) to."""
    from transformers.image_processing_utils import select_best_resolution

    return tuple(select_best_resolution(list(size), pinpoints))


@dataclass(frozen=True)
class AnyresGeometry:
    """Where one image's crops sit. ``size``: original (H, W); ``rows x cols``: the crop arrangement (0 x 0: the
    image is fed as its base crop only). ``max_patches``: LLaVA-OneVision's ``anyres_max_N`` rule (the unpadded
    crop map is bilinearly shrunk when it holds more than 1.1^2 N crops' worth of tokens); None: LLaVA-NeXT."""

    size: tuple[int, int]
    rows: int
    cols: int
    max_patches: int | None = None

    @property
    def num_crops(self) -> int:
        return self.rows * self.cols

    @property
    def num_units(self) -> int:
        """Base + crops (the tower's batch for this image)."""
        return 1 + self.num_crops

    def unpadded(self, h: int, w: int) -> tuple[int, int, int, int]:
        """(top, bottom, left, right) of the kept part of the ``(rows * h) x (cols * w)`` crop map."""
        return unpad_box(self.rows * h, self.cols * w, *self.size)

    def packed(self, h: int, w: int) -> tuple[int, int]:
        """(R, C) of the crop map as packed at per-crop grid ``h x w``: unpadded, then (``max_patches``) shrunk by
        ``ratio = sqrt(R C / (N h w))`` to ``(R // ratio, C // ratio)`` when ratio > 1.1 (the model's rule)."""
        top, bottom, left, right = self.unpadded(h, w)
        R, C = bottom - top, right - left
        if self.max_patches is not None:
            ratio = math.sqrt(R * C / (self.max_patches * h * w))
            if ratio > 1.1:
                return int(R // ratio), int(C // ratio)
        return R, C

    def num_tokens(self, h: int, w: int, base_extra: int = 0) -> int:
        """Placeholders of this image at per-crop grid ``h x w`` (the processor's count)."""
        if self.num_crops == 0:
            return h * w + base_extra + 1
        R, C = self.packed(h, w)
        return h * w + base_extra + R * (C + 1)

    def newline_mask(self, h: int, w: int, base_extra: int = 0, device=None) -> torch.Tensor:
        """(num_tokens,) bool: True at this image's ``image_newline`` positions."""
        base = torch.zeros(h * w + base_extra, dtype=torch.bool, device=device)
        if self.num_crops == 0:
            return torch.cat([base, torch.ones(1, dtype=torch.bool, device=device)])
        R, C = self.packed(h, w)
        rows = torch.zeros(R, C + 1, dtype=torch.bool, device=device)
        rows[:, -1] = True
        return torch.cat([base, rows.flatten()])


@lru_cache(maxsize=4096)
def _geometry_cached(size: tuple[int, int], pinpoints: tuple[tuple[int, int], ...], crop_px: int) -> AnyresGeometry:
    bh, bw = _best_resolution(size, [list(p) for p in pinpoints])
    rows, cols = bh // crop_px, bw // crop_px
    n_model = -(-bh // crop_px) * -(-bw // crop_px)  # the model's image_size_to_num_patches (minus the base)
    if rows * cols != n_model or rows < 1 or cols < 1:
        raise ConfigError(
            f"llava_next: image_grid_pinpoints resolution {bh}x{bw} (for an image of {size[0]}x{size[1]}) is not a "
            f"multiple of the vision tower's image size {crop_px}; the model itself cannot pack such crops"
        )
    return AnyresGeometry(size=size, rows=rows, cols=cols)


def anyres_geometry(size, pinpoints: list, crop_px: int) -> AnyresGeometry:
    """Crop arrangement of an image of ``size`` (H, W) for a model with ``image_grid_pinpoints`` and tower
    input size ``crop_px`` (same selection as the processor and ``image_size_to_num_patches``)."""
    h, w = (int(v) for v in size)
    return _geometry_cached((h, w), tuple(tuple(int(v) for v in p) for p in pinpoints), int(crop_px))


def pack_grid(base: torch.Tensor, crops: torch.Tensor, geom: AnyresGeometry, h: int, w: int,
              newline: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The model's anyres packing at per-crop grid ``h x w``.

    base: (h*w, D); crops: (rows*cols, h*w, D) in crop order; newline: (D,). Returns embeds (T, D) =
    [base, for each unpadded row of the tiled crop map: its C tokens, newline] and protected (T,) (newlines).
    At the model's own resolution this is bit-identical to ``LlavaNextModel.pack_image_features``.
    """
    D = base.shape[-1]
    dev = base.device
    newline = newline.to(device=dev, dtype=base.dtype)
    flags = torch.zeros(base.shape[0], dtype=torch.bool, device=dev)
    if crops.shape[0] == 0:
        return torch.cat([base, newline[None]], dim=0), torch.cat([flags, torch.ones(1, dtype=torch.bool, device=dev)])
    tiled = crops.reshape(geom.rows, geom.cols, h, w, D).permute(0, 2, 1, 3, 4).reshape(geom.rows * h, geom.cols * w, D)
    top, bottom, left, right = geom.unpadded(h, w)
    tiled = tiled[top:bottom, left:right]
    R, C = geom.packed(h, w)
    if (R, C) != tiled.shape[:2]:  # OneVision's anyres_max: bilinear shrink, as the model does it
        tiled = torch.nn.functional.interpolate(tiled.permute(2, 0, 1)[None], [R, C], mode="bilinear")[0]
        tiled = tiled.permute(1, 2, 0)
    rows = torch.cat([tiled, newline.expand(tiled.shape[0], 1, D)], dim=1)
    row_flags = torch.zeros(rows.shape[:2], dtype=torch.bool, device=dev)
    row_flags[:, -1] = True
    return torch.cat([base, rows.reshape(-1, D)], dim=0), torch.cat([flags, row_flags.flatten()])


def pack_sequence(base: torch.Tensor, crops: list[torch.Tensor], geom: AnyresGeometry,
                  newline: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Packing of pruned / merged (unordered) units: base tokens (k0, D), then for each crop row band the
    tokens of its ``cols`` crops (each (k_i, D), crop order) followed by one newline; an image without crops
    gets one newline at the end. Returns embeds (T, D) and protected (T,) (True at the newlines)."""
    newline = newline.to(device=base.device, dtype=base.dtype)[None]
    parts = [base]
    flags = [torch.zeros(base.shape[0], dtype=torch.bool, device=base.device)]
    one = torch.ones(1, dtype=torch.bool, device=base.device)
    bands = [crops[r * geom.cols:(r + 1) * geom.cols] for r in range(geom.rows)] if crops else [[]]
    for band in bands:
        for c in band:
            parts.append(c)
            flags.append(torch.zeros(c.shape[0], dtype=torch.bool, device=base.device))
        parts.append(newline)
        flags.append(one)
    return torch.cat(parts, dim=0), torch.cat(flags, dim=0)


@register_adapter
class LlavaNextAdapter(_llava.LlavaAdapter):
    """Adapter for ``LlavaNextForConditionalGeneration`` (see the module docstring for the packing scheme)."""

    family = "llava_next"
    model_class_names = ("LlavaNextForConditionalGeneration",)
    vision_only_keys = ("image_sizes", "vision_feature_layer", "vision_feature_select_strategy")

    # ---- geometry -----------------------------------------------------------------------------------------------
    @property
    def crop_grid(self) -> tuple[int, int]:
        """(h, w) patch grid of one crop."""
        vcfg = self.model.config.vision_config
        side = vcfg.image_size // vcfg.patch_size
        return side, side

    def dummy_images(self, n, image_size, generator):
        """Random ``image_size`` images (default: one crop's size) as anyres crops: base + the best-fit grid."""
        cfg = self.model.config
        crop = cfg.vision_config.image_size
        H, W = image_size or (crop, crop)
        geom = anyres_geometry((H, W), cfg.image_grid_pinpoints, crop)
        inputs = {"pixel_values": torch.randn(n, geom.num_units, 3, crop, crop, generator=generator),
                  "image_sizes": torch.tensor([[H, W]] * n)}
        k = self.tokens_per_image(inputs)[0]  # the family's own count (CLS or not, anyres_max, ...)
        return [[self.placeholder_token_id()] * k] * n, inputs


    def _base_extra(self, kwargs: dict) -> int:
        return 1 if self._cls_in_features(kwargs) else 0

    def geometries(self, kwargs: dict) -> list[AnyresGeometry] | None:
        """Crop arrangement of every image of the call, from ``image_sizes`` (None when absent)."""
        sizes = kwargs.get("image_sizes")
        if sizes is None:
            return None
        if isinstance(sizes, torch.Tensor):
            sizes = sizes.tolist()  # one host sync per call
        cfg = self.model.config
        return [anyres_geometry(s, cfg.image_grid_pinpoints, cfg.vision_config.image_size) for s in sizes]

    def tokens_per_image(self, kwargs: dict) -> list[int] | None:
        geoms = self.geometries(kwargs)
        if geoms is None:
            return precomputed_counts(kwargs, "image")
        h, w = self.crop_grid
        extra = self._base_extra(kwargs)
        return [g.num_tokens(h, w, extra) for g in geoms]

    def unit_layouts(self, kwargs: dict, image: int, side: str = "vision") -> list[Grid]:
        """Layouts of image ``image``'s units, for drawing. ``side="vision"``: the units vision-side stages
        reduce (base + every crop, each ``Grid(h, w)``, crop order = row-major over the ``rows x cols``
        arrangement). ``side="llm"``: the LLM-side candidates in prompt order (newlines excluded): the base
        ``Grid(h, w)`` and the unpadded crop map ``Grid(R, C)``."""
        geoms = self.geometries(kwargs)
        if geoms is None:
            raise NotImplementedError(f"{self.family}: unit_layouts needs image_sizes")
        g = geoms[image]
        h, w = self.crop_grid
        if side == "vision":
            return [Grid(h, w)] * g.num_units
        if g.num_crops == 0:
            return [Grid(h, w)]
        return [Grid(h, w), Grid(*g.packed(h, w))]

    def picture_layouts(self, kwargs: dict, image: int, side: str = "vision") -> list[Layout]:
        """Vision side: one :class:`MultiCrop` (base, then every crop in place over the padded image); LLM side:
        the base grid and the unpadded crop map (which covers exactly the image)."""
        if side != "vision":
            return self.unit_layouts(kwargs, image, side)
        geoms = self.geometries(kwargs)
        if geoms is None:
            raise NotImplementedError(f"{self.family}: picture_layouts needs image_sizes")
        g = geoms[image]
        grid = Grid(*self.crop_grid)
        if g.num_crops == 0:
            return [grid]
        return [MultiCrop(grid, (grid,) * g.num_crops, g.rows, g.cols, g.unpadded(grid.h, grid.w))]

    # ---- LLM side ----------------------------------------------------------------------------------------------
    def token_map(self, input_ids: torch.Tensor, kwargs: dict) -> TokenMap:
        """Placeholders -> visual (image id from the per-image counts); newline positions -> protected."""
        is_visual = self.placeholder_mask(input_ids)
        geoms = self.geometries(kwargs)
        if geoms is not None:
            h, w = self.crop_grid
            extra = self._base_extra(kwargs)
            counts = [g.num_tokens(h, w, extra) for g in geoms]
            newline = torch.cat([g.newline_mask(h, w, extra, device=input_ids.device) for g in geoms])
            source = "image_sizes"
        else:
            packed = self._encoder_outputs(kwargs)
            if packed is None:
                return TokenMap.from_placeholders(is_visual)
            counts = [p.shape[0] for p in packed]
            newline = self._newline_rows(packed).to(input_ids.device)
            source = "the precomputed image features"
        found = int(is_visual.sum())
        if found != sum(counts):
            raise ConfigError(
                f"llava_next: the prompt has {found} image placeholder tokens but {source} imply {sum(counts)} "
                f"({counts} for {len(counts)} image(s)); build the prompt with the model's processor"
            )
        tm = TokenMap.from_placeholders(is_visual, counts)
        protected = torch.zeros_like(is_visual)
        protected[is_visual] = newline
        tm.protected = protected
        return tm

    @staticmethod
    def _encoder_outputs(kwargs: dict) -> list[torch.Tensor] | None:
        """Per-image packed features precomputed by ``generate`` (transformers >= 5.2x passes
        ``mm_encoder_outputs={"image": output}`` instead of ``pixel_values`` / ``image_sizes``), or None."""
        enc = kwargs.get("mm_encoder_outputs")
        out = enc.get("image") if isinstance(enc, dict) else None
        pooled = getattr(out, "pooler_output", None)
        if pooled is None:
            return None
        if isinstance(pooled, torch.Tensor):
            return list(pooled.unbind(0)) if pooled.dim() == 3 else None
        return list(pooled)

    def _newline_rows(self, packed: list[torch.Tensor]) -> torch.Tensor:
        """(sum T_i,) True where a packed feature row is the model's ``image_newline`` vector (the model copies
        the parameter there bit for bit; a projected patch feature never equals it exactly)."""
        nl = self.inner.image_newline
        return torch.cat([(p == nl.to(device=p.device, dtype=p.dtype)).all(-1) for p in packed])

    # ---- vision side ------------------------------------------------------------------------------------------
    def encode_images(self, kwargs: dict) -> list[VisualGroup]:
        geoms = self.geometries(kwargs)
        if geoms is None:
            raise ConfigError("llava_next: vision-side stages need image_sizes (the processor returns them)")
        if self._cls_in_features(kwargs):
            raise ConfigError(
                f"{self.family}: vision_feature_select_strategy='full' on a tower with a CLS token is not supported "
                "with anyres crops (allowed: 'default'); the model cannot pack CLS tokens of crops either"
            )
        pv = kwargs["pixel_values"]
        n_units = [g.num_units for g in geoms]
        if pv.dim() == 5:
            if pv.shape[0] != len(geoms):
                raise ConfigError(f"llava_next: pixel_values has {pv.shape[0]} images but image_sizes {len(geoms)}")
            pv = torch.cat([pv[i, :n] for i, n in enumerate(n_units)], dim=0)
        elif pv.dim() != 4 or pv.shape[0] != sum(n_units):
            raise ConfigError(
                f"llava_next: pixel_values of shape {tuple(pv.shape)} do not match image_sizes "
                f"({sum(n_units)} crops expected; shape (images, crops, C, H, W) or (crops, C, H, W))"
            )
        feats, scorer = self._run_tower(pv, kwargs)
        h, w = self.crop_grid
        if feats.shape[1] != h * w:
            raise ConfigError(f"llava_next: the tower gives {feats.shape[1]} tokens per crop, expected {h}x{w}")
        unit_image = [i for i, n in enumerate(n_units) for _ in range(n)]
        unit_part = [p for n in n_units for p in range(n)]
        return [VisualGroup(feats, Grid(h, w), unit_image, unit_part, scorer.as_vision_extras())]

    @staticmethod
    def _kept_everything(reductions: list, n: int) -> bool:
        """Every stage kept all n tokens, in order, as plain copies (a full-budget prune)."""
        for red in reductions:
            if red.features is not None or red.anchor.shape[-1] != n:
                return False
        if not reductions:
            return True
        ar = torch.arange(n, device=reductions[0].anchor.device)
        ok = torch.stack([((r.anchor == ar) & r.valid).all() for r in reductions]).all()
        return bool(ok)  # one host sync

    def pack_images(self, groups_out: list, kwargs: dict) -> list[ImageFeatures]:
        geoms = self.geometries(kwargs)
        assert geoms is not None
        newline = self.inner.image_newline
        per_image: dict[int, ImageFeatures] = {}
        for group, feats, reductions in groups_out:
            n_in = group.layout.num_tokens
            out_layout = group.out_layout
            valid = reductions[-1].valid if reductions else None
            if self._kept_everything(reductions, n_in):
                grid = group.layout
            elif isinstance(out_layout, Grid) and out_layout.num_tokens == feats.shape[1] and (
                    valid is None or bool(valid.all())):
                grid = out_layout
            else:
                grid = None
            if grid is None and valid is not None and not bool(valid.all()):
                counts = valid.sum(-1).tolist()
                units = list(torch.split(feats[valid], counts, dim=0))  # padding of adaptive methods dropped
            else:
                units = list(feats.unbind(0))
            by_image: dict[int, list[tuple[int, int]]] = {}
            for u, (img, part) in enumerate(zip(group.unit_image, group.unit_part)):
                by_image.setdefault(img, []).append((part, u))
            for img, items in by_image.items():
                idx = [u for _, u in sorted(items)]
                g = geoms[img]
                if len(idx) != g.num_units:
                    raise ConfigError(f"llava_next: image {img} has {len(idx)} units, expected {g.num_units}")
                if grid is not None:
                    crops = feats[idx[1:]] if len(idx) > 1 else feats.new_zeros(0, *feats.shape[1:])
                    emb, prot = pack_grid(feats[idx[0]], crops, g, grid.h, grid.w, newline)
                else:
                    emb, prot = pack_sequence(units[idx[0]], [units[u] for u in idx[1:]], g, newline)
                per_image[img] = ImageFeatures(emb, prot)
        return [per_image[i] for i in sorted(per_image)]
