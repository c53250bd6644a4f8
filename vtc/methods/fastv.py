"""``fastv``: FastV (Chen et al., "An Image is Worth 1/2 Tokens After Layer 2", ECCV 2024).

Score: the attention the **last prompt token** pays to each visual token in layer L-1, averaged over heads,
a_j = mean_h softmax_j(q_last,h . k_j,h / sqrt(d)) over all tokens j <= last (RoPE applied as the model does).
Keep the top k visual tokens of each image by a_j; prune before layer L. Defaults: L = 2, keep 50%.

Flash-compatible: q is re-projected for the single last row and k for all rows from layer L-1's input (its
input norm, q/k projections, rotary): one 1 x N row per head, never N x N, never ``output_attentions``.
``query: text`` averages the rows of all instruction tokens (text after the last image) instead, as later
papers do.
"""

from __future__ import annotations

from typing import Literal

import torch

from ..reduction import Reduction, compact
from ..scoring import attention_from_rows
from . import register_method
from .base import Budget, LLMContext, Method


def fastv_scores(ctx: LLMContext, query: str = "last") -> torch.Tensor:
    """(B, M) head-averaged attention from the query row(s) to every slot, at the captured layer L - 1."""
    src = ctx.captured[ctx.layer_idx - 1]
    B, M = src.token_valid.shape
    dev = src.hidden_states.device
    last = src.last_token_slot()  # (B,)
    slots = torch.arange(M, device=dev)
    if query == "text":
        inst = src.instruction_mask()
        has = inst.any(-1)
        inst = torch.where(has[:, None], inst, slots[None] == last[:, None])  # fallback: last token
        rows, row_ok = compact(inst)
        rows = torch.where(row_ok, rows, last[:, None].expand_as(rows))
    else:
        rows = last[:, None]
        row_ok = torch.ones_like(rows, dtype=torch.bool)
    q, k = src.adapter.project_qk(ctx.layer_idx - 1, src.hidden_states, src.position_embeddings, rows)
    allowed = (slots[None, None, :] <= rows[:, :, None]) & src.token_valid[:, None, :] & row_ok[:, :, None]
    return attention_from_rows(q, k, allowed, src.adapter.attention_scale(ctx.layer_idx - 1))


@register_method("fastv")
class FastV(Method):
    sides = ("llm",)
    paper = "Chen et al., An Image is Worth 1/2 Tokens After Layer 2, ECCV 2024 (arXiv:2403.06764)"

    method: Literal["fastv"] = "fastv"
    budget: Budget = 0.5
    layer: int = 2
    query: Literal["last", "text"] = "last"

    def capture_layers(self) -> tuple[int, ...]:
        return (self.layer - 1,)

    def reduce_llm(self, ctx: LLMContext) -> Reduction:
        scores = fastv_scores(ctx, self.query)  # (B, M) over the slots entering L-1 == entering L
        cand_scores = torch.gather(scores, 1, ctx.candidates)
        return ctx.keep_top_per_image(cand_scores, self.budget)
