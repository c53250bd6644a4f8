"""Packaging and package layout: what a non-editable install of the wheel holds and does, away from the checkout;
registries found by rule."""

import os
import shutil
import subprocess
import sys
import zipfile
from importlib import resources
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def test_bundled_configs_live_in_the_package_once():
    """The YAML files are package data (found through importlib.resources); the top-level ``configs/`` is the same
    folder, not a second copy."""
    packaged = resources.files("vtc") / "configs"
    names = {p.relative_to(ROOT / "vtc" / "configs").as_posix() for p in (ROOT / "vtc" / "configs").rglob("*.yaml")}
    assert "llava-1.5/fastv-50.yaml" in names and "qwen2-vl/visionzip-25.yaml" in names
    assert all((packaged / n).is_file() for n in names)
    assert (ROOT / "configs").resolve() == (ROOT / "vtc" / "configs").resolve()


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """Build the wheel from a copy of the sources (the checkout stays clean) and unpack it. The build runs offline
    without isolation, so it needs the build backend pyproject names (setuptools, at the version it asks for)
    installed here: skipped where it is not (e.g. a venv whose own older setuptools shadows the system's). Recent
    setuptools build wheels themselves, so the separate ``wheel`` requirement is not checked."""
    tomllib = pytest.importorskip("tomllib")
    from importlib import metadata

    from packaging.requirements import Requirement

    requires = tomllib.loads((ROOT / "pyproject.toml").read_text())["build-system"]["requires"]
    (backend,) = [r for r in map(Requirement, requires) if r.name == "setuptools"]
    try:
        have = metadata.version("setuptools")
    except metadata.PackageNotFoundError:
        have = None
    if have is None or not backend.specifier.contains(have, prereleases=True):
        pytest.skip(f"the build backend {backend} is not installed here (installed: setuptools {have})")
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    shutil.copytree(ROOT / "vtc", src / "vtc", ignore=shutil.ignore_patterns("__pycache__"))
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "--no-index",
         "-w", str(tmp / "dist"), str(src)],
        check=True, cwd=tmp, capture_output=True,
    )
    (whl,) = (tmp / "dist").glob("*.whl")
    return whl


def test_distribution_name_is_not_the_pypi_vtc(wheel):
    """``vtc`` on PyPI is an unrelated timecode library: the distribution is ``vtc-vlm``; the import name and the
    command stay ``vtc``."""
    with zipfile.ZipFile(wheel) as zf:
        meta = next(zf.read(n).decode() for n in zf.namelist() if n.endswith(".dist-info/METADATA"))
        entry_points = next(zf.read(n).decode() for n in zf.namelist() if n.endswith(".dist-info/entry_points.txt"))
        top = {n.split("/")[0] for n in zf.namelist() if not n.split("/")[0].endswith(".dist-info")}
    assert "Name: vtc-vlm" in meta.splitlines()
    assert "vtc = vtc.cli:main" in entry_points.splitlines()
    assert top == {"vtc"}


def _run_installed(wheel: Path, tmp_path: Path, code: str) -> subprocess.CompletedProcess:
    """Run ``code`` with the unpacked wheel as the only copy of vtc on the path, from a directory outside the
    checkout."""
    site = tmp_path / "site"
    with zipfile.ZipFile(wheel) as zf:
        zf.extractall(site)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["PYTHONPATH"] = str(site)
    work = tmp_path / "elsewhere"
    work.mkdir()
    return subprocess.run([sys.executable, "-c", code], cwd=work, env=env, capture_output=True, text=True)


def test_wheel_ships_the_bundled_configs(wheel, tmp_path):
    with zipfile.ZipFile(wheel) as zf:
        shipped = {n for n in zf.namelist() if n.endswith(".yaml")}
    expected = {"vtc/configs/" + p.relative_to(ROOT / "vtc" / "configs").as_posix()
                for p in (ROOT / "vtc" / "configs").rglob("*.yaml")}
    assert expected <= shipped
    res = _run_installed(wheel, tmp_path, (
        "import vtc, pathlib; c = vtc.load_config('qwen2-vl/visionzip-25'); "
        "assert pathlib.Path(vtc.__file__).parent.parent == pathlib.Path.cwd().parent / 'site', vtc.__file__; "
        "print(c.stages[0].method, vtc.load_config('llava-1.5/fastv-50.yaml').name)"
    ))
    assert res.returncode == 0, res.stderr
    assert res.stdout.split() == ["visionzip", "fastv-50"]


def _isolated(code: str, cwd: Path) -> subprocess.CompletedProcess:
    """Run ``code`` in a fresh interpreter from ``cwd`` with this checkout's vtc first on the path."""
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True, text=True)


