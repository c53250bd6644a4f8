"""SmolVLM / Idefics3 specifics (the invariant matrix runs every method on both: tests/cases/smolvlm.py): the prompt
structure (row / column / fake / global tokens are text, an image is all its sub-images), the pixel-shuffle mapping of
tower scores (crafted input), the rebuilt prompt against each family's own processor (SmolVLMProcessor, which needs
``num2words`` from the dev extra, and Idefics3Processor) for the reduced count, LLM-side budgets per image, padding
sub-images / pixel_attention_mask, the refusals of the cells the matrix leaves out (CLS-only, CLIP-space), SmolVLM2
video (SmolVLMProcessor's frames with their timestamps: keep-all = the model, cached = uncached, batch = single, the
rebuilt prompt = the processor's video prompt for k), ``vtc show``'s crops-in-place picture by pixels, and the
from_pretrained / AutoProcessor / ``vtc generate`` round trip of a SmolVLM and an Idefics3 checkpoint."""

from __future__ import annotations

import functools

import pytest
import roundtrip
import torch
from tf_compat import scatter_logits
from tiny_models_smolvlm import FAKE, GLOBAL, IMAGE, NEWLINE, ROW_COL, smolvlm_inputs, tiny_smolvlm

import vtc
from vtc.layout import Grid, MultiCrop
from vtc.models import get_adapter
from vtc.models.smolvlm import SmolVLMAdapter, shuffle_scores
from vtc.models.vision_towers import TowerScorer


@functools.cache
def model(idefics3: bool = False, attn: str = "sdpa"):
    return tiny_smolvlm(attn, idefics3=idefics3)


@torch.no_grad()
def logits(m, inputs, **kw):
    return m(**inputs, **kw).logits


@pytest.mark.parametrize("idefics3", [False, True])
def test_adapter_and_prompt_structure(idefics3):
    m = model(idefics3)
    ad = get_adapter(m)
    assert isinstance(ad, SmolVLMAdapter) and ad.grid_side == 4
    inputs = smolvlm_inputs(m, batch=3)
    ids = inputs["input_ids"]
    tm = ad.token_map(ids, inputs)
    structural = (ids == FAKE) | (ids == GLOBAL) | (ids == NEWLINE) | ((ids >= ROW_COL) & (ids < ROW_COL + 16))
    assert bool(structural.any()) and not tm.is_visual[structural].any() and not tm.protected.any()
    assert torch.equal(tm.is_visual, ids == IMAGE)
    assert torch.bincount(tm.image_id[tm.is_visual]).tolist() == [48, 16, 48]  # 1x2 + global, unsplit, 2x1 + global
    assert ad.image_grids(ids) == [(1, 2), (0, 0), (2, 1)]
    assert ad.unit_layouts(inputs, 0) == [Grid(4, 4)] * 3
    assert ad.picture_layouts(inputs, 1) == [Grid(4, 4)]
    assert ad.picture_layouts(inputs, 2) == [MultiCrop(Grid(4, 4), (Grid(4, 4),) * 2, 2, 1, base_last=True)]
    assert ad.vision_extras_available() == frozenset({"received_attention", "keys"})


@pytest.mark.parametrize("idefics3", [False, True])
def test_shuffle_maps_scores_onto_exactly_their_patches(idefics3):
    """Crafted input: patch p's value is p (scores) / one-hot p (keys). Token (a, b) of the t x t grid must be the
    f x f block of patches (a f + i, b f + j), by index arithmetic independent of the model; and it must be the
    block the model's connector really concatenates into that token."""
    conn = model(idefics3).model.connector
    f = int(conn.scale_factor)
    t = 4
    P = t * f
    block = torch.arange(P * P).view(t, f, t, f).permute(0, 2, 1, 3).reshape(t * t, f * f)  # token -> its patches
    idx = torch.arange(P * P, dtype=torch.float)[None]
    torch.testing.assert_close(shuffle_scores(conn, idx, "sum")[0], block.sum(-1).float())
    onehot = torch.eye(P * P)[None]  # (1, P^2 patches, P^2 channels)
    members = shuffle_scores(conn, onehot, "mean")[0] * f * f  # (t^2, P^2): 1 where the patch is in the token
    assert torch.equal(members.nonzero()[:, 1].view(t * t, f * f).sort(-1).values, block)
    shuffled = conn.pixel_shuffle(onehot, f)[0].view(t * t, f * f, P * P)  # what the model feeds its projector
    assert torch.equal(shuffled.argmax(-1).sort(-1).values, block)


