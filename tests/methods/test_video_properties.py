"""Property tests over every method on a clip's frame layout (``video_grid``): random clips of different lengths in
one batch (whole masked frames at the end), budgets of at least one frame per clip.

Indices ascending, unique, in range; padding consistent; at most the resolved keep (exactly it for exact methods);
``frame_counts`` agrees with the kept indices; a batch equals each clip alone; deterministic; keep >= N is the
identity; a partly valid frame is a ValueError.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import vtoken
from vtoken.core import SIGNAL_SHAPES, resolve_keep
from vtoken.synthetic import make_signal

VIDEO = [m.name for m in vtoken.methods() if "video_grid" in m.signals]
DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]


@st.composite
def clips(draw):
    b = draw(st.integers(1, 3))
    t, h, w = draw(st.integers(1, 6)), draw(st.integers(1, 3)), draw(st.integers(1, 4))
    d = draw(st.integers(2, 16))
    frames = [draw(st.integers(1, t)) for _ in range(b)]
    frames[0] = t
    p = h * w
    shortest = min(frames)
    keep = draw(st.one_of(st.integers(p, t * p + 3), st.floats(1.0 / shortest, 1.0)))
    seed = draw(st.integers(0, 2**16))
    dtype = draw(st.sampled_from(DTYPES))
    gen = torch.Generator().manual_seed(seed)
    base = torch.randn(b, 1, p, d, generator=gen) * 2
    x = (base + 0.7 * torch.randn(b, t, p, d, generator=gen)).reshape(b, t * p, d)  # frames share a scene
    mask = (torch.arange(t)[None, :] < torch.tensor(frames)[:, None])[:, :, None].expand(b, t, p).reshape(b, t * p)
    return x.to(dtype), mask, (t, h, w), keep


def _signals(name, x, grid):
    """The method's tensor signals besides video_grid, synthetic; ``frame_features`` are the frames' mean tokens."""
    t = grid[0]
    return {s: x.float().reshape(x.shape[0], t, -1, x.shape[-1]).mean(2) if s == "frame_features"
            else make_signal(s, x) for s in vtoken.get_method(name).signals if s != "video_grid"}


def _clip(signals, i, f, p):
    """Clip ``i``'s first ``f`` frames (of ``p`` tokens) of every signal (axes ``B``, ``N`` and ``F`` sliced)."""
    cut = {"B": slice(i, i + 1), "N": slice(0, f * p), "F": slice(0, f)}
    return {k: v[tuple(cut.get(s, slice(None)) for s in SIGNAL_SHAPES[k].dims.split("|")[0].split())]
            for k, v in signals.items()}


def _reduce(name, x, mask, grid, keep, signals=None):
    signals = _signals(name, x, grid) if signals is None else signals
    return vtoken.reduce(x, keep, name, mask=mask, video_grid=grid, **signals)


def _fits(name: str, x, mask, grid, keep) -> bool:
    """Whether the method's own floor allows this budget (a floor is a ValueError naming keep)."""
    try:
        _reduce(name, x, mask, grid, keep)
    except ValueError as err:
        assert "keep" in str(err), f"{name}: a refused budget must name keep: {err}"
        return False
    return True


@pytest.mark.parametrize("name", VIDEO)
@settings(deadline=None, max_examples=40)
@given(problem=clips())
def test_structure_budget_and_frame_counts(name, problem):
    x, mask, grid, keep = problem
    if not _fits(name, x, mask, grid, keep):
        return
    info = vtoken.get_method(name)
    red = _reduce(name, x, mask, grid, keep)
    b, n = x.shape[:2]
    t, h, w = grid
    assert bool(((red.indices >= 0) == red.mask).all()) and bool(red.mask.any(-1).all())
    assert bool((red.indices < n).all())
    for row, m, valid in zip(red.indices, red.mask, mask, strict=True):
        kept = row[m]
        assert bool((kept[1:] > kept[:-1]).all()), row.tolist()
        assert bool(valid[kept].all()), "a padded frame's token was kept"
    counts = red.mask.sum(-1)
    want = torch.stack([resolve_keep(keep, int(v.sum())) for v in mask]).reshape(b)
    if info.exact:
        assert counts.tolist() == want.tolist()
    else:
        assert bool((counts <= want).all()), (counts.tolist(), want.tolist())
    if "frame_counts" in red.extras and red.assign is None:
        frame_of = torch.where(red.mask, red.indices // (h * w), t)
        per_frame = torch.zeros(b, t + 1, dtype=torch.long).scatter_add_(1, frame_of, torch.ones_like(frame_of))
        assert red.extras["frame_counts"].tolist() == per_frame[:, :t].tolist()


@pytest.mark.parametrize("name", VIDEO)
@settings(deadline=None, max_examples=25)
@given(problem=clips())
def test_batch_equals_each_clip_alone_and_is_deterministic(name, problem):
    x, mask, grid, keep = problem
    if not _fits(name, x, mask, grid, keep):
        return
    red = _reduce(name, x, mask, grid, keep)
    again = _reduce(name, x, mask, grid, keep)
    assert torch.equal(red.indices, again.indices) and torch.equal(red.tokens, again.tokens)
    _t, h, w = grid
    p = h * w
    sig = _signals(name, x, grid)
    for i in range(x.shape[0]):
        f = int(mask[i].sum()) // p
        one = _reduce(name, x[i:i + 1, : f * p], None, (f, h, w), keep, _clip(sig, i, f, p))
        k = int(red.mask[i].sum())
        assert red.indices[i, :k].tolist() == one.indices[0].tolist(), f"clip {i}"
        tol = 1e-2 if x.dtype in (torch.float16, torch.bfloat16) else 1e-5
        torch.testing.assert_close(red.tokens[i, :k].float(), one.tokens[0].float(), atol=tol, rtol=tol)


@pytest.mark.parametrize("name", VIDEO)
def test_keep_all_is_the_identity_and_partial_frames_are_refused(name):
    x = torch.randn(2, 3 * 4, 5)
    sig = _signals(name, x, (3, 2, 2))
    red = vtoken.reduce(x, 1.0, name, video_grid=(3, 2, 2), **sig)
    assert torch.equal(red.tokens, x)
    mask = torch.ones(2, 12, dtype=torch.bool)
    mask[1, 10:] = False  # frame 2 of clip 1 only half valid
    with pytest.raises(ValueError, match="whole frames"):
        vtoken.reduce(x, 8, name, mask=mask, video_grid=(3, 2, 2), **sig)
    with pytest.raises((TypeError, ValueError), match="video_grid"):
        vtoken.reduce(x, 8, name, video_grid=(3, 2, 3), **sig)
