"""Serving benchmark: vLLM with and without a vtc config, side by side in one run (run in the vLLM environment).

```bash
.venv-vllm/bin/python -m eval.serving.bench_vllm                       # CPU rows, every family, writes the table
.venv-vllm/bin/python -m eval.serving.bench_vllm --family llava --requests 32 --config llava-1.5/visionzip-64
```

Per family, at the bundled demo model's tower / LLM sizes (the bundled demo models ``vtc-tiny-llava`` (grid, 196
tokens per image) and ``vtc-tiny-1d`` (32 ordered latents) themselves; LLaVA-1.5: random weights, 336 px images of
14 px patches = LLaVA-1.5's 576 tokens; LLaVA-NeXT: a random-weight anyres model, 112 px crops, 224 x 224 images =
base + 2 x 2 crops; Qwen2-VL / Qwen2.5-VL: random weights, 4 px patches merged 2 x 2, 112 x 112 images = 196
tokens like the demo's), the same
batch of requests (one image each, greedy, ``max_tokens`` output tokens with ``ignore_eos`` so both variants decode
the same number) goes through a baseline engine (no ``vtc_config``: stock vLLM) and a vtc engine (``hf_overrides=
{"vtc_config": ...}``), each built once in this process, warmed up, then timed:

- **req/s**, **out tok/s**: the whole batch submitted at once to ``LLM.generate`` (vLLM's continuous batching);
- **TTFT**: median over single requests with ``max_tokens=1`` submitted alone (vision + prefill + first token);
- **prompt tokens**: per request, as vLLM counted them (the reduced count with vtc).

Writes ``eval/results/serving/<family>.json`` and rewrites the table in ``eval/BENCHMARKS.md`` from those files.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")

ROOT = Path(__file__).resolve().parents[2]
RESULTS = ROOT / "eval" / "results" / "serving"
TABLE_START = "<!-- serving-table:start -->"
TABLE_END = "<!-- serving-table:end -->"

FAMILIES = {
    # family: (default config, image size (H, W), max_model_len)
    "llava": ("llava-1.5/visionzip-64", (336, 336), 1024),
    "vtc-tiny-llava": ("llava-1.5/visionzip-64", (112, 112), 512),
    "vtc-tiny-1d": ("tiny/prefix-8", (112, 112), 512),
    "llava-next": ({"stages": [{"method": "visionzip", "budget": 64}]}, (224, 224), 2048),
    "qwen2-vl": ({"stages": [{"method": "visionzip", "budget": 64}]}, (112, 112), 512),
    "qwen2.5-vl": ({"stages": [{"method": "visionzip", "budget": 64}]}, (112, 112), 512),
}
QWEN_VERSION = {"qwen2-vl": "2", "qwen2.5-vl": "2.5"}


def _checkpoint(family: str, tmp: Path) -> Path:
    from eval.serving.checkpoints import GRID_MODEL_PATH, save_tiny_llava, save_tiny_llava_next, save_tiny_qwen2_vl
    from vtc.demo import ORDERED_MODEL_PATH

    if family == "vtc-tiny-llava":
        return Path(GRID_MODEL_PATH)
    if family == "vtc-tiny-1d":
        return Path(ORDERED_MODEL_PATH)
    if family == "llava":
        path = tmp / "tiny-llava-1.5-336"
        save_tiny_llava(path)
        return path
    if family in QWEN_VERSION:
        path = tmp / f"tiny-{family}-demo-shape"
        save_tiny_qwen2_vl(path, version=QWEN_VERSION[family], vision_hidden=128, vision_depth=4, text_hidden=256,
                           text_layers=4, heads=4, kv_heads=4, max_pixels=112 * 112)
        return path
    path = tmp / "tiny-llava-next-demo-shape"
    save_tiny_llava_next(path, crop=112, patch=8, vision_hidden=128, text_hidden=256, text_layers=4, heads=4,
                         kv_heads=4, pinpoints=((112, 112), (112, 224), (224, 112), (224, 224)))
    return path


def _prompt(family: str, i: int) -> str:
    from eval.serving.checkpoints import qwen_prompt

    question = f"Describe picture {i}."
    return qwen_prompt(question) if family in QWEN_VERSION else f"USER: <image>\n{question} ASSISTANT:"


def _requests(family: str, n: int, size: tuple[int, int], seed: int = 0):
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    return [{"prompt": _prompt(family, i),
             "multi_modal_data": {"image": Image.fromarray(rng.integers(0, 255, (*size, 3), dtype=np.uint8))}}
            for i in range(n)]


def _engine(path: Path, config, max_len: int):
    from vllm import LLM

    return LLM(model=str(path), dtype="float32", max_model_len=max_len, enforce_eager=True, seed=0,
               gpu_memory_utilization=0.05, kv_cache_memory_bytes=256 << 20, limit_mm_per_prompt={"image": 1},
               hf_overrides={"vtc_config": config} if config is not None else None)


def _measure(llm, family: str, requests, max_tokens: int, ttft_requests: int) -> dict:
    from vllm import SamplingParams

    full = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    first = SamplingParams(temperature=0.0, max_tokens=1)
    llm.generate(requests[:2], full, use_tqdm=False)  # warm-up
    # distinct images per timed call: vLLM caches encoder outputs by image hash, so reused images would skip the tower
    t0 = time.perf_counter()
    outs = llm.generate(requests[2:], full, use_tqdm=False)
    wall = time.perf_counter() - t0
    n_out = sum(len(o.outputs[0].token_ids) for o in outs)
    ttft = []
    for r in _requests(family, ttft_requests, requests[0]["multi_modal_data"]["image"].size[::-1], seed=1):
        t0 = time.perf_counter()
        llm.generate([r], first, use_tqdm=False)
        ttft.append(time.perf_counter() - t0)
    return {"requests": len(outs), "wall_s": wall, "req_per_s": len(outs) / wall, "out_tok_per_s": n_out / wall,
            "ttft_ms": 1e3 * statistics.median(ttft), "ttft_ms_all": [1e3 * t for t in ttft],
            "prompt_tokens": statistics.median(len(o.prompt_token_ids) for o in outs)}


def run_family(family: str, config, requests: int, max_tokens: int, ttft_requests: int) -> dict:
    import gc

    import torch
    import vllm

    default_config, size, max_len = FAMILIES[family]
    config = default_config if config is None else config
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp:
        path = _checkpoint(family, Path(tmp))
        reqs = _requests(family, requests + 2, size)
        rows = {}
        for variant, cfg in (("baseline", None), ("vtc", config)):
            llm = _engine(path, cfg, max_len)
            rows[variant] = _measure(llm, family, reqs, max_tokens, ttft_requests)
            del llm
            gc.collect()
    b, v = rows["baseline"], rows["vtc"]
    return {"family": family, "config": config, "image_size": list(size), "max_tokens": max_tokens,
            "device": "cpu", "torch_threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
            "vllm": vllm.__version__, "load_avg_1min": [load_before, os.getloadavg()[0]],
            "baseline": b, "vtc": v,
            "speedup_req_per_s": v["req_per_s"] / b["req_per_s"], "speedup_ttft": b["ttft_ms"] / v["ttft_ms"]}


def _load(r: dict) -> str:
    """The machine's load while the row was measured (rows written before it was recorded: not recorded)."""
    if "load_avg_1min" not in r:
        return "not recorded"
    a, b = r["load_avg_1min"]
    return f"{a:.1f} → {b:.1f} / {r.get('cpu_count', '?')}"


