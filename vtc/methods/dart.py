"""``dart``: DART (Wen et al., "Stop Looking for Important Tokens in Multimodal Language Models: Duplication
Matters More", 2025, arXiv:2502.11494). LLM side, one cut entering decoder layer L (default 2).

Pivots, then duplication: at the cut,
1. a_i = ||k_i||_1, the L1 norm of token i's post-RoPE keys of layer L-1 (all KV heads; re-projected from the
   captured input of layer L-1, no attention needed; positions relative to the row's first real token). Image
   pivots: the top ``pivots_image`` visual tokens of every image by a; text pivots: the top ``pivots_text`` of the
   instruction tokens (real text after the last visual token) by a.
2. x_i = FinalNorm(h_i): the hidden states entering layer L through the LM's *final* norm.
3. Visiting the pivots of an image in ascending position order (its image pivots, then the sample's text
   pivots), each pivot p claims the m remaining visual tokens of that image least similar to it (smallest
   cos(x_p, x_j)), which leave the pool. Kept: the image pivots and every claimed token, in original order.

Budget (exact): ``budget`` k tokens per image = the image pivots + the claims; the k - pivots_image claims are
split evenly over the P pivots, the first (k - pivots_image) mod P pivots taking one more. The official code keeps
p_img + P * (B // P) for its ``max_num_trunction`` B: ``budget: k`` with k = 4 + 8 * m gives exactly the official
selection (the paper's "128 tokens" on LLaVA-1.5 is ``budget: 132``; 64 -> 68, 192 -> 196).
Quirks reproduced and fixed, family notes: docs/methods/dart.md.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field

from ..reduction import Reduction, compact, topk_per_group
from . import register_method
from .base import Budget, LLMContext, Method, ReadsLayerBefore

__all__ = ["DART", "dart_select", "key_norms"]


def key_norms(src: LLMContext, layer: int) -> torch.Tensor:
    """(B, M) L1 norm over all KV heads of the post-RoPE keys of decoder layer ``layer`` (from ``src``'s input).

    The L1 norm is not rotation invariant, so the keys are rotated to positions relative to each row's first real
    token (the model's own positions whenever they start at 0: always in ``generate`` and without padding), which
    makes a left-padded plain forward give what each sample gives alone.
    """
    rows = src.last_token_slot()[:, None]  # the query row is not used; keys of every slot are
    _, k = src.adapter.project_qk(layer, src.hidden_states, src.position_embeddings, rows)
    first = src.token_valid.float().argmax(-1)  # (B,)
    cos0, sin0 = (_row_at(t, first) for t in src.position_embeddings)
    k = src.adapter.rope_rows(k, (cos0, -sin0), None)  # rotate back by the first real token's angles
    return k.float().abs().sum(dim=(1, 3))


def _row_at(t: torch.Tensor, slot: torch.Tensor) -> torch.Tensor:
    """A rotary table (..., B|1, M, d) whose every slot holds the row's entry at ``slot`` (B,)."""
    *lead, _, M, d = t.shape
    B = slot.shape[0]
    t = t.expand(*lead, B, M, d)
    idx = slot.view(*([1] * len(lead)), B, 1, 1).expand(*lead, B, 1, d)
    return torch.gather(t, -2, idx).expand(*lead, B, M, d)


def _rank_in_group(mask: torch.Tensor, group: torch.Tensor, num_groups: int) -> torch.Tensor:
    """(B, n) 0-based rank of every True entry of ``mask`` among the True entries of its group, in index order."""
    onehot = torch.nn.functional.one_hot(group.clamp(min=0), num_groups) * mask[..., None]  # (B, n, G)
    rank = onehot.cumsum(1).gather(2, group.clamp(min=0)[..., None]).squeeze(-1) - 1
    return torch.where(mask, rank, torch.zeros_like(rank))


def dart_select(key_l1: torch.Tensor, hidden: torch.Tensor, candidates: torch.Tensor, candidate_valid: torch.Tensor,
                image_id: torch.Tensor, text: torch.Tensor, k: torch.Tensor, pivots_image: int,
                pivots_text: int) -> torch.Tensor:
    """DART's selection: (B, n) bool keep mask over the candidates.

    key_l1: (B, M) pivot scores of every slot; hidden: (B, M, D) the similarity space (final-normed);
    candidates (B, n) slots of the visual candidates, candidate_valid (B, n), image_id (B, n) in [0, G) (-1:
    padding); text: (B, M) bool, the slots text pivots are chosen from; k: (B, G) tokens to keep per image.
    """
    B, n = candidates.shape
    G = k.shape[1]
    dev = candidates.device
    group = torch.where(candidate_valid, image_id, torch.full_like(image_id, -1))
    counts = torch.zeros(B, G, dtype=torch.long, device=dev).scatter_add_(1, group.clamp(min=0),
                                                                          candidate_valid.long())
    k = torch.minimum(k, counts)
    p_img = torch.clamp(k, max=pivots_image)  # (B, G)
    score = torch.gather(key_l1, 1, candidates)
    pivot = topk_per_group(score, group, p_img)  # (B, n) image pivots
    # text pivots: the top pivots_text text slots by key norm, then in position order
    t_mask = topk_per_group(key_l1, torch.where(text, 0, -1), torch.full((B, 1), pivots_text, device=dev))
    t_slots, t_ok = compact(t_mask)  # (B, n_txt) in position order; one host sync
    n_txt = t_slots.shape[1] if pivots_text > 0 and bool(t_ok.any()) else 0
    t_slots, t_ok = t_slots[:, :n_txt], t_ok[:, :n_txt]
    # pivot table (B, G, P): image pivots of each image in position order, then the sample's text pivots
    P = pivots_image + n_txt
    table = torch.zeros(B, G, P + 1, dtype=torch.long, device=dev)
    ok = torch.zeros(B, G, P + 1, dtype=torch.bool, device=dev)
    rank = _rank_in_group(pivot, group, G)
    at = torch.where(pivot, group.clamp(min=0) * (P + 1) + rank, torch.full_like(rank, G * (P + 1) - 1))
    table.view(B, -1).scatter_(1, at, torch.where(pivot, candidates, torch.zeros_like(candidates)))
    ok.view(B, -1).scatter_(1, at, pivot)
    if n_txt:
        pos = p_img[:, :, None] + torch.arange(n_txt, device=dev)  # (B, G, n_txt)
        table.scatter_(2, pos, t_slots[:, None, :].expand(B, G, n_txt))
        ok.scatter_(2, pos, t_ok[:, None, :].expand(B, G, n_txt))
    table, ok = table[..., :P], ok[..., :P]
    # claims per pivot: the k - p_img claims split evenly, the first (claims mod pivots) take one more
    n_piv = ok.sum(-1)  # (B, G)
    claims = k - p_img
    m = torch.where(n_piv > 0, claims // n_piv.clamp(min=1), torch.zeros_like(claims))
    r = torch.where(n_piv > 0, claims % n_piv.clamp(min=1), torch.zeros_like(claims))
    h = hidden.float()
    norms = torch.linalg.vector_norm(h, dim=-1)  # (B, M)
    cand_h = torch.gather(h, 1, candidates[..., None].expand(-1, -1, h.shape[-1]))  # (B, n, D)
    cand_norm = torch.gather(norms, 1, candidates)
    img = image_id.clamp(min=0)
    kept = pivot.clone()
    remaining = candidate_valid & ~pivot
    for t in range(P):  # one step per pivot (at most pivots_image + pivots_text), vectorised over rows and images
        p_slot = table[..., t]  # (B, G)
        p_h = torch.gather(h, 1, p_slot[..., None].expand(-1, -1, h.shape[-1]))  # (B, G, D)
        p_norm = torch.gather(norms, 1, p_slot)
        own_h = torch.gather(p_h, 1, img[..., None].expand(-1, -1, h.shape[-1]))  # (B, n, D): the pivot of j's image
        own_norm = torch.gather(p_norm, 1, img)
        cos = (cand_h * own_h).sum(-1) / (cand_norm * own_norm).clamp(min=1e-8)
        take = torch.where(ok[..., t], m + (t < r).long(), torch.zeros_like(m))
        pick = topk_per_group(-cos, torch.where(remaining, image_id, torch.full_like(image_id, -1)), take)
        kept |= pick
        remaining &= ~pick
    return kept & candidate_valid


@register_method("dart")
class DART(ReadsLayerBefore, Method):
    """DART: image and text pivots by key norm, each claiming its least similar visual tokens (LLM side)."""

    method: Literal["dart"] = "dart"
    #: 0-indexed decoder layer the survivors enter; pivots come from layer L-1's keys
    layer: int = 2
    #: visual tokens kept per image (pivots included); 132 = the official LLaVA-1.5 "128" setting
    budget: Budget = 132
    #: pivots per image (>= 1: every image needs one) and from the text (>= 0), by key norm
    pivots_image: int = Field(4, ge=1)
    pivots_text: int = Field(4, ge=0)

    def reduce_llm(self, ctx: LLMContext) -> Reduction:
        key_l1 = key_norms(ctx.captured[self.layer - 1], self.layer - 1)
        hidden = ctx.adapter.final_norm(ctx.hidden_states)
        kept = dart_select(key_l1, hidden, ctx.candidates, ctx.candidate_valid, ctx.image_id,
                           ctx.instruction_mask(), ctx.budget_per_image(self.budget), self.pivots_image,
                           self.pivots_text)
        return Reduction.from_mask(kept)
