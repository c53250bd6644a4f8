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
ANSWERS_WHERE = ("top", "middle", "bottom", "left", "center", "right")


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


def test_where_training_questions_read_the_named_objects_cell():
    """The training-only "where" questions name an object by colour and shape and answer its row or column;
    every word is in the tokenizer's vocabulary, and they never appear in the evaluation splits."""
    from vtc.demo.build import build_tokenizer
    from vtc.demo.task import COLS, ROWS, TRAINING_QTYPES, scene_qas

    tok = build_tokenizer()
    assert "where" in TRAINING_QTYPES and "where" not in QTYPES
    for i in range(10):
        s = get_sample("train", i)
        qas = scene_qas(s.scene, np.random.default_rng(i), 12, ("where",))
        assert len(qas) == 12
        for q, a, qtype in qas:
            assert qtype == "where" and tok.unk_token_id not in tok(q)["input_ids"]
            axis, name = q.split()[1], " ".join(q.split()[4:6])
            (o,) = [o for o in s.scene if o.name == name]
            assert a == (COLS[o.col] if axis == "column" else ROWS[o.row])
    with pytest.raises(ValueError, match="qtypes must be"):
        scene_qas(get_sample("train", 0).scene, np.random.default_rng(0), 2, ("where", "colour"))
    assert "which" not in " ".join(s.question for s in get_samples("test", 60))


def test_prompt_matches_chat_template():
    from transformers import AutoProcessor

    _require_trained(GRID_MODEL_PATH)
    proc = AutoProcessor.from_pretrained(GRID_MODEL_PATH)
    q = get_sample("test", 0).question
    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": q}]}]
    assert proc.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False) == format_prompt(q)


def test_packed_training_labels_are_exactly_the_answer_spans():
    """Answer-only loss: each branch's labels are its answer word and </s>; nothing of the prefix, the questions
    or the padding. The first branch is the sample's own QA; branches never see each other."""
    from eval.demo_training.train import packed_attention_mask, packed_sequences
    from vtc.demo.build import IMAGE_TOKEN_ID, build_tokenizer

    tok = build_tokenizer()
    samples = get_samples("train", 5)
    ids, seg, pos, labels, qtypes = packed_sequences(tok, samples, 4, 196, with_qtypes=True)
    assert qtypes[::4] == [s.qtype for s in samples] and set(qtypes) <= set(QTYPES) and len(qtypes) == 20
    _, _, _, where_labels, where_types = packed_sequences(
        tok, samples, 4, 196, qtypes=("where",), own_first=False, with_qtypes=True
    )
    assert where_types == ["where"] * 20
    assert set(tok.decode(where_labels[where_labels != -100]).split()) <= set(ANSWERS_WHERE) | {"</s>"}
    mask = packed_attention_mask(seg)[:, 0]
    for r, s in enumerate(samples):
        assert int((ids[r] == IMAGE_TOKEN_ID).sum()) == 196 and bool((seg[r][ids[r] == IMAGE_TOKEN_ID] == 0).all())
        words = tok.decode(labels[r][labels[r] != -100]).split()
        assert words[0] == s.answer and words[1::2] == ["</s>"] * 4 and len(words) == 8
        assert bool((labels[r][seg[r] <= 0] == -100).all())
        for j in range(1, 5):
            rows = (seg[r] == j).nonzero()[:, 0]
            assert int(pos[r, rows[0]]) == int((seg[r] == 0).sum())  # positions restart after the prefix
            seen = seg[r][mask[r, rows[-1]]]
            assert set(seen.tolist()) == {0, j}


