"""``fastervlm``: FasterVLM (Zhang et al., "[CLS] Attention is All You Need for Training-Free Visual Token Pruning:
Make VLM Inference Faster", arXiv:2412.01818). Vision side, before the projector.

Score every patch by the [CLS] query row of the attention **inside** the layer that produces the features (LLaVA's
``vision_feature_layer = -2``: encoder layer 22 of 24, whose input is ``hidden_states[-3]``), keep the top-k, in
raster order (a :class:`~vtc.methods.base.ScorerMethod`: ``score`` + the shared top-k per unit).
Flash-compatible: the tower scorer (:mod:`vtc.models.vision_towers`) re-projects one query row (CLS)
and the keys of that block from its input, never ``output_attentions``:
``a_j = sum_h softmax_j(q_cls,h · k_j,h * scale)`` over all tokens (CLS column dropped afterwards, not
renormalised). The official code averages over heads; the sum ranks identically.

Towers without CLS (Qwen2-VL / 2.5-VL, SigLIP) use ``received_attention`` instead: the attention each token
receives from one *mean query* (mean of the block's queries), in Qwen's last full-attention block (never a windowed
one), averaged over each 2x2 PatchMerger group onto the merged tokens (see :mod:`vtc.models.qwen2_vl`). No
official code exists for these towers (VisPruner's SigLIP path averages all query rows of the last layer; not
reproduced).

Budget: ``budget: k`` keeps exactly k tokens per unit (image; LLaVA-NeXT: every crop, base included, the
official setting; Qwen: every image / video frame). The paper's reduction ratios map to the README's counts
T = round(576 * (1 - ratio)): 75% -> ``budget: 144``, 90% -> ``58``, 95% -> ``29``. A float budget is a keep
fraction, floor(f * n) (e.g. 0.1 -> 57, not the README's 58: use the int).

Official quirks: *fixed*: ties go to the lower index (``torch.topk`` leaves them unspecified); LLaVA-NeXT keeps the
model's own packing with its newline tokens (the official FasterVLM hard-codes ``spatial`` merging: no unpadding,
no newline tokens). Derivation: ``docs/methods/fastervlm.md``.
"""

from __future__ import annotations

from typing import Literal

import torch

from ..errors import ConfigError
from . import register_method
from .base import Budget, ScorerMethod, VisionContext

__all__ = ["FasterVLM", "cls_scores"]


def cls_scores(ctx: VisionContext, method: str) -> torch.Tensor:
    """(U, n) importance of every fed token: the CLS row of the feature layer's attention (towers with CLS), else
    the attention each token receives from the mean query; ConfigError naming what is missing otherwise."""
    ex = ctx.extras
    U, n = ctx.features.shape[:2]
    if ex.cls_attention is not None:
        scores = ex.require("cls_attention", method)
    elif ex.received_attention is not None:
        scores = ex.require("received_attention", method)
    else:
        raise ConfigError(
            f"{method} needs 'cls_attention' (towers with CLS) or 'received_attention' (towers without CLS) from the "
            f"vision tower (available: {', '.join(ex.available()) or 'none'}); it must be the first vision-side stage, "
            "and with vtc.reduce_embeddings pass extras={'cls_attention': (U, n)}"
        )
    if scores.shape != (U, n):
        raise ConfigError(f"{method}: the attention scores have shape {tuple(scores.shape)}, expected (U, n) = "
                          f"({U}, {n}) like the features")
    return scores.float()


@register_method("fastervlm")
class FasterVLM(ScorerMethod):
    sides = ("vision",)

    method: Literal["fastervlm"] = "fastervlm"
    #: tokens kept per unit (image / crop / frame), or a keep fraction
    budget: Budget
    feature_space: Literal["vision"] = "vision"

    def score(self, ctx: VisionContext) -> torch.Tensor:
        """(U, n) CLS attention (or mean-query received attention) of every token."""
        return cls_scores(ctx, self.method)
