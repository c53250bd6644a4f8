"""Accuracy of a demo VLM on the shapes-VQA task, by batched greedy generation.

``evaluate`` only calls ``processor(...)`` and ``model.generate(...)``, so a model wrapped by a compression
context manager is measured exactly as it runs::

    with some_method(model):
        report = evaluate(model, processor, split="test", n=500)
    report["accuracy"], report["per_type"]["count"]
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Sequence

import torch
from PIL import Image

from .task import QTYPES, Sample, format_prompt, get_samples

__all__ = ["evaluate", "parse_answer"]


def parse_answer(text: str) -> str:
    """First word of the generated text, lower-cased ('' if nothing was generated)."""
    words = text.strip().split()
    return words[0].lower() if words else ""


@torch.no_grad()
def evaluate(
    model,
    processor,
    split: str = "test",
    n: int = 600,
    batch_size: int = 50,
    image_transform: Callable[[Image.Image], Image.Image] | None = None,
    *,
    start: int = 0,
    samples: Sequence[Sample] | None = None,
    max_new_tokens: int = 3,
    mode: str = "generate",
    progress: bool = False,
    return_predictions: bool = False,
) -> dict:
    """Accuracy overall and per question type on ``n`` samples of ``split`` (from index ``start``).

    Args:
        model: a demo VLM (``LlavaForConditionalGeneration`` or ``OrderedVLMForConditionalGeneration``),
            possibly wrapped by a compression method; it is put in eval mode.
        processor: its processor; the tokenizer is switched to left padding.
        image_transform: applied to every PIL image before the processor (e.g. ``task.blank_image``
            for the blind baseline).
        samples: evaluate these instead of ``get_samples(split, n, start)``.
        mode: ``"generate"`` (greedy ``model.generate``) or ``"first_token"`` (argmax of the next-token
            logits of one forward pass; answers are one word, so this is equivalent and faster).
        return_predictions: also return the list of predicted answers.

    Returns:
        ``{"accuracy", "per_type": {qtype: accuracy}, "count_per_type", "n", "split", "mode"}``
        (+ ``"predictions"``).
    """
    if samples is None:
        samples = get_samples(split, n, start)
    model.eval()
    processor.tokenizer.padding_side = "left"
    device = next(model.parameters()).device
    tok = processor.tokenizer
    preds: list[str] = []
    batches = range(0, len(samples), batch_size)
    if progress:
        from tqdm.auto import tqdm

        batches = tqdm(batches, desc=f"eval {split}", leave=False)
    for b in batches:
        chunk = samples[b : b + batch_size]
        images = [image_transform(s.image) if image_transform else s.image for s in chunk]
        inputs = processor(
            images=images, text=[format_prompt(s.question) for s in chunk], return_tensors="pt", padding=True
        ).to(device)
        if mode == "generate":
            out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
            new = out[:, inputs["input_ids"].shape[1] :]
        elif mode == "first_token":
            new = model(**inputs).logits[:, -1].argmax(-1, keepdim=True)
        else:
            raise ValueError(f"mode must be 'generate' or 'first_token', not {mode!r}")
        preds.extend(parse_answer(t) for t in tok.batch_decode(new, skip_special_tokens=True))

    hits: dict[str, list[bool]] = defaultdict(list)
    for s, p in zip(samples, preds):
        hits[s.qtype].append(p == s.answer)
    total = [h for q in hits for h in hits[q]]
    report = {
        "accuracy": sum(total) / max(1, len(total)),
        "per_type": {q: sum(hits[q]) / len(hits[q]) for q in QTYPES if hits[q]},
        "count_per_type": {q: len(hits[q]) for q in QTYPES if hits[q]},
        "n": len(total),
        "split": split,
        "mode": mode,
    }
    if return_predictions:
        report["predictions"] = preds
    return report
