"""Behaviour of ``sttm`` (quadtree spatial merging, then directed temporal merging) against a loop reference written
from the paper and the fixture manifest's algorithm, on small random clips; the keep cap, batching and errors."""

from __future__ import annotations

import math

import pytest
import torch

import vtoken

# ---------------------------------------------------------------------------------------------------------------
# a reference with Python loops: one clip [T, H, W, C], node by node
# ---------------------------------------------------------------------------------------------------------------


def ref_levels(h: int, w: int, root_level: int) -> list[tuple[int, int]]:
    sizes = [(h, w)]
    while sizes[0][0] != 2 and sizes[0][1] != 2:
        sizes.insert(0, (math.ceil(sizes[0][0] / 2), math.ceil(sizes[0][1] / 2)))
    root_w = sizes[root_level][1]
    levels = [(h, w)]
    while levels[0][1] != root_w:
        levels.insert(0, (math.ceil(levels[0][0] / 2), math.ceil(levels[0][1] / 2)))
    return levels


def children_1d(i: int, n_child: int) -> list[int | None]:
    """The two child rows of parent row ``i`` (``None`` = the missing slot of an odd side's singleton)."""
    if n_child % 2 == 0:
        return [2 * i, 2 * i + 1]
    return [None, 0] if i == 0 else [2 * i - 1, 2 * i]


def cos(a: torch.Tensor, b: torch.Tensor, head_dim: int | None) -> float:
    if head_dim is None:
        return float(torch.nn.functional.cosine_similarity(a, b, dim=0))
    sims = [float(torch.nn.functional.cosine_similarity(a[k:k + head_dim], b[k:k + head_dim], dim=0))
            for k in range(0, a.numel(), head_dim)]
    return sum(sims) / len(sims)


def unit_sim(a: torch.Tensor, b: torch.Tensor, head_dim: int | None) -> float:
    step = a.numel() if head_dim is None else head_dim
    sims = []
    for k in range(0, a.numel(), step):
        x, y = a[k:k + step], b[k:k + step]
        sims.append(float(((x / (x.norm() + 1e-8)) * (y / (y.norm() + 1e-8))).sum()))
    return sum(sims) / len(sims)


