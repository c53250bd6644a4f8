"""LLaVA-NeXT adapter: placeholder counts, newline protection, per-crop units and the packing schemes."""

from __future__ import annotations

import functools

import pytest
import torch
from tiny_models import IMAGE_TOKEN
from tiny_models_next import MATRIX_SIZES, next_inputs, num_crops, num_image_tokens, tiny_llava_next

import vtc
from vtc.layout import Grid, Sequence
from vtc.models import get_adapter
from vtc.models.llava_next import AnyresGeometry, LlavaNextAdapter, pack_grid, pack_sequence
from vtc.reduction import Reduction

#: 1x2 with padding, 2x1 with padding, 1x2 without, 2x2, 1x1, a very wide one
SIZES = [(30, 90), (90, 30), (40, 90), (80, 80), (40, 40), (20, 100)]


@functools.cache
def model(attn: str = "sdpa"):
    return tiny_llava_next(attn)


def adapter() -> LlavaNextAdapter:
    ad = get_adapter(model())
    assert isinstance(ad, LlavaNextAdapter)
    return ad


@torch.no_grad()
def logits(m, inputs, **kw):
    return m(**inputs, **kw).logits


def stock_features(inputs) -> list[torch.Tensor]:
    with torch.no_grad():
        return list(model().model.get_image_features(inputs["pixel_values"], inputs["image_sizes"]).pooler_output)


def newline_positions(inputs) -> torch.Tensor:
    """(B, N) True where the stock model puts its image_newline vector in the prompt."""
    m = model()
    feats = torch.cat(stock_features(inputs))
    is_nl = (feats == m.model.image_newline).all(-1)
    out = torch.zeros_like(inputs["input_ids"], dtype=torch.bool)
    out[inputs["input_ids"] == IMAGE_TOKEN] = is_nl
    return out


# ---- placeholder counts ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("size", SIZES)
def test_placeholder_count_matches_model(size):
    m = model()
    inputs = next_inputs(m, sizes=[size])
    n = num_image_tokens(size)
    assert int((inputs["input_ids"] == IMAGE_TOKEN).sum()) == n
    assert adapter().tokens_per_image({"image_sizes": inputs["image_sizes"]}) == [n]
    assert adapter().geometries(inputs)[0].num_units == 1 + num_crops(size)
    logits(m, inputs)  # the model accepts the count ...
    bad = dict(inputs)
    bad["input_ids"] = inputs["input_ids"][:, 1:]  # ... and rejects one placeholder less
    bad["attention_mask"] = inputs["attention_mask"][:, 1:]
    ids = bad["input_ids"].clone()
    ids[0, (ids[0] == IMAGE_TOKEN).nonzero()[0]] = 5
    bad["input_ids"] = ids
    with pytest.raises((ValueError, RuntimeError), match="do not match"):
        logits(m, bad)
    with pytest.raises(vtc.ConfigError, match="placeholder"):
        adapter().token_map(bad["input_ids"], bad)


# ---- LLM side: token map ----------------------------------------------------------------------------------------
def test_token_map_ids_and_newlines_match_stock_packing():
    m = model()
    sizes = [(80, 80), (30, 90), (90, 30), (40, 40)]
    inputs = next_inputs(m, sizes=sizes, batch=3, images_per_row=[2, 1, 1])  # row 0: two adjacent images
    tm = adapter().token_map(inputs["input_ids"], inputs)
    assert torch.equal(tm.is_visual, inputs["input_ids"] == IMAGE_TOKEN)
    counts = torch.bincount(tm.image_id[tm.is_visual], minlength=4).tolist()
    assert counts == [num_image_tokens(s) for s in sizes]
    assert tm.image_id[0].max() == 1 and tm.image_id[1].max() == 2 and tm.image_id[2].max() == 3
    assert torch.equal(tm.protected, newline_positions(inputs))
    # documented counts: 2x2 crops of 6x6, no padding -> 12 rows; (30, 90) -> 4 rows; (90, 30) -> 12; 1 crop -> 6
    assert (tm.protected & (tm.image_id == 0)).sum() == 12
    assert [int((tm.protected & (tm.image_id == i)).sum()) for i in range(1, 4)] == [4, 12, 6]


