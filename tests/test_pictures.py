"""What `vtc demo` and `vtc show` draw (issue 20, points 11 and 12): the demo's side-by-side picture of a vision-side
and an LLM-side method with answers, tokens and times; kept tokens outlined, merged groups on a second row with a
legend, dropped tokens dark, and the image's aspect ratio kept."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from vtc.layout import Grid
from vtc.viz import DROPPED_ALPHA, draw_kept, group_colors, processor_view, title_lines

GREY = (200, 200, 200)


def _near(px, rgb, tol: int = 12) -> bool:
    return all(abs(a - b) <= tol for a, b in zip(px, rgb))


def test_merging_draws_kept_outlined_and_merged_groups_on_a_second_row():
    img = Image.new("RGB", (100, 50), GREY)  # 2:1 image, 2 x 2 grid: cells 40 x 20, the aspect kept
    groups = [torch.tensor([0, 1, 1, -1])]  # token 0 kept as it is, 1 and 2 merged into one, 3 dropped
    out = draw_kept(img, groups, [Grid(2, 2)], size=80)
    top = 14 * len(title_lines("1 tokens kept as they are (outlined); merged: dimmed; dropped: dark", 80))
    assert top >= 28  # the first row's title, wrapped to the panel's width (never cut off)
    kept, merged, dropped = (out.getpixel((20, top + 10)), out.getpixel((60, top + 10)),
                             out.getpixel((60, top + 30)))
    assert _near(kept, GREY)  # unshaded
    assert _near(out.getpixel((1, top + 1)), (255, 255, 255), tol=30)  # with a light outline
    assert max(dropped) < max(merged) < 180  # merged dimmed, dropped darker
    assert _near(dropped, tuple(round(c * (255 - DROPPED_ALPHA) / 255) for c in GREY), tol=3)
    row2 = out.width  # the second row is the widest: panel + legend
    y2 = top + 40 + 6 + 14 * len(title_lines("merged groups, one colour each (each group became one token)", row2))
    # second row: the merged group in colour, the kept token clear
    colour = out.getpixel((60, y2 + 10))
    assert colour == out.getpixel((20, y2 + 30)) and len(set(colour)) > 1 and _near(out.getpixel((20, y2 + 10)), GREY)
    legend = out.crop((84, y2, out.width, y2 + 40))
    assert group_colors(1)[0] in set(legend.getdata())  # its swatch in the legend
    assert out.size[0] > 80 + 4  # the legend beside the panel
    one = draw_kept(img, groups, [Grid(2, 2)], size=80, style="both")  # the demo's single-row form
    assert one.size == (80, 40) and one.getpixel((60, 10)) == out.getpixel((60, y2 + 10))


def test_picture_keeps_the_image_aspect_and_shows_the_centre_crop():
    from transformers import CLIPImageProcessor

    class P:
        image_processor = CLIPImageProcessor(size={"shortest_edge": 112}, crop_size={"height": 112, "width": 112})

    img = Image.new("RGB", (200, 100), GREY)
    view = processor_view(P(), img)
    assert view == pytest.approx((0.25, 0.0, 0.75, 1.0))
    out = draw_kept(img, [torch.tensor([0, -1, 1, 2])], [Grid(2, 2)], size=200, view=view)
    assert out.size == (200, 100)
    assert _near(out.getpixel((75, 25)), GREY) and max(out.getpixel((125, 25))) < 80  # cells over the crop only
    assert not _near(out.getpixel((10, 50)), GREY) and max(out.getpixel((10, 50))) > 80  # outside: veiled, not dark


def test_vtc_show_merging_method_on_a_photo_like_image(tmp_path, capsys):
    from test_eval import build_tiny_vlm

    from vtc.cli import main

    path = build_tiny_vlm(tmp_path / "m")
    g = torch.Generator().manual_seed(0)
    photo = (torch.rand(60, 90, 3, generator=g) * 255).to(torch.uint8).numpy()
    Image.fromarray(photo).save(tmp_path / "photo.png")
    cfg = tmp_path / "vz.yaml"
    cfg.write_text("stages:\n  - {method: visionzip, budget: 12, dominant: 8, contextual: 4}\n")
    out = tmp_path / "kept.png"
    assert main(["show", "--model", str(path), "--image", str(tmp_path / "photo.png"), "--prompt", "what color ?",
                 "--config", str(cfg), "--out", str(out)]) == 0
    assert "(4 of them merged groups)" in capsys.readouterr().out
    pic = Image.open(out)
    first_row = 14 + 224  # a 3:2 photo, longer side 336: the panel is 336 x 224
    assert pic.width > 336 and pic.height == first_row + 6 + 14 + 224


def test_demo_picture_side_by_side(tmp_path, capsys):
    from vtc.cli import LLM_SIDE_NOTE, main

    out = tmp_path / "demo.png"
    assert main(["demo", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "side by side" in text and "VisionZip 25% (vision side)" in text and "FastV 25% at layer 2" in text
    assert f"note: {LLM_SIDE_NOTE}" in text and "49 tokens" in text
    pic = Image.open(out)
    # three captioned panels and the note; VisionZip's merged groups on a second row (with its legend) under its
    # kept tokens, so its panel is wider and taller than the others
    assert pic.width > 3 * 224 + 2 * 8 and pic.height > 2 * 224 + 4 * 13
