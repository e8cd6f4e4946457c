"""Parity of ``prumerge_plus`` with the official ``token_prune_merge_advanced_plus`` (fixture ``prumerge_plus``).

Same adapter as ``test_prumerge`` (full-width CLS attention from q/k via :func:`vtoken.ops.attention.cls_attention`,
CLS dropped, ``pooled_iqr=True``), with ``grid=(24, 24)``-style ``grid = (sqrt(N), sqrt(N))`` when N is a square: the
official spatial sampler ``arange(0, 575, s)`` is vtoken's ``arange(0, H * W - 1, s)``. The non-adaptive (training)
branch is run with ``spatial_stride = int(1 / reduction_ratio)``; cases where the official branch emits duplicate
keep indices (its de-duplication bug) are skipped with that reason.
"""

from __future__ import annotations

import math

import pytest
import torch

import vtoken
from tests.parity.fixtures import Case, assert_close, assert_exact, cases
from tests.parity.test_prumerge import official_rows
from vtoken.ops.attention import cls_attention


@pytest.mark.parametrize("case", cases("prumerge_plus"))
def test_prumerge_plus_parity(case: Case) -> None:
    ins, exp, p = case.load()
    tokens = ins["hidden_states"][:, 1:]
    b, n = tokens.shape[:2]
    side = math.isqrt(n)
    grid = (side, side) if side * side == n else (1, n)
    att = cls_attention(ins["query"], ins["key"], num_heads=1)
    assert_close(att.mean, exp["cls_attn"], "cls_attn", atol=1e-6, rtol=1e-5)

    adaptive = bool(p["if_adaptive"])
    knobs: dict = {"adaptive": adaptive, "pooled_iqr": True}
    if adaptive:
        keep = n - 1                                       # a cap that never binds: the count is the method's own
    else:
        ratio = float(p["reduction_ratio"])
        step = int(1 / ratio)
        n_spatial = len(range(int(step / 2), n - 1, step))
        keep = int(n * ratio) + n_spatial + 1
        if int(exp["keep_idx"][0].unique().numel()) < exp["keep_idx"].shape[1]:
            pytest.skip("official non-adaptive PruMerge+ emits duplicate keep indices (no de-duplication); "
                        "vtoken keeps distinct tokens")
        knobs["spatial_stride"] = step
    red = vtoken.reduce(tokens, keep=keep, method="prumerge_plus", cls_attn=att.mean, keys=ins["key"][:, 1:],
                        grid=grid, **knobs)

    order = red.extras["order"]
    assert bool(red.mask.all())
    assert_exact(order[:, :-1], exp["keep_idx"], "keep_idx")
    summary_row = (red.indices == order[:, -1:]).float().argmax(-1)
    compl = torch.arange(n).expand(b, n)[red.assign == summary_row[:, None]].reshape(b, -1)
    assert_exact(compl, exp["complement_idx"], "complement_idx")
    if adaptive:
        assert_exact(red.extras["ratio"][:1], exp["reduction_ratio_used"], "reduction_ratio_used")
    else:
        assert float(exp["reduction_ratio_used"][0]) == float(p["reduction_ratio"])
    assert_close(official_rows(red), exp["image_features"], "image_features", atol=1e-5, rtol=1e-4)
