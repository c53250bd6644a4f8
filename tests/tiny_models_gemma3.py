"""Tiny random-weight Gemma 3 models and inputs, built from configs in code (no downloads).

Tower: SigLIP, 32 px images of 4 px patches -> 8 x 8 patches, average-pooled 2 x 2 by the projector to 4 x 4 = 16
tokens per image (``mm_tokens_per_image``; the real model: 64 x 64 -> 16 x 16). LM: 4 layers, sliding, sliding,
full, sliding (the real 5:1 pattern, shortened) with a sliding window of 8 positions, so prompts (~30 tokens) and
decoding run past the window. Prompts look like the processor's: ``<start_of_image>``, placeholders,
``<end_of_image>``, with ``token_type_ids`` 1 at the placeholders (bidirectional attention among them).
"""

from __future__ import annotations

import torch
from tiny_models import PAD, VOCAB, build_model, left_pad

IMAGE = 120
BOI = 121
EOI = 122
EOS = 2
SUPPRESS = [IMAGE, BOI, EOI, EOS]
SIZE = 32
PATCH = 4
TOKENS = 16
WINDOW = 8


def tiny_gemma3(attn: str = "sdpa", seed: int = 0, window: int = WINDOW, layers: int = 4):
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration, Gemma3TextConfig, SiglipVisionConfig

    torch.manual_seed(seed)
    vision = SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                image_size=SIZE, patch_size=PATCH, vision_use_head=False)
    text = Gemma3TextConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                            num_attention_heads=4, num_key_value_heads=2, head_dim=16, query_pre_attn_scalar=16,
                            sliding_window=window, max_position_embeddings=512, pad_token_id=PAD, eos_token_id=EOS,
                            bos_token_id=1, rms_norm_eps=1e-6,
                            layer_types=[("full_attention" if i % 3 == 2 else "sliding_attention")
                                         for i in range(layers)])
    cfg = Gemma3Config(text_config=text, vision_config=vision, mm_tokens_per_image=TOKENS, image_token_index=IMAGE,
                       boi_token_index=BOI, eoi_token_index=EOI)
    model = build_model(Gemma3ForConditionalGeneration, cfg, attn)
    with torch.no_grad():  # the stock init leaves the projection at zero: image tokens would all be equal
        model.model.multi_modal_projector.mm_input_projection_weight.normal_(0, 0.2)
    model.generation_config.suppress_tokens = SUPPRESS
    return model


def gemma3_inputs(model, batch: int = 1, seed: int = 0, images_per_row: int = 1, post: int = 4) -> dict:
    """Left-padded prompts [text, (<boi>, 16 placeholders, <eoi>, text) x images_per_row, text] with
    token_type_ids; rows differ in length."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for b in range(batch):
        parts = [torch.randint(3, 100, (2 + b % 2,), generator=g)]
        for _ in range(images_per_row):
            parts += [torch.tensor([BOI]), torch.full((TOKENS,), IMAGE), torch.tensor([EOI]),
                      torch.randint(3, 100, (1,), generator=g)]
        parts.append(torch.randint(3, 100, (post + 2 * b,), generator=g))
        rows.append(torch.cat(parts))
    ids, mask = left_pad(rows)
    return {"input_ids": ids, "attention_mask": mask, "token_type_ids": (ids == IMAGE).long(),
            "pixel_values": torch.randn(batch * images_per_row, 3, SIZE, SIZE, generator=g)}


def gemma3_row(inputs: dict, b: int) -> dict:
    """Sample b of a padded batch as an unpadded batch of one (token_type_ids unpadded like the ids)."""
    keep = inputs["attention_mask"][b].bool()
    n = inputs["input_ids"].shape[0]
    per_row = inputs["pixel_values"].shape[0] // n
    row = {k: v[b:b + 1][:, keep] for k, v in inputs.items() if k in ("input_ids", "attention_mask", "token_type_ids")}
    row["pixel_values"] = inputs["pixel_values"][b * per_row:(b + 1) * per_row]
    return row
