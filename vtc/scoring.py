"""FlashAttention-compatible importance scores.

Every score here is computed from re-projected query rows for the few queries a method needs (the last prompt
token, the instruction tokens, a mean query), against keys of all tokens: memory O(R * N) per head with R the
number of query rows, never N x N, never ``output_attentions``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from .reduction import compact

if TYPE_CHECKING:
    from .methods.base import LLMContext

__all__ = ["attention_probs", "attention_from_rows", "query_attention", "rotate_half", "apply_rope"]


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Llama-style rotary embedding. x: (B, h, R, d); cos / sin: (B, R, d) (already gathered for the rows)."""
    cos = cos.unsqueeze(1).to(x.dtype)
    sin = sin.unsqueeze(1).to(x.dtype)
    return x * cos + rotate_half(x) * sin


def attention_probs(
    q: torch.Tensor, k: torch.Tensor, allowed: torch.Tensor | None, scale: float | None = None
) -> torch.Tensor:
    """Softmax attention probabilities of a few query rows, in fp32.

    q: (B, h, R, d); k: (B, h_kv, N, d) with h a multiple of h_kv (GQA keys are shared, not copied);
    allowed: (B, R, N) bool or None. Returns (B, h, R, N). Rows with nothing allowed give zeros.
    """
    B, h, R, d = q.shape
    h_kv = k.shape[1]
    g = h // h_kv
    scale = d**-0.5 if scale is None else scale
    qf = q.float().reshape(B, h_kv, g * R, d)
    logits = torch.matmul(qf, k.float().transpose(-1, -2)).view(B, h_kv, g, R, -1) * scale
    logits = logits.reshape(B, h, R, -1)
    if allowed is not None:
        logits = logits.masked_fill(~allowed[:, None], float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    return torch.nan_to_num(probs, nan=0.0)


def attention_from_rows(
    q: torch.Tensor, k: torch.Tensor, allowed: torch.Tensor | None, scale: float | None = None
) -> torch.Tensor:
    """Attention paid to every key, averaged over heads and query rows: (B, N).

    Only rows with at least one allowed key count in the mean over rows.
    """
    probs = attention_probs(q, k, allowed, scale)  # (B, h, R, N)
    per_row = probs.mean(1)  # (B, R, N)
    if allowed is None:
        return per_row.mean(1)
    row_ok = allowed.any(-1).float()  # (B, R)
    return (per_row * row_ok[..., None]).sum(1) / row_ok.sum(1, keepdim=True).clamp(min=1.0)


def query_attention(src: LLMContext, layer: int, query: str = "last") -> torch.Tensor:
    """(B, M) attention of the query row(s) to every slot of ``src`` at decoder layer ``layer``, averaged over heads.

    ``src`` is the context of the hidden states entering ``layer`` (FastV: the captured input of L - 1; PyramidDrop:
    the cut's own input). ``query: last`` is the last prompt token's row; ``query: text`` averages the rows of the
    instruction tokens (text after the last image; the last token where there is none). Rows are re-projected with
    the layer's input norm, q / k projections and RoPE; causal over the real tokens.
    """
    B, M = src.token_valid.shape
    dev = src.hidden_states.device
    last = src.last_token_slot()  # (B,)
    slots = torch.arange(M, device=dev)
    if query == "text":
        inst = src.instruction_mask()
        has = inst.any(-1)
        inst = torch.where(has[:, None], inst, slots[None] == last[:, None])  # fallback: last token
        rows, row_ok = compact(inst)
        rows = torch.where(row_ok, rows, last[:, None].expand_as(rows))
    else:
        rows = last[:, None]
        row_ok = torch.ones_like(rows, dtype=torch.bool)
    q, k = src.adapter.project_qk(layer, src.hidden_states, src.position_embeddings, rows)
    allowed = (slots[None, None, :] <= rows[:, :, None]) & src.token_valid[:, None, :] & row_ok[:, :, None]
    return attention_from_rows(q, k, allowed, src.adapter.attention_scale(layer))
