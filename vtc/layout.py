"""Layouts: what a method may assume about where the visual tokens of one image (or crop, or video) sit.

A layout describes the tokens of one *unit* of visual features, in the order the model feeds them:

- :class:`Grid` (h, w): raster order, row-major (LLaVA-1.5: 24 x 24 patches).
- :class:`Video` (t, h, w): frame-major raster order (Qwen2-VL video after the 2x2 merge).
- :class:`Sequence` (n, ordered): 1D tokens from a resampler or a 1D tokenizer. ``ordered=True`` declares a
  coarse-to-fine order (FlexTok / TiTok with nested dropout) where every prefix is a valid description.
- :class:`MultiCrop`: LLaVA-NeXT "anyres": a base grid followed by the crop grids (each a :class:`Grid`).
  Vision-side methods reduce each crop grid separately by default; newline tokens are added by the model
  after reduction and are never pruned.

Pruning and merging work on any layout (they only need ``num_tokens``); pooling and drawing use the geometry.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["Layout", "Grid", "Video", "Sequence", "MultiCrop", "grid_coords"]


@dataclass(frozen=True)
class Layout:
    """Base class; subclasses define ``num_tokens``."""

    @property
    def num_tokens(self) -> int:  # pragma: no cover - abstract
        raise NotImplementedError

    @property
    def ordered(self) -> bool:
        """Whether every prefix of the tokens is a valid coarser description (prefix truncation allowed)."""
        return False


@dataclass(frozen=True)
class Grid(Layout):
    """A 2D grid of ``h x w`` tokens in row-major order."""

    h: int
    w: int

    def __post_init__(self) -> None:
        if self.h < 1 or self.w < 1:
            raise ValueError(f"Grid(h={self.h}, w={self.w}): both sides must be >= 1")

    @property
    def num_tokens(self) -> int:
        return self.h * self.w


@dataclass(frozen=True)
class Video(Layout):
    """``t`` frames of ``h x w`` tokens, frame-major then row-major."""

    t: int
    h: int
    w: int

    def __post_init__(self) -> None:
        if min(self.t, self.h, self.w) < 1:
            raise ValueError(f"Video(t={self.t}, h={self.h}, w={self.w}): all sizes must be >= 1")

    @property
    def num_tokens(self) -> int:
        return self.t * self.h * self.w

    @property
    def frame(self) -> Grid:
        return Grid(self.h, self.w)


@dataclass(frozen=True)
class Sequence(Layout):
    """``n`` tokens in 1D. ``ordered=True``: coarse-to-fine, so keeping a prefix is a valid reduction."""

    n: int
    is_ordered: bool = False

    def __post_init__(self) -> None:
        if self.n < 1:
            raise ValueError(f"Sequence(n={self.n}): n must be >= 1")

    @property
    def num_tokens(self) -> int:
        return self.n

    @property
    def ordered(self) -> bool:
        return self.is_ordered


@dataclass(frozen=True)
class MultiCrop(Layout):
    """Multi-crop features of one image: ``base`` grid then ``crops`` grids, concatenated in that order (LLaVA-NeXT
    anyres), or the crops then the base when ``base_last`` (InternVL: the tiles, then the thumbnail).

    ``crop_rows x crop_cols`` is the arrangement of the crops over the (resized, padded) image, used for drawing;
    ``image_box`` = (top, bottom, left, right), in cells of the tiled ``(crop_rows * h) x (crop_cols * w)`` crop
    map, is where the image itself lies inside the padding (None: it fills the map).
    """

    base: Grid
    crops: tuple[Grid, ...]
    crop_rows: int = 1
    crop_cols: int = 1
    image_box: tuple[int, int, int, int] | None = None
    base_last: bool = False

    @property
    def parts(self) -> tuple[Grid, ...]:
        """The grids in token order."""
        return (*self.crops, self.base) if self.base_last else (self.base, *self.crops)

    @property
    def num_tokens(self) -> int:
        return sum(p.num_tokens for p in self.parts)


def grid_coords(layout: Grid | Video, device: torch.device | None = None) -> torch.Tensor:
    """Integer coordinates of every token: (n, 2) ``(row, col)`` for a Grid, (n, 3) ``(t, row, col)`` for a Video."""
    if isinstance(layout, Grid):
        r, c = torch.meshgrid(torch.arange(layout.h, device=device), torch.arange(layout.w, device=device), indexing="ij")
        return torch.stack([r.flatten(), c.flatten()], dim=-1)
    if isinstance(layout, Video):
        t, r, c = torch.meshgrid(
            torch.arange(layout.t, device=device),
            torch.arange(layout.h, device=device),
            torch.arange(layout.w, device=device),
            indexing="ij",
        )
        return torch.stack([t.flatten(), r.flatten(), c.flatten()], dim=-1)
    raise TypeError(f"grid_coords needs a Grid or Video layout, got {type(layout).__name__}")
