"""SparseVLM v1 and v1.5 (vtc/methods/sparsevlm.py): parity with restatements of the official selection and recycling
(written here from the algorithm description, one image at a time with Python loops, on the model's own eager
attention and hidden states), the count arithmetic of the official schedules, config errors, composition. v2 is in
tests/test_llm_2025.py; the invariant matrix (tests/cases/llm_2025.py) runs every version on every family."""

from __future__ import annotations

import pytest
import torch
from tiny_models import IMAGE_TOKEN, llava_inputs, tiny_llava

import vtc
from vtc.methods.base import LLMContext
from vtc.methods.sparsevlm import SCHEDULES_V15, V1_SETTINGS, dpc_knn, rank_counts, recycle
from vtc.reduction import resolve_budget


@pytest.fixture(scope="module")
def eager():
    return tiny_llava("eager", layers=4)


# ---- restatements of the official code ---------------------------------------------------------------------------
def official_cluster_and_merge(x: torch.Tensor, c: int) -> dict[int, torch.Tensor]:
    """DPC-kNN of one point set x (m, C) into c clusters: {centre index: merged state}. Density ties (the official
    random noise) are broken by the lower index, as vtc does."""
    m, C = x.shape
    d = [[float((x[i] - x[j]).norm()) / C**0.5 for j in range(m)] for i in range(m)]
    dens = [torch.exp(-torch.tensor(sorted(v * v for v in d[i])[:c]).mean()).item() for i in range(m)]
    d_max = max(max(row) for row in d)

    def denser(j, i):
        return dens[j] > dens[i] or (dens[j] == dens[i] and j < i)

    delta = [min([d[i][j] for j in range(m) if denser(j, i)], default=d_max) for i in range(m)]
    score = [delta[i] * dens[i] for i in range(m)]
    centres = sorted(range(m), key=lambda i: (-score[i], i))[:c]
    groups: dict[int, list[int]] = {ct: [] for ct in centres}
    for i in range(m):
        ct = i if i in groups else min(centres, key=lambda k: (d[i][k], k))
        groups[ct].append(i)
    return {ct: x[idx].sum(0) / (len(idx) + 1e-6) for ct, idx in groups.items()}


def _layout(inputs, b=0):
    ids = inputs["input_ids"][b]
    vis = (ids == IMAGE_TOKEN).nonzero().flatten().tolist()
    return vis, list(range(vis[-1] + 1, ids.shape[0]))


def official_cut(model, inputs, L, k_of, scale=None):
    """The first cut (entering L) of v1 / v1.5 restated on one sample: the raters, layer L-1's eager attention of
    their rows (mean over heads, then raters), the count ``k_of(rank, v)``, top-k, then recycling on the states
    entering L. Returns (kept positions, {centre position: merged state})."""
    vis, text = _layout(inputs)
    with torch.no_grad():
        out = model(**inputs, output_attentions=True, output_hidden_states=True)
    e = out.hidden_states[0][0].float()
    s = torch.softmax(e[vis] @ e[text].T, dim=-1).mean(0)
    raters = [t for t, v in zip(text, s) if v > s.mean()] or text
    P = out.attentions[L - 1][0].float().mean(0)[raters][:, vis]  # (R, v)
    score = P.mean(0)
    k = k_of(int(torch.linalg.matrix_rank(P)), len(vis))
    order = sorted(range(len(vis)), key=lambda i: (-float(score[i]), vis[i]))
    kept = sorted(vis[i] for i in order[:k])
    pruned = [i for i in range(len(vis)) if vis[i] not in kept]
    if not pruned:
        return kept, {}
    m = int(len(pruned) * 0.3) + 1
    chosen = sorted(sorted(pruned, key=lambda i: (-float(score[i]), vis[i]))[:m])  # raster order (vtc's index order)
    h = out.hidden_states[L][0]
    merged = official_cluster_and_merge(h[[vis[i] for i in chosen]].float(), int(m / 10) + 1)
    return kept, {vis[chosen[ct]]: feat for ct, feat in merged.items()}


def _vtc_cut(model, inputs, stage):
    with torch.no_grad(), vtc.compress(model, [stage]) as run:
        model(**inputs)
    st = run.stats.stages[0]
    pos = st.kept_positions[0][st.kept_valid[0]].tolist()
    vis, _ = _layout(inputs)
    return [p for p in pos if p in vis], st.reduction