def reference(video: torch.Tensor, threshold: float, temporal_thresh: float, root_level: int = 1,
              weighted_avg: bool = False, slow_ver: bool = False, head_dim: int | None = None) -> dict:
    t, h, w, c = video.shape
    levels = ref_levels(h, w, root_level)
    nl = len(levels)
    # pyramid, box of every node, frame by frame
    feats = [None] * nl
    boxes = [None] * nl
    feats[-1] = video
    boxes[-1] = {(y, x): (y, x, y + 1, x + 1) for y in range(h) for x in range(w)}
    kids = [None] * nl
    for lv in range(nl - 2, -1, -1):
        (hp, wp), (hc, wc) = levels[lv], levels[lv + 1]
        f = torch.zeros(t, hp, wp, c, dtype=video.dtype)
        boxes[lv], kids[lv] = {}, {}
        for i in range(hp):
            for j in range(wp):
                slots = [(a, b) for a in children_1d(i, hc) for b in children_1d(j, wc)]
                valid = [(a, b) for a, b in slots if a is not None and b is not None]
                kids[lv][i, j] = (slots, valid)
                s = sum(feats[lv + 1][:, a, b] for a, b in valid)
                f[:, i, j] = s if weighted_avg else s / len(valid)
                bs = [boxes[lv + 1][v] for v in valid]
                boxes[lv][i, j] = (min(q[0] for q in bs), min(q[1] for q in bs), max(q[2] for q in bs),
                                   max(q[3] for q in bs))
        feats[lv] = f

    nodes = []  # (t, top, left, bottom, right, feature)

    def visit(fr: int, lv: int, i: int, j: int) -> None:
        if lv == nl - 1:
            nodes.append((fr, *boxes[lv][i, j], feats[lv][fr, i, j]))
            return
        slots, valid = kids[lv][i, j]
        sims = [cos(feats[lv][fr, i, j], feats[lv + 1][fr, a if a is not None and b is not None else 0,
                                                          b if a is not None and b is not None else 0], head_dim)
                for a, b in slots]
        if min(sims) >= threshold:
            nodes.append((fr, *boxes[lv][i, j], feats[lv][fr, i, j]))
        else:
            for a, b in valid:
                visit(fr, lv + 1, a, b)

    for fr in range(t):
        for i in range(levels[0][0]):
            for j in range(levels[0][1]):
                visit(fr, 0, i, j)
    nodes.sort(key=lambda q: q[0] * h * w + q[1] * w + q[2])
    tokens = [q[0] * h * w + q[1] * w + q[2] for q in nodes]
    npatch = [(q[3] - q[1]) * (q[4] - q[2]) for q in nodes]
    m = len(nodes)

    pairs = []
    if temporal_thresh > 0:
        for fr in range(t - 1):
            cur = [k for k in range(m) if nodes[k][0] == fr]
            nxt = [k for k in range(m) if nodes[k][0] == fr + 1]
            found = []
            for i in cur:
                for j in nxt:
                    a, b = nodes[i][1:5], nodes[j][1:5]
                    inside = (a[0] <= b[0] and a[1] <= b[1] and a[2] >= b[2] and a[3] >= b[3]) or \
                             (a[0] >= b[0] and a[1] >= b[1] and a[2] <= b[2] and a[3] <= b[3])
                    if inside:
                        s = unit_sim(nodes[i][5], nodes[j][5], None if slow_ver else head_dim)
                        if s >= temporal_thresh:
                            found.append((s, i, j))
            if slow_ver:
                found.sort(key=lambda q: -q[0])
                found = [q for n, q in enumerate(found) if n == 0 or q[2] != found[n - 1][2]]
            pairs += [(i, j) for _, i, j in found]
        # the official iteration (not connected components)
        rep = list(range(m))
        while True:
            mins = [min(rep[i], rep[j]) for i, j in pairs]
            new = list(rep)
            for (i, _), v in zip(pairs, mins, strict=True):
                new[i] = min(new[i], v)
            for (_, j), v in zip(pairs, mins, strict=True):
                new[j] = min(new[j], v)
            rep = [new[new[k]] for k in range(m)]
            if all(rep[k] == rep[rep[k]] for k in range(m)):
                break
    else:
        rep = list(range(m))
    out = []
    for r in range(m):
        members = [k for k in range(m) if rep[k] == r]
        if not members:
            continue
        total = sum(nodes[k][5] for k in members)
        patches = sum(npatch[k] for k in members)
        feat = total / (patches if weighted_avg else len(members))
        out.append({"token": tokens[r], "feature": feat, "patches": patches, "tlbr": (nodes[r][0], *nodes[r][1:5]),
                    "members": [tokens[k] for k in members]})
    return {"out": out, "spatial": tokens, "npatch": npatch, "rep": [tokens[r] for r in rep],
            "pairs": sorted((tokens[i], tokens[j]) for i, j in pairs)}