def test_tower_scores_on_tokens_are_patch_sums():
    m = model()
    inputs = smolvlm_inputs(m, batch=2)
    ad = get_adapter(m)
    [group] = ad.encode_images(inputs)
    assert group.unit_image == [0, 0, 0, 1] and group.unit_part == [0, 1, 2, 0]
    real = inputs["pixel_values"].flatten(0, 1)
    real = real[real.abs().sum((1, 2, 3)) > 0]
    with torch.no_grad():
        out = m.model.vision_model(pixel_values=real, output_hidden_states=True)
    scorer = TowerScorer(m.model.vision_model, out.hidden_states, -1, has_cls=False, drop_cls=False)
    per_patch = scorer.received_attention().view(4, 4, 3, 4, 3)  # 12 x 12 patches in 3 x 3 blocks
    torch.testing.assert_close(group.extras.received_attention(), per_patch.sum((2, 4)).reshape(4, 16))
    torch.testing.assert_close(group.extras.received_attention().sum(-1), torch.ones(4))
    keys = scorer.keys().view(4, 4, 3, 4, 3, -1).mean((2, 4)).reshape(4, 16, -1)
    torch.testing.assert_close(group.extras.keys(), keys)


@pytest.mark.parametrize("idefics3", [False, True])
def test_keep_all_is_the_model(idefics3):
    m = model(idefics3)
    inputs = smolvlm_inputs(m, batch=3)
    ref = logits(m, inputs)
    for stage in ({"method": "visionzip", "budget": 1.0, "contextual": 0, "keep_cls": False},
                  {"method": "fastv", "layer": 1, "budget": 1.0}):
        with vtc.compress(m, {"stages": [stage]}):
            torch.testing.assert_close(logits(m, inputs), ref, atol=1e-5, rtol=1e-5)


def test_llm_side_budget_is_per_image_and_structure_is_never_pruned():
    m = model()
    inputs = smolvlm_inputs(m, batch=3)
    ids = inputs["input_ids"]
    with vtc.compress(m, {"stages": [{"method": "fastv", "layer": 1, "budget": 10}]}) as run:
        logits(m, inputs)
    st = run.stats.stages[0]
    assert st.tokens_in == [48, 16, 48] and st.tokens_out == [10, 10, 10]
    kept = st.reduction.source  # (B, candidates): every candidate is an <image> position
    assert kept.shape[1] == 48
    n_text = int(((ids != IMAGE) & inputs["attention_mask"].bool()).sum(-1).max())
    assert run.stats.kv_cache_len[1] >= n_text  # every text (and structural) token is still there


def test_partly_masked_sub_image_is_refused():
    m = model()
    inputs = smolvlm_inputs(m, batch=1)
    inputs["pixel_attention_mask"] = inputs["pixel_attention_mask"].clone()
    inputs["pixel_attention_mask"][0, 0, :, 40:] = 0
    with vtc.compress(m, {"stages": [{"method": "random", "budget": 4}]}):
        with pytest.raises(vtc.ConfigError, match="pixel_attention_mask"):
            logits(m, inputs)
    assert torch.isfinite(logits(m, smolvlm_inputs(m, batch=1))).all()


@pytest.mark.parametrize("idefics3", [False, True])
def test_cls_only_and_clip_space_methods_are_refused(idefics3):
    """The (family x method) cells the matrix leaves out (tests/cases: CLS-only and CLIP-space cases run on CLIP
    towers only) are refused when attached, saying why, and leave the model untouched: a stage that can only use CLS
    attention (SigLIP has no CLS token) and CDPruner, whose relevance needs the CLIP image space (the pixel-shuffled
    SigLIP features are not CLIP patch states)."""
    from models_clip import tiny_clip_dir

    m = model(idefics3)
    inputs = smolvlm_inputs(m, batch=1)
    ref = logits(m, inputs)
    with pytest.raises(vtc.ConfigError, match="no CLS token"):
        vtc.compress(m, {"stages": [{"method": "pool", "mode": "cluster", "budget": 4, "weights": "cls"}]})
    assert not hasattr(m, "_vtc_run")
    cfg = {"stages": [{"method": "cdpruner", "budget": 4, "text_encoder": tiny_clip_dir(), "instruction": "w5"}]}
    with pytest.raises(vtc.ConfigError, match="not a CLIP tower: no CLIP image space"):
        vtc.compress(m, cfg)
    assert not hasattr(m, "_vtc_run")
    torch.testing.assert_close(logits(m, inputs), ref, atol=0, rtol=0)


