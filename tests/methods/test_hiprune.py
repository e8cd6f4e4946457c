"""Behaviour of ``hiprune``: anchors, buffers, registers; masks, batching, dtypes; the buffer op."""

from __future__ import annotations

import pytest
import torch

import vtoken
from vtoken.ops.grid import buffer_neighbours

N, SIDE = 36, 6


def signal(peaks: list[int], b: int = 1, n: int = N) -> torch.Tensor:
    """``[b, 2, n]``: object layer peaked at ``peaks`` (in that order), deep layer increasing with the index."""
    shallow = torch.full((b, n), 0.001)
    for rank, p in enumerate(peaks):
        shallow[:, p] = 0.5 - 0.01 * rank
    deep = torch.arange(n, dtype=torch.float32).expand(b, n) / 100
    return torch.stack([shallow, deep], dim=1)


def kept(keep, peaks, **kw) -> list[int]:
    red = vtoken.reduce(torch.randn(1, N, 4), keep, "hiprune", attn_received_layers=signal(peaks),
                        grid=(SIDE, SIDE), **kw)
    return red.indices[0].tolist()


def test_anchor_buffers_registers():
    # k = 10, alpha = 0.5: round(10 * 0.5 / 5) = 1 anchor (14), buffers 13, 15, 8, 20, then 5 deep registers
    assert kept(10, [14], alpha=0.5) == [8, 13, 14, 15, 20, 31, 32, 33, 34, 35]


def test_buffers_wrap_in_raster_mode_and_not_in_grid_mode():
    # anchor 12 = row 2, col 0: the official flat rule takes 11 (end of row 1) as its left neighbour
    assert kept(10, [12], alpha=0.5) == [6, 11, 12, 13, 18, 31, 32, 33, 34, 35]
    assert kept(10, [12], alpha=0.5, neighbours="grid") == [6, 12, 13, 18, 30, 31, 32, 33, 34, 35]


def test_border_anchors_are_clamped_and_deduplicated():
    # anchor 0: -1 and -6 clamp to 0, so only {0, 1, 6} are buffers+anchor and 7 registers fill the budget
    assert kept(10, [0], alpha=0.5) == [0, 1, 6, 29, 30, 31, 32, 33, 34, 35]
    # anchor 35: +1 and +6 clamp to 35; its buffers 34 and 29 are not registers twice
    assert kept(10, [35], alpha=0.5) == [26, 27, 28, 29, 30, 31, 32, 33, 34, 35]


@pytest.mark.parametrize(("keep", "alpha", "anchors"), [(25, 0.5, 2), (35, 0.5, 4), (64, 0.1, 1), (128, 0.1, 3),
                                                        (192, 0.1, 4), (10, 0.0, 0)])
def test_anchor_count_rounds_half_to_even(keep, alpha, anchors):
    n = max(keep + 10, N)
    red = vtoken.reduce(torch.randn(1, n, 2), keep, "hiprune", attn_received_layers=torch.rand(1, 2, n),
                        grid=(1, n), alpha=alpha)
    assert int((red.extras["anchors"] >= 0).sum()) == anchors
    assert red.tokens.shape[1] == keep


def test_overflowing_buffers_keep_anchor_then_left_right():
    # alpha = 1, k = 3: one anchor with 4 buffers > 3, so the anchor and its left/right neighbours are kept
    assert kept(3, [14], alpha=1.0) == [13, 14, 15]


def reference(shallow: torch.Tensor, deep: torch.Tensor, k: int, alpha: float, w: int) -> list[int]:
    """The algorithm as described by the fixture manifest, one sample at a time."""
    n = shallow.shape[0]
    a = torch.topk(shallow, round(k * alpha / 5)).indices
    cand = torch.unique(torch.cat([a, a - 1, a + 1, a - w, a + w]).clamp(0, n - 1))
    d = deep.clone()
    d[cand] -= 1
    reg = torch.topk(d, k - cand.numel()).indices
    return sorted(torch.cat([cand, reg]).tolist())


