"""LLaVA-OneVision specifics (the invariant matrix runs every method on it: tests/cases/llava_onevision.py):
anyres_max packing and counts against the model, multi-image rows, video (frames pooled 2x2, one newline per video,
per-frame budgets on both sides), SigLIP refusals, drawing layouts, and the from_pretrained / AutoProcessor /
``vtc generate`` round trip."""

from __future__ import annotations

import functools

import pytest
import roundtrip
import torch
from tiny_models_onevision import CROP, IMAGE, PINPOINTS, VIDEO, num_image_tokens, onevision_inputs, tiny_onevision

import vtc
from vtc.layout import Grid, MultiCrop
from vtc.models.llava_onevision import LlavaOnevisionAdapter, pool_scores

GEN = {"max_new_tokens": 3, "do_sample": False, "pad_token_id": 0}


@functools.cache
def model(aspect: str = "anyres_max_1", attn: str = "sdpa"):
    return tiny_onevision(attn, aspect=aspect)


@functools.cache
def deep_model():
    return tiny_onevision("sdpa", layers=roundtrip.config_depth("llava-onevision"))  # the configs' deepest layers


@torch.no_grad()
def logits(m, inputs, **kw):
    return m(**inputs, **kw).logits


def test_adapter_selected():
    assert isinstance(vtc.models.get_adapter(model()), LlavaOnevisionAdapter)


@pytest.mark.parametrize("aspect", ["anyres_max_1", "anyres_max_9"])
@pytest.mark.parametrize("size", [(30, 90), (90, 30), (40, 90), (90, 90), (20, 40)])
def test_counts_and_newlines_match_the_model(aspect, size):
    """Per-image counts = the processor's formula = the model's packed lengths; newline flags = the rows where the
    model put its image_newline vector (incl. the bilinear shrink of anyres_max)."""
    m = model(aspect)
    inputs = onevision_inputs(m, sizes=[size])
    ad = LlavaOnevisionAdapter(m)
    with torch.no_grad():
        packed = m.model.get_image_features(inputs["pixel_values"], inputs["image_sizes"]).pooler_output
    assert ad.tokens_per_image(inputs) == [num_image_tokens(size, aspect)] == [packed[0].shape[0]]
    tm = ad.token_map(inputs["input_ids"], inputs)
    nl = (packed[0] == m.model.image_newline).all(-1)
    assert torch.equal(tm.protected[tm.is_visual], nl)
    assert torch.equal(ad._newline_rows(list(packed)), nl)  # the generate path (mm_encoder_outputs) agrees


def test_shrink_happens_and_identity_is_exact():
    m = model()
    g = LlavaOnevisionAdapter(m).geometries(onevision_inputs(m, sizes=[(30, 90)]))[0]
    assert g.packed(6, 6) == (3, 10) and g.unpadded(6, 6) == (1, 5, 0, 12)
    inputs = onevision_inputs(m, batch=3)
    ref = logits(m, inputs)
    for stage in ({"method": "random", "budget": 1.0}, {"method": "pool", "mode": "avg", "budget": 1.0}):
        with vtc.compress(m, {"stages": [stage]}):
            assert torch.equal(logits(m, inputs), ref)


@pytest.mark.parametrize("kind", ["multi", "video"])
def test_identity_multi_image_and_video(kind):
    m = model()
    inputs = onevision_inputs(m, batch=2, multi=2) if kind == "multi" else onevision_inputs(m, batch=2, videos=[4, 4])
    ref = logits(m, inputs)
    ref_gen = m.generate(**inputs, **GEN)
    for stage in ({"method": "random", "budget": 1.0}, {"method": "fastv", "layer": 2, "budget": 1.0}):
        with vtc.compress(m, {"stages": [stage]}):
            torch.testing.assert_close(logits(m, inputs), ref, atol=1e-5, rtol=1e-5)
            assert torch.equal(m.generate(**inputs, **GEN), ref_gen)


