"""Model adapters: one file per family; ``register_adapter`` adds a user's own."""

from __future__ import annotations

from torch import nn

from ..errors import ConfigError
from .base import ImageFeatures, ModelAdapter, TokenMap, VisualGroup

__all__ = ["ModelAdapter", "TokenMap", "VisualGroup", "ImageFeatures", "register_adapter", "get_adapter",
           "supported_models"]

_ADAPTERS: list[type[ModelAdapter]] = []


def register_adapter(cls: type[ModelAdapter]) -> type[ModelAdapter]:
    """Register an adapter class (usable as a decorator). Later registrations take precedence."""
    if not (isinstance(cls, type) and issubclass(cls, ModelAdapter)):
        raise TypeError(f"register_adapter: {cls!r} is not a vtc.models.ModelAdapter subclass")
    if cls in _ADAPTERS:
        _ADAPTERS.remove(cls)
    _ADAPTERS.insert(0, cls)
    return cls


def _load_builtin() -> None:
    if getattr(_load_builtin, "done", False):
        return
    _load_builtin.done = True  # type: ignore[attr-defined]
    import importlib

    for name in ("qwen2_vl", "gemma3", "llava_onevision", "llava_next", "llava", "ordered_vlm"):
        try:
            mod = importlib.import_module(f"{__name__}.{name}")
        except ModuleNotFoundError as err:  # family module not written yet / transformers lacks the model
            if err.name and err.name.startswith(__name__):
                continue
            raise
        for obj in vars(mod).values():
            if isinstance(obj, type) and issubclass(obj, ModelAdapter) and obj is not ModelAdapter and obj.model_class_names:
                if obj not in _ADAPTERS:
                    _ADAPTERS.append(obj)


def supported_models() -> list[str]:
    _load_builtin()
    return sorted({n for a in _ADAPTERS for n in a.model_class_names})


def get_adapter(model: nn.Module) -> ModelAdapter:
    """The adapter for ``model``; ConfigError listing the supported classes if there is none."""
    _load_builtin()
    for cls in _ADAPTERS:
        if cls.matches(model):
            return cls(model)
    raise ConfigError(
        f"vtc has no adapter for {type(model).__name__}; supported: {', '.join(supported_models())}. "
        "Write one with vtc.register_adapter (see README, 'Adding a model family')."
    )
