"""Configs: an ordered list of stages, from YAML, a dict or :class:`Config`, validated at load time.

```yaml
stages:
  - {method: visionzip, budget: 192}
  - {method: fastv, layer: 2, budget: 0.5}
```

Every error names the stage index, the method, the field, the bad value and what is allowed. Unknown keys are
errors. Layer ranges are checked against the model when the config is attached.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from .errors import ConfigError
from .methods import Method, available_methods, get_method_class
from .methods.base import MAX_SEED

__all__ = ["Config", "load_config"]

_TOP_LEVEL_KEYS = frozenset({"stages", "name", "description", "seed"})


@dataclass(frozen=True)
class Config:
    """A validated compression config: ``stages`` run in order (vision-side first, then LLM-side by layer).

    ``seed`` seeds the generator of random methods (a stage's own ``seed`` wins).
    """

    stages: tuple[Method, ...]
    name: str = ""
    description: str = ""
    seed: int = 0
    source: str = field(default="", compare=False)

    @property
    def vision_stages(self) -> tuple[Method, ...]:
        return tuple(s for s in self.stages if s.side == "vision")

    @property
    def llm_stages(self) -> tuple[Method, ...]:
        return tuple(s for s in self.stages if s.side == "llm")

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "seed": self.seed,
            "stages": [s.model_dump(exclude_defaults=False) for s in self.stages],
        }


def _format_validation_error(idx: int, method: str, err: ValidationError, raw: dict) -> str:
    lines = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"] if not isinstance(p, int) or True)
        field_name = str(e["loc"][0]) if e["loc"] else "?"
        if e["type"] == "extra_forbidden":
            cls = get_method_class(method)
            allowed = sorted(cls.parameters()) if cls else []
            lines.append(
                f"stages[{idx}] ({method}): unknown parameter '{field_name}' "
                f"(allowed: {', '.join(a for a in allowed if a != 'method')})"
            )
            continue
        msg = e["msg"]
        if msg.startswith("Value error, "):
            msg = msg[len("Value error, "):]
        if not e["loc"]:  # a check across fields (the message names them)
            lines.append(f"stages[{idx}] ({method}): {msg}")
            continue
        value = raw.get(field_name, "<missing>")
        lines.append(f"stages[{idx}] ({method}).{loc}: {msg} (got {value!r})")
    return "\n".join(lines)


def _parse_stage(idx: int, raw: Any) -> Method:
    if isinstance(raw, Method):
        return raw
    if not isinstance(raw, dict):
        raise ConfigError(f"stages[{idx}]: each stage must be a mapping with a 'method' key, got {raw!r}")
    method = raw.get("method")
    if method is None:
        raise ConfigError(f"stages[{idx}]: missing 'method' (available: {', '.join(available_methods())})")
    cls = get_method_class(str(method))
    if cls is None:
        raise ConfigError(
            f"stages[{idx}]: unknown method {method!r} (available: {', '.join(available_methods())})"
        )
    try:
        return cls.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(_format_validation_error(idx, str(method), err, raw)) from None
    except ConfigError as err:
        raise ConfigError(f"stages[{idx}] ({method}): {err}") from None


def _check_composition(stages: tuple[Method, ...]) -> None:
    seen: dict[int, int] = {}
    for i, s in enumerate(stages):
        for layer in s.llm_layers():
            if layer in seen:
                raise ConfigError(
                    f"stages[{i}] ({s.method}) and stages[{seen[layer]}] ({stages[seen[layer]].method}) both act at "
                    f"layer {layer}; two stages at one layer are not allowed (use different layers)"
                )
            seen[layer] = i
    # vision stages: a 'vision'-space (pre-projector) stage cannot follow an 'llm'-space one
    projected = False
    for i, s in enumerate(stages):
        if s.side != "vision":
            continue
        if s.space == "llm":
            projected = True
        elif projected:
            raise ConfigError(
                f"stages[{i}] ({s.method}): feature_space='vision' (before the projector) cannot follow a stage in "
                "'llm' space (after the projector); reorder the stages"
            )
    llm = [s for s in stages if s.side == "llm"]
    for i, s in enumerate(stages):
        if s.side == "llm" and not s.llm_layers():
            raise ConfigError(f"stages[{i}] ({s.method}): an LLM-side stage must act at one layer or more; it names "
                              "none")
    firsts = [min(s.llm_layers()) for s in llm]
    if firsts != sorted(firsts):
        raise ConfigError(
            "LLM-side stages must be listed in increasing layer order, got layers "
            + ", ".join(str(f) for f in firsts)
        )


def _looks_like_yaml(text: str) -> bool:
    """An inline config (``"stages: [{method: fastv, layer: 2}]"``) rather than a path or a bundled name."""
    return "\n" in text or ": " in text or text.lstrip().startswith(("{", "[", "stages:"))


def _read_path(config: str | os.PathLike) -> tuple[Any, str | None]:
    """(the config file: a Path or a package resource, None) for a path or bundled name, else (None, why)."""
    path = Path(config)
    if not path.exists():
        # maybe a bundled config name like "llava-1.5/fastv-50"
        bundled = resources.files("vtc") / "configs"
        for cand in (bundled / str(config), bundled / f"{config}.yaml"):
            if cand.is_file():
                return cand, None
        return None, f"config file not found: {config}"
    if path.is_dir():
        return None, f"config path {config} is a directory; give a YAML file (e.g. {Path(config) / 'name.yaml'})"
    return path, None


def load_config(config: str | os.PathLike | dict | Config | list) -> Config:
    """Load and validate a config from a YAML path, a bundled name, inline YAML, a dict, a list of stages or a
    Config. Every caller (the Python API and every ``vtc`` command) goes through this one loader.

    Raises :class:`vtc.ConfigError` naming the stage, field, value and allowed values on any problem.
    """
    if isinstance(config, Config):
        return config
    source = ""
    if isinstance(config, str | os.PathLike) and not (isinstance(config, str) and "\n" in config):
        path, why = _read_path(config)
        if path is None and isinstance(config, str) and _looks_like_yaml(config):
            return load_config(config + "\n")  # inline YAML on one line (e.g. a --config argument)
        if path is None:
            raise ConfigError(why)
        source = str(path)
        try:
            data = yaml.safe_load(path.read_text(encoding="utf-8"))
        except yaml.YAMLError as err:
            raise ConfigError(f"{path}: invalid YAML: {err}") from None
        except (OSError, UnicodeDecodeError) as err:
            raise ConfigError(f"{path}: cannot read the config: {err}") from None
    elif isinstance(config, str):
        try:
            data = yaml.safe_load(config)
        except yaml.YAMLError as err:
            raise ConfigError(f"invalid YAML: {err}") from None
    else:
        data = config
    if isinstance(data, list):
        data = {"stages": data}
    if not isinstance(data, dict):
        raise ConfigError(f"a config must be a mapping with a 'stages' list, got {type(data).__name__}")
    unknown = set(data) - _TOP_LEVEL_KEYS
    if unknown:
        raise ConfigError(
            f"unknown top-level config key(s): {', '.join(sorted(map(str, unknown)))} "
            f"(allowed: {', '.join(sorted(_TOP_LEVEL_KEYS))})"
        )
    raw_stages = data.get("stages")
    if raw_stages is None:
        raw_stages = []
    if not isinstance(raw_stages, list | tuple):
        raise ConfigError(f"'stages' must be a list, got {type(raw_stages).__name__}")
    stages = tuple(_parse_stage(i, s) for i, s in enumerate(raw_stages))
    _check_composition(stages)
    seed = data.get("seed", 0)
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= MAX_SEED:
        raise ConfigError(f"seed: must be an int in 0..2**63-1 (a torch.Generator seed), got {seed!r}")
    return Config(
        stages=stages,
        name=str(data.get("name", "") or (Path(source).stem if source else "")),
        description=str(data.get("description", "") or ""),
        seed=seed,
        source=source,
    )
