"""``vtc bench``: speed, FLOPs and memory of a compression config at real model shapes, in one run.

    vtc bench --config llava-1.5/fastv-50 --arch llava-1.5-7b --layers 3 \\
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

Analytic FLOPs (:mod:`vtc.flops`, matmuls only, 1 MAC = 2 FLOPs): vision tower, projector (on the tokens it
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

from .cost import extend_to, llm_seq_lens, lm_shape, model_flops, vision_flops
from .measure import VARIANTS, Replay, Variants, bench, kv_cache_bytes, summarize
from .presets import ARCHS, DTYPES, ArchSpec, build_model, get_arch, random_fill_, synthetic_inputs
from .report import build_parser, format_table, main, plot_result, result_stem, write_result

__all__ = ["ArchSpec", "ARCHS", "DTYPES", "get_arch", "build_model", "random_fill_", "synthetic_inputs", "Replay",
           "Variants", "VARIANTS", "bench", "summarize", "kv_cache_bytes", "lm_shape", "vision_flops", "llm_seq_lens",
           "extend_to", "model_flops", "format_table", "result_stem", "plot_result", "write_result", "build_parser",
           "main"]
