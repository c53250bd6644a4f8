"""Qwen2-VL and Qwen2.5-VL families (M-RoPE, merged 2x2 tokens, window attention in the 2.5 tower).

Batch rows carry images of 8x8, 6x8 and 8x6 patches (16, 12, 12 merged tokens), left-padded, so every case of
every other file runs on units of different sizes. Video is covered in tests/test_qwen2_vl.py.

Time: Qwen2.5-VL shares Qwen2-VL's language model, M-RoPE and adapter; only the tower differs (window attention,
RMS norm). Qwen2-VL runs every invariant on every case; on Qwen2.5-VL identity, sdpa = eager and budgets run every
case and the expensive invariants (detach, decode consistency, batch = single) a subset (``HEAVY_2_5``): the
vision-side cases whose scores or merges read the tower (received attention and keys through its window blocks)
and two LLM-side ones.
"""

from matrix import Family
from tiny_models_qwen import qwen_inputs, split_row, tiny_qwen2_5_vl, tiny_qwen2_vl

HEAVY_2_5 = ("random-vision", "downsample", "visionzip", "visionzip-per-image", "pool-attn", "pool-cluster-received",
             "divprune", "fastervlm", "vispruner", "random-llm", "pact")

FAMILIES = [
    Family("qwen2_vl", build=lambda attn: tiny_qwen2_vl(attn), inputs=lambda m, b, s: qwen_inputs(m, batch=b, seed=s),
           tokens_per_unit=16, row=split_row),
    Family("qwen2_5_vl", build=lambda attn: tiny_qwen2_5_vl(attn),
           inputs=lambda m, b, s: qwen_inputs(m, batch=b, seed=s), tokens_per_unit=16, row=split_row,
           heavy_cases=HEAVY_2_5),
]
