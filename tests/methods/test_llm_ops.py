"""Unit and property tests of the in-LLM selection functions: DPC-kNN (ops.dpc), pivot selection (ops.duplication),
SparseVLM (methods._sparsevlm_ops) and DART (methods._dart_ops)."""

from __future__ import annotations

import math

import pytest
import torch

import vtoken
from vtoken.methods._dart_ops import dart_select, dart_token_topk, key_l1_norm, order_pivots
from vtoken.methods._sparsevlm_ops import (
    SPARSEVLM_BUDGETS,
    sparsevlm_budget,
    sparsevlm_cluster_merge,
    sparsevlm_raters,
    sparsevlm_recycle,
    sparsevlm_relevance,
    sparsevlm_select_heads,
    sparsevlm_topk,
)
from vtoken.ops.dpc import cluster_mean, dpc_knn, knn_density, parent_distance
from vtoken.ops.duplication import masked_topk, pivot_dissimilar_select


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _blobs(b: int, n: int, c: int, seed: int = 0) -> torch.Tensor:
    g = _gen(seed)
    centres = torch.randn(b, 5, c, generator=g) * 3
    which = torch.randint(0, 5, (b, n), generator=g)
    return centres.gather(1, which[..., None].expand(-1, -1, c)) + torch.randn(b, n, c, generator=g)


# ---------------------------------------------------------------------------------------------------------------
# DPC-kNN
# ---------------------------------------------------------------------------------------------------------------


def _dpc_reference(x: torch.Tensor, k: int) -> tuple[list[int], list[int]]:
    """Loop reference of DPC-kNN on one sample ``x [N, C]`` (ties: lowest index)."""
    n, c = x.shape
    xd = x.double()
    d = [[float((xd[i] - xd[j]).norm()) / math.sqrt(c) for j in range(n)] for i in range(n)]
    kk = min(k, n)
    rho = [math.exp(-sum(v * v for v in sorted(row)[:kk]) / kk) for row in d]
    dmax = max(max(row) for row in d)
    delta = []
    for i in range(n):
        higher = [d[i][j] for j in range(n) if rho[j] > rho[i] or (rho[j] == rho[i] and j < i)]
        delta.append(min(higher) if higher else dmax)
    score = [rho[i] * delta[i] for i in range(n)]
    centers = sorted(range(n), key=lambda i: (-score[i], i))[:kk]
    assign = [min(range(kk), key=lambda s: (d[centers[s]][i], s)) for i in range(n)]
    for s, ci in enumerate(centers):
        assign[ci] = s
    return centers, assign


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_dpc_matches_loop_reference(seed):
    x = _blobs(1, 24, 16, seed)
    res = dpc_knn(x, 4)
    centers, assign = _dpc_reference(x[0], 4)
    assert res.centers[0].tolist() == centers
    assert res.assign[0].tolist() == assign


def test_dpc_shapes_and_invariants():
    x = _blobs(3, 30, 8, 3)
    res = dpc_knn(x, 5)
    assert res.centers.shape == (3, 5) and res.assign.shape == (3, 30)
    assert res.centers.dtype == torch.long and res.assign.dtype == torch.long
    rows = torch.arange(3)[:, None]
    assert torch.equal(res.assign[rows, res.centers], torch.arange(5).expand(3, 5))  # each centre owns its cluster
    assert int(res.assign.min()) >= 0 and int(res.assign.max()) < 5
    assert all(len(set(r)) == 5 for r in res.centers.tolist())


def test_dpc_deterministic_and_seed_free():
    x = _blobs(2, 40, 8, 4)
    torch.manual_seed(0)
    a = dpc_knn(x, 6)
    torch.manual_seed(123)
    b = dpc_knn(x, 6)
    assert torch.equal(a.centers, b.centers) and torch.equal(a.assign, b.assign)


def test_dpc_ties_break_by_lowest_index():
    # k = 2: two mutual nearest neighbours have bit-identical densities (the official breaks this with noise)
    x = torch.tensor([[[0.0, 0.0], [0.1, 0.0], [5.0, 5.0], [5.1, 5.0]]])
    dens = knn_density(torch.cdist(x, x), 2)
    assert dens[0, 0] == dens[0, 1] and dens[0, 2] == dens[0, 3]
    delta = parent_distance(torch.cdist(x, x), dens)
    assert float(delta[0, 1]) == pytest.approx(0.1) and float(delta[0, 3]) == pytest.approx(0.1)
    res = dpc_knn(x, 2)
    assert sorted(res.centers[0].tolist()) == [0, 2]
    assert res.assign[0].tolist() in ([0, 0, 1, 1], [1, 1, 0, 0])
    # fully duplicated points: still one centre per slot, no crash, lowest index wins
    dup = torch.zeros(1, 5, 3)
    r = dpc_knn(dup, 3)
    assert r.centers[0].tolist() == [0, 1, 2]
    assert r.assign[0, :3].tolist() == [0, 1, 2]


