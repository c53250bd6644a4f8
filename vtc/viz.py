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

from .layout import Grid, Layout, MultiCrop, Sequence, Video
from .runtime.stats import Stats

__all__ = ["token_groups", "select_stages", "draw_kept", "group_colors"]


def _vision_maps(stages: list, image: int) -> list[torch.Tensor] | None:
    """Per unit of ``image``: (n,) index of the vision-side output token (offset per unit), or None."""
    vis = [s for s in stages if s.side == "vision"]
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


def select_stages(stats: Stats, stage: int | None = None) -> list:
    """The stages to compose: all of them (``stage=None``: the final survivors) or the first ``stage + 1`` in run
    order (vision side first, then LLM side by layer). Raises ValueError naming the valid range."""
    stages = list(stats.stages)
    if stage is None:
        return stages
    if not 0 <= stage < len(stages):
        names = ", ".join(f"{i}: {s.method}" + (f" @ layer {s.layer}" if s.side == "llm" else " (vision)")
                          for i, s in enumerate(stages))
        raise ValueError(f"stage={stage} is out of range: this run has {len(stages)} stage(s) ({names or 'none'})")
    return stages[: stage + 1]


def token_groups(stats: Stats, image: int = 0, num_tokens: list[int] | None = None,
                 stage: int | None = None) -> list[torch.Tensor]:
    """Final group id of every original visual token of ``image``, one (n_unit,) tensor per unit.

    ``num_tokens``: tokens per unit when there is no vision-side stage (LLM-side only); default: inferred from
    the first LLM stage (one unit). ``stage``: stop after that stage (index in run order); default: all stages.
    """
    stages = select_stages(stats, stage)
    maps = _vision_maps(stages, image)
    llm = sorted((s for s in stages if s.side == "llm"), key=lambda s: s.layer)
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


PADDING = (110, 110, 110)


def _colors_for(groups: list[torch.Tensor]) -> dict[int, tuple[int, int, int]]:
    """One colour per merged group (an id shared by several original tokens), over all units of the image."""
    g = torch.cat([x.flatten().cpu() for x in groups]).numpy() if groups else np.zeros(0, dtype=np.int64)
    ids, counts = np.unique(g[g >= 0], return_counts=True)
    merged = sorted(int(i) for i, c in zip(ids, counts) if c > 1)
    return dict(zip(merged, group_colors(len(merged))))


def _paint(img: Image.Image, g: np.ndarray, colors: dict, box: tuple[float, float, float, float] | None = None
           ) -> Image.Image:
    """Cells of the (h, w) id map ``g`` over ``box`` (x0, y0, x1, y1; default: the whole image): dropped cells
    dark, kept cells outlined, merged groups filled with their colour."""
    img = img.convert("RGBA")
    x0, y0, x1, y1 = box if box is not None else (0, 0, img.width, img.height)
    h, w = g.shape
    cw, ch = (x1 - x0) / w, (y1 - y0) / h
    overlay = Image.new("RGBA", img.size, (0, 0, 0, 0))
    d = ImageDraw.Draw(overlay)
    for r in range(h):
        for c in range(w):
            cell = (x0 + c * cw, y0 + r * ch, x0 + (c + 1) * cw - 1, y0 + (r + 1) * ch - 1)
            v = int(g[r, c])
            if v < 0:
                d.rectangle(cell, fill=(0, 0, 0, 185))
            elif v in colors:
                d.rectangle(cell, fill=(*colors[v], 110), outline=(*colors[v], 255))
            else:
                d.rectangle(cell, outline=(255, 255, 255, 200))
    return Image.alpha_composite(img, overlay).convert("RGB")


def _fit(h: int, w: int, size: int) -> tuple[int, int]:
    """(width, height) of a panel of aspect ``h x w`` whose longer side is ``size``."""
    return (size, max(1, round(size * h / w))) if w >= h else (max(1, round(size * w / h)), size)


def _grid_panel(image: Image.Image, groups: torch.Tensor, h: int, w: int, size: int, colors: dict) -> Image.Image:
    """The image resized to the grid's aspect (Qwen2-VL grids follow the image's), cells drawn over it."""
    return _paint(image.convert("RGB").resize(_fit(h, w, size)), groups.view(h, w).cpu().numpy(), colors)


