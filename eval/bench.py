"""``vtc bench``: speed, FLOPs and memory of a compression config at real model shapes, in one run.

    python -m eval.bench --config configs/llava-1.5/fastv-50.yaml --arch llava-1.5-7b --layers 3 \\
        [--vision-layers N] [--batch B] [--dtype float32|float16|bfloat16] [--device cpu|cuda] \\
        [--text-tokens 64] [--image-size H W] [--repeats R] [--warmup W] [--decode-tokens T] [--out DIR]

The model is built from an architecture preset (:data:`ARCHS`: LLaVA-1.5-7B / -13B, LLaVA-NeXT-7B, Qwen2-VL-7B,
Qwen2.5-VL-7B, and tiny ones for tests) with **random weights** at the real shapes: constructed directly on the
target device in the target dtype with transformers' weight initialisation switched off, then filled with
uniform noise of std 0.02 (norms 1, biases 0), which is fast and gives finite activations in fp16.
``--layers`` / ``--vision-layers`` shorten the LLM / the vision tower for CPU runs (the vision feature layer
-2 still exists, so VisionZip scores where it does on the full tower). Inputs are synthetic and of the real
size: one image per sample (LLaVA-1.5: 336 px, 576 tokens; LLaVA-NeXT: 672 x 672 = base + 4 crops, 2928
tokens with the newline tokens; Qwen: 672 x 672 = 48 x 48 patches, 576 merged tokens), ``--text-tokens``
text tokens around it (half before, half after), identical rows (no padding, so SDPA keeps its flash
kernel for every variant).

Three variants run interleaved in one process (rounds of [baseline, vtc, oracle, vision], the order rotated
every round; ``--warmup`` rounds are discarded):

- **baseline**: the unwrapped model;
- **vtc**: the model inside ``vtc.compress(model, config)``;
- **oracle**: the same model fed the *already shortened* sequence the config produces, so no scoring at all.
  Vision-side stages: the vision tower runs on the images and the projector on as many tokens as it receives
  under vtc (results discarded), and the LLM is fed the reduced prompt's ``inputs_embeds`` / mask / position
  ids captured from a vtc forward. LLM-side stages: a replay method (:class:`Replay`) returns the Reductions recorded in that
  vtc forward, so the runtime shortens the sequence at the same layers with zero scoring cost;
- **vision**: the vision tower + projector alone (to see what share of the prefill they are).

Each measurement is one ``model.generate(max_new_tokens=T + 1)`` with a logits processor that timestamps every
step (after a device synchronisation) and forces a fixed ordinary token (random weights would otherwise
emit anything, EOS included): **prefill** = call start to the first logits (vision + projector + LLM prefill
+ generate's input preparation, identical in all variants), **decode** = the time between later steps.
Per variant: median and IQR over the repeats (decode: over all steps of all repeats); **vtc time** = the
growth of ``run.stats.vtc_time_s`` during the prefill (host time spent inside vtc's hooks; on a GPU that is
launch time plus the one sync per stage); **peak memory** = CUDA: ``torch.cuda.max_memory_allocated`` during
the call (absolute, and above what was allocated before it); CPU: the process RSS sampled every 2 ms in a
thread (``/proc/self/statm``; approximate: short peaks can be missed, the allocator may keep freed memory);
**KV-cache bytes** = the sum of the key / value tensors of the real cache after one prefill forward.

Analytic FLOPs (:mod:`eval.flops`, matmuls only, 1 MAC = 2 FLOPs): vision tower, projector (on the tokens it
receives: fewer when a vision-side stage acts before it), LLM prefill with the real sequence length entering
each decoder layer (``run.stats.seq_len_per_layer`` from the first LLM-side stage on, the (reduced) prompt
length before), the LM head on the last position, and one decode step on the real per-layer cache lengths;
computed for the model as run and for the full-depth model (the last layer's length carries on: valid because
every stage acts inside the shortened model). Scoring FLOPs of the methods are not counted (they are what
the measured vtc time and efficiency show).

Summary: **speedup** = baseline prefill / vtc prefill, **oracle speedup** = baseline / oracle, **efficiency** =
oracle time / vtc time, **overhead** = vtc time / vtc prefill (%) (and, for a shortened model, an estimate at full depth: the measured
vtc time over the measured prefill scaled by the full-depth / as-run FLOPs ratio), decode speedup, and the
FLOPs ratio.
Output: a plain-text table on stdout, ``<out>/<arch>_<config>_b<B>_<device>.json`` and ``.png``.
"""

