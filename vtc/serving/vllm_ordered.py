"""The bundled ordered-1D-token demo VLM (``vtc-tiny-1d``, ``OrderedVLMForConditionalGeneration``) in vLLM, with
vtc's vision-side stages (see :mod:`vtc.serving.vllm`).

vLLM has no model class for this custom architecture, so this module is one: the demo's own torch modules for the
vision side (:class:`vtc.demo.ordered_vlm.OrderedVisionTower`: CLIP ViT, then the resampler's ``n_latents`` ordered
latents; and the projector), and vLLM's own ``LlamaForCausalLM`` for the language model, so the paged KV cache,
continuous batching and chunked prefill are vLLM's. The prompt processor is the checkpoint's ``LlavaProcessor``
(one ``<image>`` token per image in the text); each image expands to ``n_latents`` placeholders, or with a vtc
config to the reduced count of :func:`ordered_count`.

Layout of one image: ``Sequence(n_latents, is_ordered=True)`` (prefix truncation is valid: the resampler was trained
with nested dropout), the same as the transformers adapter (:class:`vtc.models.ordered_vlm.OrderedVLMAdapter`),
whose ``encode_images`` / ``project`` the vLLM side reuses on this model's modules. The tower gives no attention
extras, so methods that need them (``visionzip``, ``fastervlm``, ``vispruner``) and grid-only methods
(``downsample``) are refused at model load with the same :class:`vtc.ConfigError` as in transformers: the count is a
dry run of the real stages through the same adapter.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from functools import lru_cache

import torch
from torch import nn
from transformers import BatchFeature
from transformers.models.llava import LlavaProcessor
from vllm.model_executor.models.interfaces import MultiModalEmbeddings, SupportsMultiModal
from vllm.model_executor.models.llava import LlavaDummyInputsBuilder
from vllm.model_executor.models.utils import (
    AutoWeightsLoader,
    WeightsMapper,
    init_vllm_registered_model,
    maybe_prefix,
)
from vllm.multimodal import MULTIMODAL_REGISTRY
from vllm.multimodal.inputs import MultiModalFieldConfig
from vllm.multimodal.parse import ImageSize
from vllm.multimodal.processing import BaseMultiModalProcessor, BaseProcessingInfo, PromptReplacement

from ..config import Config
from ..demo.ordered_vlm import OrderedVisionTower, OrderedVLMMultiModalProjector
from ..errors import ConfigError
from ..layout import Sequence
from ..models.base import VisualGroup
from ..models.ordered_vlm import OrderedVLMAdapter
from .vllm import add_vision_model_level, config_from_hf, run_stages

__all__ = ["VtcOrderedVLMForConditionalGeneration", "VtcOrderedProcessingInfo", "ordered_count"]


def _vision_config(hf_config) -> Config | None:
    cfg = config_from_hf(hf_config)
    return cfg if cfg is not None and cfg.vision_stages else None


class OrderedVisionSide(OrderedVLMAdapter):
    """The transformers adapter's vision side on the vLLM model (which holds ``vision_tower`` and
    ``multi_modal_projector`` directly, no ``.model`` level)."""

    family = "vtc-ordered (vLLM)"

    @property
    def inner(self):
        return self.model


class _DryOrderedSide(OrderedVisionSide):
    """Counts only: random latents of the real layout (no extras, as the real tower gives none), identity projector."""

    def __init__(self, n_latents: int, seed: int) -> None:
        super().__init__(None)
        self.n = n_latents
        self.gen = torch.Generator().manual_seed(seed)

    def encode_images(self, kwargs: dict) -> list[VisualGroup]:
        feats = torch.randn(1, self.n, 4, generator=self.gen)
        return [VisualGroup(feats, Sequence(self.n, is_ordered=True), [0], [0])]

    def project(self, features: torch.Tensor) -> torch.Tensor:
        return features


def ordered_count(cfg: Config | None, hf_config) -> int:
    """Tokens one image occupies after the vision-side stages of ``cfg`` (``n_latents`` without a config): the real
    stages through the real adapter on random latents, twice (a count that moves with the content is refused; a
    method the model cannot run raises its :class:`vtc.ConfigError` here, at load)."""
    n = int(hf_config.n_latents)
    if cfg is None or not cfg.vision_stages:
        return n
    return _ordered_count(cfg, n)


@lru_cache(maxsize=256)
def _ordered_count(cfg: Config, n_latents: int) -> int:
    counts = set()
    for seed in (0, 1):
        (image,) = run_stages(_DryOrderedSide(n_latents, seed), cfg, {})
        counts.add(image.embeds.shape[0])
    if len(counts) != 1:
        raise ConfigError(
            f"config stages {[s.method for s in cfg.vision_stages]} deliver a number of tokens that depends on the "
            f"image content ({sorted(counts)} on two random inputs of {n_latents} latents); vLLM needs the count "
            "before the encoder runs: use int or fraction budgets of a fixed-count method"
        )
    return counts.pop()


# ---- prompt processing ----------------------------------------------------------------------------------------------

class VtcOrderedProcessingInfo(BaseProcessingInfo):
    """Processing info of the 1D demo model: ``n_latents`` tokens per image, or the reduced count with a config."""

    def get_hf_config(self):
        return self.ctx.get_hf_config()

    def get_hf_processor(self, **kwargs: object):
        return self.ctx.get_hf_processor(LlavaProcessor, **kwargs)

    def get_supported_mm_limits(self) -> Mapping[str, int | None]:
        return {"image": None}

    def get_num_image_tokens(self, *, image_width: int, image_height: int) -> int:
        hf_config = self.get_hf_config()
        return ordered_count(_vision_config(hf_config), hf_config)

    def get_image_size_with_most_features(self) -> ImageSize:
        size = self.get_hf_config().vision_config.image_size
        return ImageSize(width=size, height=size)

    def get_max_image_tokens(self) -> int:
        s = self.get_image_size_with_most_features()
        return self.get_num_image_tokens(image_width=s.width, image_height=s.height)


class VtcOrderedMultiModalProcessor(BaseMultiModalProcessor[VtcOrderedProcessingInfo]):
    """The checkpoint's ``LlavaProcessor`` for the pixels; each ``<image>`` token becomes the image's count."""

    def _get_mm_fields_config(self, hf_inputs: BatchFeature, hf_processor_mm_kwargs: Mapping[str, object]):
        return dict(pixel_values=MultiModalFieldConfig.batched("image"))

    def _get_prompt_updates(self, mm_items, hf_processor_mm_kwargs, out_mm_kwargs):
        image_token_id = self.info.get_hf_config().image_token_id

        def replacement(item_idx: int) -> list[int]:  # every image is resized to the tower's size: one count
            return [image_token_id] * self.info.get_max_image_tokens()

        return [PromptReplacement(modality="image", target=[image_token_id], replacement=replacement)]


# ---- the model ------------------------------------------------------------------------------------------------------

@MULTIMODAL_REGISTRY.register_processor(
    VtcOrderedMultiModalProcessor,
    info=VtcOrderedProcessingInfo,
    dummy_inputs=LlavaDummyInputsBuilder,
)
class VtcOrderedVLMForConditionalGeneration(nn.Module, SupportsMultiModal):
    """``OrderedVLMForConditionalGeneration`` in vLLM: the demo's vision tower + resampler + projector as torch
    modules, vLLM's ``LlamaForCausalLM``; with ``vtc_config``, vtc's vision-side stages on the ordered latents."""

    hf_to_vllm_mapper = WeightsMapper(orig_to_new_prefix={
        "model.language_model.": "language_model.model.",
        "model.vision_tower.": "vision_tower.",
        "model.multi_modal_projector.": "multi_modal_projector.",
        "lm_head.": "language_model.lm_head.",
    })

    @classmethod
    def get_placeholder_str(cls, modality: str, i: int) -> str | None:
        if modality.startswith("image"):
            return "<image>"
        raise ValueError("Only image modality is supported")

    def __init__(self, *, vllm_config, prefix: str = "") -> None:
        super().__init__()
        config = vllm_config.model_config.hf_config
        cfg = _vision_config(config)
        if cfg is not None:
            ordered_count(cfg, config)  # a config the model cannot run fails here, before any weight is allocated
            if vllm_config.parallel_config.tensor_parallel_size != 1:
                raise ConfigError("vtc_config on vtc-tiny-1d needs tensor_parallel_size 1 (its vision tower is "
                                  "plain torch modules, not split across devices)")
        self.config = config
        self.vtc_config = cfg
        self._vtc_expected = ordered_count(cfg, config)
        self.configure_mm_token_handling(vocab_size=config.text_config.vocab_size,
                                         mm_token_ids=[config.image_token_id])
        with self._mark_tower_model(vllm_config, "image"):
            self.vision_tower = OrderedVisionTower(config)
            self.multi_modal_projector = OrderedVLMMultiModalProjector(config)
        with self._mark_language_model(vllm_config):
            self.language_model = init_vllm_registered_model(
                vllm_config=vllm_config, hf_config=config.text_config, prefix=maybe_prefix(prefix, "language_model"),
                architectures=["LlamaForCausalLM"])
        self.make_empty_intermediate_tensors = self.language_model.make_empty_intermediate_tensors

    def embed_multimodal(self, **kwargs: object) -> MultiModalEmbeddings:
        pixel_values = kwargs.pop("pixel_values", None)
        if pixel_values is None:
            return []
        if not isinstance(pixel_values, torch.Tensor):
            pixel_values = torch.stack(list(pixel_values))
        side = OrderedVisionSide(self)
        if self.vtc_config is None:
            (group,) = side.encode_images({"pixel_values": pixel_values})
            return tuple(side.project(group.features))
        cfg = self.vtc_config
        images = run_stages(side, cfg, {"pixel_values": pixel_values})
        got = {im.embeds.shape[0] for im in images}
        if got != {self._vtc_expected}:
            raise RuntimeError(f"vtc: the stages delivered {sorted(got)} tokens per image, but the prompt was "
                               f"expanded to {self._vtc_expected}")
        return tuple(im.embeds for im in images)

    def forward(self, input_ids, positions, intermediate_tensors=None, inputs_embeds=None, **kwargs):
        if intermediate_tensors is not None:
            inputs_embeds = None
        return self.language_model.model(input_ids, positions, intermediate_tensors, inputs_embeds=inputs_embeds)

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor | None:
        return self.language_model.compute_logits(hidden_states)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        if hasattr(self.vision_tower.encoder, "vision_model"):  # a transformers whose CLIPVisionModel has the level
            weights = add_vision_model_level(weights, ("model.vision_tower.encoder.",))
        return AutoWeightsLoader(self).load_weights(weights, mapper=self.hf_to_vllm_mapper)