# ---- DPC-kNN ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("sizes", [[12, 5, 1], [30, 21], [7]])
def test_dpc_knn_matches_restatement_batched(sizes):
    """Padded sets of different sizes in one call == the restatement on each set alone."""
    g = torch.Generator().manual_seed(sum(sizes))
    C = 6
    m = max(sizes)
    x = torch.randn(len(sizes), m, C, generator=g)
    valid = torch.arange(m)[None] < torch.tensor(sizes)[:, None]
    clusters = torch.tensor([int(s / 10) + 1 for s in sizes])
    centre, assign = dpc_knn(x, valid, clusters)
    for u, s in enumerate(sizes):
        want = official_cluster_and_merge(x[u, :s], int(clusters[u]))
        got = centre[u, :s].nonzero().flatten().tolist()
        assert got == sorted(want)
        assert (assign[u, s:] == -1).all()
        for ct, feat in want.items():
            idx = (assign[u, :s] == ct).nonzero().flatten()
            torch.testing.assert_close(x[u, idx].sum(0) / (len(idx) + 1e-6), feat)


def test_dpc_knn_ties_are_deterministic():
    """Duplicated points (equal densities): the official random noise is replaced by the lower index."""
    base = torch.randn(4, 3, generator=torch.Generator().manual_seed(0))
    x = torch.cat([base, base, base])[None]  # 12 points, 3 copies of each
    valid = torch.ones(1, 12, dtype=torch.bool)
    c = torch.tensor([2])
    first = dpc_knn(x, valid, c)
    for _ in range(3):
        again = dpc_knn(x, valid, c)
        assert torch.equal(first[0], again[0]) and torch.equal(first[1], again[1])
    assert first[0][0].nonzero().flatten().tolist() == sorted(official_cluster_and_merge(x[0], 2))


def test_rank_counts_match_matrix_rank():
    """Batched SVD with zero padding == torch.linalg.matrix_rank of every unpadded matrix (default tolerance),
    rank-deficient ones included; k = v when rho = v, else min(int(rho * scale + bias), v - 1)."""
    g = torch.Generator().manual_seed(3)
    shapes = [(4, 30), (3, 9), (5, 5), (2, 17), (6, 3)]
    R, n = max(s[0] for s in shapes), max(s[1] for s in shapes)
    P = torch.zeros(len(shapes), R, n)
    for u, (r, v) in enumerate(shapes):
        block = torch.rand(r, v, generator=g)
        if u == 0:
            block[2] = block[0] * 0.5 + block[1]  # rank 3 of 4 rows
        P[u, :r, :v] = block
    rows = torch.tensor([s[0] for s in shapes])
    cols = torch.tensor([s[1] for s in shapes])
    for scale, bias in [(13.5, 0.0), (0.8, 0.0), (1.5, 1.0)]:
        got = rank_counts(P, rows, cols, scale, bias).tolist()
        want = []
        for u, (r, v) in enumerate(shapes):
            rho = int(torch.linalg.matrix_rank(P[u, :r, :v]))
            want.append(v if rho == v else min(int(rho * scale + bias), v - 1))
        assert got == want
    assert int(torch.linalg.matrix_rank(P[0, :4, :30])) == 3


# ---- the count arithmetic of the official schedules ------------------------------------------------------------
def _fake_ctx(n: int, D: int = 8, seed: int = 0) -> LLMContext:
    g = torch.Generator().manual_seed(seed)
    M = n + 3
    ar = torch.arange(M)[None]
    vis = (ar >= 1) & (ar < n + 1)
    return LLMContext(
        layer_idx=3, hidden_states=torch.randn(1, M, D, generator=g), candidates=torch.arange(1, n + 1)[None],
        candidate_valid=torch.ones(1, n, dtype=torch.bool), image_id=torch.zeros(1, n, dtype=torch.long),
        slot_positions=ar, slot_valid=torch.ones(1, M, dtype=torch.bool), token_valid=torch.ones(1, M, dtype=torch.bool),
        is_visual=vis, sizes=torch.ones(1, M), position_embeddings=None, attention_mask=None, adapter=None,
        image_counts=torch.tensor([[n]]))


@pytest.mark.parametrize("budget", sorted(SCHEDULES_V15))
def test_v15_schedule_with_recycling_gives_the_official_visual_counts(budget):
    """576 tokens through the three cuts: top-k of the schedule, then c = int((int(0.3 p) + 1) / 10) + 1 recycled
    tokens on top (the official code's visual counts, e.g. 309 / 204 / 113 for 192)."""
    stage = vtc.load_config([{"method": "sparsevlm", "version": 1.5, "budget": budget}]).stages[0]
    v = 576
    for j, f in enumerate(stage.keep):
        k = resolve_budget(f, 576)
        assert k == SCHEDULES_V15[budget][j]
        ctx = _fake_ctx(v, seed=j)
        scores = torch.rand(1, v, generator=torch.Generator().manual_seed(j))
        kept = torch.zeros(1, v, dtype=torch.bool)
        kept[0, torch.sort(scores[0], descending=True).indices[:k]] = True
        red = recycle(ctx, scores, kept)
        m = int((v - k) * 0.3) + 1
        assert int(red.num_out) == k + int(m / 10) + 1
        assert int((red.source >= 0).sum()) == k + m  # kept + recycled members; the rest dropped
        v = int(red.num_out)


