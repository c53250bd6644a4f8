"""LLaVA-1.5 family and the baseline methods (random, downsample, prefix, fastv)."""

from matrix import Family, MethodCase
from tiny_models import llava_inputs, tiny_llava

FAMILIES = [
    Family("llava", build=lambda attn: tiny_llava(attn), inputs=lambda m, b, s: llava_inputs(m, batch=b, seed=s),
           tokens_per_unit=36),
]

CASES = [
    MethodCase("random-vision", side="vision", reduce={"method": "random", "budget": 9},
               identity={"method": "random", "budget": 1.0}, expected=lambda n: 9),
    MethodCase("random-llm", side="llm", reduce={"method": "random", "layer": 1, "budget": 0.25},
               identity={"method": "random", "layer": 1, "budget": 1.0}, expected=lambda n: n // 4),
    MethodCase("downsample", side="vision", reduce={"method": "downsample", "budget": 9},
               expected=lambda n: 9),
    MethodCase("fastv", side="llm", reduce={"method": "fastv", "layer": 2, "budget": 0.5},
               identity={"method": "fastv", "layer": 2, "budget": 1.0}, expected=lambda n: n // 2),
    MethodCase("fastv-text", side="llm", reduce={"method": "fastv", "layer": 1, "budget": 7, "query": "text"},
               identity={"method": "fastv", "layer": 1, "budget": 1.0, "query": "text"}, expected=lambda n: 7),
]
