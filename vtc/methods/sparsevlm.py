"""``sparsevlm``: SparseVLM (Zhang et al., "SparseVLM: Visual Token Sparsification for Efficient Vision-Language
Model Inference", ICML 2025, arXiv:2410.04417), the three versions of the official code: ``version: 1`` (the
paper), ``1.5`` (the repository's default) and ``2`` ("SparseVLM+"; vtc's default, as before). LLM side, progressive.

1. **Raters** (once per prefill, from the layer-0 input embeddings E): s_t = mean_{v in V} softmax_{t in Q}(E_v . E_t)
   over the visual tokens V and the instruction tokens Q (text after the last image); raters: s_t > mean(s).
2. **Cuts**: the official cut "after layer l" enters l + 1 in vtc (``layers: [3, 7, 16]``, v1 ``[3, 7, 16, 20]``);
   the rater rows of layer l's attention are re-projected from its captured input (flash-compatible).
3. **Scores**: v1 / v1.5: mean over heads, then raters, of the rater x visual probabilities P. v2: P divided by the
   RoPE "gravity" G[m, n] = <RoPE_m(1), RoPE_n(1)> / sqrt(d); the ``heads`` heads with the largest sums; mean.
4. **Counts** per image. v1.5 / v2: the top ``floor(keep[j] * n0)``; ``budget: 192 | 128 | 96 | 64`` selects the
   version's official schedule for 576 tokens (:data:`SCHEDULES_V15`, :data:`SCHEDULES`; the budget is the layer
   average the official code prints). v1: rho = rank(P) per image (:func:`rank_counts`); nothing cut when rho = v,
   else the top min(int(rho * scale + bias), v - 1); the paper's settings are :data:`V1_SETTINGS` (MME "192":
   13.5 / 0, the default; POPE "128": 9 / 6; TextVQA "64": 0.8 / 0).
5. **Recycling** (v1, v1.5; :func:`recycle`): of an image's pruned tokens (states entering l + 1 = layer l's
   output), the m = int(0.3 * pruned) + 1 best-scored are clustered by DPC-kNN (:func:`dpc_knn`) into
   c = int(m / 10) + 1 merged tokens (means), candidates of the later cuts.
Positions (deviation from v1 / v1.5, which renumber contiguously and put the merged tokens after the kept ones):
survivors keep their original position ids (vtc's LLM-side rule, as v2); a merged token takes the slot and
position of its cluster centre, as PACT's merged tokens do. Deliberate fix: the official DPC-kNN density adds
U(0, 1) * 1e-6 noise (non-deterministic); vtc breaks density ties by the lower sequence position.
Quirks reproduced and fixed: docs/methods/sparsevlm.md.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Literal

import torch
from pydantic import field_validator, model_validator

from ..reduction import Reduction, compact, topk_per_group
from ..scoring import attention_probs
from . import register_method
from .base import LLMContext
from .pact import merge_clusters
from .schedule import ScheduledScorer, ScheduleState

__all__ = ["SparseVLM", "SCHEDULES", "SCHEDULES_V15", "V1_SETTINGS", "rater_mask", "gravity", "dpc_knn",
           "recycle", "rank_counts"]

#: SparseVLM+ (v2.0) top-k per cut for 576 visual tokens, by RETAIN_TOKN (official ``score.py``)
SCHEDULES: Mapping[int, tuple[int, int, int]] = MappingProxyType(
    {192: (300, 200, 118), 128: (238, 108, 60), 96: (246, 54, 28), 64: (66, 34, 20)})
#: v1.5 top-k per cut for 576 visual tokens, by RETAIN_TOKN (official ``score.py``, ``USE_VERSION=1_0``); the
#: recycled tokens come on top (576 -> 309 / 204 / 113 visual tokens for 192)
SCHEDULES_V15: Mapping[int, tuple[int, int, int]] = MappingProxyType(
    {192: (300, 200, 110), 128: (303, 110, 36), 96: (238, 48, 26), 64: (66, 30, 17)})
#: v1 (the paper): ``scale`` / ``bias`` of the official evaluation scripts, by benchmark ("label" = printed average)
V1_SETTINGS: Mapping[str, tuple[float, float]] = MappingProxyType(
    {"MME (192)": (13.5, 0.0), "POPE (128)": (9.0, 6.0), "TextVQA (64)": (0.8, 0.0)})
#: the official cuts: after (0-indexed) layers 2, 6, 15 (v1: and 19) = entering 3, 7, 16 (, 20)
PAPER_LAYERS: tuple[int, ...] = (3, 7, 16)
PAPER_LAYERS_V1: tuple[int, ...] = (3, 7, 16, 20)
PAPER_TOKENS = 576
#: recycling: share of an image's pruned tokens that is recycled (+ 1), tokens per cluster
RECYCLE_SHARE = 0.3
RECYCLE_PER_CLUSTER = 10
#: the official merge divides each cluster's sum by (count + 1e-6)
MERGE_EPS = 1e-6


def rater_mask(embeds: torch.Tensor, visual: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
    """(B, N) bool raters from the layer-0 inputs ``embeds`` (B, N, D) and ``visual`` / ``text`` (B, N) masks.

    s_t = mean over the visual tokens v of softmax over the text tokens t of E_v . E_t (no norm, no scale); raters:
    s_t > mean_t s_t (every text token when none is). Only the V x Q block is computed.
    """
    v_idx, v_ok = compact(visual)
    t_idx, t_ok = compact(text)
    e = embeds.float()
    ev = torch.gather(e, 1, v_idx[..., None].expand(-1, -1, e.shape[-1]))
    et = torch.gather(e, 1, t_idx[..., None].expand(-1, -1, e.shape[-1]))
    logits = torch.bmm(ev, et.transpose(1, 2)).masked_fill(~t_ok[:, None, :], float("-inf"))  # (B, nv, nq)
    probs = torch.nan_to_num(torch.softmax(logits, dim=-1), nan=0.0) * v_ok[..., None]
    s = probs.sum(1) / v_ok.sum(-1, keepdim=True).clamp(min=1)  # (B, nq)
    mean = torch.where(t_ok, s, torch.zeros_like(s)).sum(-1, keepdim=True) / t_ok.sum(-1, keepdim=True).clamp(min=1)
    pick = t_ok & (s > mean)
    pick = torch.where(pick.any(-1, keepdim=True), pick, t_ok)
    out = torch.zeros(text.shape[0], text.shape[1] + 1, dtype=torch.bool, device=text.device)
    out.scatter_(1, torch.where(t_ok, t_idx, torch.full_like(t_idx, text.shape[1])), pick)
    return out[:, :-1]


def gravity(rope: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """(B, R, M) G[m, n] = <RoPE_m(1), RoPE_n(1)> / sqrt(d) from ``rope`` (B, M, d), the rotary image of an all-ones
    head vector at every slot, for the query slots ``rows`` (B, R)."""
    rq = torch.gather(rope, 1, rows[..., None].expand(-1, -1, rope.shape[-1]))
    return torch.bmm(rq, rope.transpose(1, 2)) / rope.shape[-1] ** 0.5


def rank_counts(P: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor, scale: float, bias: float) -> torch.Tensor:
    """(U,) v1's token counts: k = v when rho = v (nothing cut), else min(int(rho * scale + bias), v - 1), 0 for
    empty units.

    P: (U, R, n) rater x candidate matrices, zero outside each unit's ``rows`` (U,) x ``cols`` (U,) valid block
    (zero rows / columns do not change the singular values); rho = the number of singular values above
    sigma_max * max(rows, cols) * eps(fp32), ``torch.linalg.matrix_rank``'s default tolerance for the unpadded
    matrix. All units in one batched SVD.
    """
    sv = torch.linalg.svdvals(P.float())  # (U, min(R, n)), descending
    tol = sv[:, :1] * torch.maximum(rows, cols).to(sv.dtype)[:, None] * torch.finfo(torch.float32).eps
    rho = (sv > tol).sum(-1)
    k = torch.floor(rho.double() * scale + bias).long().clamp(min=0)  # bias >= 0: int() == floor
    k = torch.where(rho >= cols, cols, torch.minimum(k, cols - 1))
    return torch.where(cols > 0, k, torch.zeros_like(k))


def dpc_knn(x: torch.Tensor, valid: torch.Tensor, clusters: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """DPC-kNN of the official ``cluster_and_merge`` on U padded point sets: (centre (U, m) bool, assign (U, m) long,
    the index of each point's centre, -1 for padding).

    x: (U, m, C); valid: (U, m); clusters: (U,) long c per set (1 <= c <= its point count). d = Euclidean / sqrt(C)
    (fp32); density = exp(-mean of the c smallest d^2 of a point, itself included); delta = distance to the nearest
    denser point (the set's largest distance for the densest); centres = the c largest delta * density; every point
    joins its nearest centre (a centre itself). Deliberate fix: the official density adds U(0, 1) * 1e-6 noise to
    separate equal densities (non-deterministic); here, of two equal densities the lower index counts as denser.
    Ties of delta * density and of the nearest centre go to the lower index.
    """
    U, m, C = x.shape
    xf = x.float()
    d = torch.cdist(xf, xf, compute_mode="donot_use_mm_for_euclid_dist") / C**0.5  # (U, m, m), exact zero diagonal
    pair = valid[:, :, None] & valid[:, None, :]
    inf = torch.tensor(float("inf"), device=x.device)
    near = torch.sort(torch.where(pair, d.square(), inf), dim=-1).values  # ascending, padding last
    first = torch.arange(m, device=x.device)[None, None, :] < clusters[:, None, None]
    density = torch.exp(-torch.where(first, near, 0.0).sum(-1) / clusters[:, None].clamp(min=1))  # (U, m)
    idx = torch.arange(m, device=x.device)
    denser = (density[:, None, :] > density[:, :, None]) | (
        (density[:, None, :] == density[:, :, None]) & (idx[None, None, :] < idx[None, :, None]))
    denser &= pair
    d_max = torch.where(pair, d, 0.0).flatten(1).max(-1).values[:, None, None]
    delta = torch.where(denser, d, d_max).min(-1).values  # (U, m)
    score = delta * density
    centre = topk_per_group(score, torch.where(valid, 0, -1), clusters[:, None])
    to_centre = torch.where(centre[:, None, :], d, inf)
    assign = to_centre.argmin(-1)  # first (lowest) index among equal minima
    assign = torch.where(centre, idx[None].expand(U, m), assign)
    return centre, torch.where(valid, assign, torch.full_like(assign, -1))


def recycle(ctx: LLMContext, scores: torch.Tensor, kept: torch.Tensor) -> Reduction:
    """The cut with v1 / v1.5's recycling: keep ``kept`` (B, n); of every image's pruned candidates, the
    m = int(0.3 * pruned) + 1 with the highest ``scores`` (B, n) are clustered by :func:`dpc_knn` into
    c = int(m / 10) + 1 tokens on their hidden states entering the layer, each the plain mean of its members
    (sum / (count + 1e-6), as officially; fp32, cast back), in the slot and position of its centre."""
    valid = ctx.candidate_valid
    B, n = valid.shape
    dev = valid.device
    counts = ctx.image_counts
    assert counts is not None
    G = counts.shape[1]
    image = torch.where(valid, ctx.image_id, -1)
    pruned = valid & ~kept
    lost = torch.zeros(B, G + 1, dtype=torch.long, device=dev).scatter_add_(
        1, torch.where(pruned, image, G), pruned.long())[:, :G]  # (B, G)
    m = torch.where(lost > 0, torch.floor(lost.double() * RECYCLE_SHARE).long() + 1, torch.zeros_like(lost))
    recycled = topk_per_group(scores, torch.where(pruned, image, -1), m)  # (B, n)
    if not bool(recycled.any()):  # one host sync: nothing pruned anywhere in the batch
        return Reduction.from_mask(kept & valid)
    # one point set per (row, image): U = B * G units, padded to the largest m
    unit_of = torch.arange(B, device=dev)[:, None] * G + image.clamp(min=0)  # (B, n)
    member = torch.zeros(B * G, n, dtype=torch.bool, device=dev)
    member[unit_of[recycled], recycled.nonzero()[:, 1]] = True
    u_idx, u_ok = compact(member)  # (U, mm) candidate index of each point
    u_row = torch.arange(B * G, device=dev) // G
    cand_h = torch.gather(ctx.hidden_states, 1, ctx.candidates[..., None].expand(-1, -1, ctx.hidden_states.shape[-1]))
    x = cand_h[u_row[:, None], u_idx]  # (U, mm, D)
    m_u = m.flatten()
    c_u = torch.where(m_u > 0, torch.floor(m_u.double() / RECYCLE_PER_CLUSTER).long() + 1, torch.ones_like(m_u))
    centre, assign = dpc_knn(x, u_ok, c_u)
    # merged states: plain mean of the members (fp32), at the centre
    U, mm, D = x.shape
    tgt = torch.where(u_ok, assign, mm)
    acc = torch.zeros(U, mm + 1, D, dtype=torch.float32, device=dev).scatter_add_(
        1, tgt[..., None].expand(-1, -1, D), x.float())[:, :mm]
    cnt = torch.zeros(U, mm + 1, dtype=torch.float32, device=dev).scatter_add_(1, tgt, u_ok.float())[:, :mm]
    merged = (acc / (cnt + MERGE_EPS)[..., None]).to(cand_h.dtype)
    # back to candidates: centre_of (B, n) = the candidate index of each token's output (-1: dropped)
    ar = torch.arange(n, device=dev).expand(B, n)
    centre_of = torch.where(kept & valid, ar, torch.full_like(ar, -1))
    flat = centre_of.clone().view(-1)
    row_off = (u_row * n)[:, None]
    members = u_ok.nonzero(as_tuple=True)
    flat[(row_off + u_idx)[members]] = torch.gather(u_idx, 1, assign.clamp(min=0))[members]
    centre_of = flat.view(B, n)
    feats = cand_h.clone()
    cen = centre.nonzero(as_tuple=True)
    feats.view(B * n, D)[(row_off + u_idx)[cen]] = merged[cen]
    red = merge_clusters(centre_of, valid, None, torch.gather(ctx.sizes, 1, ctx.candidates))
    red.features = torch.gather(feats, 1, red.anchor[..., None].expand(-1, -1, D)) * red.valid[..., None]
    return red


@dataclass
class SparseVLMState(ScheduleState):
    """Per-run state: the raters of the current prefill, by original sequence position."""

    raters: torch.Tensor | None = None  # (B, N) bool


def _finite(name: str, v, *, low: float, strict: bool):
    if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v) or v < low or (strict and v == low):
        raise ValueError(f"{name} must be a finite number {'>' if strict else '>='} {low:g}")
    return float(v)


@register_method("sparsevlm")
class SparseVLM(ScheduledScorer):
    """SparseVLM v1 / v1.5 / v2: rater-guided attention scores on the official cuts (module docstring)."""


    method: Literal["sparsevlm"] = "sparsevlm"
    #: v1.5 / v2: an official schedule by its name (the printed layer average for 576 visual tokens); sets ``keep``
    budget: Literal[192, 128, 96, 64] | None = None
    #: 0-indexed decoder layers the survivors enter (official: after 2, 6, 15; v1: and 19)
    layers: tuple[int, ...] | None = None
    #: v1.5 / v2: fraction of each image's original visual tokens kept from each cut on (default: the 192 schedule)
    keep: tuple[float, ...] | None = None
    #: v2: attention heads whose gravity-corrected rater attention to the visual tokens is largest (official: 14)
    heads: int | None = None
    #: v1: tokens kept per unit of rank of the rater x visual attention (default 13.5)
    scale: float | None = None
    #: v1: tokens added to rank * scale (default 0)
    bias: float | None = None
    #: 1 (the paper: rank-adaptive counts, recycling), 1.5 (the official default: fixed schedule, recycling) or
    #: 2 (SparseVLM+: gravity, head selection, no recycling)
    version: Literal[1, 1.5, 2] = 2

    @field_validator("version", mode="before")
    @classmethod
    def _check_version(cls, v):
        if isinstance(v, bool) or v not in (1, 1.5, 2):
            raise ValueError("must be one of 1, 1.5, 2 (the official SparseVLM versions)")
        return 1.5 if v == 1.5 else int(v)

    @model_validator(mode="before")
    @classmethod
    def _schedule(cls, data):
        if not isinstance(data, dict):
            return data
        version = data.get("version", 2)
        if isinstance(version, bool) or version not in (1, 1.5, 2):
            return data  # the field validator names the allowed values
        given = {k for k, v in data.items() if v is not None}
        only = {"heads": (2,), "scale": (1,), "bias": (1,), "budget": (1.5, 2), "keep": (1.5, 2)}
        for name, versions in only.items():
            if name in given and version not in versions:
                what = {"heads": "head selection is SparseVLM+'s", "scale": "the rank-adaptive count is v1's",
                        "bias": "the rank-adaptive count is v1's",
                        "budget": "v1's counts are rank-adaptive (scale, bias)",
                        "keep": "v1's counts are rank-adaptive (scale, bias)"}[name]
                allowed = " or ".join(str(v) for v in versions)
                raise ValueError(f"{name} is a version {allowed} parameter ({what}); not allowed with "
                                 f"version: {version}")
        data = dict(data)
        if data.get("layers") is None:
            data["layers"] = PAPER_LAYERS_V1 if version == 1 else PAPER_LAYERS
        if version == 1:
            if data.get("scale") is None:
                data["scale"] = 13.5
            if data.get("bias") is None:
                data["bias"] = 0.0
            return data
        table = SCHEDULES if version == 2 else SCHEDULES_V15
        if data.get("budget") in table:
            keep = tuple(c / PAPER_TOKENS for c in table[data["budget"]])
            if data.get("keep") is not None and tuple(data["keep"]) != keep:  # a dump repeats the schedule's keep
                raise ValueError("give budget (an official schedule: 192, 128, 96, 64) or keep, not both")
            data["keep"] = keep
        elif data.get("keep") is None and data.get("budget") is None:
            data["keep"] = tuple(c / PAPER_TOKENS for c in table[192])
        if version == 2:
            if data.get("heads") is None:
                data["heads"] = 14
            elif isinstance(data["heads"], int) and not isinstance(data["heads"], bool) and data["heads"] < 1:
                raise ValueError(f"heads must be >= 1, got {data['heads']}")
        return data

    @field_validator("scale", mode="before")
    @classmethod
    def _check_scale(cls, v):
        return None if v is None else _finite("scale", v, low=0.0, strict=True)

    @field_validator("bias", mode="before")
    @classmethod
    def _check_bias(cls, v):
        return None if v is None else _finite("bias", v, low=0.0, strict=False)

    def capture_layers(self) -> tuple[int, ...]:
        return tuple(sorted({0} | {layer - 1 for layer in self.layers}))

    def new_state(self) -> SparseVLMState:
        return SparseVLMState()

    def _raters(self, ctx: LLMContext) -> torch.Tensor:
        """(B, N) raters by original position, computed at the first cut of a prefill from layer 0's inputs."""
        state: SparseVLMState = ctx.state
        if self.layers.index(ctx.layer_idx) == 0 or state.raters is None:
            e = ctx.captured[0]
            text = e.instruction_mask()
            last = torch.arange(text.shape[1], device=text.device)[None] == e.last_token_slot()[:, None]
            text = torch.where(text.any(-1, keepdim=True), text, last)
            visual = torch.zeros_like(text).scatter_(1, e.candidates, e.candidate_valid)  # no image-newline tokens
            state.raters = rater_mask(e.hidden_states, visual, text)
        return state.raters

    def rater_probs(self, ctx: LLMContext) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
        """Layer (L - 1)'s attention probabilities of the rater rows: (probs (B, h, R, M), rater slots (B, R),
        valid rows (B, R), head dim)."""
        layer = ctx.layer_idx - 1
        src = ctx.captured[layer]
        raters = torch.gather(self._raters(ctx), 1, src.slot_positions) & src.token_valid  # (B, M)
        rows, row_ok = compact(raters)  # (B, R) rater slots, one host sync per cut
        M = raters.shape[1]
        slots = torch.arange(M, device=raters.device)
        q, k = src.adapter.project_qk(layer, src.hidden_states, src.position_embeddings, rows)
        allowed = (slots[None, None, :] <= rows[:, :, None]) & src.token_valid[:, None, :] & row_ok[:, :, None]
        return attention_probs(q, k, allowed, src.adapter.attention_scale(layer)), rows, row_ok, q.shape[-1]

    def _candidate_probs(self, ctx: LLMContext, probs: torch.Tensor, row_ok: torch.Tensor) -> torch.Tensor:
        """(B, h, R, n) the probabilities at the candidates, zero for padding rows / candidates."""
        B, h, R, _ = probs.shape
        cand = torch.gather(probs, 3, ctx.candidates[:, None, None, :].expand(B, h, R, -1))
        ok = (row_ok[:, :, None] & ctx.candidate_valid[:, None, :])[:, None]
        return torch.where(ok, cand, torch.zeros_like(cand))

    def _rater_matrix(self, ctx: LLMContext) -> tuple[torch.Tensor, torch.Tensor]:
        """v1 / v1.5: (P (B, R, n) head-mean rater x candidate probabilities, valid rater rows (B, R))."""
        probs, _, row_ok, _ = self.rater_probs(ctx)
        return self._candidate_probs(ctx, probs, row_ok).mean(1), row_ok

    def score(self, ctx: LLMContext) -> torch.Tensor:
        if self.version != 2:  # mean over heads, then over raters
            P, row_ok = self._rater_matrix(ctx)
            return P.sum(1) / row_ok.sum(-1, keepdim=True).clamp(min=1)
        probs, rows, row_ok, d = self.rater_probs(ctx)
        src = ctx.captured[ctx.layer_idx - 1]
        B, _, R, M = probs.shape
        ones = torch.ones(B, 1, M, d, dtype=torch.float32, device=probs.device)
        rope = src.adapter.rope_rows(ones, src.position_embeddings, None)[:, 0].float()  # (B, M, d)
        cand = self._candidate_probs(ctx, probs / gravity(rope, rows)[:, None], row_ok)  # (B, h, R, n)
        top = min(self.heads, cand.shape[1])
        heads = torch.sort(cand.sum((2, 3)), dim=-1, descending=True, stable=True).indices[:, :top]  # (B, top)
        chosen = torch.gather(cand, 1, heads[:, :, None, None].expand(-1, -1, R, cand.shape[-1]))
        return chosen.sum((1, 2)) / (top * row_ok.sum(-1, keepdim=True).clamp(min=1))

    def v1_counts(self, ctx: LLMContext, P: torch.Tensor, row_ok: torch.Tensor) -> torch.Tensor:
        """(B, G) v1's rank-adaptive counts per image (:func:`rank_counts`, every image of the batch in one SVD)."""
        counts = ctx.image_counts
        assert counts is not None
        B, G = counts.shape
        n = P.shape[-1]
        image = torch.where(ctx.candidate_valid, ctx.image_id, -1)
        cols = torch.zeros(B * G, n, dtype=torch.bool, device=P.device)  # (U, n) the unit's candidates
        unit = torch.arange(B, device=P.device)[:, None] * G + image.clamp(min=0)
        cols[unit[image >= 0], (image >= 0).nonzero()[:, 1]] = True
        c_idx, c_ok = compact(cols)  # (U, w)
        row = torch.arange(B * G, device=P.device) // G
        Pu = torch.gather(P[row], 2, c_idx[:, None, :].expand(-1, P.shape[1], -1)) * c_ok[:, None, :]
        k = rank_counts(Pu, row_ok.sum(-1)[row], c_ok.sum(-1), self.scale, self.bias)
        return k.view(B, G)

    def reduce_llm(self, ctx: LLMContext) -> Reduction:
        if self.version == 2:
            return super().reduce_llm(ctx)
        P, row_ok = self._rater_matrix(ctx)
        scores = P.sum(1) / row_ok.sum(-1, keepdim=True).clamp(min=1)
        k = self.v1_counts(ctx, P, row_ok) if self.version == 1 else self.keep_per_image(ctx)
        group = torch.where(ctx.candidate_valid, ctx.image_id, torch.full_like(ctx.image_id, -1))
        return recycle(ctx, scores, topk_per_group(scores, group, k))
