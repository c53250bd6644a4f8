"""Method base classes and the contexts methods receive.

A method is a small pydantic model: its fields are the config parameters (validated, unknown keys rejected) and
it implements one job: ``reduce_vision(VisionContext) -> Reduction`` (before the LLM) and/or
``reduce_llm(LLMContext) -> Reduction`` (entering a decoder layer). The runtime applies the Reduction.
:class:`ScorerMethod` is the short form for "score the candidates, keep the top k of every image": a subclass
implements ``score(ctx)`` only (kvpress's ``ScorerPress``).

Per-run state: a method that must remember something across layers or calls returns a fresh object from
``new_state()``; the run creates it when the config is attached, hands it to ``attach(run, state)`` and passes it
as ``ctx.state``, and drops it on detach. Methods keep no state of their own (they are frozen) and vtc keeps none
at module level.
"""

from __future__ import annotations

import inspect
import math
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Annotated, Any, ClassVar, Literal

import torch
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationInfo, field_validator
from pydantic_core import PydanticCustomError

from ..errors import ConfigError
from ..layout import Layout
from ..reduction import Reduction, resolve_budget, topk_per_group

if TYPE_CHECKING:
    from ..runtime.view import RunView

__all__ = ["Budget", "MAX_SEED", "Seed", "Method", "PromptText", "ScorerMethod", "VisionContext", "VisionExtras",
           "LLMContext", "Side", "ReadsLayerBefore"]

Side = Literal["vision", "llm"]


def _check_budget(value: Any) -> int | float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(
            f"must be an int >= 1 (tokens per image) or a float in (0, 1] (keep fraction), got {value!r}"
        )
    if isinstance(value, float):
        if math.isnan(value) or not (0.0 < value <= 1.0):
            raise ValueError(
                f"a float budget is a keep fraction and must be in (0, 1], got {value!r} "
                "(use an int for a token count)"
            )
        return float(value)
    if value < 1:
        raise ValueError(f"an int budget is a token count and must be >= 1, got {value!r}")
    return int(value)


Budget = Annotated[int | float, BeforeValidator(_check_budget)]

#: the largest seed a ``torch.Generator`` takes without wrapping around (seeds are validated against it at load)
MAX_SEED = 2**63 - 1
Seed = Annotated[int, Field(ge=0, le=MAX_SEED)]


def _describe(annotation: Any) -> str:
    """A short human name of a field annotation: ``Literal[1, 2]`` -> ``one of 1, 2``."""
    if typing.get_origin(annotation) is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(annotation))
    return getattr(annotation, "__name__", None) or str(annotation).replace("typing.", "")


def _accepts(annotation: Any, kind: type) -> bool:
    """Whether a field annotation takes a ``kind`` (tuple / bool) value: ``tuple[int, int] | None`` takes a
    tuple, ``Literal[1, 2]`` no bool."""
    if annotation is kind or typing.get_origin(annotation) is kind or annotation is Any:
        return True
    if typing.get_origin(annotation) is Literal:
        return any(isinstance(a, kind) for a in typing.get_args(annotation))
    if typing.get_origin(annotation) in (typing.Union, types.UnionType, Annotated):
        return any(_accepts(a, kind) for a in typing.get_args(annotation))
    return False


@dataclass
class VisionExtras:
    """What the vision encoder can provide to scoring, computed lazily and only on request.

    Each entry is a zero-argument callable (None where the tower cannot provide it):
    - ``cls_attention``: (U, n) attention of the CLS query to each fed token in the feature layer, summed over
      heads (VisionZip's dominant score). Flash-compatible: one recomputed query row.
    - ``received_attention``: (U, n) attention each fed token receives from a mean query (towers without CLS).
    - ``keys``: (U, n, d) feature-layer keys averaged over heads (VisionZip's merge metric).
    - ``cls_token``: (U, D) the CLS hidden state of the feature layer, in the same space as ``features``.
    - ``hidden_with_cls``: (U, 1 + n, D) the feature layer's hidden states including CLS.
    Adapters may add more (``other``).
    """

    cls_attention: Callable[[], torch.Tensor] | None = None
    received_attention: Callable[[], torch.Tensor] | None = None
    keys: Callable[[], torch.Tensor] | None = None
    cls_token: Callable[[], torch.Tensor] | None = None
    hidden_with_cls: Callable[[], torch.Tensor] | None = None
    other: dict[str, Callable[[], torch.Tensor]] = field(default_factory=dict)

    def require(self, name: str, method: str) -> torch.Tensor:
        fn = getattr(self, name, None) if name in self.__dataclass_fields__ else self.other.get(name)
        if fn is None:
            raise ConfigError(
                f"method '{method}' needs '{name}' from the vision tower, which this model/input does not provide "
                f"(available: {', '.join(self.available()) or 'none'})"
            )
        try:
            return fn()
        except ConfigError as err:
            raise ConfigError(f"method '{method}' needs '{name}' from the vision tower: {err}") from None

    def available(self) -> list[str]:
        names = [n for n in ("cls_attention", "received_attention", "keys", "cls_token", "hidden_with_cls")
                 if getattr(self, n) is not None]
        return names + sorted(self.other)


