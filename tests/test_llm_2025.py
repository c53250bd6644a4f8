"""DART, PyramidDrop and SparseVLM (vtc/methods/{dart,pdrop,sparsevlm}.py): parity with restatements of the
official selections (written here from the algorithm descriptions, with Python loops and the model's own eager
attention / hidden states), the documented budget mappings, bad input, composition. The invariant matrix
(tests/cases/llm_2025.py) runs them on every family."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from tiny_models import IMAGE_TOKEN, llava_inputs, tiny_llava

import vtc
from vtc.methods.dart import dart_select
from vtc.methods.sparsevlm import SCHEDULES


@pytest.fixture(scope="module")
def eager():
    return tiny_llava("eager", layers=4)


def _visual_kept(stage_stats, b=0):
    pos, ok = stage_stats.kept_positions[b], stage_stats.kept_valid[b]
    return pos[ok].tolist()


def _layout(inputs, b=0):
    ids = inputs["input_ids"][b]
    vis = (ids == IMAGE_TOKEN).nonzero().flatten().tolist()
    return vis, list(range(vis[-1] + 1, ids.shape[0]))


# ---- DART ------------------------------------------------------------------------------------------------------
def official_dart(a, x, vis, text, claims, p_img=4, p_txt=4):
    """DART's selection restated (one image): pivots by key norm, visited in ascending position order (vtc's fix of
    the official set-iteration order), each claiming its ``claims[t]`` least cosine-similar remaining tokens."""
    img_piv = sorted(vis, key=lambda i: (-float(a[i]), i))[:p_img]
    txt_piv = sorted(text, key=lambda i: (-float(a[i]), i))[:p_txt]
    remaining = [i for i in vis if i not in img_piv]
    kept = list(img_piv)
    for t, p in enumerate(sorted(img_piv) + sorted(txt_piv)):
        cos = {j: float(F.cosine_similarity(x[p], x[j], dim=0, eps=1e-8)) for j in remaining}
        pick = sorted(remaining, key=lambda j: (cos[j], j))[:claims[t]]
        kept += pick
        remaining = [j for j in remaining if j not in pick]
    return sorted(kept)


def _claims(k, p_img, n_piv):
    m, r = divmod(k - p_img, n_piv)
    return [m + (t < r) for t in range(n_piv)]


@pytest.mark.parametrize("k", [4 + 8 * 2, 4 + 8 * 3, 23])
def test_dart_select_matches_restatement_on_crafted_inputs(k):
    g = torch.Generator().manual_seed(k)
    M, D = 40, 8
    vis = list(range(3, 33))  # one image of 30 tokens, text after it
    text = list(range(33, 40))
    a = torch.rand(1, M, generator=g)
    x = torch.randn(1, M, D, generator=g)
    x[0, 10] = x[0, 11]  # exact duplicates: DART keeps both when both are far from a pivot (no de-duplication)
    cand = torch.tensor([vis])
    valid = torch.ones_like(cand, dtype=torch.bool)
    text_mask = torch.zeros(1, M, dtype=torch.bool)
    text_mask[0, text] = True
    kept = dart_select(a, x, cand, valid, torch.zeros_like(cand), text_mask, torch.tensor([[k]]), 4, 4)
    got = cand[kept].tolist()
    assert len(got) == k
    assert got == official_dart(a[0], x[0], vis, text, _claims(k, 4, 8))


def test_dart_select_batched_images_equal_per_image():
    """Two rows, two images each: every image keeps exactly k, pivots of its own plus the row's text pivots."""
    g = torch.Generator().manual_seed(0)
    M, D = 50, 6
    a = torch.rand(2, M, generator=g)
    x = torch.randn(2, M, D, generator=g)
    images = [[list(range(2, 20)), list(range(22, 40))], [list(range(5, 15)), list(range(16, 44))]]
    n = max(len(i0) + len(i1) for i0, i1 in images)
    cand = torch.zeros(2, n, dtype=torch.long)
    img = torch.full((2, n), -1)
    valid = torch.zeros(2, n, dtype=torch.bool)
    text_mask = torch.zeros(2, M, dtype=torch.bool)
    for b, (i0, i1) in enumerate(images):
        slots = i0 + i1
        cand[b, :len(slots)] = torch.tensor(slots)
        img[b, :len(slots)] = torch.tensor([0] * len(i0) + [1] * len(i1))
        valid[b, :len(slots)] = True
        text_mask[b, i1[-1] + 1:] = True
    k = torch.tensor([[9, 12], [7, 12]])
    kept = dart_select(a, x, cand, valid, img, text_mask, k, 3, 2)
    for b, (i0, i1) in enumerate(images):
        text = text_mask[b].nonzero().flatten().tolist()
        got = cand[b][kept[b]].tolist()
        want = sorted(official_dart(a[b], x[b], i0, text, _claims(int(k[b, 0]), 3, 5), 3, 2)
                      + official_dart(a[b], x[b], i1, text, _claims(int(k[b, 1]), 3, 5), 3, 2))
        assert got == want


