"""Qwen3-VL: what only this family does (the invariant matrix runs every method case on it: tests/cases/qwen3_vl.py).

DeepStack on both sides (vision-side stages reduce every level with the main tokens' Reduction; LLM-side stages at
layers that still receive DeepStack input slice it to the survivors), interleaved M-RoPE, q / k norm in the
re-projection, video frame groups between timestamps, the processor's prompt for the reduced count, the MoE build,
and the from_pretrained / ``vtc generate`` round trip.
"""

from __future__ import annotations

import functools

import pytest
import torch
from replay import replay_config
from roundtrip import cli_generate
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


@torch.no_grad()
def logits(model, inputs, **kw):
    return model(**inputs, **kw).logits


def rope_positions(model, inputs) -> torch.Tensor:
    return model.model.get_rope_index(inputs["input_ids"], mm_token_type_ids=inputs["mm_token_type_ids"],
                                      image_grid_thw=inputs.get("image_grid_thw"),
                                      video_grid_thw=inputs.get("video_grid_thw"),
                                      attention_mask=inputs.get("attention_mask"))[0]


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
    return torch.cat(out.pooler_output), [torch.cat(level) for level in out.deepstack_features]


def _pool2x2(x: torch.Tensor, side: int) -> torch.Tensor:
    """(side^2, D) raster grid -> ((side/2)^2, D) means of 2x2 windows."""
    D = x.shape[-1]
    return x.view(side // 2, 2, side // 2, 2, D).mean((1, 3)).reshape(-1, D)


def test_vision_pool_reduces_every_deepstack_level_alike():
    """pool avg 4x4 -> 2x2 on one image: vtc's logits == the model fed the processor-style prompt with 4 placeholders
    and, as main and DeepStack features, the same 2x2 means of the model's own main and level features (positions:
    each window's anchor triple)."""
    from transformers.models.qwen3_vl.modeling_qwen3_vl import BaseModelOutputWithDeepstackFeatures

    model = model_for()
    inp = qwen3_inputs(model, batch=1)
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
    ref = logits(model, {"input_ids": new_ids, "attention_mask": torch.ones_like(new_ids),
                         "position_ids": prompt.position_ids, "mm_encoder_outputs": {"image": enc}})
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    plain = BaseModelOutputWithDeepstackFeatures(pooler_output=[_pool2x2(main, 4)],
                                                 deepstack_features=[[lv[:4]] for lv in levels])
    other = logits(model, {"input_ids": new_ids, "attention_mask": torch.ones_like(new_ids),
                           "position_ids": prompt.position_ids, "mm_encoder_outputs": {"image": plain}})
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
        replay = replay_config(config, run.stats, key=f"qwen3-{kind}-{attn}-{inp['input_ids'].shape}")
        new = out.sequences[:, inp["input_ids"].shape[1]:]
        with vtc.compress(model, replay):
            for t in range(new.shape[1]):
                ext = torch.ones_like(new[:, :t])
                step = dict(inp, input_ids=torch.cat([inp["input_ids"], new[:, :t]], 1),
                            attention_mask=torch.cat([inp["attention_mask"], ext], 1),
                            mm_token_type_ids=torch.cat([inp["mm_token_type_ids"], 0 * ext.int()], 1))
                torch.testing.assert_close(logits(model, step, use_cache=False)[:, -1], out.logits[t],
                                           atol=1e-4, rtol=1e-4)


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
