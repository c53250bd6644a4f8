"""``pact``: PACT (Dhouib et al., "PACT: Pruning and Clustering-Based Token Reduction for Faster Visual Language
Models", CVPR 2025, arXiv:2504.08966). LLM side: prune unimportant visual tokens, cluster the rest, merge clusters.

At decoder layer L (``layer``, default 4) during prefill, from the hidden states H entering layer L, with layer L's
own input norm and q / k projections:

1. **EUTI**, no RoPE: P = the real tokens up to the last visual token; q̄_h = mean_{i∈P} Q_{i,h} (one row);
   s_j = mean_h softmax_{j∈P}(q̄_h · K_{j,h} · scale) · ‖H_j‖₂ (fp32). Keep the top ⌊keep · n⌋ visual tokens of
   every image (``scope: sample``: of the sample), ties by lower index.
2. **DBDPC** on the kept tokens: D_ij = max(0, 1 - ẑ_i · ẑ_j) on the L2-normalised post-RoPE keys of layer L
   (flattened over KV heads); density ρ_i = Σ_j exp(-(D_ij / 2)²); in decreasing density a point is a centre iff
   it is farther than ``cutoff`` from every centre so far (computed in exact vectorised rounds); the others join
   their nearest centre. ``scope: image`` (default): clusters never span two image units.
3. **Retrieval**: a pruned token joins its nearest centre if within ``coef_pruned · cutoff``, else it is dropped.
4. **Merge**: each cluster becomes one token in its centre's slot and position: the size-weighted mean of its
   members' H (``merge: mean``) or the centre's own H (``merge: centre``). Text and newline tokens are untouched.
5. **Proportional attention** (``proportional: true``): every layer >= L adds log s_j (cluster size) to the logits
   of key j, in prefill and decoding (sdpa / eager; flash_attention_2 is refused with a ConfigError).

Modes: ``pact`` (1-4), ``euti`` (pruning only, exactly ⌊keep · n⌋ per image), ``dbdpc`` (clustering only). The
``pact`` / ``dbdpc`` count is content-adaptive (``run.stats`` reports it). Defaults (official code): LLaVA family
keep 0.55, cutoff 0.21; Qwen2-VL keep 0.80, cutoff 0.10; L = 4; ``coef_pruned: 1.5``.
The rounds' proof, cost and memory, host syncs, backends: docs/methods/pact.md.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import field_validator

from ..errors import ConfigError
from ..reduction import Reduction, compact, resolve_budget, topk_per_group
from ..scoring import attention_probs
from . import register_method
from .base import LLMContext, ScorerMethod

__all__ = [
    "PACT",
    "euti_prefix_mask",
    "euti_scores",
    "cosine_distances",
    "dbdpc_density_rank",
    "dbdpc_centres",
    "dbdpc",
    "nearest_centre",
    "compact",
    "merge_clusters",
]


# ---- EUTI ------------------------------------------------------------------------------------------------------
def euti_prefix_mask(token_valid: torch.Tensor, is_visual: torch.Tensor) -> torch.Tensor:
    """(B, M) bool: P, the real tokens from the first slot up to (and including) the last visual token."""
    B, M = token_valid.shape
    idx = torch.arange(M, device=token_valid.device).expand(B, M)
    last_vis = torch.where(is_visual & token_valid, idx, torch.full_like(idx, -1)).max(-1).values
    return token_valid & (idx <= last_vis[:, None])


def euti_scores(
    hidden: torch.Tensor, q_mean: torch.Tensor, keys: torch.Tensor, prefix: torch.Tensor, scale: float
) -> torch.Tensor:
    """EUTI importance s_j = mean_h softmax_{j∈P}(q̄_h · K_{j,h} · scale) · ‖H_j‖₂, for every slot: (B, M) fp32.

    hidden: (B, M, D) raw hidden states (for the norm); q_mean: (B, h, 1, d) the mean query (no RoPE);
    keys: (B, h_kv, M, d) keys without RoPE (GQA: h a multiple of h_kv, keys shared); prefix: (B, M) bool P.
    Slots outside P score 0.
    """
    probs = attention_probs(q_mean, keys, prefix[:, None, :], scale)  # (B, h, 1, M), fp32
    g = probs.mean(dim=1)[:, 0]  # (B, M)
    return g * torch.linalg.vector_norm(hidden, dim=-1, dtype=torch.float32)


# ---- DBDPC -----------------------------------------------------------------------------------------------------
def cosine_distances(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """D_ij = max(0, 1 - â_i · b̂_j) in fp32. a: (B, m, F), b: (B, r, F) -> (B, m, r) (one allocation)."""
    a = F.normalize(a.float(), dim=-1)
    b = F.normalize(b.float(), dim=-1)
    return torch.bmm(a, b.transpose(1, 2)).neg_().add_(1.0).clamp_(min=0.0)


def dbdpc_density_rank(dist: torch.Tensor, valid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Densities ρ_i = Σ_j exp(-(D_ij / 2)²) over valid j, and their rank (0 = densest).

    dist: (B, m, m) with +inf for pairs that must not interact; valid: (B, m). Equal densities: the lower index
    counts as denser (stable sort). Invalid points rank last. Returns (rho (B, m) fp32, rank (B, m) long).
    """
    B, m = valid.shape
    t = dist * 0.5  # the one m x m temporary; exp(-inf) = 0 for masked pairs
    rho = t.square_().neg_().exp_().sum(-1)
    del t
    key = torch.where(valid, rho, torch.full_like(rho, float("-inf")))
    order = torch.sort(key, dim=-1, descending=True, stable=True).indices
    rank = torch.empty_like(order)
    rank.scatter_(1, order, torch.arange(m, device=dist.device).expand(B, m))
    return rho, rank


