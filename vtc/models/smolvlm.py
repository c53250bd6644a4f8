"""SmolVLM / Idefics3 (``SmolVLMForConditionalGeneration``, ``Idefics3ForConditionalGeneration``): image splitting
into sub-images with row / column text tokens between them, pixel shuffle before the projector.

What the model does (transformers 5.24; both classes share it): the processor resizes an image so both sides are
multiples of the tower's size S and, when it is larger than S, cuts it into ``R x C`` sub-images of S x S plus one
*global* sub-image (the whole image resized to S x S); an image that fits is one sub-image (its global view).
``pixel_values`` is (batch, sub-images per row (zero-padded), C, S, S); all-zero sub-images are padding, dropped by
the model. The SigLIP tower (no CLS) gives ``P x P`` patches per sub-image (``P = S / patch``); the connector's
**pixel shuffle** (``scale_factor`` f) turns every ``f x f`` block of patches into one token of ``f^2 D`` channels,
row-major over a ``t x t`` grid (``t = P / f``), then one linear map. The prompt of a split image is::

    <fake><row_1_col_1><image>*t^2 <fake><row_1_col_2><image>*t^2 ... \\n   (one line per row of sub-images)
    \\n<fake><global-img><image>*t^2<fake>

(an unsplit image: ``<fake><global-img><image>*t^2<fake>``). The ``<fake_token_around_image>``, ``<row_r_col_c>``,
``<global-img>`` and newline tokens are **text**: they are never visual, never pruned and never counted.

- **Units.** Vision side: one unit per sub-image (each run of ``t^2`` ``<image>`` placeholders), a ``Grid(t, t)``;
  of an image's units (``unit_part`` in prompt order) the first ``R * C`` are its crops (row-major over the
  ``R x C`` arrangement) and the last one is its global view (the whole image). Budgets are per sub-image
  (``per: image`` spreads one over the image's sub-images). LLM side and the token map: an image is all its
  sub-images (an int budget is per image, as for LLaVA-NeXT's crops). Which runs form an image is read from the
  prompt (:meth:`SmolVLMAdapter._structure`: the token before each row's last run is ``<global-img>``, and every
  run after that token closes an image); :meth:`SmolVLMAdapter.image_grids` reads ``R x C`` (a crop followed by a
  newline instead of ``<fake>`` ends a row) and ``vtc show`` draws an image as a base-last :class:`MultiCrop`: the
  global view over the whole image, then every crop in its place.
- **Scores.** Vision-side features are the pixel-shuffled tower features, before the linear map (``project``).
  Tower scores (no CLS: ``received_attention`` from the last block's mean query) and keys are per patch; they are
  mapped onto the shuffled tokens with the connector's own ``pixel_shuffle``, so a token's score is the **sum** of
  the attention its ``f^2`` patches receive (still a distribution over the tokens) and its key the mean of their
  keys: exactly its patches, no resampling.
- **Vision side.** Sub-image j's reduced tokens replace the first ``k_j`` placeholders of its run
  (``ImageFeatures.runs``); the structural text stays: the rebuilt prompt is what the processor emits with
  ``image_seq_len = k`` (equal ``k`` per sub-image).
- **Video** (SmolVLM2's processor, ``videos=``): each sampled frame is one unsplit image
  (``<fake><global-img><image>*t^2<fake>``) after its ``\nFrame from MM:SS:`` text, and the frames fill
  ``pixel_values`` like sub-images: the structure above reads every frame as an image of one unit (units = frames,
  LLM-side budgets per frame), the intro and timestamps are text, and the rebuilt prompt is the processor's video
  prompt for ``image_seq_len = k``. Nothing in the inputs tells a video from images; nothing needs to.
- **Padding.** Padding sub-images (all zero, as the model defines them) are dropped like the model drops them;
  ``pixel_attention_mask`` is turned into the model's patch mask and passed to the tower; a sub-image whose patches
  are partly masked (the processor never emits one) is refused (the pixel shuffle would mix padding into tokens).
"""

from __future__ import annotations

import torch

from ..errors import ConfigError
from ..layout import Grid, Layout, MultiCrop
from ..methods.base import VisionExtras
from . import register_adapter
from .base import ImageFeatures, TokenMap, VisualGroup, pixel_input
from .llava import LlavaAdapter
from .vision_towers import TowerScorer

__all__ = ["SmolVLMAdapter", "shuffle_scores"]


def shuffle_scores(connector, x: torch.Tensor, reduce: str) -> torch.Tensor:
    """(U, P^2[, d]) per-patch values -> (U, t^2[, d]) per shuffled token through the connector's own pixel shuffle:
    ``reduce="sum"`` adds a token's f^2 patches, ``"mean"`` averages them."""
    squeeze = x.dim() == 2
    y = (x[..., None] if squeeze else x).float()
    f = int(connector.scale_factor)
    U, _, d = y.shape
    y = connector.pixel_shuffle(y, f).reshape(U, -1, f * f, d)
    y = y.sum(2) if reduce == "sum" else y.mean(2)
    return y[..., 0] if squeeze else y


