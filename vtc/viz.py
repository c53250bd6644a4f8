"""What a config kept: per original visual token, the final token that stands for it, and pictures of it.

``token_groups(stats, image)`` composes the source maps of every stage (vision side, then LLM side in layer
order) into one map per unit (crop / frame / image) of that image: for each original visual token, the id of
the final token that represents it (-1: dropped). Tokens with the same id were merged. ``draw_kept`` draws
it over the image: kept tokens unshaded and outlined, dropped ones dark, and (when tokens were merged) a second
row with each merged group in one colour and a legend of group sizes; images keep their aspect ratio.
"""

from __future__ import annotations

import colorsys

import numpy as np
import torch
from PIL import Image, ImageDraw

from .layout import Grid, Layout, MultiCrop, Sequence, Video
from .runtime.stats import Stats

__all__ = ["token_groups", "select_stages", "draw_kept", "group_colors", "processor_view", "caption_panel"]


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


DROPPED_ALPHA = 185  # dropped tokens: dark
MERGED_ALPHA = 120  # on the kept-token panel, tokens merged into a group: dimmed less than dropped ones


def _paint(img: Image.Image, g: np.ndarray, colors: dict, box: tuple[float, float, float, float] | None = None,
           style: str = "kept") -> Image.Image:
    """Cells of the (h, w) id map ``g`` over ``box`` (x0, y0, x1, y1; default: the whole image).

    ``style="kept"``: dropped cells dark, cells merged into a group dimmed, kept tokens unshaded with an outline;
    ``"merged"``: each merged group filled with its colour, dropped cells dark, kept tokens left clear;
    ``"both"``: kept tokens outlined and merged groups coloured in one picture.
    """
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
                d.rectangle(cell, fill=(0, 0, 0, DROPPED_ALPHA))
            elif v in colors:
                if style == "kept":
                    d.rectangle(cell, fill=(0, 0, 0, MERGED_ALPHA))
                else:
                    d.rectangle(cell, fill=(*colors[v], 140), outline=(*colors[v], 255))
            elif style != "merged":
                d.rectangle(cell, outline=(255, 255, 255, 230), width=max(1, round(min(cw, ch) / 12)))
    return Image.alpha_composite(img, overlay).convert("RGB")


def _fit(h: int, w: int, size: int) -> tuple[int, int]:
    """(width, height) of a panel of aspect ``h x w`` whose longer side is ``size``."""
    return (size, max(1, round(size * h / w))) if w >= h else (max(1, round(size * w / h)), size)


def _grid_panel(image: Image.Image, groups: torch.Tensor, h: int, w: int, size: int, colors: dict,
                view: tuple[float, float, float, float] | None = None, style: str = "kept") -> Image.Image:
    """The image at its own aspect ratio, the grid's cells over ``view`` (the part of the image the model saw,
    as fractions x0, y0, x1, y1: a centre crop for CLIP-style processors; default: all of it, cells stretched
    when the processor resized the image to the grid's aspect); the part outside ``view`` is greyed."""
    image = image.convert("RGB")
    pw, ph = _fit(image.height, image.width, size)
    panel = image.resize((pw, ph))
    fx0, fy0, fx1, fy1 = view or (0.0, 0.0, 1.0, 1.0)
    box = (fx0 * pw, fy0 * ph, fx1 * pw, fy1 * ph)
    out = _paint(panel, groups.view(h, w).cpu().numpy(), colors, box, style)
    if view is not None and tuple(view) != (0.0, 0.0, 1.0, 1.0):
        veil = Image.new("RGBA", (pw, ph), (128, 128, 128, 150))
        ImageDraw.Draw(veil).rectangle(tuple(round(v) for v in box), fill=(0, 0, 0, 0))
        out = Image.alpha_composite(out.convert("RGBA"), veil).convert("RGB")
    return out


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