@pytest.mark.parametrize("keep", [5, 17, 64, 128, 200])
def test_matches_reference_on_random_attention(keep):
    g = torch.Generator().manual_seed(keep)
    b, n = 3, 576
    sig = torch.softmax(torch.randn(b, 2, n, generator=g) * 2, dim=-1)
    red = vtoken.reduce(torch.randn(b, n, 8, generator=g), keep, "hiprune", attn_received_layers=sig, alpha=0.3)
    for i in range(b):
        assert red.indices[i].tolist() == reference(sig[i, 0], sig[i, 1], keep, 0.3, 24)


def test_layer_knobs_pick_rows():
    g = torch.Generator().manual_seed(1)
    sig = torch.rand(2, 4, N, generator=g)
    x = torch.randn(2, N, 3, generator=g)
    a = vtoken.reduce(x, 12, "hiprune", attn_received_layers=sig, object_layer=1, deep_layer=2, alpha=0.5)
    b = vtoken.reduce(x, 12, "hiprune", attn_received_layers=sig[:, [1, 2]], alpha=0.5)
    assert torch.equal(a.indices, b.indices)
    with pytest.raises(ValueError, match="object_layer"):
        vtoken.reduce(x, 12, "hiprune", attn_received_layers=sig, object_layer=4)


def test_masks_and_batch_equal_each_sample():
    g = torch.Generator().manual_seed(2)
    b, n = 3, 64
    x = torch.randn(b, n, 4, generator=g)
    sig = torch.softmax(torch.randn(b, 2, n, generator=g) * 3, dim=-1)
    mask = torch.ones(b, n, dtype=torch.bool)
    mask[1, 40:] = False
    mask[2, 5::7] = False
    red = vtoken.reduce(x, 0.4, "hiprune", attn_received_layers=sig, mask=mask, alpha=0.5)
    assert red.mask.sum(-1).tolist() == [26, 16, 22]
    for i in range(b):
        row = red.indices[i][red.mask[i]]
        assert bool(mask[i, row].all()), "masked tokens are never kept (not even as buffers)"
        one = vtoken.reduce(x[i : i + 1], 0.4, "hiprune", attn_received_layers=sig[i : i + 1], mask=mask[i : i + 1],
                            alpha=0.5)
        assert one.indices[0].tolist() == row.tolist()
        assert torch.equal(one.tokens[0], red.tokens[i, : row.numel()])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision(dtype):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 144, 8, generator=g)
    sig = torch.softmax(torch.randn(2, 2, 144, generator=g) * 3, dim=-1)
    red = vtoken.reduce(x.to(dtype), 30, "hiprune", attn_received_layers=sig.to(dtype), alpha=0.5)
    ref = vtoken.reduce(x, 30, "hiprune", attn_received_layers=sig.to(dtype).float(), alpha=0.5)
    assert red.tokens.dtype == dtype
    assert torch.equal(red.indices, ref.indices)
    assert torch.equal(red.tokens, x.to(dtype).gather(1, red.indices[..., None].expand(-1, -1, 8)))


def test_errors():
    x = torch.randn(1, 20, 3)
    with pytest.raises(ValueError, match="attn_received_layers"):
        vtoken.reduce(x, 5, "hiprune")
    with pytest.raises(ValueError, match="attn_received_layers"):
        vtoken.reduce(x, 5, "hiprune", attn_received_layers=torch.rand(1, 20), grid=(4, 5))
    with pytest.raises(ValueError, match="grid"):
        vtoken.reduce(x, 5, "hiprune", attn_received_layers=torch.rand(1, 2, 20))
    with pytest.raises(ValueError, match="alpha"):
        vtoken.reduce(x, 5, "hiprune", attn_received_layers=torch.rand(1, 2, 20), grid=(4, 5), alpha=2.0)


def test_buffer_neighbours_op():
    idx = torch.tensor([[7, 0, -1]])
    raster = buffer_neighbours(idx, (3, 4), "raster").reshape(5, 3)
    assert raster.tolist() == [[7, 0, -1], [6, 0, -1], [8, 1, -1], [3, 0, -1], [11, 4, -1]]
    grid = buffer_neighbours(idx, (3, 4), "grid").reshape(5, 3)
    assert grid.tolist() == [[7, 0, -1], [6, -1, -1], [-1, 1, -1], [3, -1, -1], [11, 4, -1]]
