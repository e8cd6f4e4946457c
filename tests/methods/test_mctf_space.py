"""``mctf`` over the whole parameter space of the official MCTF (fixture manifest ``mctf``): every temperature on or
off (0), every pooling type, bidirection on/off, a protected CLS token or none, ``one_step_ahead`` on/off, with and
without sizes, per-head or head-averaged attention, and the official ``r_eval`` clipping (:func:`official_r`).

The reference below is a plain loop over tokens written from the manifest's algorithm text (one official ``mctf``
call on one sample), with the tie rule vtoken documents (``ties="index"``: equal scores break by lowest index).
"""

from __future__ import annotations

import itertools

import pytest
import torch

import vtoken
from vtoken.methods.mctf import official_r
from vtoken.ops.merge import merge_attention

POOLINGS = ("size", "attn", "max", "mean")


def problem(b: int = 2, t: int = 23, d: int = 8, h: int = 3, seed: int = 0, sizes: bool = True):
    """Tokens around a few centres, per-head softmax attention ``[B, H, T, T]`` and integer sizes, in float64."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(b, 4, d, generator=g, dtype=torch.float64)
    pick = torch.randint(0, 4, (b, t), generator=g)
    noise = torch.randn(b, t, d, generator=g, dtype=torch.float64)
    x = centres.gather(1, pick[..., None].expand(b, t, d)) + 0.4 * noise
    logits = torch.randn(b, h, t, t, generator=g, dtype=torch.float64)
    attn = torch.softmax(logits, dim=-1)
    size = torch.randint(1, 5, (b, t), generator=g).double() if sizes else None
    return x, attn, size


def reference(x, attn, size, *, protected, tau_sim, tau_info, tau_size, bidirection, pooling, r):
    """One official MCTF call on one sample, from the manifest: ``x [T, D]``, ``attn [H, T, T]``, ``size [T]`` or
    None. Returns (x, size, attn_next [H, K, K], groups) in the official output order; groups are the members."""
    t = x.shape[0]
    a_idx, b_idx = list(range(0, t, 2)), list(range(1, t, 2))
    metric = x / x.norm(dim=-1, keepdim=True)
    recv = attn.mean(dim=(0, 1))  # attention each token receives, mean over heads and queries
    info = (1 / recv) / (1 / recv).max()
    inv_size = None if size is None else (1 / size) / (1 / size).max()

    def score(i: int, j: int) -> float:
        s = ((float(metric[i] @ metric[j]) + 1) / 2) ** (1 / tau_sim) if tau_sim else 1.0
        if tau_info > 0:
            s *= float(info[i] * info[j]) ** (1 / tau_info)
        if tau_size and inv_size is not None:
            s *= float(inv_size[i] * inv_size[j]) ** (1 / tau_size)
        return s

    scores = [[score(i, j) if ai >= protected else float("-inf") for j in b_idx] for ai, i in enumerate(a_idx)]
    r1 = r // 2 if bidirection else r
    r2 = r - r1
    best = [max(range(len(b_idx)), key=lambda j, row=row: (row[j], -j)) for row in scores]  # first best column
    edge = sorted(range(len(a_idx)), key=lambda a: -scores[a][best[a]])  # stable: ties by lowest row
    src, unm = edge[:r1], edge[r1:]
    if protected:
        unm = sorted(unm)
    group = {("B", j): [b_idx[j]] for j in range(len(b_idx))}
    for a in src:
        group[("B", best[a])].append(a_idx[a])
    out = [("A", a) for a in unm]
    for a in unm:
        group[("A", a)] = [a_idx[a]]
    if bidirection:
        cols = sorted(unm)  # ties by lowest A index
        best2 = [max(cols, key=lambda a, j=j: (scores[a][j], -a)) for j in range(len(b_idx))]
        order2 = sorted(range(len(b_idx)), key=lambda j: -scores[best2[j]][j])
        for j in order2[:r2]:
            group[("A", best2[j])] += group.pop(("B", j))
        out += [("B", j) for j in order2[r2:]]
    else:
        out += [("B", j) for j in range(len(b_idx))]
    members = [sorted(group[o]) for o in out]
    sz = torch.ones(t, dtype=x.dtype) if size is None else size
    w = {"size": sz, "attn": recv * sz / sz.max(), "mean": torch.ones(t, dtype=x.dtype)}.get(pooling)
    k = len(members)
    xs = torch.zeros(k, x.shape[1], dtype=x.dtype)
    sizes = torch.zeros(k, dtype=x.dtype)
    nxt = torch.zeros(attn.shape[0], k, k, dtype=x.dtype)
    onehot = torch.zeros(k, t, dtype=x.dtype)
    for g, mem in enumerate(members):
        onehot[g, mem] = 1.0
    keys = attn @ onehot.T  # [H, T, K]: a fused token receives the attention of all its members
    for g, mem in enumerate(members):
        sizes[g] = sum(float(sz[i]) for i in mem)
        if w is None:  # max pooling: element-wise maximum over the members (queries too)
            xs[g] = x[mem].amax(0)
            nxt[:, g] = keys[:, mem].amax(1)
        else:
            xs[g] = sum(w[i] * x[i] for i in mem) / sum(w[i] for i in mem)
            nxt[:, g] = (keys[:, mem] * w[mem][None, :, None]).sum(1) / w[mem].sum()
    return xs, sizes, nxt, members


def official_view(red: vtoken.Reduction):
    """Positions (in the Reduction's ascending order) of the outputs in the official order."""
    return torch.searchsorted(red.indices.contiguous(), red.extras["order"].clamp(min=0).contiguous())


SPACE = list(itertools.product([(1, 20, 40), (0, 20, 40), (1, 0, 40), (1, 20, 0), (1, 0, 0), (0, 0, 40), (0, 0, 0)],
                               POOLINGS, [True, False], [True, False]))


def _space_id(v: object) -> str:
    if isinstance(v, tuple):
        return "tau=" + "/".join(map(str, v))
    return str(v)


@pytest.mark.parametrize(("taus", "pooling", "bidirection", "class_token"), SPACE, ids=_space_id)
def test_matches_the_manifest_reference(taus, pooling, bidirection, class_token):
    tau_sim, tau_info, tau_size = taus
    for with_size, r in ((True, 7), (False, 4)):
        x, attn, size = problem(seed=len(SPACE) * with_size + SPACE.index((taus, pooling, bidirection, class_token)),
                                sizes=with_size)
        t = x.shape[1]
        kw = {"class_token": class_token, "tau_sim": tau_sim, "tau_info": tau_info, "tau_size": tau_size,
              "bidirection": bidirection, "pooling": pooling}
        red = vtoken.reduce(x, t - r, "mctf", attn=attn, sizes=size, **kw)
        pos = official_view(red)
        for b in range(x.shape[0]):
            xs, sizes, nxt, members = reference(x[b], attn[b], None if size is None else size[b],
                                                protected=int(class_token), tau_sim=tau_sim, tau_info=tau_info,
                                                tau_size=tau_size, bidirection=bidirection, pooling=pooling, r=r)
            p = pos[b]
            got = [sorted((red.assign[b] == int(s)).nonzero()[:, 0].tolist()) for s in p]
            assert got == members, "the same tokens fuse, in the official output order"
            torch.testing.assert_close(red.tokens[b, p], xs, atol=1e-9, rtol=1e-9)
            assert red.sizes[b, p].tolist() == sizes.tolist()
            torch.testing.assert_close(red.extras["attn_next"][b][:, p][:, :, p].double(), nxt, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("pooling", POOLINGS)
def test_per_head_and_head_mean_attention(pooling):
    x, attn, size = problem(seed=1)
    kw = {"class_token": True, "pooling": pooling, "sizes": size}
    heads = vtoken.reduce(x, 15, "mctf", attn=attn, **kw)
    mean = vtoken.reduce(x, 15, "mctf", attn=attn.mean(1), **kw)
    assert torch.equal(heads.assign, mean.assign) and torch.equal(heads.indices, mean.indices)
    torch.testing.assert_close(heads.tokens, mean.tokens)
    assert heads.extras["attn_next"].shape == (2, 3, 15, 15) and mean.extras["attn_next"].shape == (2, 15, 15)
    mode = "amax" if pooling == "max" else "mean"
    per_head = merge_attention(attn, heads.assign, 15, heads.extras["weights"], mode)
    torch.testing.assert_close(heads.extras["attn_next"].double(), per_head, atol=1e-6, rtol=1e-5)
    if pooling != "max":  # the fused attention is linear per head: the head mean commutes with it
        torch.testing.assert_close(mean.extras["attn_next"], heads.extras["attn_next"].mean(1), atol=1e-6, rtol=1e-5)


def test_one_step_ahead_off_returns_no_fused_attention():
    x, attn, _ = problem(seed=2)
    on = vtoken.reduce(x, 17, "mctf", attn=attn)
    off = vtoken.reduce(x, 17, "mctf", attn=attn, one_step_ahead=False)
    assert "attn_next" not in off.extras and "attn_next" in on.extras
    assert torch.equal(on.assign, off.assign) and torch.equal(on.tokens, off.tokens)


def test_zero_temperature_switches_its_criterion_off():
    x, attn, size = problem(seed=3)
    other_attn = torch.softmax(torch.randn(attn.shape, generator=torch.Generator().manual_seed(9), dtype=x.dtype), -1)
    base = {"class_token": True, "pooling": "size", "sizes": size}
    # tau_info = 0: the attention no longer decides the matching
    a = vtoken.reduce(x, 14, "mctf", attn=attn, tau_info=0, **base)
    b = vtoken.reduce(x, 14, "mctf", attn=other_attn, tau_info=0, **base)
    assert torch.equal(a.assign, b.assign) and bool(torch.isfinite(a.tokens).all())
    assert not torch.equal(vtoken.reduce(x, 14, "mctf", attn=attn, **base).assign,
                           vtoken.reduce(x, 14, "mctf", attn=other_attn, **base).assign)
    # tau_size = 0: the sizes no longer decide it (they still weight the pooling); sizes of ones = no sizes
    c = vtoken.reduce(x, 14, "mctf", attn=attn, tau_size=0, **{**base, "sizes": size.flip(-1)})
    d = vtoken.reduce(x, 14, "mctf", attn=attn, tau_size=0, **base)
    assert torch.equal(c.assign, d.assign)
    ones = vtoken.reduce(x, 14, "mctf", attn=attn, sizes=torch.ones_like(size))
    none = vtoken.reduce(x, 14, "mctf", attn=attn)
    assert torch.equal(ones.assign, none.assign) and torch.equal(ones.tokens, none.tokens)
    # tau_sim = 0: only attention and size are compared: the token features do not matter to the matching
    e = vtoken.reduce(x, 14, "mctf", attn=attn, tau_sim=0, **base)
    f = vtoken.reduce(torch.randn_like(x), 14, "mctf", attn=attn, tau_sim=0, **base)
    assert torch.equal(e.assign, f.assign)


def test_all_criteria_off_ties_break_by_lowest_index():
    """Every score is 1: the lowest unprotected A rows merge into the first B column (token 1)."""
    x = torch.randn(1, 7, 4, generator=torch.Generator().manual_seed(4))
    attn = torch.full((1, 7, 7), 1 / 7)
    red = vtoken.reduce(x, 5, "mctf", attn=attn, class_token=True, tau_sim=0, tau_info=0, tau_size=0,
                        bidirection=False, pooling="mean")
    assert red.extras["order"].tolist() == [[0, 6, 1, 3, 5]]  # [unmerged A ascending, B]
    assert red.indices.tolist() == [[0, 1, 3, 5, 6]] and red.sizes.tolist() == [[1, 3, 1, 1, 1]]
    torch.testing.assert_close(red.tokens[0, 1], x[0, [1, 2, 4]].mean(0))
    # bidirection with r = 2: one A row (token 2) into token 1, then B token 1 (first in the stable order) into the
    # first unmerged unprotected A token (token 4)
    bi = vtoken.reduce(x, 5, "mctf", attn=attn, class_token=True, tau_sim=0, tau_info=0, tau_size=0, pooling="mean")
    assert bi.extras["order"].tolist() == [[0, 4, 6, 3, 5]]
    assert bi.sizes[0, bi.indices[0].tolist().index(4)].item() == 3


@pytest.mark.parametrize("class_token", [True, False])
@pytest.mark.parametrize("bidirection", [True, False])
def test_official_ties_equal_index_ties_without_ties(class_token, bidirection):
    x, attn, size = problem(seed=5)
    kw = {"attn": attn, "sizes": size, "class_token": class_token, "bidirection": bidirection}
    a = vtoken.reduce(x, 14, "mctf", **kw)
    b = vtoken.reduce(x, 14, "mctf", ties="official", **kw)
    assert torch.equal(a.assign, b.assign) and torch.equal(a.extras["order"], b.extras["order"])
    with pytest.raises(ValueError, match="ties"):
        vtoken.reduce(x, 14, "mctf", ties="random", **kw)


@pytest.mark.parametrize(("r", "t", "protected", "expected"), [
    (16, 197, 1, 16),     # a count
    (0.35, 197, 1, 68),   # a ratio of the unprotected tokens, truncated: int(196 * 0.35)
    (0.25, 65, 1, 16),
    (0.5, 197, 0, 98),
    (0.5, 17, 1, 8),      # the T - r >= 10 floor applies to the value as given: not to a ratio for T > 10
    (0.9, 11, 1, 5),      # ... and the half clip still holds
    (8, 12, 1, 2),        # T - r < 10: r = T - 10
    (45, 50, 1, 24),      # T - 10 = 40, then at most (T - 1) // 2
    (150, 197, 1, 98),    # larger than one call can merge: (T - protected) // 2
    (0.5, 10, 1, 0),      # T = 10: nothing to merge
    (0, 50, 1, 0),
])
def test_official_r(r, t, protected, expected):
    assert official_r(r, t, protected) == expected
