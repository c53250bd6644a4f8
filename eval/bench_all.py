"""Run the benchmark suites and regenerate the tables of eval/BENCHMARKS.md (no number is typed by hand).

    python -m eval.bench_all --out eval/results/bench                    # the CPU suite (default)
    python -m eval.bench_all --suite gpu --out eval/results/bench        # on a CUDA machine
    python -m eval.bench_all --render-only --out eval/results/bench      # only rebuild the markdown tables

Suites (:data:`SUITES`):

- ``cpu``: every bundled ``configs/llava-1.5/*.yaml`` on LLaVA-1.5-7B shapes (fp32, batch 1, 64 text tokens), and
  one row per other family (:data:`FAMILY_ROWS`: its real-size preset and one of its configs),
  the LLM shortened to ``max(--min-layers, deepest stage layer + 1)`` decoder layers and the CLIP tower to the
  same share of its depth (``round(24 * L / 32)``, >= 2) so that the tower's share of the prefill stays what
  it is at full depth. Configs that would need more than ``--max-layers`` layers are listed as not run.
- ``gpu``: full-depth fp16 models: LLaVA-1.5-7B at batch 1, 4 and 8 (every ``configs/llava-1.5`` config),
  LLaVA-NeXT-7B (~2.9k visual tokens) at batch 1 and 4 (``configs/llava-next``), Qwen2-VL-7B and Qwen2.5-VL-7B
  at batch 1 (``configs/qwen2-vl``).

A config whose methods are not installed (``vtc.available_methods()``) is listed as skipped. Every result is
``<out>/<suite>_<arch>_<config>_b<B>_L<layers>_<device>.json`` (+ ``.png``); the markdown tables between
``<!-- bench:<suite>:begin -->`` and ``<!-- bench:<suite>:end -->`` in ``--md`` are rebuilt from all the JSON
files of the suite found in ``--out``, plus ``<out>/<suite>_summary.png``.
"""

from __future__ import annotations

import argparse
import gc
import json
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from vtc import bench as B
from vtc.bench import measure as BM

__all__ = ["Job", "SUITES", "suite_jobs", "render_markdown", "update_markdown", "main"]

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = ROOT / "configs"


@dataclass
class Job:
    suite: str
    arch: str
    config: str  # path
    layers: int | None = None
    vision_layers: int | None = None
    batch: int = 1
    dtype: str = "float32"
    device: str = "cpu"
    text_tokens: int = 64
    skip: str | None = None  # reason it is not run
    extra: dict = field(default_factory=dict)

    @property
    def label(self) -> str:
        return Path(self.config).stem


def _config_layers(path: Path) -> int:
    """Decoder layers a config needs (deepest LLM-side stage layer + 1; 1 for vision-only configs)."""
    import vtc

    cfg = vtc.load_config(str(path))
    return max((max(s.llm_layers()) for s in cfg.stages if s.llm_layers()), default=0) + 1


def _missing_methods(path: Path) -> list[str]:
    import yaml

    import vtc

    data = yaml.safe_load(path.read_text())
    have = set(vtc.available_methods())
    return sorted({s.get("method") for s in data.get("stages", []) if s.get("method") not in have})


def _missing_checkpoints(path: Path) -> list[str]:
    """Checkpoints a config names (e.g. CDPruner's ``text_encoder``) that are neither a local folder nor in the
    Hugging Face cache: such a config cannot run offline."""
    import yaml

    names = {s["text_encoder"] for s in yaml.safe_load(path.read_text()).get("stages", []) if s.get("text_encoder")}
    missing = []
    for name in sorted(names):
        if Path(name).expanduser().is_dir():
            continue
        try:
            from huggingface_hub import try_to_load_from_cache

            if isinstance(try_to_load_from_cache(name, "config.json"), str):
                continue
        except Exception:  # no hub client / not a repo id
            pass
        missing.append(name)
    return missing


def _skip_reason(path: Path) -> str | None:
    missing = _missing_methods(path)
    if missing:
        return f"method(s) {', '.join(missing)} not installed"
    ckpts = _missing_checkpoints(path)
    return f"checkpoint(s) {', '.join(ckpts)} not available locally" if ckpts else None


