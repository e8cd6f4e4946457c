"""``holitom`` (outer-LLM stage) and ``holitom_llm`` (inner-LLM merge) against loop-based references written from the
paper and the fixture manifest's description: the temporal DP, static / dynamic split, DPC-kNN merge, the official
budgets, vtoken's budget rule (the largest allocation that fits keep), batching, errors, dtypes and knobs."""

from __future__ import annotations

import math
from fractions import Fraction
from itertools import pairwise

import pytest
import torch

import vtoken
from vtoken.methods.holitom import (
    holitom_llm_merge,
    llm_keep_count,
    official_keep,
    received_attention,
    similarity_merge,
)

# ---------------------------------------------------------------------------------------------------------------
# clips with clear margins: static positions repeat the scene (cos ~ 0.99), moving ones are fresh (cos ~ 0)
# ---------------------------------------------------------------------------------------------------------------


def clip(frames: int, p: int, d: int, seed: int, cuts: tuple[int, ...] = (), still: float = 0.6) -> torch.Tensor:
    """``[frames, p, d]``: a scene that changes at the frames in ``cuts``; per frame a random share of positions
    moves (fresh random tokens), the others repeat the scene with small noise."""
    g = torch.Generator().manual_seed(seed)
    scene = torch.randn(p, d, generator=g)
    out = []
    for f in range(frames):
        if f in cuts:
            scene = torch.randn(p, d, generator=g)
        frame = scene + 0.05 * torch.randn(p, d, generator=g)
        moving = torch.rand(p, generator=g) > still
        frame[moving] = torch.randn(int(moving.sum()), d, generator=g)
        out.append(frame)
    return torch.stack(out)


def attention(frames: int, p: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(10_000 + seed)
    return torch.softmax(torch.randn(frames, p, generator=g), -1)


# ---------------------------------------------------------------------------------------------------------------
# the reference: one clip, Python loops, float64
# ---------------------------------------------------------------------------------------------------------------


def cos(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a @ b) / (a.norm() * b.norm()))


def ref_windows(x: torch.Tensor, thr: float, max_w: int) -> tuple[list[tuple[int, int]], int, list[list[float]]]:
    f, p, _ = x.shape
    sim = [[cos(x[t, j], x[t + 1, j]) for j in range(p)] for t in range(f - 1)]

    def gain(s: int, e: int) -> int:
        return sum(all(sim[t][j] > thr for t in range(s, e)) for j in range(p)) * (e - s)

    dp, start = [0] * f, [0] * f
    for i in range(f):
        best, st = (dp[i - 1] if i else 0), i
        for w in range(2, min(i + 1, max_w) + 1):
            j = i - w
            val = (dp[j] if j >= 0 else 0) + gain(j + 1, i)
            if val > best:
                best, st = val, j + 1
        dp[i], start[i] = best, st
    windows, i = [], f - 1
    while i >= 0:
        windows.append((start[i], i))
        i = start[i] - 1
    return windows[::-1], dp[f - 1], sim


def ref_static(sim: list[list[float]], s: int, e: int, p: int, thr: float) -> list[bool]:
    if s == e:
        return [False] * p
    return [all(sim[t][j] > thr for t in range(s, e)) for j in range(p)]


def ref_dpc(pts: list[torch.Tensor], k: int, knn: int) -> tuple[list[int], list[int]]:
    """(centres ascending, nearest centre of every point) of DPC-kNN on ``pts``."""
    n, d = len(pts), pts[0].numel()
    dist = [[float((pts[i].double() - pts[j].double()).norm()) / math.sqrt(d) for j in range(n)] for i in range(n)]
    kk = min(knn, k)
    dens = [math.exp(-sum(v * v for v in sorted(dist[i])[:kk]) / kk) for i in range(n)]
    top = max(max(row) for row in dist)
    delta = []
    for i in range(n):
        # exact density ties (mutual nearest neighbours when kk <= 2) go to the lower index, vtoken's noise-free
        # replacement of the official rand * 1e-6
        higher = [dist[i][j] for j in range(n) if dens[j] > dens[i] or (dens[j] == dens[i] and j < i)]
        delta.append(min(higher) if higher else top)
    score = [delta[i] * dens[i] for i in range(n)]
    centres = sorted(sorted(range(n), key=lambda i: (-score[i], i))[:k])
    nearest = [i if i in centres else min(centres, key=lambda c: (dist[i][c], c)) for i in range(n)]
    return centres, nearest


