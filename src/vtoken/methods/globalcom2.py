"""GlobalCom²: thumbnail-guided compression of an any-resolution image (a thumbnail plus crops).

Liu et al., "Global Compression Commander: Plug-and-Play Inference Acceleration for High-Resolution Large
Vision-Language Models" (AAAI 2026, arXiv 2501.05179), https://github.com/xuyang-liu16/GlobalCom2.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ..core import Reduction, reduction_from_indices, topk_indices
from ..ops.crops import anyres_layout, apportion, topk_per_group
from ..ops.grid import bilinear_taps
from ..ops.similarity import float32
from .registry import SignalSpec, register

_EPS = 1e-12  # F.normalize's eps


def _group_sum(values: Tensor, groups: Tensor, n_groups: int) -> Tensor:
    """Sum of ``values [B, N]`` per group ``groups [B, N]`` (``-1`` = none) -> ``[B, n_groups]``."""
    out = values.new_zeros(values.shape[0], n_groups + 1)
    out.scatter_add_(1, torch.where(groups >= 0, groups, n_groups), torch.where(groups >= 0, values, 0))
    return out[:, :n_groups]


def _group_normalize(values: Tensor, groups: Tensor, n_groups: int) -> Tensor:
    """``values / max(||values of its group||_2, 1e-12)`` per group (``F.normalize(p=2)`` over each group's vector)."""
    norm = _group_sum(values * values, groups, n_groups).sqrt().clamp_min(_EPS)
    return values / norm.gather(1, groups.clamp(min=0))


@register("globalcom2", paper="Global Compression Commander: Plug-and-Play Inference Acceleration for "
                              "High-Resolution Large Vision-Language Models",
          venue="AAAI 2026", repo="https://github.com/xuyang-liu16/GlobalCom2", stage="pre_llm", kind="prune",
          signals=("attn_logits",), optional_signals=("crop_ids",), parity=True, fixture="globalcom2", exact=False,
          space="projected",
          signal_spec={"attn_logits": SignalSpec(layer=-1, heads="mean",
                                       note="PRE-softmax CLS->patch logits (q*scale @ k^T) of the LAST CLIP layer, "
                                               "head mean, every view with its own CLS (official apply_customvit)")},
          knob_ranges={"retention_ratio": "(0, 1]", "temperature": "> 0"},
          main_knobs=("retention_ratio",),
          knob_sources={
              "retention_ratio": "vtoken: None, from keep so keep is the one budget; the official default 0.25 is "
                                 "keep=25%",
              "temperature": "official code: 10",
          })
def globalcom2(tokens: Tensor, counts: Tensor, *, mask: Tensor | None = None, attn_logits: Tensor | None = None,
               crop_ids: Tensor | None = None, retention_ratio: float | None = None,
               temperature: float = 10.0) -> Reduction:
    """Global-guided compression of a LLaVA-NeXT any-resolution image.

    ``tokens [B, N, D]`` and ``attn_logits [B, N]`` (each view's head-mean pre-softmax CLS logits, last CLIP layer) in
    the any-resolution layout of :mod:`vtoken.ops.crops` given by ``crop_ids [B, N]`` (thumbnail ``g x g``, then the
    crop canvas in raster order); ``mask`` marks the tokens left by unpadding. With ``r`` the retention ratio
    (``retention_ratio``, else ``counts[b] / valid tokens``):

    1. Thumbnail: its ``floor(g^2 r)`` tokens with the highest logits.
    2. Crop scales: thumbnail token ``(i, j)`` belongs to crop cell ``(min(i // (g // rows), rows - 1),
       min(j // (g // cols), cols - 1))`` (divisors at least 1); ``m_c`` = sum of its logits per cell (float64);
       ``s = exp((m - max m) / temperature) / (sum + 1e-8)``; ``scale_c = min(r (1 + s_c - mean(s)), 1)``.
    3. Crop ``c`` keeps ``floor(n_c * scale_c)`` of its ``n_c`` valid tokens, ranked by
       ``normalize(local logits) + normalize(global)`` (L2 over the crop's valid tokens): ``global`` is the thumbnail's
       logits bilinearly resized (``align_corners=False``) to the bounding box of the valid canvas, read at the
       token's place in that box.
    4. If the total exceeds ``counts[b]`` (possible when ``r`` comes from ``keep``), the crop counts are scaled down
       to fit (:func:`vtoken.ops.crops.apportion`); so at most ``counts[b]`` tokens are kept (``exact=False``).

    Without crops (no ``crop_ids``, or none in a sample) a sample is one view: its ``counts[b]`` tokens with the
    highest logits (step 1 with ``r = counts / N``). Kept tokens stay in positional order (the official code emits the
    thumbnail in score order and writes a crop's kept tokens back at their rank among the crop's valid tokens used as a
    raster position, shifting them on padded crops; both are placement artefacts of its packing, not selections).
    GlobalCom² is meant to run first: after another method, ``mask`` (and so the canvas box) is what is left.

    Args:
        retention_ratio: ``r``, the thumbnail's keep ratio and the crops' base scale, in ``(0, 1]`` (default None,
            ``counts[b] / valid tokens``). The official module default is 0.25; only used with crops.
        temperature: the temperature of the softmax over the crops' thumbnail logit mass that sets the crop scales
            (official default 10). Larger values spread the budget more evenly over the crops.

    Extras: ``order [B, K]`` kept indices per view in descending score order (thumbnail first); ``view_counts
    [B, 1 + C]`` tokens kept per view; ``crop_scales [B, C]`` float64 (with crops).
    """
    scores = float32(attn_logits)
    layout = anyres_layout(crop_ids, "globalcom2") if crop_ids is not None else None
    if layout is None:
        order = topk_indices(scores, counts, mask)
        return reduction_from_indices(tokens, order, extras={"order": order})
    if retention_ratio is not None and not (isinstance(retention_ratio, (int, float))
                                            and 0.0 < float(retention_ratio) <= 1.0):
        raise ValueError(f"retention_ratio must be None (from keep) or a float in (0, 1], got {retention_ratio!r}")
    if not (isinstance(temperature, (int, float)) and math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature must be a positive float, got {temperature!r}")
    b = scores.shape[0]
    dev = scores.device
    g, t = layout.side, layout.side ** 2
    has = layout.has_crops
    valid = layout.view >= 0 if mask is None else mask & (layout.view >= 0)
    c_max = int(layout.n_crops.max())
    groups = torch.where(valid, layout.view, -1)
    per_view = _group_sum(torch.ones_like(groups), groups, c_max + 1)
    n0, n_crop = per_view[:, 0], per_view[:, 1:]
    n_valid = per_view.sum(1)

    # retention ratio and the thumbnail budget
    if retention_ratio is None:
        r = counts.double() / n_valid.double()
        k0 = (t * counts) // n_valid
    else:
        r = torch.full((b,), float(retention_ratio), dtype=torch.float64, device=dev)
        k0 = torch.floor(t * r).long()
    k0 = torch.where(has, k0.minimum(n0), counts)

    # crop scales from the thumbnail's logit mass per crop cell
    rows, cols = layout.rows.clamp(min=1), layout.cols.clamp(min=1)
    ar = torch.arange(g, device=dev)
    ri = torch.minimum(ar[None, :] // (g // rows).clamp(min=1)[:, None], rows[:, None] - 1)
    ci = torch.minimum(ar[None, :] // (g // cols).clamp(min=1)[:, None], cols[:, None] - 1)
    cell = (ri[:, :, None] * cols[:, None, None] + ci[:, None, :]).reshape(b, t)
    thumb = scores[:, :t]
    mass = _group_sum(thumb.double(), cell, c_max)
    real = torch.arange(c_max, device=dev)[None, :] < layout.n_crops[:, None]
    top = torch.where(real, mass, float("-inf")).amax(1, keepdim=True)
    top = torch.where(real.any(1, keepdim=True), top, 0.0)
    e = torch.exp(torch.where(real, (mass - top) / float(temperature), float("-inf")))
    s = e / (e.sum(1, keepdim=True) + 1e-8)
    mean = s.sum(1, keepdim=True) / layout.n_crops.clamp(min=1)[:, None]
    scale = (r[:, None] * (1.0 + s - mean)).clamp(max=1.0) * real
    k_crop = torch.floor(n_crop.double() * scale).long().minimum(n_crop)

    # never more than counts[b]
    over = (k0 + k_crop.sum(1)) > counts
    if bool(over.any()):
        k0 = torch.where(over, k0.minimum(counts), k0)
        k_crop = torch.where(over[:, None], apportion(counts - k0, k_crop.double(), k_crop), k_crop)
    view_counts = torch.cat([k0[:, None], k_crop], dim=1)

    # crop scores: normalised local logits + normalised thumbnail logits resized onto the valid canvas box
    in_crop = valid & (layout.view > 0)
    big = torch.iinfo(torch.long).max
    top_y = torch.where(in_crop, layout.cy, big).amin(1)
    top_x = torch.where(in_crop, layout.cx, big).amin(1)
    box_h = (torch.where(in_crop, layout.cy, -1).amax(1) - top_y + 1).clamp(min=1)
    box_w = (torch.where(in_crop, layout.cx, -1).amax(1) - top_x + 1).clamp(min=1)
    top_y, top_x = torch.where(has & (top_y < big), top_y, 0), torch.where(has & (top_x < big), top_x, 0)
    side = torch.full((b,), g, dtype=torch.long, device=dev)
    y0, y1, fy = bilinear_taps(side, box_h, int(box_h.max()))
    x0, x1, fx = bilinear_taps(side, box_w, int(box_w.max()))
    yy = (layout.cy - top_y[:, None]).clamp(0, y0.shape[1] - 1)
    xx = (layout.cx - top_x[:, None]).clamp(0, x0.shape[1] - 1)
    ya, yb, wy = y0.gather(1, yy), y1.gather(1, yy), fy.gather(1, yy).float()
    xa, xb, wx = x0.gather(1, xx), x1.gather(1, xx), fx.gather(1, xx).float()

    def tap(y: Tensor, x: Tensor) -> Tensor:
        return thumb.gather(1, y * g + x)

    glob = (1 - wy) * ((1 - wx) * tap(ya, xa) + wx * tap(ya, xb)) + wy * ((1 - wx) * tap(yb, xa) + wx * tap(yb, xb))
    crop_groups = torch.where(in_crop, layout.view, -1)
    local = torch.where(in_crop, scores, 0.0)
    glob = torch.where(in_crop, glob, 0.0)
    combined = _group_normalize(local, crop_groups, c_max + 1) + _group_normalize(glob, crop_groups, c_max + 1)
    final = torch.where(in_crop, combined, scores)
    order = topk_per_group(final, groups, view_counts)
    return reduction_from_indices(tokens, order, extras={"order": order, "view_counts": view_counts,
                                                         "crop_scales": scale})
