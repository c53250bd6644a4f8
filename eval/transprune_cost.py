"""Analytic cost of TransPrune's shipped schedule at real model shapes (no weights needed).

    python eval/transprune_cost.py [--config configs/llava-1.5/transprune.yaml] [--out eval/results]

Reports, for LLaVA-1.5-7B (576 visual tokens, 35 text tokens before the image and 29 after it) and
LLaVA-NeXT-7B (2880 base + crop tokens and 48 image-newline tokens that are never pruned):
LLM prefill FLOPs pruned vs unpruned, the fraction of visual-token compute removed (target >= 50%), the paper's
token-layer count, and the method's own overhead (TTV at the accumulation layers + IGA at each pruning point)
as a fraction of the pruned and of the unpruned prefill. FLOPs conventions: vtc/flops.py (= eval/flops.py). Writes
``transprune_cost.json`` and ``transprune_cost.md`` to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import vtc
from vtc.reduction import resolve_budget

HERE = Path(__file__).resolve().parent
try:
    from vtc import flops  # the library copy of the FLOPs model (vtc eval, the benchmark)
except ImportError:  # pragma: no cover - older trees keep it in eval/ only
    sys.path.insert(0, str(HERE))
    import flops  # type: ignore[no-redef]

SCENARIOS = {
    # name: (shape, prunable visual tokens, unpruned tokens before them, unpruned tokens after them)
    "llava-1.5-7b": (flops.LLAVA_15_7B, 576, 35, 29),
    # anyres 2x2 + base: 5 x 576 visual tokens, + 48 newline tokens (protected: counted as never-pruned tokens)
    "llava-next-7b": (flops.LLAVA_15_7B, 2880, 35 + 48, 29),
}


def cost(stage, shape: flops.LMShape, visual: int, before: int, after: int) -> dict:
    text = before + after
    schedule = [(layer, resolve_budget(k, visual)) for layer, k in zip(stage.layers, stage.keep)]
    lens = flops.schedule_seq_lens(shape.layers, text, visual, schedule)
    full = [text + visual] * shape.layers
    f_full, f_pruned = flops.prefill_flops(shape, full), flops.prefill_flops(shape, lens)
    v_full, v_pruned = flops.visual_flops(shape, full, text), flops.visual_flops(shape, lens, text)
    token_layers = sum(n - text for n in lens) / (visual * shape.layers)
    ttv = sum(flops.ttv_flops(shape, lens[i]) for i in stage.accumulation_layers())
    # IGA at a pruning point runs on the sequence entering it (before that point prunes)
    iga = sum(flops.iga_flops(shape, lens[layer - 1], after) for layer in stage.layers) if stage.iga_weight else 0
    return {
        "visual_tokens": visual, "text_tokens": text, "instruction_tokens": after,
        "schedule": [{"layer": layer, "visual_kept": k} for layer, k in schedule],
        "seq_len_per_layer": lens,
        "llm_flops_unpruned": f_full, "llm_flops_pruned": f_pruned,
        "llm_flops_reduction": 1 - f_pruned / f_full,
        "visual_flops_unpruned": v_full, "visual_flops_pruned": v_pruned,
        "visual_flops_reduction": 1 - v_pruned / v_full,
        "visual_token_layers_reduction": 1 - token_layers,
        "overhead_ttv_flops": ttv, "overhead_iga_flops": iga,
        "overhead_fraction_of_pruned_prefill": (ttv + iga) / f_pruned,
        "overhead_fraction_of_unpruned_prefill": (ttv + iga) / f_full,
    }


def report(config_path: str) -> dict:
    cfg = vtc.load_config(config_path)
    stage = next(s for s in cfg.stages if s.method == "transprune")
    free = stage.model_copy(update={"iga_weight": 0.0})
    try:
        shown = str(Path(config_path).resolve().relative_to(HERE.parent))
    except ValueError:
        shown = str(config_path)
    out = {"config": shown, "flops_model": "vtc.flops (matmuls only, causal attention, SwiGLU MLP)",
           "stage": stage.model_dump(), "results": {}}
    for name, (shape, visual, before, after) in SCENARIOS.items():
        out["results"][name] = cost(stage, shape, visual, before, after)
        out["results"][name]["attention_free_overhead_fraction_of_pruned_prefill"] = \
            cost(free, shape, visual, before, after)["overhead_fraction_of_pruned_prefill"]
    return out


def markdown(data: dict) -> str:
    lines = [f"# TransPrune analytic cost ({data['config']})", "",
             f"FLOPs model: {data['flops_model']}. Stage: `{json.dumps(data['stage'])}`.", "",
             "| model | visual tokens per stage | LLM prefill TFLOPs (unpruned -> pruned) | LLM FLOPs saved "
             "| visual-token FLOPs saved | visual token-layers saved | overhead TTV+IGA (TTV only) |",
             "|---|---|---|---|---|---|---|"]
    for name, r in data["results"].items():
        kept = " -> ".join([str(r["visual_tokens"])] + [str(s["visual_kept"]) for s in r["schedule"]])
        lines.append(
            f"| {name} | {kept} | {r['llm_flops_unpruned'] / 1e12:.2f} -> {r['llm_flops_pruned'] / 1e12:.2f} "
            f"| {r['llm_flops_reduction']:.1%} | {r['visual_flops_reduction']:.1%} "
            f"| {r['visual_token_layers_reduction']:.1%} "
            f"| {r['overhead_fraction_of_pruned_prefill']:.3%} "
            f"({r['attention_free_overhead_fraction_of_pruned_prefill']:.4%}) of the pruned prefill |")
    lines += ["", "Visual-token FLOPs = a layer's FLOPs minus the same layer on the text tokens alone (all token-wise "
              "terms of visual tokens + every attention pair involving one). Overhead: TTV (norms and dot products "
              "of the attention / MLP inputs and outputs at the accumulation layers) plus IGA (input norm, k for all "
              "tokens, q and attention rows for the instruction tokens at each pruning point)."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", default=str(HERE.parent / "configs" / "llava-1.5" / "transprune.yaml"))
    ap.add_argument("--out", default=str(HERE / "results"))
    args = ap.parse_args(argv)
    data = report(args.config)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "transprune_cost.json").write_text(json.dumps(data, indent=2) + "\n")
    md = markdown(data)
    (out / "transprune_cost.md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()
