"""LLaVA-1.5 (``LlavaForConditionalGeneration``): CLIP / SigLIP tower, MLP projector, Llama-style LM.

Visual tokens: ``image_token_id`` placeholders, ``(image_size / patch_size)^2`` per image (CLS dropped with
``vision_feature_select_strategy="default"``). Layout: ``Grid(h, w)`` per image.
"""

from __future__ import annotations

import torch

from ..layout import Grid, Sequence
from . import register_adapter
from .base import ModelAdapter, VisualGroup, precomputed_counts
from .vision_towers import TowerScorer

__all__ = ["LlavaAdapter"]


@register_adapter
class LlavaAdapter(ModelAdapter):
    family = "llava"
    model_class_names = ("LlavaForConditionalGeneration",)
    vision_only_keys = ("image_sizes", "vision_feature_layer", "vision_feature_select_strategy")

    def dummy_images(self, n, image_size, generator):
        """Random images at the tower's resolution (the processor resizes every image to it: ``image_size`` unused)."""
        return self._tower_size_images(n, self._tokens_per_image(), generator)


    @property
    def vision_tower(self):
        return self.inner.vision_tower

    def _feature_settings(self, kwargs: dict) -> tuple[int | list[int], str]:
        cfg = self.model.config
        layer = kwargs.get("vision_feature_layer") or cfg.vision_feature_layer
        strategy = kwargs.get("vision_feature_select_strategy") or cfg.vision_feature_select_strategy
        return layer, strategy

    def tokens_per_image(self, kwargs: dict) -> list[int] | None:
        pv = kwargs.get("pixel_values")
        if pv is None:
            return precomputed_counts(kwargs, "image")
        n = self._tokens_per_image()
        return [n] * pv.shape[0]

    def unit_layouts(self, kwargs: dict, image: int):
        vcfg = self.model.config.vision_config
        side = vcfg.image_size // vcfg.patch_size
        return [Grid(side, side)] if self._tokens_per_image() == side * side else [Sequence(self._tokens_per_image())]

    def _tokens_per_image(self) -> int:
        vcfg = self.model.config.vision_config
        side = vcfg.image_size // vcfg.patch_size
        return side * side + (1 if self._cls_in_features({}) else 0)

    def _cls_in_features(self, kwargs: dict) -> bool:
        """Whether the fed features start with a CLS token (a CLS tower with the ``full`` strategy; SigLIP
        towers have none, so ``full`` is their patches only)."""
        _, strategy = self._feature_settings(kwargs)
        return strategy == "full" and self._tower_has_cls()

    def encode_images(self, kwargs: dict) -> list[VisualGroup]:
        feats, scorer = self._run_tower(kwargs["pixel_values"], kwargs)
        n = feats.shape[1]
        vcfg = self.model.config.vision_config
        side = vcfg.image_size // vcfg.patch_size
        layout = Grid(side, side) if side * side == n else Sequence(n)
        U = feats.shape[0]
        return [VisualGroup(feats, layout, list(range(U)), [0] * U, scorer.as_vision_extras())]

    def _run_tower(self, pixel_values: torch.Tensor, kwargs: dict) -> tuple[torch.Tensor, TowerScorer]:
        """Tower features (U, n, Dv) exactly as the model feeds its projector (layer selection, CLS drop) for
        images / crops ``pixel_values`` (U, C, H, W), and the scorer of that forward."""
        layer, strategy = self._feature_settings(kwargs)
        tower = self.vision_tower
        pixel_values = pixel_values.to(dtype=next(tower.parameters()).dtype)
        out = tower(pixel_values, output_hidden_states=True, return_dict=True)
        if isinstance(layer, int):
            feats = out.hidden_states[layer]
        else:
            feats = torch.cat([out.hidden_states[i] for i in layer], dim=-1)
        has_cls = self._tower_has_cls()
        scorer = TowerScorer(tower, out.hidden_states, layer, has_cls=has_cls, drop_cls=(strategy == "default"))
        if strategy == "default":
            feats = feats[:, 1:]
        return feats, scorer

    def vision_extras_available(self) -> frozenset[str]:
        if self._tower_has_cls():
            return frozenset({"cls_attention", "received_attention", "keys", "cls_token", "hidden_with_cls",
                              "clip_patch_states"})  # a CLS tower: CLIP (CDPruner's image space)
        return frozenset({"received_attention", "keys"})

    def _tower_has_cls(self) -> bool:
        """CLIP-style towers prepend a CLS token; SigLIP-style towers do not."""
        emb = getattr(self.vision_tower, "embeddings", None) or getattr(
            getattr(self.vision_tower, "vision_model", None), "embeddings", None
        )
        return getattr(emb, "class_embedding", None) is not None

    def project(self, features: torch.Tensor) -> torch.Tensor:
        return self.inner.multi_modal_projector(features)
