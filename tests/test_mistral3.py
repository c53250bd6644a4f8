"""Mistral 3 / Pixtral specifics (the invariant matrix runs every method on it: tests/cases/mistral3.py): the
[IMG_BREAK] / [IMG_END] separators (visual, protected, learnt or configured ids, checked), the score mapping onto
merged tokens (crafted input against the model's own patch merger; the per-image mean query against a loop), the
rebuilt prompts (grid outputs = the processor's prompt for the smaller grid; pruned outputs in their original rows,
empty rows included, cached decoding = uncached), LLM-side separators kept, ``vtc show`` on non-square images, the
shipped configs, and the from_pretrained / AutoProcessor / ``vtc generate`` / ``vtc show`` round trip."""

from __future__ import annotations

import functools

import pytest
import roundtrip
import torch
from PIL import Image
from replay import assert_cached_equals_uncached
from tf_compat import scatter_logits
from tiny_models_mistral3 import BREAK, END, IMAGE, image_prompt, mistral3_inputs, tiny_mistral3

import vtc
from vtc.layout import Grid
from vtc.models import get_adapter
from vtc.models.mistral3 import Mistral3Adapter, merge_patch_values
from vtc.runtime.vision import rebuild_prompt
from vtc.viz import draw_kept, token_groups

GREY = (200, 200, 200)


@functools.cache
def model(attn: str = "sdpa"):
    return tiny_mistral3(attn)


@torch.no_grad()
def logits(m, inputs, **kw):
    return m(**inputs, **kw).logits


def test_token_map_separators_protected_adjacent_images():
    """Two rows; row 1 holds two images back to back ([IMG_END] then the next image's [IMG] at once)."""
    m = model()
    inputs = mistral3_inputs(m, batch=2, images_per_row=2, sizes=[(32, 48), (24, 40), (40, 32), (16, 16)])
    ids = inputs["input_ids"]
    ad = Mistral3Adapter(m)
    tm = ad.token_map(ids, inputs)
    sep = (ids == BREAK) | (ids == END)
    assert torch.equal(tm.is_visual, (ids == IMAGE) | sep) and torch.equal(tm.protected, sep)
    counts = [int((tm.image_id == i).sum()) for i in range(4)]
    assert counts == [4 * 7, 3 * 6, 5 * 5, 2 * 3]
    assert ad._sep_ids == {"break": BREAK, "end": END}  # read off the prompt
    # adjacent images: drop the text token between the two images of row 1
    row = ids[1]
    end0 = int((row == END).nonzero()[0])
    glued = torch.cat([row[:end0 + 1], row[end0 + 2:], row.new_zeros(1)])[None]
    glued_inputs = dict(inputs, input_ids=glued, attention_mask=(glued != 0).long(),
                        pixel_values=inputs["pixel_values"][2:], image_sizes=inputs["image_sizes"][2:])
    tm2 = Mistral3Adapter(m).token_map(glued, glued_inputs)
    assert [int((tm2.image_id == i).sum()) for i in range(2)] == [25, 6]
    assert int(tm2.image_id[0, end0]) == 0 and int(tm2.image_id[0, end0 + 1]) == 1


