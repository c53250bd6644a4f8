"""`python -m eval.accuracy_vs_budget` end to end on a few test questions: every listed method and composition
runs on the shipped demo models at every budget, and the table, JSON and plot are written."""

from __future__ import annotations

import json

import pytest

from vtc.demo import GRID_MODEL_PATH, ORDERED_MODEL_PATH


def test_accuracy_vs_budget_runs_every_config(tmp_path):
    from eval.accuracy_vs_budget import FRACTIONS, grid_configs, ordered_configs, run

    if not (GRID_MODEL_PATH / "model.safetensors").exists() or not (ORDERED_MODEL_PATH / "model.safetensors").exists():
        pytest.skip("the demo weights are not installed")
    res = run(4, tmp_path, batch_size=4)
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["n"] == 4 and (tmp_path / "accuracy_vs_budget.png").stat().st_size > 0
    for kind, configs in (("grid", grid_configs()), ("1d", ordered_configs())):
        table = res["models"][kind]["table"]
        assert set(table) == {"uncompressed", *configs}
        for name in configs:
            assert [float(f) for f in table[name]] == list(FRACTIONS)
            for cell in table[name].values():
                assert 0.0 <= cell["accuracy"] <= 1.0 and cell["visual_tokens"] is not None
        total = 196 if kind == "grid" else 32
        # fixed-budget vision-side methods keep exactly their budget
        first = "random" if kind == "grid" else "prefix"
        assert [table[first][str(f)]["visual_tokens"] for f in FRACTIONS] == [
            max(1, round(f * total)) for f in FRACTIONS
        ]
    md = (tmp_path / "results.md").read_text()
    assert "visionzip + pact" in md and "prefix" in md
