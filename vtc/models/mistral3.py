"""Mistral 3 / Pixtral (``Mistral3ForConditionalGeneration``): variable-resolution Pixtral tower, 2x2 patch merger,
``[IMG_BREAK]`` after every row of image tokens and ``[IMG_END]`` after the last.

What the model does (transformers 5.24): the processor resizes every image, keeping its aspect ratio, so that its
longest edge fits ``image_size`` and both sides are multiples of ``patch_size * spatial_merge_size`` (``image_sizes``
gives each image's (H, W); ``pixel_values`` are padded to the largest). The Pixtral tower cuts each image into
``H/p x W/p`` patches, runs all images of the call as one sequence with **block-diagonal attention** (each image
attends to itself) and **2D RoPE** on the patch grid. The projector applies an RMS norm per patch, the **patch
merger** (each 2x2 block of patches is concatenated and mapped by one linear layer: one token), then a two-layer
MLP. The prompt of an image of ``h x w`` merged tokens is ``([IMG] * w + [IMG_BREAK]) * h`` with the last
``[IMG_BREAK]`` replaced by ``[IMG_END]``; the LLM (Mistral) has 1D RoPE.

- **Token map.** ``[IMG]`` placeholders and the separator after every row (``[IMG_BREAK]`` / ``[IMG_END]``, the
  token that follows a run of ``[IMG]``) are the image's visual tokens; the separators are ``protected``: never
  pruned, never candidates, never counted in budgets or ``tokens_in`` / ``tokens_out``. Images are told apart by
  their token counts (``image_sizes``, or the features ``generate`` precomputed). The separator ids are taken from
  ``config.image_break_token_id`` / ``config.image_end_token_id`` when the config has them, else read off the
  prompt (the last separator of an image is ``[IMG_END]``, the others ``[IMG_BREAK]``) and checked on every call:
  rows of one image must all be ``w`` long (``image_sizes``) or equal, and all breaks / ends one id each.
- **Units.** One image = one ``Grid(h, w)`` of merged tokens (images of different grids: different groups).
  Vision-side features are the patch merger's outputs (norm + merge, before the MLP; ``project`` = the MLP, per
  token), so ``feature_space: vision`` is the merged Pixtral space.
- **Scores.** Pixtral has no CLS token: ``received_attention`` is the attention each patch receives from the mean
  query of **its own image** (q̄ = mean_i RoPE(q_i), softmax over that image's patches, as the block-diagonal
  attention does), averaged over heads, at the block producing ``vision_feature_layer``; ``keys`` are that block's
  keys before RoPE, averaged over heads. Both are mapped to merged tokens as the mean of exactly the 2x2 patches
  the merger concatenates into each token (:func:`merge_patch_values`). CLS-only methods are refused at attach.
- **Vision side.** Every image's reduced tokens are packed in rows (:func:`pack_rows`): grid outputs (``pool``,
  ``downsample``; and every token kept) give ``h' x w'`` rows exactly as the processor emits them for that grid
  (``[IMG] * w'`` + ``[IMG_BREAK]`` per row, ``[IMG_END]`` last); pruned / merged outputs keep the original
  ``h`` rows: each row's survivors (a token's row is that of its anchor in the original grid; the method's order
  inside a row), then that row's ``[IMG_BREAK]`` (``[IMG_END]`` for the last row), also when a row kept nothing,
  so an image always takes ``k + h`` positions. The rebuilt prompt holds those ids (``ImageFeatures.token_ids``)
  and the separators' own embeddings; positions are the plain 1D positions of the rebuilt prompt.
- **LLM side.** Survivors keep their original 1D positions; separators are kept.

Pixtral 12B (``LlavaForConditionalGeneration`` with a Pixtral tower, :class:`PixtralLlavaAdapter`) is the same
without the merger: a token is one patch, the features are the selected layer's patches, ``project`` is LLaVA's MLP.
"""

from __future__ import annotations

from functools import cached_property
from typing import Any

import torch