def ref_allocation(n_d: list[int], n_s: list[int], r: float | Fraction) -> tuple[list[int], list[int]]:
    return [math.ceil(v * r) for v in n_d], [round(v * r) for v in n_s]


def ref_holitom(x: torch.Tensor, attn: torch.Tensor, *, ratio: float | None = None, keep: int | None = None,
                thr: float = 0.8, beta: float = 0.6, knn: int = 7, max_w: int = 1024,
                no_beta: bool = False) -> dict:
    """The official outer stage on one clip ``x [F, P, D]`` at ``RETAIN_RATIO = ratio`` (or, with ``keep``, vtoken's
    rule: the largest allocation of at most ``keep`` tokens, searched exactly over rational ratios)."""
    f, p, _ = x.shape
    windows, reduced, sim = ref_windows(x, thr, max_w)
    statics = [ref_static(sim, s, e, p, thr) for s, e in windows]
    n_d = [p - sum(m) for (s, e), m in zip(windows, statics, strict=True) for _ in range(s, e + 1)]
    n_s = [sum(m) for m in statics]
    if ratio is not None:
        r: float | Fraction = min(ratio / ((f * p - reduced) / (f * p)), 1)
    else:
        assert keep is not None
        cands = {Fraction(1)} | {Fraction(k, v) for v in n_d if v for k in range(1, v + 1)} | {
            Fraction(2 * k + 1, 2 * v) for v in n_s if v for k in range(v)}
        srt = sorted(cands)
        cands |= {(a + b) / 2 for a, b in pairwise(srt)} | {srt[0] / 2}
        fits = [c for c in sorted(cands) if sum(sum(part) for part in ref_allocation(n_d, n_s, c)) <= keep]
        r = fits[-1]
    dyn, clus = ref_allocation(n_d, n_s, r)
    order, values, sizes = [], [], []
    frame = 0
    for w, ((s, e), m) in enumerate(zip(windows, statics, strict=True)):
        pos = [j for j in range(p) if m[j]]
        if pos and clus[w] > 0:
            pts = [x[s:e + 1, j].double().mean(0) for j in pos]
            centres, nearest = ref_dpc(pts, clus[w], knn)
            for c in centres:
                members = [pts[i] for i in range(len(pts)) if nearest[i] == c and i != c]
                if no_beta:
                    v = torch.stack([pts[c], *members]).mean(0)
                elif members:
                    v = beta * pts[c] + (1 - beta) * torch.stack(members).mean(0)
                else:
                    v = pts[c]
                order.append(s * p + pos[c])
                values.append(v)
                sizes.append((1 + len(members)) * (e - s + 1))
        for t in range(s, e + 1):
            cand = [j for j in range(p) if not m[j]]
            top = sorted(sorted(cand, key=lambda j: (-float(attn[t, j]), j))[:dyn[frame]])
            order += [t * p + j for j in top]
            values += [x[t, j].double() for j in top]
            sizes += [1] * len(top)
            frame += 1
    return {"windows": windows, "order": order, "values": values, "sizes": sizes, "count": len(order),
            "dyn": dyn, "clus": clus, "reduced": reduced}


def run(x: torch.Tensor, keep, attn: torch.Tensor | None = None, **kw) -> vtoken.Reduction:
    f, p, d = x.shape
    sig = {} if attn is None else {"attn_received_layers": attn.reshape(1, 1, f * p)}
    return vtoken.reduce(x.reshape(1, f * p, d), keep, "holitom", video_grid=(f, 1, p), **sig, **kw)


