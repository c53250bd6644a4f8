"""Micro-benchmark of PACT's own cost (EUTI + DBDPC + retrieval + merge) at real model shapes, random weights.

    python eval/bench_pact.py                                  # LLaVA-1.5-7B shapes: 576 visual tokens, CPU
    python eval/bench_pact.py --visual 576 2880 5000           # + LLaVA-NeXT (~2.9k) and ~5k visual tokens
    python eval/bench_pact.py --device cuda --dtype bfloat16   # on a GPU (synchronised timings)
    python eval/bench_pact.py --json eval/results/bench_pact.json

One Llama-7B-shaped decoder layer (hidden 4096, 32 heads, MLP 11008) with random weights stands in for layer L.
The hidden states entering it are random but *structured* like an image: a smooth field over the patch grid plus
noise (``--noise``), so that DBDPC finds real clusters (i.i.d. random keys would make every token its own centre
in one round, which flatters the clustering). The benchmark reports, per visual-token count:

- ``euti_ms``: layer-L input norm + q / k projection (one mean query row, keys of all tokens) + EUTI scores + the
  per-image top-k; ``dbdpc_ms``: post-RoPE keys of the candidates, the m x m cosine distances, densities, the
  greedy rounds, nearest-centre assignment, retrieval of the pruned tokens and the merge; ``pact_ms`` = the
  whole ``reduce_llm`` call (median of ``--repeats``).
- ``rounds`` (DBDPC rounds = host syncs of the clustering), ``centres`` and the delivered reduction ratio.
- ``peak_mb``: extra peak memory of one ``reduce_llm`` call (CUDA: ``max_memory_allocated``; CPU: growth of the
  process's peak RSS, measured first thing after setup, one process per size) and ``dbdpc_mb``: the analytic size of the m x m
  temporaries (14 bytes per pair: fp32 distances, blocker and neighbour matrices, two bool masks).
- ``layer_ms``: one full decoder-layer forward (sdpa) over the uncompressed sequence; ``prefill_ms`` =
  ``--layers`` x layer_ms (the language-model prefill without PACT, vision tower excluded) and ``fraction`` =
  pact_ms / prefill_ms, PACT's overhead relative to the prefill it shortens (issue target: <= 5% on a GPU).
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from vtc.methods.base import LLMContext  # noqa: E402
from vtc.methods.pact import PACT, compact  # noqa: E402
from vtc.models.base import ModelAdapter  # noqa: E402


class _LayerAdapter(ModelAdapter):
    """The adapter interface PACT uses, over one stand-alone decoder layer."""

    family = "bench"

    def __init__(self, layer, config) -> None:
        super().__init__(model=None)  # type: ignore[arg-type]
        self._layers = torch.nn.ModuleList([layer])
        self._config = config

    def decoder_layers(self):
        return self._layers

    def attn_implementation(self) -> str:
        return "sdpa"


def structured_hidden(n_vis: int, n_text: int, hidden: int, noise: float, gen: torch.Generator) -> torch.Tensor:
    """(n_text_before + n_vis + n_text_after, hidden): visual rows = smooth 2D field over a sqrt(n) grid + noise."""
    side = math.ceil(math.sqrt(n_vis))
    yy, xx = torch.meshgrid(torch.linspace(0, 1, side), torch.linspace(0, 1, side), indexing="ij")
    comps = 12
    freq = torch.rand(comps, 2, generator=gen) * 4.0
    phase = torch.rand(comps, generator=gen) * 2 * math.pi
    basis = torch.cos(2 * math.pi * (freq[:, 0, None, None] * xx + freq[:, 1, None, None] * yy) + phase[:, None, None])
    dirs = torch.randn(comps, hidden, generator=gen)
    field = torch.einsum("chw,cd->hwd", basis, dirs).reshape(side * side, hidden)[:n_vis]
    field = field + 2.0 * torch.randn(1, hidden, generator=gen)  # a shared offset, as in real hidden states
    vis = field + noise * field.norm(dim=-1, keepdim=True).mean() / math.sqrt(hidden) * torch.randn(n_vis, hidden,
                                                                                                     generator=gen)
    text = torch.randn(n_text, hidden, generator=gen) * vis.norm(dim=-1).mean() / math.sqrt(hidden)
    half = n_text // 3
    return torch.cat([text[:half], vis, text[half:]], dim=0)


def make_context(adapter, rotary, h: torch.Tensor, n_vis: int, start: int) -> LLMContext:
    B, N, _ = h.shape
    dev = h.device
    is_visual = torch.zeros(B, N, dtype=torch.bool, device=dev)
    is_visual[:, start:start + n_vis] = True
    pos = torch.arange(N, device=dev)[None]
    cand = torch.arange(start, start + n_vis, device=dev)[None].expand(B, -1)
    ones = torch.ones(B, N, dtype=torch.bool, device=dev)
    return LLMContext(
        layer_idx=0, hidden_states=h, candidates=cand, candidate_valid=torch.ones_like(cand, dtype=torch.bool),
        image_id=torch.zeros_like(cand), slot_positions=pos.expand(B, N), slot_valid=ones, token_valid=ones,
        is_visual=is_visual, sizes=torch.ones(B, N, device=dev), position_embeddings=rotary(h, pos),
        attention_mask=None, adapter=adapter, image_counts=torch.full((B, 1), n_vis, device=dev),
    )


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize()


def _timed(fn, dev, repeats: int) -> tuple[float, object]:
    out = fn()  # warm-up
    times = []
    for _ in range(repeats):
        _sync(dev)
        t0 = time.perf_counter()
        out = fn()
        _sync(dev)
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times), out


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB


def bench_one(args, n_vis: int, layer, adapter, rotary, dev, dtype) -> dict:
    gen = torch.Generator().manual_seed(args.seed)
    h = structured_hidden(n_vis, args.text_tokens, args.hidden, args.noise, gen)[None].to(dev, dtype)
    start = args.text_tokens // 3
    ctx = make_context(adapter, rotary, h, n_vis, start)
    method = PACT(layer=args.layer_idx, keep=args.keep, cutoff=args.cutoff)
    with torch.no_grad():
        # peak memory of one call, measured before anything else runs at this size
        if dev.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            red = method.reduce_llm(ctx)
            _sync(dev)
            peak_mb = (torch.cuda.max_memory_allocated() - base) / 2**20
        else:
            before = _rss_mb()
            red = method.reduce_llm(ctx)
            peak_mb = _rss_mb() - before

        def euti():
            q, k, prefix = method._project(ctx, True)
            kept = method.keep_mask(ctx, method.euti(ctx, q, k, prefix))
            return k, kept

        euti_ms, (keys, kept) = _timed(euti, dev, args.repeats)
        dbdpc_ms, _ = _timed(lambda: method._cluster(ctx, keys, kept), dev, args.repeats)
        pact_ms, red = _timed(lambda: method.reduce_llm(ctx), dev, args.repeats)
        # rounds of the clustering (re-run the pure function once to read them)
        from vtc.methods.pact import cosine_distances, dbdpc

        k_idx, k_valid = compact(kept)
        z = method.cluster_keys(ctx, keys, k_idx)
        _, _, rounds = dbdpc(cosine_distances(z, z), k_valid, method.cutoff)
        m = int(kept.sum())
        layer_ms = None
        if not args.no_prefill:
            pe = ctx.position_embeddings

            def run_layer():
                out = layer(h, attention_mask=None, position_embeddings=pe, position_ids=ctx.slot_positions)
                return out[0] if isinstance(out, tuple) else out

            layer_ms, _ = _timed(run_layer, dev, max(1, args.layer_repeats))
    centres = int(red.valid.sum())
    row = {
        "visual": n_vis, "seq_len": int(h.shape[1]), "kept_euti": m, "centres": centres,
        "reduction": round(1 - centres / n_vis, 4), "rounds": rounds,
        "euti_ms": round(euti_ms, 2), "dbdpc_ms": round(dbdpc_ms, 2), "pact_ms": round(pact_ms, 2),
        "peak_mb": round(peak_mb, 1), "dbdpc_mb": round(14 * m * m / 2**20, 1),
    }
    if layer_ms is not None:
        prefill = layer_ms * args.layers
        row.update(layer_ms=round(layer_ms, 1), prefill_ms=round(prefill, 1),
                   fraction=round(pact_ms / prefill, 4))
    return row


def _in_subprocess(args, n: int) -> dict:
    import subprocess
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "row.json"
        cmd = [sys.executable, str(Path(__file__).resolve()), "--visual", str(n), "--json", str(out)]
        for key in ("text_tokens", "hidden", "heads", "kv_heads", "intermediate", "layers", "keep", "cutoff", "noise",
                    "device", "dtype", "threads", "repeats", "layer_repeats", "seed"):
            cmd += [f"--{key.replace('_', '-')}", str(getattr(args, key))]
        if args.no_prefill:
            cmd.append("--no-prefill")
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
        return json.loads(out.read_text())["rows"][0]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--visual", type=int, nargs="+", default=[576], help="visual tokens per sample")
    p.add_argument("--text-tokens", type=int, default=90, help="text tokens around the image")
    p.add_argument("--hidden", type=int, default=4096)
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--kv-heads", type=int, default=32)
    p.add_argument("--intermediate", type=int, default=11008)
    p.add_argument("--layers", type=int, default=32, help="decoder layers of the model (prefill estimate)")
    p.add_argument("--keep", type=float, default=0.55)
    p.add_argument("--cutoff", type=float, default=0.21)
    p.add_argument("--noise", type=float, default=0.3, help="noise / signal of the synthetic hidden states")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--layer-repeats", type=int, default=1)
    p.add_argument("--no-prefill", action="store_true", help="skip the decoder-layer timing")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, default=None, help="write the rows here")
    args = p.parse_args(argv)
    args.layer_idx = 0
    torch.set_num_threads(args.threads)

    if len(args.visual) > 1 and torch.device(args.device).type == "cpu":
        # one fresh process per size on CPU, so that each peak-RSS measurement is its own
        return _report(args, [_in_subprocess(args, n) for n in args.visual], torch.device(args.device))
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRotaryEmbedding

    dev = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    cfg = LlamaConfig(hidden_size=args.hidden, num_attention_heads=args.heads, num_key_value_heads=args.kv_heads,
                      intermediate_size=args.intermediate, num_hidden_layers=1, max_position_embeddings=16384)
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(args.seed)
    with torch.no_grad():
        layer = LlamaDecoderLayer(cfg, layer_idx=0).to(dev, dtype).eval()
        for mod in layer.modules():  # LLM-like weight scale (std 0.02)
            if isinstance(mod, torch.nn.Linear):
                mod.weight.normal_(0.0, 0.02)
    rotary = LlamaRotaryEmbedding(cfg).to(dev)
    adapter = _LayerAdapter(layer, cfg)

    rows = [bench_one(args, n, layer, adapter, rotary, dev, dtype) for n in args.visual]
    return _report(args, rows, dev)


def _report(args, rows: list[dict], dev) -> int:
    header = list(rows[0])
    print(f"device={dev} dtype={args.dtype} threads={args.threads} hidden={args.hidden} heads={args.heads}/"
          f"{args.kv_heads} keep={args.keep} cutoff={args.cutoff} noise={args.noise}")
    print("  ".join(f"{k:>10}" for k in header))
    for row in rows:
        print("  ".join(f"{row.get(k, ''):>10}" for k in header), flush=True)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"args": {k: (str(v) if isinstance(v, Path) else v)
                                                  for k, v in vars(args).items()}, "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
