"""Model adapters: one file per family; ``register_adapter`` adds a user's own."""

from __future__ import annotations

from torch import nn

from ..errors import ConfigError
from .base import ImageFeatures, ModelAdapter, TokenMap, VisualGroup

__all__ = ["ModelAdapter", "TokenMap", "VisualGroup", "ImageFeatures", "register_adapter", "get_adapter",
           "supported_models"]

_ADAPTERS: list[type[ModelAdapter]] = []
#: modules of this package that hold no adapter (everything else is imported on the first lookup)
_HELPERS = {"base", "vision_towers", "timm_tower"}


def register_adapter(cls: type[ModelAdapter]) -> type[ModelAdapter]:
    """Register an adapter class (usable as a decorator). Later registrations take precedence; a user's adapter
    always comes before the built-in ones (the classes of this package's modules)."""
    if not (isinstance(cls, type) and issubclass(cls, ModelAdapter)):
        raise TypeError(f"register_adapter: {cls!r} is not a vtc.models.ModelAdapter subclass")
    if cls in _ADAPTERS:
        _ADAPTERS.remove(cls)
    builtin = cls.__module__.startswith(__name__ + ".")
    first_builtin = next((i for i, a in enumerate(_ADAPTERS) if a.__module__.startswith(__name__ + ".")),
                         len(_ADAPTERS))
    _ADAPTERS.insert(first_builtin if builtin else 0, cls)
    return cls


_loaded = False


def _load_builtin() -> None:
    """Import every adapter module of this package once (the same rule as ``vtc.methods``: one file per family,
    registered with ``@register_adapter`` in its file; no list to edit)."""
    global _loaded
    if _loaded:
        return
    _loaded = True
    import importlib
    import pkgutil

    for mod in pkgutil.iter_modules(__path__):
        if mod.name in _HELPERS or mod.name.startswith("_"):
            continue
        try:
            importlib.import_module(f"{__name__}.{mod.name}")
        except ModuleNotFoundError as err:  # the installed transformers lacks the family
            if not (err.name or "").startswith("transformers"):
                raise


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
