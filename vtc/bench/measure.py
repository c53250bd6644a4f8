"""Measurement of ``vtc bench``: the baseline / vtc / oracle / vision variants of one config, timed interleaved
(see :mod:`vtc.bench` for what each number means)."""

from __future__ import annotations

import contextlib
import inspect
import os
import platform
import statistics
import sys
import threading
import time
from collections.abc import Callable
from typing import Any, ClassVar, Literal

import torch

from .. import flops as fl
from ..config import load_config
from ..errors import ConfigError
from ..methods import Method
from ..models import get_adapter
from ..runtime import compress
from ..runtime.feed import feeding
from ..runtime.stats import cache_lengths
from .cost import llm_seq_lens, lm_shape, model_flops
from .presets import ARCHS

__all__ = ["Replay", "Variants", "VARIANTS", "bench", "summarize", "kv_cache_bytes"]


# ---- the oracle's replay method ----------------------------------------------------------------------------------
class Replay(Method):
    """Returns the Reduction recorded at each of ``layers`` (no scoring): the oracle of an LLM-side stage.

    Not registered (a config takes the instance directly), so it never shows in ``vtc.available_methods()``.
    The recorded Reductions are valid for the exact inputs they were recorded on."""

    sides: ClassVar[tuple[str, ...]] = ("llm",)
    method: Literal["bench_replay"] = "bench_replay"
    layers: list[int]
    reductions: dict = {}

    def llm_layers(self):
        return tuple(self.layers)

    def reduce_llm(self, ctx):
        return self.reductions[ctx.layer_idx]


# ---- measurement helpers ---------------------------------------------------------------------------------------------
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _rss_bytes() -> int | None:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError, AttributeError):
        try:
            import psutil

            return int(psutil.Process().memory_info().rss)
        except Exception:
            return None


class _PeakMemory:
    """Peak memory of a block: CUDA allocator stats, or the sampled process RSS on CPU."""

    def __init__(self, device: torch.device, interval: float = 0.002) -> None:
        self.device = device
        self.interval = interval
        self.peak: int | None = None
        self.before: int | None = None

    def __enter__(self):
        if self.device.type == "cuda":
            _sync(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.before = torch.cuda.memory_allocated(self.device)
        else:
            self.before = _rss_bytes()
            self._max = self.before or 0
            self._stop = threading.Event()
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.is_set():
            r = _rss_bytes()
            if r is not None and r > self._max:
                self._max = r
            self._stop.wait(self.interval)

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            _sync(self.device)
            self.peak = torch.cuda.max_memory_allocated(self.device)
        else:
            self._stop.set()
            self._thread.join()
            r = _rss_bytes()
            self.peak = max(self._max, r or 0) if self.before is not None else None

    @property
    def delta(self) -> int | None:
        return None if self.peak is None or self.before is None else max(0, self.peak - self.before)


class _StepTimer:
    """A logits processor: timestamps every generation step (after a sync) and forces ``token``."""

    def __init__(self, device: torch.device, token: int, stats=None) -> None:
        self.device = device
        self.token = token
        self.stats = stats
        self.times: list[float] = []
        self.vtc: list[float] = []

    def __call__(self, input_ids, scores):
        _sync(self.device)
        self.times.append(time.perf_counter())
        if self.stats is not None:
            self.vtc.append(self.stats.vtc_time_s)
        out = torch.full_like(scores, float("-inf"))
        out[:, self.token] = 0.0
        return out


def kv_cache_bytes(model, cache, batch: int) -> int | None:
    """Bytes of the keys and values ``cache`` holds for ``batch`` rows: its per-layer lengths
    (:func:`vtc.runtime.stats.cache_lengths`, as ``run.stats`` reads them) priced by :func:`vtc.flops.kv_cache_bytes`
    at the model's dtype."""
    lens = cache_lengths(cache, model.config.get_text_config().num_hidden_layers)
    if lens is None:
        return None
    return batch * fl.kv_cache_bytes(lm_shape(model), lens, next(model.parameters()).element_size())


def _cache_of(output):
    cache = getattr(output, "cache", None)
    return cache if cache is not None else getattr(output, "past_key_values", None)


def _summary(values: list[float]) -> dict:
    if not values:
        return {"median": None, "iqr": None, "min": None, "n": 0}
    v = sorted(values)
    if len(v) >= 2:
        q = statistics.quantiles(v, n=4, method="inclusive")
        iqr = q[2] - q[0]
    else:
        iqr = 0.0
    return {"median": statistics.median(v), "iqr": iqr, "min": v[0], "n": len(v)}


def _vision_kwargs(model, inputs: dict) -> dict:
    """The kwargs of ``model.get_image_features`` present in ``inputs`` (plus the config's feature settings)."""
    params = inspect.signature(model.get_image_features).parameters
    named = {k for k, p in params.items() if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)}
    out = {k: v for k, v in inputs.items() if k in named}
    for k in ("vision_feature_layer", "vision_feature_select_strategy"):
        if k in named and k not in out and hasattr(model.config, k):
            out[k] = getattr(model.config, k)
    return out


