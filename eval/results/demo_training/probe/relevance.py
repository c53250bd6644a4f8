import numpy as np, torch
from vtc.demo.task import COLORS, SHAPES, PLURAL, ROWS, COLS
SING = {v: k for k, v in PLURAL.items()}
def relevant(question, scene):
    w = question.replace("?", "").split()
    if "in" in w and w[-2] in ROWS and w[-1] in COLS:
        r, c = ROWS.index(w[-2]), COLS.index(w[-1])
        return [o for o in scene if o.row == r and o.col == c]
    for rel in ("left", "right", "above", "below"):
        if rel in w and w[0] == "is" and w[1] == "the":
            named = [(w[i], w[i + 1]) for i in range(len(w) - 1) if w[i] in COLORS and w[i + 1] in SHAPES]
            return [o for o in scene if (o.color, o.shape) in named]
    cs = {x for x in w if x in COLORS}
    ss = {SING.get(x, x) for x in w if SING.get(x, x) in SHAPES}
    zs = {x for x in w if x in ("small", "large")}
    rel = [o for o in scene if (not cs or o.color in cs) and (not ss or o.shape in ss) and (not zs or o.size in zs)]
    if not rel:
        rel = [o for o in scene if o.color in cs or o.shape in ss]
    return rel