@dataclass
class PromptText:
    """The prompt a vision-side stage's images belong to, for methods that read the text (``reads_prompt``).

    input_ids / attention_mask / is_visual: (B, N) of the original prompt; image_row: (G,) the batch row of every
    image (global image index, as ``VisionContext.unit_image``); instruction: what ``run.set_instruction`` set (one
    string for every row, or one per row), else None; name_or_path: the model's checkpoint (to load its tokenizer).
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    is_visual: torch.Tensor
    image_row: torch.Tensor
    instruction: str | list[str] | None = None
    name_or_path: str | None = None


@dataclass
class VisionContext:
    """Input to a vision-side method: U units (images / crops / videos) with the same layout.

    features: (U, n, D), in the space the stage asked for ('vision' = before the projector, 'llm' = after).
    """

    features: torch.Tensor
    layout: Layout
    extras: VisionExtras = field(default_factory=VisionExtras)
    space: Side = "llm"
    seed: int = 0
    #: (U,) long: which image each unit belongs to (LLaVA-NeXT crops of one image share it); None: one image per
    #: unit. Lets a method split a per-image budget over the units of an image.
    unit_image: torch.Tensor | None = None
    #: the prompt of the batch (only when a stage ``reads_prompt``, e.g. CDPruner's instruction)
    prompt: PromptText | None = None
    #: the stage's per-run state (``Method.new_state()``), None for stateless methods
    state: Any = None

    @property
    def num_units(self) -> int:
        return self.features.shape[0]

    @property
    def num_tokens(self) -> int:
        return self.features.shape[1]


@dataclass
class LLMContext:
    """Input to an LLM-side method entering decoder layer ``layer_idx`` during prefill.

    Shapes: B batch, M current slots (the survivors of earlier stages, plus left-padding slots), n visual
    candidates per row (padded), D hidden size.

    - hidden_states (B, M, D): hidden states entering the layer.
    - candidates (B, n): slot index of each prunable visual token (image-newline tokens are never candidates);
      candidate_valid (B, n) marks the real ones. image_id (B, n): which image (global index) each belongs to;
      -1 for padding.
    - slot_positions (B, M): original sequence index of every slot; slot_valid (B, M): False for pad slots
      added by vtc; token_valid (B, M): slot_valid and not user padding.
    - is_visual (B, M), sizes (B, M): current token sizes (cluster sizes after merges; 1 otherwise).
    - position_embeddings, attention_mask: the (already sliced) tensors the layer will receive.
    - captured: inputs of earlier layers captured for this method (``capture_layers``), keyed by layer index,
      each an :class:`LLMContext`-like snapshot (same fields).
    - adapter: the model adapter (``adapter.project_qk`` re-projects q / k for the rows a score needs).
    - state: the stage's per-run state (``Method.new_state()``), None for stateless methods.
    """

    layer_idx: int
    hidden_states: torch.Tensor
    candidates: torch.Tensor
    candidate_valid: torch.Tensor
    image_id: torch.Tensor
    slot_positions: torch.Tensor
    slot_valid: torch.Tensor
    token_valid: torch.Tensor
    is_visual: torch.Tensor
    sizes: torch.Tensor
    position_embeddings: Any
    attention_mask: torch.Tensor | None
    adapter: Any
    captured: dict[int, LLMContext] = field(default_factory=dict)
    # (B, max images) number of candidates of each image (for per-image budgets)
    image_counts: torch.Tensor | None = None
    seed: int = 0
    state: Any = None

    @property
    def batch_size(self) -> int:
        return self.hidden_states.shape[0]

    def candidate_states(self, hidden_states: torch.Tensor | None = None) -> torch.Tensor:
        """(B, n, D) hidden states of the candidates."""
        h = self.hidden_states if hidden_states is None else hidden_states
        return torch.gather(h, 1, self.candidates.unsqueeze(-1).expand(-1, -1, h.shape[-1]))

    def last_token_slot(self) -> torch.Tensor:
        """(B,) slot of the last real (non-padding) token: the last prompt token."""
        M = self.token_valid.shape[1]
        idx = torch.arange(M, device=self.token_valid.device).expand_as(self.token_valid)
        return torch.where(self.token_valid, idx, torch.full_like(idx, -1)).max(dim=-1).values

    def instruction_mask(self) -> torch.Tensor:
        """(B, M) real text tokens after the last visual token (the instruction / question)."""
        M = self.is_visual.shape[1]
        idx = torch.arange(M, device=self.is_visual.device).expand_as(self.is_visual)
        last_vis = torch.where(self.is_visual & self.slot_valid, idx, torch.full_like(idx, -1)).max(-1).values
        return self.token_valid & ~self.is_visual & (idx > last_vis[:, None])

    def rank_in_image(self) -> torch.Tensor:
        """(B, n) index of each candidate among its image's candidates (0 for padding)."""
        B, n = self.candidates.shape
        idx = torch.arange(n, device=self.candidates.device).expand(B, n)
        start = torch.ones_like(self.candidate_valid)
        start[:, 1:] = self.image_id[:, 1:] != self.image_id[:, :-1]
        first = torch.where(start, idx, torch.zeros_like(idx)).cummax(-1).values
        return torch.where(self.candidate_valid, idx - first, torch.zeros_like(idx))

    def budget_per_image(self, budget: int | float, what: str = "budget") -> torch.Tensor:
        """(B, G) tokens to keep per image from the per-image candidate counts."""
        counts = self.image_counts
        assert counts is not None
        flat = counts.flatten().tolist()  # one host sync per stage, not per token
        ks = [resolve_budget(budget, c, what=what) if c > 0 else 0 for c in flat]
        return torch.tensor(ks, dtype=torch.long, device=counts.device).view_as(counts)


