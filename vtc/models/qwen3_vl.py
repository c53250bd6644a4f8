"""Qwen3-VL (``Qwen3VLForConditionalGeneration``; ``Qwen3VLMoeForConditionalGeneration`` runs the same code).

Built on :mod:`vtc.models.qwen2_vl` (units, M-RoPE positions, tower scores, merged 2x2 tokens); what differs:

- **DeepStack.** The vision tower also returns the merged features of 3 intermediate blocks
  (``deepstack_visual_indexes``, each through its own PatchMerger); the language model adds level i to the hidden
  states at the visual positions right after decoder layer i (``visual_pos_masks``, ``deepstack_visual_embeds``).
  *Vision side*: the levels travel with the main merged tokens as side features (``ImageFeatures.aux``) and every
  stage's :class:`~vtc.reduction.Reduction` is applied to them exactly as to the main tokens
  (:meth:`~vtc.reduction.Reduction.reduce_like`: kept tokens gathered, merged tokens merged with the same
  weights, windows pooled alike); the rebuilt prompt is fed as ids + ``mm_encoder_outputs`` holding the reduced
  main and DeepStack features, so the model builds its own masks over the shorter prompt (transformers 5.17, whose
  forward has no ``mm_encoder_outputs``: the same features are what the base model's ``get_image_features`` /
  ``get_video_features`` return for that forward, :mod:`vtc.runtime.feed`). *LLM side*: when a
  stage acts at a layer that still receives DeepStack input (``layer < len(deepstack_visual_indexes)``), vtc
  takes the model's DeepStack input for the prefill and adds it itself after each of those layers, the mask and
  the embeddings sliced to the slots in force there (survivors keep their own level features; a token an
  LLM-side merge keeps takes its anchor's). The arithmetic is the model's (same cast, same add), so budget = all
  gives its logits exactly.
- **Interleaved M-RoPE.** ``mrope_section`` frequencies interleaved T/H/W (transformers composes the table; a
  per-axis (3, B, N, d) table is composed here, :func:`~vtc.models.qwen_vision.compose_mrope_interleaved`).
  Positions as for Qwen2-VL: LLM-side survivors keep their triples, the vision-side prompt gets every kept
  token's anchor triple and text keeps its own.
- **Video with timestamps.** The processor writes ``<t seconds><|vision_start|><|video_pad|> x n<|vision_end|>``
  per frame group (a temporal patch group of ``temporal_patch_size`` frames): every frame group is a unit (a
  budget applies per frame group) and its own placeholder run; the timestamps are text (never pruned, never
  counted). A whole-video unit (``video_units="video"``) would span the timestamp text and is refused.
"""

from __future__ import annotations

import inspect
from typing import Literal

import torch

from ..errors import ConfigError
from . import register_adapter
from .base import ModelAdapter
from .qwen2_vl import Qwen2VLAdapter
from .qwen_vision import compose_mrope_interleaved

__all__ = ["Qwen3VLAdapter", "DeepStackHooks"]


