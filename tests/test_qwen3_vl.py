"""Qwen3-VL: what only this family does (the invariant matrix runs every method case on it: tests/cases/qwen3_vl.py).

DeepStack on both sides (vision-side stages reduce every level with the main tokens' Reduction; LLM-side stages at
layers that still receive DeepStack input slice it to the survivors), interleaved M-RoPE, q / k norm in the
re-projection, video frame groups between timestamps, the processor's prompt for the reduced count, the MoE build,
and the from_pretrained / ``vtc generate`` round trip.
"""

from __future__ import annotations

import functools

import pytest
import roundtrip
import torch
from replay import assert_cached_equals_uncached
from test_qwen2_vl import logits, rope_positions
from tf_compat import (
    encoded_logits,
    fed_through_getters_equals_mm_encoder_outputs,
    vision_side_generate_rows_equal_single,
)
from tiny_models_qwen import IMAGE, VIDEO
from tiny_models_qwen3 import (
    TS,
    build_inputs3,
    qwen3_inputs,
    qwen3_video_inputs,
    split_row3,
    tiny_qwen3_vl,
    tiny_qwen3_vl_moe,
)

import vtc
from vtc.layout import Grid
from vtc.models import get_adapter
from vtc.models.qwen3_vl import Qwen3VLAdapter
from vtc.models.qwen_vision import compose_mrope_interleaved
from vtc.scoring import attention_probs

GEN = {"max_new_tokens": 4, "do_sample": False, "pad_token_id": 0}
BUILD = {"dense": tiny_qwen3_vl, "moe": tiny_qwen3_vl_moe}


@functools.cache
def model_for(kind: str = "dense", attn: str = "sdpa"):
    return BUILD[kind](attn)


# ---- adapter, positions, re-projection ------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", list(BUILD))
def test_adapter_selected(kind):
    adapter = get_adapter(model_for(kind))
    assert isinstance(adapter, Qwen3VLAdapter) and adapter.deepstack_levels == 3
    with pytest.raises(vtc.ConfigError, match="video_units"):
        Qwen3VLAdapter(model_for(kind), video_units="video")


def test_interleaved_mrope_matches_the_model_rotary():
    model = model_for()
    rot = model.model.language_model.rotary_emb
    pos = torch.randint(0, 50, (3, 2, 9))
    x = torch.zeros(1, dtype=torch.float32)
    cos_ref, sin_ref = rot(x, pos)
    freqs = pos[..., None].float() * rot.inv_freq
    emb = torch.cat([freqs, freqs], dim=-1)  # the per-axis (3, B, N, d) table
    sec = get_adapter(model)._mrope_section()
    torch.testing.assert_close(compose_mrope_interleaved(emb.cos(), sec), cos_ref)
    torch.testing.assert_close(compose_mrope_interleaved(emb.sin(), sec), sin_ref)


@pytest.mark.parametrize("video", [False, True])
def test_project_qk_equals_eager_attention(video):
    """FastV's re-projected last row (q / k norm, interleaved M-RoPE) == the eager attention row of the model, at
    layers before and after DeepStack adds (the layers' real inputs, captured)."""
    model = model_for("dense", "eager")
    inp = (qwen3_video_inputs if video else qwen3_inputs)(model, batch=1, seed=3)
    seen = {}
    layers = model.model.language_model.layers
    handles = [layer.register_forward_pre_hook(
        lambda m, a, k, i=i: seen.__setitem__(i, (a[0] if a else k["hidden_states"], k["position_embeddings"])),
        with_kwargs=True) for i, layer in enumerate(layers)]
    try:
        out = model(**inp, output_attentions=True)
    finally:
        for h in handles:
            h.remove()
    adapter = get_adapter(model)
    for layer in (0, 2, 3):
        h, pe = seen[layer]
        q, k = adapter.project_qk(layer, h, pe, torch.tensor([[h.shape[1] - 1]]))
        probs = attention_probs(q, k, None, adapter.attention_scale(layer))
        torch.testing.assert_close(probs[:, :, 0], out.attentions[layer][:, :, -1], atol=1e-5, rtol=1e-4)