def test_units_in_sequence_order_and_video_newline():
    """Row 0: image then video (4 frames); row 1: the same. Units: image, 4 frames, image, 4 frames in sequence
    order; the one newline of each video is protected and belongs to its last frame."""
    m = model()
    inputs = onevision_inputs(m, batch=2, videos=[4, 4])
    tm = LlavaOnevisionAdapter(m).token_map(inputs["input_ids"], inputs)
    ids = inputs["input_ids"]
    for b in range(2):
        ranks = tm.image_id[b][tm.is_visual[b]]
        assert torch.equal(ranks.unique_consecutive(), torch.arange(5) + 5 * b)
        vid = ids[b] == VIDEO
        assert torch.equal(tm.protected[b] & vid, vid & (torch.arange(ids.shape[1]) == vid.nonzero().max()))
        assert [int((tm.image_id[b] == 5 * b + f).sum()) for f in range(1, 5)] == [9, 9, 9, 10]


def test_video_scores_map_through_the_model_pooling():
    """A pooled token's score / key is the model's own bilinear 2x2 pooling of its patches' values."""
    m = model()
    x = torch.randn(5, 36, 7)
    torch.testing.assert_close(pool_scores(x, 6, 6), m.model.apply_pooling(x))
    torch.testing.assert_close(pool_scores(x[..., 0], 6, 6), m.model.apply_pooling(x[..., :1])[..., 0])


@pytest.mark.parametrize("stage,per_frame", [({"method": "random", "budget": 4}, 4),
                                              ({"method": "visionzip", "budget": 5}, 5),
                                              ({"method": "pool", "mode": "avg", "budget": 4}, 4),
                                              ({"method": "fastv", "layer": 2, "budget": 3}, 3)])
def test_video_per_frame_budgets_batch_and_decode(stage, per_frame):
    """k per frame on both sides; the newline stays; batch of 2 (image + video rows) = each row alone; cached
    decoding = uncached recomputation (LLM side)."""
    m = model()
    inputs = onevision_inputs(m, batch=2, videos=[4, 4])
    with vtc.compress(m, {"stages": [stage]}) as run:
        out = logits(m, inputs)[:, -1]
        st = run.stats.stages[0]
        frame_counts = st.tokens_out if st.side == "llm" else st.tokens_out[-8:]
        if st.side == "llm":  # per-sample totals: image (per-image budget) + 4 frames
            n_img = [int((inputs["input_ids"][b] == IMAGE).sum() - 3) for b in range(2)]  # 3 newlines
            assert frame_counts == [min(per_frame, n_img[b]) + 4 * per_frame for b in range(2)]
        else:
            assert frame_counts == [per_frame] * 8
        for b in range(2):
            row = {k: v[b:b + 1] for k, v in inputs.items()}
            keep = row["attention_mask"][0].bool()
            row["input_ids"], row["attention_mask"] = row["input_ids"][:, keep], row["attention_mask"][:, keep]
            torch.testing.assert_close(logits(m, row)[0, -1], out[b], atol=1e-4, rtol=1e-4)
    if st.side == "llm":
        from replay import assert_cached_equals_uncached

        config = {"stages": [stage]}
        with vtc.compress(m, config) as run:
            cached = m.generate(**inputs, **GEN, output_logits=True, return_dict_in_generate=True)
        assert_cached_equals_uncached(m, config, inputs, cached, stats=run.stats, key=f"ov-video-{stage['method']}")


