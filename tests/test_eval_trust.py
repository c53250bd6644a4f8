"""vtc eval results one can trust (issue 20): VQA accuracy with few references, a cache keyed on the data,
side-by-side timings, your own data (--task custom), bundled models by name, a seeded stratified --limit,
agreement / per-category / bootstrap intervals, POPE's unclear answers, and the accuracy-vs-tokens plot."""

from __future__ import annotations

import csv
import json
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from test_eval import _predictions, _results, _yaml, build_tiny_vlm, write_pope, write_vqav2

from vtc.evaluation import metrics as M
from vtc.evaluation.cli import main as eval_main
from vtc.evaluation.confidence import bootstrap_ci, mean_stat, median_iqr, paired_ratio_ci
from vtc.evaluation.datasets import TASKS, DatasetError, EvalSample, load_task, sample_limit
from vtc.evaluation.generation import BatchAnswerer
from vtc.evaluation.scoring import agreement, score

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def tiny_vlm(tmp_path_factory) -> str:
    return str(build_tiny_vlm(tmp_path_factory.mktemp("tiny-vlm")))


def _args(model, data, out, *extra):
    return ["--task", "vqav2", "--model", model, "--data", str(data), "--batch-size", "2", "--max-new-tokens", "2",
            "--no-progress", "--out", str(out), *extra]


def _count_calls(monkeypatch) -> list:
    calls = []
    original = BatchAnswerer.__call__

    def counting(self, images, prompts, max_new_tokens=None):
        calls.append(("config" if self.run is not None else "base", tuple(prompts)))
        return original(self, images, prompts, max_new_tokens)

    monkeypatch.setattr(BatchAnswerer, "__call__", counting)
    return calls


# ---- 1. VQA accuracy with fewer than 10 references ------------------------------------------------------------------
def test_vqa_accuracy_with_fewer_references():
    assert M.vqav2_accuracy("Red.", ["red"]) == 1.0  # one reference: exact match (the 10-choose-9 average gave 0)
    assert M.vqav2_accuracy("red", ["red", "blue"]) == 0.5 and M.vqav2_accuracy("red", ["red"] * 3) == 1.0
    assert M.textvqa_accuracy("Coca Cola", ["coca-cola", "pepsi"]) == 0.5
    assert M.vqav2_accuracy("red", ["red"] * 2 + ["blue"] * 8) == pytest.approx(0.6)  # 10 answers: official
    samples = [EvalSample(str(i), "q", None, ["red"], "other") for i in range(4)]
    res = score(TASKS["vqav2"], samples, {"0": "red", "1": "Red", "2": "blue", "3": "red."})
    assert res["score"] == pytest.approx(75.0) and "fewer than 10 reference answers" in res["note"]


# ---- 2. the cache is keyed on the data, the model and the prompt -------------------------------------------------------
def test_cache_starts_afresh_on_other_data(tiny_vlm, tmp_path, monkeypatch, capsys):
    data = write_vqav2(tmp_path / "vqa", n=4)
    out = tmp_path / "out"
    assert eval_main(_args(tiny_vlm, data, out)) == 0
    calls = _count_calls(monkeypatch)
    assert eval_main(_args(tiny_vlm, data, out)) == 0 and calls == []  # same data: all cached
    blind = write_vqav2(tmp_path / "blind", n=4)  # same file names and ids, blank images
    for p in (blind / "val2014").iterdir():
        Image.new("RGB", (64, 48), (95, 95, 95)).save(p)
    capsys.readouterr()
    assert eval_main(_args(tiny_vlm, blind, out)) == 0
    assert len(calls) == 2 and "made on other data" in capsys.readouterr().err  # two batches of 2, afresh
    calls.clear()
    assert eval_main(_args(tiny_vlm, blind, out, "--prompt-suffix", " Answer briefly.")) == 0
    assert len(calls) == 2 and "different prompt_suffix" in capsys.readouterr().err


