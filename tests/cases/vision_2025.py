"""The vision-side 2025 methods (DivPrune, FasterVLM, VisPruner, CDPruner) in the invariant matrix.

Budgets are per unit (image / crop / frame) unless the case says ``per: image`` (one budget over an image's
crops: LLaVA-NeXT units then deliver different counts, so ``expected`` is None).
"""

from matrix import MethodCase
from models_clip import tiny_clip_dir

#: CDPruner with a fixed instruction (reading it off the prompt would read the generated tokens too in the
#: decode-consistency replay, which re-runs the vision side on prompt + answer; that path: test_vision_2025.py)
_CDP = {"method": "cdpruner", "text_encoder": tiny_clip_dir(), "instruction": "w5 w9 w17 w33 w60 w61 w70 w99 w100"}

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
    # CLIP towers only (Qwen has no CLIP image space: refused, see tests/test_vision_2025.py)
    MethodCase("cdpruner", side="vision", reduce=dict(_CDP, budget=9), identity=dict(_CDP, budget=1.0),
               expected=lambda n: 9, families=("llava", "llava_next")),
]
