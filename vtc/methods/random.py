"""``random``: a uniformly random subset of k visual tokens per image, kept in original order (a baseline, no paper).

The honest baseline every token-reduction paper should beat. Seeded: a ``torch.Generator`` seeded with the
stage's ``seed`` (or the config's ``seed``) draws one random score per token *rank within its image*, so the
subset depends only on the seed and the image's token count, never on batch composition or padding (batched
results equal per-sample results). Vision side (per image / crop / frame unit) or LLM side (``layer`` set).
Why it is the baseline, choices: docs/methods/random.md.
"""

from __future__ import annotations

from typing import Literal

import torch

from . import register_method
from .base import Budget, LLMContext, ScorerMethod, Seed, VisionContext


@register_method("random")
class RandomPrune(ScorerMethod):
    sides = ("vision", "llm")

    method: Literal["random"] = "random"
    budget: Budget
    layer: int | None = None
    seed: Seed | None = None

    def _scores(self, n: int, default_seed: int, device) -> torch.Tensor:
        """(n,) random scores for token ranks 0..n-1, from the seed alone."""
        seed = default_seed if self.seed is None else self.seed
        gen = torch.Generator(device="cpu").manual_seed(seed)
        return torch.rand(n, generator=gen).to(device)

    def score(self, ctx: VisionContext | LLMContext) -> torch.Tensor:
        if isinstance(ctx, VisionContext):
            U, n = ctx.features.shape[:2]
            return self._scores(n, ctx.seed, ctx.features.device).expand(U, n)
        rank = ctx.rank_in_image()  # (B, n) position of each candidate inside its image
        return self._scores(max(ctx.candidates.shape[1], 1), ctx.seed, ctx.hidden_states.device)[rank]
