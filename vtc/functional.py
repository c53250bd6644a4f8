"""Standalone API: run vision-side methods on plain tensors, no model needed (serving engines, pipelines)."""

from __future__ import annotations

import torch

from .config import Config, load_config
from .errors import ConfigError
from .layout import Layout, MultiCrop
from .methods.base import VisionContext, VisionExtras
from .reduction import Reduction

__all__ = ["reduce_embeddings"]


def reduce_embeddings(
    features: torch.Tensor,
    layout: Layout,
    config: str | dict | Config | list,
    *,
    extras: VisionExtras | dict | None = None,
    seed: int | None = None,
) -> tuple[torch.Tensor, Reduction | list[Reduction]]:
    """Reduce visual features with the vision-side stages of ``config``.

    features: (n, D) for one image or (U, n, D) for U images sharing ``layout``. For a :class:`MultiCrop`
    layout each part (base, crops) is reduced separately and concatenated.
    extras: what scoring methods need when the features do not come from a supported model, e.g.
    ``{"cls_attention": (U, n) tensor, "keys": (U, n, d) tensor}`` (see :class:`vtc.methods.VisionExtras`).
    Returns (reduced features (U, k, D) or (k, D), Reduction) — for several stages, the list of Reductions.
    """
    cfg = load_config(config)
    if cfg.llm_stages:
        raise ConfigError(
            "reduce_embeddings runs vision-side stages only; stages "
            + ", ".join(f"{s.method}@layer{s.llm_layers()}" for s in cfg.llm_stages)
            + " act inside an LLM (use vtc.compress on a model)"
        )
    squeeze = features.dim() == 2
    x = features.unsqueeze(0) if squeeze else features
    if x.dim() != 3:
        raise ValueError(f"features must be (n, D) or (U, n, D), got shape {tuple(features.shape)}")
    if x.shape[1] != layout.num_tokens:
        raise ValueError(f"features have {x.shape[1]} tokens but layout {layout!r} has {layout.num_tokens}")
    if isinstance(extras, dict):
        extras = VisionExtras(**{k: (lambda v=v: v) for k, v in extras.items() if k != "other"})
    extras = extras or VisionExtras()
    gen = torch.Generator(device=x.device).manual_seed(cfg.seed if seed is None else seed)
    if isinstance(layout, MultiCrop):
        outs, reds, start = [], [], 0
        for part in layout.parts:
            n = part.num_tokens
            y, r = reduce_embeddings(x[:, start:start + n], part, cfg, seed=seed)
            outs.append(y)
            reds.append(r)
            start += n
        y = torch.cat(outs, dim=1)
        return (y[0] if squeeze else y), reds
    reductions = []
    for stage in cfg.vision_stages:
        stage.check_layout(layout)
        ctx = VisionContext(features=x, layout=layout, extras=extras, generator=gen, space=stage.space,
                            seed=cfg.seed if seed is None else seed)
        red = stage.reduce_vision(ctx)
        x = red.output_features(x)
        layout = stage.output_layout(layout, x.shape[1])
        reductions.append(red)
        extras = VisionExtras()
    result: Reduction | list[Reduction] = reductions[0] if len(reductions) == 1 else reductions
    return (x[0] if squeeze else x), result
