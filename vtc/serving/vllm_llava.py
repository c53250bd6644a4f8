"""LLaVA-1.5 and LLaVA-NeXT in vLLM with vtc's vision-side stages (see :mod:`vtc.serving.vllm`).

``VtcLlavaForConditionalGeneration`` / ``VtcLlavaNextForConditionalGeneration`` are vLLM's classes plus: the image
features go through vtc's stages before (or after, per stage) the projector, the processing info reports the reduced
count per image, and checkpoints with or without the CLIP tower's ``vision_model.`` level load. Without
``vtc_config`` every method is the parent's. LLaVA-NeXT reuses the transformers adapter's anyres geometry and
packing (:class:`vtc.models.llava_next.LlavaNextAdapter`: per-crop units, newline tokens after the reduction), so
both hosts give the LLM the same tokens; its count per image size is a dry run of that packing.

Scores come from vLLM's own tower modules (:class:`VllmTowerScorer`): the block producing the feature layer is
re-projected for the rows a score needs through its fused ``qkv_proj``, exactly what
:class:`vtc.models.vision_towers.TowerScorer` does on transformers' separate q / k projections.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from functools import lru_cache

import torch
from torch import nn
from vllm.model_executor.models import llava, llava_next
from vllm.multimodal import MULTIMODAL_REGISTRY

from ..errors import ConfigError
from ..layout import Grid, Layout, Sequence
from ..methods.base import VisionExtras
from ..models.base import ModelAdapter, VisualGroup
from ..models.llava_next import LlavaNextAdapter
from ..models.vision_towers import QKRowScorer, scorer_extras
from .vllm import add_vision_model_level, config_from_hf, dummy_extras, reduced_count, require_whole_tower, run_stages

__all__ = ["VtcLlavaForConditionalGeneration", "VtcLlavaProcessingInfo", "VtcLlavaNextForConditionalGeneration",
           "VtcLlavaNextProcessingInfo", "VllmTowerScorer", "llava_layout", "next_count"]


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
        require_whole_tower(self.attn)
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

    def as_vision_extras(self) -> VisionExtras:
        return scorer_extras(self)


def run_tower(tower: nn.Module, pixel_values: torch.Tensor, hf_config) -> tuple[torch.Tensor, VllmTowerScorer]:
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
    return feats, VllmTowerScorer(vm, states, has_cls, drop_cls)


class LlavaVisionSide(ModelAdapter):
    """The vision side of vLLM's LLaVA for :class:`VisionRuntime`: tower features + extras, and the projector."""

    family = "llava (vLLM)"

    def encode_images(self, kwargs: dict) -> list[VisualGroup]:
        feats, scorer = run_tower(self.model.vision_tower, kwargs["pixel_values"], self.model.config)
        layout = llava_layout(self.model.config)
        U = feats.shape[0]
        return [VisualGroup(feats, layout, list(range(U)), [0] * U, scorer.as_vision_extras())]

    def project(self, features: torch.Tensor) -> torch.Tensor:
        return self.model.multi_modal_projector(features)


class VtcLlavaProcessingInfo(llava.LlavaProcessingInfo):
    """vLLM's LLaVA processing info; with a vtc config, an image expands to the reduced number of tokens."""

    def get_num_image_tokens(self, *, image_width: int, image_height: int) -> int:
        cfg = config_from_hf(self.get_hf_config())
        n = super().get_num_image_tokens(image_width=image_width, image_height=image_height)
        if cfg is None:
            return n
        return reduced_count(cfg, llava_layout(self.get_hf_config()))


