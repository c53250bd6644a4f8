"""Gemma 3 (``Gemma3ForConditionalGeneration``): SigLIP tower, 4x4 average pooling, bidirectional image attention,
sliding-window layers.

What the model does (transformers 5.24): the SigLIP tower gives a ``P x P`` patch grid (896 px / 14 = 64 x 64) per
image; the projector average-pools it with a ``k x k`` kernel to ``mm_tokens_per_image`` tokens (16 x 16 = 256),
applies an RMS norm and one linear map. The prompt holds ``<start_of_image>``, 256 ``image_token_id`` placeholders,
``<end_of_image>``; ``token_type_ids`` (1 at placeholders) make the image tokens of one image attend to each other
**bidirectionally**. Decoder layers alternate sliding-window (local RoPE) and full-attention (global RoPE) layers
with a hybrid cache (sliding layers keep only the last ``sliding_window - 1`` entries); q and k are RMS-normed per
head before RoPE.

- **Units.** One image = one ``Grid(t, t)`` of the pooled tokens (``t^2 = mm_tokens_per_image``). Vision-side
  features are the pooled tower features *before* the projector's norm and linear map (``project`` = norm + map,
  per token), so ``feature_space: vision`` is the pooled SigLIP space. Scores (no CLS: ``received_attention``
  from the last block's mean query) and keys are computed on the ``P x P`` patches and average-pooled with the
  projector's own kernel: a pooled token's score is the mean of its k x k patches' scores (exact, no resampling).
- **Vision side.** The rebuilt prompt has k placeholders per image and its ``token_type_ids`` are rebuilt from
  them, so the k survivors attend to each other bidirectionally, as the processor's prompt for k tokens would.
- **LLM side.** Prefill: the runtime slices the model's own masks (bidirectional block and sliding window by
  original position) to the survivors. Decode: survivors keep their positions; the masks of pruned layers are
  built from positions (causal, and ``pos > q - sliding_window`` on sliding layers) over exactly the entries each
  layer's cache holds (a sliding layer keeps its last ``sliding_window - 1`` entries, which always include every
  survivor inside the window), instead of the model's masks, which are sized against the first cache layer of
  each type and would not line up with a pruned layer.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.nn import functional as F

from ..errors import ConfigError
from ..layout import Grid
from ..methods.base import VisionExtras
from . import register_adapter
from .base import TokenMap, VisualGroup, precomputed_counts
from .llava import LlavaAdapter
from .vision_towers import TowerScorer

__all__ = ["Gemma3Adapter", "pool_patches"]


def pool_patches(x: torch.Tensor, side: int, kernel: int) -> torch.Tensor:
    """(U, side^2[, d]) per-patch values -> (U, (side/kernel)^2[, d]) by the projector's k x k average pooling."""
    squeeze = x.dim() == 2
    y = x[..., None] if squeeze else x
    U, _, d = y.shape
    y = F.avg_pool2d(y.float().transpose(1, 2).reshape(U, d, side, side), kernel, kernel).flatten(2).transpose(1, 2)
    return y[..., 0] if squeeze else y


