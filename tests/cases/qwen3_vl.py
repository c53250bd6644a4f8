"""Qwen3-VL family: DeepStack levels added after LLM layers 0-2 (so LLM-side stages at layers 1 and 2 prune while
DeepStack input still arrives, and every vision-side stage reduces the levels alike), interleaved M-RoPE, merged
2x2 tokens. Rows carry images of 8x8, 6x8 and 8x6 patches (16, 12, 12 merged tokens), left-padded; every case of
every other file runs on it. Video with timestamps and the MoE build are covered in tests/test_qwen3_vl.py.

Time: identity, sdpa = eager and budgets run every case; the expensive invariants (detach, decode consistency,
batch = single) run a representative subset (``HEAVY``) that covers every way the DeepStack levels are carried:
vision side, each kind of ``Reduction`` they are reduced alike with (pruned, downsampled grid, VisionZip merges with
a per-image content-adaptive count, SimPool-weighted windows, received-attention clusters, a 2025 diversity
selection); LLM side, a cut inside the DeepStack layers (layer 1, with image and text queries), multi-cut schedules
crossing the end of the DeepStack range (PDrop, TransPrune's token transitions) and merging (PACT at layer 2, the
merged token takes its anchor's DeepStack rows)."""

from matrix import Family
from tiny_models_qwen3 import qwen3_inputs, split_row3, tiny_qwen3_vl

HEAVY = ("random-vision", "downsample", "visionzip-per-image", "pool-attn", "pool-cluster-received", "divprune",
         "random-llm", "fastv-text", "pdrop", "pact", "transprune")

FAMILIES = [
    Family("qwen3_vl", build=lambda attn: tiny_qwen3_vl(attn), inputs=lambda m, b, s: qwen3_inputs(m, batch=b, seed=s),
           tokens_per_unit=16, row=split_row3, heavy_cases=HEAVY),
]
