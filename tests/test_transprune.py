"""TransPrune: TTV and IGA against direct recomputations, the progressive schedule, bad input, cost model."""

from __future__ import annotations

import importlib.util
import math
import sys
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from replay import assert_cached_equals_uncached
from tiny_models import IMAGE_TOKEN, llava_inputs, tiny_llava

import vtc
from vtc.methods import transprune as tp

ROOT = Path(__file__).resolve().parents[1]
CFG = {"method": "transprune", "layers": [3, 5, 7], "keep": [0.75, 0.5, 0.25], "accumulate": [1, 6]}


@pytest.fixture(scope="module")
def model():
    return tiny_llava("eager", layers=8)


@pytest.fixture(scope="module")
def inputs(model):
    return llava_inputs(model, batch=2)  # two left-padded rows of different lengths


# ---- direct recomputation helpers -----------------------------------------------------------------------------------
def _rope(x, cos, sin):  # x (B, h, M, d); cos / sin (B, M, d)
    x1, x2 = x.chunk(2, -1)
    return x * cos[:, None] + torch.cat((-x2, x1), -1) * sin[:, None]


def manual_attention(layer, x, cos, sin, valid, rows=None):
    """Re-implementation of a Llama attention block on slots: (output (B, M, D), probs (B, h, R, M))."""
    attn = layer.self_attn
    B, M, _ = x.shape
    d = attn.head_dim
    q = _rope(attn.q_proj(x).view(B, M, -1, d).transpose(1, 2), cos, sin)
    k = _rope(attn.k_proj(x).view(B, M, -1, d).transpose(1, 2), cos, sin)
    v = attn.v_proj(x).view(B, M, -1, d).transpose(1, 2)
    g = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(g, 1), v.repeat_interleave(g, 1)
    qi = torch.arange(M) if rows is None else rows  # (M,) or (B, R)
    qi = qi.expand(B, -1)
    q = torch.gather(q, 2, qi[:, None, :, None].expand(-1, q.shape[1], -1, d))
    allowed = (torch.arange(M)[None, None, :] <= qi[:, :, None]) & valid[:, None, :]
    logits = (q @ k.transpose(-1, -2)) * d**-0.5
    probs = torch.softmax(logits.masked_fill(~allowed[:, None], float("-inf")), -1).nan_to_num(0.0)
    out = attn.o_proj((probs @ v).transpose(1, 2).reshape(B, -1, q.shape[1] * d))
    return out, probs


def manual_mlp(mlp, x):
    return mlp.down_proj(F.silu(mlp.gate_proj(x)) * mlp.up_proj(x))


def ttv_reference(x, y, valid):
    """Literal per-token formula, one row at a time."""
    out = torch.zeros(x.shape[:2])
    for b in range(x.shape[0]):
        v = valid[b]
        xb, yb = x[b, v], y[b, v]
        r = yb.norm(dim=-1) / xb.norm(dim=-1)
        c = 1 - F.cosine_similarity(xb, yb, dim=-1)
        out[b, v] = r * torch.softmax(c, 0)
    return out


def run_recorded(model, inputs, stage, monkeypatch=None):
    """Run one prefill under ``stage``; record every decoder layer's input before and after vtc's hook."""
    rec: dict[int, dict] = {}
    igas: dict[int, torch.Tensor] = {}
    if monkeypatch is not None:
        orig = tp.instruction_guided_attention

        def spy(ctx):
            out = orig(ctx)
            igas[ctx.layer_idx] = out[0].clone()
            return out

        monkeypatch.setattr(tp, "instruction_guided_attention", spy)
    layers = model.model.language_model.layers
    with vtc.compress(model, {"stages": [stage]}) as run:
        handles = []
        for i, layer in enumerate(layers):
            def before(mod, args, kwargs, i=i):
                h = args[0] if args else kwargs["hidden_states"]
                rec[i] = {"pre": h.detach().clone(), "pe": [t.detach().clone() for t in kwargs["position_embeddings"]]}

            def after(mod, args, kwargs, i=i):
                rec[i]["post"] = (args[0] if args else kwargs["hidden_states"]).detach().clone()

            handles.append(layer.register_forward_pre_hook(before, with_kwargs=True, prepend=True))
            handles.append(layer.register_forward_pre_hook(after, with_kwargs=True))
        try:
            with torch.no_grad():
                model(**inputs)
        finally:
            for h in handles:
                h.remove()
        state = run.states[0]
        acc = None if state.acc is None else state.acc.clone()
        stats = run.stats
    return rec, stats, acc, igas


