"""Flash-compatible scores from ViT-style vision towers (CLIP, SigLIP in transformers; timm ViTs in
:mod:`vtc.models.timm_tower`).

The tower runs with its own attention backend (sdpa / flash-attn); nothing about it is changed. From the hidden
state that *enters* the block producing the features the model takes (``vision_feature_layer``) we re-project
only what a score needs, for that block only:

- ``cls_attention`` (U, n): the CLS query row of that block's attention, **summed over heads** (VisionZip's
  dominant score, Yang et al., CVPR 2025): ``sum_h softmax_j(q_cls,h . k_j,h * scale)``.
- ``received_attention`` (U, n): the attention each token receives from one **mean query** (the mean of the
  block's query rows, as PACT's EUTI does; towers without CLS), averaged over heads:
  ``mean_h softmax_j(mean_i(q_i,h) . k_j,h * scale)``.
- ``keys`` (U, n, d): that block's keys averaged over heads (VisionZip's merge metric).

Cost: one (or two) query rows per head against N keys, plus one key projection of the block: O(N * D) memory,
never N x N, never ``output_attentions``, no patching of any class. The softmax runs over *all* N tokens of the
block (CLS and register tokens included, as in the model); the result is then restricted to the tokens the
model feeds (the CLS column is dropped when the model drops CLS).
"""

from __future__ import annotations

from functools import cached_property

import torch
from torch import nn

from ..errors import ConfigError
from ..methods.base import VisionExtras

__all__ = ["QKRowScorer", "TowerScorer", "encoder_layers", "scorer_extras"]


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
        f"cannot find the attention layers of vision tower {type(tower).__name__} "
        "(looked for encoder.layers and vision_model.encoder.layers)"
    )


