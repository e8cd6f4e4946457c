"""Parity of ``prumerge`` with the official ``CLIPVisionTower.token_prune_merge_advanced`` (fixture ``prumerge``).

Adapter: ``cls_attn`` is rebuilt from the hooked full-width q/k with
:func:`vtoken.ops.attention.cls_attention` (``num_heads=1``: one head of width C, scale ``C ** -0.5``) and checked
against the official capture; ``keys = key[:, 1:]`` and ``tokens = hidden_states[:, 1:]`` (CLS dropped). The official
IQR statistic is pooled over the batch, so ``pooled_iqr=True`` (vtoken's default is per sample). With
``if_adaptive`` the count is the method's own, so ``keep = N - 1`` only caps it (never binding: the adaptive count is
an outlier fraction); without it ``keep = int(N * reduction_ratio) + 1`` (kept tokens + the summary token).
"""

from __future__ import annotations

import pytest
import torch

import vtoken
from tests.parity.fixtures import Case, assert_close, assert_exact, cases
from vtoken.ops.attention import cls_attention


def official_rows(red: vtoken.Reduction) -> torch.Tensor:
    """Output tokens re-ordered as ``extras["order"]`` (source index -> output row)."""
    order = red.extras["order"]
    row = (red.indices[:, None, :] == order[:, :, None]).float().argmax(-1)
    return red.tokens.gather(1, row[..., None].expand(*row.shape, red.tokens.shape[-1]))


@pytest.mark.parametrize("case", cases("prumerge"))
def test_prumerge_parity(case: Case) -> None:
    ins, exp, p = case.load()
    tokens = ins["hidden_states"][:, 1:]
    b, n = tokens.shape[:2]
    att = cls_attention(ins["query"], ins["key"], num_heads=1)
    assert_close(att.mean, exp["cls_attn"], "cls_attn", atol=1e-6, rtol=1e-5)

    adaptive = bool(p["if_adaptive"])
    if adaptive:
        keep = n - 1
    else:
        keep = int(n * float(p["reduction_ratio"])) + 1
    red = vtoken.reduce(tokens, keep=keep, method="prumerge", cls_attn=att.mean, keys=ins["key"][:, 1:],
                        adaptive=adaptive, pooled_iqr=True)

    order = red.extras["order"]
    keep_idx = order[:, :-1]
    assert_exact(keep_idx, exp["keep_idx"], "keep_idx")
    assert bool(red.mask.all())
    summary_row = (red.indices == order[:, -1:]).float().argmax(-1)            # [B]
    compl = torch.arange(n).expand(b, n)[red.assign == summary_row[:, None]].reshape(b, -1)
    assert_exact(compl, exp["complement_idx"], "complement_idx")
    expected_ratio = exp["reduction_ratio_used"]
    got_ratio = red.extras["ratio"][:1] if adaptive else torch.tensor([float(p["reduction_ratio"])],
                                                                        dtype=torch.float64)
    assert_exact(got_ratio, expected_ratio, "reduction_ratio_used")
    assert_close(official_rows(red), exp["image_features"], "image_features", atol=1e-5, rtol=1e-4)