# ---- DeepStack, vision side ---------------------------------------------------------------------------------------
@torch.no_grad()
def _tower(model, inp):
    out = model.model.get_image_features(inp["pixel_values"], inp["image_grid_thw"])
    levels = out.deepstack_features  # per image on transformers >= 5.18, one tensor on 5.17
    return torch.cat(out.pooler_output), [level if torch.is_tensor(level) else torch.cat(level) for level in levels]


def _pool2x2(x: torch.Tensor, side: int) -> torch.Tensor:
    """(side^2, D) raster grid -> ((side/2)^2, D) means of 2x2 windows."""
    D = x.shape[-1]
    return x.view(side // 2, 2, side // 2, 2, D).mean((1, 3)).reshape(-1, D)


@pytest.mark.parametrize("kind", list(BUILD))
def test_vision_pool_reduces_every_deepstack_level_alike(kind):
    """pool avg 4x4 -> 2x2 on one image: vtc's logits == the model fed the processor-style prompt with 4 placeholders
    and, as main and DeepStack features, the same 2x2 means of the model's own main and level features (positions:
    each window's anchor triple)."""
    from transformers.models.qwen3_vl.modeling_qwen3_vl import BaseModelOutputWithDeepstackFeatures

    model = model_for(kind)
    inp = qwen3_inputs(model, batch=1)
    with vtc.compress(model, {"stages": [{"method": "random", "budget": 1.0}]}):
        assert torch.equal(logits(model, inp), logits_plain(model, inp))  # keep-all: the model's own features
    with vtc.compress(model, {"stages": [{"method": "pool", "mode": "avg", "budget": 4}]}) as run:
        out = logits(model, inp)
        prompt = run._reduce_prompt(inp)
    main, levels = _tower(model, inp)
    ids = inp["input_ids"][0]
    first = int((ids == IMAGE).nonzero()[0])
    new_ids = torch.cat([ids[:first + 4], ids[first + 16:]])[None]
    assert torch.equal(prompt.input_ids, new_ids)
    enc = BaseModelOutputWithDeepstackFeatures(pooler_output=[_pool2x2(main, 4)],
                                               deepstack_features=[[_pool2x2(lv, 4)] for lv in levels])
    ref = encoded_logits(model, {"image": enc}, input_ids=new_ids, attention_mask=torch.ones_like(new_ids),
                         position_ids=prompt.position_ids)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    plain = BaseModelOutputWithDeepstackFeatures(pooler_output=[_pool2x2(main, 4)],
                                                 deepstack_features=[[lv[:4]] for lv in levels])
    other = encoded_logits(model, {"image": plain}, input_ids=new_ids, attention_mask=torch.ones_like(new_ids),
                           position_ids=prompt.position_ids)
    assert not torch.allclose(out, other, atol=1e-4)  # the levels matter: they must be pooled, not cut


@pytest.mark.parametrize("stage", [
    {"method": "pool", "mode": "avg", "budget": 4}, {"method": "pool", "mode": "max", "budget": 4},
    {"method": "pool", "mode": "attn", "budget": 4}, {"method": "pool", "mode": "cluster", "budget": 5},
    {"method": "downsample", "budget": 6}, {"method": "visionzip", "dominant": 4, "contextual": 2},
    {"method": "random", "budget": 5}], ids=lambda s: f"{s['method']}-{s.get('mode', '')}")
def test_combine_replays_the_main_features(stage):
    """Reduction.reduce_like on the main features gives exactly the method's own outputs, so the DeepStack levels
    (reduced by the same call) are merged / pooled with the same weights as the tokens they belong to."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 36, 8, generator=g)
    extras = {"received_attention": torch.rand(3, 36, generator=g), "keys": torch.randn(3, 36, 4, generator=g)}
    y, red = vtc.reduce_embeddings(x, Grid(6, 6), {"stages": [stage]}, extras=extras)
    torch.testing.assert_close(red.reduce_like(x), y, atol=1e-6, rtol=1e-6)


def test_reduce_like_without_combine_is_an_error():
    red = vtc.reduction.Reduction.select(torch.tensor([[0, 2]]), 4)
    red.features = torch.zeros(1, 2, 3)
    with pytest.raises(vtc.ConfigError, match="DeepStack"):
        red.reduce_like(torch.zeros(1, 4, 3), "DeepStack features")


# ---- DeepStack, LLM side --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", list(BUILD))
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_llm_stage_inside_deepstack_layers(kind, attn):
    """FastV at layer 1 (DeepStack reaches layers 0..2): keep-all == the unwrapped model (logits and generate);
    pruning: cached greedy generate == uncached recomputation over the same kept tokens, image and video batches."""
    model = model_for(kind, attn)
    for inp in (qwen3_inputs(model, batch=3), qwen3_video_inputs(model, batch=2)):
        with vtc.compress(model, {"stages": [{"method": "fastv", "layer": 1, "budget": 1.0}]}):
            assert torch.equal(logits(model, inp), logits_plain(model, inp))
            assert torch.equal(model.generate(**inp, **GEN), generate_plain(model, inp))
        config = vtc.load_config({"stages": [{"method": "fastv", "layer": 1, "budget": 4}]})
        with vtc.compress(model, config) as run:
            out = model.generate(**inp, **GEN, output_logits=True, return_dict_in_generate=True)
        assert_cached_equals_uncached(model, config, inp, out, stats=run.stats,
                                      key=f"qwen3-{kind}-{attn}-{inp['input_ids'].shape}")


def logits_plain(model, inp):
    return logits(model, inp)


def generate_plain(model, inp):
    return model.generate(**inp, **GEN)


def test_llm_stage_adds_deepstack_to_the_survivors():
    """Under a layer-1 stage, what vtc adds after layer 1 at the kept visual slots is exactly DeepStack level 1 of
    those tokens (the model's own level features, sliced to the survivors); text slots get nothing."""
    model = model_for()
    inp = qwen3_inputs(model, batch=1)
    _, levels = _tower(model, inp)
    layers = model.model.language_model.layers
    seen = {}
    with vtc.compress(model, {"stages": [{"method": "fastv", "layer": 1, "budget": 5}]}) as run:
        # prepended: layer 1's raw output (before vtc's DeepStack add), layer 2's input (after it)
        h1 = layers[1].register_forward_hook(lambda m, a, o: seen.__setitem__("raw", o), prepend=True)
        h2 = layers[2].register_forward_pre_hook(
            lambda m, a, k: seen.__setitem__("next", a[0] if a else k["hidden_states"]), with_kwargs=True, prepend=True)
        try:
            logits(model, inp)
        finally:
            h1.remove()
            h2.remove()
        st = run.stats.stages[0]
    kept = st.kept_positions[0][st.kept_valid[0]]  # original positions of the survivors
    ids = inp["input_ids"][0]
    vis = ids[kept] == IMAGE
    assert int(vis.sum()) == 5 and seen["raw"].shape[1] == kept.shape[0]
    added = (seen["next"] - seen["raw"])[0]
    rank = ((ids == IMAGE).cumsum(0) - 1)[kept[vis]]
    torch.testing.assert_close(added[vis], levels[1][rank], atol=1e-5, rtol=1e-5)
    assert torch.equal(added[~vis], torch.zeros_like(added[~vis]))


# ---- video: frame groups between timestamps -----------------------------------------------------------------------
def test_video_units_are_frame_groups_and_timestamps_are_text():
    model = model_for()
    inp = qwen3_video_inputs(model, batch=2)
    adapter = get_adapter(model)
    tm = adapter.token_map(inp["input_ids"], inp)
    ids = inp["input_ids"]
    assert not tm.is_visual[(ids == TS) | (ids == TS + 1)].any()  # timestamps are text, never candidates
    assert torch.equal(tm.is_visual, (ids == IMAGE) | (ids == VIDEO))
    # row 0: two frame groups (16 tokens each); row 1: an image (12) then two frame groups of 12
    counts = torch.bincount(tm.image_id[tm.is_visual]).tolist()
    assert counts == [16, 16, 12, 12, 12]
    assert adapter.unit_layouts(inp, 0) == [Grid(4, 4)] and adapter.unit_layouts(inp, 3) == [Grid(4, 3)]


def test_video_vision_side_prompt_is_the_processors_for_the_reduced_frames():
    """pool to 2x2 per frame group: the rebuilt prompt is what the processor writes for 2x2-token frames (each
    frame's run after its own timestamp, the timestamps unchanged), positions are the anchors' triples, and
    budget = all gives the unwrapped logits exactly."""
    model = model_for()
    inp = qwen3_video_inputs(model, batch=1)
    with vtc.compress(model, {"stages": [{"method": "pool", "mode": "avg", "budget": 4}]}) as run:
        prompt = run._reduce_prompt(inp)
        logits(model, inp)
        assert run.stats.stages[0].tokens_out == [4, 4]
    g = torch.Generator().manual_seed(0)
    text = torch.randint(3, 100, (6,), generator=g).tolist()  # qwen3_video_inputs' row 0 text, same draws
    small = build_inputs3([[text[:2], ("video", (2, 4, 4)), text[2:]]])
    assert torch.equal(prompt.input_ids, small["input_ids"])
    orig = rope_positions(model, inp)[:, 0]
    vis = (inp["input_ids"][0] == VIDEO)
    assert torch.equal(prompt.position_ids[:, 0, ~(prompt.input_ids[0] == VIDEO)], orig[:, ~vis])
    with vtc.compress(model, {"stages": [{"method": "random", "budget": 1.0}]}):
        assert torch.equal(logits(model, inp), logits_plain(model, inp))


@pytest.mark.parametrize("stage", [pytest.param({"method": "visionzip", "dominant": 6, "contextual": 2}, id="vision"),
                                   pytest.param({"method": "fastv", "layer": 2, "budget": 5}, id="llm")])
def test_video_batch_equals_single(stage):
    model = model_for()
    inp = qwen3_video_inputs(model, batch=2)
    with vtc.compress(model, {"stages": [stage]}):
        batched = logits(model, inp)[:, -1]
        for b in range(2):
            torch.testing.assert_close(logits(model, split_row3(inp, b))[0, -1], batched[b], atol=1e-4, rtol=1e-4)


# ---- the real processor, from_pretrained, vtc generate -----------------------------------------------------------
TEMPLATE = ("{% for m in messages %}{% if m['role'] == 'user' %}USER: {% for c in m['content'] %}"
            "{% if c['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>{% elif c['type'] == 'text' %}"
            "{{ c['text'] }}{% endif %}{% endfor %}{% endif %}{% endfor %}{% if add_generation_prompt %} ASSISTANT:"
            "{% endif %}")
SPECIALS = ["<pad>", "<s>", "</s>", "<unk>", "<|vision_start|>", "<|image_pad|>", "<|vision_end|>", "<|video_pad|>"]


def _processor():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast, Qwen2VLImageProcessor, Qwen3VLProcessor, Qwen3VLVideoProcessor

    from vtc.demo.task import vocabulary

    vocab = {t: i for i, t in enumerate(SPECIALS + vocabulary())}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Whitespace(), pre_tokenizers.Punctuation()])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token="<unk>", padding_side="left")
    fast.add_special_tokens({"additional_special_tokens": SPECIALS[4:]})
    sizes = dict(patch_size=4, merge_size=2, temporal_patch_size=2, size={"shortest_edge": 16 * 16, "longest_edge": 64 * 64})
    return Qwen3VLProcessor(image_processor=Qwen2VLImageProcessor(**sizes), tokenizer=fast,
                            video_processor=Qwen3VLVideoProcessor(**sizes), chat_template=TEMPLATE)


