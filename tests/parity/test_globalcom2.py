"""Parity of ``globalcom2`` with the official GlobalCom² LLaVA-NeXT compression (fixture ``globalcom2``).

Adapter: the thumbnail and the crops (``[n_crops, g*g]``, crops row-major over the ``rows x cols`` grid) are laid out
as vtoken's any-resolution layout (thumbnail raster, then the crop canvas in raster order, ``crop_ids`` 0 / 1 + crop),
the logits likewise (``attn_logits``); ``mask`` is the official unpadding of the canvas (checked against
``unpad_mask``). ``retention_ratio`` and ``temperature`` pass through; ``keep = valid tokens - 1`` only caps the count
(the official total never reaches it for a ratio < 1 - 1/g^2).

The official packing is rebuilt from the selection to compare its outputs: the thumbnail in score order; per crop its
kept tokens as ranks in the crop's valid-token list (``crop_topk_indices``, score order); those ranks used as raster
positions in the crop (the official scatter-back), plus a newline column on every canvas row, give
``final_valid_mask`` and the float16 ``crop_features``.
"""

from __future__ import annotations

import pytest
import torch

import vtoken
from tests.parity.fixtures import Case, assert_close, assert_exact, cases


def _canvas(x: torch.Tensor, rows: int, cols: int, g: int) -> torch.Tensor:
    """``[rows * cols, g * g, ...]`` crops -> ``[rows * g, cols * g, ...]`` canvas."""
    tail = x.shape[2:]
    return x.reshape(rows, cols, g, g, *tail).transpose(1, 2).reshape(rows * g, cols * g, *tail)


def _official_unpad(rows: int, cols: int, g: int, size: list[int]) -> torch.Tensor:
    """The official unpadding mask of the ``(rows g) x (cols g)`` canvas for an image of ``size = [W, H]``."""
    w, h = int(size[0]), int(size[1])
    ch, cw = rows * g, cols * g
    m = torch.zeros(ch, cw, dtype=torch.bool)
    if w / h > cw / ch:
        pad = (ch - int(h * cw / w)) // 2
        m[pad : ch - pad] = True
    else:
        pad = (cw - int(w * ch / h)) // 2
        m[:, pad : cw - pad] = True
    return m


@pytest.mark.parametrize("case", cases("globalcom2"))
def test_globalcom2_parity(case: Case) -> None:
    ins, exp, p = case.load()
    g = int(p["width"])
    assert int(p["height"]) == g
    rows, cols = int(p["num_patch_height"]), int(p["num_patch_width"])
    n_crops, t = rows * cols, g * g
    d = ins["base_image_feature"].shape[-1]

    canvas_mask = _official_unpad(rows, cols, g, p["original_size"])
    crop_mask = canvas_mask.reshape(rows, g, cols, g).transpose(1, 2).reshape(n_crops, t)
    assert_exact(crop_mask, exp["unpad_mask"], "unpad_mask")

    ids = torch.arange(1, n_crops + 1).repeat_interleave(t).reshape(n_crops, t)
    tokens = torch.cat([ins["base_image_feature"], _canvas(ins["crop_features"], rows, cols, g).reshape(-1, d)])
    logits = torch.cat([ins["base_cls_attn_scores"], _canvas(ins["crop_cls_attn_scores"], rows, cols, g).reshape(-1)])
    crop_ids = torch.cat([torch.zeros(t, dtype=torch.long), _canvas(ids, rows, cols, g).reshape(-1)])
    mask = torch.cat([torch.ones(t, dtype=torch.bool), canvas_mask.reshape(-1)])
    keep = int(mask.sum()) - 1
    red = vtoken.reduce(tokens[None], keep=keep, method="globalcom2", mask=mask[None], attn_logits=logits[None],
                        crop_ids=crop_ids[None], retention_ratio=float(p["retention_ratio"]),
                        temperature=float(p["temperature"]))

    order, counts = red.extras["order"][0], red.extras["view_counts"][0]
    k0 = int(counts[0])
    assert_exact(order[:k0], exp["thumbnail_indices"], "thumbnail_indices")
    assert_exact(tokens[order[:k0]], exp["thumbnail_features"], "thumbnail_features")
    assert_close(red.extras["crop_scales"][0], exp["crop_scales"], "crop_scales", atol=1e-12, rtol=0)
    assert_exact(counts[1:], exp["crop_topk_counts"], "crop_topk_counts")
    assert sorted(red.indices[0][red.mask[0]].tolist()) == sorted(order[order >= 0].tolist())

    # crop picks as ranks among their crop's valid tokens (the official indices), in score order
    picks = order[k0 : int(counts.sum())] - t
    cy, cx = picks // (cols * g), picks % (cols * g)
    crop = (cy // g) * cols + cx // g
    raster = (cy % g) * g + cx % g
    rank = crop_mask.long().cumsum(1) - 1
    valid_rank = rank[crop, raster]
    assert_exact(valid_rank, exp["crop_topk_indices"], "crop_topk_indices")

    # the official packing: ranks reused as raster positions, a newline column on every canvas row
    emitted = torch.zeros(rows * g, cols * g + 1, dtype=torch.bool)
    feats = torch.zeros(rows * g, cols * g + 1, d)
    qy = (crop // cols) * g + valid_rank // g
    qx = (crop % cols) * g + valid_rank % g
    emitted[qy, qx] = True
    feats[qy, qx] = tokens[order[k0 : int(counts.sum())]]
    emitted[:, -1] = True
    feats[:, -1] = ins["image_newline"]
    assert_exact(emitted.reshape(-1), exp["final_valid_mask"], "final_valid_mask")
    assert_exact(feats[emitted].half(), exp["crop_features"], "crop_features")
