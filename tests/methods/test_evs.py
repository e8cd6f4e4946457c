"""Behaviour of ``evs`` (Efficient Video Sampling, vLLM's ``video_pruning_rate``) against a loop over frames written
from the paper / manifest: frame 0 kept whole, later tokens scored by ``1 - cos`` with the same grid position in the
previous frame, the globally most dissimilar kept (ties to the lower index)."""

from __future__ import annotations

import pytest
import torch

import vtoken
from vtoken.methods.evs import FIRST_FRAME_SCORE, retained_count


def clip(t: int, h: int, w: int, d: int, seed: int, b: int = 1, motion: float = 0.5) -> torch.Tensor:
    """``[b, t * h * w, d]``: a scene plus per-frame changes (no exact ties)."""
    g = torch.Generator().manual_seed(seed)
    scene = torch.randn(b, 1, h * w, d, generator=g)
    return (scene + motion * torch.randn(b, t, h * w, d, generator=g)).reshape(b, t * h * w, d)


def reference(x: torch.Tensor, grid: tuple[int, int, int], keep: int) -> tuple[list[int], torch.Tensor]:
    """One clip ``[N, D]``: (kept indices ascending, scores ``[T, H * W]``), by a plain loop over frames in float64."""
    t, h, w = grid
    p = h * w
    frames = x.double().reshape(t, p, -1)
    scores = torch.empty(t, p, dtype=torch.float64)
    scores[0] = FIRST_FRAME_SCORE
    for f in range(1, t):
        for j in range(p):
            a, b = frames[f, j], frames[f - 1, j]
            scores[f, j] = 1 - float(a @ b) / (float(a.norm()) * float(b.norm()))
    flat = scores.reshape(-1).tolist()
    order = sorted(range(t * p), key=lambda i: (-flat[i], i))
    return sorted(order[:keep]), scores


@pytest.mark.parametrize("grid,keep,seed", [((4, 2, 3), 10, 0), ((6, 3, 3), 20, 1), ((5, 4, 2), 8, 2),
                                            ((8, 3, 4), 40, 3), ((3, 1, 5), 14, 4)])