from ..errors import ConfigError
from ..layout import Grid
from ..methods.base import VisionExtras
from ..reduction import chained_anchor
from ..scoring import rotate_half
from . import register_adapter
from .base import ImageFeatures, TokenMap, VisualGroup, precomputed_counts
from .llava import LlavaAdapter
from .llava_next import LlavaNextAdapter
from .qwen2_vl import segment_received_attention

__all__ = ["Mistral3Adapter", "PixtralLlavaAdapter", "merge_patch_values", "pack_rows", "RELEASED_SEPARATOR_IDS"]

#: ([IMG_BREAK], [IMG_END]) ids of the released Mistral 3 tokenizer (Tekken); used for synthetic prompts only
RELEASED_SEPARATOR_IDS = (12, 13)


def merge_patch_values(x: torch.Tensor, offsets: torch.Tensor, hp: int, wp: int, m: int) -> torch.Tensor:
    """(N, ...) per-patch values of packed images -> (U, (hp // m) * (wp // m), ...) per merged token: the mean of
    exactly the m x m patches the patch merger concatenates into that token (``unfold`` with stride m over the
    image's hp x wp patch grid; patches past the last whole block are dropped, as there). ``offsets`` (U,): the
    first patch of each image (each hp x wp patches)."""
    hm, wm = hp // m, wp // m
    dev = x.device
    r = torch.arange(hm, device=dev)[:, None, None, None] * m + torch.arange(m, device=dev)[None, None, :, None]
    c = torch.arange(wm, device=dev)[None, :, None, None] * m + torch.arange(m, device=dev)[None, None, None, :]
    local = (r * wp + c).reshape(hm * wm, m * m)
    return x[offsets.to(dev)[:, None, None] + local[None]].float().mean(2)


