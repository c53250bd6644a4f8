"""VisionZip: the maths on hand-made inputs, a per-image reference of algorithms.md, bad input, and the LLaVA
runtime (features / extras from the tower, composition with FastV)."""

from __future__ import annotations

import pytest
import torch

import vtc
from vtc.errors import ConfigError
from vtc.methods.visionzip import split_budget

torch.manual_seed(0)


def zip_cfg(**kw) -> dict:
    return {"stages": [{"method": "visionzip", **kw}]}


def reference(hidden_with_cls: torch.Tensor, cls_attn: torch.Tensor, keys: torch.Tensor, D: int, C: int):
    """algorithms.md, one image at a time, written as plainly as possible.

    hidden_with_cls (T, Dm) = [CLS, patches]; cls_attn (T - 1,) over the patches; keys (T - 1, d).
    """
    T = hidden_with_cls.shape[0]
    top = sorted(torch.sort(cls_attn, descending=True, stable=True).indices[: D - 1].tolist())
    dominant = [0] + [i + 1 for i in top]
    remaining = [i for i in range(T) if i not in dominant]
    metric = torch.cat([torch.zeros(1, keys.shape[1]), keys])  # CLS key unused
    step = max(1, len(remaining) // C) if C else 1
    targets = [remaining[j] for j in range(0, len(remaining), step)][:C] if C else []
    others = [i for i in remaining if i not in targets]
    out = [hidden_with_cls[i] for i in dominant]
    if targets:
        kn = metric / metric.norm(dim=-1, keepdim=True).clamp(min=1e-12)
        groups = {t: [] for t in targets}
        for i in others:
            sims = torch.stack([kn[i] @ kn[t] for t in targets])
            groups[targets[int(sims.argmax())]].append(i)
        for t in targets:
            members = groups[t]
            extra = hidden_with_cls[members].mean(0) if members else torch.zeros_like(hidden_with_cls[t])
            out.append(hidden_with_cls[t] + extra)
    return torch.stack(out), dominant, targets


def random_extras(U=3, n=36, Dm=16, d=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    feats = torch.randn(U, n, Dm, generator=g)
    cls = torch.randn(U, Dm, generator=g)
    attn = torch.rand(U, n, generator=g).softmax(-1)
    keys = torch.randn(U, n, d, generator=g)
    return feats, {"cls_attention": attn, "keys": keys, "cls_token": cls}


def test_split_budget_matches_paper():
    assert split_budget(64) == (54, 10)
    assert split_budget(128) == (108, 20)
    assert split_budget(192) == (162, 30)
    assert split_budget(1) == (1, 0)
    assert all(sum(split_budget(k)) == k and split_budget(k)[0] >= 1 for k in range(1, 700))


@pytest.mark.parametrize("D,C", [(10, 2), (5, 7), (1, 3), (12, 0), (30, 7), (20, 17)])
def test_equals_reference(D, C):
    feats, ex = random_extras()
    out, red = vtc.reduce_embeddings(feats, vtc.Grid(6, 6), zip_cfg(dominant=D, contextual=C), extras=ex)
    assert out.shape == (3, D + C, 16)
    for u in range(3):
        hw = torch.cat([ex["cls_token"][u:u + 1], feats[u]])
        ref, dominant, targets = reference(hw, ex["cls_attention"][u], ex["keys"][u], D, C)
        torch.testing.assert_close(out[u], ref, atol=1e-6, rtol=1e-6)
        # anchors: patches in raster order, then targets; the CLS takes the most-attended patch
        assert red.anchor[u, 1:D].tolist() == [i - 1 for i in dominant[1:]]
        assert red.anchor[u, D:].tolist() == [t - 1 for t in targets]
        assert red.anchor[u, 0] == ex["cls_attention"][u].argmax()


def test_bright_token_always_kept():
    feats, ex = random_extras(U=4)
    bright = torch.tensor([0, 7, 20, 35])
    ex["cls_attention"] = torch.full((4, 36), 0.01)
    ex["cls_attention"][torch.arange(4), bright] = 10.0
    out, red = vtc.reduce_embeddings(feats, vtc.Grid(6, 6), zip_cfg(dominant=2, contextual=3), extras=ex)
    torch.testing.assert_close(out[:, 0], ex["cls_token"])  # CLS first
    torch.testing.assert_close(out[:, 1], feats[torch.arange(4), bright])  # then the bright patch
    assert (red.source[torch.arange(4), bright] == 1).all()
    # no CLS tower: the token receiving the most attention is kept
    ex2 = {"received_attention": ex["cls_attention"], "keys": ex["keys"]}
    out2, red2 = vtc.reduce_embeddings(feats, vtc.Grid(6, 6), zip_cfg(dominant=1, contextual=2), extras=ex2)
    torch.testing.assert_close(out2[:, 0], feats[torch.arange(4), bright])
    assert out2.shape == (4, 3, 16)


def test_identical_tokens_merge():
    """Tokens whose keys equal a target's join it: contextual = target + mean(assigned)."""
    n, Dm = 8, 4
    feats = torch.arange(n * Dm, dtype=torch.float32).view(1, n, Dm)
    attn = torch.zeros(1, n)
    attn[0, 3] = 1.0  # dominant patch: 3
    keys = torch.zeros(1, n, 2)
    # remaining (CLS excluded): patches 0,1,2,4,5,6,7 -> R = 7, C = 2 -> step 3: targets 0 and 4 (ranks 0, 3)
    keys[0, [0, 1, 2, 7]] = torch.tensor([1.0, 0.0])
    keys[0, [4, 5, 6]] = torch.tensor([0.0, 1.0])
    cls = torch.full((1, Dm), -1.0)
    out, red = vtc.reduce_embeddings(feats, vtc.Sequence(n), zip_cfg(dominant=2, contextual=2),
                                     extras={"cls_attention": attn, "keys": keys, "cls_token": cls})
    f = feats[0]
    torch.testing.assert_close(out[0, 0], cls[0])
    torch.testing.assert_close(out[0, 1], f[3])
    torch.testing.assert_close(out[0, 2], f[0] + f[[1, 2, 7]].mean(0))
    torch.testing.assert_close(out[0, 3], f[4] + f[[5, 6]].mean(0))
    assert red.source[0].tolist() == [2, 2, 2, 1, 3, 3, 3, 2]
    assert red.sizes[0].tolist() == [1.0, 1.0, 4.0, 3.0]
    assert red.anchor[0].tolist() == [3, 3, 0, 4]


def test_target_with_nothing_assigned_stays_itself():
    feats, ex = random_extras(U=1, n=9)
    D, C = 1, 8  # CLS + 8 targets over the 9 patches: one merges, seven stay themselves
    out, red = vtc.reduce_embeddings(feats, vtc.Grid(3, 3), zip_cfg(dominant=D, contextual=C), extras=ex)
    alone = red.sizes[0, 1:] == 1
    assert alone.sum() == 7
    torch.testing.assert_close(out[0, 1:][alone], feats[0][red.anchor[0, 1:][alone]])


def test_keep_everything_without_cls_is_identity():
    feats, ex = random_extras()
    out, red = vtc.reduce_embeddings(feats, vtc.Grid(6, 6), zip_cfg(budget=1.0, contextual=0, keep_cls=False),
                                     extras=ex)
    assert torch.equal(out, feats)
    assert red.source.tolist() == [list(range(36))] * 3


def test_source_map_and_sizes_cover_everything():
    feats, ex = random_extras(U=2, n=64)
    for cfg in (zip_cfg(budget=20), zip_cfg(budget=20, keep_cls=False), zip_cfg(dominant=4, contextual=6)):
        out, red = vtc.reduce_embeddings(feats, vtc.Grid(8, 8), cfg, extras=ex)
        k = out.shape[1]
        assert ((red.source >= 0) & (red.source < k)).all()
        cls = 1 if cfg["stages"][0].get("keep_cls", True) else 0
        # every patch is represented once; the CLS output stands for itself
        assert torch.equal(red.sizes.sum(-1), torch.full((2,), 64.0 + cls))
        counts = torch.stack([torch.bincount(red.source[u], minlength=k) for u in range(2)]).float()
        counts[:, 0] += cls
        torch.testing.assert_close(counts, red.sizes)


def test_full_strategy_cls_inside_features():
    """LLaVA's 'full' strategy feeds CLS as token 0: it is the first dominant token, not added twice."""
    feats, ex = random_extras(U=2, n=37)
    ex.pop("cls_token")
    ex["hidden_with_cls"] = feats
    out, red = vtc.reduce_embeddings(feats, vtc.Sequence(37), zip_cfg(dominant=5, contextual=2), extras=ex)
    assert out.shape == (2, 7, 16)
    assert (red.anchor[:, 0] == 0).all() and (red.source[:, 0] == 0).all()
    torch.testing.assert_close(out[:, 0], feats[:, 0])


def test_video_per_frame_and_per_video():
    g = torch.Generator().manual_seed(1)
    feats = torch.randn(2, 4 * 9, 8, generator=g)
    ex = {"received_attention": torch.rand(2, 36, generator=g), "keys": torch.randn(2, 36, 4, generator=g)}
    out, red = vtc.reduce_embeddings(feats, vtc.Video(4, 3, 3), zip_cfg(dominant=2, contextual=1), extras=ex)
    assert out.shape == (2, 12, 8)
    frame_of_anchor = red.anchor // 9
    assert frame_of_anchor.tolist() == [[0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3]] * 2
    for f in range(4):  # each frame on its own equals a Grid reduction of that frame
        sl = slice(9 * f, 9 * f + 9)
        o, _ = vtc.reduce_embeddings(feats[:, sl], vtc.Grid(3, 3), zip_cfg(dominant=2, contextual=1),
                                     extras={k: v[:, sl] for k, v in ex.items()})
        torch.testing.assert_close(out[:, 3 * f:3 * f + 3], o)
    out, red = vtc.reduce_embeddings(feats, vtc.Video(4, 3, 3), zip_cfg(budget=10, per="image"), extras=ex)
    assert out.shape == (2, 10, 8) and red.valid.all()
    assert ((red.source >= 0) & (red.source < 10)).all()


def test_per_image_splits_one_budget_over_crops():
    """MultiCrop through the standalone API: per crop (the paper) vs one budget per image, allocated jointly."""
    g = torch.Generator().manual_seed(2)
    U, P, n, Dm = 2, 3, 16, 8
    layout = vtc.MultiCrop(vtc.Grid(4, 4), (vtc.Grid(4, 4), vtc.Grid(4, 4)), 1, 2)
    feats = torch.randn(U, P * n, Dm, generator=g)
    attn = torch.rand(U, P * n, generator=g) * 0.01
    attn[:, 2 * n:] += 1.0  # the last crop holds every salient patch
    ex = {"cls_attention": attn, "keys": torch.randn(U, P * n, 4, generator=g), "cls_token": torch.randn(U, P, Dm)}
    out, reds = vtc.reduce_embeddings(feats, layout, zip_cfg(dominant=4, contextual=2), extras=ex)
    assert out.shape == (U, P * 6, Dm) and len(reds) == P
    out, reds = vtc.reduce_embeddings(feats, layout, zip_cfg(dominant=9, contextual=3, per="image"), extras=ex)
    assert out.shape == (U, 12, Dm)
    per_part = [r.valid.sum(-1) for r in reds]
    dom_last = reds[2].valid.sum(-1)
    assert torch.equal(sum(per_part), torch.full((U,), 12))
    assert (dom_last >= 7).all()  # CLS + the 6 patches not needed by the other crops' CLS, + its contextual share
    # every crop keeps its CLS, first among its tokens
    for p, r in enumerate(reds):
        torch.testing.assert_close(r.features[:, 0], ex["cls_token"][:, p])
    torch.testing.assert_close(out[:, 0], ex["cls_token"][:, 0])
    with pytest.raises(ConfigError, match="dominant must be >= 3"):
        vtc.reduce_embeddings(feats, layout, zip_cfg(dominant=2, contextual=3, per="image"), extras=ex)


@pytest.mark.parametrize("stage,match", [
    ({"dominant": 0, "contextual": 4}, "dominant must be >= 1"),
    ({"dominant": 4}, "give 'budget', or both"),
    ({"budget": 10, "dominant": 4, "contextual": 4}, "must equal dominant"),
    ({"budget": 0.5, "dominant": 4}, "fractional budget"),
    ({"budget": 8, "contextual": 8}, "leaves no dominant"),
    ({"budget": 8, "per": "video"}, "per"),
    ({"budget": 8, "unknown": 1}, "unknown parameter 'unknown'"),
])
def test_bad_config(stage, match):
    with pytest.raises(ConfigError, match=match):
        vtc.load_config(zip_cfg(**stage))


def test_bad_input_against_tokens():
    feats, ex = random_extras(U=1, n=9)
    # CLS + 9 patches = 10 tokens available
    with pytest.raises(ConfigError, match=r"dominant \+ contextual = 6 \+ 5 = 11 .* 10 tokens available.*contextual=5"):
        vtc.reduce_embeddings(feats, vtc.Grid(3, 3), zip_cfg(dominant=6, contextual=5), extras=ex)
    with pytest.raises(ConfigError, match="remaining < contextual"):
        vtc.reduce_embeddings(feats, vtc.Grid(3, 3), zip_cfg(dominant=8, contextual=3), extras=ex)
    with pytest.raises(ConfigError, match=r"dominant=11 is larger than the 10 tokens available"):
        vtc.reduce_embeddings(feats, vtc.Grid(3, 3), zip_cfg(dominant=11, contextual=0), extras=ex)
    out, _ = vtc.reduce_embeddings(feats, vtc.Grid(3, 3), zip_cfg(dominant=7, contextual=3), extras=ex)
    assert out.shape == (1, 10, 16)
    with pytest.warns(UserWarning, match="budget=64 is more than the 10 tokens"):  # bare budgets clamp (library rule)
        out, _ = vtc.reduce_embeddings(feats, vtc.Grid(3, 3), zip_cfg(budget=64), extras=ex)
    assert out.shape == (1, 10, 16)
    with pytest.raises(ConfigError, match="cls_token"):
        vtc.reduce_embeddings(feats, vtc.Grid(3, 3), zip_cfg(budget=4),
                              extras={"cls_attention": ex["cls_attention"], "keys": ex["keys"]})
    with pytest.raises(ConfigError, match="keys"):
        vtc.reduce_embeddings(feats, vtc.Grid(3, 3), zip_cfg(budget=4),
                              extras={"cls_attention": ex["cls_attention"], "cls_token": ex["cls_token"]})
    with pytest.raises(ConfigError, match="do not match"):
        vtc.reduce_embeddings(feats, vtc.Grid(3, 3), zip_cfg(budget=4),
                              extras={**ex, "keys": ex["keys"][:, :4]})


def test_unbatched_standalone():
    feats, ex = random_extras(U=1)
    out, red = vtc.reduce_embeddings(feats[0], vtc.Grid(6, 6), zip_cfg(budget=12),
                                     extras={k: v[0] for k, v in ex.items()})
    ref, _ = vtc.reduce_embeddings(feats, vtc.Grid(6, 6), zip_cfg(budget=12), extras=ex)
    assert out.shape == (12, 16)
    torch.testing.assert_close(out, ref[0])


# ---- through a model ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def llava():
    from tiny_models import tiny_llava

    return tiny_llava("sdpa")


def test_llava_runtime_equals_standalone(llava):
    """vtc.compress on LLaVA-1.5 == reducing the tower's own features with the same extras, fed directly."""
    from tiny_models import direct_feed, llava_inputs

    from vtc.models import get_adapter

    inputs = llava_inputs(llava, batch=2, seed=3)
    cfg = zip_cfg(budget=12)
    with torch.no_grad(), vtc.compress(llava, cfg) as run:
        out = llava(**inputs).logits
    assert run.stats.stages[0].tokens_out == [12, 12] and run.stats.stages[0].tokens_in == [36, 36]
    with torch.no_grad():
        (group,) = get_adapter(llava).encode_images(dict(inputs))
        red_feats, red = vtc.reduce_embeddings(group.features, group.layout, cfg, extras=group.extras)
        emb_img = llava.model.multi_modal_projector(red_feats)
        emb, mask = direct_feed(llava, inputs, emb_img, 12)
        ref = llava(inputs_embeds=emb, attention_mask=mask).logits
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    # the CLS hidden state of the feature layer is the first token the projector sees
    cls = group.extras.cls_token()
    torch.testing.assert_close(red_feats[:, 0], cls)
    assert torch.equal(run.stats.stages[0].sources[0], red.source)


def test_llava_visionzip_then_fastv(llava):
    from tiny_models import llava_inputs

    inputs = llava_inputs(llava, batch=2, seed=4)
    cfg = {"stages": [{"method": "visionzip", "budget": 16}, {"method": "fastv", "layer": 2, "budget": 0.5}]}
    with torch.no_grad(), vtc.compress(llava, cfg) as run:
        out = llava.generate(**inputs, max_new_tokens=3, do_sample=False, pad_token_id=0)
    assert [s.tokens_out for s in run.stats.stages] == [[16, 16], [8, 8]]
    assert out.shape[1] == inputs["input_ids"].shape[1] + 3


def test_bundled_configs_load():
    for name, total in [("llava-1.5/visionzip-64", (54, 10)), ("llava-1.5/visionzip-128", (108, 20)),
                        ("llava-1.5/visionzip-192", (162, 30))]:
        (stage,) = vtc.load_config(name).stages
        assert (stage.dominant, stage.contextual) == total
    for name, per_crop in [("llava-next/visionzip-160", (27, 5)), ("llava-next/visionzip-320", (54, 10)),
                           ("llava-next/visionzip-640", (108, 20))]:
        (stage,) = vtc.load_config(name).stages
        assert (stage.dominant, stage.contextual) == per_crop and stage.per == "crop"
        assert 5 * (stage.dominant + stage.contextual) == int(name.split("-")[-1])
    for name, frac in [("qwen2-vl/visionzip-25", 0.25), ("qwen2-vl/visionzip-50", 0.5)]:
        (stage,) = vtc.load_config(name).stages
        assert stage.budget == frac
    cfg = vtc.load_config("llava-1.5/visionzip-192+fastv")
    assert [s.method for s in cfg.stages] == ["visionzip", "fastv"]
