"""Vision-side runtime: reduce each image's features, then give the LLM a prompt with exactly that many
placeholders, as if the processor had emitted them and the reduced features had been fed directly.

The rebuilt prompt is passed as ``inputs_embeds`` (+ attention mask, labels, and position ids where the family
needs explicit ones, e.g. M-RoPE), so ``forward`` and ``generate`` run unchanged on a consistent, shorter
sequence: positions, mask and KV cache all follow.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ..errors import ConfigError
from ..functional import run_vision_stages
from ..methods.base import Method, PromptText
from ..models.base import ImageFeatures, ModelAdapter, TokenMap
from ..reduction import compact

__all__ = ["VisionRuntime", "RebuiltPrompt", "rebuild_prompt"]


@dataclass
class RebuiltPrompt:
    input_ids: torch.Tensor  # (B, N') with k_i placeholders per image
    attention_mask: torch.Tensor  # (B, N')
    inputs_embeds: torch.Tensor  # (B, N', D)
    token_map: TokenMap
    position_ids: torch.Tensor | None = None
    labels: torch.Tensor | None = None
    #: the per-unit features the prompt was built from (in unit order), for ``ModelAdapter.prompt_kwargs``
    images: list[ImageFeatures] | None = None


def rebuild_prompt(adapter: ModelAdapter, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                   images: list[ImageFeatures], kwargs: dict, labels: torch.Tensor | None = None) -> RebuiltPrompt:
    """Keep the first k_i placeholders of image i (dropping the rest), scatter the reduced features there.

    Vectorised over the batch; rows that end up with different lengths are padded on the side the input
    was padded on (left when there was no padding, which is what ``generate`` wants).
    """
    B, N = input_ids.shape
    dev = input_ids.device
    tm = adapter.token_map(input_ids, kwargs)
    n_img = int(tm.image_id.max()) + 1 if bool(tm.is_visual.any()) else 0
    if n_img != len(images):
        raise ConfigError(
            f"the prompt has placeholders for {n_img} image(s) but {len(images)} image(s) were given; "
            "check that every image has its image token in the text"
        )
    k = torch.tensor([im.embeds.shape[0] for im in images], device=dev, dtype=torch.long)
    # rank of each placeholder inside its image
    flat_vis = tm.is_visual.flatten().long()
    img = tm.image_id.flatten().clamp(min=0)
    running = flat_vis.cumsum(0) - 1
    first = torch.zeros(max(n_img, 1), dtype=torch.long, device=dev)
    if n_img:
        first.scatter_reduce_(0, img[flat_vis.bool()], running[flat_vis.bool()], reduce="amin", include_self=False)
    rank = running - first[img]
    kept = rank < k[img] if n_img else torch.zeros_like(rank, dtype=torch.bool)
    if any(im.runs is not None for im in images):
        kept = _keep_per_run(tm, images, running, kept)
    keep = (~tm.is_visual.flatten()) | kept
    keep = keep.view(B, N)
    if attention_mask is None:
        attention_mask = torch.ones(B, N, dtype=torch.long, device=dev)
    right_padded = bool((attention_mask[:, -1] == 0).any())
    keep = keep & attention_mask.bool()  # old padding is dropped; rows are re-padded to the new longest row
    order, valid = compact(keep, align="left" if right_padded else "right", fill=None)
    pad_id = getattr(adapter.text_config, "pad_token_id", None)
    pad_id = 0 if pad_id is None else pad_id
    new_ids = torch.where(valid, torch.gather(input_ids, 1, order), torch.full_like(order, pad_id))
    new_mask = torch.where(valid, torch.gather(attention_mask, 1, order), torch.zeros_like(order))
    if n_img and any(im.token_ids is not None for im in images):
        # the ids of the packed positions (structural tokens that are prompt tokens, e.g. Mistral 3's row breaks)
        kept_vis = torch.gather(tm.is_visual, 1, order) & valid
        ids = torch.cat([im.token_ids if im.token_ids is not None else
                         torch.full((im.embeds.shape[0],), adapter.placeholder_token_id(), dtype=torch.long)
                         for im in images]).to(dev)
        new_ids = new_ids.masked_scatter(kept_vis, ids)
    new_labels = None
    if labels is not None:
        new_labels = torch.where(valid, torch.gather(labels, 1, order), torch.full_like(order, -100))
    new_tm = TokenMap.from_placeholders(adapter.placeholder_mask(new_ids), [int(x) for x in k.tolist()])
    new_tm.is_visual &= valid
    embeds = adapter.embed_tokens(new_ids)
    if n_img:
        feats = torch.cat([im.embeds for im in images], dim=0).to(embeds.dtype)
        prot = torch.cat([im.protected for im in images], dim=0)
        vis = new_tm.is_visual
        embeds = embeds.masked_scatter(vis.unsqueeze(-1), feats)
        protected = torch.zeros_like(vis)
        protected[vis] = prot.to(dev)
        new_tm.protected = protected
    pos = adapter.position_ids_for(new_ids, new_mask, images, kwargs)
    return RebuiltPrompt(new_ids, new_mask, embeds, new_tm, pos, new_labels, images)


def _keep_per_run(tm: TokenMap, images: list[ImageFeatures], running: torch.Tensor,
                  kept: torch.Tensor) -> torch.Tensor:
    """``kept`` (flattened placeholders to keep) with the images that give ``runs`` kept run by run: the first
    ``runs[j]`` placeholders of the image's j-th run (a run: adjacent placeholders of one image)."""
    vis = tm.is_visual
    start = vis.clone()
    start[:, 1:] &= ~vis[:, :-1] | (tm.image_id[:, 1:] != tm.image_id[:, :-1])
    start, flat_vis = start.flatten(), vis.flatten()
    run = start.long().cumsum(0) - 1
    run_img = tm.image_id.flatten()[start]
    per_image = torch.bincount(run_img, minlength=len(images)).tolist()
    k_run: list[int] = []
    for i, (im, n) in enumerate(zip(images, per_image)):
        if im.runs is None:
            k_run += [-1] * n
            continue
        if len(im.runs) != n or sum(im.runs) != im.embeds.shape[0]:
            raise ConfigError(f"image {i}: {len(im.runs)} runs of {sum(im.runs)} reduced tokens for "
                              f"{n} placeholder runs and {im.embeds.shape[0]} features")
        k_run += list(im.runs)
    k_run_t = torch.tensor(k_run, dtype=torch.long, device=kept.device)
    run = run.clamp(min=0)
    first = torch.zeros(len(k_run), dtype=torch.long, device=kept.device).scatter_reduce(
        0, run[flat_vis], running[flat_vis], reduce="amin", include_self=False)
    limit = k_run_t[run]
    return torch.where(flat_vis & (limit >= 0), running - first[run] < limit, kept)


