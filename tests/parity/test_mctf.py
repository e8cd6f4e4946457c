"""Parity of ``mctf`` with the official MCTF ``mctf`` (multi-criteria matching, pooling, one-step-ahead attention).

Adapter: the official ``info`` parameters map to knobs (``num_protected`` 0/1 -> ``class_token``, ``tau_sim`` /
``tau_info`` / ``tau_size``, ``bidirection``, ``one_step_ahead``, ``pooling_type`` 0/1/2/3 -> ``pooling``
``"size"``/``"attn"``/``"max"``/``"mean"``); ``r_eval`` (a count or a ratio) becomes ``keep = T - official_r(r_eval,
T, num_protected)``; ``trace_source`` only says whether ``source`` is expected (rebuilt from ``assign``); ``prefix``
names the official info keys. Parameters a case does not carry take the official DeiT defaults (README); a parameter
the adapter does not know fails the test. The per-head attention ``[B, H, T, T]`` is passed as is, so
``extras["attn_next"]`` is the official per-head fused attention. ``ties="official"`` orders equal scores as the
official code (they occur when every criterion is off or only integer sizes are left; otherwise it is the default).
"""

from __future__ import annotations

from typing import Any

import pytest
import torch

import vtoken
from tests.parity.fixtures import Case, assert_close, assert_exact, cases
from vtoken.methods.mctf import official_r
from vtoken.ops.merge import source_matrix

POOLING = {0: "size", 1: "attn", 2: "max", 3: "mean"}
#: the official DeiT evaluation setting (README: --mctf_type [16,0,0,1,1,1,20,40,1,1,0], one CLS token)
OFFICIAL_DEFAULTS: dict[str, Any] = {"r_eval": 16, "num_protected": 1, "tau_sim": 1, "tau_info": 20, "tau_size": 40,
                                     "bidirection": 1, "one_step_ahead": 1, "pooling_type": 1, "trace_source": 0,
                                     "prefix": "student_"}


def knobs(params: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(vtoken knobs, the case's parameters completed with the official defaults); unknown parameters fail."""
    unknown = sorted(set(params) - set(OFFICIAL_DEFAULTS))
    if unknown:
        pytest.fail(f"mctf adapter: fixture parameters {unknown} have no vtoken mapping")
    p = {**OFFICIAL_DEFAULTS, **params}
    if int(p["num_protected"]) not in (0, 1):
        pytest.fail(f"mctf adapter: num_protected={p['num_protected']!r}; vtoken's class_token protects 0 or 1 token")
    if int(p["pooling_type"]) not in POOLING:
        pytest.fail(f"mctf adapter: unknown pooling_type {p['pooling_type']!r} (official: {sorted(POOLING)})")
    kw = {"class_token": bool(int(p["num_protected"])), "tau_sim": float(p["tau_sim"]),
          "tau_info": float(p["tau_info"]), "tau_size": float(p["tau_size"]), "bidirection": bool(p["bidirection"]),
          "pooling": POOLING[int(p["pooling_type"])], "one_step_ahead": bool(p["one_step_ahead"]), "ties": "official"}
    return kw, p


@pytest.mark.parametrize("case", cases("mctf"))
def test_mctf_parity(case: Case) -> None:
    ins, exp, params = case.load()
    kw, p = knobs(params)
    x, attn = ins["x"], ins["attn"]
    t = x.shape[1]
    r = official_r(p["r_eval"], t, int(p["num_protected"]))
    if "size" in ins:
        kw["sizes"] = ins["size"][..., 0]
    red = vtoken.reduce(x, keep=t - r, method="mctf", attn=attn, **kw)
    if r == 0:  # the official layer returns its input (size and source untouched, no fused attention)
        assert_close(x, exp["x"], "x", atol=0, rtol=0)
        assert red.tokens.shape[1] == t and torch.equal(red.tokens, x)
        if "size" in exp:
            assert_exact(ins["size"], exp["size"], "size")
        return
    k = red.tokens.shape[1]
    assert k == t - r
    assert ("attn_next" in red.extras) == kw["one_step_ahead"]
    pos = torch.searchsorted(red.indices.contiguous(), red.extras["order"].clamp(min=0).contiguous())
    assert_close(red.tokens.gather(1, pos[..., None].expand(-1, -1, x.shape[-1])), exp["x"], "x",
                 atol=1e-5, rtol=1e-5)
    assert_exact(red.sizes.gather(1, pos)[..., None], exp["size"], "size")
    if "source" in exp:
        src = source_matrix(red.assign, k)
        assert_exact(src.gather(1, pos[..., None].expand(-1, -1, t)), exp["source"], "source")
    if "attn_next" in exp:
        nxt = red.extras["attn_next"]  # [B, H, K, K] in ascending order -> official order on both axes
        h = nxt.shape[1]
        nxt = nxt.gather(2, pos[:, None, :, None].expand(-1, h, k, k))
        nxt = nxt.gather(3, pos[:, None, None, :].expand(-1, h, k, k))
        assert_close(nxt, exp["attn_next"], "attn_next", atol=1e-6, rtol=1e-5)
