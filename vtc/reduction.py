"""The one result type every method returns, and the shared selection maths.

A :class:`Reduction` describes how ``n`` input tokens (per row: per image on the vision side, per sample on the
LLM side) become ``k`` output tokens:

- ``anchor`` (R, k): for each output token, the input index whose slot and position it takes (for plain
  pruning: the kept index; for a merge: the centre / target; for pooling: a token of its window).
- ``valid`` (R, k): False marks padding when rows deliver different counts (content-adaptive methods).
- ``source`` (R, n): the source map, the output slot each input token is represented by (-1: dropped). This is
  what drawing, stats and proportional attention read (ToMe's source map).
- ``features`` (R, k, D) or None: the output features when they are not a plain gather of the inputs
  (merging, pooling). None means ``gather(inputs, anchor)``.
- ``sizes`` (R, k) float or None: how many input tokens each output stands for.
- ``proportional``: LLM side, add log(size) to the attention logits of every output key in the later layers
  (proportional attention, PACT); the runtime reads it from here, never from the method.
- ``combine`` or None: for methods that produce ``features``, the same combination applied to *other* per-token
  features of the same inputs, (R, n, D') -> (R, k, D') (merged tokens merged with the same weights, windows
  pooled alike); :meth:`Reduction.reduce_like` uses it (e.g. Qwen3-VL's DeepStack levels follow the main tokens).

Order: on the LLM side outputs are always sorted by anchor (the sequence stays in original order); on the vision
side the method's output order is what the LLM sees (e.g. VisionZip: dominant, then contextual).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from .errors import ConfigError

__all__ = ["Reduction", "resolve_budget", "topk_per_group", "compact", "chained_anchor"]


@dataclass
class Reduction:
    anchor: torch.Tensor
    valid: torch.Tensor
    source: torch.Tensor
    features: torch.Tensor | None = None
    sizes: torch.Tensor | None = None
    proportional: bool = False
    combine: Callable[[torch.Tensor], torch.Tensor] | None = field(default=None, repr=False, compare=False)

    @property
    def num_out(self) -> torch.Tensor:
        """(R,) number of valid outputs per row."""
        return self.valid.sum(-1)

    @property
    def num_in(self) -> int:
        return self.source.shape[-1]

    def output_features(self, inputs: torch.Tensor) -> torch.Tensor:
        """(R, k, D) output features: ``features`` if the method produced them, else a gather of ``inputs``."""
        if self.features is not None:
            return self.features
        return torch.gather(inputs, 1, self.anchor.unsqueeze(-1).expand(-1, -1, inputs.shape[-1]))

    def reduce_like(self, other: torch.Tensor, what: str = "these features") -> torch.Tensor:
        """Other per-token features (R, n, D') of the same inputs reduced exactly as the main ones: a gather at
        ``anchor`` for a selection, ``combine`` for merged / pooled outputs. ValueError when the method produced
        features without saying how (``combine`` None, ConfigError): ``what`` names the features in the message."""
        if self.features is None:
            return torch.gather(other, 1, self.anchor.unsqueeze(-1).expand(-1, -1, other.shape[-1]))
        if self.combine is None:
            raise ConfigError(f"this reduction merges or pools tokens but does not say how to combine other "
                             f"per-token features alike (Reduction.combine), so {what} cannot follow it")
        return self.combine(other)

    # -- constructors -------------------------------------------------------------------------------------------
    @classmethod
    def select(cls, keep: torch.Tensor, num_in: int, valid: torch.Tensor | None = None) -> Reduction:
        """Plain pruning: keep the tokens ``keep`` (R, k) (any order; sorted here), dropping the rest."""
        if valid is None:
            valid = torch.ones_like(keep, dtype=torch.bool)
        # sort valid entries first by index; invalid ones go last
        big = torch.iinfo(keep.dtype).max
        order_key = torch.where(valid, keep, torch.full_like(keep, big))
        order_key, order = order_key.sort(dim=-1)
        keep = torch.gather(keep, 1, order)
        valid = torch.gather(valid, 1, order)
        keep = torch.where(valid, keep, torch.zeros_like(keep))
        return cls(anchor=keep, valid=valid, source=_source_from_keep(keep, valid, num_in))

    @classmethod
    def from_mask(cls, mask: torch.Tensor) -> Reduction:
        """Plain pruning from a boolean keep mask (R, n); rows may keep different counts (padded)."""
        anchor, valid = compact(mask)
        return cls(anchor=anchor, valid=valid, source=_source_from_keep(anchor, valid, mask.shape[-1]))


def chained_anchor(reductions: list[Reduction], num_out: int, rows: int, device) -> torch.Tensor:
    """(rows, num_out) input index of the first stage that each output of the last stage stands at: the anchors of
    ``reductions`` (run order) composed; padding anchors are clamped to 0. No reduction: the identity."""
    anchor = None
    for red in reversed(reductions):
        anchor = red.anchor if anchor is None else torch.gather(red.anchor, 1, anchor.clamp(min=0))
    return torch.arange(num_out, device=device).expand(rows, num_out) if anchor is None else anchor


def compact(mask: torch.Tensor, *, align: str = "left", fill: int | None = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Pack the True entries of ``mask`` (R, n), in their original order, into k columns (k: the largest count,
    at least 1): returns (index (R, k), valid (R, k)).

    ``align="left"``: each row's entries first, padding after; ``"right"``: padding first (left-padded rows, as
    ``generate`` wants). Padding columns hold ``fill``, or with ``fill=None`` the row's other positions in order
    (``index`` is then a prefix / suffix of a permutation). One host sync (k).
    """
    R, n = mask.shape
    k = max(int(mask.sum(-1).max()), 1) if mask.numel() else 1
    idx = torch.arange(n, device=mask.device).expand(R, n)
    if align == "left":
        order = torch.where(mask, idx, idx + n).argsort(dim=-1)[:, :k]
    elif align == "right":
        order = torch.where(mask, idx + n, idx).argsort(dim=-1)[:, max(n - k, 0):]
    else:
        raise ValueError(f"align must be 'left' or 'right', got {align!r}")
    valid = torch.gather(mask, 1, order)
    if fill is not None:
        order = torch.where(valid, order, torch.full_like(order, fill))
    return order, valid


def _source_from_keep(keep: torch.Tensor, valid: torch.Tensor, num_in: int) -> torch.Tensor:
    """(R, n) output slot of every input token (-1: dropped) from kept indices (R, k)."""
    rows, k = keep.shape
    source = torch.full((rows, num_in + 1), -1, dtype=torch.long, device=keep.device)
    target = torch.where(valid, keep, torch.full_like(keep, num_in))  # invalid entries go to a dummy column
    slots = torch.arange(k, device=keep.device).expand(rows, k)
    source.scatter_(1, target, slots)
    return source[:, :num_in]


def resolve_budget(budget: int | float, available: int, *, what: str = "budget") -> int:
    """Number of tokens to keep out of ``available``.

    - int ``k``: ``k`` tokens; more than available is **clamped with a warning** (documented decision: a config
      written for 576-token images still runs on a smaller image).
    - float ``f`` in (0, 1]: ``max(1, floor(f * available))``.
    """
    if available <= 0:
        return 0
    if isinstance(budget, bool):  # pragma: no cover - rejected by config validation
        raise TypeError(f"{what} must be an int or a float, not bool")
    if isinstance(budget, int):
        if budget > available:
            # Python's warning registry shows it once per call site unless the user asks for more
            warnings.warn(f"{what}={budget} is more than the {available} tokens available; keeping all {available}",
                          stacklevel=3)
            return available
        return budget
    return max(1, min(available, int(math.floor(budget * available + 1e-6))))


def topk_per_group(scores: torch.Tensor, group: torch.Tensor, k_per_group: torch.Tensor) -> torch.Tensor:
    """Boolean mask of the top ``k_per_group[g]`` entries of every group, per row, vectorised.

    scores: (R, n) float; entries with ``group < 0`` are never selected. group: (R, n) long group id in
    [0, G) (e.g. which image a visual token belongs to). k_per_group: (R, G) long. Ties are broken by the lower
    index (stable sort), so selection is deterministic.
    """
    R, n = scores.shape
    if n == 0:
        return torch.zeros_like(scores, dtype=torch.bool)
    valid = group >= 0
    s = torch.where(valid, scores.float(), torch.full_like(scores, float("-inf"), dtype=torch.float32))
    # sort by score descending (stable keeps index order on ties), then stably by group
    order = torch.sort(s, dim=-1, descending=True, stable=True).indices
    g_sorted = torch.gather(torch.where(valid, group, torch.full_like(group, torch.iinfo(group.dtype).max)), 1, order)
    order2 = torch.sort(g_sorted, dim=-1, stable=True).indices
    order = torch.gather(order, 1, order2)
    g_sorted = torch.gather(g_sorted, 1, order2)
    # rank within group = position - first position of that group
    pos = torch.arange(n, device=scores.device).expand(R, n)
    is_start = torch.ones_like(g_sorted, dtype=torch.bool)
    is_start[:, 1:] = g_sorted[:, 1:] != g_sorted[:, :-1]
    start_pos = torch.where(is_start, pos, torch.zeros_like(pos)).cummax(dim=-1).values
    rank = pos - start_pos
    g_clamped = g_sorted.clamp(max=k_per_group.shape[1] - 1) if k_per_group.shape[1] > 0 else g_sorted.clamp(max=0)
    limit = torch.gather(k_per_group, 1, g_clamped.clamp(min=0)) if k_per_group.shape[1] > 0 else torch.zeros_like(rank)
    chosen_sorted = (rank < limit) & (g_sorted != torch.iinfo(group.dtype).max)
    mask = torch.zeros_like(chosen_sorted)
    mask.scatter_(1, order, chosen_sorted)
    return mask
