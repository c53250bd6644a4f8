"""LLaVA-1.5 in vLLM with vtc's vision-side stages (see :mod:`vtc.serving.vllm`).

``VtcLlavaForConditionalGeneration`` is vLLM's ``LlavaForConditionalGeneration`` plus: the image features go
through vtc's stages before (or after, per stage) the projector, the processing info reports the reduced count per
image, and checkpoints with or without the CLIP tower's ``vision_model.`` level load. Without ``vtc_config`` every
method is the parent's.

Scores come from vLLM's own tower modules (:class:`VllmTowerScorer`): the block producing the feature layer is
re-projected for the rows a score needs through its fused ``qkv_proj``, exactly what
:class:`vtc.models.vision_towers.TowerScorer` does on transformers' separate q / k projections.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn
from vllm.model_executor.models.llava import (
    LlavaDummyInputsBuilder,
    LlavaForConditionalGeneration,
    LlavaImageEmbeddingInputs,
    LlavaProcessingInfo,
    _build_llava_or_pixtral_hf_processor,
)
from vllm.multimodal import MULTIMODAL_REGISTRY

from ..errors import ConfigError
from ..layout import Grid, Layout, Sequence
from ..methods.base import VisionExtras
from ..models.base import ModelAdapter, VisualGroup
from ..models.vision_towers import QKRowScorer, scorer_extras
from ..runtime.stats import Stats
from ..runtime.vision import VisionRuntime
from .vllm import add_vision_model_level, config_from_hf, reduced_count

__all__ = ["VtcLlavaForConditionalGeneration", "VtcLlavaProcessingInfo", "VllmTowerScorer", "llava_layout"]


def _feature_layer(hf_config) -> int:
    layer = hf_config.vision_feature_layer
    if not isinstance(layer, int):
        raise ConfigError(f"vtc in vLLM supports an int vision_feature_layer, got {layer!r}")
    return layer


def llava_layout(hf_config) -> Layout:
    """Layout of one image's fed tokens: ``Grid(side, side)`` of CLIP / SigLIP patches (CLS dropped by the
    ``default`` strategy; a ``full`` strategy feeds 1 + side^2 tokens, an unordered sequence)."""
    vcfg = hf_config.vision_config
    side = vcfg.image_size // vcfg.patch_size
    if hf_config.vision_feature_select_strategy == "full" and getattr(vcfg, "model_type", "") != "siglip_vision_model":
        return Sequence(side * side + 1)
    return Grid(side, side)


class VllmTowerScorer(QKRowScorer):
    """Scores of one vLLM CLIP / SigLIP tower forward: the block that produced the features, re-projected through
    its fused ``qkv_proj`` (query rows only where a score needs them).

    states: the tower's hidden states (embeddings, then each loaded block's output); the last one is the feature
    layer (vLLM loads the tower only up to it). has_cls / drop_cls as in :class:`TowerScorer`.
    """

    def __init__(self, tower: nn.Module, states: list[torch.Tensor], has_cls: bool, drop_cls: bool) -> None:
        self.states = states
        block = tower.encoder.layers[len(states) - 2]
        self.norm = block.layer_norm1
        self.attn = block.self_attn
        if getattr(self.attn, "tp_size", 1) != 1:
            raise ConfigError("vtc's scores need the whole vision tower on one device (tensor_parallel_size 1 for "
                              "the tower, e.g. mm_encoder_tp_mode='data')")
        self.heads = self.attn.num_heads_per_partition
        self.head_dim = self.attn.head_dim
        self.scale = float(self.attn.scale)
        self.has_cls = has_cls
        self.fed = slice(1, None) if (has_cls and drop_cls) else slice(None)

    @property
    def block_input(self) -> torch.Tensor:
        return self.states[-2]

    def _norm(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x)

    def _qkv(self, x: torch.Tensor, which: int) -> torch.Tensor:
        U, R, _ = x.shape
        out = self.attn.qkv_proj(x)[0].chunk(3, dim=-1)[which]
        return out.reshape(U, R, self.heads, self.head_dim).transpose(1, 2)

    def _queries(self, xn_rows: torch.Tensor) -> torch.Tensor:
        return self._qkv(xn_rows, 0)

    def _keys(self, xn: torch.Tensor) -> torch.Tensor:
        return self._qkv(xn, 1)

    def hidden_with_cls(self) -> torch.Tensor:
        return self.states[-1]

    def cls_token(self) -> torch.Tensor:
        if not self.has_cls:
            raise ConfigError("this vision tower has no CLS token")
        return self.states[-1][:, 0]


def run_tower(tower: nn.Module, pixel_values: torch.Tensor, hf_config) -> tuple[torch.Tensor, VisionExtras]:
    """(U, n, Dv) the features vLLM's LLaVA feeds its projector for ``pixel_values`` (U, C, H, W), and the scores of
    that same forward. The tower (``CLIPVisionModel`` / ``SiglipVisionModel``, loaded up to the feature layer) runs
    block by block as in its own forward, keeping every block's output."""
    _feature_layer(hf_config)
    vm = tower.vision_model
    h = vm.embeddings(pixel_values.to(dtype=vm.dtype))
    pre = getattr(vm, "pre_layrnorm", None)
    if pre is not None:
        h = pre(h)
    states = vm.encoder(inputs_embeds=h, return_all_hidden_states=True)
    if len(states) < 2:
        raise ConfigError("vision_feature_layer selects the patch embeddings, which have no attention to score")
    has_cls = getattr(vm.embeddings, "class_embedding", None) is not None
    drop_cls = hf_config.vision_feature_select_strategy == "default"
    feats = states[-1][:, 1:] if (has_cls and drop_cls) else states[-1]
    post = getattr(vm, "post_layernorm", None)
    if post is not None:
        feats = post(feats)
    return feats, scorer_extras(VllmTowerScorer(vm, states, has_cls, drop_cls))


