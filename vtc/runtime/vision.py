"""Vision-side runtime: reduce each image's features, then give the LLM a prompt with exactly that many
placeholders, as if the processor had emitted them and the reduced features had been fed directly.

The rebuilt prompt is passed as ``inputs_embeds`` (+ attention mask, labels, and position ids where the family
needs explicit ones, e.g. M-RoPE), so ``forward`` and ``generate`` run unchanged on a consistent, shorter
sequence: positions, mask and KV cache all follow.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from ..errors import ConfigError
from ..methods.base import Method, PromptText, VisionContext, VisionExtras
from ..models.base import ImageFeatures, ModelAdapter, TokenMap

__all__ = ["VisionRuntime", "RebuiltPrompt", "rebuild_prompt"]


@dataclass
class RebuiltPrompt:
    input_ids: torch.Tensor  # (B, N') with k_i placeholders per image
    attention_mask: torch.Tensor  # (B, N')
    inputs_embeds: torch.Tensor  # (B, N', D)
    token_map: TokenMap
    position_ids: torch.Tensor | None = None
    labels: torch.Tensor | None = None
    keep: torch.Tensor | None = None  # (B, N) which original positions survive (for callers' bookkeeping)


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
    keep = (~tm.is_visual.flatten()) | (rank < k[img] if n_img else torch.zeros_like(rank, dtype=torch.bool))
    keep = keep.view(B, N)
    if attention_mask is None:
        attention_mask = torch.ones(B, N, dtype=torch.long, device=dev)
    right_padded = bool((attention_mask[:, -1] == 0).any())
    keep = keep & attention_mask.bool()  # old padding is dropped; rows are re-padded to the new longest row
    counts = keep.sum(-1)
    L = int(counts.max())
    idx = torch.arange(N, device=dev).expand(B, N)
    if right_padded:
        order = torch.where(keep, idx, idx + N).argsort(-1)[:, :L]
    else:
        order = torch.where(keep, idx + N, idx).argsort(-1)[:, N - L:]
    valid = torch.gather(keep, 1, order)
    pad_id = getattr(adapter.text_config, "pad_token_id", None)
    pad_id = 0 if pad_id is None else pad_id
    new_ids = torch.where(valid, torch.gather(input_ids, 1, order), torch.full_like(order, pad_id))
    new_mask = torch.where(valid, torch.gather(attention_mask, 1, order), torch.zeros_like(order))
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
    return RebuiltPrompt(new_ids, new_mask, embeds, new_tm, pos, new_labels, keep)


class VisionRuntime:
    """Runs the vision-side stages of a config on the visual inputs of one forward / generate call."""

    def __init__(self, adapter: ModelAdapter, stages: list[tuple[int, Method]], stats, seed: int) -> None:
        self.adapter = adapter
        self.stages = stages
        self.stats = stats
        self.seed = seed
        self.needs: set[str] = set()
        for _, m in stages:
            self.needs |= set(getattr(m, "needs", ()))
        #: the user's instruction (``run.set_instruction``): one string, or one per batch row
        self.instruction: str | list[str] | None = None

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
        groups = self.adapter.encode_images(kwargs, self.needs)
        prompt = self.prompt_text(kwargs) if "prompt" in self.needs else None
        outputs = []
        for group in groups:
            feats = group.features
            layout = group.layout
            extras = group.extras
            if "tower_features" not in extras.other:  # the features before the projector (e.g. CDPruner's CLIP space)
                extras.other["tower_features"] = lambda f=group.features: f
            projected = False
            generator = torch.Generator(device=feats.device).manual_seed(self.seed)
            reductions = []
            for pos, (stage_idx, m) in enumerate(self.stages):
                if m.space == "llm" and not projected:
                    feats = self.adapter.project(feats)
                    projected = True
                m.check_layout(layout)
                ctx = VisionContext(features=feats, layout=layout, extras=extras, generator=generator,
                                    space="llm" if projected else "vision", seed=self.seed,
                                    unit_image=torch.as_tensor(group.unit_image, device=feats.device),
                                    prompt=prompt)
                n_in = feats.shape[1]
                t0 = time.perf_counter()
                red = m.reduce_vision(ctx)
                if pos + 1 < len(self.stages) and not bool(red.valid.all()):
                    raise ConfigError(
                        f"stages[{stage_idx}] ({m.method}) delivers different token counts per unit (e.g. a per-image "
                        "budget split over crops); it must be the last vision-side stage"
                    )
                feats = red.output_features(feats)
                self.stats.add_time(time.perf_counter() - t0)
                layout = m.output_layout(layout, feats.shape[1])
                reductions.append(red)
                self.stats.record_vision_stage(stage_idx, m, group, n_in, red)
                extras = VisionExtras()  # extras describe the tower's original tokens only
            if not projected:
                feats = self.adapter.project(feats)
            group.out_layout = layout
            outputs.append((group, feats, reductions))
        return self.adapter.pack_images(outputs, kwargs)
