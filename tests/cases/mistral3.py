"""Mistral 3 family: Pixtral tower (no CLS: mean-query scores per image, 2D RoPE, block-diagonal attention), 2x2
patch merger, variable image sizes (rows of a batch: 4 x 6, 5 x 4, 3 x 5 merged tokens, left-padded prompts), an
[IMG_BREAK] after every row and [IMG_END] after the last (protected: never pruned or counted). Every case of every
other file runs on it (CLS-only cases are restricted to CLS families); budgets count merged tokens per image.
Structural tokens, packing, processor prompts and the round trip: tests/test_mistral3.py."""

from matrix import Family
from tiny_models_mistral3 import mistral3_inputs, tiny_mistral3

FAMILIES = [
    Family("mistral3", build=lambda attn: tiny_mistral3(attn),
           inputs=lambda m, b, s: mistral3_inputs(m, batch=b, seed=s), tokens_per_unit=None),
]
