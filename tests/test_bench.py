"""The speed benchmark (eval/bench.py, eval/bench_all.py) and its analytic FLOPs (eval/flops.py), on tiny presets."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import vtc
from eval import bench_all as BA
from eval import flops as fl
from vtc import bench as B
from vtc.bench import measure as BM
from vtc.bench import presets as BP

ROOT = Path(__file__).resolve().parent.parent

FASTV = {"name": "fastv-t", "stages": [{"method": "fastv", "layer": 2, "budget": 0.5}]}


@pytest.fixture(scope="module")
def tiny():
    model = B.build_model("tiny")
    return model, B.synthetic_inputs(model, "tiny", batch=2, text_tokens=12)


# ---- FLOPs by hand -------------------------------------------------------------------------------------------------
def test_llm_layer_and_decode_flops_by_hand():
    s = fl.LMShape(layers=1, hidden=4, intermediate=6, heads=2, kv_heads=1)  # head dim 2, kv dim 2
    n = 3
    # q: 3x4 @ 4x4, o: 3x4 @ 4x4 -> 2*48 each; k, v: 3x4 @ 4x2 -> 2*24 each
    proj = 2 * (3 * 4 * 4) * 2 + 2 * (3 * 4 * 2) * 2
    # causal pairs 1 + 2 + 3 = 6 per head; QK^T and AV: 2 * 2 (head dim) * 6 each, for 2 heads
    attn = 2 * (2 * 2 * 6) * 2
    mlp = 3 * 2 * (3 * 4 * 6)  # gate, up: 3x4 @ 4x6; down: 3x6 @ 6x4
    assert fl.layer_flops(s, n) == {"proj": proj, "attn": attn, "mlp": mlp, "total": proj + attn + mlp}
    assert fl.prefill_flops(s, [n]) == proj + attn + mlp
    # one new token over 5 cached entries: token-wise terms of 1 token + 6 keys per head
    one = 2 * 16 * 2 + 2 * 8 * 2 + 3 * 2 * 24
    assert fl.decode_flops(s, [5]) == one + 2 * (2 * 2 * 6) * 2
    assert fl.lm_head_flops(4, 10, rows=2) == 2 * 2 * 4 * 10


def test_vision_flops_by_hand():
    v = fl.ViTShape(layers=1, hidden=4, intermediate=8, heads=2)
    T = 3
    by_hand = 4 * 2 * T * 16 + 2 * 2 * 4 * T * T + 2 * 2 * T * 4 * 8
    assert fl.vit_layer_flops(v, T)["total"] == by_hand
    assert fl.vit_flops(v, T, units=5) == 5 * by_hand
    gated = fl.ViTShape(layers=2, hidden=4, intermediate=8, heads=2, gated=True)
    # layer 0 windowed (10 pairs), layer 1 full (T^2)
    assert (
        fl.vit_flops(gated, T, window_pairs_per_unit=10, full_layers=[1])
        == fl.vit_layer_flops(gated, T, 10)["total"] + fl.vit_layer_flops(gated, T)["total"]
    )
    assert fl.vit_layer_flops(gated, T)["mlp"] == 3 * 2 * T * 4 * 8
    assert fl.patch_embed_flops(6, 12, 4) == 2 * 6 * 12 * 4
    assert fl.mlp_flops(3, [4, 8, 2]) == 2 * 3 * 4 * 8 + 2 * 3 * 8 * 2
    # 6 x 6 patches, 2 x 2 merge -> 3 x 3 merged tokens, windows of 2 x 2 merged: sizes 2x2, 2x1, 1x2, 1x1
    assert fl.window_pairs(6, 6, window=2, merge=2) == 16**2 + 8**2 + 8**2 + 4**2


def test_model_flops_of_tiny_llava_by_hand(tiny):
    model, inputs = tiny
    # CLIP: 3 layers, D 32, F 64, 36 patches + CLS = 37 tokens, 2 images; patch embed 8x8x3 -> 32
    T, D, F = 37, 32, 64
    layer = 4 * 2 * T * D * D + 2 * 2 * D * T * T + 2 * 2 * T * D * F
    tower = 2 * (3 * layer + 2 * 36 * 192 * D)
    projector = 2 * 2 * 36 * (32 * 64 + 64 * 64)  # 32 -> 64 -> 64 on 2 x 36 tokens
    vis = B.vision_flops(model, inputs)
    assert vis["tower"] == tower and vis["projector"] == projector
    n = inputs["input_ids"].shape[1]
    shape = B.lm_shape(model)
    f = B.model_flops(model, inputs, prompt_len=n, seq_lens=[n] * 4, kv_lens=None, projector_rows=None)
    assert f["llm_prefill"] == 2 * 4 * fl.layer_flops(shape, n)["total"]
    assert f["prefill_total"] == tower + projector + f["llm_prefill"] + 2 * 2 * 64 * 128
    # full depth: the last layer's length carries on
    g = B.model_flops(
        model, inputs, prompt_len=n, seq_lens=[n, n, 10, 10], kv_lens=None, projector_rows=None, full_layers=6
    )
    assert g["seq_len_per_layer"] == [n, n, 10, 10, 10, 10]


# ---- model and inputs ----------------------------------------------------------------------------------------------
def test_build_model_matches_a_normally_built_model(tiny):
    """Skipping transformers' init leaves no buffer wrong: the same weights in a normally built model give the
    same logits; every parameter is finite with the intended spread."""
    model, inputs = tiny
    cfg, cls = BP._hf_config(B.ARCHS["tiny"], None, None, "sdpa")
    ref = cls(cfg).eval()
    ref.load_state_dict(model.state_dict())
    with torch.no_grad():
        a = model(**inputs).logits
        b = ref(**inputs).logits
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    for name, p in model.named_parameters():
        assert torch.isfinite(p).all(), name
    w = model.model.language_model.layers[0].mlp.up_proj.weight
    assert abs(float(w.detach().std()) - 0.02) < 2e-3


@pytest.mark.parametrize("arch", ["tiny-next", "tiny-qwen2-vl", "tiny-internvl"])
def test_synthetic_inputs_fit_the_model(arch):
    """The placeholder count matches what the model produces (the forward checks it) and rows are identical."""
    model = B.build_model(arch, layers=2)
    inputs = B.synthetic_inputs(model, arch, batch=2, text_tokens=10)
    assert torch.equal(inputs["input_ids"][0], inputs["input_ids"][1])
    assert bool(inputs["attention_mask"].all())
    with torch.no_grad():
        model(**inputs)
    n_vis = int((inputs["input_ids"][0] == model.config.image_token_id).sum())
    if arch == "tiny-next":  # 96 x 96 px: base + 2 x 2 crops of 6 x 6, 12 rows + 12 newlines
        assert n_vis == 36 + 12 * 12 + 12
    elif arch == "tiny-internvl":  # 40 x 90 px: 2 x 1 tiles + the thumbnail, 8 x 8 patches shuffled to 4 x 4 each
        assert n_vis == 3 * 16 and inputs["pixel_values"].shape[0] == 2 * 3
    else:  # 32 px / 4 px patches = 8 x 8, merged 2 x 2
        assert n_vis == 16


def test_kv_cache_bytes_by_hand(tiny):
    model, inputs = tiny
    with torch.no_grad():
        out = model(**inputs, use_cache=True)
    b, n = inputs["input_ids"].shape
    # 4 layers x (k, v) x batch x 2 kv heads x n x head dim 16 x 4 bytes
    assert B.kv_cache_bytes(model, BM._cache_of(out), b) == 4 * 2 * b * 2 * n * 16 * 4
    real = sum(t.numel() * t.element_size() for layer in BM._cache_of(out).layers for t in (layer.keys, layer.values))
    assert real == 4 * 2 * b * 2 * n * 16 * 4  # what the key / value tensors of the real cache hold


def test_too_shallow_model_is_a_clear_error(tiny):
    model, inputs = tiny
    with pytest.raises(vtc.ConfigError, match=r"decoder layer 5 .* 4 decoder layers: pass --layers >= 6"):
        B.Variants(model, inputs, {"stages": [{"method": "fastv", "layer": 5, "budget": 0.5}]})


# ---- the oracle is the same computation without scoring ------------------------------------------------------------
ORACLE_CONFIGS = [
    FASTV,
    {"stages": [{"method": "random", "budget": 9}]},
    {"stages": [{"method": "downsample", "budget": 9}]},
    {"stages": [{"method": "random", "budget": 20}, {"method": "fastv", "layer": 1, "budget": 0.5}]},
]
if "pact" in vtc.available_methods():
    ORACLE_CONFIGS.append({"stages": [{"method": "pact", "layer": 2, "keep": 0.55, "cutoff": 0.3}]})


@pytest.mark.parametrize("config", ORACLE_CONFIGS, ids=lambda c: "+".join(s["method"] for s in c["stages"]))
def test_oracle_gives_the_same_logits_and_lengths_as_vtc(tiny, config):
    model, inputs = tiny
    var = B.Variants(model, inputs, config)
    with torch.no_grad():
        a = var.forward("vtc", use_cache=True)
        st = dict(var.run.stats.seq_len_per_layer), list(var.run.stats.kv_cache_len)
        b = var.forward("oracle", use_cache=True)
    torch.testing.assert_close(a.logits[:, -1], b.logits[:, -1], rtol=1e-5, atol=1e-5)
    if var.replay is not None:
        assert (dict(var.replay.stats.seq_len_per_layer), list(var.replay.stats.kv_cache_len)) == st
    assert B.kv_cache_bytes(model, BM._cache_of(a), 2) == B.kv_cache_bytes(model, BM._cache_of(b), 2)
    # nothing left attached; the replay method is not registered
    assert getattr(model, "_vtc_run", None) is None
    assert "bench_replay" not in vtc.available_methods()


# ---- end to end ----------------------------------------------------------------------------------------------------
RESULT_KEYS = {
    "arch",
    "config",
    "config_name",
    "stages",
    "methods",
    "batch",
    "prompt_len",
    "visual_tokens",
    "llm_layers",
    "vision_layers",
    "full_llm_layers",
    "dtype",
    "repeats",
    "warmup",
    "decode_tokens",
    "variants",
    "summary",
    "vtc_stats",
    "environment",
    "raw",
}
VARIANT_KEYS = {
    "prefill_s",
    "decode_s_per_token",
    "vtc_time_s",
    "peak_memory_bytes",
    "peak_memory_delta_bytes",
    "prompt_len",
    "seq_len_per_layer",
    "kv_cache_len",
    "kv_cache_bytes",
    "flops",
    "flops_full_depth",
}
SUMMARY_KEYS = {
    "speedup",
    "oracle_speedup",
    "efficiency",
    "overhead_pct",
    "decode_speedup",
    "kv_ratio",
    "flops_ratio",
    "flops_ratio_full_depth",
    "vision_share",
    "oracle_matches_vtc",
    "speedup_gap_pct",
    "overhead_pct_full_depth_est",
}


@pytest.fixture(scope="module")
def cli_run(tmp_path_factory):
    """One ``vtc bench`` run on the tiny preset (shared by the tests below)."""
    tmp = tmp_path_factory.mktemp("bench")
    cfg = tmp / "fastv.yaml"
    cfg.write_text("name: fastv-t\nstages:\n  - {method: fastv, layer: 2, budget: 0.5}\n")
    import contextlib
    import io

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        rc = B.main(
            [
                "--config",
                str(cfg),
                "--arch",
                "tiny",
                "--batch",
                "2",
                "--text-tokens",
                "12",
                "--repeats",
                "2",
                "--warmup",
                "0",
                "--decode-tokens",
                "2",
                "--device",
                "cpu",
                "--out",
                str(tmp / "out"),
            ]
        )
    return rc, buf.getvalue(), tmp / "out"


def test_bench_cli_end_to_end_writes_json_and_png(cli_run):
    rc, printed, out = cli_run
    assert rc == 0
    assert "speedup vs baseline" in printed and "efficiency" in printed and "oracle" in printed
    files = sorted(out.iterdir())
    assert [f.suffix for f in files] == [".json", ".png"]
    assert files[1].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    r = json.loads(files[0].read_text())
    assert RESULT_KEYS <= set(r)
    assert set(r["variants"]) == {"baseline", "vtc", "oracle", "vision"}
    for name in ("baseline", "vtc", "oracle"):
        assert VARIANT_KEYS <= set(r["variants"][name])
        assert r["variants"][name]["prefill_s"]["n"] == 2
        assert r["variants"][name]["decode_s_per_token"]["n"] == 2 * 2  # 2 steps x 2 repeats
    assert SUMMARY_KEYS <= set(r["summary"])
    v, s = r["variants"], r["summary"]
    med = {k: v[k]["prefill_s"]["median"] for k in v}
    assert s["speedup"] == pytest.approx(med["baseline"] / med["vtc"])
    assert s["oracle_speedup"] == pytest.approx(med["baseline"] / med["oracle"])
    assert s["efficiency"] == pytest.approx(med["oracle"] / med["vtc"])
    assert s["overhead_pct"] == pytest.approx(100 * v["vtc"]["vtc_time_s"]["median"] / med["vtc"])
    assert s["oracle_matches_vtc"] is True
    # fastv keeps half of the 36 visual tokens from layer 2 on; the KV cache is read from the real cache
    n = r["prompt_len"]
    assert r["visual_tokens"] == 36
    assert v["vtc"]["seq_len_per_layer"] == [n, n, n - 18, n - 18]
    assert v["vtc"]["kv_cache_len"] == [n, n, n - 18, n - 18]
    assert v["vtc"]["kv_cache_bytes"] == 2 * 2 * 2 * 16 * 4 * (2 * n + 2 * (n - 18))
    assert v["vtc"]["flops"]["llm_prefill"] < v["baseline"]["flops"]["llm_prefill"]
    assert v["vtc"]["flops"]["vision_tower"] == v["baseline"]["flops"]["vision_tower"]
    assert r["vtc_stats"]["stages"][0]["tokens_out"] == [18, 18]


def test_summary_is_computed_from_the_medians():
    def var(prefill, decode, vtc_t=None, kv=100, flops=1000):
        return {
            "prefill_s": {"median": prefill},
            "decode_s_per_token": {"median": decode},
            "vtc_time_s": {"median": vtc_t},
            "kv_cache_bytes": kv,
            "flops": {"prefill_total": flops},
            "flops_full_depth": {"prefill_total": 2 * flops},
        }

    variants = {
        "baseline": var(2.0, 0.10),
        "vtc": var(1.0, 0.08, 0.05, kv=50, flops=400),
        "oracle": var(0.9, 0.075, 0.01, kv=50, flops=400),
        "vision": var(0.2, None),
    }
    s = B.summarize(variants)
    assert s["speedup"] == pytest.approx(2.0)
    assert s["oracle_speedup"] == pytest.approx(2.0 / 0.9)
    assert s["efficiency"] == pytest.approx(0.9)
    assert s["overhead_pct"] == pytest.approx(5.0)
    assert s["decode_speedup"] == pytest.approx(1.25)
    assert s["kv_ratio"] == pytest.approx(0.5)
    assert s["flops_ratio"] == pytest.approx(0.4) and s["flops_ratio_full_depth"] == pytest.approx(0.4)
    assert s["speedup_gap_pct"] == pytest.approx(100 * (1 - 2.0 / (2.0 / 0.9)))
    assert s["vision_share"] == pytest.approx(0.1)
    # the full-depth prefill does twice the FLOPs: the same vtc time is half the share
    assert s["overhead_pct_full_depth_est"] == pytest.approx(2.5)


@pytest.mark.parametrize(
    "arch,config",
    [
        ("tiny-next", {"name": "vz", "stages": [{"method": "random", "budget": 8}]}),
        ("tiny-qwen2.5-vl", FASTV),
        ("tiny-mistral3", {"name": "vz", "stages": [{"method": "visionzip", "budget": 8}]}),
        ("tiny-mistral3", FASTV),
        ("tiny-internvl", {"name": "vz", "stages": [{"method": "visionzip", "budget": 8}]}),
        ("tiny-smolvlm", {"name": "vz", "stages": [{"method": "visionzip", "budget": 6}]}),
        ("tiny-smolvlm", FASTV),
    ],
)
def test_bench_runs_on_other_families(arch, config):
    model = B.build_model(arch)
    inputs = B.synthetic_inputs(model, arch, batch=1, text_tokens=10)
    r = B.bench(model, inputs, config, repeats=1, warmup=0, decode_tokens=0, progress=None)
    assert r["variants"]["vtc"]["decode_s_per_token"]["n"] == 0
    assert "speedup vs baseline" in B.format_table(r)
    assert r["summary"]["oracle_matches_vtc"] is True
    assert r["variants"]["vtc"]["kv_cache_bytes"] < r["variants"]["baseline"]["kv_cache_bytes"]
    assert r["variants"]["vtc"]["flops"]["prefill_total"] < r["variants"]["baseline"]["flops"]["prefill_total"]


def test_bench_all_renders_markdown_between_markers(tmp_path, cli_run):
    r = json.loads(next(cli_run[2].glob("*.json")).read_text())
    r["suite"], r["label"] = "cpu", "fastv-t"
    out = tmp_path / "res"
    job = BA.Job("cpu", "tiny", "configs/x/fastv-t.yaml")
    B.write_result(r, out, plot=False, stem=BA._stem(job, r))
    md = tmp_path / "BENCH.md"
    md.write_text("# B\n\nintro\n\n<!-- bench:cpu:begin -->\nold\n<!-- bench:cpu:end -->\n\ntail\n")
    results = BA._load(out, "cpu")
    skipped = [BA.Job("cpu", "tiny", "configs/x/deep.yaml", skip="needs 13 decoder layers")]
    BA.update_markdown(md, "cpu", BA.render_markdown(results, skipped))
    text = md.read_text()
    assert text.startswith("# B\n\nintro\n") and text.rstrip().endswith("tail") and "old" not in text
    row = next(line for line in text.splitlines() if line.startswith("| fastv-t"))
    assert f"{r['summary']['speedup']:.2f}×" in row and f"{r['summary']['efficiency']:.3f}" in row
    assert "`deep` (needs 13 decoder layers)" in text
    BA.update_markdown(md, "cpu", BA.render_markdown(results))  # idempotent: one block only
    assert md.read_text().count("<!-- bench:cpu:begin -->") == 1
    assert BA.plot_summary(results, tmp_path / "s.png").read_bytes()[:4] == b"\x89PNG"


def test_cpu_suite_covers_every_llava_config_and_one_row_per_family():
    jobs = BA.suite_jobs("cpu", max_layers=5)
    llava = [j for j in jobs if j.arch == "llava-1.5-7b"]
    assert {Path(j.config).stem for j in llava} == {p.stem for p in (ROOT / "configs" / "llava-1.5").glob("*.yaml")}
    others = [(j.arch, j.config) for j in jobs if j.arch != "llava-1.5-7b"]
    assert others == [(a, f"configs/{c}.yaml") for a, c in BA.FAMILY_ROWS]
    families = {B.ARCHS[a].family for a, _ in BA.FAMILY_ROWS} | {"llava"}
    assert families == set(B.presets.FAMILY_CLASSES)  # every family with a preset has a row
    for _arch, c in BA.FAMILY_ROWS:
        assert (ROOT / "configs" / f"{c}.yaml").is_file()
    for j in llava:
        if j.skip is None:
            assert j.layers >= 3 and j.vision_layers == max(2, round(24 * j.layers / 32))


def test_cpu_suite_scales_the_pdrop_and_sparsevlm_schedules_to_its_shortened_depth():
    jobs = {j.label.split(" ")[0]: j for j in BA.suite_jobs("cpu", max_layers=5) if j.arch == "llava-1.5-7b"}
    pdrop, sparse = jobs["pdrop"], jobs["sparsevlm-128"]
    assert pdrop.skip is None and pdrop.layers == 8 and pdrop.vision_layers == 6
    assert (pdrop.extra["scaled"]["real"], pdrop.extra["scaled"]["scaled"]) == ([8, 16, 24], [2, 4, 6])
    assert (sparse.extra["scaled"]["real"], sparse.extra["scaled"]["scaled"]) == ([3, 7, 16], [1, 2, 4])
    assert pdrop.label == "pdrop (scaled: 2/4/6 of 8)"
    cfg = vtc.load_config(BA.job_config(sparse))  # the official 128 schedule, at the scaled layers
    assert cfg.stages[0].layers == (1, 2, 4) and cfg.stages[0].keep == vtc.load_config(
        str(ROOT / sparse.config)).stages[0].keep
    assert "transprune" in jobs and jobs["transprune"].skip  # no scalable schedule: still listed as not run
    unscaled = {j.label: j for j in BA.suite_jobs("cpu", max_layers=5, scaled_depth=None)}
    assert "needs 25 decoder layers" in unscaled["pdrop"].skip


def test_full_depth_flops_of_a_scaled_run_follow_the_real_schedule():
    """pdrop scaled to a 4-layer model (cuts 1/2/3): its full-depth lengths are those of the real schedule
    (8/16/24) run on a 32-layer model."""
    real = {"name": "pd", "stages": [{"method": "pdrop", "layers": [8, 16, 24], "keep": [0.5, 0.25, 0.125]}]}
    deep = B.build_model("tiny", layers=32)
    inputs = B.synthetic_inputs(deep, "tiny", text_tokens=10)
    r_real = B.bench(deep, inputs, real, repeats=1, warmup=0, decode_tokens=0, progress=None)
    path = ROOT / "configs" / "llava-1.5" / "pdrop.yaml"
    sc = BA.scaled_schedule(path, 32, 4)
    assert sc["scaled"] == [1, 2, 3]
    model = B.build_model("tiny", layers=4)
    r = B.bench(model, inputs, sc["config"], repeats=1, warmup=0, decode_tokens=0, progress=None, full_layers=32,
                full_depth_lens=BA.full_depth_lens(sc["real"], sc["scaled"], 32))
    full = r["variants"]["vtc"]["flops_full_depth"]
    assert full["seq_len_per_layer"] == r_real["variants"]["vtc"]["seq_len_per_layer"]
    assert full["prefill_total"] == r_real["variants"]["vtc"]["flops"]["prefill_total"]
    assert r["summary"]["flops_ratio_full_depth"] == pytest.approx(r_real["summary"]["flops_ratio"])
    # without the map the last length would carry on from layer 4: a different (wrong) full-depth cost
    r_plain = B.bench(model, inputs, sc["config"], repeats=1, warmup=0, decode_tokens=0, progress=None,
                      full_layers=32)
    assert r_plain["variants"]["vtc"]["flops_full_depth"]["prefill_total"] < full["prefill_total"]


def test_random_text_encoder_has_the_clip_l14_text_shapes():
    from transformers import CLIPModel

    cfg = BA.random_text_encoder_config("openai/clip-vit-large-patch14-336", B.ARCHS["llava-1.5-7b"])
    with torch.device("meta"):
        clip = CLIPModel(cfg)
    n = sum(p.numel() for p in clip.text_model.parameters())
    assert abs(n - 123.06e6) / 123.06e6 < 0.005  # CLIP ViT-L/14's text transformer: 123.06 M parameters
    assert clip.text_projection.weight.shape == (768, 768)  # projection_dim 768
    assert clip.visual_projection.weight.shape == (768, 1024)  # from LLaVA-1.5's CLIP-L/14-336 tower states
    assert clip.vision_model.post_layernorm.normalized_shape == (1024,)


def test_cdpruner_bench_runs_with_a_random_text_encoder_in_the_vtc_time(tmp_path, monkeypatch):
    """A config naming a known CLIP checkpoint that is not available locally runs with a random-weight CLIP
    (saved once; the tower's vision width from the preset) and the bench instruction; the text tower runs inside
    vtc's hook, so its cost is in the vtc time."""
    from vtc.methods.cdpruner import load_clip

    tiny_text = dict(vocab_size=49408, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                     num_attention_heads=2, max_position_embeddings=77, bos_token_id=49406, eos_token_id=49407,
                     pad_token_id=1)
    monkeypatch.setitem(BA.RANDOM_TEXT_ENCODERS, "nowhere/clip-t", {"text": tiny_text, "projection_dim": 16})
    cfg = tmp_path / "cdp.yaml"
    cfg.write_text("name: cdp-t\nstages:\n  - {method: cdpruner, budget: 8, text_encoder: nowhere/clip-t}\n")
    job = BA.Job("cpu", "tiny", str(cfg))
    BA._plan_job(job, B.ARCHS["tiny"], cfg)
    assert job.skip is None and job.extra["random_text_encoders"] == ["nowhere/clip-t"]
    data = BA.job_config(job, tmp_path)
    st = data["stages"][0]
    assert st["instruction"] == BA.BENCH_INSTRUCTION and Path(st["text_encoder"]).parent == tmp_path
    assert BA.job_config(job, tmp_path) == data  # saved once, reused
    clip, tok = load_clip(st["text_encoder"])
    assert clip.vision_model.post_layernorm.normalized_shape[0] == B.ARCHS["tiny"].vision["hidden_size"]
    ids = tok(BA.BENCH_INSTRUCTION)["input_ids"]
    assert ids[0] == 49406 and ids[-1] == 49407 and 0 not in ids  # every word known, CLIP's start / end
    model = B.build_model("tiny")
    inputs = B.synthetic_inputs(model, "tiny", text_tokens=10)
    r = B.bench(model, inputs, data, repeats=1, warmup=0, decode_tokens=0, progress=None)
    assert r["vtc_stats"]["stages"][0]["tokens_out"] == [8]
    assert r["variants"]["vtc"]["vtc_time_s"]["median"] > 0
    # unknown checkpoint names are still listed as not run
    cfg.write_text(f"stages:\n  - {{method: cdpruner, budget: 8, text_encoder: {tmp_path / 'nope'}}}\n")
    job = BA.Job("cpu", "tiny", str(cfg))
    BA._plan_job(job, B.ARCHS["tiny"], cfg)
    assert "not available locally" in job.skip


def test_bench_all_only_matches_arch_and_label_and_lists_jobs(capsys):
    assert BA.main(["--list", "--only", "^gemma3-4b/"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("gemma3-4b/visionzip-64: configs/gemma3/visionzip-64.yaml")
    assert BA.main(["--list", "--only", "^pdrop"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("llava-1.5-7b/pdrop (scaled: 2/4/6 of 8)") and "LLM 8 / vision 6 layers" in out


def test_bench_runs_on_gemma3_with_its_vision_flops_by_hand():
    from tiny_models_gemma3 import gemma3_inputs, tiny_gemma3

    model = tiny_gemma3()
    inputs = gemma3_inputs(model)
    vc = model.config.vision_config
    vis = B.vision_flops(model, inputs)
    T, d, m = (vc.image_size // vc.patch_size) ** 2, vc.hidden_size, vc.intermediate_size  # 64 patches, no CLS
    tower = 2 * (2 * T * d * 4 * d + 2 * T * d * m * 2 + 2 * 2 * T * T * d) + 2 * T * (3 * vc.patch_size ** 2) * d
    assert vis["tower"] == tower
    assert vis["projector"] == 2 * 16 * d * model.config.text_config.hidden_size  # 16 pooled tokens, one linear map
    r = B.bench(model, inputs, {"name": "vz", "stages": [{"method": "visionzip", "budget": 6}]}, repeats=1, warmup=0,
                decode_tokens=0, progress=None)
    assert r["summary"]["oracle_matches_vtc"] is True
    assert r["variants"]["vtc"]["flops"]["prefill_total"] < r["variants"]["baseline"]["flops"]["prefill_total"]
