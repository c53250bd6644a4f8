"""``vispruner``: VisPruner (Zhang et al., "Beyond Text-Visual Attention: Exploiting Visual Cues for Effective
Token Pruning in VLMs", ICCV 2025, arXiv:2412.01818v2). Vision side, before the projector.

Per unit (image; LLaVA-NeXT: every crop; Qwen: every image / frame), with T = ``budget`` and r =
``important_ratio``:

1. **Important**: ``T_imp = int(T * r)`` tokens with the highest CLS attention of the feature layer (the same
   flash-compatible score as ``fastervlm``: one re-projected CLS query row of the block producing the features;
   towers without CLS use the mean-query ``received_attention``, see :mod:`vtc.methods.fastervlm`).
2. **Diverse**: the rest, in descending-attention order, is thinned in rounds until ``T - T_imp`` remain: split
   the list by slot parity (A = even slots, B = odd slots), score every a in A by ``max_b cos(F_a, F_b)`` on the
   pre-projector features F, drop the ``min(8, R - (T - T_imp))`` most similar A tokens, continue with
   ``[A survivors in similarity order] + B``.
3. Keep important + diverse (exactly T), in raster order.

Budget: an int is the exact count per unit (README examples: ``budget: 128, important_ratio: 0.5`` for LLaVA-1.5,
``64, 0.75`` for MME, ``32`` per crop on LLaVA-NeXT = 5 x 32 = 160 plus the newline tokens); a float is a keep
fraction, floor(f * n). ``important_ratio: 1`` is FasterVLM.

Official quirks: *fixed*: an odd residual count (e.g. T=58, r=0.5 on 576 tokens) crashes the official code (its A
gather uses R//2 - s rows); vtc takes all ceil(R/2) A slots, identical whenever the official code runs. Ties go to
the lower index (stable sorts; the official ``argsort`` is unstable). Cosines in fp32 (official: fp16).
LLaVA-NeXT: exactly T per crop with the model's newline tokens (the official masks follow the unpadding, so crops
cut by it deliver fewer). *Reproduced*: the parity split, 8 per round, the similarity-order of the survivors.
Derivation: ``docs/methods/vispruner.md``.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field

from ..reduction import Reduction, resolve_budget
from . import register_method
from .base import Budget, Method, VisionContext
from .fastervlm import cls_scores

__all__ = ["VisPruner", "vispruner_keep"]

#: tokens removed per similarity round (hard-coded in the official code)
ROUND = 8


def vispruner_keep(scores: torch.Tensor, feats: torch.Tensor, budget: int, num_important: int) -> torch.Tensor:
    """(U, budget) kept token indices (unsorted) of every row.

    scores: (U, n) importance (higher first); feats: (U, n, D) similarity features; the top ``num_important`` by
    score are kept, the remaining ``budget - num_important`` come from the parity rounds. Vectorised over rows
    (every row has the same n and budget, so the rounds are in lockstep); O(n / 8) rounds of an
    (U, R/2, R/2) cosine matrix.
    """
    U, n = scores.shape
    order = torch.sort(scores.float(), dim=-1, descending=True, stable=True).indices
    important, rest = order[:, :num_important], order[:, num_important:]
    target = budget - num_important
    f = feats.float()
    f = f / f.norm(dim=-1, keepdim=True).clamp(min=1e-12)
    while target > 0:
        R = rest.shape[1]
        s = min(ROUND, R - target)
        if s <= 0:
            break
        a, b = rest[:, 0::2], rest[:, 1::2]
        fa = torch.gather(f, 1, a[..., None].expand(-1, -1, f.shape[-1]))
        fb = torch.gather(f, 1, b[..., None].expand(-1, -1, f.shape[-1]))
        m = torch.bmm(fa, fb.transpose(1, 2)).max(-1).values  # (U, |A|) best match of each A token in B
        by_sim = torch.sort(m, dim=-1, descending=True, stable=True).indices
        rest = torch.cat([torch.gather(a, 1, by_sim[:, s:]), b], dim=1)
    if target <= 0:
        rest = rest[:, :0]
    return torch.cat([important, rest], dim=1)


@register_method("vispruner")
class VisPruner(Method):
    sides = ("vision",)

    method: Literal["vispruner"] = "vispruner"
    #: tokens kept per unit (image / crop / frame), or a keep fraction
    budget: Budget
    #: share of the budget chosen by CLS attention (the rest by similarity rounds)
    important_ratio: float = Field(0.5, ge=0.0, le=1.0)
    feature_space: Literal["vision"] = "vision"

    def reduce_vision(self, ctx: VisionContext) -> Reduction:
        n = ctx.num_tokens
        k = resolve_budget(self.budget, n)
        keep = vispruner_keep(cls_scores(ctx, self.method), ctx.features, k, int(k * self.important_ratio))
        return Reduction.select(keep, n)
