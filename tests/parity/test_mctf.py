"""Parity of ``mctf`` with the official MCTF ``mctf`` (multi-criteria matching, pooling, one-step-ahead attention).

The official input is per-head attention ``[B, H, T, T]``; vtoken's ``attn`` signal is its head mean. The method's
``extras["attn_next"]`` is compared with the head mean of the official fused attention, and the per-head fused maps
are rebuilt with ``ops.merge.merge_attention`` (linear per head) from the Reduction's ``assign`` and pooling weights.
"""

from __future__ import annotations

import pytest
import torch

import vtoken
from tests.parity.fixtures import assert_close, assert_exact, cases
from vtoken.ops.merge import merge_attention, source_matrix

POOLING = {0: "size", 1: "attn", 2: "max", 3: "mean"}


def official_r(r_eval: float, t: int, protected: int) -> int:
    """The official clipping of ``r``: a fraction of the unprotected tokens if < 1, ``T - r >= 10``, at most half."""
    r = int((t - protected) * r_eval) if r_eval < 1 else int(r_eval)
    if t - r < 10:
        r = t - 10
    return max(0, min(r, (t - protected) // 2))


@pytest.mark.parametrize("case", cases("mctf"))
def test_mctf_parity(case):
    ins, exp, p = case.load()
    x, attn_heads = ins["x"], ins["attn"]
    t = x.shape[1]
    protected = int(p["num_protected"])
    assert protected in (0, 1), "vtoken's class_token protects at most the leading token"
    r = official_r(float(p["r_eval"]), t, protected)
    kw = {"attn": attn_heads.mean(1), "class_token": bool(protected), "tau_sim": float(p["tau_sim"]),
          "tau_info": float(p["tau_info"]), "tau_size": float(p["tau_size"]), "bidirection": bool(p["bidirection"]),
          "pooling": POOLING[int(p["pooling_type"])], "one_step_ahead": bool(p["one_step_ahead"])}
    if "size" in ins:
        kw["sizes"] = ins["size"][..., 0]
    red = vtoken.reduce(x, keep=t - r, method="mctf", **kw)
    k = red.tokens.shape[1]
    assert k == t - r
    pos = torch.searchsorted(red.indices.contiguous(), red.extras["order"].clamp(min=0).contiguous())
    assert_close(red.tokens.gather(1, pos[..., None].expand(-1, -1, x.shape[-1])), exp["x"], "x",
                 atol=1e-5, rtol=1e-5)
    assert_exact(red.sizes.gather(1, pos)[..., None], exp["size"], "size")
    if "source" in exp:
        src = source_matrix(red.assign, k)
        assert_exact(src.gather(1, pos[..., None].expand(-1, -1, t)), exp["source"], "source")
    if "attn_next" in exp:
        idx = pos[:, None, :, None].expand(-1, 1, k, k)

        def official(a: torch.Tensor) -> torch.Tensor:  # [B, h, K, K] ascending -> official order, both axes
            a = a.gather(2, idx.expand(-1, a.shape[1], -1, -1))
            return a.gather(3, idx.transpose(2, 3).expand(-1, a.shape[1], -1, -1))

        mean_next = red.extras["attn_next"][:, None]
        assert_close(official(mean_next)[:, 0], exp["attn_next"].mean(1), "attn_next (head mean)",
                     atol=1e-6, rtol=1e-5)
        mode = "amax" if kw["pooling"] == "max" else "mean"
        heads = merge_attention(attn_heads, red.assign, k, red.extras["weights"], mode)
        assert_close(official(heads), exp["attn_next"], "attn_next (per head)", atol=1e-6, rtol=1e-5)
