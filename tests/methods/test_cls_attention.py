"""Behaviour of the vision-encoder [CLS]-attention methods (vtc_cls, visionzip, hired, evit, prumerge,
prumerge_plus) and of their ops (``ops.attention``, ``ops.stats``)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import vtoken
from vtoken.ops.attention import cls_attention, cls_attention_logits, head_mean, split_heads
from vtoken.ops.stats import iqr_outlier_fraction, percentile

METHODS = ("vtc_cls", "visionzip", "hired", "evit", "prumerge", "prumerge_plus")
N, SIDE = 36, 6


def peaked_attention(b: int, n: int, peaks: list[int], seed: int = 0) -> torch.Tensor:
    """Flat CLS attention with ``peaks[i]`` strong outliers in sample ``i`` (distinct, at seeded positions)."""
    g = torch.Generator().manual_seed(seed)
    a = 1.0 + 0.1 * torch.rand(b, n, generator=g)
    for i, k in enumerate(peaks):
        pos = torch.randperm(n, generator=g)[:k]
        a[i, pos] = 20.0 + torch.arange(k, dtype=a.dtype)
    return a / a.sum(-1, keepdim=True)


def data(b: int = 3, n: int = N, d: int = 16, seed: int = 0) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randn(b, n, d, generator=g)
    sig = {
        "cls_attn": peaked_attention(b, n, [3, 5, 4][:b] + [4] * max(0, b - 3), seed),
        "cls_attn_layers": (2.0 * torch.randn(b, 14, n, generator=g)).softmax(-1),
        "keys": torch.randn(b, n, 8, generator=g),
    }
    return tokens, sig


def signals_for(method: str, sig: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    info = vtoken.get_method(method)
    return {k: v for k, v in sig.items() if k in info.signals}


def cut(sig: dict[str, torch.Tensor], i: int, n: int) -> dict[str, torch.Tensor]:
    return {k: (v[i:i + 1, :, :n] if k == "cls_attn_layers" else v[i:i + 1, :n]) for k, v in sig.items()}


# ---------------------------------------------------------------------------------------------------------------
# ops
# ---------------------------------------------------------------------------------------------------------------


def test_cls_attention_matches_full_softmax_per_head_and_full_width() -> None:
    g = torch.Generator().manual_seed(1)
    q, k = torch.randn(2, 10, 32, generator=g), torch.randn(2, 10, 32, generator=g)
    qh, kh = split_heads(q, 4), split_heads(k, 4)
    full = ((qh @ kh.transpose(-1, -2)) * 8 ** -0.5).softmax(-1)                 # [B, H, T, T]
    att = cls_attention(q, k, num_heads=4)
    torch.testing.assert_close(att.rows, full[:, :, 0])
    torch.testing.assert_close(att.mean, full[:, :, 0, 1:].mean(1))
    torch.testing.assert_close(att.logits, (qh[:, :, :1] @ kh.transpose(-1, -2)).squeeze(2) * 8 ** -0.5)
    torch.testing.assert_close(cls_attention(qh, kh).rows, att.rows)             # pre-split input
    one = cls_attention(q, k, num_heads=1)                                         # PruMerge: one full-width head
    torch.testing.assert_close(one.mean, ((q @ k.transpose(1, 2)) * 32 ** -0.5).softmax(-1)[:, 0, 1:])
    mid = cls_attention(q, k, num_heads=4, query_index=3)
    torch.testing.assert_close(mid.mean, torch.cat([full[:, :, 3, :3], full[:, :, 3, 4:]], -1).mean(1))
    torch.testing.assert_close(cls_attention_logits(q, k, 4, scale=1.0), att.logits * 8 ** 0.5)
    torch.testing.assert_close(head_mean(k, 4), kh.mean(1))
    assert cls_attention(q.half(), k.half(), num_heads=4).rows.dtype == torch.float32


def test_percentile_and_iqr_match_numpy() -> None:
    g = torch.Generator().manual_seed(2)
    x = torch.rand(4, 101, generator=g) ** 4
    m = torch.rand(4, 101, generator=g) > 0.3
    for q in (0, 25, 50, 75, 90, 100):
        got = percentile(x, q, m)
        ref = torch.tensor([float(np.percentile(x[i][m[i]].numpy(), q)) for i in range(4)])
        # numpy's linear interpolation rounds differently across releases: equal to a few float32 ulps
        torch.testing.assert_close(got, ref.to(got.dtype), rtol=1e-6, atol=0)
    count, frac = iqr_outlier_fraction(x, m)
    for i in range(4):
        v = x[i][m[i]].numpy()
        q1, q3 = np.percentile(v, 25), np.percentile(v, 75)
        c = int((v > q3 + 1.5 * (q3 - q1)).sum())
        assert int(count[i]) == c and float(frac[i]) == c / len(v)
    pc, pf = iqr_outlier_fraction(x, pooled=True)                                 # one statistic for the batch
    v = x.numpy().ravel()
    q1, q3 = np.percentile(v, 25), np.percentile(v, 75)
    c = int((v > q3 + 1.5 * (q3 - q1)).sum())
    assert pc.tolist() == [c] * 4 and pf.tolist() == [c / v.size] * 4


# ---------------------------------------------------------------------------------------------------------------
# per-method behaviour
# ---------------------------------------------------------------------------------------------------------------


def test_vtc_cls_keeps_highest_summed_attention_excluding_last_layer() -> None:
    tokens, sig = data()
    layers = sig["cls_attn_layers"].clone()
    layers[:, -1, 0] = 100.0                   # the last layer is not part of the default ensemble
    layers[:, 0, 1] = 100.0                    # nor is a layer before start_layer
    red = vtoken.reduce(tokens, keep=7, method="vtc_cls", cls_attn_layers=layers, start_layer=2)
    score = layers[:, 2:-1].sum(1)
    want = score.topk(7, dim=1).indices.sort(1).values
    assert torch.equal(red.indices, want)
    assert torch.equal(red.tokens, tokens.gather(1, want[..., None].expand(-1, -1, tokens.shape[2])))
    assert torch.equal(red.extras["order"], score.topk(7, dim=1).indices)
    with_last = vtoken.reduce(tokens, keep=7, method="vtc_cls", cls_attn_layers=layers, start_layer=2, end_layer=None)
    assert bool((with_last.indices == 0).any(-1).all())


def test_hired_keeps_top_cls_attention_in_positional_order() -> None:
    tokens, sig = data()
    red = vtoken.reduce(tokens, keep=0.25, method="hired", cls_attn=sig["cls_attn"])
    want = sig["cls_attn"].topk(9, dim=1).indices.sort(1).values
    assert torch.equal(red.indices, want)


def test_visionzip_contextual_is_target_plus_mean_of_assigned() -> None:
    tokens, sig = data(b=2)
    keep, m = 12, 3
    red = vtoken.reduce(tokens, keep=keep, method="visionzip", cls_attn=sig["cls_attn"], keys=sig["keys"],
                        contextual=m)
    assert red.tokens.shape[1] == keep and bool(red.mask.all())
    for i in range(2):                           # brute force, one sample at a time
        a, x, k = sig["cls_attn"][i], tokens[i], sig["keys"][i]
        dom = a.topk(keep - m).indices
        rest = [j for j in range(N) if j not in set(dom.tolist())]
        step = max(1, len(rest) // m)
        targets = rest[::step][:m]
        kn = k / k.norm(dim=-1, keepdim=True)
        members = [j for j in rest if j not in targets]
        choice = (kn[members] @ kn[targets].T).argmax(-1)
        for s, t in enumerate(targets):
            group = [members[u] for u in range(len(members)) if int(choice[u]) == s]
            want = x[t] + (x[group].mean(0) if group else 0.0)
            row = int((red.indices[i] == t).nonzero())
            torch.testing.assert_close(red.tokens[i, row], want)
            assert int(red.sizes[i, row]) == 1 + len(group)
            assert all(int(red.assign[i, j]) == row for j in [t, *group])
        assert sorted(red.indices[i].tolist()) == sorted(dom.tolist() + targets)
    assert red.extras["dominant"].shape == (2, keep - m)


def test_visionzip_default_split_is_the_papers_54_10() -> None:
    tokens, sig = data(b=1, n=576, d=4)
    sig = {"cls_attn": torch.rand(1, 576).softmax(-1), "keys": torch.randn(1, 576, 8)}
    for keep, dom in ((64, 54), (128, 108), (192, 162)):
        red = vtoken.reduce(tokens, keep=keep, method="visionzip", **sig)
        assert red.extras["dominant"].shape[1] == dom and red.tokens.shape[1] == keep


@pytest.mark.parametrize("class_token", [True, False])
def test_evit_fused_token_is_attention_weighted_sum(class_token: bool) -> None:
    tokens, sig = data()
    a = sig["cls_attn"]
    red = vtoken.reduce(tokens, keep=10, method="evit", cls_attn=a, class_token=class_token)
    cls = int(class_token)
    scores = a.clone()
    if class_token:
        scores[:, 0] = -1.0
    top = scores.topk(10 - 1 - cls, dim=1).indices
    kept = torch.zeros(3, N, dtype=torch.bool).scatter_(1, top, True)
    if class_token:
        kept[:, 0] = True
    dropped = ~kept
    fused = (tokens * (a * dropped)[..., None]).sum(1)
    fused_idx = torch.where(dropped, torch.arange(N), N).min(1).values
    assert red.tokens.shape[1] == 10
    for i in range(3):
        row = int((red.indices[i] == fused_idx[i]).nonzero())
        torch.testing.assert_close(red.tokens[i, row], fused[i])
        assert torch.equal(red.assign[i][dropped[i]], torch.full((int(dropped[i].sum()),), row))
        assert int(red.sizes[i, row]) == int(dropped[i].sum())
        others = [j for j in range(10) if j != row]
        assert set(red.indices[i, others].tolist()) == set(kept[i].nonzero().flatten().tolist())
    if class_token:
        assert bool((red.indices[:, 0] == 0).all())                     # CLS protected
        assert torch.equal(red.extras["order"][:, 0], torch.zeros(3, dtype=torch.long))
    plain = vtoken.reduce(tokens, keep=10, method="evit", cls_attn=a, class_token=class_token, fuse_token=False)
    assert plain.tokens.shape[1] == 10 and plain.extras["order"].shape[1] == 10
    assert int((plain.assign >= 0).sum()) == 30                          # dropped tokens go nowhere


def test_prumerge_counts_adapt_to_outliers_per_sample() -> None:
    peaks = [3, 9]
    a = peaked_attention(2, N, peaks)
    tokens, sig = data(b=2)
    red = vtoken.reduce(tokens, keep=N - 1, method="prumerge", cls_attn=a, keys=sig["keys"])
    want = [int(N * (p / N)) + 1 for p in peaks]                # kept outliers + the summary token
    assert red.counts.tolist() == want
    assert vtoken.get_method("prumerge").exact is False
    for i, p in enumerate(peaks):
        kept = red.extras["order"][i, :want[i] - 1]
        assert set(kept.tolist()) == set(a[i].topk(p).indices.tolist())
        assert float(red.extras["ratio"][i]) == p / N
    capped = vtoken.reduce(tokens, keep=5, method="prumerge", cls_attn=a, keys=sig["keys"])
    assert capped.counts.tolist() == [4, 5]                     # at most keep
    pooled = vtoken.reduce(tokens, keep=N - 1, method="prumerge", cls_attn=a, keys=sig["keys"], pooled_iqr=True)
    assert pooled.counts[0] == pooled.counts[1]                 # official: one statistic for the whole batch
    exact = vtoken.reduce(tokens, keep=7, method="prumerge", cls_attn=a, keys=sig["keys"], adaptive=False)
    assert exact.counts.tolist() == [7, 7]


def test_prumerge_merge_rule() -> None:
    tokens, sig = data(b=1)
    a, keys = sig["cls_attn"], sig["keys"]
    red = vtoken.reduce(tokens, keep=6, method="prumerge", cls_attn=a, keys=keys, adaptive=False, neighbors=4)
    kn = keys[0] / keys[0].norm(dim=-1, keepdim=True)
    order = red.extras["order"][0]
    kept = order[:-1]
    for i in kept.tolist():
        sim = kn @ kn[i]
        sim[i] = -float("inf")
        nb = sim.topk(4).indices
        want = tokens[0, i] + (a[0, nb, None] * tokens[0, nb]).sum(0)
        torch.testing.assert_close(red.tokens[0, int((red.indices[0] == i).nonzero())], want)
    rest = torch.ones(N, dtype=torch.bool)
    rest[kept] = False
    summary = (a[0, rest, None] * tokens[0, rest]).sum(0)
    assert int(order[-1]) == int(rest.nonzero()[0])
    torch.testing.assert_close(red.tokens[0, int((red.indices[0] == order[-1]).nonzero())], summary)


def test_prumerge_plus_adds_spatial_tokens() -> None:
    a = peaked_attention(1, N, [4])
    tokens, sig = data(b=1)
    red = vtoken.reduce(tokens, keep=N - 1, method="prumerge_plus", cls_attn=a, keys=sig["keys"], grid=(SIDE, SIDE))
    ratio = 4 / N
    stride = max(1, int(int(1 / ratio) / 3))
    top = a[0].topk(4).indices.tolist()
    spatial = [p for p in range(0, N - 1, stride) if p not in top]
    assert red.extras["order"][0, :-1].tolist() == top + spatial
    exact = vtoken.reduce(tokens, keep=9, method="prumerge_plus", cls_attn=a, keys=sig["keys"], adaptive=False)
    assert exact.counts.tolist() == [9]
    order = exact.extras["order"][0, :-1].tolist()
    assert len(set(order)) == 8
    stride = N // 4
    assert order[-4:] == list(range(stride // 2, N - 1, stride))[:4]          # half the budget on the raster


# ---------------------------------------------------------------------------------------------------------------
# contract: masks, batch == alone, dtypes, errors
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("keep", [10, 0.3])
@pytest.mark.parametrize("method", METHODS)
def test_batch_equals_each_sample_alone_with_masks(method: str, keep: int | float) -> None:
    tokens, sig = data(b=3)
    lengths = [N, 30, 33]
    mask = torch.arange(N)[None] < torch.tensor(lengths)[:, None]
    kw = signals_for(method, sig)
    extra = {"grid": (SIDE, SIDE)} if method == "prumerge_plus" else {}
    red = vtoken.reduce(tokens, keep=keep, method=method, mask=mask, **kw, **extra)
    for i, n in enumerate(lengths):
        alone = vtoken.reduce(tokens[i:i + 1, :n], keep=keep, method=method, **cut(kw, i, n))
        k = int(alone.counts[0])
        assert int(red.counts[i]) == k
        assert torch.equal(red.indices[i, :k], alone.indices[0])
        assert bool((red.indices[i, k:] == -1).all()) and not bool(red.mask[i, k:].any())
        assert bool((red.indices[i, :k] < n).all())                         # padded tokens never selected
        torch.testing.assert_close(red.tokens[i, :k], alone.tokens[0], atol=1e-5, rtol=1e-5)
        assert bool((red.tokens[i, k:] == 0).all())
        if alone.assign is not None:
            assert torch.equal(red.assign[i, :n], alone.assign[0])
            assert bool((red.assign[i, n:] == -1).all())                    # padded tokens never merged


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("method", METHODS)
def test_low_precision(method: str, dtype: torch.dtype) -> None:
    tokens, sig = data(b=2)
    kw = {k: v.to(dtype) for k, v in signals_for(method, sig).items()}
    ref_kw = {k: v.float() for k, v in kw.items()}
    low = vtoken.reduce(tokens.to(dtype), keep=8, method=method, **kw)
    ref = vtoken.reduce(tokens.to(dtype).float(), keep=8, method=method, **ref_kw)
    assert low.tokens.dtype == dtype
    assert torch.equal(low.indices, ref.indices)
    torch.testing.assert_close(low.tokens.float(), ref.tokens, atol=0.05, rtol=0.02)


@pytest.mark.parametrize("method", METHODS)
def test_registration_and_missing_signal(method: str) -> None:
    info = vtoken.get_method(method)
    assert info.parity and info.fixture == method and info.stage in ("encoder", "pre_llm")
    assert set(info.signal_spec) <= set(info.signals) | set(info.optional_signals)
    assert info.exact is (method not in ("prumerge", "prumerge_plus"))
    tokens, sig = data(b=1)
    kw = signals_for(method, sig)
    missing = next(iter(kw))
    kw.pop(missing)
    with pytest.raises(ValueError, match=missing):
        vtoken.reduce(tokens, keep=4, method=method, **kw)
    full = vtoken.reduce(tokens, keep=N, method=method, **signals_for(method, sig))
    assert torch.equal(full.tokens, tokens)                                   # keep >= N: unchanged