def test_import_vtc_is_light_and_side_effect_free(tmp_path):
    """``import vtc`` imports neither transformers nor the demo package, and registers nothing with the Auto
    classes; the demo loader registers the 1D demo model on first use."""
    res = _isolated(
        "import sys, vtc\n"
        "heavy = sorted(m for m in sys.modules if m.split('.')[0] == 'transformers' or m.startswith('vtc.demo')"
        " or m.startswith('vtc.bench'))\n"
        "print(heavy)\n"
        "from transformers.models.auto.configuration_auto import CONFIG_MAPPING\n"
        "print('vtc_ordered_vlm' in CONFIG_MAPPING)\n"
        "import vtc.demo\nvtc.demo.load('1d')\n"
        "print('vtc_ordered_vlm' in CONFIG_MAPPING)\n",
        tmp_path,
    )
    assert res.returncode == 0, res.stderr
    assert res.stdout.split("\n")[:3] == ["[]", "False", "True"]


def test_bench_command_uses_the_package_not_the_working_directory(tmp_path):
    """``vtc bench`` runs the packaged benchmark from any directory: it neither needs nor imports an ``eval/``
    folder in the working directory, and nothing in the package edits ``sys.path``."""
    fake = tmp_path / "eval"
    fake.mkdir()
    (fake / "__init__.py").write_text("")
    (fake / "bench.py").write_text("def main(argv=None):\n    print('IMPOSTOR')\n    return 7\n")
    res = _isolated("import sys, vtc.cli\nsys.exit(vtc.cli.main(['bench', '--help']))", tmp_path)
    assert "IMPOSTOR" not in res.stdout and res.returncode == 0, res.stdout + res.stderr
    assert "--arch" in res.stdout and "tiny-qwen2-vl" in res.stdout
    offenders = [str(p.relative_to(ROOT)) for p in (ROOT / "vtc").rglob("*.py") if "sys.path" in p.read_text()]
    assert offenders == []


def test_training_and_probe_code_are_not_package_code(wheel):
    """The demo models' training recipe lives in eval/demo_training/ (run from a checkout), not in the wheel; no
    Python file lives under eval/results/."""
    with zipfile.ZipFile(wheel) as zf:
        shipped = [n for n in zf.namelist() if n.endswith(".py")]
    assert "vtc/demo/ordered_vlm.py" in shipped and "vtc/demo/task.py" in shipped
    assert not [n for n in shipped if "train" in n.rsplit("/", 1)[-1]]
    assert (ROOT / "eval" / "demo_training" / "train.py").is_file()
    assert sorted(str(p.relative_to(ROOT)) for p in (ROOT / "eval" / "results").rglob("*.py")) == []


def test_no_reference_to_a_design_document_that_is_not_shipped():
    """Docstrings and docs cite the README, not a design document that is not in the repository."""
    files = [*ROOT.glob("*.md"), *(ROOT / "vtc").rglob("*.py"), *(ROOT / "tests").rglob("*.py"),
             *(p for p in (ROOT / "eval").rglob("*") if p.suffix in (".py", ".md") and "results" not in p.parts)]
    name = "design" + ".md"
    assert not (ROOT / name).exists()
    assert sorted(str(p.relative_to(ROOT)) for p in files if name in p.read_text(encoding="utf-8")) == []


def test_adapters_are_found_by_the_same_rule_as_methods():
    """Every adapter class of a ``vtc/models`` module is registered with ``@register_adapter`` in its own file and
    found by importing the package's modules (no hard-coded list; the demo adapter is not special)."""
    import importlib
    import pkgutil

    import vtc.models as M

    assert "OrderedVLMForConditionalGeneration" in M.supported_models()
    defined = set()
    for info in pkgutil.iter_modules(M.__path__):
        mod = importlib.import_module(f"vtc.models.{info.name}")
        defined |= {c for c in vars(mod).values() if isinstance(c, type) and issubclass(c, M.ModelAdapter)
                    and c.__module__ == mod.__name__ and c.model_class_names}
    registered = {a for a in M._ADAPTERS if a.__module__.startswith("vtc.models.")}
    assert defined == registered and len(registered) >= 5
    for info in pkgutil.iter_modules(M.__path__):
        assert f'"{info.name}"' not in Path(M.__file__).read_text() or info.name in M._HELPERS


def test_one_model_loader(monkeypatch):
    """The CLI loads every model (bundled demo or ``--model PATH``) through :func:`vtc.demo.load`."""
    import vtc.demo
    from vtc import cli

    calls = []
    monkeypatch.setattr(vtc.demo, "load", lambda kind="grid", path=None, **kw: calls.append(str(path)) or ("m", "p"))
    # names are resolved first (bundled names, folders, cached hub ids; anything else fails fast): let this one through
    monkeypatch.setattr("vtc.model_names.resolve_model", lambda path, flag="--model": str(path))
    assert cli._load_model("some/vlm") == ("m", "p", "some/vlm")
    assert cli._load_model(None, "1d")[:2] == ("m", "p")
    assert calls == ["some/vlm", str(vtc.demo.ORDERED_MODEL_PATH)]