def slots_in(stats, layer, B, N, user_mask):
    """(slots, valid real) inside ``layer`` from the recorded stages (independent of the runtime's accessor)."""
    st = [s for s in stats.stages if s.layer <= layer]
    if not st:
        slots, valid = torch.arange(N).expand(B, N), torch.ones(B, N, dtype=torch.bool)
    else:
        last = max(st, key=lambda s: s.layer)
        slots, valid = last.kept_positions, last.kept_valid
    return slots, valid & torch.gather(user_mask, 1, slots)


def reference(model, inputs, stage, rec, stats):
    """Reference TTV accumulators (snapshot before each pruning layer) and IGA at each pruning layer."""
    layers = model.model.language_model.layers
    ids, user = inputs["input_ids"], inputs["attention_mask"].bool()
    B, N = ids.shape
    acc = torch.zeros(B, N)
    acc_at, iga_at, cands = {}, {}, {}
    first, last = stage["accumulate"]
    for layer_idx in range(len(layers)):
        if layer_idx in stage["layers"]:
            acc_at[layer_idx] = acc.clone()
            # IGA on the sequence entering the layer *before* this pruning
            slots, valid = slots_in(stats, layer_idx - 1, B, N, user)
            h = rec[layer_idx]["pre"]
            cos, sin = (torch.gather(t.expand(B, -1, -1), 1, slots[..., None].expand(-1, -1, t.shape[-1]))
                        for t in rec[layer_idx]["pe"])
            vis = (torch.gather(ids, 1, slots) == IMAGE_TOKEN) & valid
            M = slots.shape[1]
            idx = torch.arange(M).expand(B, M)
            last_vis = torch.where(vis, idx, -1).max(-1).values
            inst = valid & ~vis & (idx > last_vis[:, None])
            R = int(inst.sum(-1).max())
            rows = torch.where(inst, idx, idx + M).sort(-1).values[:, :R]
            row_ok = rows < M
            x = layers[layer_idx].input_layernorm(h)
            _, probs = manual_attention(layers[layer_idx], x, cos, sin, valid, rows.clamp(max=M - 1))
            per_row = probs.mean(1) * row_ok[..., None]
            att = per_row.sum(1) / row_ok.sum(1, keepdim=True).clamp(min=1)
            iga_at[layer_idx] = [att[b, vis[b]] / (att[b, vis[b]].sum() + 1e-8) for b in range(B)]
            cands[layer_idx] = [slots[b, vis[b]] for b in range(B)]
        if first <= layer_idx <= last and layer_idx < stage["layers"][-1]:
            slots, valid = slots_in(stats, layer_idx, B, N, user)
            layer = layers[layer_idx]
            h = rec[layer_idx]["post"]
            assert h.shape[1] == slots.shape[1]
            cos, sin = (torch.gather(t.expand(B, -1, -1), 1, slots[..., None].expand(-1, -1, t.shape[-1]))
                        for t in rec[layer_idx]["pe"])
            xa = layer.input_layernorm(h)
            ya, _ = manual_attention(layer, xa, cos, sin, valid)
            xm = layer.post_attention_layernorm(h + ya)
            ym = manual_mlp(layer.mlp, xm)
            ttv = ttv_reference(xa, ya, valid) + ttv_reference(xm, ym, valid)
            acc.scatter_add_(1, slots, torch.where(valid, ttv, 0.0))
    return acc, acc_at, iga_at, cands


def hooks(model) -> set:
    """Every forward (pre-)hook on the model (transformers itself may leave output-capturing hooks)."""
    return {(name, kind, key) for name, mod in model.named_modules()
            for kind, d in (("pre", mod._forward_pre_hooks), ("post", mod._forward_hooks)) for key in d}


def kept_visual(stats, layer, ids):
    st = [s for s in stats.stages if s.layer == layer][0]
    out = []
    for b in range(ids.shape[0]):
        pos = st.kept_positions[b][st.kept_valid[b]]
        out.append(set(pos[ids[b, pos] == IMAGE_TOKEN].tolist()))
    return out


# ---- 1. TTV ------------------------------------------------------------------------------------------------------
def test_transition_variation_formula():
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(2, 7, 16, generator=g), torch.randn(2, 7, 16, generator=g)
    valid = torch.ones(2, 7, dtype=torch.bool)
    valid[1, :2] = False
    out = tp.transition_variation(x, y, valid)
    torch.testing.assert_close(out, ttv_reference(x, y, valid))
    assert (out[1, :2] == 0).all()
    # half precision inputs with large activations do not overflow (computed in fp32)
    big = tp.transition_variation((x * 300).half(), (y * 300).half(), valid)
    assert torch.isfinite(big).all()
    torch.testing.assert_close(big, out, atol=2e-3, rtol=2e-3)


