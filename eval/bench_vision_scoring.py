"""Cost of vision-side scoring + selection relative to the vision tower's forward, and its peak extra memory.

Random weights at real shapes (no downloads):

- **CLIP-L/336** (LLaVA-1.5 / LLaVA-NeXT tower): 24 layers, hidden 1024, 16 heads, MLP 4096, 336 px / 14 px
  patches = 577 tokens; features from layer -2 as LLaVA takes them. The tower runs with sdpa, exactly as the
  LLaVA adapter runs it (``output_hidden_states=True``).
- **Qwen2-VL-7B vision tower**: hidden 1280, 16 heads, MLP ratio 4, patch 14, 2x2 merge, 448 x 448 images
  (1024 patches -> 256 merged tokens); scored by the Qwen2-VL adapter (mean query with the tower's 2D RoPE on
  the last block, aggregated to merged tokens). On CPU the 32-block tower is slow, so it runs with ``--qwen-depth``
  blocks (default 8) and the tower time is scaled to 32 blocks (blocks are identical, so time is linear in depth);
  the scoring cost does not depend on depth (one block). Both numbers are reported.

Timed per method (median of ``--repeats``, after a warm-up), everything vtc does for a vision-side stage: the
lazily computed tower extras (CLS row / mean query, keys, CLS state) and the method's selection / merging, against
the tower forward. Peak extra memory: every tensor allocated while scoring + selecting is tracked with a
``TorchDispatchMode`` (live bytes = storages still referenced; inputs such as the tower's hidden states are not
counted) and compared with what one dense N x N attention map of the scored layer would take; the memory table
over image sizes shows it grows linearly in N (bytes per token constant) where the dense map grows as N^2.

Writes ``<out>/results.json`` and ``<out>/results.md`` (default ``eval/results/vision_scoring``).

    python eval/bench_vision_scoring.py                      # CPU, 2 threads
    python eval/bench_vision_scoring.py --device cuda --qwen-depth 32
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
import weakref
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

import vtc
from vtc.methods.base import VisionContext, VisionExtras

ROOT = Path(__file__).resolve().parent.parent

METHODS = {
    "visionzip-64 (54+10)": {"method": "visionzip", "dominant": 54, "contextual": 10},
    "visionzip-192 (162+30)": {"method": "visionzip", "dominant": 162, "contextual": 30},
    "pool-avg-64": {"method": "pool", "mode": "avg", "budget": 64},
    "pool-attn-64": {"method": "pool", "mode": "attn", "budget": 64},
    "pool-cluster-64 (cls weights)": {"method": "pool", "mode": "cluster", "budget": 64, "weights": "cls"},
}
QWEN_METHODS = {
    "visionzip-25%": {"method": "visionzip", "budget": 0.25},
    "visionzip-50%": {"method": "visionzip", "budget": 0.5},
    "pool-avg-25%": {"method": "pool", "mode": "avg", "budget": 0.25},
    "pool-cluster-25% (received)": {"method": "pool", "mode": "cluster", "budget": 0.25, "weights": "received"},
}


class PeakMemory(TorchDispatchMode):
    """Peak bytes of tensor storages allocated inside the mode and still alive (CPU or GPU)."""

    def __init__(self) -> None:
        super().__init__()
        self.live: dict[int, list[int]] = {}
        self.current = 0
        self.peak = 0

    def _release(self, ptr: int) -> None:
        entry = self.live.get(ptr)
        if entry is None:
            return
        entry[1] -= 1
        if entry[1] == 0:
            self.current -= entry[0]
            del self.live[ptr]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                st = t.untyped_storage()
                ptr, nb = st.data_ptr(), st.nbytes()
                if ptr == 0:
                    continue
                if ptr in self.live:
                    self.live[ptr][1] += 1
                else:
                    self.live[ptr] = [nb, 1]
                    self.current += nb
                    self.peak = max(self.peak, self.current)
                weakref.finalize(t, self._release, ptr)
        return out


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed(fn, device: str, repeats: int) -> float:
    fn()  # warm-up
    sync(device)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def run_stage(stage: dict, feats: torch.Tensor, layout, extras_fn) -> torch.Tensor:
    """Everything vtc does for one vision-side stage: fresh (lazy) extras, then the method."""
    (method,) = vtc.load_config({"stages": [stage]}).stages
    ctx = VisionContext(features=feats, layout=layout, extras=extras_fn(), space="vision")
    red = method.reduce_vision(ctx)
    return red.output_features(feats)


# ---- CLIP-L/336 --------------------------------------------------------------------------------------------------
def clip_tower(image_size: int, layers: int, device: str, dtype):
    from transformers import CLIPVisionConfig, CLIPVisionModel

    cfg = CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=layers,
                           num_attention_heads=16, image_size=image_size, patch_size=14, projection_dim=768)
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    return CLIPVisionModel(cfg).eval().to(device=device, dtype=dtype)


def bench_clip(args, dtype) -> dict:
    from vtc.models.vision_towers import TowerScorer

    tower = clip_tower(336, args.clip_depth, args.device, dtype)
    px = torch.randn(args.batch, 3, 336, 336, device=args.device, dtype=dtype)
    out = {}
    with torch.no_grad():
        t_tower = timed(lambda: tower(px, output_hidden_states=True), args.device, args.repeats)
        hs = tower(px, output_hidden_states=True).hidden_states
        feats = hs[-2][:, 1:]
        layout = vtc.Grid(24, 24)

        def extras():
            return TowerScorer(tower, hs, -2, has_cls=True, drop_cls=True).as_vision_extras()

        for name, stage in METHODS.items():
            t = timed(lambda stage=stage: run_stage(stage, feats, layout, extras), args.device, args.repeats)
            with PeakMemory() as pm:
                run_stage(stage, feats, layout, extras)
            out[name] = {"time_ms": t * 1e3, "fraction_of_tower": t / t_tower, "peak_extra_bytes": pm.peak}
    N, h = 577, 16
    dense = args.batch * h * N * N * 4
    full_depth_tower = t_tower * 24 / args.clip_depth
    for v in out.values():
        v["fraction_of_full_tower"] = v["time_ms"] / 1e3 / full_depth_tower
        v["peak_vs_dense_attention_map"] = v["peak_extra_bytes"] / dense
    return {"tower": "CLIP-L/336", "depth": args.clip_depth, "batch": args.batch, "tokens": N,
            "tower_forward_ms": t_tower * 1e3, "tower_forward_full_depth_ms": full_depth_tower * 1e3,
            "dense_attention_map_bytes": dense, "methods": out}


def memory_scaling(args, dtype) -> list[dict]:
    """Peak extra memory of VisionZip (CLS row, keys, selection, merge) vs N on CLIP-L-width towers."""
    from vtc.models.vision_towers import TowerScorer

    rows = []
    for size in (224, 336, 448, 672):
        side = size // 14
        N = side * side + 1
        tower = clip_tower(size, 2, args.device, dtype)
        g = torch.Generator(device="cpu").manual_seed(0)
        hs = tuple(torch.randn(args.batch, N, 1024, generator=g).to(args.device, dtype) for _ in range(3))
        feats = hs[1][:, 1:]
        stage = {"method": "visionzip", "budget": max(8, (N - 1) // 9)}
        with torch.no_grad(), PeakMemory() as pm:
            run_stage(stage, feats, vtc.Grid(side, side),
                      lambda tower=tower, hs=hs: TowerScorer(tower, hs, 1, has_cls=True, drop_cls=True).as_vision_extras())
        hidden = args.batch * N * 1024 * torch.finfo(dtype).bits // 8
        rows.append({"image_px": size, "tokens": N, "peak_extra_bytes": pm.peak,
                     "peak_per_token_bytes": pm.peak / (args.batch * N),
                     "peak_vs_one_hidden_state": pm.peak / hidden,
                     "dense_attention_map_bytes": args.batch * 16 * N * N * 4})
    return rows


# ---- Qwen2-VL-7B vision ----------------------------------------------------------------------------------------
def bench_qwen(args, dtype) -> dict:
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

    from vtc.models.qwen2_vl import Qwen2VLAdapter

    vision = dict(depth=args.qwen_depth, embed_dim=1280, hidden_size=3584, num_heads=16, mlp_ratio=4,
                  in_channels=3, patch_size=14, spatial_merge_size=2, temporal_patch_size=2)
    text = dict(vocab_size=256, hidden_size=3584, intermediate_size=64, num_hidden_layers=1, num_attention_heads=28,
                num_key_value_heads=4, max_position_embeddings=4096, bos_token_id=1, eos_token_id=2, pad_token_id=0,
                rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [16, 24, 24]})
    cfg = Qwen2VLConfig(text_config=text, vision_config=vision, image_token_id=251, video_token_id=252,
                        vision_start_token_id=253, vision_end_token_id=254)
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    model = Qwen2VLForConditionalGeneration(cfg).eval().to(device=args.device, dtype=dtype)
    if hasattr(model, "set_attn_implementation"):
        model.set_attn_implementation("sdpa")
    adapter = Qwen2VLAdapter(model)
    B, side = args.batch, 448 // 14
    grid = torch.tensor([[1, side, side]] * B, device=args.device)
    pv = torch.randn(B * side * side, 3 * 2 * 14 * 14, device=args.device, dtype=dtype)
    n = (side // 2) ** 2
    out = {}
    with torch.no_grad():
        t_tower = timed(lambda: adapter._run_tower(pv, grid), args.device, args.repeats)
        merged, _ = adapter._run_tower(pv, grid)
        feats = merged.view(B, n, -1)

        _, sc = adapter._run_tower(pv, grid)  # the scoring block's captured input, from the tower call

        def extras():
            fresh = type(sc)(sc.block, sc.x, sc.cu, sc.cos, sc.sin, sc.merge_unit, sc.order)  # no cached tensors
            return VisionExtras(received_attention=lambda: fresh.received_attention().view(B, n),
                                keys=lambda: fresh.keys().view(B, n, -1))

        for name, stage in QWEN_METHODS.items():
            t = timed(lambda stage=stage: run_stage(stage, feats, vtc.Grid(side // 2, side // 2), extras), args.device,
                      args.repeats)
            with PeakMemory() as pm:
                run_stage(stage, feats, vtc.Grid(side // 2, side // 2), extras)
            out[name] = {"time_ms": t * 1e3, "fraction_of_tower": t / t_tower, "peak_extra_bytes": pm.peak}
    N = side * side
    full = t_tower * 32 / args.qwen_depth
    dense = B * 16 * N * N * 4
    for v in out.values():
        v["fraction_of_full_tower"] = v["time_ms"] / 1e3 / full
        v["peak_vs_dense_attention_map"] = v["peak_extra_bytes"] / dense
    return {"tower": "Qwen2-VL-7B vision (448x448)", "depth": args.qwen_depth, "batch": B, "tokens": N,
            "merged_tokens": n, "tower_forward_ms": t_tower * 1e3, "tower_forward_full_depth_ms": full * 1e3,
            "dense_attention_map_bytes": dense, "methods": out}


# ---- report ----------------------------------------------------------------------------------------------------
def mib(b: float) -> str:
    return f"{b / 2**20:.2f} MiB"


def markdown(res: dict) -> str:
    env = res["environment"]
    lines = ["# Vision-side scoring + selection cost", "",
             f"Device: {env['device']} ({env['cpu']}, {env['threads']} threads), dtype {env['dtype']}, torch "
             f"{env['torch']}. Random weights at real shapes; medians of {env['repeats']} runs. "
             "Generated by `eval/bench_vision_scoring.py`.", ""]
    for sec in res["towers"]:
        scaled = sec["depth"] != (24 if sec["tower"].startswith("CLIP") else 32)
        lines += [f"## {sec['tower']}: {sec['tokens']} tokens per image, batch {sec['batch']}", "",
                  f"Tower forward (sdpa, {sec['depth']} blocks): {sec['tower_forward_ms']:.1f} ms"
                  + (f"; scaled to the full depth: {sec['tower_forward_full_depth_ms']:.1f} ms (shortened on this "
                     "machine; blocks are identical so the time is linear in depth)" if scaled else "") + ".",
                  f"A dense attention map of the scored layer ({sec['batch']} x 16 heads x N x N fp32) would take "
                  f"{mib(sec['dense_attention_map_bytes'])}.", "",
                  "| method | scoring + selection | % of tower forward"
                  + (" (full depth)" if scaled else "") + " | peak extra memory | vs dense attention map |",
                  "|---|---|---|---|---|"]
        for name, m in sec["methods"].items():
            frac = m["fraction_of_full_tower"] if scaled else m["fraction_of_tower"]
            lines.append(f"| {name} | {m['time_ms']:.2f} ms | {100 * frac:.2f}% | {mib(m['peak_extra_bytes'])} | "
                         f"{100 * m['peak_vs_dense_attention_map']:.1f}% |")
        lines.append("")
    lines += ["## Peak extra memory of VisionZip vs tokens (CLIP-L width, 16 heads)", "",
              "| image | tokens N | peak extra | bytes per token | x one hidden state (B x N x 1024) | "
              "dense N x N map |", "|---|---|---|---|---|---|"]
    for r in res["memory_scaling"]:
        lines.append(f"| {r['image_px']} px | {r['tokens']} | {mib(r['peak_extra_bytes'])} | "
                     f"{r['peak_per_token_bytes']:.0f} | {r['peak_vs_one_hidden_state']:.2f} | "
                     f"{mib(r['dense_attention_map_bytes'])} |")
    lines += ["", "Bytes per token stay flat as N grows 9x (O(N)); a dense attention map grows as N^2.", ""]
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--clip-depth", type=int, default=24)
    p.add_argument("--qwen-depth", type=int, default=8)
    p.add_argument("--skip-qwen", action="store_true")
    p.add_argument("--out", default=str(ROOT / "eval" / "results" / "vision_scoring"))
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    towers = [bench_clip(args, dtype)]
    if not args.skip_qwen:
        towers.append(bench_qwen(args, dtype))
    res = {"environment": {"device": args.device if args.device != "cpu" else "CPU", "cpu": platform.processor()
                           or platform.machine(), "threads": args.threads, "dtype": args.dtype,
                           "torch": torch.__version__, "repeats": args.repeats},
           "towers": towers, "memory_scaling": memory_scaling(args, dtype)}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(res, indent=2))
    (out / "results.md").write_text(markdown(res))
    print(markdown(res))


if __name__ == "__main__":
    main()
