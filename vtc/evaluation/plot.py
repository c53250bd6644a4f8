"""The accuracy-vs-tokens plot of ``vtc eval --plot``.

x: visual tokens per question averaged over decoder layers (for vision-side configs this is the count entering
the LLM; for LLM-side stages it is the fair count, since layers before the pruning layer still see every token);
y: the score with its 95% bootstrap interval as error bars. One colour and line per config family (methods, side
and layers: ``fastv@L2`` and ``fastv@L3`` are different families), one marker and legend entry per config, the
uncompressed baseline and (``--blind``) the blind score as dashed lines, the legend outside the axes (no labels
over the data), and a y-axis from a floor just under the lowest score or blind line, not from 0.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

__all__ = ["draw", "plot_results", "y_label", "X_LABEL"]

X_LABEL = "visual tokens per question, averaged over decoder layers"
_MARKERS = "osD^vP<>Xph*"


def y_label(metric: str) -> str:
    return {"pope": "F1 (%)", "first_word": "accuracy (%)", "exact_match": "accuracy (%)", "exact": "accuracy (%)",
            "contains": "accuracy (%)", "yesno": "accuracy (%)"}.get(metric, "VQA accuracy (%)")


def draw(ax, rows: Sequence[dict]) -> dict:
    """Draw ``rows`` (``vtc eval`` result rows) on ``ax``; returns what was drawn: ``{"families": {family:
    [(method, x, y, lo, hi)]}, "baseline": y | None, "blind": y | None, "ylim": (lo, hi)}``."""
    scored = [r for r in rows if r.get("score") is not None]
    special = {r["family"]: r for r in scored if r["family"] in ("baseline", "blind")}
    fams: dict[str, list[dict]] = defaultdict(list)
    for r in scored:
        if r["family"] not in special:
            fams[r["family"]].append(r)
    drawn: dict = {"families": {}, "baseline": None, "blind": None}
    k = 0
    for fam, rs in fams.items():
        rs = sorted(rs, key=lambda r: r["visual_tokens_avg_layer"])
        xs = [r["visual_tokens_avg_layer"] for r in rs]
        ys = [r["score"] for r in rs]
        (line,) = ax.plot(xs, ys, "-", lw=1.2, alpha=0.7)
        color = line.get_color()
        pts = []
        for r, x, y in zip(rs, xs, ys):
            lo, hi = r.get("score_lo"), r.get("score_hi")
            yerr = [[y - lo], [hi - y]] if lo is not None and hi is not None else None
            ax.errorbar([x], [y], yerr=yerr, fmt=_MARKERS[k % len(_MARKERS)], color=color, ms=6, capsize=3,
                        label=f"{r['method']} ({fam})")
            pts.append((r["method"], x, y, lo, hi))
            k += 1
        drawn["families"][fam] = pts
    if "baseline" in special:
        b = special["baseline"]
        ax.axhline(b["score"], color="0.25", ls="--", lw=1, label=f"uncompressed: {b['score']:.1f}")
        if b.get("score_lo") is not None:
            ax.axhspan(b["score_lo"], b["score_hi"], color="0.5", alpha=0.12, lw=0)
        ax.plot([b["visual_tokens_avg_layer"]], [b["score"]], "k*", ms=10)
        drawn["baseline"] = b["score"]
    if "blind" in special:
        ax.axhline(special["blind"]["score"], color="tab:red", ls="--", lw=1,
                   label=f"blind (blank images): {special['blind']['score']:.1f}")
        drawn["blind"] = special["blind"]["score"]
    lows = [r.get("score_lo", r["score"]) if r.get("score_lo") is not None else r["score"] for r in scored]
    highs = [r.get("score_hi", r["score"]) if r.get("score_hi") is not None else r["score"] for r in scored]
    if lows:
        floor = max(0.0, 5 * math.floor((min(lows) - 3) / 5))
        top = min(100.0, 5 * math.ceil((max(highs) + 3) / 5))
        if top <= floor:
            top = floor + 5
        ax.set_ylim(floor, top)
    xs = [r["visual_tokens_avg_layer"] for r in scored]
    if xs:
        ax.set_xlim(0, max(xs) * 1.06)
    drawn["ylim"] = tuple(ax.get_ylim())
    return drawn


def plot_results(rows: Sequence[dict], path: str | Path, title: str = "") -> Path:
    """Write the plot of ``rows`` to ``path`` (PNG)."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    path = Path(path)
    fig, ax = plt.subplots(figsize=(8.6, 4.6), dpi=120)
    draw(ax, rows)
    ax.set_xlabel(X_LABEL)
    ax.set_ylabel(y_label(rows[0]["metric"] if rows else ""))
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
