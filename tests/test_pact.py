"""PACT (vtc/methods/pact.py): EUTI, DBDPC (vs a plain sequential reference), retrieval, merge, proportional
attention at the attention level, decode consistency, batching, modes, stats and bad input."""

from __future__ import annotations

import math
import random
from typing import ClassVar, Literal

import pytest
import torch
from tiny_models import IMAGE_TOKEN, llava_inputs, tiny_llava

import vtc
from vtc.methods import LLMContext, Method, get_method_class
from vtc.methods.pact import (
    PACT,
    compact,
    cosine_distances,
    dbdpc,
    dbdpc_density_rank,
    merge_clusters,
    nearest_centre,
)
from vtc.reduction import Reduction

INF = float("inf")


# =============================================================================================================
# plain sequential references (loops on purpose: they are the specification)
# =============================================================================================================
def f32(x: float) -> float:
    """The fp32 value torch compares an fp32 tensor against when given the Python float ``x``."""
    return torch.tensor(x, dtype=torch.float32).item()


def ref_density_order(D: list[list[float]], idx: list[int]) -> list[int]:
    rho = {i: sum(math.exp(-((D[i][j] / 2) ** 2)) for j in idx) for i in idx}
    return sorted(idx, key=lambda i: (-rho[i], i))


def ref_dbdpc(D: list[list[float]], idx: list[int], cutoff: float, order: list[int] | None = None):
    """Sequential DBDPC: visit in decreasing density; centre iff farther than cutoff from every centre so far;
    every point joins its nearest centre (ties: lower index). D: full matrix (inf across images), diag 0."""
    c = f32(cutoff)
    order = ref_density_order(D, idx) if order is None else order
    centres: list[int] = []
    for i in order:
        if all(D[i][k] > c for k in centres):
            centres.append(i)
    assign = {i: min(sorted(centres), key=lambda k: (D[i][k], k)) for i in idx}
    return sorted(centres), assign


def ref_retrieve(Dpc: list[list[float]], centres: list[int], limit: float) -> int:
    """Nearest centre (ties: lower index) if within ``limit``, else -1."""
    best = min(sorted(centres), key=lambda k: (Dpc[k], k))
    return best if Dpc[best] <= f32(limit) else -1


