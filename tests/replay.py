"""A test-only LLM-side method that replays recorded Reductions (for the decode-consistency invariant)."""

from __future__ import annotations

from typing import Literal

import torch

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


def extend_with(inputs: dict, new: torch.Tensor) -> dict:
    """``inputs`` with the tokens ``new`` (B, t) appended: the ids, the attention mask with ones, and every other
    per-token tensor (``token_type_ids``, ``mm_token_type_ids``, ...) with zeros (generated tokens are text)."""
    ids = inputs["input_ids"]
    step = dict(inputs, input_ids=torch.cat([ids, new], dim=1))
    for key, value in inputs.items():
        if key != "input_ids" and isinstance(value, torch.Tensor) and value.shape == ids.shape:
            fill = torch.ones_like if key == "attention_mask" else torch.zeros_like
            step[key] = torch.cat([value, fill(new).to(value.dtype)], dim=1)
    return step


def assert_cached_equals_uncached(model, config, inputs: dict, out, *, stats=None, key: str | None = None,
                                  tol: float = 1e-4) -> None:
    """Decode consistency: the logits of every step of the cached ``generate`` output ``out`` equal an uncached
    forward over the prompt and the tokens generated so far. With ``stats`` (and ``key``) the recorded LLM-side
    reductions are replayed (a score-based method would re-select on the longer prompt); without, ``config`` runs
    again as is (for selections that do not depend on the prompt's length)."""
    run_config = config if stats is None else replay_config(vtc.load_config(config), stats, key)
    new = out.sequences[:, inputs["input_ids"].shape[1]:]
    with vtc.compress(model, run_config), torch.no_grad():
        for t in range(new.shape[1]):
            full = model(**extend_with(inputs, new[:, :t]), use_cache=False).logits[:, -1]
            torch.testing.assert_close(full, out.logits[t], atol=tol, rtol=tol)
