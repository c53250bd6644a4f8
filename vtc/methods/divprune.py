"""``divprune``: DivPrune (Alvar et al., "DivPrune: Diversity-based Visual Token Pruning for Large Multimodal
Models", CVPR 2025, arXiv:2503.02175). Vision side, **after the projector** (on the LLM input embeddings of the
image tokens, as the official code), text-agnostic, no attention needed.

Max-min diversity, greedy: with U = rows of the features L2-normalised and Dist = 1 - U·Uᵀ,

- s₀ = argmax_j (2nd-smallest entry of column j of Dist) (the distance to the nearest *other* token);
- s_i = argmax_j min_{t<i} Dist[s_t, j] over the tokens not chosen yet,

ties to the lowest index; the k chosen tokens are kept in their original (raster) order.

Budget: an int is the exact number of tokens kept per image; a float ``ratio`` keeps ``round(ratio * n)``
(Python's round, half to even: the official count, **not** the library-wide floor), so ``budget: 0.098`` (the
paper's and scripts' ``SUBSET_RATIO``) keeps 56 of LLaVA-1.5's 576 tokens, as the paper.

``per: image`` (default, the official setting on LLaVA-NeXT: one selection over the whole image) selects jointly
over the units (base + crops) of an image, so crops deliver different counts (it must then be the last
vision-side stage); ``per: crop`` gives every unit the budget. LLaVA-NeXT's newline tokens are never candidates
(the adapter adds them after the reduction; the official code could select them). Qwen2-VL / 2.5-VL: on the
merged tokens (after the PatchMerger, the LLM input space); one unit = one image or video frame.

Official quirks: *fixed*: chosen tokens are excluded from later steps (the official code can pick an index twice
when a remaining token is an exact duplicate of a chosen one and then keeps fewer than k); distances in fp32
(official: model dtype, fp16). *Reproduced*: step 0's score, lowest index on ties, round() of the ratio.
Derivation and the official code's other quirks: ``docs/methods/divprune.md``.
"""

from __future__ import annotations

from typing import Literal

import torch

from ..reduction import Reduction, resolve_budget
from . import register_method
from .base import Budget, Method, VisionContext

__all__ = ["DivPrune", "divprune_count", "divprune_select", "group_units"]


def divprune_count(budget: int | float, n: int) -> int:
    """Tokens kept out of ``n``: an int budget as is (clamped to n with a warning), a ratio as ``round(ratio * n)`` (>= 1)."""
    if isinstance(budget, float):
        return max(1, min(n, int(round(budget * n))))
    return resolve_budget(budget, n)


def divprune_select(x: torch.Tensor, k: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
    """(R, n) bool: the tokens greedy max-min diversity keeps in each row.

    x: (R, n, D) features; k: (R,) long tokens to keep per row; valid: (R, n) bool candidate tokens (None: all).
    Vectorised over rows; max(k) greedy steps, each O(n) per row on the (R, n, n) distance matrix.
    """
    R, n, _ = x.shape
    dev = x.device
    if valid is None:
        valid = torch.ones(R, n, dtype=torch.bool, device=dev)
    u = x.float()
    u = u / u.norm(dim=-1, keepdim=True)  # no eps, as the official code (a zero token gives NaN -> never chosen)
    dist = 1.0 - torch.bmm(u, u.transpose(1, 2))  # (R, n, n)
    neg = torch.tensor(float("-inf"), device=dev)
    # step 0: 2nd-smallest distance of every column over the valid rows (the smallest is the self-distance)
    d0 = dist.masked_fill(~valid[:, :, None], float("inf"))
    score = torch.topk(d0, min(2, n), dim=1, largest=False).values[:, -1]  # (R, n)
    score = torch.where(valid, score.nan_to_num(nan=float("-inf")), neg)
    chosen = torch.zeros(R, n, dtype=torch.bool, device=dev)
    rows = torch.arange(R, device=dev)
    min_d = torch.full((R, n), float("inf"), device=dev)
    steps = int(k.max()) if k.numel() else 0  # one host sync
    for i in range(steps):
        s = score.argmax(-1)  # first maximum = lowest index on ties
        active = i < k
        chosen[rows[active], s[active]] = True
        row = dist[rows, s]  # (R, n) distances of the new pick to every token
        min_d = torch.minimum(min_d, row)
        score = torch.where(valid & ~chosen, min_d.nan_to_num(nan=float("-inf")), neg)
    return chosen


def group_units(unit_image: torch.Tensor | None, U: int, device) -> tuple[torch.Tensor, torch.Tensor, int, int]:
    """(image (U,), part (U,), G, M): each unit's image index (0..G-1) and its rank among that image's units
    (M = the most units of one image). ``unit_image`` None: every unit is its own image."""
    if unit_image is None:
        img = torch.arange(U, device=device)
    else:
        img = torch.unique(torch.as_tensor(unit_image, device=device).long(), return_inverse=True)[1]
    G = int(img.max()) + 1 if U else 0
    same = img[:, None] == img[None, :]
    part = (same & (torch.arange(U, device=device)[None, :] < torch.arange(U, device=device)[:, None])).sum(-1)
    M = int(part.max()) + 1 if U else 0
    return img, part, G, M


@register_method("divprune")
class DivPrune(Method):
    sides = ("vision",)

    method: Literal["divprune"] = "divprune"
    #: tokens kept per image (int) or keep ratio (float, official rounding: round(ratio * n))
    budget: Budget
    #: 'image': one joint selection over an image's units (LLaVA-NeXT crops); 'crop': the budget for every unit
    per: Literal["image", "crop"] = "image"
    #: the official code works on the projected features (the LLM's input embeddings)
    feature_space: Literal["vision", "llm"] = "llm"

    def reduce_vision(self, ctx: VisionContext) -> Reduction:
        feats = ctx.features
        U, n, D = feats.shape
        dev = feats.device
        unit_image = ctx.unit_image if self.per == "image" else None
        img, part, G, M = group_units(unit_image, U, dev)
        # rows = images: units of one image side by side, (G, M * n) with padding for images with fewer units
        x = feats.new_zeros(G, M * n, D)
        valid = torch.zeros(G, M * n, dtype=torch.bool, device=dev)
        col = part[:, None] * n + torch.arange(n, device=dev)  # (U, n) column of each token in its image's row
        x[img[:, None], col] = feats
        valid[img[:, None], col] = True
        counts = valid.sum(-1).tolist()  # one host sync
        k = torch.tensor([divprune_count(self.budget, c) for c in counts], dtype=torch.long, device=dev)
        chosen = divprune_select(x, k, valid)
        return Reduction.from_mask(chosen[img[:, None], col])
