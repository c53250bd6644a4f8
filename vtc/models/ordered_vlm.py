"""vtc's ordered 1D-token demo VLM (``OrderedVLMForConditionalGeneration``, see ``vtc.demo.ordered_vlm``).

Its vision tower resamples patch features into ``n_latents`` latent tokens trained with nested dropout, so the
layout is ``Sequence(n_latents, is_ordered=True)``: prefix truncation is valid. Otherwise it is LLaVA-shaped
(``model.model.vision_tower`` / ``multi_modal_projector`` / ``language_model``, ``image_token_id``).
"""

from __future__ import annotations

from ..layout import Sequence
from . import register_adapter
from .base import ModelAdapter, VisualGroup, precomputed_counts

__all__ = ["OrderedVLMAdapter"]


@register_adapter
class OrderedVLMAdapter(ModelAdapter):
    family = "vtc-ordered"
    model_class_names = ("OrderedVLMForConditionalGeneration",)

    def dummy_images(self, n, image_size, generator):
        """Random images at the tower's resolution, ``n_latents`` placeholders each (``image_size`` unused)."""
        return self._tower_size_images(n, self.model.config.n_latents, generator)


    def tokens_per_image(self, kwargs: dict) -> list[int] | None:
        pv = kwargs.get("pixel_values")
        return precomputed_counts(kwargs, "image") if pv is None else [self.model.config.n_latents] * pv.shape[0]

    def unit_layouts(self, kwargs: dict, image: int):
        return [Sequence(self.model.config.n_latents, is_ordered=True)]

    def encode_images(self, kwargs: dict) -> list[VisualGroup]:
        tower = self.inner.vision_tower
        pixel_values = kwargs["pixel_values"].to(dtype=next(tower.parameters()).dtype)
        latents = tower(pixel_values).last_hidden_state  # (U, n_latents, Dv)
        U, n = latents.shape[:2]
        return [VisualGroup(latents, Sequence(n, is_ordered=True), list(range(U)), [0] * U)]

    def project(self, features):
        return self.inner.multi_modal_projector(features)
