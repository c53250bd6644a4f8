"""Every shipped config loads; the CLI parses; kept-token drawing puts pixels where the tokens are."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image

import vtc
from vtc.cli import build_parser
from vtc.viz import draw_kept, title_lines

CONFIGS = sorted((Path(__file__).resolve().parent.parent / "configs").rglob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=[str(p.relative_to(p.parents[1])) for p in CONFIGS])
def test_shipped_config_loads(path):
    cfg = vtc.load_config(path)
    assert cfg.stages, f"{path} has no stages"


def test_bundled_config_by_name():
    assert vtc.load_config("llava-1.5/fastv-50").stages[0].method == "fastv"


def test_cli_parser():
    args = build_parser().parse_args(["demo"])
    assert args.model == "grid" and args.out.endswith(".png")
    with pytest.raises(SystemExit):
        build_parser().parse_args(["nope"])


def test_draw_kept_pixels():
    img = Image.new("RGB", (40, 40), (200, 200, 200))
    groups = [torch.tensor([0, -1, 1, 1])]  # 2x2 grid: kept, dropped, merged pair
    out = draw_kept(img, groups, [vtc.Grid(2, 2)], size=40)
    # a title over each row (wrapped to its width): kept tokens, then (second row) the merged groups
    top = 14 * len(title_lines("1 tokens kept as they are (outlined); merged: dimmed; dropped: dark", 40))
    kept = out.getpixel((10, top + 10))
    dropped = out.getpixel((30, top + 10))
    assert sum(dropped) < sum(kept) / 3  # dropped cells are darkened
    y2 = top + 40 + 6 + 14 * len(title_lines("merged groups, one colour each (each group became one token)", out.width))
    merged_a, merged_b = out.getpixel((10, y2 + 30)), out.getpixel((30, y2 + 30))
    assert merged_a == merged_b != out.getpixel((10, y2 + 10))  # a merged group shares one colour


@pytest.mark.parametrize("kind, before, after", [("grid", 196, 49), ("1d", 32, 8)])
def test_vtc_demo_runs_offline(kind, before, after, tmp_path, capsys):
    """`vtc demo` with no config: both answers, visual tokens before / after, prefill times, the PNG."""
    from vtc.cli import main

    out = tmp_path / "kept.png"
    assert main(["demo", "--model", kind, "--out", str(out)]) == 0
    lines = capsys.readouterr().out.splitlines()
    rows = {key: next(line.split() for line in lines if line.startswith(f"{key:14}")) for key in ("uncompressed", "vtc")}
    assert int(rows["uncompressed"][-2]) == before and int(rows["vtc"][-2]) == after  # answers may be several words
    assert float(rows["uncompressed"][-1]) > 0 and float(rows["vtc"][-1]) > 0
    assert Image.open(out).size[0] >= 112


def test_demo_training_is_a_checkout_script_not_a_command(capsys):
    """Training the demo models is research code in eval/demo_training/ (every option on its command line); the
    installed ``vtc`` command has no ``train-demo``."""
    from eval.demo_training.train import main as train_main
    from vtc.cli import main

    with pytest.raises(SystemExit) as exit_info:
        train_main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "eval/train_demo.py" in out and all(o in out for o in ("--model", "--reuse-stage1", "--reuse-lm", "--seed"))
    with pytest.raises(SystemExit):
        train_main(["--model", "big"])
    assert "invalid choice: 'big'" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        main(["train-demo", "--help"])
    assert exit_info.value.code == 2 and "invalid choice: 'train-demo'" in capsys.readouterr().err
