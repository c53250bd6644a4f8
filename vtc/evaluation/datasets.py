"""Readers for the published local files of the VQA benchmarks, and the project's synthetic task.

Every reader returns a list of :class:`EvalSample` in file order and raises :class:`DatasetError` naming the
file and the field on anything missing or malformed. ``data`` is the folder the user unpacked the benchmark
into; files are found by their published names, or given explicitly.

=========  =====================================================================================================
task       files (``data`` = the benchmark folder)
=========  =====================================================================================================
vqav2      ``*questions*.json`` (``{"questions": [{"question_id", "image_id", "question"}], "data_subtype"}``),
           ``*annotations*.json`` (``{"annotations": [{"question_id", "answers": [{"answer"}], ...}]}``,
           optional: without it predictions are written for the evaluation server and no score is computed),
           images ``COCO_<data_subtype>_<image_id:012d>.jpg`` (or ``<image_id:012d>.jpg``) in ``val2014/``,
           ``test2015/``, ``images/`` or ``data`` itself.
textvqa    ``TextVQA_0.5.1_val.json`` (``{"data": [{"question_id", "image_id", "question", "answers"}]}``),
           images ``<image_id>.jpg`` in ``train_images/``, ``train_val_images/train_images/``, ``images/``.
gqa        ``testdev_balanced_questions.json`` (``{qid: {"imageId", "question", "answer"}}``),
           images ``<imageId>.jpg`` in ``images/``.
pope       ``coco_pope_{random,popular,adversarial}.json`` (one JSON object per line, as published, or a JSON
           list; ``.jsonl`` too): ``{"question_id", "image", "text", "label"}``; the category is the ``category``
           field or the file name's last ``_`` part. Images (COCO val2014 file names) in ``val2014/``,
           ``images/`` or ``data``.
synthetic  nothing: ``vtc.demo.task.get_samples(split, n)`` (shapes-VQA, one-word answers).
custom     your own ``.jsonl`` / ``.csv``: ``image`` (relative to the file or ``--images``), ``question``,
           ``answer`` or ``answers``, optional ``id`` and ``category`` (:func:`read_custom`).
=========  =====================================================================================================
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

__all__ = ["EvalSample", "DatasetError", "TASKS", "CUSTOM_METRICS", "load_task", "sample_limit", "read_vqav2",
           "read_textvqa", "read_gqa", "read_pope", "read_synthetic", "read_custom"]


class DatasetError(ValueError):
    """A benchmark file is missing or malformed (the message names the file and the field)."""


@dataclass
class EvalSample:
    """One question. ``image`` is a path (opened lazily) or a PIL image; ``answers`` the reference answers
    (VQA: the human answers; GQA / synthetic: one; POPE: the label), ``None`` when the split has none."""

    id: str
    question: str
    image: Any
    answers: list[str] | None
    category: str = ""
    meta: dict = field(default_factory=dict)

    def load_image(self):
        from PIL import Image

        if isinstance(self.image, str | Path):
            try:
                with Image.open(self.image) as im:
                    return im.convert("RGB")
            except FileNotFoundError:
                raise DatasetError(f"{self.image}: image of question {self.id} not found") from None
            except OSError as err:
                raise DatasetError(f"{self.image}: cannot read the image of question {self.id} ({err})") from None
        return self.image.convert("RGB")


# ---- helpers ------------------------------------------------------------------------------------------------------
def _read_text(path: Path) -> str:
    """The UTF-8 text of a benchmark file (JSON is UTF-8 by definition, RFC 8259); a clear error otherwise."""
    if not path.is_file():
        raise DatasetError(f"{path}: file not found")
    raw = path.read_bytes()
    # a UTF-16 / UTF-32 file starts with a byte-order mark or has NUL bytes next to its ASCII characters
    if raw[:2] in (b"\xff\xfe", b"\xfe\xff") or b"\x00" in raw[:4]:
        raise DatasetError(f"{path}: not UTF-8 text (it looks like UTF-16 or UTF-32); save the file as UTF-8")
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        raise DatasetError(f"{path}: not UTF-8 text (byte {err.start}); save the file as UTF-8") from None


def _read_json(path: Path) -> Any:
    text = _read_text(path)
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise DatasetError(f"{path}: not valid JSON ({err})") from None


def _read_json_or_lines(path: Path) -> list:
    """A JSON list, or one JSON object per line (POPE's published files use .json for JSON lines)."""
    text = _read_text(path)
    stripped = text.lstrip()
    if stripped.startswith("["):
        try:
            return json.loads(text)
        except json.JSONDecodeError as err:
            raise DatasetError(f"{path}: not valid JSON ({err})") from None
    rows = []
    for i, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as err:
            raise DatasetError(f"{path}: line {i} is not valid JSON ({err})") from None
    return rows


def _field(obj: Any, key: str, path: Path, where: str) -> Any:
    if not isinstance(obj, dict):
        raise DatasetError(f"{path}: {where} must be a JSON object, got {type(obj).__name__}")
    if key not in obj:
        raise DatasetError(f"{path}: {where} has no field '{key}'")
    return obj[key]


def _one_file(folder: Path, patterns: Iterable[str], what: str, flag: str, required: bool = True) -> Path | None:
    if folder.is_file():
        return folder
    if not folder.is_dir():
        raise DatasetError(f"{folder}: data folder not found")
    for pattern in patterns:
        found = sorted(folder.glob(pattern))
        if len(found) == 1:
            return found[0]
        if len(found) > 1:
            names = ", ".join(p.name for p in found[:6])
            raise DatasetError(f"{folder}: several {what} files match '{pattern}' ({names}); choose one with {flag}")
    if required:
        raise DatasetError(f"{folder}: no {what} file (looked for {', '.join(patterns)}); give it with {flag}")
    return None


def _image_dir(data: Path | None, images: str | Path | None, candidates: Iterable[str]) -> Path:
    if images is not None:
        p = Path(images)
        if not p.is_dir():
            raise DatasetError(f"{p}: image folder not found (--images)")
        return p
    base = data if data is not None and data.is_dir() else (data.parent if data is not None else Path("."))
    for c in candidates:
        if (base / c).is_dir():
            return base / c
    return base


_IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")


def _check_images(samples: list[EvalSample], task: str, pattern: str = "") -> None:
    """Raise DatasetError when images are missing, saying which names were expected where and whether the folder
    (no images there) or the name pattern (images there, named otherwise) is wrong."""
    missing = list(dict.fromkeys(s.image for s in samples if isinstance(s.image, Path) and not s.image.is_file()))
    if not missing:
        return
    n_img = len({s.image for s in samples if isinstance(s.image, Path)})
    folders = list(dict.fromkeys(p.parent for p in missing))
    few = ", ".join(p.name for p in missing[:3])
    msg = (f"{task}: {len(missing)} of {n_img} images not found: looked for {few}{' ...' if len(missing) > 3 else ''}"
           f" in {', '.join(map(str, folders[:2]))}")
    if pattern:
        msg += f" (names {pattern})"
    present = [p for f in folders[:1] if f.is_dir() for p in sorted(f.iterdir())[:2000]
               if p.suffix.lower() in _IMAGE_SUFFIXES]
    if present:
        msg += (f"; that folder holds {len(present)}{'+' if len(present) == 2000 else ''} other images (e.g. "
                f"{', '.join(p.name for p in present[:2])}): the file names, not the folder, do not match; rename "
                "them, or list your files with --task custom")
    else:
        msg += "; no images there: point --images at the image folder"
    raise DatasetError(msg)


# ---- VQAv2 --------------------------------------------------------------------------------------------------------
def _questions_file(task: str, data, questions, patterns: list[str], what: str) -> tuple[Path | None, Path]:
    """(the ``--data`` folder or None, the questions file): ``--questions`` if given, else the one file of
    ``patterns`` in the folder."""
    folder = Path(data) if data is not None else None
    if questions is None:
        if folder is None:
            raise DatasetError(f"{task}: give --data FOLDER or --questions FILE")
        questions = _one_file(folder, patterns, what, "--questions")
    return folder, Path(questions)


def read_vqav2(data: str | Path | None = None, *, questions: str | Path | None = None,
               annotations: str | Path | None = None, images: str | Path | None = None) -> list[EvalSample]:
    """VQAv2 (or VQAv1 / any VQA-format split): questions + optional annotations + COCO images."""
    folder, qpath = _questions_file("vqav2", data, questions, ["*questions*.json"], "questions")
    if annotations is None and folder is not None and folder.is_dir():
        annotations = _one_file(folder, ["*annotations*.json"], "annotations", "--annotations", required=False)
    qdoc = _read_json(qpath)
    qs = _field(qdoc, "questions", qpath, "the top level")
    if not isinstance(qs, list):
        raise DatasetError(f"{qpath}: field 'questions' must be a list")
    subtype = qdoc.get("data_subtype", "") if isinstance(qdoc, dict) else ""
    answers: dict[Any, dict] = {}
    apath = Path(annotations) if annotations is not None else None
    if apath is not None:
        adoc = _read_json(apath)
        anns = _field(adoc, "annotations", apath, "the top level")
        if not isinstance(anns, list):
            raise DatasetError(f"{apath}: field 'annotations' must be a list")
        for i, a in enumerate(anns):
            qid = _field(a, "question_id", apath, f"annotations[{i}]")
            ans = _field(a, "answers", apath, f"annotations[{i}]")
            if not isinstance(ans, list) or not ans:
                raise DatasetError(f"{apath}: annotations[{i}].answers must be a non-empty list")
            texts = [str(_field(x, "answer", apath, f"annotations[{i}].answers[{j}]")) for j, x in enumerate(ans)]
            answers[qid] = {"answers": texts, "answer_type": a.get("answer_type", ""),
                            "question_type": a.get("question_type", "")}
    img_dir = _image_dir(folder, images, [subtype, "val2014", "test2015", "images"] if subtype else
                         ["val2014", "test2015", "images"])
    samples = []
    for i, q in enumerate(qs):
        qid = _field(q, "question_id", qpath, f"questions[{i}]")
        image_id = _field(q, "image_id", qpath, f"questions[{i}]")
        if isinstance(image_id, bool) or not (isinstance(image_id, int) or str(image_id).isdigit()):
            raise DatasetError(f"{qpath}: questions[{i}].image_id must be an integer (a COCO image id), "
                               f"got {image_id!r}")
        text = _field(q, "question", qpath, f"questions[{i}]")
        ann = answers.get(qid)
        if apath is not None and ann is None:
            raise DatasetError(f"{apath}: no annotation for question_id {qid} (questions[{i}] of {qpath.name})")
        name = f"COCO_{subtype}_{int(image_id):012d}.jpg" if subtype else f"{int(image_id):012d}.jpg"
        path = img_dir / name
        if not path.exists() and subtype:
            alt = img_dir / f"{int(image_id):012d}.jpg"
            path = alt if alt.exists() else path
        samples.append(EvalSample(id=str(qid), question=str(text), image=path,
                                  answers=ann["answers"] if ann else None,
                                  category=ann["answer_type"] if ann else "",
                                  meta={"question_id": qid, "image_id": image_id}))
    return samples


# ---- TextVQA ------------------------------------------------------------------------------------------------------
def read_textvqa(data: str | Path | None = None, *, questions: str | Path | None = None,
                 images: str | Path | None = None, **_: Any) -> list[EvalSample]:
    """TextVQA 0.5.1 JSON (``data`` list with ``answers``; the test split has none)."""
    folder, path = _questions_file("textvqa", data, questions,
                                   ["TextVQA_*val*.json", "TextVQA_*.json", "*textvqa*.json"], "TextVQA")
    doc = _read_json(path)
    rows = _field(doc, "data", path, "the top level")
    if not isinstance(rows, list):
        raise DatasetError(f"{path}: field 'data' must be a list")
    img_dir = _image_dir(folder if folder is not None else path.parent, images,
                         ["train_images", "train_val_images/train_images", "test_images", "images"])
    samples = []
    for i, r in enumerate(rows):
        qid = _field(r, "question_id", path, f"data[{i}]")
        image_id = _field(r, "image_id", path, f"data[{i}]")
        text = _field(r, "question", path, f"data[{i}]")
        ans = r.get("answers") if isinstance(r, dict) else None
        if ans is not None and (not isinstance(ans, list) or not ans):
            raise DatasetError(f"{path}: data[{i}].answers must be a non-empty list of strings")
        samples.append(EvalSample(id=str(qid), question=str(text), image=img_dir / f"{image_id}.jpg",
                                  answers=[str(a) for a in ans] if ans is not None else None,
                                  meta={"question_id": qid, "image_id": image_id}))
    return samples


# ---- GQA ----------------------------------------------------------------------------------------------------------
def read_gqa(data: str | Path | None = None, *, questions: str | Path | None = None,
             images: str | Path | None = None, **_: Any) -> list[EvalSample]:
    """GQA balanced questions JSON (a mapping question id -> {imageId, question, answer})."""
    folder, path = _questions_file("gqa", data, questions, ["testdev_balanced_questions.json",
                                                           "*balanced_questions*.json", "*questions*.json"],
                                   "GQA questions")
    doc = _read_json(path)
    if not isinstance(doc, dict):
        raise DatasetError(f"{path}: the top level must be an object mapping question ids to questions")
    img_dir = _image_dir(folder if folder is not None else path.parent, images, ["images", "allImages/images"])
    samples = []
    for qid, q in doc.items():
        image_id = _field(q, "imageId", path, f"question '{qid}'")
        text = _field(q, "question", path, f"question '{qid}'")
        ans = q.get("answer")
        types = q.get("types") or {}
        samples.append(EvalSample(id=str(qid), question=str(text), image=img_dir / f"{image_id}.jpg",
                                  answers=[str(ans)] if ans is not None else None,
                                  category=str(types.get("structural", "")) if isinstance(types, dict) else "",
                                  meta={"question_id": qid, "image_id": image_id}))
    return samples


# ---- POPE ---------------------------------------------------------------------------------------------------------
def read_pope(data: str | Path | None = None, *, questions: str | Path | None = None,
              images: str | Path | None = None, **_: Any) -> list[EvalSample]:
    """POPE question files (all ``coco_pope_*.json`` / ``*.jsonl`` in the folder, or one file)."""
    folder = Path(data) if data is not None else None
    if questions is not None:
        files = [Path(questions)]
    elif folder is None:
        raise DatasetError("pope: give --data FOLDER or --questions FILE")
    elif folder.is_file():
        files = [folder]
    elif folder.is_dir():
        files = sorted(folder.glob("*pope*.json")) + sorted(folder.glob("*pope*.jsonl"))
        if not files:
            files = sorted(folder.glob("*.jsonl"))
        if not files:
            raise DatasetError(f"{folder}: no POPE question file (looked for *pope*.json, *pope*.jsonl, *.jsonl)")
    else:
        raise DatasetError(f"{folder}: data folder not found")
    base = folder if folder is not None and folder.is_dir() else files[0].parent
    img_dir = _image_dir(base, images, ["val2014", "images"])
    samples = []
    for path in files:
        default_cat = path.stem.rsplit("_", 1)[-1] if "_" in path.stem else path.stem
        for i, r in enumerate(_read_json_or_lines(path)):
            where = f"entry {i}"
            qid = _field(r, "question_id", path, where)
            image = _field(r, "image", path, where)
            text = _field(r, "text", path, where)
            label = _field(r, "label", path, where)
            if str(label).strip().lower() not in ("yes", "no"):
                raise DatasetError(f"{path}: {where}.label must be 'yes' or 'no', got {label!r}")
            cat = str(r.get("category", default_cat))
            samples.append(EvalSample(id=f"{cat}/{qid}", question=str(text), image=img_dir / str(image),
                                      answers=[str(label).strip().lower()], category=cat,
                                      meta={"question_id": qid, "image": image}))
    return samples


# ---- synthetic ----------------------------------------------------------------------------------------------------
def read_synthetic(data: str | Path | None = None, *, split: str = "test", limit: int | None = None,
                   **_: Any) -> list[EvalSample]:
    """The project's shapes-VQA task (``vtc.demo.task``); ``limit`` samples (default 500) of ``split``."""
    from ..demo import task

    if split not in task.SPLITS:
        raise DatasetError(f"synthetic: unknown split {split!r} (allowed: {', '.join(task.SPLITS)})")
    n = 500 if limit is None else limit
    return [EvalSample(id=f"{split}/{i}", question=s.question, image=s.image, answers=[s.answer],
                       category=s.qtype) for i, s in enumerate(task.get_samples(split, n))]


def read_custom(data: str | Path | None = None, **files: Any) -> list[EvalSample]:
    """Your own data (``--task custom``): see :func:`vtc.evaluation.custom.read_custom`."""
    from .custom import read_custom as read

    return read(data, **files)


@dataclass(frozen=True)
class TaskSpec:
    """How a benchmark is read, prompted and scored."""

    name: str
    reader: Callable[..., list[EvalSample]]
    metric: str  # vqav2 | textvqa | exact_match | pope | first_word | (custom:) exact | vqa | contains | yesno
    prompt_suffix: str
    max_new_tokens: int
    description: str
    image_pattern: str = ""  # how image file names are made, for the missing-image message


#: the LLaVA-1.5 evaluation prompt for short answers
SHORT_ANSWER = "\nAnswer the question using a single word or phrase."

TASKS: dict[str, TaskSpec] = {
    "vqav2": TaskSpec("vqav2", read_vqav2, "vqav2", SHORT_ANSWER, 16, "VQAv2 (VQA accuracy)",
                      "COCO_<data_subtype>_<image_id:012d>.jpg, or <image_id:012d>.jpg"),
    "textvqa": TaskSpec("textvqa", read_textvqa, "textvqa", SHORT_ANSWER, 16, "TextVQA (VQA accuracy)",
                        "<image_id>.jpg"),
    "gqa": TaskSpec("gqa", read_gqa, "exact_match", SHORT_ANSWER, 16, "GQA balanced testdev (exact match)",
                    "<imageId>.jpg"),
    "pope": TaskSpec("pope", read_pope, "pope", SHORT_ANSWER, 8, "POPE (F1, accuracy, precision, recall)",
                     "the 'image' field of each line"),
    "synthetic": TaskSpec("synthetic", read_synthetic, "first_word", "", 3,
                          "the project's shapes-VQA task for the bundled tiny model (exact match)"),
    "custom": TaskSpec("custom", read_custom, "exact", SHORT_ANSWER, 16, "your data",
                       "the 'image' field of each row, relative to the file or --images"),
}

#: ``--metric`` values of ``--task custom``
CUSTOM_METRICS = ("exact", "vqa", "contains", "yesno")
_CUSTOM_NAMES = {"exact": "exact match", "vqa": "VQA accuracy", "contains": "answer contains a reference",
                 "yesno": "yes/no accuracy"}


def sample_limit(samples: list[EvalSample], limit: int, seed: int = 0) -> list[EvalSample]:
    """A seeded random sample of ``limit`` questions, stratified by category (each category in proportion to
    its share, by largest remainders), returned in file order. Nested: the sample for ``limit`` is contained in
    the sample for any larger ``limit`` with the same seed, so their predictions are shared by the cache."""
    if limit >= len(samples):
        return list(samples)
    import numpy as np

    rng = np.random.default_rng(seed)
    cats: dict[str, list[int]] = {}
    for i, s in enumerate(samples):
        cats.setdefault(s.category, []).append(i)
    # each question's position in a seeded order of its category, scaled to [0, 1): taking the lowest keys
    # takes every category in proportion to its size, and a prefix of this order is a prefix of a longer one
    keys = np.empty(len(samples))
    for ix in cats.values():
        ranks = rng.permutation(len(ix))
        keys[ix] = (ranks + rng.random(len(ix))) / len(ix)
    chosen = np.sort(np.argsort(keys, kind="stable")[:limit])
    return [samples[i] for i in chosen]


def load_task(name: str, data: str | Path | None = None, *, limit: int | None = None, seed: int = 0,
              metric: str | None = None, **files: Any) -> tuple[TaskSpec, list[EvalSample]]:
    """(spec, samples) of task ``name``; ``files``: questions / annotations / images / split overrides.

    ``limit`` keeps a seeded (``seed``) random sample of ``limit`` questions, stratified by category
    (:func:`sample_limit`; the synthetic task draws ``limit`` fresh random questions). ``metric`` (``--task custom``
    only): exact | vqa | contains | yesno. Raises :class:`DatasetError` on an unknown task, a missing / malformed
    file, missing images or an empty dataset.
    """
    spec = TASKS.get(name)
    if spec is None:
        raise DatasetError(f"unknown task {name!r} (available: {', '.join(TASKS)})")
    if metric is not None:
        if name != "custom":
            raise DatasetError(f"--metric is for --task custom; {name} is scored by its benchmark's metric")
        if metric not in CUSTOM_METRICS:
            raise DatasetError(f"--metric {metric!r} is not one of {', '.join(CUSTOM_METRICS)}")
        spec = replace(spec, metric=metric)
    if name == "custom":
        spec = replace(spec, description=f"{data or files.get('questions')} ({_CUSTOM_NAMES[spec.metric]})")
    if limit is not None and limit < 1:
        raise DatasetError(f"--limit must be >= 1, got {limit}")
    files = {k: v for k, v in files.items() if v is not None}
    if name == "synthetic":
        samples = spec.reader(data, limit=limit, **files)
    else:
        samples = spec.reader(data, **files)
    if not samples:
        where = data if data is not None else files.get("questions", "")
        raise DatasetError(f"{name}: the dataset {where} has no questions")
    ids = [s.id for s in samples]
    if len(set(ids)) != len(ids):
        dup = next(i for i, c in Counter(ids).items() if c > 1)
        raise DatasetError(f"{name}: question ids are not unique in {data} (e.g. {dup!r})")
    if limit is not None:
        samples = sample_limit(samples, limit, seed)
    if spec.metric == "yesno":
        bad = next((s for s in samples if s.answers is not None and s.answers[0].strip().lower() not in ("yes", "no")),
                   None)
        if bad is not None:
            raise DatasetError(f"--metric yesno: question {bad.id} has answer {bad.answers[0]!r}; allowed: yes, no")
    _check_images(samples, name, spec.image_pattern)
    return spec, samples
