"""``pdrop``: PyramidDrop (Xing et al., "PyramidDrop: Accelerating Your Large Vision-Language Models via Pyramid
Visual Redundancy Reduction", CVPR 2025, arXiv:2410.17247). LLM side, progressive.

At each cut entering 0-indexed decoder layer L_j (``layers``, default [8, 16, 24]): with layer L_j's *own* input
norm, q / k projections and RoPE, the last prompt token's attention to every real token,
a_i = mean_h softmax_i(q_last,h . k_i,h / sqrt(d)) (one re-projected query row, fp32 softmax, GQA keys shared),
scores the visual candidates; the top ``floor(keep[j] * n0)`` of every image survive in original order, n0 = the
image's candidate count entering the first cut. Defaults (every official LLaVA-1.5 / LLaVA-NeXT script):
``layers: [8, 16, 24]``, ``keep: [0.5, 0.25, 0.125]`` (576 -> 288 -> 144 -> 72 visual tokens, lambda = 0.5).
Quirks reproduced and fixed (positions, newline tokens, GQA, batching): docs/methods/pdrop.md.
"""

from __future__ import annotations

from typing import Literal

import torch

from ..scoring import query_attention
from . import register_method
from .base import LLMContext
from .schedule import ScheduledScorer

__all__ = ["PyramidDrop", "PAPER_LAYERS", "PAPER_KEEP"]

#: the official schedule (``--layer_list '[8,16,24]' --image_token_ratio_list "[0.5,0.25,0.125]"``); the official
#: layer list names the 0-indexed layers the survivors enter, as vtc does
PAPER_LAYERS: tuple[int, ...] = (8, 16, 24)
PAPER_KEEP: tuple[float, ...] = (0.5, 0.25, 0.125)


@register_method("pdrop")
class PyramidDrop(ScheduledScorer):
    """PyramidDrop: at each cut layer, keep the visual tokens the last prompt token attends to most."""


    method: Literal["pdrop"] = "pdrop"
    #: 0-indexed decoder layers the survivors enter, strictly increasing
    layers: tuple[int, ...] = PAPER_LAYERS
    #: fraction of each image's original visual tokens kept from each cut on, in (0, 1], non-increasing
    keep: tuple[float, ...] = PAPER_KEEP

    def score(self, ctx: LLMContext) -> torch.Tensor:
        return torch.gather(query_attention(ctx, ctx.layer_idx, "last"), 1, ctx.candidates)