def test_dpc_k_larger_than_points_is_clipped():
    x = _blobs(1, 6, 4, 5)
    res = dpc_knn(x, 50)
    assert res.centers.shape == (1, 6)
    assert sorted(res.centers[0].tolist()) == list(range(6))
    assert torch.equal(res.assign[0, res.centers[0]], torch.arange(6))


def test_dpc_batch_equals_each_sample_alone_with_mask():
    xs = [_blobs(1, n, 8, 10 + n)[0] for n in (25, 40, 31)]
    ks = [3, 5, 4]
    n_max = 40
    x = torch.zeros(3, n_max, 8)
    mask = torch.zeros(3, n_max, dtype=torch.bool)
    for i, xi in enumerate(xs):
        x[i, : len(xi)] = xi
        mask[i, : len(xi)] = True
    x = x.masked_fill(~mask[..., None], 7.0)  # padding content must not matter
    merged, centers, assign = sparsevlm_cluster_merge(x, torch.tensor(ks), mask=mask)
    for i, (xi, k) in enumerate(zip(xs, ks, strict=True)):
        m1, c1, a1 = sparsevlm_cluster_merge(xi[None], k)
        assert torch.equal(centers[i, :k], c1[0]) and bool((centers[i, k:] == -1).all())
        assert torch.equal(assign[i, : len(xi)], a1[0]) and bool((assign[i, len(xi):] == -1).all())
        torch.testing.assert_close(merged[i, :k], m1[0])
        assert bool((merged[i, k:] == 0).all())


def test_cluster_mean_count_plus_eps():
    x = torch.arange(12.0).reshape(1, 6, 2)
    assign = torch.tensor([[0, 0, 1, -1, 1, 1]])
    out = cluster_mean(x, assign, 3)
    torch.testing.assert_close(out[0, 0], (x[0, 0] + x[0, 1]) / (2 + 1e-6))
    torch.testing.assert_close(out[0, 1], (x[0, 2] + x[0, 4] + x[0, 5]) / (3 + 1e-6))
    assert bool((out[0, 2] == 0).all())
    torch.testing.assert_close(cluster_mean(x, assign, 3, eps=0.0)[0, 0], (x[0, 0] + x[0, 1]) / 2)


# ---------------------------------------------------------------------------------------------------------------
# SparseVLM
# ---------------------------------------------------------------------------------------------------------------


def test_sparsevlm_budget_table():
    assert sparsevlm_budget(192, 2) == 300 and sparsevlm_budget(192, 15) == 110
    assert sparsevlm_budget(64, 6, "1_0") == 30 and sparsevlm_budget(64, 6, "2_0") == 34
    assert sparsevlm_budget(128, 15, "2_0") == 60
    assert set(SPARSEVLM_BUDGETS["1_0"]) == {192, 128, 96, 64}
    for bad in ({"retain": 100, "layer": 2}, {"retain": 192, "layer": 3}, {"retain": 192, "layer": 2, "version": "3"}):
        with pytest.raises(ValueError):
            sparsevlm_budget(**bad)


def test_sparsevlm_topk_budget_rules():
    rel = torch.rand(2, 10, generator=_gen(0))
    keep, flag = sparsevlm_topk(rel, 4)
    assert keep.shape == (2, 10) and keep.sum(-1).tolist() == [4, 4] and flag.tolist() == [True, True]
    assert torch.equal(keep[0], torch.zeros(10, dtype=torch.bool).index_fill(0, rel[0].topk(4).indices, True))
    keep, _ = sparsevlm_topk(rel, 300)  # budget above the tokens: the official min(budget, n - 1)
    assert keep.sum(-1).tolist() == [9, 9]
    assert not bool(keep[0, rel[0].argmin()])
    keep, flag = sparsevlm_topk(rel[:, :1], 300)  # a single visual token is deleted
    assert keep.sum().item() == 0 and flag.tolist() == [True, True]
    keep, flag = sparsevlm_topk(rel[:, :0], 300)
    assert keep.shape == (2, 0) and flag.tolist() == [False, False]