# =============================================================================================================
# DBDPC: vectorised rounds == sequential greedy
# =============================================================================================================
def _random_point_sets(rng: random.Random, B: int):
    """B point sets of different sizes with duplicates, near-duplicates, two images, padded to one tensor."""
    dim = rng.choice([2, 3, 4, 8])
    sizes = [rng.randint(1, 30) for _ in range(B)]
    m = max(sizes)
    x = torch.zeros(B, m, dim)
    valid = torch.zeros(B, m, dtype=torch.bool)
    group = torch.full((B, m), -1, dtype=torch.long)
    gen = torch.Generator().manual_seed(rng.randrange(1 << 30))
    for b, s in enumerate(sizes):
        pts = torch.randn(s, dim, generator=gen)
        if rng.random() < 0.5:  # quantised coordinates: many exactly equal distances
            pts = pts.round()
        for _ in range(rng.randint(0, s // 2)):  # exact duplicates
            pts[rng.randrange(s)] = pts[rng.randrange(s)]
        x[b, :s] = pts
        valid[b, :s] = True
        split = rng.randint(0, s) if rng.random() < 0.5 else s  # two images in one row
        group[b, :s] = (torch.arange(s) >= split).long()
    return x, valid, group


def _masked_distances(x, valid, group):
    pair = valid[:, :, None] & valid[:, None, :] & (group[:, :, None] == group[:, None, :])
    return cosine_distances(x, x).masked_fill(~pair, INF)


def test_cosine_distances_match_definition():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(2, 5, 7, generator=g), torch.randn(2, 4, 7, generator=g)
    D = cosine_distances(a, b)
    for r in range(2):
        for i in range(5):
            for j in range(4):
                cos = torch.dot(a[r, i], b[r, j]) / (a[r, i].norm() * b[r, j].norm())
                assert abs(D[r, i, j].item() - max(0.0, 1 - cos.item())) < 1e-6
    assert (cosine_distances(a, a) >= 0).all()


def test_density_and_rank_match_reference():
    rng = random.Random(0)
    for _ in range(60):
        x, valid, group = _random_point_sets(rng, 3)
        dist = _masked_distances(x, valid, group)
        dist.diagonal(dim1=1, dim2=2).zero_()
        rho, rank = dbdpc_density_rank(dist, valid)
        for b in range(3):
            idx = [i for i in range(valid.shape[1]) if valid[b, i]]
            D = dist[b].tolist()
            for i in idx:
                ref = sum(math.exp(-((D[i][j] / 2) ** 2)) for j in idx)
                assert abs(rho[b, i].item() - ref) < 1e-4 * max(1.0, ref)
            # rank is a strict total order: decreasing density, equal densities by lower index, padding last
            r = rank[b].tolist()
            assert sorted(r) == list(range(len(r)))
            for i in idx:
                for j in idx:
                    if i < j:
                        ri, rj, pi, pj = r[i], r[j], rho[b, i].item(), rho[b, j].item()
                        assert (ri < rj) == (pi >= pj)
            assert all(r[i] >= len(idx) for i in range(len(r)) if not valid[b, i])


def test_equal_densities_break_ties_by_index():
    # three identical points and one far away: the identical ones have equal density; the lowest index wins
    x = torch.tensor([[[0.0, 1.0], [1.0, 0.0], [1.0, 0.0], [1.0, 0.0], [-1.0, 0.2]]])
    valid = torch.ones(1, 5, dtype=torch.bool)
    dist = cosine_distances(x, x)
    centre, assign, _ = dbdpc(dist, valid, 0.1)
    assert centre[0].tolist() == [True, True, False, False, True]
    assert assign[0].tolist() == [0, 1, 1, 1, 4]


def test_dbdpc_rounds_equal_sequential_greedy_random():
    """Many random inputs (ties, duplicates, padding, two images per row, cutoffs on exact distances)."""
    rng = random.Random(1234)
    total_centres = total_rounds = 0
    for trial in range(400):
        B = rng.randint(1, 4)
        x, valid, group = _random_point_sets(rng, B)
        dist = _masked_distances(x, valid, group)
        finite = dist[torch.isfinite(dist) & (dist > 0)]
        if rng.random() < 0.4 and finite.numel():  # cutoff exactly equal to an existing distance
            cutoff = finite[rng.randrange(finite.numel())].item()
        else:
            cutoff = rng.choice([0.01, 0.05, 0.1, 0.21, 0.3, 0.5, 0.8, 1.2, 1.9])
        centre, assign, rounds = dbdpc(dist, valid, cutoff)
        d0 = dist.clone()
        d0.diagonal(dim1=1, dim2=2).zero_()
        _, rank = dbdpc_density_rank(d0, valid)
        total_rounds += rounds
        for b in range(B):
            idx = [i for i in range(valid.shape[1]) if valid[b, i]]
            order = sorted(idx, key=lambda i: rank[b, i].item())  # the same density order (tested above)
            ref_c, ref_a = ref_dbdpc(d0[b].tolist(), idx, cutoff, order)
            got_c = [i for i in idx if centre[b, i]]
            assert got_c == ref_c, (trial, b)
            assert [assign[b, i].item() for i in idx] == [ref_a[i] for i in idx], (trial, b)
            assert all(assign[b, i].item() == -1 for i in range(valid.shape[1]) if not valid[b, i])
            total_centres += len(ref_c)
    assert total_rounds < total_centres  # rounds batch many centres at once


def test_dbdpc_rounds_equal_sequential_greedy_discrete_matrices():
    """Arbitrary symmetric distance matrices drawn from a few values: massive ties in distance and density."""
    rng = random.Random(7)
    values = [0.0, 0.1, 0.2, 0.2, 0.3, 0.5, 1.0]
    for trial in range(300):
        m = rng.randint(1, 16)
        D = torch.zeros(1, m, m)
        for i in range(m):
            for j in range(i + 1, m):
                D[0, i, j] = D[0, j, i] = rng.choice(values)
        valid = torch.ones(1, m, dtype=torch.bool)
        cutoff = rng.choice([0.1, 0.2, 0.25, 0.3])
        centre, assign, _ = dbdpc(D, valid, cutoff)
        _, rank = dbdpc_density_rank(D, valid)
        idx = list(range(m))
        order = sorted(idx, key=lambda i: rank[0, i].item())
        ref_c, ref_a = ref_dbdpc(D[0].tolist(), idx, cutoff, order)
        assert [i for i in idx if centre[0, i]] == ref_c, trial
        assert assign[0].tolist() == [ref_a[i] for i in idx], trial
        # with the reference's own (fp64) density, the order agrees as well
        assert ref_dbdpc(D[0].tolist(), idx, cutoff)[0] == ref_c or _has_density_tie(D[0])


def _has_density_tie(D: torch.Tensor) -> bool:
    rho = torch.exp(-(D.double() / 2) ** 2).sum(-1)
    diff = (rho[:, None] - rho[None, :]).abs() + torch.eye(len(rho), dtype=torch.double)
    return bool((diff < 1e-6).any())


def test_dbdpc_centres_are_cutoff_separated_and_clusters_bounded():
    rng = random.Random(3)
    for _ in range(50):
        x, valid, group = _random_point_sets(rng, 2)
        dist = _masked_distances(x, valid, group)
        cutoff = rng.choice([0.05, 0.2, 0.5])
        centre, assign, _ = dbdpc(dist, valid, cutoff)
        c32 = f32(cutoff)
        for b in range(2):
            cs = centre[b].nonzero().flatten().tolist()
            for i in cs:
                for j in cs:
                    if i != j:
                        assert dist[b, i, j] > c32
            for i in valid[b].nonzero().flatten().tolist():
                a = assign[b, i].item()
                assert centre[b, a] and (a == i or dist[b, i, a] <= c32)
                assert group[b, a] == group[b, i]


def test_retrieval_matches_reference():
    rng = random.Random(11)
    for trial in range(150):
        x, valid, group = _random_point_sets(rng, 2)
        dist = _masked_distances(x, valid, group)
        cutoff = rng.choice([0.05, 0.1, 0.21, 0.4])
        centre, _, _ = dbdpc(dist, valid, cutoff)
        gen = torch.Generator().manual_seed(trial)
        p = rng.randint(1, 12)
        xp = torch.randn(2, p, x.shape[-1], generator=gen)
        if rng.random() < 0.5:
            xp[:, 0] = x[:, 0]  # a pruned token identical to a kept one
        gp = torch.randint(0, 2, (2, p), generator=gen)
        ok = valid[:, None, :] & (gp[:, :, None] == group[:, None, :])
        dpc = cosine_distances(xp, x).masked_fill(~ok, INF)
        near, dmin = nearest_centre(dpc, centre)
        limit = 1.5 * cutoff
        join = dmin <= limit
        for b in range(2):
            cs = centre[b].nonzero().flatten().tolist()
            for i in range(p):
                row = dpc[b, i].tolist()
                reach = [k for k in cs if math.isfinite(row[k])]
                expect = ref_retrieve(row, reach, limit) if reach else -1
                assert (near[b, i].item() if join[b, i] else -1) == expect, (trial, b, i)


def test_dbdpc_rounds_on_a_chain_are_sequential():
    # points on a line 0.15 apart in angle-distance terms: the greedy is inherently sequential here
    ang = torch.arange(8) * 0.5
    x = torch.stack([ang.cos(), ang.sin()], -1)[None]
    valid = torch.ones(1, 8, dtype=torch.bool)
    dist = cosine_distances(x, x)
    centre, assign, rounds = dbdpc(dist, valid, 0.2)
    idx = list(range(8))
    d0 = dist.clone()
    d0.diagonal(dim1=1, dim2=2).zero_()
    order = sorted(idx, key=lambda i: dbdpc_density_rank(d0, valid)[1][0, i].item())
    assert [i for i in idx if centre[0, i]] == ref_dbdpc(d0[0].tolist(), idx, 0.2, order)[0]
    assert rounds >= 1


# =============================================================================================================
# merge
# =============================================================================================================
def test_merge_clusters_builds_the_reduction():
    # candidates 0..5: clusters {0, 2} (centre 2), {3} (centre 3), {1, 4} (centre 4); 5 dropped; row 2 padded
    centre_of = torch.tensor([[2, 4, 2, 3, 4, -1], [0, 0, 0, -1, -1, -1]])
    valid = torch.tensor([[True] * 6, [True, True, True, False, False, False]])
    feats = torch.arange(2 * 6 * 2, dtype=torch.float32).view(2, 6, 2)
    sizes = torch.tensor([[1.0, 1, 1, 1, 3, 1], [1, 1, 1, 1, 1, 1]])
    red = merge_clusters(centre_of, valid, feats, sizes)
    assert red.anchor.tolist() == [[2, 3, 4], [0, 0, 0]]
    assert red.valid.tolist() == [[True, True, True], [True, False, False]]
    assert red.source.tolist() == [[0, 2, 0, 1, 2, -1], [0, 0, 0, -1, -1, -1]]
    assert red.sizes.tolist() == [[2.0, 1.0, 4.0], [3.0, 0.0, 0.0]]
    torch.testing.assert_close(red.features[0, 0], (feats[0, 0] + feats[0, 2]) / 2)
    torch.testing.assert_close(red.features[0, 1], feats[0, 3])
    torch.testing.assert_close(red.features[0, 2], (feats[0, 1] + 3 * feats[0, 4]) / 4)  # size-weighted
    torch.testing.assert_close(red.features[1, 0], feats[1, :3].mean(0))
    assert (red.features[1, 1:] == 0).all()
    red_c = merge_clusters(centre_of, valid, None, sizes)
    assert red_c.features is None and red_c.sizes.tolist() == red.sizes.tolist()


def test_compact():
    idx, ok = compact(torch.tensor([[False, True, True, False], [True, False, False, False]]))
    assert idx.tolist() == [[1, 2], [0, 0]] and ok.tolist() == [[True, True], [True, False]]


# =============================================================================================================
# config / bad input
# =============================================================================================================
@pytest.mark.parametrize("field,value", [
    ("keep", 0), ("keep", 0.0), ("keep", 1.5), ("keep", -0.1), ("keep", float("nan")), ("keep", True),
    ("cutoff", 0), ("cutoff", -0.1), ("cutoff", float("nan")), ("cutoff", float("inf")),
    ("coef_pruned", -1.0), ("coef_pruned", float("nan")), ("mode", "fast"), ("merge", "max"), ("colour", 1),
])
def test_bad_parameters_name_the_field(field, value):
    with pytest.raises(vtc.ConfigError) as err:
        vtc.load_config({"stages": [{"method": "pact", "layer": 2, field: value}]})
    assert field in str(err.value)


def test_defaults_and_registration():
    cls = get_method_class("pact")
    assert cls is PACT
    m = PACT()
    assert (m.layer, m.keep, m.cutoff, m.coef_pruned, m.proportional, m.merge, m.mode, m.scope) == \
        (4, 0.55, 0.21, 1.5, True, "mean", "pact", "image")
    assert m.side == "llm"


def test_layer_out_of_range_and_order_errors():
    model = tiny_llava("sdpa")
    with pytest.raises(vtc.ConfigError, match="layer=4"):
        vtc.apply(model, {"stages": [{"method": "pact", "layer": 4}]})
    with pytest.raises(vtc.ConfigError, match="increasing layer order"):
        vtc.load_config({"stages": [{"method": "fastv", "layer": 3}, {"method": "pact", "layer": 2}]})
    assert getattr(model, "_vtc_run", None) is None


def test_flash_attention_with_proportional_is_a_clear_error():
    model = tiny_llava("sdpa")
    cfg = model.config.get_text_config()
    cfg._attn_implementation = "flash_attention_2"
    try:
        hooks_before = sum(len(m._forward_pre_hooks) for m in model.modules())
        with pytest.raises(vtc.ConfigError, match="proportional"):
            vtc.apply(model, {"stages": [{"method": "pact", "layer": 2}]})
        assert sum(len(m._forward_pre_hooks) for m in model.modules()) == hooks_before
        assert getattr(model, "_vtc_run", None) is None
        vtc.apply(model, {"stages": [{"method": "pact", "layer": 2, "proportional": False}]}).remove()
        vtc.apply(model, {"stages": [{"method": "pact", "layer": 2, "mode": "euti"}]}).remove()
    finally:
        cfg._attn_implementation = "sdpa"


def test_bundled_configs_load():
    for name, keep, cutoff in (("llava-1.5/pact", 0.55, 0.21), ("llava-next/pact", 0.55, 0.21),
                               ("qwen2-vl/pact", 0.80, 0.10)):
        cfg = vtc.load_config(name)
        (stage,) = cfg.stages
        assert (stage.method, stage.layer, stage.keep, stage.cutoff) == ("pact", 4, keep, cutoff)
    if get_method_class("visionzip") is None:
        pytest.skip("visionzip not registered yet")
    cfg = vtc.load_config("llava-1.5/visionzip-192+pact")
    assert [s.method for s in cfg.stages] == ["visionzip", "pact"]


# =============================================================================================================
# the model-level pieces (tiny LLaVA, Llama LM, 4 layers)
# =============================================================================================================
@pytest.fixture(scope="module", params=["sdpa", "eager"])
def model(request):
    return tiny_llava(request.param)


@pytest.fixture(scope="module")
def sdpa_model():
    return tiny_llava("sdpa")


def _rows(inputs: dict) -> list[dict]:
    """The unpadded single-sample inputs of every row of a left-padded batch."""
    out = []
    for b in range(inputs["input_ids"].shape[0]):
        keep = inputs["attention_mask"][b].bool()
        out.append({"input_ids": inputs["input_ids"][b:b + 1, keep],
                    "attention_mask": inputs["attention_mask"][b:b + 1, keep],
                    "pixel_values": inputs["pixel_values"][b:b + 1]})
    return out


def run_upper(model, h: torch.Tensor, positions: torch.Tensor, L: int) -> torch.Tensor:
    """Reference: decoder layers L.. over hidden states ``h`` (1, T, D) whose tokens sit at ``positions`` (T,)
    (repeats allowed), with the mask "key position <= query position", then norm and lm_head: (1, T, V)."""
    lm = model.model.language_model
    pe = lm.rotary_emb(h, positions[None])
    allowed = positions[None, :] <= positions[:, None]
    mask = torch.zeros(allowed.shape, dtype=h.dtype).masked_fill(~allowed, torch.finfo(h.dtype).min)[None, None]
    for layer in lm.layers[L:]:
        h = layer(h, attention_mask=mask, position_embeddings=pe, position_ids=positions[None])
        h = h[0] if isinstance(h, tuple) else h
    return model.lm_head(lm.norm(h))


def replay(model, ids: torch.Tensor, pixel_values: torch.Tensor, L: int, red: Reduction, n_prompt: int,
           copies: bool = True) -> torch.Tensor:
    """Reference logits (1, V) of the last token of ``ids`` (1, T) (prompt + generated tokens), recomputed
    without a cache: the unwrapped model up to layer L, then the prompt's visual candidates replaced by the
    reduction's outputs, each output of size s as s identical copies at its anchor's position (which is what
    proportional attention must equal), then layers L.. by :func:`run_upper`."""
    with torch.no_grad():
        h = model(input_ids=ids, pixel_values=pixel_values, output_hidden_states=True).hidden_states[L][0]
    cand = (ids[0, :n_prompt] == IMAGE_TOKEN).nonzero().flatten()
    rows, pos = [], []
    is_cand = torch.zeros(ids.shape[1], dtype=torch.bool)
    is_cand[cand] = True
    entries = [(p, h[p], 1) for p in range(ids.shape[1]) if not is_cand[p]]
    for k in range(red.anchor.shape[1]):
        if not red.valid[0, k]:
            continue
        p = int(cand[red.anchor[0, k]])
        vec = red.features[0, k] if red.features is not None else h[p]
        s = int(round(float(red.sizes[0, k]))) if (red.sizes is not None and copies) else 1
        entries.append((p, vec, s))
    for p, vec, s in sorted(entries, key=lambda e: e[0]):
        rows += [vec] * s
        pos += [p] * s
    with torch.no_grad():
        return run_upper(model, torch.stack(rows)[None], torch.tensor(pos), L)[0, -1]


class SizedKeep(Method):
    """Test-only LLM-side method: keeps every candidate and gives candidate ``which`` size ``size``."""

    sides: ClassVar = ("llm",)
    method: Literal["sized"] = "sized"
    layer: int = 2
    size: float = 1.0
    which: int = 0
    proportional: bool = True

    def reduce_llm(self, ctx: LLMContext) -> Reduction:
        B, n = ctx.candidates.shape
        red = Reduction.from_mask(ctx.candidate_valid)
        sizes = red.valid.float()
        sizes[:, self.which] = self.size
        red.sizes = sizes
        red.proportional = self.proportional  # the runtime reads it from the Reduction
        return red


def _generate(model, inputs, steps=3):
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=steps, do_sample=False, return_dict_in_generate=True,
                             output_logits=True, pad_token_id=0)
    return out.sequences, [lg[0] for lg in out.logits]


def test_proportional_sizes_one_equal_no_bias(model):
    inp = llava_inputs(model, batch=3, seed=1)
    with torch.no_grad():
        ref = model(**inp).logits
        with vtc.compress(model, {"stages": [SizedKeep(layer=2, size=1.0)]}) as run:
            got = model(**inp).logits
            assert run.llm.slot_sets[-1].use_bias  # the bias path is active, with log(1) = 0
    real = inp["attention_mask"].bool()  # logits of user-padding positions are not defined
    torch.testing.assert_close(got[real], ref[real], atol=1e-5, rtol=1e-5)
    one = _rows(inp)[0]
    seq_ref, lg_ref = _generate(model, one)
    with vtc.compress(model, {"stages": [SizedKeep(layer=2, size=1.0)]}):
        seq, lg = _generate(model, one)
    assert torch.equal(seq, seq_ref)
    for a, b in zip(lg, lg_ref):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("size", [2.0, 5.0])
def test_proportional_size_s_equals_s_identical_copies(model, size):
    """A key of size s == s identical copies of that key at the same position, in every layer >= L, in prefill
    and in every decode step (the reference recomputes without a cache, with real copies)."""
    L = 2
    one = _rows(llava_inputs(model, batch=1, seed=2))[0]
    stage = SizedKeep(layer=L, size=size, which=7)
    with vtc.compress(model, {"stages": [stage]}) as run:
        seq, logits = _generate(model, one, steps=3)
        red = run.stats.stages[0].reduction
    n_prompt = one["input_ids"].shape[1]
    for t, lg in enumerate(logits):
        ref = replay(model, seq[:, :n_prompt + t], one["pixel_values"], L, red, n_prompt)
        torch.testing.assert_close(lg, ref, atol=1e-4, rtol=1e-4)
    # and it is not a no-op: one copy differs
    no_copies = replay(model, seq[:, :n_prompt], one["pixel_values"], L, red, n_prompt, copies=False)
    assert (no_copies - logits[0]).abs().max() > 1e-4


# ---- EUTI against a naive computation -----------------------------------------------------------------------
def naive_euti(model, h: torch.Tensor, ids: torch.Tensor, L: int) -> torch.Tensor:
    """(n_visual,) EUTI scores of one unpadded sample: every query row of P projected, averaged, per-head softmax."""
    layer = model.model.language_model.layers[L]
    attn = layer.self_attn
    x = layer.input_layernorm(h)  # (N, D)
    vis = (ids == IMAGE_TOKEN).nonzero().flatten()
    P = torch.arange(int(vis.max()) + 1)
    d = attn.head_dim
    Q = attn.q_proj(x[P]).view(len(P), -1, d).double()  # (|P|, h, d)
    K = attn.k_proj(x[P]).view(len(P), -1, d).double()  # (|P|, h_kv, d)
    qbar = Q.mean(0)
    groups = Q.shape[1] // K.shape[1]
    g = torch.zeros(len(P), dtype=torch.double)
    for head in range(Q.shape[1]):
        g += torch.softmax(K[:, head // groups] @ qbar[head] * attn.scaling, dim=0)
    g /= Q.shape[1]
    s = g * h[P].double().norm(dim=-1)
    return s[vis]


def naive_keys(model, h: torch.Tensor, L: int, cand: torch.Tensor) -> torch.Tensor:
    """(n, h_kv * d) post-RoPE keys at layer L of the tokens ``cand`` (positions = indices, unpadded)."""
    lm = model.model.language_model
    attn = lm.layers[L].self_attn
    x = lm.layers[L].input_layernorm(h)
    k = attn.k_proj(x).view(h.shape[0], -1, attn.head_dim)  # (N, h_kv, d)
    cos, sin = lm.rotary_emb(h[None], torch.arange(h.shape[0])[None])
    c, s = cos[0][:, None], sin[0][:, None]
    rot = torch.cat([-k[..., k.shape[-1] // 2:], k[..., : k.shape[-1] // 2]], -1)
    k = k * c + rot * s
    return k[cand].reshape(len(cand), -1)


def naive_pact(model, ids, pixel_values, L, keep, cutoff, coef=1.5, mode="pact"):
    """The whole PACT decision of one sample, by loops: (centre_of per candidate, merged features, sizes)."""
    with torch.no_grad():
        h = model(input_ids=ids, pixel_values=pixel_values, output_hidden_states=True).hidden_states[L][0]
        cand = (ids[0] == IMAGE_TOKEN).nonzero().flatten()
        n = len(cand)
        if mode == "dbdpc":
            kept = list(range(n))
        else:
            s = naive_euti(model, h, ids[0], L).tolist()
            k = max(1, math.floor(keep * n + 1e-6))
            kept = sorted(sorted(range(n), key=lambda j: (-s[j], j))[:k])
        z = naive_keys(model, h, L, cand)
        D = cosine_distances(z[None], z[None])[0]
        D.fill_diagonal_(0)
        Dl = D.tolist()
        sub = [[Dl[i][j] for j in kept] for i in kept]
        centres_local, assign_local = ref_dbdpc(sub, list(range(len(kept))), cutoff)
        centre_of = [-1] * n
        for a, i in enumerate(kept):
            centre_of[i] = kept[assign_local[a]]
        centres = [kept[c] for c in centres_local]
        if mode == "pact":
            for j in range(n):
                if j not in kept:
                    row = {c: Dl[j][c] for c in centres}
                    best = min(centres, key=lambda c: (row[c], c))
                    if row[best] <= f32(coef * cutoff):
                        centre_of[j] = best
    return centre_of, centres, h[cand]


@pytest.mark.parametrize("mode,cutoff", [("pact", 0.3), ("pact", 0.21), ("dbdpc", 0.3)])
def test_pact_matches_naive_reference(sdpa_model, mode, cutoff):
    model, L, keep = sdpa_model, 2, 0.55
    one = _rows(llava_inputs(model, batch=1, seed=3))[0]
    centre_of, centres, hc = naive_pact(model, one["input_ids"], one["pixel_values"], L, keep, cutoff, mode=mode)
    with torch.no_grad(), vtc.compress(model, {"stages": [{"method": "pact", "layer": L, "keep": keep,
                                                           "cutoff": cutoff, "mode": mode}]}) as run:
        model(**one)
    red = run.stats.stages[0].reduction
    anchors = red.anchor[0][red.valid[0]].tolist()
    assert anchors == centres
    src = red.source[0].tolist()
    assert [(-1 if c < 0 else anchors.index(c)) for c in centre_of] == src
    for k, c in enumerate(anchors):
        members = [j for j, cc in enumerate(centre_of) if cc == c]
        torch.testing.assert_close(red.features[0, k], hc[members].mean(0), atol=1e-5, rtol=1e-5)
        assert red.sizes[0, k].item() == len(members)
    st = run.stats.stages[0]
    assert st.tokens_out == [len(centres)] and st.tokens_in == [len(centre_of)]
    assert st.reduction_ratio == [1 - len(centres) / len(centre_of)]
    if mode == "pact":
        assert len(centres) < math.floor(keep * len(centre_of)) + 1


def test_euti_mode_matches_naive_topk(sdpa_model):
    model, L, keep = sdpa_model, 2, 0.4
    one = _rows(llava_inputs(model, batch=1, seed=4))[0]
    with torch.no_grad():
        h = model(**one, output_hidden_states=True).hidden_states[L][0]
        s = naive_euti(model, h, one["input_ids"][0], L).tolist()
    n = len(s)
    expect = sorted(sorted(range(n), key=lambda j: (-s[j], j))[: math.floor(keep * n)])
    with torch.no_grad(), vtc.compress(model, {"stages": [{"method": "pact", "layer": L, "keep": keep,
                                                           "mode": "euti"}]}) as run:
        model(**one)
    red = run.stats.stages[0].reduction
    assert red.anchor[0][red.valid[0]].tolist() == expect
    assert red.sizes is None and run.stats.stages[0].tokens_out == [math.floor(keep * n)]


def test_euti_scores_vectorised_equal_naive_with_padding(sdpa_model):
    """The method's EUTI on a padded batch equals the naive per-sample computation."""
    model, L = sdpa_model, 2
    inp = llava_inputs(model, batch=3, seed=5)
    captured = {}

    class Spy(PACT):
        def euti(self, ctx, q_mean, keys, prefix):
            out = super().euti(ctx, q_mean, keys, prefix)
            captured["scores"], captured["valid"] = out, ctx.candidate_valid
            return out

    with torch.no_grad(), vtc.compress(model, {"stages": [Spy(layer=L, mode="euti")]}):
        model(**inp)
    for b, one in enumerate(_rows(inp)):
        with torch.no_grad():
            h = model(**one, output_hidden_states=True).hidden_states[L][0]
            ref = naive_euti(model, h, one["input_ids"][0], L)
        got = captured["scores"][b][captured["valid"][b]].double()
        torch.testing.assert_close(got, ref, atol=1e-6, rtol=1e-4)


# ---- decode consistency with proportional attention active -------------------------------------------------
@pytest.mark.parametrize("merge", ["mean", "centre"])
def test_pact_decode_consistency_with_proportional_attention(model, merge):
    L = 2
    one = _rows(llava_inputs(model, batch=1, seed=6))[0]
    cfg = {"stages": [{"method": "pact", "layer": L, "keep": 0.55, "cutoff": 0.3, "merge": merge}]}
    with vtc.compress(model, cfg) as run:
        seq, logits = _generate(model, one, steps=3)
        red = run.stats.stages[0].reduction
        kv = run.stats.kv_cache_len
    assert (red.sizes[red.valid] > 1).any(), "the test needs at least one merge"
    n_prompt = one["input_ids"].shape[1]
    n_vis = int((one["input_ids"] == IMAGE_TOKEN).sum())
    assert kv[:L] == [n_prompt] * L and kv[L:] == [n_prompt - n_vis + int(red.valid.sum())] * (4 - L)
    for t, lg in enumerate(logits):
        ref = replay(model, seq[:, :n_prompt + t], one["pixel_values"], L, red, n_prompt)
        torch.testing.assert_close(lg, ref, atol=1e-4, rtol=1e-4)


def test_proportional_off_differs_and_has_no_bias(sdpa_model):
    model, L = sdpa_model, 2
    one = _rows(llava_inputs(model, batch=1, seed=6))[0]
    outs = {}
    for prop in (True, False):
        with torch.no_grad(), vtc.compress(model, {"stages": [{"method": "pact", "layer": L, "cutoff": 0.3,
                                                               "proportional": prop}]}) as run:
            outs[prop] = model(**one).logits[0, -1]
            assert run.llm.slot_sets[-1].use_bias is prop
            red = run.stats.stages[0].reduction
    n_prompt = one["input_ids"].shape[1]
    ref = replay(model, one["input_ids"], one["pixel_values"], L, red, n_prompt, copies=False)
    torch.testing.assert_close(outs[False], ref, atol=1e-4, rtol=1e-4)
    assert (outs[True] - outs[False]).abs().max() > 1e-4


# ---- batching ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["pact", "dbdpc", "euti"])
def test_batch_equals_per_sample(model, mode):
    L = 2
    inp = llava_inputs(model, batch=3, seed=7)
    cfg = {"stages": [{"method": "pact", "layer": L, "keep": 0.55, "cutoff": 0.3, "mode": mode}]}
    with torch.no_grad(), vtc.compress(model, cfg) as run:
        batch_logits = model(**inp).logits[:, -1]
        batch_out = run.stats.stages[0].tokens_out
        singles, single_out = [], []
        for one in _rows(inp):
            singles.append(model(**one).logits[0, -1])
            single_out += run.stats.stages[0].tokens_out
    assert batch_out == single_out
    if mode != "euti":
        assert len(set(batch_out)) > 1, "rows should deliver different counts"
    for b in range(3):
        torch.testing.assert_close(batch_logits[b], singles[b], atol=1e-4, rtol=1e-4)


def test_batched_generate_equals_per_sample(sdpa_model):
    model = sdpa_model
    inp = llava_inputs(model, batch=3, seed=8)
    cfg = {"stages": [{"method": "pact", "layer": 2, "cutoff": 0.3}]}
    with vtc.compress(model, cfg):
        seq_b, _ = _generate(model, inp, steps=3)
        for b, one in enumerate(_rows(inp)):
            seq_1, _ = _generate(model, one, steps=3)
            assert torch.equal(seq_b[b, -3:], seq_1[0, -3:])


# ---- stats and identity --------------------------------------------------------------------------------------
def test_stats_report_delivered_ratio_per_sample(sdpa_model):
    model = sdpa_model
    inp = llava_inputs(model, batch=3, seed=9)
    with torch.no_grad(), vtc.compress(model, {"stages": [{"method": "pact", "layer": 2, "cutoff": 0.3}]}) as run:
        model(**inp)
    st = run.stats.stages[0]
    red = st.reduction
    assert st.tokens_in == [36, 36, 36]
    assert st.tokens_out == red.valid.sum(-1).tolist()
    assert st.reduction_ratio == [1 - o / 36 for o in st.tokens_out]
    assert st.as_dict()["reduction_ratio"] == [round(1 - o / 36, 4) for o in st.tokens_out]
    # every candidate is either represented by exactly one output or dropped; sizes count the members
    for b in range(3):
        counts = torch.bincount(red.source[b][red.source[b] >= 0], minlength=red.anchor.shape[1]).float()
        torch.testing.assert_close(counts, red.sizes[b])


def test_identity_keep_all(model):
    inp = llava_inputs(model, batch=3, seed=10)
    with torch.no_grad():
        ref = model(**inp).logits
        for mode in ("pact", "dbdpc", "euti"):
            with vtc.compress(model, {"stages": [{"method": "pact", "layer": 1, "keep": 1.0, "cutoff": 1e-6,
                                                  "mode": mode}]}) as run:
                got = model(**inp).logits
            assert run.stats.stages[0].tokens_out == [36, 36, 36]
            real = inp["attention_mask"].bool()
            torch.testing.assert_close(got[real], ref[real], atol=1e-5, rtol=1e-5)


def _two_image_prompt(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    img = torch.full((36,), IMAGE_TOKEN)
    ids = torch.cat([torch.randint(1, 100, (3,), generator=g), img, torch.randint(1, 100, (2,), generator=g), img,
                     torch.randint(1, 100, (5,), generator=g)])[None]
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids),
            "pixel_values": torch.randn(2, 3, 48, 48, generator=g)}


@pytest.mark.parametrize("scope", ["image", "sample"])
def test_scope_image_keeps_clusters_inside_images(sdpa_model, scope):
    model = sdpa_model
    inp = _two_image_prompt(model)
    image_of = torch.arange(72) // 36  # candidate -> image
    stage = {"method": "pact", "layer": 2, "keep": 0.3, "cutoff": 0.6, "scope": scope}
    with torch.no_grad(), vtc.compress(model, {"stages": [stage]}) as run:
        model(**inp)
    red = run.stats.stages[0].reduction
    src, anchors = red.source[0], red.anchor[0]
    members = src >= 0
    same = image_of[anchors[src[members]]] == image_of[members]
    with torch.no_grad(), vtc.compress(model, {"stages": [dict(stage, mode="euti")]}) as run:
        model(**inp)
    kept = run.stats.stages[0].reduction.anchor[0]
    if scope == "image":
        assert same.all()
        assert torch.bincount(image_of[kept], minlength=2).tolist() == [10, 10]  # floor(0.3 * 36) per image
    else:
        assert not same.all(), "with a large cutoff some cluster should span both images"
        assert len(kept) == 21  # floor(0.3 * 72) over the sample


def test_pact_runs_on_every_family():
    """PACT on every family of the invariant matrix that supports LLM-side stages (batch 1 and 3)."""
    from matrix import discover

    families, _ = discover()
    for fam in families:
        if "llm" not in fam.sides:
            continue
        m = fam.build("sdpa")
        L = min(2, m.config.get_text_config().num_hidden_layers - 1)
        for batch in (1, 3):
            inp = fam.inputs(m, batch, 0)
            with torch.no_grad(), vtc.compress(m, {"stages": [{"method": "pact", "layer": L, "cutoff": 0.3}]}) as run:
                out = m(**inp)
            assert torch.isfinite(out.logits).all(), fam.name
            st = run.stats.stages[0]
            red = st.reduction
            assert st.tokens_out == red.valid.sum(-1).tolist(), fam.name
            sizes = red.sizes if red.sizes is not None else red.valid.float()
            assert (sizes.sum(-1) <= torch.tensor(st.tokens_in)).all(), fam.name


@pytest.mark.parametrize("scope", ["image", "sample"])
def test_qwen2_vl_video_batch_and_decode(scope):
    """Qwen2-VL video (M-RoPE, frames numbered as separate units): a padded batch of 3 equals each sample alone,
    ``scope`` decides whether clusters may span frames, and cached decoding with proportional attention equals
    recomputing every step without a cache over the same kept / merged tokens."""
    from replay import assert_cached_equals_uncached
    from tiny_models_qwen import qwen_video_inputs, split_row, tiny_qwen2_vl

    from vtc.models import get_adapter

    model = tiny_qwen2_vl("sdpa")
    inp = qwen_video_inputs(model, batch=3, seed=0)
    config = vtc.load_config({"stages": [{"method": "pact", "layer": 2, "cutoff": 0.45, "scope": scope}]})
    with torch.no_grad(), vtc.compress(model, config) as run:
        batched = model(**inp).logits[:, -1]
        st = run.stats.stages[0]
        red, out_b = st.reduction, list(st.tokens_out)
        for b in range(3):
            single = model(**split_row(inp, b)).logits[0, -1]
            torch.testing.assert_close(single, batched[b], atol=1e-4, rtol=1e-4)
            assert run.stats.stages[0].tokens_out == [out_b[b]]
    assert red.sizes is not None and (red.sizes > 1).any()
    # clusters and units: with scope=image no cluster spans two units (frames / images)
    tm = get_adapter(model).token_map(inp["input_ids"], inp)
    spans = False
    for b in range(3):
        unit = tm.image_id[b][tm.is_visual[b]]  # candidates in order (no protected tokens in Qwen)
        src = red.source[b][: len(unit)]
        members = src >= 0
        same = unit[red.anchor[b][src[members]]] == unit[members]
        spans |= not bool(same.all())
    assert spans is (scope == "sample")
    # decode consistency (batch 3, padded) with proportional attention active
    with vtc.compress(model, config) as run:
        out = model.generate(**inp, max_new_tokens=3, do_sample=False, pad_token_id=0, output_logits=True,
                             return_dict_in_generate=True)
    assert_cached_equals_uncached(model, config, inp, out, stats=run.stats, key=f"pact-video-{scope}")
