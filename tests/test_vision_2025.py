"""Parity of the vision-side 2025 methods (divprune, fastervlm, vispruner) with restatements of their official
selection rules (shared/algorithms-2025.md), on crafted inputs, including the official quirks vtc fixes.

The restatements below are deliberately literal (Python loops and lists, one image at a time) so they read like
the official code; the methods under test are vectorised.
"""

from __future__ import annotations

import pytest
import torch
from tiny_models import llava_inputs, tiny_llava

import vtc
from vtc.layout import Grid, Sequence
from vtc.methods.base import VisionContext, VisionExtras
from vtc.methods.divprune import DivPrune, divprune_count, divprune_select
from vtc.methods.vispruner import vispruner_keep


# ---- restatements of the official code ------------------------------------------------------------------------------
def official_divprune(E: torch.Tensor, k: int) -> list[int]:
    """DivPrune's greedy on one image's tokens E (n, D): indices in pick order (may repeat, as the official)."""
    U = E / E.norm(dim=-1, keepdim=True)
    dist = 1 - U @ U.T
    picks: list[int] = []
    for i in range(k):
        if i == 0:
            score = torch.topk(dist, 2, dim=0, largest=False).values[1]
        else:
            score = dist[picks].min(0).values
        picks.append(int(torch.argmax(score)))
    return picks


def official_vispruner(a: torch.Tensor, F: torch.Tensor, T: int, ratio: float) -> list[int]:
    """VisPruner's rule on one unit: attention a (n,), features F (n, D) -> sorted kept indices. Raises on an odd
    residual list, as the official gather does."""
    t_imp = int(T * ratio)
    t_div = T - t_imp
    order = torch.sort(a, descending=True, stable=True).indices.tolist()
    important, rest = order[:t_imp], order[t_imp:]
    Fn = F / F.norm(dim=-1, keepdim=True)
    while t_div > 0:
        R = len(rest)
        s = min(8, R - t_div)
        if s <= 0:
            break
        A, B = rest[0::2], rest[1::2]
        if len(A) != R // 2:
            raise RuntimeError("official VisPruner: shape mismatch on an odd residual list")
        m = [max(float(Fn[x] @ Fn[y]) for y in B) for x in A]
        by_sim = sorted(range(len(A)), key=lambda i: -m[i])
        rest = [A[i] for i in by_sim][s:] + B
    return sorted(important + (rest if t_div > 0 else []))


def _kept(red) -> list[list[int]]:
    return [row[v].tolist() for row, v in zip(red.anchor, red.valid)]


