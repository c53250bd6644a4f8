"""``downsample``: bilinear resize of the feature grid from (h, w) to (h', w') with h' * w' = k (a baseline).

A strong baseline in VTC-Bench (Liao et al., 2025, arXiv:2510.07143): it matches many published pruning methods at
equal budget. (h', w') is the factor pair of k closest to the grid's aspect ratio, or ``grid: [h', w']`` (then
``budget`` may be left out; given too, it must name the same count). Video: per frame.
By default it acts on the tower features before the projector (``feature_space: vision``), like pooling
projectors; ``feature_space: llm`` resizes the projected embeddings. Every output token takes the grid cell of
the input token nearest its centre (its anchor) for positions and drawing. Why it is a baseline, the geometry,
VTC-Bench's image-level variant: docs/methods/downsample.md.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import model_validator

from ..errors import ConfigError
from ..layout import Grid, Layout, Video
from ..reduction import Reduction, resolve_budget
from . import register_method
from .base import Budget, Method, VisionContext

__all__ = ["Downsample", "closest_factor_pair", "window_anchors"]


def closest_factor_pair(k: int, h: int, w: int) -> tuple[int, int]:
    """(h', w') with h' * w' = k and h' / w' closest to h / w (in log ratio), h' <= h and w' <= w if possible."""
    best = None
    target = h / w
    for a in range(1, k + 1):
        if k % a:
            continue
        b = k // a
        fits = a <= h and b <= w
        score = (not fits, abs(math.log(a / b / target)))
        if best is None or score < best[0]:
            best = (score, (a, b))
    return best[1]


def window_anchors(h: int, w: int, h2: int, w2: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """For an (h, w) -> (h2, w2) resize: anchor input index (h2*w2,) of each output cell (nearest to the window
    centre) and the source map (h*w,) output cell of each input token (the window it falls in)."""
    rows = torch.arange(h, device=device)
    cols = torch.arange(w, device=device)
    r_out = (rows * h2) // h
    c_out = (cols * w2) // w
    source = (r_out[:, None] * w2 + c_out[None, :]).flatten()
    rc = ((torch.arange(h2, device=device) + 0.5) * h / h2 - 0.5).round().long().clamp(0, h - 1)
    cc = ((torch.arange(w2, device=device) + 0.5) * w / w2 - 0.5).round().long().clamp(0, w - 1)
    anchor = (rc[:, None] * w + cc[None, :]).flatten()
    return anchor, source


@register_method("downsample")
class Downsample(Method):
    sides = ("vision",)

    method: Literal["downsample"] = "downsample"
    budget: Budget | None = None
    grid: tuple[int, int] | None = None
    feature_space: Literal["vision", "llm"] = "vision"

    @model_validator(mode="after")
    def _check(self) -> Downsample:
        if self.budget is None and self.grid is None:
            raise ValueError("give 'budget' (tokens per grid / frame, or a keep fraction) or 'grid: [h, w]'")
        if self.grid is not None:
            h, w = self.grid
            if h < 1 or w < 1:
                raise ValueError(f"grid sides must be >= 1, got {list(self.grid)}")
            if isinstance(self.budget, int) and self.budget != h * w:
                raise ValueError(f"budget={self.budget} disagrees with grid={list(self.grid)} ({h * w} tokens); "
                                 "give one of them")
        return self

    def check_layout(self, layout: Layout) -> None:
        if not isinstance(layout, Grid | Video):
            raise ConfigError(
                f"downsample: needs a 2D grid layout (Grid or Video), got {layout!r}; use pool (1D) or random"
            )

    def _target(self, h: int, w: int) -> tuple[int, int]:
        if self.grid is not None:
            h2, w2 = self.grid
            if h2 > h or w2 > w:
                raise ConfigError(f"downsample: grid={list(self.grid)} must fit inside the {h}x{w} feature grid")
            if isinstance(self.budget, float) and resolve_budget(self.budget, h * w) != h2 * w2:
                raise ConfigError(
                    f"downsample: budget={self.budget} keeps {resolve_budget(self.budget, h * w)} of the {h}x{w} "
                    f"grid's tokens but grid={list(self.grid)} gives {h2 * w2}; give one of them"
                )
            return h2, w2
        k = resolve_budget(self.budget, h * w)
        return closest_factor_pair(k, h, w)

    def reduce_vision(self, ctx: VisionContext) -> Reduction:
        layout = ctx.layout
        U, n, D = ctx.features.shape
        t = layout.t if isinstance(layout, Video) else 1
        h, w = layout.h, layout.w
        h2, w2 = self._target(h, w)

        def resize(x: torch.Tensor) -> torch.Tensor:
            d = x.shape[-1]
            y = F.interpolate(x.reshape(U * t, h, w, d).permute(0, 3, 1, 2).float(), size=(h2, w2), mode="bilinear",
                              align_corners=False)
            return y.permute(0, 2, 3, 1).reshape(U, t * h2 * w2, d).to(x.dtype)

        y = resize(ctx.features)
        anchor, source = window_anchors(h, w, h2, w2, ctx.features.device)
        offs_in = (torch.arange(t, device=anchor.device) * h * w)[:, None]
        offs_out = (torch.arange(t, device=anchor.device) * h2 * w2)[:, None]
        anchor = (anchor[None] + offs_in).flatten().expand(U, -1)
        source = (source[None] + offs_out).flatten().expand(U, -1)
        k = t * h2 * w2
        sizes = torch.bincount(source[0], minlength=k).float().expand(U, k)
        return Reduction(anchor=anchor.contiguous(), valid=torch.ones(U, k, dtype=torch.bool, device=anchor.device),
                         source=source.contiguous(), features=y, sizes=sizes.contiguous(), combine=resize)

    def output_layout(self, layout: Layout, num_out: int) -> Layout:
        h2, w2 = self._target(layout.h, layout.w)
        return Video(layout.t, h2, w2) if isinstance(layout, Video) else Grid(h2, w2)
