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


def load(kind: str = "grid", path: str | Path | None = None):
    """(model, processor) of a shipped demo VLM: ``kind`` "grid" (vtc-tiny-llava) or "1d" (vtc-tiny-1d).

    The processor's tokenizer is set to left padding, as batched generation needs.
    """
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from .ordered_vlm import register

    register()
    if path is None:
        path = {"grid": GRID_MODEL_PATH, "1d": ORDERED_MODEL_PATH}[kind]
    model = AutoModelForImageTextToText.from_pretrained(path).eval()
    processor = AutoProcessor.from_pretrained(path)
    processor.tokenizer.padding_side = "left"
    return model, processor