# ---- DivPrune -------------------------------------------------------------------------------------------------------
def test_divprune_count_reproduces_the_paper():
    assert divprune_count(0.098, 576) == 56  # LLaVA-1.5 (SUBSET_RATIO=0.098)
    assert divprune_count(0.098, 2340) == 229  # LLaVA-NeXT example of the spec
    assert divprune_count(0.5, 5) == 2  # Python round: half to even (the library-wide floor would give 2 too)
    assert divprune_count(0.5, 7) == 4  # round(3.5) = 4, floor would give 3
    assert divprune_count(1.0, 9) == 9 and divprune_count(12, 9) == 9


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_divprune_matches_official_greedy(seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(3, 50, 16, generator=g)
    k = torch.tensor([7, 12, 1])
    chosen = divprune_select(x, k)
    for r in range(3):
        ref = official_divprune(x[r], int(k[r]))
        assert len(set(ref)) == int(k[r])  # distinct tokens: the official code picks k different ones
        assert chosen[r].nonzero().flatten().tolist() == sorted(ref)


def test_divprune_duplicates_fixed_quirk():
    """Exact duplicates: the official greedy re-picks a chosen index and keeps fewer than k; vtc keeps k distinct
    tokens, a superset of the official picks."""
    base = torch.randn(3, 8, generator=torch.Generator().manual_seed(0))
    x = base.repeat_interleave(2, dim=0)  # tokens 2i and 2i+1 identical
    ref = official_divprune(x, 4)
    assert len(set(ref)) < 4
    mine = divprune_select(x[None], torch.tensor([4]))[0].nonzero().flatten().tolist()
    assert len(mine) == 4 and set(ref) <= set(mine)


def test_divprune_per_image_is_one_joint_selection():
    """per: image selects over all units of an image at once (LLaVA-NeXT base + crops), per: crop unit by unit."""
    g = torch.Generator().manual_seed(3)
    feats = torch.randn(5, 12, 8, generator=g)  # image 0: units 0-2, image 1: units 3-4
    ctx = VisionContext(features=feats, layout=Grid(3, 4), unit_image=torch.tensor([0, 0, 0, 1, 1]))
    red = DivPrune(method="divprune", budget=10).reduce_vision(ctx)
    kept = _kept(red)
    for units in ([0, 1, 2], [3, 4]):
        ref = sorted(official_divprune(feats[units].reshape(-1, 8), 10))
        got = sorted(p * 12 + i for p, u in enumerate(units) for i in kept[u])
        assert got == ref
    red = DivPrune(method="divprune", budget=4, per="crop").reduce_vision(ctx)
    assert [len(k) for k in _kept(red)] == [4] * 5
    assert _kept(red)[1] == sorted(official_divprune(feats[1], 4))


# ---- FasterVLM ------------------------------------------------------------------------------------------------------
def test_fastervlm_scores_are_the_feature_layers_cls_row():
    """The CLS row of the attention *inside* the feature layer (HF ``attentions[-2]`` for ``hidden_states[-2]``,
    computed by the eager reference only), mean over heads: top-k of it is what fastervlm keeps, through the sdpa
    model, without attention maps."""
    model = tiny_llava("sdpa", seed=1)
    eager = tiny_llava("eager", seed=1)
    eager.load_state_dict(model.state_dict())
    inputs = llava_inputs(model, batch=2, seed=4)
    with torch.no_grad():
        ref = eager.model.vision_tower(inputs["pixel_values"], output_attentions=True, output_hidden_states=True)
    a = ref.attentions[-2][:, :, 0, 1:].mean(1)  # (B, 36) official: attentions[select_layer], CLS row, head mean
    k = 9
    expected = [sorted(torch.topk(row, k).indices.tolist()) for row in a]
    with vtc.compress(model, {"stages": [{"method": "fastervlm", "budget": k}]}) as run:
        with torch.no_grad():
            model(**inputs)
    sources = run.stats.stages[0].sources
    got = [sorted((s >= 0).nonzero().flatten().tolist()) for s in torch.cat(list(sources), 0)]
    assert got == expected


def test_fastervlm_on_embeddings_and_missing_scores():
    feats = torch.randn(2, 16, 8)
    attn = torch.rand(2, 16)
    out, red = vtc.reduce_embeddings(feats, Grid(4, 4), {"stages": [{"method": "fastervlm", "budget": 5}]},
                                     extras={"cls_attention": attn})
    assert out.shape == (2, 5, 8)
    assert _kept(red) == [sorted(torch.topk(r, 5).indices.tolist()) for r in attn]
    with pytest.raises(vtc.ConfigError, match="fastervlm needs 'cls_attention'"):
        vtc.reduce_embeddings(feats, Grid(4, 4), {"stages": [{"method": "fastervlm", "budget": 5}]})


# ---- VisPruner ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("T,ratio", [(20, 0.5), (12, 0.5), (16, 0.75), (30, 0.4), (7, 1.0), (10, 0.0)])
def test_vispruner_matches_official(T, ratio):
    g = torch.Generator().manual_seed(T)
    n = 64
    a = torch.rand(3, n, generator=g)
    F = torch.randn(3, n, 12, generator=g)
    keep = vispruner_keep(a, F, T, int(T * ratio))
    for r in range(3):
        assert sorted(keep[r].tolist()) == official_vispruner(a[r], F[r], T, ratio)


def test_vispruner_odd_residual_fixed_quirk():
    """T=58, r=0.5 on 576 tokens leaves an odd residual list: the official code raises, vtc keeps exactly 58."""
    g = torch.Generator().manual_seed(0)
    a, F = torch.rand(576, generator=g), torch.randn(576, 16, generator=g)
    with pytest.raises(RuntimeError, match="odd residual"):
        official_vispruner(a, F, 58, 0.5)
    keep = vispruner_keep(a[None], F[None], 58, 29)[0]
    assert keep.unique().numel() == 58
    top = torch.sort(a, descending=True, stable=True).indices[:29]
    assert set(top.tolist()) <= set(keep.tolist())


def test_vispruner_ratio_one_is_fastervlm():
    feats = torch.randn(2, 36, 8)
    attn = torch.rand(2, 36)
    ex = {"cls_attention": attn}
    _, r1 = vtc.reduce_embeddings(feats, Sequence(36), {"stages": [{"method": "vispruner", "budget": 9,
                                                                    "important_ratio": 1.0}]}, extras=ex)
    _, r2 = vtc.reduce_embeddings(feats, Sequence(36), {"stages": [{"method": "fastervlm", "budget": 9}]}, extras=ex)
    assert torch.equal(r1.anchor, r2.anchor)


def test_vispruner_bad_ratio():
    with pytest.raises(vtc.ConfigError, match="important_ratio"):
        vtc.load_config({"stages": [{"method": "vispruner", "budget": 9, "important_ratio": 1.5}]})


def test_vision_context_without_extras_names_the_method():
    ctx = VisionContext(features=torch.randn(1, 4, 3), layout=Sequence(4), extras=VisionExtras())
    from vtc.methods.vispruner import VisPruner

    with pytest.raises(vtc.ConfigError, match="vispruner needs"):
        VisPruner(method="vispruner", budget=2).reduce_vision(ctx)


# ---- CDPruner -------------------------------------------------------------------------------------------------------
def official_cdpruner(F: torch.Tensor, Z: torch.Tensor, T_emb: torch.Tensor, T: int) -> torch.Tensor:
    """CDPruner's official rule on the B crops of one image: F (B, N, D) projected tokens, Z (B, N, E) CLIP patch
    embeddings, T_emb (M, E) instruction embeddings -> (B, N) keep mask (T per crop)."""
    B, N, _ = F.shape
    Fn = (F / F.norm(dim=-1, keepdim=True)).float()
    sim = Fn @ Fn.transpose(1, 2)
    Zn = Z / Z.norm(dim=-1, keepdim=True)
    Tn = T_emb / T_emb.norm(dim=-1, keepdim=True)
    rel = (-(Zn @ Tn.T)).mean(-1)
    rel = (rel - rel.min() + 1e-6) / (rel.max() - rel.min())  # global over the crops
    kernel = rel[:, :, None] * sim * rel[:, None, :]
    cis = torch.zeros(T, B, N)
    d2 = torch.diagonal(kernel, dim1=1, dim2=2).clone()
    sel = torch.empty(T, B, dtype=torch.long)
    ar = torch.arange(B)
    for i in range(T):
        j = torch.argmax(d2, dim=-1)
        sel[i] = j
        e = (kernel[ar, j] - torch.einsum("tb,tbn->bn", cis[:i, ar, j], cis[:i])) / torch.sqrt(d2[ar, j])[:, None]
        cis[i] = e
        d2 -= e ** 2
        d2[ar, j] = -float("inf")
    mask = torch.zeros(B, N, dtype=torch.bool)
    mask.scatter_(1, sel.t(), True)
    return mask


@pytest.mark.parametrize("seed", [0, 1])
def test_cdpruner_matches_official(seed):
    from vtc.methods.cdpruner import cdpruner_select, conditional_relevance

    g = torch.Generator().manual_seed(seed)
    F, Z, T_emb = torch.randn(3, 40, 24, generator=g), torch.randn(3, 40, 16, generator=g), torch.randn(2, 16, generator=g)
    ref = official_cdpruner(F, Z, T_emb, 11)
    rel = conditional_relevance(Z, T_emb.expand(3, 2, 16), torch.ones(3, 2, dtype=torch.bool), torch.zeros(3).long())
    assert torch.equal(cdpruner_select(F, rel, 11), ref)
    # two images side by side: each is min-max normalised on its own
    rel2 = conditional_relevance(Z, T_emb.expand(3, 2, 16), torch.ones(3, 2, dtype=torch.bool), torch.tensor([0, 1, 1]))
    assert torch.equal(cdpruner_select(F, rel2, 11)[1:], official_cdpruner(F[1:], Z[1:], T_emb, 11))


def test_cdpruner_dependent_tokens_fixed_quirk():
    """Fewer linearly independent tokens than k: the official greedy divides by ~0 (NaN / repeated picks, fewer than
    k kept); vtc keeps k distinct tokens, the independent ones first."""
    from vtc.methods.cdpruner import dpp_greedy

    base = torch.randn(3, 8, generator=torch.Generator().manual_seed(0))
    F = base.repeat(4, 1)  # 12 tokens, rank 3
    Fn = F / F.norm(dim=-1, keepdim=True)
    L = (Fn @ Fn.T)[None]
    got = dpp_greedy(L, torch.tensor([5]))[0]
    assert int(got.sum()) == 5
    assert len({int(i) % 3 for i in got.nonzero().flatten()}) == 3  # the three directions are all represented


def test_cdpruner_needs_a_text_encoder(tmp_path):
    with pytest.raises(vtc.ConfigError, match="text_encoder"):
        vtc.load_config({"stages": [{"method": "cdpruner", "budget": 8}]})
    model = tiny_llava("sdpa")
    with pytest.raises(vtc.ConfigError, match="text_encoder="):
        with vtc.compress(model, {"stages": [{"method": "cdpruner", "budget": 8,
                                              "text_encoder": str(tmp_path / "missing")}]}):
            pass
    assert not hasattr(model, "_vtc_run")


def test_cdpruner_refuses_towers_without_clip_space():
    """A model whose adapter does not declare its tower's extras: the width check refuses on the first call."""
    from models_clip import tiny_clip_dir
    from tiny_models_qwen import qwen_inputs, tiny_qwen2_vl

    from vtc.models import get_adapter

    model = tiny_qwen2_vl("sdpa")
    adapter = get_adapter(model)
    adapter.vision_extras_available = lambda: None  # an adapter that knows nothing of its tower
    cfg = {"stages": [{"method": "cdpruner", "budget": 4, "text_encoder": tiny_clip_dir(), "instruction": "w5"}]}
    with vtc.compress(model, cfg, adapter=adapter):
        with pytest.raises(vtc.ConfigError, match="no CLIP image space"):
            model(**qwen_inputs(model, batch=1, seed=0))


def test_cdpruner_refused_at_attach_without_a_clip_tower():
    """Every matrix family whose adapter knows its tower refuses CDPruner when attached unless the tower is a CLIP
    (CLS) tower: SigLIP (LLaVA-OneVision, Gemma 3, SmolVLM / Idefics3), InternViT (its CLS unused) and Pixtral have no
    CLIP image space, nor has Qwen's ViT; the refusal names it and leaves the model untouched."""
    from matrix import discover
    from models_clip import tiny_clip_dir

    from vtc.models import get_adapter

    cfg = {"stages": [{"method": "cdpruner", "budget": 4, "text_encoder": tiny_clip_dir(), "instruction": "w5"}]}
    refused, accepted = set(), set()
    for fam in discover()[0]:
        model = fam.build("sdpa")
        have = get_adapter(model).vision_extras_available()
        if have is None:
            continue
        if "clip_patch_states" in have:
            with vtc.compress(model, cfg):
                accepted.add(fam.name)
            continue
        with pytest.raises(vtc.ConfigError, match=r"stages\[0\] \(cdpruner\): .*no CLIP image space"):
            vtc.compress(model, cfg)
        assert not hasattr(model, "_vtc_run")
        refused.add(fam.name)
    assert {"llava", "llava_next"} <= accepted
    assert {"llava_onevision", "gemma3", "smolvlm", "idefics3", "internvl", "mistral3", "qwen2_vl", "qwen2_5_vl",
            "qwen3_vl"} <= refused


def test_cdpruner_instruction_from_the_prompt(tmp_path):
    """The instruction is the question between the image and the chat template's generation prompt (the model's own
    tokenizer), equal to passing it with run.set_instruction; batched rows read their own question."""
    from models_clip import save_tiny_clip
    from PIL import Image
    from test_eval import build_tiny_vlm
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    from vtc.cli import _prompt
    from vtc.demo.build import build_tokenizer
    from vtc.methods.cdpruner import prompt_instructions

    path = build_tiny_vlm(tmp_path / "m")
    words = tuple(w for w in build_tokenizer().get_vocab() if not w.startswith("<"))
    clip = save_tiny_clip(tmp_path / "clip", words=words)  # its tokenizer knows the demo questions' words
    model = LlavaForConditionalGeneration.from_pretrained(path).eval()
    proc = AutoProcessor.from_pretrained(path)
    qs = ["what color is the circle ?", "how many squares are there ?"]
    g = torch.Generator().manual_seed(0)
    imgs = [Image.fromarray((torch.rand(112, 112, 3, generator=g) * 255).to(torch.uint8).numpy()) for _ in qs]
    proc.tokenizer.padding_side = "left"
    inputs = proc(images=imgs, text=[_prompt(proc, q) for q in qs], return_tensors="pt", padding=True)
    cfg = {"stages": [{"method": "cdpruner", "budget": 12, "text_encoder": str(clip)}]}
    run = vtc.compress(model, cfg)
    prompt = run.vision.prompt_text(inputs)
    assert prompt_instructions(prompt, proc.tokenizer) == qs
    with run, torch.no_grad():
        model(**inputs)
        auto = [s.clone() for s in run.stats.stages[0].sources]
        run.set_instruction(qs)
        model(**inputs)
        assert all(torch.equal(a, b) for a, b in zip(auto, run.stats.stages[0].sources))
        run.set_instruction("is there a red object ?")  # another question, another selection
        model(**inputs)
        assert not all(torch.equal(a, b) for a, b in zip(auto, run.stats.stages[0].sources))
        with pytest.raises(vtc.ConfigError, match="set_instruction"):
            run.set_instruction(["only one"])
            model(**inputs)


def test_bench_lists_configs_without_their_text_encoder_as_not_run(tmp_path):
    from models_clip import tiny_clip_dir

    from eval import bench_all as BA

    cfg = tmp_path / "cdp.yaml"
    cfg.write_text(f"stages:\n  - {{method: cdpruner, budget: 8, text_encoder: {tmp_path / 'nope'}}}\n")
    assert "not available locally" in BA._skip_reason(cfg)
    cfg.write_text(f"stages:\n  - {{method: cdpruner, budget: 8, text_encoder: {tiny_clip_dir()}}}\n")
    assert BA._skip_reason(cfg) is None
