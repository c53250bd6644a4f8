"""FlashAttention compatibility, proven on a GPU (skipped without CUDA).

Every method case of the invariant matrix (tests/cases/*.py, so every shipped method) runs end to end on every
tiny family (LLaVA-1.5, LLaVA-NeXT, Qwen2-VL, Qwen2.5-VL, and the bundled ordered 1D demo model for ``prefix``)
in float16 and bfloat16 with SDPA **restricted to the FlashAttention backend**
(``torch.nn.attention.sdpa_kernel(SDPBackend.FLASH_ATTENTION)``): a forward, and ``generate`` with the KV cache.
On CUDA the flash kernel takes no attention mask, so any SDPA call that needed one (a padded batch, or an
explicit mask a method asked for) would raise "No available kernel" instead of silently falling back to the
math kernel: running at all is the proof that no method needs attention maps or a mask. Only a stage with
proportional attention may fail that way (asserted), and it must then run with ``proportional: false``. Batches are 1 and 2
identical rows (no padding: a padded batch needs a mask under stock transformers too).

Documented outcome for methods that need a mask: PACT with ``proportional: true`` (and merges) adds the log-size
bias of merged tokens as an additive float mask in every later layer, which the flash kernel cannot take. Under
flash-only SDPA torch then raises ``RuntimeError: No available kernel`` (accepted here for such stages only); with
``attn_implementation="flash_attention_2"`` vtc refuses at attach time with a ``vtc.ConfigError``. Use
``sdpa`` without restricting its backends (its flash kernel still serves every layer before the PACT layer and
every other call without a mask), or ``proportional: false``.

With flash-attn installed, every case also runs with ``attn_implementation="flash_attention_2"``.

``VTC_FLASH_TEST_ON_CPU=1`` runs the same code on the CPU (torch's CPU flash kernel accepts masks, so there it
only checks the test's own logic, not the kernel restriction).
"""

from __future__ import annotations

import functools
import importlib.util
import os

import pytest
import torch
from matrix import discover

import vtc
from vtc.methods import get_method_class

ON_CPU = bool(os.environ.get("VTC_FLASH_TEST_ON_CPU"))
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available() and not ON_CPU, reason="needs a CUDA device"),
]

FAMILIES, CASES = discover()
FAMILY_BY_NAME = {f.name: f for f in FAMILIES}
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}
GEN = {"max_new_tokens": 3, "min_new_tokens": 3, "do_sample": False, "pad_token_id": 0}
HAS_FLASH_ATTN = importlib.util.find_spec("flash_attn") is not None


def _flash():
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel(SDPBackend.FLASH_ATTENTION)


@functools.cache
def flash_rejects_masks(dtype: torch.dtype) -> bool:
    """Whether flash-only SDPA on DEVICE refuses an explicit mask (True on CUDA; the CPU kernel accepts one)."""
    q = torch.randn(1, 2, 8, 16, device=DEVICE, dtype=dtype)
    mask = torch.zeros(1, 1, 8, 8, device=DEVICE, dtype=dtype)
    try:
        with _flash():
            torch.nn.functional.scaled_dot_product_attention(q, q, q, attn_mask=mask)
    except RuntimeError:
        return True
    return False


def shipped_methods() -> list[str]:
    """Methods of the vtc package (test-only methods such as tests/replay.py's are excluded)."""
    return [m for m in vtc.available_methods()
            if (get_method_class(m).__module__ or "").startswith("vtc.methods.")]


def _pairs():
    out = []
    for fam in FAMILIES:
        for case in CASES:
            if case.side in fam.sides and (case.families is None or fam.name in case.families):
                out.append(pytest.param(fam.name, case, id=f"{fam.name}-{case.name}"))
    return out


PAIRS = _pairs()


def test_every_shipped_method_is_covered():
    covered = {c.reduce["method"] for c in CASES} | {"prefix"}  # prefix: test_prefix_on_ordered_model
    missing = sorted(set(shipped_methods()) - covered)
    assert not missing, f"methods without a case in tests/cases/*.py (so without a flash test): {missing}"


def _to(inputs: dict, dtype: torch.dtype, batch: int) -> dict:
    out = {}
    for k, v in inputs.items():
        if isinstance(v, torch.Tensor):
            v = v.to(DEVICE, dtype) if v.is_floating_point() else v.to(DEVICE)
            if batch == 2:
                v = torch.cat([v, v])  # identical rows: nothing to pad (Qwen: packed pixel rows and grids too)
        out[k] = v
    return out


