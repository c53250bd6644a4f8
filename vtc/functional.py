"""Standalone API: run vision-side methods on plain tensors, no model needed (serving engines, pipelines).

```python
import torch, vtc

feats = torch.randn(2, 576, 1024)                    # two images, 24 x 24 CLIP patches each (CLS dropped)
extras = {"cls_attention": attn_cls,                 # (2, 576) CLS row of the feature layer, summed over heads
          "keys": keys,                              # (2, 576, 64) the layer's keys averaged over heads
          "cls_token": cls}                          # (2, 1024) the layer's CLS hidden state
out, red = vtc.reduce_embeddings(feats, vtc.Grid(24, 24), "configs/llava-1.5/visionzip-64.yaml", extras=extras)
out.shape          # (2, 64, 1024): then your projector
red.source         # (2, 576): the output token each patch went to (-1: dropped)

out, red = vtc.reduce_embeddings(feats, vtc.Grid(24, 24), {"stages": [{"method": "pool", "budget": 144}]})
```

For a timm ViT, :func:`vtc.models.timm_tower.timm_extras` returns the features and these extras.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import torch

from .config import Config, load_config
from .errors import ConfigError
from .layout import Layout, MultiCrop
from .methods.base import Method, PromptText, VisionContext, VisionExtras
from .reduction import Reduction

__all__ = ["reduce_embeddings"]

_FIELDS = ("cls_attention", "received_attention", "keys", "cls_token", "hidden_with_cls")


def _as_extras(extras: VisionExtras | dict | None, batched: bool) -> VisionExtras:
    """A VisionExtras from a dict of tensors (or callables); unknown names go to ``other``. Unbatched inputs
    (features given as (n, D)) get a leading unit dimension."""
    if extras is None:
        return VisionExtras()
    if isinstance(extras, VisionExtras):
        return extras
    if not isinstance(extras, dict):
        raise ConfigError(f"extras must be a dict of tensors or a vtc.methods.VisionExtras, got {type(extras).__name__}")

    def wrap(name: str, v) -> Callable[[], torch.Tensor]:
        if callable(v) and not isinstance(v, torch.Tensor):
            return v
        if not isinstance(v, torch.Tensor):
            raise ConfigError(f"extras['{name}'] must be a tensor, got {type(v).__name__}")
        t = v if batched else v.unsqueeze(0)
        return lambda: t

    known = {k: wrap(k, v) for k, v in extras.items() if k in _FIELDS}
    other = {k: wrap(k, v) for k, v in extras.items() if k not in _FIELDS and k != "other"}
    other.update(extras.get("other", {}) or {})
    return VisionExtras(**known, other=other)


def _map_extras(extras: VisionExtras, fn: Callable[[str, torch.Tensor], torch.Tensor]) -> VisionExtras:
    """Lazily transform every extra with ``fn(name, tensor)``."""

    def lazy(name, f):
        return None if f is None else (lambda: fn(name, f()))

    return VisionExtras(**{n: lazy(n, getattr(extras, n)) for n in _FIELDS},
                        other={k: lazy(k, f) for k, f in extras.other.items()})


def run_vision_stages(x: torch.Tensor, layout: Layout, stages: list[tuple[int, Method]], extras: VisionExtras,
                      seed: int, *, unit_image: torch.Tensor | None = None,
                      project: Callable[[torch.Tensor], torch.Tensor] | None = None,
                      on_stage: Callable[..., None] | None = None, states: dict[int, Any] | None = None,
                      projected: bool = False, prompt: PromptText | None = None,
                      ) -> tuple[torch.Tensor, Layout, list[Reduction], bool]:
    """Run vision-side ``stages`` ((config index, method) pairs, in order) on features ``x`` (U, n, D).

    The one stage loop behind :func:`reduce_embeddings` and the model runtime. ``project``: the model's projector,
    applied before the first stage that works after it (``feature_space: llm``); without it the features are
    taken to be in each stage's own space. ``on_stage(index, method, n_in, reduction, seconds)`` is called after
    every stage (seconds: time in the method). ``states``: each stage's per-run state by config index (the model
    runtime's; None: a fresh ``new_state()`` per call). ``projected``: ``x`` is already in
    the LLM space (e.g. OneVision's pooled video frames; ``project`` is then never applied). ``prompt``: the
    batch's prompt, for stages that read it (``reads_prompt``). Returns (features, layout, reductions, projected).
    """
    reductions: list[Reduction] = []
    for pos, (index, stage) in enumerate(stages):
        if project is not None and stage.space == "llm" and not projected:
            x = project(x)
            projected = True
        stage.check_layout(layout)
        space = stage.space if project is None else ("llm" if projected else "vision")
        state = stage.new_state() if states is None else states.get(index)
        ctx = VisionContext(features=x, layout=layout, extras=extras, space=space, seed=seed, unit_image=unit_image,
                            state=state, prompt=prompt)
        n_in = x.shape[1]
        t0 = time.perf_counter()
        red = stage.reduce_vision(ctx)
        if pos + 1 < len(stages) and not bool(red.valid.all()):
            raise ConfigError(
                f"stages[{index}] ({stage.method}) delivers different token counts per unit (e.g. a per-image "
                "budget split over crops); it must be the last vision-side stage"
            )
        x = red.output_features(x)
        seconds = time.perf_counter() - t0
        layout = stage.output_layout(layout, x.shape[1])
        reductions.append(red)
        if on_stage is not None:
            on_stage(index, stage, n_in, red, seconds)
        extras = VisionExtras()  # extras describe the original tokens only
    return x, layout, reductions, projected


def _run_stages(x: torch.Tensor, layout: Layout, cfg: Config, extras: VisionExtras, seed: int,
                unit_image: torch.Tensor | None = None) -> tuple[torch.Tensor, list[Reduction]]:
    y, _, reductions, _ = run_vision_stages(x, layout, list(enumerate(cfg.vision_stages)), extras, seed,
                                            unit_image=unit_image)
    return y, reductions


def _rows(red: Reduction, rows: slice) -> Reduction:
    return Reduction(anchor=red.anchor[rows], valid=red.valid[rows], source=red.source[rows],
                     features=None if red.features is None else red.features[rows],
                     sizes=None if red.sizes is None else red.sizes[rows])


def reduce_embeddings(
    features: torch.Tensor,
    layout: Layout,
    config: str | dict | Config | list,
    *,
    extras: VisionExtras | dict | None = None,
    seed: int | None = None,
) -> tuple[torch.Tensor, Reduction | list]:
    """Reduce visual features with the vision-side stages of ``config``, no model needed.

    features: (n, D) for one image or (U, n, D) for U images sharing ``layout``.
    extras: what scoring methods need when the features do not come from a supported model, as a dict of tensors
    (or a :class:`vtc.methods.VisionExtras`), e.g. ``{"cls_attention": (U, n), "keys": (U, n, d),
    "cls_token": (U, D)}`` for VisionZip on a CLIP-style tower, ``{"received_attention": (U, n), "keys": ...}``
    on a tower without CLS. Unbatched features take unbatched extras ((n,), (n, d), (D,)).

    :class:`MultiCrop` layouts (LLaVA-NeXT anyres: base + crops): each part is a unit of its own, so a method
    reduces every crop to its budget (``per: image`` methods split one budget over the image's parts); token-wise
    extras are given over all the image's tokens ((U, N_total, ...)), per-part extras with a part axis
    ((U, P, ...), e.g. ``cls_token`` (U, P, D)). The parts' outputs are concatenated per image.

    Returns (reduced features (U, k, D) or (k, D), Reduction); with several stages a list of Reductions (one per
    stage); for a MultiCrop layout a list over the parts of those.
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
    ex = _as_extras(extras, batched=not squeeze)
    seed = cfg.seed if seed is None else seed
    if not isinstance(layout, MultiCrop):
        y, reductions = _run_stages(x, layout, cfg, ex, seed)
        result: Reduction | list = reductions[0] if len(reductions) == 1 else reductions
        return (y[0] if squeeze else y), result

    # ---- MultiCrop: every part is a unit ------------------------------------------------------------------------
    U, N, D = x.shape
    parts = layout.parts
    P = len(parts)
    sizes = [p.num_tokens for p in parts]
    starts = [sum(sizes[:i]) for i in range(P)]

    def part_slice(name: str, t: torch.Tensor, p: int) -> torch.Tensor:
        if t.dim() >= 2 and t.shape[1] == N:
            return t[:, starts[p]:starts[p] + sizes[p]]
        if t.dim() >= 2 and t.shape[1] == P:
            return t[:, p]
        raise ConfigError(f"extras['{name}'] has shape {tuple(t.shape)}; on a MultiCrop layout give it over all "
                          f"{N} tokens (U, {N}, ...) or per part (U, {P}, ...)")

    if len(set(parts)) == 1:
        # all parts alike: one batch of U * P units, so per-image methods see the image's parts together
        n = sizes[0]
        xu = x.view(U, P, n, D).reshape(U * P, n, D)

        def stack(name: str, t: torch.Tensor) -> torch.Tensor:
            if t.dim() >= 2 and t.shape[1] == N:
                return t.reshape(U, P, n, *t.shape[2:]).reshape(U * P, n, *t.shape[2:])
            if t.dim() >= 2 and t.shape[1] == P:
                return t.reshape(U * P, *t.shape[2:])
            return part_slice(name, t, 0)  # raises the shape error

        unit_image = torch.arange(U, device=x.device).repeat_interleave(P)
        y, reductions = _run_stages(xu, parts[0], cfg, _map_extras(ex, stack), seed, unit_image)
        valid = reductions[-1].valid if reductions else torch.ones(U * P, y.shape[1], dtype=torch.bool,
                                                                   device=x.device)
        y = y[valid].view(U, -1, y.shape[-1])  # each image's parts' tokens, padding of uneven units dropped
        per_part = [[_rows(r, slice(p, None, P)) for r in reductions] for p in range(P)]
    else:
        if any(s.per == "image" for s in cfg.vision_stages):
            raise ConfigError("per: image needs the parts of a MultiCrop layout to share one grid; these differ: "
                              f"{[repr(p) for p in parts]}")
        outs, per_part = [], []
        for p, part in enumerate(parts):
            sub = _map_extras(ex, lambda name, t, p=p: part_slice(name, t, p))
            yp, reds = _run_stages(x[:, starts[p]:starts[p] + sizes[p]], part, cfg, sub, seed)
            outs.append(yp)
            per_part.append(reds)
        y = torch.cat(outs, dim=1)
    reds_out = [r[0] if len(r) == 1 else r for r in per_part]
    return (y[0] if squeeze else y), reds_out
