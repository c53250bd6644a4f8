"""Model adapters: the only place that knows a model family.

An adapter answers, for one model instance:
- where the decoder layers are and how to re-project q / k rows at a layer (norm, projections, RoPE);
- which sequence positions are visual tokens (and which are never pruned, e.g. LLaVA-NeXT newlines);
- how to run the vision encoder to get per-unit features (+ scoring extras) and how to project them;
- how per-image reduced features are packed back (newlines, positions) for the LLM.
"""

from __future__ import annotations

import dataclasses
import inspect
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

from ..errors import ConfigError
from ..layout import Layout
from ..methods.base import VisionExtras
from ..scoring import apply_rope

__all__ = ["ModelAdapter", "TokenMap", "VisualGroup", "ImageFeatures", "cache_kwarg_name", "precomputed_counts",
           "pixel_input"]


@dataclass
class TokenMap:
    """Where the visual tokens of a batch sit. All (B, N).

    is_visual: placeholder positions; image_id: global image index per visual token (-1 for text);
    protected: visual positions that must never be pruned (e.g. image_newline).
    """

    is_visual: torch.Tensor
    image_id: torch.Tensor
    protected: torch.Tensor

    @classmethod
    def from_placeholders(cls, is_visual: torch.Tensor, tokens_per_image: list[int] | None = None) -> TokenMap:
        """Image ids by counting placeholders in (row-major) order; ``tokens_per_image`` splits adjacent images."""
        flat = is_visual.flatten().long()
        rank = flat.cumsum(0) - 1  # running index of each placeholder over the batch
        if tokens_per_image:
            bounds = torch.tensor(tokens_per_image, device=is_visual.device).cumsum(0)
            img = torch.searchsorted(bounds, rank, right=True)
        else:
            # one image per contiguous run
            starts = flat.clone()
            starts[1:] = flat[1:] & (1 - flat[:-1])
            img = starts.cumsum(0) - 1
        image_id = torch.where(flat.bool(), img, torch.full_like(img, -1)).view_as(is_visual)
        return cls(is_visual=is_visual, image_id=image_id, protected=torch.zeros_like(is_visual))

    def repeat_rows(self, repeats: int) -> TokenMap:
        """Every row ``repeats`` times in a row (how ``generate`` expands a batch for beams and
        ``num_return_sequences``); each copy's images get their own global ids, in row-major order."""
        is_visual = self.is_visual.repeat_interleave(repeats, dim=0)
        image_id = self.image_id.repeat_interleave(repeats, dim=0)
        first = torch.where(is_visual, image_id, torch.full_like(image_id, image_id.numel())).amin(-1, keepdim=True)
        count = torch.where(is_visual, image_id - first + 1, torch.zeros_like(image_id)).amax(-1, keepdim=True)
        offset = count.cumsum(0) - count
        image_id = torch.where(is_visual, image_id - first + offset, torch.full_like(image_id, -1))
        return dataclasses.replace(self, is_visual=is_visual, image_id=image_id,
                                   protected=self.protected.repeat_interleave(repeats, dim=0))


@dataclass
class VisualGroup:
    """U units that share one layout, ready for vision-side methods.

    features: (U, n, Dv) tower features in the space the model feeds the projector (CLS dropped if the model
    drops it). unit_image: (U,) which image each unit belongs to. unit_part: (U,) index of the unit inside
    its image (crop index / 0). out_layout: set by the vision runtime after the stages ran: the layout of the
    reduced units (e.g. ``Grid(h', w')`` after pooling, ``Sequence(k)`` after pruning), for ``pack_images``.
    space: ``"vision"`` (features before the projector; the runtime projects them) or ``"llm"`` (already in the
    LLM's embedding space, e.g. OneVision's pooled video frames: ``project`` is not applied to them).
    """

    features: torch.Tensor
    layout: Layout
    unit_image: list[int]
    unit_part: list[int]
    extras: VisionExtras = field(default_factory=VisionExtras)
    out_layout: Layout | None = None
    space: str = "vision"


