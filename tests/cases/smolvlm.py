"""SmolVLM / Idefics3 families (``SmolVLMForConditionalGeneration``, ``Idefics3ForConditionalGeneration``: one adapter,
two model classes with their own tower / connector modules and their own geometry): SigLIP-style tower (no CLS:
mean-query scores). SmolVLM: 12 x 12 patches pixel-shuffled (3) to 4 x 4 = 16 tokens per sub-image; Idefics3:
8 x 8 patches shuffled (2) to the same 4 x 4 (so each method's budgets mean the same on both). The batch mixes a
1 x 2 split, an unsplit image and a 2 x 1 split (+ global views), so rows hold 3, 1 and 3 sub-images (zero-padded
pixel_values with pixel_attention_mask) and structural text tokens between the sub-images. Every case of every
other file runs on both (CLS-only cases are restricted to CLS families; on these towers they are refused at attach:
tests/test_smolvlm.py); budgets count tokens per sub-image.

Time: a forward runs the tower on every sub-image (7 in the batch of 3), so the expensive invariants (detach, decode
consistency, batch = single) run a representative subset; identity, sdpa = eager and budgets run every case.
SmolVLM (``HEAVY``): every kind of vision-side output (pruned, merged with received-attention weights, downsampled
grid, content-adaptive counts per sub-image under a per-image budget, a 2025 diversity selection) and of LLM-side
stage (one cut, text queries, multi-cut schedules, merging, TransPrune's token transitions). Idefics3
(``HEAVY_IDEFICS3``): what differs from SmolVLM is the model class (Idefics3's own modules and its padding rule: no
empty image kept) and the shuffle factor (2), which only the vision side sees, so its subset is the vision-side
outputs that read the shuffled geometry or the tower scores mapped through it (pruned, downsampled grid, merged
with received-attention weights, per-image adaptive counts) plus one LLM-side cut and one multi-cut schedule."""

from matrix import Family
from tiny_models_smolvlm import smolvlm_inputs, tiny_smolvlm

HEAVY = ("random-vision", "downsample", "visionzip-per-image", "pool-cluster-received", "divprune", "random-llm",
         "fastv-text", "pdrop", "pact", "transprune")
HEAVY_IDEFICS3 = ("random-vision", "downsample", "visionzip-per-image", "pool-cluster-received", "fastv-text", "pdrop")

FAMILIES = [
    Family("smolvlm", build=lambda attn: tiny_smolvlm(attn), inputs=lambda m, b, s: smolvlm_inputs(m, batch=b, seed=s),
           tokens_per_unit=16, heavy_cases=HEAVY),
    Family("idefics3", build=lambda attn: tiny_smolvlm(attn, idefics3=True),
           inputs=lambda m, b, s: smolvlm_inputs(m, batch=b, seed=s), tokens_per_unit=16, heavy_cases=HEAVY_IDEFICS3),
]