def dbdpc_centres(
    dist: torch.Tensor, valid: torch.Tensor, rank: torch.Tensor, cutoff: float
) -> tuple[torch.Tensor, int]:
    """Greedy DBDPC centres, in vectorised rounds. Returns (centre mask (B, m), number of rounds).

    Sequential definition: visit points in increasing ``rank`` (decreasing density); a point becomes a centre iff
    its distance to every centre chosen so far is > ``cutoff``.

    Rounds (exactly equivalent): keep the set U of undecided points (initially all valid ones). In a round,
    every u ∈ U with no denser point of U within ``cutoff`` becomes a centre (nothing that could make it a
    non-centre precedes it: denser points outside U are centres — which would have covered u — or non-centres);
    then every point of U within ``cutoff`` of a new centre is a non-centre (that centre is denser than it,
    otherwise the centre would have been blocked). The densest point of U is always a new centre, so U shrinks
    every round. One host sync per round (the emptiness test). Memory: two (B, m, m) bool matrices plus one
    bool temporary per round.
    """
    close = dist <= cutoff  # (B, m, m) bool; +inf pairs are never close
    close &= valid[:, None, :]
    close &= valid[:, :, None]
    blocker = rank[:, None, :] < rank[:, :, None]  # [b, i, j]: j is denser than i ...
    blocker &= close  # ... and within cutoff of i
    undecided = valid.clone()
    centre = torch.zeros_like(valid)
    rounds = 0
    while bool(undecided.any()):
        new = undecided & ~(blocker & undecided[:, None, :]).any(-1)
        centre |= new
        undecided &= ~(new | (close & new[:, None, :]).any(-1))
        rounds += 1
    return centre, rounds