class VisionRuntime:
    """Runs the vision-side stages of a config on the visual inputs of one forward / generate call."""

    def __init__(self, adapter: ModelAdapter, stages: list[tuple[int, Method]], stats, seed: int) -> None:
        self.adapter = adapter
        self.stages = stages
        self.stats = stats
        self.seed = seed
        #: per-run state of each stage (stage index -> ``Method.new_state()``), owned by the Run
        self.states: dict[int, Any] = {}
        #: the user's instruction (``run.set_instruction``): one string, or one per batch row
        self.instruction: str | list[str] | None = None
        self.reads_prompt = any(m.reads_prompt for _, m in stages)

    def prompt_text(self, kwargs: dict) -> PromptText:
        """The prompt facts a text-reading method needs (the original input_ids and which row each image is in)."""
        ids = kwargs["input_ids"]
        mask = kwargs.get("attention_mask")
        mask = torch.ones_like(ids) if mask is None else mask
        tm = self.adapter.token_map(ids, kwargs)
        vis = tm.is_visual & mask.bool()
        n_img = int(tm.image_id.max()) + 1 if bool(vis.any()) else 0
        rows = torch.arange(ids.shape[0], device=ids.device)[:, None].expand_as(ids)
        image_row = torch.zeros(n_img, dtype=torch.long, device=ids.device).scatter_(0, tm.image_id[vis], rows[vis])
        return PromptText(ids, mask, vis, image_row, self.instruction,
                          getattr(self.adapter.model, "name_or_path", None) or None)

    def reduce_images(self, kwargs: dict) -> list[ImageFeatures]:
        if kwargs.get("input_ids") is not None:
            self.adapter.check_placeholders(kwargs["input_ids"], kwargs)
        outputs = []
        prompt = self.prompt_text(kwargs) if self.reads_prompt else None
        for group in self.adapter.encode_images(kwargs):
            if "tower_features" not in group.extras.other:  # before the projector (e.g. CDPruner's CLIP space)
                group.extras.other["tower_features"] = lambda f=group.features: f
            def on_stage(index, method, n_in, reduction, seconds, group=group):
                self.stats.add_time(seconds)
                self.stats.record_vision_stage(index, method, group, n_in, reduction)

            unit_image = torch.as_tensor(group.unit_image, device=group.features.device)
            feats, layout, reductions, projected = run_vision_stages(
                group.features, group.layout, self.stages, group.extras, self.seed, unit_image=unit_image,
                project=self.adapter.project, on_stage=on_stage, states=self.states,
                projected=group.space == "llm", prompt=prompt)
            if not projected:
                feats = self.adapter.project(feats)
            group.out_layout = layout
            outputs.append((group, feats, reductions))
        return self.adapter.pack_images(outputs, kwargs)