class LlavaVisionSide(ModelAdapter):
    """The vision side of vLLM's LLaVA for :class:`VisionRuntime`: tower features + extras, and the projector."""

    family = "llava (vLLM)"

    def encode_images(self, kwargs: dict, needs: set[str]) -> list[VisualGroup]:
        feats, extras = run_tower(self.model.vision_tower, kwargs["pixel_values"], self.model.config)
        layout = llava_layout(self.model.config)
        U = feats.shape[0]
        return [VisualGroup(feats, layout, list(range(U)), [0] * U, extras)]

    def project(self, features: torch.Tensor) -> torch.Tensor:
        return self.model.multi_modal_projector(features)


class VtcLlavaProcessingInfo(LlavaProcessingInfo):
    """vLLM's LLaVA processing info; with a vtc config, an image expands to the reduced number of tokens."""

    def get_num_image_tokens(self, *, image_width: int, image_height: int) -> int:
        cfg = config_from_hf(self.get_hf_config())
        n = super().get_num_image_tokens(image_width=image_width, image_height=image_height)
        if cfg is None:
            return n
        return reduced_count(cfg, llava_layout(self.get_hf_config()))


@MULTIMODAL_REGISTRY.register_processor(
    _build_llava_or_pixtral_hf_processor,
    info=VtcLlavaProcessingInfo,
    dummy_inputs=LlavaDummyInputsBuilder,
)
class VtcLlavaForConditionalGeneration(LlavaForConditionalGeneration):
    """vLLM's ``LlavaForConditionalGeneration`` with vtc's vision-side stages on the image features."""

    def __init__(self, *, vllm_config, prefix: str = "") -> None:
        hf_config = vllm_config.model_config.hf_config
        cfg = config_from_hf(hf_config)  # a bad config fails here, before any weight is allocated
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        self.vtc_config = cfg
        self._vtc_expected = None
        if cfg is not None:
            if getattr(hf_config.vision_config, "model_type", "") not in ("clip_vision_model", "siglip_vision_model"):
                raise ConfigError(f"vtc in vLLM supports CLIP and SigLIP towers in LLaVA, got "
                                  f"{hf_config.vision_config.model_type}")
            _feature_layer(hf_config)
            self._vtc_expected = reduced_count(cfg, llava_layout(hf_config))

    def _process_image_input(self, image_input):
        if self.vtc_config is None or isinstance(image_input, LlavaImageEmbeddingInputs):
            return super()._process_image_input(image_input)
        side = LlavaVisionSide(self)
        runtime = VisionRuntime(side, list(enumerate(self.vtc_config.vision_stages)), Stats(), self.vtc_config.seed)
        images = runtime.reduce_images({"pixel_values": image_input["pixel_values"]})
        embeds = tuple(im.embeds for im in images)
        got = {e.shape[0] for e in embeds}
        if got != {self._vtc_expected}:
            raise RuntimeError(f"vtc: the stages delivered {sorted(got)} tokens per image, but the prompt was "
                               f"expanded to {self._vtc_expected}")
        return embeds

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        if hasattr(self.vision_tower, "vision_model"):
            weights = add_vision_model_level(weights, ("model.vision_tower.", "vision_tower."))
        return super().load_weights(weights)
