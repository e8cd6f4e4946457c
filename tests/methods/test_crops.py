"""Crop layouts (``vtoken.ops.crops``) and the crop-aware methods as pure-tensor methods: HiRED's any-resolution
budget distribution and GlobalCom² on ``crop_ids`` laid out as an any-resolution image."""

from __future__ import annotations

import pytest
import torch

import vtoken
from vtoken.ops.crops import anyres_layout, apportion, topk_per_group


def layout(g: int, rows: int, cols: int, cut: tuple[str, int] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``crop_ids [N]`` and ``mask [N]`` of a thumbnail + ``rows x cols`` crops; ``cut = ("rows" | "cols", pad)`` masks
    ``pad`` canvas rows / columns at both ends (unpadding)."""
    h, w = rows * g, cols * g
    y, x = torch.arange(h)[:, None].expand(h, w), torch.arange(w)[None, :].expand(h, w)
    ids = torch.cat([torch.zeros(g * g, dtype=torch.long), (1 + (y // g) * cols + x // g).reshape(-1)])
    keep = torch.ones(h, w, dtype=torch.bool)
    if cut is not None:
        axis, pad = cut
        if axis == "rows":
            keep[:pad], keep[h - pad :] = False, False
        else:
            keep[:, :pad], keep[:, w - pad :] = False, False
    return ids, torch.cat([torch.ones(g * g, dtype=torch.bool), keep.reshape(-1)])


def batch(parts: list[tuple[torch.Tensor, torch.Tensor]], d: int = 6, seed: int = 0):
    """Pad layouts into ``tokens [B, N, d]``, ``crop_ids``, ``mask`` and random logits / attention."""
    n = max(p[0].numel() for p in parts)
    g = torch.Generator().manual_seed(seed)
    ids = torch.full((len(parts), n), -1, dtype=torch.long)
    mask = torch.zeros(len(parts), n, dtype=torch.bool)
    for b, (i, m) in enumerate(parts):
        ids[b, : i.numel()], mask[b, : m.numel()] = i, m
    tokens = torch.randn(len(parts), n, d, generator=g)
    logits = torch.randn(len(parts), n, generator=g) * 3
    early = torch.rand(len(parts), 1, n, generator=g)
    return tokens, ids, mask, logits, early


def test_apportion_is_proportional_capped_and_exact():
    total = torch.tensor([10, 7, 100, 0, 5])
    weight = torch.tensor([[1.0, 1.0, 2.0], [3.0, 0.0, 1.0], [1.0, 1.0, 1.0], [1.0, 2.0, 3.0], [0.0, 0.0, 0.0]])
    cap = torch.tensor([[10, 10, 10], [2, 9, 9], [5, 6, 7], [3, 3, 3], [1, 2, 4]])
    out = apportion(total, weight, cap)
    assert out.sum(1).tolist() == [10, 7, 18, 0, 5]
    assert bool((out <= cap).all())
    assert out[0].tolist() == [3, 2, 5]                  # 2.5, 2.5, 5: the tie goes to the lower index
    assert out[1].tolist() == [2, 0, 5]                  # capped at 2, the rest re-split by weight
    assert out[4].tolist() == [1, 1, 3]                  # no weight: in proportion to the caps (0.71, 1.43, 2.86)
    for b in range(total.numel()):                       # rows are independent
        assert torch.equal(apportion(total[b : b + 1], weight[b : b + 1], cap[b : b + 1])[0], out[b])


def test_anyres_layout_reads_the_crop_grid():
    for g, rows, cols in [(2, 1, 3), (3, 2, 2), (4, 3, 1), (2, 2, 3)]:
        ids, _ = layout(g, rows, cols)
        lay = anyres_layout(ids[None])
        assert lay.side == g and lay.rows.tolist() == [rows] and lay.cols.tolist() == [cols]
        t = g * g
        assert lay.y[0, :t].tolist() == (torch.arange(t) // g).tolist()
        crop = lay.view[0, t:] - 1
        assert torch.equal(crop, (lay.cy[0, t:] // g) * cols + lay.cx[0, t:] // g)
        assert torch.equal(lay.y[0, t:], lay.cy[0, t:] % g) and torch.equal(lay.x[0, t:], lay.cx[0, t:] % g)
    assert anyres_layout(torch.zeros(2, 7, dtype=torch.long)) is None
    thumb = torch.zeros(4, dtype=torch.long)
    one_by_two = torch.cat([thumb, torch.tensor([1, 1, 2, 2, 1, 1, 2, 2])])  # canvas order of 1 x 2 crops, g = 2
    two_by_one = torch.cat([thumb, torch.tensor([1] * 4 + [2] * 4)])       # canvas order of 2 x 1 crops
    assert anyres_layout(one_by_two[None]).cols.tolist() == [2]
    assert anyres_layout(two_by_one[None]).rows.tolist() == [2]
    with pytest.raises(ValueError, match="crop_ids"):  # crop-major order of 1 x 2 crops is not the canvas order
        anyres_layout(torch.cat([thumb, torch.tensor([1, 1, 1, 1, 2, 2, 2, 2]), torch.tensor([2])])[None])
    with pytest.raises(ValueError, match="crop_ids"):
        anyres_layout(torch.cat([thumb, torch.tensor([1, 2, 1, 1, 2, 2, 1, 2])])[None])
    with pytest.raises(ValueError, match="crop_ids"):
        anyres_layout(torch.tensor([[0, 0, 0, 1, 1, 1]]))  # thumbnail of 3 tokens is not square


def test_topk_per_group_matches_brute_force():
    g = torch.Generator().manual_seed(1)
    scores = torch.randn(3, 20, generator=g)
    groups = torch.randint(-1, 3, (3, 20), generator=g)
    counts = torch.tensor([[2, 1, 3], [0, 4, 1], [5, 0, 0]])
    out = topk_per_group(scores, groups, counts)
    for b in range(3):
        want = []
        for c in range(3):
            idx = (groups[b] == c).nonzero()[:, 0]
            k = min(int(counts[b, c]), idx.numel())
            want += idx[torch.sort(scores[b, idx], descending=True, stable=True).indices[:k]].tolist()
        assert out[b][out[b] >= 0].tolist() == want


def test_hired_single_image_form_is_unchanged():
    tokens, _, _, logits, early = batch([layout(2, 1, 2)])
    plain = vtoken.reduce(tokens, keep=5, method="hired", cls_attn=logits.softmax(-1))
    zeros = torch.zeros_like(logits, dtype=torch.long)
    same = vtoken.reduce(tokens, keep=5, method="hired", cls_attn=logits.softmax(-1), crop_ids=zeros,
                         cls_attn_layers=early)
    assert torch.equal(plain.indices, same.indices)


def test_hired_distributes_the_budget_by_thumbnail_regions():
    g = 4
    ids, mask = layout(g, 2, 2)
    tokens, ids, mask, logits, early = batch([(ids, mask)])
    early[0, 0, : g * g] = 0.0
    early[0, 0, [0, 1, 4, 5, 2]] = 1.0  # the thumbnail's top-left quarter (crop 1) has 4 marks, top-right 1
    cls = logits.softmax(-1)
    red = vtoken.reduce(tokens, keep=20, method="hired", cls_attn=cls, crop_ids=ids, cls_attn_layers=early,
                        mask=mask, alpha=0.5)
    counts = red.extras["view_counts"][0]
    assert int(red.mask.sum()) == 20 and int(counts[0]) == 10
    # marks: the floor(16 * 0.5) = 8 top thumbnail tokens: 0, 1, 2, 4, 5, then 3, 6, 7 (ties: lowest index); the
    # region of thumbnail token (i, j) is crop (i // 2, j // 2): 4 marks for crop id 1, 4 for crop id 2
    marks = torch.tensor([4.0, 4.0, 0.0, 0.0])
    assert counts[1:].tolist() == apportion(torch.tensor([10]), marks[None], torch.full((1, 4), 16))[0].tolist()
    for v in range(5):  # inside a view: the highest cls_attn
        kept = red.indices[0][red.mask[0]]
        in_view = kept[ids[0, kept] == v]
        pool = (ids[0] == v).nonzero()[:, 0]
        best = pool[torch.sort(cls[0, pool], descending=True, stable=True).indices[: int(counts[v])]]
        assert sorted(in_view.tolist()) == sorted(best.tolist())


@pytest.mark.parametrize("method", ["hired", "globalcom2"])
def test_crop_aware_batch_equals_each_sample_and_skips_unpadded(method):
    single = (torch.zeros(10, dtype=torch.long), torch.ones(10, dtype=torch.bool))  # a sample with one view
    parts = [layout(4, 2, 2, ("rows", 2)), layout(4, 1, 2, ("cols", 1)), layout(4, 2, 1), single]
    tokens, ids, mask, logits, early = batch(parts)
    kw = {"cls_attn": logits.softmax(-1), "cls_attn_layers": early} if method == "hired" else {"attn_logits": logits}
    for keep in (9, 0.3):
        red = vtoken.reduce(tokens, keep=keep, method=method, mask=mask, crop_ids=ids, **kw)
        for b in range(len(parts)):
            one = vtoken.reduce(tokens[b : b + 1], keep=keep, method=method, mask=mask[b : b + 1],
                                crop_ids=ids[b : b + 1], **{k: v[b : b + 1] for k, v in kw.items()})
            k = int(one.mask.sum())
            assert red.indices[b, :k].tolist() == one.indices[0, :k].tolist() and int(red.mask[b].sum()) == k
            kept = red.indices[b][red.mask[b]]
            assert bool(mask[b, kept].all()), "an unpadded-away token was kept"
            want = int(vtoken.core.resolve_keep(keep, mask[b].sum()))
            assert k == want if method == "hired" else k <= want


def test_globalcom2_without_crops_keeps_the_top_logits():
    tokens, _, _, logits, _ = batch([layout(2, 1, 1)])
    red = vtoken.reduce(tokens, keep=3, method="globalcom2", attn_logits=logits)
    assert red.indices[0].tolist() == sorted(torch.sort(logits[0], descending=True).indices[:3].tolist())


def test_globalcom2_budget_from_keep():
    g = 4
    tokens, ids, mask, logits, _ = batch([layout(g, 2, 2, ("rows", 2))])
    n_valid = int(mask.sum())
    for keep in (10, 25, 40):
        red = vtoken.reduce(tokens, keep=keep, method="globalcom2", mask=mask, crop_ids=ids, attn_logits=logits)
        counts = red.extras["view_counts"][0]
        assert int(counts[0]) == g * g * keep // n_valid
        assert int(red.mask.sum()) == int(counts.sum()) <= keep
        scales = red.extras["crop_scales"][0]
        assert bool((scales <= 1).all())
        if bool((scales < 1).all()):  # unclipped scales average to r = keep / valid tokens
            assert abs(float(scales.mean()) - keep / n_valid) < 1e-12
    with pytest.raises(ValueError, match="retention_ratio"):
        vtoken.reduce(tokens, keep=10, method="globalcom2", mask=mask, crop_ids=ids, attn_logits=logits,
                      retention_ratio=1.5)
