"""``fastv``: FastV (Chen et al., "An Image is Worth 1/2 Tokens After Layer 2", ECCV 2024, arXiv:2403.06764).
LLM side, one cut entering decoder layer L.

Score: the attention the **last prompt token** pays to each visual token in layer L-1, averaged over heads,
a_j = mean_h softmax_j(q_last,h . k_j,h / sqrt(d)) over all tokens j <= last (RoPE applied as the model does).
Keep the top k visual tokens of each image by a_j; prune before layer L. Defaults: L = 2, keep 50%.

Flash-compatible: q is re-projected for the single last row and k for all rows from layer L-1's input (its
input norm, q/k projections, rotary): one 1 x N row per head, never N x N, never ``output_attentions``.
``query: text`` averages the rows of all instruction tokens (text after the last image) instead, as later
papers do. Paper K / R to config, official quirks: docs/methods/fastv.md.
"""

from __future__ import annotations

from typing import Literal

import torch

from ..scoring import query_attention
from . import register_method
from .base import Budget, LLMContext, ReadsLayerBefore, ScorerMethod


def fastv_scores(ctx: LLMContext, query: str = "last") -> torch.Tensor:
    """(B, M) head-averaged attention from the query row(s) to every slot, at the captured layer L - 1."""
    return query_attention(ctx.captured[ctx.layer_idx - 1], ctx.layer_idx - 1, query)


@register_method("fastv")
class FastV(ReadsLayerBefore, ScorerMethod):
    """FastV: the attention layer L-1's last prompt token pays to each visual token, top k per image (LLM side)."""

    method: Literal["fastv"] = "fastv"
    budget: Budget = 0.5
    layer: int = 2
    query: Literal["last", "text"] = "last"

    def score(self, ctx: LLMContext) -> torch.Tensor:
        scores = fastv_scores(ctx, self.query)  # (B, M) over the slots entering L-1 == entering L
        return torch.gather(scores, 1, ctx.candidates)
