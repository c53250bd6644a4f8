"""The shipped demo VLMs and their synthetic task (fast: loads two ~20 MB models, 200 short generations)."""

from __future__ import annotations

import collections

import numpy as np
import pytest
import torch

from vtc.demo import GRID_MODEL_PATH, ORDERED_MODEL_PATH
from vtc.demo.evaluate import evaluate
from vtc.demo.task import ANSWERS, QTYPES, blank_image, format_prompt, get_sample, get_samples

N_FIXED = 50  # test samples 0..49


# ------------------------------------------------------------------------------------------ generator
def test_generator_is_deterministic_per_seed():
    for i in (0, 7, 123):
        a, b = get_sample("test", i), get_sample("test", i)
        assert (a.question, a.answer, a.qtype) == (b.question, b.answer, b.qtype)
        assert np.array_equal(np.asarray(a.image), np.asarray(b.image))
    a, b = get_sample("train", 3), get_sample("test", 3)
    assert not np.array_equal(np.asarray(a.image), np.asarray(b.image))


def test_samples_are_well_formed_and_balanced():
    samples = get_samples("val", 240)
    assert {s.qtype for s in samples} == set(QTYPES)
    for s in samples:
        assert s.image.size == (112, 112) and s.image.mode == "RGB"
        assert s.answer in ANSWERS[s.qtype] and " " not in s.answer
    by_type = collections.defaultdict(collections.Counter)
    for s in samples:
        by_type[s.qtype][s.answer] += 1
    for qtype, counts in by_type.items():
        majority = max(counts.values()) / sum(counts.values())
        assert majority <= 0.65, (qtype, counts)


def test_prompt_matches_chat_template():
    from transformers import AutoProcessor

    _require_trained(GRID_MODEL_PATH)
    proc = AutoProcessor.from_pretrained(GRID_MODEL_PATH)
    q = get_sample("test", 0).question
    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": q}]}]
    assert proc.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False) == format_prompt(q)


def test_scene_caption_lists_every_cell_in_raster_order():
    from vtc.demo.task import scene_caption

    s = get_sample("train", 11)
    words = scene_caption(s.scene).split()
    assert words[:2] == ["top", "left"] and words.count("no") == 9 - len(s.scene)
    for o in s.scene:
        assert f"{o.size} {o.color} {o.shape}" in scene_caption(s.scene)
    from vtc.demo.build import build_tokenizer

    tok = build_tokenizer()
    assert tok.unk_token_id not in tok(scene_caption(s.scene))["input_ids"]


def test_training_labels_are_exactly_the_answer_spans():
    """Answer-only loss: every token from after "ASSISTANT :" through its </s>, for one-word answers and the
    multi-word alignment captions alike; nothing of the prompt, the image or the padding."""
    from vtc.demo.build import build_grid_processor, build_tokenizer
    from vtc.demo.task import scene_caption
    from vtc.demo.train import _vqa_batch

    tok = build_tokenizer()
    ids, am, _pv, labels, _tg = _vqa_batch(tok, build_grid_processor(tok), 4, 4, 4, "cpu", caption_every=2)
    for r in range(4):
        got = tok.decode(labels[r][labels[r] != -100])
        s = get_sample("train", 4 + r)
        if 4 + r < len(QTYPES):  # samples 0-5 (one of each question type) are captions, 6-11 questions
            assert got == scene_caption(s.scene) + " </s>"
        else:
            words = got.split()
            assert words[0] == s.answer and words[1::2] == ["</s>"] * 4 and len(words) == 8
        assert bool((labels[r][am[r] == 0] == -100).all())


# ------------------------------------------------------------------------------------- shipped models
def _require_trained(path):
    """The shipped weights are produced by `vtc train-demo`; until they are committed these tests cannot run."""
    if not (path / "model.safetensors").exists():
        pytest.skip(f"demo weights not in {path} yet (train them with `vtc train-demo`)")


def _check_files(path):
    _require_trained(path)
    files = {f.name: f.stat().st_size for f in path.iterdir() if f.is_file()}
    assert "model.safetensors" in files and not any(n.endswith((".bin", ".pt", ".pth")) for n in files)
    assert sum(files.values()) <= 30 * 2**20


@pytest.fixture(scope="module")
def grid():
    from transformers import AutoModelForImageTextToText, AutoProcessor, LlavaForConditionalGeneration

    _check_files(GRID_MODEL_PATH)
    model = AutoModelForImageTextToText.from_pretrained(GRID_MODEL_PATH).eval()
    assert isinstance(model, LlavaForConditionalGeneration)
    return model, AutoProcessor.from_pretrained(GRID_MODEL_PATH)


@pytest.fixture(scope="module")
def ordered():
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from vtc.demo.ordered_vlm import OrderedVLMForConditionalGeneration, register

    register()
    register()  # idempotent
    _check_files(ORDERED_MODEL_PATH)
    model = AutoModelForImageTextToText.from_pretrained(ORDERED_MODEL_PATH).eval()
    assert isinstance(model, OrderedVLMForConditionalGeneration)
    return model, AutoProcessor.from_pretrained(ORDERED_MODEL_PATH)


def test_grid_model_structure(grid):
    model, proc = grid
    cfg = model.config
    assert cfg.vision_feature_select_strategy == "default" and cfg.vision_feature_layer == -2
    s = get_sample("test", 0)
    inputs = proc(images=[s.image], text=[format_prompt(s.question)], return_tensors="pt")
    assert int((inputs["input_ids"] == cfg.image_token_id).sum()) == 196


def test_grid_model_accuracy(grid):
    model, proc = grid
    report = evaluate(model, proc, split="test", n=N_FIXED, batch_size=25)
    assert report["n"] == N_FIXED
    assert report["accuracy"] >= 0.90, report


def test_grid_model_blind_baseline(grid):
    model, proc = grid
    report = evaluate(model, proc, split="test", n=N_FIXED, batch_size=25, image_transform=blank_image)
    assert report["accuracy"] <= 0.40, report


def test_ordered_model_structure(ordered):
    model, proc = ordered
    assert type(model.model.language_model).__name__ == "LlamaModel"
    s = get_sample("test", 0)
    inputs = proc(images=[s.image], text=[format_prompt(s.question)], return_tensors="pt")
    assert int((inputs["input_ids"] == model.config.image_token_id).sum()) == model.config.n_latents == 32
    with torch.no_grad():
        feats = model.image_features(inputs["pixel_values"])
    assert feats.shape == (1, 32, model.config.text_config.hidden_size)


def test_ordered_model_accuracy(ordered):
    model, proc = ordered
    report = evaluate(model, proc, split="test", n=N_FIXED, batch_size=25)
    assert report["accuracy"] >= 0.85, report


def test_ordered_model_blind_baseline(ordered):
    model, proc = ordered
    report = evaluate(model, proc, split="test", n=N_FIXED, batch_size=25, image_transform=blank_image)
    assert report["accuracy"] <= 0.40, report


def test_caption_turns_leave_every_question_type_in_training():
    """Regression: captions once replaced every i % 3 == 0 sample, i.e. all colour and existence questions."""
    from vtc.demo.build import build_grid_processor, build_tokenizer
    from vtc.demo.train import _vqa_batch

    tok = build_tokenizer()
    _ids, _am, _pv, labels, _tg = _vqa_batch(tok, build_grid_processor(tok), 0, 36, 1, "cpu", caption_every=6)
    questions = [r for r in range(36) if (labels[r] != -100).sum() == 2]  # one answer word + </s>
    assert len(questions) == 30 and {get_sample("train", r).qtype for r in questions} == set(QTYPES)
