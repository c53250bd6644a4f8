"""What ``vtc eval`` takes (:class:`EvalOptions`) and the error it raises on a bad request (:class:`EvalError`)."""

from __future__ import annotations

from dataclasses import dataclass, field

__all__ = ["EvalError", "EvalOptions", "METRICS"]

#: ``--metric`` of ``--task custom``: exact match after the VQA normalisation (any reference answer), VQA
#: accuracy, reference contained in the answer (whole words, after normalisation), yes/no (POPE's rule)
METRICS = ("exact", "vqa", "contains", "yesno")


class EvalError(ValueError):
    """A problem with the evaluation request (model, cache, options); the message says what to change."""


@dataclass
class EvalOptions:
    """Everything ``vtc eval`` takes (see :func:`vtc.evaluation.cli.main` for the flags)."""

    task: str
    model: str | None = None
    configs: list[str] = field(default_factory=list)
    compare: bool = False
    data: str | None = None
    questions: str | None = None
    annotations: str | None = None
    images: str | None = None
    split: str = "test"
    limit: int | None = None
    seed: int = 0
    metric: str | None = None
    blind: bool = False
    batch_size: int = 8
    max_new_tokens: int | None = None
    prompt_suffix: str | None = None
    out: str | None = None
    plot: bool = False
    device: str = "auto"
    dtype: str = "auto"
    attn: str = "sdpa"
    overwrite: bool = False
    progress: bool = True
    quiet: bool = False
    bootstrap: int = 1000
