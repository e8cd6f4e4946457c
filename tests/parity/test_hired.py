"""Parity of ``hired`` with the official HiRED LLaVA-1.5 token selection (fixture ``hired``).

Adapter: the CLS attention is rebuilt from the hooked q/k with :func:`vtoken.ops.attention.cls_attention`
(``num_heads`` heads, scale ``head_dim ** -0.5``) and checked against the official ``attn_cls`` rows; its head mean
over the last N keys is ``cls_attn``; ``keep = min(N, int(N * token_budget_rate))`` as the official budget.
"""

from __future__ import annotations

import pytest
import torch

import vtoken
from tests.parity.fixtures import Case, assert_close, assert_exact, cases
from vtoken.ops.attention import cls_attention


@pytest.mark.parametrize("case", cases("hired"))
def test_hired_parity(case: Case) -> None:
    ins, exp, p = case.load()
    n = int(p["num_vision_tokens"])
    att = cls_attention(ins["query"], ins["key"], num_heads=int(p["num_heads"]))
    assert_close(att.rows, exp["attn_cls"], "attn_cls", atol=1e-6, rtol=1e-5)

    tokens = torch.randn(1, n, 8, generator=torch.Generator().manual_seed(0))   # features are not in the fixture
    keep = min(n, int(n * float(p["token_budget_rate"])))
    red = vtoken.reduce(tokens, keep=keep, method="hired", cls_attn=att.rows.mean(1)[:, -n:])

    mask = torch.zeros(n, dtype=torch.bool)
    mask[red.indices[0]] = True
    assert_exact(mask, exp["mask"], "mask")
    assert_exact(red.indices[0], exp["selected_indices"], "selected_indices")
    assert torch.equal(red.tokens[0], tokens[0, exp["selected_indices"]])
