"""The invariants 1-6 (README, "Invariants") as a data-driven matrix: every family x every method case x batch {1, 3} x
{sdpa, eager}. Families and cases come from tests/cases/*.py (see tests/matrix.py). The expensive invariants (2.
detach, 3. decode consistency, 5. batch = single) run a family's ``heavy_cases`` subset where it declares one
(SmolVLM and Idefics3: tests/cases/smolvlm.py, Qwen3-VL: tests/cases/qwen3_vl.py; each file says what its subset covers);
identity, sdpa = eager and budgets always run every case."""

from __future__ import annotations

import functools

import pytest
import torch
from matrix import discover
from replay import assert_cached_equals_uncached

import vtc

FAMILIES, CASES = discover()
FAMILY_BY_NAME = {f.name: f for f in FAMILIES}
ATTNS = ("sdpa", "eager")
BATCHES = (1, 3)


def _pairs():
    out = []
    for fam in FAMILIES:
        for case in CASES:
            if case.side not in fam.sides:
                continue
            if case.families is not None and fam.name not in case.families:
                continue
            out.append(pytest.param(fam.name, case, id=f"{fam.name}-{case.name}"))
    return out


PAIRS = _pairs()
#: the pairs the expensive invariants run on: a family's ``heavy_cases`` subset where it declares one
PAIRS_HEAVY = [p for p in PAIRS if FAMILY_BY_NAME[p.values[0]].heavy_cases is None
               or p.values[1].name in FAMILY_BY_NAME[p.values[0]].heavy_cases]


def test_heavy_cases_name_cases_the_family_runs():
    """A family's heavy subset names only cases it runs (a misspelt name would silently shrink the subset)."""
    for fam in FAMILIES:
        if fam.heavy_cases is None:
            continue
        runs = {p.values[1].name for p in PAIRS if p.values[0] == fam.name}
        unknown = sorted(set(fam.heavy_cases) - runs)
        assert not unknown, f"{fam.name}: heavy_cases not among its cases: {unknown}"


@functools.cache
def model_for(family: str, attn: str):
    return FAMILY_BY_NAME[family].build(attn)


@functools.cache
def inputs_for(family: str, batch: int, seed: int = 0):
    fam = FAMILY_BY_NAME[family]
    return fam.inputs(model_for(family, "sdpa"), batch, seed)


def cfg(stage: dict) -> dict:
    return {"stages": [stage]}


@torch.no_grad()
def logits(model, inputs, **kw):
    return model(**inputs, **kw).logits


def _is_vtc(fn) -> bool:
    fn = getattr(fn, "__func__", fn)
    return (getattr(fn, "__module__", "") or "").startswith(("vtc", "replay"))


def no_vtc_left(model) -> None:
    """No hook vtc registered is left (transformers' own lazily installed output-capturing hooks may exist)."""
    for name, mod in model.named_modules():
        for kind in ("_forward_pre_hooks", "_forward_hooks"):
            left = [h for h in getattr(mod, kind).values() if _is_vtc(h)]
            assert not left, f"vtc {kind} left on {name or 'model'}: {left}"
    assert "generate" not in model.__dict__
    assert not hasattr(model, "_vtc_run")


GEN = {"max_new_tokens": 3, "do_sample": False, "pad_token_id": 0}


# ---- 1. identity -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("attn", ATTNS)
@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("family,case", PAIRS)
def test_identity(family, case, batch, attn):
    if case.identity is None:
        pytest.skip("method cannot keep every token")
    model = model_for(family, attn)
    inputs = inputs_for(family, batch)
    ref = logits(model, inputs)
    ref_gen = model.generate(**inputs, **GEN)
    with vtc.compress(model, cfg(case.identity)):
        out = logits(model, inputs)
        gen = model.generate(**inputs, **GEN)
    assert out.shape == ref.shape
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    assert torch.equal(gen, ref_gen)


# ---- 2. detach ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("attn", ATTNS)
@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("family,case", PAIRS_HEAVY)
def test_detach(family, case, batch, attn):
    model = model_for(family, attn)
    inputs = inputs_for(family, batch)
    before = logits(model, inputs)
    with vtc.compress(model, cfg(case.reduce)):
        logits(model, inputs)
    assert torch.equal(logits(model, inputs), before)
    no_vtc_left(model)
    handle = vtc.apply(model, cfg(case.reduce))
    logits(model, inputs)
    handle.remove()
    assert torch.equal(logits(model, inputs), before)
    no_vtc_left(model)
    with pytest.raises(RuntimeError, match="boom"):
        with vtc.compress(model, cfg(case.reduce)):
            logits(model, inputs)
            raise RuntimeError("boom")
    assert torch.equal(logits(model, inputs), before)
    no_vtc_left(model)


# ---- 3. decode consistency ----------------------------------------------------------------------------------
@pytest.mark.parametrize("attn", ATTNS)
@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("family,case", PAIRS_HEAVY)
def test_decode_consistency(family, case, batch, attn):
    """Cached greedy generate == recomputing every step without a cache over the same kept tokens."""
    model = model_for(family, attn)
    inputs = inputs_for(family, batch)
    config = vtc.load_config(cfg(case.reduce))
    with vtc.compress(model, config) as run:
        out = model.generate(**inputs, **GEN, output_logits=True, return_dict_in_generate=True)
    assert_cached_equals_uncached(model, config, inputs, out, stats=run.stats,
                                  key=f"{family}-{case.name}-{batch}-{attn}", tol=case.tol)


