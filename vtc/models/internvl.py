"""InternVL 3 / 3.5 (``InternVLForConditionalGeneration``): InternViT tower, dynamic 448 px tiles + a thumbnail,
pixel shuffle (0.5) before the MLP projector, a Qwen2 / Qwen2.5 (1D RoPE) LM.

What the model does (transformers 5.17-5.24): the processor (``GotOcr2ImageProcessor``, ``crop_to_patches``)
resizes an image to the ``cols x rows`` tile canvas whose aspect ratio is closest to the image's (1 to 12 tiles by
default), cuts it into ``cols * rows`` tiles in row-major order and, when there is more than one, **appends a
thumbnail** (the whole image resized to one tile): ``T = cols * rows + 1`` tiles, or ``T = 1``. Every tile goes
through InternViT (a CLS token + ``P x P`` patches, 448 / 14 = 32); the model drops CLS
(``vision_feature_select_strategy="default"``, the only one it can reshape), **pixel-shuffles** the ``P x P``
patches to ``P/2 x P/2`` tokens (each the channel concatenation of one 2 x 2 block of patches: shuffled token
``(i, j)`` is patches ``(2i, 2j), (2i, 2j+1), (2i+1, 2j), (2i+1, 2j+1)``) and projects them (LayerNorm + MLP, per
token): 256 tokens per tile. The prompt holds ``<img>``, ``T x 256`` ``<IMG_CONTEXT>`` placeholders, ``</img>`` per
image (video frames: one such image of one tile each). ``pixel_values`` are all tiles of the call, flat.

- **Units.** One unit per tile, ``Grid(t, t)`` of shuffled tokens (``t = P / 2``), in the prompt's order: the
  tiles row-major, then the thumbnail. Tiles per image are read off the prompt (each ``<img>...</img>`` run of
  placeholders is one image; the inputs carry nothing else): a run must hold a whole number of tiles and not 2
  (the processor emits 1, or >= 2 tiles + the thumbnail), and all runs together must hold ``pixel_values``' tiles;
  otherwise :class:`vtc.ConfigError`. ``<img>`` / ``</img>`` are text tokens: never pruned, never counted.
- **Features and scores: after the shuffle.** Vision-side methods see the shuffled tower features (the space the
  projector reads, 4 x the tower width); ``project`` is the projector. Scores and keys are computed on the tower's
  patches, in the block that produces the fed features (the last one), and mapped through the model's own
  ``pixel_shuffle``: a shuffled token's attention score is the **sum** of its 4 patches' scores (the attention
  mass it receives), its key the **mean** of their keys. The CLS column is dropped before the mapping.
- **No CLS row.** InternViT has a CLS token, but its query row in the feature block is not used as a score: the
  model discards the CLS output of that block, so the VLM's training never shapes that row (unlike CLIP's CLS,
  which feeds the contrastive head). Scores are the attention each patch receives from the block's **mean
  query**, as on the SigLIP families: FasterVLM, VisPruner and VisionZip's dominant tokens use it, VisionZip's
  ``keep_cls`` has no CLS to keep (ignored, as on SigLIP), and stages that can only use a CLS row (``pool``
  ``weights: cls``) are refused when attached.
- **Positions.** Plain 1D RoPE: LLM-side survivors keep their ids; vision-side reduction keeps the first ``k``
  placeholders of each image, i.e. ``<img>`` + k ``<IMG_CONTEXT>`` + ``</img>``, the processor's prompt for k.
- **Video.** ``InternVLProcessor`` writes a video of F sampled frames as F images of one tile each (every frame
  resized to 448 px by ``InternVLVideoProcessor``), each ``Frame{i}: <img>`` + 256 ``<IMG_CONTEXT>`` + ``</img>``
  (joined by newlines), and merges their tiles into ``pixel_values`` in prompt order: the model cannot tell a frame
  from a one-tile image, and neither needs vtc. A frame is one unit (``Grid(16, 16)``), an int budget keeps k per
  frame on both sides (vision: per tile; LLM: per image), the ``FrameN:`` text is never visual, never pruned, never
  counted, and a vision-reduced frame is ``Frame{i}: <img>`` + k ``<IMG_CONTEXT>`` + ``</img>``, the processor's
  video prompt for k (tested against ``InternVLProcessor``). ``vtc show`` takes an image; through the API a frame's
  picture is its ``Grid`` (no image size needed).
- **Drawing.** The tile arrangement is not in the inputs: ``vtc show`` passes the image's size
  (``vtc_image_sizes``) and :func:`tile_grid` re-derives the processor's ``cols x rows`` for the tile count; the
  picture is a :class:`MultiCrop` whose crops are the tiles in place and whose base (last in token order) is the
  thumbnail over the whole image.
"""

