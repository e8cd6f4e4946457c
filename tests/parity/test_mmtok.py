"""Parity of ``mmtok`` with the official MMTok golden fixtures."""

from __future__ import annotations

import pytest
import torch

import vtoken
from tests.parity.fixtures import Case, assert_close, assert_exact, cases
from vtoken.methods.mmtok import coverage_matrix


def run(ins: dict[str, torch.Tensor], params: dict) -> dict[str, torch.Tensor]:
    """Adapter: one image. ``vision_tokens [n, D]`` are the tokens, ``text_token_embedding [m, D]`` the ``text``,
    ``vision_tokens_clip [n, C]`` the ``vision_features``; the optional ``padding_patch_indices`` are excluded from
    selection but still covered (``exclude``, not ``mask``, which would remove them from the objective)."""
    x, text, clip = ins["vision_tokens"][None], ins["text_token_embedding"][None], ins["vision_tokens_clip"][None]
    n = x.shape[1]
    knobs = {"alpha": params["alpha"], "tv_temp": params["tv_temp"], "vv_temp": params["vv_temp"]}
    exclude = None
    if "padding_patch_indices" in ins:
        exclude = torch.zeros(1, n, dtype=torch.bool)
        exclude[0, ins["padding_patch_indices"].long()] = True
    k = min(int(params["target_vision_tokens"]), n)
    red = vtoken.reduce(x, keep=k, method="mmtok", text=text, vision_features=clip, exclude=exclude, **knobs)
    return {"selected_indices": red.indices[0], "selected_tokens": red.tokens[0],
            "combined": coverage_matrix(x, text, clip, **knobs)[0]}


@pytest.mark.parametrize("case", cases("mmtok"))
def test_mmtok_parity(case: Case) -> None:
    ins, expected, params = case.load()
    got = run(ins, params)
    assert set(case.manifest["comparison"]) == {"selected_indices", "selected_tokens", "combined"}
    assert_exact(got["selected_indices"], expected["selected_indices"], "selected_indices (sorted)")
    assert_exact(got["selected_tokens"], expected["selected_tokens"], "selected_tokens")
    if "combined" in expected:  # only stored for small cases
        assert_close(got["combined"], expected["combined"], "combined", atol=1e-6, rtol=1e-5)
