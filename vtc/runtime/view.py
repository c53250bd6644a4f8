"""The read-only view of an attached run that methods receive in ``Method.attach(run, state)``.

Methods that observe layers through their own hooks (e.g. TransPrune's per-token statistics between its pruning
points) read the run through this view instead of the runtime's internals.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from . import Run

__all__ = ["RunView"]


class RunView:
    """What a method may read of the run it is attached to. Holds no state of its own."""

    __slots__ = ("_run",)

    def __init__(self, run: Run) -> None:
        self._run = run

    @property
    def adapter(self) -> Any:
        """The model adapter (``decoder_layers()``, ``attn_implementation()``, ``project_qk`` ...)."""
        return self._run.adapter

    @property
    def in_prefill(self) -> bool:
        """True inside the decoder layers of a prefill with visual tokens (never while decoding)."""
        llm = self._run.llm
        return llm.active and llm.phase == "prefill"

    @property
    def prefill_len(self) -> int:
        """Length N of the prompt being prefilled (original positions are 0..N-1)."""
        return self._run.llm.prefill_len

    @property
    def llm_stage_layers(self) -> tuple[int, ...]:
        """The decoder layers where the run's LLM-side stages act, sorted (empty: vision-side stages only)."""
        return tuple(sorted(self._run.llm.by_layer))

    def current_slots(self, layer_idx: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(slots, valid), both (B, M), inside decoder layer ``layer_idx`` of the prefill in progress, or None.

        slots: the original sequence index of every slot; valid: a real token (not vtc's left padding, not user
        padding). None outside a prefill with visual tokens.
        """
        return self._run.llm.current_slots(layer_idx)

    def add_time(self, seconds: float) -> None:
        """Count ``seconds`` of work done in a method's own hooks as time spent in vtc (``run.stats``)."""
        self._run.stats.add_time(seconds)