def test_prompt_without_the_structure_is_refused():
    m = model()
    inputs = smolvlm_inputs(m, batch=2)
    ids = inputs["input_ids"].clone()
    pos = (ids[0] == IMAGE).nonzero().flatten()
    ids[0, pos[0]] = 5  # the first sub-image loses a token, the second gains one: the total still matches
    ids[0, pos[16] - 1] = IMAGE
    bad_global = inputs["input_ids"].clone()
    bad_global[1][bad_global[1] == GLOBAL] = 7  # row 1 ends its image differently from row 0
    with vtc.compress(m, {"stages": [{"method": "random", "budget": 4}]}):
        with pytest.raises(vtc.ConfigError, match=r"in row 0: a run of image placeholder tokens holds 15, not one "
                                                  r"sub-image's 16 \(image_seq_len\)"):
            logits(m, dict(inputs, input_ids=ids))
        with pytest.raises(vtc.ConfigError, match="do not end their images alike"):
            logits(m, dict(inputs, input_ids=bad_global))


# ---- against transformers' processor ----------------------------------------------------------------------------
SPECIALS = ["<fake_token_around_image>", "<global-img>", "<end_of_utterance>", "\n"] + [
    f"<row_{i}_col_{j}>" for i in range(1, 7) for j in range(1, 7)]


def _processor(size: int, seq_len: int, idefics3: bool = True):
    """The family's own processor over an offline word-level tokenizer: Idefics3Processor, or SmolVLMProcessor (its
    image and video processors; it needs ``num2words``, a dev dependency) with sub-images of ``size`` px."""
    from transformers import Idefics3ImageProcessor, Idefics3Processor

    from vtc.demo.build import build_tokenizer

    tok = build_tokenizer()
    tok.add_special_tokens({"additional_special_tokens": ["<image>", *SPECIALS]})
    if idefics3:
        ip = Idefics3ImageProcessor(size={"longest_edge": 2 * size}, max_image_size={"longest_edge": size})
        return Idefics3Processor(image_processor=ip, tokenizer=tok, image_seq_len=seq_len)
    from transformers import SmolVLMImageProcessor, SmolVLMProcessor, SmolVLMVideoProcessor

    ip = SmolVLMImageProcessor(size={"longest_edge": 2 * size}, max_image_size={"longest_edge": size})
    vp = SmolVLMVideoProcessor(size={"longest_edge": size}, max_image_size={"longest_edge": size})
    return SmolVLMProcessor(image_processor=ip, video_processor=vp, tokenizer=tok, image_seq_len=seq_len)


def _tiny_for(tok, idefics3: bool):
    m = tiny_smolvlm("sdpa", idefics3=idefics3)
    m.config.image_token_id = tok.convert_tokens_to_ids("<image>")
    return m


@pytest.mark.parametrize("idefics3", [False, True])
def test_vision_side_prompt_equals_processor_prompt_for_k_tokens(idefics3, monkeypatch):
    """pool avg to 2 x 2 per sub-image: vtc's rebuilt ids are exactly what the family's own processor
    (SmolVLMProcessor / Idefics3Processor) emits with image_seq_len = 4 (same rows / columns / fake / global tokens, 4 <image> per sub-image), and the logits are
    the model's on that prompt with the pooled features."""
    from PIL import Image

    import vtc.runtime as rt

    S = 32 if idefics3 else 48
    proc16, proc4 = _processor(S, 16, idefics3), _processor(S, 4, idefics3)
    m = _tiny_for(proc16.tokenizer, idefics3)
    image = Image.new("RGB", (2 * S, S - 10), (90, 160, 40))  # -> 1 x 2 crops + the global view
    text = "what colour <image> ?"
    inputs = proc16(images=image, text=text, return_tensors="pt")
    expected = proc4(images=image, text=text, return_tensors="pt")["input_ids"]
    assert get_adapter(m).image_grids(inputs["input_ids"]) == [(1, 2)]
    seen = []
    real_rebuild = rt.rebuild_prompt
    monkeypatch.setattr(rt, "rebuild_prompt", lambda *a, **k: seen.append(real_rebuild(*a, **k)) or seen[-1])
    with vtc.compress(m, {"stages": [{"method": "pool", "mode": "avg", "budget": 4}]}) as run:
        out = logits(m, inputs)
    assert run.stats.stages[0].tokens_out == [4, 4, 4]
    assert torch.equal(seen[0].input_ids, expected)
    with torch.no_grad():
        pv = inputs["pixel_values"].flatten(0, 1)
        feats = m.model.connector.pixel_shuffle(m.model.vision_model(pixel_values=pv).last_hidden_state,
                                                int(m.config.scale_factor))  # (3, 16, D f^2)
        pooled = torch.nn.functional.avg_pool2d(feats.transpose(1, 2).reshape(3, -1, 4, 4), 2)
        emb = m.model.connector.modality_projection(pooled.flatten(2).transpose(1, 2)).reshape(-1, 64)
    ref = scatter_logits(m, expected, torch.ones_like(expected), emb, m.config.image_token_id)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


