"""InternVL specifics (the invariant matrix runs every method on it: tests/cases/internvl.py): the pixel-shuffle mapping
of the tower scores (a planted patch score makes its shuffled token the top one; the scores equal the model's own q /
k), the tiles read off the prompt (bad runs refused), ``<img>`` / ``</img>`` as text, the rebuilt prompt against the
real ``InternVLProcessor`` for the reduced count, the tile arrangement against the processor's rule, video prompts
from ``InternVLProcessor`` (frames = one-tile units, frame text never pruned, keep-all, decode consistency, the
rebuilt prompt for k), the ``vtc show`` picture (tiles in place, the thumbnail as the base panel), the from_pretrained
/ AutoProcessor / ``vtc generate`` / ``vtc show`` round trip, and the shipped configs."""

from __future__ import annotations

import functools

import pytest
import roundtrip
import torch
from PIL import Image
from replay import assert_cached_equals_uncached
from tf_compat import scatter_logits
from tiny_models_internvl import END, IMAGE, PER_TILE, START, TILE, internvl_inputs, tiny_internvl

import vtc
from vtc.layout import Grid, MultiCrop
from vtc.models import get_adapter
from vtc.models.internvl import InternViTScorer, InternVLAdapter, shuffle_scores, tile_grid
from vtc.viz import draw_kept, token_groups


@functools.cache
def model(attn: str = "sdpa", qk_norm: bool = False):
    return tiny_internvl(attn, qk_norm=qk_norm)


GEN = {"max_new_tokens": 3, "do_sample": False}


@torch.no_grad()
def logits(m, inputs, **kw):
    return m(**inputs, **kw).logits


def pooled_projection(m, inputs: dict) -> torch.Tensor:
    """The unwrapped model's own shuffled 4 x 4 features of every tile (what its projector reads), average-pooled 2 x 2
    and projected: the embeddings ``pool avg budget 4`` must hand the LLM."""
    seen = {}
    h = m.model.multi_modal_projector.register_forward_pre_hook(lambda mod, a: seen.__setitem__("x", a[0]))
    try:
        logits(m, inputs)
    finally:
        h.remove()
    x = seen["x"]  # (tiles, 16, 4C)
    pooled = torch.nn.functional.avg_pool2d(x.transpose(1, 2).reshape(x.shape[0], -1, 4, 4), 2).flatten(2)
    with torch.no_grad():
        return m.model.multi_modal_projector(pooled.transpose(1, 2))


def test_adapter_selected_and_geometry():
    ad = get_adapter(model())
    assert isinstance(ad, InternVLAdapter)
    assert (ad.patch_side, ad.token_side, ad.tokens_per_tile) == (8, 4, PER_TILE)
    inputs = internvl_inputs(model(), batch=3)
    assert ad.tiles(inputs["input_ids"], inputs) == [3, 1, 1]
    assert ad.unit_layouts(inputs, 0) == [Grid(4, 4)] * 3