def test_demo_and_eval_load_through_one_loader(monkeypatch):
    """``vtc.demo.load`` and ``vtc eval``'s ``load_vlm`` are both :func:`vtc.loading.load_vlm`; its errors reach eval
    as :class:`EvalError` with the same message."""
    import vtc.demo
    import vtc.loading
    from vtc.evaluation import EvalError, generation

    calls = []
    monkeypatch.setattr(vtc.loading, "load_vlm", lambda path, **kw: calls.append((str(path), kw)) or ("m", "p"))
    assert vtc.demo.load("1d") == ("m", "p")
    assert generation.load_vlm("x/y", dtype="float16") == ("m", "p")
    assert calls == [(str(vtc.demo.ORDERED_MODEL_PATH), {"attn": "sdpa", "dtype": "float32"}),
                     ("x/y", {"device": "cpu", "dtype": "float16", "attn": "sdpa"})]
    monkeypatch.undo()
    with pytest.raises(EvalError, match="--dtype 'int3' is not supported"):
        generation.load_vlm(vtc.demo.GRID_MODEL_PATH, dtype="int3")
    with pytest.raises(vtc.ConfigError, match="--model .*is not a vision-language model|no usable config"):
        vtc.loading.load_vlm(Path(__file__).parent)


@pytest.mark.parametrize("family", ["llava", "llava_next", "qwen2_vl", "qwen2_5_vl"])
def test_dummy_inputs_come_from_the_adapter(family):
    """Family-specific synthetic inputs live behind the adapter (``adapter.dummy_inputs``, used by ``vtc bench``
    and the tests' builders): the model accepts them, and the placeholder counts match the tests' own geometry."""
    import torch
    from tiny_models import tiny_llava
    from tiny_models_next import num_image_tokens, tiny_llava_next
    from tiny_models_qwen import merged_tokens, tiny_qwen2_5_vl, tiny_qwen2_vl

    from vtc.models import get_adapter

    model, size, expected = {
        "llava": lambda: (tiny_llava(), None, 36),
        "llava_next": lambda: (tiny_llava_next(), (40, 72), num_image_tokens((40, 72))),
        "qwen2_vl": lambda: (tiny_qwen2_vl(), (24, 40), merged_tokens((1, 6, 10))),
        "qwen2_5_vl": lambda: (tiny_qwen2_5_vl(), (32, 32), merged_tokens((1, 8, 8))),
    }[family]()
    adapter = get_adapter(model)
    inputs = adapter.dummy_inputs([([3, 4], [5, 6, 7]), ([8], [9])], image_size=size,
                                  generator=torch.Generator().manual_seed(0))
    assert inputs["attention_mask"][1, 0] == 0 and bool(inputs["attention_mask"][0].all())  # left-padded
    n_vis = (inputs["input_ids"] == model.config.image_token_id).sum(1).tolist()
    assert n_vis == [expected, expected]
    with torch.no_grad():
        out = model(**inputs)
    assert out.logits.shape[:2] == inputs["input_ids"].shape


def test_readme_architecture_matches_the_code():
    """Every file the README's architecture diagram names exists, and every name it places in a file is defined
    there."""
    import importlib
    import re

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = readme.split("## Architecture", 1)[1].split("\n## ", 1)[0]
    diagram = section.split("```", 2)[1]
    root = Path(__file__).resolve().parents[1]
    paths = set(re.findall(r"vtc/[\w/<>]+\.py", section))
    assert len(paths) >= 8
    for p in paths:
        if "<" not in p:
            assert (root / p).is_file(), p
    where = {"Run": "vtc.runtime", "get_adapter": "vtc.models", "VisionRuntime": "vtc.runtime.vision",
             "run_vision_stages": "vtc.functional", "rebuild_prompt": "vtc.runtime.vision",
             "LLMRuntime": "vtc.runtime.llm", "_SlotSet": "vtc.runtime.llm", "VisionContext": "vtc.methods.base",
             "LLMContext": "vtc.methods.base", "RunView": "vtc.runtime.view", "ScorerMethod": "vtc.methods.base",
             "ScheduledScorer": "vtc.methods.schedule", "Reduction": "vtc.reduction", "compact": "vtc.reduction",
             "LlavaAdapter": "vtc.models.llava", "load_vlm": "vtc.loading"}
    for name, module in where.items():
        assert name in section, name
        assert hasattr(importlib.import_module(module), name), (module, name)
    for field in ("anchor", "valid", "source", "features", "sizes"):
        assert field in diagram and field in importlib.import_module("vtc.reduction").Reduction.__dataclass_fields__
    for method in ("encode_images", "project", "pack_images", "new_state", "reduce_vision", "reduce_llm", "score"):
        assert method in diagram