#: the CPU suite's one row per other family: (bench preset, config under configs/ without .yaml)
FAMILY_ROWS: list[tuple[str, str]] = [
    ("llava-next-7b", "llava-next/visionzip-320"),
    ("qwen2-vl-7b", "qwen2-vl/visionzip-25"),
    ("qwen2.5-vl-7b", "qwen2-vl/visionzip-25"),
    ("mistral-small-3.1-24b", "mistral3/visionzip-25"),
    ("internvl3-8b", "internvl3/visionzip-64"),
    ("smolvlm2-2.2b", "smolvlm/visionzip-18"),
    ("llava-onevision-7b", "llava-onevision/visionzip-25"),
    ("gemma3-4b", "gemma3/visionzip-64"),
    ("qwen3-vl-8b", "qwen3-vl/visionzip-25"),
]


def _family_configs(folder: str) -> list[Path]:
    return sorted((CONFIGS / folder).glob("*.yaml"))


def suite_jobs(suite: str, *, min_layers: int = 3, max_layers: int = 5) -> list[Job]:
    """The jobs of a suite (see the module docstring)."""
    jobs: list[Job] = []
    if suite == "cpu":
        plan = [("llava-1.5-7b", str(p.relative_to(ROOT))) for p in _family_configs("llava-1.5")]
        plan += [(arch, f"configs/{config}.yaml") for arch, config in FAMILY_ROWS]
        for arch, config in plan:
            spec = B.ARCHS[arch]
            path = ROOT / config
            job = Job("cpu", spec.name, config)
            job.skip = _skip_reason(path)
            if job.skip is None:
                need = max(min_layers, _config_layers(path))
                job.layers = need
                job.vision_layers = max(2, round(spec.vision_layers * need / spec.text_layers))
                if need > max_layers:
                    job.skip = f"needs {need} decoder layers (> --max-layers {max_layers}); run on a GPU"
            jobs.append(job)
    elif suite == "gpu":
        plan = [("llava-1.5-7b", "llava-1.5", (1, 4, 8)), ("llava-next-7b", "llava-next", (1, 4)),
                ("qwen2-vl-7b", "qwen2-vl", (1,)), ("qwen2.5-vl-7b", "qwen2-vl", (1,))]
        for arch, folder, batches in plan:
            for path in _family_configs(folder):
                for b in batches:
                    job = Job("gpu", arch, str(path.relative_to(ROOT)), batch=b, dtype="float16", device="cuda")
                    job.skip = _skip_reason(path)
                    jobs.append(job)
    else:
        raise ValueError(f"unknown --suite {suite!r} (allowed: cpu, gpu)")
    return jobs


SUITES = ("cpu", "gpu")


def _stem(job: Job, result: dict) -> str:
    return f"{job.suite}_{B.result_stem(result)}"


def run_jobs(jobs: list[Job], out: Path, *, repeats: int, warmup: int, decode_tokens: int) -> list[Path]:
    written = []
    todo = [j for j in jobs if j.skip is None]
    groups: dict[tuple, list[Job]] = {}
    for j in todo:
        groups.setdefault((j.arch, j.layers, j.vision_layers, j.dtype, j.device), []).append(j)
    done = 0
    t_start = time.perf_counter()
    for (arch, layers, vlayers, dtype, device), group in groups.items():
        BM._stderr(f"building {arch} (LLM layers {layers or 'all'}, vision layers {vlayers or 'all'}, {dtype}, "
                  f"{device}) for {len(group)} job(s)")
        model = B.build_model(arch, layers=layers, vision_layers=vlayers, dtype=dtype, device=device)
        for job in group:
            done += 1
            BM._stderr(f"[{done}/{len(todo)}] {job.label} batch {job.batch} ({time.perf_counter() - t_start:.0f} s so far)")
            inputs = B.synthetic_inputs(model, arch, batch=job.batch, text_tokens=job.text_tokens)
            result = B.bench(model, inputs, job.config, repeats=repeats, warmup=warmup, decode_tokens=decode_tokens)
            result["suite"] = job.suite
            result["label"] = job.label
            print(B.format_table(result), flush=True)
            jpath, _ = B.write_result(result, out, stem=_stem(job, result))
            written.append(jpath)
            del inputs
        del model
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    return written