# ---- on the model ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("seed", [4, 7])
def test_v15_first_cut_matches_restatement(eager, seed):
    inputs = llava_inputs(eager, batch=1, seed=seed)
    L = 2
    vis, _ = _layout(inputs)
    k = resolve_budget(0.5, len(vis))
    kept, merged = official_cut(eager, inputs, L, lambda rho, v: k)
    got, red = _vtc_cut(eager, inputs, {"method": "sparsevlm", "version": 1.5, "layers": [L], "keep": [0.5]})
    centres = sorted(merged)
    assert got == sorted(kept + centres)  # merged tokens sit at their centre's position
    anchors = [vis[i] for i in red.anchor[0][red.valid[0]].tolist()]
    for c in centres:
        torch.testing.assert_close(red.features[0, anchors.index(c)].float(), merged[c], atol=1e-5, rtol=1e-5)
    with torch.no_grad():
        h = eager(**inputs, output_hidden_states=True).hidden_states[L][0]
    for p in kept:  # kept tokens keep their own state
        assert torch.equal(red.features[0, anchors.index(p)], h[p])


def test_v15_second_cut_scores_the_merged_tokens_too(eager):
    """The second cut ranks the survivors of the first (kept and merged tokens) by the attention of the rater rows in
    its own layer over the already-cut sequence (the model's eager attention under the first cut alone), keeps the
    top floor(0.25 * n0) and recycles the rest on top."""
    inputs = llava_inputs(eager, batch=1, seed=6)
    vis, text = _layout(inputs)
    with torch.no_grad():
        e = eager(**inputs, output_hidden_states=True).hidden_states[0][0].float()
    s = torch.softmax(e[vis] @ e[text].T, dim=-1).mean(0)
    raters = [t for t, v in zip(text, s) if v > s.mean()] or text
    first = {"method": "sparsevlm", "version": 1.5, "layers": [1], "keep": [0.5]}
    with torch.no_grad(), vtc.compress(eager, [first]) as run:
        A = eager(**inputs, output_attentions=True).attentions[2][0].float().mean(0)  # layer 2 over the survivors
        survivors = run.stats.stages[0].kept_positions[0].tolist()
    cols = [i for i, p in enumerate(survivors) if p in vis]
    score = A[[survivors.index(r) for r in raters]][:, cols].mean(0)
    k = resolve_budget(0.25, len(vis))
    order = sorted(range(len(cols)), key=lambda i: (-float(score[i]), survivors[cols[i]]))
    kept = sorted(survivors[cols[i]] for i in order[:k])
    both = dict(first, layers=[1, 3], keep=[0.5, 0.25])
    with torch.no_grad(), vtc.compress(eager, [both]) as run:
        eager(**inputs)
    st = run.stats.stages[-1]
    got = [p for p in st.kept_positions[0][st.kept_valid[0]].tolist() if p in vis]
    m = int((len(cols) - k) * 0.3) + 1
    assert set(kept) <= set(got) and len(got) == k + int(m / 10) + 1
    assert set(got) - set(kept) <= {survivors[cols[i]] for i in order[k:]}  # centres are recycled (pruned) tokens


@pytest.mark.parametrize("scale,bias", [(1.5, 0.0), (V1_SETTINGS["POPE (128)"][0] / 4, 1.0)])
def test_v1_first_cut_matches_restatement(eager, scale, bias):
    """The rank-adaptive count (matrix_rank of the rater x visual attention) and the same recycling."""
    inputs = llava_inputs(eager, batch=1, seed=5)
    L = 1
    kept, merged = official_cut(eager, inputs, L, lambda rho, v: v if rho == v else min(int(rho * scale + bias), v - 1))
    got, _ = _vtc_cut(eager, inputs, {"method": "sparsevlm", "version": 1, "layers": [L], "scale": scale,
                                         "bias": bias})
    assert got == sorted(kept + sorted(merged))
    assert len(kept) < len(_layout(inputs)[0]) - 1


