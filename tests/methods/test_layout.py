"""Token-Shuffle layout methods: token_shuffle / token_unshuffle and the ops they use."""

from __future__ import annotations

import pytest
import torch

import vtoken
from vtoken.ops.grid import shuffle, unshuffle, valid_windows, window_index

CASES = [((24, 24), 2), ((24, 24), 3), ((24, 24), 4), ((24, 24), 8), ((6, 10), 2), ((4, 8), 4), ((12, 18), 6),
         ((5, 5), 5)]
DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]


def tokens(grid: tuple[int, int], d: int = 3, b: int = 2, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    g = torch.Generator().manual_seed(grid[0] * 100 + grid[1])
    return (torch.randn(b, grid[0] * grid[1], d, generator=g) * 1e3).to(dtype)


def bits(t: torch.Tensor) -> torch.Tensor:
    """The raw bit patterns of ``t`` (so the comparison is bit for bit, -0.0 and NaN payloads included)."""
    return t.view({2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])


@pytest.mark.parametrize(("grid", "s"), CASES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_roundtrip_bit_exact(grid, s, dtype):
    x = tokens(grid, dtype=dtype)
    n = x.shape[1]
    red = vtoken.reduce(x, n // (s * s), "token_shuffle", grid=grid)
    assert red.tokens.shape == (2, n // (s * s), 3 * s * s) and red.tokens.dtype == dtype
    back = vtoken.reduce(red.tokens, None, "token_unshuffle", grid=red.extras["grid"], window=s)
    assert back.tokens.dtype == dtype
    assert torch.equal(bits(back.tokens), bits(x))
    assert back.indices.tolist() == [list(range(n))] * 2 and bool(back.mask.all())
    assert torch.equal(unshuffle(shuffle(x, grid, s), grid, s), x)


def test_shuffle_channel_layout():
    h, w = 4, 6
    x = torch.arange(h * w, dtype=torch.float32).reshape(1, h * w, 1)
    y = shuffle(x, (h, w), 2)
    assert y.shape == (1, 6, 4)
    assert y[0, 0].tolist() == [0, 1, 6, 7]     # window (0, 0): its tokens in raster order
    assert y[0, 1].tolist() == [2, 3, 8, 9]
    assert y[0, 3].tolist() == [12, 13, 18, 19]  # second window row
    x2 = torch.stack([x, -x], dim=-1).reshape(1, h * w, 2)
    assert shuffle(x2, (h, w), 2)[0, 0].tolist() == [0, -0.0, 1, -1, 6, -6, 7, -7]  # token-major, then D


def test_bookkeeping():
    x = tokens((6, 6), b=1)
    red = vtoken.reduce(x, 4, "token_shuffle", grid=(6, 6))  # s = 3
    assert red.indices.tolist() == [[0, 3, 18, 21]]          # window top-left tokens, ascending
    slot, top_left = window_index((6, 6), 3)
    assert red.assign.tolist() == [slot.tolist()] and top_left.tolist() == [0, 3, 18, 21]
    assert red.assign[0, 7].item() == 0 and red.assign[0, 35].item() == 3
    assert red.sizes.tolist() == [[9.0] * 4] and red.extras["window"] == 3
    # every output token holds exactly the inputs assigned to it
    for m in range(4):
        members = (red.assign[0] == m).nonzero().squeeze(1)
        assert torch.equal(red.tokens[0, m].reshape(9, -1), x[0, members])


def test_ratio_keep_and_window_knob():
    x = tokens((24, 24))
    a = vtoken.reduce(x, 0.25, "token_shuffle", grid=(24, 24))
    b = vtoken.reduce(x, 144, "token_shuffle", grid=(24, 24), window=2)
    assert torch.equal(a.tokens, b.tokens) and a.extras["window"] == 2
    with pytest.raises(ValueError, match="window=3 gives keep=64"):
        vtoken.reduce(x, 144, "token_shuffle", grid=(24, 24), window=3)
    with pytest.raises(ValueError, match="valid windows"):
        vtoken.reduce(x, 144, "token_shuffle", grid=(24, 24), window=5)


def test_invalid_keep_lists_valid_keeps():
    x = tokens((24, 24))
    with pytest.raises(ValueError, match=r"valid keeps for N = 576: \[144, 64, 36, 16, 9, 4, 1\]"):
        vtoken.reduce(x, 100, "token_shuffle", grid=(24, 24))
    with pytest.raises(ValueError, match=r"valid keeps for N = 60: \[15\]"):
        vtoken.reduce(tokens((6, 10)), 20, "token_shuffle", grid=(6, 10))
    assert valid_windows((6, 10)) == [1, 2]


def test_keep_all_is_identity():
    x = tokens((6, 6))
    red = vtoken.reduce(x, 36, "token_shuffle", grid=(6, 6))
    assert torch.equal(red.tokens, x)


def test_errors_are_named():
    x = tokens((4, 4))
    with pytest.raises(ValueError, match="grid"):
        vtoken.reduce(x, 4, "token_shuffle")
    mask = torch.ones(2, 16, dtype=torch.bool)
    mask[1, -1] = False
    with pytest.raises(ValueError, match="mask"):
        vtoken.reduce(x, 4, "token_shuffle", grid=(4, 4), mask=mask)
    y = vtoken.reduce(x, 4, "token_shuffle", grid=(4, 4)).tokens
    with pytest.raises(ValueError, match="window"):
        vtoken.reduce(y, None, "token_unshuffle", grid=(2, 2))
    with pytest.raises(ValueError, match="keep=None"):
        vtoken.reduce(y, 16, "token_unshuffle", grid=(2, 2), window=2)
    with pytest.raises(ValueError, match="divisible"):
        vtoken.reduce(y, None, "token_unshuffle", grid=(2, 2), window=3)
    with pytest.raises(ValueError, match="grid"):
        vtoken.reduce(y, None, "token_unshuffle", grid=(4, 4), window=2)
    with pytest.raises(ValueError, match="divide"):
        shuffle(x, (4, 4), 3)


def test_registry_metadata():
    shuf, unshuf = vtoken.get_method("token_shuffle"), vtoken.get_method("token_unshuffle")
    assert shuf.kind == unshuf.kind == "layout"
    assert shuf.needs_keep and not unshuf.needs_keep
    assert "grid" in shuf.signals and "grid" in unshuf.signals