class _VtcLlavaModel:
    """Model mixin (before vLLM's LLaVA / LLaVA-NeXT class in the MRO): reads ``vtc_config`` (a bad config fails
    before any weight is allocated), checks the tower and the feature layer, and loads checkpoints with or without
    the CLIP tower's ``vision_model.`` level."""

    #: the family's name in errors
    _vtc_family = "LLaVA"
    #: whether a config without vision-side stages leaves the model stock (else the empty stage list runs)
    _vtc_stock_without_stages = False

    def __init__(self, *, vllm_config, prefix: str = "") -> None:
        hf_config = vllm_config.model_config.hf_config
        cfg = config_from_hf(hf_config)
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        self.vtc_config = None if cfg is not None and self._vtc_stock_without_stages and not cfg.vision_stages else cfg
        if self.vtc_config is not None:
            if getattr(hf_config.vision_config, "model_type", "") not in ("clip_vision_model", "siglip_vision_model"):
                raise ConfigError(f"vtc in vLLM supports CLIP and SigLIP towers in {self._vtc_family}, got "
                                  f"{hf_config.vision_config.model_type}")
            _feature_layer(hf_config)
            self._vtc_check_counts(hf_config)

    def _vtc_check_counts(self, hf_config) -> None:
        """Count the tokens once at load, so a config the dry run refuses fails there."""
        raise NotImplementedError

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        if hasattr(self.vision_tower, "vision_model"):
            weights = add_vision_model_level(weights, ("model.vision_tower.", "vision_tower."))
        return super().load_weights(weights)


@MULTIMODAL_REGISTRY.register_processor(
    llava._build_llava_or_pixtral_hf_processor,
    info=VtcLlavaProcessingInfo,
    dummy_inputs=llava.LlavaDummyInputsBuilder,
)
class VtcLlavaForConditionalGeneration(_VtcLlavaModel, llava.LlavaForConditionalGeneration):
    """vLLM's ``LlavaForConditionalGeneration`` with vtc's vision-side stages on the image features."""

    _vtc_expected: int | None = None

    def _vtc_check_counts(self, hf_config) -> None:
        self._vtc_expected = reduced_count(self.vtc_config, llava_layout(hf_config))

    def _process_image_input(self, image_input):
        if self.vtc_config is None or isinstance(image_input, llava.LlavaImageEmbeddingInputs):
            return super()._process_image_input(image_input)
        images = run_stages(LlavaVisionSide(self), self.vtc_config,
                                   {"pixel_values": image_input["pixel_values"]})
        embeds = tuple(im.embeds for im in images)
        got = {e.shape[0] for e in embeds}
        if got != {self._vtc_expected}:
            raise RuntimeError(f"vtc: the stages delivered {sorted(got)} tokens per image, but the prompt was "
                               f"expanded to {self._vtc_expected}")
        return embeds


# ---- LLaVA-NeXT -----------------------------------------------------------------------------------------------------

class LlavaNextVisionSide(LlavaNextAdapter):
    """The vision side of vLLM's LLaVA-NeXT: the transformers adapter's geometry, units and packing, with the tower,
    projector and ``image_newline`` of the vLLM model (which holds them directly, no ``.model`` level)."""

    family = "llava_next (vLLM)"

    @property
    def inner(self):
        return self.model

    def _run_tower(self, pixel_values: torch.Tensor, kwargs: dict):
        return run_tower(self.model.vision_tower, pixel_values, self.model.config)


class _Extras:
    def __init__(self, extras: VisionExtras) -> None:
        self.extras = extras

    def as_vision_extras(self) -> VisionExtras:
        return self.extras


class _DryNextSide(LlavaNextVisionSide):
    """Counts only: random features and extras of the real shapes (one image), identity projector."""

    def __init__(self, hf_config, seed: int) -> None:
        dim = 4
        super().__init__(type("DryModel", (), {"config": hf_config, "image_newline": torch.zeros(dim)})())
        self.gen = torch.Generator().manual_seed(seed)
        self.dim = dim

    def _run_tower(self, pixel_values: torch.Tensor, kwargs: dict):
        U = pixel_values.shape[0]
        h, w = self.crop_grid
        extras = VisionExtras(**{k: v.clone for k, v in dummy_extras(U, Grid(h, w), self.dim, self.gen).items()})
        return torch.randn(U, h * w, self.dim, generator=self.gen), _Extras(extras)

    def project(self, features: torch.Tensor) -> torch.Tensor:
        return features


