"""Gemma 3 specifics (the invariant matrix runs every method on it: tests/cases/gemma3.py): LLM-side pruning with
sliding-window layers and the hybrid cache (cached == uncached over many decode steps past the window), the
vision side's rebuilt token_type_ids (bidirectional attention among the kept tokens), the score pooling, and the
from_pretrained / AutoProcessor / ``vtc generate`` round trip."""

from __future__ import annotations

import functools

import pytest
import roundtrip
import torch
from replay import assert_cached_equals_uncached
from tf_compat import (
    encoded_logits,
    fed_through_getters_equals_mm_encoder_outputs,
    vision_side_generate_rows_equal_single,
)
from tiny_models_gemma3 import BOI, EOI, IMAGE, SIZE, WINDOW, gemma3_inputs, gemma3_row, tiny_gemma3

import vtc
from vtc.models.gemma3 import Gemma3Adapter, pool_patches


@functools.cache
def model(attn: str = "sdpa"):
    return tiny_gemma3(attn)


@torch.no_grad()
def logits(m, inputs, **kw):
    return m(**inputs, **kw).logits


def test_adapter_selected_and_layer_types():
    ad = vtc.models.get_adapter(model())
    assert isinstance(ad, Gemma3Adapter)
    assert [ad.sliding_window(i) for i in range(4)] == [WINDOW, WINDOW, None, WINDOW]


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("stage", [{"method": "fastv", "layer": 1, "budget": 0.25},
                                   {"method": "pact", "layer": 1, "keep": 0.5, "cutoff": 0.45},
                                   {"method": "transprune", "layers": [1, 3], "keep": [0.5, 0.25],
                                    "accumulate": [0, 2]}])
def test_sliding_window_decode_cached_equals_uncached(attn, stage):
    """Two images per row (prompt ~45 tokens, window 8), 12 new tokens: the pruned sliding layers' caches hold only
    their last window - 1 entries, the full layer all survivors; every step's logits equal an uncached
    recomputation over the kept tokens at their positions."""
    m = model(attn)
    inputs = gemma3_inputs(m, batch=2, images_per_row=2)
    assert inputs["input_ids"].shape[1] > 4 * WINDOW
    gen = {"max_new_tokens": 12, "do_sample": False, "pad_token_id": 0}
    config = vtc.load_config({"stages": [stage]})
    with vtc.compress(m, config) as run:
        out = m.generate(**inputs, **gen, output_logits=True, return_dict_in_generate=True)
    first = min(s.layer for s in run.stats.stages)
    assert run.stats.kv_cache_len[first] < run.stats.prompt_len
    assert_cached_equals_uncached(m, config, inputs, out, stats=run.stats, key=f"gemma3-{attn}-{stage['method']}")


def test_pooled_scores_are_the_projector_pooling():
    m = model()
    x = torch.randn(3, 64, 5)
    proj = m.model.multi_modal_projector
    ref = proj.avg_pool(x.transpose(1, 2).reshape(3, 5, 8, 8)).flatten(2).transpose(1, 2)
    torch.testing.assert_close(pool_patches(x, 8, 2), ref)
    torch.testing.assert_close(pool_patches(x[..., 0], 8, 2), ref[..., 0])


def test_vision_side_prompt_equals_processor_prompt_for_k_tokens():
    """pool avg to 2 x 2: the LLM gets what a processor prompt with 4 placeholders (token_type_ids 1 there, so the
    4 tokens attend to each other bidirectionally) and the pooled features gives; generate returns [prompt, new]."""
    m = model()
    inputs = gemma3_inputs(m, batch=1)
    with vtc.compress(m, {"stages": [{"method": "pool", "mode": "avg", "budget": 4}]}):
        out = logits(m, inputs)
        seq = m.generate(**inputs, max_new_tokens=3, do_sample=False)
    with torch.no_grad():
        feats = m.model.vision_tower(pixel_values=inputs["pixel_values"]).last_hidden_state
        pooled = m.model.multi_modal_projector(feats)  # 4 x 4 projected, for the shapes only
        proj = m.model.multi_modal_projector
        vis = proj.avg_pool(feats.transpose(1, 2).reshape(1, -1, 8, 8))  # the model's 4 x 4 pooling
        vis = torch.nn.functional.adaptive_avg_pool2d(vis, 2).flatten(2).transpose(1, 2)  # pool avg to 2 x 2
        emb = torch.matmul(proj.mm_soft_emb_norm(vis), proj.mm_input_projection_weight)
    ids = inputs["input_ids"][0]
    first = int((ids == IMAGE).nonzero()[0])
    new_ids = torch.cat([ids[:first + 4], ids[first + 16:]])[None]
    from transformers.modeling_outputs import BaseModelOutputWithPooling

    ref = encoded_logits(m, {"image": BaseModelOutputWithPooling(pooler_output=emb.to(pooled))}, input_ids=new_ids,
                         attention_mask=torch.ones_like(new_ids), token_type_ids=(new_ids == IMAGE).long())
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    without_types = encoded_logits(m, {"image": BaseModelOutputWithPooling(pooler_output=emb)}, input_ids=new_ids,
                                   attention_mask=torch.ones_like(new_ids))
    assert not torch.allclose(out, without_types, atol=1e-4)  # the bidirectional block matters
    assert seq.shape[1] == ids.shape[0] + 3 and torch.equal(seq[0, :ids.shape[0]], ids)


