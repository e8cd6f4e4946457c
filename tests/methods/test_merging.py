"""Behaviour of the merging methods ``tome``, ``mctf``, ``aim_merge``, ``lavit_dynamic`` and their ops."""

from __future__ import annotations

import pytest
import torch

import vtoken
from vtoken.ops.matching import ab_scores
from vtoken.ops.merge import merge_attention, merge_rows, source_matrix, unmerge

MERGERS = ("tome", "mctf", "aim_merge", "lavit_dynamic")


def clustered(b: int = 2, n: int = 40, d: int = 16, seed: int = 0) -> torch.Tensor:
    """Tokens around a few centres (so merges are meaningful), no exact ties."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(b, 5, d, generator=g) * 2
    pick = torch.randint(0, 5, (b, n), generator=g)
    return centres.gather(1, pick[..., None].expand(b, n, d)) + 0.3 * torch.randn(b, n, d, generator=g)


def attention(x: torch.Tensor) -> torch.Tensor:
    """A head-averaged-like softmax attention ``[B, N, N]`` from the tokens."""
    return torch.softmax(x @ x.transpose(1, 2) / x.shape[-1] ** 0.5, dim=-1)


def signals(method: str, x: torch.Tensor) -> dict:
    return {"attn": attention(x)} if method == "mctf" else {}


def check_assign(red: vtoken.Reduction, n_real: torch.Tensor | None = None) -> None:
    """Every real input goes to exactly one real output; every output holds its representative."""
    k = red.tokens.shape[1]
    for b in range(red.tokens.shape[0]):
        real_out = int(red.mask[b].sum())
        a = red.assign[b]
        got = a[a >= 0]
        assert bool((got < real_out).all())
        if n_real is not None:
            assert got.numel() == int(n_real[b])
        assert torch.equal(torch.unique(got), torch.arange(real_out))
        reps = red.indices[b, :real_out]
        assert torch.equal(a[reps], torch.arange(real_out))
        assert bool((red.indices[b, real_out:] == -1).all()) and real_out <= k


# ---------------------------------------------------------------------------------------------------------------- tome


@pytest.mark.parametrize("r", [1, 7, 19])
def test_tome_removes_exactly_r_and_conserves_size(r):
    x = clustered(n=40)
    sizes = torch.randint(1, 4, (2, 40)).float()
    red = vtoken.reduce(x, keep=40 - r, method="tome", sizes=sizes)
    assert red.tokens.shape == (2, 40 - r, 16)
    assert len(red.extras["src_idx"]) == 1 and red.extras["src_idx"][0].shape == (2, r)
    torch.testing.assert_close(red.sizes.sum(-1), sizes.sum(-1))
    # the size-weighted mean conserves the size-weighted sum of tokens
    torch.testing.assert_close((red.sizes[..., None] * red.tokens).sum(1), (sizes[..., None] * x).sum(1),
                               atol=1e-4, rtol=1e-5)
    check_assign(red)


def test_tome_several_rounds_and_r_cap():
    x = clustered(n=40)
    red = vtoken.reduce(x, keep=5, method="tome")
    assert red.tokens.shape[1] == 5 and len(red.extras["r"]) >= 3
    torch.testing.assert_close(red.sizes.sum(-1), torch.full((2,), 40.0))
    check_assign(red)
    capped = vtoken.reduce(x, keep=30, method="tome", r=4)
    assert [int(v[0]) for v in capped.extras["r"]] == [4, 4, 2]
    sched = vtoken.reduce(x, keep=30, method="tome", r=[3, 5])
    assert [int(v[0]) for v in sched.extras["r"]] == [3, 5, 2]
    # a merge round is a function of its input: chaining one-round calls in the official order gives the same result
    one = vtoken.reduce(x, keep=36, method="tome")
    order = torch.searchsorted(one.indices, one.extras["order"])
    x1 = one.tokens.gather(1, order[..., None].expand(-1, -1, 16))
    two = vtoken.reduce(x1, keep=32, method="tome", sizes=one.sizes.gather(1, order))
    both = vtoken.reduce(x, keep=32, method="tome", r=4)
    o2 = torch.searchsorted(two.indices, two.extras["order"])
    ob = torch.searchsorted(both.indices, both.extras["order"])
    torch.testing.assert_close(two.tokens.gather(1, o2[..., None].expand(-1, -1, 16)),
                               both.tokens.gather(1, ob[..., None].expand(-1, -1, 16)))


def test_tome_class_and_distill_tokens_stay_first_and_unmerged():
    x = clustered(n=41)
    x[:, 0] = x[:, 5] + 1e-3  # the class token looks like a patch: it must still never merge
    for distill in (False, True):
        red = vtoken.reduce(x, keep=6, method="tome", class_token=True, distill_token=distill)
        protected = 2 if distill else 1
        assert red.tokens.shape[1] == 6
        assert red.indices[:, :protected].tolist() == [list(range(protected))] * 2
        torch.testing.assert_close(red.tokens[:, :protected], x[:, :protected])
        assert bool((red.sizes[:, :protected] == 1).all())
        assert bool((red.assign[:, :protected] == torch.arange(protected)).all())
        assert bool((red.assign[:, protected:] >= protected).all())
        assert bool((red.extras["order"][:, :protected] == torch.arange(protected)).all())
    # the smallest reachable count with a class token is CLS + one merged token
    assert vtoken.reduce(x, keep=1, method="tome", class_token=True).tokens.shape[1] == 2
    with pytest.raises(ValueError, match="distill_token"):
        vtoken.reduce(x, keep=6, method="tome", distill_token=True)
    with pytest.raises(ValueError, match="r must"):
        vtoken.reduce(x, keep=6, method="tome", r=0)


def test_tome_keys_metric_source_and_unmerge():
    x = clustered(n=30)
    keys = torch.randn(2, 30, 8)
    red = vtoken.reduce(x, keep=10, method="tome", keys=keys)
    src = source_matrix(red.assign, red.tokens.shape[1])
    torch.testing.assert_close(src.sum(-1), red.sizes)
    assert bool((src.sum(1) == 1).all())
    un = unmerge(red.tokens, red.assign)
    assert un.shape == x.shape
    torch.testing.assert_close(un.gather(1, red.indices[..., None].expand(-1, -1, 16)), red.tokens)
    assert not torch.equal(red.indices, vtoken.reduce(x, keep=10, method="tome").indices)


def test_tome_ties_are_deterministic():
    x = torch.ones(1, 12, 4)
    a = vtoken.reduce(x, keep=7, method="tome")
    b = vtoken.reduce(x, keep=7, method="tome")
    assert torch.equal(a.indices, b.indices) and torch.equal(a.assign, b.assign)
    # every A row ties: the lowest rows merge, each into the first B column
    assert a.extras["src_idx"][0].tolist() == [[0, 1, 2, 3, 4]]
    assert a.extras["dst_idx"][0].tolist() == [[0] * 5]


# ---------------------------------------------------------------------------------------------------------------- mctf


def test_mctf_fused_attention_and_rounds():
    x = clustered(n=33)
    attn = attention(x)
    red = vtoken.reduce(x, keep=8, method="mctf", attn=attn, class_token=True)
    k = red.tokens.shape[1]
    assert k == 8 and len(red.extras["r"]) >= 2
    assert red.indices[:, 0].tolist() == [0, 0] and bool((red.sizes[:, 0] == 1).all())
    nxt = red.extras["attn_next"]
    assert nxt.shape == (2, k, k)
    torch.testing.assert_close(nxt.sum(-1), torch.ones(2, k))  # keys summed, queries averaged: rows stay stochastic
    torch.testing.assert_close(red.sizes.sum(-1), torch.full((2,), 33.0))
    check_assign(red)
    # one round: the fused attention equals merge_attention of the input with the pooling weights
    one = vtoken.reduce(x, keep=25, method="mctf", attn=attn)
    ref = merge_attention(attn, one.assign, 25, one.extras["weights"])
    torch.testing.assert_close(one.extras["attn_next"], ref)
    # per-head maps: merging is linear per head, so the head mean commutes with it
    heads = torch.stack([attn, attention(x.flip(-1))], 1)
    red_h = merge_attention(heads, one.assign, 25, one.extras["weights"])
    torch.testing.assert_close(red_h.mean(1), merge_attention(heads.mean(1), one.assign, 25, one.extras["weights"]))


@pytest.mark.parametrize("pooling", ["attn", "size", "mean", "max"])
@pytest.mark.parametrize("bidirection", [True, False])
def test_mctf_variants(pooling, bidirection):
    x = clustered(n=21)
    red = vtoken.reduce(x, keep=11, method="mctf", attn=attention(x), pooling=pooling, bidirection=bidirection,
                        class_token=False)
    assert red.tokens.shape[1] == 11
    check_assign(red)
    if pooling == "max":
        ref = merge_rows(x, red.assign, 11, mode="amax")
        torch.testing.assert_close(red.tokens, ref)
    if pooling == "mean":
        torch.testing.assert_close(red.tokens, merge_rows(x, red.assign, 11))


def test_mctf_errors():
    x = clustered(n=10)
    with pytest.raises(ValueError, match="attn"):
        vtoken.reduce(x, keep=5, method="mctf")
    with pytest.raises(ValueError, match="pooling"):
        vtoken.reduce(x, keep=5, method="mctf", attn=attention(x), pooling="avg")


# ----------------------------------------------------------------------------------------------------------- aim_merge


def test_aim_merge_official_schedule_and_plain_mean():
    x = clustered(b=3, n=36)
    red = vtoken.reduce(x, keep=36 - 36 // 2 - 36 // 4, method="aim_merge")
    assert red.tokens.shape[1] == 9
    assert [int(r[0]) for r in red.extras["r"]] == [18, 9]
    check_assign(red)
    one = vtoken.reduce(x, keep=20, method="aim_merge")  # one round: outputs are plain means of their members
    torch.testing.assert_close(one.tokens, merge_rows(x, one.assign, 20))
    assert red.extras["unm_idx"][0].shape == (3, 0)  # T // 2 merges every A token


# ------------------------------------------------------------------------------------------------------- lavit_dynamic


def test_lavit_counts_differ_and_dropped_tokens_join_most_similar_kept():
    x = clustered(b=3, n=30, seed=1)
    cls = torch.rand(3, 30) ** 4
    cls[1] = torch.rand(30) * 0.1 + 1.0  # flat scores: many above the mean
    red = vtoken.reduce(x, keep=25, method="lavit_dynamic", cls_attn=cls)
    counts = red.mask.sum(-1)
    assert len(set(counts.tolist())) > 1 and bool((counts <= 25).all()) and bool((counts >= 1).all())
    kept = red.extras["kept"]
    assert torch.equal(kept.sum(-1), counts)
    check_assign(red)
    for b in range(3):
        ki = kept[b].nonzero()[:, 0]
        assert torch.equal(red.indices[b, : counts[b]], ki)
        assert bool((cls[b, ki] >= cls[b].mean()).all())
        xn = torch.nn.functional.normalize(x[b], dim=-1)
        best = ki[(xn @ xn[ki].T).argmax(-1)]
        dropped = ~kept[b]
        assert torch.equal(red.indices[b, red.assign[b]][dropped], best[dropped])
        assert torch.equal(red.indices[b, red.assign[b]][~dropped], ki)
    torch.testing.assert_close(red.tokens * red.mask[..., None], merge_rows(x, red.assign, red.tokens.shape[1]))
    # the resolved keep is a cap on the count
    capped = vtoken.reduce(x, keep=3, method="lavit_dynamic", cls_attn=cls)
    assert bool((capped.mask.sum(-1) <= 3).all())
    for score in ("distinct", "norm"):
        r = vtoken.reduce(x, keep=25, method="lavit_dynamic", score=score)
        check_assign(r)
    with pytest.raises(ValueError, match="cls_attn"):
        vtoken.reduce(x, keep=5, method="lavit_dynamic", score="cls_attn")
    with pytest.raises(ValueError, match="threshold"):
        vtoken.reduce(x, keep=5, method="lavit_dynamic", threshold=-1.0)


# ------------------------------------------------------------------------------------------------------------- shared


@pytest.mark.parametrize("method", MERGERS)
def test_masks_never_merge_padding_and_match_each_sample_alone(method):
    x = clustered(b=3, n=24, seed=2)
    mask = torch.ones(3, 24, dtype=torch.bool)
    mask[0, 18:] = False
    mask[2, [1, 4, 9, 10, 23]] = False
    x = torch.where(mask[..., None], x, 1e3)  # huge padding: any leak shows up
    kw = signals(method, x)
    if method == "lavit_dynamic":
        kw["cls_attn"] = torch.rand(3, 24, generator=torch.Generator().manual_seed(0))
    red = vtoken.reduce(x, keep=9, method=method, mask=mask, **kw)
    assert bool((red.assign[~mask] == -1).all())
    assert float(red.tokens.abs().max()) < 100
    check_assign(red, mask.sum(-1))
    for b in range(3):
        idx = mask[b].nonzero()[:, 0]
        alone_kw = {}
        if "attn" in kw:
            alone_kw["attn"] = kw["attn"][b][idx][:, idx][None]
        if "cls_attn" in kw:
            alone_kw["cls_attn"] = kw["cls_attn"][b, idx][None]
        one = vtoken.reduce(x[b, idx][None], keep=9, method=method, **alone_kw)
        k = int(one.mask.sum())
        assert int(red.mask[b].sum()) == k
        assert torch.equal(red.indices[b, :k], idx[one.indices[0, :k]])
        torch.testing.assert_close(red.tokens[b, :k], one.tokens[0, :k], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(red.sizes[b, :k], one.sizes[0, :k])
        if method == "mctf":
            torch.testing.assert_close(red.extras["attn_next"][b, :k, :k], one.extras["attn_next"][0])
            assert float(red.extras["attn_next"][b, k:].abs().sum()) == 0.0


@pytest.mark.parametrize("method", MERGERS)
def test_batch_equals_each_sample_alone(method):
    x = clustered(b=3, n=26, seed=3)
    kw = signals(method, x)
    red = vtoken.reduce(x, keep=0.3, method=method, **kw)
    for b in range(3):
        one = vtoken.reduce(x[b : b + 1], keep=0.3, method=method, **{k: v[b : b + 1] for k, v in kw.items()})
        k = int(one.mask.sum())
        assert torch.equal(red.indices[b, :k], one.indices[0, :k])
        assert torch.equal(red.assign[b], one.assign[0])
        torch.testing.assert_close(red.tokens[b, :k], one.tokens[0, :k], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("method", MERGERS)
def test_half_precision(method, dtype):
    x = clustered(n=20, seed=4).to(dtype)
    kw = {k: v.to(dtype) for k, v in signals(method, x.float()).items()}
    red = vtoken.reduce(x, keep=8, method=method, **kw)
    ref = vtoken.reduce(x.float(), keep=8, method=method, **{k: v.float() for k, v in kw.items()})
    assert red.tokens.dtype == dtype and bool(torch.isfinite(red.tokens.float()).all())
    assert torch.equal(red.indices, ref.indices)  # scores are computed in float32 from the same values
    torch.testing.assert_close(red.tokens.float(), ref.tokens, atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("method", MERGERS)
def test_keep_all_is_identity_and_metadata(method):
    x = clustered(n=12)
    red = vtoken.reduce(x, keep=12, method=method, **signals(method, x))
    assert torch.equal(red.tokens, x)
    info = vtoken.get_method(method)
    assert info.kind == "merge" and info.exact == (method != "lavit_dynamic")


def test_ops_scores_and_merge_rows():
    m = torch.randn(2, 7, 5)
    s = ab_scores(m)
    assert s.shape == (2, 4, 3)
    mn = torch.nn.functional.normalize(m, dim=-1)
    torch.testing.assert_close(s, mn[:, 0::2] @ mn[:, 1::2].transpose(1, 2))
    x = torch.arange(12.0).reshape(1, 4, 3)
    idx = torch.tensor([[0, 0, 1, -1]])
    w = torch.tensor([[1.0, 3.0, 1.0, 1.0]])
    torch.testing.assert_close(merge_rows(x, idx, 2, w), torch.stack([(x[0, 0] + 3 * x[0, 1]) / 4, x[0, 2]])[None])
    torch.testing.assert_close(merge_rows(x, idx, 2, mode="sum"), torch.stack([x[0, 0] + x[0, 1], x[0, 2]])[None])
    torch.testing.assert_close(merge_rows(x, idx, 3, mode="amax")[0, 2], torch.zeros(3))