def _legend(groups: list[torch.Tensor], colors: dict, height: int, max_entries: int = 24) -> Image.Image:
    """Colour swatches of the merged groups with their sizes (largest first), in columns ``height`` tall."""
    g = torch.cat([x.flatten().cpu() for x in groups])
    sizes = sorted(((int((g == k).sum()), k) for k in colors), reverse=True)
    entry, col_w = 14, 92
    per_col = max(1, (height - 16) // entry)
    shown = sizes[:max_entries]
    cols = max(1, -(-len(shown) // per_col))
    img = Image.new("RGB", (cols * col_w + 8, height), (255, 255, 255))
    d = ImageDraw.Draw(img)
    d.text((4, 1), f"{len(sizes)} merged groups", fill=(0, 0, 0))
    for i, (n, k) in enumerate(shown):
        x, y = 4 + (i // per_col) * col_w, 16 + (i % per_col) * entry
        d.rectangle((x, y + 1, x + 10, y + 11), fill=colors[k], outline=(0, 0, 0))
        d.text((x + 15, y), f"{n} tokens", fill=(0, 0, 0))
    if len(sizes) > len(shown):
        d.text((4 + (cols - 1) * col_w, height - 13), f"+{len(sizes) - len(shown)} more", fill=(0, 0, 0))
    return img


def title_lines(title: str, width: int) -> list[str]:
    """``title`` broken into lines that fit ``width`` pixels in the default font (at least one word a line)."""
    if not title:
        return []
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1))).textlength
    lines: list[str] = []
    for word in title.split():
        if lines and measure(lines[-1] + " " + word) <= width - 4:
            lines[-1] += " " + word
        else:
            lines.append(word)
    return lines


def _row(panels: list[Image.Image], strips: list[Image.Image], title: str = "") -> Image.Image:
    """Panels side by side, strips under them, an optional title above (wrapped to the row's width)."""
    W = sum(p.width for p in panels) + 4 * (len(panels) - 1)
    lines = title_lines(title, W)
    head = 14 * len(lines)
    top = max(p.height for p in panels)
    canvas = Image.new("RGB", (W, head + top + sum(s.height + 4 for s in strips)), (255, 255, 255))
    for i, line in enumerate(lines):
        ImageDraw.Draw(canvas).text((2, 1 + 14 * i), line, fill=(0, 0, 0))
    x = 0
    for p in panels:
        canvas.paste(p, (x, head))
        x += p.width + 4
    y = head + top + 4
    for st in strips:
        canvas.paste(st, (0, y))
        y += st.height + 4
    return canvas


def draw_kept(image: Image.Image | list[Image.Image], groups: list[torch.Tensor], layouts: list[Layout],
              size: int = 336, view: tuple[float, float, float, float] | None = None, style: str = "auto"
              ) -> Image.Image:
    """Picture of the kept / merged tokens of one image, panels side by side:

    - :class:`Grid`: the image at its own aspect ratio, the cells over ``view`` (the fractions x0, y0, x1, y1 of
      the image the model saw, e.g. a centre crop; default: all of it);
    - :class:`MultiCrop` (LLaVA-NeXT, InternVL): the base grid (InternVL's thumbnail), then every crop in place over
      the padded image;
    - :class:`Video`: one panel per frame (``image`` may be the list of frames; a single image is reused);
    - :class:`Sequence`: a strip of cells in token order under the panels (black: dropped).

    Kept tokens are unshaded with an outline, dropped ones dark. When tokens were merged (VisionZip's contextual
    tokens, PACT's clusters, pooling), they are dimmed on that first row, and a second row shows each merged
    group in its own colour with a legend of group sizes.

    ``style="both"``: one row, kept tokens outlined and merged groups coloured in the same picture.
    ``groups`` come from :func:`token_groups`, one tensor per unit; a :class:`MultiCrop` takes one group per part
    (in token order, ``parts``) or one group of all its tokens.
    """
    frames = list(image) if isinstance(image, (list, tuple)) else [image]
    still = frames[0]
    colors = _colors_for(groups)

    def panels_of(style: str) -> tuple[list[Image.Image], list[Image.Image]]:
        panels: list[Image.Image] = []
        strips: list = []
        queue = list(groups)
        for layout in layouts:
            if not queue:
                raise ValueError(f"draw_kept: {len(layouts)} layouts but only {len(groups)} token groups")
            if isinstance(layout, MultiCrop):
                if queue[0].shape[0] == layout.num_tokens and len(layout.parts) > 1:
                    parts = list(torch.split(queue.pop(0), [p.num_tokens for p in layout.parts]))
                else:
                    parts, queue = queue[: len(layout.parts)], queue[len(layout.parts):]
                base, crops = (parts[-1], parts[:-1]) if layout.base_last else (parts[0], parts[1:])
                panels.append(_grid_panel(still, base, layout.base.h, layout.base.w, size, colors, style=style))
                if layout.crops:
                    panels.append(_crops_panel(still, crops, layout, size, colors))
                continue
            g = queue.pop(0)
            if g.shape[0] != layout.num_tokens:
                raise ValueError(f"draw_kept: a group of {g.shape[0]} tokens for {layout} ({layout.num_tokens} tokens)")
            if isinstance(layout, Grid):
                panels.append(_grid_panel(still, g, layout.h, layout.w, size, colors, view, style))
            elif isinstance(layout, Video):
                per = layout.h * layout.w
                for t in range(layout.t):
                    frame = frames[t] if len(frames) == layout.t else still
                    panels.append(_grid_panel(frame, g[t * per:(t + 1) * per], layout.h, layout.w, size, colors,
                                              style=style))
            elif isinstance(layout, Sequence):
                strips.append(g)
        if not panels:
            panels = [still.convert("RGB").resize(_fit(still.height, still.width, size))]
        W = sum(p.width for p in panels) + 4 * (len(panels) - 1)
        return panels, [_strip(g, W, colors) for g in strips]

    if not colors or style == "both":
        return _row(*panels_of("both" if colors else "kept"))
    n_kept = sum(int(((g >= 0) & ~torch.isin(g, torch.tensor(list(colors), dtype=g.dtype))).sum()) for g in groups)
    kept = _row(*panels_of("kept"), title=f"{n_kept} tokens kept as they are (outlined); merged: dimmed; dropped: dark")
    panels, strips = panels_of("merged")
    merged = _row(panels + [_legend(groups, colors, max(p.height for p in panels))], strips,
                  title="merged groups, one colour each (each group became one token)")
    canvas = Image.new("RGB", (max(kept.width, merged.width), kept.height + 6 + merged.height), (255, 255, 255))
    canvas.paste(kept, (0, 0))
    canvas.paste(merged, (0, kept.height + 6))
    return canvas


def _get(d, key):
    return getattr(d, key, None) if not isinstance(d, dict) else d.get(key)


def processor_view(processor, image: Image.Image) -> tuple[float, float, float, float] | None:
    """The part of ``image`` a CLIP-style image processor keeps (resize the shortest edge, then centre crop), as
    fractions (x0, y0, x1, y1) for :func:`draw_kept`'s ``view``; None when it keeps the whole image."""
    ip = getattr(processor, "image_processor", None)
    if ip is None or not getattr(ip, "do_center_crop", False):
        return None
    size, crop = getattr(ip, "size", None), getattr(ip, "crop_size", None)
    edge = _get(size, "shortest_edge") if size is not None else None
    ch, cw = (_get(crop, "height"), _get(crop, "width")) if crop is not None else (None, None)
    if not edge or not ch or not cw:
        return None
    w, h = image.size
    scale = edge / min(w, h)
    rw, rh = w * scale, h * scale
    fx, fy = min(1.0, cw / rw), min(1.0, ch / rh)
    return ((1 - fx) / 2, (1 - fy) / 2, (1 + fx) / 2, (1 + fy) / 2)


def caption_panel(picture: Image.Image, lines: list[str], width: int | None = None) -> Image.Image:
    """``picture`` with text lines under it (on white), ``width`` wide (default: the picture's)."""
    width = max(width or picture.width, picture.width)
    canvas = Image.new("RGB", (width, picture.height + 4 + 13 * len(lines)), (255, 255, 255))
    canvas.paste(picture, (0, 0))
    d = ImageDraw.Draw(canvas)
    for i, line in enumerate(lines):
        d.text((2, picture.height + 3 + 13 * i), line, fill=(0, 0, 0))
    return canvas