@torch.no_grad()
def test_ttv_matches_direct_recomputation(model, inputs):
    """TTV accumulated through the hooks == a direct recomputation of every attention / MLP sub-module on the
    survivors of each layer, and with iga_weight 0 the survivors are exactly the top-k of that TTV."""
    stage = dict(CFG, iga_weight=0.0)
    rec, stats, acc, _ = run_recorded(model, inputs, stage)
    ref_acc, acc_at, _, cands = reference(model, inputs, stage, rec, stats)
    assert acc is not None
    torch.testing.assert_close(acc, ref_acc, atol=1e-6, rtol=1e-4)
    assert (acc[~inputs["attention_mask"].bool()] == 0).all()
    ids = inputs["input_ids"]
    for j, layer in enumerate(stage["layers"]):
        kept = kept_visual(stats, layer, ids)
        for b in range(ids.shape[0]):
            k = math.floor(stage["keep"][j] * 36)
            scores = acc_at[layer][b, cands[layer][b]]
            top = cands[layer][b][scores.topk(k).indices]
            assert kept[b] == set(top.tolist()), (layer, b)


@torch.no_grad()
def test_iga_and_score_match_direct_recomputation(model, inputs, monkeypatch):
    """IGA at all three pruning points == a manual re-implementation of the next layer's attention rows of the
    instruction tokens; survivors == top-k of TTV + IGA."""
    stage = dict(CFG)
    rec, stats, acc, igas = run_recorded(model, inputs, stage, monkeypatch)
    _, acc_at, iga_at, cands = reference(model, inputs, stage, rec, stats)
    ids = inputs["input_ids"]
    assert sorted(igas) == stage["layers"]
    for j, layer in enumerate(stage["layers"]):
        kept = kept_visual(stats, layer, ids)
        for b in range(ids.shape[0]):
            n = len(cands[layer][b])
            torch.testing.assert_close(igas[layer][b, :n], iga_at[layer][b], atol=1e-6, rtol=1e-4)
            ttv = acc_at[layer][b, cands[layer][b]]
            score = ttv / (ttv.sum() + 1e-8) + iga_at[layer][b]
            top = cands[layer][b][score.topk(math.floor(stage["keep"][j] * 36)).indices]
            assert kept[b] == set(top.tolist()), (layer, b)


def test_iga_against_output_attentions(model, inputs, monkeypatch):
    """First pruning point (full sequence): IGA == eager attention probabilities of layer L, averaged."""
    _, _, _, igas = run_recorded(model, inputs, dict(CFG), monkeypatch)
    L = CFG["layers"][0]
    with torch.no_grad():
        att = model(**inputs, output_attentions=True).attentions[L]  # (B, h, N, N), reference only
    ids, mask = inputs["input_ids"], inputs["attention_mask"].bool()
    for b in range(ids.shape[0]):
        vis = ids[b] == IMAGE_TOKEN
        last = vis.nonzero().max()
        rows = mask[b] & ~vis & (torch.arange(ids.shape[1]) > last)
        a = att[b][:, rows].mean((0, 1))[vis]
        torch.testing.assert_close(igas[L][b, :36], a / a.sum(), atol=1e-6, rtol=1e-4)


# ---- 2. schedule, attention-free, fallback, decode -----------------------------------------------------------------
def test_paper_layer_conversion():
    assert tp.from_paper_layers((7, 9, 12), (7, 12)) == ((7, 9, 12), (6, 11))
    m = tp.TransPrune()
    assert m.layers == (7, 9, 12) and m.keep == (0.875, 0.625, 0.125) and m.accumulate == (6, 11)
    assert m.llm_layers() == (7, 9, 12) and m.accumulation_layers() == tuple(range(6, 12))
    for fam in ("llava-1.5", "llava-next", "qwen2-vl"):
        cfg = vtc.load_config(ROOT / "configs" / fam / "transprune.yaml")
        assert cfg.stages[0] == m, fam
        free = vtc.load_config(ROOT / "configs" / fam / "transprune-attention-free.yaml").stages[0]
        assert free.iga_weight == 0 and free.layers == m.layers


def test_keep_is_a_fraction_of_the_original_count():
    model = tiny_llava(layers=5)
    inputs = llava_inputs(model, batch=1)
    stage = {"method": "transprune", "layers": [2, 3, 4], "keep": [0.875, 0.625, 0.125], "accumulate": [0, 3]}
    with vtc.compress(model, {"stages": [stage]}) as run, torch.no_grad():
        out = model(**inputs, use_cache=True)
    # 36 -> floor(31.5) = 31 -> floor(22.5) = 22 -> floor(4.5) = 4 (not 0.625 * 31 = 19)
    assert [s.tokens_out for s in run.stats.stages] == [[31], [22], [4]]
    cache = out.past_key_values if hasattr(out, "past_key_values") else out.cache
    n = inputs["input_ids"].shape[1]
    assert [cache.get_seq_length(i) for i in range(5)] == [n, n, n - 5, n - 14, n - 32]


