"""The ``vtc`` command reports wrong input as one line naming the file / option and the problem, exit status 2,
before any model is loaded where the input can be checked first; other errors are one line plus a ``--debug``
hint (issue 17, point 3)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

import vtc.cli as cli
from vtc.cli import main

BAD_LAYER = "stages: [{method: fastv, layer: true, budget: 0.5}]"


@pytest.fixture
def no_model(monkeypatch):
    """Loading a model fails the test: every error below must be found before that."""
    import vtc.evaluation.runner as runner

    def boom(*args, **kwargs):
        raise AssertionError("a model was loaded before the input was checked")

    monkeypatch.setattr(cli, "_load_model", boom)
    monkeypatch.setattr(runner, "load_vlm", boom)


def _one_line(capsys, *needles: str) -> str:
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines
    for n in needles:
        assert n in lines[0], (n, lines[0])
    return lines[0]


@pytest.fixture
def png(tmp_path):
    path = tmp_path / "img.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(path)
    return path


def _bad_images(tmp_path, png):
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes(png.read_bytes()[: png.stat().st_size // 2])
    corrupt = tmp_path / "corrupt.png"
    corrupt.write_bytes(png.read_bytes()[:40] + bytes(range(256)) * 4)
    text = tmp_path / "notes.jpg"
    text.write_text("not an image")
    return {"missing": (tmp_path / "nope.png", "file not found"), "folder": (tmp_path, "not a file"),
            "truncated": (truncated, "corrupt or truncated image"), "corrupt": (corrupt, "not a readable image (corrupt"),
            "text": (text, "not a readable image")}


@pytest.mark.parametrize("kind", ["missing", "folder", "truncated", "corrupt", "text"])
@pytest.mark.parametrize("command", ["generate", "show"])
def test_bad_image(command, kind, tmp_path, png, no_model, capsys):
    path, problem = _bad_images(tmp_path, png)[kind]
    argv = [command, "--model", "m", "--image", str(path), "--prompt", "q?", "--config", "tiny/fastv-25"]
    assert main(argv + (["--out", str(tmp_path / "k.png")] if command == "show" else [])) == 2
    _one_line(capsys, f"--image {path}: {problem}")


@pytest.mark.parametrize("kind", ["missing-folder", "folder", "under-a-file", "extension"])
@pytest.mark.parametrize("command", ["show", "demo"])
def test_unwritable_out(command, kind, tmp_path, png, no_model, capsys):
    out, problem = {"missing-folder": (tmp_path / "no" / "k.png", f"{tmp_path / 'no'} is not an existing folder"),
                    "folder": (tmp_path, "is a folder"),
                    "under-a-file": (png / "k.png", f"{png} is not an existing folder"),
                    "extension": (tmp_path / "k.xyz", "unknown picture format '.xyz'")}[kind]
    argv = (["show", "--model", "m", "--image", str(png), "--prompt", "q?", "--config", "tiny/fastv-25"]
            if command == "show" else ["demo"])
    assert main(argv + ["--out", str(out)]) == 2
    _one_line(capsys, f"--out {out}: {problem}")
    assert not (tmp_path / "k.xyz").exists()


def test_demo_negative_index(no_model, capsys):
    assert main(["demo", "--index", "-1"]) == 2
    _one_line(capsys, "--index -1: must be >= 0")


@pytest.mark.parametrize("command", ["demo", "generate", "show", "eval"])
def test_inline_yaml_is_read_by_every_command(command, tmp_path, png, no_model, capsys):
    """The one loader reads inline YAML for every command: a bad field is reported as such (not 'file not
    found'), before the model loads."""
    argv = {"demo": ["demo"], "generate": ["generate", "--model", "m", "--image", str(png), "--prompt", "q?"],
            "show": ["show", "--model", "m", "--image", str(png), "--prompt", "q?", "--out", str(tmp_path / "k.png")],
            "eval": ["eval", "--task", "synthetic", "--limit", "2", "--out", str(tmp_path / "ev")]}[command]
    assert main(argv + ["--config", BAD_LAYER]) == 2
    _one_line(capsys, "config error", "stages[0] (fastv).layer")


def test_directory_config(tmp_path, no_model, capsys):
    assert main(["demo", "--config", str(tmp_path)]) == 2
    _one_line(capsys, f"config path {tmp_path} is a directory")


def test_inline_yaml_runs(tmp_path, capsys):
    assert main(["demo", "--config", "stages: [{method: fastv, layer: 2, budget: 0.5}]",
                 "--out", str(tmp_path / "k.png")]) == 0
    assert (tmp_path / "k.png").exists()


def _vqav2(tmp_path, image_id, encoding="utf-8"):
    data = tmp_path / "vqav2"
    (data / "val2014").mkdir(parents=True)
    doc = {"data_subtype": "val2014", "questions": [{"question_id": 1, "image_id": 42, "question": "a?"},
                                                    {"question_id": 2, "image_id": image_id, "question": "b?"}]}
    path = data / "v2_OpenEnded_mscoco_val2014_questions.json"
    path.write_text(json.dumps(doc), encoding=encoding)
    return data, path


def test_vqav2_image_id_not_an_integer(tmp_path, no_model, capsys):
    data, path = _vqav2(tmp_path, "COCO_42")
    assert main(["eval", "--task", "vqav2", "--model", "m", "--data", str(data), "--out", str(tmp_path / "o")]) == 2
    _one_line(capsys, f"{path}: questions[1].image_id must be an integer", "'COCO_42'")


@pytest.mark.parametrize("encoding", ["utf-16", "utf-16-le"])
def test_utf16_json(tmp_path, encoding, no_model, capsys):
    data, path = _vqav2(tmp_path, 7, encoding)
    assert main(["eval", "--task", "vqav2", "--model", "m", "--data", str(data), "--out", str(tmp_path / "o")]) == 2
    _one_line(capsys, f"{path}: not UTF-8 text (it looks like UTF-16")


def test_eval_unwritable_out(tmp_path, png, no_model, capsys):
    out = png / "results"
    assert main(["eval", "--task", "synthetic", "--limit", "2", "--out", str(out)]) == 2
    _one_line(capsys, f"--out {out}: {png} is a file, not a folder")


def test_unexpected_errors_are_one_line_with_a_debug_hint(monkeypatch, png, capsys):
    def fails(*args, **kwargs):
        raise RuntimeError("something broke\nin two lines")

    monkeypatch.setattr(cli, "_load_model", fails)
    argv = ["generate", "--model", "m", "--image", str(png), "--prompt", "q?"]
    assert main(argv) == 1
    _one_line(capsys, "vtc: error: RuntimeError: something broke; in two lines", "run with `--debug` for the traceback")
    with pytest.raises(RuntimeError, match="something broke"):
        main(["--debug", *argv])
    with pytest.raises(RuntimeError, match="something broke"):
        main([*argv, "--debug"])


@pytest.fixture
def no_bench_model(monkeypatch):
    import vtc.bench.report as report

    def boom(*args, **kwargs):
        raise AssertionError("the benchmark model was built before the input was checked")

    monkeypatch.setattr(report, "build_model", boom)


def test_bench_checks_config_and_out_before_building(tmp_path, png, no_bench_model, capsys):
    """vtc bench: a bad config and an unwritable --out are one-line errors (exit 2) before the model is built."""
    assert main(["bench", "--arch", "tiny", "--config", BAD_LAYER]) == 2
    _one_line(capsys, "--config", "layer")
    assert main(["bench", "--arch", "tiny", "--config", "tiny/fastv-25", "--out", str(png / "results")]) == 2
    _one_line(capsys, f"--out {png / 'results'}: cannot write there")