@functools.cache
def _model(family: str, dtype_name: str, attn: str = "sdpa"):
    model = FAMILY_BY_NAME[family].build(attn)
    return model.to(DEVICE, DTYPES[dtype_name]).eval()


def needs_mask(stage) -> bool:
    """A stage whose merged tokens carry sizes used as an additive attention bias (proportional attention)."""
    return bool(getattr(stage, "proportional", False)) and getattr(stage, "mode", "both") != "euti"


def _check_run(model, inputs, config, case) -> None:
    n_prompt = inputs["input_ids"].shape[1]
    with vtc.compress(model, config) as run:
        out = model(**inputs, use_cache=True)
        stats = run.stats
        tokens_in = [t for s in stats.stages for t in s.tokens_in]
        tokens_out = [t for s in stats.stages for t in s.tokens_out]
        gen = model.generate(**inputs, **GEN)
    assert torch.isfinite(out.logits[:, -1].float()).all()
    # content-adaptive cases (expected None) may keep everything on a tiny random model in half precision
    assert sum(tokens_out) <= sum(tokens_in) and stats.stages, (tokens_in, tokens_out)
    if case is not None and case.expected is not None:
        first = stats.stages[0]
        assert first.tokens_out == [case.expected(n) for n in first.tokens_in]
    assert gen.shape == (inputs["input_ids"].shape[0], n_prompt + GEN["max_new_tokens"])


@pytest.mark.parametrize("batch", (1, 2))
@pytest.mark.parametrize("dtype", sorted(DTYPES))
@pytest.mark.parametrize("family,case", PAIRS)
def test_method_runs_on_the_flash_kernel(family, case, dtype, batch):
    model = _model(family, dtype)
    fam = FAMILY_BY_NAME[family]
    inputs = _to(fam.inputs(model, 1, 0), DTYPES[dtype], batch)
    config = {"stages": [case.reduce]}
    stage = vtc.load_config(config).stages[0]
    with torch.no_grad(), _flash():
        base = model(**inputs).logits  # the unwrapped model itself runs on the flash kernel
        assert torch.isfinite(base[:, -1].float()).all()
        try:
            _check_run(model, inputs, config, case)
        except RuntimeError as err:
            # only a stage with proportional attention may need a mask; the way out runs on flash
            if "No available kernel" not in str(err) or not needs_mask(stage):
                raise
            assert flash_rejects_masks(DTYPES[dtype])
            _check_run(model, inputs, {"stages": [dict(case.reduce, proportional=False)]}, case)


@pytest.mark.skipif(not HAS_FLASH_ATTN, reason="flash-attn is not installed")
@pytest.mark.parametrize("family,case", PAIRS)
def test_method_runs_with_flash_attention_2(family, case):
    model = _model(family, "fp16", "flash_attention_2")
    inputs = _to(FAMILY_BY_NAME[family].inputs(model, 1, 0), torch.float16, 2)
    config = {"stages": [case.reduce]}
    stage = vtc.load_config(config).stages[0]
    with torch.no_grad():
        try:
            _check_run(model, inputs, config, case)
        except vtc.ConfigError as err:
            if "flash" not in str(err) or not needs_mask(stage):
                raise
            _check_run(model, inputs, {"stages": [dict(case.reduce, proportional=False)]}, case)


@pytest.mark.parametrize("dtype", sorted(DTYPES))
def test_prefix_on_ordered_model(dtype):
    """``prefix`` needs an ordered 1D layout: the bundled ordered demo VLM."""
    from vtc.demo import ORDERED_MODEL_PATH

    if not (ORDERED_MODEL_PATH / "config.json").exists():
        pytest.skip("the bundled ordered demo model is not built")
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from vtc.demo.ordered_vlm import register
    from vtc.demo.task import format_prompt, get_sample

    register()
    model = AutoModelForImageTextToText.from_pretrained(ORDERED_MODEL_PATH, attn_implementation="sdpa")
    model = model.to(DEVICE, DTYPES[dtype]).eval()
    proc = AutoProcessor.from_pretrained(ORDERED_MODEL_PATH)
    s = get_sample("test", 0)
    inputs = _to(dict(proc(images=[s.image], text=[format_prompt(s.question)], return_tensors="pt")),
                 DTYPES[dtype], 1)
    with torch.no_grad(), _flash():
        _check_run(model, inputs, {"stages": [{"method": "prefix", "budget": 8}]}, None)