@register_adapter
class SmolVLMAdapter(LlavaAdapter):
    family = "smolvlm"
    model_class_names = ("SmolVLMForConditionalGeneration", "Idefics3ForConditionalGeneration")
    vision_only_keys = ("pixel_attention_mask",)

    # ---- modules and geometry ----------------------------------------------------------------------------------
    @property
    def language_model(self):
        return self.inner.text_model

    @property
    def vision_tower(self):
        return self.inner.vision_model

    @property
    def connector(self):
        return self.inner.connector

    @property
    def grid_side(self) -> int:
        """t: tokens per side of one sub-image after the pixel shuffle."""
        vcfg = self.model.config.vision_config
        side, f = vcfg.image_size // vcfg.patch_size, int(self.connector.scale_factor)
        if side % f:
            raise ConfigError(f"{self.family}: {side} x {side} patches per sub-image do not split into "
                              f"{f} x {f} blocks (scale_factor={f})")
        return side // f

    def _tokens_per_image(self) -> int:
        return self.grid_side ** 2

    def _real_units(self, kwargs: dict) -> torch.Tensor | None:
        """(batch * sub-images,) bool: the real (not all-zero) sub-images of ``pixel_values``, as the model decides."""
        pv = pixel_input(kwargs, "pixel_values", self.family, ("batch", "sub-images", "C", "H", "W"),
                         " as the processor returns it")
        if pv is None:
            return None
        flat = pv.flatten(0, 1)
        real = (flat == 0).sum(dim=(-1, -2, -3)) != flat.shape[1:].numel()
        if self.model.config.model_type == "smolvlm":
            real[0] |= ~real.any()  # SmolVLM keeps one (empty) image when there is none
        return real

    def _n_units(self, kwargs: dict) -> int | None:
        """Sub-images the call's visual inputs hold (pixel_values, or the features generate precomputed)."""
        real = self._real_units(kwargs)
        if real is not None:
            return int(real.sum())
        enc = kwargs.get("mm_encoder_outputs")
        out = enc.get("image") if isinstance(enc, dict) else None
        pooled = getattr(out, "pooler_output", None)
        if pooled is None:
            return None
        total = sum(int(p.shape[0]) for p in pooled) if isinstance(pooled, (list, tuple)) else pooled.shape[:-1].numel()
        return total // self._tokens_per_image()

    def tokens_per_image(self, kwargs: dict) -> list[int] | None:
        ids = kwargs.get("input_ids")
        if ids is None or self._n_units(kwargs) is None:
            return None
        counts = torch.bincount(self._structure(ids)[2]).tolist()
        return [c * self._tokens_per_image() for c in counts]

    # ---- prompt structure ---------------------------------------------------------------------------------------
    def _structure(self, input_ids: torch.Tensor):
        """(placeholder mask (B, N), run index per position (-1 off runs), image of every run (n_runs,), whether
        each run is a global view (n_runs,), token after each run (n_runs,)). Every run of placeholders is one
        sub-image; an image's runs end with its global view, the run after ``<global-img>``: that token is read off
        the last run of each row (the processor's prompt ends every image so). ConfigError on another structure."""
        mask = input_ids == self.placeholder_token_id()
        start = mask.clone()
        start[:, 1:] &= ~mask[:, :-1]
        run = (start.flatten().long().cumsum(0) - 1).view_as(mask)
        run = torch.where(mask, run, torch.full_like(run, -1))
        n_runs = int(start.sum())
        t2 = self._tokens_per_image()
        lengths = torch.bincount(run[mask], minlength=n_runs)
        at = start.nonzero()  # (row, col) of each run's first placeholder, in run order
        bad = (lengths != t2).nonzero().flatten()
        if bad.numel():
            raise ConfigError(f"Image features and image tokens do not match in row {int(at[bad[0], 0])}: a run of "
                              f"image placeholder tokens holds {int(lengths[bad[0]])}, not one sub-image's {t2} "
                              f"(image_seq_len) (vtc, {self.family}: every run of placeholders is one sub-image; "
                              "build the prompt with the model's processor)")
        padded = torch.nn.functional.pad(input_ids, (1, 1), value=-1)
        prev = padded[at[:, 0], at[:, 1]]
        end = mask.clone()
        end[:, :-1] &= ~mask[:, 1:]
        after = end.nonzero()
        nxt = padded[after[:, 0], after[:, 1] + 2]
        last_of_row = torch.ones(n_runs, dtype=torch.bool, device=mask.device)
        last_of_row[:-1] = at[1:, 0] != at[:-1, 0]
        gid = prev[last_of_row].unique()
        if gid.numel() > 1:
            raise ConfigError(f"{self.family}: the prompt rows do not end their images alike (the tokens before their "
                              "last sub-images differ); build the prompt with the model's processor")
        is_global = prev == gid if gid.numel() else torch.zeros_like(prev, dtype=torch.bool)
        image = is_global.long().cumsum(0) - is_global.long()  # globals strictly before each run
        # runs never cross rows: a row's last run is global, so an image is never split between rows
        return mask, run, image, is_global, nxt

    def _check_total(self, input_ids: torch.Tensor, kwargs: dict) -> int | None:
        """The model's own check (placeholders = sub-images x tokens each, in its wording) with vtc's context;
        returns the number of sub-images (None without visual inputs)."""
        n = self._n_units(kwargs)
        if n is None:
            return None
        t2 = self._tokens_per_image()
        rows = [int(c) for c in (input_ids == self.placeholder_token_id()).sum(-1).tolist()]
        if sum(rows) != n * t2:
            raise ConfigError(f"Image features and image tokens do not match, tokens: {sum(rows)}, features: {n * t2} "
                              f"(vtc, {self.family}: the prompt rows hold {rows} image placeholder tokens, the {n} "
                              f"sub-image(s) given need {n} x {t2}; build the prompt with the model's processor)")
        return n

    def placeholder_groups(self, input_ids: torch.Tensor, kwargs: dict):
        if self._check_total(input_ids, kwargs) is None:
            return []
        counts = self.tokens_per_image(kwargs | {"input_ids": input_ids})
        return [("image", input_ids == self.placeholder_token_id(), counts)]

    def check_placeholders(self, input_ids: torch.Tensor, kwargs: dict) -> None:
        """The total matches the inputs, every run holds one sub-image and each image's runs end with its global view
        (an image's runs are separated by text, so the base's one-run-per-image check does not apply)."""
        self._check_total(input_ids, kwargs)
        self._structure(input_ids)

    def token_map(self, input_ids: torch.Tensor, kwargs: dict) -> TokenMap:
        """Placeholders are visual, numbered by image (all of an image's sub-images); the structural tokens around
        and between the sub-images are text."""
        self._check_total(input_ids, kwargs)
        mask, run, image, _, _ = self._structure(input_ids)
        image_id = torch.where(mask, image[run.clamp(min=0)], torch.full_like(run, -1))
        return TokenMap(is_visual=mask, image_id=image_id, protected=torch.zeros_like(mask))

    def image_grids(self, input_ids: torch.Tensor) -> list[tuple[int, int]]:
        """Per image in prompt order: the (rows R, cols C) of its crops (0, 0: unsplit, its one sub-image is the
        global view). A crop followed by a newline instead of ``<fake_token_around_image>`` (the token after every
        global view) ends a row. ConfigError when the crops do not form rows of equal length."""
        _, _, image, is_global, nxt = self._structure(input_ids)
        fake = nxt[is_global].unique()
        if fake.numel() > 1:
            raise ConfigError(f"{self.family}: the global views are not closed alike; build the prompt with the "
                              "model's processor")
        out = []
        for i in range(int(image.max()) + 1 if image.numel() else 0):
            crops = nxt[(image == i) & ~is_global]
            if crops.numel() == 0:
                out.append((0, 0))
                continue
            row_end = (crops != fake).nonzero().flatten()
            C = int(row_end[0]) + 1 if row_end.numel() else 0
            if not C or crops.numel() % C or not torch.equal(row_end, torch.arange(C - 1, crops.numel(), C)):
                raise ConfigError(f"{self.family}: image {i}'s {crops.numel()} sub-images before its global view "
                                  "do not form rows of equal length; build the prompt with the model's processor")
            out.append((crops.numel() // C, C))
        return out

    def unit_layouts(self, kwargs: dict, image: int, side: str = "vision") -> list[Layout]:
        """Image ``image``'s units in token order: one ``Grid(t, t)`` per crop, then the global view's."""
        R, C = self.image_grids(kwargs["input_ids"])[image]
        return [Grid(self.grid_side, self.grid_side)] * (R * C + 1)

    def picture_layouts(self, kwargs: dict, image: int, side: str = "vision") -> list[Layout]:
        """The global view's grid over the whole image, then the crops in place (a base-last :class:`MultiCrop`)."""
        R, C = self.image_grids(kwargs["input_ids"])[image]
        grid = Grid(self.grid_side, self.grid_side)
        return [grid] if R == 0 else [MultiCrop(grid, (grid,) * (R * C), R, C, base_last=True)]

    # ---- vision side ---------------------------------------------------------------------------------------------
    def vision_extras_available(self) -> frozenset[str]:
        return frozenset({"received_attention", "keys"})

    def encode_images(self, kwargs: dict) -> list[VisualGroup]:
        tower = self.vision_tower
        pv = kwargs["pixel_values"]
        real = self._real_units(kwargs)
        pixels = pv.flatten(0, 1)[real].to(dtype=next(tower.parameters()).dtype)
        p = self.model.config.vision_config.patch_size
        pam = kwargs.get("pixel_attention_mask")
        if pam is None:
            pam = torch.ones(pixels.shape[0], *pixels.shape[2:], dtype=torch.bool, device=pixels.device)
        else:
            pam = pam.flatten(0, 1)[real]
        patch_mask = pam.unfold(1, p, p).unfold(2, p, p).sum(dim=(-1, -2)) > 0
        if not bool(patch_mask.all()):
            raise ConfigError(f"{self.family}: pixel_attention_mask marks padding inside a sub-image (allowed: whole "
                              "sub-images, as the processor emits them)")
        out = tower(pixel_values=pixels, patch_attention_mask=patch_mask, output_hidden_states=True, return_dict=True)
        feats = self.connector.pixel_shuffle(out.last_hidden_state, int(self.connector.scale_factor))
        t = self.grid_side
        if feats.shape[1] != t * t:
            raise ConfigError(f"{self.family}: the tower gives {out.last_hidden_state.shape[1]} patches per "
                              f"sub-image, the connector expects {t * t} tokens after the shuffle")
        scorer = TowerScorer(tower, out.hidden_states, -1, has_cls=False, drop_cls=False)
        extras = VisionExtras(received_attention=lambda: shuffle_scores(self.connector, scorer.received_attention(), "sum"),
                              keys=lambda: shuffle_scores(self.connector, scorer.keys(), "mean"))
        _, _, image, _, _ = self._structure(kwargs["input_ids"])
        if image.numel() != feats.shape[0]:
            raise ConfigError(f"Image features and image tokens do not match ({self.family}: the prompt has "
                              f"{image.numel()} sub-images, pixel_values {feats.shape[0]})")
        unit_image = image.tolist()
        unit_part = (torch.arange(image.numel(), device=image.device)
                     - torch.searchsorted(image, image)).tolist()  # index of each unit inside its image
        return [VisualGroup(feats, Grid(t, t), unit_image, unit_part, extras)]

    def project(self, features: torch.Tensor) -> torch.Tensor:
        return self.connector.modality_projection(features)

    def pack_images(self, groups_out: list, kwargs: dict) -> list[ImageFeatures]:
        """Per image: its sub-images' kept tokens in prompt order (padding of uneven units dropped), with ``runs``
        (the count of each sub-image) so the rebuilt prompt keeps that many placeholders in each sub-image's run."""
        per_image: dict[int, list[torch.Tensor]] = {}
        for group, feats, reductions in groups_out:
            valid = reductions[-1].valid if reductions else None
            for u, img in enumerate(group.unit_image):
                per_image.setdefault(img, []).append(feats[u] if valid is None else feats[u][valid[u]])
        out = []
        for img in sorted(per_image):
            emb = torch.cat(per_image[img], dim=0)
            out.append(ImageFeatures(emb, torch.zeros(emb.shape[0], dtype=torch.bool, device=emb.device),
                                     runs=[int(e.shape[0]) for e in per_image[img]]))
        return out

    # ---- synthetic inputs ----------------------------------------------------------------------------------------
    def dummy_images(self, n, image_size, generator):
        """Images of ``image_size`` (H, W) px already resized to multiples of the sub-image size S (default: 4S x 4S,
        SmolVLM's processor default of a 4 x 4 split + the global view), in the processor's prompt structure with
        stand-in ids for the structural tokens (fake 4, newline 5, global 6, row/col tokens from 7)."""
        S = self.model.config.vision_config.image_size
        H, W = image_size if image_size is not None else (4 * S, 4 * S)
        R, C = -(-H // S), -(-W // S)
        split = R * C > 1
        units = R * C + 1 if split else 1
        img, t2 = self.placeholder_token_id(), self._tokens_per_image()
        fake, newline, glob = 4, 5, 6
        if img in range(4, 7 + R * C):
            raise ConfigError(f"{self.family}: image_token_id {img} collides with the dummy structural ids")
        ids: list[int] = []
        if split:
            for r in range(R):
                for c in range(C):
                    ids += [fake, 7 + r * C + c] + [img] * t2
                ids.append(newline)
            ids.append(newline)
        ids += [fake, glob] + [img] * t2 + [fake]
        pv = torch.randn(n, units, 3, S, S, generator=generator)
        return [ids] * n, {"pixel_values": pv, "pixel_attention_mask": torch.ones(n, units, S, S, dtype=torch.long)}
