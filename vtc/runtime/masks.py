"""Mask arithmetic of the LLM-side runtime: pure functions of the model's own mask and a slot set.

A slot set is ``slots`` (B, M), the original sequence index of every slot, with ``slot_valid`` (B, M) (False: vtc's
left padding) and optional ``sizes`` (B, M) (how many tokens a merged slot stands for). Masks come in the model's
forms: None (causal, nothing padded), a 2D (B, K) 0/1 padding mask (flash-attention-2) or a 4D (B|1, H|1, Q, K)
boolean / additive float mask (sdpa, eager).

- Prefill: the model's (N x N) mask re-indexed to the slots on both axes, padding slots masked as keys; a padding
  query row attends to itself only (never an all-masked row).
- Decode: the key axis re-indexed to [the slots] + [the tokens decoded so far] (original positions N, N+1, ...).
- Proportional attention (ToMe / PACT): the additive bias log(size) on each key.
"""

from __future__ import annotations

import torch

__all__ = ["gather_seq", "prefill_mask", "decode_mask", "finish_mask"]


def gather_seq(t: torch.Tensor, slots: torch.Tensor, dim: int) -> torch.Tensor:
    """Gather (..., B|1, N, ...) along the sequence axis ``dim`` (-1 or -2) with slots (B, M)."""
    B, M = slots.shape
    if dim == -2:
        lead = t.shape[:-3]
        t = t.expand(*lead, B, t.shape[-2], t.shape[-1])
        idx = slots.view(*([1] * len(lead)), B, M, 1).expand(*lead, B, M, t.shape[-1])
        return torch.gather(t, -2, idx)
    lead = t.shape[:-2]
    t = t.expand(*lead, B, t.shape[-1])
    idx = slots.view(*([1] * len(lead)), B, M).expand(*lead, B, M)
    return torch.gather(t, -1, idx)


def finish_mask(allowed: torch.Tensor, key_valid: torch.Tensor, query_valid: torch.Tensor | None,
                key_sizes: torch.Tensor | None, *, float_out: bool, dtype: torch.dtype) -> torch.Tensor:
    """Boolean ``allowed`` (B, H, Q, K) -> the mask the layer takes: invalid keys masked, padding query rows
    (``query_valid`` False) attend to themselves; as an additive ``dtype`` mask with the log-size bias when
    ``float_out``."""
    Q, K = allowed.shape[-2:]
    allowed = allowed & key_valid[:, None, None, :]
    if query_valid is not None:
        eye = torch.eye(Q, K, dtype=torch.bool, device=allowed.device)[None, None]
        allowed = allowed | (eye & ~query_valid[:, None, :, None])
    if not float_out:
        return allowed
    out = torch.zeros(allowed.shape, dtype=dtype, device=allowed.device)
    if key_sizes is not None:
        out = out + torch.log(key_sizes.clamp(min=1.0)).to(dtype)[:, None, None, :]
    return out.masked_fill(~allowed, torch.finfo(dtype).min)


def prefill_mask(mask: torch.Tensor | None, slots: torch.Tensor, slot_valid: torch.Tensor,
                 sizes: torch.Tensor | None, *, float_out: bool, dtype: torch.dtype) -> torch.Tensor:
    """The prefill mask over the slots (M x M) from the model's mask over the full prompt (N x N)."""
    if mask is not None and mask.dim() == 2:  # flash-attention-2 style padding mask
        return torch.gather(mask, 1, slots) & slot_valid.to(mask.dtype)
    B, M = slots.shape
    if mask is not None:
        m = mask.expand(B, *mask.shape[1:])
        rows = torch.gather(m, 2, slots[:, None, :, None].expand(-1, m.shape[1], -1, m.shape[-1]))
        allowed = torch.gather(rows, 3, slots[:, None, None, :].expand(-1, m.shape[1], M, -1))
        allowed = allowed if allowed.dtype == torch.bool else allowed == 0
    else:
        allowed = torch.ones(M, M, dtype=torch.bool, device=slots.device).tril()[None, None].expand(B, 1, M, M)
    return finish_mask(allowed, slot_valid, slot_valid, sizes, float_out=float_out, dtype=dtype)


def decode_mask(mask: torch.Tensor | None, slots: torch.Tensor, slot_valid: torch.Tensor,
                sizes: torch.Tensor | None, *, prefill_len: int, total_len: int, new_tokens: int,
                float_out: bool, dtype: torch.dtype) -> torch.Tensor:
    """The mask of a decoding step (``new_tokens`` queries, ``total_len`` tokens so far of which ``prefill_len``
    were the prompt) with its key axis re-indexed to [slots] + [decoded tokens]."""
    B = slots.shape[0]
    new_pos = torch.arange(prefill_len, total_len, device=slots.device).expand(B, total_len - prefill_len)
    keys = torch.cat([slots, new_pos], dim=1)
    key_valid = torch.cat([slot_valid, torch.ones_like(new_pos, dtype=torch.bool)], dim=1)
    if mask is not None and mask.dim() == 2:
        return torch.gather(mask, 1, keys) & key_valid.to(mask.dtype)
    if mask is not None:
        m = mask.expand(B, *mask.shape[1:])
        allowed = torch.gather(m, 3, keys[:, None, None, :].expand(-1, m.shape[1], m.shape[2], -1))
        allowed = allowed if allowed.dtype == torch.bool else allowed == 0
    else:
        q_pos = torch.arange(total_len - new_tokens, total_len, device=slots.device)
        allowed = keys[:, None, None, :] <= q_pos[None, None, :, None]
    if sizes is not None:
        sizes = torch.cat([sizes, torch.ones_like(new_pos, dtype=sizes.dtype)], dim=1)
    return finish_mask(allowed, key_valid, None, sizes, float_out=float_out, dtype=dtype)