def _image(h: int, w: int):
    import numpy as np
    from PIL import Image

    return Image.fromarray((np.random.default_rng(h * w).random((h, w, 3)) * 255).astype("uint8"))


def _model_for_processor(proc):
    m = tiny_qwen3_vl("sdpa")
    ids = proc.tokenizer.convert_tokens_to_ids(SPECIALS[4:])
    assert len(proc.tokenizer) <= m.config.text_config.vocab_size
    m.config.vision_start_token_id, m.config.image_token_id, m.config.vision_end_token_id, m.config.video_token_id = ids
    m.generation_config.suppress_tokens = [2, *ids]
    return m


def test_vision_side_prompt_equals_the_processors_for_k_tokens():
    """A 32 x 32 image is 4 x 4 merged tokens; pool to 2 x 2: the LLM gets exactly the processor's prompt for a
    16 x 16 image (4 placeholders), built by the real Qwen3VLProcessor."""
    proc = _processor()
    m = _model_for_processor(proc)
    text = proc.apply_chat_template([{"role": "user", "content": [{"type": "image"}, {"type": "text",
                                                                                       "text": "what colour ?"}]}],
                                    add_generation_prompt=True)
    big = proc(images=_image(32, 32), text=text, return_tensors="pt")
    small = proc(images=_image(16, 16), text=text, return_tensors="pt")
    assert int((big["input_ids"] == m.config.image_token_id).sum()) == 16
    with vtc.compress(m, {"stages": [{"method": "pool", "mode": "avg", "budget": 4}]}) as run:
        prompt = run._reduce_prompt(dict(big))
        seq = m.generate(**big, max_new_tokens=3, do_sample=False)
    assert torch.equal(prompt.input_ids, small["input_ids"])
    assert seq.shape[1] == big["input_ids"].shape[1] + 3 and torch.equal(seq[:, :big["input_ids"].shape[1]],
                                                                       big["input_ids"])


