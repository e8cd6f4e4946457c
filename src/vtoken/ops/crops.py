"""Crop layouts of any-resolution images (a thumbnail plus a grid of crops), integer budget splits and per-group
top-k. Batched over ``B``; no paper names.

**Any-resolution layout** (the order LLaVA-NeXT packs an image's views in, before unpadding): per sample, the
thumbnail's ``g x g`` tokens in raster order, then the crop canvas of ``(rows * g) x (cols * g)`` tokens in canvas
raster order, then padding. Crop ``(r, c)`` covers canvas rows ``[r g, (r + 1) g)`` and columns ``[c g, (c + 1) g)``.
The ``crop_ids`` signal ``[B, N]`` is ``0`` on the thumbnail, ``1 + r * cols + c`` on crop ``(r, c)`` (row-major crop
order) and ``-1`` on padding after the canvas; tokens removed by unpadding stay in place, masked out (``mask``
False). The crop grid is read from ``crop_ids`` itself: in canvas raster order the tokens at offsets
``0, g, 2g, ...`` of the canvas carry crop ids ``1, 2, ..., cols`` before the second canvas row starts over at ``1``,
so ``cols`` is the length of that run (this needs ``g >= 2``). A sample whose ``crop_ids`` has no crop (every valid
id ``0``) is a single view.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor

from ..core import prefix_mask

__all__ = ["CropLayout", "anyres_layout", "apportion", "topk_per_group"]


class CropLayout(NamedTuple):
    """A parsed any-resolution layout (see the module docstring).

    Attributes:
        side: ``g``, the thumbnail's (and every crop's) side in tokens.
        rows: ``[B]`` crop rows (0 for a single-view sample).
        cols: ``[B]`` crop columns (0 for a single-view sample).
        view: ``[B, N]`` long, the crop id of each token (0 thumbnail, ``1 + r * cols + c`` crops, -1 padding).
        y: ``[B, N]`` long, the token's row inside its view (-1 on padding and on single-view samples).
        x: ``[B, N]`` long, the token's column inside its view.
        cy: ``[B, N]`` long, the canvas row of a crop token (-1 elsewhere).
        cx: ``[B, N]`` long, the canvas column of a crop token (-1 elsewhere).
        has_crops: ``[B]`` bool, samples with at least one crop.
    """

    side: int
    rows: Tensor
    cols: Tensor
    view: Tensor
    y: Tensor
    x: Tensor
    cy: Tensor
    cx: Tensor
    has_crops: Tensor

    @property
    def n_crops(self) -> Tensor:
        """``[B]`` crops per sample."""
        return self.rows * self.cols


def anyres_layout(crop_ids: Tensor, method: str = "") -> CropLayout | None:
    """Parse ``crop_ids [B, N]`` laid out as an any-resolution image (module docstring). ``None`` when no sample has a
    crop. A ``ValueError`` (naming ``crop_ids`` and ``method``) when the ids do not follow the layout."""
    where = f"crop_ids{f' for method {method!r}' if method else ''}"
    ids = crop_ids.long()
    b, n = ids.shape
    dev = ids.device
    has = (ids > 0).any(1)
    if not bool(has.any()):
        return None
    n0 = (ids == 0).sum(1)
    g = math.isqrt(int(n0[has][0]))
    if g < 2 or not bool((n0[has] == g * g).all()):
        raise ValueError(f"{where}: every sample with crops needs a square thumbnail of the same side g >= 2 "
                         f"(crop id 0), got thumbnail sizes {n0[has].tolist()}")
    t = g * g
    ar = torch.arange(n, device=dev)
    n_crops = ids.amax(1).clamp(min=0)
    # cols: the run of crop ids 1, 2, ... at canvas offsets 0, g, 2g, ... (the first canvas row)
    c_max = int(n_crops.max())
    j = torch.arange(c_max, device=dev)
    pos = t + j * g
    ids_at = ids.gather(1, pos.clamp(max=n - 1).expand(b, c_max))
    run = ((ids_at == (j + 1)[None, :]) & (pos < n)[None, :]).long().cumprod(1).sum(1)
    cols = torch.where(has, run, 0)
    rows = torch.where(has, n_crops // cols.clamp(min=1), 0)
    if not bool((rows * cols == n_crops).all()):
        raise ValueError(f"{where}: the crop ids {n_crops[has].tolist()} do not form a rows x cols crop grid in canvas "
                         "raster order after a g x g thumbnail")
    width = cols * g
    canvas = rows * cols * t
    off = ar[None, :] - t
    in_canvas = has[:, None] & (off >= 0) & (off < canvas[:, None])
    off_c = off.clamp(min=0)
    cy = torch.where(in_canvas, off_c // width.clamp(min=1)[:, None], -1)
    cx = torch.where(in_canvas, off_c % width.clamp(min=1)[:, None], -1)
    expect = torch.where(in_canvas, 1 + (cy // g) * cols[:, None] + cx // g, -1)
    expect = torch.where(has[:, None] & (ar[None, :] < t), 0, expect)
    single = ~has[:, None]
    ok = torch.where(single, (ids == 0) | (ids == -1), ids == expect)
    if not bool(ok.all()):
        bad = int((~ok).any(1).nonzero()[0, 0])
        raise ValueError(f"{where}: sample {bad} does not follow the any-resolution layout (thumbnail g x g in raster "
                         "order with id 0, then the crop canvas in raster order with ids 1 + r * cols + c, then -1)")
    thumb = has[:, None] & (ar[None, :] < t)
    y = torch.where(thumb, ar[None, :] // g, torch.where(in_canvas, cy % g, -1))
    x = torch.where(thumb, ar[None, :] % g, torch.where(in_canvas, cx % g, -1))
    return CropLayout(g, rows, cols, ids, y, x, cy, cx, has)


def apportion(total: Tensor, weight: Tensor, cap: Tensor) -> Tensor:
    """Split ``total [B]`` into integer shares ``[B, V]`` proportional to ``weight [B, V]`` (>= 0) with
    ``share <= cap [B, V]``, summing to ``min(total, cap.sum(1))``.

    Water-filling: shares that reach their cap are fixed there and the rest is re-split among the others; then each
    share is floored and the units left go to the largest fractional parts (ties: lowest index). Where every item
    still open has zero weight, the rest is split proportionally to the remaining caps. Deterministic, per row.
    """
    cap = cap.long().clamp(min=0)
    total = total.long().minimum(cap.sum(1))
    w = weight.double().clamp(min=0) * (cap > 0)
    fixed = cap <= 0
    share = torch.zeros_like(w)
    for _ in range(w.shape[1] + 1):
        rest = (total - (cap * fixed).sum(1)).double()
        open_w = w * ~fixed
        open_w = torch.where(open_w.sum(1, keepdim=True) > 0, open_w, cap.double() * ~fixed)
        share = rest[:, None] * open_w / open_w.sum(1, keepdim=True).clamp(min=1e-300)
        hit = ~fixed & (share >= cap)
        if not bool(hit.any()):
            break
        fixed = fixed | hit
    base = torch.where(fixed, cap, share.floor().long().minimum(cap))
    left = total - base.sum(1)
    frac = torch.where(fixed, -1.0, share - share.floor())
    order = torch.sort(frac, dim=1, descending=True, stable=True).indices
    rank = torch.empty_like(order).scatter_(1, order, torch.arange(w.shape[1], device=w.device).expand_as(order))
    return base + (rank < left[:, None]).long()


def topk_per_group(scores: Tensor, groups: Tensor, counts: Tensor) -> Tensor:
    """The ``counts[b, g]`` highest ``scores [B, N]`` inside each group ``g`` of ``groups [B, N]`` (long, ``-1`` =
    never selected), ties by lowest index.

    Returns ``[B, K]`` long (``K = max_b counts[b].sum()``): group 0's picks in descending score order, then group 1's,
    ..., ``-1`` padded.
    """
    b, n = scores.shape
    n_groups = counts.shape[1]
    s = scores.float().masked_fill(groups < 0, float("-inf"))
    by_score = torch.sort(s, dim=1, descending=True, stable=True).indices
    g = groups.gather(1, by_score)
    g = torch.where(g < 0, n_groups, g)
    by_group = torch.sort(g, dim=1, stable=True).indices
    order = by_score.gather(1, by_group)
    gs = g.gather(1, by_group)
    rank = torch.arange(n, device=scores.device)[None, :] - torch.searchsorted(gs, gs)
    limit = torch.cat([counts.long(), counts.new_zeros(b, 1).long()], dim=1).gather(1, gs)
    keep = rank < limit
    total = keep.sum(1)
    k = int(total.max()) if b else 0
    first = torch.sort((~keep).to(torch.int8), dim=1, stable=True).indices[:, :k]
    picked = order.gather(1, first)
    return torch.where(prefix_mask(total, k), picked, -1)
