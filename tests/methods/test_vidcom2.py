"""Behaviour of ``vidcom2`` (frame-adaptive video token pruning by multi-scale Gaussian uniqueness) against a loop
reference written from the paper and vLLM's description, on small random clips."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import vtoken
from vtoken.core import resolve_keep
from vtoken.ops.gaussian import multi_scale_gaussian

BW = (0.125, 0.25, 0.5, 1.0, 2.0)


def clip(t: int, p: int, d: int, seed: int, cut: int | None = None) -> torch.Tensor:
    """``[t * p, d]`` tokens: a few scene blobs drifting over time (a new scene from frame ``cut`` on), per-channel
    scales so the channel variances are well separated."""
    g = torch.Generator().manual_seed(seed)
    scale = torch.linspace(0.3, 3.0, d)[torch.randperm(d, generator=g)]
    scenes = torch.randn(2, 4, d, generator=g) * 2
    frames = []
    for i in range(t):
        scene = scenes[1 if cut is not None and i >= cut else 0]
        which = torch.randint(0, 4, (p,), generator=g)
        frames.append(scene[which] + 0.05 * i + torch.randn(p, d, generator=g))
    return torch.cat(frames) * scale


def reference(x: torch.Tensor, grid: tuple[int, int, int], keep: int, ratio: float | None = None,
              temperature: float = 0.01) -> dict:
    """One clip, frame by frame, with Python loops: channel choice, scores, budgets, per-frame choice, reconcile."""
    t, h, w = grid
    p, d = h * w, x.shape[1]
    kc = max(1, int(d * 0.5))
    channels = torch.topk(x.var(0, unbiased=False), kc, largest=False).indices
    f = F.normalize(x[:, channels].reshape(t, p, kc), dim=-1)
    centre = f.mean((0, 1))

    def gauss(a: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        d2 = ((a - c) ** 2).sum(-1)
        return sum(torch.exp(-d2 / (2.0 * s)) for s in BW)

    v = [gauss(f[i], centre) for i in range(t)]
    sim = [v[i] + gauss(f[i], f[i].mean(0)) for i in range(t)]
    base = keep / (t * p) if ratio is None else ratio
    scores = torch.stack([-v[i].mean() for i in range(t)])
    probs = torch.softmax((scores - scores.max()) / temperature, 0)
    ks, selected = [], []
    for i in range(t):
        scale = min(float(base * (1.0 + probs[i] - probs.mean())), 1.0)
        k = min(max(round(scale * p), 1), p)  # Python round: half to even, as torch.round
        ks.append(k)
        order = sorted(range(p), key=lambda j, i=i: (float(sim[i][j]), j))
        selected += [i * p + j for j in order[:k]]
    flat = torch.cat(sim).tolist()
    chosen = set(selected)
    if len(chosen) > keep:
        drop = sorted(chosen, key=lambda j: (-flat[j], -j))[: len(chosen) - keep]
        chosen -= set(drop)
    elif len(chosen) < keep:
        rest = sorted(set(range(t * p)) - chosen, key=lambda j: (flat[j], j))
        chosen |= set(rest[: keep - len(chosen)])
    return {"kept": sorted(chosen), "ks": ks, "budget": sorted(selected), "probs": probs,
            "channels": sorted(channels.tolist()), "similarity": torch.stack(sim)}


@pytest.mark.parametrize(("grid", "d", "keep", "ratio", "seed", "cut"), [
    ((6, 3, 4), 16, 20, None, 0, None),
    ((6, 3, 4), 16, 20, None, 1, 3),
    ((5, 4, 4), 12, 0.3, None, 2, 2),
    ((4, 5, 3), 8, 7, 0.1, 3, None),
    ((8, 2, 3), 10, 30, 0.6, 4, 5),      # small q: clamped scales, reconciliation adds
    ((1, 4, 5), 6, 9, 0.48, 5, None),    # one frame: ks = round(0.48 * 20) = 10, reconciliation drops one
    ((3, 6, 6), 24, 0.5, None, 6, 1),
])
def test_matches_loop_reference(grid, d, keep, ratio, seed, cut):
    t, h, w = grid
    x = clip(t, h * w, d, seed, cut)
    count = int(resolve_keep(keep, t * h * w))
    red = vtoken.reduce(x[None], keep, "vidcom2", video_grid=grid, retention_ratio=ratio)
    ref = reference(x, grid, count, ratio)
    assert red.indices[0].tolist() == ref["kept"]
    assert red.extras["ks"][0].tolist() == ref["ks"]
    assert red.extras["budget_indices"][0].tolist() == ref["budget"]
    assert sorted(red.extras["low_var_idx"][0].tolist()) == ref["channels"]
    torch.testing.assert_close(red.extras["probs"][0], ref["probs"], atol=5e-5, rtol=1e-4)
    torch.testing.assert_close(red.extras["similarity"][0], ref["similarity"], atol=1e-5, rtol=1e-5)
    assert torch.equal(red.tokens[0], x[red.indices[0]])
    kept = torch.tensor(ref["kept"])
    assert red.extras["frame_counts"][0].tolist() == torch.bincount(kept // (h * w), minlength=t).tolist()


@pytest.mark.parametrize("keep", [13, 0.35, 0.8])
def test_batch_of_clips_with_padded_frames_equals_each_clip_alone(keep):
    t, h, w, d = 5, 3, 4, 12
    p = h * w
    lengths = [5, 3, 2]
    x = torch.stack([clip(t, p, d, seed=10 + i, cut=i + 1) for i in range(3)])
    mask = torch.zeros(3, t * p, dtype=torch.bool)
    for i, n_frames in enumerate(lengths):
        mask[i, : n_frames * p] = True
    x = torch.where(mask[..., None], x, 7.0)  # padding content must not matter
    red = vtoken.reduce(x, keep, "vidcom2", mask=mask, video_grid=(t, h, w))
    assert red.mask.sum(-1).tolist() == resolve_keep(keep, mask.sum(-1)).tolist()
    for i, n_frames in enumerate(lengths):
        one = vtoken.reduce(x[i : i + 1, : n_frames * p], keep, "vidcom2", video_grid=(n_frames, h, w))
        k = int(one.mask.sum())
        assert int(red.mask[i].sum()) == k
        assert red.indices[i, :k].tolist() == one.indices[0].tolist()
        torch.testing.assert_close(red.tokens[i, :k], one.tokens[0])
        for name in ("ks", "frame_counts"):
            assert red.extras[name][i, :n_frames].tolist() == one.extras[name][0].tolist()
            assert red.extras[name][i, n_frames:].tolist() == [0] * (t - n_frames), "padded frames get nothing"
        for name in ("probs", "scales"):
            torch.testing.assert_close(red.extras[name][i, :n_frames], one.extras[name][0])
        torch.testing.assert_close(red.extras["similarity"][i, :n_frames], one.extras["similarity"][0])
        assert red.extras["budget_sum"][i] == one.extras["budget_sum"][0]
        assert red.extras["low_var_idx"][i].tolist() == one.extras["low_var_idx"][0].tolist()
        assert bool(mask[i, red.indices[i, :k]].all()), "padded tokens are never kept"


@pytest.mark.parametrize("keep", [4, 5, 17, 40, 59, 0.07, 0.5, 0.99])
def test_budget_is_respected(keep):
    t, h, w = 4, 3, 5
    x = clip(t, h * w, 8, seed=20, cut=2)
    red = vtoken.reduce(x[None], keep, "vidcom2", video_grid=(t, h, w))
    want = int(resolve_keep(keep, t * h * w))
    assert int(red.counts[0]) == want == int(red.extras["target_retained"][0])
    assert int(red.extras["frame_counts"].sum()) == want
    assert int(red.extras["budget_sum"][0]) == int(red.extras["ks"].sum())
    assert bool((red.extras["ks"] >= 1).all()) and bool((red.extras["ks"] <= h * w).all())
    kept = red.indices[0]
    assert bool((kept[1:] > kept[:-1]).all())


def test_distinctive_frame_gets_the_larger_budget():
    t, h, w = 6, 4, 4
    x = clip(t, h * w, 16, seed=30, cut=None)
    x[3 * 16 : 4 * 16] = -x[3 * 16 : 4 * 16]  # one frame points away from the others
    red = vtoken.reduce(x[None], 24, "vidcom2", video_grid=(t, h, w))
    ks = red.extras["ks"][0]
    assert int(ks.argmax()) == 3 and int(ks[3]) > int(ks.min())
    assert int(red.extras["probs"][0].argmax()) == 3
    flat = vtoken.reduce(x[None], 24, "vidcom2", video_grid=(t, h, w), temperature=1e6)
    assert int(flat.extras["ks"][0].max() - flat.extras["ks"][0].min()) <= 1, "a hot softmax spreads evenly"


def test_retention_ratio_sets_the_frame_budgets_and_keep_the_count():
    t, h, w = 5, 4, 4
    x = clip(t, h * w, 12, seed=40, cut=2)
    red = vtoken.reduce(x[None], 16, "vidcom2", video_grid=(t, h, w), retention_ratio=0.5)
    assert int(red.counts[0]) == 16
    probs = red.extras["probs"][0]
    want = ((0.5 * (1.0 + probs - probs.mean())).clamp(max=1.0) * 16).round().long().clamp(1, 16)
    assert red.extras["ks"][0].tolist() == want.tolist()
    assert int(red.extras["budget_sum"][0]) > 16, "the budgets follow the ratio, reconciliation drops to keep"


def test_ties_go_to_the_lowest_index():
    t, h, w = 3, 2, 4
    x = torch.ones(1, t * h * w, 6)
    red = vtoken.reduce(x, 12, "vidcom2", video_grid=(t, h, w))  # every token alike: ks = 4 per frame
    assert red.extras["ks"][0].tolist() == [4, 4, 4]
    assert red.indices[0].tolist() == [0, 1, 2, 3, 8, 9, 10, 11, 16, 17, 18, 19]
    red = vtoken.reduce(x, 10, "vidcom2", video_grid=(t, h, w))  # ks = round(10 / 24 * 8) = 3; add 1: index 3
    assert red.indices[0].tolist() == [0, 1, 2, 3, 8, 9, 10, 16, 17, 18]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_scores_in_float32(dtype):
    x = clip(4, 12, 8, seed=50, cut=2)[None].to(dtype)
    red = vtoken.reduce(x, 0.3, "vidcom2", video_grid=(4, 3, 4))
    ref = vtoken.reduce(x.float(), 0.3, "vidcom2", video_grid=(4, 3, 4))
    assert red.tokens.dtype == dtype and red.extras["similarity"].dtype == torch.float32
    assert torch.equal(red.indices, ref.indices)
    assert torch.equal(red.tokens, x[0, red.indices[0]][None])


def test_keep_all_is_the_identity():
    x = clip(3, 6, 8, seed=60)[None]
    red = vtoken.reduce(x, 1.0, "vidcom2", video_grid=(3, 2, 3))
    assert torch.equal(red.tokens, x) and red.indices[0].tolist() == list(range(18))


def test_multi_scale_gaussian_op():
    x = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 2.0]])
    c = torch.zeros(1, 2)
    got = multi_scale_gaussian(x, c, (0.5, 2.0))
    d2 = torch.tensor([0.0, 1.0, 4.0])
    torch.testing.assert_close(got, torch.exp(-d2) + torch.exp(-d2 / 4))
    with pytest.raises(ValueError, match="bandwidths"):
        multi_scale_gaussian(x, c, ())


def test_bad_input_names_the_argument():
    t, h, w = 4, 2, 3
    x = clip(t, h * w, 8, seed=70)[None].expand(2, -1, -1).contiguous()
    mask = torch.ones(2, t * h * w, dtype=torch.bool)
    mask[1, 20:] = False  # frame 3 of sample 1 partly valid
    with pytest.raises(ValueError, match="mask"):
        vtoken.reduce(x, 8, "vidcom2", mask=mask, video_grid=(t, h, w))
    mask = torch.ones(2, t * h * w, dtype=torch.bool)
    mask[1, :6] = False  # a masked frame before valid ones
    with pytest.raises(ValueError, match="mask"):
        vtoken.reduce(x, 8, "vidcom2", mask=mask, video_grid=(t, h, w))
    with pytest.raises(ValueError, match=r"keep must be at least 4"):
        vtoken.reduce(x, 3, "vidcom2", video_grid=(t, h, w))
    mask = torch.ones(2, t * h * w, dtype=torch.bool)
    mask[1, 12:] = False  # two frames: keep=3 is enough there, not for the four-frame clip
    with pytest.raises(ValueError, match=r"keep resolves to 3 tokens for sample 0"):
        vtoken.reduce(x, 3, "vidcom2", mask=mask, video_grid=(t, h, w))
    with pytest.raises(ValueError, match="video_grid"):
        vtoken.reduce(x, 8, "vidcom2", video_grid=(t, h, w + 1))
    with pytest.raises(ValueError, match="video_grid"):
        vtoken.reduce(x, 8, "vidcom2")
    with pytest.raises(ValueError, match="temperature"):
        vtoken.reduce(x, 8, "vidcom2", video_grid=(t, h, w), temperature=0.0)
    with pytest.raises(ValueError, match="retention_ratio"):
        vtoken.reduce(x, 8, "vidcom2", video_grid=(t, h, w), retention_ratio=1.5)
    with pytest.raises(ValueError, match="bandwidths"):
        vtoken.reduce(x, 8, "vidcom2", video_grid=(t, h, w), bandwidths=())
    with pytest.raises(ValueError, match="channel_ratio"):
        vtoken.reduce(x, 8, "vidcom2", video_grid=(t, h, w), channel_ratio=0.0)