def test_matches_the_frame_loop_reference(grid, keep, seed):
    t, h, w = grid
    x = clip(t, h, w, 7, seed, b=2)
    red = vtoken.reduce(x, keep, "evs", video_grid=grid)
    for i in range(2):
        want, scores = reference(x[i], grid, keep)
        assert red.indices[i].tolist() == want
        torch.testing.assert_close(red.extras["dissimilarity"][i].double().reshape(t, h * w), scores, atol=1e-6,
                                   rtol=1e-5)
        assert torch.equal(red.tokens[i], x[i, want])
        per_frame = torch.bincount(torch.tensor(want) // (h * w), minlength=t)
        assert red.extras["frame_counts"][i].tolist() == per_frame.tolist()
        assert red.extras["frame_counts"][i, 0] == h * w, "the first frame is kept whole"


def test_budget_is_exact_and_ratios_resolve_per_clip():
    x = clip(6, 3, 4, 5, seed=5, b=3)
    for keep in (12, 13, 30, 71):
        red = vtoken.reduce(x, keep, "evs", video_grid=(6, 3, 4))
        assert red.counts.tolist() == [keep] * 3
        assert red.extras["frame_counts"].sum(-1).tolist() == [keep] * 3
    red = vtoken.reduce(x, 0.25, "evs", video_grid=(6, 3, 4))
    assert red.counts.tolist() == [18] * 3  # round(72 * 0.25)


def test_batch_of_clips_of_different_lengths_equals_each_clip_alone():
    t, h, w, d = 6, 2, 3, 5
    p = h * w
    x = clip(t, h, w, d, seed=6, b=3)
    frames = [6, 3, 1]
    mask = (torch.arange(t)[None, :] < torch.tensor(frames)[:, None])[:, :, None].expand(3, t, p).reshape(3, t * p)
    x = x.masked_fill(~mask[..., None], 3.0)  # padded frames hold anything
    red = vtoken.reduce(x, 11, "evs", mask=mask, video_grid=(t, h, w))
    assert red.counts.tolist() == [11, 11, 6]  # the one-frame clip keeps its 6 tokens
    for i, f in enumerate(frames):
        k = int(red.counts[i])
        if f == 1:
            one = vtoken.reduce(x[i:i + 1, :p], 11, "evs", video_grid=(1, h, w))
            assert red.indices[i, :k].tolist() == one.indices[0].tolist() == list(range(p))
        else:
            one = vtoken.reduce(x[i:i + 1, :f * p], 11, "evs", video_grid=(f, h, w))
            assert red.indices[i, :k].tolist() == one.indices[0].tolist()
            assert torch.equal(red.extras["dissimilarity"][i, :f], one.extras["dissimilarity"][0])
            assert red.extras["frame_counts"][i, :f].tolist() == one.extras["frame_counts"][0].tolist()
        assert torch.equal(red.tokens[i, :k], x[i, red.indices[i, :k]])
        assert bool((red.indices[i, k:] == -1).all())
        assert red.extras["frame_counts"][i, f:].tolist() == [0] * (t - f)
        assert bool(torch.isneginf(red.extras["dissimilarity"][i, f:]).all())


def test_compares_with_the_previous_frame_not_the_last_kept_one():
    h, w, d = 2, 2, 4
    g = torch.Generator().manual_seed(7)
    a, b = torch.randn(h * w, d, generator=g), torch.randn(h * w, d, generator=g)
    c = b.clone()
    c[0] = torch.randn(d, generator=g)  # frame 2 changes one token from frame 1
    x = torch.cat([a, b, c])[None]
    red = vtoken.reduce(x, 5, "evs", video_grid=(3, h, w))
    score = red.extras["dissimilarity"][0].reshape(3, -1)
    assert torch.allclose(score[2, 1:], torch.zeros(3), atol=1e-6), "unchanged since frame 1, kept or not"
    assert red.indices[0].tolist() == [0, 1, 2, 3, 4 + int(score[1].argmax())]


def test_static_video_ties_go_to_the_lowest_index():
    # integer vectors with integer norms, so every cosine with itself is exactly 1
    frame = torch.tensor([[5.0, 0, 0], [3, 4, 0], [0, 3, 4], [4, 0, 3], [0, 0, 7], [0, 6, 8]])
    x = frame.repeat(4, 1)[None]  # four identical frames: every later score is exactly 0
    red = vtoken.reduce(x, 9, "evs", video_grid=(4, 2, 3))
    assert red.indices[0].tolist() == list(range(9))
    assert red.extras["frame_counts"][0].tolist() == [6, 3, 0, 0]


def test_a_scene_cut_takes_the_budget():
    x = clip(6, 3, 3, 8, seed=9, motion=0.05)
    cut = torch.randn(9, 8, generator=torch.Generator().manual_seed(10))  # a new scene from frame 4 on
    x[0, 4 * 9:] = torch.cat([cut, cut + 0.05 * torch.randn(9, 8, generator=torch.Generator().manual_seed(11))])
    red = vtoken.reduce(x, 18, "evs", video_grid=(6, 3, 3))
    assert red.extras["frame_counts"][0].tolist() == [9, 0, 0, 0, 9, 0]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_dtypes(dtype):
    x = clip(5, 2, 3, 6, seed=11).to(dtype)
    red = vtoken.reduce(x, 13, "evs", video_grid=(5, 2, 3))
    assert red.tokens.dtype == dtype
    want = torch.float64 if dtype == torch.float64 else torch.float32
    assert red.extras["dissimilarity"].dtype == want
    same = vtoken.reduce(x.to(want), 13, "evs", video_grid=(5, 2, 3))  # scores of the same values in float32
    assert torch.equal(red.indices, same.indices)


def test_retained_count_is_vllms_rate_to_count():
    assert retained_count(192, 8, 0.75) == 384
    assert retained_count(196, 13, 0.9) == 254  # int(254.8)
    assert retained_count(10, 3, 0.7) == 10  # int(30 * (1 - 0.7)) = 9, below one frame: the floor
    assert retained_count(2, 50, 0.9) == 9  # 100 * (1 - 0.9) = 9.999999999999998: truncated, float arithmetic
    assert retained_count(5, 4, 0.0) == 20 and retained_count(7, 1, 0.5) == 7  # q = 0 or one frame: everything
    for q in (1.0, -0.1, True, "0.5"):
        with pytest.raises(ValueError, match="q"):
            retained_count(4, 4, q)


def test_keep_below_the_first_frame_is_refused_naming_keep():
    x = clip(4, 2, 3, 5, seed=12)
    with pytest.raises(ValueError, match=r"keep resolves to 5 tokens.*keep >= 6"):
        vtoken.reduce(x, 5, "evs", video_grid=(4, 2, 3))
    with pytest.raises(ValueError, match=r"keep >= 6 \(a count\) or a ratio keep >= 0.25"):
        vtoken.reduce(x, 0.2, "evs", video_grid=(4, 2, 3))
    assert vtoken.reduce(x, 0.25, "evs", video_grid=(4, 2, 3)).counts.tolist() == [6]


def test_bad_layouts_are_refused_naming_the_argument():
    x = clip(3, 2, 2, 4, seed=13, b=2)
    mask = torch.ones(2, 12, dtype=torch.bool)
    mask[1, 10:] = False  # half of frame 2
    with pytest.raises(ValueError, match="mask must mark whole frames"):
        vtoken.reduce(x, 6, "evs", mask=mask, video_grid=(3, 2, 2))
    mask = torch.ones(2, 12, dtype=torch.bool)
    mask[1, 4:8] = False  # a hole before a valid frame
    with pytest.raises(ValueError, match="mask must mark the first frames"):
        vtoken.reduce(x, 6, "evs", mask=mask, video_grid=(3, 2, 2))
    with pytest.raises(ValueError, match="video_grid"):
        vtoken.reduce(x, 6, "evs")
    with pytest.raises(ValueError, match="video_grid"):
        vtoken.reduce(x, 6, "evs", video_grid=(3, 2, 3))


def test_keep_all_is_the_identity():
    x = clip(3, 2, 2, 4, seed=14)
    red = vtoken.reduce(x, 12, "evs", video_grid=(3, 2, 2))
    assert torch.equal(red.tokens, x) and red.indices[0].tolist() == list(range(12))
