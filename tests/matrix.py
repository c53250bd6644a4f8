"""The data-driven invariant matrix: families x method cases, discovered from ``tests/cases/*.py``.

Each module in tests/cases/ may define ``FAMILIES: list[Family]`` and/or ``CASES: list[MethodCase]``.
tests/test_invariants.py runs every invariant (README, "Invariants") on every (family, case) pair the case allows,
for batch 1 and 3 (padded, different prompts and images) and for sdpa and eager.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class Family:
    name: str
    #: build(attn: str) -> model (tiny, random weights, eval mode, fp32)
    build: Callable[[str], Any]
    #: inputs(model, batch: int, seed: int) -> dict of forward kwargs; batch > 1 rows differ in prompt/image and
    #: are left-padded
    inputs: Callable[[Any, int, int], dict]
    #: visual tokens per image unit the methods see (vision side), for budget checks; None: not checked
    tokens_per_unit: int | None = None
    #: which method sides this family supports so far
    sides: tuple[str, ...] = ("vision", "llm")
    #: row(inputs, b) -> sample b of a padded batch as an unpadded batch of one, for families whose visual
    #: inputs are not batched per row (e.g. Qwen's packed pixel_values); None: the generic split
    row: Callable[[dict, int], dict] | None = None
    #: the method cases the expensive invariants (detach, decode consistency, batch = single) run on for this family
    #: (a representative subset, to keep the suite's time); None: every case. The cheap ones run every case.
    heavy_cases: tuple[str, ...] | None = None


@dataclass
class MethodCase:
    name: str
    #: stage dict that reduces (used by decode / backend / batch / budget invariants)
    reduce: dict
    #: stage dict that keeps every token (identity invariant); None when the method cannot keep everything
    identity: dict | None = None
    side: str = "llm"
    #: expected visual tokens out per unit given tokens in (budget invariant); None: content-adaptive
    expected: Callable[[int], int] | None = None
    #: restrict to these family names (None: all families whose sides allow it)
    families: tuple[str, ...] | None = None
    tol: float = 1e-4
    extra: dict = field(default_factory=dict)


def discover() -> tuple[list[Family], list[MethodCase]]:
    families: list[Family] = []
    cases: list[MethodCase] = []
    pkg_dir = Path(__file__).parent / "cases"
    for mod in sorted(pkgutil.iter_modules([str(pkg_dir)]), key=lambda m: m.name):
        module = importlib.import_module(f"cases.{mod.name}")
        families.extend(getattr(module, "FAMILIES", []))
        cases.extend(getattr(module, "CASES", []))
    return families, cases