def test_token_map_from_generate_encoder_outputs():
    """transformers 5.2x's generate passes pre-packed features (no image_sizes): same map."""
    m = model()
    inputs = next_inputs(m, sizes=[(80, 80), (30, 90), (90, 30)], batch=3)
    with torch.no_grad():
        enc = m.model.get_image_features(inputs["pixel_values"], inputs["image_sizes"], return_dict=True)
    a = adapter().token_map(inputs["input_ids"], inputs)
    b = adapter().token_map(inputs["input_ids"], {"mm_encoder_outputs": {"image": enc}})
    for f in ("is_visual", "image_id", "protected"):
        assert torch.equal(getattr(a, f), getattr(b, f))


@pytest.mark.parametrize("stage", [
    {"method": "fastv", "layer": 2, "budget": 0.25},
    {"method": "random", "layer": 1, "budget": 3},
    {"method": "fastv", "layer": 1, "budget": 1, "query": "text"},
])
def test_llm_side_never_prunes_newlines(stage):
    m = model()
    inputs = next_inputs(m, sizes=[(80, 80), (30, 90), (90, 30)], batch=3)
    nl = newline_positions(inputs)
    vis = inputs["input_ids"] == IMAGE_TOKEN
    with vtc.compress(m, {"stages": [stage]}) as run:
        logits(m, inputs)
        st = run.stats.stages[0]
        kept = torch.zeros_like(vis)
        for b in range(3):
            kept[b, st.kept_positions[b][st.kept_valid[b]]] = True
        assert bool((kept | ~nl).all()), "an image_newline position was pruned"
        # stats count the prunable (non-newline) visual tokens only
        assert st.tokens_in == (vis & ~nl).sum(-1).tolist()
        non_nl = (vis & ~nl).sum(-1)
        budget = stage["budget"]
        want = [budget if isinstance(budget, int) else int(budget * int(c)) for c in non_nl]
        assert st.tokens_out == want
        assert ((kept & vis).sum(-1) - nl.sum(-1)).tolist() == want
        # generate (features precomputed by transformers) protects the same positions
        out = m.generate(**inputs, max_new_tokens=2, do_sample=False, pad_token_id=0)
        assert out.shape[1] == inputs["input_ids"].shape[1] + 2
        st = run.stats.stages[0]
        assert st.tokens_in == non_nl.tolist() and st.tokens_out == want


# ---- vision side: units, identity, packing --------------------------------------------------------------------
def test_encode_images_units_and_extras():
    m = model()
    sizes = [(80, 80), (30, 90), (40, 40)]
    inputs = next_inputs(m, sizes=sizes, batch=3)
    (group,) = adapter().encode_images(inputs)
    assert group.features.shape[:2] == (5 + 3 + 2, 36)
    assert group.layout == Grid(6, 6)
    assert group.unit_image == [0] * 5 + [1] * 3 + [2] * 2
    assert group.unit_part == [0, 1, 2, 3, 4, 0, 1, 2, 0, 1]
    cls = group.extras.require("cls_attention", "test")
    keys = group.extras.require("keys", "test")
    assert cls.shape == (10, 36) and keys.shape[:2] == (10, 36)
    assert bool((cls.sum(-1) <= 4 + 1e-5).all())  # 4 heads' CLS rows, CLS column dropped


def test_identity_packing_is_bit_exact():
    m = model()
    inputs = next_inputs(m, sizes=SIZES, batch=6)
    ad = adapter()
    (group,) = ad.encode_images(inputs)
    feats = ad.project(group.features)
    group.out_layout = group.layout
    keep_all = Reduction.from_mask(torch.ones(feats.shape[:2], dtype=torch.bool))
    images = ad.pack_images([(group, feats, [keep_all])], inputs)
    for im, ref in zip(images, stock_features(inputs), strict=True):
        assert torch.equal(im.embeds, ref)
        assert torch.equal(im.protected, (ref == m.model.image_newline).all(-1))


@pytest.mark.parametrize("stage", [{"method": "random", "budget": 1.0}, {"method": "random", "budget": 36},
                                   {"method": "downsample", "budget": 36}])
def test_vision_full_budget_equals_unwrapped(stage):
    m = model()
    inputs = next_inputs(m, sizes=[(80, 80), (30, 90), (20, 100)], batch=3)
    ref = logits(m, inputs)
    with vtc.compress(m, {"stages": [stage]}):
        out = logits(m, inputs)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("size", [(30, 90), (90, 30), (80, 80), (40, 40)])
