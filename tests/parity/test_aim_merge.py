"""Parity of ``aim_merge`` with AIM's official ``bipartite_soft_matching_merge`` called with its ``r`` schedule."""

from __future__ import annotations

import pytest
import torch

import vtoken
from tests.parity.fixtures import assert_close, assert_exact, cases


@pytest.mark.parametrize("case", cases("aim_merge"))
def test_aim_merge_parity(case):
    ins, exp, p = case.load()
    x = ins["x"]
    t = x.shape[1]
    schedule, cur = [], t
    for r in p["r_schedule"]:
        r = min(int(r), cur // 2)  # the official clip
        schedule.append(r)
        cur -= r
    kw = {} if p.get("metric_is_x", True) or "metric" not in ins else {"keys": ins["metric"]}
    for s in range(len(schedule)):
        # steps 0..s in one call; its final tokens are the official output of call s
        red = vtoken.reduce(x, keep=t - sum(schedule[: s + 1]), method="aim_merge", r=schedule[: s + 1], **kw)
        assert len(red.extras["src_idx"]) == s + 1
        for name in ("unm_idx", "src_idx", "dst_idx"):
            assert_exact(red.extras[name][s], exp[f"{name}_step{s}"], f"{name}_step{s}")
        pos = torch.searchsorted(red.indices.contiguous(), red.extras["order"].clamp(min=0).contiguous())
        got = red.tokens.gather(1, pos[..., None].expand(-1, -1, x.shape[-1]))
        assert_close(got, exp[f"x_step{s}"], f"x_step{s}", atol=1e-6, rtol=1e-5)
