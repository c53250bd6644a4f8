"""``pool``: training-free adaptive pooling of the visual tokens to an exact budget (vision side).

Acts on the vision features **before the projector** by default (``feature_space: vision``, as TokenFLEX, Hu et
al., 2025, arXiv:2504.03154, and pooling projectors do); ``feature_space: llm`` pools the projected embeddings.

Window modes, on the output grid (h', w') = the factor pair of k closest to the grid's aspect ratio, or
``grid: [h', w']``, with torch's adaptive-pooling windows ``[floor(i h / h'), ceil((i + 1) h / h'))`` per axis:

- ``avg`` (default; TokenFLEX's projector input) and ``max``: adaptive average / max pooling;
- ``attn``: SimPool (Psomas et al., ICCV 2023, arXiv:2309.06891), training-free: k_i = LN(x_i), q = LN(mean_i x_i)
  (no affine), w_i = softmax_i(q . k_i / sqrt(D)), output ``sum_i w_i x_i``.

``cluster``: Token Pooling (Marin et al., WACV 2023, arXiv:2110.03860), weighted k-means of a unit's tokens into k
clusters (``weights: uniform | cls | received``, init = the top-k by weight, ``iters: 5`` Lloyd steps); outputs
the centres, each at its nearest member (its anchor). Distances (n x k), never n x n.

Layouts: ``Grid``; multi-crop: every crop grid; ``Video``: per frame, or ``temporal: 2`` to also pool frame pairs;
unordered 1D ``Sequence``: adaptive 1D pooling. Budget: an int k per grid (per frame), a float fraction; clamped
with a warning (``cluster``: an int k > n is a ConfigError). Pooled tokens take their window anchor's position
(the input token nearest the window centre). Windows, anchors, source map, cluster details: docs/methods/pool.md.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import model_validator

from ..errors import ConfigError
from ..layout import Grid, Layout, MultiCrop, Sequence, Video
from ..reduction import Reduction, resolve_budget
from . import register_method
from .base import Budget, Method, VisionContext
from .downsample import closest_factor_pair, window_anchors

__all__ = ["Pool", "adaptive_windows", "window_index", "pool_windows", "simpool_weights", "weighted_kmeans",
           "cluster_means"]


# ---- windows -----------------------------------------------------------------------------------------------------
def adaptive_windows(n_in: int, n_out: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """torch's adaptive-pooling windows along one axis: index (n_out, L) and mask (n_out, L) of the inputs of
    output i = ``[floor(i n_in / n_out), ceil((i + 1) n_in / n_out))``."""
    i = torch.arange(n_out, device=device)
    start = (i * n_in) // n_out
    end = ((i + 1) * n_in + n_out - 1) // n_out
    L = int((end - start).max())
    idx = start[:, None] + torch.arange(L, device=device)[None]
    mask = idx < end[:, None]
    return idx.clamp(max=n_in - 1), mask


def pair_windows(t: int, size: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Consecutive non-overlapping windows of ``size`` frames: (ceil(t / size), size) index and mask."""
    t2 = -(-t // size)
    idx = torch.arange(t2, device=device)[:, None] * size + torch.arange(size, device=device)[None]
    mask = idx < t
    return idx.clamp(max=t - 1), mask


def window_index(axes: list[tuple[torch.Tensor, torch.Tensor, int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Combine per-axis windows [(index (o_a, L_a), mask (o_a, L_a), n_a)] (outer axis first) into flat windows
    over the raster-ordered tokens: index (prod o_a, prod L_a) and mask."""
    idx = torch.zeros(1, 1, dtype=torch.long, device=axes[0][0].device)
    mask = torch.ones(1, 1, dtype=torch.bool, device=axes[0][0].device)
    for a_idx, a_mask, n in axes:
        idx = (idx[:, None, :, None] * n + a_idx[None, :, None, :]).flatten(2).flatten(0, 1)
        mask = (mask[:, None, :, None] & a_mask[None, :, None, :]).flatten(2).flatten(0, 1)
    return idx, mask


def pool_windows(x: torch.Tensor, index: torch.Tensor, mask: torch.Tensor, mode: str,
                 weights: torch.Tensor | None = None) -> torch.Tensor:
    """Pool x (U, n, D) over windows index / mask (k, L): (U, k, D). mode: avg | max | attn (SimPool).
    ``weights`` (U, k, L): attn mode's window weights given (e.g. those of other features, :func:`simpool_weights`)
    instead of computed from x."""
    U, n, D = x.shape
    k, L = index.shape
    xw = x[:, index.flatten()].view(U, k, L, D)  # O(k L D) = O(n D) for adaptive windows
    m = mask[None, :, :, None]
    if mode == "avg":
        xs = xw.float().masked_fill(~m, 0.0).sum(2)
        return (xs / mask.sum(-1).clamp(min=1)[None, :, None]).to(x.dtype)
    if mode == "max":
        return xw.masked_fill(~m, float("-inf")).amax(2)
    if mode == "attn":
        w = simpool_weights(xw, mask) if weights is None else weights
        return torch.einsum("ukl,ukld->ukd", w, xw.float()).to(x.dtype)
    raise ValueError(f"unknown pooling mode {mode!r}")


def simpool_weights(xw: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """SimPool's window weights (U, k, L) of windowed features xw (U, k, L, D): softmax over the window of
    LN(x_l) . LN(mean) / sqrt(D)."""
    D = xw.shape[-1]
    xf = xw.float()
    keys = F.layer_norm(xf, (D,))
    mean = xf.masked_fill(~mask[None, :, :, None], 0.0).sum(2) / mask.sum(-1).clamp(min=1)[None, :, None]
    q = F.layer_norm(mean, (D,))
    logits = torch.einsum("ukld,ukd->ukl", keys, q) / D**0.5
    return logits.masked_fill(~mask[None], float("-inf")).softmax(-1)


# ---- Token Pooling ----------------------------------------------------------------------------------------------
def weighted_kmeans(x: torch.Tensor, w: torch.Tensor, k: int, iters: int = 5, uniform: bool = False):
    """Token Pooling's weighted k-means. x (R, n, D), w (R, n) >= 0 weights, k clusters, ``iters`` >= 1 Lloyd
    iterations; ``uniform``: initialise at every n/k-th token instead of the top-k weights.

    Weights are clamped to a tiny positive value (a cluster of zero-weight tokens gets their plain mean).
    Returns (centres (R, k, D), assign (R, n) cluster of each token (the last assignment, which the centres
    average), anchor (R, k) member nearest each centre (its initial token if empty), sizes (R, k) member counts).
    """
    R, n, D = x.shape
    dev = x.device
    xf = x.float()
    # strictly positive weights (a cluster of zero-weight tokens still has a well-defined mean)
    wf = w.float().clamp(min=torch.finfo(torch.float32).tiny)
    xw = xf * wf[..., None]
    if uniform:
        init = ((torch.arange(k, device=dev) * n) // k).expand(R, k)
    else:
        init = torch.sort(wf, dim=-1, descending=True, stable=True).indices[:, :k]
    centres = torch.gather(xf, 1, init[..., None].expand(-1, -1, D))
    x2 = (xf * xf).sum(-1, keepdim=True)  # (R, n, 1)
    assign = None
    dist = None
    cluster_ids = torch.arange(k, device=dev)
    for _ in range(max(1, iters)):
        dist = x2 - 2 * torch.bmm(xf, centres.transpose(1, 2)) + (centres * centres).sum(-1)[:, None, :]  # (R,n,k)
        assign = dist.argmin(-1)
        member = (assign[:, None, :] == cluster_ids[None, :, None]).float()  # (R, k, n) one-hot, O(n k)
        wsum = torch.bmm(member, wf[..., None])[..., 0]
        acc = torch.bmm(member, xw)  # (R, k, D) weighted sums
        counts = member.sum(-1)
        centres = torch.where((counts > 0)[..., None], acc / wsum.clamp(min=1e-30)[..., None], centres)
    # anchor: the member nearest its (final) centre
    own = (xf - torch.gather(centres, 1, assign[..., None].expand(-1, -1, D))).pow(2).sum(-1)  # (R, n)
    best = torch.full((R, k), float("inf"), device=dev).scatter_reduce(1, assign, own, reduce="amin")
    tok = torch.arange(n, device=dev).expand(R, n)
    # near-ties (e.g. the two members of a pair are equally far from their mean) go to the lower index, so
    # float noise (sdpa vs eager features) cannot flip the anchor
    tol = 1e-4 * (torch.gather(best, 1, assign) + x2[..., 0].mean(-1, keepdim=True) * 1e-2)
    is_best = own <= torch.gather(best, 1, assign) + tol
    anchor = torch.full((R, k), n, dtype=torch.long, device=dev).scatter_reduce(
        1, assign, torch.where(is_best, tok, torch.full_like(tok, n)), reduce="amin")
    anchor = torch.where(anchor < n, anchor, init)
    return centres.to(x.dtype), assign, anchor, counts


def cluster_means(x: torch.Tensor, source: torch.Tensor, w: torch.Tensor, anchor: torch.Tensor, k: int) -> torch.Tensor:
    """Other features x (U, n, D) combined like :func:`weighted_kmeans`' centres: the weighted mean (weights w (U, n),
    clamped as there) of each cluster's members (``source`` (U, n) cluster of each token); a cluster the last
    assignment left empty (its centre is an earlier mean) takes its anchor token's features."""
    U, n, D = x.shape
    wf = w.float().clamp(min=torch.finfo(torch.float32).tiny)
    acc = torch.zeros(U, k, D, device=x.device).index_put_(
        (torch.arange(U, device=x.device)[:, None].expand(U, n), source), x.float() * wf[..., None], accumulate=True)
    wsum = torch.zeros(U, k, device=x.device).scatter_add_(1, source, wf)
    counts = torch.zeros(U, k, device=x.device).scatter_add_(1, source, torch.ones_like(wf))
    own = torch.gather(x.float(), 1, anchor[..., None].expand(-1, -1, D))
    return torch.where((counts > 0)[..., None], acc / wsum.clamp(min=1e-30)[..., None], own).to(x.dtype)


# ---- the method --------------------------------------------------------------------------------------------------
@register_method("pool")
class Pool(Method):
    sides = ("vision",)

    method: Literal["pool"] = "pool"
    budget: Budget | None = None
    mode: Literal["avg", "max", "attn", "cluster"] = "avg"
    grid: tuple[int, int] | None = None
    temporal: Literal[1, 2] = 1
    weights: Literal["uniform", "cls", "received"] = "uniform"
    iters: int = 5
    feature_space: Literal["vision", "llm"] = "vision"

    @property
    def requires_extras(self) -> tuple[str, ...]:
        return {"cls": ("cls_attention",), "received": ("received_attention",)}.get(self.weights, ())

    @model_validator(mode="after")
    def _check(self) -> Pool:
        if self.budget is None and self.grid is None:
            raise ValueError("give 'budget' (tokens per grid / frame, or a keep fraction) or 'grid: [h, w]'")
        if self.grid is not None:
            if self.mode == "cluster":
                raise ValueError("grid applies to the window modes (avg / max / attn); cluster takes a budget")
            h, w = self.grid
            if h < 1 or w < 1:
                raise ValueError(f"grid sides must be >= 1, got {list(self.grid)}")
            if isinstance(self.budget, int) and self.budget != h * w:
                raise ValueError(f"budget={self.budget} disagrees with grid={list(self.grid)} ({h * w} tokens)")
        if self.iters < 1:
            raise ValueError(f"iters must be >= 1, got {self.iters}")
        if self.weights != "uniform" and self.mode != "cluster":
            raise ValueError(f"weights={self.weights!r} applies to mode 'cluster' only (mode is {self.mode!r})")
        if self.temporal != 1 and self.mode == "cluster":
            raise ValueError("temporal: 2 applies to the window modes (avg / max / attn), not cluster")
        return self

    def check_layout(self, layout: Layout) -> None:
        if isinstance(layout, MultiCrop):
            raise ConfigError("pool: a MultiCrop layout is pooled per crop grid; pass its parts as units")
        if self.temporal != 1 and not isinstance(layout, Video):
            raise ConfigError(f"pool: temporal={self.temporal} needs a Video layout, got {layout!r}")
        if self.grid is not None and not isinstance(layout, Grid | Video):
            raise ConfigError(f"pool: grid={list(self.grid)} needs a Grid or Video layout, got {layout!r}")

    # -- geometry -------------------------------------------------------------------------------------------------
    def _target(self, h: int, w: int) -> tuple[int, int]:
        if self.grid is not None:
            h2, w2 = self.grid
            if h2 > h or w2 > w:
                raise ConfigError(f"pool: grid={list(self.grid)} must fit inside the {h}x{w} feature grid")
            return h2, w2
        k = resolve_budget(self.budget, h * w)
        return closest_factor_pair(k, h, w)

    def _geometry(self, layout: Layout, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(window index (k, L), mask (k, L), anchor (k,), source (n,)) over one unit's tokens."""
        if isinstance(layout, Sequence):
            k = resolve_budget(self.budget, layout.n)
            idx, mask = adaptive_windows(layout.n, k, device)
            source = (torch.arange(layout.n, device=device) * k) // layout.n
            centre = ((torch.arange(k, device=device) + 0.5) * layout.n / k - 0.5).round().long()
            return idx, mask, centre.clamp(0, layout.n - 1), source
        t = layout.t if isinstance(layout, Video) else 1
        h, w = layout.h, layout.w
        h2, w2 = self._target(h, w)
        rows, cols = adaptive_windows(h, h2, device), adaptive_windows(w, w2, device)
        frames = pair_windows(t, self.temporal, device)
        idx, mask = window_index([(frames[0], frames[1], t), (rows[0], rows[1], h), (cols[0], cols[1], w)])
        anchor2d, source2d = window_anchors(h, w, h2, w2, device)
        t2 = frames[0].shape[0]
        first = frames[0][:, 0]  # first frame of each temporal window
        anchor = (first[:, None] * (h * w) + anchor2d[None]).flatten()
        f_out = torch.arange(t, device=device) // self.temporal
        source = (f_out[:, None] * (h2 * w2) + source2d[None]).flatten()
        assert anchor.shape[0] == t2 * h2 * w2
        return idx, mask, anchor, source

    # -- reduction ----------------------------------------------------------------------------------------------
    def reduce_vision(self, ctx: VisionContext) -> Reduction:
        if self.mode == "cluster":
            return self._cluster(ctx)
        x = ctx.features
        U = x.shape[0]
        idx, mask, anchor, source = self._geometry(ctx.layout, x.device)
        k, L = idx.shape
        w = simpool_weights(x[:, idx.flatten()].view(U, k, L, -1), mask) if self.mode == "attn" else None
        y = pool_windows(x, idx, mask, self.mode, w)
        sizes = mask.sum(-1).float()
        return Reduction(anchor=anchor.expand(U, k).contiguous(),
                         valid=torch.ones(U, k, dtype=torch.bool, device=x.device),
                         source=source.expand(U, -1).contiguous(), features=y,
                         sizes=sizes.expand(U, k).contiguous(),
                         combine=lambda o: pool_windows(o, idx, mask, self.mode, w))

    def _cluster(self, ctx: VisionContext) -> Reduction:
        x = ctx.features
        U, n, D = x.shape
        frames = ctx.layout.t if isinstance(ctx.layout, Video) else 1
        per = n // frames
        if isinstance(self.budget, int) and self.budget > per:
            raise ConfigError(
                f"pool: mode=cluster with budget={self.budget} clusters needs at least that many tokens, but a "
                f"{'frame' if frames > 1 else 'unit'} has only {per} (allowed: 1..{per}, or a fraction)"
            )
        k = resolve_budget(self.budget, per)
        if self.weights == "uniform":
            w = torch.ones(U, n, device=x.device)
        else:
            name = "cls_attention" if self.weights == "cls" else "received_attention"
            w = ctx.extras.require(name, f"pool (weights={self.weights})")
            if w.shape != (U, n):
                raise ConfigError(f"pool: {name} has shape {tuple(w.shape)}, expected (U, n) = ({U}, {n})")
        xr = x.reshape(U * frames, per, D)
        centres, assign, anchor, counts = weighted_kmeans(xr, w.reshape(U * frames, per), k, self.iters,
                                                          uniform=self.weights == "uniform")
        # order the clusters of each row by anchor (raster order of the sequence the LLM sees)
        order = torch.sort(anchor, dim=-1, stable=True).indices
        inv = torch.empty_like(order).scatter_(1, order, torch.arange(k, device=x.device).expand_as(order))
        centres = torch.gather(centres, 1, order[..., None].expand(-1, -1, D))
        anchor = torch.gather(anchor, 1, order)
        counts = torch.gather(counts, 1, order)
        assign = torch.gather(inv, 1, assign)
        fr = torch.arange(frames, device=x.device).repeat(U)[:, None]
        anchor = (anchor + fr * per).view(U, frames * k)
        source = (assign + fr * k).view(U, n)
        return Reduction(anchor=anchor.contiguous(), valid=torch.ones(U, frames * k, dtype=torch.bool, device=x.device),
                         source=source.contiguous(), features=centres.reshape(U, frames * k, D),
                         sizes=counts.reshape(U, frames * k),
                         combine=lambda o: cluster_means(o, source, w, anchor, frames * k))

    def output_layout(self, layout: Layout, num_out: int) -> Layout:
        if self.mode == "cluster" or isinstance(layout, Sequence):
            return Sequence(num_out)
        h2, w2 = self._target(layout.h, layout.w)
        if isinstance(layout, Video):
            return Video(-(-layout.t // self.temporal), h2, w2)
        return Grid(h2, w2)