@register_adapter
class Qwen3VLAdapter(Qwen2VLAdapter):
    """Adapter for Qwen3-VL (dense and MoE); see the module docstring."""

    family = "qwen3_vl"
    model_class_names = ("Qwen3VLForConditionalGeneration", "Qwen3VLMoeForConditionalGeneration")
    feeds_mm_encoder_outputs = True  # the reduced main + DeepStack features (5.17: through the getters)
    encoder_getters = {"image": ("pixel_values", "get_image_features"),
                       "video": ("pixel_values_videos", "get_video_features")}

    def __init__(self, model, video_units: Literal["frame"] = "frame") -> None:
        if video_units != "frame":
            raise ConfigError(f"{self.family}: video_units={video_units!r}; allowed: 'frame' (Qwen3-VL writes a "
                              "timestamp between the frame groups of a video, so a whole-video unit would span text)")
        super().__init__(model, video_units)

    @classmethod
    def matches(cls, model) -> bool:
        return ModelAdapter.matches.__func__(cls, model)

    @property
    def deepstack_levels(self) -> int:
        return len(self.model.config.vision_config.deepstack_visual_indexes)

    def rope_rows(self, x: torch.Tensor, position_embeddings, rows: torch.Tensor | None) -> torch.Tensor:
        cos, sin = position_embeddings
        if cos.dim() == 4:
            sec = self._mrope_section()
            cos, sin = compose_mrope_interleaved(cos, sec), compose_mrope_interleaved(sin, sec)
        return ModelAdapter.rope_rows(self, x, (cos, sin), rows)

    def placeholder_groups(self, input_ids: torch.Tensor, kwargs: dict) -> list[tuple[str, torch.Tensor, list[int]]]:
        """As Qwen2-VL's, but a video's items are its frame groups (each is its own placeholder run)."""
        out = []
        for kind, mask, counts in super().placeholder_groups(input_ids, kwargs):
            if kind == "video":
                grid = kwargs["video_grid_thw"]
                per_frame = grid[:, 1:].prod(-1) // self.merge_size ** 2
                counts = [int(n) for n in per_frame.repeat_interleave(grid[:, 0]).tolist()]
            out.append((kind, mask, counts))
        return out

    # ---- DeepStack, vision side ---------------------------------------------------------------------------------
    def _side_features(self, out) -> torch.Tensor:
        """The DeepStack levels of the tower call, side by side: (T, L * D)."""
        levels = getattr(out, "deepstack_features", None)
        if not levels:
            raise ConfigError(f"{self.family}: the vision tower returned no deepstack_features")
        return torch.cat(list(levels), dim=-1)

    def prompt_kwargs(self, prompt, kwargs: dict) -> dict:
        """The rebuilt prompt as ids + ``mm_encoder_outputs`` (per kind, one tensor per unit: the reduced main
        features and each DeepStack level), so the model scatters both itself and ``generate`` can expand them per
        row for beams; positions are the explicit (3, B, N') ids of ``position_ids_for``."""
        from transformers.models.qwen3_vl.modeling_qwen3_vl import BaseModelOutputWithDeepstackFeatures

        vis = prompt.token_map.is_visual
        sizes = [im.embeds.shape[0] for im in prompt.images]
        main = prompt.inputs_embeds[vis].split(sizes)  # unit order = sequence order (row-major)
        levels = len(self.model.config.vision_config.deepstack_visual_indexes)
        side = [im.aux.to(m.device).chunk(levels, dim=-1) for im, m in zip(prompt.images, main)]
        starts = torch.tensor([0] + sizes[:-1], device=vis.device).cumsum(0)
        is_image = (prompt.input_ids[vis][starts] == self.model.config.image_token_id).tolist()  # one host sync
        enc = {}
        for kind, want in (("image", True), ("video", False)):
            units = [u for u, img in enumerate(is_image) if img == want]
            if units:
                enc[kind] = BaseModelOutputWithDeepstackFeatures(
                    pooler_output=[main[u] for u in units],
                    deepstack_features=[[side[u][lvl] for u in units] for lvl in range(levels)])
        return {"input_ids": prompt.input_ids, "mm_encoder_outputs": enc}

    def encoder_rows(self, kind: str, output) -> list[torch.Tensor]:
        """The main features, then each DeepStack level, flat over the units (placeholder order)."""
        return [torch.cat(list(output.pooler_output)), *(torch.cat(list(lv)) for lv in output.deepstack_features)]

    def encoder_output(self, kind: str, rows: list[torch.Tensor]):
        """As the base model's getters return them: ``pooler_output`` a sequence of tensors; the DeepStack levels one
        tensor each where the forward has no ``mm_encoder_outputs`` in the class (transformers 5.17), else split per
        unit like the rest (what the getters return from 5.18 on; reached there only by an instance-level forward
        without that argument, as the tests simulate 5.17)."""
        from transformers.models.qwen3_vl.modeling_qwen3_vl import BaseModelOutputWithDeepstackFeatures

        per_unit = "mm_encoder_outputs" in inspect.signature(type(self.inner).forward).parameters
        return BaseModelOutputWithDeepstackFeatures(pooler_output=[rows[0]],
                                                    deepstack_features=[[lv] if per_unit else lv for lv in rows[1:]])

    # ---- DeepStack, LLM side ------------------------------------------------------------------------------------
    def attach(self, run) -> list:
        """DeepStack hooks when an LLM-side stage acts at a layer that still receives DeepStack input."""
        layers = run.llm_stage_layers
        if not layers or layers[0] >= self.deepstack_levels:
            return []
        return DeepStackHooks(self, run).install()


class DeepStackHooks:
    """Per-run DeepStack under LLM-side stages: a forward pre-hook on the language model takes its DeepStack input
    (and passes None on), a forward hook on each of the first L decoder layers adds level i at the visual
    positions of the slots in force there (``run.current_slots``), as the model's ``_deepstack_process`` does."""

    def __init__(self, adapter: Qwen3VLAdapter, run) -> None:
        self.adapter = adapter
        self.run = run
        self.mask: torch.Tensor | None = None
        self.embeds: list[torch.Tensor] | None = None

    def install(self) -> list:
        lm = self.adapter.language_model
        handles = [lm.register_forward_pre_hook(self._take, with_kwargs=True),
                   lm.register_forward_hook(lambda *_: self.clear())]
        try:
            layers = self.adapter.decoder_layers()
            for i in range(min(self.adapter.deepstack_levels, len(layers))):
                handles.append(layers[i].register_forward_hook(self._adder(i)))
        except BaseException:
            for h in handles:
                h.remove()
            raise
        return handles

    def _take(self, module, args, kwargs):
        self.mask, self.embeds = kwargs.get("visual_pos_masks"), kwargs.get("deepstack_visual_embeds")
        if self.embeds is None:
            return None
        return args, {**kwargs, "visual_pos_masks": None, "deepstack_visual_embeds": None}

    def _adder(self, layer_idx: int):
        def hook(module, args, output):
            if self.embeds is None or layer_idx >= len(self.embeds) or self.mask is None:
                return None
            hidden = output[0] if isinstance(output, tuple) else output
            mask = self.mask.to(hidden.device)
            embeds = self.embeds[layer_idx].to(hidden.device, hidden.dtype)
            cur = self.run.current_slots(layer_idx)
            if cur is None and hidden.shape[1] != mask.shape[1]:
                raise RuntimeError(f"{self.adapter.family}: DeepStack mask of {mask.shape[1]} positions for "
                                   f"{hidden.shape[1]} hidden states outside a vtc prefill")
            if cur is not None:  # the slots in force (before the first stage: all of them, same values)
                slots, valid = cur
                rank = (mask.flatten().long().cumsum(0) - 1).view_as(mask)
                sliced = torch.gather(mask, 1, slots) & valid
                embeds = embeds[torch.gather(rank, 1, slots)[sliced]]
                mask = sliced
            hidden = hidden.clone()
            hidden[mask, :] = hidden[mask, :] + embeds
            if isinstance(output, tuple):
                return (hidden, *output[1:])
            return hidden

        return hook

    def clear(self) -> None:
        """Drop the DeepStack input once the language model's forward is over (no tensor outlives its call)."""
        self.mask = self.embeds = None