def test_sparsevlm_topk_ties_and_mask():
    rel = torch.tensor([[0.5, 0.5, 0.5, 0.1, 0.9]])
    keep, _ = sparsevlm_topk(rel, 2)
    assert keep[0].tolist() == [True, False, False, False, True]
    mask = torch.tensor([[True, True, True, False, False]])
    keep, _ = sparsevlm_topk(rel, 10, mask=mask)
    assert keep[0].tolist() == [True, True, False, False, False]  # n_valid - 1 = 2, padding never kept


def test_sparsevlm_relevance_and_raters_per_sample():
    g = _gen(1)
    attn = torch.rand(3, 4, 7, 12, generator=g)
    raters = torch.rand(3, 7, generator=g) > 0.5
    raters[:, 0] = True
    rel = sparsevlm_relevance(attn, raters)
    for i in range(3):
        ref = attn[i].mean(0)[raters[i]].mean(0)
        torch.testing.assert_close(rel[i], ref)
    # a sample without raters uses every text row
    none = torch.zeros(1, 7, dtype=torch.bool)
    torch.testing.assert_close(sparsevlm_relevance(attn[:1], none)[0], attn[0].mean(0).mean(0))

    v, t = torch.randn(2, 20, 16, generator=g), torch.randn(2, 9, 16, generator=g)
    r = sparsevlm_raters(v, t)
    for i in range(2):
        m = (v[i] @ t[i].T).softmax(1).mean(0)
        assert torch.equal(r[i], m > m.mean())
    # padded text/visual tokens: a batch equals each sample alone
    tm = torch.ones(2, 9, dtype=torch.bool)
    tm[1, 6:] = False
    vm = torch.ones(2, 20, dtype=torch.bool)
    vm[1, 15:] = False
    rp = sparsevlm_raters(v, t, visual_mask=vm, text_mask=tm)
    assert torch.equal(rp[0], r[0])
    assert torch.equal(rp[1, :6], sparsevlm_raters(v[1:, :15], t[1:, :6])[0]) and not bool(rp[1, 6:].any())


def test_sparsevlm_select_heads():
    attn = torch.rand(2, 6, 5, 8, generator=_gen(2))
    attn[0, 3] += 10
    attn[1, 1] += 10
    raters = torch.ones(2, 5, dtype=torch.bool)
    out = sparsevlm_select_heads(attn, raters, num_heads=2)
    assert out.shape == (2, 2, 5, 8)
    assert torch.equal(out[0, 0], attn[0, 3]) and torch.equal(out[1, 0], attn[1, 1])
    assert sparsevlm_select_heads(attn, raters, num_heads=14).shape == (2, 6, 5, 8)


def test_sparsevlm_recycle_counts_and_batch():
    g = _gen(3)
    n, c = 60, 8
    x = torch.randn(2, n, c, generator=g)
    rel = torch.rand(2, n, generator=g)
    mask = torch.ones(2, n, dtype=torch.bool)
    mask[1, 45:] = False
    keep, _ = sparsevlm_topk(rel, 20, mask=mask)
    rec = sparsevlm_recycle(x, keep, rel, mask=mask)
    deleted = [40, 25]
    for i, d in enumerate(deleted):
        m = int(d * 0.3) + 1
        k = int(m / 10) + 1
        assert int(rec.mask[i].sum()) == k
        assert int((rec.assign[i] >= 0).sum()) == m
        recycled = (rec.assign[i] >= 0).nonzero().flatten()
        assert not bool(keep[i, recycled].any()) and bool(mask[i, recycled].all())
        # the recycled tokens are the m most relevant deleted ones
        cand = torch.where(mask[i] & ~keep[i], rel[i], -1.0)
        assert set(recycled.tolist()) == set(cand.topk(m).indices.tolist())
        assert set(rec.centers[i, :k].tolist()) <= set(recycled.tolist())
        alone = sparsevlm_recycle(x[i:i + 1, : 60 if i == 0 else 45], keep[i:i + 1, : 60 if i == 0 else 45],
                                  rel[i:i + 1, : 60 if i == 0 else 45])
        assert torch.equal(alone.centers[0], rec.centers[i, :k])
        torch.testing.assert_close(alone.tokens[0], rec.tokens[i, :k])
    # nothing deleted -> nothing recycled
    none = sparsevlm_recycle(x, torch.ones(2, n, dtype=torch.bool), rel)
    assert none.tokens.shape == (2, 0, c) and bool((none.assign == -1).all())


