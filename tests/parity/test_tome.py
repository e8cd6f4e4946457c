"""Parity of ``tome`` with the official ToMe ``bipartite_soft_matching`` + ``merge_wavg`` (+ source, unmerge)."""

from __future__ import annotations

import pytest
import torch

import vtoken
from tests.parity.fixtures import assert_close, assert_exact, cases
from vtoken.ops.merge import source_matrix, unmerge


def official_order(red: vtoken.Reduction) -> torch.Tensor:
    """Positions (into the ascending vtoken output) of the outputs in the official order (``extras["order"]``)."""
    order = red.extras["order"]
    return torch.searchsorted(red.indices.contiguous(), order.clamp(min=0).contiguous())


@pytest.mark.parametrize("case", cases("tome"))
def test_tome_parity(case):
    ins, exp, p = case.load()
    x = ins["x"]
    t = x.shape[1]
    protected = int(p["class_token"]) + int(p["distill_token"])
    r = min(int(p["r"]), (t - protected) // 2)
    kw = {"keys": ins["metric"], "class_token": bool(p["class_token"]), "distill_token": bool(p["distill_token"])}
    if "size" in ins:
        kw["sizes"] = ins["size"][..., 0]
    red = vtoken.reduce(x, keep=t - r, method="tome", **kw)
    assert red.tokens.shape[1] == t - r
    for name in ("unm_idx", "src_idx", "dst_idx"):
        assert len(red.extras[name]) == 1
        assert_exact(red.extras[name][0], exp[name], name)
    pos = official_order(red)
    gather = pos[..., None].expand(-1, -1, x.shape[-1])
    assert_close(red.tokens.gather(1, gather), exp["x"], "x", atol=1e-5, rtol=1e-5)
    assert_exact(red.sizes.gather(1, pos)[..., None], exp["size"], "size")
    if "source" in exp:
        src = source_matrix(red.assign, red.tokens.shape[1])
        assert_exact(src.gather(1, pos[..., None].expand(-1, -1, t)), exp["source"], "source")
    if "unmerged" in exp:
        assert_close(unmerge(red.tokens, red.assign), exp["unmerged"], "unmerged", atol=1e-5, rtol=1e-5)