# ---- markdown ------------------------------------------------------------------------------------------------------
def _fmt(x, spec: str = "{:.2f}", none: str = "–") -> str:
    return none if x is None else spec.format(x)


def _load(out: Path, suite: str) -> list[dict]:
    results = []
    for p in sorted(out.glob(f"{suite}_*.json")):
        try:
            r = json.loads(p.read_text())
        except json.JSONDecodeError:
            continue
        if r.get("suite") == suite:
            r["_file"] = p.name
            results.append(r)
    return results


def render_markdown(results: list[dict], skipped: list[Job] | None = None) -> str:
    """The markdown table(s) of one suite's results (one table per arch / dtype / device)."""
    if not results and not skipped:
        return "_No results yet: run `python -m eval.bench_all` for this suite._\n"
    lines: list[str] = []
    groups: dict[tuple, list[dict]] = {}
    for r in results:
        key = (r["arch"], r["dtype"], r["environment"]["device"].split(":")[0])
        groups.setdefault(key, []).append(r)
    for (arch, dtype, device), rs in groups.items():
        rs.sort(key=lambda r: (r["batch"], r.get("label") or ""))
        env = rs[0]["environment"]
        where = env.get("gpu") or f"{env.get('processor') or 'CPU'}, {env.get('cpu_count')} cores, " \
                                  f"{env.get('torch_threads')} torch threads"
        lines.append(f"**{arch}**, {dtype}, {device} ({where}); torch {env['torch']}, transformers "
                     f"{env['transformers']}; {rs[0]['repeats']} repeats after {rs[0]['warmup']} warm-up round(s), "
                     f"{rs[0]['decode_tokens']} decoded tokens; measured {min(r['environment']['date'] for r in rs)} "
                     f"to {max(r['environment']['date'] for r in rs)}.\n")
        lines.append("| config | batch | LLM / vision layers | LLM tokens (first → last layer) | prefill ms: baseline | vtc | "
                     "oracle | speedup | oracle speedup | efficiency | vtc overhead (full depth, est.) | "
                     "decode ms/token: baseline → vtc | "
                     "KV MB: baseline → vtc | peak MB (Δ): baseline → vtc | FLOPs ratio (run / full depth) |")
        lines.append("|" + "---|" * 15)
        for r in rs:
            v = r["variants"]
            s = B.summarize(v, r["summary"].get("oracle_matches_vtc", True))  # recomputed from the medians
            base, vt, orc = v["baseline"], v["vtc"], v["oracle"]

            def pre(e):
                p = e["prefill_s"]
                return f"{_fmt(p['median'] * 1e3, '{:.0f}')} ± {_fmt(p['iqr'] * 1e3, '{:.0f}')}"

            def mem(e):
                d = e.get("peak_memory_delta_bytes")
                return _fmt(d / 2 ** 20 if d is not None else None, "{:.0f}")

            flag = "" if s.get("oracle_matches_vtc", True) else " ⚠"
            lines.append(
                f"| {r.get('label') or r['config_name']}{flag} | {r['batch']} | {r['llm_layers']} / {r['vision_layers']} "
                f"| {base['seq_len_per_layer'][0]} → {vt['seq_len_per_layer'][0]} → {vt['seq_len_per_layer'][-1]} "
                f"| {pre(base)} | {pre(vt)} | {pre(orc)} | {_fmt(s['speedup'])}× | {_fmt(s['oracle_speedup'])}× "
                f"| {_fmt(s['efficiency'], '{:.3f}')} | {_fmt(s['overhead_pct'], '{:.1f}')}% "
                f"({_fmt(s['overhead_pct_full_depth_est'], '{:.1f}')}%) "
                f"| {_fmt(base['decode_s_per_token']['median'] * 1e3 if base['decode_s_per_token']['median'] else None, '{:.0f}')}"
                f" → {_fmt(vt['decode_s_per_token']['median'] * 1e3 if vt['decode_s_per_token']['median'] else None, '{:.0f}')} "
                f"| {_fmt(base['kv_cache_bytes'] / 2 ** 20, '{:.1f}')} → {_fmt(vt['kv_cache_bytes'] / 2 ** 20, '{:.1f}')} "
                f"| {mem(base)} → {mem(vt)} "
                f"| {_fmt(s['flops_ratio'], '{:.3f}')} / {_fmt(s['flops_ratio_full_depth'], '{:.3f}')} |")
        lines.append("")
    if skipped:
        lines.append("Not run: " + "; ".join(f"`{j.label}` ({j.skip})" for j in skipped) + ".\n")
    return "\n".join(lines)


