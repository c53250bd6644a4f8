"""Every ``generate`` mode under vtc (issue 17 §2): {greedy, beams, sampling, num_return_sequences, the three ways
of passing the prompt, use_cache=False, output_scores / return_dict_in_generate} x {vision-side, LLM-side, both}
x every family of the invariant matrix (where an oracle can be built: ``NO_ORACLE``).

Each cell equals the same ``generate`` call on an oracle:
- vision side: the unwrapped model fed the reduced prompt vtc built (captured ``inputs_embeds``, mask, positions),
  with the caller's prompt ids in front of the new tokens (transformers decodes an ``inputs_embeds`` prompt with a
  cache even under ``use_cache=False``, so the oracle does too);
- LLM side: the replayed reductions (tests/replay.py) with ``use_cache=False``: every step an uncached
  recomputation over the kept tokens;
- both: the unwrapped model fed the reduced prompt, with the tokens the LLM-side stage pruned masked as keys from
  its layer on (pruning by masking instead of vtc's slicing).
A keep-all config equals the unwrapped model on the same call. That beam search carries vtc's per-row state (kept
slots, decode masks) with the cache rows is checked directly by ``test_beam_reorder_carries_row_state`` (the rows
of one sample's beams hold equal state, so the matrix alone cannot see a missing reorder).
"""

from __future__ import annotations

import contextlib
import functools
import os
import sys

import pytest
import torch
from matrix import discover
from replay import replay_config
from tf_compat import HAS_MM_ENCODER_OUTPUTS
from tiny_models import llava_inputs, tiny_llava
from torch.overrides import TorchFunctionMode

import vtc
from vtc.models import get_adapter
from vtc.models.base import cache_kwarg_name

FAMILY_BY_NAME = {f.name: f for f in discover()[0]}
FAMILIES = tuple(FAMILY_BY_NAME)  # every family of the invariant matrix

VISION = {"method": "random", "budget": 9}
LLM = {"method": "random", "layer": 1, "budget": 0.5}
SIDES = {"vision": [VISION], "llm": [LLM], "both": [VISION, LLM]}
KEEP_ALL = {"vision": [{"method": "random", "budget": 1.0}], "llm": [{"method": "random", "layer": 1, "budget": 1.0}],
            "both": [{"method": "random", "budget": 1.0}, {"method": "random", "layer": 1, "budget": 1.0}]}

BASE = {"max_new_tokens": 3, "pad_token_id": 0, "do_sample": False}
#: mode -> (generate kwargs, how the prompt is passed)
MODES = {
    "greedy": ({}, "input_ids"),
    "beams": ({"num_beams": 3}, "input_ids"),
    "sample": ({"do_sample": True}, "input_ids"),
    "return2-sample": ({"do_sample": True, "num_return_sequences": 2}, "input_ids"),
    "return2-beams": ({"num_beams": 3, "num_return_sequences": 2}, "input_ids"),
    "inputs=": ({}, "inputs"),
    "positional": ({}, "positional"),
    "no-cache": ({"use_cache": False}, "input_ids"),
    "scores": ({"output_scores": True, "return_dict_in_generate": True}, "input_ids"),
}


@functools.cache
def model_for(family: str):
    return FAMILY_BY_NAME[family].build("sdpa")


@functools.cache
def inputs_for(family: str) -> dict:
    inputs = FAMILY_BY_NAME[family].inputs(model_for(family), 2, 0)
    return {k: v for k, v in inputs.items() if not k.startswith("_")}


def call(model, inputs: dict, mode: str, **override):
    """``model.generate`` in ``mode``, the prompt passed as the mode says; sampling is seeded."""
    kwargs, how = MODES[mode]
    kwargs = {**BASE, **kwargs, **override}
    inputs = dict(inputs)
    torch.manual_seed(0)
    if "input_ids" not in inputs:
        return model.generate(**inputs, **kwargs)
    ids = inputs.pop("input_ids")
    if how == "positional":
        return model.generate(ids, **inputs, **kwargs)
    if how == "inputs":
        return model.generate(inputs=ids, **inputs, **kwargs)
    return model.generate(input_ids=ids, **inputs, **kwargs)


def sequences(out) -> torch.Tensor:
    return out if isinstance(out, torch.Tensor) else out.sequences