# ---- the benchmark ---------------------------------------------------------------------------------------------------
VARIANTS = ("baseline", "vtc", "oracle", "vision")


def _log(progress: Callable[[str], None] | None, msg: str) -> None:
    if progress is not None:
        progress(msg)


def _stderr(msg: str) -> None:
    print(f"[bench] {msg}", file=sys.stderr, flush=True)


class Variants:
    """The three variants of one config on one model and input batch, ready to run.

    Building it runs one vtc prefill forward (with a forward pre-hook that captures the reduced prompt) to
    record what the oracle needs: the rebuilt prompt of the vision-side stages (``inputs_embeds``, mask,
    position ids, token map) and the Reductions of the LLM-side stages (replayed by :class:`Replay`).
    ``forward(name)`` runs one prefill forward of a variant, ``generate(name, ...)`` one ``generate`` call,
    ``vision()`` the vision tower + projector alone."""

    def __init__(self, model, inputs: dict, config) -> None:
        self.model = model
        self.inputs = inputs
        self.config = cfg = load_config(config)
        num_layers = model.config.get_text_config().num_hidden_layers
        needed = max((max(s.llm_layers()) for s in cfg.stages if s.llm_layers()), default=0) + 1
        if needed > num_layers:
            raise ConfigError(f"config {cfg.name or cfg.source!r} acts at decoder layer {needed - 1} but the "
                              f"benchmark model has {num_layers} decoder layers: pass --layers >= {needed}")
        self.has_vision = any(s.side == "vision" for s in cfg.stages)
        self.run = compress(model, cfg)
        self.vision_kwargs = _vision_kwargs(model, inputs)
        captured: dict = {}

        def capture(module, args, kwargs):  # embeddings, or ids + mm_encoder_outputs (Gemma 3, Qwen3-VL)
            captured.update({k: kwargs[k] for k in ("inputs_embeds", "attention_mask", "position_ids", "input_ids",
                                                    "mm_encoder_outputs") if kwargs.get(k) is not None})

        with torch.no_grad(), self.run:
            h = model.register_forward_pre_hook(capture, with_kwargs=True)
            try:
                self.probe_output = model(**inputs, use_cache=True, logits_to_keep=1)
            finally:
                h.remove()
            self.token_map = self.run.llm.token_map
            feed = self.run._feed
            if feed is not None and feed.last is not None:  # ids + features fed through the getters (5.17)
                captured["mm_encoder_outputs"] = feed.last
        if self.has_vision and "inputs_embeds" not in captured and "mm_encoder_outputs" not in captured:
            raise RuntimeError("could not capture the reduced prompt of the vision-side stages")
        self.oracle_inputs = captured if self.has_vision else inputs
        recorded: dict[int, dict[int, Any]] = {}
        for st in self.run.stats.stages:
            if st.side == "llm":
                recorded.setdefault(st.index, {})[st.layer] = st.reduction
        replays = [Replay(layers=sorted(recorded[i]), reductions=recorded[i])  # Reductions carry `proportional`
                   for i, s in enumerate(cfg.stages) if s.side == "llm" and recorded.get(i)]
        self.replay = compress(model, {"stages": replays, "seed": cfg.seed}) if replays else None
        #: tokens per unit the projector receives under vtc (None: all of them): vision-side stages acting
        #: before the projector shrink its input, and the oracle's projector runs on that many tokens too
        self.projector_tokens: int | None = None
        vision_stats = [st for st in self.run.stats.stages if st.side == "vision"]
        if vision_stats and all(s.space == "vision" for s in cfg.stages if s.side == "vision"):
            last = max(st.index for st in vision_stats)
            self.projector_tokens = max(t for st in vision_stats if st.index == last for t in st.tokens_out)
        #: the run whose stats time each variant's vtc hooks
        self.stats = {"baseline": None, "vtc": self.run.stats,
                      "oracle": self.replay.stats if self.replay is not None else None, "vision": None}

    @contextlib.contextmanager
    def _attached(self, name: str):
        if name == "vtc":
            with self.run:
                yield self.inputs
        elif name == "oracle":
            with contextlib.ExitStack() as stack:
                inputs = self.oracle_inputs
                adapter = self.run.adapter
                if inputs.get("mm_encoder_outputs") is not None and not adapter.takes_mm_encoder_outputs():
                    inputs = {k: v for k, v in inputs.items() if k != "mm_encoder_outputs"}
                    stack.enter_context(feeding(adapter, self.oracle_inputs["mm_encoder_outputs"],
                                                inputs["input_ids"]))
                if self.replay is not None:
                    stack.enter_context(self.replay)
                    if self.has_vision:  # the token map of the rebuilt prompt (inputs_embeds carry none)
                        self.replay._pending_token_map = self.token_map
                yield inputs
        else:
            yield self.inputs

    def vision(self):
        """The vision tower + projector on the full images (``model.get_image_features``), as the baseline runs
        them."""
        return self.model.get_image_features(**self.vision_kwargs)

    def oracle_vision(self) -> None:
        """The oracle's vision part: the tower on the images (the adapter's own call, no scoring extras) and the
        projector on as many tokens per unit as it receives under vtc. The output is unused: the reduced prompt
        was precomputed."""
        adapter = self.run.adapter
        for group in adapter.encode_images(self.inputs):
            feats = group.features
            if self.projector_tokens is not None:
                feats = feats[:, :self.projector_tokens]
            adapter.project(feats)

    def forward(self, name: str, **kwargs):
        """One prefill forward of ``name`` (baseline | vtc | oracle); with vision-side stages the oracle runs
        :meth:`oracle_vision` first, then the LLM on the precomputed reduced prompt."""
        if name == "oracle" and self.has_vision:
            self.oracle_vision()
        with self._attached(name) as inputs:
            return self.model(**inputs, **kwargs)

    def generate(self, name: str, **kwargs):
        if name == "vision":
            return self.vision()
        if name == "oracle" and self.has_vision:
            self.oracle_vision()
        with self._attached(name) as inputs:
            return self.model.generate(**inputs, **kwargs)


