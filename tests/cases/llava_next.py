"""LLaVA-NeXT (anyres) family: 48 px crops of 6 x 6 tokens; the batch mixes 1x2 and 2x1 crop grids, with and
without unpadding, left-padded. Every case of every other file runs on it; budgets count tokens per crop."""

from matrix import Family
from tiny_models_next import next_inputs, tiny_llava_next

FAMILIES = [
    Family("llava_next", build=lambda attn: tiny_llava_next(attn),
           inputs=lambda m, b, s: next_inputs(m, batch=b, seed=s), tokens_per_unit=36),
]
