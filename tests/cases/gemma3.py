"""Gemma 3 family: SigLIP 8 x 8 patches pooled to 4 x 4 = 16 tokens per image, bidirectional attention among an
image's tokens (token_type_ids), sliding-window layers (window 8) mixed with a full-attention layer, so LLM-side
stages at layers 1-3 prune sliding and full layers and decoding runs past the window. Every case of every other
file runs on it (CLS-only cases are restricted to CLS families)."""

from matrix import Family
from tiny_models_gemma3 import gemma3_inputs, gemma3_row, tiny_gemma3

FAMILIES = [
    Family("gemma3", build=lambda attn: tiny_gemma3(attn), inputs=lambda m, b, s: gemma3_inputs(m, batch=b, seed=s),
           tokens_per_unit=16, row=gemma3_row),
]