def test_vision_grid_packing_downsample(size):
    """downsample 6x6 -> 3x3 per crop: base 9, crop map (rows*3, cols*3) unpadded, one newline per row."""
    m = model()
    inputs = next_inputs(m, sizes=[size])
    g = adapter().geometries(inputs)[0]
    n_text = inputs["input_ids"].shape[1] - num_image_tokens(size)
    with vtc.compress(m, {"stages": [{"method": "downsample", "budget": 9}]}) as run:
        out = logits(m, inputs)
        assert run.stats.stages[0].tokens_out == [9] * g.num_units
    top, bottom, left, right = g.unpadded(3, 3)
    assert run.stats.prompt_len == n_text + 9 + (bottom - top) * (right - left + 1) == out.shape[1]
    assert run.stats.image_tokens == [9 + (bottom - top) * (right - left + 1)]
    assert g.num_tokens(3, 3) == 9 + (bottom - top) * (right - left + 1)


def test_vision_sequence_packing_and_protection():
    """random k per crop: [base k, band 1 crops k each, newline, band 2 ..., newline]; newlines protected so a
    later LLM-side stage keeps them."""
    m = model()
    size = (90, 30)  # 2x1 crops: two bands of one crop
    inputs = next_inputs(m, sizes=[size])
    k = 5
    ids = inputs["input_ids"][0]
    first = int((ids == IMAGE_TOKEN).nonzero()[0])
    n_img = 3 * k + 2
    nl_pos = [first + 2 * k, first + 3 * k + 1]
    stages = [{"method": "random", "budget": k}, {"method": "random", "layer": 1, "budget": 2}]
    with vtc.compress(m, {"stages": stages}) as run:
        captured = {}
        def grab(mod, args, kwargs):
            captured["emb"] = kwargs["inputs_embeds"]

        hook = m.model.language_model.register_forward_pre_hook(grab, with_kwargs=True)
        try:
            logits(m, inputs)
        finally:
            hook.remove()
        vis_st, llm_st = run.stats.stages
    assert vis_st.tokens_out == [k, k, k]
    assert run.stats.prompt_len == ids.shape[0] - num_image_tokens(size) + n_img
    assert run.stats.image_tokens == [n_img]  # 3 units x k + 2 newlines (stages count the 3 x k)
    emb = captured["emb"][0]
    is_nl = (emb == m.model.image_newline).all(-1)
    assert is_nl.nonzero().flatten().tolist() == nl_pos
    assert llm_st.tokens_in == [3 * k] and llm_st.tokens_out == [2]
    kept = llm_st.kept_positions[0][llm_st.kept_valid[0]].tolist()
    assert set(nl_pos) <= set(kept)
    assert len([p for p in kept if first <= p < first + n_img]) == 2 + 2


def test_pack_sequence_and_grid_shapes():
    D = 4
    nl = torch.full((D,), 7.0)
    g = AnyresGeometry(size=(80, 80), rows=2, cols=2)
    base = torch.zeros(3, D)
    crops = [torch.full((k, D), float(i + 1)) for i, k in enumerate([1, 2, 3, 4])]
    emb, prot = pack_sequence(base, crops, g, nl)
    assert emb.shape == (3 + 10 + 2, D)
    assert prot.nonzero().flatten().tolist() == [3 + 3, 3 + 3 + 7 + 1]
    assert emb[:, 0].tolist() == [0, 0, 0, 1, 2, 2, 7, 3, 3, 3, 4, 4, 4, 4, 7]
    # an image without crops (the model's other branch): base then one newline
    g0 = AnyresGeometry(size=(40, 40), rows=0, cols=0)
    emb, prot = pack_grid(base, torch.zeros(0, 9, D), g0, 3, 3, nl)
    assert emb.shape == (4, D) and prot.tolist() == [False, False, False, True]
    emb, prot = pack_sequence(base, [], g0, nl)
    assert emb.shape == (4, D) and prot.tolist() == [False, False, False, True]
    assert g0.num_tokens(3, 3) == 10 and g0.newline_mask(3, 3).tolist() == [False] * 9 + [True]