def test_separator_ids_configured_and_checked():
    m = model()
    inputs = mistral3_inputs(m, batch=1)
    ids = inputs["input_ids"]
    configured = tiny_mistral3(sep_ids_in_config=True)
    assert Mistral3Adapter(configured)._sep_ids == {"break": BREAK, "end": END}
    bad = ids.clone()
    bad[bad == BREAK] = 99  # a break that is not [IMG_BREAK]
    with pytest.raises(vtc.ConfigError, match=r"\[IMG_BREAK\].*expected 121"):
        Mistral3Adapter(configured).token_map(bad, inputs)
    mixed = ids.clone()
    mixed[0, int((ids[0] == BREAK).nonzero()[0])] = 99  # two different ids after inner rows
    with pytest.raises(vtc.ConfigError, match=r"\[99, 121\] as \[IMG_BREAK\]"):
        Mistral3Adapter(m).token_map(mixed, inputs)
    short = dict(inputs, image_sizes=torch.tensor([[32, 40]]))  # 4 x 5 needed, the prompt has rows of 6
    with pytest.raises(vtc.ConfigError, match="Image features and image tokens do not match"):
        Mistral3Adapter(m).token_map(ids, short)
    wrong_rows = dict(inputs, image_sizes=torch.tensor([[48, 32]]))  # 24 tokens as 6 x 4, the prompt has 4 x 6
    with pytest.raises(vtc.ConfigError, match="image rows hold"):
        Mistral3Adapter(m).token_map(ids, wrong_rows)
    same = ids.clone()
    same[same == BREAK] = END
    with pytest.raises(vtc.ConfigError, match="same id"):
        Mistral3Adapter(m).token_map(same, inputs)
    with vtc.compress(configured, {"stages": [{"method": "random", "budget": 4}]}), \
            pytest.raises(vtc.ConfigError, match="expected 121"):
        configured(**dict(inputs, input_ids=bad))


def test_merged_scores_are_the_patch_mergers_blocks():
    """Crafted input: per-patch values through the model's own patch merger with its merging layer set to the
    channel-wise mean of the 2x2 block it concatenates (unfold layout: channel-major); merge_patch_values must give
    the same tokens, for two packed images, one with an odd number of patch rows (the merger drops the last)."""
    m = model()
    merger = m.model.multi_modal_projector.patch_merger
    d = merger.merging_layer.out_features
    sizes = torch.tensor([[24, 40], [28, 16]])  # patches 6 x 10 and 7 x 4 -> tokens 3 x 5 and 3 x 2
    n = [6 * 10, 7 * 4]
    x = torch.randn(sum(n), d)
    with torch.no_grad():
        w = torch.zeros(d, d * 4)
        for c in range(d):
            w[c, c * 4:(c + 1) * 4] = 0.25
        saved = merger.merging_layer.weight.clone()
        merger.merging_layer.weight.copy_(w)
        try:
            ref = merger(x, sizes)
        finally:
            merger.merging_layer.weight.copy_(saved)
    a = merge_patch_values(x, torch.tensor([0]), 6, 10, 2)[0]
    b = merge_patch_values(x, torch.tensor([n[0]]), 7, 4, 2)[0]
    torch.testing.assert_close(torch.cat([a, b]), ref, atol=1e-6, rtol=1e-6)
    # scalar scores: token (r, c) of image 0 is the mean of patches (2r..2r+1, 2c..2c+1)
    s = torch.arange(60.0)
    tok = merge_patch_values(s[:, None], torch.tensor([0]), 6, 10, 2)[0, :, 0]
    assert tok[0] == (0 + 1 + 10 + 11) / 4 and tok[6] == (22 + 23 + 32 + 33) / 4


