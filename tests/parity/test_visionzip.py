"""Parity of ``visionzip`` with the official ``CLIPVisionTower_VisionZip.forward`` (fixture ``visionzip``).

Adapter: vtoken's tokens are the N patches, so the CLS row/column is dropped from every input (``hidden_states``,
the attention row, ``metric``); ``cls_attn`` is the head mean of the CLS row (the official head sum ranks
identically); ``keys = metric[:, 1:]``. The official ``dominant_num`` counts patches (its public ``dominant=D``
stores ``D - 1`` and adds CLS), so ``keep = dominant_num + contextual_num`` and ``contextual = contextual_num``.
The official output row 0 is the CLS token (a copy of the input); rows 1.. are compared with vtoken's tokens in
``extras["order"]`` (dominant ascending, then contextual). ``all_indices`` is ``[0, dominant + 1]``;
``target_indices`` and ``assignment`` are derived from the Reduction's indices and ``assign``.
"""

from __future__ import annotations

import pytest
import torch

import vtoken
from tests.parity.fixtures import Case, assert_close, assert_exact, cases


def official_rows(red: vtoken.Reduction) -> torch.Tensor:
    order = red.extras["order"]
    row = (red.indices[:, None, :] == order[:, :, None]).float().argmax(-1)
    return red.tokens.gather(1, row[..., None].expand(*row.shape, red.tokens.shape[-1]))


@pytest.mark.parametrize("case", cases("visionzip"))
def test_visionzip_parity(case: Case) -> None:
    ins, exp, p = case.load()
    hidden = ins["hidden_states"]
    tokens = hidden[:, 1:]
    b, n = tokens.shape[:2]
    d_num, m_num = int(p["dominant_num"]), int(p["contextual_num"])
    red = vtoken.reduce(tokens, keep=d_num + m_num, method="visionzip", cls_attn=ins["attn_cls"].mean(1)[:, 1:],
                        keys=ins["metric"][:, 1:], contextual=m_num)

    dominant = red.extras["dominant"]
    assert_exact(torch.cat([torch.zeros(b, 1, dtype=torch.long), dominant + 1], 1), exp["all_indices"],
                 "all_indices")

    # candidates = non-dominant patches in positional order; targets are the contextual tokens' indices
    dom = torch.zeros(b, n, dtype=torch.bool).scatter_(1, dominant, True)
    rank = (~dom).long().cumsum(1) - 1
    targets = red.extras["order"][:, d_num:]
    assert_exact(rank.gather(1, targets), exp["target_indices"].expand(b, -1), "target_indices")
    members = ~dom
    members.scatter_(1, targets, False)
    row_index = red.indices.gather(1, red.assign.clamp(min=0))             # source index of each input's output
    slot = (row_index[..., None] == targets[:, None, :]).float().argmax(-1)   # contextual slot of each input
    assert_exact(slot[members].reshape(b, -1), exp["assignment"], "assignment")

    assert_exact(exp["hidden_states_save"][:, 0], hidden[:, 0], "hidden_states_save CLS row (input copy)")
    assert_close(official_rows(red), exp["hidden_states_save"][:, 1:], "hidden_states_save", atol=1e-5, rtol=1e-5)
