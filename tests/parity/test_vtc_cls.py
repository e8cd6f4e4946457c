"""Parity of ``vtc_cls`` with the official VTC-CLS ``encode_images`` (fixture ``vtc_cls``).

Adapter: the fixture's per-layer CLS rows ``[L, H, T]`` become ``cls_attn_layers [1, L, N]`` (head mean, CLS column
dropped, as the official ``attn.mean(0)[0, 1:]``); the patch features are ``hidden_states[:, 1:]``;
``keep = token_num`` and ``start_layer`` pass through (the official slice ``attentions[start_layer:-1]`` is the
method's default ``end_layer=-1``).
"""

from __future__ import annotations

import pytest

import vtoken
from tests.parity.fixtures import Case, assert_close, assert_exact, cases


@pytest.mark.parametrize("case", cases("vtc_cls"))
def test_vtc_cls_parity(case: Case) -> None:
    ins, exp, p = case.load()
    rows = ins["attn_cls_rows"]                                   # [L, H, T]
    tokens = ins["hidden_states"][:, 1:]                           # [1, N, C]
    cls_attn_layers = rows.mean(1)[:, 1:][None]                    # [1, L, N]
    red = vtoken.reduce(tokens, keep=int(p["token_num"]), method="vtc_cls", cls_attn_layers=cls_attn_layers,
                        start_layer=int(p["start_layer"]))

    assert_exact(red.extras["order"][0], exp["topk_indices"], "topk_indices")
    assert_exact(red.indices[0], exp["kept_positions"], "kept_positions")
    assert_exact(red.tokens, exp["image_features"], "image_features")
    assert_close(red.extras["scores"][0], exp["cls_attn_sum"], "cls_attn_sum", atol=1e-6, rtol=1e-5)
    assert bool(red.mask.all())
