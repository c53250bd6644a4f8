"""PACT (vtc/methods/pact.py) in the invariant matrix: every family, batch 1 and 3, sdpa and eager.

Tiny random models need a larger cutoff than the paper's 0.21 for merges to happen (their keys are less
similar); ``identity`` keeps every token (keep 1.0, a cutoff below any distance between distinct tokens).
"""

from matrix import MethodCase

CASES = [
    MethodCase("pact", side="llm", reduce={"method": "pact", "layer": 2, "keep": 0.55, "cutoff": 0.45},
               identity={"method": "pact", "layer": 2, "keep": 1.0, "cutoff": 1e-6}, expected=None),
    MethodCase("pact-euti", side="llm", reduce={"method": "pact", "layer": 1, "keep": 0.5, "mode": "euti"},
               identity={"method": "pact", "layer": 1, "keep": 1.0, "mode": "euti"}, expected=lambda n: n // 2),
    MethodCase("pact-dbdpc", side="llm", reduce={"method": "pact", "layer": 1, "cutoff": 0.3, "mode": "dbdpc"},
               identity={"method": "pact", "layer": 1, "cutoff": 1e-6, "mode": "dbdpc"}, expected=None),
    MethodCase("pact-centre-noprop", side="llm",
               reduce={"method": "pact", "layer": 2, "keep": 0.55, "cutoff": 0.3, "merge": "centre",
                       "proportional": False},
               expected=None),
]
