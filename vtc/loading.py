"""The one model loader: a VLM folder, cached hub id or bundled name (:mod:`vtc.model_names`) -> (model,
processor), checked to be a vision-language model vtc has an adapter for. ``vtc generate`` / ``show`` / ``demo``
(through :func:`vtc.demo.load`), ``vtc eval`` and the lmms-eval plugin all load through :func:`load_vlm`."""

from __future__ import annotations

import os

import torch

from .errors import ConfigError

__all__ = ["ModelLoadError", "load_vlm", "resolve_dtype", "DTYPES"]

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
          "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}


class ModelLoadError(ConfigError):
    """``--model`` names nothing vtc can load: no such folder / hub id, not a VLM, or a VLM without an adapter."""


def resolve_dtype(dtype: str | torch.dtype, device: str | torch.device = "cpu") -> torch.dtype:
    """``auto`` is float16 on CUDA, float32 elsewhere; names of :data:`DTYPES` otherwise."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        return torch.float16 if str(device).startswith("cuda") else torch.float32
    if dtype not in DTYPES:
        raise ModelLoadError(f"--dtype {dtype!r} is not supported (allowed: auto, {', '.join(DTYPES)})")
    return DTYPES[dtype]


def load_vlm(path: str | os.PathLike, *, device: str | torch.device = "cpu", dtype: str | torch.dtype = "auto",
             attn: str = "sdpa"):
    """(model, processor) from a local folder, cached hub id or bundled name, in eval mode on ``device``; the
    processor's tokenizer pads on the left (batched generation). Registers the demo 1D model's classes with the
    transformers Auto classes first (idempotent).

    Raises :class:`ModelLoadError` (a :class:`vtc.ConfigError`) naming ``--model`` if the path does not exist,
    cannot be loaded, or is not a vision-language model vtc supports.
    """
    from transformers import AutoConfig, AutoModelForImageTextToText, AutoProcessor

    from .demo.ordered_vlm import register
    from .model_names import resolve_model
    from .models import get_adapter, supported_models

    register()
    try:
        path = resolve_model(path)
    except ValueError as err:
        raise ModelLoadError(str(err)) from None
    try:
        config = AutoConfig.from_pretrained(path)
    except (OSError, ValueError) as err:
        where = "the folder has no usable config.json" if os.path.isdir(path) else \
            "no such local folder, and not loadable as a hub id"
        raise ModelLoadError(f"--model {path}: {where} ({str(err).splitlines()[0]})") from None
    if getattr(config, "vision_config", None) is None:
        archs = ", ".join(getattr(config, "architectures", None) or [type(config).__name__])
        raise ModelLoadError(f"--model {path}: {archs} (model_type '{config.model_type}') is not a vision-language "
                             f"model; vtc needs one of: {', '.join(supported_models())}")
    torch_dtype = resolve_dtype(dtype, device)
    try:
        model = AutoModelForImageTextToText.from_pretrained(
            path, dtype=torch_dtype, attn_implementation=attn,
            device_map=str(device) if str(device).startswith("cuda") else None)
    except ValueError as err:
        raise ModelLoadError(f"--model {path}: cannot load it as an image-text-to-text model "
                             f"({str(err).splitlines()[0]}); supported: {', '.join(supported_models())}") from None
    try:
        get_adapter(model)
    except ConfigError as err:
        raise ModelLoadError(f"--model {path}: {err}") from None
    processor = AutoProcessor.from_pretrained(path)
    if not hasattr(processor, "image_processor"):
        raise ModelLoadError(f"--model {path}: its processor ({type(processor).__name__}) has no image processor")
    processor.tokenizer.padding_side = "left"
    return model.to(device).eval(), processor