# ---------------------------------------------------------------------------------------------------------------
# DART
# ---------------------------------------------------------------------------------------------------------------


def test_dart_token_topk_rules():
    assert dart_token_topk(576, 4, 4, max_num_trunction=128).tolist() == [16]
    assert dart_token_topk(576, 4, 4, max_num_trunction=64).tolist() == [8]
    assert dart_token_topk(144, 4, 4, reduction_ratio=0.778).tolist() == [3]  # 31.968 // 8
    assert dart_token_topk(576, 4, 4, reduction_ratio=0.778).tolist() == [math.ceil(576 * (1 - 0.778) // 8)]
    assert dart_token_topk(576, 4, 4, max_num_trunction=130.5).tolist() == [16]
    # LLaVA-NeXT path: int(min(retain, n_img - Pi) // P)
    assert dart_token_topk(2000, 4, 4, llava_next=True, retain_token_num_for_llava_next=320).tolist() == [40]
    assert dart_token_topk(30, 4, 4, llava_next=True, retain_token_num_for_llava_next=320).tolist() == [3]
    assert dart_token_topk(torch.tensor([2000, 30]), 4, 4, llava_next=True,
                           retain_token_num_for_llava_next=320).tolist() == [40, 3]
    assert dart_token_topk(100, 4, 4, max_num_trunction=0).tolist() == [0]


def _dart_inputs(b: int, seq: int, d: int = 32, h: int = 2, hd: int = 8, seed: int = 0):
    g = _gen(seed)
    return torch.randn(b, seq, d, generator=g), torch.randn(b, h, seq, hd, generator=g)


def test_dart_shapes_counts_and_membership():
    hidden, keys = _dart_inputs(2, 120)
    sel = dart_select(hidden, keys, 5, 80, max_num_trunction=40)
    assert sel.token_topk.tolist() == [5, 5]
    assert sel.retained.shape == (2, 4 + 8 * 5)
    for i in range(2):
        r = sel.retained[i].tolist()
        assert r == sorted(r) and len(set(r)) == len(r) and all(5 <= v < 85 for v in r)
        assert set(sel.image_pivots[i].tolist()) <= set(r)
        assert not set(sel.text_pivots[i].tolist()) & set(r)
        assert all(v >= 85 for v in sel.text_pivots[i].tolist())
        norm = key_l1_norm(keys)[i]
        assert sel.image_pivots[i].tolist() == (norm[5:85].topk(4).indices + 5).tolist()
        assert sel.text_pivots[i].tolist() == (norm[85:].topk(4).indices + 85).tolist()


def test_dart_each_pivot_keeps_least_similar():
    hidden, keys = _dart_inputs(1, 60, seed=1)
    sel = dart_select(hidden, keys, 0, 40, pivot_image_token=1, pivot_text_token=0, max_num_trunction=5)
    piv = int(sel.image_pivots[0, 0])
    pool = [j for j in range(40) if j != piv]
    cos = torch.nn.functional.cosine_similarity(hidden[0, pool], hidden[0, piv][None], dim=-1)
    expect = sorted([piv] + [pool[j] for j in (-cos).topk(5).indices.tolist()])
    assert sel.retained[0].tolist() == expect


def test_dart_budget_larger_than_pool_keeps_whole_image():
    hidden, keys = _dart_inputs(1, 50, seed=2)
    sel = dart_select(hidden, keys, 3, 20, max_num_trunction=10_000)
    assert sel.retained[0].tolist() == list(range(3, 23))
    # fewer text tokens than text pivots: the missing pivots are -1
    sel = dart_select(hidden, keys, 3, 45, max_num_trunction=16)
    assert sel.text_pivots[0].tolist()[2:] == [-1, -1] and sorted(sel.text_pivots[0, :2].tolist()) == [48, 49]


def test_dart_deterministic_and_orders():
    hidden, keys = _dart_inputs(2, 100, seed=3)
    a = dart_select(hidden, keys, 10, 60, max_num_trunction=32)
    b = dart_select(hidden, keys, 10, 60, max_num_trunction=32)
    assert torch.equal(a.retained, b.retained)
    piv = torch.cat([a.image_pivots, a.text_pivots], 1)
    for i in range(2):
        assert a.pivot_order[i].tolist() == list(set(piv[i].tolist()))
    topk = order_pivots(a.image_pivots, a.text_pivots, "topk")
    assert torch.equal(topk, piv)
    pos = order_pivots(a.image_pivots, a.text_pivots, "position")
    assert torch.equal(pos, piv.sort(1).values)
    with pytest.raises(ValueError):
        order_pivots(a.image_pivots, a.text_pivots, "random")


def test_dart_batch_equals_each_sample_alone_with_padding():
    lens, starts, imgs = [90, 70, 100], [5, 3, 8], [50, 40, 60]
    samples = [_dart_inputs(1, n, seed=20 + i) for i, n in enumerate(lens)]
    seq = max(lens)
    hidden = torch.full((3, seq, 32), 3.0)
    keys = torch.full((3, 2, seq, 8), 9.0)  # padding with large keys must never become a pivot
    mask = torch.zeros(3, seq, dtype=torch.bool)
    pads = []
    for i, ((h, k), n) in enumerate(zip(samples, lens, strict=True)):
        pad = seq - n  # left padding, as in batched generation
        pads.append(pad)
        hidden[i, pad:] = h[0]
        keys[i, :, pad:] = k[0]
        mask[i, pad:] = True
    start = torch.tensor(starts) + torch.tensor(pads)
    for kw in ({"image_length": torch.tensor(imgs), "max_num_trunction": 24},
               {"text_length": torch.tensor([n - m for n, m in zip(lens, imgs, strict=True)]),
                "retain_token_num_for_llava_next": 24}):
        batch = dart_select(hidden, keys, start, mask=mask, **kw)
        for i, (h, k) in enumerate(samples):
            one_kw = {key: (v[i:i + 1] if isinstance(v, torch.Tensor) else v) for key, v in kw.items()}
            alone = dart_select(h, k, starts[i], **one_kw)
            got = batch.retained[i][batch.retained[i] >= 0] - pads[i]
            assert torch.equal(got, alone.retained[0])
            assert torch.equal(batch.image_pivots[i] - pads[i], alone.image_pivots[0])
            assert torch.equal(batch.text_pivots[i] - pads[i], alone.text_pivots[0])
            assert torch.equal(batch.token_topk[i:i + 1], alone.token_topk)


def test_pivot_dissimilar_select_disjoint_and_order_dependent():
    g = _gen(4)
    x = torch.randn(2, 30, 6, generator=g)
    pool = torch.ones(2, 30, dtype=torch.bool)
    pool[:, :2] = False
    piv = torch.tensor([[0, 1], [1, -1]])
    picks = pivot_dissimilar_select(x, piv, pool, 10)
    assert picks.shape == (2, 2, 10)
    flat = picks[0].flatten().tolist()
    assert len(set(flat)) == 20 and all(v >= 2 for v in flat)
    assert bool((picks[1, 1] == -1).all())
    # a pool smaller than the budget: the second pivot gets what is left
    picks = pivot_dissimilar_select(x, piv[:1], pool, 20)
    assert int((picks[0, 1] >= 0).sum()) == 8
    assert masked_topk(torch.tensor([[1.0, 3.0, 2.0]]), torch.tensor([[True, False, True]]), 5).tolist() == [[2, 0]]


def test_underscore_modules_are_not_methods():
    names = {m.name for m in vtoken.methods()}
    assert not any(n.startswith("_") for n in names)


def test_dart_reindexed_view_with_positions_matches_full_sequence():
    hidden, keys = _dart_inputs(1, 80, seed=5)
    full = dart_select(hidden, keys, 7, 50, max_num_trunction=24)
    view_h = hidden[:, 7:]  # visual tokens then text tokens, system prompt dropped
    view_k = keys.permute(0, 2, 1, 3).reshape(1, 80, -1)[:, 7:]  # [B, L, H * hd]
    view = dart_select(view_h, view_k, 0, 50, max_num_trunction=24, positions=torch.arange(7, 80)[None])
    assert torch.equal(view.retained + 7, full.retained)
    assert torch.equal(view.pivot_order + 7, full.pivot_order)


def test_sparsevlm_relevance_accepts_head_averaged_attention():
    attn = torch.rand(2, 4, 6, 9, generator=_gen(6))
    raters = torch.tensor([[True, False, True, False, False, False], [False] * 5 + [True]])
    torch.testing.assert_close(sparsevlm_relevance(attn.mean(1), raters), sparsevlm_relevance(attn, raters))
    with pytest.raises(ValueError):
        sparsevlm_relevance(attn[0, 0, 0], raters)
