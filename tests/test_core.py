"""Core API: config validation, bad input, FastV's flash-compatible score, the vision-side prompt equality,
save / load round trip, stats."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from tiny_models import IMAGE_TOKEN, direct_feed, llava_inputs, tiny_llava

import vtc
from vtc.reduction import Reduction, resolve_budget, topk_per_group


@pytest.fixture(scope="module")
def model():
    return tiny_llava("sdpa")


@pytest.fixture(scope="module")
def eager_model():
    return tiny_llava("eager")


# ---- public API ----------------------------------------------------------------------------------------------
def test_public_api_listed():
    for name in ["compress", "apply", "reduce_embeddings", "load_config", "available_methods", "register_method",
                 "register_adapter", "ConfigError"]:
        assert name in vtc.__all__
        obj = getattr(vtc, name)
        assert obj.__doc__, f"{name} has no docstring"
    assert {"random", "downsample", "prefix", "fastv"} <= set(vtc.available_methods())


# ---- config validation -------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "stages,match",
    [
        ([{"method": "nope", "budget": 3}], r"stages\[0\]: unknown method 'nope' \(available: .*fastv"),
        ([{"method": "fastv", "budget": 0.5, "layr": 2}], r"stages\[0\] \(fastv\): unknown parameter 'layr'"),
        ([{"method": "random", "budget": 0}], r"stages\[0\] \(random\)\.budget: .*>= 1.*got 0"),
        ([{"method": "random", "budget": -3}], r"stages\[0\] \(random\)\.budget: .*got -3"),
        ([{"method": "random", "budget": float("nan")}], r"budget: .*\(0, 1\].*got nan"),
        ([{"method": "random", "budget": 1.5}], r"budget: a float budget .* \(0, 1\]"),
        ([{"method": "random", "budget": True}], r"budget: must be an int"),
        ([{"method": "fastv", "budget": 0.5, "query": "first"}], r"stages\[0\] \(fastv\)\.query: .*'last' or 'text'"),
        ([{"method": "fastv", "layer": 2, "budget": 0.5}, {"method": "random", "layer": 2, "budget": 0.5}],
         r"both act at layer 2"),
        ([{"budget": 3}], r"stages\[0\]: missing 'method'"),
        (["fastv"], r"stages\[0\]: each stage must be a mapping"),
    ],
)
def test_config_errors(stages, match):
    with pytest.raises(vtc.ConfigError, match=match):
        vtc.load_config({"stages": stages})


def test_llm_stage_acting_at_no_layer_is_a_config_error():
    """A registered LLM-side method whose stage names no layer (here the tests' replay method with ``layers: []``)
    is refused with the stage named, not a ValueError from inside the composition check."""
    import replay  # noqa: F401  (registers the test-only 'replay' method)

    with pytest.raises(vtc.ConfigError, match=r"stages\[1\] \(replay\): an LLM-side stage must act at one layer"):
        vtc.load_config([{"method": "fastv", "layer": 2, "budget": 0.5}, {"method": "replay", "key": "", "layers": []}])


def test_config_unknown_top_level_key():
    with pytest.raises(vtc.ConfigError, match=r"unknown top-level config key\(s\): stage"):
        vtc.load_config({"stage": []})


def test_config_yaml_roundtrip(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("name: mine\nstages:\n  - {method: fastv, layer: 3, budget: 0.25, query: text}\n")
    cfg = vtc.load_config(path)
    assert cfg.name == "mine" and cfg.stages[0].layer == 3 and cfg.stages[0].budget == 0.25
    assert vtc.load_config(cfg) is cfg
    assert vtc.load_config(cfg.to_dict()) == cfg
    with pytest.raises(vtc.ConfigError, match="config file not found"):
        vtc.load_config(tmp_path / "missing.yaml")


def test_budget_semantics():
    assert resolve_budget(0.5, 576) == 288
    assert resolve_budget(0.25, 7) == 1
    assert resolve_budget(1.0, 576) == 576
    assert resolve_budget(64, 576) == 64
    with pytest.warns(UserWarning, match="more than the 36 tokens available"):
        assert resolve_budget(100, 36) == 36


def test_topk_per_group_ties_and_groups():
    scores = torch.tensor([[1.0, 1.0, 0.5, 2.0, 2.0, 0.1]])
    group = torch.tensor([[0, 0, 0, 1, 1, -1]])
    mask = topk_per_group(scores, group, torch.tensor([[1, 1]]))
    assert mask.tolist() == [[True, False, False, True, False, False]]  # ties -> lower index


def test_reduction_source_map():
    red = Reduction.select(torch.tensor([[4, 1]]), 6)
    assert red.anchor.tolist() == [[1, 4]]
    assert red.source.tolist() == [[-1, 0, -1, -1, 1, -1]]


# ---- bad input leaves the model untouched -------------------------------------------------------------------
def _assert_untouched(model, inputs, before):
    with torch.no_grad():
        assert torch.equal(model(**inputs).logits, before)
    assert "generate" not in model.__dict__ and not hasattr(model, "_vtc_run")


def test_layer_out_of_range(model):
    inputs = llava_inputs(model)
    with torch.no_grad():
        before = model(**inputs).logits
    for layer in (0, 4, 99):
        with pytest.raises(vtc.ConfigError, match=rf"layer={layer} is out of range .*allowed: 1\.\.3"):
            vtc.compress(model, {"stages": [{"method": "fastv", "layer": layer, "budget": 0.5}]})
    _assert_untouched(model, inputs, before)


def test_unsupported_model():
    from transformers import LlamaConfig, LlamaForCausalLM

    lm = LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, vocab_size=64))
    with pytest.raises(vtc.ConfigError, match=r"no adapter for LlamaForCausalLM; supported: .*LlavaForConditional"):
        vtc.compress(lm, {"stages": [{"method": "fastv", "budget": 0.5}]})


def test_prefix_refuses_unordered_grid(model):
    inputs = llava_inputs(model)
    with torch.no_grad():
        before = model(**inputs).logits
    with pytest.raises(vtc.ConfigError, match=r"prefix: .*not declared ordered"):
        with vtc.compress(model, {"stages": [{"method": "prefix", "budget": 4}]}):
            model(**inputs)
    _assert_untouched(model, inputs, before)


def test_no_image_tokens_pass_through(model):
    ids = torch.randint(1, 100, (2, 9))
    with torch.no_grad():
        ref = model(input_ids=ids).logits
        for stage in ({"method": "fastv", "budget": 0.5}, {"method": "random", "budget": 4}):
            with vtc.compress(model, {"stages": [stage]}) as run:
                out = model(input_ids=ids).logits
                gen = model.generate(input_ids=ids, max_new_tokens=2, do_sample=False, pad_token_id=0)
            assert torch.equal(out, ref)
            assert gen.shape == (2, 11)
            assert run.stats.stages == []


def test_image_placeholder_mismatch(model):
    inputs = llava_inputs(model)
    bad = dict(inputs)
    bad["input_ids"] = inputs["input_ids"][:, 3:]  # drops placeholders of the image
    bad["attention_mask"] = inputs["attention_mask"][:, 3:]
    with pytest.raises(vtc.ConfigError, match=r"tokens: 36, features: 72 .*2 image\(s\) given need 2 x 36"):
        with vtc.compress(model, {"stages": [{"method": "random", "budget": 4}]}):
            two_images = dict(inputs)
            two_images["pixel_values"] = torch.cat([inputs["pixel_values"]] * 2)
            model(**two_images)


def test_labels_with_llm_side_stage(model):
    inputs = llava_inputs(model)
    labels = inputs["input_ids"].clone()
    with pytest.raises(vtc.ConfigError, match="labels cannot be used with LLM-side stages"):
        with vtc.compress(model, {"stages": [{"method": "fastv", "budget": 0.5}]}):
            model(**inputs, labels=labels)
    # vision side: labels are sliced with the prompt and the loss is computed
    with vtc.compress(model, {"stages": [{"method": "random", "budget": 4}]}):
        out = model(**inputs, labels=torch.where(labels == IMAGE_TOKEN, -100, labels))
    assert torch.isfinite(out.loss)


def test_double_attach_refused(model):
    h = vtc.apply(model, {"stages": [{"method": "fastv", "budget": 0.5}]})
    try:
        with pytest.raises(vtc.ConfigError, match="already has a vtc config attached"):
            vtc.apply(model, {"stages": [{"method": "random", "budget": 4}]})
    finally:
        h.remove()
    h.remove()  # idempotent


# ---- FastV's flash-compatible score equals eager attention --------------------------------------------------
@pytest.mark.parametrize("layer", [1, 2, 3])
def test_fastv_score_equals_eager_attention_row(eager_model, layer):
    from vtc.methods.fastv import fastv_scores

    inputs = llava_inputs(eager_model, batch=2, seed=3)
    captured = {}

    class Probe(vtc.methods.fastv.FastV):
        def reduce_llm(self, ctx):
            captured["scores"] = fastv_scores(ctx, "last")
            captured["slots"] = ctx.slot_positions
            return super().reduce_llm(ctx)

    stage = Probe(method="fastv", layer=layer, budget=1.0)
    with torch.no_grad():
        ref = eager_model(**inputs, output_attentions=True)
        with vtc.compress(eager_model, vtc.Config(stages=(stage,))):
            eager_model(**inputs)
    attn = ref.attentions[layer - 1]  # (B, h, N, N) eager weights of layer L-1
    expected = attn[:, :, -1, :].mean(1)
    torch.testing.assert_close(captured["scores"], expected, atol=1e-6, rtol=1e-5)


# ---- vision side: same as a prompt with k placeholders and the reduced features fed directly -----------------
def test_vision_side_equals_direct_feed(model):
    inputs = llava_inputs(model, batch=2, seed=1)
    k = 9
    config = {"stages": [{"method": "downsample", "budget": k}]}
    with torch.no_grad(), vtc.compress(model, config) as run:
        out = model(**inputs).logits
        gen = model.generate(**inputs, max_new_tokens=3, do_sample=False, pad_token_id=0)
    # reference: the features the method produced, fed through a prompt with k placeholders
    red_feats, _ = vtc.reduce_embeddings(
        model.model.vision_tower(inputs["pixel_values"], output_hidden_states=True).hidden_states[-2][:, 1:],
        vtc.Grid(6, 6), config)
    with torch.no_grad():
        feats = model.model.multi_modal_projector(red_feats)
    with torch.no_grad():
        emb, attention_mask = direct_feed(model, inputs, feats, k)
        ref = model(inputs_embeds=emb, attention_mask=attention_mask).logits
        ref_gen = model.generate(inputs_embeds=emb, attention_mask=attention_mask, max_new_tokens=3,
                                 do_sample=False, pad_token_id=0)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    assert torch.equal(gen[:, inputs["input_ids"].shape[1]:], ref_gen)
    assert gen[:, : inputs["input_ids"].shape[1]].equal(inputs["input_ids"])  # prompt ids given back
    assert run.stats.stages[0].tokens_out == [k, k]
    assert run.stats.kv_cache_len == [attention_mask.shape[1]] * 4  # the reduced prompt's length


# ---- save_pretrained -> from_pretrained round trip, then compressed generate ---------------------------------
def test_save_load_roundtrip(tmp_path, model):
    from transformers import AutoModelForImageTextToText

    model.save_pretrained(tmp_path / "m")
    loaded = AutoModelForImageTextToText.from_pretrained(tmp_path / "m", attn_implementation="sdpa").eval()
    inputs = llava_inputs(model, batch=2, seed=5)
    cfg = {"stages": [{"method": "downsample", "budget": 9}, {"method": "fastv", "layer": 2, "budget": 0.5}]}
    with torch.no_grad():
        with vtc.compress(model, cfg):
            a = model.generate(**inputs, max_new_tokens=3, do_sample=False, pad_token_id=0)
        with vtc.compress(loaded, cfg) as run:
            b = loaded.generate(**inputs, max_new_tokens=3, do_sample=False, pad_token_id=0)
    assert torch.equal(a, b)
    assert [s.method for s in run.stats.stages] == ["downsample", "fastv"]
    assert run.stats.stages[1].tokens_in == [9, 9] and run.stats.stages[1].tokens_out == [4, 4]


def test_stats_time_and_str(model):
    inputs = llava_inputs(model)
    with vtc.compress(model, {"stages": [{"method": "fastv", "layer": 2, "budget": 0.5}]}) as run:
        with torch.no_grad():
            model(**inputs)
    assert run.stats.vtc_time_s > 0
    text = str(run.stats)
    assert "fastv" in text and "36 -> 18" in text
    assert not math.isnan(run.stats.stages[0].reduction_ratio[0])


def test_no_warning_spam(model):
    inputs = llava_inputs(model)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        with vtc.compress(model, {"stages": [{"method": "fastv", "layer": 2, "budget": 0.5}]}):
            with torch.no_grad():
                model(**inputs)


# ---- several images in one prompt, a row without images ----------------------------------------------------------
def _mixed_batch(model):
    """Row 0: two adjacent images then text; row 1: text only. Left-padded."""
    g = torch.Generator().manual_seed(7)
    n = 36
    row0 = torch.cat([torch.randint(1, 100, (2,), generator=g), torch.full((2 * n,), IMAGE_TOKEN),
                      torch.randint(1, 100, (5,), generator=g)])
    row1 = torch.randint(1, 100, (6,), generator=g)
    L = len(row0)
    ids = torch.zeros(2, L, dtype=torch.long)
    mask = torch.zeros(2, L, dtype=torch.long)
    ids[0], mask[0] = row0, 1
    ids[1, L - len(row1):], mask[1, L - len(row1):] = row1, 1
    return {"input_ids": ids, "attention_mask": mask, "pixel_values": torch.randn(2, 3, 48, 48, generator=g)}


@pytest.mark.parametrize("stage,per_image", [
    ({"method": "fastv", "layer": 2, "budget": 0.25}, 9),
    ({"method": "random", "layer": 1, "budget": 5}, 5),
    ({"method": "downsample", "budget": 4}, 4),
])
def test_two_images_and_a_text_only_row(model, stage, per_image):
    inputs = _mixed_batch(model)
    with torch.no_grad(), vtc.compress(model, {"stages": [stage]}) as run:
        out = model(**inputs).logits
        gen = model.generate(**inputs, max_new_tokens=2, do_sample=False, pad_token_id=0)
    st = run.stats.stages[0]
    if stage.get("layer"):
        assert st.tokens_in == [72, 0] and st.tokens_out == [2 * per_image, 0]
        groups = st.candidate_image[0][st.reduction.source[0] >= 0]
        assert torch.bincount(groups).tolist() == [per_image, per_image]  # budget per image, not per sample
    else:
        assert st.tokens_out == [per_image, per_image]
    assert torch.isfinite(out).all() and gen.shape == (2, inputs["input_ids"].shape[1] + 2)
    # the text-only row is unaffected by the compression of row 0
    with torch.no_grad():
        ref = model(input_ids=inputs["input_ids"][1:, -6:]).logits[:, -1]
    torch.testing.assert_close(out[1, -1], ref[0], atol=1e-4, rtol=1e-4)
    assert len(run.stats.seq_len_per_layer) == 4


def test_register_adapter_takes_precedence(model):
    from vtc.models import _ADAPTERS, get_adapter
    from vtc.models.llava import LlavaAdapter

    class MyLlava(LlavaAdapter):
        family = "my-llava"

    vtc.register_adapter(MyLlava)
    try:
        assert isinstance(get_adapter(model), MyLlava)
        inputs = llava_inputs(model)
        with vtc.compress(model, {"stages": [{"method": "fastv", "budget": 0.5}]}) as run:
            with torch.no_grad():
                model(**inputs)
        assert run.adapter.family == "my-llava" and run.stats.stages[0].tokens_out == [18]
    finally:
        _ADAPTERS.remove(MyLlava)
    assert type(get_adapter(model)) is LlavaAdapter
    with pytest.raises(TypeError):
        vtc.register_adapter(int)
