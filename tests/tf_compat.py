"""What the installed transformers offers, for tests that need a newer one (vtc supports transformers >= 5.17)."""

from __future__ import annotations

import pytest
import transformers
from packaging.version import Version

#: transformers >= 5.18: the multimodal forwards take precomputed features as ``mm_encoder_outputs`` (Gemma 3 and
#: Qwen3-VL feed the prompt rebuilt by vision-side stages that way; on 5.17 those stages are refused at attach)
HAS_MM_ENCODER_OUTPUTS = Version(transformers.__version__) >= Version("5.18")

needs_mm_encoder_outputs = pytest.mark.skipif(
    not HAS_MM_ENCODER_OUTPUTS, reason="needs transformers >= 5.18 (mm_encoder_outputs); refused at attach before")


def scatter_logits(model, input_ids, attention_mask, feats, token_id: int, **kwargs):
    """The model's logits for ``input_ids`` with the rows of ``feats`` (N, D) put at its ``token_id`` placeholders
    (in order, as the models scatter their own features), fed as ``inputs_embeds`` (any transformers version)."""
    import torch

    with torch.no_grad():
        emb = model.get_input_embeddings()(input_ids)
        mask = (input_ids == token_id)[..., None].expand_as(emb)
        emb = emb.masked_scatter(mask, feats.to(emb.dtype).reshape(-1, emb.shape[-1]))
        return model(inputs_embeds=emb, attention_mask=attention_mask, **kwargs).logits


def config_params(paths):
    """pytest params of shipped config files for a family that feeds ``mm_encoder_outputs``: those with a
    vision-side stage are skipped on transformers < 5.18 (refused at attach there)."""
    from vtc.config import load_config

    out = []
    for p in paths:
        vision = any(st.side == "vision" for st in load_config(p).stages)
        out.append(pytest.param(p, id=p.stem, marks=needs_mm_encoder_outputs if vision else ()))
    return out


#: the round trip's command-line stage: vision side where the installed transformers can feed it, else LLM side
ROUNDTRIP_STAGE = "{method: visionzip, budget: 6}" if HAS_MM_ENCODER_OUTPUTS else "{method: fastv, layer: 1, budget: 4}"


def refused_without_mm_encoder_outputs(model) -> None:
    """Vision-side stages are refused at attach, naming transformers >= 5.18, when the model's base forward has no
    ``mm_encoder_outputs`` (an instance-level forward without it stands for transformers 5.17's); LLM-side stages
    still attach; nothing is left on the model."""
    import vtc

    inner = model.model
    original = inner.forward

    def forward_517(input_ids=None, attention_mask=None, position_ids=None, **kwargs):
        return original(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, **kwargs)

    inner.forward = forward_517
    try:
        with pytest.raises(vtc.ConfigError, match=r"vision-side stages need transformers >= 5\.18"):
            vtc.compress(model, {"stages": [{"method": "pool", "budget": 4}]})
        assert not hasattr(model, "_vtc_run")
        with vtc.compress(model, {"stages": [{"method": "fastv", "layer": 1, "budget": 4}]}):
            pass
    finally:
        del inner.forward


def vision_side_on_the_installed_transformers(model, inputs) -> None:
    """A vision-side stage on the installed transformers: it reduces (>= 5.18) or is refused at attach (5.17)."""
    import vtc

    cfg = {"stages": [{"method": "pool", "budget": 4}]}
    if not HAS_MM_ENCODER_OUTPUTS:
        with pytest.raises(vtc.ConfigError, match=r"transformers >= 5\.18"):
            vtc.compress(model, cfg)
        return
    with vtc.compress(model, cfg) as run:
        model(**inputs)
    assert run.stats.stages[0].tokens_out and all(o <= 4 for o in run.stats.stages[0].tokens_out)
