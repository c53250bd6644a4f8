"""vtc eval: metrics against hand-computed values, the benchmark readers, end-to-end runs on tiny fixture
datasets in every published format (tiny random LLaVA saved with a real processor, loaded by path), resume
after a crash, data parallelism, bad input, and the lmms-eval plugin (skipped where lmms-eval is absent)."""

from __future__ import annotations

import csv
import importlib.util
import json
import os
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest
import torch
from PIL import Image

from vtc.evaluation import metrics as M
from vtc.evaluation.cli import main as eval_main
from vtc.evaluation.datasets import DatasetError, load_task
from vtc.evaluation.generation import BatchAnswerer

ROOT = Path(__file__).resolve().parent.parent


# ---- fixtures: a tiny LLaVA with the demo tokenizer / processor, saved like a user's checkpoint -----------------
def build_tiny_vlm(path: Path) -> Path:
    """LLaVA (CLIP 112 px, patch 16 -> 49 patches, 2 layers; Llama 64 wide, 4 layers), random weights."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    from vtc.demo.build import IMAGE_TOKEN_ID, SPECIALS, build_grid_processor, build_tokenizer

    torch.manual_seed(0)
    tok = build_tokenizer()
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                              image_size=112, patch_size=16, projection_dim=32)
    text = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                       bos_token_id=SPECIALS.index("<s>"), eos_token_id=SPECIALS.index("</s>"),
                       pad_token_id=SPECIALS.index("<pad>"))
    cfg = LlavaConfig(vision_config=vision, text_config=text, image_token_id=IMAGE_TOKEN_ID,
                      vision_feature_layer=-2, vision_feature_select_strategy="default", image_seq_length=49)
    model = LlavaForConditionalGeneration(cfg).eval()
    gc = model.generation_config
    gc.bos_token_id, gc.eos_token_id, gc.pad_token_id = tok.bos_token_id, tok.eos_token_id, tok.pad_token_id
    processor = build_grid_processor(tok)
    processor.patch_size = 16
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def tiny_vlm(tmp_path_factory) -> str:
    return str(build_tiny_vlm(tmp_path_factory.mktemp("tiny-vlm")))


def _image(path: Path, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    arr = (torch.rand(48, 64, 3, generator=g) * 255).to(torch.uint8).numpy()
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path)


QUESTIONS = ["what color is the circle ?", "how many squares are there ?", "is there a red object ?",
             "what shape is in the top left ?", "what color is the small square ?", "is the red circle left of ?"]


def write_vqav2(root: Path, n: int = 6, annotations: bool = True) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    qs = [{"image_id": 100 + i, "question": QUESTIONS[i % 6], "question_id": 1000 + i} for i in range(n)]
    (root / "v2_OpenEnded_mscoco_val2014_questions.json").write_text(
        json.dumps({"data_subtype": "val2014", "questions": qs}))
    if annotations:
        anns = [{"question_id": 1000 + i, "image_id": 100 + i, "answer_type": "other", "question_type": "what",
                 "answers": [{"answer": a, "answer_confidence": "yes", "answer_id": j + 1}
                             for j, a in enumerate(["red"] * 4 + ["two"] * 3 + ["yes"] * 3)]} for i in range(n)]
        (root / "v2_mscoco_val2014_annotations.json").write_text(json.dumps({"annotations": anns}))
    for i in range(n):
        _image(root / "val2014" / f"COCO_val2014_{100 + i:012d}.jpg", i)
    return root


def write_textvqa(root: Path, n: int = 4) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    data = [{"question_id": 7 + i, "image_id": f"abc{i:03d}", "question": QUESTIONS[i],
             "answers": ["red"] * 3 + ["Red."] * 2 + ["blue"] * 5} for i in range(n)]
    (root / "TextVQA_0.5.1_val.json").write_text(json.dumps({"dataset_name": "textvqa", "data": data}))
    for i in range(n):
        _image(root / "train_images" / f"abc{i:03d}.jpg", 10 + i)
    return root


def write_gqa(root: Path, n: int = 4) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    doc = {f"20{i}": {"imageId": f"n{i}", "question": QUESTIONS[i], "answer": "yes" if i % 2 else "red",
                      "types": {"structural": "query"}} for i in range(n)}
    (root / "testdev_balanced_questions.json").write_text(json.dumps(doc))
    for i in range(n):
        _image(root / "images" / f"n{i}.jpg", 20 + i)
    return root


def write_pope(root: Path, per_cat: int = 2) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for c, cat in enumerate(["random", "adversarial"]):
        lines = [json.dumps({"question_id": i + 1, "image": f"COCO_val2014_{c * 10 + i:012d}.jpg",
                             "text": "is there a red circle in the image ?", "label": "yes" if i % 2 else "no"})
                 for i in range(per_cat)]
        (root / f"coco_pope_{cat}.json").write_text("\n".join(lines) + "\n")
        for i in range(per_cat):
            _image(root / "val2014" / f"COCO_val2014_{c * 10 + i:012d}.jpg", 30 + c * 10 + i)
    return root


def _yaml(path: Path, text: str) -> str:
    path.write_text(text)
    return str(path)


def _results(out: Path) -> dict:
    return json.loads((out / "results.json").read_text())


def _predictions(out: Path, tag: str) -> dict[str, dict]:
    lines = (out / "predictions" / f"{tag}.jsonl").read_text().splitlines()
    return {r["id"]: r for r in map(json.loads, lines) if "id" in r}


# ---- 1. metrics --------------------------------------------------------------------------------------------------
def test_vqa_normaliser_punctuation_articles_numbers_contractions():
    assert M.normalize_answer("Two dogs.") == "2 dogs"  # number word, trailing period, case
    assert M.normalize_answer("The red-white flag!") == "red white flag"  # article; '-' and '!' -> space
    assert M.normalize_answer("an apple, a pear") == "apple pear"  # commas dropped, articles dropped
    assert M.normalize_answer("1,000") == "1000"
    assert M.normalize_answer("3.5") == "3.5"  # a period before a digit stays
    assert M.normalize_answer("none") == "0" and M.normalize_answer("ten") == "10"
    assert M.normalize_answer("eleven") == "eleven"  # only zero..ten are mapped
    assert M.normalize_answer("dont know") == "don't know"  # contraction restored
    assert M.normalize_answer("It's\tblue\n") == "it 's blue"
    assert M.normalize_answer("(yes)") == "yes"
    assert M._official_prediction("yes:") == "yes"  # the official list also has ':' and "'"


def test_vqa_accuracy_ten_choose_nine():
    answers = ["2"] * 2 + ["3"] * 8
    # leave-one-out over 10 subsets: drop a "2" -> 1 match (1/3), drop a "3" -> 2 matches (2/3)
    assert M.vqav2_accuracy("two", answers) == pytest.approx((2 * (1 / 3) + 8 * (2 / 3)) / 10)  # 0.6
    assert M.vqav2_accuracy("Three.", answers) == pytest.approx(1.0)
    assert M.vqav2_accuracy("4", answers) == 0.0
    assert M.vqa_leave_one_out("a", ["a"] * 3 + ["b"] * 7) == pytest.approx(0.9)
    assert M.vqa_leave_one_out("a", ["a"] + ["b"] * 9) == pytest.approx(0.3)
    # annotators disagree: their answers get the punctuation pass ("yes." -> "yes")
    assert M.vqav2_accuracy("Yes", ["yes."] * 3 + ["no"] * 7) == pytest.approx(0.9)
    # annotators agree: stored answers are compared as they are (the official evaluator's rule)
    assert M.vqav2_accuracy("yes", ["Yes."] * 10) == 0.0
    # TextVQA normalises both sides: "coca-cola" / "Coca Cola." / "coca cola" are one answer
    assert M.textvqa_accuracy("COCA-COLA", ["coca-cola", "Coca Cola.", "coca cola"] + ["pepsi"] * 7) == \
        pytest.approx(0.9)


def test_gqa_and_pope_metrics():
    assert M.gqa_normalize("  Left. ") == "left" and M.exact_match("Table.", "table") == 1.0
    assert M.exact_match("a table", "table") == 0.0
    assert M.pope_yes_no("No, there is not.") == "no"
    assert M.pope_yes_no("Yes, there is a dog. There is no cat.") == "yes"  # only the first sentence counts
    assert M.pope_yes_no("There is no dog") == "no" and M.pope_yes_no("yes") == "yes"
    m = M.pope_metrics(["yes", "yes", "no", "no", "yes"], ["yes", "no", "no", "yes", "yes"])
    assert (m["tp"], m["fp"], m["tn"], m["fn"]) == (2, 1, 1, 1)
    assert m["accuracy"] == pytest.approx(0.6) and m["precision"] == pytest.approx(2 / 3)
    assert m["recall"] == pytest.approx(2 / 3) and m["f1"] == pytest.approx(2 / 3)
    assert m["yes_ratio"] == pytest.approx(0.6)
    assert M.pope_metrics(["no"], ["no"])["f1"] == 0.0  # undefined precision / recall -> 0


# ---- 2. readers and bad data ---------------------------------------------------------------------------------------
def test_readers_parse_every_format(tmp_path):
    _, v = load_task("vqav2", write_vqav2(tmp_path / "vqa"))
    assert len(v) == 6 and v[0].id == "1000" and len(v[0].answers) == 10
    assert v[0].image.name == "COCO_val2014_000000000100.jpg" and v[0].load_image().mode == "RGB"
    _, t = load_task("textvqa", write_textvqa(tmp_path / "tv"), limit=3)
    assert len(t) == 3 and t[1].answers[3] == "Red." and t[1].image.name == "abc001.jpg"
    _, g = load_task("gqa", write_gqa(tmp_path / "gqa"))
    assert [s.answers[0] for s in g] == ["red", "yes", "red", "yes"] and g[0].image.name == "n0.jpg"
    _, p = load_task("pope", write_pope(tmp_path / "pope"))
    assert {s.category for s in p} == {"random", "adversarial"} and len({s.id for s in p}) == 4
    _, s = load_task("synthetic", limit=5)
    assert len(s) == 5 and s[0].answers[0] and s[0].load_image().size == (112, 112)
    _, nolabel = load_task("vqav2", write_vqav2(tmp_path / "vqa-test", annotations=False))
    assert nolabel[0].answers is None


def test_bad_data_errors_name_file_and_field(tmp_path):
    with pytest.raises(DatasetError, match="unknown task 'vqa3'.*available: vqav2"):
        load_task("vqa3", tmp_path)
    with pytest.raises(DatasetError, match="no questions file"):
        load_task("vqav2", tmp_path)
    root = write_vqav2(tmp_path / "v")
    qfile = root / "v2_OpenEnded_mscoco_val2014_questions.json"
    qfile.write_text('{"questions": [')
    with pytest.raises(DatasetError, match=r"questions\.json: not valid JSON"):
        load_task("vqav2", root)
    qfile.write_text(json.dumps({"data_subtype": "val2014", "questions": [{"image_id": 100, "question": "q"}]}))
    with pytest.raises(DatasetError, match=r"questions\.json: questions\[0\] has no field 'question_id'"):
        load_task("vqav2", root)
    qfile.write_text(json.dumps({"data_subtype": "val2014", "questions": []}))
    with pytest.raises(DatasetError, match="has no questions"):
        load_task("vqav2", root)
    pope = write_pope(tmp_path / "p")
    (pope / "coco_pope_random.json").write_text('{"question_id": 1, "image": "x.jpg", "text": "q", "label": "maybe"}\n')
    with pytest.raises(DatasetError, match=r"coco_pope_random\.json: entry 0\.label must be 'yes' or 'no'"):
        load_task("pope", pope)
    gqa = write_gqa(tmp_path / "g")
    for f in (gqa / "images").iterdir():
        f.unlink()
    with pytest.raises(DatasetError, match="4 of 4 images not found"):
        load_task("gqa", gqa)


# ---- 3. end to end through `vtc eval` ---------------------------------------------------------------------------------
def test_eval_vqav2_compare_configs_outputs(tiny_vlm, tmp_path):
    data = write_vqav2(tmp_path / "vqa")
    fastv = _yaml(tmp_path / "fastv.yaml", "name: fastv-50\nstages:\n  - {method: fastv, layer: 2, budget: 0.5}\n")
    vz = _yaml(tmp_path / "vz.yaml", "name: visionzip-16\nstages:\n  - {method: visionzip, budget: 16}\n")
    out = tmp_path / "out"
    rc = eval_main(["--task", "vqav2", "--model", tiny_vlm, "--data", str(data), "--config", fastv, "--config", vz,
                    "--compare", "--batch-size", "4", "--limit", "4", "--max-new-tokens", "2", "--out", str(out),
                    "--plot", "--no-progress"])
    assert rc == 0
    res = _results(out)
    rows = {r["method"]: r for r in res["rows"]}
    assert list(rows) == ["baseline", "fastv-50", "visionzip-16"]
    assert rows["baseline"]["visual_tokens"] == 49
    base = rows["baseline"]["score"]
    for r in rows.values():  # relative to the baseline (undefined when the random model scores 0)
        assert r["relative"] == (pytest.approx(100 * r["score"] / base) if base else None)
    assert rows["fastv-50"]["visual_tokens"] == 24  # floor(0.5 * 49) enter the layers >= 2
    assert rows["fastv-50"]["visual_tokens_avg_layer"] == pytest.approx((2 * 49 + 2 * 24) / 4)
    assert rows["visionzip-16"]["visual_tokens"] == 16 and rows["visionzip-16"]["visual_tokens_llm_in"] == 16
    # analytic costs: KV cache of the baseline = layers x 2 (k, v) x tokens x kv heads x head dim x 4 bytes
    preds = _predictions(out, "baseline")
    r0 = preds["1000"]
    assert r0["kv_cache_bytes"] == 4 * 2 * (r0["text_tokens"] + 49) * 2 * 16 * 4
    assert rows["fastv-50"]["prefill_tflops"] < rows["baseline"]["prefill_tflops"]
    assert rows["visionzip-16"]["kv_cache_mb"] < rows["fastv-50"]["kv_cache_mb"] < rows["baseline"]["kv_cache_mb"]
    # the score is the official metric of the cached predictions
    expect = 100 * sum(M.vqav2_accuracy(p["prediction"], ["red"] * 4 + ["two"] * 3 + ["yes"] * 3)
                       for p in preds.values()) / 4
    assert rows["baseline"]["score"] == pytest.approx(expect)
    with open(out / "results.csv") as f:
        table = list(csv.DictReader(f))
    assert [r["method"] for r in table] == ["baseline", "fastv-50", "visionzip-16"]
    assert {"score", "relative", "visual_tokens", "prefill_ms", "prefill_tflops", "kv_cache_mb"} <= set(table[0])
    assert (out / "accuracy_vs_tokens.png").stat().st_size > 1000
    sub = json.loads((out / "baseline.submission.json").read_text())
    assert sub[0]["question_id"] == 1000 and isinstance(sub[0]["answer"], str)


@pytest.mark.parametrize("task,writer", [("textvqa", write_textvqa), ("gqa", write_gqa), ("pope", write_pope)])
def test_eval_each_format(tiny_vlm, tmp_path, task, writer):
    data = writer(tmp_path / task)
    out = tmp_path / "out"
    assert eval_main(["--task", task, "--model", tiny_vlm, "--data", str(data), "--batch-size", "4",
                      "--max-new-tokens", "3", "--out", str(out), "--no-progress"]) == 0
    row = _results(out)["rows"][0]
    preds = _predictions(out, "baseline")
    assert row["n"] == len(preds) == 4 and row["visual_tokens"] == 49
    _, samples = load_task(task, data)
    if task == "pope":
        m = M.pope_metrics([M.pope_yes_no(preds[s.id]["prediction"]) for s in samples], [s.answers[0] for s in samples])
        assert row["score"] == pytest.approx(100 * m["f1"])
        assert _results(out)["details"]["baseline"]["scores"]["yes_ratio"] == pytest.approx(m["yes_ratio"])
    elif task == "gqa":
        expect = sum(M.exact_match(preds[s.id]["prediction"], s.answers[0]) for s in samples) / 4
        assert row["score"] == pytest.approx(100 * expect)
    else:
        expect = sum(M.textvqa_accuracy(preds[s.id]["prediction"], s.answers) for s in samples) / 4
        assert row["score"] == pytest.approx(100 * expect)


def test_resume_after_crash_loses_nothing(tiny_vlm, tmp_path, monkeypatch, capsys):
    data = write_vqav2(tmp_path / "vqa")
    args = ["--task", "vqav2", "--model", tiny_vlm, "--data", str(data), "--batch-size", "2", "--max-new-tokens", "2",
            "--no-progress"]
    fresh = tmp_path / "fresh"
    assert eval_main(args + ["--out", str(fresh)]) == 0
    calls = []
    original = BatchAnswerer.__call__

    def crashing(self, images, prompts, max_new_tokens=None):
        calls.append(len(prompts))
        if len(calls) == 2:
            raise RuntimeError("simulated crash")
        return original(self, images, prompts, max_new_tokens)

    monkeypatch.setattr(BatchAnswerer, "__call__", crashing)
    out = tmp_path / "out"
    with pytest.raises(RuntimeError, match="simulated crash"):
        eval_main(args + ["--out", str(out)])
    assert set(_predictions(out, "baseline")) == {"1000", "1001"}  # the finished batch is on disk
    with open(out / "predictions" / "baseline.jsonl", "a") as f:
        f.write('{"id": "1002", "predic')  # a torn write
    calls.clear()
    monkeypatch.setattr(BatchAnswerer, "__call__", lambda self, i, p, m=None: (calls.append(len(p)), original(self, i, p, m))[1])
    assert eval_main(args + ["--out", str(out)]) == 0
    assert calls == [2, 2]  # only the two unfinished batches ran
    got, want = _predictions(out, "baseline"), _predictions(fresh, "baseline")
    assert {k: v["prediction"] for k, v in got.items()} == {k: v["prediction"] for k, v in want.items()}
    assert _results(out)["rows"][0]["score"] == _results(fresh)["rows"][0]["score"]
    # a cache made with other settings starts afresh, with a one-line notice naming the setting
    capsys.readouterr()
    calls.clear()
    assert eval_main(args + ["--max-new-tokens", "3", "--out", str(out)]) == 0
    assert "different max_new_tokens (2, now 3); starting afresh" in capsys.readouterr().err
    assert calls == [2, 2, 2]


def test_prediction_cache_roundtrip(tmp_path):
    from vtc.evaluation.cache import PredictionCache

    meta = {"task": "gqa", "model": "m", "config": {"stages": [{"method": "transprune", "layers": (7, 9, 12)}]},
            "max_new_tokens": 4, "prompt_suffix": "", "dtype": "float32"}
    path = tmp_path / "p" / "x.jsonl"
    PredictionCache(path, meta).append([{"id": "1", "prediction": "a"}])
    r0 = PredictionCache(path, meta, rank=0, world=2)
    r1 = PredictionCache(path, meta, rank=1, world=2)
    r0.append([{"id": "2", "prediction": "b"}])
    r1.append([{"id": "3", "prediction": "c"}])
    assert sorted(PredictionCache(path, meta).load()) == ["1", "2", "3"]  # main + rank files, tuples == lists
    PredictionCache(path, meta).merge()
    assert not list(path.parent.glob("*.rank*")) and sorted(PredictionCache(path, meta).load()) == ["1", "2", "3"]
    notices = []
    PredictionCache(path, dict(meta, dtype="float16"), notice=notices.append)  # other settings: afresh
    assert not path.exists() and "different dtype ('float32', now 'float16'); starting afresh" in notices[0]
    PredictionCache(path, meta).append([{"id": "1", "prediction": "a"}])
    PredictionCache(path, meta, overwrite=True)
    assert not path.exists()


def test_bad_input_clear_errors(tiny_vlm, tmp_path, capsys):
    from transformers import LlamaConfig, LlamaForCausalLM

    llm = tmp_path / "llm"
    LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                 num_attention_heads=2)).save_pretrained(llm)
    data = write_gqa(tmp_path / "gqa")
    assert eval_main(["--task", "gqa", "--model", str(llm), "--data", str(data)]) == 2
    assert "is not a vision-language model" in capsys.readouterr().err
    assert eval_main(["--task", "gqa", "--model", str(tmp_path / "nope"), "--data", str(data)]) == 2
    assert "not a local folder, not a bundled model (vtc-tiny-llava, vtc-tiny-1d)" in capsys.readouterr().err
    assert eval_main(["--task", "gqa", "--model", tiny_vlm, "--data", str(tmp_path / "missing")]) == 2
    assert "missing: data folder not found" in capsys.readouterr().err
    bad = _yaml(tmp_path / "bad.yaml", "stages:\n  - {method: fastv, layer: 9, budget: 0.5}\n")
    assert eval_main(["--task", "gqa", "--model", tiny_vlm, "--data", str(data), "--config", bad]) == 2
    assert "config error" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        eval_main(["--task", "nope"])


# ---- 4. data parallel ---------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_data_parallel_equals_single_process(tiny_vlm, tmp_path):
    cfg = _yaml(tmp_path / "fastv.yaml", "name: fastv-50\nstages:\n  - {method: fastv, layer: 2, budget: 0.5}\n")
    args = ["--task", "synthetic", "--model", tiny_vlm, "--limit", "6", "--batch-size", "2", "--config", cfg,
            "--max-new-tokens", "2", "--no-progress", "--device", "cpu"]
    single, dp = tmp_path / "single", tmp_path / "dp"
    assert eval_main(args + ["--out", str(single)]) == 0
    env_threads = os.environ.get("OMP_NUM_THREADS")
    os.environ["OMP_NUM_THREADS"] = "1"
    try:
        assert eval_main(args + ["--out", str(dp), "--num-processes", "2"]) == 0
    finally:
        os.environ.pop("OMP_NUM_THREADS") if env_threads is None else os.environ.update(OMP_NUM_THREADS=env_threads)
    a, b = _results(single), _results(dp)
    assert b["world_size"] == 2
    assert [r["score"] for r in a["rows"]] == [r["score"] for r in b["rows"]]
    assert [r["visual_tokens"] for r in a["rows"]] == [r["visual_tokens"] for r in b["rows"]]
    pa, pb = _predictions(single, "fastv-50"), _predictions(dp, "fastv-50")
    assert {k: v["prediction"] for k, v in pa.items()} == {k: v["prediction"] for k, v in pb.items()}
    assert not list((dp / "predictions").glob("*.rank*.jsonl"))  # merged into the main cache


# ---- 5. lmms-eval plugin ------------------------------------------------------------------------------------------
def test_plugin_module_imports_without_lmms_eval():
    from vtc.evaluation import plugin_lmms

    assert plugin_lmms.MODEL_ID == "vtc" and plugin_lmms.CLASS_PATH.endswith("VTCLMM")


LMMS_TASK = """task: vtc_local_vqa
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: generate_until
doc_to_visual: !function vtc_local_utils.doc_to_visual
doc_to_text: !function vtc_local_utils.doc_to_text
doc_to_target: answer
generation_kwargs:
  max_new_tokens: 4
  until: ["\\n"]
  do_sample: false
