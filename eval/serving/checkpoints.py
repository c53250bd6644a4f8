"""Tiny checkpoints vLLM can load (weights + processor saved together), for the vLLM tests and the serving benchmark.

- the bundled demo model (``vtc/assets/tiny-llava``): LLaVA-1.5 with a CLIP tower, used as is;
- :func:`save_tiny_llava_next`: a random-weight LLaVA-NeXT (anyres) at the demo model's tower and LLM shape, with a
  ``LlavaNextProcessor`` over the demo tokenizer. vLLM's CPU attention kernels need head_dim in 32 / 64 / 80 / ...,
  so the LLM keeps the demo's head_dim 64.
"""

from __future__ import annotations

from pathlib import Path

import torch

from vtc.demo import GRID_MODEL_PATH

__all__ = ["save_tiny_llava_next", "GRID_MODEL_PATH"]


def save_tiny_llava_next(path: str | Path, *, crop: int = 48, patch: int = 8, vision_hidden: int = 32,
                         text_hidden: int = 128, text_layers: int = 2, heads: int = 2, kv_heads: int = 1,
                         pinpoints=((48, 48), (48, 96), (96, 48), (96, 96)), seed: int = 0):
    """Save a random-weight ``LlavaNextForConditionalGeneration`` + processor to ``path``; returns (model, processor).

    Defaults: 48 px crops of 8 px patches (6 x 6 per crop), 1..4 crops + base, a 2-layer LLM with head_dim 64."""
    from transformers import (
        AutoTokenizer,
        CLIPVisionConfig,
        LlamaConfig,
        LlavaNextConfig,
        LlavaNextForConditionalGeneration,
        LlavaNextImageProcessor,
        LlavaNextProcessor,
    )

    tok = AutoTokenizer.from_pretrained(GRID_MODEL_PATH)  # "<image>" and the demo's small vocabulary
    torch.manual_seed(seed)
    vision = CLIPVisionConfig(hidden_size=vision_hidden, intermediate_size=4 * vision_hidden, num_hidden_layers=3,
                              num_attention_heads=4, image_size=crop, patch_size=patch, projection_dim=vision_hidden)
    text = LlamaConfig(hidden_size=text_hidden, intermediate_size=2 * text_hidden, num_hidden_layers=text_layers,
                       num_attention_heads=heads, num_key_value_heads=kv_heads, vocab_size=len(tok),
                       max_position_embeddings=2048, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
                       rms_norm_eps=1e-6)
    cfg = LlavaNextConfig(vision_config=vision, text_config=text, image_token_id=tok.convert_tokens_to_ids("<image>"),
                          vision_feature_layer=-2, vision_feature_select_strategy="default",
                          image_grid_pinpoints=[list(p) for p in pinpoints])
    model = LlavaNextForConditionalGeneration(cfg).eval()
    model.generation_config.eos_token_id = tok.eos_token_id
    model.generation_config.pad_token_id = tok.pad_token_id
    image_processor = LlavaNextImageProcessor(size={"shortest_edge": crop}, crop_size={"height": crop, "width": crop},
                                              image_grid_pinpoints=[list(p) for p in pinpoints])
    processor = LlavaNextProcessor(image_processor=image_processor, tokenizer=tok, patch_size=patch,
                                   vision_feature_select_strategy="default", image_token="<image>",
                                   num_additional_image_tokens=1)
    path = Path(path)
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return model, processor
