"""``transprune``: TransPrune (Li et al., "TransPrune: Token Transition Pruning for Efficient Large
Vision-Language Model", 2025, arXiv:2507.20630). LLM side, progressive, with an attention-free core score.

**Token transition variation (TTV)** of a sub-module m in {attention, MLP}, with x its input after its pre-norm and
y its output before the residual add (per-instance forward hooks on ``self_attn`` / ``mlp``, removed on exit):

    r_i = ||y_i|| / ||x_i||,   p_i = softmax_i(1 - cos(x_i, y_i)) over the real tokens of the row,
    TTV_m,i = r_i * p_i,       TTV_l,i = TTV_attn,i + TTV_mlp,i

summed over the accumulation layers (by original position, in ``ctx.state``; prefill only), then L1-normalised over
the visual candidates: T_i = acc_i / (sum_{j in V} acc_j + 1e-8).

**Instruction-guided attention (IGA)** at a pruning point entering 0-indexed layer L: the instruction tokens (real
text after the last visual token) attend causally to all tokens with layer L's input norm, q / k and (M-)RoPE;
averaged over heads and rows, restricted to the candidates, L1-normalised: I_i (|T| query rows, never N x N).

**Score** = ``ttv_weight`` * T_i + ``iga_weight`` * I_i (defaults 1, 1; ``iga_weight: 0`` = attention-free). At
pruning point j the top ``floor(keep[j] * n0)`` candidates of every image survive in original order, n0 = the
image's candidate count entering the first pruning point. Survivors keep their original position ids.

Defaults (every official LLaVA-1.5-7B / LLaVA-NeXT-7B script): ``layers: [7, 9, 12]`` (0-indexed layers the
survivors enter = the paper's "prune after layers 7, 9, 12", 1-indexed), ``keep: [0.875, 0.625, 0.125]``
(576 -> 504 -> 360 -> 72), ``accumulate: [6, 11]`` (the paper's layers 7-12; :func:`from_paper_layers` converts).
Layer convention, official quirks, bad input: docs/methods/transprune.md.
"""

from __future__ import annotations

import math
import time
import warnings
from dataclasses import dataclass
from typing import Any, Literal

import torch
from pydantic import ValidationInfo, field_validator

from ..errors import ConfigError
from ..reduction import compact
from ..scoring import attention_from_rows
from . import register_method
from .base import LLMContext
from .schedule import ScheduledScorer, ScheduleState

__all__ = [
    "TransPrune",
    "TransPruneState",
    "from_paper_layers",
    "transition_variation",
    "accumulate_by_position",
    "l1_normalise",
    "instruction_guided_attention",
    "PAPER_PRUNE_AFTER",
    "PAPER_KEEP",
    "PAPER_ACCUMULATE",
]

#: the paper's schedule, 1-indexed as in the paper and the official scripts (LLaVA-1.5-7B, LLaVA-NeXT-7B)
PAPER_PRUNE_AFTER: tuple[int, ...] = (7, 9, 12)  # prune after these layers
PAPER_KEEP: tuple[float, ...] = (0.875, 0.625, 0.125)  # fractions of the original visual tokens
PAPER_ACCUMULATE: tuple[int, int] = (7, 12)  # TTV summed over these layers (inclusive)


def from_paper_layers(prune_after: tuple[int, ...], accumulate: tuple[int, int]) -> tuple[tuple[int, ...],
                                                                                         tuple[int, int]]:
    """Convert the paper's 1-indexed schedule to vtc's 0-indexed one (the only place this happens).

    - pruning "after 1-indexed layer k" = the survivors *enter* 0-indexed layer k: ``layers`` unchanged;
    - accumulation over 1-indexed layers a..b = 0-indexed decoder layers a-1..b-1.

    >>> from_paper_layers((7, 9, 12), (7, 12))
    ((7, 9, 12), (6, 11))
    """
    layers = tuple(int(k) for k in prune_after)
    acc = (int(accumulate[0]) - 1, int(accumulate[1]) - 1)
    return layers, acc


DEFAULT_LAYERS, DEFAULT_ACCUMULATE = from_paper_layers(PAPER_PRUNE_AFTER, PAPER_ACCUMULATE)


