"""Qwen3-VL family: DeepStack levels added after LLM layers 0-2 (so LLM-side stages at layers 1 and 2 prune while
DeepStack input still arrives, and every vision-side stage reduces the levels alike), interleaved M-RoPE, merged
2x2 tokens. Rows carry images of 8x8, 6x8 and 8x6 patches (16, 12, 12 merged tokens), left-padded; every case of
every other file runs on it. Video with timestamps and the MoE build are covered in tests/test_qwen3_vl.py."""

from matrix import Family
from tiny_models_qwen3 import qwen3_inputs, split_row3, tiny_qwen3_vl

FAMILIES = [
    Family("qwen3_vl", build=lambda attn: tiny_qwen3_vl(attn), inputs=lambda m, b, s: qwen3_inputs(m, batch=b, seed=s),
           tokens_per_unit=16, row=split_row3),
]