def test_attention_free_variant_never_projects_qk(model, inputs, monkeypatch):
    def boom(*a, **k):
        raise AssertionError("project_qk called by the attention-free variant")

    with vtc.compress(model, {"stages": [dict(CFG, iga_weight=0)]}) as run:
        monkeypatch.setattr(run.adapter, "project_qk", boom)
        with torch.no_grad():
            model(**inputs)
    assert [s.tokens_out for s in run.stats.stages] == [[27, 27], [18, 18], [9, 9]]


def test_iga_only_variant_attaches_no_submodule_hooks(model, inputs):
    before = hooks(model)
    with vtc.compress(model, {"stages": [dict(CFG, ttv_weight=0)]}) as run:
        added = hooks(model) - before
        assert added and not any(name.endswith(("self_attn", "mlp")) for name, _, _ in added)
        with torch.no_grad():
            model(**inputs)
    assert [s.tokens_out for s in run.stats.stages] == [[27, 27], [18, 18], [9, 9]]


def test_no_instruction_falls_back_to_ttv_with_one_warning(model):
    g = torch.Generator().manual_seed(3)
    ids = torch.cat([torch.randint(1, 100, (1, 4), generator=g), torch.full((1, 36), IMAGE_TOKEN)], 1)
    inp = {"input_ids": ids, "attention_mask": torch.ones_like(ids),
           "pixel_values": torch.randn(1, 3, 48, 48, generator=g)}
    with vtc.compress(model, {"stages": [CFG]}) as run, torch.no_grad():
        with pytest.warns(UserWarning, match="no instruction tokens"):
            model(**inp)
        kept = [s.kept_positions.clone() for s in run.stats.stages]
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            model(**inp)  # warned once per attached run
    with vtc.compress(model, {"stages": [dict(CFG, iga_weight=0)]}) as run, torch.no_grad():
        model(**inp)
        assert all(torch.equal(a, s.kept_positions) for a, s in zip(kept, run.stats.stages))


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_decode_consistency_after_three_pruning_points(attn):
    """Cached greedy decoding after pruning at three layers == uncached recomputation over the kept tokens; decode
    steps do not touch the TTV accumulator."""
    model = tiny_llava(attn, layers=8)
    inputs = llava_inputs(model, batch=2)
    gen = {"max_new_tokens": 4, "do_sample": False, "pad_token_id": 0}
    config = vtc.load_config({"stages": [CFG]})
    with vtc.compress(model, config) as run:
        state = run.states[0]
        model.generate(**inputs, **dict(gen, max_new_tokens=1))
        acc_prefill = state.acc.clone()
        out = model.generate(**inputs, **gen, output_logits=True, return_dict_in_generate=True)
        assert torch.equal(state.acc, acc_prefill)
        assert [len(s.tokens_out) for s in run.stats.stages] == [2, 2, 2]
        stats = run.stats
    assert_cached_equals_uncached(model, config, inputs, out, stats=stats, key=f"transprune-direct-{attn}")


def test_batch_rows_equal_single(model, inputs):
    with vtc.compress(model, {"stages": [CFG]}) as run, torch.no_grad():
        batched = model(**inputs).logits[:, -1]
        kept_b = [(s.kept_positions.clone(), s.kept_valid.clone()) for s in run.stats.stages]
        for b in range(2):
            keep = inputs["attention_mask"][b].bool()
            row = {"input_ids": inputs["input_ids"][b:b + 1, keep],
                   "attention_mask": inputs["attention_mask"][b:b + 1, keep],
                   "pixel_values": inputs["pixel_values"][b:b + 1]}
            single = model(**row).logits[0, -1]
            torch.testing.assert_close(single, batched[b], atol=1e-4, rtol=1e-4)
            offset = int((~keep).sum())
            for (pos, val), s in zip(kept_b, run.stats.stages):
                real = val[b] & keep[pos[b]]  # kept_valid marks vtc's padding only, not the user's
                assert (pos[b][real] - offset).tolist() == s.kept_positions[0][s.kept_valid[0]].tolist()


