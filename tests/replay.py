"""A test-only LLM-side method that replays recorded Reductions (for the decode-consistency invariant)."""

from __future__ import annotations

from typing import Literal

import vtc
from vtc.methods import Method, register_method

RECORDED: dict[str, dict[int, object]] = {}


@register_method("replay", overwrite=True)
class Replay(Method):
    sides = ("llm",)
    method: Literal["replay"] = "replay"
    key: str
    layers: list[int]

    def llm_layers(self):
        return tuple(self.layers)

    def reduce_llm(self, ctx):
        return RECORDED[self.key][ctx.layer_idx]


def replay_config(config: vtc.Config, stats, key: str) -> dict:
    """The config with every LLM-side stage replaced by a replay of what ``stats`` recorded."""
    stages = []
    by_index: dict[int, dict[int, object]] = {}
    for st in stats.stages:
        if st.side == "llm":
            by_index.setdefault(st.index, {})[st.layer] = st.reduction
    for i, stage in enumerate(config.stages):
        if stage.side == "llm":
            k = f"{key}-{i}"
            RECORDED[k] = by_index.get(i, {})
            # the recorded Reductions carry `proportional` themselves
            stages.append({"method": "replay", "key": k, "layers": sorted(RECORDED[k])})
        else:
            stages.append(stage.model_dump())
    return {"stages": [s for s in stages if s.get("method") != "replay" or s["layers"]], "seed": config.seed}