def plot_summary(results: list[dict], path: Path) -> Path | None:
    """Grouped bars per config: speedup of vtc and of the oracle vs the baseline, and the efficiency."""
    if not results:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rs = sorted(results, key=lambda r: (r["arch"], r["batch"], r.get("label") or ""))
    labels = [f"{r.get('label') or r['config_name']}\n{r['arch']} b{r['batch']}" for r in rs]
    sp = [r["summary"]["speedup"] or 0 for r in rs]
    osp = [r["summary"]["oracle_speedup"] or 0 for r in rs]
    eff = [r["summary"]["efficiency"] or 0 for r in rs]
    x = range(len(rs))
    fig, ax = plt.subplots(figsize=(max(8, 0.75 * len(rs) + 2), 4.8))
    w = 0.38
    ax.bar([i - w / 2 for i in x], osp, w, label="oracle (ideal) speedup", color="#2ca02c")
    ax.bar([i + w / 2 for i in x], sp, w, label="vtc speedup", color="#1f77b4")
    for i, e in enumerate(eff):
        ax.text(i + w / 2, sp[i], f"{e:.2f}", ha="center", va="bottom", fontsize=7, rotation=90)
    ax.axhline(1.0, color="grey", lw=0.8, ls="--")
    ax.set_xticks(list(x))
    ax.set_xticklabels(labels, rotation=60, ha="right", fontsize=7)
    ax.set_ylabel("prefill speedup vs baseline (×)")
    ax.set_title("vision + prefill speedup (numbers on the vtc bars: efficiency = oracle time / vtc time)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def update_markdown(md: Path, suite: str, table: str) -> None:
    """Replace the text between the suite's markers in ``md`` (appending a section with markers if absent)."""
    begin, end = f"<!-- bench:{suite}:begin -->", f"<!-- bench:{suite}:end -->"
    text = md.read_text() if md.exists() else "# Benchmarks\n"
    block = f"{begin}\n<!-- generated by `python -m eval.bench_all --suite {suite}`; do not edit by hand -->\n\n" \
            f"{table.rstrip()}\n\n{end}"
    if begin in text and end in text:
        text = re.sub(re.escape(begin) + r".*?" + re.escape(end), lambda _: block, text, flags=re.S)
    else:
        text = text.rstrip() + f"\n\n## Results: {suite}\n\n{block}\n"
    md.write_text(text)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m eval.bench_all", description=__doc__.split("\n\n")[0])
    p.add_argument("--suite", choices=SUITES, default="cpu")
    p.add_argument("--out", default=str(ROOT / "eval" / "results" / "bench"))
    p.add_argument("--md", default=str(ROOT / "eval" / "BENCHMARKS.md"))
    p.add_argument("--only", default=None, help="run only configs whose name contains this (regex)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--decode-tokens", type=int, default=4)
    p.add_argument("--min-layers", type=int, default=3)
    p.add_argument("--max-layers", type=int, default=5)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--render-only", action="store_true", help="do not measure; rebuild the markdown from the JSONs")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    jobs = suite_jobs(args.suite, min_layers=args.min_layers, max_layers=args.max_layers)
    if args.only:
        jobs = [j for j in jobs if re.search(args.only, j.label)]
    if not args.render_only:
        if args.suite == "gpu" and not torch.cuda.is_available():
            print("error: the gpu suite needs CUDA", file=sys.stderr)
            return 2
        run_jobs(jobs, out, repeats=args.repeats, warmup=args.warmup, decode_tokens=args.decode_tokens)
    results = _load(out, args.suite)
    ran = {r.get("label") for r in results}
    skipped = [j for j in jobs if j.skip is not None and j.label not in ran]
    update_markdown(Path(args.md), args.suite, render_markdown(results, skipped))
    plot_summary(results, out / f"{args.suite}_summary.png")
    print(f"updated {args.md} ({len(results)} result(s) of suite {args.suite})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