# ---- SmolVLM2 video --------------------------------------------------------------------------------------------
VIDEO_TEXT = "what happens in <video> ?"


def _frames(n: int, seed: int):
    """n RGB frames as one (n, H, W, 3) uint8 array (no file, no decoder)."""
    import numpy as np

    return (np.random.default_rng(seed).random((n, 30, 40, 3)) * 255).astype("uint8")


def _video_inputs(proc, lengths=(3,), text: str = VIDEO_TEXT) -> dict:
    """SmolVLMProcessor's tensors for one video per row (``lengths`` frames each, already sampled: frame i at second
    i), left-padded; a shorter video's frames are padded with all-zero frames, as the processor does."""
    from transformers.video_utils import VideoMetadata

    meta = [VideoMetadata(total_num_frames=n, fps=1, frames_indices=list(range(n)), duration=float(n))
            for n in lengths]
    # one list of videos per row: transformers 5.17's SmolVLMProcessor counts a row's videos that way (a flat list
    # reads as frames); 5.24 takes both forms and gives the same tensors
    out = proc(videos=[[_frames(n, seed=n)] for n in lengths], text=[text] * len(lengths),
               video_metadata=[[m] for m in meta], padding=True, return_tensors="pt")
    return dict(out)


@functools.cache
def video_setup(seq_len: int = 16):
    proc = _processor(48, seq_len, idefics3=False)
    return proc, _tiny_for(proc.tokenizer, idefics3=False)


def test_video_frames_are_units_and_timestamps_are_text():
    """SmolVLMProcessor writes a video as its intro, then per frame ``\nFrame from MM:SS:`` and the frame as one
    unsplit image (``<fake><global-img><image>*t^2<fake>``): every frame is a unit and an image of its own (an LLM-side
    int budget is per frame), the intro and timestamps are text (never candidates, never counted)."""
    proc, m = video_setup()
    inputs = _video_inputs(proc, (3, 2))
    ids = inputs["input_ids"]
    ad = get_adapter(m)
    tm = ad.token_map(ids, inputs)
    assert torch.equal(tm.is_visual, ids == proc.image_token_id)
    assert torch.bincount(tm.image_id[tm.is_visual]).tolist() == [16] * 5  # 3 frames, then 2
    assert ad.image_grids(ids) == [(0, 0)] * 5 and ad.unit_layouts(inputs, 4) == [Grid(4, 4)]
    tok = proc.tokenizer
    colon = tok.convert_tokens_to_ids(":")
    assert int((ids[0] == colon).sum()) >= 3 * 2  # the timestamps (MM:SS:) are there, as text
    with vtc.compress(m, {"stages": [{"method": "fastv", "layer": 1, "budget": 5}]}) as run:
        logits(m, inputs)
    st = run.stats.stages[0]
    assert st.tokens_in == [48, 32] and st.tokens_out == [15, 10]  # 5 per frame
    n_text = int(((ids != proc.image_token_id) & inputs["attention_mask"].bool()).sum(-1).max())
    assert run.stats.kv_cache_len[1] >= n_text


@pytest.mark.parametrize("stage", [{"method": "visionzip", "budget": 1.0, "contextual": 0, "keep_cls": False},
                                   {"method": "pool", "mode": "avg", "budget": 1.0},
                                   {"method": "fastv", "layer": 1, "budget": 1.0}], ids=["visionzip", "pool", "fastv"])
