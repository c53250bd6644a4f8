"""Flash-compatible vision-tower scoring (vtc.models.vision_towers / timm_tower) against eager attention.

The reference attention weights come from ``output_attentions=True`` on an *eager* copy of the tiny tower (or
from the probabilities timm's non-fused path computes), inside these tests only; the scorer itself runs on the
sdpa tower's hidden states.
"""

from __future__ import annotations

import pytest
import torch

import vtc
from vtc.errors import ConfigError
from vtc.models.vision_towers import TowerScorer

torch.manual_seed(0)


def _tower(kind: str, attn: str):
    from transformers import CLIPVisionConfig, CLIPVisionModel, SiglipVisionConfig, SiglipVisionModel

    torch.manual_seed(0)
    if kind == "clip":
        cfg = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                               image_size=32, patch_size=8)
        cls = CLIPVisionModel
    else:
        cfg = SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                                 image_size=32, patch_size=8)
        cls = SiglipVisionModel
    cfg._attn_implementation = attn
    model = cls(cfg).eval()
    if hasattr(model, "set_attn_implementation"):
        model.set_attn_implementation(attn)
    return model


def _inner(model):
    return getattr(model, "vision_model", model)


@pytest.mark.parametrize("feature_layer", [-2, -1, 1])
@pytest.mark.parametrize("kind", ["clip", "siglip"])
def test_scores_equal_eager_attention(kind, feature_layer):
    sdpa, eager = _tower(kind, "sdpa"), _tower(kind, "eager")
    eager.load_state_dict(sdpa.state_dict())
    px = torch.randn(3, 3, 32, 32)
    has_cls = kind == "clip"
    with torch.no_grad():
        out = _inner(sdpa)(px, output_hidden_states=True)
        ref = _inner(eager)(px, output_hidden_states=True, output_attentions=True)
        # capture the eager block's own q / k (test-only hooks) for the mean-query reference
        n_states = len(ref.hidden_states)
        idx = feature_layer + n_states if feature_layer < 0 else feature_layer
        block = _inner(eager).encoder.layers[idx - 1]
        got = {}
        h1 = block.self_attn.q_proj.register_forward_hook(lambda m, a, o: got.__setitem__("q", o))
        h2 = block.self_attn.k_proj.register_forward_hook(lambda m, a, o: got.__setitem__("k", o))
        _inner(eager)(px)
        h1.remove(), h2.remove()
    scorer = TowerScorer(_inner(sdpa), out.hidden_states, feature_layer, has_cls=has_cls, drop_cls=has_cls)
    attn = ref.attentions[idx - 1]  # (U, h, N, N) eager weights of the block producing the features
    fed = slice(1, None) if has_cls else slice(None)
    if has_cls:
        torch.testing.assert_close(scorer.cls_attention(), attn[:, :, 0, fed].sum(1), atol=1e-6, rtol=1e-5)
    else:
        with pytest.raises(ConfigError, match="no CLS"):
            scorer.cls_attention()
    U, N, _ = got["q"].shape
    q = got["q"].view(U, N, 4, 8).transpose(1, 2)
    k = got["k"].view(U, N, 4, 8).transpose(1, 2)
    mean_q = q.mean(2, keepdim=True)
    expected = (mean_q @ k.transpose(-1, -2) * 8 ** -0.5).softmax(-1)[:, :, 0].mean(1)[:, fed]
    torch.testing.assert_close(scorer.received_attention(), expected, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(scorer.keys(), k.mean(1)[:, fed], atol=1e-6, rtol=1e-5)
    # sanity: the eager CLS row / mean query rows themselves are probability rows over the same tokens
    assert scorer.received_attention().shape == (3, 16)
    if has_cls:
        assert torch.equal(scorer.cls_token(), out.hidden_states[idx][:, 0])


def test_llava_adapter_extras_match_eager():
    """End to end through the LLaVA adapter: the extras of an sdpa model equal the eager model's attention."""
    from tiny_models import llava_inputs, tiny_llava

    from vtc.models import get_adapter

    sdpa, eager = tiny_llava("sdpa"), tiny_llava("eager")
    inputs = llava_inputs(sdpa, batch=2)
    with torch.no_grad():
        (group,) = get_adapter(sdpa).encode_images(dict(inputs))
        ref = eager.model.vision_tower(inputs["pixel_values"], output_attentions=True, output_hidden_states=True)
    layer = sdpa.config.vision_feature_layer  # -2: hidden_states[-2] is produced by block len - 2
    attn = ref.attentions[layer]  # attentions[-2]: that same block
    torch.testing.assert_close(group.extras.cls_attention(), attn[:, :, 0, 1:].sum(1), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(group.extras.cls_token(), ref.hidden_states[layer][:, 0], atol=1e-5, rtol=1e-5)
    assert group.features.shape == (2, 36, 32)


def test_no_accessible_attention_layer():
    tower = _inner(_tower("clip", "sdpa"))
    with torch.no_grad():
        out = tower(torch.randn(1, 3, 32, 32), output_hidden_states=True)

    class Opaque(torch.nn.Module):  # a tower whose blocks hide their attention
        def __init__(self):
            super().__init__()
            self.encoder = torch.nn.Module()
            self.encoder.layers = torch.nn.ModuleList([torch.nn.Linear(2, 2) for _ in range(3)])

    scorer = TowerScorer(Opaque(), out.hidden_states, -2, has_cls=True, drop_cls=True)
    extras = scorer.as_vision_extras()
    with pytest.raises(ConfigError, match=r"visionzip.*cls_attention.*vision_feature_layer=-2.*no accessible attention layer"):
        extras.require("cls_attention", "visionzip")
    scorer = TowerScorer(torch.nn.Linear(2, 2), out.hidden_states, -2, has_cls=True, drop_cls=True)
    with pytest.raises(ConfigError, match="cannot find the attention layers"):
        scorer.keys()
    # the embeddings have no attention
    scorer = TowerScorer(tower, out.hidden_states, 0, has_cls=True, drop_cls=True)
    with pytest.raises(ConfigError, match="patch embeddings"):
        scorer.cls_attention()
    # through the standalone API: visionzip without the extras it needs names them
    with pytest.raises(ConfigError, match="cls_attention.*received_attention"):
        vtc.reduce_embeddings(torch.randn(16, 8), vtc.Grid(4, 4), {"stages": [{"method": "visionzip", "budget": 4}]})


# ---- timm -----------------------------------------------------------------------------------------------------
def _timm_vit(**kw):
    from timm.models.vision_transformer import VisionTransformer

    torch.manual_seed(0)
    args = dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=4)
    args.update(kw)
    return VisionTransformer(**args).eval()


def _timm_reference(vit, images, index):
    """Eager attention probabilities (U, h, N, N) of block ``index`` from timm's non-fused path (test only)."""
    attn = vit.blocks[index].attn
    got = {}
    old = attn.fused_attn
    attn.fused_attn = False
    h = attn.attn_drop.register_forward_hook(lambda m, a, o: got.__setitem__("p", o))
    hq = attn.qkv.register_forward_hook(lambda m, a, o: got.__setitem__("qkv", o))
    try:
        with torch.no_grad():
            vit.forward_features(images)
    finally:
        h.remove(), hq.remove()
        attn.fused_attn = old
    return got["p"], got["qkv"]


@pytest.mark.parametrize("kw", [{}, {"reg_tokens": 2, "qkv_bias": True}, {"qk_norm": True}])
def test_timm_scores_equal_eager(kw):
    from vtc.models.timm_tower import timm_extras, timm_grid

    vit = _timm_vit(**kw)
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        feats, extras = timm_extras(vit, images, layer=-2)
        probs, qkv = _timm_reference(vit, images, 0)
        ref_feats = vit.forward_intermediates(images, indices=[0], intermediates_only=True, output_fmt="NLC")[0]
    P = vit.num_prefix_tokens
    assert torch.equal(feats, ref_feats)
    assert feats.shape == (2, 16, 32) and timm_grid(vit, images) == vtc.Grid(4, 4)
    torch.testing.assert_close(extras.cls_attention(), probs[:, :, 0, P:].sum(1), atol=1e-6, rtol=1e-5)
    U, N, _ = qkv.shape
    q, k, _ = qkv.view(U, N, 3, 4, 8).permute(2, 0, 3, 1, 4)
    blk = vit.blocks[0].attn
    q, k = blk.q_norm(q), blk.k_norm(k)
    expected = (q.mean(2, keepdim=True) @ k.transpose(-1, -2) * blk.scale).softmax(-1)[:, :, 0].mean(1)[:, P:]
    torch.testing.assert_close(extras.received_attention(), expected, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(extras.keys(), k.mean(1)[:, P:], atol=1e-6, rtol=1e-5)
    assert extras.cls_token().shape == (2, 32)
    # no hook left behind
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in vit.modules())


def test_timm_visionzip_through_reduce_embeddings():
    from vtc.models.timm_tower import timm_extras, timm_grid

    vit = _timm_vit()
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        feats, extras = timm_extras(vit, images)
        out, red = vtc.reduce_embeddings(feats, timm_grid(vit, images),
                                         {"stages": [{"method": "visionzip", "dominant": 5, "contextual": 2}]},
                                         extras=extras)
    assert out.shape == (2, 7, 32)
    torch.testing.assert_close(out[:, 0], extras.cls_token())  # CLS first
    top = extras.cls_attention().topk(4, dim=-1).indices.sort(-1).values
    torch.testing.assert_close(out[:, 1:5], torch.gather(feats, 1, top[..., None].expand(-1, -1, 32)))
    assert (red.source >= 0).all()  # VisionZip drops nothing: every patch is dominant or merged
    # a ViT without class token: received attention, no CLS in the output
    vit2 = _timm_vit(class_token=False, global_pool="avg")
    with torch.no_grad():
        feats2, extras2 = timm_extras(vit2, images)
        out2, _ = vtc.reduce_embeddings(feats2, vtc.Grid(4, 4), {"stages": [{"method": "visionzip", "budget": 6}]},
                                        extras=extras2)
    assert extras2.cls_attention is None and out2.shape == (2, 6, 32)


def test_timm_bad_input():
    from vtc.models.timm_tower import timm_extras

    vit = _timm_vit()
    with pytest.raises(ConfigError, match="layer=5 is out of range"):
        timm_extras(vit, torch.randn(1, 3, 32, 32), layer=5)
    vit.blocks[0].attn = torch.nn.Identity()
    with pytest.raises(ConfigError, match="no accessible attention layer"):
        timm_extras(vit, torch.randn(1, 3, 32, 32), layer=0)
    with pytest.raises(ConfigError, match="no 'blocks'"):
        timm_extras(torch.nn.Linear(2, 2), torch.randn(1, 3, 32, 32))