process_results: !function vtc_local_utils.process_results
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
metadata:
  version: 0.0
"""

LMMS_UTILS = """from PIL import Image


def doc_to_visual(doc):
    return [Image.open(doc["image"]).convert("RGB")]


def doc_to_text(doc, lmms_eval_specific_kwargs=None):
    return doc["question"]


def process_results(doc, results):
    return {"exact_match": float(results[0].strip().lower() == doc["answer"])}
"""

#: what `[project.entry-points."lmms_eval.models"]` in pyproject.toml installs
ENTRY_POINT = "[lmms_eval.models]\nvtc = vtc.evaluation.plugin_lmms:lmms_eval_manifest\n"


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("lmms_eval") is None, reason="lmms-eval is not installed (pip install '.[eval]')")
def test_lmms_eval_end_to_end_offline(tmp_path):
    """lmms-eval runs the bundled trained demo model through the `vtc` plugin on a local task (16 test questions of
    the synthetic task), compressed with FastV, and scores exactly what vtc's own evaluator scores."""
    import vtc
    from vtc.demo import GRID_MODEL_PATH, load
    from vtc.demo.evaluate import evaluate
    from vtc.demo.task import get_samples

    if not (GRID_MODEL_PATH / "model.safetensors").exists():
        pytest.skip("the bundled demo model is not trained yet (python eval/train_demo.py)")
    samples = get_samples("test", 16)
    rows = []
    for i, smp in enumerate(samples):
        smp.image.save(tmp_path / f"{i}.png")
        rows.append({"question_id": i, "image": str(tmp_path / f"{i}.png"), "question": smp.question,
                     "answer": smp.answer})
    (tmp_path / "data.jsonl").write_text("\n".join(map(json.dumps, rows)) + "\n")
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "vtc_local.yaml").write_text(LMMS_TASK.format(data=tmp_path / "data.jsonl"))
    (tasks / "vtc_local_utils.py").write_text(LMMS_UTILS)
    stages = [{"method": "fastv", "layer": 2, "budget": 0.5}]
    cfg = _yaml(tmp_path / "fastv.yaml", "name: fastv-50\nstages:\n  - {method: fastv, layer: 2, budget: 0.5}\n")
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", HF_DATASETS_CACHE=str(tmp_path / "hf"),
               OMP_NUM_THREADS="2")
    if not any(ep.name == "vtc" for ep in metadata.entry_points(group="lmms_eval.models")):
        # vtc installed before the entry point was declared: publish the same entry point from a dist-info on
        # PYTHONPATH, so lmms-eval still discovers the model through importlib.metadata, as it would when installed
        info = tmp_path / "ep" / "vtc_lmms_entry_point-0.0.dist-info"
        info.mkdir(parents=True)
        (info / "METADATA").write_text("Metadata-Version: 2.1\nName: vtc-lmms-entry-point\nVersion: 0.0\n")
        (info / "entry_points.txt").write_text(ENTRY_POINT)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(tmp_path / "ep"), env.get("PYTHONPATH")]))
    # lmms-eval's console script, run by this interpreter (a venv without its own copy of the script still runs it)
    cmd = [sys.executable, "-c", "import sys; from lmms_eval.cli.dispatch import main; sys.exit(main())"]
    proc = subprocess.run(cmd + ["--model", "vtc", "--model_args", f"pretrained={GRID_MODEL_PATH},config={cfg}",
                                 "--tasks", "vtc_local_vqa", "--include_path", str(tasks), "--batch_size", "4",
                                 "--output_path", str(tmp_path / "out")],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-3000:]
    assert "vtc (fastv-50)" in log and '"visual_tokens": 98.0' in log  # compressed inside lmms-eval: 196 -> 98
    results = list((tmp_path / "out").rglob("*results*.json"))
    assert results, log[-2000:]
    got = json.loads(results[0].read_text())["results"]["vtc_local_vqa"]["exact_match,none"]
    model, processor = load("grid")
    with vtc.compress(model, {"stages": stages}):
        want = evaluate(model, processor, samples=samples, batch_size=4)["accuracy"]
    assert got == pytest.approx(want) and want >= 0.75