from __future__ import annotations

import argparse
import contextlib
import inspect
import json
import math
import os
import platform
import statistics
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

import torch

import vtc
from vtc.errors import ConfigError
from vtc.methods import Method
from vtc.models import get_adapter

from . import flops as fl

__all__ = [
    "ArchSpec",
    "ARCHS",
    "build_model",
    "synthetic_inputs",
    "Replay",
    "bench",
    "format_table",
    "plot_result",
    "write_result",
    "main",
]


# ---- architecture presets -----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ArchSpec:
    """A model shape. ``text`` / ``vision`` are kwargs of the family's text / vision config, ``top`` of the
    top-level config; ``image_size`` the synthetic image (H, W); ``text_ids`` the range random text tokens are
    drawn from (no special tokens); ``bos`` an optional first token."""

    name: str
    family: str  # llava | llava_next | qwen2_vl | qwen2_5_vl
    text: dict
    vision: dict
    top: dict = field(default_factory=dict)
    image_size: tuple[int, int] = (336, 336)
    text_ids: tuple[int, int] = (3, 1000)
    bos: int | None = 1
    description: str = ""

    @property
    def text_layers(self) -> int:
        return int(self.text["num_hidden_layers"])

    @property
    def vision_layers(self) -> int:
        return int(self.vision.get("num_hidden_layers", self.vision.get("depth", 0)))


_CLIP_L_336 = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                   image_size=336, patch_size=14, projection_dim=768, hidden_act="quick_gelu", layer_norm_eps=1e-5)
_VICUNA_7B = dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                  num_key_value_heads=32, vocab_size=32064, max_position_embeddings=4096, rms_norm_eps=1e-5,
                  pad_token_id=0)
_VICUNA_13B = dict(_VICUNA_7B, hidden_size=5120, intermediate_size=13824, num_hidden_layers=40,
                   num_attention_heads=40, num_key_value_heads=40)
_LLAVA_TOP = dict(image_token_id=32000, vision_feature_layer=-2, vision_feature_select_strategy="default",
                  projector_hidden_act="gelu")
_QWEN2_7B = dict(vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                 num_attention_heads=28, num_key_value_heads=4, max_position_embeddings=32768, rms_norm_eps=1e-6,
                 pad_token_id=151643, bos_token_id=151643, eos_token_id=151645,
                 rope_parameters={"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [16, 24, 24]})
_QWEN_TOP = dict(image_token_id=151655, video_token_id=151656, vision_start_token_id=151652,
                 vision_end_token_id=151653)

#: the tiny shapes of tests/tiny_models*.py (for the benchmark's own tests)
_TINY_CLIP = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4, image_size=48,
                  patch_size=8, projection_dim=32)
_TINY_LLAMA = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                   num_key_value_heads=2, vocab_size=128, max_position_embeddings=1024, pad_token_id=0,
                   rms_norm_eps=1e-6)
_TINY_QWEN_TEXT = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, rms_norm_eps=1e-6,
                       pad_token_id=0, bos_token_id=1, eos_token_id=2,
                       rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]})

