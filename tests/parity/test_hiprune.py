"""Parity of ``hiprune`` with HiPrune's official ``encode_images`` (LLaVA-1.5 integration, fixture ``hiprune``).

Adapter: each full attention map ``[B, H, 1+N, 1+N]`` becomes one layer of ``attn_received_layers [B, 2, N]`` the
way the official code reduces it (mean over heads, then over every query row, CLS column dropped): the object layer
first, the select layer second (the method's defaults ``object_layer=0, deep_layer=-1``). ``keep`` is the official
per-image budget ``int(HIPRUNE_RETENTION / B)``; the official buffers use the hard-coded 24-wide grid, i.e. the
square grid of the 576 tokens (``neighbours="raster"``, the default).
"""

from __future__ import annotations

import math

import pytest
import torch

import vtoken
from tests.parity.fixtures import Case, assert_close, assert_exact, cases


def received(attn: torch.Tensor) -> torch.Tensor:
    """``[B, H, 1+N, 1+N]`` softmax attention -> ``[B, N]`` attention received (heads, then all queries)."""
    return attn.mean(dim=1).mean(dim=1)[:, 1:]


@pytest.mark.parametrize("case", cases("hiprune"))
def test_hiprune_parity(case: Case) -> None:
    ins, exp, p = case.load()
    x = ins["image_features"]
    b, n = x.shape[:2]
    side = math.isqrt(n)
    sig = torch.stack([received(ins["attn_object_layer"]), received(ins["attn_select_layer"])], dim=1)
    red = vtoken.reduce(x, keep=int(p["HIPRUNE_RETENTION"] / b), method="hiprune", attn_received_layers=sig,
                        grid=(side, n // side), alpha=float(p["HIPRUNE_ALPHA"]))

    masks = torch.zeros(b, n, dtype=torch.bool)
    masks.scatter_(1, red.indices.clamp(min=0), red.mask)
    assert_exact(masks, exp["index_masks"], "index_masks")
    kept = exp["image_features"][exp["index_masks"]].reshape(b, -1, x.shape[-1])
    assert_exact(red.tokens, kept, "image_features (kept rows)")
    shallow = red.extras.get("object_attention", sig[:, 0])  # absent only when every token is kept (identity)
    assert_close(shallow, exp["shallow_global_attention"], "shallow_global_attention", atol=1e-7, rtol=1e-5)
