"""FastVID (``vtoken.methods.fastvid``) against a loop-based reference written from the paper and the parity
manifest's algorithm (DySeg cuts, per-frame salient tokens, DPC-kNN density scores, anchor-frame merging), on small
random clips of a few scenes; batches of padded clips, budgets, errors, dtypes and knob effects."""

from __future__ import annotations

import math

import pytest
import torch

import vtoken
from vtoken.methods.fastvid import official_keep, smallest_frame_budget

# ---------------------------------------------------------------------------------------------------- reference


def reference(x: torch.Tensor, attn: torch.Tensor, ff: torch.Tensor, p: int, keep: int, segments: int = 8,
              tau: float = 0.9, d: float = 0.4, step: int = 4, beta: float = 0.6) -> dict:
    """One clip, loop by loop: ``x [F * P, D]``, ``attn [F * P]``, ``ff [F, G]``; float64 arithmetic."""
    x, attn, ff = x.double(), attn.double(), ff.double()
    f_num, dim = ff.shape[0], x.shape[1]
    r = keep // f_num
    c = int(r * d)
    s = r - c
    g = [ff[t] / ff[t].norm() for t in range(f_num)]
    sim = [float(g[t] @ g[t + 1]) for t in range(f_num - 1)]
    low = sorted(range(f_num - 1), key=lambda t: (sim[t], t))[:min(segments - 1, f_num - 1)]
    cuts = sorted(set(low) | {t for t in range(f_num - 1) if sim[t] < tau})
    bounds = [-1, *cuts, f_num - 1]
    sizes = [bounds[i + 1] - bounds[i] for i in range(len(bounds) - 1)]
    seg_of, ctx, o = [], [0] * f_num, 0
    for si, length in enumerate(sizes):
        n_anchor = -(-length // step)
        for i in range(length):
            seg_of.append(si)
            if (length - 1 - i) % step == 0:
                ctx[o + i] = (c * length) // n_anchor
        o += length

    out: dict[int, tuple[torch.Tensor, int]] = {}
    cands, scores, salients = [], [], []
    for f in range(f_num):
        a = attn[f * p:(f + 1) * p]
        sal = sorted(range(p), key=lambda j: (-float(a[j]), j))[:s]
        salients.append(sal)
        for j in sal:
            out[f * p + j] = (x[f * p + j], 1)
        cs = sorted(set(range(p)) - set(sal))
        cands.append(cs)
        pts = [x[f * p + j] for j in cs]
        m = len(pts)
        dist = [[float((pts[i] - pts[j]).norm()) / math.sqrt(dim) for j in range(m)] for i in range(m)]
        kk = min(4, m)
        rho = [math.exp(-sum(sorted(v * v for v in dist[i])[:kk]) / kk) for i in range(m)]
        top = max(max(row) for row in dist)
        score = []
        for i in range(m):
            higher = [j for j in range(m) if rho[j] > rho[i] or (rho[j] == rho[i] and j < i)]
            delta = min(dist[i][j] for j in higher) if higher else top
            score.append(rho[i] * delta)
        scores.append(score)
    for f in range(f_num):
        k = min(ctx[f], len(cands[f]))
        if k == 0:
            continue
        order = sorted(range(len(cands[f])), key=lambda i: (-scores[f][i], i))[:k]
        anchors = [x[f * p + cands[f][i]] for i in order]
        pool = [f] if ctx[f] == c else [h for h in range(f_num) if seg_of[h] == seg_of[f]]
        members: list[list[torch.Tensor]] = [[] for _ in range(k)]
        for h in pool:
            for j in cands[h]:
                v = x[h * p + j]
                cos = [float(v @ an) / float(v.norm() * an.norm()) for an in anchors]
                best = max(range(k), key=lambda q: (cos[q], -q))
                members[best].append(v)
        for q, i in enumerate(order):
            n = len(members[q])
            w = max(1.0 / (n + 1), beta)
            mean = torch.stack(members[q]).sum(0) / max(n, 1)
            out[f * p + cands[f][i]] = (w * anchors[q] + (1 - w) * mean, n)
    pos = sorted(out)
    return {"indices": pos, "tokens": torch.stack([out[i][0] for i in pos]), "sizes": [out[i][1] for i in pos],
            "cuts": cuts, "segment_sizes": sizes, "context": ctx, "salient": salients,
            "scores": scores}


def clip(frames: int, p: int, dim: int, scenes: list[int], seed: int, dtype=torch.float64):
    """``(tokens [1, F * P, D], cls_attn [1, N], frame_features [1, F, G])``: frames of a few scenes."""
    g = torch.Generator().manual_seed(seed)
    n_scene = max(scenes) + 1
    base = torch.randn(n_scene, p, dim, generator=g, dtype=torch.float64) * 2
    x = base[scenes] + 0.6 * torch.randn(frames, p, dim, generator=g, dtype=torch.float64)
    centres = torch.randn(n_scene, 16, generator=g, dtype=torch.float64)
    ff = centres[scenes] + 0.05 * torch.randn(frames, 16, generator=g, dtype=torch.float64)
    attn = torch.rand(frames * p, generator=g, dtype=torch.float64)
    return x.reshape(1, frames * p, dim).to(dtype), attn[None], ff[None]


SCENES = [0, 0, 0, 0, 0, 1, 1, 2, 2, 2, 2, 2, 2, 0]


def run(x, attn, ff, grid, keep, **knobs):
    return vtoken.reduce(x, keep, "fastvid", video_grid=grid, cls_attn=attn, frame_features=ff, **knobs)


# ----------------------------------------------------------------------------------------------------- parity


@pytest.mark.parametrize(("knobs", "ratio"), [
    ({}, 0.25),
    ({"segments": 2, "cut_threshold": 0.5}, 0.25),
    ({"segments": 1, "cut_threshold": -1.0, "anchor_step": 3, "merge_beta": 0.3}, 0.3),
    ({"segments": 3, "cut_threshold": 0.5, "anchor_step": 2, "context_ratio": 0.3}, 0.2),
    ({"segments": 4, "cut_threshold": 0.5, "anchor_step": 1}, 0.25),
    ({"segments": 2, "cut_threshold": 0.5, "context_ratio": 1.0, "merge_beta": 0.0}, 0.25),
])
@pytest.mark.parametrize("seed", [0, 1])
def test_matches_the_loop_reference(knobs, ratio, seed):
    frames, h, w, dim = len(SCENES), 4, 5, 6
    p = h * w
    x, attn, ff = clip(frames, p, dim, SCENES, seed)
    keep = official_keep(frames, p, ratio)
    red = run(x, attn, ff, (frames, h, w), keep, **knobs)
    names = {"segments": "segments", "cut_threshold": "tau", "context_ratio": "d", "anchor_step": "step",
             "merge_beta": "beta"}
    ref = reference(x[0], attn[0], ff[0], p, keep, **{names[k]: v for k, v in knobs.items()})
    ex = red.extras
    assert red.indices[0][red.mask[0]].tolist() == ref["indices"]
    torch.testing.assert_close(red.tokens[0][red.mask[0]], ref["tokens"], atol=1e-10, rtol=1e-10)
    assert red.sizes[0][red.mask[0]].tolist() == ref["sizes"]
    assert ex["cut_indices"][0][ex["cut_indices"][0] >= 0].tolist() == ref["cuts"]
    assert ex["segment_sizes"][0][ex["segment_sizes"][0] > 0].tolist() == ref["segment_sizes"]
    assert ex["context_counts"][0].tolist() == ref["context"]
    assert ex["salient_indices"][0].tolist() == ref["salient"]
    got = ex["density_score"][0]
    torch.testing.assert_close(got, torch.tensor(ref["scores"], dtype=got.dtype), atol=1e-10, rtol=1e-10)
    assert int(red.counts[0]) <= keep
    assert ex["frame_counts"][0].sum() == red.counts[0]


def test_multi_frame_segments_share_anchor_frames():
    frames, p, dim = len(SCENES), 20, 6
    x, attn, ff = clip(frames, p, dim, SCENES, 3)
    red = run(x, attn, ff, (frames, 4, 5), official_keep(frames, p, 0.25), segments=2, cut_threshold=0.5)
    ex = red.extras
    assert ex["segment_sizes"][0].tolist() == [5, 2, 6, 1]          # the scenes
    c = int(ex["context_count"][0])
    # a 5-frame segment at stride 4: frames 0 and 4 are its anchor frames with (5 C) // 2 tokens each
    assert ex["context_counts"][0, :5].tolist() == [(5 * c) // 2, 0, 0, 0, (5 * c) // 2]
    assert ex["context_counts"][0, 5:7].tolist() == [0, (2 * c) // 1]
    assert ex["context_counts"][0, 13].item() == c
    # every context token of a multi-frame anchor frame is a merge over the segment's frames
    assert float(red.sizes[0][red.mask[0]].sum()) > int(red.counts[0])


# ---------------------------------------------------------------------------------------------------- batching


def test_a_batch_of_padded_clips_equals_each_clip_alone():
    h, w, dim = 4, 5, 6
    p = h * w
    lengths = [len(SCENES), 9, 5]
    t = max(lengths)
    xs, attns, ffs = [], [], []
    for i, f in enumerate(lengths):
        x, a, ff = clip(f, p, dim, SCENES[:f], 10 + i, torch.float32)
        pad = t - f
        xs.append(torch.cat([x, torch.randn(1, pad * p, dim)], 1))
        attns.append(torch.cat([a.float(), torch.rand(1, pad * p)], 1))
        ffs.append(torch.cat([ff.float(), torch.randn(1, pad, 16)], 1))
    x, attn, ff = torch.cat(xs), torch.cat(attns), torch.cat(ffs)
    mask = (torch.arange(t)[None, :] < torch.tensor(lengths)[:, None]).repeat_interleave(p, 1)
    knobs = {"segments": 3, "cut_threshold": 0.5}
    red = vtoken.reduce(x, 0.3, "fastvid", mask=mask, video_grid=(t, h, w), cls_attn=attn, frame_features=ff,
                        **knobs)
    for i, f in enumerate(lengths):
        one = run(x[i:i + 1, :f * p], attn[i:i + 1, :f * p], ff[i:i + 1, :f], (f, h, w), 0.3, **knobs)
        k = int(one.counts[0])
        assert int(red.counts[i]) == k
        assert red.indices[i, :k].tolist() == one.indices[0].tolist()
        torch.testing.assert_close(red.tokens[i, :k], one.tokens[0], atol=1e-5, rtol=1e-5)
        assert red.extras["frame_counts"][i, :f].tolist() == one.extras["frame_counts"][0].tolist()
        assert red.extras["frame_counts"][i, f:].sum() == 0
        keep = int(torch.floor(torch.tensor(f * p * 0.3) + 0.5))
        ref = reference(x[i, :f * p], attn[i, :f * p], ff[i, :f], p, keep, segments=3, tau=0.5)
        assert one.indices[0].tolist() == ref["indices"]


# ------------------------------------------------------------------------------------------------ budgets, errors


def test_official_keep_and_the_frame_budget():
    assert official_keep(32, 196) == 32 * 19
    assert official_keep(16, 196, 0.25) == 16 * 49
    assert official_keep(8, 144, 0.15) == 8 * 21
    assert smallest_frame_budget(0.4, 196) == 3 and smallest_frame_budget(1.0, 4) == 1
    assert smallest_frame_budget(0.3, 196) == 4 and smallest_frame_budget(0.4, 2) is None
    for bad in ({"frames": 0}, {"tokens_per_frame": 2.5}, {"retention_ratio": 0.0}, {"retention_ratio": 1.5}):
        args = {"frames": 4, "tokens_per_frame": 16, "retention_ratio": 0.1, **bad}
        with pytest.raises(ValueError, match=next(iter(bad))):
            official_keep(**args)
    # the frame budget is keep // frames: extra tokens below a whole frame budget are not used
    x, attn, ff = clip(6, 16, 4, [0, 0, 1, 1, 1, 2], 0)
    a = run(x, attn, ff, (6, 4, 4), 6 * 5)
    b = run(x, attn, ff, (6, 4, 4), 6 * 5 + 5)
    assert torch.equal(a.indices, b.indices) and a.extras["frame_budget"].item() == 5


def test_budget_floor_and_errors():
    x, attn, ff = clip(6, 16, 4, [0, 0, 1, 1, 1, 2], 0)
    grid = (6, 4, 4)
    with pytest.raises(ValueError, match=r"keep resolves to 17 tokens.*pass keep >= 18 \(3 tokens a frame"):
        run(x, attn, ff, grid, 17)
    red = run(x, attn, ff, grid, 18)                                       # 2 salient + 1 context a frame
    assert red.extras["salient_count"].item() == 2 and red.extras["context_count"].item() == 1
    with pytest.raises(ValueError, match="keep"):
        run(x, attn, ff, grid, 0.05)
    x2, attn2, ff2 = clip(4, 2, 4, [0, 0, 1, 1], 0)
    with pytest.raises(ValueError, match=r"context_ratio.*no keep works"):
        run(x2, attn2, ff2, (4, 1, 2), 4)
    with pytest.raises(ValueError, match="frame_features must hold one embedding per frame"):
        run(x, attn, ff[:, :5], grid, 30)
    with pytest.raises(ValueError, match="needs the signal 'frame_features'"):
        vtoken.reduce(x, 30, "fastvid", video_grid=grid, cls_attn=attn)
    for knob, value in (("segments", 0), ("context_ratio", 0.0), ("anchor_step", 0), ("merge_beta", 1.5),
                        ("cut_threshold", 2.0)):
        with pytest.raises(ValueError, match=knob):
            run(x, attn, ff, grid, 30, **{knob: value})
    with pytest.raises(TypeError, match="segments"):
        run(x, attn, ff, grid, 30, segments=2.5)


def test_anchor_budget_beyond_the_candidates_is_clamped():
    """K = (C L) // ceil(L / p) can exceed a frame's P - S candidates at large budgets (the official code fails):
    the anchor frame then takes all its candidates as anchors."""
    frames, p = 4, 16
    x, attn, ff = clip(frames, p, 4, [0, 0, 0, 0], 2)
    red = run(x, attn, ff, (frames, 4, 4), frames * 12, segments=1, cut_threshold=-1.0)
    ex = red.extras
    c, s = int(ex["context_count"][0]), int(ex["salient_count"][0])
    assert ex["context_counts"][0].tolist() == [0, 0, 0, 4 * c] and 4 * c > p - s
    assert ex["frame_counts"][0].tolist() == [s, s, s, p]
    ref = reference(x[0], attn[0], ff[0], p, frames * 12, segments=1, tau=-1.0)
    assert red.indices[0].tolist() == ref["indices"]


def test_short_clips_cut_every_transition():
    x, attn, ff = clip(3, 16, 4, [0, 0, 0], 0)
    red = run(x, attn, ff, (3, 4, 4), 0.25)                               # segments = 8 > 3 frames
    assert red.extras["segment_sizes"][0].tolist() == [1, 1, 1]
    one, a1, f1 = x[:, :16], attn[:, :16], ff[:, :1]
    red = run(one, a1, f1, (1, 4, 4), 4)
    assert red.extras["segment_sizes"][0].tolist() == [1] and red.extras["cut_indices"].shape == (1, 0)


# ------------------------------------------------------------------------------------------------- dtypes, knobs


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_dtypes(dtype):
    x, attn, ff = clip(len(SCENES), 20, 6, SCENES, 4, dtype)
    red = run(x, attn, ff, (len(SCENES), 4, 5), 0.25, segments=2, cut_threshold=0.5)
    assert red.tokens.dtype == dtype and bool(torch.isfinite(red.tokens.float()).all())
    ref = run(x.float() if dtype != torch.float64 else x, attn, ff, (len(SCENES), 4, 5), 0.25, segments=2,
              cut_threshold=0.5)
    assert torch.equal(red.indices, ref.indices)
    torch.testing.assert_close(red.tokens.float(), ref.tokens.float(), atol=1e-2, rtol=1e-2)
    # salient tokens are exact copies in every dtype
    sal = red.extras["salient_indices"][0] + torch.arange(len(SCENES))[:, None] * 20
    keep = torch.isin(red.indices[0], sal.flatten())
    assert torch.equal(red.tokens[0][keep], x[0][red.indices[0][keep]])


def test_knob_effects():
    frames, h, w = len(SCENES), 4, 5
    p = h * w
    x, attn, ff = clip(frames, p, 6, SCENES, 5)
    grid, keep = (frames, h, w), official_keep(frames, p, 0.25)
    every = run(x, attn, ff, grid, keep, cut_threshold=1.0)
    assert every.extras["segment_sizes"][0].tolist() == [1] * frames
    one = run(x, attn, ff, grid, keep, segments=1, cut_threshold=-1.0)
    assert one.extras["segment_sizes"][0].tolist() == [frames]
    c = int(one.extras["context_count"][0])
    step1 = run(x, attn, ff, grid, keep, segments=1, cut_threshold=-1.0, anchor_step=1)
    assert step1.extras["context_counts"][0].tolist() == [c] * frames
    assert int(step1.counts[0]) == keep                                   # every frame keeps its whole budget
    # merge_beta = 1: a context token is its anchor unchanged
    raw = run(x, attn, ff, grid, keep, merge_beta=1.0)
    assert torch.equal(raw.tokens[0][raw.mask[0]], x[0][raw.indices[0][raw.mask[0]]])
    assert not torch.equal(every.tokens[0][every.mask[0]], x[0][every.indices[0][every.mask[0]]])
    # context_ratio = 1: no salient tokens, the attention is unused
    ctx = run(x, attn, ff, grid, keep, context_ratio=1.0)
    assert ctx.extras["salient_indices"].shape[-1] == 0
    other = run(x, torch.rand_like(attn), ff, grid, keep, context_ratio=1.0)
    assert torch.equal(ctx.indices, other.indices) and torch.equal(ctx.tokens, other.tokens)
    # a larger context share keeps fewer salient tokens
    assert int(run(x, attn, ff, grid, keep, context_ratio=0.8).extras["salient_count"][0]) < \
        int(every.extras["salient_count"][0])


def test_duplicate_tokens_are_deterministic():
    """Exact density ties (duplicated tokens) resolve to the lower position, with no randomness."""
    frames, p = 4, 16
    x, attn, ff = clip(frames, p, 4, [0, 0, 1, 1], 6)
    x = x.reshape(frames, p, 4)
    x[:, 8:] = x[:, :8]
    x = x.reshape(1, frames * p, 4)
    a = run(x, attn, ff, (frames, 4, 4), 0.5)
    b = run(x.clone(), attn, ff, (frames, 4, 4), 0.5)
    assert torch.equal(a.indices, b.indices) and torch.equal(a.tokens, b.tokens)
    ref = reference(x[0], attn[0], ff[0], p, int(frames * p * 0.5))
    assert a.indices[0].tolist() == ref["indices"]