def check_against(red: vtoken.Reduction, ref: dict, p: int, atol: float = 1e-5) -> None:
    k = int(red.mask[0].sum())
    assert k == ref["count"]
    assert red.extras["order"][0, :k].tolist() == ref["order"]
    assert red.indices[0, :k].tolist() == sorted(ref["order"])
    nw = len(ref["windows"])
    assert red.extras["windows"][0, :nw].tolist() == [list(w) for w in ref["windows"]]
    assert int(red.extras["total_reduced"][0]) == ref["reduced"]
    slot = {i: s for s, i in enumerate(red.indices[0, :k].tolist())}
    got = torch.stack([red.tokens[0, slot[i]] for i in ref["order"]]).double()
    torch.testing.assert_close(got, torch.stack(ref["values"]), atol=atol, rtol=1e-5)
    assert [float(red.sizes[0, slot[i]]) for i in ref["order"]] == [float(v) for v in ref["sizes"]]


CONFIGS = [
    # frames, p, cuts, ratio, knobs
    (8, 12, (3, 6), 0.15, {}),
    (6, 16, (2,), 0.25, {"threshold": 0.65, "beta": 0.7}),
    (7, 10, (), 0.1, {"knn": 2}),
    (9, 12, (1, 2, 5), 0.3, {"no_beta": True}),
    (5, 9, (2,), 0.6, {"max_window_size": 2}),
    (4, 8, (1, 2, 3), 0.5, {}),              # every frame its own window: nothing static
    (6, 12, (3,), 0.9, {}),                  # r' clamped to 1: every dynamic token, every static mean kept
    (1, 14, (), 0.3, {}),                    # a single frame
]


@pytest.mark.parametrize(("frames", "p", "cuts", "ratio", "knobs"), CONFIGS)
def test_matches_reference_at_the_official_ratio(frames, p, cuts, ratio, knobs) -> None:
    d = 32
    x = clip(frames, p, d, seed=frames * 100 + p, cuts=cuts)
    attn = attention(frames, p, seed=frames)
    names = {"threshold": "thr", "beta": "beta", "knn": "knn", "max_window_size": "max_w", "no_beta": "no_beta"}
    ref = ref_holitom(x, attn, ratio=ratio, **{names[k]: v for k, v in knobs.items()})
    keep = official_keep(x.reshape(1, frames * p, d), (frames, 1, p), ratio,
                         threshold=knobs.get("threshold", 0.8), max_window_size=knobs.get("max_window_size", 1024))
    assert int(keep[0]) == ref["count"]
    if ref["count"] >= frames * p:
        pytest.skip("the official allocation keeps every token (vtoken.reduce's identity)")
    exact = run(x, int(keep[0]), attn, retain_ratio=ratio, **knobs)
    check_against(exact, ref, p)
    own = run(x, int(keep[0]), attn, **knobs)  # vtoken's rule lands on the same allocation
    check_against(own, ref, p)


