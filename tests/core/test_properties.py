"""Property tests over every registered method (docs/design.md invariants 3-5).

Random shapes, dtypes and keep values: no crash on valid input; indices ascending, unique, in range; mask and
padding consistent; output count equals the resolved keep (at most it for adaptive methods); keep >= N returns the
input unchanged; a batch equals each sample alone; the same input gives the same indices; a missing signal is a
ValueError naming it.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import vtoken
from vtoken.core import resolve_keep
from vtoken.synthetic import make_signals

# layout methods (token_shuffle) accept only the keeps their window allows; tests/methods/test_layout.py covers them;
# methods on a clip's frame layout (video_grid) need whole frames: tests/methods/test_video_properties.py covers them
METHODS = [m.name for m in vtoken.methods() if m.needs_keep and m.kind != "layout" and "video_grid" not in m.signals]
DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]


@st.composite
def problems(draw, max_n: int = 48, min_d: int = 1):
    b = draw(st.integers(1, 3))
    n = draw(st.integers(1, max_n))
    d = draw(st.integers(min_d, 24))
    seed = draw(st.integers(0, 2**16))
    keep = draw(st.one_of(st.integers(1, n + 4), st.floats(0.01, 1.0, allow_nan=False)))
    dtype = draw(st.sampled_from(DTYPES))
    gen = torch.Generator().manual_seed(seed)
    centers = torch.randn(4, d, generator=gen) * 3
    x = centers[torch.randint(0, 4, (b, n), generator=gen)] + torch.randn(b, n, d, generator=gen)
    return x.to(dtype), keep


def _run(name: str, x: torch.Tensor, keep, **extra):
    info = vtoken.get_method(name)
    return vtoken.reduce(x, keep, name, **make_signals(info, x), **extra)


def _check_structure(name: str, x: torch.Tensor, keep, red: vtoken.Reduction) -> None:
    info = vtoken.get_method(name)
    b, n = x.shape[:2]
    k = red.tokens.shape[1]
    assert red.tokens.shape[0] == b and red.indices.shape == (b, k) and red.mask.shape == (b, k)
    assert red.indices.dtype == torch.long and red.mask.dtype == torch.bool
    assert red.tokens.dtype == x.dtype or info.kind == "layout"
    assert bool(torch.isfinite(red.tokens.float()).all())
    assert bool(((red.indices >= 0) == red.mask).all()), "indices are -1 exactly on padding"
    assert bool(red.mask.any(-1).all()), "every sample keeps at least one token"
    assert bool((red.indices < n).all())
    for row, m in zip(red.indices, red.mask, strict=True):
        kept = row[m]
        assert bool((kept[1:] > kept[:-1]).all()), f"indices must be strictly ascending: {row.tolist()}"
        assert bool(m[: int(m.sum())].all()), "padding only at the end"
    counts = red.mask.sum(-1)
    want = resolve_keep(keep, n).expand(b)
    if info.exact:
        assert counts.tolist() == want.tolist(), f"{name}: kept {counts.tolist()} but keep resolves to {want.tolist()}"
    else:
        assert bool((counts <= want).all()), f"{name}: kept {counts.tolist()} > keep {want.tolist()}"
    if red.assign is not None:
        assert red.assign.shape == (b, n)
        assert bool((red.assign < k).all()) and bool((red.assign >= -1).all())


@pytest.mark.parametrize("name", METHODS)
@given(problem=problems())
def test_valid_input_structure(name, problem):
    x, keep = problem
    red = _run(name, x, keep)
    _check_structure(name, x, keep, red)


@pytest.mark.parametrize("name", METHODS)
@given(problem=problems())
def test_deterministic(name, problem):
    x, keep = problem
    a, b = _run(name, x, keep), _run(name, x.clone(), keep)
    assert torch.equal(a.indices, b.indices)
    assert torch.equal(a.tokens, b.tokens)


@pytest.mark.parametrize("name", METHODS)
@given(problem=problems(), extra=st.integers(0, 5))
def test_keep_all_returns_input(name, problem, extra):
    x, _ = problem
    red = _run(name, x, x.shape[1] + extra)
    assert torch.equal(red.tokens, x)
    assert red.indices.tolist() == [list(range(x.shape[1]))] * x.shape[0]
    red = _run(name, x, 1.0)
    assert torch.equal(red.tokens, x)


@pytest.mark.parametrize("name", METHODS)
@given(problem=problems(min_d=4))
def test_batch_equals_each_sample(name, problem):
    # D >= 4: with one or two channels cosine similarities are exactly +-1 and greedy objectives tie everywhere, so
    # float rounding (which differs between a batched and a single run) would pick among equal candidates
    x, keep = problem
    x = x.float()
    red = _run(name, x, keep)
    for i in range(x.shape[0]):
        one = _run(name, x[i : i + 1], keep)
        k = int(one.mask.sum())
        assert int(red.mask[i].sum()) == k
        assert red.indices[i, :k].tolist() == one.indices[0, :k].tolist()
        torch.testing.assert_close(red.tokens[i, :k], one.tokens[0, :k], atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("name", METHODS)
def test_missing_signal_is_named(name):
    info = vtoken.get_method(name)
    x = torch.randn(1, 16, 8)
    sig = make_signals(info, x, optional=False)
    for s in info.signals:
        partial = {k: v for k, v in sig.items() if k != s}
        with pytest.raises(ValueError, match=s):
            vtoken.reduce(x, 4, name, **partial)


@pytest.mark.parametrize("name", METHODS)
def test_masked_padding_never_selected(name):
    info = vtoken.get_method(name)
    torch.manual_seed(0)
    x = torch.randn(2, 16, 8)
    mask = torch.ones(2, 16, dtype=torch.bool)
    mask[1, 10:] = False
    red = vtoken.reduce(x, 0.5, name, mask=mask, **make_signals(info, x))
    kept1 = red.indices[1][red.mask[1]]
    assert bool((kept1 < 10).all()), f"{name} selected padded tokens: {kept1.tolist()}"
    if red.assign is not None:
        assert bool((red.assign[1, 10:] == -1).all()), "padded inputs are not merged into outputs"
    want = resolve_keep(0.5, mask.sum(-1))
    if info.exact:
        assert red.mask.sum(-1).tolist() == want.tolist()


@st.composite
def shuffle_problems(draw):
    s = draw(st.integers(2, 4))  # window 1 is keep = N: the identity, covered above
    h, w = draw(st.integers(1, 5)) * s, draw(st.integers(1, 5)) * s
    b, d = draw(st.integers(1, 3)), draw(st.integers(1, 6))
    dtype = draw(st.sampled_from(DTYPES))
    x = torch.randn(b, h * w, d, generator=torch.Generator().manual_seed(draw(st.integers(0, 2**16)))).to(dtype)
    return x, (h, w), s


@given(problem=shuffle_problems())
def test_token_shuffle_properties(problem):
    """Layout methods accept only the keeps their window allows; there: exact inverse, structure, batch-invariance."""
    x, grid, s = problem
    n = x.shape[1]
    red = vtoken.reduce(x, n // (s * s), "token_shuffle", grid=grid)
    assert red.tokens.shape == (x.shape[0], n // (s * s), x.shape[2] * s * s) and red.tokens.dtype == x.dtype
    for row in red.indices:
        assert bool((row[1:] > row[:-1]).all()) and bool((row >= 0).all()) and bool((row < n).all())
    back = vtoken.reduce(red.tokens, None, "token_unshuffle", grid=(grid[0] // s, grid[1] // s), window=s)
    assert torch.equal(back.tokens, x)
    for i in range(x.shape[0]):
        one = vtoken.reduce(x[i : i + 1], n // (s * s), "token_shuffle", grid=grid)
        assert torch.equal(one.tokens[0], red.tokens[i]) and torch.equal(one.indices[0], red.indices[i])