def test_video_keep_all_is_the_model(stage):
    proc, m = video_setup()
    inputs = _video_inputs(proc, (3, 2))
    ref, ref_gen = logits(m, inputs), m.generate(**inputs, max_new_tokens=3, do_sample=False)
    with vtc.compress(m, {"stages": [stage]}):
        torch.testing.assert_close(logits(m, inputs), ref, atol=1e-5, rtol=1e-5)
        assert torch.equal(m.generate(**inputs, max_new_tokens=3, do_sample=False), ref_gen)


@pytest.mark.parametrize("stage", [{"method": "visionzip", "budget": 6},
                                   {"method": "fastv", "layer": 1, "budget": 5},
                                   {"method": "pdrop", "layers": [1, 2], "keep": [0.5, 0.25]}], ids=["vision", "fastv", "pdrop"])
def test_video_cached_decode_equals_uncached_over_the_kept_tokens(stage):
    """Cached greedy generate on a padded batch of two videos == recomputing every step without a cache over the same
    kept tokens (LLM side: the recorded reductions replayed; vision side: the same deterministic stage)."""
    from replay import assert_cached_equals_uncached

    proc, m = video_setup()
    inputs = _video_inputs(proc, (3, 2))
    config = {"stages": [stage]}
    with vtc.compress(m, config) as run:
        out = m.generate(**inputs, max_new_tokens=3, do_sample=False, output_logits=True, return_dict_in_generate=True)
    assert_cached_equals_uncached(m, config, inputs, out, stats=run.stats, key=f"smolvlm-video-{stage['method']}")


@pytest.mark.parametrize("stage", [{"method": "visionzip", "dominant": 5, "contextual": 2},
                                   {"method": "fastv", "layer": 1, "budget": 5}], ids=["vision", "llm"])
def test_video_batch_equals_single(stage):
    """Two videos of 3 and 2 frames in one padded batch (the shorter one's padding frame is all zero, dropped as the
    model drops it) give each row what the row alone gives (its prompt unpadded, its real frames only: the processor
    itself writes the batch's padded frame count into every video's intro, so a video processed alone differs)."""
    proc, m = video_setup()
    inputs = _video_inputs(proc, (3, 2))
    with vtc.compress(m, {"stages": [stage]}):
        batched = logits(m, inputs)[:, -1]
        for b, n in enumerate((3, 2)):
            keep = inputs["attention_mask"][b].bool()
            single = {"input_ids": inputs["input_ids"][b][keep][None], "attention_mask": torch.ones_like(keep[keep])[None],
                      "pixel_values": inputs["pixel_values"][b:b + 1, :n],
                      "pixel_attention_mask": inputs["pixel_attention_mask"][b:b + 1, :n]}
            torch.testing.assert_close(logits(m, single)[0, -1], batched[b], atol=1e-4, rtol=1e-4)


def test_video_vision_side_prompt_is_the_processors_for_k_tokens(monkeypatch):
    """pool avg to 2 x 2 per frame: the rebuilt ids are exactly SmolVLMProcessor's video prompt with
    image_seq_len = 4 (intro, timestamps and fake / global tokens unchanged), padded rows included, and the logits
    are the model's on that prompt with the pooled frame features."""
    import vtc.runtime as rt

    proc, m = video_setup()
    proc4 = _processor(48, 4, idefics3=False)
    inputs = _video_inputs(proc, (3, 2))
    expected = _video_inputs(proc4, (3, 2))
    seen = []
    real_rebuild = rt.rebuild_prompt
    monkeypatch.setattr(rt, "rebuild_prompt", lambda *a, **k: seen.append(real_rebuild(*a, **k)) or seen[-1])
    with vtc.compress(m, {"stages": [{"method": "pool", "mode": "avg", "budget": 4}]}) as run:
        out = logits(m, inputs)
    assert run.stats.stages[0].tokens_out == [4] * 5
    assert torch.equal(seen[0].input_ids, expected["input_ids"])  # padded rows too (left padding, as the processor)
    assert torch.equal(seen[0].attention_mask, expected["attention_mask"])
    with torch.no_grad():
        pv = inputs["pixel_values"].flatten(0, 1)
        pv = pv[pv.flatten(1).abs().sum(-1) > 0]  # the model's real frames (the padding frame dropped)
        feats = m.model.connector.pixel_shuffle(m.model.vision_model(pixel_values=pv).last_hidden_state,
                                                int(m.config.scale_factor))
        pooled = torch.nn.functional.avg_pool2d(feats.transpose(1, 2).reshape(5, -1, 4, 4), 2)
        emb = m.model.connector.modality_projection(pooled.flatten(2).transpose(1, 2)).reshape(-1, 64)
    ref = scatter_logits(m, expected["input_ids"], expected["attention_mask"], emb, m.config.image_token_id)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