def test_cls_only_methods_refused_at_attach():
    with pytest.raises(vtc.ConfigError, match="no CLS token"):
        vtc.compress(model(), {"stages": [{"method": "pool", "mode": "cluster", "budget": 4, "weights": "cls"}]})


# ---- from_pretrained round trip -------------------------------------------------------------------------------
TEMPLATE = ("{% for m in messages %}{% if m['role'] == 'user' %}USER: {% for c in m['content'] %}"
            "{% if c['type'] == 'image' %}<start_of_image>{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}"
            "{% endfor %}{% endif %}{% endfor %}{% if add_generation_prompt %} ASSISTANT:{% endif %}")


def _checkpoint(path):
    from transformers import Gemma3ImageProcessor, Gemma3Processor

    fast = roundtrip.word_tokenizer(["<start_of_image>", "<image_soft_token>", "<end_of_image>"],
                          boi_token="<start_of_image>", image_token="<image_soft_token>", eoi_token="<end_of_image>")
    m = tiny_gemma3("sdpa")
    assert len(fast) <= m.config.text_config.vocab_size
    m.config.boi_token_id, m.config.image_token_id, m.config.eoi_token_id = 4, 5, 6
    m.generation_config.suppress_tokens = [2, 4, 5, 6]
    proc = Gemma3Processor(image_processor=Gemma3ImageProcessor(size={"height": SIZE, "width": SIZE}), tokenizer=fast,
                           image_seq_length=m.config.mm_tokens_per_image, chat_template=TEMPLATE)
    roundtrip.save_checkpoint(path, m, proc, roundtrip.random_image(40, 60))


def test_from_pretrained_roundtrip_and_cli(tmp_path):
    _checkpoint(tmp_path)
    m, inputs = roundtrip.load_checkpoint(tmp_path, "USER: <start_of_image> what colour ? ASSISTANT:")
    assert int(inputs["token_type_ids"].sum()) == 16
    assert roundtrip.first_stage_counts(m, inputs, {"method": "fastv", "layer": 1, "budget": 4}) == [4]
    roundtrip.cli_generate(tmp_path)
    # vtc show: the processor squashes the whole image to one square, so the 4 x 4 grid spans the 60 x 40 image at its
    # own aspect (cells of 84 x 56 px in the 336 x 224 picture); kept cells keep their pixels, the rest are dimmed
    from PIL import Image

    pic = Image.open(roundtrip.cli_show(tmp_path, "{method: random, budget: 5}")).convert("RGB")
    assert pic.size == (336, 224)
    kept = sum(max(pic.getpixel((int((i % 4 + 0.5) * 84), int((i // 4 + 0.5) * 56)))) >= 80 for i in range(16))
    assert kept == 5


def test_boi_eoi_are_text():
    m = model()
    inputs = gemma3_inputs(m, batch=2)
    tm = Gemma3Adapter(m).token_map(inputs["input_ids"], inputs)
    ids = inputs["input_ids"]
    assert not tm.is_visual[(ids == BOI) | (ids == EOI)].any()
    assert int(tm.is_visual.sum()) == 32 and tm.image_id.max() == 1


@functools.cache
def deep_model():
    return tiny_gemma3("sdpa", layers=roundtrip.config_depth("gemma3"))  # room for the configs' deepest layers


test_shipped_configs_run = roundtrip.shipped_configs_test("gemma3", deep_model, lambda m: gemma3_inputs(m, batch=2))


def test_vision_side_fed_through_get_image_features():
    """Where the forward takes no mm_encoder_outputs (transformers 5.17; simulated on a newer one), the reduced
    features go in through the base model's get_image_features: same logits and generate results, the model left
    exactly as before (also after an error)."""
    m = model("sdpa")
    fed_through_getters_equals_mm_encoder_outputs(m, gemma3_inputs(m, batch=3), ("get_image_features",))


def test_vision_side_beams_rows_equal_single():
    """Beam search with num_return_sequences on a padded batch (two images in a row): every copy of a row gets that
    row's reduced features (transformers' own expansion of precomputed features cannot split a flat (N, D) tensor
    per image; vtc expands them itself)."""
    m = model("sdpa")
    vision_side_generate_rows_equal_single(m, gemma3_inputs(m, batch=3, images_per_row=2), gemma3_row)