def pack_rows(feats: torch.Tensor, rows: torch.Tensor, n_rows: int, seps: torch.Tensor, ids: tuple[int, int, int]
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One image's tokens in rows. feats (k, D) in packed order, rows (k,) their row (non-decreasing, < n_rows);
    seps (2, D) the ``[IMG_BREAK]`` / ``[IMG_END]`` embeddings; ids = (image, break, end) token ids. Returns
    embeds (k + n_rows, D) (each row's tokens then its break; the last break is the end), protected (True at the
    separators) and token ids."""
    k, D = feats.shape
    dev = feats.device
    counts = torch.bincount(rows, minlength=n_rows)
    ar = torch.arange(n_rows, device=dev)
    sep_pos = counts.cumsum(0) + ar  # after the row's tokens and the breaks before it
    out = feats.new_empty(k + n_rows, D)
    out[torch.arange(k, device=dev) + rows] = feats
    out[sep_pos] = seps[0].to(feats.dtype)
    out[sep_pos[-1]] = seps[1].to(feats.dtype)
    protected = torch.zeros(k + n_rows, dtype=torch.bool, device=dev)
    protected[sep_pos] = True
    token_ids = torch.full((k + n_rows,), ids[0], dtype=torch.long, device=dev)
    token_ids[sep_pos] = ids[1]
    token_ids[sep_pos[-1]] = ids[2]
    return out, protected, token_ids


class _PixtralScores:
    """Per-patch scores of one tower call (all images packed), computed on request from the input of the block that
    produces the features: x (N, D), its 2D rotary tables cos / sin (N, d), the image of every patch."""

    def __init__(self, block, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, segment: torch.Tensor,
                 n_images: int) -> None:
        self.block, self.x, self.cos, self.sin = block, x, cos, sin
        self.segment, self.n_images = segment, n_images

    @cached_property
    def _qk(self) -> tuple[torch.Tensor, torch.Tensor]:
        attn = self.block.attention
        xn = self.block.attention_norm(self.x)
        N = xn.shape[0]
        return (attn.q_proj(xn).view(N, attn.num_heads, -1), attn.k_proj(xn).view(N, attn.num_heads, -1))

    def _rope(self, t: torch.Tensor) -> torch.Tensor:
        t = t.float()
        return t * self.cos[:, None].float() + rotate_half(t) * self.sin[:, None].float()

    @cached_property
    def received_attention(self) -> torch.Tensor:
        q, k = self._qk
        return segment_received_attention(self._rope(q), self._rope(k), self.segment, self.n_images,
                                          float(self.block.attention.scaling))

    @cached_property
    def keys(self) -> torch.Tensor:
        return self._qk[1].float().mean(1)


@register_adapter
class Mistral3Adapter(LlavaAdapter):
    family = "mistral3"
    model_class_names = ("Mistral3ForConditionalGeneration",)
    vision_only_keys = ("image_sizes", "vision_feature_layer")

    def __init__(self, model) -> None:
        super().__init__(model)
        cfg = model.config
        #: [IMG_BREAK] / [IMG_END] ids: from the config, else learnt from the first prompt that shows them
        self._sep_ids: dict[str, int | None] = {
            "break": getattr(cfg, "image_break_token_id", None), "end": getattr(cfg, "image_end_token_id", None)}

    # ---- geometry -----------------------------------------------------------------------------------------------
    @property
    def _patch(self) -> int:
        return int(self.model.config.vision_config.patch_size)

    @property
    def _merge(self) -> int:
        return int(self.model.config.spatial_merge_size)

    def _grids(self, kwargs: dict) -> list[tuple[int, int]] | None:
        """(hp, wp) patch grid of every image of the call, from ``image_sizes`` (None when absent)."""
        sizes = kwargs.get("image_sizes")
        if sizes is None or kwargs.get("pixel_values") is None:
            return None
        sizes = sizes.tolist() if isinstance(sizes, torch.Tensor) else [list(s) for s in sizes]
        p, m = self._patch, self._merge
        grids = [(int(h) // p, int(w) // p) for h, w in sizes]
        bad = [s for s, (hp, wp) in zip(sizes, grids) if hp < m or wp < m]
        if bad:
            raise ConfigError(f"{self.family}: image_sizes {bad} are smaller than one merged token "
                              f"({p * m} x {p * m} px); the processor never emits such images")
        return grids

    def _token_grids(self, kwargs: dict) -> list[tuple[int, int]] | None:
        grids = self._grids(kwargs)
        return None if grids is None else [(hp // self._merge, wp // self._merge) for hp, wp in grids]

    def _image_counts(self, kwargs: dict) -> list[int] | None:
        """[IMG] tokens (merged tokens) of every image: from ``image_sizes``, else from the precomputed features."""
        grids = self._token_grids(kwargs)
        if grids is not None:
            return [h * w for h, w in grids]
        return precomputed_counts(kwargs, "image")

    def tokens_per_image(self, kwargs: dict) -> list[int] | None:
        """Prompt positions of every image: ``h * (w + 1)`` (its [IMG] tokens and one separator per row)."""
        grids = self._token_grids(kwargs)
        return None if grids is None else [h * (w + 1) for h, w in grids]

    def unit_layouts(self, kwargs: dict, image: int, side: str = "vision") -> list[Grid]:
        """One ``Grid(h, w)`` of merged tokens (the LLM side's candidates are the same tokens in the same order)."""
        grids = self._token_grids(kwargs)
        if grids is None:
            raise NotImplementedError(f"{self.family}: unit_layouts needs image_sizes")
        if not 0 <= image < len(grids):
            raise ValueError(f"{self.family}: image {image} does not exist (the call has {len(grids)})")
        return [Grid(*grids[image])]

    def dummy_images(self, n, image_size, generator):
        """Random images of ``image_size`` (default: the tower's maximum), cut down to whole merged tokens as the
        processor sizes them, with the processor's prompt (separator ids: the config's, else the released ones)."""
        vcfg = self.model.config.vision_config
        H, W = image_size or (vcfg.image_size, vcfg.image_size)
        cell = self._patch * self._merge
        h, w = max(1, H // cell), max(1, W // cell)
        brk = self._sep_ids["break"] if self._sep_ids["break"] is not None else RELEASED_SEPARATOR_IDS[0]
        end = self._sep_ids["end"] if self._sep_ids["end"] is not None else RELEASED_SEPARATOR_IDS[1]
        row = [self.placeholder_token_id()] * w
        ids = (row + [brk]) * (h - 1) + row + [end]
        pixel_values = torch.randn(n, 3, h * cell, w * cell, generator=generator)
        return [ids] * n, {"pixel_values": pixel_values, "image_sizes": torch.tensor([[h * cell, w * cell]] * n)}

    # ---- token map -------------------------------------------------------------------------------------------------
    def placeholder_mask(self, input_ids: torch.Tensor) -> torch.Tensor:
        mask = input_ids == self.placeholder_token_id()
        for key in ("break", "end"):
            if self._sep_ids[key] is not None:
                mask = mask | (input_ids == self._sep_ids[key])
        return mask

    def _learn(self, key: str, found: torch.Tensor, what: str) -> None:
        values = [int(v) for v in torch.unique(found).tolist()]
        if not values:
            return
        known = self._sep_ids[key]
        if len(values) > 1 or (known is not None and values[0] != known):
            expected = f"{known}" if known is not None else "one id"
            raise ConfigError(f"{self.family}: the prompt has {values} as {what} (expected {expected}); build the prompt "
                              "with the model's processor")
        self._sep_ids[key] = values[0]

    def token_map(self, input_ids: torch.Tensor, kwargs: dict) -> TokenMap:
        """[IMG] tokens and the separator after each of their rows; separators protected (see the module docstring).
        Checks the prompt's structure against the visual inputs (ConfigError naming what does not match)."""
        img = input_ids == self.placeholder_token_id()
        prev = torch.zeros_like(img)
        prev[:, 1:] = img[:, :-1]
        sep = prev & ~img  # the token right after a run of [IMG]
        hint = "build the prompt with the model's processor"
        if bool(img[:, -1].any()):
            raise ConfigError(f"{self.family}: a prompt row ends inside an image (every image ends with [IMG_END]); {hint}")
        counts = self._image_counts(kwargs)
        if counts is None:
            if bool(img.any()):
                raise ConfigError(f"{self.family}: the prompt has image tokens but the call gives neither image_sizes nor "
                                  "precomputed image features")
            return TokenMap.from_placeholders(img)
        found = int(img.sum())
        if found != sum(counts):
            raise ConfigError(f"Image features and image tokens do not match, tokens: {found}, features: {sum(counts)} "
                              f"(mistral3: {len(counts)} image(s) of {counts} [IMG] tokens; {hint})")
        tm = TokenMap.from_placeholders(img, counts)
        prev_id = torch.full_like(tm.image_id, -1)
        prev_id[:, 1:] = tm.image_id[:, :-1]
        image_id = torch.where(sep, prev_id, tm.image_id)
        # rows: the [IMG] count of every run (one per separator, in order); images' last separators are [IMG_END]
        s_img = image_id[sep]
        run_end = img.flatten().long().cumsum(0).view_as(img)[sep]
        run_len = run_end - torch.cat([run_end.new_zeros(1), run_end[:-1]])
        last = torch.ones_like(s_img, dtype=torch.bool)
        last[:-1] = s_img[1:] != s_img[:-1]
        n_img = len(counts)
        grids = self._token_grids(kwargs)
        if grids is not None:
            want = torch.tensor([w for h, w in grids], device=run_len.device).repeat_interleave(
                torch.tensor([h for h, w in grids], device=run_len.device))
            ok = want.shape == run_len.shape and bool((want == run_len).all())
            why = f"rows of {[w for _, w in grids]} [IMG] tokens, {[h for h, _ in grids]} rows per image"
        else:
            lo = torch.full((n_img,), 1 << 30, device=run_len.device).scatter_reduce(0, s_img, run_len, "amin")
            hi = torch.zeros(n_img, dtype=run_len.dtype, device=run_len.device).scatter_reduce(0, s_img, run_len,
                                                                                              "amax")
            ok = bool((lo == hi).all())
            why = "rows of equal length in every image"
        per_image = torch.zeros(n_img, dtype=run_len.dtype, device=run_len.device).index_add_(0, s_img, run_len)
        ok = ok and per_image.tolist() == list(counts)  # no row runs across two images
        if not ok:
            raise ConfigError(f"{self.family}: the image rows hold {run_len.tolist()} [IMG] tokens, the visual inputs need "
                              f"{why}, each row followed by [IMG_BREAK] and the last by [IMG_END]; {hint}")
        sep_ids = input_ids[sep]
        self._learn("end", sep_ids[last], "[IMG_END] (the token after each image's last row)")
        self._learn("break", sep_ids[~last], "[IMG_BREAK] (the token after each inner row)")
        if self._sep_ids["break"] is not None and self._sep_ids["break"] == self._sep_ids["end"]:
            raise ConfigError(f"{self.family}: [IMG_BREAK] and [IMG_END] have the same id {self._sep_ids['end']}; {hint}")
        return TokenMap(is_visual=img | sep, image_id=torch.where(img | sep, image_id, torch.full_like(image_id, -1)),
                        protected=sep)

    def check_placeholders(self, input_ids: torch.Tensor, kwargs: dict) -> None:
        """The base checks in its wording ([IMG] totals as the model counts them; every run of an image's tokens,
        separators included, holds whole images), then the row structure (:meth:`token_map`)."""
        grids = self._token_grids(kwargs)
        if grids is not None:
            img = input_ids == self.placeholder_token_id()
            rows = [int(c) for c in img.sum(-1).tolist()]
            need = [h * w for h, w in grids]
            context = (f"vtc, {self.family}: the prompt rows hold {rows} image placeholder tokens, the {len(need)} "
                       f"image(s) given need {need} [IMG] tokens, each row followed by [IMG_BREAK] and the last by "
                       "[IMG_END]; build the prompt with the model's processor")
            if sum(rows) != sum(need):
                raise ConfigError(f"Image features and image tokens do not match, tokens: {sum(rows)}, features: "
                                  f"{sum(need)} ({context})")
            prev = torch.zeros_like(img)
            prev[:, 1:] = img[:, :-1]
            vis = img | (prev & ~img)
            nxt = torch.zeros_like(vis)
            nxt[:, :-1] = vis[:, 1:]
            ends = (vis & ~nxt).flatten()
            running = vis.flatten().long().cumsum(0)[ends]
            bounds = torch.tensor([h * (w + 1) for h, w in grids], device=img.device).cumsum(0)
            whole = torch.isin(running, bounds)
            if not bool(whole.all()):
                row = int(ends.nonzero()[int((~whole).long().argmax()), 0]) // img.shape[1]
                raise ConfigError(f"Image features and image tokens do not match in row {row}: a run of image "
                                  f"placeholder tokens ends inside an image ({context})")
        self.token_map(input_ids, kwargs)

    def check_stage(self, stage) -> None:
        super().check_stage(stage)
        if stage.side == "llm" and getattr(self.text_config, "sliding_window", None) is not None:
            raise ConfigError(f"{self.family}: LLM-side stages on a text model with sliding_window="
                              f"{self.text_config.sliding_window} are not supported (allowed: sliding_window None, "
                              "as in Mistral Small 3.1); use vision-side stages")

    # ---- vision side -------------------------------------------------------------------------------------------------
    def vision_extras_available(self) -> frozenset[str]:
        return frozenset({"received_attention", "keys"})

    def encode_images(self, kwargs: dict) -> list[VisualGroup]:
        grids = self._grids(kwargs)
        if grids is None:
            raise ConfigError(f"{self.family}: vision-side stages need image_sizes (the processor returns them)")
        pv, sizes = kwargs["pixel_values"], kwargs["image_sizes"]
        if pv.dim() != 4 or pv.shape[0] != len(grids):
            raise ConfigError(f"{self.family}: pixel_values must be (images, C, H, W) with one image per image_sizes row "
                              f"({len(grids)}), got {tuple(pv.shape)}")
        layer = kwargs.get("vision_feature_layer")
        layer = self.model.config.vision_feature_layer if layer is None else layer
        if not isinstance(layer, int):
            raise ConfigError(f"{self.family}: vision_feature_layer={layer!r} is not supported (allowed: one int; the "
                              "projector's norm and merger take one layer's features)")
        tower = self.vision_tower
        blocks = tower.transformer.layers
        index = layer + len(blocks) + 1 if layer < 0 else layer
        cap: dict[str, Any] = {}

        def grab(module, args, kw):
            cap["x"] = args[0] if args else kw["hidden_states"]
            cap["pe"] = kw.get("position_embeddings", args[2] if len(args) > 2 else None)

        handle = blocks[index - 1].register_forward_pre_hook(grab, with_kwargs=True) if index >= 1 else None
        try:
            out = tower(pv, image_sizes=sizes, output_hidden_states=True, return_dict=True)
        finally:
            if handle is not None:
                handle.remove()
        merged = self._unit_features(out.hidden_states[layer].squeeze(0), sizes, kwargs)
        m = self._merge
        dev = merged.device
        n_patches = torch.tensor([hp * wp for hp, wp in grids], device=dev)
        n_tokens = torch.tensor([(hp // m) * (wp // m) for hp, wp in grids], device=dev)
        p_off, t_off = n_patches.cumsum(0) - n_patches, n_tokens.cumsum(0) - n_tokens
        scores = None
        if "x" in cap and cap["pe"] is not None:
            cos, sin = cap["pe"]
            N = cap["x"].shape[-2]
            segment = torch.repeat_interleave(torch.arange(len(grids), device=dev), n_patches)
            scores = _PixtralScores(blocks[index - 1], cap["x"].reshape(N, -1), cos.reshape(N, -1),
                                    sin.reshape(N, -1), segment, len(grids))

        def need(name: str):
            if scores is None:
                raise ConfigError(f"{self.family}: no {name} at vision_feature_layer={layer} (the patch embeddings have no "
                                  "attention, or the tower's block inputs could not be read)")
            return getattr(scores, name)

        by_grid: dict[tuple[int, int], list[int]] = {}
        for i, g in enumerate(grids):
            by_grid.setdefault(g, []).append(i)
        groups = []
        for (hp, wp), images in by_grid.items():
            h, w = hp // m, wp // m
            sel = torch.tensor(images, device=dev)
            idx = t_off[sel][:, None] + torch.arange(h * w, device=dev)
            offs = p_off[sel]
            extras = VisionExtras(
                received_attention=lambda offs=offs, hp=hp, wp=wp: merge_patch_values(
                    need("received_attention")[:, None], offs, hp, wp, m)[..., 0],
                keys=lambda offs=offs, hp=hp, wp=wp: merge_patch_values(need("keys"), offs, hp, wp, m))
            groups.append(VisualGroup(merged[idx], Grid(h, w), images, [0] * len(images), extras))
        return groups

    def _unit_features(self, hidden: torch.Tensor, sizes, kwargs: dict) -> torch.Tensor:
        """(tokens, D) the features of every image's tokens from the selected tower layer (N patches, D), as the
        model computes them before the part of the projector that :meth:`project` applies: norm + patch merger."""
        proj = self.inner.multi_modal_projector
        return proj.patch_merger(proj.norm(hidden), sizes)

    def project(self, features: torch.Tensor) -> torch.Tensor:
        """The projector after its norm and patch merger: linear, activation, linear (per token)."""
        proj = self.inner.multi_modal_projector
        return proj.linear_2(proj.act(proj.linear_1(features)))

    def pack_images(self, groups_out: list, kwargs: dict) -> list[ImageFeatures]:
        """Rows with separators (see the module docstring): grid outputs as the processor's prompt for that grid,
        pruned / merged outputs in their original rows."""
        per_image: dict[int, ImageFeatures] = {}
        for group, feats, reductions in groups_out:
            U, k = feats.shape[:2]
            h, w = group.layout.h, group.layout.w
            valid = reductions[-1].valid if reductions else None
            out_layout = group.out_layout
            if LlavaNextAdapter._kept_everything(reductions, h * w):
                grid = group.layout
            elif isinstance(out_layout, Grid) and out_layout.num_tokens == k and (valid is None or bool(valid.all())):
                grid = out_layout
            else:
                grid = None
            dev = feats.device
            if grid is not None:
                rows = torch.arange(grid.h, device=dev).repeat_interleave(grid.w).expand(U, -1)
                n_rows, order, valid = grid.h, None, torch.ones(U, k, dtype=torch.bool, device=dev)
            else:
                anchor = chained_anchor(reductions, k, U, dev)
                valid = torch.ones(U, k, dtype=torch.bool, device=dev) if valid is None else valid
                rows = torch.where(valid, anchor.clamp(min=0) // w, torch.full_like(anchor, h))  # invalid last
                rows, order = torch.sort(rows, dim=-1, stable=True)
                n_rows = h
            counts = valid.sum(-1).tolist()
            seps = self._separators(n_rows, feats)
            for u, img in enumerate(group.unit_image):
                f = feats[u] if order is None else feats[u][order[u]]
                emb, prot, ids = pack_rows(f[:counts[u]], rows[u][:counts[u]], n_rows, seps, self._ids(n_rows))
                per_image[img] = ImageFeatures(emb, prot, token_ids=ids)
        return [per_image[i] for i in sorted(per_image)]

    def _ids(self, n_rows: int) -> tuple[int, int, int]:
        brk, end = self._sep_ids["break"], self._sep_ids["end"]
        if end is None or (n_rows > 1 and brk is None):
            raise ConfigError(f"{self.family}: the [IMG_BREAK] / [IMG_END] ids are unknown (set config.image_break_token_id "
                              "and config.image_end_token_id, e.g. from the processor)")
        return self.placeholder_token_id(), end if brk is None else brk, end

    def _separators(self, n_rows: int, like: torch.Tensor) -> torch.Tensor:
        _, brk, end = self._ids(n_rows)
        ids = torch.tensor([[brk, end]], device=like.device)
        return self.embed_tokens(ids)[0].to(like.dtype)


@register_adapter
class PixtralLlavaAdapter(Mistral3Adapter):
    """Pixtral 12B (``LlavaForConditionalGeneration`` with a Pixtral tower): the same tower, image sizes and rows of
    ``[IMG]`` + ``[IMG_BREAK]`` / ``[IMG_END]``, but no patch merger (a token is one patch) and LLaVA's MLP projector
    on the selected layer's patches (``vision_feature_select_strategy: full``). Everything else is Mistral 3's."""

    family = "pixtral"
    model_class_names = ("LlavaForConditionalGeneration",)
    vision_only_keys = ("image_sizes", "vision_feature_layer", "vision_feature_select_strategy")

    @classmethod
    def matches(cls, model) -> bool:
        vcfg = getattr(getattr(model, "config", None), "vision_config", None)
        return super().matches(model) and getattr(vcfg, "model_type", None) == "pixtral"

    @property
    def _merge(self) -> int:
        return 1

    def _unit_features(self, hidden: torch.Tensor, sizes, kwargs: dict) -> torch.Tensor:
        strategy = kwargs.get("vision_feature_select_strategy") or self.model.config.vision_feature_select_strategy
        if strategy != "full":
            raise ConfigError(f"pixtral: vision_feature_select_strategy={strategy!r} is not supported (allowed: 'full'; "
                              "the Pixtral tower has no CLS token to drop)")
        return hidden

    def project(self, features: torch.Tensor) -> torch.Tensor:
        return self.inner.multi_modal_projector(features)