@pytest.mark.parametrize("model_kind", ["grid", "1d"])
def test_packed_branches_equal_single_turn_prompts(model_kind):
    """Shared-prefix packing is exact: every branch's answer logits equal those of the single-turn prompt built
    by the processor (random weights; the invariant the training recipe rests on)."""
    from eval.demo_training.train import _grid_features, _ordered_features, packed_attention_mask, packed_sequences
    from vtc.demo.build import (
        IMAGE_TOKEN_ID,
        build_grid_model,
        build_grid_processor,
        build_ordered_model,
        build_ordered_processor,
        build_tokenizer,
    )
    from vtc.demo.task import scene_qas

    torch.manual_seed(0)
    tok = build_tokenizer()
    if model_kind == "grid":
        model, proc, feats_of, n = build_grid_model(tok).eval(), build_grid_processor(tok), _grid_features, 196
    else:
        model, proc, feats_of, n = build_ordered_model(tok).eval(), build_ordered_processor(tok), _ordered_features, 32
    samples = get_samples("train", 3, start=20)
    ids, seg, pos, labels = packed_sequences(tok, samples, 3, n)
    pv = proc.image_processor([s.image for s in samples], return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        f = feats_of(model, pv)
        emb = model.get_input_embeddings()(ids).masked_scatter(
            (ids == IMAGE_TOKEN_ID).unsqueeze(-1), f.reshape(-1, f.shape[-1])
        )
        packed = model(inputs_embeds=emb, attention_mask=packed_attention_mask(seg), position_ids=pos).logits
        for r, s in enumerate(samples):
            qas = [(s.question, s.answer)] + [
                (q, a) for q, a, _ in scene_qas(s.scene, np.random.default_rng([777, *s.seed]), 2)
            ]
            inp = proc(images=[s.image] * 3, text=[format_prompt(q) for q, _ in qas], return_tensors="pt", padding=True)
            ref = model(**inp).logits[:, -1]
            first = ((labels[r, 1:] != -100) & (labels[r, :-1] == -100)).nonzero()[:, 0]
            assert len(first) == 3
            torch.testing.assert_close(packed[r, first], ref, atol=2e-5, rtol=0)


# ------------------------------------------------------------------------------------- shipped models
def _require_trained(path):
    """The shipped weights are produced by `python eval/train_demo.py`; until they are committed these tests cannot run."""
    if not (path / "model.safetensors").exists():
        pytest.skip(f"demo weights not in {path} yet (train them with `python eval/train_demo.py`)")


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


def test_symbolic_patches_describe_the_scene():
    """The LM's pretraining input: object patches (exactly the stage-1 tower's object patches) carry the colour,
    shape and size of their object, background patches the background embedding, all plus their position."""
    from eval.demo_training.train import SymbolicPatches, _tower_targets, patch_attributes
    from vtc.demo.task import COLORS, SHAPES

    samples = get_samples("train", 4)
    attr = patch_attributes([s.scene for s in samples])
    assert attr.shape == (4, 196, 3)
    assert torch.equal(attr[..., 0] >= 0, _tower_targets([s.scene for s in samples])[1] > 0)
    o = samples[0].scene[0]
    centre = int(o.cy // 8) * 14 + int(o.cx // 8)
    assert attr[0, centre].tolist() == [list(COLORS).index(o.color), SHAPES.index(o.shape), int(o.size == "large")]
    sym = SymbolicPatches(16)
    with torch.no_grad():
        x = sym(samples)
    bg = int((attr[0, :, 0] < 0).nonzero()[0])
    torch.testing.assert_close(x[0, bg], sym.background + sym.pos[bg])
    c, s, z = attr[0, centre].tolist()
    torch.testing.assert_close(x[0, centre], sym.color[c] + sym.shape[s] + sym.size[z] + sym.pos[centre])


# ------------------------------------------------------------------------------------- training pieces
def test_lm_stage_cache_round_trips_and_names_its_hyperparameters(tmp_path):
    """Stage 2a's cache restores the LM and symbolic tables exactly, leaves tower and projector alone, and its
    file name changes with every hyperparameter the stage reads (never with later stages' ones)."""
    from eval.demo_training.train import GRID_DEFAULTS, SymbolicPatches, _lm_cache_path, _load_lm_state, _save_lm_state
    from vtc.demo.build import build_grid_model, build_tokenizer

    tok = build_tokenizer()
    torch.manual_seed(0)
    a, sym_a = build_grid_model(tok), SymbolicPatches(256)
    torch.manual_seed(1)
    b, sym_b = build_grid_model(tok), SymbolicPatches(256)
    tower_b = {k: v.clone() for k, v in b.model.vision_tower.state_dict().items()}
    path = _lm_cache_path(tmp_path, GRID_DEFAULTS, 0)
    _save_lm_state(a, sym_a, path)
    _load_lm_state(b, sym_b, path, "cpu")
    for (name, va), vb in zip(
        a.model.language_model.state_dict().items(), b.model.language_model.state_dict().values()
    ):
        assert torch.equal(va, vb), name
    assert torch.equal(a.lm_head.weight, b.lm_head.weight) and torch.equal(sym_a.color, sym_b.color)
    assert all(torch.equal(v, b.model.vision_tower.state_dict()[k]) for k, v in tower_b.items())
    assert not torch.equal(a.model.multi_modal_projector.linear_1.weight, b.model.multi_modal_projector.linear_1.weight)
    assert _lm_cache_path(tmp_path, {**GRID_DEFAULTS, "lm_steps": 1}, 0) != path
    assert _lm_cache_path(tmp_path, GRID_DEFAULTS, 1) != path
    assert _lm_cache_path(tmp_path, {**GRID_DEFAULTS, "stage2_steps": 1, "align_steps": 1}, 0) == path


def test_feature_helpers_train_the_tower_only_when_it_is_unfrozen():
    from eval.demo_training.train import _grid_features
    from vtc.demo.build import build_grid_model, build_tokenizer

    model = build_grid_model(build_tokenizer())
    pv = torch.randn(2, 3, 112, 112)
    tower = model.model.vision_tower
    tower.requires_grad_(False)
    _grid_features(model, pv).sum().backward()
    assert all(p.grad is None for p in tower.parameters())
    assert model.model.multi_modal_projector.linear_1.weight.grad is not None
    tower.requires_grad_(True)
    _grid_features(model, pv).sum().backward()
    q_proj = next(p for n, p in tower.named_parameters() if n.endswith("layers.0.self_attn.q_proj.weight"))
    assert q_proj.grad.abs().sum() > 0


def test_resampler_position_bias_starts_neutral_and_steers_the_queries():
    """The 1D resampler's learned cross-attention bias is zero at init (the latents equal those of the same
    weights without it) and, once set, moves each query's attention independently of content."""
    from vtc.demo.build import build_ordered_model, build_tokenizer
    from vtc.demo.ordered_vlm import OrderedVLMForConditionalGeneration

    tok = build_tokenizer()
    torch.manual_seed(0)
    model = build_ordered_model(tok).eval()
    tower = model.model.vision_tower
    assert model.config.resampler_position_bias and tower.position_bias.shape == (2, 4, 32, 197)
    assert torch.count_nonzero(tower.position_bias) == 0
    cfg = model.config.to_dict() | {"resampler_position_bias": False}
    plain = OrderedVLMForConditionalGeneration(type(model.config).from_dict(cfg)).eval()
    missing = plain.load_state_dict(model.state_dict(), strict=False)
    assert missing.unexpected_keys == ["model.vision_tower.position_bias"] and not missing.missing_keys
    feats = torch.randn(2, 197, 128)
    with torch.no_grad():
        torch.testing.assert_close(tower.resample(feats), plain.model.vision_tower.resample(feats))
        tower.position_bias[:, :, 0, 5] = 50.0  # query 0 looks only at key 5
        out = tower.resample(feats)
        ref = plain.model.vision_tower.resample(feats)
    assert not torch.allclose(out[:, 0], ref[:, 0])


def test_cached_stage1_leaves_the_same_tower_and_random_state_as_training_it(tmp_path):
    """A run that loads the stage-1 cache continues exactly like the run that trained it: same tower weights and
    the same torch RNG state for the stages after it (the symbolic tables are initialised from it)."""
    from eval.demo_training.train import stage1_tower
    from vtc.demo.build import build_grid_model, build_grid_processor, build_tokenizer

    tok = build_tokenizer()
    hp = {"stage1_steps": 2, "stage1_batch": 4}
    draws, towers = [], []
    for reuse in (False, True):
        torch.manual_seed(123 + reuse)  # a different state before the stage on each path
        model = build_grid_model(tok)
        tower = model.model.vision_tower
        stage1_tower(tower, build_grid_processor(tok), hp, "cpu", lambda m: None, 0, "t", tmp_path, reuse)
        draws.append(torch.rand(4))
        towers.append(tower.state_dict())
    assert torch.equal(draws[0], draws[1])
    assert all(torch.equal(v, towers[1][k]) for k, v in towers[0].items())


def test_cdpruner_with_the_demo_text_tower_keeps_the_named_objects(grid):
    """CDPruner on the grid demo model with the demo tower's own CLIP text tower (vtc/assets/tiny-llava-clip, trained
    by eval/demo_training/train_text_tower.py): the instruction is read off the demo prompt, and the kept tokens lie
    on the objects the question names far more often than the named objects' share of the image."""
    import vtc
    from eval.demo_training.train_text_tower import named_objects, patch_mask
    from vtc.demo import ASSETS
    from vtc.viz import token_groups

    model, proc = grid
    samples = [s for s in get_samples("test", 60) if s.qtype in ("color", "shape", "exist")][:16]
    cfg = {"stages": [{"method": "cdpruner", "budget": 16, "negate": False,
                       "text_encoder": str(ASSETS / "tiny-llava-clip")}]}
    inputs = proc(images=[s.image for s in samples], text=[format_prompt(s.question) for s in samples],
                  return_tensors="pt", padding=True)
    named = [torch.from_numpy(patch_mask(named_objects(s.question, s.scene), 112, 8)).bool() for s in samples]
    share = np.mean([float(m.float().mean()) for m in named])

    def on_object(negate: bool) -> float:
        cfg["stages"][0]["negate"] = negate
        with vtc.compress(model, cfg) as run, torch.no_grad():
            model(**inputs)
        kept = [token_groups(run.stats, i)[0] >= 0 for i in range(len(samples))]
        assert all(int(k.sum()) == 16 for k in kept)
        return float(np.mean([float((k & m).sum()) / 16 for k, m in zip(kept, named)]))

    paper_sign = on_object(False)
    assert paper_sign > 3 * share, (paper_sign, share)
    # the official negation turns this tower's relevance around: the kept tokens avoid the named objects
    assert on_object(True) < share < paper_sign
