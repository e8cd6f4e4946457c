"""Parity of ``cdpruner`` with the official CDPruner golden fixtures."""

from __future__ import annotations

import pytest
import torch

import vtoken
from tests.parity.fixtures import Case, assert_close, assert_exact, cases
from vtoken.methods.cdpruner import instruction_relevance


def run(ins: dict[str, torch.Tensor], params: dict) -> dict[str, torch.Tensor]:
    """Adapter: ``image_features [B, N, D]`` are the tokens, ``image_embeds [B, N, E]`` the ``vision_features`` and
    the shared instruction ``text_embeds [M, E]`` the ``text`` of every image; the official relevance min/max runs
    over the whole batch (``relevance_norm="batch"``)."""
    x = ins["image_features"]
    b, n = x.shape[:2]
    text = ins["text_embeds"][None].expand(b, -1, -1)
    red = vtoken.reduce(x, keep=int(params["visual_token_num"]), method="cdpruner",
                        vision_features=ins["image_embeds"], text=text, relevance_norm="batch")
    masks = torch.zeros(b, n, dtype=torch.bool)
    masks.scatter_(1, red.indices.clamp(min=0), red.mask)
    relevance = instruction_relevance(ins["image_embeds"], text, norm="batch")
    if "relevance" in red.extras:  # absent only when every token is kept (identity)
        assert torch.equal(red.extras["relevance"], relevance)
    return {"index_masks": masks, "select_idx": red.indices, "relevance": relevance}


@pytest.mark.parametrize("case", cases("cdpruner"))
def test_cdpruner_parity(case: Case) -> None:
    ins, expected, params = case.load()
    got = run(ins, params)
    assert set(case.manifest["comparison"]) == {"index_masks", "select_idx", "relevance"}
    assert_exact(got["index_masks"], expected["index_masks"], "index_masks")
    assert_exact(got["select_idx"], expected["select_idx"], "select_idx (sorted)")
    assert_close(got["relevance"], expected["relevance"], "relevance", atol=1e-6, rtol=1e-5)