def clip(t: int, h: int, w: int, d: int, seed: int, cut: int | None = None) -> torch.Tensor:
    """``[t, h, w, d]`` float64: smooth regions (so the quadtree merges), a slow pan and noise; a scene change at
    frame ``cut``."""
    g = torch.Generator().manual_seed(seed)
    scenes = torch.randn(2, 3, 3, d, generator=g, dtype=torch.float64) * 2
    frames = []
    for i in range(t):
        base = scenes[1 if cut is not None and i >= cut else 0]
        up = torch.nn.functional.interpolate(base.permute(2, 0, 1)[None], size=(h, w + 2), mode="nearest")[0]
        up = up[:, :, (i // 2) % 3:(i // 2) % 3 + w].permute(1, 2, 0)
        frames.append(up + 0.35 * torch.randn(h, w, d, generator=g, dtype=torch.float64))
    return torch.stack(frames)


def run(video: torch.Tensor, keep: int | float | None = None, **knobs) -> vtoken.Reduction:
    t, h, w, d = video.shape
    tokens = video.reshape(1, t * h * w, d)
    return vtoken.reduce(tokens, tokens.shape[1] - 1 if keep is None else keep, "sttm", video_grid=(t, h, w),
                         **knobs)


CONFIGS = [
    # (t, h, w, d, seed, cut, knobs)
    ((4, 6, 6, 16), 0, None, {"threshold": 0.8, "temporal_thresh": 0.6}),
    ((5, 7, 7, 16), 1, 3, {"threshold": 0.75, "temporal_thresh": 0.5}),
    ((3, 5, 8, 12), 2, None, {"threshold": 0.7, "temporal_thresh": 0.55, "root_level": 0}),
    ((4, 9, 6, 16), 3, 2, {"threshold": 0.8, "temporal_thresh": 0.6, "slow_ver": True}),
    ((4, 6, 6, 16), 4, None, {"threshold": 0.6, "temporal_thresh": 0.5, "weighted_avg": True}),
    ((3, 7, 5, 16), 5, None, {"threshold": 0.7, "temporal_thresh": 0.5, "head_dim": 4}),
    ((3, 7, 7, 16), 6, None, {"threshold": 0.7, "temporal_thresh": 0.5, "weighted_avg": True, "head_dim": 8}),
    ((4, 5, 5, 8), 7, None, {"threshold": 0.7, "temporal_thresh": -1.0}),
    ((4, 4, 6, 8), 8, 2, {"threshold": 0.9, "temporal_thresh": 0.5, "root_level": -1}),
    ((6, 6, 6, 16), 9, 4, {"threshold": 0.75, "temporal_thresh": 0.45, "slow_ver": True, "head_dim": 4}),
]


@pytest.mark.parametrize(("shape", "seed", "cut", "knobs"), CONFIGS)
def test_matches_loop_reference(shape, seed, cut, knobs):
    t, h, w, d = shape
    video = clip(t, h, w, d, seed, cut)
    ref = reference(video, **knobs)
    red = run(video, **knobs)
    out = ref["out"]
    assert len(out) < t * h * w, "the case merges nothing; pick another"
    assert red.indices[0].tolist() == [o["token"] for o in out]
    assert red.extras["order"][0].tolist() == [o["token"] for o in out]
    torch.testing.assert_close(red.tokens[0], torch.stack([o["feature"] for o in out]), atol=1e-10, rtol=1e-10)
    assert red.sizes[0].tolist() == [float(o["patches"]) for o in out]
    assert red.extras["num_patches"][0].tolist() == [o["patches"] for o in out]
    assert [tuple(r) for r in red.extras["tlbr"][0].tolist()] == [o["tlbr"] for o in out]
    s = len(ref["spatial"])
    assert red.extras["spatial_tokens"][0, :s].tolist() == ref["spatial"]
    assert red.extras["spatial_num_patches"][0, :s].tolist() == ref["npatch"]
    assert red.extras["final_representative"][0, :s].tolist() == ref["rep"]
    pairs = red.extras["merge_pairs"][0]
    assert sorted(map(tuple, pairs[pairs[:, 0] >= 0].tolist())) == ref["pairs"]
    # assign: every input token goes to the output whose group holds its node
    slot_of = {o["token"]: k for k, o in enumerate(out)}
    node_of = {}
    for o in out:
        for tok in o["members"]:
            node_of[tok] = o["token"]
    box = red.extras["spatial_tlbr"][0, :s].tolist()
    want = [0] * (t * h * w)
    for (fr, top, left, bottom, right), tok in zip(box, ref["spatial"], strict=True):
        for y in range(top, bottom):
            for x in range(left, right):
                want[fr * h * w + y * w + x] = slot_of[node_of[tok]]
    assert red.assign[0].tolist() == want
    frames = torch.tensor([o["tlbr"][0] for o in out])
    assert red.extras["frame_counts"][0].tolist() == torch.bincount(frames, minlength=t).tolist()


def test_some_configs_merge_across_frames_and_stop_early():
    """The reference cases exercise temporal groups of several frames (the union-find's chains)."""
    video = clip(6, 6, 6, 16, 9, 4)
    ref = reference(video, 0.75, 0.45, slow_ver=True, head_dim=4)
    assert max(len({m // 36 for m in o["members"]}) for o in ref["out"]) >= 3


def cap_reference(red: vtoken.Reduction, keep: int, head_dim: int | None = None) -> tuple[list[int], dict]:
    """The cap rule on the uncapped tokens: the keep covering most patches stay (ties to the lower index), every
    other joins the staying token most similar to it."""
    idx = red.indices[0].tolist()
    sizes = red.sizes[0].tolist()
    order = sorted(range(len(idx)), key=lambda k: (-sizes[k], idx[k]))
    stay = sorted(order[:keep])
    dest = {}
    for k in range(len(idx)):
        if k in stay:
            dest[idx[k]] = idx[k]
            continue
        sims = [unit_sim(red.tokens[0, k], red.tokens[0, s], head_dim) for s in stay]
        dest[idx[k]] = idx[stay[max(range(len(stay)), key=lambda q: (sims[q], -q))]]
    return [idx[s] for s in stay], dest


@pytest.mark.parametrize(("shape", "seed", "knobs", "keep"), [
    ((4, 6, 6, 16), 0, {"threshold": 0.8, "temporal_thresh": 0.6}, 20),
    ((4, 6, 6, 16), 4, {"threshold": 0.6, "temporal_thresh": 0.5, "weighted_avg": True}, 9),
    ((3, 7, 5, 16), 5, {"threshold": 0.7, "temporal_thresh": 0.5, "head_dim": 4}, 1),
])
def test_keep_caps_the_count(shape, seed, knobs, keep):
    t, h, w, d = shape
    video = clip(t, h, w, d, seed)
    free = run(video, **knobs)
    n_free = int(free.mask.sum())
    assert n_free > keep
    red = run(video, keep, **knobs)
    assert int(red.mask.sum()) == keep
    assert bool(red.extras["capped"][0]) and int(red.extras["threshold_counts"][0]) == n_free
    stay, dest = cap_reference(free, keep, knobs.get("head_dim"))
    assert red.indices[0].tolist() == stay
    # every patch is still covered once; the features follow the same aggregation over the merged groups
    assert float(red.sizes.sum()) == t * h * w
    assert torch.bincount(red.assign[0], minlength=keep).tolist() == red.sizes[0].long().tolist()
    ref = reference(video, **knobs)
    groups: dict[int, list[int]] = {}
    for o in ref["out"]:
        groups.setdefault(dest[o["token"]], []).extend(o["members"])
    flat = video.reshape(t * h * w, d)
    spatial = red.extras["spatial_tokens"][0]
    feats = {}
    for tok, (fr, top, left, bottom, right) in zip(spatial[spatial >= 0].tolist(),
                                                    red.extras["spatial_tlbr"][0].tolist(), strict=False):
        cells = [fr * h * w + y * w + x for y in range(top, bottom) for x in range(left, right)]
        feats[tok] = (flat[cells].sum(0), len(cells))
    for k, r in enumerate(stay):
        members = groups[r]
        if knobs.get("weighted_avg"):
            want = sum(feats[m][0] for m in members) / sum(feats[m][1] for m in members)
        else:  # one pooling step in these grids: a node's feature is the mean of its cells
            want = sum(feats[m][0] / feats[m][1] for m in members) / len(members)
        torch.testing.assert_close(red.tokens[0, k], want, atol=1e-10, rtol=1e-10)
        assert red.sizes[0, k] == sum(feats[m][1] for m in members)
    assert int(red.extras["frame_counts"].sum()) == keep


def test_over_budget_error_names_keep():
    video = clip(4, 6, 6, 16, 0)
    n_free = int(run(video, threshold=0.8, temporal_thresh=0.6).mask.sum())
    with pytest.raises(ValueError, match=rf"keep = 20 .*keep >= {n_free}"):
        run(video, 20, threshold=0.8, temporal_thresh=0.6, over_budget="error")
    red = run(video, n_free, threshold=0.8, temporal_thresh=0.6, over_budget="error")
    assert int(red.mask.sum()) == n_free and not bool(red.extras["capped"][0])


def test_batch_of_different_lengths_equals_each_clip_alone():
    t, h, w, d = 5, 6, 6, 16
    clips = [clip(t, h, w, d, 10 + i, cut=2) for i in range(3)]
    lengths = [5, 3, 1]
    tokens = torch.zeros(3, t * h * w, d, dtype=torch.float64)
    mask = torch.zeros(3, t * h * w, dtype=torch.bool)
    for i, (v, f) in enumerate(zip(clips, lengths, strict=True)):
        tokens[i, :f * h * w] = v[:f].reshape(-1, d)
        tokens[i, f * h * w:] = torch.randn(((t - f) * h * w, d), dtype=torch.float64)  # padding: any values
        mask[i, :f * h * w] = True
    knobs = {"threshold": 0.8, "temporal_thresh": 0.55}
    capped = []
    for keep in (0.99, 37, 20):
        batch = vtoken.reduce(tokens, keep, "sttm", mask=mask, video_grid=(t, h, w), **knobs)
        for i, f in enumerate(lengths):
            alone = vtoken.reduce(tokens[i:i + 1, :f * h * w], keep, "sttm", video_grid=(f, h, w), **knobs)
            k = int(alone.mask.sum())
            assert int(batch.mask[i].sum()) == k
            assert batch.indices[i, :k].tolist() == alone.indices[0].tolist()
            torch.testing.assert_close(batch.tokens[i, :k], alone.tokens[0], atol=1e-12, rtol=1e-12)
            if alone.sizes is None:  # the budget covers the clip: vtoken's identity, and the same in the batch
                assert k == f * h * w and (batch.sizes[i, :k] == 1).all()
                assert batch.assign[i, :k].tolist() == list(range(k))
                continue
            assert batch.sizes[i, :k].tolist() == alone.sizes[0].tolist()
            assert batch.assign[i, :f * h * w].tolist() == alone.assign[0].tolist()
            assert (batch.assign[i, f * h * w:] == -1).all()
            assert batch.extras["frame_counts"][i, :f].tolist() == alone.extras["frame_counts"][0].tolist()
            assert (batch.extras["frame_counts"][i, f:] == 0).all()
            s = int((alone.extras["spatial_tokens"][0] >= 0).sum())
            for key in ("final_representative", "spatial_tokens"):
                assert batch.extras[key][i, :s].tolist() == alone.extras[key][0, :s].tolist()
            assert batch.extras["capped"][i] == alone.extras["capped"][0]
            capped.append(bool(alone.extras["capped"][0]))
            if isinstance(keep, int):
                assert k <= keep
    assert any(capped) and not all(capped), "the batch should mix capped and uncapped clips"


def test_budget_and_dtypes():
    video = clip(4, 6, 6, 16, 3)
    for dtype in (torch.float32, torch.bfloat16):
        red = run(video.to(dtype), 30, threshold=0.8, temporal_thresh=0.6)
        assert red.tokens.dtype == dtype
        assert int(red.mask.sum()) <= 30
        assert float(red.sizes.sum()) == 4 * 36
    ratio = run(video, 0.2, threshold=0.8, temporal_thresh=0.6)
    assert int(ratio.mask.sum()) <= round(0.2 * 4 * 36)


def test_temporal_off_keeps_every_frame_apart():
    video = clip(4, 6, 6, 16, 2)
    red = run(video, threshold=0.7, temporal_thresh=0.0)
    assert red.extras["merge_pairs"].shape[1] == 0
    assert red.extras["final_representative"][0].tolist() == red.extras["spatial_tokens"][0].tolist()
    assert int(red.mask.sum()) == int((red.extras["spatial_tokens"] >= 0).sum())


def test_level_sizes_quirks():
    from vtoken.methods.sttm import level_sizes
    assert level_sizes(12, 16, 1) == [(3, 4), (6, 8), (12, 16)]
    assert level_sizes(9, 16, 0) == [(2, 2), (3, 4), (5, 8), (9, 16)]
    assert level_sizes(14, 14, 1) == [(4, 4), (7, 7), (14, 14)]
    assert level_sizes(14, 14, -1) == [(14, 14)]
    assert level_sizes(1, 1, 0) == [(1, 1)]
    # a root level past a small grid's pyramid is the grid itself (the official code fails there)
    assert level_sizes(2, 2, 1) == [(2, 2)] and level_sizes(1, 1, 1) == [(1, 1)]
    assert level_sizes(6, 6, 5) == level_sizes(6, 6, -1) == [(6, 6)]


def test_bad_input_raises_naming_the_argument():
    video = clip(3, 6, 6, 16, 0)
    tokens = video.reshape(1, -1, 16)
    with pytest.raises(ValueError, match="head_dim"):
        vtoken.reduce(tokens, 20, "sttm", video_grid=(3, 6, 6), head_dim=5)
    with pytest.raises(ValueError, match="root_level"):
        vtoken.reduce(tokens, 20, "sttm", video_grid=(3, 6, 6), root_level=-2)
    with pytest.raises(ValueError, match="over_budget"):
        vtoken.reduce(tokens, 20, "sttm", video_grid=(3, 6, 6), over_budget="drop")
    mask = torch.ones(1, tokens.shape[1], dtype=torch.bool)
    mask[0, -5:] = False  # part of the last frame
    with pytest.raises(ValueError, match="mask"):
        vtoken.reduce(tokens, 20, "sttm", mask=mask, video_grid=(3, 6, 6))
    with pytest.raises(ValueError, match="video_grid"):
        vtoken.reduce(tokens, 20, "sttm", video_grid=(3, 6, 5))