def bench(model, inputs: dict, config, *, repeats: int = 3, warmup: int = 1, decode_tokens: int = 8,
          full_layers: int | None = None, full_vision_layers: int | None = None,
          full_depth_lens: Callable[[list[int]], list[int]] | None = None,
          progress: Callable[[str], None] | None = _stderr) -> dict:
    """Measure baseline / vtc / oracle (and the vision tower alone) on ``inputs``; returns the result dict
    (see the module docstring). ``full_layers`` / ``full_vision_layers``: depths of the unshortened model, for
    the full-depth FLOPs (default: the arch preset's when the model was built by :func:`build_model`).
    ``full_depth_lens``: maps the as-run per-layer lengths (sequence entering each layer, KV-cache length of each
    layer) to the full-depth model's, for a config whose layers were scaled to the shortened depth (default: the
    last layer's length carries on, :func:`vtc.bench.cost.extend_to`)."""
    from transformers import LogitsProcessorList
    from transformers.utils import logging as hf_logging

    device = next(model.parameters()).device
    num_layers = model.config.get_text_config().num_hidden_layers
    B, N = inputs["input_ids"].shape
    n_visual = int(get_adapter(model).token_map(inputs["input_ids"], inputs).is_visual[0].sum())
    token = int(inputs["input_ids"][0, -1])  # an ordinary text token: never EOS, never a placeholder
    gen_kw = dict(max_new_tokens=decode_tokens + 1, do_sample=False, use_cache=True,
                  pad_token_id=model.config.get_text_config().pad_token_id or 0)
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        with torch.no_grad():
            # ---- probes: cache sizes and stats of one prefill per variant (also warms every path up) -----------
            _log(progress, f"probe forwards (batch {B}, prompt {N} tokens, {n_visual} visual per row)")
            out = model(**inputs, use_cache=True, logits_to_keep=1)
            probe = {"baseline": {"kv_bytes": kv_cache_bytes(model, _cache_of(out), B), "prompt_len": N,
                                  "seq_len_per_layer": {}, "kv_cache_len": [N] * num_layers}}
            del out
            var = Variants(model, inputs, config)
            cfg = var.config
            st = var.run.stats
            probe["vtc"] = {"kv_bytes": kv_cache_bytes(model, _cache_of(var.probe_output), B), "prompt_len": st.prompt_len,
                            "seq_len_per_layer": dict(st.seq_len_per_layer), "kv_cache_len": list(st.kv_cache_len),
                            "stats": st.as_dict()}
            var.probe_output = None
            out = var.forward("oracle", use_cache=True, logits_to_keep=1)
            if var.replay is not None:
                ost = var.replay.stats
                probe["oracle"] = {"prompt_len": ost.prompt_len, "seq_len_per_layer": dict(ost.seq_len_per_layer),
                                   "kv_cache_len": list(ost.kv_cache_len)}
            else:
                ref = var.oracle_inputs.get("inputs_embeds", var.oracle_inputs.get("input_ids"))
                plen = int(ref.shape[1])
                probe["oracle"] = {"prompt_len": plen, "seq_len_per_layer": {}, "kv_cache_len": [plen] * num_layers}
            probe["oracle"]["kv_bytes"] = kv_cache_bytes(model, _cache_of(out), B)
            del out
            po, pv = probe["oracle"], probe["vtc"]
            oracle_matches = (po["prompt_len"] == pv["prompt_len"] and po["kv_cache_len"] == pv["kv_cache_len"]
                              and llm_seq_lens(po["prompt_len"], num_layers, po["seq_len_per_layer"])
                              == llm_seq_lens(pv["prompt_len"], num_layers, pv["seq_len_per_layer"]))
            proj_rows = None
            if var.projector_tokens is not None:
                vision_stats = [s for s in st.stages if s.side == "vision"]
                last = max(s.index for s in vision_stats)
                proj_rows = sum(sum(s.tokens_out) for s in vision_stats if s.index == last)

            # ---- timed rounds: variants interleaved, order rotated every round ------------------------------
            raw: dict[str, dict[str, list]] = {v: {"prefill": [], "decode": [], "vtc": [], "peak": [], "delta": []}
                                               for v in VARIANTS}
            rounds = warmup + repeats
            for r in range(rounds):
                order = VARIANTS[r % len(VARIANTS):] + VARIANTS[:r % len(VARIANTS)]
                for v in order:
                    stats = var.stats[v]
                    timer = _StepTimer(device, token, stats)
                    with _PeakMemory(device) as mem:
                        _sync(device)
                        vtc0 = stats.vtc_time_s if stats is not None else 0.0
                        t0 = time.perf_counter()
                        var.generate(v, **gen_kw, logits_processor=LogitsProcessorList([timer]))
                        _sync(device)
                        t_end = time.perf_counter()
                    if r < warmup:
                        continue
                    if v == "vision":
                        raw[v]["prefill"].append(t_end - t0)
                    else:
                        raw[v]["prefill"].append(timer.times[0] - t0)
                        raw[v]["decode"].extend(b - a for a, b in zip(timer.times[:-1], timer.times[1:]))
                        if timer.vtc:
                            raw[v]["vtc"].append(timer.vtc[0] - vtc0)
                    raw[v]["peak"].append(mem.peak)
                    raw[v]["delta"].append(mem.delta)
                if r < warmup:
                    _log(progress, f"round {r + 1}/{rounds} (warm-up) done")
                else:
                    msg = ", ".join(f"{v} {raw[v]['prefill'][-1] * 1e3:.1f} ms" for v in VARIANTS)
                    _log(progress, f"round {r + 1}/{rounds} (repeat {r - warmup + 1}/{repeats}): prefill {msg}")
    finally:
        hf_logging.set_verbosity(verbosity)

    # ---- FLOPs and the result ----------------------------------------------------------------------------------------
    spec_name = getattr(model, "_vtc_bench_arch", None)
    spec = ARCHS.get(spec_name) if spec_name else None
    full_layers = full_layers or (spec.text_layers if spec else None)
    full_vision_layers = full_vision_layers or (spec.vision_layers if spec else None)
    variants: dict[str, dict] = {}
    for v in VARIANTS:
        rv = raw[v]
        entry = {"prefill_s": _summary(rv["prefill"]), "decode_s_per_token": _summary(rv["decode"]),
                 "vtc_time_s": _summary(rv["vtc"]),
                 "peak_memory_bytes": max((p for p in rv["peak"] if p is not None), default=None),
                 "peak_memory_delta_bytes": _summary([d for d in rv["delta"] if d is not None])["median"]}
        if v != "vision":
            p = probe[v]
            seq = llm_seq_lens(p["prompt_len"], num_layers, p["seq_len_per_layer"])
            kv = p["kv_cache_len"] or [p["prompt_len"]] * num_layers
            kw = dict(prompt_len=p["prompt_len"], seq_lens=seq, kv_lens=kv,
                      projector_rows=proj_rows if v != "baseline" else None)
            kw_full = dict(kw, seq_lens=full_depth_lens(seq), kv_lens=full_depth_lens(kv)) if full_depth_lens else kw
            entry.update({"prompt_len": p["prompt_len"], "seq_len_per_layer": seq, "kv_cache_len": kv,
                          "kv_cache_bytes": p["kv_bytes"],
                          "flops": model_flops(model, inputs, **kw),
                          "flops_full_depth": model_flops(model, inputs, full_layers=full_layers,
                                                          full_vision_layers=full_vision_layers, **kw_full)})
        variants[v] = entry
    tc = model.config.get_text_config()
    vc = model.config.vision_config
    return {
        "arch": spec_name,
        "config": cfg.source or None,
        "config_name": cfg.name or None,
        "stages": [s.model_dump() for s in cfg.stages],
        "methods": [s.method for s in cfg.stages],
        "batch": B,
        "prompt_len": N,
        "visual_tokens": n_visual,
        "text_tokens": N - n_visual,
        "llm_layers": tc.num_hidden_layers,
        "vision_layers": int(getattr(vc, "num_hidden_layers", None) or getattr(vc, "depth", 0)),
        "full_llm_layers": full_layers,
        "full_vision_layers": full_vision_layers,
        "dtype": str(next(model.parameters()).dtype).replace("torch.", ""),
        "attn_implementation": getattr(tc, "_attn_implementation", None),
        "repeats": repeats,
        "warmup": warmup,
        "decode_tokens": decode_tokens,
        "variants": variants,
        "summary": summarize(variants, oracle_matches),
        "vtc_stats": probe["vtc"]["stats"],
        "environment": _environment(device),
        "raw": {v: {k: raw[v][k] for k in ("prefill", "decode", "vtc")} for v in VARIANTS},
    }


