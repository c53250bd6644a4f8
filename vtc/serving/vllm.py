"""vtc inside vLLM: an out-of-tree plugin (entry point ``vllm.general_plugins``) for vision-side methods.

```bash
vllm serve llava-hf/llava-1.5-7b-hf --hf-overrides '{"vtc_config": "llava-1.5/visionzip-64"}'
```
or ``LLM(model=..., hf_overrides={"vtc_config": ...})`` offline (a bundled config name, a YAML path, a YAML string or
a dict). Without ``vtc_config`` the model runs exactly as stock vLLM.

How: :func:`register` registers, for each supported architecture name, a subclass of vLLM's own model class (in
``vtc.serving.vllm_llava`` / ``vtc.serving.vllm_qwen2_vl``; for the bundled 1D demo model, which vLLM has no class
for, the whole model: ``vtc.serving.vllm_ordered``) whose image embeddings go through vtc's vision-side stages
(the same ``Method.reduce_vision`` maths and :class:`vtc.runtime.vision.VisionRuntime` loop as with transformers,
fed by a small vLLM-side adapter that scores on vLLM's own vision modules), and a processing-info subclass whose
``get_num_image_tokens`` returns the reduced count, so vLLM expands each image's placeholder to exactly that many
tokens and allocates KV cache for them only. That count must be known before the encoder runs: it is computed by
:func:`reduced_count`, a dry run of the stages on the image's layout.

Limits (each a :class:`vtc.ConfigError` at model load): LLM-side stages (vLLM allocates the paged KV cache per
prompt token before the first decoder layer runs, so a stage inside the LLM cannot shrink the prompt), vision-side
stages whose delivered count depends on the image content, and stages that read the prompt text (``cdpruner``).
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from functools import lru_cache

import torch

from ..config import Config, load_config
from ..errors import ConfigError
from ..functional import reduce_embeddings
from ..layout import Layout
from ..models.base import ImageFeatures, ModelAdapter
from ..runtime.stats import Stats
from ..runtime.vision import VisionRuntime

__all__ = ["register", "SUPPORTED_ARCHITECTURES", "config_from_hf", "reduced_count", "add_vision_model_level",
           "run_stages", "require_whole_tower"]

#: architecture name (config.json ``architectures``) -> "module:Class" of vtc's subclass of vLLM's class
SUPPORTED_ARCHITECTURES: dict[str, str] = {
    "LlavaForConditionalGeneration": "vtc.serving.vllm_llava:VtcLlavaForConditionalGeneration",
    "LlavaNextForConditionalGeneration": "vtc.serving.vllm_llava:VtcLlavaNextForConditionalGeneration",
    "Qwen2VLForConditionalGeneration": "vtc.serving.vllm_qwen2_vl:VtcQwen2VLForConditionalGeneration",
    "Qwen2_5_VLForConditionalGeneration": "vtc.serving.vllm_qwen2_vl:VtcQwen2_5_VLForConditionalGeneration",
    # the bundled 1D demo model (vtc-tiny-1d): vLLM has no class for it, vtc's is the whole model
    "OrderedVLMForConditionalGeneration": "vtc.serving.vllm_ordered:VtcOrderedVLMForConditionalGeneration",
}


def register() -> None:
    """The ``vllm.general_plugins`` entry point: make vLLM build vtc's subclasses for the supported architectures.

    Runs in every vLLM process (idempotent). The classes are imported lazily by vLLM, like its own models. Also
    registers the 1D demo model's config type (``vtc_ordered_vlm``) with transformers' ``AutoConfig``, so vLLM can
    read its ``config.json``.
    """
    from vllm import ModelRegistry

    from ..demo.ordered_vlm import register as register_ordered_vlm

    register_ordered_vlm()

    for arch, target in SUPPORTED_ARCHITECTURES.items():
        ModelRegistry.register_model(arch, target)


# ---- config ---------------------------------------------------------------------------------------------------------

def _key(raw) -> str:
    return raw if isinstance(raw, str) else json.dumps(raw, sort_keys=True, default=str)


@lru_cache(maxsize=32)
def _load(key: str, raw_is_str: bool) -> Config:
    return load_config(key if raw_is_str else json.loads(key))


def config_from_hf(hf_config) -> Config | None:
    """The vtc config given as ``hf_overrides={"vtc_config": ...}`` (None: none given, the model stays stock).

    Raises :class:`vtc.ConfigError` for an invalid config and for stages vLLM cannot run (LLM-side ones).
    """
    raw = getattr(hf_config, "vtc_config", None)
    if raw is None:
        return None
    if not isinstance(raw, str | dict | list):
        raise ConfigError(f"vtc_config must be a config name, a YAML path / string, a dict or a list of stages, "
                          f"got {type(raw).__name__}")
    cfg = _load(_key(raw), isinstance(raw, str))
    if cfg.llm_stages:
        raise ConfigError(
            "vtc in vLLM runs vision-side stages only; "
            + ", ".join(f"stages[{cfg.stages.index(s)}] ({s.method}, layer {s.llm_layers()})" for s in cfg.llm_stages)
            + " act(s) inside the LLM, but vLLM allocates the paged KV cache for every prompt token before the first "
            "decoder layer runs, so a stage there cannot shrink the prompt (run it with vtc.compress in transformers)"
        )
    readers = [f"stages[{cfg.stages.index(s)}] ({s.method})" for s in cfg.vision_stages
               if s.reads_prompt]
    if readers:
        raise ConfigError(", ".join(readers) + " read(s) the prompt text, but vLLM runs the vision encoder without the "
                          "prompt (and must know each image's token count before); run it with vtc.compress in "
                          "transformers")
    return cfg


# ---- the stages ------------------------------------------------------------------------------------------------------

def run_stages(side: ModelAdapter, cfg: Config, kwargs: dict) -> list[ImageFeatures]:
    """The vision-side stages of ``cfg`` on the images ``side`` encodes from ``kwargs``: the
    :class:`vtc.runtime.vision.VisionRuntime` loop of transformers, its stats discarded (vLLM has nowhere to report
    them)."""
    return VisionRuntime(side, list(enumerate(cfg.vision_stages)), Stats(), cfg.seed).reduce_images(kwargs)


def require_whole_tower(attn) -> None:
    """Refuse a tower attention split by tensor parallelism: vtc's scores need all its heads."""
    if getattr(attn, "tp_size", 1) != 1:
        raise ConfigError("vtc's scores need the whole vision tower on one device (tensor_parallel_size 1 for "
                          "the tower, e.g. mm_encoder_tp_mode='data')")


