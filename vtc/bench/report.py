"""Report and command line of ``vtc bench``: the plain-text table, the JSON and PNG files, ``main``."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from ..errors import ConfigError
from .measure import VARIANTS, _stderr, bench
from .presets import ARCHS, DTYPES, build_model, get_arch, synthetic_inputs

__all__ = ["format_table", "result_stem", "plot_result", "write_result", "build_parser", "main"]


# ---- reporting -----------------------------------------------------------------------------------------------------
def _ms(x) -> str:
    return "-" if x is None else f"{x * 1e3:.1f}"


def _mb(x) -> str:
    return "-" if x is None else f"{x / 2 ** 20:.1f}"


def _x(x, fmt="{:.2f}") -> str:
    return "-" if x is None else fmt.format(x)


def _g(x: float) -> str:
    return f"{x:.0f}" if x >= 100 else f"{x:.3g}"


def _peak(e: dict) -> str:
    return f"{_mb(e['peak_memory_bytes'])} (+{_mb(e['peak_memory_delta_bytes'])})"


def format_table(result: dict) -> str:
    """The plain-text table printed by ``vtc bench``."""
    v = result["variants"]
    s = result["summary"]
    head = (f"vtc bench: {result['arch']} (LLM {result['llm_layers']}/{result['full_llm_layers']} layers, vision "
            f"{result['vision_layers']}/{result['full_vision_layers']}), config {result['config_name'] or result['config']} "
            f"({' + '.join(result['methods'])}), batch {result['batch']}, {result['dtype']}, "
            f"{result['environment']['device']}, prompt {result['prompt_len']} tokens ({result['visual_tokens']} visual)")
    cols = ["variant", "LLM tokens (first/last layer)", "prefill ms (median ± IQR)", "decode ms/token",
            "vtc ms", "peak MB (+during call)", "KV MB", "GFLOPs prefill (run / full depth)"]
    rows = []
    for name in VARIANTS:
        e = v[name]
        p = e["prefill_s"]
        pre = f"{_ms(p['median'])} ± {_ms(p['iqr'])}"
        if name == "vision":
            rows.append([name + " (tower+proj)", "-", pre, "-", "-", _peak(e), "-", "-"])
            continue
        seq = e["seq_len_per_layer"]
        fl_run = _g(e["flops"]["prefill_total"] / 1e9)
        fl_full = _g(e["flops_full_depth"]["prefill_total"] / 1e9)
        rows.append([name, f"{seq[0]}/{seq[-1]}", pre, _ms(e["decode_s_per_token"]["median"]),
                     _ms(e["vtc_time_s"]["median"]), _peak(e), _mb(e["kv_cache_bytes"]), f"{fl_run} / {fl_full}"])
    widths = [max(len(str(r[i])) for r in rows + [cols]) for i in range(len(cols))]
    line = lambda r: "  ".join(str(c).ljust(w) for c, w in zip(r, widths))  # noqa: E731
    out = [head, line(cols), line(["-" * w for w in widths])] + [line(r) for r in rows]
    out.append(
        f"speedup vs baseline: vtc {_x(s['speedup'])}x, oracle {_x(s['oracle_speedup'])}x  |  "
        f"efficiency (oracle/vtc time) {_x(s['efficiency'], '{:.3f}')}  |  vtc overhead "
        f"{_x(s['overhead_pct'], '{:.2f}')}% of the compressed prefill  |  decode speedup {_x(s['decode_speedup'])}x  |  "
        f"KV cache x{_x(s['kv_ratio'], '{:.3f}')}  |  prefill FLOPs x{_x(s['flops_ratio'], '{:.3f}')} as run, "
        f"x{_x(s['flops_ratio_full_depth'], '{:.3f}')} at full depth")
    if not s.get("oracle_matches_vtc", True):
        out.append("WARNING: the oracle's sequence lengths differ from vtc's (see the JSON)")
    return "\n".join(out)


def result_stem(result: dict) -> str:
    name = (result["config_name"] or Path(result["config"] or "config").stem).replace("/", "-").replace(" ", "_")
    dev = result["environment"]["device"].split(":")[0]
    return f"{result['arch']}_{name}_b{result['batch']}_L{result['llm_layers']}_{dev}"


def plot_result(result: dict, path: str | Path) -> Path:
    """Bar plot: prefill latency (median, IQR whiskers), decode latency per token, prefill FLOPs."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    v = result["variants"]
    names = ["baseline", "vtc", "oracle"]
    colors = {"baseline": "#7f7f7f", "vtc": "#1f77b4", "oracle": "#2ca02c", "vision": "#bbbbbb"}
    fig, axes = plt.subplots(1, 3, figsize=(13, 4.2))
    pre_names = names + ["vision"]
    med = [(v[n]["prefill_s"]["median"] or 0) * 1e3 for n in pre_names]
    iqr = [(v[n]["prefill_s"]["iqr"] or 0) * 1e3 / 2 for n in pre_names]
    ax = axes[0]
    ax.bar(["baseline", "vtc", "oracle", "vision\n(tower+proj)"], med, yerr=iqr, capsize=4,
           color=[colors[n] for n in pre_names])
    ax.set_ylabel("ms")
    ax.set_title("vision + prefill latency")
    for i, m in enumerate(med):
        ax.text(i, m / 2, f"{m:.0f}", ha="center", va="center", fontsize=8, color="white")
    dec = [(v[n]["decode_s_per_token"]["median"] or 0) * 1e3 for n in names]
    dec_iqr = [(v[n]["decode_s_per_token"]["iqr"] or 0) * 1e3 / 2 for n in names]
    axes[1].bar(names, dec, yerr=dec_iqr, capsize=4, color=[colors[n] for n in names])
    axes[1].set_ylabel("ms / token")
    axes[1].set_title("decode latency")
    parts = [("vision_tower", "vision tower"), ("projector", "projector"), ("llm_prefill", "LLM prefill"),
             ("lm_head", "LM head")]
    bottom = [0.0] * len(names)
    for key, label in parts:
        vals = [v[n]["flops"][key] / 1e9 for n in names]
        axes[2].bar(names, vals, bottom=bottom, label=label)
        bottom = [b + x for b, x in zip(bottom, vals)]
    axes[2].set_ylabel("GFLOPs (as run)")
    axes[2].set_title("analytic prefill FLOPs")
    axes[2].legend(fontsize=8, loc="upper right")
    s = result["summary"]
    fig.suptitle(f"{result['arch']} (LLM {result['llm_layers']} layers), {result['config_name'] or result['config']}, "
                 f"batch {result['batch']}, {result['dtype']}, {result['environment']['device']}: speedup "
                 f"{_x(s['speedup'])}x (oracle {_x(s['oracle_speedup'])}x), efficiency "
                 f"{_x(s['efficiency'], '{:.3f}')}, overhead {_x(s['overhead_pct'], '{:.1f}')}%", fontsize=10)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_result(result: dict, out_dir: str | Path, *, plot: bool = True,
                 stem: str | None = None) -> tuple[Path, Path | None]:
    """``<out_dir>/<stem>.json`` (+ ``.png``); default stem: :func:`result_stem`."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = stem or result_stem(result)
    jpath = out_dir / f"{stem}.json"
    jpath.write_text(json.dumps(result, indent=1, default=str) + "\n")
    ppath = plot_result(result, out_dir / f"{stem}.png") if plot else None
    return jpath, ppath


# ---- command line --------------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="vtc bench", description="Speed, FLOPs and memory of a compression config at real model shapes, in one run.",
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="YAML path, bundled name (llava-1.5/fastv-50) or inline YAML")
    p.add_argument("--arch", default="llava-1.5-7b", choices=sorted(ARCHS))
    p.add_argument("--layers", type=int, default=None, help="LLM decoder layers (default: the full model)")
    p.add_argument("--vision-layers", type=int, default=None, help="vision tower layers (default: the full tower)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                   help="default: float16 on cuda, float32 on cpu")
    p.add_argument("--device", default=None, help="cpu | cuda | cuda:N (default: cuda if available)")
    p.add_argument("--attn", default="sdpa", help="attn_implementation (sdpa, eager, flash_attention_2)")
    p.add_argument("--text-tokens", type=int, default=64)
    p.add_argument("--image-size", type=int, nargs=2, default=None, metavar=("H", "W"),
                   help="synthetic image size (LLaVA-NeXT crops, Qwen grid); default: the preset's")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--decode-tokens", type=int, default=8)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="eval/results/bench", help="directory for the JSON and PNG")
    p.add_argument("--no-plot", action="store_true")
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``vtc bench`` / ``python -m eval.bench``; returns the exit status."""
    args = build_parser().parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda but CUDA is not available", file=sys.stderr)
        return 2
    dtype = DTYPES[args.dtype] if args.dtype else (torch.float16 if device.type == "cuda" else torch.float32)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.repeats < 1 or args.warmup < 0 or args.decode_tokens < 0 or args.batch < 1:
        print("error: --repeats and --batch must be >= 1, --warmup and --decode-tokens >= 0", file=sys.stderr)
        return 2
    # the inputs that can be checked without the model fail first: the config (the one loader of every command)
    # and the output folder
    from ..config import load_config

    try:
        config = load_config(args.config)
    except (ConfigError, ValueError) as err:
        print(f"error: --config: {err}", file=sys.stderr)
        return 2
    out = Path(args.out)
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".vtc-write-test"
        probe.write_text("")
        probe.unlink()
    except OSError as err:
        print(f"error: --out {args.out}: cannot write there ({err.strerror or err})", file=sys.stderr)
        return 2
    spec = get_arch(args.arch)
    _stderr(f"building {spec.name} ({spec.description}) on {device} in {str(dtype).replace('torch.', '')}, "
            f"LLM layers {args.layers or spec.text_layers}, vision layers {args.vision_layers or spec.vision_layers}")
    t0 = time.perf_counter()
    try:
        model = build_model(spec, layers=args.layers, vision_layers=args.vision_layers, dtype=dtype, device=device,
                            attn=args.attn, seed=args.seed)
        _stderr(f"built in {time.perf_counter() - t0:.1f} s")
        inputs = synthetic_inputs(model, spec, batch=args.batch, text_tokens=args.text_tokens,
                                  image_size=tuple(args.image_size) if args.image_size else None, seed=args.seed)
        result = bench(model, inputs, config, repeats=args.repeats, warmup=args.warmup,
                       decode_tokens=args.decode_tokens)
    except (ConfigError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(format_table(result))
    jpath, ppath = write_result(result, args.out, plot=not args.no_plot)
    print(f"wrote {jpath}" + (f" and {ppath}" if ppath else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