def render() -> str:
    rows = ["| family | config | image | prompt tokens (base → vtc) | req/s (base / vtc) | out tok/s (base / vtc) "
            "| TTFT ms (base / vtc) | speedup req/s | speedup TTFT | machine load (1-min avg, start → end / cores) |",
            "|---" * 10 + "|"]
    for f in sorted(RESULTS.glob("*.json")):
        r = json.loads(f.read_text())
        b, v = r["baseline"], r["vtc"]
        cfg = r["config"] if isinstance(r["config"], str) else json.dumps(r["config"])
        rows.append(f"| {r['family']} | `{cfg}` | {r['image_size'][0]}×{r['image_size'][1]} "
                    f"| {b['prompt_tokens']:.0f} → {v['prompt_tokens']:.0f} "
                    f"| {b['req_per_s']:.2f} / {v['req_per_s']:.2f} | {b['out_tok_per_s']:.1f} / {v['out_tok_per_s']:.1f} "
                    f"| {b['ttft_ms']:.0f} / {v['ttft_ms']:.0f} | {r['speedup_req_per_s']:.2f}× | {r['speedup_ttft']:.2f}× "
                    f"| {_load(r)} |")
    return "\n".join(rows)


def write_table() -> None:
    md = ROOT / "eval" / "BENCHMARKS.md"
    text = md.read_text()
    table = f"{TABLE_START}\n{render()}\n{TABLE_END}"
    if TABLE_START in text:
        text = text[:text.index(TABLE_START)] + table + text[text.index(TABLE_END) + len(TABLE_END):]
    else:
        text = text.rstrip("\n") + "\n\n" + table + "\n"
    md.write_text(text)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--family", choices=sorted(FAMILIES), action="append", help="default: every family")
    ap.add_argument("--config", default=None, help="vtc config (bundled name, YAML path); default: per family")
    ap.add_argument("--requests", type=int, default=32)
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--ttft-requests", type=int, default=8)
    ap.add_argument("--render-only", action="store_true")
    args = ap.parse_args(argv)
    if not args.render_only:
        RESULTS.mkdir(parents=True, exist_ok=True)
        for family in args.family or sorted(FAMILIES):
            res = run_family(family, args.config, args.requests, args.max_tokens, args.ttft_requests)
            (RESULTS / f"{family}.json").write_text(json.dumps(res, indent=1) + "\n")
            print(json.dumps({k: res[k] for k in ("family", "speedup_req_per_s", "speedup_ttft")}))
    write_table()
    print(render())


if __name__ == "__main__":
    main()
