"""DART, PyramidDrop and SparseVLM in the invariant matrix (LLM side, every family).

Budgets: DART keeps exactly ``budget`` per image (12, or all of a smaller image); the progressive methods halve at
each of three cuts (0.5, 0.25, 0.125 of the original count), so every cut keeps floor(n_in / 2) of what it
receives: ``expected = n // 2`` at every stage. SparseVLM v1.5 / v1 recycle part of what they prune into merged
tokens (v1's counts are rank-adaptive too): content-adaptive, no expected count; v1 cannot keep every token (its
count is at most v - 1 unless the rater matrix has full column rank), so no identity case.
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
    MethodCase("sparsevlm-v1.5", side="llm",
               reduce=dict(_THREE_CUTS, method="sparsevlm", version=1.5, keep=[0.5, 0.25, 0.125]),
               identity=dict(_THREE_CUTS, method="sparsevlm", version=1.5, keep=[1.0, 1.0, 1.0]), expected=None),
    MethodCase("sparsevlm-v1", side="llm", reduce=dict(_THREE_CUTS, method="sparsevlm", version=1, scale=1.5),
               expected=None),
]
