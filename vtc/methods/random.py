"""``random``: a uniformly random subset of k visual tokens per image, kept in original order.

The honest baseline every token-reduction paper should beat. Seeded: a ``torch.Generator`` seeded with the
stage's ``seed`` (or the config's). Vision side (per image / crop / frame unit) or LLM side (``layer`` set).
"""

from __future__ import annotations

from typing import Literal

import torch

from ..reduction import Reduction, resolve_budget
from . import register_method
from .base import Budget, LLMContext, Method, VisionContext


@register_method("random")
class RandomPrune(Method):
    sides = ("vision", "llm")
    paper = "baseline"

    method: Literal["random"] = "random"
    budget: Budget
    layer: int | None = None
    seed: int | None = None

    def _generator(self, g: torch.Generator | None, device) -> torch.Generator | None:
        if self.seed is None:
            return g
        return torch.Generator(device=device).manual_seed(self.seed)

    def reduce_vision(self, ctx: VisionContext) -> Reduction:
        U, n = ctx.features.shape[:2]
        k = resolve_budget(self.budget, n)
        gen = self._generator(ctx.generator, ctx.features.device)
        scores = torch.rand(U, n, generator=gen, device=ctx.features.device)
        keep = scores.topk(k, dim=-1).indices
        return Reduction.select(keep, n)

    def reduce_llm(self, ctx: LLMContext) -> Reduction:
        gen = self._generator(ctx.generator, ctx.hidden_states.device)
        scores = torch.rand(ctx.candidates.shape, generator=gen, device=ctx.hidden_states.device)
        return ctx.keep_top_per_image(scores, self.budget)