#: fields many methods have, declared once here; a method accepts one only if it declares it again itself
#: (with its own type and default), so ``visionzip`` with ``layer: 2`` is still an unknown parameter
_COMMON_FIELDS = ("budget", "layer", "feature_space", "per")


class Method(BaseModel):
    """Base class of every method. Subclasses declare fields (= config parameters) with defaults.

    Class attributes:
    - ``sides``: where the method can run. A method that supports both runs LLM-side when ``layer`` is set.
    - ``keeps_prefix``: vision side, the output of an ordered sequence is still ordered (prefix truncation).
    - ``reads_prompt``: vision side, the method reads the prompt text (``VisionContext.prompt``).

    Fields every method may have (typed here, accepted in a config only where the method declares them again):
    ``budget``, ``layer`` (LLM side: the 0-indexed decoder layer the survivors enter), ``feature_space``
    (vision side: reduce before the projector, ``vision``, or after it, ``llm``), ``per`` (LLaVA-NeXT: a budget per
    ``crop`` or per ``image``).
    """

    # strict: ``layer: true``, ``layer: "2"`` or ``iters: 2.0`` are refused instead of coerced (ints accept ints
    # only, floats ints or floats, bools bools); YAML lists are accepted for tuple fields (below)
    model_config = ConfigDict(extra="forbid", frozen=True, arbitrary_types_allowed=True, strict=True)

    sides: ClassVar[tuple[Side, ...]] = ("vision",)
    keeps_prefix: ClassVar[bool] = False
    reads_prompt: ClassVar[bool] = False

    method: str
    budget: Budget | None = Field(None, exclude=True)
    layer: int | None = Field(None, exclude=True)
    feature_space: Side = Field("llm", exclude=True)
    per: Literal["crop", "image"] = Field("crop", exclude=True)

    @field_validator(*_COMMON_FIELDS, mode="before")
    @classmethod
    def _declared(cls, value: Any, info: ValidationInfo) -> Any:
        if info.field_name not in cls.parameters():
            raise PydanticCustomError("extra_forbidden", "Extra inputs are not permitted")
        return value

    @classmethod
    def parameters(cls) -> tuple[str, ...]:
        """The config keys this method accepts (its fields, the common ones only where it declares them)."""
        own = cls.__mro__[:cls.__mro__.index(Method)]
        return tuple(name for name in cls.model_fields
                     if name not in _COMMON_FIELDS or any(name in inspect.get_annotations(c) for c in own))

    @field_validator("*", mode="before")
    @classmethod
    def _strict_input(cls, value: Any, info: ValidationInfo) -> Any:
        """YAML has no tuples: a list given for a tuple field is read as one (its items stay strictly typed).
        A bool is refused where the field takes none (``Literal[1, 2]`` would otherwise take ``True`` as 1)."""
        annotation = cls.model_fields[info.field_name].annotation if info.field_name else Any
        if isinstance(value, list) and _accepts(annotation, tuple):
            return tuple(value)
        literal = typing.get_origin(annotation) is Literal  # strict mode refuses bools everywhere else already
        if isinstance(value, bool) and literal and not _accepts(annotation, bool):
            raise ValueError(f"must not be a bool (expected {_describe(annotation)})")
        return value

    # ---- placement -------------------------------------------------------------------------------------------
    @property
    def side(self) -> Side:
        if "llm" in self.sides and ("vision" not in self.sides or self.layer is not None):
            return "llm"
        return "vision"

    @property
    def requires_extras(self) -> tuple[str, ...]:
        """Vision-side: tower extras this stage cannot run without (it needs one of them); adapters that know what
        their tower provides refuse the stage when attached otherwise. Default: none."""
        return ()

    @property
    def space(self) -> Side:
        """Vision-side only: 'vision' reduces the tower features before the projector, 'llm' after."""
        return self.feature_space

    @property
    def needs(self) -> tuple[str, ...]:
        """Vision side: the :class:`VisionExtras` the method reads (the tower computes only those)."""
        return ()

    def llm_layers(self) -> tuple[int, ...]:
        """0-indexed decoder layers this stage acts at (the survivors enter these layers)."""
        return () if self.layer is None else (int(self.layer),)

    def capture_layers(self) -> tuple[int, ...]:
        """Layers whose (post-reduction) inputs the method needs later (e.g. FastV: layer L - 1)."""
        return ()

    def validate_for_model(self, num_layers: int) -> None:
        """Raise ConfigError when the stage does not fit the model (called at attach time)."""
        for layer in self.llm_layers():
            if not (1 <= layer < num_layers):
                raise ConfigError(
                    f"layer={layer} is out of range for a model with {num_layers} decoder layers "
                    f"(allowed: 1..{num_layers - 1}; use a vision-side stage to reduce before the LLM)"
                )

    def check_layout(self, layout: Layout) -> None:
        """Raise ConfigError if this method cannot run on ``layout``."""

    # ---- per-run state and hooks -----------------------------------------------------------------------------
    def new_state(self) -> Any:
        """A fresh per-run state object (created at attach, passed as ``ctx.state``), or None (default)."""
        return None

    def attach(self, run: RunView, state: Any) -> list[Any]:
        """Extra per-instance hooks the method needs (returns removable handles). Default: none.

        ``run`` is a read-only view of the run (adapter, prefill phase, current slots); ``state`` is this stage's
        ``new_state()``.
        """
        return []

    # ---- the maths -------------------------------------------------------------------------------------------
    def reduce_vision(self, ctx: VisionContext) -> Reduction:  # pragma: no cover - overridden
        raise ConfigError(f"method '{self.method}' cannot run vision-side")

    def reduce_llm(self, ctx: LLMContext) -> Reduction:  # pragma: no cover - overridden
        raise ConfigError(f"method '{self.method}' cannot run LLM-side")

    def output_layout(self, layout: Layout, num_out: int) -> Layout:
        """Layout of the vision-side output (default: an unordered sequence; pooling returns a grid)."""
        from ..layout import Sequence

        return Sequence(num_out, is_ordered=layout.ordered and self.keeps_prefix)


