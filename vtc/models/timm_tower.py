"""timm ``VisionTransformer`` towers (Prismatic-style VLMs): features + flash-compatible scoring extras.

Prismatic-style VLMs take the patch tokens of a timm ViT's second-to-last block (``get_intermediate_layers``
with ``n = {len(blocks) - 2}``) and drop the prefix tokens (CLS, registers). :func:`timm_extras` runs the ViT
(its own fused / sdpa attention, untouched) up to that block and returns those features plus the lazily computed
:class:`vtc.methods.VisionExtras` of that block, ready for :func:`vtc.reduce_embeddings`:

```python
feats, extras = timm_extras(vit, images)                      # (U, n, D), VisionExtras
out, red = vtc.reduce_embeddings(feats, timm_grid(vit, images), "configs/llava-1.5/visionzip-64.yaml",
                                 extras=extras)
```

Scoring follows :mod:`vtc.models.vision_towers`: the CLS row (or one mean query) of the block's attention,
re-projected from the block's input through its ``norm1`` and the q / k slices of the fused ``attn.qkv``
projection (with ``q_norm`` / ``k_norm`` when the ViT uses qk-norm), against all keys. The block input is
captured with a per-instance forward hook on that block, removed before returning.
"""

from __future__ import annotations

from functools import cached_property

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError
from ..layout import Grid
from ..methods.base import VisionExtras
from .vision_towers import QKRowScorer, scorer_extras

__all__ = ["TimmTowerScorer", "timm_extras", "timm_grid"]


def _check_block(vit: nn.Module, index: int, layer: int) -> nn.Module:
    blocks = getattr(vit, "blocks", None)
    if blocks is None:
        raise ConfigError(f"timm tower {type(vit).__name__} has no 'blocks'; expected a timm VisionTransformer")
    n = len(blocks)
    if not (0 <= index < n):
        raise ConfigError(f"timm_extras: layer={layer} is out of range for a ViT with {n} blocks "
                          f"(allowed: {-n}..{n - 1})")
    block = blocks[index]
    attn = getattr(block, "attn", None)
    qkv = getattr(attn, "qkv", None)
    if getattr(block, "norm1", None) is None or not isinstance(qkv, nn.Linear) or not hasattr(attn, "num_heads"):
        raise ConfigError(
            f"timm tower {type(vit).__name__}: block {index} ({type(block).__name__}) has no accessible attention "
            "layer (expected norm1 and attn.qkv, a fused nn.Linear, with attn.num_heads)"
        )
    return block


class TimmTowerScorer(QKRowScorer):
    """Scores of one block of a timm ViT, given the block's input (U, N, D) and output (U, N, D).

    Prefix tokens: ``num_prefix`` (CLS first when ``has_cls``, then registers) are never fed; the fed tokens are
    the patch tokens.
    """

    def __init__(self, block: nn.Module, block_input: torch.Tensor, block_output: torch.Tensor,
                 num_prefix: int, has_cls: bool) -> None:
        self.block = block
        self._input = block_input
        self.output = block_output
        self.num_prefix = num_prefix
        self.has_cls = has_cls
        self.fed = slice(num_prefix, None)
        attn = block.attn
        self.heads = int(attn.num_heads)
        self.head_dim = int(getattr(attn, "head_dim", None) or attn.qkv.out_features // 3 // self.heads)
        self.scale = float(getattr(attn, "scale", self.head_dim ** -0.5))

    @property
    def block_input(self) -> torch.Tensor:
        return self._input

    def _norm(self, x: torch.Tensor) -> torch.Tensor:
        return self.block.norm1(x)

    @cached_property
    def _slices(self):
        qkv = self.block.attn.qkv
        a = self.heads * self.head_dim
        w, b = qkv.weight, qkv.bias
        return (w[:a], None if b is None else b[:a]), (w[a:2 * a], None if b is None else b[a:2 * a])

    def _split(self, y: torch.Tensor) -> torch.Tensor:
        U, R, _ = y.shape
        return y.view(U, R, self.heads, self.head_dim).transpose(1, 2)

    def _queries(self, xn_rows: torch.Tensor) -> torch.Tensor:
        (w, b), _ = self._slices
        q = self._split(F.linear(xn_rows, w, b))
        q_norm = getattr(self.block.attn, "q_norm", None)
        return q_norm(q) if q_norm is not None else q

    def _keys(self, xn: torch.Tensor) -> torch.Tensor:
        _, (w, b) = self._slices
        k = self._split(F.linear(xn, w, b))
        k_norm = getattr(self.block.attn, "k_norm", None)
        return k_norm(k) if k_norm is not None else k

    def mean_query(self) -> torch.Tensor:
        q_norm = getattr(self.block.attn, "q_norm", None)
        if q_norm is None or isinstance(q_norm, nn.Identity):
            return super().mean_query()
        return self._queries(self._normed).mean(2, keepdim=True)  # qk-norm is not linear: average the real rows

    def features(self) -> torch.Tensor:
        return self.output[:, self.num_prefix:]

    def cls_token(self) -> torch.Tensor:
        if not self.has_cls:
            raise ConfigError("this timm ViT has no class token")
        return self.output[:, 0]

    def hidden_with_cls(self) -> torch.Tensor:
        return torch.cat([self.output[:, :1], self.output[:, self.num_prefix:]], dim=1)

    def as_vision_extras(self) -> VisionExtras:
        return scorer_extras(self)


def timm_extras(vit: nn.Module, images: torch.Tensor, layer: int = -2) -> tuple[torch.Tensor, VisionExtras]:
    """Run a timm ``VisionTransformer`` up to block ``layer`` and return its patch features and scoring extras.

    images: (U, 3, H, W). layer: block index whose output is the feature (default -2, Prismatic's choice; the
    scores come from that same block's attention). Returns features (U, n, D) (prefix tokens dropped, no final
    norm) and a :class:`VisionExtras` whose ``cls_attention`` / ``received_attention`` / ``keys`` / ``cls_token`` /
    ``hidden_with_cls`` are computed on request. Raises :class:`vtc.ConfigError` when the block has no
    accessible attention layer. The ViT is left exactly as it was (the capture hook is removed).
    """
    blocks = getattr(vit, "blocks", None)
    n_blocks = len(blocks) if blocks is not None else 0
    index = layer + n_blocks if layer < 0 else layer
    block = _check_block(vit, index, layer)
    captured: dict[str, torch.Tensor] = {}

    def hook(module, args, output):
        captured["input"] = args[0]
        captured["output"] = output

    handle = block.register_forward_hook(hook)
    try:
        if hasattr(vit, "forward_intermediates"):
            vit.forward_intermediates(images, indices=[index], stop_early=True, intermediates_only=True,
                                      output_fmt="NLC")
        else:  # pragma: no cover - old timm
            vit.forward_features(images)
    finally:
        handle.remove()
    num_prefix = int(getattr(vit, "num_prefix_tokens", 0))
    has_cls = getattr(vit, "cls_token", None) is not None
    scorer = TimmTowerScorer(block, captured["input"], captured["output"], num_prefix, has_cls)
    return scorer.features(), scorer.as_vision_extras()


def timm_grid(vit: nn.Module, images: torch.Tensor) -> Grid:
    """The patch-grid layout of a timm ViT's features for ``images`` (U, 3, H, W)."""
    pe = vit.patch_embed
    if hasattr(pe, "dynamic_feat_size"):
        h, w = pe.dynamic_feat_size(tuple(images.shape[-2:]))
    else:  # pragma: no cover - old timm
        h, w = pe.grid_size
    return Grid(int(h), int(w))