ARCHS: dict[str, ArchSpec] = {
    "llava-1.5-7b": ArchSpec(
        "llava-1.5-7b", "llava", _VICUNA_7B, _CLIP_L_336, _LLAVA_TOP,
        description="LLaVA-1.5-7B: CLIP ViT-L/14-336 (24 layers, 576 tokens), 2-layer GELU projector, Vicuna-7B"),
    "llava-1.5-13b": ArchSpec(
        "llava-1.5-13b", "llava", _VICUNA_13B, _CLIP_L_336, _LLAVA_TOP,
        description="LLaVA-1.5-13B: CLIP ViT-L/14-336, Vicuna-13B (40 layers, 5120 wide)"),
    "llava-next-7b": ArchSpec(
        "llava-next-7b", "llava_next", _VICUNA_7B, _CLIP_L_336,
        dict(_LLAVA_TOP, image_grid_pinpoints=[[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]),
        image_size=(672, 672),
        description="LLaVA-NeXT-7B (v1.6 Vicuna): anyres, a 672 x 672 image = base + 2 x 2 crops = 2928 tokens"),
    "qwen2-vl-7b": ArchSpec(
        "qwen2-vl-7b", "qwen2_vl", _QWEN2_7B,
        dict(depth=32, embed_dim=1280, hidden_size=3584, num_heads=16, mlp_ratio=4, in_channels=3, patch_size=14,
             spatial_merge_size=2, temporal_patch_size=2),
        _QWEN_TOP, image_size=(672, 672), text_ids=(1000, 20000), bos=None,
        description="Qwen2-VL-7B: 32-block ViT (1280 wide), 2 x 2 merger, Qwen2-7B (GQA, M-RoPE); 672 px = 576 tokens"),
    "qwen2.5-vl-7b": ArchSpec(
        "qwen2.5-vl-7b", "qwen2_5_vl", _QWEN2_7B,
        dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, in_channels=3, patch_size=14,
             spatial_merge_size=2, temporal_patch_size=2, out_hidden_size=3584, window_size=112,
             fullatt_block_indexes=[7, 15, 23, 31], tokens_per_second=2),
        _QWEN_TOP, image_size=(672, 672), text_ids=(1000, 20000), bos=None,
        description="Qwen2.5-VL-7B: 32-block windowed ViT (SwiGLU), Qwen2-7B; 672 px = 576 tokens"),
    "tiny": ArchSpec(
        "tiny", "llava", _TINY_LLAMA, _TINY_CLIP, dict(_LLAVA_TOP, image_token_id=120),
        image_size=(48, 48), text_ids=(3, 100), description="tiny LLaVA (tests): 36 visual tokens"),
    "tiny-next": ArchSpec(
        "tiny-next", "llava_next", _TINY_LLAMA, _TINY_CLIP,
        dict(_LLAVA_TOP, image_token_id=120, image_grid_pinpoints=[[48, 48], [48, 96], [96, 48], [96, 96]]),
        image_size=(96, 96), text_ids=(3, 100), description="tiny LLaVA-NeXT (tests): base + 2 x 2 crops"),
    "tiny-qwen2-vl": ArchSpec(
        "tiny-qwen2-vl", "qwen2_vl", _TINY_QWEN_TEXT,
        dict(depth=3, embed_dim=32, hidden_size=64, num_heads=4, mlp_ratio=2, in_channels=3, patch_size=4,
             spatial_merge_size=2, temporal_patch_size=2),
        dict(image_token_id=120, video_token_id=121, vision_start_token_id=122, vision_end_token_id=123),
        image_size=(32, 32), text_ids=(3, 100), bos=None, description="tiny Qwen2-VL (tests): 16 merged tokens"),
    "tiny-qwen2.5-vl": ArchSpec(
        "tiny-qwen2.5-vl", "qwen2_5_vl", _TINY_QWEN_TEXT,
        dict(depth=4, hidden_size=32, intermediate_size=64, num_heads=4, in_channels=3, patch_size=4,
             spatial_merge_size=2, temporal_patch_size=2, out_hidden_size=64, window_size=16,
             fullatt_block_indexes=[1, 3], tokens_per_second=2),
        dict(image_token_id=120, video_token_id=121, vision_start_token_id=122, vision_end_token_id=123),
        image_size=(32, 32), text_ids=(3, 100), bos=None, description="tiny Qwen2.5-VL (tests): 16 merged tokens"),
}

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def get_arch(arch: str | ArchSpec) -> ArchSpec:
    if isinstance(arch, ArchSpec):
        return arch
    if arch not in ARCHS:
        raise ValueError(f"unknown --arch {arch!r} (allowed: {', '.join(ARCHS)})")
    return ARCHS[arch]