class QKRowScorer:
    """Shared maths of the tower scorers: a few recomputed query rows of one block against all its keys.

    Subclasses provide ``block_input`` (U, N, D) (the block's input, before its pre-attention norm), ``_norm``,
    ``_queries(xn_rows (U, R, D)) -> (U, h, R, d)``, ``_keys(xn (U, N, D)) -> (U, h, N, d)`` and ``scale``.
    ``fed`` selects the tokens the model feeds (e.g. ``slice(1, None)`` when CLS is dropped); ``has_cls`` says
    whether token 0 is a CLS token.
    """

    has_cls: bool = False
    fed: slice = slice(None)
    scale: float = 1.0

    # -- to implement ------------------------------------------------------------------------------------------
    @property
    def block_input(self) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def _norm(self, x: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def _queries(self, xn_rows: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def _keys(self, xn: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    # -- shared -----------------------------------------------------------------------------------------------
    @cached_property
    def _normed(self) -> torch.Tensor:
        return self._norm(self.block_input)

    @cached_property
    def _k(self) -> torch.Tensor:
        return self._keys(self._normed)

    def row_probs(self, xn_rows: torch.Tensor | None = None, q: torch.Tensor | None = None) -> torch.Tensor:
        """fp32 attention probabilities (U, h, R, N) of query rows, given in the block's normed input space
        (``xn_rows`` (U, R, D)) or as queries (``q`` (U, h, R, d))."""
        if q is None:
            q = self._queries(xn_rows)
        logits = torch.matmul(q.float(), self._k.float().transpose(-1, -2)) * self.scale
        return logits.softmax(-1)

    def mean_query(self) -> torch.Tensor:
        """(U, h, 1, d) the mean of the block's query rows. The query map is affine here, so it is the query of
        the mean input (one row); subclasses with a non-linear query map (qk-norm) average the real rows."""
        return self._queries(self._normed.mean(1, keepdim=True))

    def cls_attention(self) -> torch.Tensor:
        """(U, n) CLS-row attention summed over heads, restricted to the fed tokens."""
        if not self.has_cls:
            raise ConfigError("this vision tower has no CLS token (score with received_attention instead)")
        return self.row_probs(self._normed[:, :1])[:, :, 0].sum(1)[:, self.fed]

    def received_attention(self) -> torch.Tensor:
        """(U, n) attention each fed token receives from the mean query, averaged over heads."""
        return self.row_probs(q=self.mean_query())[:, :, 0].mean(1)[:, self.fed]

    def keys(self) -> torch.Tensor:
        """(U, n, d) the block's keys averaged over heads, for the fed tokens."""
        return self._k.mean(1)[:, self.fed]


class TowerScorer(QKRowScorer):
    """Scores of one CLIP / SigLIP tower forward (transformers), computed lazily on request.

    hidden_states: the tower's tuple of hidden states (embeddings, then each layer's output);
    feature_layer: the index into it the model takes features from (int, or a list whose features are
    concatenated: the last one is scored, CLS states are concatenated like the features); has_cls: whether token 0
    is a CLS token; drop_cls: whether the model drops it from the fed features (LLaVA's ``default`` strategy).
    The tower's block is looked up on first use, so a tower without accessible attention layers only fails (with
    a :class:`vtc.ConfigError`) when a method actually asks for a score.
    """

    def __init__(self, tower: nn.Module, hidden_states: tuple[torch.Tensor, ...], feature_layer: int | list[int],
                 has_cls: bool, drop_cls: bool) -> None:
        self.tower = tower
        self.hidden_states = hidden_states
        layers = [feature_layer] if isinstance(feature_layer, int) else list(feature_layer)
        n_states = len(hidden_states)
        self.feature_layers = [lay + n_states if lay < 0 else lay for lay in layers]
        self.feature_layer = feature_layer
        self.feature_index = self.feature_layers[-1]
        self.has_cls = has_cls
        self.drop_cls = drop_cls
        self.fed = slice(1, None) if drop_cls else slice(None)  # the model drops token 0 even without CLS

    @cached_property
    def _attn(self) -> tuple[nn.Module, nn.Module]:
        """(pre-attention norm, attention module) of the block producing the features; ConfigError if absent."""
        what = f"vision tower {type(self.tower).__name__} at vision_feature_layer={self.feature_layer}"
        if self.feature_index < 1:
            raise ConfigError(f"{what} selects the patch embeddings, which have no attention to score")
        layers = encoder_layers(self.tower)
        block = layers[self.feature_index - 1]
        attn = getattr(block, "self_attn", None)
        norm = getattr(block, "layer_norm1", None)
        if attn is None or norm is None or not all(hasattr(attn, a) for a in ("q_proj", "k_proj")):
            raise ConfigError(
                f"{what}: block {self.feature_index - 1} ({type(block).__name__}) has no accessible attention layer "
                "(expected layer_norm1 and self_attn.q_proj / self_attn.k_proj)"
            )
        return norm, attn

    @property
    def block_input(self) -> torch.Tensor:
        return self.hidden_states[self.feature_index - 1]

    @property
    def _heads(self) -> tuple[int, int]:
        _, attn = self._attn
        heads = getattr(attn, "num_heads", None) or attn.config.num_attention_heads
        head_dim = getattr(attn, "head_dim", None) or attn.q_proj.out_features // heads
        return heads, head_dim

    @property
    def scale(self) -> float:  # type: ignore[override]
        _, attn = self._attn
        s = getattr(attn, "scale", None)
        if s is None:
            s = getattr(attn, "scaling", None)
        return float(s) if s is not None else self._heads[1] ** -0.5

    def _norm(self, x: torch.Tensor) -> torch.Tensor:
        return self._attn[0](x)

    def _split(self, y: torch.Tensor) -> torch.Tensor:
        U, R, _ = y.shape
        h, d = self._heads
        return y.view(U, R, h, d).transpose(1, 2)

    def _queries(self, xn_rows: torch.Tensor) -> torch.Tensor:
        return self._split(self._attn[1].q_proj(xn_rows))

    def _keys(self, xn: torch.Tensor) -> torch.Tensor:
        return self._split(self._attn[1].k_proj(xn))

    def hidden_with_cls(self) -> torch.Tensor:
        """(U, 1 + n_patches, D) the feature layer(s)' hidden states including CLS."""
        return torch.cat([self.hidden_states[i] for i in self.feature_layers], dim=-1)

    def cls_token(self) -> torch.Tensor:
        """(U, D) the CLS hidden state of the feature layer(s), in the space of the features."""
        if not self.has_cls:
            raise ConfigError("this vision tower has no CLS token")
        return torch.cat([self.hidden_states[i][:, 0] for i in self.feature_layers], dim=-1)

    def as_vision_extras(self) -> VisionExtras:
        return scorer_extras(self)


def scorer_extras(scorer) -> VisionExtras:
    """VisionExtras backed by a tower scorer (``has_cls``, ``cls_attention``, ``received_attention``, ``keys``,
    ``cls_token``, ``hidden_with_cls``); the CLS-based entries only where the tower has a CLS token."""
    return VisionExtras(
        cls_attention=scorer.cls_attention if scorer.has_cls else None,
        received_attention=scorer.received_attention,
        keys=scorer.keys,
        cls_token=scorer.cls_token if scorer.has_cls else None,
        hidden_with_cls=scorer.hidden_with_cls if scorer.has_cls else None,
    )