# ---- the maths (pure functions) ---------------------------------------------------------------------------------
def transition_variation(x: torch.Tensor, y: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """TTV of one sub-module: (B, M) float32, ``r_i * softmax_i(1 - cos(x_i, y_i))``, 0 on invalid slots.

    x: (B, M, D) the sub-module's input after its pre-norm; y: (B, M, D) its output before the residual add;
    valid: (B, M) bool, the real tokens of each row (the softmax runs over them only). Computed in fp32.
    """
    xf, yf = x.float(), y.float()
    nx = torch.linalg.vector_norm(xf, dim=-1)
    ny = torch.linalg.vector_norm(yf, dim=-1)
    ratio = ny / nx.clamp(min=1e-12)
    cos = (xf * yf).sum(-1) / (nx * ny).clamp(min=1e-8)
    change = (1.0 - cos).masked_fill(~valid, float("-inf"))
    p = torch.nan_to_num(torch.softmax(change, dim=-1), nan=0.0)
    return torch.where(valid, ratio * p, torch.zeros_like(p))


def accumulate_by_position(acc: torch.Tensor, ttv: torch.Tensor, slots: torch.Tensor,
                           valid: torch.Tensor) -> torch.Tensor:
    """Add per-slot values ``ttv`` (B, M) into ``acc`` (B, N) at original positions ``slots`` (B, M), in place.

    Invalid slots (vtc's left padding, user padding) add nothing. Returns ``acc``.
    """
    acc.scatter_add_(1, slots, torch.where(valid, ttv, torch.zeros_like(ttv)).to(acc.dtype))
    return acc


def l1_normalise(scores: torch.Tensor, valid: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """(B, n) ``s_i / (sum_{valid j} s_j + eps)`` with invalid entries set to 0."""
    s = torch.where(valid, scores.float(), torch.zeros_like(scores, dtype=torch.float32))
    return s / (s.sum(-1, keepdim=True) + eps)


def instruction_guided_attention(ctx: LLMContext) -> tuple[torch.Tensor, torch.Tensor]:
    """IGA at the pruning point entering layer ``ctx.layer_idx``: ((B, n) scores over the candidates, (B,) bool).

    Instruction tokens (``ctx.instruction_mask()``: real text after the last visual token) are the query rows,
    re-projected with layer ``ctx.layer_idx``'s input norm, q/k projections and RoPE; they attend causally to
    every real token. Probabilities averaged over heads and rows, gathered at the candidates, L1-normalised.
    The second output marks the samples that have instruction tokens (the others get zeros).
    """
    inst = ctx.instruction_mask()
    has = inst.any(-1)
    rows, row_ok = compact(inst)  # one host sync per stage
    M = inst.shape[1]
    q, k = ctx.adapter.project_qk(ctx.layer_idx, ctx.hidden_states, ctx.position_embeddings, rows)
    slots = torch.arange(M, device=inst.device)
    allowed = (slots[None, None, :] <= rows[:, :, None]) & ctx.token_valid[:, None, :] & row_ok[:, :, None]
    att = attention_from_rows(q, k, allowed, ctx.adapter.attention_scale(ctx.layer_idx))  # (B, M)
    return l1_normalise(torch.gather(att, 1, ctx.candidates), ctx.candidate_valid), has


# ---- per-run state -------------------------------------------------------------------------------------------------
@dataclass
class TransPruneState(ScheduleState):
    """What one attached run remembers during a prefill (``ctx.state``); ``base_counts`` from the schedule."""

    acc: torch.Tensor | None = None  # (B, N) fp32 TTV summed so far, by original sequence position
    warned: bool = False


def _submodules(layer: torch.nn.Module, idx: int) -> tuple[torch.nn.Module, torch.nn.Module]:
    attn, mlp = getattr(layer, "self_attn", None), getattr(layer, "mlp", None)
    if attn is None or mlp is None:
        raise ConfigError(
            f"transprune: decoder layer {idx} ({type(layer).__name__}) has no 'self_attn' / 'mlp' sub-modules; "
            "token transition variation needs a pre-norm decoder layer (use iga_weight only: ttv_weight: 0)"
        )
    return attn, mlp


@register_method("transprune")
class TransPrune(ScheduledScorer):
    """TransPrune: progressive pruning by token transition variation (+ instruction-guided attention).

    Fields (defaults = the paper's LLaVA-1.5-7B / LLaVA-NeXT-7B schedule, see the module docstring):
    - ``layers``: 0-indexed decoder layers the survivors enter, strictly increasing (paper "after 7, 9, 12").
    - ``keep``: fraction of the original visual tokens of each image kept at each layer, in (0, 1],
      non-increasing, one per layer.
    - ``accumulate``: inclusive 0-indexed range of layers whose TTV is summed; must start before ``layers[0]``.
      Layers at or after the last pruning layer are not hooked (their TTV would never be used).
    - ``ttv_weight``, ``iga_weight``: weights of the two normalised scores (>= 0, not both 0).
    """


    method: Literal["transprune"] = "transprune"
    layers: tuple[int, ...] = DEFAULT_LAYERS
    keep: tuple[float, ...] = PAPER_KEEP
    accumulate: tuple[int, int] = DEFAULT_ACCUMULATE
    ttv_weight: float = 1.0
    iga_weight: float = 1.0

    # ---- validation -------------------------------------------------------------------------------------------
    @field_validator("accumulate")
    @classmethod
    def _check_accumulate(cls, v: tuple[int, int], info: ValidationInfo) -> tuple[int, int]:
        first, last = v
        if first < 0 or last < first:
            raise ValueError("must be an inclusive 0-indexed layer range [first, last] with 0 <= first <= last")
        layers = info.data.get("layers")
        if layers and first >= layers[0]:
            raise ValueError(f"must start before the first pruning layer {layers[0]} (TTV is accumulated over the "
                             f"layers before each pruning point), e.g. [{layers[0] - 1}, {layers[-1] - 1}]")
        return v

    @field_validator("ttv_weight", "iga_weight")
    @classmethod
    def _check_weight(cls, v: float, info: ValidationInfo) -> float:
        if math.isnan(v) or v < 0:
            raise ValueError("must be >= 0")
        if info.field_name == "iga_weight" and v == 0 and info.data.get("ttv_weight") == 0:
            raise ValueError("ttv_weight and iga_weight cannot both be 0")
        return v

    def validate_for_model(self, num_layers: int) -> None:
        super().validate_for_model(num_layers)
        if self.accumulate[1] >= num_layers:
            raise ConfigError(
                f"transprune: accumulate={list(self.accumulate)} is out of range for a model with {num_layers} "
                f"decoder layers (0-indexed, allowed: 0..{num_layers - 1})"
            )

    # ---- placement ----------------------------------------------------------------------------------------------
    def accumulation_layers(self) -> tuple[int, ...]:
        """0-indexed layers whose TTV is captured: ``accumulate`` clipped to before the last pruning layer."""
        if self.ttv_weight == 0:
            return ()
        return tuple(range(self.accumulate[0], min(self.accumulate[1], self.layers[-1] - 1) + 1))

    def new_state(self) -> TransPruneState:
        return TransPruneState()

    def attach(self, run: Any, state: TransPruneState) -> list[Any]:
        handles: list[Any] = []
        try:
            decoder = run.adapter.decoder_layers()
            acc_layers = self.accumulation_layers()
            for layer_idx in acc_layers:
                attn, mlp = _submodules(decoder[layer_idx], layer_idx)
                first = layer_idx == acc_layers[0]
                handles.append(attn.register_forward_hook(_ttv_hook(run, state, layer_idx, first), with_kwargs=True))
                handles.append(mlp.register_forward_hook(_ttv_hook(run, state, layer_idx, False), with_kwargs=True))
        except BaseException:
            for h in reversed(handles):
                h.remove()
            raise
        return handles

    # ---- the stage: score (the schedule keeps the top floor(keep[j] * n0) of every image) ----------------------
    @torch.no_grad()
    def score(self, ctx: LLMContext) -> torch.Tensor:
        state: TransPruneState = ctx.state
        if state is None:
            raise RuntimeError("transprune: no per-run state; attach it with vtc.compress / vtc.apply")
        valid = ctx.candidate_valid
        score = torch.zeros(valid.shape, dtype=torch.float32, device=valid.device)
        if self.ttv_weight > 0:
            acc = state.acc
            if acc is None or acc.shape[0] != valid.shape[0]:
                raise RuntimeError("transprune: no token transition variation was captured in this prefill")
            positions = torch.gather(ctx.slot_positions, 1, ctx.candidates)
            score = score + self.ttv_weight * l1_normalise(torch.gather(acc, 1, positions), valid)
        if self.iga_weight > 0:
            iga, has = instruction_guided_attention(ctx)
            if not state.warned and not bool(has.all()):
                state.warned = True
                fallback = ("ranked by token transition variation only" if self.ttv_weight > 0 else
                            "all scored 0 (ttv_weight is 0), so the first ones of each image are kept")
                warnings.warn(
                    f"transprune: a prompt has no instruction tokens after the image; its visual tokens are "
                    f"{fallback} (no instruction-guided attention)",
                    stacklevel=2,
                )
            score = score + self.iga_weight * iga
        return score


def _ttv_hook(run: Any, state: TransPruneState, layer_idx: int, first: bool):
    """Forward hook on a sub-module of an accumulation layer: add its TTV to ``state.acc`` (prefill only).

    ``run`` is the run's read-only view (:class:`vtc.runtime.view.RunView`)."""

    def hook(module, args, kwargs, output):
        if not run.in_prefill:
            return None
        current = run.current_slots(layer_idx)
        if current is None:
            return None
        t0 = time.perf_counter()
        slots, valid = current
        x = args[0] if args else kwargs["hidden_states"]
        y = output[0] if isinstance(output, tuple | list) else output
        B = x.shape[0]
        with torch.no_grad():  # a score, never part of a graph
            if first or state.acc is None or state.acc.shape != (B, run.prefill_len):
                state.acc = torch.zeros(B, run.prefill_len, dtype=torch.float32, device=x.device)
            accumulate_by_position(state.acc, transition_variation(x, y, valid), slots, valid)
        run.add_time(time.perf_counter() - t0)
        return None

    return hook
