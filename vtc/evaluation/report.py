"""What ``vtc eval`` writes and prints: ``results.json`` (everything), ``results.csv`` (one row per method, per-
category scores as ``score[<category>]`` columns), the printed table, and the evaluation servers' submission
files (VQAv2, TextVQA, GQA)."""

from __future__ import annotations

import csv
import json
from collections.abc import Sequence
from pathlib import Path

from . import metrics as M
from .datasets import EvalSample, TaskSpec

__all__ = ["CSV_COLUMNS", "write_results", "format_table", "write_submission", "csv_columns"]

CSV_COLUMNS = ("task", "method", "family", "n", "metric", "score", "score_lo", "score_hi", "relative", "relative_lo",
               "relative_hi", "agreement", "visual_tokens_in", "visual_tokens_llm_in", "visual_tokens",
               "visual_tokens_avg_layer", "prefill_ms", "prefill_ms_q25", "prefill_ms_q75", "prefill_tflops",
               "kv_cache_mb", "neither_yes_nor_no")


def _categories(rows: Sequence[dict]) -> list[str]:
    return sorted({c for r in rows for c in (r.get("per_category") or {})})


def csv_columns(rows: Sequence[dict]) -> list[str]:
    """The fixed columns, then ``score[<category>]`` for every category any row has."""
    return list(CSV_COLUMNS) + [f"score[{c}]" for c in _categories(rows)]


def write_results(report: dict, out_dir: Path) -> None:
    """``results.json`` (everything) and ``results.csv`` (one row per method)."""
    (out_dir / "results.json").write_text(json.dumps(report, indent=2, default=str))
    cols = csv_columns(report["rows"])
    with open(out_dir / "results.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols, extrasaction="ignore")
        w.writeheader()
        for r in report["rows"]:
            flat = dict(r, **{f"score[{c}]": v for c, v in (r.get("per_category") or {}).items()})
            w.writerow({k: (round(v, 4) if isinstance(v, float) else v) for k, v in flat.items()})


def _num(v, fmt: str) -> str:
    return "" if v is None else format(v, fmt)


def format_table(report: dict) -> str:
    """The results as text: one line per method (score with its 95% interval, relative to the baseline with its
    paired interval, agreement with the baseline's answers, visual tokens, median prefill ms with the IQR,
    TFLOPs, KV cache), per-category scores, then notes (timings from earlier runs, warnings)."""
    rows = report["rows"]
    head = (f"{'method':<26}{'score':>7} {'95% CI':>14}{'rel %':>7} {'95% CI':>14}{'agree %':>8}{'vis in':>7}"
            f"{'vis kept':>9}{'vis avg':>8} {'prefill ms [IQR]':>22}{'TFLOPs':>9}{'KV MB':>8}")
    lines = [f"{report['description']} — {report['model']} (n={report['n']}, {report['dtype']}, "
             f"{report['device']}, {report['world_size']} process(es))", head, "-" * len(head)]
    for r in rows:
        ci = f"[{r['score_lo']:.1f}, {r['score_hi']:.1f}]" if r.get("score_lo") is not None else ""
        rci = f"[{r['relative_lo']:.1f}, {r['relative_hi']:.1f}]" if r.get("relative_lo") is not None else ""
        ms = (f"{r['prefill_ms']:.2f} [{r['prefill_ms_q25']:.2f}-{r['prefill_ms_q75']:.2f}]"
              if r.get("prefill_ms") is not None else "")
        lines.append(f"{r['method'][:25]:<26}{_num(r['score'], '.2f') or 'n/a':>7} {ci:>14}"
                     f"{_num(r['relative'], '.1f'):>7} {rci:>14}{_num(r.get('agreement'), '.1f'):>8}"
                     f"{r['visual_tokens_in']:>7.1f}{r['visual_tokens']:>9.1f}{r['visual_tokens_avg_layer']:>8.1f}"
                     f" {ms:>22}{r['prefill_tflops']:>9.4f}{r['kv_cache_mb']:>8.2f}")
    cats = _categories(rows)
    if cats:
        width = max(8, *(len(c) + 2 for c in cats))
        lines += ["", f"{'per category':<26}" + "".join(f"{c:>{width}}" for c in cats)]
        for r in rows:
            per = r.get("per_category") or {}
            lines.append(f"{r['method'][:25]:<26}" + "".join(f"{_num(per.get(c), '.2f'):>{width}}" for c in cats))
    for r in rows:
        for note in r.get("notes", []):
            lines.append(f"note ({r['method']}): {note}")
    return "\n".join(lines)


def write_submission(spec: TaskSpec, samples: Sequence[EvalSample], records: dict, path: Path) -> None:
    """``<method>.submission.json`` in the evaluation server's format (VQAv2, TextVQA, GQA; nothing else)."""
    if spec.name in ("vqav2", "textvqa"):
        sub = [{"question_id": s.meta.get("question_id", s.id),
                "answer": M.normalize_answer(records[s.id]["prediction"])} for s in samples]
    elif spec.name == "gqa":
        sub = [{"questionId": s.id, "prediction": M.gqa_normalize(records[s.id]["prediction"])} for s in samples]
    else:
        return
    path.write_text(json.dumps(sub))
