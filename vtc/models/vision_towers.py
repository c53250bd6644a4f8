"""Flash-compatible scores from ViT-style vision towers (CLIP, SigLIP) in transformers.

The tower runs with its own attention backend (sdpa / flash). From the hidden states it already returns, we
re-project only what a score needs at the layer that produces the features the model takes
(``vision_feature_layer``): the CLS query row (or one mean query) against all keys. Never N x N, never
``output_attentions``, no patching of the tower's classes.
"""

from __future__ import annotations

from functools import cached_property

import torch
from torch import nn

from ..errors import ConfigError
from ..methods.base import VisionExtras

__all__ = ["TowerScorer", "encoder_layers"]


def encoder_layers(tower: nn.Module) -> nn.ModuleList:
    """The transformer blocks of a CLIP / SigLIP vision tower, whatever the transformers version's nesting."""
    for path in ("encoder.layers", "vision_model.encoder.layers"):
        obj = tower
        try:
            for part in path.split("."):
                obj = getattr(obj, part)
        except AttributeError:
            continue
        return obj
    raise ConfigError(
        f"cannot find the attention layers of vision tower {type(tower).__name__} (looked for encoder.layers)"
    )


class TowerScorer:
    """Lazily computed scoring tensors of one tower forward.

    hidden_states: the tower's tuple of hidden states (embeddings, then each layer's output);
    feature_layer: the index into it the model takes features from (int; for a list the last one is used);
    has_cls: whether token 0 is a CLS token; drop_cls: whether the model drops it from the fed features.
    """

    def __init__(self, tower: nn.Module, hidden_states: tuple[torch.Tensor, ...], feature_layer: int | list[int],
                 has_cls: bool, drop_cls: bool) -> None:
        self.tower = tower
        self.hidden_states = hidden_states
        layer = feature_layer if isinstance(feature_layer, int) else feature_layer[-1]
        n_states = len(hidden_states)
        layer = layer + n_states if layer < 0 else layer
        if layer < 1:
            raise ConfigError(f"vision_feature_layer={feature_layer} selects the embeddings; no attention to score")
        self.feature_index = layer
        self.block = encoder_layers(tower)[layer - 1]
        self.has_cls = has_cls
        self.drop_cls = drop_cls

    @cached_property
    def _qk(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(normed input x (U, N, D), keys (U, h, N, d), q-proj module) of the scoring block."""
        x = self.hidden_states[self.feature_index - 1]
        attn = self.block.self_attn
        xn = self.block.layer_norm1(x)
        U, N, _ = xn.shape
        k = attn.k_proj(xn).view(U, N, attn.num_heads, attn.head_dim).transpose(1, 2)
        return xn, k, attn

    def _probs(self, q_in: torch.Tensor) -> torch.Tensor:
        """Attention probs (U, h, N) of one query row per unit given its normed input (U, D)."""
        xn, k, attn = self._qk
        U = xn.shape[0]
        q = attn.q_proj(q_in).view(U, attn.num_heads, 1, attn.head_dim)
        logits = torch.matmul(q.float(), k.float().transpose(-1, -2)).squeeze(2) * attn.scale
        return logits.softmax(-1)

    def _fed(self, t: torch.Tensor) -> torch.Tensor:
        """Restrict (U, N, ...) to the tokens the model feeds (drops CLS when the model does)."""
        return t[:, 1:] if (self.has_cls and self.drop_cls) else t

    def cls_attention(self) -> torch.Tensor:
        """(U, n) CLS-row attention summed over heads (VisionZip's dominant score)."""
        if not self.has_cls:
            raise ConfigError("this vision tower has no CLS token; use received_attention")
        xn, _, _ = self._qk
        return self._fed(self._probs(xn[:, 0]).sum(1))

    def received_attention(self) -> torch.Tensor:
        """(U, n) attention each token receives from the mean query (PACT's EUTI idea; towers without CLS)."""
        xn, _, _ = self._qk
        return self._fed(self._probs(xn.mean(1)).mean(1))

    def keys(self) -> torch.Tensor:
        """(U, n, d) keys of the scoring block averaged over heads (VisionZip's merge metric)."""
        _, k, _ = self._qk
        return self._fed(k.mean(1))

    def hidden_with_cls(self) -> torch.Tensor:
        return self.hidden_states[self.feature_index]

    def cls_token(self) -> torch.Tensor:
        if not self.has_cls:
            raise ConfigError("this vision tower has no CLS token")
        return self.hidden_states[self.feature_index][:, 0]

    def as_vision_extras(self) -> VisionExtras:
        return VisionExtras(
            cls_attention=self.cls_attention if self.has_cls else None,
            received_attention=self.received_attention,
            keys=self.keys,
            cls_token=self.cls_token if self.has_cls else None,
            hidden_with_cls=self.hidden_with_cls if self.has_cls else None,
        )
