"""Shared base of multi-stage LLM-side methods (TransPrune, PyramidDrop, SparseVLM): a schedule of cut layers, at
each the top ``floor(keep[j] * n0)`` candidates of every image by the method's score, n0 = the image's candidate
count entering the *first* cut (the original count unless an earlier stage reduced it). Not a method itself.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from pydantic import ValidationInfo, field_validator

from ..errors import ConfigError
from ..reduction import resolve_budget
from .base import LLMContext, ScorerMethod

__all__ = ["ScheduleState", "ScheduledScorer"]


@dataclass
class ScheduleState:
    """Per-run state of a schedule: the candidates per image entering the first cut of the current prefill."""

    base_counts: torch.Tensor | None = None  # (B, G)


class ScheduledScorer(ScorerMethod):
    """Progressive top-k: ``layers`` (0-indexed layers the survivors enter, strictly increasing) with one keep
    fraction of the original count each (``keep``, in (0, 1], non-increasing). Subclasses declare both fields with
    their defaults and implement ``score``; their state (``new_state``) extends :class:`ScheduleState`."""

    sides = ("llm",)

    layers: tuple[int, ...]
    keep: tuple[float, ...]

    @field_validator("layers", check_fields=False)
    @classmethod
    def _check_layers(cls, v: tuple[int, ...]) -> tuple[int, ...]:
        if not v:
            raise ValueError("needs at least one pruning layer, e.g. [7, 9, 12]")
        if any(layer < 1 for layer in v):
            raise ValueError("pruning layers are 0-indexed layers entered and must be >= 1")
        if any(b <= a for a, b in zip(v, v[1:])):
            raise ValueError("must be strictly increasing, e.g. [7, 9, 12]")
        return v

    @field_validator("keep", check_fields=False)
    @classmethod
    def _check_keep(cls, v: tuple[float, ...] | None, info: ValidationInfo) -> tuple[float, ...] | None:
        if v is None:  # a subclass without fractions for this configuration (SparseVLM v1's rank-adaptive counts)
            return v
        if any(math.isnan(f) or not (0.0 < f <= 1.0) for f in v):
            raise ValueError("every keep fraction must be in (0, 1]")
        if any(b > a for a, b in zip(v, v[1:])):
            raise ValueError("keep fractions must not increase from one pruning layer to the next")
        layers = info.data.get("layers")
        if layers is not None and len(layers) != len(v):
            raise ValueError(f"needs one fraction per pruning layer: {len(layers)} layers {list(layers)}, "
                             f"{len(v)} fractions")
        return v

    def validate_for_model(self, num_layers: int) -> None:
        bad = [layer for layer in self.layers if layer >= num_layers]
        if bad:
            raise ConfigError(
                f"{self.method}: layers={list(self.layers)} has layer(s) {bad} out of range for a model with "
                f"{num_layers} decoder layers (0-indexed layers entered, allowed: 1..{num_layers - 1})"
            )

    def llm_layers(self) -> tuple[int, ...]:
        return tuple(self.layers)

    def new_state(self) -> ScheduleState:
        return ScheduleState()

    def keep_per_image(self, ctx: LLMContext) -> torch.Tensor:
        """(B, G) floor(keep[j] * n0) (>= 1 for non-empty images), never more than the current count."""
        state: ScheduleState = ctx.state
        j = self.layers.index(ctx.layer_idx)
        counts = ctx.image_counts
        assert counts is not None
        if j == 0 or state.base_counts is None or state.base_counts.shape != counts.shape:
            state.base_counts = counts.clone()
        base = state.base_counts
        ks = [resolve_budget(self.keep[j], c, what="keep") if c > 0 else 0 for c in base.flatten().tolist()]
        k = torch.tensor(ks, dtype=torch.long, device=base.device).view_as(base)
        return torch.minimum(k, counts)