def _crops_panel(image: Image.Image, crops: list[torch.Tensor], layout: MultiCrop, size: int, colors: dict
                 ) -> Image.Image:
    """LLaVA-NeXT crops in place: the tiled ``(rows * h) x (cols * w)`` map over the resized, padded image."""
    grid = layout.crops[0]
    H, W = layout.crop_rows * grid.h, layout.crop_cols * grid.w
    tiled = torch.stack([c.view(grid.h, grid.w).cpu() for c in crops])
    tiled = tiled.view(layout.crop_rows, layout.crop_cols, grid.h, grid.w).permute(0, 2, 1, 3).reshape(H, W)
    pw, ph = _fit(H, W, size)
    canvas = Image.new("RGB", (pw, ph), PADDING)
    top, bottom, left, right = layout.image_box or (0, H, 0, W)
    cx, cy = pw / W, ph / H
    box = (round(left * cx), round(top * cy), round(right * cx), round(bottom * cy))
    canvas.paste(image.convert("RGB").resize((box[2] - box[0], box[3] - box[1])), box[:2])
    panel = _paint(canvas, tiled.numpy(), colors)
    draw = ImageDraw.Draw(panel)
    draw.rectangle((0, 0, pw - 1, ph - 1), outline=(255, 255, 255))
    for r in range(1, layout.crop_rows):  # crop borders
        draw.line((0, r * grid.h * cy, pw, r * grid.h * cy), fill=(255, 255, 0), width=2)
    for c in range(1, layout.crop_cols):
        draw.line((c * grid.w * cx, 0, c * grid.w * cx, ph), fill=(255, 255, 0), width=2)
    return panel


def _strip(groups: torch.Tensor, width: int, colors: dict, cell: int = 12) -> Image.Image:
    n = groups.shape[0]
    per_row = max(1, width // cell)
    rows = (n + per_row - 1) // per_row
    strip = Image.new("RGB", (width, rows * cell), (30, 30, 30))
    d = ImageDraw.Draw(strip)
    for i, v in enumerate(groups.cpu().tolist()):
        x, y = (i % per_row) * cell, (i // per_row) * cell
        fill = (0, 0, 0) if v < 0 else colors.get(int(v), (235, 235, 235))
        d.rectangle((x + 1, y + 1, x + cell - 2, y + cell - 2), fill=fill)
    return strip


def draw_kept(image: Image.Image | list[Image.Image], groups: list[torch.Tensor], layouts: list[Layout],
              size: int = 336) -> Image.Image:
    """Picture of the kept / merged tokens of one image, panels side by side:

    - :class:`Grid`: the cells over the image (resized to the grid's aspect);
    - :class:`MultiCrop` (LLaVA-NeXT): the base grid, then every crop in place over the padded image;
    - :class:`Video`: one panel per frame (``image`` may be the list of frames; a single image is reused);
    - :class:`Sequence`: a strip of cells in token order under the panels (black: dropped).

    ``groups`` come from :func:`token_groups`, one tensor per unit; a :class:`MultiCrop` takes one group per part
    (base, crops...) or one group of all its tokens.
    """
    frames = list(image) if isinstance(image, (list, tuple)) else [image]
    still = frames[0]
    colors = _colors_for(groups)
    panels: list[Image.Image] = []
    strips: list[Image.Image] = []
    queue = list(groups)
    for layout in layouts:
        if not queue:
            raise ValueError(f"draw_kept: {len(layouts)} layouts but only {len(groups)} token groups")
        if isinstance(layout, MultiCrop):
            if queue[0].shape[0] == layout.num_tokens and len(layout.parts) > 1:
                parts = list(torch.split(queue.pop(0), [p.num_tokens for p in layout.parts]))
            else:
                parts, queue = queue[: len(layout.parts)], queue[len(layout.parts):]
            panels.append(_grid_panel(still, parts[0], layout.base.h, layout.base.w, size, colors))
            if layout.crops:
                panels.append(_crops_panel(still, parts[1:], layout, size, colors))
            continue
        g = queue.pop(0)
        if g.shape[0] != layout.num_tokens:
            raise ValueError(f"draw_kept: a group of {g.shape[0]} tokens for {layout} ({layout.num_tokens} tokens)")
        if isinstance(layout, Grid):
            panels.append(_grid_panel(still, g, layout.h, layout.w, size, colors))
        elif isinstance(layout, Video):
            per = layout.h * layout.w
            for t in range(layout.t):
                frame = frames[t] if len(frames) == layout.t else still
                panels.append(_grid_panel(frame, g[t * per:(t + 1) * per], layout.h, layout.w, size, colors))
        elif isinstance(layout, Sequence):
            strips.append((g, layout))
    if not panels:
        panels = [still.convert("RGB").resize((size, size))]
    W = sum(p.width for p in panels) + 4 * (len(panels) - 1)
    strips = [_strip(g, W, colors) for g, _ in strips]
    top = max(p.height for p in panels)
    canvas = Image.new("RGB", (W, top + sum(s.height + 4 for s in strips)), (255, 255, 255))
    x = 0
    for p in panels:
        canvas.paste(p, (x, 0))
        x += p.width + 4
    y = top + 4
    for s in strips:
        canvas.paste(s, (0, y))
        y += s.height + 4
    return canvas
