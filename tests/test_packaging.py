"""Packaging: what a non-editable install of the wheel holds and does, away from the checkout."""

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
    """Build the wheel from a copy of the sources (the checkout stays clean) and unpack it."""
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
