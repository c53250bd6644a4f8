"""``vtc show``: the kept-token pictures of every layout, checked pixel by pixel on synthetic cases, and the
picture layouts of each family (NeXT crops in place, Qwen2-VL merged grids) against what a run really kept."""

from __future__ import annotations

import functools

import pytest
import torch
from PIL import Image

import vtc
from vtc.layout import Grid, MultiCrop, Sequence, Video
from vtc.models import get_adapter
from vtc.viz import PADDING, draw_kept, select_stages, title_lines, token_groups

GREY = (200, 200, 200)


def _dark(px) -> bool:
    return max(px) < 80


def _near(px, rgb, tol: int = 12) -> bool:
    return all(abs(a - b) <= tol for a, b in zip(px, rgb))


def test_grid_panel_follows_the_grid_aspect():
    img = Image.new("RGB", (100, 50), GREY)
    out = draw_kept(img, [torch.tensor([0, 1, -1, 2, 3, 4, 5, -1])], [Grid(2, 4)], size=80)
    assert out.size == (80, 40)  # 2 x 4 cells of 20 px
    for i, v in enumerate([0, 1, -1, 2, 3, 4, 5, -1]):
        px = out.getpixel((i % 4 * 20 + 10, i // 4 * 20 + 10))
        assert _dark(px) if v < 0 else _near(px, GREY), (i, px)


def test_multicrop_draws_each_crop_in_place():
    """Base 2x2, two 2x2 crops side by side (1 x 2), the image in the middle two columns of the 2 x 4 crop map."""
    img = Image.new("RGB", (60, 60), GREY)
    base = torch.tensor([0, -1, -1, 1])
    crop0 = torch.tensor([2, -1, 3, 4])  # crop map columns 0-1
    crop1 = torch.tensor([-1, 5, 6, -1])  # columns 2-3
    layout = MultiCrop(Grid(2, 2), (Grid(2, 2), Grid(2, 2)), crop_rows=1, crop_cols=2, image_box=(0, 2, 1, 3))
    out = draw_kept(img, [base, crop0, crop1], [layout], size=80)
    assert out.size == (80 + 4 + 80, 80)
    for i, v in enumerate(base.tolist()):  # base panel: 40 px cells
        px = out.getpixel((i % 2 * 40 + 20, i // 2 * 40 + 20))
        assert _dark(px) if v < 0 else _near(px, GREY)
    tiled = [[2, -1, -1, 5], [3, 4, 6, -1]]  # crops side by side, row-major inside each crop
    for r in range(2):
        for c in range(4):
            px = out.getpixel((84 + c * 20 + 10, r * 20 + 10))
            inside = 1 <= c < 3
            if tiled[r][c] < 0:
                assert _dark(px), (r, c, px)
            else:
                assert _near(px, GREY if inside else PADDING), (r, c, px)
    # one group of all the tokens gives the same picture as one group per part
    assert list(draw_kept(img, [torch.cat([base, crop0, crop1])], [layout], size=80).getdata()) == list(out.getdata())


def test_merged_groups_share_one_colour_across_panels():
    img = Image.new("RGB", (40, 40), GREY)
    groups = [torch.tensor([0, 1, 2, 7]), torch.tensor([3, 7, 4, 5])]  # id 7 merges tokens of both units
    out = draw_kept(img, groups, [Grid(2, 2), Grid(2, 2)], size=40)
    head = 14 * len(title_lines("6 tokens kept as they are (outlined); merged: dimmed; dropped: dark", 84))
    # the second row (merged groups) under the kept row, each with its title wrapped to the row's width
    y = head + 40 + 6 + 14 * len(title_lines("merged groups, one colour each (each group became one token)", out.width))
    a, b, kept = out.getpixel((30, y + 30)), out.getpixel((44 + 30, y + 10)), out.getpixel((10, y + 10))
    assert a == b and not _near(a, kept) and _near(kept, GREY)
    # first row: the kept tokens clear, the merged ones dimmed (not coloured), the same in both panels
    dim, clear = out.getpixel((30, head + 30)), out.getpixel((10, head + 10))
    assert dim == out.getpixel((44 + 30, head + 10)) and _near(clear, GREY) and max(dim) < 160 and len(set(dim)) == 1


def test_video_frames_panel_per_frame_and_strip_for_sequences():
    frames = [Image.new("RGB", (20, 20), (200, 40, 40)), Image.new("RGB", (20, 20), (40, 40, 200))]
    out = draw_kept(frames, [torch.tensor([0, -1, 1, 2, 3, 4, -1, 5])], [Video(2, 2, 2)], size=40)
    assert out.size == (84, 40)
    assert _near(out.getpixel((10, 30)), (200, 40, 40)) and _dark(out.getpixel((30, 10)))
    assert _near(out.getpixel((44 + 10, 10)), (40, 40, 200)) and _dark(out.getpixel((44 + 10, 30)))
    seq = draw_kept(frames[0], [torch.tensor([0, 1, -1, 2])], [Sequence(4, True)], size=48)
    y = 48 + 4 + 6  # strip under the (placeholder) panel, 12 px cells
    assert [_dark(seq.getpixel((x * 12 + 6, y))) for x in range(4)] == [False, False, True, False]


def test_bad_groups_are_errors():
    img = Image.new("RGB", (20, 20))
    with pytest.raises(ValueError, match="layouts but only"):
        draw_kept(img, [torch.zeros(4, dtype=torch.long)], [Grid(2, 2), Grid(2, 2)])
    with pytest.raises(ValueError, match="a group of 3 tokens"):
        draw_kept(img, [torch.zeros(3, dtype=torch.long)], [Grid(2, 2)])


# ---- the families' picture layouts against real runs ---------------------------------------------------------------
@functools.cache
def _next_model():
    from tiny_models_next import tiny_llava_next

    return tiny_llava_next("sdpa")


def test_llava_next_crops_in_place_and_llm_side():
    from tiny_models_next import next_inputs

    m = _next_model()
    inputs = next_inputs(m, sizes=[(90, 30)])  # (H, W): 2 x 1 crops, padded left and right
    ad = get_adapter(m)
    [layout] = ad.picture_layouts(inputs, 0, "vision")
    assert isinstance(layout, MultiCrop) and (layout.crop_rows, layout.crop_cols) == (2, 1)
    top, bottom, left, right = layout.image_box
    assert (top, bottom) == (0, 12) and 0 < left < right < 6  # the 30 px wide image sits in the middle
    with vtc.compress(m, {"stages": [{"method": "random", "budget": 7}]}) as run:
        m(**inputs)
    groups = token_groups(run.stats, 0)
    assert [int((g >= 0).sum()) for g in groups] == [7, 7, 7]
    image = Image.new("RGB", (30, 90), GREY)
    out = draw_kept(image, groups, [layout], size=120)
    # crops panel: 12 x 6 cells of 10 px after the base panel (the 30 x 90 image at its aspect: 40 px wide); the
    # padding columns are padding-grey
    tiled = torch.cat([groups[1].view(6, 6), groups[2].view(6, 6)])
    for r in range(12):
        for c in range(6):
            px = out.getpixel((44 + c * 10 + 5, r * 10 + 5))
            if tiled[r, c] < 0:
                assert _dark(px)
            else:
                assert _near(px, GREY if left <= c < right else PADDING, tol=20), (r, c, px)
    llm = ad.picture_layouts(inputs, 0, "llm")
    assert llm == [Grid(6, 6), Grid(12, right - left)]
    with vtc.compress(m, {"stages": [{"method": "random", "layer": 1, "budget": 9}]}) as run:
        m(**inputs)
    groups = token_groups(run.stats, 0, num_tokens=[lay.num_tokens for lay in llm])
    assert sum(int((g >= 0).sum()) for g in groups) == 9
    assert draw_kept(image, groups, llm, size=120).size[1] == 120


@pytest.mark.parametrize("kind", ["image", "video"])
def test_qwen2_vl_merged_grid_geometry(kind):
    from tiny_models_qwen import build_inputs, tiny_qwen2_vl

    m = tiny_qwen2_vl()
    grid = (1, 8, 12) if kind == "image" else (2, 8, 12)  # patches; 2x2 merge -> 4 x 6 tokens (per frame)
    inputs = build_inputs([[[5, 6], (kind, grid), [7, 8, 9]]])
    ad = get_adapter(m)
    assert ad.unit_layouts(inputs, 0) == [Grid(4, 6)]
    with pytest.raises(ValueError, match="does not exist"):
        ad.unit_layouts(inputs, 5)
    with vtc.compress(m, {"stages": [{"method": "random", "budget": 10}]}) as run:
        m(**inputs)
    [g] = token_groups(run.stats, 0)
    assert g.shape[0] == 24 and int((g >= 0).sum()) == 10
    out = draw_kept(Image.new("RGB", (120, 80), GREY), [g], ad.unit_layouts(inputs, 0), size=120)
    assert out.size == (120, 80)  # the grid's 2:3 aspect, 20 px cells
    for i, v in enumerate(g.tolist()):
        px = out.getpixel((i % 6 * 20 + 10, i // 6 * 20 + 10))
        assert _dark(px) if v < 0 else _near(px, GREY)


def test_select_stages_range():
    from vtc.runtime.stats import StageStats, Stats

    stats = Stats(stages=[StageStats(0, "visionzip", "vision", None), StageStats(1, "fastv", "llm", 2)])
    assert [s.method for s in select_stages(stats, 0)] == ["visionzip"]
    assert len(select_stages(stats)) == 2
    with pytest.raises(ValueError, match=r"stage=2 is out of range.*0: visionzip \(vision\), 1: fastv @ layer 2"):
        select_stages(stats, 2)


# ---- the command -----------------------------------------------------------------------------------------------
def test_vtc_show_stage_option(capsys, tmp_path):
    """Tiny LLaVA with 7 x 7 patches: random keeps 20 on the vision side, then FastV halves them at layer 2."""
    from test_eval import build_tiny_vlm

    from vtc.cli import main

    path = build_tiny_vlm(tmp_path / "m")
    Image.new("RGB", (64, 64), GREY).save(tmp_path / "img.png")
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text("stages:\n  - {method: random, budget: 20}\n  - {method: fastv, layer: 2, budget: 0.5}\n")
    counts = {}
    for stage in (None, 0, 1):
        out = tmp_path / f"kept{stage}.png"
        argv = ["show", "--model", str(path), "--image", str(tmp_path / "img.png"), "--prompt",
                "what color is the circle ?", "--config", str(cfg), "--out", str(out)]
        assert main(argv + ([] if stage is None else ["--stage", str(stage)])) == 0
        pic = Image.open(out).convert("RGB")
        assert pic.size == (336, 336)
        cell = 336 / 7
        counts[stage] = sum(not _dark(pic.getpixel((int((i % 7 + 0.5) * cell), int((i // 7 + 0.5) * cell))))
                            for i in range(49))
    assert counts == {None: 10, 0: 20, 1: 10}
    assert main(argv + ["--stage", "2"]) == 2  # one line on stderr, exit code 2 (issue 17: no traceback)
    assert "stage=2 is out of range" in capsys.readouterr().err


def test_show_draws_every_cut_of_a_progressive_method(tmp_path):
    """PyramidDrop's two cuts are two stages of ``--stage``: 49 -> 24 (entering layer 1) -> 12 (layer 2); then
    DART keeps 5 entering layer 3."""
    from test_eval import build_tiny_vlm

    from vtc.cli import main

    path = build_tiny_vlm(tmp_path / "m")
    Image.new("RGB", (64, 64), GREY).save(tmp_path / "img.png")
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text("stages:\n  - {method: pdrop, layers: [1, 2], keep: [0.5, 0.25]}\n"
                   "  - {method: dart, layer: 3, budget: 5, pivots_image: 1, pivots_text: 2}\n")
    counts = {}
    for stage in (None, 0, 1, 2):
        out = tmp_path / f"kept{stage}.png"
        argv = ["show", "--model", str(path), "--image", str(tmp_path / "img.png"), "--prompt",
                "what color is the circle ?", "--config", str(cfg), "--out", str(out)]
        assert main(argv + ([] if stage is None else ["--stage", str(stage)])) == 0
        pic = Image.open(out).convert("RGB")
        cell = 336 / 7
        counts[stage] = sum(not _dark(pic.getpixel((int((i % 7 + 0.5) * cell), int((i // 7 + 0.5) * cell))))
                            for i in range(49))
    assert counts == {None: 5, 0: 24, 1: 12, 2: 5}
