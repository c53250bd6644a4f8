"""Tiny random-weight Mistral 3 models and inputs, built from configs in code (no downloads).

Tower: Pixtral (2D RoPE, block-diagonal attention between the images of a call), 4 px patches, 2x2 patch merger,
so one token per 8 x 8 px; images keep their own size: 32 x 48 px -> 8 x 12 patches -> 4 x 6 tokens, 40 x 32 ->
5 x 4, 24 x 40 -> 3 x 5 (the real model: 14 px patches, up to 1540 px). ``pixel_values`` are padded to the
largest image of the call and ``image_sizes`` give each image's own size, as the processor does. Prompts look
like the processor's: per image ``([IMG] * w + [IMG_BREAK]) * h`` with the last break replaced by ``[IMG_END]``.
LM: Mistral, 4 layers, 1D RoPE.
"""

from __future__ import annotations

import torch
from tiny_models import PAD, VOCAB, build_model, left_pad

IMAGE = 120
BREAK = 121
END = 122
EOS = 2
SUPPRESS = [IMAGE, BREAK, END, EOS]
PATCH = 4
CELL = 8  # px per merged token (patch 4 x merge 2)
SIZES = [(32, 48), (40, 32), (24, 40)]  # (H, W) of the images of rows 0, 1, 2 (4 x 6, 5 x 4, 3 x 5 tokens)


def _pixtral_and_mistral(patch: int, layers: int):
    """(vision, text) configs: a 2-block Pixtral tower of ``patch`` px patches and a tiny Mistral LM."""
    from transformers import MistralConfig, PixtralVisionConfig

    vision = PixtralVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                 head_dim=8, patch_size=patch, image_size=64)
    text = MistralConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=512,
                         pad_token_id=PAD, eos_token_id=EOS, bos_token_id=1, rms_norm_eps=1e-6, sliding_window=None)
    return vision, text


def tiny_mistral3(attn: str = "sdpa", seed: int = 0, layers: int = 4, sep_ids_in_config: bool = False):
    from transformers import Mistral3Config, Mistral3ForConditionalGeneration

    torch.manual_seed(seed)
    vision, text = _pixtral_and_mistral(PATCH, layers)
    extra = {"image_break_token_id": BREAK, "image_end_token_id": END} if sep_ids_in_config else {}
    cfg = Mistral3Config(vision_config=vision, text_config=text, image_token_index=IMAGE, spatial_merge_size=2,
                         vision_feature_layer=-1, **extra)
    model = build_model(Mistral3ForConditionalGeneration, cfg, attn)
    with torch.no_grad():  # the stock init (std 0.02) makes every image token nearly the same vector
        proj = model.model.multi_modal_projector
        for lin in (proj.patch_merger.merging_layer, proj.linear_1, proj.linear_2):
            lin.weight.normal_(0, 0.1)
    model.generation_config.suppress_tokens = SUPPRESS
    return model


def image_prompt(H: int, W: int) -> torch.Tensor:
    """The processor's tokens for an image of H x W px (multiples of 8)."""
    h, w = H // CELL, W // CELL
    row = [IMAGE] * w
    return torch.tensor((row + [BREAK]) * (h - 1) + row + [END])


def mistral3_inputs(model, batch: int = 1, seed: int = 0, images_per_row: int = 1, post: int = 4,
                    sizes: list[tuple[int, int]] | None = None) -> dict:
    """Left-padded prompts [text, (image, text) x images_per_row, text]; row b's images have sizes SIZES[b % 3] (or
    ``sizes``, one per image); rows differ in length and image size."""
    g = torch.Generator().manual_seed(seed)
    n = batch * images_per_row
    sizes = list(sizes) if sizes is not None else [SIZES[(i // images_per_row) % len(SIZES)] for i in range(n)]
    rows = []
    for b in range(batch):
        parts = [torch.randint(3, 100, (2 + b % 2,), generator=g)]
        for i in range(images_per_row):
            parts += [image_prompt(*sizes[b * images_per_row + i]), torch.randint(3, 100, (1,), generator=g)]
        parts.append(torch.randint(3, 100, (post + 2 * b,), generator=g))
        rows.append(torch.cat(parts))
    ids, mask = left_pad(rows)
    Hm, Wm = max(s[0] for s in sizes), max(s[1] for s in sizes)
    pv = torch.zeros(n, 3, Hm, Wm)
    for i, (H, W) in enumerate(sizes):
        pv[i, :, :H, :W] = torch.randn(3, H, W, generator=g)
    return {"input_ids": ids, "attention_mask": mask, "pixel_values": pv, "image_sizes": torch.tensor(sizes)}


def tiny_pixtral_llava(attn: str = "sdpa", seed: int = 0, layers: int = 4):
    """Pixtral 12B's layout (``LlavaForConditionalGeneration`` + Pixtral tower, no merger): 8 px patches, so one
    token per 8 x 8 px as above and the same prompts; LLaVA's MLP projector on every patch."""
    from transformers import LlavaConfig, LlavaForConditionalGeneration

    torch.manual_seed(seed)
    vision, text = _pixtral_and_mistral(CELL, layers)
    cfg = LlavaConfig(vision_config=vision, text_config=text, image_token_id=IMAGE, vision_feature_layer=-1,
                      vision_feature_select_strategy="full")
    model = build_model(LlavaForConditionalGeneration, cfg, attn)
    with torch.no_grad():
        for lin in (model.model.multi_modal_projector.linear_1, model.model.multi_modal_projector.linear_2):
            lin.weight.normal_(0, 0.1)
    model.generation_config.suppress_tokens = SUPPRESS
    return model
