"""Behaviour of the spatial baselines: uniform, pool, downsample (and their grid ops)."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
import torch.nn.functional as F

import vtoken
from vtoken.ops.grid import even_positions, output_grid, partition_cells, uniform_positions

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def grid_tokens(h: int, w: int, d: int = 4, b: int = 1, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, h * w, d, generator=g)


def gaps(sorted_positions: list[int], size: int) -> int:
    """Largest distance between consecutive kept positions, the borders (-1 and ``size``) included."""
    p = [-1, *sorted_positions, size]
    return max(b - a for a, b in itertools.pairwise(p))


# ---------------------------------------------------------------------------------------------------------------
# uniform
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("h", "w", "keep"), [(h, w, k) for h, w in [(24, 24), (6, 20), (20, 6), (1, 30), (7, 11)]
                                               for k in (1, 2, 7, 36, 50, 64, 100, 143) if k < h * w])
def test_uniform_spreads_over_grid(h, w, keep):
    red = vtoken.reduce(grid_tokens(h, w), keep, "uniform", grid=(h, w))
    idx = red.indices[0]
    assert idx.numel() == keep and bool((idx[1:] > idx[:-1]).all())
    rows, cols = (idx // w).tolist(), (idx % w).tolist()
    kept_rows = sorted(set(rows))
    r = len(kept_rows)
    assert gaps(kept_rows, h) <= math.ceil(h / r) + 1, (kept_rows, h)
    per_row = {y: sorted(c for yy, c in zip(rows, cols, strict=True) if yy == y) for y in kept_rows}
    counts = [len(v) for v in per_row.values()]
    assert max(counts) - min(counts) <= 1, "rows hold k // rows or one more"
    for cs in per_row.values():
        assert gaps(cs, w) <= math.ceil(w / len(cs)) + 1, (cs, w)
    # the lattice is near-square in token units
    if keep >= 4 and h > 1 and w > 1:
        assert abs(math.log((h / r) / (w / (keep / r)))) < math.log(2.5)


def test_uniform_64_of_24x24_is_the_centred_8x8_lattice():
    red = vtoken.reduce(grid_tokens(24, 24), 64, "uniform", grid=(24, 24))
    lattice = [1 + 3 * i for i in range(8)]
    expected = [y * 24 + x for y in lattice for x in lattice]
    assert red.indices[0].tolist() == expected


def test_uniform_1d_without_grid():
    n, k = 50, 7
    x = torch.randn(2, n, 3)
    red = vtoken.reduce(x, k, "uniform")
    want = [(2 * i + 1) * n // (2 * k) for i in range(k)]
    assert red.indices.tolist() == [want] * 2
    assert torch.equal(red.tokens, x[:, want])


def test_uniform_mask_spreads_over_valid_tokens():
    x = grid_tokens(4, 4, b=2)
    mask = torch.ones(2, 16, dtype=torch.bool)
    mask[1, 1::2] = False  # 8 valid tokens: 0, 2, ..., 14
    red = vtoken.reduce(x, 4, "uniform", grid=(4, 4), mask=mask)
    assert red.indices[1].tolist() == [2, 6, 10, 14]  # positions 1, 3, 5, 7 of the 8 valid ones
    assert bool(mask[1, red.indices[1]].all())
    one = vtoken.reduce(x[1:], 4, "uniform", grid=(4, 4), mask=mask[1:])
    assert one.indices.tolist() == red.indices[1:].tolist()


def test_uniform_positions_exact_counts_per_sample():
    h = torch.tensor([24, 5, 1])
    w = torch.tensor([24, 9, 40])
    k = torch.tensor([100, 13, 17])
    pos = uniform_positions(h, w, k)
    for b in range(3):
        p = pos[b][pos[b] >= 0]
        assert p.numel() == int(k[b]) and len(set(p.tolist())) == int(k[b])
        assert bool((p[1:] > p[:-1]).all()) and int(p.max()) < int(h[b] * w[b])


def test_even_positions():
    assert even_positions(10, torch.tensor([3, 0, 10])).tolist() == [
        [1, 5, 8] + [-1] * 7, [-1] * 10, list(range(10))]


# ---------------------------------------------------------------------------------------------------------------
# pool
# ---------------------------------------------------------------------------------------------------------------


def test_output_grid_rule():
    h, w = torch.tensor([24, 24, 24, 24, 6, 1, 2]), torch.tensor([24, 24, 24, 24, 12, 30, 100])
    k = torch.tensor([64, 100, 50, 60, 18, 7, 150])
    rows, cols = output_grid(h, w, k)
    assert list(zip(rows.tolist(), cols.tolist(), strict=True)) == [
        (8, 8), (10, 10), (7, 7), (7, 8), (3, 6), (1, 7), (1, 100)]
    assert bool((rows * cols <= k).all())


def test_pool_equals_hand_average():
    x = torch.arange(16 * 2, dtype=torch.float32).reshape(1, 16, 2)  # 4 x 4 grid, token t = [2t, 2t + 1]
    red = vtoken.reduce(x, 4, "pool", grid=(4, 4))
    g = x[0].reshape(4, 4, 2)
    want = torch.stack([g[:2, :2].mean((0, 1)), g[:2, 2:].mean((0, 1)), g[2:, :2].mean((0, 1)),
                        g[2:, 2:].mean((0, 1))])
    torch.testing.assert_close(red.tokens[0], want)
    assert red.indices.tolist() == [[0, 2, 8, 10]]
    assert red.assign.tolist() == [[0, 0, 1, 1, 0, 0, 1, 1, 2, 2, 3, 3, 2, 2, 3, 3]]
    assert red.sizes.tolist() == [[4.0] * 4]


def test_pool_non_divisible_partition():
    x = torch.randn(1, 25, 3)
    red = vtoken.reduce(x, 4, "pool", grid=(5, 5))  # rows {0,1,2} {3,4}, cols likewise
    g = x[0].reshape(5, 5, 3)
    want = torch.stack([g[:3, :3].mean((0, 1)), g[:3, 3:].mean((0, 1)), g[3:, :3].mean((0, 1)),
                        g[3:, 3:].mean((0, 1))])
    torch.testing.assert_close(red.tokens[0], want)
    assert red.indices.tolist() == [[0, 3, 15, 18]]
    assert red.sizes.tolist() == [[9.0, 6.0, 6.0, 4.0]]


def test_pool_matches_avg_pool2d_when_divisible():
    x = grid_tokens(24, 24, d=5, b=2)
    red = vtoken.reduce(x, 64, "pool", grid=(24, 24))
    ref = F.avg_pool2d(x.transpose(1, 2).reshape(2, 5, 24, 24), 3).flatten(2).transpose(1, 2)
    torch.testing.assert_close(red.tokens, ref, atol=1e-6, rtol=1e-5)


def test_pool_count_at_most_keep_and_1d_exact():
    red = vtoken.reduce(grid_tokens(24, 24), 50, "pool", grid=(24, 24))
    assert red.tokens.shape[1] == 49  # 7 x 7
    red = vtoken.reduce(torch.randn(1, 20, 3), 6, "pool")  # 1-D: exactly keep contiguous bins
    assert red.tokens.shape[1] == 6
    assert red.assign.tolist() == [[i * 6 // 20 for i in range(20)]]


def test_pool_mask_excludes_padding():
    x = torch.randn(2, 12, 3)
    mask = torch.ones(2, 12, dtype=torch.bool)
    mask[1, 8:] = False
    red = vtoken.reduce(x, 4, "pool", grid=(3, 4), mask=mask)
    assert bool((red.assign[1, 8:] == -1).all())
    # sample 1 is pooled 1-D over its 8 valid tokens: 4 bins of 2
    torch.testing.assert_close(red.tokens[1], x[1, :8].reshape(4, 2, 3).mean(1))
    one = vtoken.reduce(x[1:], 4, "pool", grid=(3, 4), mask=mask[1:])
    torch.testing.assert_close(one.tokens[0], red.tokens[1, : one.tokens.shape[1]])


def test_partition_cells_cover_every_cell():
    pos = torch.arange(35)[None]
    cell = partition_cells(pos, torch.tensor([5]), torch.tensor([7]), torch.tensor([3]), torch.tensor([4]))
    assert sorted(set(cell[0].tolist())) == list(range(12))


# ---------------------------------------------------------------------------------------------------------------
# downsample
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("h", "w", "keep"), [(24, 24, 64), (24, 24, 50), (7, 10, 12), (5, 5, 4)])
def test_downsample_constant_stays_constant(h, w, keep):
    x = torch.full((2, h * w, 3), 0.75)
    red = vtoken.reduce(x, keep, "downsample", grid=(h, w))
    torch.testing.assert_close(red.tokens, torch.full_like(red.tokens, 0.75))


@pytest.mark.parametrize(("h", "w", "keep"), [(24, 24, 64), (24, 24, 50), (7, 10, 12), (9, 4, 6)])
def test_downsample_ramp_stays_linear(h, w, keep):
    y, x = torch.meshgrid(torch.arange(h, dtype=torch.float32), torch.arange(w, dtype=torch.float32), indexing="ij")
    ramp = torch.stack([2.0 * y + 0.5 * x + 1.0, -y], dim=-1).reshape(1, h * w, 2)
    red = vtoken.reduce(ramp, keep, "downsample", grid=(h, w))
    rows, cols = output_grid(torch.tensor([h]), torch.tensor([w]), torch.tensor([keep]))
    r, c = int(rows), int(cols)
    assert red.tokens.shape[1] == r * c
    sy = (torch.arange(r) + 0.5) * h / r - 0.5
    sx = (torch.arange(c) + 0.5) * w / c - 0.5
    yy, xx = torch.meshgrid(sy, sx, indexing="ij")
    want = torch.stack([2.0 * yy + 0.5 * xx + 1.0, -yy], dim=-1).reshape(1, r * c, 2)
    torch.testing.assert_close(red.tokens, want, atol=1e-5, rtol=1e-5)


def test_downsample_matches_interpolate():
    x = grid_tokens(24, 18, d=3, b=2)
    red = vtoken.reduce(x, 40, "downsample", grid=(24, 18))
    rows, cols = output_grid(torch.tensor([24]), torch.tensor([18]), torch.tensor([40]))
    ref = F.interpolate(x.transpose(1, 2).reshape(2, 3, 24, 18), size=(int(rows), int(cols)), mode="bilinear",
                        align_corners=False).flatten(2).transpose(1, 2)
    torch.testing.assert_close(red.tokens, ref, atol=1e-5, rtol=1e-5)
    assert red.indices[0].tolist() == [
        (i * 24 // int(rows) + (1 if i * 24 % int(rows) else 0)) * 18 + (j * 18 // int(cols) + (
            1 if j * 18 % int(cols) else 0)) for i in range(int(rows)) for j in range(int(cols))]


# ---------------------------------------------------------------------------------------------------------------
# shared
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["uniform", "pool", "downsample"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_low_precision_runs(method, dtype):
    x = grid_tokens(12, 12, d=8, b=2).to(dtype)
    red = vtoken.reduce(x, 16, method, grid=(12, 12))
    assert red.tokens.dtype == dtype and red.tokens.shape == (2, 16, 8)
    ref = vtoken.reduce(x.float(), 16, method, grid=(12, 12))
    assert red.indices.tolist() == ref.indices.tolist()
    torch.testing.assert_close(red.tokens.float(), ref.tokens, atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("method", ["uniform", "pool", "downsample"])
def test_batch_equals_each_sample_with_masks(method):
    x = grid_tokens(6, 6, d=4, b=3, seed=3)
    mask = torch.ones(3, 36, dtype=torch.bool)
    mask[1, 20:] = False
    mask[2, ::3] = False
    red = vtoken.reduce(x, 0.3, method, grid=(6, 6), mask=mask)
    for i in range(3):
        one = vtoken.reduce(x[i : i + 1], 0.3, method, grid=(6, 6), mask=mask[i : i + 1])
        k = int(one.mask.sum())
        assert int(red.mask[i].sum()) == k
        assert red.indices[i, :k].tolist() == one.indices[0, :k].tolist()
        assert bool(mask[i, red.indices[i, :k]].all()), "masked tokens are never representatives"
        torch.testing.assert_close(red.tokens[i, :k], one.tokens[0, :k])
        if red.assign is not None:
            assert bool((red.assign[i][~mask[i]] == -1).all())
            assert red.assign[i].tolist() == one.assign[0].tolist()