# ---- 3. median prefill after a warm-up, interleaved methods, where timings come from ------------------------------
def test_prefill_median_interleaved_and_resume_note(tiny_vlm, tmp_path, monkeypatch):
    data = write_vqav2(tmp_path / "vqa", n=4)
    cfg = _yaml(tmp_path / "fastv.yaml", "name: fastv-50\nstages:\n  - {method: fastv, layer: 2, budget: 0.5}\n")
    warm = []
    original_warm = BatchAnswerer.warm_up
    monkeypatch.setattr(BatchAnswerer, "warm_up", lambda self, i, p: (warm.append(self.run is not None),
                                                                       original_warm(self, i, p))[1])
    calls = _count_calls(monkeypatch)
    out = tmp_path / "out"
    assert eval_main(_args(tiny_vlm, data, out, "--compare", "--config", cfg)) == 0
    assert warm == [False, True]  # one untimed batch per method first
    assert [c[0] for c in calls] == ["base", "config", "base", "config"]  # batch by batch, side by side
    assert calls[0][1] == calls[1][1] and calls[2][1] == calls[3][1]
    rows = {r["method"]: r for r in _results(out)["rows"]}
    for tag, name in (("baseline", "baseline"), ("fastv-50", "fastv-50")):
        ms = [p["prefill_ms"] for p in _predictions(out, tag).values()]
        assert rows[name]["prefill_ms"] == pytest.approx(float(np.median(ms)))
        assert rows[name]["prefill_ms_q25"] <= rows[name]["prefill_ms"] <= rows[name]["prefill_ms_q75"]
        assert "notes" not in rows[name]
    # a resumed run: drop two baseline records, rerun; the row says its timings come from two runs
    path = out / "predictions" / "baseline.jsonl"
    lines = path.read_text().splitlines()
    path.write_text("\n".join(lines[:3]) + "\n")
    time.sleep(1.1)
    assert eval_main(_args(tiny_vlm, data, out, "--compare", "--config", cfg)) == 0
    res = _results(out)
    base = next(r for r in res["rows"] if r["method"] == "baseline")
    assert any("2 from this run" in n and "2 from " in n.replace("2 from this run", "") for n in base["notes"])
    assert all(p["run"] for p in _predictions(out, "baseline").values())