class ReadsLayerBefore:
    """Mixin of an LLM-side method at one decoder layer ``layer`` (the survivors enter it) that reads layer L-1's
    input, captured for it (FastV's attention row, DART's key norms). Put it before the :class:`Method` base."""

    sides = ("llm",)

    def capture_layers(self) -> tuple[int, ...]:
        return (self.layer - 1,)


class ScorerMethod(Method):
    """Score the candidates, keep the top k of every image (kvpress's ``ScorerPress``).

    A subclass implements ``score(ctx)``: LLM side (B, n) over ``ctx.candidates``, vision side (U, n) over each
    unit's tokens; higher is kept, ties go to the lower index, survivors stay in original order. It declares a
    ``budget`` field (tokens or keep fraction per image, per unit on the vision side) or overrides
    ``keep_per_image``.
    """

    def score(self, ctx: Any) -> torch.Tensor:  # pragma: no cover - overridden
        raise NotImplementedError(f"{type(self).__name__}.score")

    def keep_per_image(self, ctx: LLMContext) -> torch.Tensor:
        """(B, G) number of candidates to keep of every image (default: ``budget``)."""
        return ctx.budget_per_image(self.budget)

    def keep_mask(self, ctx: LLMContext, scores: torch.Tensor) -> torch.Tensor:
        """(B, n) bool: the top ``keep_per_image`` candidates of every image by ``scores`` (B, n)."""
        group = torch.where(ctx.candidate_valid, ctx.image_id, torch.full_like(ctx.image_id, -1))
        return topk_per_group(scores, group, self.keep_per_image(ctx))

    def reduce_llm(self, ctx: LLMContext) -> Reduction:
        return Reduction.from_mask(self.keep_mask(ctx, self.score(ctx)))

    def reduce_vision(self, ctx: VisionContext) -> Reduction:
        n = ctx.num_tokens
        k = resolve_budget(self.budget, n)
        keep = torch.sort(self.score(ctx).float(), dim=-1, descending=True, stable=True).indices[:, :k]
        return Reduction.select(keep, n)
