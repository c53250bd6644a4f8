"""``sparsevlm``: SparseVLM v2 ("SparseVLM+"; Zhang et al., "SparseVLM: Visual Token Sparsification for Efficient
Vision-Language Model Inference", ICML 2025, arXiv:2410.04417). LLM side, progressive, text-guided.

1. **Raters** (once per prefill, from the layer-0 input embeddings E, no norm, no scale): with V the sample's visual
   tokens and Q its instruction tokens (text after the last image), s_t = mean_{v in V} softmax_{t in Q}(E_v . E_t);
   the raters are the t with s_t > mean(s) (all of Q when none is; the last token when Q is empty).
2. **Scores** at every cut: layer l's attention probabilities of the rater rows (re-projected from the input of l:
   input norm, q / k, RoPE), divided elementwise by the RoPE "gravity" G[m, n] = <RoPE_m(1), RoPE_n(1)> / sqrt(d)
   of the query and key positions; per head, the sum over raters x visual candidates; the ``heads`` heads with the
   largest sums are kept; score = mean over those heads and the raters.
3. **Schedule**: the official cut "after layers 2, 6, 15" is vtc's ``layers: [3, 7, 16]`` (the survivors enter
   these; the scores come from layer L - 1, whose KV cache keeps every token), and each keeps the top
   ``floor(keep[j] * n0)`` of every image. ``budget: 192 | 128 | 96 | 64`` selects the official v2 schedule
   (576 -> 300 / 200 / 118, 238 / 108 / 60, 246 / 54 / 28, 66 / 34 / 20 tokens, ``keep`` = count / 576); the
   budget names the *layer average* the official code prints, not a count per layer. Or give ``layers`` / ``keep``.
Defaults: the 192 schedule, ``heads: 14``. Survivors keep their original positions (as v2 does). v1 / v1.5
(rank-adaptive counts, recycling by DPC-kNN, renumbered positions) are not implemented.
Quirks: docs/methods/sparsevlm.md.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Literal

import torch
from pydantic import model_validator

from ..reduction import compact
from ..scoring import attention_probs
from . import register_method
from .base import LLMContext
from .schedule import ScheduledScorer, ScheduleState

__all__ = ["SparseVLM", "SCHEDULES", "rater_mask", "gravity"]

#: SparseVLM+ (v2.0) top-k per cut for 576 visual tokens, by RETAIN_TOKN (official ``score.py``)
SCHEDULES: Mapping[int, tuple[int, int, int]] = MappingProxyType(
    {192: (300, 200, 118), 128: (238, 108, 60), 96: (246, 54, 28), 64: (66, 34, 20)})
#: the official cuts: after (0-indexed) layers 2, 6, 15 = entering 3, 7, 16
PAPER_LAYERS: tuple[int, ...] = (3, 7, 16)
PAPER_TOKENS = 576


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


@dataclass
class SparseVLMState(ScheduleState):
    """Per-run state: the raters of the current prefill, by original sequence position."""

    raters: torch.Tensor | None = None  # (B, N) bool


@register_method("sparsevlm")
class SparseVLM(ScheduledScorer):
    """SparseVLM v2: rater-guided, gravity-corrected, head-selected attention scores on a fixed schedule."""


    method: Literal["sparsevlm"] = "sparsevlm"
    #: an official schedule by its name (the printed layer average for 576 visual tokens); sets ``keep``
    budget: Literal[192, 128, 96, 64] | None = None
    #: 0-indexed decoder layers the survivors enter (official: after 2, 6, 15)
    layers: tuple[int, ...] = PAPER_LAYERS
    #: fraction of each image's original visual tokens kept from each cut on (default: the 192 schedule)
    keep: tuple[float, ...] = tuple(c / PAPER_TOKENS for c in SCHEDULES[192])
    #: attention heads whose gravity-corrected rater attention to the visual tokens is largest (official: 14)
    heads: int = 14
    #: 2 = SparseVLM+ (the only one implemented)
    version: Literal[2] = 2

    @model_validator(mode="before")
    @classmethod
    def _schedule(cls, data):
        if isinstance(data, dict) and data.get("budget") in SCHEDULES:
            keep = tuple(c / PAPER_TOKENS for c in SCHEDULES[data["budget"]])
            if "keep" in data and tuple(data["keep"]) != keep:  # (a dumped config repeats the schedule's keep)
                raise ValueError("give budget (an official schedule: 192, 128, 96, 64) or keep, not both")
            data = dict(data, keep=keep)
        if isinstance(data, dict) and isinstance(data.get("heads"), int) and data["heads"] < 1:
            raise ValueError(f"heads must be >= 1, got {data['heads']}")
        return data

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

    def score(self, ctx: LLMContext) -> torch.Tensor:
        layer = ctx.layer_idx - 1
        src = ctx.captured[layer]
        raters = torch.gather(self._raters(ctx), 1, src.slot_positions) & src.token_valid  # (B, M)
        B, M = raters.shape
        rows, row_ok = compact(raters)  # (B, R) rater slots, one host sync per cut
        R = rows.shape[1]
        slots = torch.arange(M, device=raters.device).expand(B, M)
        q, k = src.adapter.project_qk(layer, src.hidden_states, src.position_embeddings, rows)
        allowed = (slots[:, None, :] <= rows[:, :, None]) & src.token_valid[:, None, :] & row_ok[:, :, None]
        probs = attention_probs(q, k, allowed, src.adapter.attention_scale(layer))  # (B, h, R, M)
        ones = torch.ones(B, 1, M, q.shape[-1], dtype=torch.float32, device=q.device)
        rope = src.adapter.rope_rows(ones, src.position_embeddings, None)[:, 0].float()  # (B, M, d)
        corrected = probs / gravity(rope, rows)[:, None]
        idx = ctx.candidates[:, None, None, :].expand(B, probs.shape[1], R, -1)
        cand = torch.gather(corrected, 3, idx)  # (B, h, R, n)
        ok = (row_ok[:, :, None] & ctx.candidate_valid[:, None, :])[:, None]  # (B, 1, R, n)
        cand = torch.where(ok, cand, torch.zeros_like(cand))
        top = min(self.heads, cand.shape[1])
        heads = torch.sort(cand.sum((2, 3)), dim=-1, descending=True, stable=True).indices[:, :top]  # (B, top)
        chosen = torch.gather(cand, 1, heads[:, :, None, None].expand(-1, -1, R, cand.shape[-1]))
        return chosen.sum((1, 2)) / (top * row_ok.sum(-1, keepdim=True).clamp(min=1))
