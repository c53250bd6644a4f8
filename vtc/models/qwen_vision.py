"""What Qwen2-VL, Qwen2.5-VL and Qwen3-VL share below the adapters: M-RoPE composition (sectioned and
interleaved), the tower-side scores (mean-query received attention, keys) of a packed vision tower, and the
unit table (an image, or one frame group of a video). Pure functions and small types; the adapters are in
:mod:`vtc.models.qwen2_vl` and :mod:`vtc.models.qwen3_vl`.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import Literal

import torch

from ..scoring import rotate_half

__all__ = ["compose_mrope", "compose_mrope_interleaved", "segment_received_attention", "TowerScores",
           "CombinedScores", "Unit", "apply_vision_rope"]


# ---------------------------------------------------------------------------------------------- pure maths
def compose_mrope(table: torch.Tensor, mrope_section: list[int]) -> torch.Tensor:
    """(3, B, N, d) per-axis rotary table (temporal, height, width) -> (B, N, d) M-RoPE table.

    Qwen2-VL's multimodal RoPE: the rotary frequencies are split into ``mrope_section`` chunks (summing to d/2,
    repeated for the two halves) and chunk i takes the axis ``i % 3``. transformers >= 5.2x returns the composed
    table already; older versions return the per-axis one.
    """
    sections = list(mrope_section) * 2
    return torch.cat([m[i % 3] for i, m in enumerate(table.split(sections, dim=-1))], dim=-1)


def compose_mrope_interleaved(table: torch.Tensor, mrope_section: list[int]) -> torch.Tensor:
    """(3, B, N, d) per-axis rotary table -> (B, N, d) interleaved M-RoPE table (Qwen3-VL).

    Within each half of the table (``[freqs, freqs]``), frequency i takes the temporal axis except at
    ``i = 1 + 3j`` (j < ``mrope_section[1]``: height) and ``i = 2 + 3j`` (j < ``mrope_section[2]``: width).
    transformers returns the composed table; this is for versions that would pass the per-axis one.
    """
    half = table.shape[-1] // 2
    f = table[..., :half]
    axis = torch.zeros(half, dtype=torch.long, device=table.device)
    for dim in (1, 2):
        axis[dim:mrope_section[dim] * 3:3] = dim
    out = torch.gather(f, 0, axis.view(1, 1, 1, half).expand(1, *f.shape[1:]))[0]
    return torch.cat([out, out], dim=-1)


def segment_received_attention(q: torch.Tensor, k: torch.Tensor, segment: torch.Tensor, num_segments: int,
                               scale: float) -> torch.Tensor:
    """Attention each token receives from the mean query of its segment, averaged over heads.

    q, k: (N, h, d) RoPE-applied queries / keys of packed sequences; segment: (N,) long segment id (sorted);
    returns (N,) with p_j = mean_h softmax_{j in seg}(q̄_seg,h · k_j,h · scale), q̄_seg = mean of the segment's q.
    Vectorised over segments (scatter means / maxes), fp32, O(N·h·d).
    """
    N, h, d = q.shape
    qf, kf = q.float(), k.float()
    counts = torch.zeros(num_segments, device=q.device).index_add_(0, segment, torch.ones(N, device=q.device))
    q_mean = torch.zeros(num_segments, h, d, device=q.device).index_add_(0, segment, qf)
    q_mean = q_mean / counts.clamp(min=1)[:, None, None]
    logits = (q_mean[segment] * kf).sum(-1) * scale  # (N, h)
    seg_h = segment[:, None].expand(N, h)
    mx = torch.full((num_segments, h), float("-inf"), device=q.device).scatter_reduce(
        0, seg_h, logits, reduce="amax", include_self=True)
    e = torch.exp(logits - mx[segment])
    den = torch.zeros(num_segments, h, device=q.device).index_add_(0, segment, e)
    return (e / den[segment]).mean(-1)


def apply_vision_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """The vision tower's rotary embedding (fp32, like the model): x (N, h, d), cos / sin (N, d)."""
    xf = x.float()
    cos, sin = cos.unsqueeze(-2).float(), sin.unsqueeze(-2).float()
    return xf * cos + rotate_half(xf) * sin


# ---------------------------------------------------------------------------------------------- unit table
@dataclass
class Unit:
    kind: Literal["image", "video"]
    source: int  # index into image_grid_thw / video_grid_thw
    frame: int  # frame (temporal patch group) index for per-frame video units; 0 otherwise
    grid: tuple[int, int, int]  # (t, h, w) in merged tokens
    offset: int  # first merged token of this unit in the tower output of its kind

    @property
    def num_tokens(self) -> int:
        t, h, w = self.grid
        return t * h * w


class TowerScores:
    """Lazily computed extras of one tower call, flat over its merged tokens in the merger's output order.

    x: (N, D) input of the scoring block (in the block's token order); cu_seqlens: (S+1,) its attention segments;
    cos / sin: (N, d) its vision rotary tables; order: (N/m²,) merged-group index (block order) of each output
    token, or None when the block order is the output order (Qwen2-VL).
    """

    def __init__(self, block, x, cu_seqlens, cos, sin, merge_unit: int, order: torch.Tensor | None) -> None:
        self.block, self.x, self.cu, self.cos, self.sin = block, x, cu_seqlens, cos, sin
        self.merge_unit = merge_unit
        self.order = order

    @cached_property
    def _qk(self) -> tuple[torch.Tensor, torch.Tensor]:
        attn = self.block.attn
        xn = self.block.norm1(self.x)
        N = xn.shape[0]
        qkv = attn.qkv(xn).reshape(N, 3, attn.num_heads, -1)
        return qkv[:, 0], qkv[:, 1]  # (N, h, d) each, before RoPE

    def _merged(self, t: torch.Tensor) -> torch.Tensor:
        """(N, ...) per patch -> (N/m², ...) per merged token (mean over each merge group), output order."""
        g = t.reshape(t.shape[0] // self.merge_unit, self.merge_unit, *t.shape[1:]).mean(1)
        return g if self.order is None else g[self.order]

    def received_attention(self) -> torch.Tensor:
        q, k = self._qk
        q, k = apply_vision_rope(q, self.cos, self.sin), apply_vision_rope(k, self.cos, self.sin)
        N = q.shape[0]
        cu = self.cu.to(q.device).long()
        segment = torch.searchsorted(cu[1:], torch.arange(N, device=q.device), right=True)
        p = segment_received_attention(q, k, segment, cu.numel() - 1, float(self.block.attn.scaling))
        return self._merged(p)

    def keys(self) -> torch.Tensor:
        _, k = self._qk
        return self._merged(k.float().mean(1))



class CombinedScores:
    """Concatenates the flat extras of the image and the video tower calls (same order as the features)."""

    def __init__(self, parts: list[TowerScores]) -> None:
        self.parts = parts

    @cached_property
    def _received(self) -> torch.Tensor:
        return torch.cat([p.received_attention() for p in self.parts], dim=0)

    @cached_property
    def _keys(self) -> torch.Tensor:
        return torch.cat([p.keys() for p in self.parts], dim=0)

    def received_attention(self) -> torch.Tensor:
        return self._received

    def keys(self) -> torch.Tensor:
        return self._keys
