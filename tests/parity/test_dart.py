"""Parity of DART's retained-token selection (``get_retained_image_token``) with the official golden fixtures."""

from __future__ import annotations

import pytest
import torch

from tests.parity.fixtures import Case, assert_exact, cases
from vtoken.methods._dart_ops import dart_select


def run(ins: dict[str, torch.Tensor], params: dict) -> dict[str, torch.Tensor]:
    """Adapter: the official uses batch element 0 only, so only sample 0 is compared."""
    sel = dart_select(
        ins["last_layer_state"], ins["key_states"], int(params["image_token_start_index"]),
        params.get("image_token_length"),
        pivot_image_token=int(params["pivot_image_token"]), pivot_text_token=int(params["pivot_text_token"]),
        max_num_trunction=params.get("max_num_trunction"), reduction_ratio=float(params["reduction_ratio"]),
        text_length=params.get("text_length"),
        retain_token_num_for_llava_next=params.get("retain_token_num_for_llava_next"),
        pivot_order="official",
    )
    retained = sel.retained[0]
    return {"retained_sorted": retained[retained >= 0], "image_pivots": sel.image_pivots[0],
            "text_pivots": sel.text_pivots[0], "token_topk": sel.token_topk[:1]}


@pytest.mark.parametrize("case", cases("dart"))
def test_dart_parity(case: Case) -> None:
    ins, expected, params = case.load()
    assert set(case.manifest["comparison"]) == {"retained_sorted", "retained", "image_pivots / text_pivots",
                                                 "token_topk"}
    got = run(ins, params)
    assert_exact(got["retained_sorted"], expected["retained_sorted"], "retained_sorted")
    assert_exact(got["retained_sorted"], torch.sort(expected["retained"]).values, "retained (as a set)")
    assert_exact(got["image_pivots"], expected["image_pivots"], "image_pivots")
    assert_exact(got["text_pivots"], expected["text_pivots"], "text_pivots")
    assert_exact(got["token_topk"], expected["token_topk"], "token_topk")