# ---- 4. your own data, and clearer missing-image messages ---------------------------------------------------------------
def _custom(root: Path) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "img").mkdir()
    Image.new("RGB", (40, 30), (200, 10, 10)).save(root / "img" / "a.png")
    Image.new("RGB", (30, 40), (10, 10, 200)).save(root / "img" / "b.bmp")
    rows = [{"image": "img/a.png", "question": "what color is it ?", "answer": "red", "category": "color"},
            {"image": "img/b.bmp", "question": "what color is it ?", "answers": ["blue", "navy"], "id": "q2",
             "category": "color"},
            {"image": "img/a.png", "question": "is it red ?", "answer": "yes", "category": "exist"}]
    (root / "mine.jsonl").write_text("\n".join(map(json.dumps, rows)) + "\n")
    with open(root / "mine.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["image", "question", "answers", "category"])
        w.writeheader()
        w.writerow({"image": "img/a.png", "question": "what color ?", "answers": "red|crimson", "category": "c"})
        w.writerow({"image": "img/b.bmp", "question": "what color ?", "answers": '["blue"]', "category": "c"})
    return root


def test_custom_task_reads_jsonl_and_csv_and_scores(tiny_vlm, tmp_path):
    root = _custom(tmp_path / "mine")
    spec, s = load_task("custom", root / "mine.jsonl")
    assert [x.id for x in s] == ["1", "q2", "3"] and s[1].answers == ["blue", "navy"] and spec.metric == "exact"
    assert s[1].load_image().size == (30, 40) and s[0].image == root / "img" / "a.png"
    _, c = load_task("custom", root / "mine.csv")
    assert c[0].answers == ["red", "crimson"] and c[1].answers == ["blue"]
    assert M.exact_any("Navy.", ["blue", "navy"]) == 1.0 and M.contains_any("it is dark red", ["red"]) == 1.0
    assert M.contains_any("it is tired", ["red"]) == 0.0
    with pytest.raises(DatasetError, match="--metric 'f1' is not one of exact, vqa, contains, yesno"):
        load_task("custom", root / "mine.jsonl", metric="f1")
    with pytest.raises(DatasetError, match="--metric yesno: question 1 has answer 'red'"):
        load_task("custom", root / "mine.jsonl", metric="yesno")
    out = tmp_path / "out"
    assert eval_main(["--task", "custom", "--data", str(root / "mine.jsonl"), "--model", tiny_vlm, "--metric",
                      "contains", "--max-new-tokens", "3", "--no-progress", "--out", str(out)]) == 0
    preds = _predictions(out, "baseline")
    want = 100 * np.mean([M.contains_any(preds[x.id]["prediction"], x.answers) for x in s])
    row = _results(out)["rows"][0]
    assert row["metric"] == "contains" and row["score"] == pytest.approx(want)
    assert set(row["per_category"]) == {"color", "exist"}


def test_readme_shows_custom_task():
    readme = (ROOT / "README.md").read_text()
    sec = readme[readme.index("## Evaluation on VQA benchmarks"):]
    sec = sec[:sec.index("\n## ", 4)]
    assert "--task custom" in sec and '"image":' in sec and "agreement" in sec and "score_lo" in sec


def test_missing_images_say_which_names_were_expected(tmp_path):
    root = write_vqav2(tmp_path / "v", n=3)
    for p in (root / "val2014").iterdir():  # converted with the wrong name pattern
        p.rename(p.with_name(p.name.replace("COCO_val2014_", "img_")))
    with pytest.raises(DatasetError) as err:
        load_task("vqav2", root)
    msg = str(err.value)
    assert "COCO_val2014_000000000100.jpg, COCO_val2014_000000000101.jpg, COCO_val2014_000000000102.jpg" in msg
    assert "COCO_<data_subtype>_<image_id:012d>.jpg" in msg and "img_000000000100.jpg" in msg
    assert "the file names, not the folder, do not match" in msg and "--task custom" in msg
    shared = write_pope(tmp_path / "p", per_cat=2)
    for p in (shared / "val2014").iterdir():
        p.unlink()
    with pytest.raises(DatasetError, match="no images there: point --images") as err:
        load_task("pope", shared)


# ---- 5. bundled models by name ----------------------------------------------------------------------------------------
def test_bundled_models_by_name_and_unknown_names_fail_fast(tmp_path, capsys):
    from vtc.model_names import BUNDLED, prompt_suffix_for, resolve_model

    assert resolve_model("vtc-tiny-llava") == str(BUNDLED["vtc-tiny-llava"])
    assert prompt_suffix_for("vtc-tiny-1d", "\nAnswer.") == "" and prompt_suffix_for("x/y", "\nA.") == "\nA."
    t0 = time.perf_counter()
    with pytest.raises(ValueError, match="not a local folder, not a bundled model"):
        resolve_model("someone/not-a-cached-model")
    assert time.perf_counter() - t0 < 2.0
    data = write_vqav2(tmp_path / "v", n=2)
    assert eval_main(["--task", "vqav2", "--model", "vtc-tiny-lava", "--data", str(data)]) == 2
    assert "vtc-tiny-llava, vtc-tiny-1d" in capsys.readouterr().err


def test_eval_bundled_model_by_name_uses_its_prompt(tmp_path):
    out = tmp_path / "out"
    assert eval_main(["--task", "synthetic", "--model", "vtc-tiny-1d", "--limit", "4", "--no-progress",
                      "--out", str(out)]) == 0
    res = _results(out)
    assert res["prompt_suffix"] == "" and res["model"].endswith("tiny-1d")


# ---- 6. --limit: a seeded, stratified random sample ---------------------------------------------------------------------
def test_limit_is_a_seeded_stratified_sample():
    samples = [EvalSample(str(i), "q", None, ["a"], "yes/no" if i < 60 else ("number" if i < 90 else "other"))
               for i in range(100)]
    a = sample_limit(samples, 20, seed=0)
    assert [s.id for s in a] != [str(i) for i in range(20)]  # not the first 20
    cats = [s.category for s in a]
    assert (cats.count("yes/no"), cats.count("number"), cats.count("other")) == (12, 6, 2)
    assert [s.id for s in a] == [s.id for s in sample_limit(samples, 20, seed=0)]
    assert [s.id for s in a] != [s.id for s in sample_limit(samples, 20, seed=1)]
    assert {s.id for s in a} <= {s.id for s in sample_limit(samples, 50, seed=0)}  # nested
    assert [int(s.id) for s in a] == sorted(int(s.id) for s in a)  # file order


# ---- 7 + 8. agreement, per-category columns, bootstrap intervals --------------------------------------------------------
def test_bootstrap_intervals_and_paired_ratio():
    v = np.array([1.0] * 30 + [0.0] * 10)
    lo, hi = bootstrap_ci(mean_stat, (v,), n_boot=500, seed=3)
    assert lo < 75.0 < hi and (lo, hi) == bootstrap_ci(mean_stat, (v,), n_boot=500, seed=3)
    assert bootstrap_ci(mean_stat, (np.ones(20),), n_boot=200) == (100.0, 100.0)
    assert paired_ratio_ci(mean_stat, (v,), mean_stat, (v,), n_boot=200) == (100.0, 100.0)
    w = v.copy()
    w[:5] = 0.0  # 5 fewer right on the same questions: the paired interval is tight and below 100
    plo, phi = paired_ratio_ci(mean_stat, (w,), mean_stat, (v,), n_boot=500, seed=0)
    ulo, uhi = bootstrap_ci(mean_stat, (w,), n_boot=500, seed=0)
    assert phi < 100.0 and (phi - plo) / (100 * 25 / 30) < (uhi - ulo) / 62.5
    assert median_iqr([1.0, 2.0, 3.0, 100.0]) == (2.5, 1.75, 27.25)
    samples = [EvalSample(str(i), "q", None, ["a"]) for i in range(4)]
    assert agreement(samples, {"0": "A.", "1": "b", "2": "c", "3": "d"}, {"0": "a", "1": "b", "2": "x", "3": "y"}) == 50


def test_compare_reports_agreement_categories_and_intervals(tiny_vlm, tmp_path, capsys):
    data = write_vqav2(tmp_path / "vqa", n=4)
    cfg = _yaml(tmp_path / "vz.yaml", "name: visionzip-8\nstages:\n  - {method: visionzip, budget: 8}\n")
    out = tmp_path / "out"
    assert eval_main(_args(tiny_vlm, data, out, "--compare", "--config", cfg)) == 0
    table = capsys.readouterr().out
    assert "agree %" in table and "per category" in table and "95% CI" in table
    rows = {r["method"]: r for r in _results(out)["rows"]}
    base, vz = _predictions(out, "baseline"), _predictions(out, "visionzip-8")
    same = sum(M.normalize_answer(base[k]["prediction"]) == M.normalize_answer(vz[k]["prediction"]) for k in base)
    assert rows["visionzip-8"]["agreement"] == pytest.approx(100 * same / 4) and rows["baseline"]["agreement"] == 100
    assert rows["baseline"]["score_lo"] <= rows["baseline"]["score"] <= rows["baseline"]["score_hi"]
    with open(out / "results.csv") as f:
        got = list(csv.DictReader(f))
    assert {"agreement", "score_lo", "score_hi", "relative_lo", "relative_hi", "score[other]"} <= set(got[0])
    assert float(got[1]["score[other]"]) == pytest.approx(rows["visionzip-8"]["per_category"]["other"])


# ---- 9. POPE: answers that are neither yes nor no --------------------------------------------------------------------
def test_pope_counts_answers_neither_yes_nor_no():
    assert M.yes_no_unclear("There is a dog.") and not M.yes_no_unclear("No, there is not.")
    assert not M.yes_no_unclear("Yes") and M.yes_no_unclear("maybe. no")
    samples = [EvalSample(f"r/{i}", "q", None, ["yes" if i % 2 else "no"], "random") for i in range(40)]
    preds = {s.id: ("yes" if i % 2 else "no") for i, s in enumerate(samples)}
    res = score(TASKS["pope"], samples, preds)
    assert res["neither_yes_nor_no"] == 0 and "warning" not in res and res["score"] == 100.0
    for s in samples[:3]:
        preds[s.id] = "I cannot tell"
    res = score(TASKS["pope"], samples, preds)
    assert res["neither_yes_nor_no"] == 3 and "3 of 40 answers (7.5%) are neither yes nor no" in res["warning"]


# ---- 10. the plot -----------------------------------------------------------------------------------------------------
def _row(method, family, score, vis, avg, lo=None, hi=None):
    return {"method": method, "family": family, "score": score, "score_lo": lo, "score_hi": hi, "metric": "vqav2",
            "visual_tokens": vis, "visual_tokens_avg_layer": avg}


def test_plot_uses_layer_averaged_tokens_families_and_baselines(tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from vtc.config import load_config
    from vtc.evaluation.plot import draw, plot_results
    from vtc.evaluation.runner import config_family

    assert config_family(load_config({"stages": [{"method": "fastv", "layer": 2, "budget": 0.5}]})) == "fastv@L2"
    assert config_family(load_config(str(ROOT / "configs/llava-1.5/visionzip-192+pact.yaml"))) == "visionzip+pact@L4"
    rows = [_row("baseline", "baseline", 60.0, 576, 576, 58.0, 62.0), _row("blind", "blind", 41.0, 576, 576),
            _row("fastv-50", "fastv@L2", 59.0, 288, 306.0, 57.0, 61.0),
            _row("fastv-25", "fastv@L2", 57.0, 144, 171.0, 55.0, 59.0),
            _row("fastv-50-L3", "fastv@L3", 59.5, 288, 315.0, 57.5, 61.5),
            _row("visionzip-64", "visionzip", 55.0, 64, 64.0, 53.0, 57.0)]
    fig, ax = plt.subplots()
    drawn = draw(ax, rows)
    assert set(drawn["families"]) == {"fastv@L2", "fastv@L3", "visionzip"}
    assert [p[1] for p in drawn["families"]["fastv@L2"]] == [171.0, 306.0]  # layer-averaged x, sorted
    assert drawn["baseline"] == 60.0 and drawn["blind"] == 41.0
    assert 30.0 <= drawn["ylim"][0] <= 41.0 and drawn["ylim"][1] >= 62.0  # a floor under the blind line, not 0
    dashed = sorted(round(line.get_ydata()[0], 1) for line in ax.lines if line.get_linestyle() == "--")
    assert dashed == [41.0, 60.0]
    labels = ax.get_legend_handles_labels()[1]
    for m in ("fastv-50", "fastv-25", "fastv-50-L3", "visionzip-64"):
        assert sum(label.startswith(m + " (") for label in labels) == 1  # one legend entry per config
    bars = [c for c in ax.containers if c.has_yerr]
    assert len(bars) == 4
    seg = bars[0].lines[2][0].get_segments()[0]  # fastv-25's error bar spans its interval
    assert (seg[0][1], seg[1][1]) == (55.0, 59.0)
    plt.close(fig)
    png = plot_results(rows, tmp_path / "p.png", title="t")
    assert Image.open(png).size[0] > 600


def test_generate_and_show_take_bundled_names(tmp_path, capsys):
    from vtc.cli import main

    img = tmp_path / "x.png"
    Image.new("RGB", (112, 112), (200, 20, 20)).save(img)
    assert main(["generate", "--model", "vtc-tiny-llava", "--image", str(img), "--prompt", "what color is the "
                 "circle ?", "--max-new-tokens", "2"]) == 0
    assert capsys.readouterr().out.strip()
    with pytest.raises(SystemExit, match="not a local folder, not a bundled model"):
        main(["generate", "--model", "vtc-tiny", "--image", str(img), "--prompt", "q"])
    from vtc.cli import build_parser

    assert build_parser().parse_args(["demo", "--model", "vtc-tiny-1d"]).model == "vtc-tiny-1d"
