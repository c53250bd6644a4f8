"""Gemma 3 family: SigLIP 8 x 8 patches pooled to 4 x 4 = 16 tokens per image, bidirectional attention among an
image's tokens (token_type_ids), sliding-window layers (window 8) mixed with a full-attention layer, so LLM-side
stages at layers 1-3 prune sliding and full layers and decoding runs past the window. Every case of every other
file runs on it (CLS-only cases are restricted to CLS families).

Time: identity, sdpa = eager and budgets run every case; the expensive invariants (detach, decode consistency,
batch = single) run a representative subset (``HEAVY``): what is Gemma-specific is the LLM side (the bidirectional
image block and the sliding-window hybrid cache under pruning), so it keeps the LLM-side kinds of cut (one layer,
text-query scores, multi-cut schedules across sliding and full layers, merges, DART's pivots, SparseVLM's recycling)
and each kind of vision-side ``Reduction`` once (pruned, downsampled grid, per-image VisionZip merges, weighted
windows, clusters, a diversity selection, projector-space scores)."""

from matrix import Family
from tiny_models_gemma3 import gemma3_inputs, gemma3_row, tiny_gemma3

HEAVY = ("random-vision", "downsample", "visionzip-per-image", "pool-attn", "pool-cluster-received", "divprune",
         "fastervlm", "random-llm", "fastv", "fastv-text", "pdrop", "pact", "pact-dbdpc", "dart", "transprune",
         "sparsevlm")

FAMILIES = [
    Family("gemma3", build=lambda attn: tiny_gemma3(attn), inputs=lambda m, b, s: gemma3_inputs(m, batch=b, seed=s),
           tokens_per_unit=16, row=gemma3_row, heavy_cases=HEAVY),
]