# ---- 4. backend agnostic --------------------------------------------------------------------------------------
def _kept(stats):
    out = []
    for st in stats.stages:
        if st.side == "vision":
            out.append([s.clone() for s in st.sources])
        else:
            out.append((st.kept_positions.clone(), st.kept_valid.clone()))
    return out


@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("family,case", PAIRS)
def test_sdpa_equals_eager(family, case, batch):
    inputs = inputs_for(family, batch)
    results = {}
    for attn in ATTNS:
        model = model_for(family, attn)
        with vtc.compress(model, cfg(case.reduce)) as run:
            results[attn] = (logits(model, inputs), _kept(run.stats))
    (l_s, k_s), (l_e, k_e) = results["sdpa"], results["eager"]
    assert len(k_s) == len(k_e)
    for a, b in zip(k_s, k_e):
        if isinstance(a, list):
            for x, y in zip(a, b):
                assert torch.equal(x, y)
        else:
            assert torch.equal(a[0][a[1]], b[0][b[1]])
    torch.testing.assert_close(l_s[:, -1], l_e[:, -1], atol=case.tol, rtol=case.tol)


# ---- 5. batching ------------------------------------------------------------------------------------------------
def _row(inputs: dict, b: int, family: str | None = None) -> dict:
    """Sample b of a padded batch as a batch of one, without padding."""
    if family is not None and FAMILY_BY_NAME[family].row is not None:
        return FAMILY_BY_NAME[family].row(inputs, b)
    fam_row = inputs.get("_rows")
    if fam_row is not None:  # families whose visual inputs are not batched per row provide rows themselves
        return fam_row[b]
    keep = inputs["attention_mask"][b].bool()
    row = {}
    for k, v in inputs.items():
        if k in ("input_ids", "attention_mask"):
            row[k] = v[b:b + 1][:, keep]
        elif isinstance(v, torch.Tensor) and v.shape[0] == inputs["input_ids"].shape[0]:
            row[k] = v[b:b + 1]
        else:
            row[k] = v
    return row


@pytest.mark.parametrize("attn", ATTNS)
@pytest.mark.parametrize("family,case", PAIRS_HEAVY)
def test_batch_equals_single(family, case, attn):
    model = model_for(family, attn)
    inputs = {k: v for k, v in inputs_for(family, 3).items()}
    rows = inputs.pop("_rows", None)
    with vtc.compress(model, cfg(case.reduce)) as run:
        batched = logits(model, inputs)[:, -1]
        kept_batch = [st.tokens_out for st in run.stats.stages]
        gen_batch = model.generate(**inputs, **GEN)
        offsets = [0] * len(kept_batch)  # rows may have different numbers of units (e.g. InternVL's tiles)
        for b in range(3):
            row = rows[b] if rows is not None else _row(inputs, b, family)
            single = logits(model, row)[:, -1]
            torch.testing.assert_close(single[0], batched[b], atol=case.tol, rtol=case.tol)
            kept_single = [st.tokens_out for st in run.stats.stages]
            for i, (kb, ks) in enumerate(zip(kept_batch, kept_single)):
                assert kb[offsets[i]:offsets[i] + len(ks)] == ks
                offsets[i] += len(ks)
            gen_single = model.generate(**row, **GEN)
            assert torch.equal(gen_single[0, -GEN["max_new_tokens"]:], gen_batch[b, -GEN["max_new_tokens"]:])


# ---- 6. budgets are exact; stats agree with the real cache -------------------------------------------------------
@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("family,case", PAIRS)
def test_budget_and_stats(family, case, batch):
    model = model_for(family, "sdpa")
    inputs = inputs_for(family, batch)
    with vtc.compress(model, cfg(case.reduce)) as run:
        with torch.no_grad():
            out = model(**inputs, use_cache=True)
        stats = run.stats
    cache = out.cache if "cache" in out else out.past_key_values
    n_layers = len(stats.kv_cache_len)
    assert n_layers > 0
    real = [cache.get_seq_length(i) for i in range(n_layers)]
    assert stats.kv_cache_len == real
    assert len(stats.stages) >= 1
    for st in stats.stages:
        assert len(st.tokens_in) == len(st.tokens_out) > 0
        if case.expected is not None:
            assert st.tokens_out == [case.expected(n) for n in st.tokens_in]
        else:
            assert all(o <= i for i, o in zip(st.tokens_in, st.tokens_out))
    if case.side == "llm":
        first = min(st.layer for st in stats.stages)
        for layer, length in stats.seq_len_per_layer.items():
            assert real[layer] == length
        assert all(real[i] == stats.prompt_len for i in range(first))
        if batch == 1:
            st = [s for s in stats.stages if s.layer == first][0]
            assert real[first] == stats.prompt_len - (st.tokens_in[0] - st.tokens_out[0])
    else:
        assert len(set(real)) == 1 and real[0] == stats.prompt_len
        if batch == 1:  # the rebuilt prompt = text + what each image takes after packing (incl. newlines)
            n_placeholders = int(run.adapter.token_map(inputs["input_ids"], inputs).is_visual.sum())
            assert stats.prompt_len == inputs["input_ids"].shape[1] - n_placeholders + sum(stats.image_tokens)
