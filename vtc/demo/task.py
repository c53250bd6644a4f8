"""Seeded procedural VQA task for the project's tiny demo VLMs ("shapes VQA").

Every image is 112 x 112 px: a noisy grey background with clutter (dots and thin grey lines that are
not objects) and 3-6 coloured shapes of two sizes, one per cell of a hidden 3 x 3 grid, placed with
jitter inside their cell. Objects are small (10-26 px), so an answer usually depends on a handful of
8 px patches. Within an image every (colour, shape) pair is unique.

Question types (``qtype``), all with one-word answers:

=========  ===================================================  ==========================
qtype      example                                              answers
=========  ===================================================  ==========================
color      what color is the small square ?                     6 colours
shape      what shape is the red object ?                       4 shapes
count      how many circles are there ? / how many red ...      zero one two three
exist      is there a blue triangle ?                           yes no
position   what shape is in the top left ? / what color is ...  shapes or colours
relative   is the red circle left of the green square ?         yes no
=========  ===================================================  ==========================

Training-only questions (``TRAINING_QTYPES``): ``where`` ("which column is the red circle in ?" -> left / center
/ right, "which row ..." -> top / middle / bottom) reads the position of an object named by colour and shape. It is
a curriculum device for the demo models (a small LM learns relative questions only after it can read one object's
position), never a test question.

Answers are balanced within each question type: sample ``i`` of a split first draws its question type
(round robin), a template and a target answer (uniformly), then draws scenes until one admits a question
of that template with that answer. Sample ``i`` of split ``s`` depends only on ``(s, i)``
(``numpy.random.SeedSequence``), so the splits are fixed, random-access and disjoint by seed.

Public API::

    sample = get_sample("test", 17)          # Sample(image=PIL.Image, question, answer, qtype, scene)
    samples = get_samples("val", 100)       # list of the first 100 samples of the split
    format_prompt(question)                  # "USER: <image>\\n{question} ASSISTANT:"
    blank_image(img)                         # image transform for the blind baseline
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from PIL import Image, ImageDraw

__all__ = [
    "IMAGE_SIZE",
    "COLORS",
    "SHAPES",
    "SIZES",
    "QTYPES",
    "TRAINING_QTYPES",
    "ANSWERS",
    "SPLITS",
    "Obj",
    "Sample",
    "random_scene",
    "render",
    "get_sample",
    "get_samples",
    "scene_qas",
    "format_prompt",
    "blank_image",
    "vocabulary",
]

IMAGE_SIZE = 112
GRID = 3
CELL = IMAGE_SIZE / GRID

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (215, 35, 35),
    "green": (40, 175, 60),
    "blue": (45, 85, 230),
    "yellow": (235, 215, 40),
    "purple": (150, 55, 195),
    "orange": (245, 140, 20),
}
SHAPES = ("circle", "square", "triangle", "cross")
PLURAL = {"circle": "circles", "square": "squares", "triangle": "triangles", "cross": "crosses"}
SIZES = {"small": (10, 14), "large": (20, 26)}
ROWS = ("top", "middle", "bottom")
COLS = ("left", "center", "right")
COUNT_WORDS = ("zero", "one", "two", "three")
QTYPES = ("color", "shape", "count", "exist", "position", "relative")
TRAINING_QTYPES = QTYPES + ("where",)  # "where": training-only curriculum questions (see the module docstring)
RELATIONS = ("left of", "right of", "above", "below")

ANSWERS: dict[str, tuple[str, ...]] = {
    "color": tuple(COLORS),
    "shape": SHAPES,
    "count": COUNT_WORDS,
    "exist": ("yes", "no"),
    "position": SHAPES + tuple(COLORS),
    "relative": ("yes", "no"),
}

# split name -> seed; the train split is unbounded, val / test are indexed the same way.
SPLITS = {"train": 0, "val": 1, "test": 2}


@dataclass(frozen=True)
class Obj:
    shape: str
    color: str
    size: str  # "small" | "large"
    row: int
    col: int
    cx: float
    cy: float
    px: int  # side length / diameter in pixels

    @property
    def name(self) -> str:
        return f"{self.color} {self.shape}"


@dataclass
class Sample:
    image: Image.Image
    question: str
    answer: str
    qtype: str
    scene: list[Obj] = field(repr=False)
    seed: tuple[int, int] = (0, 0)


# --------------------------------------------------------------------------------------------- scenes
def random_scene(rng: np.random.Generator, n_min: int = 3, n_max: int = 6) -> list[Obj]:
    """3-6 objects in distinct grid cells with unique (colour, shape) pairs."""
    n = int(rng.integers(n_min, n_max + 1))
    cells = rng.choice(GRID * GRID, size=n, replace=False)
    pairs = rng.choice(len(COLORS) * len(SHAPES), size=n, replace=False)
    colors = list(COLORS)
    objs = []
    for cell, pair in zip(cells, pairs):
        row, col = divmod(int(cell), GRID)
        color, shape = colors[pair // len(SHAPES)], SHAPES[pair % len(SHAPES)]
        size = "small" if rng.random() < 0.5 else "large"
        px = int(rng.integers(SIZES[size][0], SIZES[size][1] + 1))
        slack = (CELL - px) / 2 - 1.5
        cx = (col + 0.5) * CELL + rng.uniform(-slack, slack)
        cy = (row + 0.5) * CELL + rng.uniform(-slack, slack)
        objs.append(Obj(shape, color, size, row, col, float(cx), float(cy), px))
    return objs


def _draw_shape(draw: ImageDraw.ImageDraw, o: Obj, rgb: tuple[int, int, int]) -> None:
    h = o.px / 2
    x0, y0, x1, y1 = o.cx - h, o.cy - h, o.cx + h, o.cy + h
    if o.shape == "circle":
        draw.ellipse([x0, y0, x1, y1], fill=rgb)
    elif o.shape == "square":
        draw.rectangle([x0, y0, x1, y1], fill=rgb)
    elif o.shape == "triangle":
        draw.polygon([(o.cx, y0), (x1, y1), (x0, y1)], fill=rgb)
    elif o.shape == "cross":
        t = max(2.0, o.px / 6)
        draw.rectangle([x0, o.cy - t, x1, o.cy + t], fill=rgb)
        draw.rectangle([o.cx - t, y0, o.cx + t, y1], fill=rgb)
    else:  # pragma: no cover
        raise ValueError(o.shape)


def render(scene: list[Obj], rng: np.random.Generator) -> Image.Image:
    """Noisy background, clutter (grey dots and thin lines), then the objects (colour-jittered)."""
    s = IMAGE_SIZE
    base = rng.uniform(70, 120)
    yy, xx = np.mgrid[0:s, 0:s].astype(np.float32) / s
    gx, gy = rng.uniform(-20, 20, size=2)
    bg = base + gx * xx + gy * yy + rng.normal(0, 7, size=(s, s)).astype(np.float32)
    tint = rng.uniform(-6, 6, size=3).astype(np.float32)
    arr = np.clip(bg[..., None] + tint, 0, 255).astype(np.uint8)
    img = Image.fromarray(arr, "RGB")
    draw = ImageDraw.Draw(img)
    for _ in range(int(rng.integers(1, 4))):  # thin grey lines
        g = int(rng.uniform(30, 200))
        p = rng.uniform(0, s, size=4)
        draw.line([(p[0], p[1]), (p[2], p[3])], fill=(g, g, g), width=1)
    n_dots = int(rng.integers(15, 45))  # grey specks of 1-2 px
    pts = rng.integers(0, s - 2, size=(n_dots, 2))
    gs = rng.uniform(20, 230, size=n_dots)
    ds = rng.integers(1, 3, size=n_dots)
    for (x, y), g, d in zip(pts, gs, ds):
        draw.rectangle([int(x), int(y), int(x + d - 1), int(y + d - 1)], fill=(int(g),) * 3)
    for o in scene:
        jit = rng.integers(-18, 19, size=3)
        rgb = tuple(int(np.clip(c + j, 0, 255)) for c, j in zip(COLORS[o.color], jit))
        _draw_shape(draw, o, rgb)
    return img


# ------------------------------------------------------------------------------------------ questions
def _ref_by_shape(scene: list[Obj], o: Obj) -> str | None:
    """Shortest unambiguous description of ``o`` that does not name its colour."""
    same = [p for p in scene if p.shape == o.shape]
    if len(same) == 1:
        return o.shape
    if sum(p.size == o.size for p in same) == 1:
        return f"{o.size} {o.shape}"
    return None


def _ref_by_color(scene: list[Obj], o: Obj) -> str | None:
    """Shortest unambiguous description of ``o`` that does not name its shape."""
    same = [p for p in scene if p.color == o.color]
    if len(same) == 1:
        return f"{o.color} object"
    if sum(p.size == o.size for p in same) == 1:
        return f"{o.size} {o.color} object"
    return None


def _candidates(scene: list[Obj], template: str, rng: np.random.Generator) -> list[tuple[str, str]]:
    """All (question, answer) pairs of one template for a scene (``exist`` / ``relative`` sampled)."""
    out: list[tuple[str, str]] = []
    if template == "color":
        for o in scene:
            if (r := _ref_by_shape(scene, o)) is not None:
                out.append((f"what color is the {r} ?", o.color))
    elif template == "shape":
        for o in scene:
            if (r := _ref_by_color(scene, o)) is not None:
                out.append((f"what shape is the {r} ?", o.shape))
    elif template == "count_shape":
        for s in SHAPES:
            c = sum(o.shape == s for o in scene)
            if c < len(COUNT_WORDS):
                out.append((f"how many {PLURAL[s]} are there ?", COUNT_WORDS[c]))
    elif template == "count_color":
        for col in COLORS:
            c = sum(o.color == col for o in scene)
            if c < len(COUNT_WORDS):
                out.append((f"how many {col} objects are there ?", COUNT_WORDS[c]))
    elif template == "exist":
        present = {(o.color, o.shape) for o in scene}
        for o in scene:
            out.append((f"is there a {o.color} {o.shape} ?", "yes"))
        colors_in = {o.color for o in scene}
        shapes_in = {o.shape for o in scene}
        for col in COLORS:
            for s in SHAPES:
                if (col, s) in present:
                    continue
                # hard negatives (colour and shape both present, not together) are listed twice
                hard = col in colors_in and s in shapes_in
                out.extend([(f"is there a {col} {s} ?", "no")] * (2 if hard else 1))
    elif template in ("position_shape", "position_color"):
        for o in scene:
            where = f"{ROWS[o.row]} {COLS[o.col]}"
            if template == "position_shape":
                out.append((f"what shape is in the {where} ?", o.shape))
            else:
                out.append((f"what color is the object in the {where} ?", o.color))
    elif template == "where":
        for o in scene:
            out.append((f"which column is the {o.name} in ?", COLS[o.col]))
            out.append((f"which row is the {o.name} in ?", ROWS[o.row]))
    elif template == "relative":
        for a in scene:
            for b in scene:
                if a is b:
                    continue
                for rel in RELATIONS:
                    if rel in ("left of", "right of"):
                        if a.col == b.col:
                            continue
                        truth = (a.col < b.col) == (rel == "left of")
                    else:
                        if a.row == b.row:
                            continue
                        truth = (a.row < b.row) == (rel == "above")
                    out.append((f"is the {a.name} {rel} the {b.name} ?", "yes" if truth else "no"))
    else:  # pragma: no cover
        raise ValueError(template)
    return out


TEMPLATES: dict[str, tuple[str, ...]] = {
    "color": ("color",),
    "shape": ("shape",),
    "count": ("count_shape", "count_color"),
    "exist": ("exist",),
    "position": ("position_shape", "position_color"),
    "relative": ("relative",),
    "where": ("where",),
}
_TEMPLATE_ANSWERS = {
    "color": tuple(COLORS),
    "shape": SHAPES,
    "count_shape": COUNT_WORDS,
    "count_color": COUNT_WORDS,
    "exist": ("yes", "no"),
    "position_shape": SHAPES,
    "position_color": tuple(COLORS),
    "relative": ("yes", "no"),
}


def _rng(split: str, index: int) -> np.random.Generator:
    if split not in SPLITS:
        raise KeyError(f"unknown split {split!r}; expected one of {sorted(SPLITS)}")
    return np.random.default_rng(np.random.SeedSequence([20240607, SPLITS[split], int(index)]))


def get_sample(split: str, index: int) -> Sample:
    """Sample ``index`` of ``split`` ("train" | "val" | "test"); deterministic and random-access."""
    rng = _rng(split, index)
    qtype = QTYPES[index % len(QTYPES)]
    templates = TEMPLATES[qtype]
    template = templates[int(rng.integers(len(templates)))]
    answers = _TEMPLATE_ANSWERS[template]
    target = answers[int(rng.integers(len(answers)))]
    for _ in range(10_000):
        scene = random_scene(rng)
        cands = [qa for qa in _candidates(scene, template, rng) if qa[1] == target]
        if cands:
            q, a = cands[int(rng.integers(len(cands)))]
            return Sample(render(scene, rng), q, a, qtype, scene, (SPLITS[split], index))
    raise RuntimeError("could not build a sample")  # pragma: no cover


def get_samples(split: str, n: int, start: int = 0) -> list[Sample]:
    """Samples ``start .. start + n - 1`` of a split."""
    return [get_sample(split, i) for i in range(start, start + n)]


def scene_qas(
    scene: list[Obj], rng: np.random.Generator, k: int, qtypes: tuple[str, ...] = QTYPES
) -> list[tuple[str, str, str]]:
    """``k`` extra (question, answer, qtype) triples about one scene (for multi-turn training).

    The question type is drawn uniformly from ``qtypes`` (any of ``TRAINING_QTYPES``), then the answer uniformly
    among the answers the scene offers for it, which keeps the extra turns roughly balanced too. "where" questions
    are drawn uniformly over (object, row or column) instead: answering with the most common position among the
    objects is then better than chance, a first step off the plateau that the LM needs to start reading positions.
    """
    unknown = set(qtypes) - set(TRAINING_QTYPES)
    if unknown or not qtypes:
        raise ValueError(f"qtypes must be a non-empty subset of {TRAINING_QTYPES}; got {tuple(qtypes)!r}")
    out = []
    for _ in range(k):
        for _ in range(20):
            qtype = qtypes[int(rng.integers(len(qtypes)))]
            templates = TEMPLATES[qtype]
            template = templates[int(rng.integers(len(templates)))]
            cands = _candidates(scene, template, rng)
            if not cands:
                continue
            if qtype == "where":  # uniform over (object, axis): majority-position shortcuts stay, as a first rung
                q, a = cands[int(rng.integers(len(cands)))]
                out.append((q, a, qtype))
                break
            answers = sorted({a for _, a in cands})
            a = answers[int(rng.integers(len(answers)))]
            qs = [q for q, aa in cands if aa == a]
            out.append((qs[int(rng.integers(len(qs)))], a, qtype))
            break
    return out


# ------------------------------------------------------------------------------------------- prompts
def format_prompt(question: str) -> str:
    """The single-turn prompt the demo models are trained on (same as their chat template)."""
    return f"USER: <image>\n{question} ASSISTANT:"


CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if not loop.first %} {% endif %}"
    "{% if message['role'] == 'user' %}USER: "
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for c in message['content'] %}"
    "{% if c['type'] == 'image' %}<image>\n{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}"
    "{% endfor %}{% endif %}"
    "{% elif message['role'] == 'assistant' %}ASSISTANT: "
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for c in message['content'] %}{% if c['type'] == 'text' %}{{ c['text'] }}{% endif %}"
    "{% endfor %}{% endif %}</s>"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %} ASSISTANT:{% endif %}"
)


def blank_image(image: Image.Image) -> Image.Image:
    """Image transform for the blind baseline: a uniform mid-grey image of the same size."""
    return Image.new("RGB", image.size, (95, 95, 95))


def vocabulary() -> list[str]:
    """Every word the task can produce (questions, answers, prompt words), sorted."""
    words = {
        "USER",
        "ASSISTANT",
        ":",
        "?",
        "what",
        "is",
        "the",
        "in",
        "how",
        "many",
        "are",
        "there",
        "a",
        "object",
        "objects",
        "color",
        "shape",
        "of",
        "which",
        "row",
        "column",
        "left",
        "right",
        "above",
        "below",
    }
    words |= set(COLORS) | set(SHAPES) | set(PLURAL.values()) | set(SIZES) | set(ROWS) | set(COLS)
    words |= set(COUNT_WORDS) | {"yes", "no"}
    return sorted(words)
