"""``visionzip``: VisionZip (Yang et al., "VisionZip: Longer is Better but Not Necessary in Vision Language
Models", CVPR 2025, arXiv:2412.04467). Vision side, before the projector.

Everything comes from the vision-tower layer the model takes its features from (LLaVA: ``vision_feature_layer
= -2``): its output hidden states, the CLS row of its attention and its keys averaged over heads, computed
flash-compatibly by the adapter (one recomputed query row, never ``output_attentions``). Per unit (an image, a
LLaVA-NeXT crop, a video frame), T = the tokens VisionZip sees (CLS + n patches on CLIP-style towers):

1. **Dominant** (D tokens, *CLS included*): the CLS token + the top D - 1 patches by the CLS attention row
   **summed over heads** (ties by index), in raster order.
2. **Contextual** (C tokens) from the R = T - D remaining: targets = every ``max(1, R // C)``-th remaining token
   (the first C); every other one joins the target of highest key cosine similarity; contextual token =
   **target + mean of the assigned hidden states**.
3. Output ``[CLS, dominant (raster), contextual (target order)]`` = exactly D + C tokens, then the projector.

Budget: counts the tokens the LLM receives, CLS included (``budget: 64`` = CLS + 53 patches + 10 contextual);
``budget: k`` splits D = max(1, round(k * 54 / 64)), C = k - D (the paper's 54/10, 108/20, 162/30), or give
``dominant`` / ``contextual``. ``keep_cls: false`` drops the CLS token. ``per: crop`` (default, the paper's):
every unit gets the budget; ``per: image``: one budget per image, split jointly over its units.
Towers without CLS (SigLIP, Qwen2-VL / 2.5-VL): scores = the attention each token receives from a mean query.
Counting, per-image split, budgets, official quirks: docs/methods/visionzip.md.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import model_validator

from ..errors import ConfigError
from ..layout import Layout, MultiCrop, Video
from ..reduction import Reduction, resolve_budget, topk_per_group
from . import register_method
from .base import Budget, Method, VisionContext

__all__ = ["VisionZip", "split_budget", "dominant_mask", "contextual_merge", "visionzip_tokens", "merge_like"]

#: the paper's split: 54 dominant of 64 (and 108 / 128, 162 / 192)
DOMINANT_SHARE = 54 / 64


def split_budget(k: int) -> tuple[int, int]:
    """(D, C) for a bare budget of k tokens: D = max(1, round(k * 54 / 64)), C = k - D (64 -> 54 + 10)."""
    d = max(1, min(k, int(round(k * DOMINANT_SHARE))))
    return d, k - d


# ---- the maths (pure functions) ----------------------------------------------------------------------------------
def dominant_mask(scores: torch.Tensor, num: torch.Tensor, group: torch.Tensor | None = None) -> torch.Tensor:
    """(R, T) bool: the top ``num[r]`` tokens of every row by ``scores`` (R, T) (ties by index).

    With ``group`` (R,) long, rows of one group are ranked jointly (``num`` is then per group, (G,)): the top
    ``num[g]`` tokens over all rows of group g.
    """
    R, T = scores.shape
    if group is None:
        order = torch.sort(scores.float(), dim=-1, descending=True, stable=True).indices
        rank = torch.empty_like(order).scatter_(1, order, torch.arange(T, device=scores.device).expand(R, T))
        return rank < num[:, None]
    # joint: flatten every group's rows into one row of a (1, R * T) problem
    g = group[:, None].expand(R, T).reshape(1, R * T)
    return topk_per_group(scores.reshape(1, R * T), g, num[None]).view(R, T)


def contextual_merge(x: torch.Tensor, keys: torch.Tensor, remaining: torch.Tensor, num: torch.Tensor):
    """VisionZip's contextual tokens of every row.

    x: (R, T, D) hidden states; keys: (R, T, d) merge metric; remaining: (R, T) bool, the non-dominant tokens;
    num: (R,) long, contextual tokens per row (each <= the row's remaining count).
    Targets: the remaining tokens whose rank r (raster order among the remaining) satisfies ``r % s == 0`` and
    ``r // s < num`` with ``s = max(1, R_row // num)``; every other remaining token joins the target of highest
    cosine similarity (argmax, first on ties); contextual = target + mean(assigned). A row with ``num == 0``
    drops its remaining tokens (pure dominant selection).

    Returns (feats (R, Cmax, D), target (R, Cmax) token index, valid (R, Cmax), slot (R, T) contextual slot of
    each remaining token (-1 for dominant), counts (R, Cmax) tokens merged into each target besides itself).
    """
    R, T, D = x.shape
    dev = x.device
    cmax = int(num.max()) if num.numel() else 0  # one host sync per stage
    n_rem = remaining.sum(-1)
    rank = remaining.long().cumsum(-1) - 1
    step = torch.where(num > 0, n_rem // num.clamp(min=1), torch.ones_like(num)).clamp(min=1)
    t_idx = rank // step[:, None]
    is_target = remaining & (rank % step[:, None] == 0) & (t_idx < num[:, None])
    if cmax == 0:
        empty = x.new_zeros(R, 0, D)
        return (empty, torch.zeros(R, 0, dtype=torch.long, device=dev), torch.zeros(R, 0, dtype=torch.bool, device=dev),
                torch.full((R, T), -1, dtype=torch.long, device=dev), torch.zeros(R, 0, device=dev))
    # target index per slot (dummy column cmax for non-targets)
    slot_of_target = torch.where(is_target, t_idx, torch.full_like(t_idx, cmax))
    tokens = torch.arange(T, device=dev).expand(R, T)
    target = torch.zeros(R, cmax + 1, dtype=torch.long, device=dev).scatter_(1, slot_of_target, tokens)[:, :cmax]
    valid = torch.arange(cmax, device=dev)[None] < num[:, None]
    kn = keys.float()
    kn = kn / kn.norm(dim=-1, keepdim=True).clamp(min=1e-12)
    tk = torch.gather(kn, 1, target[..., None].expand(-1, -1, kn.shape[-1]))  # (R, Cmax, d)
    sim = torch.bmm(kn, tk.transpose(1, 2))  # (R, T, Cmax): O(T * C), never T x T
    sim = sim.masked_fill(~valid[:, None, :], float("-inf"))
    assign = sim.argmax(-1)  # (R, T)
    merging = remaining & ~is_target & (num > 0)[:, None]  # with no targets the remaining tokens are dropped
    slot = torch.where(is_target, t_idx, torch.where(merging, assign, torch.full_like(assign, -1)))
    # sums of the assigned tokens per target (fp32), scatter into a dummy column for the others
    col = torch.where(merging, assign, torch.full_like(assign, cmax))
    sums = torch.zeros(R, cmax + 1, D, dtype=torch.float32, device=dev)
    sums.scatter_add_(1, col[..., None].expand(-1, -1, D), x.float())
    counts = torch.zeros(R, cmax + 1, dtype=torch.float32, device=dev).scatter_add_(1, col, torch.ones_like(col, dtype=torch.float32))
    sums, counts = sums[:, :cmax], counts[:, :cmax]
    own = torch.gather(x, 1, target[..., None].expand(-1, -1, D)).float()
    feats = own + sums / counts.clamp(min=1.0)[..., None]
    return feats.to(x.dtype), target, valid, slot, counts


def merge_like(x: torch.Tensor, anchor: torch.Tensor, source: torch.Tensor) -> torch.Tensor:
    """Other features x (U, n, D) combined like VisionZip's outputs: output j = x[anchor_j] + the mean of the other
    tokens whose ``source`` is j (fp32, as :func:`contextual_merge`); a dominant token is its own output."""
    U, n, D = x.shape
    K = anchor.shape[1]
    others = (source >= 0) & (torch.gather(anchor, 1, source.clamp(min=0)) != torch.arange(n, device=x.device))
    col = torch.where(others, source, torch.full_like(source, K))
    sums = torch.zeros(U, K + 1, D, dtype=torch.float32, device=x.device)
    sums.scatter_add_(1, col[..., None].expand(-1, -1, D), x.float())
    counts = torch.zeros(U, K + 1, device=x.device).scatter_add_(1, col, torch.ones_like(col, dtype=torch.float32))
    own = torch.gather(x, 1, anchor[..., None].expand(-1, -1, D)).float()
    return (own + sums[:, :K] / counts[:, :K].clamp(min=1.0)[..., None]).to(x.dtype)


def visionzip_tokens(x: torch.Tensor, scores: torch.Tensor, keys: torch.Tensor, dom: torch.Tensor,
                     num_ctx: torch.Tensor):
    """Assemble VisionZip's output per row from a dominant mask.

    x (R, T, D), scores (R, T), keys (R, T, d), dom (R, T) bool dominant tokens, num_ctx (R,) contextual counts.
    Returns (out (R, K, D), index (R, K) token index of each output (the target for contextual tokens),
    valid (R, K), slot (R, T) output slot of every token, sizes (R, K)) with K = max_r(D_r + C_r); a row's
    outputs are [dominant in raster order, contextual in target order, padding].
    """
    R, T, D = x.shape
    dev = x.device
    n_dom = dom.sum(-1)
    ctx, target, cvalid, cslot, counts = contextual_merge(x, keys, ~dom, num_ctx)
    cmax = target.shape[1]
    K = int((n_dom + num_ctx).max())  # one host sync
    # dominant output slot = rank among dominant (raster); contextual slot t -> n_dom + t
    dslot = dom.long().cumsum(-1) - 1
    slot = torch.where(dom, dslot, cslot + n_dom[:, None])
    out = x.new_zeros(R, K + 1, D)
    dcol = torch.where(dom, dslot, torch.full_like(dslot, K))
    out.scatter_(1, dcol[..., None].expand(-1, -1, D), x)
    ccol = torch.where(cvalid, torch.arange(cmax, device=dev)[None] + n_dom[:, None], torch.full_like(target, K))
    out.scatter_(1, ccol[..., None].expand(-1, -1, D), ctx)
    index = torch.zeros(R, K + 1, dtype=torch.long, device=dev)
    index.scatter_(1, dcol, torch.arange(T, device=dev).expand(R, T))
    index.scatter_(1, ccol, target)
    sizes = torch.zeros(R, K + 1, dtype=torch.float32, device=dev)
    sizes.scatter_(1, dcol, torch.ones(R, T, device=dev))
    sizes.scatter_(1, ccol, counts + 1.0)
    valid = torch.arange(K, device=dev)[None] < (n_dom + num_ctx)[:, None]
    return out[:, :K], index[:, :K], valid, slot, sizes[:, :K]


# ---- the method --------------------------------------------------------------------------------------------------
@register_method("visionzip")
class VisionZip(Method):
    sides = ("vision",)

    method: Literal["visionzip"] = "visionzip"
    budget: Budget | None = None
    dominant: int | None = None
    contextual: int | None = None
    per: Literal["crop", "image"] = "crop"
    keep_cls: bool = True
    feature_space: Literal["vision"] = "vision"

    @model_validator(mode="after")
    def _check(self) -> VisionZip:
        d, c, b = self.dominant, self.contextual, self.budget
        if d is not None and d < 1:
            raise ValueError(f"dominant must be >= 1 (the CLS token counts as one on towers with CLS), got {d}")
        if c is not None and c < 0:
            raise ValueError(f"contextual must be >= 0, got {c}")
        if b is None and (d is None or c is None):
            raise ValueError("give 'budget', or both 'dominant' and 'contextual' (e.g. budget: 64 or "
                             "dominant: 54, contextual: 10)")
        if b is not None and (d is not None or c is not None):
            if isinstance(b, float):
                if d is not None:
                    raise ValueError(f"a fractional budget ({b}) cannot be combined with an explicit dominant count; "
                                     "give token counts, or a fraction with 'contextual' only")
                return self
            if d is not None and c is not None and d + c != b:
                raise ValueError(f"budget={b} must equal dominant + contextual = {d} + {c} = {d + c}")
            if d is not None and d > b:
                raise ValueError(f"dominant={d} is larger than budget={b}")
            if c is not None and c >= b:
                raise ValueError(f"contextual={c} leaves no dominant token in budget={b} (dominant must be >= 1)")
        return self

    def check_layout(self, layout: Layout) -> None:
        if isinstance(layout, MultiCrop):
            raise ConfigError("visionzip: a MultiCrop layout is reduced per part (crop); pass its parts as units")

    # -- budgets -------------------------------------------------------------------------------------------------
    def counts(self, n_fed: int, available: int) -> tuple[int, int]:
        """(D, C) for a unit (or image) with ``n_fed`` fed tokens and ``available`` = tokens VisionZip can
        output (n_fed, + 1 when it adds the CLS token)."""
        d, c = self.dominant, self.contextual
        if d is None or c is None:
            if self.budget is None:  # pragma: no cover - validated
                raise ConfigError("visionzip: no budget")
            if isinstance(self.budget, float):
                k = resolve_budget(self.budget, n_fed)
            elif d is not None or c is not None:
                k = self.budget
            else:  # clamped to the fed tokens, so the output never outgrows the prompt's placeholders
                k = resolve_budget(self.budget, n_fed)
            if d is not None:
                c = k - d
            elif c is not None:
                d = k - c
                if d < 1:
                    raise ConfigError(f"visionzip: budget={self.budget} gives {k} tokens here, which leaves no dominant "
                                      f"token next to contextual={c} (dominant must be >= 1)")
            else:
                d, c = split_budget(k)
        if d + c > available:
            unit = "image" if self.per == "image" else "unit"
            if d > available:
                raise ConfigError(f"visionzip: dominant={d} is larger than the {available} tokens available per {unit} "
                                  f"(allowed: 1..{available}, CLS included)")
            raise ConfigError(
                f"visionzip: dominant + contextual = {d} + {c} = {d + c} is larger than the {available} tokens "
                f"available per {unit} (the contextual step needs at least as many remaining tokens as targets: "
                f"{available - d} remaining < contextual={c}); lower dominant / contextual"
            )
        return d, c

    # -- reduction ----------------------------------------------------------------------------------------------
    def reduce_vision(self, ctx: VisionContext) -> Reduction:
        feats = ctx.features
        U, n, Dm = feats.shape
        ex = ctx.extras
        dev = feats.device
        has_cls = ex.cls_attention is not None
        if has_cls:
            scores = ex.require("cls_attention", self.method)
        elif ex.received_attention is not None:
            scores = ex.require("received_attention", self.method)
        else:
            raise ConfigError(
                "visionzip needs 'cls_attention' (towers with CLS) or 'received_attention' (towers without CLS) "
                f"from the vision tower (available: {', '.join(ex.available()) or 'none'}); with "
                "vtc.reduce_embeddings pass extras={'cls_attention': (U, n), 'keys': (U, n, d), 'cls_token': (U, D)}"
            )
        keys = ex.require("keys", self.method)
        if scores.shape != (U, n) or keys.shape[:2] != (U, n):
            raise ConfigError(
                f"visionzip: extras do not match the features (U={U}, n={n}): scores {tuple(scores.shape)}, keys "
                f"{tuple(keys.shape)} (expected (U, n) and (U, n, d))"
            )
        # where the CLS token is: inside the features (LLaVA 'full' strategy) or supplied separately
        cls_in_feats = False
        add_cls = False
        cls = None
        if has_cls and self.keep_cls:
            if ex.hidden_with_cls is not None and ex.hidden_with_cls().shape[1] == n:
                cls_in_feats = True
            else:
                if ex.cls_token is None:
                    raise ConfigError("visionzip: keep_cls=true needs 'cls_token' (U, D) from the vision tower "
                                      "(or set keep_cls: false)")
                cls = ex.require("cls_token", self.method)
                add_cls = True
        layout = ctx.layout
        frames = layout.t if isinstance(layout, Video) else 1
        if add_cls and frames > 1:
            if cls.dim() != 3 or cls.shape[1] != frames:
                raise ConfigError(f"visionzip: on a Video layout cls_token must be (U, t={frames}, D), got "
                                  f"{tuple(cls.shape)}")
        # rows = units x frames, T = tokens per row in VisionZip's world
        per_frame = n // frames
        x = feats.reshape(U * frames, per_frame, Dm)
        s = scores.float().reshape(U * frames, per_frame)
        k = keys.reshape(U * frames, per_frame, keys.shape[-1])
        rows = U * frames
        if add_cls:
            c = cls.reshape(rows, 1, Dm).to(x.dtype)
            x = torch.cat([c, x], dim=1)
            s = torch.cat([torch.full((rows, 1), float("inf"), device=dev), s], dim=1)
            k = torch.cat([k.new_zeros(rows, 1, k.shape[-1]), k], dim=1)
        elif cls_in_feats:
            s = s.clone()
            s[:, 0] = float("inf")  # the CLS token (index 0 of the fed tokens) is always dominant
        T = x.shape[1]
        forced = int(add_cls or cls_in_feats)
        if self.per == "image":
            dom, n_ctx = self._per_image(ctx, s, rows, frames, per_frame, T, forced)
        else:
            d, c = self.counts(per_frame, T)
            dom = dominant_mask(s, torch.full((rows,), d, dtype=torch.long, device=dev))
            n_ctx = torch.full((rows,), c, dtype=torch.long, device=dev)
        out, index, valid, slot, sizes = visionzip_tokens(x, s, k, dom, n_ctx)
        red = self._reduction(out, index, valid, slot, sizes, s, U, frames, per_frame, add_cls)
        if not add_cls and int(n_ctx.max()) == 0:
            red.features = None  # pure dominant selection of fed tokens: a plain prune (outputs = gathered inputs)
        elif not add_cls:  # an added CLS output stands for no fed token: other features cannot follow it
            red.combine = lambda o: merge_like(o, red.anchor, red.source)
        return red

    def _per_image(self, ctx: VisionContext, s: torch.Tensor, rows: int, frames: int, per_frame: int, T: int,
                   forced: int):
        """Dominant mask and contextual counts when one budget covers all units (crops / frames) of an image."""
        dev = s.device
        U = rows // frames
        unit_image = ctx.unit_image
        if unit_image is None:
            unit_image = torch.arange(U, device=dev)  # every unit is its own image (a video: its frames)
        _, img = torch.unique(torch.as_tensor(unit_image, device=dev).long(), return_inverse=True)
        row_img = img.repeat_interleave(frames)  # (rows,) image of every unit x frame
        G = int(img.max()) + 1
        units_per_img = torch.bincount(row_img, minlength=G).tolist()  # one host sync
        d_img, c_img = [], []
        for m in units_per_img:
            d, c = self.counts(m * per_frame, m * T)
            if forced and d < m:
                raise ConfigError(
                    f"visionzip: per=image with keep_cls keeps the CLS token of each of the {m} crops/frames, so "
                    f"dominant must be >= {m} (got {d}); raise the budget or set keep_cls: false"
                )
            d_img.append(d)
            c_img.append(c)
        d_t = torch.tensor(d_img, device=dev)
        c_t = torch.tensor(c_img, device=dev)
        dom = dominant_mask(s, d_t, group=row_img)
        # contextual split proportional to each row's remaining tokens (largest remainder, ties to lower row)
        rem = (T - dom.sum(-1)).long()  # (rows,)
        rem_img = torch.zeros(G, dtype=torch.long, device=dev).scatter_add_(0, row_img, rem)
        share = c_t[row_img] * rem
        base = share // rem_img[row_img].clamp(min=1)
        left = c_t - torch.zeros(G, dtype=torch.long, device=dev).scatter_add_(0, row_img, base)
        frac = (share - base * rem_img[row_img].clamp(min=1)).float()
        extra = topk_per_group(frac[None], row_img[None], left[None])[0]
        n_ctx = base + extra.long()
        return dom, n_ctx

    def _reduction(self, out, index, valid, slot, sizes, s, U, frames, per_frame, add_cls) -> Reduction:
        """Map VisionZip's per-row result back to the fed tokens of each unit."""
        rows, K = index.shape
        dev = index.device
        if add_cls:
            # token 0 is the added CLS: it covers no fed token; it takes the anchor of the patch it attends most
            top = s[:, 1:].argmax(-1)
            index = torch.where(index == 0, top[:, None], index - 1)
            slot = slot[:, 1:]
        index = torch.where(valid, index, torch.zeros_like(index))
        # rows (units x frames) -> units: concatenate the frames' outputs, offsets into the unit's tokens
        fr = torch.arange(frames, device=dev).repeat(U)
        anchor = (index + (fr * per_frame)[:, None]).view(U, frames * K)
        src = (slot + (fr * K)[:, None]).view(U, frames * per_frame)
        red_valid = valid.reshape(U, frames * K)
        feats = out.reshape(U, frames * K, -1)
        sizes = sizes.reshape(U, frames * K)
        if frames > 1:
            # move every unit's valid outputs to the front (frames may deliver different counts)
            order = torch.sort((~red_valid).long(), dim=-1, stable=True).indices
            inv = torch.empty_like(order).scatter_(1, order, torch.arange(order.shape[1], device=dev).expand_as(order))
            anchor = torch.gather(anchor, 1, order)
            red_valid = torch.gather(red_valid, 1, order)
            feats = torch.gather(feats, 1, order[..., None].expand(-1, -1, feats.shape[-1]))
            sizes = torch.gather(sizes, 1, order)
            src = torch.where(src >= 0, torch.gather(inv, 1, src.clamp(min=0)), src)
            kmax = int(red_valid.sum(-1).max())
            anchor, red_valid, feats, sizes = anchor[:, :kmax], red_valid[:, :kmax], feats[:, :kmax], sizes[:, :kmax]
        return Reduction(anchor=anchor.contiguous(), valid=red_valid.contiguous(), source=src.contiguous(),
                         features=feats, sizes=torch.where(red_valid, sizes, torch.zeros_like(sizes)))