# ---- model ------------------------------------------------------------------------------------------------------------
def _hf_config(spec: ArchSpec, layers: int | None, vision_layers: int | None, attn: str):
    import transformers as tf

    text = dict(spec.text)
    vision = dict(spec.vision)
    if layers is not None:
        if layers < 1:
            raise ValueError(f"--layers must be >= 1, got {layers}")
        text["num_hidden_layers"] = int(layers)
    if vision_layers is not None:
        if vision_layers < 2:
            raise ValueError(f"--vision-layers must be >= 2 (the features come from layer -2), got {vision_layers}")
        if "depth" in vision:
            vision["depth"] = int(vision_layers)
            if "fullatt_block_indexes" in vision:  # keep the full-attention blocks that exist, the last one full
                vision["fullatt_block_indexes"] = sorted({i for i in vision["fullatt_block_indexes"]
                                                          if i < vision_layers} | {vision_layers - 1})
        else:
            vision["num_hidden_layers"] = int(vision_layers)
    if spec.family == "llava":
        cfg = tf.LlavaConfig(vision_config=tf.CLIPVisionConfig(**vision), text_config=tf.LlamaConfig(**text),
                             **spec.top)
        cls = tf.LlavaForConditionalGeneration
    elif spec.family == "llava_next":
        cfg = tf.LlavaNextConfig(vision_config=tf.CLIPVisionConfig(**vision), text_config=tf.LlamaConfig(**text),
                                 **spec.top)
        cls = tf.LlavaNextForConditionalGeneration
    elif spec.family == "qwen2_vl":
        cfg = tf.Qwen2VLConfig(text_config=text, vision_config=vision, **spec.top)
        cls = tf.Qwen2VLForConditionalGeneration
    elif spec.family == "qwen2_5_vl":
        cfg = tf.Qwen2_5_VLConfig(text_config=text, vision_config=vision, **spec.top)
        cls = tf.Qwen2_5_VLForConditionalGeneration
    else:  # pragma: no cover - presets are fixed
        raise ValueError(f"unknown family {spec.family!r}")
    cfg._attn_implementation = attn
    return cfg, cls


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype):
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


def _no_init_weights():
    try:
        from transformers.initialization import no_init_weights
    except ImportError:  # pragma: no cover - older transformers
        from transformers.modeling_utils import no_init_weights
    return no_init_weights()


@torch.no_grad()
def random_fill_(model: torch.nn.Module, seed: int = 0, std: float = 0.02) -> torch.nn.Module:
    """Fill every parameter cheaply: norm weights 1 and biases 0, other biases 0, everything else uniform noise
    of standard deviation ``std`` (``U(-std sqrt 3, std sqrt 3)``)."""
    dev = next(model.parameters()).device
    g = torch.Generator(device=dev).manual_seed(seed)
    a = std * math.sqrt(3.0)
    for mod in model.modules():
        is_norm = "norm" in type(mod).__name__.lower()
        for name, p in mod.named_parameters(recurse=False):
            if is_norm:
                p.fill_(1.0 if name == "weight" else 0.0)
            elif name == "bias":
                p.zero_()
            else:
                p.uniform_(-a, a, generator=g)
    return model


def build_model(arch: str | ArchSpec, *, layers: int | None = None, vision_layers: int | None = None,
                dtype: torch.dtype | str = torch.float32, device: str | torch.device = "cpu", attn: str = "sdpa",
                seed: int = 0) -> torch.nn.Module:
    """A random-weight model of ``arch`` built directly on ``device`` in ``dtype`` (no slow initialisation)."""
    spec = get_arch(arch)
    dtype = DTYPES[dtype] if isinstance(dtype, str) else dtype
    cfg, cls = _hf_config(spec, layers, vision_layers, attn)
    with _default_dtype(dtype), torch.device(device), _no_init_weights():
        model = cls(cfg)
    model.eval()
    if hasattr(model, "set_attn_implementation"):
        model.set_attn_implementation(attn)
    random_fill_(model, seed)
    model._vtc_bench_arch = spec.name
    return model


# ---- inputs -----------------------------------------------------------------------------------------------------------
def _prompt_rows(spec: ArchSpec, batch: int, text_tokens: int, visual: list[int], g: torch.Generator) -> torch.Tensor:
    n_text = max(2, int(text_tokens))
    lo, hi = spec.text_ids
    text = torch.randint(lo, hi, (n_text,), generator=g)
    if spec.bos is not None:
        text[0] = spec.bos
    pre = n_text // 2
    return torch.cat([text[:pre], torch.tensor(visual, dtype=torch.long), text[pre:]]).unsqueeze(0).expand(batch, -1)