def nearest_centre(dist: torch.Tensor, centre: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Nearest centre of every row point: (column index (B, r), distance (B, r)); ties: lower index.

    dist: (B, r, c) from r points to c columns; centre: (B, c) which columns are (valid) centres. The distance is
    +inf (index 0) where no centre is reachable.
    """
    d = dist.masked_fill(~centre[:, None, :], float("inf"))
    best, idx = d.min(dim=-1)  # torch returns the first (lowest) index among equal minima
    return idx, best


def dbdpc(
    dist: torch.Tensor, valid: torch.Tensor, cutoff: float
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """DBDPC on one padded batch of point sets.

    dist: (B, m, m) cosine distances, +inf for pairs that must not interact (padding, different images); its
    diagonal is set to 0 in place (a point is at distance 0 of itself; 1 - |ẑ|² can round to ~1e-7). valid:
    (B, m). Returns (centre (B, m) bool, assign (B, m) long: index of each point's centre, -1 for invalid
    points, rounds). Peak memory ~ 8 bytes · B · m² on top of ``dist`` (4 bytes · B · m²).
    """
    dist.diagonal(dim1=1, dim2=2).zero_()
    _, rank = dbdpc_density_rank(dist, valid)
    centre, rounds = dbdpc_centres(dist, valid, rank, cutoff)
    c_idx, c_valid = compact(centre)  # (B, c) centres in index order
    B, m = valid.shape
    to_centres = torch.gather(dist, 2, c_idx[:, None, :].expand(B, m, c_idx.shape[1]))  # (B, m, c)
    near, _ = nearest_centre(to_centres, c_valid)
    assign = torch.gather(c_idx, 1, near)
    return centre, torch.where(valid, assign, torch.full_like(assign, -1)), rounds


# ---- merge -----------------------------------------------------------------------------------------------------
def merge_clusters(
    centre_of: torch.Tensor, valid: torch.Tensor, features: torch.Tensor | None, sizes: torch.Tensor
) -> Reduction:
    """Turn a cluster assignment into a :class:`Reduction` (one output per cluster, in the centre's slot).

    centre_of: (B, n) long, the candidate index of each candidate's cluster centre (a centre points to itself),
    -1 for dropped candidates. valid: (B, n). features: (B, n, D) candidate hidden states to average (size-
    weighted mean, fp32 accumulation, cast back), or None to keep the centres' own states (``merge: centre``).
    sizes: (B, n) current token sizes. Output order: centres by candidate index.
    """
    B, n = centre_of.shape
    dev = centre_of.device
    ar = torch.arange(n, device=dev).expand(B, n)
    is_centre = (centre_of == ar) & valid
    anchor, out_valid = compact(is_centre)  # (B, k)
    k = anchor.shape[1]
    slot_of = torch.cumsum(is_centre.long(), dim=-1) - 1  # output slot of every centre
    member = valid & (centre_of >= 0)
    source = torch.where(member, torch.gather(slot_of, 1, centre_of.clamp(min=0)), torch.full_like(centre_of, -1))
    tgt = torch.where(member, source, torch.full_like(source, k))  # dropped -> dummy column k
    w = torch.where(member, sizes.float(), torch.zeros_like(sizes, dtype=torch.float32))
    out_sizes = torch.zeros(B, k + 1, dtype=torch.float32, device=dev).scatter_add_(1, tgt, w)[:, :k]
    feats = None
    if features is not None:
        D = features.shape[-1]
        flat = (tgt + torch.arange(B, device=dev)[:, None] * (k + 1)).flatten()  # (B * n) rows of (B * (k+1))
        acc = torch.zeros(B * (k + 1), D, dtype=torch.float32, device=dev)
        acc.index_add_(0, flat, (features.float() * w.unsqueeze(-1)).view(B * n, D))
        feats = (acc.view(B, k + 1, D)[:, :k] / out_sizes.clamp(min=1e-12).unsqueeze(-1)).to(features.dtype)
        feats = feats * out_valid.unsqueeze(-1).to(feats.dtype)
    return Reduction(anchor=anchor, valid=out_valid, source=source, features=feats, sizes=out_sizes)


def _take_rows(t: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """t[b, idx[b]] for t (B, M, ...) and idx (B, r) -> (B, r, ...) (advanced indexing: faster than an expanded
    ``gather`` for wide rows on CPU)."""
    return t[torch.arange(t.shape[0], device=t.device)[:, None], idx]


# ---- the method ------------------------------------------------------------------------------------------------
@register_method("pact")
class PACT(ScorerMethod):
    """PACT: EUTI pruning + DBDPC clustering + merging with proportional attention (LLM side, one layer)."""

    sides = ("llm",)

    method: Literal["pact"] = "pact"
    #: decoder layer L (0-indexed) whose input is reduced; layers < L see every token
    layer: int = 4
    #: EUTI keep fraction in (0, 1]: ⌊keep · n⌋ visual tokens per image survive the pruning step
    keep: float = 0.55
    #: DBDPC cutoff distance d_c (cosine distance of post-RoPE keys), > 0
    cutoff: float = 0.21
    #: retrieval radius of EUTI-pruned tokens, as a multiple of cutoff (>= 0)
    coef_pruned: float = 1.5
    #: add log(cluster size) to the attention logits of merged keys in layers >= L
    proportional: bool = True
    merge: Literal["mean", "centre"] = "mean"
    mode: Literal["pact", "euti", "dbdpc"] = "pact"
    #: what a keep fraction and a cluster apply to: every image unit (image / crop set / video frame, as the
    #: adapter numbers them) separately, or all visual tokens of a sample together (clusters may then span
    #: images or video frames, as in the official code's single visual block)
    scope: Literal["image", "sample"] = "image"

    @field_validator("keep", mode="before")
    @classmethod
    def _check_keep(cls, v):
        if isinstance(v, bool) or not isinstance(v, int | float) or math.isnan(v) or not (0.0 < v <= 1.0):
            raise ValueError(f"keep must be a fraction in (0, 1], got {v!r}")
        return float(v)

    @field_validator("cutoff", mode="before")
    @classmethod
    def _check_cutoff(cls, v):
        if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v) or v <= 0:
            raise ValueError(f"cutoff must be a finite distance > 0 (cosine distance, in (0, 2]), got {v!r}")
        return float(v)

    @field_validator("coef_pruned", mode="before")
    @classmethod
    def _check_coef(cls, v):
        if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v) or v < 0:
            raise ValueError(f"coef_pruned must be a finite number >= 0, got {v!r}")
        return float(v)

    def attach(self, run, state) -> list:
        impl = run.adapter.attn_implementation()
        if self.proportional and self.mode != "euti" and "flash" in str(impl):
            raise ConfigError(
                f"pact: proportional=true needs an additive attention bias, which attn_implementation={impl!r} "
                "cannot take (allowed: 'sdpa', 'eager'); load the model with attn_implementation='sdpa' or set "
                "proportional: false"
            )
        return []

    # ---- maths on the context -------------------------------------------------------------------------------
    def _project(self, ctx: LLMContext, with_query: bool) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor]:
        """Layer-L projections without RoPE: (mean query (B, h, 1, d) or None, keys (B, h_kv, M, d), P (B, M))."""
        L = ctx.layer_idx
        h = ctx.hidden_states
        prefix = euti_prefix_mask(ctx.token_valid, ctx.is_visual)  # (B, M)
        if with_query:
            normed = ctx.adapter.input_norm(L, h)  # (B, M, D)
            count = prefix.sum(-1).clamp(min=1).to(normed.dtype)[:, None, None]
            query = torch.bmm(prefix.to(normed.dtype)[:, None, :], normed) / count  # (B, 1, D) mean over P
        else:
            query = h[:, :1]  # unused (the keys are what is needed)
        q, k = ctx.adapter.project_qk(L, h, None, None, query_states=query, rope=False)
        return (q if with_query else None), k, prefix

    def euti(self, ctx: LLMContext, q_mean: torch.Tensor, keys: torch.Tensor, prefix: torch.Tensor) -> torch.Tensor:
        """(B, n) EUTI scores of the candidates (0 for padding)."""
        scores = euti_scores(ctx.hidden_states, q_mean, keys, prefix, ctx.adapter.attention_scale(ctx.layer_idx))
        return torch.gather(scores, 1, ctx.candidates) * ctx.candidate_valid

    def cluster_keys(self, ctx: LLMContext, keys: torch.Tensor, cand_idx: torch.Tensor) -> torch.Tensor:
        """(B, r, h_kv * d) post-RoPE keys of the candidates ``cand_idx`` (B, r), from pre-RoPE keys (B, h_kv, M, d).

        RoPE is applied by the adapter (M-RoPE for Qwen2-VL) to these rows only, at their own positions.
        """
        slots = torch.gather(ctx.candidates, 1, cand_idx)  # (B, r)
        B, hkv, _, d = keys.shape
        kr = _take_rows(keys.transpose(1, 2), slots).transpose(1, 2)  # (B, h_kv, r, d)
        kr = ctx.adapter.rope_rows(kr, ctx.position_embeddings, slots)
        return kr.transpose(1, 2).reshape(B, slots.shape[1], hkv * d)

    def score(self, ctx: LLMContext) -> torch.Tensor:
        """(B, n) EUTI scores of the candidates (``mode: euti`` is this score with the base class's top-k)."""
        q_mean, keys, prefix = self._project(ctx, with_query=True)
        return self.euti(ctx, q_mean, keys, prefix)

    def keep_per_image(self, ctx: LLMContext) -> torch.Tensor:
        return ctx.budget_per_image(self.keep, what="keep")

    def keep_mask(self, ctx: LLMContext, scores: torch.Tensor) -> torch.Tensor:
        if self.scope == "image":
            return super().keep_mask(ctx, scores)
        valid = ctx.candidate_valid
        counts = valid.sum(-1).tolist()  # one host sync
        ks = [resolve_budget(self.keep, c, what="keep") for c in counts]
        group = torch.where(valid, 0, -1)
        return topk_per_group(scores, group, torch.tensor(ks, device=valid.device)[:, None])

    def reduce_llm(self, ctx: LLMContext) -> Reduction:
        if self.mode == "euti":
            return super().reduce_llm(ctx)
        q_mean, keys, prefix = self._project(ctx, with_query=self.mode != "dbdpc")
        if self.mode == "dbdpc":
            kept = ctx.candidate_valid
        else:
            kept = self.keep_mask(ctx, self.euti(ctx, q_mean, keys, prefix))
        red = self._cluster(ctx, keys, kept)
        red.proportional = self.proportional
        return red

    def _cluster(self, ctx: LLMContext, keys: torch.Tensor, kept: torch.Tensor) -> Reduction:
        """DBDPC on the kept candidates (B, n) bool, retrieval of the pruned ones, merge."""
        valid = ctx.candidate_valid
        B, n = valid.shape
        inf = float("inf")
        image = torch.where(valid, ctx.image_id if self.scope == "image" else 0, -1)  # clusters stay inside
        k_idx, k_valid = compact(kept & valid)  # (B, m) kept candidates, padded
        zk = self.cluster_keys(ctx, keys, k_idx)
        img_k = torch.gather(image, 1, k_idx)
        pair = k_valid[:, :, None] & k_valid[:, None, :] & (img_k[:, :, None] == img_k[:, None, :])
        dist = cosine_distances(zk, zk).masked_fill_(~pair, inf)  # (B, m, m): the only m x m matrices
        del pair
        centre, assign, _ = dbdpc(dist, k_valid, self.cutoff)
        # centre_of[b, c]: candidate index of candidate c's centre (-1: dropped); column n is a dummy target
        centre_of = torch.full((B, n + 1), -1, dtype=torch.long, device=valid.device)
        k_centre = torch.where(k_valid, torch.gather(k_idx, 1, assign.clamp(min=0)), torch.full_like(k_idx, -1))
        centre_of.scatter_(1, torch.where(k_valid, k_idx, torch.full_like(k_idx, n)), k_centre)
        pruned = valid & ~kept
        if self.mode == "pact" and bool(pruned.any()):
            c_idx, c_valid = compact(centre)  # (B, c) centres (indices into the kept list)
            zc = torch.gather(zk, 1, c_idx[:, :, None].expand(-1, -1, zk.shape[-1]))
            img_c = torch.gather(img_k, 1, c_idx)
            p_idx, p_valid = compact(pruned)  # (B, p)
            zp = self.cluster_keys(ctx, keys, p_idx)
            img_p = torch.gather(image, 1, p_idx)
            dpc = cosine_distances(zp, zc).masked_fill_(img_p[:, :, None] != img_c[:, None, :], inf)  # (B, p, c)
            near, dmin = nearest_centre(dpc, c_valid)
            join = p_valid & (dmin <= self.coef_pruned * self.cutoff)
            p_centre = torch.gather(k_idx, 1, torch.gather(c_idx, 1, near))
            p_centre = torch.where(join, p_centre, torch.full_like(p_idx, -1))
            centre_of.scatter_(1, torch.where(p_valid, p_idx, torch.full_like(p_idx, n)), p_centre)
        cand_sizes = torch.gather(ctx.sizes, 1, ctx.candidates)
        feats = _take_rows(ctx.hidden_states, ctx.candidates) if self.merge == "mean" else None
        red = merge_clusters(centre_of[:, :n], valid, feats, cand_sizes)
        if not bool((red.sizes[red.valid] != 1).any()):
            # nothing merged anywhere in the batch: no bias needed (sdpa keeps its mask-free fast path)
            red.sizes = None
        return red
