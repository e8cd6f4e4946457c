"""Behaviour of ``centerclip`` (k-medoids token clustering per temporal segment) and the k-medoids op."""

from __future__ import annotations

import pytest
import torch

import vtoken
from vtoken.methods.centerclip import segment_ids, split_keep
from vtoken.ops.cluster import kkz_init, kmedoids, medoid_distance


def blobs(b: int, n: int, d: int, k: int, seed: int, spread: float = 0.1) -> torch.Tensor:
    """``[b, n, d]`` tokens around ``k`` well separated centres (cluster of token i: i % k)."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(b, k, d, generator=g) * 4
    which = torch.arange(n) % k
    return centres[:, which] + spread * torch.randn(b, n, d, generator=g)


def dist(x: torch.Tensor, metric: str) -> torch.Tensor:
    if metric == "euclidean":
        return (x[:, :, None] - x[:, None, :]).norm(dim=-1)
    xn = x / (x.norm(dim=-1, keepdim=True) + 1e-6)
    return 1 - xn @ xn.transpose(1, 2)


@pytest.mark.parametrize("metric", ["euclidean", "cosine"])
def test_assign_is_nearest_medoid_and_medoids_are_central(metric):
    x = blobs(2, 60, 8, 5, seed=0, spread=1.0)
    red = vtoken.reduce(x, 6, "centerclip", distance=metric)
    d = dist(x.double(), metric)
    for b in range(2):
        med = red.indices[b]
        to_med = d[b][:, med]  # [N, K]
        nearest = to_med.min(-1).values
        got = to_med.gather(1, red.assign[b][:, None]).squeeze(1)
        torch.testing.assert_close(got, nearest, atol=1e-5, rtol=0)
        assert red.assign[b, med].tolist() == list(range(6)), "every medoid is in its own cluster"
        for c in range(6):
            members = (red.assign[b] == c).nonzero().squeeze(1)
            cost = d[b][members][:, members].sum(-1)
            assert float(cost[members == med[c]]) <= float(cost.min()) + 1e-4, "medoid minimises the in-cluster sum"
    assert torch.equal(red.tokens, x.gather(1, red.indices[..., None].expand(-1, -1, 8)))
    assert red.sizes.sum(-1).tolist() == [60.0, 60.0]


def test_recovers_separated_clusters():
    x = blobs(1, 50, 16, 5, seed=1)
    red = vtoken.reduce(x, 5, "centerclip")
    labels = torch.arange(50) % 5
    # one medoid per true cluster, and the clusters are the true ones
    assert sorted((red.indices[0] % 5).tolist()) == list(range(5))
    for c in range(5):
        assert len(set(labels[red.assign[0] == c].tolist())) == 1


def test_center_mean_knob():
    x = blobs(2, 40, 6, 4, seed=2, spread=0.5)
    med = vtoken.reduce(x, 4, "centerclip")
    mean = vtoken.reduce(x, 4, "centerclip", center="mean")
    assert torch.equal(med.assign, mean.assign) and torch.equal(med.indices, mean.indices)
    for b in range(2):
        for c in range(4):
            torch.testing.assert_close(mean.tokens[b, c], x[b, mean.assign[b] == c].mean(0))
    with pytest.raises(ValueError, match="center"):
        vtoken.reduce(x, 4, "centerclip", center="centroid")


def test_segments_cluster_separately_and_split_keep():
    b, frames, per = 2, 6, 12
    x = blobs(b, frames * per, 8, 3, seed=3)  # the same 3 blobs in every frame
    frame_ids = torch.arange(frames).repeat_interleave(per).expand(b, -1)
    red = vtoken.reduce(x, 9, "centerclip", frame_ids=frame_ids, segment_frames=2)  # 3 segments of 24 tokens
    seg = frame_ids // 2
    assert red.tokens.shape[1] == 9
    for i in range(b):
        med_seg = seg[i, red.indices[i]]
        assert med_seg.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2], "3 medoids per segment, in time order"
        assert torch.equal(med_seg[red.assign[i]], seg[i]), "tokens join a medoid of their own segment"
    with pytest.raises(ValueError, match="segment"):
        vtoken.reduce(x, 2, "centerclip", frame_ids=frame_ids, segment_frames=2)


def test_split_keep_and_segment_ids():
    assert split_keep(torch.tensor([9, 10, 3]), torch.tensor([[24, 24, 24], [30, 10, 0], [1, 1, 5]])).tolist() == [
        [3, 3, 3], [7, 3, 0], [1, 1, 1]]
    f = torch.tensor([[3, 3, 4, 4, 7, 7, 9, 0]])
    m = torch.tensor([[True] * 7 + [False]])
    assert segment_ids(f, m, 2, 1, 8, torch.device("cpu")).tolist() == [[0, 0, 0, 0, 1, 1, 1, -1]]


def test_masks_and_batch_equal_each_sample():
    x = blobs(3, 48, 8, 6, seed=4, spread=0.6)
    frame_ids = torch.arange(4).repeat_interleave(12).expand(3, -1)
    mask = torch.ones(3, 48, dtype=torch.bool)
    mask[1, 30:] = False
    mask[2, ::5] = False
    red = vtoken.reduce(x, 0.25, "centerclip", mask=mask, frame_ids=frame_ids)
    for i in range(3):
        one = vtoken.reduce(x[i : i + 1], 0.25, "centerclip", mask=mask[i : i + 1], frame_ids=frame_ids[i : i + 1])
        k = int(one.mask.sum())
        assert int(red.mask[i].sum()) == k
        assert red.indices[i, :k].tolist() == one.indices[0].tolist()
        assert red.assign[i].tolist() == one.assign[0].tolist()
        assert bool(mask[i, red.indices[i, :k]].all()), "masked tokens are never medoids"
        assert bool((red.assign[i][~mask[i]] == -1).all()) and bool((red.assign[i][mask[i]] >= 0).all())
        torch.testing.assert_close(red.tokens[i, :k], one.tokens[0])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision(dtype):
    x = blobs(2, 40, 8, 4, seed=5)
    red = vtoken.reduce(x.to(dtype), 4, "centerclip")
    ref = vtoken.reduce(x.to(dtype).float(), 4, "centerclip")
    assert red.tokens.dtype == dtype
    assert torch.equal(red.indices, ref.indices) and torch.equal(red.assign, ref.assign)


def test_stop_rules_agree_when_separated():
    x = blobs(3, 45, 8, 5, seed=6, spread=0.8)
    a = vtoken.reduce(x, 5, "centerclip", stop="sample")
    b = vtoken.reduce(x, 5, "centerclip", stop="batch")
    assert torch.equal(a.indices, b.indices) and torch.equal(a.assign, b.assign)
    assert int(b.extras["iterations"].min()) == int(b.extras["iterations"].max())


def test_kkz_init_is_farthest_first():
    x = torch.tensor([[[0.0, 0.0], [1.0, 0.0], [5.0, 0.0], [0.0, 3.0], [0.1, 0.1]]])
    d = medoid_distance(x)
    # max norm (5, 0); then farthest from it, (0, 3); then the point farthest from its nearest of the two, (1, 0)
    assert kkz_init(x, d, 3).tolist() == [[2, 3, 1]]
    res = kmedoids(x, torch.tensor([2]), iter_limit=10)
    # init [2, 3]; cluster {0, 1, 3, 4} moves its medoid to (0.1, 0.1), the smallest summed distance; then stable
    assert res.medoids.tolist() == [[2, 4]]
    assert res.assign.tolist() == [[1, 1, 0, 1, 1]]
    assert res.iterations.tolist() == [2]