def synthetic_inputs(model, arch: str | ArchSpec, *, batch: int = 1, text_tokens: int = 64,
                     image_size: tuple[int, int] | None = None, seed: int = 0) -> dict:
    """Forward kwargs for ``batch`` identical rows (no padding): one image per row, ``text_tokens`` text tokens
    (half before the image, half after; Qwen's vision start / end tokens count as text)."""
    spec = get_arch(arch)
    cfg = model.config
    dev = next(model.parameters()).device
    dt = next(model.parameters()).dtype
    g = torch.Generator().manual_seed(seed)
    H, W = image_size or spec.image_size
    out: dict[str, Any] = {}
    if spec.family in ("llava", "llava_next"):
        vc = cfg.vision_config
        side = vc.image_size // vc.patch_size
        extra = 1 if cfg.vision_feature_select_strategy == "full" else 0
        if spec.family == "llava":
            n = side * side + extra
            pixel_values = torch.randn(batch, 3, vc.image_size, vc.image_size, generator=g)
        else:
            from vtc.models.llava_next import anyres_geometry

            geom = anyres_geometry((H, W), cfg.image_grid_pinpoints, vc.image_size)
            n = geom.num_tokens(side, side, extra)
            pixel_values = torch.randn(batch, geom.num_units, 3, vc.image_size, vc.image_size, generator=g)
            out["image_sizes"] = torch.tensor([[H, W]] * batch, dtype=torch.long, device=dev)
        ids = _prompt_rows(spec, batch, text_tokens - 0, [cfg.image_token_id] * n, g)
        out["pixel_values"] = pixel_values.to(dev, dt)
    else:
        vc = cfg.vision_config
        p, m, tp = vc.patch_size, vc.spatial_merge_size, vc.temporal_patch_size
        if H % (p * m) or W % (p * m):
            raise ValueError(f"--image-size must be a multiple of {p * m} px for {spec.name}, got {H} x {W}")
        grid = (1, H // p, W // p)
        n = grid[1] * grid[2] // (m * m)
        visual = [cfg.vision_start_token_id] + [cfg.image_token_id] * n + [cfg.vision_end_token_id]
        ids = _prompt_rows(spec, batch, max(2, text_tokens - 2), visual, g)
        rows = grid[0] * grid[1] * grid[2]
        out["pixel_values"] = torch.randn(batch * rows, vc.in_channels * tp * p * p, generator=g).to(dev, dt)
        out["image_grid_thw"] = torch.tensor([grid] * batch, dtype=torch.long, device=dev)
        inner = getattr(model, "model", model)
        if "mm_token_type_ids" in inspect.signature(inner.forward).parameters:
            out["mm_token_type_ids"] = (ids == cfg.image_token_id).int().to(dev)
    out["input_ids"] = ids.contiguous().to(dev)
    out["attention_mask"] = torch.ones_like(out["input_ids"])
    return out


# ---- the oracle's replay method ----------------------------------------------------------------------------------
class Replay(Method):
    """Returns the Reduction recorded at each of ``layers`` (no scoring): the oracle of an LLM-side stage.

    Not registered (a config takes the instance directly), so it never shows in ``vtc.available_methods()``.
    The recorded Reductions are valid for the exact inputs they were recorded on."""

    sides: ClassVar[tuple[str, ...]] = ("llm",)
    method: Literal["bench_replay"] = "bench_replay"
    layers: list[int]
    reductions: dict = {}
    proportional: bool = False

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


def kv_cache_bytes(cache) -> int | None:
    """Bytes held by the key / value tensors of a transformers cache (DynamicCache of 5.x or 4.x, or tuples)."""
    if cache is None:
        return None
    tensors = []
    layers = getattr(cache, "layers", None)
    if layers is not None:
        for layer in layers:
            tensors += [getattr(layer, "keys", None), getattr(layer, "values", None)]
    elif hasattr(cache, "key_cache"):
        tensors = list(cache.key_cache) + list(cache.value_cache)
    elif isinstance(cache, list | tuple):
        for layer in cache:
            tensors += list(layer[:2])
    return sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor))


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


# ---- analytic FLOPs ------------------------------------------------------------------------------------------------
def lm_shape(model, layers: int | None = None) -> fl.LMShape:
    tc = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config.text_config
    return fl.LMShape(layers=layers or tc.num_hidden_layers, hidden=tc.hidden_size,
                      intermediate=tc.intermediate_size, heads=tc.num_attention_heads,
                      kv_heads=getattr(tc, "num_key_value_heads", None) or tc.num_attention_heads)