from __future__ import annotations

from functools import cached_property

import torch

from ..errors import ConfigError
from ..layout import Grid, Layout, MultiCrop
from ..methods.base import VisionExtras
from . import register_adapter
from .base import ImageFeatures, TokenMap, VisualGroup
from .llava import LlavaAdapter
from .vision_towers import TowerScorer

__all__ = ["InternVLAdapter", "InternViTScorer", "tile_grid", "shuffle_scores"]


def tile_grid(size: tuple[int, int], tile: int, tiles: range | list[int]) -> tuple[int, int]:
    """(cols, rows) the InternVL image processor picks for an image of ``size`` (H, W) px among the canvases of
    ``tiles`` tiles (its rule: the aspect ratio closest to the image's; on a tie the later canvas wins while the
    image is larger than half of its area). ``tiles``: ``range(min, max + 1)`` as the processor, or one count."""
    H, W = size
    top = max(tiles)
    grids = sorted(((c, r) for c in range(1, top + 1) for r in range(1, top + 1) if c * r in tiles),
                   key=lambda g: g[0] * g[1])
    if not grids:
        raise ConfigError(f"internvl: no tile canvas has {list(tiles)} tiles")
    best, best_diff = grids[0], float("inf")
    for c, r in grids:
        diff = abs(W / H - c / r)
        if diff < best_diff:
            best, best_diff = (c, r), diff
        elif diff == best_diff and W * H > 0.5 * tile * tile * c * r:
            best = (c, r)
    return best