@register_adapter
class Gemma3Adapter(LlavaAdapter):
    family = "gemma3"
    model_class_names = ("Gemma3ForConditionalGeneration",)
    vision_only_keys = ()
    decode_masks_from_positions = True
    feeds_mm_encoder_outputs = True  # the rebuilt prompt (prompt_kwargs; 5.17: through get_image_features)

    # ---- geometry ---------------------------------------------------------------------------------------------
    @property
    def _proj(self):
        return self.inner.multi_modal_projector

    @property
    def pooled_side(self) -> int:
        return int(self._proj.tokens_per_side)

    def _tokens_per_image(self) -> int:
        return int(self.model.config.mm_tokens_per_image)

    def tokens_per_image(self, kwargs: dict) -> list[int] | None:
        pv = kwargs.get("pixel_values")
        if pv is None:
            return precomputed_counts(kwargs, "image")
        return [self._tokens_per_image()] * pv.shape[0]

    def unit_layouts(self, kwargs: dict, image: int):
        return [Grid(self.pooled_side, self.pooled_side)]

    def vision_extras_available(self) -> frozenset[str]:
        return frozenset({"received_attention", "keys"})

    # ---- LLM side ----------------------------------------------------------------------------------------------
    def embed_tokens(self, input_ids: torch.Tensor) -> torch.Tensor:
        """The model's scaled embedding; an out-of-vocabulary image id reads as id 0, as in the model."""
        vocab = self.text_config.vocab_size
        return super().embed_tokens(torch.where(input_ids >= vocab, torch.zeros_like(input_ids), input_ids))

    def sliding_window(self, layer_idx: int) -> int | None:
        return getattr(self.decoder_layers()[layer_idx].self_attn, "sliding_window", None)

    def project_qk(self, layer_idx: int, hidden_states: torch.Tensor, position_embeddings: Any,
                   query_rows: torch.Tensor | None = None, *, query_states: torch.Tensor | None = None,
                   rope: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """As the base (which applies Gemma 3's per-head RMS norm of q and k before RoPE); soft-capped attention
        logits are refused."""
        if self.decoder_layers()[layer_idx].self_attn.attn_logit_softcapping is not None:
            raise ConfigError("gemma3: attention scores with attn_logit_softcapping are not supported")
        return super().project_qk(layer_idx, hidden_states, position_embeddings, query_rows,
                                  query_states=query_states, rope=rope)

    def prompt_kwargs(self, prompt, kwargs: dict) -> dict:
        """A rebuilt prompt is fed as ids + the reduced features (``mm_encoder_outputs``, which the model scatters
        into its placeholders; on transformers 5.17 vtc feeds them through the base model's ``get_image_features``,
        :mod:`vtc.runtime.feed`), because Gemma 3's ``generate`` does not take ``inputs_embeds``; its token_type_ids
        are 1 at the kept placeholders."""
        from transformers.modeling_outputs import BaseModelOutputWithPooling

        vis = prompt.token_map.is_visual
        out = {"input_ids": prompt.input_ids,
               "mm_encoder_outputs": {"image": BaseModelOutputWithPooling(pooler_output=prompt.inputs_embeds[vis])}}
        if kwargs.get("token_type_ids") is not None:
            out["token_type_ids"] = vis.long()
        return out

    # ---- vision side -------------------------------------------------------------------------------------------
    def encode_images(self, kwargs: dict) -> list[VisualGroup]:
        tower = self.vision_tower
        pv = kwargs["pixel_values"].to(dtype=next(tower.parameters()).dtype)
        out = tower(pixel_values=pv, output_hidden_states=True, return_dict=True)
        feats = out.last_hidden_state  # what the model feeds its projector
        U, n, D = feats.shape
        side, kernel = int(self._proj.patches_per_image), int(self._proj.kernel_size)
        if n != side * side:
            raise ConfigError(f"gemma3: the tower gives {n} patches, the projector expects {side}x{side}")
        pooled = self._proj.avg_pool(feats.transpose(1, 2).reshape(U, D, side, side).contiguous())
        pooled = pooled.flatten(2).transpose(1, 2)
        scorer = TowerScorer(tower, out.hidden_states, -1, has_cls=False, drop_cls=False)
        extras = VisionExtras(received_attention=lambda: pool_patches(scorer.received_attention(), side, kernel),
                              keys=lambda: pool_patches(scorer.keys(), side, kernel))
        return [VisualGroup(pooled, Grid(self.pooled_side, self.pooled_side), list(range(U)), [0] * U, extras)]

    def project(self, features: torch.Tensor) -> torch.Tensor:
        """The projector after its pooling: RMS norm, then the linear map (per token)."""
        normed = self._proj.mm_soft_emb_norm(features)
        return torch.matmul(normed, self._proj.mm_input_projection_weight).type_as(features)

    def token_map(self, input_ids: torch.Tensor, kwargs: dict) -> TokenMap:
        return TokenMap.from_placeholders(self.placeholder_mask(input_ids), self.tokens_per_image(kwargs))