def test_received_attention_is_each_images_mean_query():
    """Reference by a loop over images: the last block's input, its norm and q / k maps, the tower's own 2D RoPE at
    each image's patch positions, q̄ = mean of the image's roped queries, softmax over that image only, mean over
    heads, then the 2x2 means. Two images of different sizes in one call (block-diagonal attention)."""
    m = model()
    inputs = mistral3_inputs(m, batch=2)
    tower = m.model.vision_tower
    with torch.no_grad():
        out = tower(inputs["pixel_values"], image_sizes=inputs["image_sizes"], output_hidden_states=True)
        x = out.hidden_states[-2][0]
        block = tower.transformer.layers[-1]
        attn = block.attention
        xn = block.attention_norm(x)
        start, ref = 0, []
        for H, W in inputs["image_sizes"].tolist():
            hp, wp = H // 4, W // 4
            pos = torch.stack(torch.meshgrid(torch.arange(hp), torch.arange(wp), indexing="ij"), -1).reshape(-1, 2)
            cos, sin = tower.patch_positional_embedding(x, pos)
            xi = xn[start:start + hp * wp]
            q = attn.q_proj(xi).view(-1, 4, 8).transpose(0, 1)
            k = attn.k_proj(xi).view(-1, 4, 8).transpose(0, 1)
            q = q * cos + torch.cat([-q[..., 4:], q[..., :4]], -1) * sin
            k = k * cos + torch.cat([-k[..., 4:], k[..., :4]], -1) * sin
            p = ((q.mean(1, keepdim=True) @ k.transpose(1, 2)) * attn.scaling).softmax(-1)[:, 0].mean(0)
            ref.append(p.view(hp // 2, 2, wp // 2, 2).mean((1, 3)).flatten())
            start += hp * wp
        groups = Mistral3Adapter(m).encode_images(inputs)
    assert [g.layout for g in groups] == [Grid(4, 6), Grid(5, 4)]
    for g, r in zip(groups, ref):
        got = g.extras.received_attention
        got = got() if callable(got) else got
        torch.testing.assert_close(got[0], r, atol=1e-5, rtol=1e-5)


def test_cls_only_methods_refused_and_sliding_window_llm_side():
    with pytest.raises(vtc.ConfigError, match="no CLS token"):
        vtc.compress(model(), {"stages": [{"method": "pool", "mode": "cluster", "budget": 4, "weights": "cls"}]})
    m = tiny_mistral3()
    m.config.text_config.sliding_window = 8
    with pytest.raises(vtc.ConfigError, match="sliding_window"):
        vtc.compress(m, {"stages": [{"method": "fastv", "layer": 1, "budget": 0.5}]})


# ---- the processor -------------------------------------------------------------------------------------------------
TEMPLATE = ("{% for m in messages %}{% if m['role'] == 'user' %}USER: {% for c in m['content'] %}"
            "{% if c['type'] == 'image' %}[IMG]{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}"
            "{% endfor %}{% endif %}{% endfor %}{% if add_generation_prompt %} ASSISTANT:{% endif %}")


def _processor():
    from transformers import PixtralImageProcessor, PixtralProcessor

    fast = roundtrip.word_tokenizer(["[IMG]", "[IMG_BREAK]", "[IMG_END]"])
    ip = PixtralImageProcessor(size={"longest_edge": 48}, patch_size={"height": 8, "width": 8})
    return PixtralProcessor(image_processor=ip, tokenizer=fast, patch_size=4, spatial_merge_size=2,
                            chat_template=TEMPLATE)


def _processor_model():
    m = tiny_mistral3()
    m.config.image_token_id = 4  # the processor's [IMG]; [IMG_BREAK] = 5, [IMG_END] = 6 are read off its prompts
    m.generation_config.suppress_tokens = [2, 4, 5, 6]
    return m


@pytest.mark.parametrize("stage,grid", [({"method": "pool", "mode": "avg", "grid": [2, 3]}, (2, 3)),
                                        ({"method": "downsample", "budget": 8}, (2, 4)),
                                        ({"method": "pool", "mode": "max", "budget": 6}, (2, 3))])
def test_grid_outputs_give_the_processors_prompt_for_the_smaller_grid(stage, grid):
    """A 40 x 60 image -> 32 x 48 px, 4 x 6 tokens. Reduced to h' x w', the rebuilt prompt's ids equal the
    processor's prompt for an image it sizes to h' x w' tokens (rows of [IMG] with [IMG_BREAK], [IMG_END] last),
    and the logits equal the model on that prompt with the reduced features scattered into its [IMG] tokens."""
    proc, m = _processor(), _processor_model()
    text = "USER: [IMG] what colour ? ASSISTANT:"
    inputs = proc(images=roundtrip.random_image(40, 60), text=text, return_tensors="pt")
    small = proc(images=roundtrip.random_image(grid[0] * 8, grid[1] * 8, 1), text=text, return_tensors="pt")
    assert small["image_sizes"].tolist() == [[grid[0] * 8, grid[1] * 8]]
    with vtc.compress(m, {"stages": [stage]}) as run:
        out = logits(m, inputs)
        assert run.stats.image_tokens == [grid[0] * (grid[1] + 1)]
        assert run.stats.stages[0].tokens_out == [grid[0] * grid[1]]
        with torch.no_grad():
            images = run.vision.reduce_images(dict(inputs))
    prompt = rebuild_prompt(run.adapter, inputs["input_ids"], inputs["attention_mask"], images, inputs)
    assert torch.equal(prompt.input_ids, small["input_ids"])
    feats = images[0].embeds[~images[0].protected]
    ref = scatter_logits(m, small["input_ids"], small["attention_mask"], feats, m.config.image_token_id)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_pool_features_are_the_pooled_merger_outputs():
    """pool avg to 2 x 3 = the model's own norm + patch merger, 2x2-average pooled, then the projector MLP."""
    m = model()
    inputs = mistral3_inputs(m, batch=1)
    with vtc.compress(m, {"stages": [{"method": "pool", "mode": "avg", "grid": [2, 3]}]}) as run, torch.no_grad():
        [im] = run.vision.reduce_images(dict(inputs))
    proj = m.model.multi_modal_projector
    with torch.no_grad():
        hs = m.model.vision_tower(inputs["pixel_values"], image_sizes=inputs["image_sizes"]).last_hidden_state[0]
        merged = proj.patch_merger(proj.norm(hs), inputs["image_sizes"])  # (24, D): 4 x 6
        pooled = torch.nn.functional.avg_pool2d(merged.T.reshape(1, -1, 4, 6), 2).flatten(2)[0].T
        ref = proj.linear_2(proj.act(proj.linear_1(pooled)))
    torch.testing.assert_close(im.embeds[~im.protected], ref, atol=1e-5, rtol=1e-5)
    ids = im.token_ids.tolist()
    assert ids == [IMAGE] * 3 + [BREAK] + [IMAGE] * 3 + [END]


@pytest.mark.parametrize("budget,per_row", [(1, 1), (7, 2)])
def test_pruned_tokens_packed_in_their_rows_and_decode_consistent(budget, per_row):
    """random keeps ``budget`` tokens of each image (4 x 6 / 5 x 4; one or two images per row): the rebuilt prompt
    keeps every original row's separator (empty rows too: consecutive breaks), each row holding exactly its
    survivors; cached generate = uncached recomputation over the kept tokens."""
    m = model()
    inputs = mistral3_inputs(m, batch=2, images_per_row=per_row)
    config = vtc.load_config({"stages": [{"method": "random", "budget": budget}]})
    with vtc.compress(m, config) as run:
        out = m.generate(**inputs, max_new_tokens=4, do_sample=False, output_logits=True,
                         return_dict_in_generate=True)
        stats = run.stats
    with vtc.compress(m, config) as run, torch.no_grad():  # the packed images of the same selection
        images = run.vision.reduce_images(dict(inputs))
    for img, (H, W) in enumerate(inputs["image_sizes"].tolist()):
        h, w = H // 8, W // 8
        [src] = token_groups(run.stats, img)
        kept_rows = torch.bincount((src >= 0).nonzero().flatten() // w, minlength=h)
        ids = images[img].token_ids
        seps = ((ids == BREAK) | (ids == END)).nonzero().flatten()
        assert seps.numel() == h and int(ids[-1]) == END and torch.equal(images[img].protected, (ids != IMAGE))
        run_len = seps - torch.cat([seps.new_full((1,), -1), seps[:-1]]) - 1
        assert torch.equal(run_len, kept_rows), (run_len, kept_rows)
    prompt = rebuild_prompt(run.adapter, inputs["input_ids"], inputs["attention_mask"], images, inputs)
    assert torch.equal(prompt.token_map.protected, (prompt.input_ids == BREAK) | (prompt.input_ids == END))
    assert_cached_equals_uncached(m, config, inputs, out, stats=stats, key=f"mistral3-rows-{budget}-{per_row}")


def test_llm_side_keeps_every_separator():
    m = model()
    inputs = mistral3_inputs(m, batch=3)
    with vtc.compress(m, {"stages": [{"method": "fastv", "layer": 1, "budget": 2}]}) as run:
        logits(m, inputs)
    st = run.stats.stages[0]
    assert st.tokens_in == [24, 20, 15] and st.tokens_out == [2, 2, 2]
    ids = inputs["input_ids"]
    for b in range(3):
        kept = st.kept_positions[b][st.kept_valid[b]]
        seps = ((ids[b] == BREAK) | (ids[b] == END)).nonzero().flatten()
        assert torch.isin(seps, kept).all()
        assert int((ids[b][kept] == IMAGE).sum()) == 2


@pytest.mark.parametrize("side", ["vision", "llm"])
def test_show_places_every_token_on_a_non_square_image(side):
    """Image 1 of the batch is 40 x 32 px (H x W): 5 x 4 tokens. The picture has the image's 4:5 aspect and every
    cell is dark exactly where the token was dropped."""
    m = model()
    inputs = mistral3_inputs(m, batch=2)
    ad = get_adapter(m)
    layouts = ad.picture_layouts(inputs, 1, side)
    assert layouts == [Grid(5, 4)]
    stage = {"method": "random", "budget": 7} if side == "vision" else {"method": "random", "layer": 1, "budget": 7}
    with vtc.compress(m, {"stages": [stage]}) as run:
        logits(m, inputs)
    [g] = token_groups(run.stats, 1, num_tokens=[lay.num_tokens for lay in layouts])
    assert g.shape[0] == 20 and int((g >= 0).sum()) == 7
    out = draw_kept(Image.new("RGB", (32, 40), GREY), [g], layouts, size=100)
    assert out.size == (80, 100)
    for i, v in enumerate(g.tolist()):
        px = out.getpixel((i % 4 * 20 + 10, i // 4 * 20 + 10))
        assert (max(px) < 80) if v < 0 else all(abs(a - b) <= 12 for a, b in zip(px, GREY)), (i, px)


@functools.cache
def deep_model():
    return tiny_mistral3("sdpa", layers=roundtrip.config_depth("mistral3"))  # room for the configs' deepest layers


test_shipped_configs_run = roundtrip.shipped_configs_test("mistral3", deep_model, lambda m: mistral3_inputs(m, batch=2))


# ---- from_pretrained round trip ---------------------------------------------------------------------------------
def test_from_pretrained_roundtrip_and_cli(tmp_path):

    roundtrip.save_checkpoint(tmp_path, _processor_model(), _processor(), roundtrip.random_image(40, 60))
    m, inputs = roundtrip.load_checkpoint(tmp_path, "USER: [IMG] what colour ? ASSISTANT:")
    assert int((inputs["input_ids"] == 4).sum()) == 24 and int((inputs["input_ids"] == 5).sum()) == 3
    assert roundtrip.first_stage_counts(m, inputs, {"method": "fastv", "layer": 1, "budget": 4}) == [4]
    roundtrip.cli_generate(tmp_path, "{method: visionzip, budget: 6}")
    png = roundtrip.cli_show(tmp_path, "{method: random, budget: 9}")
    pic = Image.open(png).convert("RGB")
    assert pic.size == (336, 224)  # the 40 x 60 image's aspect; 4 x 6 cells of 56 px
    kept = sum(max(pic.getpixel((int((i % 6 + 0.5) * 56), int((i // 6 + 0.5) * 56)))) >= 80 for i in range(24))
    assert kept == 9


def test_bench_dummy_inputs_are_processor_prompts():
    m = model()
    ad = get_adapter(m)
    inputs = ad.dummy_inputs([([5, 6], [7]), ([5], [7, 8])], image_size=(40, 24))
    assert inputs["image_sizes"].tolist() == [[40, 24]] * 2
    ref = image_prompt(40, 24)
    assert torch.equal(inputs["input_ids"][1, 1:-2], ref.masked_fill(ref == BREAK, 12).masked_fill(ref == END, 13))
    with vtc.compress(m, {"stages": [{"method": "visionzip", "budget": 5}]}) as run:
        logits(m, inputs)
    assert run.stats.image_tokens == [5 + 5, 5 + 5]


# ---- Pixtral 12B: LLaVA with a Pixtral tower (no merger) -------------------------------------------------------------
@functools.cache
def pixtral(attn: str = "sdpa"):
    from tiny_models_mistral3 import tiny_pixtral_llava

    return tiny_pixtral_llava(attn)


def _row(inputs: dict, b: int) -> dict:
    keep = inputs["attention_mask"][b].bool()
    return {"input_ids": inputs["input_ids"][b:b + 1, keep], "attention_mask": inputs["attention_mask"][b:b + 1, keep],
            "pixel_values": inputs["pixel_values"][b:b + 1], "image_sizes": inputs["image_sizes"][b:b + 1]}


def test_pixtral_llava_selected_and_keep_all_is_the_model():
    from tiny_models import tiny_llava

    from vtc.models.llava import LlavaAdapter
    from vtc.models.mistral3 import PixtralLlavaAdapter

    m = pixtral()
    assert isinstance(get_adapter(m), PixtralLlavaAdapter) and type(get_adapter(tiny_llava())) is LlavaAdapter
    inputs = mistral3_inputs(m, batch=3)
    ref = logits(m, inputs)
    for stage in ({"method": "random", "budget": 1.0}, {"method": "random", "layer": 1, "budget": 1.0}):
        with vtc.compress(m, {"stages": [stage]}):
            torch.testing.assert_close(logits(m, inputs), ref, atol=1e-5, rtol=1e-5)
    m.config.vision_feature_select_strategy = "default"
    try:
        with vtc.compress(m, {"stages": [{"method": "random", "budget": 4}]}), \
                pytest.raises(vtc.ConfigError, match="vision_feature_select_strategy='default'"):
            logits(m, inputs)
    finally:
        m.config.vision_feature_select_strategy = "full"


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("stage", [{"method": "visionzip", "budget": 8}, {"method": "pool", "mode": "avg", "budget": 6},
                                   {"method": "fastv", "layer": 1, "budget": 0.5}], ids=lambda s: s["method"])
def test_pixtral_llava_batch_equals_single_and_decode(stage, attn):
    """A representative subset of the invariants on Pixtral 12B's layout (the full matrix runs on Mistral 3, which
    shares every line but the projector): batch of 3 = each row alone, cached decoding = uncached recomputation."""
    m = pixtral(attn)
    inputs = mistral3_inputs(m, batch=3)
    config = vtc.load_config({"stages": [stage]})
    with vtc.compress(m, config) as run:
        batched = logits(m, inputs)[:, -1]
        for b in range(3):
            torch.testing.assert_close(logits(m, _row(inputs, b))[0, -1], batched[b], atol=1e-4, rtol=1e-4)
    with vtc.compress(m, config) as run:
        out = m.generate(**inputs, max_new_tokens=3, do_sample=False, output_logits=True, return_dict_in_generate=True)
    assert all(o < i for st in run.stats.stages for i, o in zip(st.tokens_in, st.tokens_out))
    assert_cached_equals_uncached(m, config, inputs, out, stats=run.stats, key=f"pixtral-{stage['method']}-{attn}")
