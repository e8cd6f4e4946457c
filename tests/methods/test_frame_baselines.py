"""frame_stride and temporal_pool against loops over frames written from their definitions."""

from __future__ import annotations

import pytest
import torch

import vtoken


def clip_batch(lengths: list[int], t: int, p: int, d: int = 3, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(len(lengths), t * p, d, generator=gen)
    mask = torch.zeros(len(lengths), t * p, dtype=torch.bool)
    for i, f in enumerate(lengths):
        mask[i, : f * p] = True
    return x, mask


@pytest.mark.parametrize(("keep", "stride"), [(8, None), (12, None), (4, None), (20, 2), (8, 3), (16, 1)])
def test_frame_stride_keeps_every_kth_frame_that_fits(keep, stride):
    t, p = 6, 4
    x, mask = clip_batch([6, 5, 2], t, p)
    red = vtoken.reduce(x, keep, "frame_stride", mask=mask, video_grid=(t, 2, 2), stride=stride)
    for i, f in enumerate([6, 5, 2]):
        budget = min(keep, f * p) // p
        k = stride if stride is not None else -(-f // budget)
        frames = [j for j in range(f) if j % k == 0][:budget]
        want = [j * p + q for j in frames for q in range(p)]
        assert red.indices[i][red.mask[i]].tolist() == want, (i, f)
        assert red.extras["frame_counts"][i].tolist() == [p if j in frames else 0 for j in range(t)]


@pytest.mark.parametrize(("keep", "window"), [(8, None), (4, None), (12, None), (15, 2), (8, 4)])
def test_temporal_pool_averages_runs_of_frames(keep, window):
    t, h, w = 6, 1, 3
    p = h * w
    x, mask = clip_batch([6, 4], t, p, seed=1)
    red = vtoken.reduce(x, keep, "temporal_pool", mask=mask, video_grid=(t, h, w), window=window)
    for i, f in enumerate([6, 4]):
        budget = min(keep, f * p) // p
        s = window if window is not None else -(-f // budget)
        runs = [list(range(g, min(g + s, f))) for g in range(0, f, s)][:budget]
        frames = x[i].reshape(t, p, -1)
        want = torch.cat([frames[r].mean(0) for r in runs])
        k = int(red.mask[i].sum())
        torch.testing.assert_close(red.tokens[i, :k], want)
        assert red.indices[i, :k].tolist() == [r[0] * p + q for r in runs for q in range(p)]
        assert red.sizes[i, :k].tolist() == [float(len(r)) for r in runs for _ in range(p)]
        pooled = {j for r in runs for j in r}
        assign = red.assign[i].reshape(t, p)
        for j in range(t):
            assert bool((assign[j] >= 0).all()) == (j in pooled)


@pytest.mark.parametrize("name", ["frame_stride", "temporal_pool"])
def test_a_budget_below_one_frame_names_keep(name):
    x = torch.randn(1, 4 * 6, 2)
    with pytest.raises(ValueError, match=r"keep >= 6"):
        vtoken.reduce(x, 5, name, video_grid=(4, 2, 3))
    with pytest.raises(ValueError, match=r"stride|window"):
        vtoken.reduce(x, 12, name, video_grid=(4, 2, 3), **{"stride" if name == "frame_stride" else "window": 0})