def _dart_reference(model, inputs, layer, k):
    """The official selection on the model itself: layer L-1's post-RoPE keys, the final-normed input of L."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    lm = model.model.language_model
    with torch.no_grad():
        hs = model(**inputs, output_hidden_states=True).hidden_states
        h = hs[layer - 1]
        prev = lm.layers[layer - 1]
        N = h.shape[1]
        cos, sin = lm.rotary_emb(h, torch.arange(N)[None])
        keys = prev.self_attn.k_proj(prev.input_layernorm(h)).view(1, N, -1, prev.self_attn.head_dim).transpose(1, 2)
        _, keys = apply_rotary_pos_emb(keys, keys, cos, sin)
        a = keys.abs().sum((1, 3))[0]
        x = lm.norm(hs[layer])[0]
    vis, text = _layout(inputs)
    return official_dart(a, x, vis, text, _claims(k, 4, 8))


@pytest.mark.parametrize("m", [1, 2])
def test_dart_on_model_matches_official_selection(eager, m):
    """budget 4 + 8m is exactly the official selection for max_num_trunction = 8m (paper's 128 -> budget 132)."""
    inputs = llava_inputs(eager, batch=1, seed=5)
    k = 4 + 8 * m
    with torch.no_grad(), vtc.compress(eager, {"stages": [{"method": "dart", "layer": 2, "budget": k}]}) as run:
        eager(**inputs)
    vis, _ = _layout(inputs)
    got = [p for p in _visual_kept(run.stats.stages[0]) if p in vis]
    assert got == _dart_reference(eager, inputs, 2, k)


# ---- PyramidDrop -----------------------------------------------------------------------------------------------
def _last_row_topk(attn, positions, vis, k):
    """Top-k visual positions by the head-mean attention of the last row (ties: lower position)."""
    row = attn[0, :, -1, :].mean(0)
    order = sorted(range(len(positions)), key=lambda i: (-float(row[i]), positions[i]))
    chosen = [positions[i] for i in order if positions[i] in vis][:k]
    return sorted(chosen)


def test_pdrop_matches_eager_attention_at_every_cut(eager):
    """Each cut keeps the top floor(keep_j * n0) visual tokens by the last prompt token's attention *in the cut
    layer itself* (its own eager attention weights over the survivors of the earlier cuts)."""
    inputs = llava_inputs(eager, batch=1, seed=2)
    vis, _ = _layout(inputs)
    N = inputs["input_ids"].shape[1]
    layers, keep = [1, 3], [0.5, 0.25]
    with torch.no_grad():
        ref1 = eager(**inputs, output_attentions=True).attentions[1]
        expect1 = _last_row_topk(ref1, list(range(N)), vis, 18)
        with vtc.compress(eager, {"stages": [{"method": "pdrop", "layers": [1], "keep": [0.5]}]}) as run:
            ref2 = eager(**inputs, output_attentions=True).attentions[3]
            survivors = _visual_kept(run.stats.stages[0])
        expect2 = _last_row_topk(ref2, survivors, vis, 9)
        with vtc.compress(eager, {"stages": [{"method": "pdrop", "layers": layers, "keep": keep}]}) as run:
            eager(**inputs)
    got = [[p for p in _visual_kept(s) if p in vis] for s in run.stats.stages]
    assert got == [expect1, expect2]
    assert [s.tokens_out for s in run.stats.stages] == [[18], [9]]


def test_pdrop_defaults_are_the_official_schedule():
    stage = vtc.load_config([{"method": "pdrop"}]).stages[0]
    assert stage.layers == (8, 16, 24) and stage.keep == (0.5, 0.25, 0.125)
    from vtc.reduction import resolve_budget

    assert [resolve_budget(f, 576) for f in stage.keep] == [288, 144, 72]


# ---- SparseVLM -------------------------------------------------------------------------------------------------
def test_sparsevlm_first_cut_matches_restatement(eager):
    """Raters from the layer-0 embeddings, layer-(L-1) eager attention of the rater rows divided by the analytic
    RoPE gravity (2 / sqrt(d)) sum_i cos((m - n) theta_i), top heads, mean over heads and raters, top-k."""
    inputs = llava_inputs(eager, batch=1, seed=4)
    vis, text = _layout(inputs)
    L, heads = 2, 2
    with torch.no_grad():
        out = eager(**inputs, output_attentions=True, output_hidden_states=True)
        e = out.hidden_states[0][0].float()
        probs = torch.softmax(e[vis] @ e[text].T, dim=-1).mean(0)  # (|Q|,)
        raters = [t for t, s in zip(text, probs) if s > probs.mean()] or text
        A = out.attentions[L - 1][0].float()  # (h, N, N)
        d = eager.config.text_config.hidden_size // eager.config.text_config.num_attention_heads
        tc = eager.config.text_config
        base = getattr(tc, "rope_theta", None) or tc.rope_parameters["rope_theta"]
        theta = base ** (-torch.arange(0, d, 2).double() / d)
        rel = torch.tensor(raters)[:, None].double() - torch.tensor(vis)[None].double()
        G = (2 / math.sqrt(d)) * torch.cos(rel[..., None] * theta).sum(-1)  # (R, V)
        P = A[:, raters][:, :, vis] / G.float()  # (h, R, V)
        top = torch.sort(P.sum((1, 2)), descending=True, stable=True).indices[:heads]
        score = P[top].mean((0, 1))
        order = sorted(range(len(vis)), key=lambda i: (-float(score[i]), vis[i]))[:18]
        expect = sorted(vis[i] for i in order)
        cfg = {"stages": [{"method": "sparsevlm", "layers": [L], "keep": [0.5], "heads": heads}]}
        with vtc.compress(eager, cfg) as run:
            eager(**inputs)
    assert [p for p in _visual_kept(run.stats.stages[0]) if p in vis] == expect


def test_sparsevlm_budget_selects_official_schedule():
    for name, counts in SCHEDULES.items():
        stage = vtc.load_config([{"method": "sparsevlm", "budget": name}]).stages[0]
        from vtc.reduction import resolve_budget

        assert [resolve_budget(f, 576) for f in stage.keep] == list(counts)
        assert stage.layers == (3, 7, 16)
        assert vtc.load_config([stage.model_dump()]).stages[0] == stage  # a dumped config loads back


# ---- bad input, composition ------------------------------------------------------------------------------------
@pytest.mark.parametrize("stage,needle", [
    ({"method": "dart", "pivots_image": 0}, "pivots_image"),
    ({"method": "dart", "pivots_text": -1}, "pivots_text"),
    ({"method": "dart", "budget": 0}, "budget"),
    ({"method": "pdrop", "layers": [8, 8]}, "strictly increasing"),
    ({"method": "pdrop", "keep": [0.5, 0.25]}, "one fraction per pruning layer"),
    ({"method": "sparsevlm", "budget": 100}, "budget"),
    ({"method": "sparsevlm", "budget": 64, "keep": [0.5, 0.2, 0.1]}, "not both"),
    ({"method": "sparsevlm", "heads": 0}, "heads"),
    ({"method": "sparsevlm", "version": 3}, "version"),
])
def test_bad_config(stage, needle):
    with pytest.raises(vtc.ConfigError) as err:
        vtc.load_config([stage])
    assert stage["method"] in str(err.value) and needle in str(err.value), str(err.value)


def test_layers_out_of_range_for_model(eager):
    with pytest.raises(vtc.ConfigError, match=r"pdrop: layers=\[8, 16, 24\] has layer\(s\) \[8, 16, 24\]"):
        vtc.compress(eager, [{"method": "pdrop"}])


def test_vision_stage_then_pdrop_then_dart(eager):
    """Composition: VisionZip before the LLM, then PyramidDrop's cuts on its survivors, then DART."""
    inputs = llava_inputs(eager, batch=2, seed=1)
    cfg = [{"method": "visionzip", "budget": 16}, {"method": "pdrop", "layers": [1], "keep": [0.5]},
           {"method": "dart", "layer": 3, "budget": 5, "pivots_image": 1, "pivots_text": 2}]
    with torch.no_grad(), vtc.compress(eager, cfg) as run:
        eager(**inputs)
    assert [s.tokens_out for s in run.stats.stages] == [[16, 16], [8, 8], [5, 5]]


@pytest.mark.parametrize("vision,llm,counts", [
    ({"method": "divprune", "budget": 16}, {"method": "pdrop", "layers": [1, 2], "keep": [0.5, 0.25]}, [16, 4]),
    ({"method": "fastervlm", "budget": 20}, {"method": "dart", "layer": 2, "budget": 6, "pivots_image": 2}, [20, 6]),
    ({"method": "vispruner", "budget": 12}, {"method": "sparsevlm", "layers": [1, 3], "keep": [0.5, 0.25]}, [12, 3]),
])
def test_2025_vision_stage_then_2025_llm_stage(eager, vision, llm, counts):
    """Composition of the 2025 methods across sides (e.g. DivPrune then PyramidDrop): the LLM-side stage cuts the
    vision stage's survivors at every cut, and ``generate`` gives the same tokens with ``use_cache=False`` (the
    per-stage decode-vs-oracle invariants are in the matrix)."""
    inputs = llava_inputs(eager, batch=2, seed=3)
    with torch.no_grad(), vtc.compress(eager, [vision, llm]) as run:
        cached = eager.generate(**inputs, max_new_tokens=4, do_sample=False)
        stages = run.stats.stages
        assert (stages[0].tokens_out, stages[-1].tokens_out) == ([counts[0]] * 2, [counts[1]] * 2)
        uncached = eager.generate(**inputs, max_new_tokens=4, do_sample=False, use_cache=False)
    assert torch.equal(cached, uncached)
