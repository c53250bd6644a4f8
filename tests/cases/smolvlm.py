"""SmolVLM family (``SmolVLMForConditionalGeneration``; Idefics3 shares the adapter and is checked in
tests/test_smolvlm.py): SigLIP-style tower (no CLS: mean-query scores), 12 x 12 patches pixel-shuffled (3) to 4 x 4 =
16 tokens per sub-image; the batch mixes a 1 x 2 split, an unsplit image and a 2 x 1 split (+ global views), so
rows hold 3, 1 and 3 sub-images (zero-padded pixel_values with pixel_attention_mask) and structural text tokens
between the sub-images. Every case of every other file runs on it (CLS-only cases are restricted to CLS
families); budgets count tokens per sub-image.

Time: a SmolVLM forward runs the tower on every sub-image (7 in the batch of 3), so the expensive invariants
(detach, decode consistency, batch = single) run a representative subset (``HEAVY``): every kind of vision-side
output (pruned, merged with received-attention weights, downsampled grid, content-adaptive counts per sub-image
under a per-image budget, a 2025 diversity selection) and of LLM-side stage (one cut, text queries, multi-cut
schedules, merging, TransPrune's token transitions); identity, sdpa = eager and budgets run every case."""

from matrix import Family
from tiny_models_smolvlm import smolvlm_inputs, tiny_smolvlm

HEAVY = ("random-vision", "downsample", "visionzip-per-image", "pool-cluster-received", "divprune", "random-llm",
         "fastv-text", "pdrop", "pact", "transprune")

FAMILIES = [
    Family("smolvlm", build=lambda attn: tiny_smolvlm(attn), inputs=lambda m, b, s: smolvlm_inputs(m, batch=b, seed=s),
           tokens_per_unit=16, heavy_cases=HEAVY),
]