# ---- scores and the pixel shuffle -------------------------------------------------------------------------------
def test_planted_patch_makes_its_shuffled_token_the_top_one():
    """Every one of the 8 x 8 patches in turn carries a high score: the top shuffled token is the one whose 2 x 2
    block holds it, and the model's pixel_shuffle puts that patch's features into that token's channels."""
    shuffle = model().model.pixel_shuffle
    planted = torch.eye(64) * 10 + torch.rand(64, 64) * 0.1  # unit u: patch u planted
    top = shuffle_scores(shuffle, planted, 8, 0.5, "sum").argmax(-1)
    r, c = torch.arange(64) // 8, torch.arange(64) % 8
    assert torch.equal(top, (r // 2) * 4 + c // 2)
    feats = torch.eye(64).view(64, 8, 8, 1)  # unit u: the feature lit at patch u only
    lit = shuffle(feats, scale_factor=0.5).reshape(64, 16, -1).abs().sum(-1).argmax(-1)
    assert torch.equal(lit, top)
    assert torch.equal(shuffle_scores(shuffle, torch.ones(2, 64, 3), 8, 0.5, "mean"), torch.ones(2, 16, 3))


def test_planted_score_end_to_end(monkeypatch):
    """Through vtc.compress: FasterVLM keeping 1 token per tile keeps the shuffled token of the planted patch."""
    m = model()
    inputs = internvl_inputs(m, batch=1)  # 3 tiles
    patches = torch.tensor([9, 46, 63])  # (1, 1) -> 0; (5, 6) -> 2*4+3 = 11; (7, 7) -> 15

    def planted(self):
        s = torch.rand(3, 64) * 0.01
        s[torch.arange(3), patches] = 1.0
        return s

    monkeypatch.setattr(InternViTScorer, "received_attention", planted)
    with vtc.compress(m, {"stages": [{"method": "fastervlm", "budget": 1}]}) as run:
        m(**inputs)
    [src] = run.stats.stages[0].sources
    assert torch.equal((src >= 0).int().argmax(-1), torch.tensor([0, 11, 15]))


@pytest.mark.parametrize("qk_norm", [False, True])
def test_scores_are_the_models_attention_mapped_through_the_shuffle(qk_norm):
    """received_attention / keys of the adapter == the mean-query attention and head-mean keys computed from the q, k
    the model's last tower block really produced (hooked), CLS dropped, 2 x 2 blocks summed / averaged."""
    m = model("eager", qk_norm)
    inputs = internvl_inputs(m, batch=1)
    ad = get_adapter(m)
    attn = m.model.vision_tower.encoder.layer[-1].attention
    seen = {}
    hooks = [attn.q_norm.register_forward_hook(lambda mod, a, out: seen.__setitem__("q", out)),
             attn.k_norm.register_forward_hook(lambda mod, a, out: seen.__setitem__("k", out))]
    try:
        with torch.no_grad():
            [group] = ad.encode_images(inputs)
            m.model.get_image_features(pixel_values=inputs["pixel_values"])
    finally:
        for h in hooks:
            h.remove()
    U, N, _ = seen["q"].shape
    q = seen["q"].view(U, N, 4, 8).transpose(1, 2)
    k = seen["k"].view(U, N, 4, 8).transpose(1, 2)
    probs = (q.mean(2, keepdim=True) @ k.transpose(-1, -2) * attn.scale).softmax(-1)[:, :, 0].mean(1)[:, 1:]
    ref = probs.view(U, 4, 2, 4, 2).sum((2, 4)).reshape(U, 16)
    torch.testing.assert_close(group.extras.received_attention(), ref, atol=1e-6, rtol=1e-5)
    keys = k.mean(1)[:, 1:].reshape(U, 4, 2, 4, 2, 8).mean((2, 4)).reshape(U, 16, 8)
    torch.testing.assert_close(group.extras.keys(), keys, atol=1e-6, rtol=1e-5)
    # the features are the model's shuffled features (what its projector reads)
    with torch.no_grad():
        ref_emb = m.model.get_image_features(pixel_values=inputs["pixel_values"]).pooler_output
        torch.testing.assert_close(ad.project(group.features), ref_emb)


def test_cls_only_stages_refused_at_attach():
    with pytest.raises(vtc.ConfigError, match="CLS attention row is not a trained score"):
        vtc.compress(model(), {"stages": [{"method": "pool", "mode": "cluster", "budget": 4, "weights": "cls"}]})


# ---- prompt -------------------------------------------------------------------------------------------------------
def test_img_tokens_are_text_and_images_are_runs():
    m = model()
    inputs = internvl_inputs(m, batch=2, images_per_row=2, tiles=[3, 1, 1, 3])
    ad = get_adapter(m)
    tm = ad.token_map(inputs["input_ids"], inputs)
    ids = inputs["input_ids"]
    assert not tm.is_visual[(ids == START) | (ids == END)].any() and not tm.protected.any()
    counts = torch.bincount(tm.image_id[tm.is_visual]).tolist()
    assert counts == [48, 16, 16, 48]
    with vtc.compress(m, {"stages": [{"method": "random", "budget": 2}]}) as run:
        captured = {}
        h = m.model.language_model.register_forward_pre_hook(
            lambda mod, a, kw: captured.update(kw), with_kwargs=True)
        try:
            with torch.no_grad():
                m(**inputs)
        finally:
            h.remove()
    assert run.stats.image_tokens == [6, 2, 2, 6]
    assert captured["inputs_embeds"].shape[1] == ids.shape[1] - 64 + 8  # both rows: 64 placeholders -> 8


def test_bad_prompts_are_errors():
    """A run of 2 tiles (the processor emits 1, or >= 2 tiles + a thumbnail), a run that is not whole tiles, and
    pixel_values with more tiles than the prompt holds: ConfigError before any stage runs."""
    m = model()
    two = internvl_inputs(m, batch=1, tiles=[2])
    ragged = internvl_inputs(m, batch=1, tiles=[3, 1], images_per_row=2)
    ids = ragged["input_ids"].clone()
    pos = (ids[0] == IMAGE).nonzero().flatten()
    ids[0, pos[47]] = 5  # runs of 47 and 17 placeholders: the total (4 tiles) still matches
    ids[0, pos[-1] + 1] = IMAGE
    one = internvl_inputs(m, batch=1, tiles=[1])
    extra = dict(one, pixel_values=torch.cat([one["pixel_values"]] * 3))
    for bad, match in ((two, "in row 0: a run of image placeholder tokens holds 32, which is not one image"),
                       (dict(ragged, input_ids=ids), "holds 47, which is not one image"),
                       (extra, "do not match, tokens: 16, features: 48")):
        with vtc.compress(m, {"stages": [{"method": "random", "budget": 4}]}):
            with pytest.raises(vtc.ConfigError, match=match):
                m(**bad)


@pytest.mark.parametrize("size", [(40, 90), (90, 40), (30, 30), (33, 200), (200, 61), (64, 64), (50, 110)])
@pytest.mark.parametrize("top", [4, 6, 12])
def test_tile_grid_is_the_processors_choice(size, top):
    """tile_grid over 1..top tiles == the image processor's canvas; and given only the resulting tile count (what
    the prompt tells), it re-derives the same canvas."""
    from transformers.models.got_ocr2.image_processing_got_ocr2 import get_optimal_tiled_canvas

    ref = get_optimal_tiled_canvas(size, (TILE, TILE), 1, top)
    assert tile_grid(size, TILE, range(1, top + 1)) == tuple(ref)
    assert tile_grid(size, TILE, [ref[0] * ref[1]]) == tuple(ref)


# ---- the real processor ---------------------------------------------------------------------------------------------
TEMPLATE = ("{% for m in messages %}{% if m['role'] == 'user' %}USER: {% for c in m['content'] %}"
            "{% if c['type'] == 'image' %}<IMG_CONTEXT>{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}"
            "{% endfor %}{% endif %}{% endfor %}{% if add_generation_prompt %} ASSISTANT:{% endif %}")


def _processor(per_tile: int = PER_TILE):
    from transformers import GotOcr2ImageProcessor, InternVLProcessor, InternVLVideoProcessor

    fast = roundtrip.word_tokenizer(["<img>", "<IMG_CONTEXT>", "</img>", "<video>"], start_image_token="<img>",
                          context_image_token="<IMG_CONTEXT>", end_image_token="</img>", video_token="<video>")
    size = {"height": TILE, "width": TILE}
    return InternVLProcessor(image_processor=GotOcr2ImageProcessor(size=size, crop_to_patches=True, max_patches=4),
                             video_processor=InternVLVideoProcessor(size=size), tokenizer=fast,
                             image_seq_length=per_tile, chat_template=TEMPLATE)


def _model_for_processor():
    m = tiny_internvl("sdpa")
    m.config.image_token_id = 5
    m.generation_config.suppress_tokens = [2, 4, 5, 6, 7]
    return m


def test_vision_side_prompt_equals_processor_prompt_for_k_tokens():
    """pool avg to 2 x 2 per tile on a 3-tile image: the LLM gets exactly what the processor's prompt for 4 tokens
    per tile (<img> + 12 <IMG_CONTEXT> + </img>) with the model's shuffled features pooled 2 x 2 and projected
    gives; generate returns [prompt, new]."""
    m = _model_for_processor()
    text = "USER: <IMG_CONTEXT> what colour ? ASSISTANT:"
    inputs = _processor()(images=roundtrip.random_image(40, 90), text=text, return_tensors="pt")
    assert inputs["pixel_values"].shape[0] == 3 and int((inputs["input_ids"] == 5).sum()) == 48
    with vtc.compress(m, {"stages": [{"method": "pool", "mode": "avg", "budget": 4}]}):
        out = logits(m, inputs)
        seq = m.generate(**inputs, max_new_tokens=3, do_sample=False)
    emb = pooled_projection(m, inputs)  # (3 tiles x 4, D)
    small = _processor(per_tile=4)(images=roundtrip.random_image(40, 90), text=text, return_tensors="pt")
    assert int((small["input_ids"] == 5).sum()) == 12
    ref = scatter_logits(m, small["input_ids"], small["attention_mask"], emb, m.config.image_token_id)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    ids = inputs["input_ids"][0]
    assert seq.shape[1] == ids.shape[0] + 3 and torch.equal(seq[0, :ids.shape[0]], ids)


# ---- video ----------------------------------------------------------------------------------------------------------
#: a batch of a video row (3 frames: "Frame1: <img> 16 x <IMG_CONTEXT> </img>" ... as InternVLProcessor writes it) and
#: an image row (40 x 90 px: 2 x 1 tiles + the thumbnail), left-padded
VIDEO_TEXTS = ["USER: <video> what happens ? ASSISTANT:", "USER: <IMG_CONTEXT> what colour ? ASSISTANT:"]


def _video_inputs(per_tile: int = PER_TILE, frames: int = 3) -> dict:
    import numpy as np

    video = (np.random.default_rng(1).random((frames, 40, 50, 3)) * 255).astype("uint8")  # frames as arrays
    return _processor(per_tile)(videos=[video], images=[roundtrip.random_image(40, 90)], text=VIDEO_TEXTS,
                                padding=True, return_tensors="pt")


def _row(inputs: dict, b: int, tiles: list[int]) -> dict:
    """Row b of the video batch alone, unpadded (its tiles out of the flat pixel_values)."""
    keep = inputs["attention_mask"][b].bool()
    start = sum(tiles[:b])
    return {"input_ids": inputs["input_ids"][b:b + 1, keep], "attention_mask": inputs["attention_mask"][b:b + 1, keep],
            "pixel_values": inputs["pixel_values"][start:start + tiles[b]]}


def test_video_frames_are_one_tile_units_and_frame_text_is_text():
    """InternVLProcessor's video prompt: every frame is its own <img> ... </img> run of one tile after its "FrameN:"
    text. Units = frames (one Grid(4, 4) each, drawn without an image size); the frame text is never visual, never
    pruned, never counted; an int budget is per frame on both sides (vision: per tile; LLM: per image = per frame,
    so the video row keeps 3 x k); the padded batch gives each row what it gives alone."""
    m = _model_for_processor()
    inputs = _video_inputs()
    ids = inputs["input_ids"]
    assert inputs["pixel_values"].shape[0] == 6  # 3 frames + 3 tiles of the image
    ad = get_adapter(m)
    assert ad.tiles(ids, inputs) == [1, 1, 1, 3]
    assert [ad.unit_layouts(inputs, i) for i in range(3)] == [[Grid(4, 4)]] * 3
    assert ad.picture_layouts(inputs, 1) == [Grid(4, 4)]  # a frame needs no vtc_image_sizes
    tm = ad.token_map(ids, inputs)
    assert torch.equal(tm.is_visual, ids == 5) and not tm.protected.any()
    assert torch.bincount(tm.image_id[tm.is_visual]).tolist() == [16, 16, 16, 48]
    text = (ids != 5) & inputs["attention_mask"].bool()
    starts = (ids[0] == 4).nonzero().flatten()  # every frame's <img> follows its "FrameN:" text ('<unk>' ':' here)
    assert len(starts) == 3 and (ids[0, starts - 1] == 8).all() and (ids[0, starts - 2] == 3).all()
    for stage, counts in (({"method": "fastervlm", "budget": 5}, [5, 5, 5, 15]),
                          ({"method": "fastv", "layer": 1, "budget": 5}, [15, 5])):
        with vtc.compress(m, {"stages": [stage]}) as run:
            out = logits(m, inputs)[:, -1]
        st = run.stats.stages[0]
        if st.side == "vision":
            assert run.stats.image_tokens == counts
        else:
            assert st.tokens_out == counts
            for b in range(2):  # every text position (the frame text included) survives the cut
                kept = set(st.kept_positions[b][st.kept_valid[b]].tolist())
                assert set(text[b].nonzero().flatten().tolist()) <= kept
        for b in range(2):
            with vtc.compress(m, {"stages": [stage]}):
                alone = logits(m, _row(inputs, b, [3, 3]))[0, -1]
            torch.testing.assert_close(alone, out[b], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("stage", [{"method": "fastervlm", "budget": 1.0}, {"method": "divprune", "budget": 1.0},
                                   {"method": "fastv", "layer": 2, "budget": 1.0},
                                   {"method": "pdrop", "layers": [1, 2, 3], "keep": [1.0, 1.0, 1.0]}],
                         ids=lambda s: s["method"])
def test_video_keep_all_is_the_model(stage):
    """A stage that keeps every token gives the model's own logits and generate output on the video batch."""
    m = _model_for_processor()
    inputs = _video_inputs()
    ref = logits(m, inputs)
    ref_gen = m.generate(**inputs, **GEN)
    with vtc.compress(m, {"stages": [stage]}):
        out = logits(m, inputs)
        gen = m.generate(**inputs, **GEN)
    assert torch.equal(out, ref)
    assert torch.equal(gen, ref_gen)


@pytest.mark.parametrize("stages", [[{"method": "fastv", "layer": 2, "budget": 5}],
                                    [{"method": "fastervlm", "budget": 8},
                                     {"method": "pdrop", "layers": [1, 3], "keep": [0.5, 0.25]}]],
                         ids=["fastv", "fastervlm+pdrop"])
def test_video_cached_decode_equals_uncached(stages):
    """Cached greedy decoding of the video batch after pruning == recomputing every step without a cache over the
    same kept tokens (the LLM-side selections replayed)."""
    m = _model_for_processor()
    inputs = _video_inputs()
    config = {"stages": stages}
    with vtc.compress(m, config) as run:
        cached = m.generate(**inputs, **GEN, output_logits=True, return_dict_in_generate=True)
    assert_cached_equals_uncached(m, config, inputs, cached, stats=run.stats, key=f"internvl-video-{len(stages)}")


def test_video_vision_side_prompt_equals_processor_prompt_for_k_tokens():
    """pool avg to 2 x 2 per tile on the video batch: the LLM gets exactly what InternVLProcessor's prompt for 4 tokens
    per tile gives (every frame "FrameN: <img> 4 x <IMG_CONTEXT> </img>", the image's tiles 4 each) with the model's
    shuffled features pooled 2 x 2 and projected; generate returns [prompt, new]."""
    m = _model_for_processor()
    inputs = _video_inputs()
    with vtc.compress(m, {"stages": [{"method": "pool", "mode": "avg", "budget": 4}]}):
        out = logits(m, inputs)
        seq = m.generate(**inputs, **GEN)
    emb = pooled_projection(m, inputs)  # frames and tiles in prompt order
    small = _video_inputs(per_tile=4)
    assert (small["input_ids"] == 5).sum(-1).tolist() == [12, 12]
    ref = scatter_logits(m, small["input_ids"], small["attention_mask"], emb, m.config.image_token_id)
    # the reduced prompt is shorter than the padded original: compare each row's real positions
    for b in range(2):
        n = int(small["attention_mask"][b].sum())
        torch.testing.assert_close(out[b, -n:], ref[b, -n:], atol=1e-5, rtol=1e-5)
    L = inputs["input_ids"].shape[1]
    assert seq.shape[1] == L + GEN["max_new_tokens"] and torch.equal(seq[:, :L], inputs["input_ids"])


def test_show_picture_tiles_in_place_and_thumbnail_as_base():
    """A 40 x 80 image: 2 x 1 tiles + the thumbnail. The picture's first panel (the whole image) shows the thumbnail's
    kept tokens (the image's last unit), the second the two tiles side by side, every cell where it is."""
    m = model()
    inputs = internvl_inputs(m, batch=1)
    ad = get_adapter(m)
    with pytest.raises(vtc.ConfigError, match="vtc_image_sizes"):
        ad.picture_layouts(inputs, 0)
    [layout] = ad.picture_layouts(dict(inputs, vtc_image_sizes=[(40, 80)]), 0)
    assert layout == MultiCrop(Grid(4, 4), (Grid(4, 4), Grid(4, 4)), 1, 2, base_last=True)
    assert layout.parts[-1] is layout.base
    with vtc.compress(m, {"stages": [{"method": "fastervlm", "budget": 5}]}) as run:
        m(**inputs)
    groups = token_groups(run.stats, 0)
    assert [int((g >= 0).sum()) for g in groups] == [5, 5, 5]
    assert len({tuple((g >= 0).tolist()) for g in groups}) > 1  # the units differ: the test can tell them apart
    grey = (200, 200, 200)
    pic = draw_kept(Image.new("RGB", (80, 40), grey), groups, [layout], size=80)

    def kept(px) -> bool:
        return all(abs(a - b) <= 40 for a, b in zip(px, grey))

    thumb = groups[2].view(4, 4)
    tiled = torch.cat([groups[0].view(4, 4), groups[1].view(4, 4)], dim=1)
    for r in range(4):
        for c in range(4):  # base panel: 80 x 40, cells 20 x 10
            assert kept(pic.getpixel((c * 20 + 10, r * 10 + 5))) == bool(thumb[r, c] >= 0), ("thumb", r, c)
        for c in range(8):  # crops panel after 4 px: 8 x 4 cells of 10 x 10
            assert kept(pic.getpixel((84 + c * 10 + 5, r * 10 + 5))) == bool(tiled[r, c] >= 0), ("tiles", r, c)


# ---- from_pretrained round trip ---------------------------------------------------------------------------------
def test_from_pretrained_roundtrip_and_cli(tmp_path, capsys):

    roundtrip.save_checkpoint(tmp_path, _model_for_processor(), _processor(), roundtrip.random_image(40, 90))
    m, inputs = roundtrip.load_checkpoint(tmp_path, "USER: <IMG_CONTEXT> what colour ? ASSISTANT:")
    assert inputs["pixel_values"].shape[0] == 3
    assert roundtrip.first_stage_counts(m, inputs, {"method": "fastv", "layer": 1, "budget": 4}) == [4]
    roundtrip.cli_generate(tmp_path, "{method: visionzip, budget: 6}")
    out = roundtrip.cli_show(tmp_path, "{method: fastervlm, budget: 5}")
    assert "48 -> 15 visual tokens" in capsys.readouterr().out  # 5 kept in each of the 3 tiles
    pic = Image.open(out)
    assert pic.width > 336  # the thumbnail panel and the tiles panel side by side


@functools.cache
def deep_model():
    return tiny_internvl("sdpa", layers=roundtrip.config_depth("internvl3"))  # room for the configs' deepest layers


test_shipped_configs_run = roundtrip.shipped_configs_test(
    "internvl3", deep_model, lambda m: internvl_inputs(m, batch=2))
