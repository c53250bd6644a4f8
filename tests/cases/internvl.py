"""InternVL family: InternViT tiles of 8 x 8 patches pixel-shuffled to 4 x 4 = 16 tokens, the batch's first image
tiled 1 x 2 + the thumbnail (48 tokens), the others one tile each; scores are the mean-query attention (InternViT's
CLS row is not used: CLS-only cases are restricted to CLS families). Every case of every other file runs on it;
budgets count tokens per tile. Tiling, shuffle mapping and processor prompts: tests/test_internvl.py."""

from matrix import Family
from tiny_models_internvl import PER_TILE, internvl_inputs, internvl_row, tiny_internvl

FAMILIES = [
    Family("internvl", build=lambda attn: tiny_internvl(attn),
           inputs=lambda m, b, s: internvl_inputs(m, batch=b, seed=s), tokens_per_unit=PER_TILE, row=internvl_row),
]
