"""``--task custom``: your own questions in a JSON Lines or CSV file.

One question per row: ``image`` (a path relative to the file or to ``--images``; any format PIL reads),
``question``, ``answer`` (a string) or ``answers`` (a list: several acceptable answers, or the human answers of
a VQA-style set), optional ``id`` (default: the row number) and ``category`` (per-category scores, and the strata
of ``--limit``). Scored with ``--metric exact|vqa|contains|yesno`` (:mod:`vtc.evaluation.scoring`)::

    {"image": "photos/kitchen.jpg", "question": "What color is the kettle?", "answer": "red"}
    {"image": "photos/street.png", "question": "Is there a bus?", "answers": ["yes"], "category": "exist"}
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .datasets import DatasetError, EvalSample, _field, _read_json_or_lines

__all__ = ["read_custom"]


def _read_csv(path: Path) -> list[dict]:
    import csv

    with open(path, encoding="utf-8-sig", newline="") as f:
        rows = list(csv.DictReader(f))
    for r in rows:  # a CSV cell holding a JSON list is a list of answers
        ans = r.get("answers")
        if isinstance(ans, str) and ans.strip().startswith("["):
            try:
                r["answers"] = json.loads(ans)
            except json.JSONDecodeError:
                raise DatasetError(f"{path}: answers cell {ans!r} is not a JSON list") from None
        elif isinstance(ans, str):
            r["answers"] = [a for a in ans.split("|") if a.strip()] or None
        for k in ("answer", "answers", "id", "category"):
            if r.get(k) == "":
                r[k] = None
    return rows


def read_custom(data: str | Path | None = None, *, questions: str | Path | None = None,
                images: str | Path | None = None, **_: Any) -> list[EvalSample]:
    """Your own data: a JSON Lines (``.jsonl``, or a ``.json`` list) or CSV file, one question per row with
    ``image`` (a path relative to the file, or to ``images``; any format PIL reads), ``question``, ``answer``
    (a string) or ``answers`` (a list; in CSV a JSON list or ``a|b``; neither: predictions only), optional
    ``id`` (default: the row number) and ``category``."""
    src = questions if questions is not None else data
    if src is None:
        raise DatasetError("custom: give --data FILE (.jsonl or .csv: image, question, answer)")
    path = Path(src)
    if path.is_dir():
        found = sorted(path.glob("*.jsonl")) + sorted(path.glob("*.csv"))
        if len(found) != 1:
            raise DatasetError(f"{path}: {'several' if found else 'no'} .jsonl / .csv files there; give the file "
                               "with --data FILE")
        path = found[0]
    rows = _read_csv(path) if path.suffix.lower() == ".csv" else _read_json_or_lines(path)
    if not isinstance(rows, list):
        raise DatasetError(f"{path}: expected one JSON object per line (or a JSON list)")
    base = Path(images) if images is not None else path.parent
    if images is not None and not base.is_dir():
        raise DatasetError(f"{base}: image folder not found (--images)")
    samples = []
    for i, r in enumerate(rows):
        where = f"row {i + 1}"
        image = _field(r, "image", path, where)
        text = _field(r, "question", path, where)
        if r.get("answers") is not None:
            ans = r["answers"]
            if not isinstance(ans, list) or not ans:
                raise DatasetError(f"{path}: {where}.answers must be a non-empty list of strings")
            answers = [str(a) for a in ans]
        elif r.get("answer") is not None:
            answers = [str(r["answer"])]
        else:
            answers = None
        qid = r.get("id")
        img = Path(str(image)).expanduser()
        samples.append(EvalSample(id=str(qid) if qid is not None else str(i + 1), question=str(text),
                                  image=img if img.is_absolute() else base / img, answers=answers,
                                  category=str(r.get("category") or ""), meta={"row": i + 1}))
    return samples