def vision_flops(model, inputs: dict, *, projector_rows: int | None = None, vision_layers: int | None = None) -> dict:
    """Analytic FLOPs of the vision tower and projector for ``inputs`` ({'tower', 'projector', 'total',
    'projector_rows'}). ``projector_rows``: tokens the projector receives (default: all the tower's tokens the
    model feeds); ``vision_layers``: count a tower of that depth (default: as built)."""
    cfg = model.config
    vc = cfg.vision_config
    name = type(model).__name__
    if name.startswith("Llava"):
        side = vc.image_size // vc.patch_size
        T = side * side + 1
        if name.startswith("LlavaNext"):
            from vtc.models.llava_next import anyres_geometry

            units = sum(anyres_geometry(s, cfg.image_grid_pinpoints, vc.image_size).num_units
                        for s in inputs["image_sizes"].tolist())
        else:
            units = inputs["pixel_values"].shape[0]
        shape = fl.ViTShape(vision_layers or vc.num_hidden_layers, vc.hidden_size, vc.intermediate_size,
                            vc.num_attention_heads)
        tower = fl.vit_flops(shape, T, units) + units * fl.patch_embed_flops(T - 1, 3 * vc.patch_size ** 2,
                                                                              vc.hidden_size)
        fed = T if cfg.vision_feature_select_strategy == "full" else T - 1
        rows = units * fed if projector_rows is None else projector_rows
        D_l = cfg.text_config.hidden_size
        projector = fl.mlp_flops(rows, [vc.hidden_size, D_l, D_l])
    else:  # Qwen2-VL / Qwen2.5-VL: attention per frame group, 2 x 2 merger
        p, m, tp = vc.patch_size, vc.spatial_merge_size, vc.temporal_patch_size
        qwen25 = hasattr(vc, "fullatt_block_indexes")
        width = vc.hidden_size if qwen25 else vc.embed_dim
        out_dim = vc.out_hidden_size if qwen25 else vc.hidden_size
        inter = vc.intermediate_size if qwen25 else int(vc.embed_dim * vc.mlp_ratio)
        depth = vision_layers or vc.depth
        shape = fl.ViTShape(depth, width, inter, vc.num_heads, gated=qwen25)
        full = None
        if qwen25:
            full = [i for i in vc.fullatt_block_indexes if i < depth] if vision_layers is None else \
                sorted({i for i in vc.fullatt_block_indexes if i < depth} | {depth - 1})
        tower, rows_all = 0, 0
        for t, h, w in inputs["image_grid_thw"].tolist():
            wp = fl.window_pairs(h, w, vc.window_size // m // p, m) if qwen25 else None
            tower += fl.vit_flops(shape, h * w, t, window_pairs_per_unit=wp, full_layers=full)
            tower += fl.patch_embed_flops(t * h * w, vc.in_channels * tp * p * p, width)
            rows_all += t * h * w // (m * m)
        rows = rows_all  # the merger runs before any vtc stage on Qwen (project is the identity)
        projector = fl.mlp_flops(rows, [width * m * m, width * m * m, out_dim])
    return {"tower": tower, "projector": projector, "total": tower + projector, "projector_rows": rows}


def llm_seq_lens(prompt_len: int, num_layers: int, seq_len_per_layer: dict | None) -> list[int]:
    """Sequence length entering each decoder layer: the prompt length until the first LLM-side stage, then what
    the runtime recorded (``run.stats.seq_len_per_layer``, keys may be str after a JSON round trip)."""
    rec = {int(k): int(v) for k, v in (seq_len_per_layer or {}).items()}
    return [rec.get(i, prompt_len) for i in range(num_layers)]


def extend_to(lens: list[int], depth: int) -> list[int]:
    """Per-layer lengths of a deeper model with the same stages: the last layer's length carries on."""
    return list(lens[:depth]) + [lens[-1]] * max(0, depth - len(lens))


def model_flops(model, inputs: dict, *, prompt_len: int, seq_lens: list[int], kv_lens: list[int] | None,
                projector_rows: int | None, full_layers: int | None = None, full_vision_layers: int | None = None,
                with_vision: bool = True) -> dict:
    """Analytic FLOPs of one prefill (+ one decode step) of the whole batch."""
    B = inputs["input_ids"].shape[0]
    shape = lm_shape(model, full_layers)
    lens = extend_to(seq_lens, shape.layers)
    tc = model.config.get_text_config()
    vis = vision_flops(model, inputs, projector_rows=projector_rows, vision_layers=full_vision_layers) \
        if with_vision else {"tower": 0, "projector": 0, "total": 0, "projector_rows": 0}
    llm = B * fl.prefill_flops(shape, lens)
    head = fl.lm_head_flops(tc.hidden_size, tc.vocab_size, B)
    kv = extend_to(kv_lens or [prompt_len] * len(seq_lens), shape.layers)
    decode = B * fl.decode_flops(shape, kv) + head
    return {"vision_tower": vis["tower"], "projector": vis["projector"], "projector_rows": vis["projector_rows"],
            "llm_prefill": llm, "lm_head": head, "prefill_total": vis["total"] + llm + head,
            "decode_per_token": decode, "llm_layers": shape.layers, "seq_len_per_layer": lens}


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
        self.config = cfg = vtc.load_config(config)
        num_layers = model.config.get_text_config().num_hidden_layers
        needed = max((max(s.llm_layers()) for s in cfg.stages if s.llm_layers()), default=0) + 1
        if needed > num_layers:
            raise ConfigError(f"config {cfg.name or cfg.source!r} acts at decoder layer {needed - 1} but the "
                              f"benchmark model has {num_layers} decoder layers: pass --layers >= {needed}")
        self.has_vision = any(s.side == "vision" for s in cfg.stages)
        self.run = vtc.compress(model, cfg)
        self.vision_kwargs = _vision_kwargs(model, inputs)
        captured: dict = {}

        def capture(module, args, kwargs):
            captured.update({k: kwargs[k] for k in ("inputs_embeds", "attention_mask", "position_ids")
                             if kwargs.get(k) is not None})

        with torch.no_grad(), self.run:
            h = model.register_forward_pre_hook(capture, with_kwargs=True)
            try:
                self.probe_output = model(**inputs, use_cache=True, logits_to_keep=1)
            finally:
                h.remove()
            self.token_map = self.run.llm.token_map
        if self.has_vision and "inputs_embeds" not in captured:
            raise RuntimeError("could not capture the reduced prompt of the vision-side stages")
        self.oracle_inputs = captured if self.has_vision else inputs
        recorded: dict[int, dict[int, Any]] = {}
        for st in self.run.stats.stages:
            if st.side == "llm":
                recorded.setdefault(st.index, {})[st.layer] = st.reduction
        replays = [Replay(layers=sorted(recorded[i]), reductions=recorded[i],
                          proportional=bool(getattr(s, "proportional", False)))
                   for i, s in enumerate(cfg.stages) if s.side == "llm" and recorded.get(i)]
        self.replay = vtc.compress(model, {"stages": replays, "seed": cfg.seed}) if replays else None
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
            if self.replay is None:
                yield self.oracle_inputs
                return
            with self.replay:
                if self.has_vision:  # the token map of the rebuilt prompt (inputs_embeds carry none)
                    self.replay._pending_token_map = self.token_map
                yield self.oracle_inputs
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
        for group in adapter.encode_images(self.inputs, set()):
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
          progress: Callable[[str], None] | None = _stderr) -> dict:
    """Measure baseline / vtc / oracle (and the vision tower alone) on ``inputs``; returns the result dict
    (see the module docstring). ``full_layers`` / ``full_vision_layers``: depths of the unshortened model, for
    the full-depth FLOPs (default: the arch preset's when the model was built by :func:`build_model`)."""
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
            probe = {"baseline": {"kv_bytes": kv_cache_bytes(_cache_of(out)), "prompt_len": N,
                                  "seq_len_per_layer": {}, "kv_cache_len": [N] * num_layers}}
            del out
            var = Variants(model, inputs, config)
            cfg = var.config
            st = var.run.stats
            probe["vtc"] = {"kv_bytes": kv_cache_bytes(_cache_of(var.probe_output)), "prompt_len": st.prompt_len,
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
            probe["oracle"]["kv_bytes"] = kv_cache_bytes(_cache_of(out))
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
            entry.update({"prompt_len": p["prompt_len"], "seq_len_per_layer": seq, "kv_cache_len": kv,
                          "kv_cache_bytes": p["kv_bytes"],
                          "flops": model_flops(model, inputs, **kw),
                          "flops_full_depth": model_flops(model, inputs, full_layers=full_layers,
                                                          full_vision_layers=full_vision_layers, **kw)})
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
    p = argparse.ArgumentParser(prog="vtc bench", description=__doc__.split("\n\n")[0],
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
        result = bench(model, inputs, args.config, repeats=args.repeats, warmup=args.warmup,
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