def shuffle_scores(pixel_shuffle, x: torch.Tensor, side: int, ratio: float, reduce: str) -> torch.Tensor:
    """(U, side^2[, d]) per-patch values -> (U, (side * ratio)^2[, d]) per shuffled token, through the model's own
    ``pixel_shuffle`` (so every shuffled token gets exactly the patches whose features it concatenates), then the
    ``sum`` or ``mean`` over those patches."""
    squeeze = x.dim() == 2
    y = x[..., None] if squeeze else x
    U, n, d = y.shape
    if n != side * side:
        raise ConfigError(f"internvl: {n} patch scores for a {side}x{side} patch grid")
    s = pixel_shuffle(y.float().reshape(U, side, side, d), scale_factor=ratio)
    s = s.reshape(U, -1, s.shape[-1] // d, d)
    s = s.sum(2) if reduce == "sum" else s.mean(2)
    return s[..., 0] if squeeze else s


class InternViTScorer(TowerScorer):
    """:class:`TowerScorer` on InternViT blocks (``encoder.layer[i]``: ``layernorm_before``, ``attention`` with
    ``q_proj`` / ``k_proj`` and optional per-layer q / k RMS norms over the full width)."""

    @cached_property
    def _attn(self):
        what = f"vision tower {type(self.tower).__name__} at vision_feature_layer={self.feature_layer}"
        if self.feature_index < 1:
            raise ConfigError(f"{what} selects the patch embeddings, which have no attention to score")
        block = self.tower.encoder.layer[self.feature_index - 1]
        return block.layernorm_before, block.attention

    def _queries(self, xn_rows: torch.Tensor) -> torch.Tensor:
        attn = self._attn[1]
        return self._split(attn.q_norm(attn.q_proj(xn_rows)))

    def _keys(self, xn: torch.Tensor) -> torch.Tensor:
        attn = self._attn[1]
        return self._split(attn.k_norm(attn.k_proj(xn)))

    def mean_query(self) -> torch.Tensor:
        if isinstance(self._attn[1].q_norm, torch.nn.Identity):
            return super().mean_query()
        return self._queries(self._normed).mean(2, keepdim=True)  # qk-norm: the mean of the real rows


@register_adapter
class InternVLAdapter(LlavaAdapter):
    """Adapter for ``InternVLForConditionalGeneration`` (see the module docstring)."""

    family = "internvl"
    model_class_names = ("InternVLForConditionalGeneration",)
    vision_only_keys = ("vision_feature_layer", "vision_feature_select_strategy")

    # ---- geometry ---------------------------------------------------------------------------------------------
    @property
    def _ratio(self) -> float:
        return float(self.model.config.downsample_ratio)

    @property
    def patch_side(self) -> int:
        """Patches per tile side (448 / 14 = 32)."""
        vcfg = self.model.config.vision_config
        size, patch = vcfg.image_size, vcfg.patch_size
        size = size[0] if isinstance(size, (list, tuple)) else size
        patch = patch[0] if isinstance(patch, (list, tuple)) else patch
        return int(size) // int(patch)

    @property
    def tile_px(self) -> int:
        size = self.model.config.vision_config.image_size
        return int(size[0] if isinstance(size, (list, tuple)) else size)

    @property
    def token_side(self) -> int:
        """Shuffled tokens per tile side (16)."""
        return round(self.patch_side * self._ratio)

    @property
    def tokens_per_tile(self) -> int:
        return self.token_side ** 2

    def _tokens_per_image(self) -> int:
        return self.tokens_per_tile

    def _runs(self, input_ids: torch.Tensor) -> tuple[list[int], list[int]]:
        """(placeholder count, batch row) of every run of placeholders (one image each), in row-major order."""
        mask = input_ids == self.placeholder_token_id()
        prev = torch.zeros_like(mask)
        prev[:, 1:] = mask[:, :-1]
        starts = mask & ~prev
        run = starts.flatten().long().cumsum(0) - 1
        on = mask.flatten()
        lengths = torch.zeros(int(starts.sum()), dtype=torch.long, device=mask.device).index_add_(
            0, run[on], torch.ones_like(run[on]))
        return lengths.tolist(), starts.nonzero()[:, 0].tolist()

    def tiles(self, input_ids: torch.Tensor, kwargs: dict | None = None) -> list[int]:
        """Tiles of every image of the prompt (thumbnail included). ConfigError (before any stage runs) when the
        placeholders do not hold ``pixel_values``' tiles (the model's own check, in its wording), or a run is not a
        tile count the processor emits (1, or >= 2 tiles + a thumbnail)."""
        per = self.tokens_per_tile
        runs, rows = self._runs(input_ids)
        pv = (kwargs or {}).get("pixel_values")
        context = (f"vtc, internvl: the prompt rows hold {(input_ids == self.placeholder_token_id()).sum(-1).tolist()} "
                   f"image placeholder tokens, {per} per tile between <img> and </img>; build the prompt with the "
                   "model's processor")
        if pv is not None and sum(runs) != pv.shape[0] * per:
            raise ConfigError(f"Image features and image tokens do not match, tokens: {sum(runs)}, features: "
                              f"{pv.shape[0] * per} ({context}; pixel_values has {pv.shape[0]} tiles)")
        for r, row in zip(runs, rows):
            if r % per or r // per == 2:
                raise ConfigError(
                    f"Image features and image tokens do not match in row {row}: a run of image placeholder tokens "
                    f"holds {r}, which is not one image: 1 tile or >= 2 tiles + a thumbnail (allowed: {per}, "
                    f"{3 * per}, {4 * per}, ...) ({context})")
        return [r // per for r in runs]

    def tokens_per_image(self, kwargs: dict) -> list[int] | None:
        ids = kwargs.get("input_ids")
        return None if ids is None else self._runs(ids)[0]

    def token_map(self, input_ids: torch.Tensor, kwargs: dict) -> TokenMap:
        """One image per run of ``<IMG_CONTEXT>`` placeholders (``<img>`` / ``</img>`` around each: text)."""
        return TokenMap.from_placeholders(self.placeholder_mask(input_ids))

    def check_placeholders(self, input_ids: torch.Tensor, kwargs: dict) -> None:
        self.tiles(input_ids, kwargs)

    def unit_layouts(self, kwargs: dict, image: int, side: str = "vision") -> list[Layout]:
        """One ``Grid(t, t)`` per tile of image ``image``, in token order (tiles, then the thumbnail)."""
        ids = kwargs.get("input_ids")
        if ids is None:
            raise NotImplementedError(f"{self.family}: unit_layouts needs the prompt's input_ids")
        t = self.token_side
        return [Grid(t, t)] * self.tiles(ids)[image]

    def picture_layouts(self, kwargs: dict, image: int, side: str = "vision") -> list[Layout]:
        """One tile: its ``Grid``. More: a :class:`MultiCrop` of the tiles in place (``cols x rows``, re-derived
        from the image's size in ``kwargs["vtc_image_sizes"]``) with the thumbnail as its base, last in token order.
        Both sides: the placeholder run holds only tile tokens."""
        units = self.unit_layouts(kwargs, image, side)
        if len(units) == 1:
            return units
        sizes = kwargs.get("vtc_image_sizes")
        if sizes is None or len(sizes) <= image:
            raise ConfigError(
                "internvl: drawing a tiled image needs its size (H, W) in vtc_image_sizes: the tile arrangement is "
                "not in the model's inputs (vtc show passes it)")
        cols, rows = tile_grid(tuple(sizes[image]), self.tile_px, [len(units) - 1])
        return [MultiCrop(units[-1], tuple(units[:-1]), rows, cols, base_last=True)]

    def vision_extras_available(self) -> frozenset[str]:
        return frozenset({"received_attention", "keys"})

    def check_stage(self, stage) -> None:
        needs = set(stage.requires_extras)
        cls_only = needs <= {"cls_attention", "cls_token", "hidden_with_cls"}
        if stage.side == "vision" and needs and cls_only and not needs & self.vision_extras_available():
            raise ConfigError(
                f"internvl cannot provide {', '.join(sorted(needs))}: InternViT's CLS output is discarded by the "
                "model, so its CLS attention row is not a trained score (vtc uses the mean-query "
                "received_attention instead); it provides received_attention, keys")
        super().check_stage(stage)

    def dummy_images(self, n, image_size, generator):
        """Random images of ``image_size`` (default: one tile) tiled as the processor does (1-12 tiles)."""
        tile = self.tile_px
        H, W = image_size or (tile, tile)
        cols, rows = tile_grid((H, W), tile, range(1, 13))
        T = cols * rows + (1 if cols * rows > 1 else 0)
        pixel_values = torch.randn(n * T, 3, tile, tile, generator=generator)
        return [[self.placeholder_token_id()] * (T * self.tokens_per_tile)] * n, {"pixel_values": pixel_values}

    # ---- vision side ------------------------------------------------------------------------------------------
    def encode_images(self, kwargs: dict) -> list[VisualGroup]:
        layer, strategy = self._feature_settings(kwargs)
        if strategy != "default" or not isinstance(layer, int):
            raise ConfigError(f"internvl: vision_feature_select_strategy={strategy!r}, vision_feature_layer={layer!r} "
                              "are not supported (allowed: 'default' and one int layer: the model reshapes the "
                              "patches without CLS into a square grid)")
        tiles = self.tiles(kwargs["input_ids"], kwargs)
        tower = self.vision_tower
        pv = kwargs["pixel_values"].to(dtype=next(tower.parameters()).dtype)
        out = tower(pixel_values=pv, output_hidden_states=True, return_dict=True)
        feats = (out.last_hidden_state if layer == -1 else out.hidden_states[layer])[:, 1:]  # the model's choice
        U, n, C = feats.shape
        P = self.patch_side
        if n != P * P:
            raise ConfigError(f"internvl: the tower gives {n} patches per tile, expected {P}x{P}")
        shuffle = self.inner.pixel_shuffle
        shuffled = shuffle(feats.reshape(U, P, P, C), scale_factor=self._ratio).reshape(U, self.tokens_per_tile, -1)
        scorer = InternViTScorer(tower, out.hidden_states, layer, has_cls=True, drop_cls=True)
        extras = VisionExtras(
            received_attention=lambda: shuffle_scores(shuffle, scorer.received_attention(), P, self._ratio, "sum"),
            keys=lambda: shuffle_scores(shuffle, scorer.keys(), P, self._ratio, "mean"))
        unit_image = [i for i, T in enumerate(tiles) for _ in range(T)]
        unit_part = [p for T in tiles for p in range(T)]
        t = self.token_side
        return [VisualGroup(shuffled, Grid(t, t), unit_image, unit_part, extras)]

    def project(self, features: torch.Tensor) -> torch.Tensor:
        return self.inner.multi_modal_projector(features)

    def pack_images(self, groups_out: list, kwargs: dict) -> list[ImageFeatures]:
        """Each image's tiles' surviving tokens in tile order (units are in image, then tile order); the padding
        rows of content-adaptive stages (``valid``) are dropped."""
        out: list[ImageFeatures] = []
        for group, feats, reductions in groups_out:
            valid = reductions[-1].valid if reductions else None
            if valid is None:
                valid = torch.ones(feats.shape[:2], dtype=torch.bool, device=feats.device)
            img = torch.as_tensor(group.unit_image, device=feats.device)
            n_img = len(set(group.unit_image))
            counts = torch.zeros(n_img, dtype=torch.long, device=feats.device).index_add_(0, img, valid.sum(-1))
            for emb in torch.split(feats[valid], counts.tolist()):
                out.append(ImageFeatures(emb, torch.zeros(emb.shape[0], dtype=torch.bool, device=emb.device)))
        return out