@pytest.mark.parametrize("size", [(30, 90), (90, 90)])
def test_grid_outputs_packed_with_the_model_rule(size):
    """downsample to 4 x 4 per crop: base 16 + the crop map at the reduced resolution, unpadded and anyres_max
    shrunk by the model's rule, + one newline per row (counted independently with the processor's formula at a
    4 px patch grid, which gives the same 4 x 4 crop grids)."""
    m = model()
    inputs = onevision_inputs(m, sizes=[size])
    with vtc.compress(m, {"stages": [{"method": "downsample", "budget": 16}]}) as run:
        logits(m, inputs)
    assert run.stats.image_tokens == [num_image_tokens(size, "anyres_max_1", patch=CROP // 4)]


def test_multi_image_rows_feed_base_crops_only():
    m = model()
    inputs = onevision_inputs(m, batch=2, multi=2)
    ad = LlavaOnevisionAdapter(m)
    assert ad.tokens_per_image(inputs) == [37] * 4
    assert ad.picture_layouts(inputs, 1) == [Grid(6, 6)]
    with vtc.compress(m, {"stages": [{"method": "visionzip", "budget": 8}]}) as run:
        logits(m, inputs)
    assert run.stats.image_tokens == [9] * 4  # 8 + the newline


def test_cls_only_methods_refused_at_attach():
    m = model()
    with pytest.raises(vtc.ConfigError, match="no CLS token"):
        vtc.compress(m, {"stages": [{"method": "pool", "mode": "cluster", "budget": 5, "weights": "cls"}]})
    assert not hasattr(m, "_vtc_run")


def test_drawing_layouts_match_the_tokens():
    m = model()
    inputs = onevision_inputs(m, sizes=[(30, 90)])
    ad = LlavaOnevisionAdapter(m)
    (mc,) = ad.picture_layouts(inputs, 0)
    assert isinstance(mc, MultiCrop) and (mc.crop_rows, mc.crop_cols) == (1, 2) and mc.image_box == (1, 5, 0, 12)
    llm = ad.picture_layouts(inputs, 0, "llm")
    assert llm == [Grid(6, 6), Grid(3, 10)]
    with vtc.compress(m, {"stages": [{"method": "fastv", "layer": 1, "budget": 0.5}]}) as run:
        logits(m, inputs)
    assert run.stats.stages[0].tokens_in == [sum(g.num_tokens for g in llm)]


# ---- from_pretrained round trip -------------------------------------------------------------------------------
def _checkpoint(path):
    from transformers import LlavaOnevisionImageProcessor, LlavaOnevisionProcessor, LlavaOnevisionVideoProcessor

    from vtc.demo.build import CHAT_TEMPLATE, build_tokenizer

    tok = build_tokenizer()
    tok.add_special_tokens({"additional_special_tokens": ["<image>", "<video>"]})
    image_id, video_id = tok.convert_tokens_to_ids(["<image>", "<video>"])
    m = tiny_onevision("sdpa")
    m.config.image_token_id, m.config.video_token_id = image_id, video_id
    m.generation_config.suppress_tokens = [image_id, video_id]
    proc = LlavaOnevisionProcessor(
        image_processor=LlavaOnevisionImageProcessor(size={"height": CROP, "width": CROP}, image_grid_pinpoints=PINPOINTS),
        video_processor=LlavaOnevisionVideoProcessor(size={"height": CROP, "width": CROP}), tokenizer=tok,
        num_image_tokens=36, vision_feature_select_strategy="full", chat_template=CHAT_TEMPLATE,
        vision_aspect_ratio=m.config.vision_aspect_ratio)
    roundtrip.save_checkpoint(path, m, proc, roundtrip.random_image(30, 90))


def test_from_pretrained_roundtrip_and_cli(tmp_path):
    _checkpoint(tmp_path)
    m, inputs = roundtrip.load_checkpoint(tmp_path, "USER: <image>\nwhat colour ? ASSISTANT:")
    stage = {"method": "visionzip", "budget": 8}
    with vtc.compress(m, {"stages": [stage]}) as run:
        m.generate(**inputs, **GEN)
    assert run.stats.stages[0].tokens_out == [8, 8, 8]
    roundtrip.cli_generate(tmp_path, "{method: visionzip, budget: 8}")


test_shipped_configs_run_on_images_and_video = roundtrip.shipped_configs_test(
    "llava-onevision", deep_model, lambda m: onevision_inputs(m, batch=2, videos=[2, 2]), **GEN)


def test_show_pictures_the_shrunk_crop_map_by_pixels():
    """LLM side: the base grid, then the 3 x 10 crop map (after the anyres_max shrink) over the image: dropped
    cells dark, kept cells the image's grey."""
    from PIL import Image

    from vtc.viz import _fit, draw_kept, token_groups

    m = model()
    inputs = onevision_inputs(m, sizes=[(30, 90)])
    llm = LlavaOnevisionAdapter(m).picture_layouts(inputs, 0, "llm")
    with vtc.compress(m, {"stages": [{"method": "random", "layer": 1, "budget": 20}]}) as run:
        logits(m, inputs)
    groups = token_groups(run.stats, 0, num_tokens=[lay.num_tokens for lay in llm])
    crop_map = groups[1].view(3, 10)
    assert 0 < int((crop_map >= 0).sum()) < 30
    out = draw_kept(Image.new("RGB", (90, 30), (200, 200, 200)), groups, llm, size=120)
    pw, ph = _fit(3, 10, 120)
    for r in range(3):
        for c in range(10):
            px = out.getpixel((124 + int((c + 0.5) * pw / 10), int((r + 0.5) * ph / 3)))
            assert (max(px) < 80) == bool(crop_map[r, c] < 0), (r, c, px)