def assert_same(out, ref, atol: float) -> None:
    assert torch.equal(sequences(out), sequences(ref))
    if not isinstance(ref, torch.Tensor) and ref.scores is not None:
        assert len(out.scores) == len(ref.scores)
        for a, b in zip(out.scores, ref.scores):
            finite = torch.isfinite(b)
            assert torch.equal(torch.isfinite(a), finite)
            torch.testing.assert_close(a[finite], b[finite], atol=atol, rtol=atol)


def reduced_prompt(model, inputs: dict, config: dict) -> dict:
    """The prompt vtc's vision-side stages hand the LLM (what a forward pre-hook after vtc's sees): embeddings, or
    ids + ``mm_encoder_outputs`` for the families that feed the reduced features that way (Qwen3-VL)."""
    captured = {}

    def capture(module, args, kwargs):
        captured.update({k: kwargs[k] for k in ("inputs_embeds", "attention_mask", "position_ids", "input_ids",
                                                "mm_encoder_outputs", "token_type_ids") if kwargs.get(k) is not None})

    with vtc.compress(model, config), torch.no_grad():
        handle = model.register_forward_pre_hook(capture, with_kwargs=True)
        try:
            model(**inputs)
        finally:
            handle.remove()
    return captured


@contextlib.contextmanager
def masked_keys(model, stats):
    """Pruning by masking, an implementation independent of vtc's slicing runtime: from the LLM-side stage's layer
    on, every query of the unwrapped model is kept from attending to the prompt tokens the stage pruned (they
    keep their positions; what they compute themselves is never read)."""
    (st,) = [s for s in stats.stages if s.side == "llm"]
    n = stats.prompt_len
    keep = torch.zeros(st.kept_positions.shape[0], n + 1, dtype=torch.bool)
    keep.scatter_(1, torch.where(st.kept_valid, st.kept_positions, n), True)
    keep = keep[:, :n]

    def hook(module, args, kwargs):
        mask = kwargs.get("attention_mask")
        assert mask is not None and mask.dim() == 4, "the padded test batch gives every layer a 4D mask"
        K = mask.shape[-1]
        k = keep[:, :K] if K <= n else torch.cat([keep, torch.ones(keep.shape[0], K - n, dtype=torch.bool)], 1)
        mask = mask.expand(k.shape[0], *mask.shape[1:])
        if mask.dtype == torch.bool:
            mask = mask & k[:, None, None, :]
        else:
            mask = mask.masked_fill(~k[:, None, None, :], torch.finfo(mask.dtype).min)
        return args, {**kwargs, "attention_mask": mask}

    layers = get_adapter(model).decoder_layers()
    handles = [layers[i].register_forward_pre_hook(hook, with_kwargs=True) for i in range(st.layer, len(layers))]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


@functools.cache
def unwrapped(family: str, mode: str):
    return call(model_for(family), inputs_for(family), mode)


#: families whose vision-side prompt is fed as ids + features (the oracle passes the captured features to the unwrapped
#: model's generate as ``mm_encoder_outputs``, which transformers 5.17's forward does not take: their vision-side cells
#: skip there; vtc's own 5.17 path is checked by the invariant matrix and tests/test_qwen3_vl.py)
IDS_AND_FEATURES = ("qwen3_vl", "gemma3")

#: cells whose oracle cannot be built (vtc's result is checked another way, named in the reason)
NO_ORACLE = {
    # transformers' generate cannot expand Gemma 3's flat (N, D) mm_encoder_outputs per image for beams / several
    # returned sequences (the oracle crashes in _expand_inputs_for_generation); vtc feeds each expanded row its
    # own features instead: tests/test_gemma3.py::test_vision_side_beams_rows_equal_single
    **{("gemma3", side, mode): "transformers cannot expand Gemma 3's mm_encoder_outputs for beams; see "
       "test_gemma3.py::test_vision_side_beams_rows_equal_single"
       for side in ("vision", "both") for mode in ("beams", "return2-sample", "return2-beams")},
    # masked_keys maps a layer's mask columns to prompt positions, which a sliding-window cache layer (holding only
    # its last entries) does not keep; the LLM side on Gemma 3 is checked by the replay oracle (side "llm" here) and
    # the decode tests past the window in tests/test_gemma3.py
    **{("gemma3", "both", mode): "the masking oracle cannot follow Gemma 3's sliding-window cache layers; see "
       "the llm cells and test_gemma3.py::test_sliding_window_decode_cached_equals_uncached"
       for mode in MODES if mode not in ("beams", "return2-sample", "return2-beams")},
}