# ---- vtc show ----------------------------------------------------------------------------------------------------
def test_show_draws_the_global_view_and_every_crop_in_place():
    """A 1 x 2 split: the global view's 4 x 4 grid over the whole image, then the 4 x 8 crop map, every cell where
    its sub-image sits; dropped cells dark, kept ones the image's grey (vision-side random pruning)."""
    from PIL import Image

    from vtc.viz import _fit, draw_kept, token_groups

    m = model()
    inputs = smolvlm_inputs(m, batch=1, grids=[(1, 2)])
    [layout] = get_adapter(m).picture_layouts(inputs, 0)
    with vtc.compress(m, {"stages": [{"method": "random", "budget": 5}]}) as run:
        logits(m, inputs)
    groups = token_groups(run.stats, 0)
    assert [int((g >= 0).sum()) for g in groups] == [5, 5, 5]  # crop (1, 1), crop (1, 2), global: token order
    grey = (200, 200, 200)
    out = draw_kept(Image.new("RGB", (96, 48), grey), groups, [layout], size=96)
    gw, gh = _fit(48, 96, 96)  # the global view's panel: the image at its aspect
    for r in range(4):
        for c in range(4):
            px = out.getpixel((int((c + 0.5) * gw / 4), int((r + 0.5) * gh / 4)))
            assert (max(px) < 80) == bool(groups[2].view(4, 4)[r, c] < 0), ("global", r, c, px)
    tiled = torch.cat([groups[0].view(4, 4), groups[1].view(4, 4)], dim=1)  # crops side by side
    pw, ph = _fit(4, 8, 96)
    for r in range(4):
        for c in range(8):
            px = out.getpixel((gw + 4 + int((c + 0.5) * pw / 8), int((r + 0.5) * ph / 4)))
            assert (max(px) < 80) == bool(tiled[r, c] < 0), ("crops", r, c, px)


# ---- from_pretrained round trip -----------------------------------------------------------------------------------
def _checkpoint(path, idefics3: bool):
    from vtc.demo.build import CHAT_TEMPLATE

    proc = _processor(32 if idefics3 else 48, 16, idefics3)
    proc.chat_template = CHAT_TEMPLATE
    m = _tiny_for(proc.tokenizer, idefics3=idefics3)
    m.generation_config.suppress_tokens = proc.tokenizer.convert_tokens_to_ids(["<image>", *SPECIALS[:2]])
    image = roundtrip.random_image(30, 60) if idefics3 else roundtrip.random_image(45, 90)
    roundtrip.save_checkpoint(path, m, proc, image)


@pytest.mark.parametrize("idefics3", [False, True])
def test_from_pretrained_roundtrip_and_cli(tmp_path, idefics3):
    """A tiny checkpoint saved with the family's processor (SmolVLMProcessor with its image and video processors, or
    Idefics3Processor) loads through AutoModelForImageTextToText + AutoProcessor, runs a compressed generate and
    ``vtc generate`` from the command line."""
    from transformers import AutoProcessor

    _checkpoint(tmp_path, idefics3)
    m, inputs = roundtrip.load_checkpoint(tmp_path, "USER: <image> what colour ? ASSISTANT:")
    name = "Idefics3" if idefics3 else "SmolVLM"
    assert type(m).__name__ == f"{name}ForConditionalGeneration"
    assert type(AutoProcessor.from_pretrained(tmp_path)).__name__ == f"{name}Processor"
    assert get_adapter(m).image_grids(inputs["input_ids"]) == [(1, 2)]
    with vtc.compress(m, {"stages": [{"method": "visionzip", "budget": 6}]}) as run:
        out = m.generate(**inputs, max_new_tokens=3, do_sample=False)
    assert run.stats.stages[0].tokens_out == [6, 6, 6] and out.shape[1] == inputs["input_ids"].shape[1] + 3
    roundtrip.cli_generate(tmp_path, "{method: visionzip, budget: 6}")


@functools.cache
def deep_model():
    return tiny_smolvlm("sdpa", layers=roundtrip.config_depth("smolvlm"))  # room for the configs' deepest layers


test_shipped_configs_run = roundtrip.shipped_configs_test("smolvlm", deep_model, lambda m: smolvlm_inputs(m, batch=2))