def test_from_pretrained_roundtrip_and_cli(tmp_path):
    proc = _processor()
    roundtrip.save_checkpoint(tmp_path, _model_for_processor(proc), proc, _image(40, 60))
    m, inputs = roundtrip.load_checkpoint(tmp_path,
                                          "USER: <|vision_start|><|image_pad|><|vision_end|>what colour ? ASSISTANT:")
    assert type(get_adapter(m)) is Qwen3VLAdapter
    n = int((inputs["input_ids"] == m.config.image_token_id).sum())
    with vtc.compress(m, {"stages": [{"method": "fastv", "layer": 1, "budget": 4}]}) as run:
        m.generate(**inputs, max_new_tokens=3, do_sample=False)
    assert run.stats.stages[0].tokens_in == [n] and run.stats.stages[0].tokens_out == [4]
    roundtrip.cli_generate(tmp_path)


@functools.cache
def deep_model():
    return tiny_qwen3_vl("sdpa", layers=roundtrip.config_depth("qwen3-vl", at_least=4))  # the configs' deepest layers


test_shipped_configs_run = roundtrip.shipped_configs_test("qwen3-vl", deep_model, lambda m: qwen3_inputs(m, batch=2),
                                                          shrinks=True)


# ---- vtc show: the merged grid of an image / a frame group, checked by pixels -------------------------------------
@pytest.mark.parametrize("kind", ["image", "video"])
def test_show_draws_the_merged_grid(kind):
    from PIL import Image

    from vtc.viz import draw_kept, token_groups

    grey = (200, 200, 200)
    m = model_for()
    grid = (1, 8, 12) if kind == "image" else (2, 8, 12)  # patches; 2x2 merge -> 4 x 6 tokens per frame group
    inputs = build_inputs3([[[5, 6], (kind, grid), [7, 8, 9]]])
    ad = get_adapter(m)
    unit = 0 if kind == "image" else 1  # the video's second frame group (after its own timestamp)
    assert ad.unit_layouts(inputs, unit) == [Grid(4, 6)]
    with vtc.compress(m, {"stages": [{"method": "random", "budget": 10}]}) as run:
        m(**inputs)
    g = token_groups(run.stats, unit)[0]
    assert g.shape[0] == 24 and int((g >= 0).sum()) == 10
    out = draw_kept(Image.new("RGB", (120, 80), grey), [g], ad.unit_layouts(inputs, unit), size=120)
    assert out.size == (120, 80)  # the grid's 2:3 aspect, 20 px cells
    for i, v in enumerate(g.tolist()):
        px = out.getpixel((i % 6 * 20 + 10, i // 6 * 20 + 10))
        assert max(px) < 80 if v < 0 else all(abs(a - b) <= 12 for a, b in zip(px, grey))


@pytest.mark.parametrize("video", [False, True], ids=["image", "video"])
def test_vision_side_fed_through_the_getters(video):
    """Where the forward takes no mm_encoder_outputs (transformers 5.17; simulated on a newer one), the reduced main
    and DeepStack features go in through the base model's get_image_features / get_video_features: same logits and
    generate results, the model left exactly as before (also after an error)."""
    model = model_for()
    inp = qwen3_video_inputs(model, batch=2) if video else qwen3_inputs(model, batch=3)
    fed_through_getters_equals_mm_encoder_outputs(model, inp, ("get_image_features", "get_video_features"))


def test_vision_side_beams_rows_equal_single():
    """Beam search with num_return_sequences on a padded batch: every copy of a row gets that row's reduced main and
    DeepStack features."""
    model = model_for()
    vision_side_generate_rows_equal_single(model, qwen3_inputs(model, batch=3), split_row3)