def test_pack_drops_padding_of_adaptive_methods():
    """Units with different valid counts (content-adaptive methods): only valid outputs are packed."""
    m = model()
    inputs = next_inputs(m, sizes=[(30, 90)])
    ad = adapter()
    (group,) = ad.encode_images(inputs)
    feats = ad.project(group.features)
    mask = torch.zeros(3, 36, dtype=torch.bool)
    mask[0, :4] = True
    mask[1, :2] = True
    mask[2, 5:11] = True
    red = Reduction.from_mask(mask)
    out = red.output_features(feats)
    group.out_layout = Sequence(out.shape[1])
    (im,) = ad.pack_images([(group, out, [red])], inputs)
    assert im.embeds.shape[0] == 4 + 2 + 6 + 1
    assert torch.equal(im.embeds[4:6], feats[1, :2]) and torch.equal(im.embeds[6:12], feats[2, 5:11])
    assert im.protected.tolist() == [False] * 12 + [True]


def test_mixed_crop_counts_batch_equals_single():
    """Images with 5, 3 and 2 units in one padded batch: per sample equal to batch size one (vision + LLM)."""
    m = model()
    sizes = [(80, 80), (30, 90), (40, 40)]
    inputs = next_inputs(m, sizes=sizes, batch=3)
    stages = [{"method": "random", "budget": 11}, {"method": "fastv", "layer": 2, "budget": 0.5}]
    with vtc.compress(m, {"stages": stages}) as run:
        batched = logits(m, inputs)[:, -1]
        outs = [list(st.tokens_out) for st in run.stats.stages]
        assert outs[0] == [11] * 10
        for b in range(3):
            keep = inputs["attention_mask"][b].bool()
            n_units = 1 + num_crops(sizes[b])
            row = {"input_ids": inputs["input_ids"][b:b + 1, keep],
                   "attention_mask": inputs["attention_mask"][b:b + 1, keep],
                   "pixel_values": inputs["pixel_values"][b:b + 1, :n_units],
                   "image_sizes": inputs["image_sizes"][b:b + 1]}
            single = logits(m, row)[:, -1]
            torch.testing.assert_close(single[0], batched[b], atol=1e-4, rtol=1e-4)
            assert run.stats.stages[1].tokens_out == [outs[1][b]]


def test_full_strategy_rejected_on_vision_side():
    m = model()
    inputs = next_inputs(m, sizes=[(30, 90)])
    with pytest.raises(vtc.ConfigError, match="vision_feature_select_strategy"):
        adapter().encode_images({**inputs, "vision_feature_select_strategy": "full"})


def test_matrix_sizes_have_equal_units_and_different_grids():
    gs = [adapter().geometries({"image_sizes": torch.tensor([s])})[0] for s in MATRIX_SIZES]
    assert len({g.num_units for g in gs}) == 1
    assert len({(g.rows, g.cols, g.unpadded(6, 6)) for g in gs}) == len(gs)


def test_unit_layouts_match_stats_for_drawing():
    from PIL import Image

    from vtc.viz import draw_kept, token_groups

    m = model()
    size = (90, 30)
    inputs = next_inputs(m, sizes=[size])
    ad = adapter()
    vis = ad.unit_layouts(inputs, 0)
    llm = ad.unit_layouts(inputs, 0, side="llm")
    assert vis == [Grid(6, 6)] * 3
    assert llm == [Grid(6, 6), Grid(12, 4)]
    n_nl = int(newline_positions(inputs).sum())
    assert sum(lay.num_tokens for lay in llm) == num_image_tokens(size) - n_nl
    image = Image.new("RGB", (30, 90))
    with vtc.compress(m, {"stages": [{"method": "random", "budget": 7}]}) as run:
        logits(m, inputs)
    groups = token_groups(run.stats, 0)
    assert [g.shape[0] for g in groups] == [36, 36, 36] and [int((g >= 0).sum()) for g in groups] == [7, 7, 7]
    assert draw_kept(image, groups, vis).size[0] == 3 * draw_kept(image, groups[:1], vis[:1]).size[0] + 2 * 4
    with vtc.compress(m, {"stages": [{"method": "random", "layer": 1, "budget": 9}]}) as run:
        logits(m, inputs)
    groups = token_groups(run.stats, 0, num_tokens=[lay.num_tokens for lay in llm])
    assert [g.shape[0] for g in groups] == [36, 48] and sum(int((g >= 0).sum()) for g in groups) == 9
