"""How sure a score is: seeded bootstrap intervals over questions, a paired bootstrap for ratios to the
baseline, median and IQR of timings (pure numpy functions).

A statistic is a function of per-question arrays indexed by an ``(B, n)`` matrix of resampled question indices,
returning ``(B,)`` values, so every resample is one vectorised call (:func:`mean_stat`, :func:`f1_stat`).
The percentile bootstrap (Efron & Tibshirani 1993) resamples questions with replacement; the paired version
draws the same questions for the method and the baseline, so the interval of ``100 * method / baseline``
reflects only how the two differ on the same questions.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence

import numpy as np

__all__ = ["mean_stat", "f1_stat", "bootstrap_ci", "paired_ratio_ci", "median_iqr"]

Stat = Callable[..., np.ndarray]


def mean_stat(values: np.ndarray) -> np.ndarray:
    """100 x the mean over the last axis (accuracy in %)."""
    return 100.0 * values.mean(-1)


def f1_stat(pred_yes: np.ndarray, gold_yes: np.ndarray) -> np.ndarray:
    """100 x F1 of "yes" over the last axis (0 where precision + recall is 0), as :func:`metrics.pope_metrics`."""
    tp = (pred_yes & gold_yes).sum(-1)
    fp = (pred_yes & ~gold_yes).sum(-1)
    fn = (~pred_yes & gold_yes).sum(-1)
    denom = 2 * tp + fp + fn
    return np.where(denom > 0, 200.0 * tp / np.maximum(denom, 1), 0.0)


def _resamples(n: int, n_boot: int, seed: int, budget: int = 4_000_000) -> Iterator[np.ndarray]:
    """(b, n) index matrices, ``n_boot`` rows in all, in chunks of at most ``budget`` indices."""
    rng = np.random.default_rng(seed)
    step = max(1, budget // max(1, n))
    for start in range(0, n_boot, step):
        yield rng.integers(0, n, size=(min(step, n_boot - start), n))


def _interval(values: np.ndarray, level: float) -> tuple[float, float]:
    a = (1.0 - level) / 2
    lo, hi = np.quantile(values, [a, 1.0 - a])
    return float(lo), float(hi)


def bootstrap_ci(stat: Stat, arrays: Sequence[np.ndarray], *, n_boot: int = 1000, seed: int = 0,
                 level: float = 0.95) -> tuple[float, float] | None:
    """Percentile bootstrap interval of ``stat(*arrays)`` over questions (None without questions)."""
    n = len(arrays[0])
    if n == 0 or n_boot < 1:
        return None
    vals = np.concatenate([stat(*(a[idx] for a in arrays)) for idx in _resamples(n, n_boot, seed)])
    return _interval(vals, level)


def paired_ratio_ci(stat: Stat, arrays: Sequence[np.ndarray], base_stat: Stat, base_arrays: Sequence[np.ndarray],
                    *, n_boot: int = 1000, seed: int = 0, level: float = 0.95) -> tuple[float, float] | None:
    """Paired bootstrap interval of ``100 * stat(arrays) / base_stat(base_arrays)``: each resample draws the same
    questions for both (resamples where the baseline scores 0 are left out; None if all are)."""
    n = len(arrays[0])
    if n == 0 or n_boot < 1 or len(base_arrays[0]) != n:
        return None
    parts = []
    for idx in _resamples(n, n_boot, seed):
        a, b = stat(*(x[idx] for x in arrays)), base_stat(*(x[idx] for x in base_arrays))
        ok = b != 0
        parts.append(100.0 * a[ok] / b[ok])
    vals = np.concatenate(parts)
    return _interval(vals, level) if vals.size else None


def median_iqr(values: Sequence[float]) -> tuple[float, float, float] | None:
    """(median, 25th percentile, 75th percentile), None for no values."""
    if len(values) == 0:
        return None
    q25, med, q75 = np.quantile(np.asarray(values, dtype=float), [0.25, 0.5, 0.75])
    return float(med), float(q25), float(q75)