# ---- counts ---------------------------------------------------------------------------------------------------------

def dummy_extras(U: int, layout: Layout, dim: int, gen: torch.Generator) -> dict:
    """Random stand-ins for every extra a scoring method may ask for (shapes as the adapters give them)."""
    n = layout.num_tokens
    return {
        "cls_attention": torch.rand(U, n, generator=gen),
        "received_attention": torch.rand(U, n, generator=gen),
        "keys": torch.randn(U, n, 4, generator=gen),
        "cls_token": torch.randn(U, dim, generator=gen),
        "hidden_with_cls": torch.randn(U, 1 + n, dim, generator=gen),
    }


@lru_cache(maxsize=256)
def _count(cfg: Config, layout: Layout) -> int:
    counts = set()
    dim = 4
    for seed in (0, 1):
        gen = torch.Generator().manual_seed(seed)
        feats = torch.randn(1, layout.num_tokens, dim, generator=gen)
        out, _ = reduce_embeddings(feats, layout, cfg, extras=dummy_extras(1, layout, dim, gen), seed=cfg.seed)
        counts.add(out.shape[1])
    if len(counts) != 1:
        raise ConfigError(
            f"config stages {[s.method for s in cfg.vision_stages]} deliver a number of tokens that depends on the "
            f"image content ({sorted(counts)} on two random inputs of layout {layout!r}); vLLM needs the count from "
            "the image size alone (before the encoder runs): use int or fraction budgets of a fixed-count method"
        )
    return counts.pop()


def reduced_count(cfg: Config | None, layout: Layout) -> int:
    """Tokens the vision-side stages of ``cfg`` deliver for one single-unit image of ``layout`` (LLaVA-NeXT's crops
    and newlines: :func:`vtc.serving.vllm_llava.next_count`) (its own count when ``cfg`` has
    no vision-side stage): a dry run of the real stages on random features, done twice to refuse counts that depend
    on the content. Cached per (config, layout)."""
    if cfg is None or not cfg.vision_stages:
        return layout.num_tokens
    return _count(cfg, layout)


# ---- weights --------------------------------------------------------------------------------------------------------

def add_vision_model_level(weights: Iterable[tuple[str, torch.Tensor]], prefixes: tuple[str, ...]
                           ) -> Iterable[tuple[str, torch.Tensor]]:
    """Checkpoint names with the ``vision_model.`` level vLLM's CLIP / SigLIP towers expect: transformers 5.x saves
    ``model.vision_tower.encoder...`` where older checkpoints (and vLLM) have ``...vision_tower.vision_model.encoder``.
    Names already in that form pass unchanged, so both layouts load."""
    for name, w in weights:
        for p in prefixes:
            if name.startswith(p) and not name[len(p):].startswith("vision_model."):
                name = p + "vision_model." + name[len(p):]
                break
        yield name, w
