"""``dycoke`` (DyCoke stage 1, temporal token merging) against a frame-by-frame reference written from the paper."""

from __future__ import annotations

import math

import pytest
import torch

import vtoken
from vtoken.api import run_method
from vtoken.methods import get_method
from vtoken.methods.dycoke import OFFICIAL_MERGING_RATIO, official_keep


def clip(frames: int, p: int, d: int, seed: int) -> torch.Tensor:
    """``[frames * p, d]``: a drifting scene, so neighbouring frames are similar but not equal."""
    gen = torch.Generator().manual_seed(seed)
    base = torch.randn(p, d, generator=gen)
    return torch.cat([base + 0.6 * torch.randn(p, d, generator=gen) for _ in range(frames)])


def cos(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    a, b = a.double(), b.double()
    return (a * b).sum(-1) / (a.norm(dim=-1) * b.norm(dim=-1))


def reference(x: torch.Tensor, frames: int, p: int, keep: int) -> tuple[list[int], list[int]]:
    """(kept source indices in the official order, tokens kept per frame), one clip, loops over frames."""
    role: dict[int, int | None] = {}  # frame -> reference frame (None: kept whole); absent: dropped
    for i in range(0, frames - 1, 2):
        role[i], role[i + 1] = None, i
    for i in range(0, frames - 4, 4):
        role[i + 2] = i
    if keep >= frames * p:
        role.setdefault(frames - 1, None)
    pruned = [f for f in sorted(role) if role[f] is not None]
    rest = keep - p * sum(role[f] is None for f in role)
    k = min(rest // len(pruned), p) if pruned else 0
    extra = rest - k * len(pruned) if k < p else 0
    order, per_frame = [], [0] * frames
    for f in sorted(role):
        tok = x[f * p:(f + 1) * p]
        if role[f] is None:
            keep_pos = list(range(p))
        else:
            ref = x[role[f] * p:(role[f] + 1) * p]
            sim = cos(ref, tok)  # cosine, normalised or not: the same value
            count = k + (pruned.index(f) < extra)
            keep_pos = torch.sort(sim, stable=True).indices[:count].tolist()
        per_frame[f] = len(keep_pos)
        order += [f * p + j for j in keep_pos]
    return order, per_frame


def run(x: torch.Tensor, frames: int, p: int, keep, **kw) -> vtoken.Reduction:
    return vtoken.reduce(x[None] if x.dim() == 2 else x, keep, "dycoke", video_grid=(frames, 1, p), **kw)


@pytest.mark.parametrize("frames", [2, 3, 4, 5, 6, 8, 9, 12, 13])
@pytest.mark.parametrize("ratio", [0.3, OFFICIAL_MERGING_RATIO, 0.9])
def test_matches_reference_at_official_counts(frames: int, ratio: float) -> None:
    p, d = 12, 8
    x = clip(frames, p, d, seed=frames)
    keep = official_keep(frames, p, ratio)
    red = run(x, frames, p, keep)
    order, per_frame = reference(x, frames, p, keep)
    assert red.extras["order"][0].tolist() == order
    assert red.indices[0].tolist() == sorted(order)
    assert torch.equal(red.tokens[0], x[sorted(order)])
    assert red.extras["frame_counts"][0].tolist() == per_frame
    assert int(red.mask.sum()) == keep


@pytest.mark.parametrize("frames", [2, 5, 7, 8, 10])
def test_any_budget_splits_like_reference(frames: int) -> None:
    p, d = 10, 6
    x = clip(frames, p, d, seed=100 + frames)
    floor = official_keep(frames, p, 1.0)
    ceiling = official_keep(frames, p, 0.0)
    for keep in range(floor, frames * p):
        red = run(x, frames, p, keep)
        order, per_frame = reference(x, frames, p, keep)
        assert red.extras["order"][0].tolist() == order, keep
        assert red.extras["frame_counts"][0].tolist() == per_frame, keep
        assert int(red.mask.sum()) == min(keep, ceiling) <= keep
        if frames % 2 == 0:
            assert int(red.mask.sum()) == keep  # exact on clips of an even number of frames


def test_frames_and_references() -> None:
    """The manifest's quirk: with 9 frames, frames 2 and 6 are re-pruned against 0 and 4, frame 8 is dropped."""
    p = 6
    x = clip(9, p, 4, seed=3)
    red = run(x, 9, p, official_keep(9, p))
    ref = red.extras["reference"][0].tolist()
    assert ref == [-1, 0, 0, 2, -1, 4, 4, 6, -1]
    counts = red.extras["frame_counts"][0].tolist()
    assert counts[0] == counts[4] == p and counts[8] == 0
    assert official_keep(32, 196) == 3098
    # 32 frames: 2, 6, ..., 26 re-pruned, 30 kept whole
    red32 = run(clip(32, 4, 3, seed=5), 32, 4, official_keep(32, 4))
    whole = [f for f, r in enumerate(red32.extras["reference"][0].tolist()) if r < 0]
    assert whole == [0, 4, 8, 12, 16, 20, 24, 28, 30]


@pytest.mark.parametrize("keep", [40, 0.5, 0.8])
def test_batch_equals_each_clip_alone(keep) -> None:
    p, d, t = 8, 5, 9
    lengths = [9, 6, 5, 2, 7]
    xs = [clip(f, p, d, seed=20 + f) for f in lengths]
    tokens = torch.zeros(len(lengths), t * p, d)
    mask = torch.zeros(len(lengths), t * p, dtype=torch.bool)
    for i, x in enumerate(xs):
        tokens[i, :x.shape[0]] = x
        tokens[i, x.shape[0]:] = torch.randn(t * p - x.shape[0], d)  # padding content must not matter
        mask[i, :x.shape[0]] = True
    batch = vtoken.reduce(tokens, keep, "dycoke", mask=mask, video_grid=(t, 1, p))
    for i, (f, x) in enumerate(zip(lengths, xs, strict=True)):
        alone = run(x, f, p, keep)
        k = int(alone.mask.sum())
        assert int(batch.mask[i].sum()) == k
        assert torch.equal(batch.indices[i, :k], alone.indices[0, :k])
        assert torch.equal(batch.tokens[i, :k], alone.tokens[0, :k])
        assert not batch.mask[i, k:].any() and (batch.indices[i, k:] == -1).all()
        if "order" in alone.extras:
            assert torch.equal(batch.extras["order"][i, :k], alone.extras["order"][0, :k])
            assert torch.equal(batch.extras["frame_counts"][i, :f], alone.extras["frame_counts"][0])
        else:  # alone the clip kept everything (vtoken.reduce's identity); in the batch too
            assert torch.equal(batch.extras["frame_counts"][i, :f], torch.full((f,), p))
        assert not batch.extras["frame_counts"][i, f:].any()


def test_budget_covering_the_clip_keeps_it_whole() -> None:
    """An odd clip whose budget covers all its tokens keeps its trailing frame (as vtoken.reduce alone does)."""
    p, d = 6, 4
    short, long_ = clip(3, p, d, seed=1), clip(6, p, d, seed=2)
    tokens = torch.zeros(2, 6 * p, d)
    tokens[0, :3 * p], tokens[1] = short, long_
    mask = torch.zeros(2, 6 * p, dtype=torch.bool)
    mask[0, :3 * p], mask[1] = True, True
    red = vtoken.reduce(tokens, 3 * p, "dycoke", mask=mask, video_grid=(6, 1, p))
    assert red.indices[0, :3 * p].tolist() == list(range(3 * p))
    assert int(red.mask[1].sum()) == 3 * p


def test_budget_is_respected_and_exact_for_even_clips() -> None:
    p, d = 16, 8
    x = clip(8, p, d, seed=7)
    for keep in (0.45, 0.6, 0.99, 70, 100, 127):
        red = run(x, 8, p, keep)
        want = math.floor(8 * p * keep + 0.5) if isinstance(keep, float) else keep
        assert int(red.mask.sum()) == want
        assert (red.indices[0].diff() > 0).all()
    assert vtoken.get_method("dycoke").exact is False  # odd clips drop their trailing frame


def test_grid_layout_inside_a_frame_does_not_matter() -> None:
    p, d = 12, 4
    x = clip(6, p, d, seed=9)
    a = vtoken.reduce(x[None], 40, "dycoke", video_grid=(6, 1, p))
    b = vtoken.reduce(x[None], 40, "dycoke", video_grid=(6, 3, 4))
    assert torch.equal(a.indices, b.indices) and torch.equal(a.extras["order"], b.extras["order"])


def test_ties_break_by_lowest_position() -> None:
    p, d = 10, 4
    frame = torch.ones(p, d)
    x = torch.cat([frame, frame * 2.0])  # every position equally similar to the frame before
    red = run(x, 2, p, p + 3)
    assert red.extras["order"][0].tolist() == [*range(p), p, p + 1, p + 2]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_low_precision_scores_in_float32(dtype) -> None:
    p, d = 10, 8
    x = clip(6, p, d, seed=11).to(dtype)
    red = run(x, 6, p, 35)
    want = run(x.double() if dtype == torch.float64 else x.float(), 6, p, 35)
    assert red.tokens.dtype == dtype
    assert torch.equal(red.indices, want.indices)
    assert torch.equal(red.tokens, x[red.indices[0]][None])


def test_errors_name_the_argument() -> None:
    p, d = 6, 4
    x = clip(6, p, d, seed=4)
    floor = official_keep(6, p, 1.0)  # frames 0 and 4 whole (2 is re-pruned against 0)
    assert floor == 2 * p
    with pytest.raises(ValueError, match=rf"keep.*pass keep >= {floor}"):
        run(x, 6, p, floor - 1)
    run(x, 6, p, floor)  # the floor itself works
    with pytest.raises(ValueError, match=r"keep resolves to 3 tokens.*single frame"):
        run(clip(1, p, d, seed=0), 1, p, 3)
    mask = torch.ones(1, 6 * p, dtype=torch.bool)
    mask[0, -2:] = False  # part of the last frame
    with pytest.raises(ValueError, match="mask must mark whole frames"):
        run(x, 6, p, 20, mask=mask)
    mask = torch.ones(1, 6 * p, dtype=torch.bool)
    mask[0, p:2 * p] = False  # a masked frame before valid ones
    with pytest.raises(ValueError, match="mask must mark the first frames"):
        run(x, 6, p, 20, mask=mask)
    with pytest.raises(ValueError, match="video_grid"):
        vtoken.reduce(x[None], 20, "dycoke", video_grid=(5, 1, p))
    with pytest.raises(ValueError, match="video_grid"):
        vtoken.reduce(x[None], 20, "dycoke")


def test_registration() -> None:
    info = vtoken.get_method("dycoke")
    assert (info.stage, info.kind, info.parity, info.fixture) == ("video", "prune", True, "dycoke_ttm")
    assert info.signals == ("video_grid",)
    assert "dycoke_kv" in (info.fn.__doc__ or "")


# ---- stage 2: dycoke_kv, one decoding step's selection -------------------------------------------------------


def kv_reference(steps: list[torch.Tensor], n: int, keep: int, threshold: float) -> list[tuple[list[int], bool]]:
    """Per decoding step, one sample's kept visual tokens and whether they were selected anew: the paper's rule,
    a loop over steps (``steps``: the new token's attention to the ``n`` visual tokens at each step)."""
    out, prev, kept = [], None, []
    for a in steps:
        a = a[:n].double()
        renew = prev is None or float((a * prev).sum() / (a.norm() * prev.norm()).clamp(min=1e-8)) < threshold
        if renew:
            kept = sorted(sorted(range(n), key=lambda i: (-float(a[i]), i))[:keep])
        prev = a
        out.append((kept, renew))
    return out


@pytest.mark.parametrize("threshold", [0.9, 0.99, 1.0, -1.0])
def test_kv_selection_matches_the_rule_step_by_step(threshold: float) -> None:
    """A batch of samples with different visual counts over several steps, attention drifting slowly (some steps
    move, some do not): each sample's kept set and renewals equal the loop's, the state carried between steps."""
    gen = torch.Generator().manual_seed(3)
    b, n, t = 3, 10, 8
    valid_n = [10, 7, 4]
    keeps = [4, 3, 4]
    mask = torch.arange(n)[None, :] < torch.tensor(valid_n)[:, None]
    base = torch.rand(b, n, generator=gen)
    attn = [(base + 0.15 * step * torch.rand(b, n, generator=gen)).softmax(-1) for step in range(t)]
    state = None
    got: list[list[tuple[list[int], bool]]] = [[] for _ in range(b)]
    for a in attn:
        signals = {"llm_attn": a} if state is None else {"llm_attn": a, "decode_state": state}
        red = run_method(get_method("dycoke_kv"), torch.zeros(b, n, 2), torch.tensor(keeps), mask=mask,
                         signals=signals, knobs={"threshold": threshold})
        state = red.extras["state"]
        for i in range(b):
            got[i].append((red.indices[i][red.mask[i]].tolist(), bool(red.extras["reselected"][i])))
    renewals = 0
    for i in range(b):
        want = kv_reference([a[i] for a in attn], valid_n[i], keeps[i], threshold)
        assert got[i] == want
        renewals += sum(r for _, r in want[1:])
    if threshold == -1.0:
        assert renewals == 0
    if threshold == 1.0:
        assert renewals == b * (t - 1)
    if threshold == 0.99:
        assert 0 < renewals < b * (t - 1)


def test_kv_state_holds_attention_and_kept_set() -> None:
    a = torch.tensor([[0.1, 0.5, 0.2, 0.2]])
    red = vtoken.reduce(torch.zeros(1, 4, 2), keep=2, method="dycoke_kv", llm_attn=a)
    assert red.indices.tolist() == [[1, 2]]  # a tie between 2 and 3: the lowest index
    torch.testing.assert_close(red.extras["state"][0], torch.tensor([[0.1, 0.0], [0.5, 1.0], [0.2, 1.0], [0.2, 0.0]]))
    # an unchanged attention keeps the previous set, even a set it would not pick now
    state = red.extras["state"].clone()
    state[0, :, 1] = torch.tensor([1.0, 0.0, 0.0, 1.0])
    again = vtoken.reduce(torch.zeros(1, 4, 2), keep=2, method="dycoke_kv", llm_attn=a, decode_state=state)
    assert again.indices.tolist() == [[0, 3]] and again.extras["reselected"].tolist() == [False]


def test_kv_registration_and_one_step_knobs() -> None:
    info = get_method("dycoke_kv")
    assert info.stage == "decode" and info.kind == "prune" and info.defaults == {"threshold": 0.9, "layer": 3}
    assert info.signals == ("llm_attn",) and info.optional_signals == ("decode_state",)
    with pytest.raises(TypeError, match="'layer' is a schedule knob"):
        vtoken.reduce(torch.zeros(1, 4, 2), keep=2, method="dycoke_kv", llm_attn=torch.rand(1, 4), layer=2)
