"""The project's own tiny trained demo VLMs and their synthetic VQA task.

Submodules (imported lazily, nothing heavy here):

- ``vtc.demo.task``: seeded procedural shapes-VQA generator (``get_sample``, ``get_samples``).
- ``vtc.demo.ordered_vlm``: the ordered-1D-token VLM as transformers classes (``register()``).
- ``vtc.demo.build``: configs, tokenizer and processors of both demo models.
- ``vtc.demo.evaluate``: batched greedy-generation accuracy (``evaluate``).
"""

from pathlib import Path

ASSETS = Path(__file__).resolve().parent.parent / "assets"
GRID_MODEL_PATH = ASSETS / "tiny-llava"
ORDERED_MODEL_PATH = ASSETS / "tiny-1d"

__all__ = ["ASSETS", "GRID_MODEL_PATH", "ORDERED_MODEL_PATH", "load"]


def load(kind: str = "grid", path: str | Path | None = None, *, attn: str = "sdpa", dtype: str = "float32"):
    """(model, processor) of a shipped demo VLM: ``kind`` "grid" (vtc-tiny-llava) or "1d" (vtc-tiny-1d), or of the
    VLM saved at ``path`` (any family; ``vtc generate`` / ``vtc show`` load ``--model`` through here), both through
    the one loader :func:`vtc.loading.load_vlm`.

    Registers the demo 1D model with the transformers Auto classes first (idempotent); the processor's tokenizer is
    set to left padding, as batched generation needs.
    """
    from ..loading import load_vlm

    if path is None:
        if kind not in ("grid", "1d"):
            raise ValueError(f"demo model kind must be 'grid' or '1d', got {kind!r}")
        path = GRID_MODEL_PATH if kind == "grid" else ORDERED_MODEL_PATH
    return load_vlm(path, attn=attn, dtype=dtype)