@pytest.mark.parametrize("frames", [6, 9])
def test_budget_is_the_largest_allocation_that_fits(frames: int) -> None:
    p, d = 10, 32
    x = clip(frames, p, d, seed=7 + frames, cuts=(frames // 2,))
    attn = attention(frames, p, seed=3)
    for keep in range(frames, frames * p, 3):
        try:
            red = run(x, keep, attn)
        except ValueError as err:
            assert "keep" in str(err)
            continue
        ref = ref_holitom(x, attn, keep=keep)
        check_against(red, ref, p)
        assert int(red.mask.sum()) <= keep
        assert red.extras["clusters"][0][red.extras["clusters"][0] > 0].tolist() == [c for c in ref["clus"] if c > 0]


def test_batch_with_padding_equals_each_clip_alone() -> None:
    p, d, t = 9, 32, 8
    lengths = [8, 5, 1, 6]
    xs = [clip(f, p, d, seed=40 + f, cuts=(2,)) for f in lengths]
    atts = [attention(f, p, seed=f) for f in lengths]
    tokens = torch.randn(len(lengths), t * p, d)  # padding content must not matter
    attn = torch.rand(len(lengths), 1, t * p)
    mask = torch.zeros(len(lengths), t * p, dtype=torch.bool)
    for i, (x, a) in enumerate(zip(xs, atts, strict=True)):
        tokens[i, :x.numel() // d] = x.reshape(-1, d)
        attn[i, 0, :a.numel()] = a.reshape(-1)
        mask[i, :x.numel() // d] = True
    for keep in (0.2, 0.45, 30):
        batch = vtoken.reduce(tokens, keep, "holitom", mask=mask, video_grid=(t, 1, p), attn_received_layers=attn)
        for i, (x, a) in enumerate(zip(xs, atts, strict=True)):
            alone = run(x, keep, a)
            k = int(alone.mask.sum())
            assert int(batch.mask[i].sum()) == k
            assert torch.equal(batch.indices[i, :k], alone.indices[0])
            torch.testing.assert_close(batch.tokens[i, :k], alone.tokens[0], atol=1e-6, rtol=1e-6)
            assert not batch.mask[i, k:].any()
            if "order" in alone.extras:
                assert torch.equal(batch.extras["order"][i, :k], alone.extras["order"][0])
                f = lengths[i]
                assert torch.equal(batch.extras["windows"][i], torch.cat([
                    alone.extras["windows"][0], torch.full((t - f, 2), -1, dtype=torch.long)]))
                assert not batch.extras["frame_counts"][i, f:].any()


def test_a_budget_covering_the_clip_keeps_it_unchanged() -> None:
    p, d = 8, 32
    short, long_ = clip(3, p, d, seed=1), clip(6, p, d, seed=2, cuts=(3,))
    tokens = torch.zeros(2, 6 * p, d)
    tokens[0, :3 * p], tokens[1] = short.reshape(-1, d), long_.reshape(-1, d)
    mask = torch.zeros(2, 6 * p, dtype=torch.bool)
    mask[0, :3 * p], mask[1] = True, True
    red = vtoken.reduce(tokens, 3 * p, "holitom", mask=mask, video_grid=(6, 1, p))
    assert red.indices[0, :3 * p].tolist() == list(range(3 * p))
    assert torch.equal(red.tokens[0, :3 * p], tokens[0, :3 * p])
    assert int(red.mask[1].sum()) <= 3 * p
    # the official ratio 1 is not the identity: it still averages the static tokens of a window
    x = clip(6, p, d, seed=5, cuts=(3,))
    ref = ref_holitom(x, attention(6, p, 0), ratio=1.0)
    assert ref["count"] < 6 * p
    check_against(run(x, 6 * p - 1, attention(6, p, 0), retain_ratio=1.0), ref, p)


def test_the_floor_is_one_token_per_frame_with_dynamic_tokens() -> None:
    p, d = 10, 32
    x = clip(6, p, d, seed=11, cuts=(3,))
    ref = ref_holitom(x, attention(6, p, 0), keep=10**6)  # ratio 1: dyn is each frame's dynamic tokens
    floor = sum(1 for t in range(6) if ref["dyn"][t] > 0)
    assert 0 < floor <= 6
    with pytest.raises(ValueError, match=rf"keep resolves to {floor - 1} tokens.*pass keep >= {floor}"):
        run(x, floor - 1, attention(6, p, 0))
    red = run(x, floor, attention(6, p, 0))
    assert int(red.mask.sum()) == floor
    # a clip of identical frames has no dynamic token: the floor is one static cluster
    same = x[:1].expand(4, p, d).contiguous()
    with pytest.raises(ValueError, match=r"pass keep >= 1\b"):
        vtoken.get_method("holitom").fn(same.reshape(1, 4 * p, d), torch.tensor([0]), video_grid=(4, 1, p))
    assert int(run(same, 1).mask.sum()) == 1


def test_official_keep_and_the_llm_count() -> None:
    x = clip(8, 12, 32, seed=3, cuts=(4,))
    tok = x.reshape(1, -1, 32)
    for ratio in (0.1, 0.15, 0.5):
        assert int(official_keep(tok, (8, 3, 4), ratio)[0]) == ref_holitom(x, attention(8, 12, 0), ratio=ratio)[
            "count"]
    two = torch.cat([tok, tok.flip(1)])
    both = official_keep(two, (8, 3, 4), 0.2)
    assert both.shape == (2,) and int(both[0]) == int(official_keep(tok, (8, 3, 4), 0.2)[0])
    assert llm_keep_count(5, 0.5) == 2 and llm_keep_count(7, 0.5) == 4  # Python round, half to even
    assert llm_keep_count(1271, 0.3) == round(1271 * (1 - 0.3))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_dtypes(dtype) -> None:
    p, d = 12, 32
    x = clip(6, p, d, seed=9, cuts=(3,)).to(dtype)
    attn = attention(6, p, 1)
    red = run(x, 20, attn)
    want = run(x.double() if dtype == torch.float64 else x.float(), 20, attn)
    assert red.tokens.dtype == dtype
    assert torch.equal(red.indices, want.indices)
    tol = 1e-2 if dtype != torch.float64 else 1e-12
    torch.testing.assert_close(red.tokens.double(), want.tokens.double(), atol=tol, rtol=tol)


def test_knobs_change_what_they_should() -> None:
    p, d, frames = 12, 32, 6
    x = clip(frames, p, d, seed=21, cuts=(3,))
    attn = attention(frames, p, 2)
    base = run(x, 30, attn)
    assert base.extras["static"].any()
    # no window longer than a frame (or a threshold nothing passes): no static token, per-frame top attention
    for knobs in ({"max_window_size": 1}, {"threshold": 1.0}):
        red = run(x, 30, attn, **knobs)
        assert not red.extras["static"].any()
        assert red.extras["windows"][0].tolist() == [[f, f] for f in range(frames)]
        per = red.extras["dynamic_keep"][0].tolist()
        want = sorted(f * p + j for f in range(frames) for j in attn[f].argsort(descending=True)[:per[f]].tolist())
        assert red.indices[0].tolist() == want and red.assign is not None
    # beta = 1 keeps each cluster's centre (its window mean) unmerged; no_beta averages centre and members
    one = run(x, 30, attn, beta=1.0)
    assert torch.equal(one.indices, base.indices)
    centre_rows = (one.sizes[0] > 1).nonzero()[:, 0]
    assert centre_rows.numel() > 0
    for s in centre_rows.tolist():
        i = int(one.indices[0, s])
        f, j = divmod(i, p)
        w_end = int(one.extras["windows"][0][one.extras["windows"][0][:, 0] == f][0, 1])
        torch.testing.assert_close(one.tokens[0, s], x[f:w_end + 1, j].mean(0), atol=1e-6, rtol=1e-6)
    plain = run(x, 30, attn, no_beta=True)
    assert torch.equal(plain.indices, base.indices) and not torch.allclose(plain.tokens, base.tokens)
    # the attention's last layer is the one read
    two = vtoken.reduce(x.reshape(1, -1, d), 30, "holitom", video_grid=(frames, 1, p),
                        attn_received_layers=torch.stack([torch.rand(frames * p), attn.reshape(-1)])[None])
    assert torch.equal(two.indices, base.indices)


def test_without_attention_the_tokens_own_received_attention_ranks() -> None:
    p, d, frames = 12, 32, 5
    x = clip(frames, p, d, seed=31, cuts=(2,))
    fallback = run(x, 25)
    explicit = run(x, 25, received_attention(x[None].float())[0])
    assert torch.equal(fallback.indices, explicit.indices)
    assert torch.equal(fallback.extras["scores"], explicit.extras["scores"])


def test_merge_bookkeeping() -> None:
    p, d, frames = 12, 32, 7
    x = clip(frames, p, d, seed=13, cuts=(3, 5))
    red = run(x, 24, attention(frames, p, 4))
    k = int(red.mask.sum())
    assert red.assign is not None and red.sizes is not None
    used = red.assign[0][red.assign[0] >= 0]
    assert torch.equal(torch.bincount(used, minlength=k)[:k].double(), red.sizes[0, :k].double())
    # a merged static token's cluster spans every frame of its window; its index is in the window's first frame
    wins = [w for w in red.extras["windows"][0].tolist() if w[0] >= 0]
    firsts = {s for s, _ in wins}
    for s_idx in (red.sizes[0, :k] > 1).nonzero()[:, 0].tolist():
        assert int(red.indices[0, s_idx]) // p in firsts
    assert red.extras["frame_counts"][0].sum() == k


# ---------------------------------------------------------------------------------------------------------------
# the inner-LLM merge
# ---------------------------------------------------------------------------------------------------------------


def ref_llm(h: torch.Tensor, a: torch.Tensor, keep: int) -> tuple[list[int], torch.Tensor]:
    n = h.shape[0]
    kept = sorted(range(n), key=lambda i: (-float(a[i]), i))[:keep]
    out = h.double().clone()
    for i in range(n):
        if i in kept:
            continue
        sims = [cos(h[i], h[j]) for j in kept]
        best = kept[max(range(len(kept)), key=lambda s: (sims[s], -s))]
        out[best] = (out[best] + h[i].double()) / 2
    keep_sorted = sorted(kept)
    return keep_sorted, out[keep_sorted]


@pytest.mark.parametrize(("n", "keep"), [(20, 10), (31, 7), (12, 11), (9, 1)])
def test_similarity_merge_matches_the_sequential_reference(n: int, keep: int) -> None:
    g = torch.Generator().manual_seed(n)
    h = torch.randn(n, 16, generator=g)
    a = torch.rand(n, generator=g)
    idx, vals = ref_llm(h, a, keep)
    red = similarity_merge(h[None], a[None], torch.tensor([keep]))
    assert red.indices[0].tolist() == idx
    torch.testing.assert_close(red.tokens[0].double(), vals, atol=1e-6, rtol=1e-6)
    same = vtoken.reduce(h[None], keep, "holitom_llm", llm_attn=a[None])
    assert torch.equal(same.indices, red.indices) and torch.equal(same.tokens, red.tokens)
    assert int(red.sizes[0].sum()) == n


def test_similarity_merge_batch_with_padding() -> None:
    g = torch.Generator().manual_seed(0)
    h, a = torch.randn(3, 15, 8, generator=g), torch.rand(3, 15, generator=g)
    mask = torch.ones(3, 15, dtype=torch.bool)
    mask[1, 9:], mask[2, 4:] = False, False
    red = vtoken.reduce(h, 0.5, "holitom_llm", mask=mask, llm_attn=a)
    for i, n in enumerate((15, 9, 4)):
        alone = vtoken.reduce(h[i:i + 1, :n], 0.5, "holitom_llm", llm_attn=a[i:i + 1, :n])
        k = int(alone.mask.sum())
        assert torch.equal(red.indices[i, :k], alone.indices[0])
        torch.testing.assert_close(red.tokens[i, :k], alone.tokens[0])


def test_llm_merge_on_a_sequence_and_its_schedule() -> None:
    g = torch.Generator().manual_seed(1)
    seq, attn = torch.randn(1, 30, 8, generator=g), torch.rand(1, 4, 30, generator=g)
    hidden, idx = holitom_llm_merge(seq, attn, 5, 20, 0.3)
    keep = llm_keep_count(20, 0.3)
    want_idx, want = ref_llm(seq[0, 5:25], attn[0].mean(0)[5:25], keep)
    assert idx[0].tolist() == [*range(5), *(i + 5 for i in want_idx), *range(25, 30)]
    torch.testing.assert_close(hidden[0, 5:5 + keep].double(), want, atol=1e-6, rtol=1e-6)
    assert torch.equal(hidden[0, :5], seq[0, :5]) and torch.equal(hidden[0, 5 + keep:], seq[0, 25:])
    with pytest.raises(ValueError, match="merge_ratio"):
        holitom_llm_merge(seq, attn, 5, 20, 1.0)
    info = vtoken.get_method("holitom_llm")
    assert info.schedule is not None
    assert info.schedule.plan_layers(28, dict(info.defaults)) == [18]
    assert info.schedule.plan_layers(4, dict(info.defaults)) == [3]
    assert info.schedule.plan_layers(28, {**info.defaults, "layer": 3}) == [3]