def next_count(cfg, hf_config, height: int, width: int) -> int:
    """Tokens one LLaVA-NeXT image of ``height x width`` occupies after the vision-side stages of ``cfg``: the real
    stages and packing on random inputs, twice (a count that moves with the content is refused)."""
    return _next_count(cfg, hf_config.to_json_string(use_diff=False), int(height), int(width))


@lru_cache(maxsize=1024)
def _next_count(cfg, hf_json: str, height: int, width: int) -> int:
    from transformers import LlavaNextConfig

    hf_config = LlavaNextConfig.from_dict(json.loads(hf_json))
    counts = set()
    for seed in (0, 1):
        side = _DryNextSide(hf_config, seed)
        geom = side.geometries({"image_sizes": [[height, width]]})[0]
        S = hf_config.vision_config.image_size
        kwargs = {"image_sizes": [[height, width]], "pixel_values": torch.zeros(geom.num_units, 3, S, S)}
        (image,) = run_stages(side, cfg, kwargs)
        counts.add(image.embeds.shape[0])
    if len(counts) != 1:
        raise ConfigError(
            f"config stages {[s.method for s in cfg.vision_stages]} give a LLaVA-NeXT image of {height}x{width} a "
            f"number of tokens that depends on its content ({sorted(counts)}); vLLM needs it from the image size alone"
        )
    return counts.pop()


class VtcLlavaNextProcessingInfo(llava_next.LlavaNextProcessingInfo):
    """vLLM's LLaVA-NeXT processing info; with a vtc config, an image expands to its reduced number of tokens."""

    def get_num_image_tokens(self, *, image_width: int, image_height: int) -> int:
        hf_config = self.get_hf_config()
        cfg = config_from_hf(hf_config)
        if cfg is None or not cfg.vision_stages:
            return super().get_num_image_tokens(image_width=image_width, image_height=image_height)
        return next_count(cfg, hf_config, image_height, image_width)


@MULTIMODAL_REGISTRY.register_processor(
    llava_next.LlavaNextMultiModalProcessor,
    info=VtcLlavaNextProcessingInfo,
    dummy_inputs=llava.LlavaDummyInputsBuilder,
)
class VtcLlavaNextForConditionalGeneration(_VtcLlavaModel, llava_next.LlavaNextForConditionalGeneration):
    """vLLM's ``LlavaNextForConditionalGeneration`` with vtc's vision-side stages on each crop's features."""

    _vtc_family = "LLaVA-NeXT"
    _vtc_stock_without_stages = True

    def _vtc_check_counts(self, hf_config) -> None:
        S = hf_config.vision_config.image_size
        next_count(self.vtc_config, hf_config, S, S)

    def _process_image_input(self, image_input):
        if self.vtc_config is None or isinstance(image_input, llava_next.LlavaNextImageEmbeddingInputs):
            return super()._process_image_input(image_input)
        pv = image_input["pixel_values"]
        if not isinstance(pv, torch.Tensor):
            pv = torch.cat(list(pv), dim=0)
        sizes = image_input.get("image_sizes")
        kwargs = {"pixel_values": pv, "image_sizes": sizes}
        images = run_stages(LlavaNextVisionSide(self), self.vtc_config, kwargs)
        sizes_list = sizes.tolist() if isinstance(sizes, torch.Tensor) else list(sizes)
        for im, (h, w) in zip(images, sizes_list):
            want = next_count(self.vtc_config, self.config, h, w)
            if im.embeds.shape[0] != want:
                raise RuntimeError(f"vtc: the stages delivered {im.embeds.shape[0]} tokens for a {h}x{w} image, "
                                   f"but the prompt was expanded to {want}")
        return [im.embeds for im in images]
