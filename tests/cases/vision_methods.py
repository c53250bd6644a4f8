"""VisionZip and pooling in the invariant matrix (vision side, every family: LLaVA-1.5, LLaVA-NeXT per crop,
Qwen2-VL / Qwen2.5-VL per image on merged tokens).

Budgets are per unit (image / crop / frame). ``expected`` maps the tokens a unit has to the tokens it delivers.
"""

from matrix import MethodCase

#: tower extras with a CLS token (CLIP towers: the LLaVA families)
CLS_FAMILIES = ("llava", "llava_next")

CASES = [
    # VisionZip: budget 8 -> 7 dominant (CLS + 6 patches on CLIP towers) + 1 contextual
    MethodCase("visionzip", side="vision", reduce={"method": "visionzip", "budget": 8},
               identity={"method": "visionzip", "budget": 1.0, "contextual": 0, "keep_cls": False},
               expected=lambda n: 8),
    MethodCase("visionzip-explicit", side="vision", reduce={"method": "visionzip", "dominant": 5, "contextual": 4},
               expected=lambda n: 9),
    MethodCase("visionzip-nocls", side="vision",
               reduce={"method": "visionzip", "budget": 0.5, "keep_cls": False}, expected=lambda n: n // 2),
    # one budget per image split over its crops: units deliver different counts (content-adaptive per unit)
    MethodCase("visionzip-per-image", side="vision", reduce={"method": "visionzip", "budget": 20, "per": "image"}),
    # pooling: window modes deliver exactly the grid's factor pair; cluster exactly k
    MethodCase("pool-avg", side="vision", reduce={"method": "pool", "mode": "avg", "budget": 9},
               identity={"method": "pool", "mode": "avg", "budget": 1.0}, expected=lambda n: 9),
    MethodCase("pool-max", side="vision", reduce={"method": "pool", "mode": "max", "budget": 4},
               identity={"method": "pool", "mode": "max", "budget": 1.0}, expected=lambda n: 4),
    MethodCase("pool-attn", side="vision", reduce={"method": "pool", "mode": "attn", "budget": 6},
               expected=lambda n: 6),
    MethodCase("pool-attn-llm", side="vision",
               reduce={"method": "pool", "mode": "attn", "budget": 6, "feature_space": "llm"}, expected=lambda n: 6),
    MethodCase("pool-cluster", side="vision", reduce={"method": "pool", "mode": "cluster", "budget": 5},
               expected=lambda n: 5),
    MethodCase("pool-cluster-received", side="vision",
               reduce={"method": "pool", "mode": "cluster", "budget": 5, "weights": "received"}, expected=lambda n: 5),
    MethodCase("pool-cluster-cls", side="vision",
               reduce={"method": "pool", "mode": "cluster", "budget": 5, "weights": "cls"}, expected=lambda n: 5,
               families=CLS_FAMILIES),
]
