"""Parity of ``divprune`` with the official DivPrune (CVPR 2025) golden fixtures."""

from __future__ import annotations

import pytest
import torch

import vtoken
from tests.parity.fixtures import Case, assert_close, assert_exact, cases
from vtoken.ops.similarity import cosine_distance


def official_count(ratio: float, n: int) -> int:
    """DivPrune keeps ``int(round(ratio * N))`` tokens (Python's round: banker's rounding on exact .5)."""
    return round(ratio * n)


def run(ins: dict[str, torch.Tensor], params: dict) -> dict[str, torch.Tensor]:
    """Adapter: one image ``features [N, D]`` -> the fixture's outputs."""
    x = ins["features"]
    k = official_count(params["threshold_ratio"], params["image_feature_length"])
    red = vtoken.reduce(x[None], keep=k, method="divprune")
    return {"indices": red.extras["order"][0], "cosine_distance": cosine_distance(x)}


@pytest.mark.parametrize("case", cases("divprune"))
def test_divprune_parity(case: Case) -> None:
    ins, expected, params = case.load()
    got = run(ins, params)
    assert set(case.manifest["comparison"]) == {"indices", "cosine_distance"}
    assert "indices" in expected
    assert_exact(got["indices"], expected["indices"], "indices (selection order)")
    if "cosine_distance" in expected:  # only stored for some cases
        assert_close(got["cosine_distance"], expected["cosine_distance"], "cosine_distance", atol=5e-6, rtol=1e-5)
