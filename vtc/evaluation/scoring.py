"""Scores of one method's predictions: the task's metric, per category, with a 95% bootstrap interval; the
paired interval of the score relative to the baseline; agreement with the baseline's answers.

Per-question arrays (:func:`question_arrays`) feed both the point score and the bootstrap
(:mod:`vtc.evaluation.confidence`), so the interval is of exactly the reported statistic: the mean of per-question
accuracies, or POPE's F1 of "yes".
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from typing import Any

import numpy as np

from . import metrics as M
from .confidence import Stat, bootstrap_ci, f1_stat, mean_stat, paired_ratio_ci
from .datasets import EvalSample, TaskSpec

__all__ = ["score", "relative_ci", "agreement", "question_arrays", "UNCLEAR_WARN"]

#: share of POPE / yes-no answers that are neither yes nor no above which vtc eval warns
UNCLEAR_WARN = 0.05

_PER_QUESTION = {
    "vqav2": M.vqav2_accuracy, "textvqa": M.textvqa_accuracy, "vqa": M.textvqa_accuracy,
    "exact_match": lambda p, a: M.exact_match(p, a[0]), "exact": M.exact_any, "contains": M.contains_any,
    "first_word": lambda p, a: float(M.first_word(p) == a[0].lower()),
}
_YES_NO = ("pope", "yesno")


def question_arrays(spec: TaskSpec, samples: Sequence[EvalSample], predictions: dict[str, str]
                    ) -> tuple[Stat, tuple[np.ndarray, ...]]:
    """(statistic, per-question arrays) over the scored ``samples`` (those with references), in their order:
    POPE: F1 of (answered yes, label yes); yes/no: accuracy; every other metric: the mean of its per-question
    accuracy in [0, 1]."""
    scored = [s for s in samples if s.answers is not None and s.id in predictions]
    if spec.metric in _YES_NO:
        pred = np.array([M.pope_yes_no(predictions[s.id]) == "yes" for s in scored], dtype=bool)
        gold = np.array([str(s.answers[0]).strip().lower() == "yes" for s in scored], dtype=bool)
        if spec.metric == "pope":
            return f1_stat, (pred, gold)
        return mean_stat, ((pred == gold).astype(float),)
    fn = _PER_QUESTION[spec.metric]
    return mean_stat, (np.array([fn(predictions[s.id], s.answers) for s in scored], dtype=float),)


def score(spec: TaskSpec, samples: Sequence[EvalSample], predictions: dict[str, str], *, n_boot: int = 1000,
          seed: int = 0) -> dict[str, Any]:
    """The task's metric on ``predictions`` (question id -> answer text): ``{"metric", "score" (0-100, None
    without references), "ci" ([lo, hi], 95% bootstrap over questions), "n", "n_scored", "per_category"}`` (+
    POPE's accuracy / precision / recall / yes-ratio, the count of answers that were neither yes nor no, and a
    note when VQA questions have fewer than 10 references)."""
    have = [s for s in samples if s.id in predictions]
    scored = [s for s in have if s.answers is not None]
    out: dict[str, Any] = {"metric": spec.metric, "n": len(have), "n_scored": len(scored)}
    if not scored:
        out.update(score=None, ci=None, note="no reference answers in this split: see the submission file")
        return out
    stat, arrays = question_arrays(spec, scored, predictions)
    out["score"] = float(stat(*arrays))
    ci = bootstrap_ci(stat, arrays, n_boot=n_boot, seed=seed)
    out["ci"] = list(ci) if ci is not None else None
    cats: dict[str, list[int]] = defaultdict(list)
    for i, s in enumerate(scored):
        if s.category:
            cats[s.category].append(i)
    if cats:
        out["per_category"] = {c: float(stat(*(a[ix] for a in arrays))) for c, ix in sorted(cats.items())}
    if spec.metric in _YES_NO:
        unclear = sum(M.yes_no_unclear(predictions[s.id]) for s in scored)
        out["neither_yes_nor_no"] = unclear
        if unclear > UNCLEAR_WARN * len(scored):
            out["warning"] = (f"{unclear} of {len(scored)} answers ({100 * unclear / len(scored):.1f}%) are neither "
                              "yes nor no; the published rule counts them as 'yes'")
    if spec.metric == "pope":
        pooled = M.pope_metrics([M.pope_yes_no(predictions[s.id]) for s in scored], [s.answers[0] for s in scored])
        out.update({k: pooled[k] * 100 for k in ("accuracy", "precision", "recall", "f1")})
        out["yes_ratio"] = pooled["yes_ratio"]
        per = {}
        for c, ix in sorted(cats.items()):
            m = M.pope_metrics([M.pope_yes_no(predictions[scored[i].id]) for i in ix], [scored[i].answers[0] for i in ix])
            per[c] = {k: round(v * 100, 4) if k in ("accuracy", "precision", "recall", "f1") else v for k, v in m.items()}
        if per:
            out["f1_mean_over_categories"] = sum(p["f1"] for p in per.values()) / len(per)
            out["pope_per_category"] = per
    if spec.metric in ("vqav2", "textvqa", "vqa"):
        few = sum(len(s.answers) < M.VQA_ANSWERS for s in scored)
        if few:
            out["note"] = (f"{few} of {len(scored)} questions have fewer than {M.VQA_ANSWERS} reference answers: "
                           "scored min(1, matches / min(3, n)) (see vtc.evaluation.metrics.vqa_few)")
    return out


def relative_ci(spec: TaskSpec, samples: Sequence[EvalSample], predictions: dict[str, str],
                baseline: dict[str, str], *, n_boot: int = 1000, seed: int = 0) -> list[float] | None:
    """95% paired-bootstrap interval of ``100 * score / baseline score`` over the same questions."""
    both = [s for s in samples if s.answers is not None and s.id in predictions and s.id in baseline]
    if not both:
        return None
    stat, arrays = question_arrays(spec, both, predictions)
    bstat, barrays = question_arrays(spec, both, baseline)
    ci = paired_ratio_ci(stat, arrays, bstat, barrays, n_boot=n_boot, seed=seed)
    return list(ci) if ci is not None else None


def agreement(samples: Sequence[EvalSample], predictions: dict[str, str], baseline: dict[str, str]) -> float | None:
    """% of questions whose answer equals the baseline's after the VQA normalisation (reference-free: it moves
    even when the benchmark is too hard for the model to score)."""
    both = [s.id for s in samples if s.id in predictions and s.id in baseline]
    if not both:
        return None
    same = sum(M.normalize_answer(predictions[i]) == M.normalize_answer(baseline[i]) for i in both)
    return 100.0 * same / len(both)