def test_hooks_and_state_removed(model, inputs):
    before = hooks(model)
    with vtc.compress(model, {"stages": [CFG]}) as run:
        states = run.states
        assert isinstance(states[0], tp.TransPruneState)
        added = {name for name, _, _ in hooks(model) - before}
        assert {f"model.language_model.layers.{i}.{m}" for i in range(1, 7) for m in ("self_attn", "mlp")} <= added
        assert not any(f"layers.{i}." in name for i in (0, 7) for name in added)
    assert not states and not run.states
    assert hooks(model) == before


# ---- 3. bad input --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("patch,field,needle", [
    ({"layers": [7, 7, 12]}, "layers", "strictly increasing"),
    ({"layers": [9, 7, 12]}, "layers", "strictly increasing"),
    ({"layers": []}, "layers", "at least one"),
    ({"layers": [0, 9, 12]}, "layers", ">= 1"),
    ({"keep": [0.5, 0.625, 0.125]}, "keep", "must not increase"),
    ({"keep": [1.5, 0.625, 0.125]}, "keep", "(0, 1]"),
    ({"keep": [0.875, 0.625, 0.0]}, "keep", "(0, 1]"),
    ({"keep": [0.875, 0.625]}, "keep", "one fraction per pruning layer"),
    ({"accumulate": [7, 12]}, "accumulate", "start before the first pruning layer 7"),
    ({"accumulate": [6, 3]}, "accumulate", "first <= last"),
    ({"iga_weight": -1}, "iga_weight", ">= 0"),
    ({"ttv_weight": 0, "iga_weight": 0}, "iga_weight", "cannot both be 0"),
    ({"layer": 3}, "layer", "unknown parameter"),
])
def test_bad_config(patch, field, needle):
    with pytest.raises(vtc.ConfigError) as err:
        vtc.load_config({"stages": [{"method": "transprune", **patch}]})
    msg = str(err.value)
    assert "transprune" in msg and field in msg and needle in msg, msg


def test_schedule_out_of_range_for_model(model):
    before = hooks(model)
    with pytest.raises(vtc.ConfigError, match=r"layers=\[7, 9, 12\] has layer\(s\) \[9, 12\] out of range"):
        vtc.compress(model, {"stages": [{"method": "transprune"}]})
    with pytest.raises(vtc.ConfigError, match=r"accumulate=\[1, 9\] is out of range"):
        vtc.compress(model, {"stages": [dict(CFG, accumulate=[1, 9])]})
    assert hooks(model) == before


# ---- 4. analytic cost ------------------------------------------------------------------------------------------------
def _flops_module():
    """The analytic FLOPs module: ``vtc.flops`` (library copy) when present, else ``eval/flops.py``."""
    try:
        return importlib.import_module("vtc.flops")
    except ImportError:
        spec = importlib.util.spec_from_file_location("vtc_eval_flops", ROOT / "eval" / "flops.py")
        mod = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = mod  # dataclasses resolve annotations through sys.modules
        spec.loader.exec_module(mod)
        return mod


def test_flops_model_by_hand():
    fl = _flops_module()
    shape = fl.LMShape(layers=2, hidden=8, intermediate=16, heads=2, kv_heads=1)
    n = 5
    # q, o: 2*n*8*8 each; k, v: 2*n*8*4 each; scores + AV: 2 * (2*4) * n(n+1)/2 each... (causal pairs)
    proj = 2 * n * 8 * 8 * 2 + 2 * n * 8 * 4 * 2
    attn = 2 * 2 * 8 * (n * (n + 1) // 2)
    mlp = 3 * 2 * n * 8 * 16
    assert fl.layer_flops(shape, n)["total"] == proj + attn + mlp
    assert fl.prefill_flops(shape, [n, 3]) == fl.layer_flops(shape, n)["total"] + fl.layer_flops(shape, 3)["total"]


def test_default_schedule_removes_over_half_of_visual_compute():
    fl = _flops_module()
    shape = fl.LLAVA_15_7B
    stage = tp.TransPrune()
    lens = fl.schedule_seq_lens(shape.layers, text=64, visual=576,
                                schedule=[(layer, math.floor(k * 576)) for layer, k in zip(stage.layers, stage.keep)])
    assert lens[:7] == [640] * 7 and lens[7:9] == [568] * 2 and lens[9:12] == [424] * 3 and lens[12:] == [136] * 20
    vis_full = fl.visual_flops(shape, [640] * 32, text=64)
    vis_pruned = fl.visual_flops(shape, lens, text=64)
    assert 1 - vis_pruned / vis_full >= 0.5
    # token-layer count as in the paper: 59% of visual-token layer compute removed
    assert abs(1 - (7 * 576 + 2 * 504 + 3 * 360 + 20 * 72) / (32 * 576) - 0.590) < 1e-3