@dataclass
class ImageFeatures:
    """One image's features for the LLM after reduction: (k, Dt) embeddings, (k,) protected flags, and
    optional per-token info for positions (e.g. M-RoPE (3, k) ids) and drawing (source map per unit).

    token_ids: (k,) the prompt id of every packed position, for families whose structural tokens are ordinary
    prompt tokens that the rebuilt prompt must hold (Mistral 3's ``[IMG_BREAK]`` / ``[IMG_END]``; their rows of
    ``embeds`` are those tokens' embeddings). None: every position keeps the id it had (the placeholder).

    runs: for an image whose placeholders are several runs separated by text tokens (SmolVLM's sub-images with
    row / column tokens between them), the tokens each run keeps, in order (summing to k): the rebuilt prompt keeps
    the first ``runs[j]`` placeholders of run j. None: the first k placeholders of the image."""

    embeds: torch.Tensor
    protected: torch.Tensor
    positions: torch.Tensor | None = None
    token_ids: torch.Tensor | None = None
    runs: list[int] | None = None
    #: (k, D') other per-token features of the same tokens, reduced alike (Qwen3-VL: its DeepStack levels side by side)
    aux: torch.Tensor | None = None


def precomputed_counts(kwargs: dict, modality: str = "image") -> list[int] | None:
    """Tokens per image of features ``generate`` precomputed and passes as ``mm_encoder_outputs``
    (transformers >= 5.2x computes the vision features before the first forward), or None."""
    mm = kwargs.get("mm_encoder_outputs")
    out = mm.get(modality) if isinstance(mm, dict) else None
    feats = getattr(out, "pooler_output", None) if out is not None else None
    if feats is None:
        return None
    if isinstance(feats, torch.Tensor):
        return [feats.shape[-2]] * feats.shape[0] if feats.dim() == 3 else [feats.shape[0]]
    return [int(f.shape[0]) for f in feats]


def pixel_input(kwargs: dict, key: str, family: str, dims: tuple[str, ...], note: str = "") -> torch.Tensor | None:
    """``kwargs[key]`` (None when absent), refused with a ConfigError naming the field and the shape it must have
    (``dims``, e.g. ``("videos", "frames", "C", "H", "W")``) unless it has that many dimensions."""
    pv = kwargs.get(key)
    if pv is not None and pv.dim() != len(dims):
        raise ConfigError(f"{family}: {key} must be ({', '.join(dims)}){note}, got shape {tuple(pv.shape)}")
    return pv


def cache_kwarg_name(fn) -> str:
    """The name of the cache keyword: 'cache' (transformers >= 5.2x) or 'past_key_values' (older 5.x)."""
    params = inspect.signature(fn).parameters
    return "cache" if "cache" in params else "past_key_values"