def summarize(variants: dict, oracle_matches: bool = True) -> dict:
    """Speedups, efficiency and overhead from the variants' medians (see the module docstring)."""

    def med(v, key="prefill_s"):
        return variants[v][key]["median"]

    def ratio(a, b):
        return a / b if a is not None and b else None

    vtc_time = med("vtc", "vtc_time_s")
    s = {
        "speedup": ratio(med("baseline"), med("vtc")),
        "oracle_speedup": ratio(med("baseline"), med("oracle")),
        "efficiency": ratio(med("oracle"), med("vtc")),
        "overhead_pct": 100.0 * vtc_time / med("vtc") if vtc_time is not None and med("vtc") else None,
        "decode_speedup": ratio(med("baseline", "decode_s_per_token"), med("vtc", "decode_s_per_token")),
        "oracle_decode_speedup": ratio(med("baseline", "decode_s_per_token"), med("oracle", "decode_s_per_token")),
        "kv_ratio": ratio(variants["vtc"]["kv_cache_bytes"], variants["baseline"]["kv_cache_bytes"]),
        "flops_ratio": ratio(variants["vtc"]["flops"]["prefill_total"], variants["baseline"]["flops"]["prefill_total"]),
        "flops_ratio_full_depth": ratio(variants["vtc"]["flops_full_depth"]["prefill_total"],
                                        variants["baseline"]["flops_full_depth"]["prefill_total"]),
        "vision_share": ratio(med("vision"), med("baseline")),
        "oracle_matches_vtc": bool(oracle_matches),
    }
    s["speedup_gap_pct"] = (100.0 * (1 - s["speedup"] / s["oracle_speedup"])
                            if s["speedup"] and s["oracle_speedup"] else None)
    # a shortened model inflates the overhead share (vtc's cost per stage does not shrink with depth, the prefill
    # does): estimate the full-depth prefill time by scaling the measured one with the FLOPs ratio
    scale = ratio(variants["vtc"]["flops_full_depth"]["prefill_total"], variants["vtc"]["flops"]["prefill_total"])
    s["overhead_pct_full_depth_est"] = (s["overhead_pct"] / scale
                                        if s["overhead_pct"] is not None and scale else None)
    return s


def _environment(device: torch.device) -> dict:
    import transformers

    env = {"device": str(device), "torch": torch.__version__, "transformers": transformers.__version__,
           "python": platform.python_version(), "platform": platform.platform(), "processor": platform.processor(),
           "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
           "date": time.strftime("%Y-%m-%d %H:%M:%S")}
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
    else:
        try:
            env["load_average"] = list(os.getloadavg())
        except OSError:  # pragma: no cover
            pass
    return env
