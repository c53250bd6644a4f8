"""TransPrune: three pruning points (progressive), with and without instruction-guided attention, all families.

keep halves at every point (0.5, 0.25, 0.125 of the original count), so each point keeps floor(n_in / 2) of
what it receives, whatever the family's visual token count: ``expected = n // 2`` holds at every stage.
"""

from matrix import MethodCase

_SCHEDULE = {"method": "transprune", "layers": [1, 2, 3], "accumulate": [0, 2]}

CASES = [
    MethodCase("transprune", side="llm", reduce=dict(_SCHEDULE, keep=[0.5, 0.25, 0.125]),
               identity=dict(_SCHEDULE, keep=[1.0, 1.0, 1.0]), expected=lambda n: n // 2),
    MethodCase("transprune-attention-free", side="llm",
               reduce=dict(_SCHEDULE, keep=[0.5, 0.25, 0.125], iga_weight=0.0),
               identity=dict(_SCHEDULE, keep=[1.0, 1.0, 1.0], iga_weight=0.0), expected=lambda n: n // 2),
]
