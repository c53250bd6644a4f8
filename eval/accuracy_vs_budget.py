"""Accuracy vs visual-token budget of every method on the bundled demo VLMs (synthetic shapes-VQA test split).

    python -m eval.accuracy_vs_budget [--n 600] [--out eval/results/accuracy_vs_budget]

For the grid model (196 patch tokens, 14x14) every method runs at 100%, 50%, 25% and 11% of the visual tokens;
the ordered 1D model (32 latents) runs prefix truncation and pooling. Composed configs (e.g. VisionZip then PACT)
too. Writes ``results.json``, ``results.md`` (the table quoted in the README) and ``accuracy_vs_budget.png``.
Each cell is the test accuracy and, in brackets, the mean number of visual tokens the LLM actually kept
(for LLM-side methods: after the pruning layer). Every number comes from this script.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from vtc.demo import ASSETS

FRACTIONS = (1.0, 0.5, 0.25, 0.11)
GRID_TOKENS = 196
LATENTS = 32


def _k(frac: float, n: int) -> int:
    return max(1, round(frac * n))


def grid_configs() -> dict[str, callable]:
    """name -> (fraction -> config) for the grid model (4 LLM layers, 14x14 CLIP patches + CLS)."""

    def vz(f):
        k = _k(f, GRID_TOKENS)
        return [{"method": "visionzip", "budget": k}]

    return {
        "random": lambda f: [{"method": "random", "budget": _k(f, GRID_TOKENS)}],
        "downsample": lambda f: [{"method": "downsample", "budget": _k(f, GRID_TOKENS)}],
        "pool-avg": lambda f: [{"method": "pool", "mode": "avg", "budget": _k(f, GRID_TOKENS)}],
        "pool-max": lambda f: [{"method": "pool", "mode": "max", "budget": _k(f, GRID_TOKENS)}],
        "pool-attn": lambda f: [{"method": "pool", "mode": "attn", "budget": _k(f, GRID_TOKENS)}],
        "pool-cluster": lambda f: [{"method": "pool", "mode": "cluster", "budget": _k(f, GRID_TOKENS)}],
        "fastv (L=1)": lambda f: [{"method": "fastv", "layer": 1, "budget": f}],
        "random-llm (L=1)": lambda f: [{"method": "random", "layer": 1, "budget": f}],
        "fastv (L=2)": lambda f: [{"method": "fastv", "layer": 2, "budget": f}],
        "random-llm (L=2)": lambda f: [{"method": "random", "layer": 2, "budget": f}],
        "visionzip": vz,
        "pact (L=1)": lambda f: [{"method": "pact", "layer": 1, "keep": f, "cutoff": 0.21}],
        "pact (L=2)": lambda f: [{"method": "pact", "layer": 2, "keep": f, "cutoff": 0.21}],
        "transprune (L=1,2,3)": lambda f: [{"method": "transprune", "layers": [1, 2, 3],
                                            "keep": [min(1.0, f * 1.75), min(1.0, f * 1.25), f],
                                            "accumulate": [0, 2]}],
        "dart (L=1)": lambda f: [{"method": "dart", "layer": 1, "budget": f}],
        "pdrop (L=1,2,3)": lambda f: [{"method": "pdrop", "layers": [1, 2, 3],
                                       "keep": [min(1.0, f * 4), min(1.0, f * 2), f]}],
        "sparsevlm (L=1,2,3)": lambda f: [{"method": "sparsevlm", "layers": [1, 2, 3],
                                           "keep": [min(1.0, f * 4), min(1.0, f * 2), f], "heads": 2}],
        # v1.5 recycles part of what each cut prunes (the bracketed count is above the column's share)
        "sparsevlm v1.5 (L=1,2,3)": lambda f: [{"method": "sparsevlm", "version": 1.5, "layers": [1, 2, 3],
                                                "keep": [min(1.0, f * 4), min(1.0, f * 2), f]}],
        "visionzip + pact": lambda f: vz(min(1.0, f / 0.75)) + [{"method": "pact", "layer": 2, "keep": 0.75}],
        "visionzip + pdrop": lambda f: vz(min(1.0, f * 2)) + [{"method": "pdrop", "layers": [2], "keep": [0.5]}],
        "visionzip + fastv": lambda f: vz(min(1.0, f * 2)) + [{"method": "fastv", "layer": 2, "budget": 0.5}],
        # vision-side 2025 methods
        "divprune": lambda f: [{"method": "divprune", "budget": _k(f, GRID_TOKENS)}],
        "fastervlm": lambda f: [{"method": "fastervlm", "budget": _k(f, GRID_TOKENS)}],
        "vispruner": lambda f: [{"method": "vispruner", "budget": _k(f, GRID_TOKENS)}],
        # CDPruner with the demo tower's own CLIP text tower (eval/demo_training/train_text_tower.py); that tower is
        # trained with the paper's sign of relevance, so the official negation is switched off
        "cdpruner": lambda f: [{"method": "cdpruner", "budget": _k(f, GRID_TOKENS), "negate": False,
                                "text_encoder": str(ASSETS / "tiny-llava-clip")}],
    }


def ordered_configs() -> dict[str, callable]:
    return {
        "prefix": lambda f: [{"method": "prefix", "budget": _k(f, LATENTS)}],
        "pool-avg (1D)": lambda f: [{"method": "pool", "mode": "avg", "budget": _k(f, LATENTS)}],
        "random": lambda f: [{"method": "random", "budget": _k(f, LATENTS)}],
        "fastv (L=1)": lambda f: [{"method": "fastv", "layer": 1, "budget": f}],
        "fastv (L=2)": lambda f: [{"method": "fastv", "layer": 2, "budget": f}],
        "pact (L=2)": lambda f: [{"method": "pact", "layer": 2, "keep": f, "cutoff": 0.21}],
        "dart (L=1)": lambda f: [{"method": "dart", "layer": 1, "budget": f}],
        "pdrop (L=1,2,3)": lambda f: [{"method": "pdrop", "layers": [1, 2, 3],
                                       "keep": [min(1.0, f * 4), min(1.0, f * 2), f]}],
        # features only (no tower attention on the 1D model, so no fastervlm / vispruner)
        "divprune": lambda f: [{"method": "divprune", "budget": _k(f, LATENTS)}],
    }


def run(n: int, out: Path, batch_size: int = 50, models=("grid", "1d"), only: set[str] | None = None) -> dict:
    """Measure every row (``only``: just these rows, the others are taken from an existing ``results.json`` of
    the same ``n`` in ``out`` when there is one)."""
    import vtc
    from vtc.cli import _load_model
    from vtc.demo.evaluate import evaluate

    torch.set_num_threads(max(1, torch.get_num_threads()))
    results: dict = {"n": n, "split": "test", "fractions": list(FRACTIONS), "models": {}}
    previous: dict = {}
    if only and (out / "results.json").exists():
        old = json.loads((out / "results.json").read_text())
        if old.get("n") == n and old.get("fractions") == list(FRACTIONS):
            previous = old["models"]
            results["models"] = {k: v for k, v in previous.items() if k not in models}
    available = set(vtc.available_methods())
    for kind in models:
        model, processor, path = _load_model(None, kind)
        old_table = previous.get(kind, {}).get("table", {})
        table = {}
        t0 = time.perf_counter()
        if "uncompressed" in old_table:
            table["uncompressed"] = old_table["uncompressed"]
        else:
            base = evaluate(model, processor, split="test", n=n, batch_size=batch_size)
            table["uncompressed"] = {"1.0": {"accuracy": base["accuracy"], "visual_tokens": None}}
        configs = grid_configs() if kind == "grid" else ordered_configs()
        for name, make in configs.items():
            if only and name not in only and name in old_table:
                table[name] = old_table[name]
                continue
            missing = {s["method"] for s in make(1.0)} - available
            if missing:
                raise SystemExit(f"accuracy_vs_budget: method(s) {sorted(missing)} of {name!r} are not registered")
            row = {}
            for f in FRACTIONS:
                cfg = {"stages": make(f)}
                with vtc.compress(model, cfg) as r:
                    rep = evaluate(model, processor, split="test", n=n, batch_size=batch_size)
                    kept = r.stats.stages[-1].tokens_out if r.stats.stages else []
                row[str(f)] = {"accuracy": rep["accuracy"], "per_type": rep["per_type"],
                               "visual_tokens": (sum(kept) / len(kept)) if kept else None}
            table[name] = row
        seconds = time.perf_counter() - t0 + (previous.get(kind, {}).get("seconds", 0.0) if only else 0.0)
        results["models"][kind] = {"path": str(path), "table": table, "seconds": seconds}
    results["models"] = {k: results["models"][k] for k in ("grid", "1d") if k in results["models"]}
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=1))
    (out / "results.md").write_text(to_markdown(results))
    plot(results, out / "accuracy_vs_budget.png")
    return results


def to_markdown(results: dict) -> str:
    lines = [f"Test accuracy (%) on {results['n']} test questions of the synthetic shapes-VQA task, by share of "
             "visual tokens kept (measured by `python -m eval.accuracy_vs_budget`; for content-adaptive methods "
             "the column is the target; brackets: mean visual tokens actually kept, after the pruning layer for "
             "LLM-side methods).", ""]
    for kind, res in results["models"].items():
        base = res["table"]["uncompressed"]["1.0"]["accuracy"]
        lines.append(f"### {'grid model (196 tokens)' if kind == 'grid' else 'ordered 1D model (32 latents)'}"
                     f" — uncompressed {100 * base:.1f}%")
        lines.append("")
        lines.append("| method | " + " | ".join(f"{int(round(f * 100))}%" for f in results["fractions"]) + " |")
        lines.append("|---|" + "---|" * len(results["fractions"]))
        for name, row in res["table"].items():
            if name == "uncompressed":
                continue
            cells = []
            for f in results["fractions"]:
                c = row.get(str(f), {})
                tokens = c.get("visual_tokens")
                cells.append(f"{100 * c['accuracy']:.1f}" + (f" ({tokens:.0f})" if tokens is not None else ""))
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    kinds = list(results["models"])
    colors = plt.get_cmap("tab10").colors
    fig, axes = plt.subplots(1, len(kinds), figsize=(8.5 * len(kinds), 5.0), squeeze=False)
    for ax, kind in zip(axes[0], kinds):
        res = results["models"][kind]
        base = res["table"]["uncompressed"]["1.0"]["accuracy"]
        rows = [(name, row) for name, row in res["table"].items() if name != "uncompressed"]
        for i, (name, row) in enumerate(rows):
            xs = [f for f in results["fractions"] if "accuracy" in row.get(str(f), {})]
            # one (colour, line, marker) per row: ten colours, then the next line style and marker
            ax.plot([100 * x for x in xs], [100 * row[str(x)]["accuracy"] for x in xs], color=colors[i % 10],
                    ls=("-", "--", ":")[i // 10 % 3], marker=("o", "s", "^")[i // 10 % 3], label=name)
        ax.axhline(100 * base, color="k", ls="--", lw=1, label="uncompressed")
        ax.set_xscale("log")
        ax.set_xticks([11, 25, 50, 100], ["11%", "25%", "50%", "100%"])
        ax.set_xlabel("visual tokens kept")
        ax.set_ylabel("test accuracy (%)")
        ax.set_title("grid model" if kind == "grid" else "ordered 1D model")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=600)
    p.add_argument("--batch-size", type=int, default=50)
    p.add_argument("--models", nargs="+", default=["grid", "1d"], choices=["grid", "1d"])
    p.add_argument("--out", default="eval/results/accuracy_vs_budget")
    p.add_argument("--only", nargs="+", metavar="ROW",
                   help="measure only these rows; the others come from the existing results.json (same --n)")
    args = p.parse_args(argv)
    res = run(args.n, Path(args.out), args.batch_size, tuple(args.models), set(args.only) if args.only else None)
    print(to_markdown(res))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
