"""LLaVA-OneVision family: SigLIP tower (no CLS: mean-query scores), 48 px crops of 6 x 6 tokens, anyres_max_1 so
the model's bilinear shrink of the crop map is exercised (30 x 90: 4 x 12 -> 3 x 10); the batch mixes 1x2 and 2x1
crop grids, left-padded. Every case of every other file runs on it (CLS-only cases are restricted to CLS
families); budgets count tokens per crop. Video and multi-image rows: tests/test_llava_onevision.py."""

from matrix import Family
from tiny_models_onevision import onevision_inputs, tiny_onevision

FAMILIES = [
    Family("llava_onevision", build=lambda attn: tiny_onevision(attn),
           inputs=lambda m, b, s: onevision_inputs(m, batch=b, seed=s), tokens_per_unit=36),
]