class ModelAdapter:
    """Base adapter. Subclasses set ``family`` and ``model_class_names`` and fill in the vision side."""

    family: ClassVar[str] = "base"
    model_class_names: ClassVar[tuple[str, ...]] = ()
    #: names of forward kwargs that carry visual inputs (dropped once vtc has turned them into embeddings)
    visual_input_keys: ClassVar[tuple[str, ...]] = ("pixel_values",)
    #: kwargs only the vision path reads (dropped together with the visual inputs)
    vision_only_keys: ClassVar[tuple[str, ...]] = ()
    #: LLM-side decoding builds the masks of pruned layers from positions (causal, padding, sliding window) instead
    #: of re-indexing the model's (for models whose decode masks are sized against one cache layer per layer type)
    decode_masks_from_positions: ClassVar[bool] = False
    #: the prompt rebuilt by vision-side stages is fed as ids + ``mm_encoder_outputs`` (:meth:`prompt_kwargs`);
    #: where the model's forward has no such argument (transformers 5.17) the features go in through the base
    #: model's own getters instead (:attr:`encoder_getters`, :class:`vtc.runtime.feed.FeatureFeed`)
    feeds_mm_encoder_outputs: ClassVar[bool] = False
    #: for ``feeds_mm_encoder_outputs`` on a forward without that argument: per kind of ``mm_encoder_outputs``
    #: entry, the forward argument that makes the model encode that kind and the base model's method it calls to
    #: do so (vtc sets that method per instance while attached; :meth:`encoder_rows` / :meth:`encoder_output`)
    encoder_getters: ClassVar[dict[str, tuple[str, str]]] = {"image": ("pixel_values", "get_image_features")}

    def __init__(self, model: nn.Module) -> None:
        self.model = model

    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        names = {c.__name__ for c in type(model).__mro__}
        return any(n in names for n in cls.model_class_names)

    # ---- language model -----------------------------------------------------------------------------------------
    @property
    def inner(self) -> nn.Module:
        """The multimodal base model (``model.model``)."""
        return self.model.model

    @property
    def language_model(self) -> nn.Module:
        return self.inner.language_model

    @property
    def text_config(self):
        return self.model.config.get_text_config()

    def decoder_layers(self) -> nn.ModuleList:
        return self.language_model.layers

    def num_layers(self) -> int:
        return len(self.decoder_layers())

    def attn_implementation(self) -> str:
        return getattr(self.text_config, "_attn_implementation", None) or "eager"

    def embed_tokens(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model.get_input_embeddings()(input_ids)

    def rope_rows(self, x: torch.Tensor, position_embeddings: Any, rows: torch.Tensor | None) -> torch.Tensor:
        """Apply the model's RoPE to x (B, h, R, d) for slot rows (B, R) (None: all slots)."""
        cos, sin = position_embeddings
        if cos.dim() != 3:
            raise NotImplementedError(f"{self.family}: unexpected rotary table shape {tuple(cos.shape)}")
        B = x.shape[0]
        cos = cos.expand(B, -1, -1)
        sin = sin.expand(B, -1, -1)
        if rows is not None:
            idx = rows.unsqueeze(-1).expand(-1, -1, cos.shape[-1])
            cos = torch.gather(cos, 1, idx)
            sin = torch.gather(sin, 1, idx)
        return apply_rope(x, cos, sin)

    def project_qk(
        self,
        layer_idx: int,
        hidden_states: torch.Tensor,
        position_embeddings: Any,
        query_rows: torch.Tensor | None = None,
        *,
        query_states: torch.Tensor | None = None,
        rope: bool = True,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Re-project queries for a few rows and keys for all rows at decoder layer ``layer_idx``.

        hidden_states: (B, M, D) the layer's input (before its input norm). query_rows: (B, R) slot indices, or
        None with ``query_states`` (B, R, D) given directly in the normed space (e.g. PACT's mean query).
        Returns q (B, h, R, d) and k (B, h_kv, M, d), with RoPE applied when ``rope``. A per-head ``q_norm`` /
        ``k_norm`` of the attention module (Qwen3, Gemma 3) is applied before RoPE, as the model does.
        """
        attn = self.decoder_layers()[layer_idx].self_attn
        x = self.input_norm(layer_idx, hidden_states)
        B, M, _ = x.shape
        head_dim = attn.head_dim
        q_norm, k_norm = getattr(attn, "q_norm", None) or nn.Identity(), getattr(attn, "k_norm", None) or nn.Identity()
        k = k_norm(attn.k_proj(x).view(B, M, -1, head_dim)).transpose(1, 2)
        if query_states is None:
            assert query_rows is not None
            xq = torch.gather(x, 1, query_rows.unsqueeze(-1).expand(-1, -1, x.shape[-1]))
        else:
            xq = query_states
        R = xq.shape[1]
        q = q_norm(attn.q_proj(xq).view(B, R, -1, head_dim)).transpose(1, 2)
        if rope:
            k = self.rope_rows(k, position_embeddings, None)
            if query_rows is not None:
                q = self.rope_rows(q, position_embeddings, query_rows)
        return q, k

    def sliding_window(self, layer_idx: int) -> int | None:
        """The sliding window of decoder layer ``layer_idx`` (a key at position p is visible from q when
        ``q - p < window``), None for full attention."""
        return None

    def prompt_kwargs(self, prompt, kwargs: dict) -> dict:
        """Extra forward kwargs for a prompt rebuilt by vision-side reduction (``prompt``: a
        :class:`vtc.runtime.vision.RebuiltPrompt`; ``kwargs``: the original call's), e.g. Gemma 3's token_type_ids.
        Returning ``input_ids`` feeds the rebuilt ids (and whatever else is returned, e.g. the features as
        ``mm_encoder_outputs``) instead of ``inputs_embeds``. Default: none."""
        return {}

    def takes_mm_encoder_outputs(self) -> bool:
        """The base model's forward takes precomputed features as ``mm_encoder_outputs`` (transformers >= 5.18)."""
        return "mm_encoder_outputs" in inspect.signature(self.inner.forward).parameters

    def encoder_rows(self, kind: str, output) -> list[torch.Tensor]:
        """One ``mm_encoder_outputs`` entry of :meth:`prompt_kwargs` as per-token tensors (N, d_i), rows in the
        placeholder order of its kind (so ``generate``'s expansion can gather them per batch row). Default: the
        flat ``pooler_output``."""
        feats = output.pooler_output
        return [feats if isinstance(feats, torch.Tensor) else torch.cat(list(feats))]

    def encoder_output(self, kind: str, rows: list[torch.Tensor]):
        """What the base model's ``get_<kind>_features`` returns for the features ``rows`` (:meth:`encoder_rows`'
        form) on the installed transformers, for a forward without ``mm_encoder_outputs``. Default: the flat
        features as ``pooler_output``."""
        from transformers.modeling_outputs import BaseModelOutputWithPooling

        return BaseModelOutputWithPooling(pooler_output=rows[0])

    def input_norm(self, layer_idx: int, hidden_states: torch.Tensor) -> torch.Tensor:
        """Decoder layer ``layer_idx``'s own input norm applied to ``hidden_states`` (B, M, D) (the space q / k
        are projected from; e.g. PACT's mean query is averaged here)."""
        return self.decoder_layers()[layer_idx].input_layernorm(hidden_states)

    def final_norm(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """The LM's final norm (before the LM head) applied to ``hidden_states`` (B, M, D) (DART's similarity
        space)."""
        return self.language_model.norm(hidden_states)

    def attention_scale(self, layer_idx: int) -> float:
        return float(self.decoder_layers()[layer_idx].self_attn.scaling)

    # ---- visual tokens ------------------------------------------------------------------------------------------
    def has_visual_inputs(self, kwargs: dict) -> bool:
        return any(kwargs.get(k) is not None for k in self.visual_input_keys)

    def token_map(self, input_ids: torch.Tensor, kwargs: dict) -> TokenMap:
        """Visual token positions of a prompt. Default: ``image_token_id`` placeholders, one image per run."""
        image_token_id = self.model.config.image_token_id
        return TokenMap.from_placeholders(input_ids == image_token_id, self.tokens_per_image(kwargs))

    def tokens_per_image(self, kwargs: dict) -> list[int] | None:
        """Placeholder count of each image in order, when adjacent images must be told apart."""
        return precomputed_counts(kwargs, "image")

    def unit_layouts(self, kwargs: dict, image: int) -> list[Layout]:
        """Layouts of the units (crops / frames / the image) of image ``image`` in its original token order,
        for drawing. Default: one unordered sequence of the image's placeholder count."""
        counts = self.tokens_per_image(kwargs)
        if counts is None:
            raise NotImplementedError(f"{self.family}: unit_layouts needs the visual inputs")
        from ..layout import Sequence

        return [Sequence(counts[image])]

    def picture_layouts(self, kwargs: dict, image: int, side: str = "vision") -> list[Layout]:
        """Layouts for drawing image ``image`` (``vtc show``): ``side="vision"`` after vision-side stages,
        ``"llm"`` for LLM-side stages only. Default: :meth:`unit_layouts` (families with crops override).
        ``kwargs["vtc_image_sizes"]`` (set by ``vtc show``): the (H, W) px of each image, for families whose inputs
        do not carry the crop arrangement (InternVL's tiles)."""
        return self.unit_layouts(kwargs, image)

    def placeholder_token_id(self) -> int:
        return self.model.config.image_token_id

    def placeholder_mask(self, input_ids: torch.Tensor) -> torch.Tensor:
        """(B, N) bool: visual placeholder tokens (families with several kinds, e.g. image + video, override)."""
        return input_ids == self.placeholder_token_id()

    def placeholder_groups(self, input_ids: torch.Tensor, kwargs: dict) -> list[tuple[str, torch.Tensor, list[int]]]:
        """Per kind of visual input in the prompt: (kind, (B, N) bool placeholder mask, placeholder count each item
        of that kind needs, in prompt order). Default: images, counted by :meth:`tokens_per_image`."""
        counts = self.tokens_per_image(kwargs)
        return [] if counts is None else [("image", input_ids == self.placeholder_token_id(), counts)]

    def check_placeholders(self, input_ids: torch.Tensor, kwargs: dict) -> None:
        """Raise :class:`vtc.ConfigError` (a ``ValueError``) when the prompt's placeholders do not match the visual
        inputs, before any vision-side stage runs: the model's own check (total count, in its wording), and vtc's
        per-item check (every run of placeholders in a row holds whole images / videos; a reduction per image
        needs to know where each one sits)."""
        for kind, mask, counts in self.placeholder_groups(input_ids, kwargs):
            rows = [int(c) for c in mask.sum(-1).tolist()]
            need = torch.tensor(counts, dtype=torch.long, device=mask.device)
            each = f"{len(counts)} x {counts[0]}" if len(set(counts)) == 1 else str(counts)
            context = (f"vtc, {self.family}: the prompt rows hold {rows} {kind} placeholder tokens, the {len(counts)} "
                       f"{kind}(s) given need {each}; build the prompt with the model's processor")
            if sum(rows) != int(need.sum()):
                raise ConfigError(f"{kind.capitalize()} features and {kind} tokens do not match, tokens: {sum(rows)}, "
                                  f"features: {int(need.sum())} ({context})")
            # the running placeholder count at the end of every run (runs never cross rows) must fall on an item
            # boundary; otherwise an item is split between runs or rows
            nxt = torch.zeros_like(mask)
            nxt[:, :-1] = mask[:, 1:]
            ends = (mask & ~nxt).flatten()
            running = mask.flatten().long().cumsum(0)[ends]
            whole = torch.isin(running, need.cumsum(0))
            if not bool(whole.all()):
                bad = int((~whole).long().argmax())
                row = int(ends.nonzero()[bad, 0]) // mask.shape[1]
                raise ConfigError(f"{kind.capitalize()} features and {kind} tokens do not match in row {row}: a run "
                                  f"of {kind} placeholder tokens ends inside a {kind} ({context})")

    def attach(self, run) -> list:
        """Per-instance hooks this family needs while a run is attached (handles with ``remove()``, removed with
        the run's); ``run`` is the run's read-only :class:`vtc.runtime.view.RunView`. Default: none."""
        return []

    # ---- vision side (overridden per family) --------------------------------------------------------------------
    def vision_extras_available(self) -> frozenset[str] | None:
        """Names of the :class:`VisionExtras` entries this model's tower provides (None: not known in advance)."""
        return None

    def check_stage(self, stage) -> None:
        """Refuse, when attached, a stage this family cannot run (ConfigError saying why). Default: a vision-side
        stage whose ``requires_extras`` (alternatives) are all missing from :meth:`vision_extras_available`, and any
        vision-side stage of a ``feeds_mm_encoder_outputs`` family whose forward has no ``mm_encoder_outputs`` and
        whose base model lacks the getters the features would go through instead."""
        have = self.vision_extras_available()
        needs = set(stage.requires_extras)
        if stage.side == "vision" and have is not None and needs and not needs & have:
            why = " (the vision tower has no CLS token)" if needs <= {"cls_attention", "cls_token",
                                                                      "hidden_with_cls"} else ""
            if needs == {"clip_patch_states"}:
                why = " (its vision tower is not a CLIP tower: no CLIP image space for the text encoder)"
            raise ConfigError(
                f"{self.family} cannot provide {', '.join(sorted(needs))}{why}; it provides "
                f"{', '.join(sorted(have)) or 'nothing'}"
            )
        if stage.side == "vision" and self.feeds_mm_encoder_outputs and not self.takes_mm_encoder_outputs():
            missing = [name for _arg, name in self.encoder_getters.values() if not callable(getattr(self.inner, name,
                                                                                                    None))]
            if missing:
                raise ConfigError(f"{self.family}: vision-side stages feed the reduced features as "
                                  f"mm_encoder_outputs or, where the forward has no such argument, through the base "
                                  f"model's {', '.join(missing)}; this model has neither (LLM-side stages work)")

    def encode_images(self, kwargs: dict) -> list[VisualGroup]:  # pragma: no cover
        raise NotImplementedError(f"{self.family}: vision-side stages are not supported by this adapter yet")

    def project(self, features: torch.Tensor) -> torch.Tensor:  # pragma: no cover
        raise NotImplementedError

    def pack_images(self, groups_out: list[tuple[VisualGroup, torch.Tensor, Any]], kwargs: dict) -> list[ImageFeatures]:
        """Per-image LLM features from the reduced units. Default: concatenate each image's units in part order."""
        per_image: dict[int, list[tuple[int, torch.Tensor]]] = {}
        for group, feats, _red in groups_out:
            for u, (img, part) in enumerate(zip(group.unit_image, group.unit_part)):
                per_image.setdefault(img, []).append((part, feats[u]))
        out = []
        for img in sorted(per_image):
            parts = [f for _, f in sorted(per_image[img], key=lambda t: t[0])]
            emb = torch.cat(parts, dim=0)
            out.append(ImageFeatures(emb, torch.zeros(emb.shape[0], dtype=torch.bool, device=emb.device)))
        return out

    # ---- synthetic inputs (benchmarks, tests) --------------------------------------------------------------------
    def dummy_images(self, n: int, image_size: tuple[int, int] | None,
                     generator: torch.Generator) -> tuple[list[list[int]], dict[str, torch.Tensor]]:
        """``n`` random images of ``image_size`` (H, W) px (None: the family's default): the placeholder ids each
        occupies in the prompt, and the forward kwargs that carry them (CPU tensors). Family-specific."""
        raise NotImplementedError(f"{type(self).__name__} has no dummy_images")

    def _tower_size_images(self, n: int, tokens_per_image: int,
                           generator: torch.Generator) -> tuple[list[list[int]], dict[str, torch.Tensor]]:
        """:meth:`dummy_images` of a family whose processor resizes every image to the tower's resolution
        (``vision_config.image_size``): ``n`` random images of that size, ``tokens_per_image`` placeholders each."""
        size = self.model.config.vision_config.image_size
        pixel_values = torch.randn(n, 3, size, size, generator=generator)
        return [[self.placeholder_token_id()] * tokens_per_image] * n, {"pixel_values": pixel_values}

    def dummy_inputs(self, texts: list[tuple[list[int], list[int]]], *, image_size: tuple[int, int] | None = None,
                     generator: torch.Generator | None = None, pad_id: int = 0) -> dict[str, Any]:
        """Forward kwargs for the rows ``pre + <one random image> + post`` of ``texts`` ((pre, post) id lists),
        left-padded with ``pad_id``, on the model's device and dtype."""
        g = generator if generator is not None else torch.Generator().manual_seed(0)
        placeholders, visual = self.dummy_images(len(texts), image_size, g)
        rows = [torch.tensor([*pre, *ph, *post], dtype=torch.long) for (pre, post), ph in zip(texts, placeholders)]
        L = max(len(r) for r in rows)
        ids = torch.full((len(rows), L), pad_id, dtype=torch.long)
        mask = torch.zeros(len(rows), L, dtype=torch.long)
        for b, r in enumerate(rows):
            ids[b, L - len(r):] = r
            mask[b, L - len(r):] = 1
        p = next(self.model.parameters())
        out: dict[str, Any] = {k: v.to(p.device, p.dtype) if v.is_floating_point() else v.to(p.device)
                               for k, v in visual.items()}
        out["input_ids"], out["attention_mask"] = ids.to(p.device), mask.to(p.device)
        return out

    def position_ids_for(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                         images: list[ImageFeatures], kwargs: dict) -> torch.Tensor | None:
        """Position ids for a rebuilt (vision-reduced) prompt; None lets the model use its default."""
        return None