def _family_side_params():
    out = []
    for fam in FAMILIES:
        for side in SIDES:
            skip = side != "llm" and fam in IDS_AND_FEATURES and not HAS_MM_ENCODER_OUTPUTS
            mark = pytest.mark.skip(reason="the oracle feeds mm_encoder_outputs (transformers >= 5.18)")
            out.append(pytest.param(fam, side, id=f"{fam}-{side}", marks=mark if skip else ()))
    return out


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("family,side", _family_side_params())
def test_generate_equals_oracle(family, side, mode):
    if (family, side, mode) in NO_ORACLE:
        pytest.skip(NO_ORACLE[family, side, mode])
    model, inputs = model_for(family), inputs_for(family)
    config = vtc.load_config({"stages": SIDES[side]})
    with vtc.compress(model, config) as run:
        out = call(model, inputs, mode)
        stats = run.stats
    if side == "llm":
        with vtc.compress(model, replay_config(config, stats, key=f"generate-{family}-{side}-{mode}")):
            oracle = call(model, inputs, mode, use_cache=False)
    else:
        reduced = reduced_prompt(model, inputs, config)
        # transformers decodes an inputs_embeds prompt with a cache whatever use_cache says
        with masked_keys(model, stats) if side == "both" else contextlib.nullcontext():
            oracle = call(model, reduced, mode, use_cache=True)
        prompt = inputs["input_ids"].repeat_interleave(sequences(out).shape[0] // inputs["input_ids"].shape[0], 0)
        fed = reduced["input_ids"].shape[1] if "input_ids" in reduced else 0  # generate on ids returns them first
        oracle_seqs = torch.cat([prompt, sequences(oracle)[:, fed:]], dim=1)
        if isinstance(oracle, torch.Tensor):
            oracle = oracle_seqs
        else:
            oracle.sequences = oracle_seqs
    assert_same(out, oracle, atol=1e-4)
    with vtc.compress(model, {"stages": KEEP_ALL[side]}):
        keep_all = call(model, inputs, mode)
    assert_same(keep_all, unwrapped(family, mode), atol=1e-5)


def test_beam_reorder_carries_row_state():
    """Beam search reorders the cache rows; each row's kept slots and decode mask must follow its cache row."""
    model, inputs = model_for("llava"), inputs_for("llava")
    key = cache_kwarg_name(model.forward)
    flip = torch.tensor([1, 0])
    with vtc.compress(model, {"stages": [{"method": "fastv", "layer": 2, "budget": 0.5}]}), torch.no_grad():
        results = []
        for reorder in (False, True):
            out = model(**inputs, use_cache=True)
            cache = out.cache if "cache" in out else out.past_key_values
            nxt = out.logits[:, -1].argmax(-1, keepdim=True)
            mask = torch.cat([inputs["attention_mask"], torch.ones_like(nxt)], dim=1)
            if reorder:
                cache = model._reorder_cache(cache, flip)
                nxt, mask = nxt[flip], mask[flip]
            results.append(model(input_ids=nxt, attention_mask=mask, **{key: cache}).logits[:, -1])
    straight, flipped = results
    torch.testing.assert_close(flipped, straight[flip], atol=1e-5, rtol=1e-5)


def test_run_is_reentrant():
    """A nested ``with run:`` (or ``with handle:`` after vtc.apply) leaves the run attached at its exit."""
    model, inputs = model_for("llava"), inputs_for("llava")
    config = {"stages": [{"method": "fastv", "layer": 2, "budget": 0.5}]}
    with torch.no_grad():
        plain = model(**inputs).logits
        run = vtc.compress(model, config)
        with run:
            compressed = model(**inputs).logits
            with run:
                pass
            assert run.attached
            torch.testing.assert_close(model(**inputs).logits, compressed)
        assert not run.attached
        torch.testing.assert_close(model(**inputs).logits, plain, atol=0, rtol=0)
        handle = vtc.apply(model, config)
        with handle:
            pass
        assert handle.attached
        handle.remove()
    assert not hasattr(model, "_vtc_run")


@pytest.mark.parametrize("stage", [VISION, LLM], ids=["vision", "llm"])
def test_user_instance_attributes_are_restored(stage):
    """A ``generate`` / ``_reorder_cache`` the user set on the instance before attaching is back after detach."""
    model = model_for("llava")
    original = model.generate

    def my_generate(*args, **kwargs):
        return original(*args, **kwargs)

    def my_reorder(cache, beam_idx):
        cache.reorder_cache(beam_idx)
        return cache

    model.generate, model._reorder_cache = my_generate, my_reorder
    try:
        with vtc.compress(model, {"stages": [stage]}):
            out = model.generate(**inputs_for("llava"), **BASE, num_beams=2)
        assert model.__dict__["generate"] is my_generate
        assert model.__dict__["_reorder_cache"] is my_reorder
        assert out.shape[0] == 2
    finally:
        del model.generate, model._reorder_cache


def test_prompt_given_twice_is_an_error():
    model, inputs = model_for("llava"), dict(inputs_for("llava"))
    ids = inputs.pop("input_ids")
    with vtc.compress(model, {"stages": [VISION]}):
        with pytest.raises(ValueError, match="inputs"):
            model.generate(ids, input_ids=ids, **inputs, **BASE)


# ---- host syncs: per stage, never per decoder layer (issue 18 §5) ------------------------------------------------
_SYNCS = {"tolist", "item", "__bool__", "__int__", "__float__", "__index__", "nonzero", "cpu", "numpy"}
_VTC_DIR = os.path.dirname(vtc.__file__)


class _CountSyncs(TorchFunctionMode):
    """CPU stand-in for ``torch.cuda.set_sync_debug_mode``: counts the tensor -> host reads vtc's own code makes
    (``tolist``, ``item``, ``bool`` / ``int`` / ``float`` of a tensor, ``nonzero``, boolean-mask indexing)."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        bool_index = name in ("__getitem__", "__setitem__") and len(args) > 1 and any(
            isinstance(i, torch.Tensor) and i.dtype == torch.bool
            for i in (args[1] if isinstance(args[1], tuple) else (args[1],)))
        if (name in _SYNCS or bool_index) and sys._getframe(1).f_code.co_filename.startswith(_VTC_DIR):
            self.count += 1
        return func(*args, **(kwargs or {}))


def test_host_syncs_do_not_grow_with_depth():
    """The same prompt through a 4-layer and an 8-layer model: vtc's host syncs during prefill and decoding are the
    same (one set per stage / per step, none per decoder layer); reading the stats afterwards may sync."""
    counts = []
    for layers in (4, 8):
        model = tiny_llava(layers=layers)
        inputs = llava_inputs(model, batch=2)
        with vtc.compress(model, {"stages": [VISION, {"method": "fastv", "layer": 2, "budget": 0.5}]}) as run:
            with _CountSyncs() as mode:
                model.generate(**inputs, **BASE)
            counts.append(mode.count)
            assert len(run.stats.tokens_per_layer) == layers - 1
    assert counts[0] == counts[1], counts


@pytest.mark.parametrize("family", ["llava", "gemma3"])
@pytest.mark.parametrize("side", ["vision", "llm"])
def test_chunked_prefill_is_refused(family, side):
    """A prefill split into chunks (``prefill_chunk_size``, as an argument or in the generation config) would score
    and cut each chunk apart: refused with an error naming the field, the model left as it was."""
    import copy

    model, inputs = model_for(family), inputs_for(family)
    before = model.generate(**inputs, **BASE)
    with vtc.compress(model, {"stages": SIDES[side]}):
        with pytest.raises(vtc.ConfigError, match="prefill_chunk_size=8"):
            model.generate(**inputs, **BASE, prefill_chunk_size=8)
        config = copy.deepcopy(model.generation_config)
        config.prefill_chunk_size = 8
        with pytest.raises(vtc.ConfigError, match="prefill_chunk_size=8"):
            model.generate(**inputs, **BASE, generation_config=config)
    assert "generate" not in vars(model) and not hasattr(model, "_vtc_run")
    assert torch.equal(model.generate(**inputs, **BASE), before)
