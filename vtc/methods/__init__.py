"""Method registry. One file per method; ``register_method`` adds a user's own.

The registry (``_REGISTRY``, filled on first use from the files of this package) is the one piece of
module-level mutable state in vtc besides the adapter registry: it is the documented registration API.
"""

from __future__ import annotations

from .base import Budget, LLMContext, Method, PromptText, ScorerMethod, VisionContext, VisionExtras

__all__ = [
    "Budget",
    "LLMContext",
    "Method",
    "PromptText",
    "ScorerMethod",
    "VisionContext",
    "VisionExtras",
    "register_method",
    "available_methods",
    "get_method_class",
]

_REGISTRY: dict[str, type[Method]] = {}


def register_method(name: str, cls: type[Method] | None = None, *, overwrite: bool = False):
    """Register a :class:`Method` subclass under ``name`` (usable as ``method: name`` in configs).

    Works as a decorator (``@register_method("mine")``) or a call (``register_method("mine", Mine)``).
    """

    def _register(c: type[Method]) -> type[Method]:
        if not (isinstance(c, type) and issubclass(c, Method)):
            raise TypeError(f"register_method('{name}'): {c!r} is not a vtc.methods.Method subclass")
        if name in _REGISTRY and _REGISTRY[name] is not c and not overwrite:
            raise ValueError(f"a method named '{name}' is already registered ({_REGISTRY[name].__name__})")
        _REGISTRY[name] = c
        return c

    return _register if cls is None else _register(cls)


def available_methods() -> list[str]:
    """Names of all registered methods, sorted."""
    _load_builtin()
    return sorted(_REGISTRY)


def get_method_class(name: str) -> type[Method] | None:
    _load_builtin()
    return _REGISTRY.get(name)


_loaded = False


def _load_builtin() -> None:
    global _loaded
    if _loaded:
        return
    _loaded = True
    import importlib
    import pkgutil

    for mod in pkgutil.iter_modules(__path__):
        if mod.name not in {"base"} and not mod.name.startswith("_"):
            importlib.import_module(f"{__name__}.{mod.name}")
