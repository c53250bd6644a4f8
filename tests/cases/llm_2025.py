"""DART, PyramidDrop and SparseVLM in the invariant matrix (LLM side, every family).

Budgets: DART keeps exactly ``budget`` per image (12, or all of a smaller image); the progressive methods halve at
each of three cuts (0.5, 0.25, 0.125 of the original count), so every cut keeps floor(n_in / 2) of what it
receives: ``expected = n // 2`` at every stage.
"""

from matrix import MethodCase

_THREE_CUTS = {"layers": [1, 2, 3]}

CASES = [
    MethodCase("dart", side="llm", reduce={"method": "dart", "layer": 2, "budget": 12},
               identity={"method": "dart", "layer": 2, "budget": 1.0}, expected=lambda n: min(n, 12)),
    MethodCase("dart-image-pivots-only", side="llm",
               reduce={"method": "dart", "layer": 1, "budget": 0.5, "pivots_image": 2, "pivots_text": 0},
               expected=lambda n: n // 2),
    MethodCase("pdrop", side="llm", reduce=dict(_THREE_CUTS, method="pdrop", keep=[0.5, 0.25, 0.125]),
               identity=dict(_THREE_CUTS, method="pdrop", keep=[1.0, 1.0, 1.0]), expected=lambda n: n // 2),
    MethodCase("sparsevlm", side="llm", reduce=dict(_THREE_CUTS, method="sparsevlm", keep=[0.5, 0.25, 0.125], heads=2),
               identity=dict(_THREE_CUTS, method="sparsevlm", keep=[1.0, 1.0, 1.0], heads=2),
               expected=lambda n: n // 2),
]
