"""``prefix``: keep the first k tokens of an **ordered** 1D sequence (a baseline for ordered tokenizers).

For 1D tokenizers / resamplers trained with nested dropout (TiTok, arXiv:2406.07550; FlexTok, arXiv:2502.13967;
One-D-Piece), where every prefix is a valid coarser description. Refused (ConfigError) on layouts not declared
ordered, where a prefix would just be the top rows of an image. Why it is the baseline there:
docs/methods/prefix.md.
"""

from __future__ import annotations

from typing import ClassVar, Literal

import torch

from ..errors import ConfigError
from ..layout import Layout
from ..reduction import Reduction, resolve_budget
from . import register_method
from .base import Budget, Method, VisionContext


@register_method("prefix")
class PrefixTruncate(Method):
    sides = ("vision",)
    keeps_prefix: ClassVar[bool] = True

    method: Literal["prefix"] = "prefix"
    budget: Budget

    def check_layout(self, layout: Layout) -> None:
        if not layout.ordered:
            raise ConfigError(
                f"prefix: the visual tokens have layout {layout!r}, which is not declared ordered "
                "(allowed: Sequence(n, is_ordered=True), e.g. a FlexTok / TiTok-style 1D tokenizer). "
                "Use random, downsample or pool on grids"
            )

    def reduce_vision(self, ctx: VisionContext) -> Reduction:
        U, n = ctx.features.shape[:2]
        k = resolve_budget(self.budget, n)
        keep = torch.arange(k, device=ctx.features.device).expand(U, k)
        return Reduction.select(keep, n)
