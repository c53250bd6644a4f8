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


#: the real models each bundled config folder is written for: bench presets with the published shapes, or (tiny) the
#: bundled demo models' own configs
CONFIG_MODELS = {
    "llava-1.5": ["llava-1.5-7b", "llava-1.5-13b"], "llava-next": ["llava-next-7b"],
    "qwen2-vl": ["qwen2-vl-7b", "qwen2.5-vl-7b"], "qwen3-vl": ["qwen3-vl-8b"], "gemma3": ["gemma3-4b", "gemma3-12b"],
    "llava-onevision": ["llava-onevision-7b"], "smolvlm": ["smolvlm2-2.2b"], "mistral3": ["mistral-small-3.1-24b"],
    "internvl3": ["internvl3-8b"], "tiny": ["vtc/assets/tiny-llava", "vtc/assets/tiny-1d"],
}


def _text_shape(model: str) -> tuple[int, int]:
    """(decoder layers, query heads) of a preset or a bundled demo model."""
    import json

    from vtc.bench.presets import ARCHS

    if model in ARCHS:
        text = ARCHS[model].text
    else:
        text = json.loads((CONFIGS[0].parents[2] / model / "config.json").read_text())["text_config"]
    return int(text["num_hidden_layers"]), int(text["num_attention_heads"])


def test_every_config_folder_names_its_models():
    assert {p.parent.name for p in CONFIGS} == set(CONFIG_MODELS)


@pytest.mark.parametrize("folder", sorted(CONFIG_MODELS))
def test_bundled_configs_fit_the_real_models(folder):
    """Every config of a folder attaches to the real models it is for (the tests run them on tiny models built deep
    enough, so only this check sees the real depth): its LLM-side layers exist there (the attach-time check), and a
    SparseVLM head selection picks fewer heads than the model has (else it silently selects all)."""
    paths = [p for p in CONFIGS if p.parent.name == folder]
    assert paths
    for model in CONFIG_MODELS[folder]:
        layers, heads = _text_shape(model)
        for path in paths:
            for stage in vtc.load_config(path).stages:
                stage.validate_for_model(layers)  # ConfigError names the layer and the allowed range
                if getattr(stage, "heads", None) is not None and getattr(stage, "version", None) == 2:
                    assert stage.heads < heads, f"{path.name} on {model}: heads={stage.heads} of {heads}"


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
