"""What a config kept: per original visual token, the final token that stands for it, and pictures of it.

``token_groups(stats, image)`` composes the source maps of every stage (vision side, then LLM side in layer
order) into one map per unit (crop / frame / image) of that image: for each original visual token, the id of
the final token that represents it (-1: dropped). Tokens with the same id were merged. ``draw_kept`` draws
it over the image: dropped cells dark, kept cells clear, merged groups filled with one colour each.
"""

from __future__ import annotations

import colorsys

import numpy as np
import torch
from PIL import Image, ImageDraw

from .layout import Grid, Layout, Sequence, Video
from .runtime.stats import Stats

__all__ = ["token_groups", "draw_kept", "group_colors"]


def _vision_maps(stats: Stats, image: int) -> list[torch.Tensor] | None:
    """Per unit of ``image``: (n,) index of the vision-side output token (offset per unit), or None."""
    vis = [s for s in stats.stages if s.side == "vision"]
    if not vis:
        return None
    maps: list[torch.Tensor] | None = None
    for st in vis:
        sources = []
        for src, units in zip(st.sources, st.unit_images):
            sources.extend(src[u] for u, img in enumerate(units) if img == image)
        if maps is None:
            maps = [torch.arange(s.shape[0], device=s.device) for s in sources]
        maps = [torch.where(m >= 0, s[m.clamp(min=0)], torch.full_like(m, -1)) for m, s in zip(maps, sources)]
    # make ids unique across the units of the image (output order = unit order)
    offset = 0
    out = []
    for m in maps:
        out.append(torch.where(m >= 0, m + offset, m))
        offset += int(m.max()) + 1 if bool((m >= 0).any()) else 0
    return out


def token_groups(stats: Stats, image: int = 0, num_tokens: list[int] | None = None) -> list[torch.Tensor]:
    """Final group id of every original visual token of ``image``, one (n_unit,) tensor per unit.

    ``num_tokens``: tokens per unit when there is no vision-side stage (LLM-side only); default: inferred from
    the first LLM stage (one unit).
    """
    maps = _vision_maps(stats, image)
    llm = sorted((s for s in stats.stages if s.side == "llm"), key=lambda s: s.layer)
    if maps is None:
        if num_tokens is None:
            if not llm:
                return []
            st = llm[0]
            num_tokens = [int((st.candidate_image == image).sum())]
        maps = []
        start = 0
        for n in num_tokens:
            maps.append(torch.arange(start, start + n))
            start += n
    flat = torch.cat(maps)
    sizes = [m.shape[0] for m in maps]
    for st in llm:
        rows = (st.candidate_image == image).any(-1).nonzero().flatten()
        if rows.numel() == 0:
            continue
        b = int(rows[0])
        sel = st.candidate_image[b] == image
        src = st.reduction.source[b][sel].to(flat.device)  # (n_cur,) row-level output slot or -1
        if bool((flat >= src.shape[0]).any()):
            break  # extra (protected) tokens between stages: cannot compose further
        nxt = torch.where(flat >= 0, src[flat.clamp(min=0)], torch.full_like(flat, -1))
        kept = torch.unique(src[src >= 0])  # sorted slots -> rank among survivors of this image
        flat = torch.where(nxt >= 0, torch.searchsorted(kept, nxt.clamp(min=0)), nxt)
    return list(torch.split(flat, sizes))


def group_colors(n: int) -> list[tuple[int, int, int]]:
    """n well separated colours (golden-ratio hues)."""
    out = []
    for i in range(n):
        h = (i * 0.618033988749895) % 1.0
        r, g, b = colorsys.hsv_to_rgb(h, 0.75, 1.0)
        out.append((int(r * 255), int(g * 255), int(b * 255)))
    return out


def _draw_grid(img: Image.Image, groups: torch.Tensor, h: int, w: int) -> Image.Image:
    img = img.convert("RGBA")
    W, H = img.size
    overlay = Image.new("RGBA", img.size, (0, 0, 0, 0))
    d = ImageDraw.Draw(overlay)
    g = groups.view(h, w).cpu().numpy()
    ids, counts = np.unique(g[g >= 0], return_counts=True)
    merged = {int(i) for i, c in zip(ids, counts) if c > 1}
    colors = dict(zip(sorted(merged), group_colors(len(merged))))
    for r in range(h):
        for c in range(w):
            box = (c * W / w, r * H / h, (c + 1) * W / w - 1, (r + 1) * H / h - 1)
            v = int(g[r, c])
            if v < 0:
                d.rectangle(box, fill=(0, 0, 0, 185))
            elif v in colors:
                d.rectangle(box, fill=(*colors[v], 110), outline=(*colors[v], 255))
            else:
                d.rectangle(box, outline=(255, 255, 255, 200))
    return Image.alpha_composite(img, overlay).convert("RGB")


def _draw_strip(groups: torch.Tensor, width: int, cell: int = 12) -> Image.Image:
    n = groups.shape[0]
    per_row = max(1, width // cell)
    rows = (n + per_row - 1) // per_row
    strip = Image.new("RGB", (width, rows * cell), (30, 30, 30))
    d = ImageDraw.Draw(strip)
    g = groups.cpu().numpy()
    ids, counts = np.unique(g[g >= 0], return_counts=True)
    merged = {int(i) for i, c in zip(ids, counts) if c > 1}
    colors = dict(zip(sorted(merged), group_colors(len(merged))))
    for i, v in enumerate(g):
        x, y = (i % per_row) * cell, (i // per_row) * cell
        fill = (0, 0, 0) if v < 0 else colors.get(int(v), (235, 235, 235))
        d.rectangle((x + 1, y + 1, x + cell - 2, y + cell - 2), fill=fill)
    return strip


def draw_kept(image: Image.Image, groups: list[torch.Tensor], layouts: list[Layout], size: int = 336) -> Image.Image:
    """Picture of the kept / merged tokens: grids over the image (one panel per unit: crops, frames side by
    side), 1D sequences as a strip of cells under the image."""
    base = image.convert("RGB").resize((size, size))
    panels: list[Image.Image] = []
    strips: list[Image.Image] = []
    for g, layout in zip(groups, layouts):
        if isinstance(layout, Grid):
            panels.append(_draw_grid(base, g, layout.h, layout.w))
        elif isinstance(layout, Video):
            per = layout.h * layout.w
            for t in range(layout.t):
                panels.append(_draw_grid(base, g[t * per:(t + 1) * per], layout.h, layout.w))
        elif isinstance(layout, Sequence):
            strips.append(_draw_strip(g, size))
    if not panels:
        panels = [base]
    W = sum(p.width for p in panels)
    H = panels[0].height + sum(s.height + 4 for s in strips)
    canvas = Image.new("RGB", (W, H), (255, 255, 255))
    x = 0
    for p in panels:
        canvas.paste(p, (x, 0))
        x += p.width
    y = panels[0].height + 4
    for s in strips:
        canvas.paste(s, (0, y))
        y += s.height + 4
    return canvas
