"""The vision-side 2025 methods (DivPrune, FasterVLM, VisPruner, CDPruner) in the invariant matrix.

Budgets are per unit (image / crop / frame) unless the case says ``per: image`` (one budget over an image's
crops: LLaVA-NeXT units then deliver different counts, so ``expected`` is None).
"""

from matrix import MethodCase

CASES = [
    MethodCase("divprune", side="vision", reduce={"method": "divprune", "budget": 0.3},
               identity={"method": "divprune", "budget": 1.0}),
    MethodCase("divprune-crop", side="vision", reduce={"method": "divprune", "budget": 9, "per": "crop"},
               identity={"method": "divprune", "budget": 1.0, "per": "crop"}, expected=lambda n: 9),
    MethodCase("fastervlm", side="vision", reduce={"method": "fastervlm", "budget": 9},
               identity={"method": "fastervlm", "budget": 1.0}, expected=lambda n: 9),
    # 7 -> 3 important + 4 from the similarity rounds (odd residuals on 36 and 16 tokens: the fixed quirk)
    MethodCase("vispruner", side="vision", reduce={"method": "vispruner", "budget": 7},
               identity={"method": "vispruner", "budget": 1.0}, expected=lambda n: 7),
    MethodCase("vispruner-fraction", side="vision",
               reduce={"method": "vispruner", "budget": 0.25, "important_ratio": 0.75}, expected=lambda n: n // 4),
]
