"""``pool``: adaptive avg / max / SimPool attention / Token Pooling on hand-made inputs, layouts, bad input."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import vtc
from vtc.errors import ConfigError
from vtc.methods.pool import adaptive_windows, weighted_kmeans

torch.manual_seed(0)


def pool(**kw) -> dict:
    return {"stages": [{"method": "pool", **kw}]}


def grid_feats(U, h, w, D, seed=0):
    return torch.randn(U, h * w, D, generator=torch.Generator().manual_seed(seed))


def as_image(x, h, w):
    return x.view(x.shape[0], h, w, -1).permute(0, 3, 1, 2)


@pytest.mark.parametrize("h,w,k,shape", [(24, 24, 64, (8, 8)), (24, 24, 144, (12, 12)), (24, 24, 256, (16, 16)),
                                         (12, 24, 32, (4, 8)), (6, 6, 9, (3, 3)), (7, 5, 6, (3, 2)),
                                         (24, 24, 49, (7, 7))])
def test_avg_and_max_equal_torch_adaptive_pooling(h, w, k, shape):
    x = grid_feats(2, h, w, 8)
    y, red = vtc.reduce_embeddings(x, vtc.Grid(h, w), pool(budget=k))
    ref = F.adaptive_avg_pool2d(as_image(x, h, w), shape).permute(0, 2, 3, 1).reshape(2, k, 8)
    torch.testing.assert_close(y, ref, atol=1e-6, rtol=1e-5)
    y, _ = vtc.reduce_embeddings(x, vtc.Grid(h, w), pool(budget=k, mode="max"))
    ref = F.adaptive_max_pool2d(as_image(x, h, w), shape).permute(0, 2, 3, 1).reshape(2, k, 8)
    assert torch.equal(y, ref)
    cfg = vtc.load_config(pool(budget=k))
    assert cfg.stages[0].output_layout(vtc.Grid(h, w), k) == vtc.Grid(*shape)


@pytest.mark.parametrize("mode", ["avg", "max", "attn", "cluster"])
def test_constant_grid_pools_to_the_constant(mode):
    c = torch.tensor([0.5, -2.0, 3.0, 1.0])
    x = c.expand(2, 36, 4).clone()
    y, red = vtc.reduce_embeddings(x, vtc.Grid(6, 6), pool(budget=4, mode=mode))
    assert y.shape == (2, 4, 4)
    torch.testing.assert_close(y, c.expand(2, 4, 4))


def test_explicit_grid_and_source_map():
    h, w = 6, 9
    x = grid_feats(1, h, w, 4)
    y, red = vtc.reduce_embeddings(x, vtc.Grid(h, w), pool(grid=[2, 4]))
    assert y.shape == (1, 8, 4)
    # every input token's window contains it; anchors lie inside their windows
    rows, rmask = adaptive_windows(h, 2)
    cols, cmask = adaptive_windows(w, 4)
    src = red.source[0]
    for r in range(h):
        for c in range(w):
            o = int(src[r * w + c])
            assert r in rows[o // 4][rmask[o // 4]].tolist() and c in cols[o % 4][cmask[o % 4]].tolist()
    for o, a in enumerate(red.anchor[0].tolist()):
        assert a // w in rows[o // 4][rmask[o // 4]].tolist() and a % w in cols[o % 4][cmask[o % 4]].tolist()
    # sizes: tokens each window pools (overlapping windows: 9 -> 4 has windows of 3 columns)
    assert red.sizes[0].tolist() == [9.0] * 8
    # the avg output is the mean of each window
    win = [red.source[0] == o for o in range(8)]
    torch.testing.assert_close(y[0, 0], x[0][win[0]].mean(0))


def test_attn_pooling_is_simpool():
    """SimPool (training-free): w = softmax(LN(mean) . LN(x_i) / sqrt(D)) within the window; out = sum w_i x_i."""
    x = grid_feats(1, 4, 4, 6, seed=3)
    y, _ = vtc.reduce_embeddings(x, vtc.Grid(4, 4), pool(budget=1, mode="attn"))
    xs = x[0]
    q = F.layer_norm(xs.mean(0), (6,))
    wts = (F.layer_norm(xs, (6,)) @ q / 6 ** 0.5).softmax(0)
    torch.testing.assert_close(y[0, 0], wts @ xs)
    # a token disagreeing with the window's majority pulls the attention-pooled token less than the average
    base = torch.tensor([2.0, -1.0, 0.5, -1.5])
    win = base.expand(4, 4).clone() + 0.01 * torch.randn(4, 4)
    win[2] = torch.tensor([-1.0, 2.0, -1.5, 0.5])
    ya, _ = vtc.reduce_embeddings(win[None], vtc.Grid(2, 2), pool(budget=1, mode="attn"))
    yv, _ = vtc.reduce_embeddings(win[None], vtc.Grid(2, 2), pool(budget=1, mode="avg"))
    assert (ya[0, 0] - base).norm() < (yv[0, 0] - base).norm()


def test_cluster_recovers_separated_groups():
    g = torch.Generator().manual_seed(0)
    centres = torch.tensor([[10.0, 0.0], [0.0, 10.0], [-10.0, -10.0]])
    label = torch.tensor([0, 1, 2, 0, 1, 2, 2, 0, 1, 1, 0, 2])
    x = (centres[label] + 0.1 * torch.randn(12, 2, generator=g))[None]
    # importance weights put one token of each group in the top 3 (Token Pooling's top-k weighted init)
    w = torch.full((1, 12), 0.1)
    w[0, [3, 8, 11]] = 1.0
    y, red = vtc.reduce_embeddings(x, vtc.Sequence(12), pool(budget=3, mode="cluster", weights="received"),
                                   extras={"received_attention": w})
    assert y.shape == (1, 3, 2)
    # the source map groups exactly the generating clusters
    for a in range(12):
        for b in range(12):
            assert (red.source[0, a] == red.source[0, b]) == (label[a] == label[b])
    for o in range(3):
        members = red.source[0] == o
        ww = w[0][members]
        torch.testing.assert_close(y[0, o], (x[0][members] * ww[:, None]).sum(0) / ww.sum())
        assert red.sizes[0, o] == members.sum()
        assert members[red.anchor[0, o]]  # anchor is a member
    assert torch.equal(red.anchor[0], red.anchor[0].sort().values)  # ordered by anchor
    # uniform weights start from an even spread (every n/k-th token) and converge to the plain means
    x2 = (centres[torch.arange(12) % 3] + 0.1 * torch.randn(12, 2, generator=g))[None]
    y, red = vtc.reduce_embeddings(x2, vtc.Sequence(12), pool(budget=3, mode="cluster"))
    src = red.source[0]
    assert all(bool(src[o::3].eq(src[o]).all()) for o in range(3)) and len(set(src.tolist())) == 3
    for o in range(3):
        torch.testing.assert_close(y[0, src[o]], x2[0, o::3].mean(0))


def test_cluster_weighted_means_and_init():
    x = torch.tensor([[[0.0], [1.0], [2.0], [10.0], [11.0]]])
    w = torch.tensor([[1.0, 1.0, 2.0, 3.0, 1.0]])
    centres, assign, anchor, counts = weighted_kmeans(x, w, 2, iters=5)
    assert assign[0].tolist() == [0, 0, 0, 1, 1] or assign[0].tolist() == [1, 1, 1, 0, 0]
    got = sorted(centres[0, :, 0].tolist())
    torch.testing.assert_close(torch.tensor(got), torch.tensor([(0 + 1 + 4) / 4, (30 + 11) / 4]))
    # weights from the tower: CLS / received attention through the extras
    y, red = vtc.reduce_embeddings(x, vtc.Sequence(5), pool(budget=2, mode="cluster", weights="cls"),
                                   extras={"cls_attention": w})
    torch.testing.assert_close(y[0, :, 0], torch.tensor([1.25, 10.25]))
    with pytest.raises(ConfigError, match="cls_attention"):
        vtc.reduce_embeddings(x, vtc.Sequence(5), pool(budget=2, mode="cluster", weights="cls"))


def test_video_per_frame_and_temporal_pairs():
    t, h, w, D = 5, 4, 4, 3
    x = grid_feats(2, t * h, w, D, seed=5)
    y, red = vtc.reduce_embeddings(x, vtc.Video(t, h, w), pool(budget=4))
    assert y.shape == (2, t * 4, D)
    for f in range(t):
        yf, _ = vtc.reduce_embeddings(x[:, f * 16:(f + 1) * 16], vtc.Grid(h, w), pool(budget=4))
        torch.testing.assert_close(y[:, f * 4:(f + 1) * 4], yf)
    y2, red2 = vtc.reduce_embeddings(x, vtc.Video(t, h, w), pool(budget=4, temporal=2))
    assert y2.shape == (2, 3 * 4, D)  # frames (0,1), (2,3), (4)
    pair = (y[:, 0:4] + y[:, 4:8]) / 2
    torch.testing.assert_close(y2[:, 0:4], pair, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(y2[:, 8:12], y[:, 16:20])
    assert red2.anchor[0, :4].tolist() == red.anchor[0, :4].tolist()  # first frame of the pair
    assert red2.anchor[0, 4:8].tolist() == red.anchor[0, 8:12].tolist()
    assert (red2.source[0, 16:32] == red2.source[0, 0:16]).all()
    assert red2.sizes[0].tolist() == [8.0] * 8 + [4.0] * 4
    cfg = vtc.load_config(pool(budget=4, temporal=2)).stages[0]
    assert cfg.output_layout(vtc.Video(t, h, w), 12) == vtc.Video(3, 2, 2)


def test_sequence_and_multicrop():
    x = torch.randn(2, 10, 3)
    y, red = vtc.reduce_embeddings(x, vtc.Sequence(10), pool(budget=4))
    torch.testing.assert_close(y, F.adaptive_avg_pool1d(x.transpose(1, 2), 4).transpose(1, 2))
    assert red.source[0].tolist() == [0, 0, 0, 1, 1, 2, 2, 2, 3, 3]
    y, _ = vtc.reduce_embeddings(x, vtc.Sequence(10), pool(budget=4, mode="max"))
    torch.testing.assert_close(y, F.adaptive_max_pool1d(x.transpose(1, 2), 4).transpose(1, 2))
    # multi-crop: every crop grid pooled on its own
    layout = vtc.MultiCrop(vtc.Grid(4, 4), (vtc.Grid(4, 4), vtc.Grid(4, 4)), 1, 2)
    x = torch.randn(2, 48, 3)
    y, reds = vtc.reduce_embeddings(x, layout, pool(budget=4))
    assert y.shape == (2, 12, 3) and len(reds) == 3
    for p in range(3):
        yp, _ = vtc.reduce_embeddings(x[:, 16 * p:16 * (p + 1)], vtc.Grid(4, 4), pool(budget=4))
        torch.testing.assert_close(y[:, 4 * p:4 * (p + 1)], yp)


@pytest.mark.parametrize("stage,match", [
    ({"mode": "avg"}, "give 'budget'"),
    ({"budget": 4, "mode": "cluster", "grid": [2, 2]}, "grid applies to the window modes"),
    ({"budget": 5, "grid": [2, 2]}, "disagrees with grid"),
    ({"budget": 4, "weights": "cls"}, "applies to mode 'cluster' only"),
    ({"budget": 4, "mode": "cluster", "iters": 0}, "iters must be >= 1"),
    ({"budget": 4, "mode": "median"}, "mode"),
    ({"budget": 4, "temporal": 3}, "temporal"),
    ({"budget": 4, "mode": "cluster", "temporal": 2}, "temporal: 2 applies to the window modes"),
])
def test_bad_config(stage, match):
    with pytest.raises(ConfigError, match=match):
        vtc.load_config(pool(**stage))


def test_bad_input_against_layout():
    x = torch.randn(1, 16, 3)
    with pytest.raises(ConfigError, match=r"mode=cluster with budget=17 .* only 16 \(allowed: 1..16"):
        vtc.reduce_embeddings(x, vtc.Grid(4, 4), pool(budget=17, mode="cluster"))
    with pytest.raises(ConfigError, match="must fit inside the 4x4"):
        vtc.reduce_embeddings(x, vtc.Grid(4, 4), pool(grid=[5, 2]))
    with pytest.raises(ConfigError, match="temporal=2 needs a Video"):
        vtc.reduce_embeddings(x, vtc.Grid(4, 4), pool(budget=4, temporal=2))
    with pytest.raises(ConfigError, match="needs a Grid or Video"):
        vtc.reduce_embeddings(x, vtc.Sequence(16), pool(grid=[2, 2]))
    with pytest.warns(UserWarning, match="more than the 16 tokens"):
        y, _ = vtc.reduce_embeddings(x, vtc.Grid(4, 4), pool(budget=20))
    torch.testing.assert_close(y, x)


def test_llava_runtime_pools_before_projector():
    from tiny_models import llava_inputs, tiny_llava

    from vtc.models import get_adapter

    model = tiny_llava("sdpa")
    inputs = llava_inputs(model, batch=2, seed=2)
    for cfg in (pool(budget=9), pool(budget=4, mode="cluster", weights="cls")):
        with torch.no_grad(), vtc.compress(model, cfg) as run:
            model(**inputs)
        k = 9 if "weights" not in cfg["stages"][0] else 4
        assert run.stats.stages[0].tokens_out == [k, k]
        with torch.no_grad():
            (group,) = get_adapter(model).encode_images(dict(inputs))
            _, red = vtc.reduce_embeddings(group.features, group.layout, cfg, extras=group.extras)
        assert torch.equal(run.stats.stages[0].sources[0], red.source)