def test_v1_defaults_and_paper_settings():
    stage = vtc.load_config([{"method": "sparsevlm", "version": 1}]).stages[0]
    assert (stage.layers, stage.scale, stage.bias, stage.keep) == ((3, 7, 16, 20), 13.5, 0.0, None)
    assert V1_SETTINGS["MME (192)"] == (stage.scale, stage.bias)
    v15 = vtc.load_config([{"method": "sparsevlm", "version": 1.5}]).stages[0]
    assert [resolve_budget(f, 576) for f in v15.keep] == list(SCHEDULES_V15[192]) and v15.layers == (3, 7, 16)
    for st in (stage, v15, vtc.load_config([{"method": "sparsevlm", "version": 1.5, "budget": 64}]).stages[0]):
        assert vtc.load_config([st.model_dump()]).stages[0] == st  # a dumped config loads back


@pytest.mark.parametrize("stage,needle", [
    ({"method": "sparsevlm", "version": 3}, "1, 1.5, 2"),
    ({"method": "sparsevlm", "version": "1.5"}, "1, 1.5, 2"),
    ({"method": "sparsevlm", "version": True}, "version"),
    ({"method": "sparsevlm", "version": 1.5, "heads": 4}, "heads is a version 2 parameter"),
    ({"method": "sparsevlm", "version": 1, "heads": 4}, "heads is a version 2 parameter"),
    ({"method": "sparsevlm", "scale": 2.0}, "scale is a version 1 parameter"),
    ({"method": "sparsevlm", "version": 1.5, "bias": 1.0}, "bias is a version 1 parameter"),
    ({"method": "sparsevlm", "version": 1, "budget": 64}, "budget is a version 1.5 or 2 parameter"),
    ({"method": "sparsevlm", "version": 1, "keep": [0.5, 0.25, 0.1, 0.1]}, "keep is a version 1.5 or 2"),
    ({"method": "sparsevlm", "version": 1, "scale": 0}, "scale must be a finite number > 0"),
    ({"method": "sparsevlm", "version": 1, "scale": float("nan")}, "scale"),
    ({"method": "sparsevlm", "version": 1, "bias": -1}, "bias must be a finite number >= 0"),
    ({"method": "sparsevlm", "version": 1.5, "budget": 100}, "budget"),
    ({"method": "sparsevlm", "version": 1.5, "budget": 64, "keep": [0.5, 0.2, 0.1]}, "not both"),
])
def test_bad_config(stage, needle):
    with pytest.raises(vtc.ConfigError) as err:
        vtc.load_config([stage])
    assert "sparsevlm" in str(err.value) and needle in str(err.value), str(err.value)


@pytest.mark.parametrize("vision,llm", [
    ({"method": "visionzip", "budget": 20}, {"method": "sparsevlm", "version": 1.5, "layers": [1, 3],
                                             "keep": [0.5, 0.25]}),
    ({"method": "divprune", "budget": 24}, {"method": "sparsevlm", "version": 1, "layers": [1, 2], "scale": 2.0}),
])
def test_vision_stage_then_v1_or_v15(eager, vision, llm):
    """Composition: the LLM-side cuts work on the vision stage's survivors (recycling included), and ``generate``
    gives the same tokens with ``use_cache=False``."""
    inputs = llava_inputs(eager, batch=2, seed=3)
    with torch.no_grad(), vtc.compress(eager, [vision, llm]) as run:
        cached = eager.generate(**inputs, max_new_tokens=4, do_sample=False)
        stages = run.stats.stages
        assert stages[0].tokens_out == [vision["budget"]] * 2
        assert all(o <= i for s in stages[1:] for i, o in zip(s.tokens_in, s.tokens_out))
        assert stages[1].tokens_in == [vision["budget"]] * 2
        uncached = eager.generate(**inputs, max_new_tokens=4, do_sample=False, use_cache=False)
    assert torch.equal(cached, uncached)


def test_cut_keeping_everything_after_an_earlier_cut(eager):
    """Regression: a later cut that keeps every survivor (pdrop keep [0.5, 0.5]) left the runtime treating the
    already-cut slot set as the full sequence (shape mismatch in the next layer)."""
    inputs = llava_inputs(eager, batch=1, seed=0)
    with torch.no_grad(), vtc.compress(eager, [{"method": "pdrop", "layers": [1, 2], "keep": [0.5, 0.5]}]) as run:
        cached = eager.generate(**inputs, max_new_tokens=3, do_sample=False)
        uncached = eager.generate(**inputs, max_new_tokens=3, do_sample=False, use_cache=False)
        assert [s.tokens_out for s in run.stats.stages] == [[18], [18]]
    assert torch.equal(cached, uncached)
