"""What the installed transformers offers, for tests that need a newer one (vtc supports transformers >= 5.17)."""

from __future__ import annotations

import contextlib

import pytest
import transformers
from packaging.version import Version

#: transformers >= 5.18: the multimodal forwards take precomputed features as ``mm_encoder_outputs``. vtc feeds the
#: prompt rebuilt by vision-side stages of Gemma 3 and Qwen3-VL that way, and on 5.17 through the base model's
#: ``get_image_features`` / ``get_video_features`` (vtc/runtime/feed.py); tests build their references accordingly
HAS_MM_ENCODER_OUTPUTS = Version(transformers.__version__) >= Version("5.18")
#: the installed transformers is 5.17, the oldest vtc supports (tests name what differs there)
IS_5_17 = Version(transformers.__version__) < Version("5.18")


def scatter_logits(model, input_ids, attention_mask, feats, token_id: int, **kwargs):
    """The model's logits for ``input_ids`` with the rows of ``feats`` (N, D) put at its ``token_id`` placeholders
    (in order, as the models scatter their own features), fed as ``inputs_embeds`` (any transformers version)."""
    import torch

    with torch.no_grad():
        emb = model.get_input_embeddings()(input_ids)
        mask = (input_ids == token_id)[..., None].expand_as(emb)
        emb = emb.masked_scatter(mask, feats.to(emb.dtype).reshape(-1, emb.shape[-1]))
        return model(inputs_embeds=emb, attention_mask=attention_mask, **kwargs).logits


def encoded_logits(model, enc: dict, **inputs):
    """The unwrapped model's logits for ``inputs`` (ids, mask, ...) with the precomputed features ``enc`` (kind ->
    the model's encoder output, as ``mm_encoder_outputs`` takes it: Qwen3-VL's DeepStack levels split per unit):
    passed as ``mm_encoder_outputs`` (>= 5.18), or on 5.17, where the forward has no such argument, returned by a
    stand-in for the base model's ``get_<kind>_features`` set on the instance for this one call (5.17's form:
    ``pooler_output`` as given, one tensor per DeepStack level) with an empty tensor as the pixel input."""
    import torch

    with torch.no_grad():
        if HAS_MM_ENCODER_OUTPUTS:
            return model(**inputs, mm_encoder_outputs=enc).logits
        inner, pixel_arg = model.model, {"image": "pixel_values", "video": "pixel_values_videos"}
        for kind, out in enc.items():
            levels = getattr(out, "deepstack_features", None)
            if levels is not None:
                out.deepstack_features = [lv if torch.is_tensor(lv) else torch.cat(list(lv)) for lv in levels]
            setattr(inner, f"get_{kind}_features", lambda *a, _out=out, **k: _out)
        try:
            return model(**inputs, **{pixel_arg[k]: torch.empty(0) for k in enc}).logits
        finally:
            for kind in enc:
                delattr(inner, f"get_{kind}_features")


@contextlib.contextmanager
def forward_without_mm_encoder_outputs(model):
    """The base model's forward as transformers 5.17's is to vtc: without ``mm_encoder_outputs`` in its signature
    (an instance-level wrapper of the installed forward, removed after), so vtc feeds the reduced features through
    the base model's getters on any installed version."""
    inner = model.model
    original = inner.forward

    def forward_517(input_ids=None, attention_mask=None, position_ids=None, **kwargs):
        assert not kwargs.pop("mm_encoder_outputs", None)  # the outer forward passes on its None / generate's {}
        return original(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, **kwargs)

    inner.forward = forward_517
    try:
        yield
    finally:
        del inner.forward


def fed_through_getters_equals_mm_encoder_outputs(model, inputs, getters: tuple[str, ...]) -> None:
    """Vision-side stages with the features fed through the getters (the 5.17 path, simulated here on any version)
    give the same logits and generate results (beams + num_return_sequences, sampling, no cache, on the padded
    batch) as the installed forward's own way (``mm_encoder_outputs`` from 5.18 on); the instance has no vtc
    attribute left afterwards, also after a forward that failed half-way, and a forward that does not ask for the
    features it was fed is an error."""
    import torch

    import vtc

    inner = model.model
    before = dict(inner.__dict__)
    cfg = {"stages": [{"method": "pool", "budget": 4}]}
    gens = [dict(num_beams=2, num_return_sequences=2), dict(do_sample=True), dict(use_cache=False)]

    def results():
        out = []
        with vtc.compress(model, cfg), torch.no_grad():
            out.append(model(**inputs).logits)
            for g in gens:
                torch.manual_seed(0)
                out.append(model.generate(**inputs, max_new_tokens=3, pad_token_id=0, **g))
        return out

    real = results()
    with forward_without_mm_encoder_outputs(model):
        with vtc.compress(model, cfg):
            assert all(callable(inner.__dict__.get(name)) for name in getters)  # the feed is in place
        simulated = results()
        with vtc.compress(model, cfg), torch.no_grad():
            boom = model.model.language_model.register_forward_pre_hook(lambda *a: 1 / 0)
            try:
                with pytest.raises(ZeroDivisionError):
                    model(**inputs)
            finally:
                boom.remove()
            torch.testing.assert_close(model(**inputs).logits, simulated[0], atol=0, rtol=0)
        # a forward that drops the pixel inputs never reaches the getters: an error, not the placeholders' embeddings
        forward = inner.forward
        inner.forward = lambda *a, pixel_values=None, pixel_values_videos=None, **k: forward(*a, **k)
        try:
            with vtc.compress(model, cfg), torch.no_grad(), pytest.raises(RuntimeError, match="did not ask"):
                model(**inputs)
        finally:
            inner.forward = forward
    for a, b in zip(real, simulated):
        torch.testing.assert_close(a, b, atol=0, rtol=0)
    assert inner.__dict__.keys() == before.keys() and not hasattr(model, "_vtc_run")
    assert all(inner.__dict__[k] is before[k] for k in ("forward", *getters) if k in before)


def vision_side_generate_rows_equal_single(model, inputs, row) -> None:
    """A padded batch's vision-side beam search (``num_return_sequences`` 2) returns, row by row, what each row's
    own call returns: ``generate``'s expansion gives every copy of a row that row's reduced features."""
    import torch

    import vtc

    gen = dict(max_new_tokens=4, do_sample=False, num_beams=2, num_return_sequences=2, pad_token_id=0)
    with vtc.compress(model, {"stages": [{"method": "pool", "budget": 4}]}), torch.no_grad():
        batched = model.generate(**inputs, **gen)
        n = inputs["input_ids"].shape[0]
        for b in range(n):
            single = model.generate(**row(inputs, b), **gen)
            torch.testing.assert_close(batched[2 * b:2 * b + 2, -4:], single[:, -4:], atol=0, rtol=0)
