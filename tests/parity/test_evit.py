"""Parity of ``evit`` with the official EViT ``Block.forward`` token reorganisation (fixture ``evit``).

Adapter: the CLS attention rows are rebuilt from the per-head q/k with :func:`vtoken.ops.attention.cls_attention`
(checked against ``attn_cls_row`` and the head-mean ``cls_attn``); ``cls_attn = rows.mean(heads)`` over all N tokens
(CLS column ignored, ``class_token=True``); ``keep = 1 + ceil(keep_rate * (N - 1)) + fuse_token`` counts the CLS and
the fused token. The official rows [CLS, kept by descending attention, fused] are ``extras["order"]``.
"""

from __future__ import annotations

import math

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


@pytest.mark.parametrize("case", cases("evit"))
def test_evit_parity(case: Case) -> None:
    ins, exp, p = case.load()
    x = ins["x"]
    n = x.shape[1]
    att = cls_attention(ins["q"], ins["k"])
    assert_close(att.rows, exp["attn_cls_row"], "attn_cls_row", atol=1e-6, rtol=1e-5)
    assert_close(att.mean, exp["cls_attn"], "cls_attn", atol=1e-6, rtol=1e-5)

    fuse = bool(p["fuse_token"])
    left = math.ceil(float(p["keep_rate"]) * (n - 1))
    red = vtoken.reduce(x, keep=1 + left + int(fuse), method="evit", cls_attn=att.rows.mean(1), fuse_token=fuse,
                        class_token=True)

    order = red.extras["order"]
    assert bool((order[:, 0] == 0).all())
    assert_exact(order[:, 1:1 + left] - 1, exp["idx"], "idx")
    assert_close(official_rows(red), exp["x"], "x", atol=1e-6, rtol=1e-5)
    kept = torch.zeros(x.shape[:2], dtype=torch.bool).scatter_(1, exp["idx"] + 1, True)
    kept[:, 0] = True
    if fuse:                                    # the fused token gathers exactly the complement of idx
        fused_row = (red.indices == order[:, -1:]).float().argmax(-1)
        assert torch.equal(red.assign == fused_row[:, None], ~kept)
    else:
        assert torch.equal(red.assign >= 0, kept)
