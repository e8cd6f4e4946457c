"""HiRED: keep the patches with the highest [CLS] attention of a late vision layer; on an any-resolution image, first
split the budget over the thumbnail and the crops by the thumbnail's early-layer [CLS] attention.

Arif et al., "HiRED: Attention-Guided Token Dropping for Efficient Inference of High-Resolution Vision-Language
Models in Resource-Constrained Environments" (AAAI 2025), https://github.com/hasanar1f/HiRED.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..core import Reduction, reduction_from_indices, topk_indices
from ..ops.crops import anyres_layout, apportion, topk_per_group
from ..ops.grid import partition_cells
from ..ops.similarity import float32
from .registry import SignalSpec, register


@register("hired", paper="HiRED: Attention-Guided Token Dropping for Efficient Inference of High-Resolution "
                         "Vision-Language Models in Resource-Constrained Environments",
          venue="AAAI 2025", repo="https://github.com/hasanar1f/HiRED", space="vision", stage="pre_llm", kind="prune",
          signals=("cls_attn",), optional_signals=("crop_ids", "cls_attn_layers"), parity=True, fixture="hired",
          signal_spec={"cls_attn": SignalSpec(layer=22, ref_depth=24, heads="mean",
                                    note="per-head softmax(q k^T * head_dim**-0.5) of CLIP layer 22 (LLaVA-1.5), "
                                            "recomputed from hooked q_proj/k_proj; the official sum over heads "
                                            "ranks identically"),
                       "cls_attn_layers": SignalSpec(layers=(0,), ref_depth=24, heads="mean",
                                           note="the initial layer (official vit_top_layer = 0): the thumbnail's "
                                                   "CLS attention there sets the crop budgets (used with crop_ids)")},
          knob_ranges={"alpha": "[0, 1]"},
          main_knobs=("alpha",),
          knob_sources={
              "alpha": "official scripts: 0.5 in the LLaVA-NeXT runs",
          })
def hired(tokens: Tensor, counts: Tensor, *, mask: Tensor | None = None, cls_attn: Tensor | None = None,
          crop_ids: Tensor | None = None, cls_attn_layers: Tensor | None = None, alpha: float = 0.5) -> Reduction:
    """Keep the ``counts[b]`` patches with the highest [CLS] attention of one vision layer, in positional order.

    Single image (no ``crop_ids``, or no crop in it): ``tokens [B, N, D]`` are the patch features, ``cls_attn [B, N]``
    the head-mean CLS attention of the scoring layer (layer 22 of CLIP ViT-L in HiRED's LLaVA-1.5 variant). This is
    HiRED's token-dropping phase for one image; the official code keeps ``int(N * token_budget_rate)`` tokens (pass that
    count as ``keep``).

    Any-resolution image (``crop_ids`` laid out as in :mod:`vtoken.ops.crops`: thumbnail then crop canvas;
    ``cls_attn`` is every view's own CLS attention): HiRED's token-budget distribution, then dropping inside each view.

    1. Thumbnail budget ``k_0 = min(floor(alpha * K), n_0)`` of the image budget ``K = counts[b]`` (the paper's
       ``alpha``, 0.5 in the official LLaVA-NeXT runs); the crops share ``K - k_0`` (what they cannot hold goes back
       to the thumbnail, so exactly ``K`` tokens are kept).
    2. Visual content of each crop: the ``floor((1 - alpha) * n_0)`` thumbnail tokens with the highest CLS attention
       of an initial layer (``cls_attn_layers[:, 0]``, layer 0 as in the official code; ``cls_attn`` when absent) are
       counted in the thumbnail region of each crop (thumbnail row ``i`` lies in crop row ``floor(i * rows / g)``, same
       for columns). Crop budgets are proportional to these counts (:func:`vtoken.ops.crops.apportion`: integer,
       capped at each crop's valid tokens, the flooring leftover to the largest remainders).
    3. Each view keeps its budget of highest-``cls_attn`` tokens.

    Deviations from the official code: its regions are contiguous chunks of the thumbnail's raster order (a reshape of
    the 576 tokens to ``(rows, cols, -1)``), here they are the crop's spatial region as the paper describes; the
    official code floors the crop budgets and loses the remainder, here the remainder is handed out so exactly ``K``
    tokens are kept; unpadded (masked) tokens are never kept.

    Args:
        alpha: the thumbnail's share of an any-resolution image's budget, in ``[0, 1]`` (default 0.5, as the
            official LLaVA-NeXT runs). The top ``1 - alpha`` of the thumbnail's early-layer tokens split the rest over
            the crops; unused without crops.

    Extras: ``order [B, K]`` kept indices in descending score order (per view, thumbnail first, with crops);
    ``view_counts [B, 1 + C]`` tokens kept per view (with crops).
    """
    scores = float32(cls_attn)
    layout = anyres_layout(crop_ids, "hired") if crop_ids is not None else None
    if layout is None:
        order = topk_indices(scores, counts, mask)
        return reduction_from_indices(tokens, order, extras={"order": order})
    if not 0.0 <= float(alpha) <= 1.0:
        raise ValueError(f"alpha (the thumbnail's share of the budget) must be in [0, 1], got {alpha!r}")
    b = scores.shape[0]
    dev = scores.device
    g, t = layout.side, layout.side ** 2
    valid = layout.view >= 0 if mask is None else mask & (layout.view >= 0)
    n_views = int(layout.n_crops.max()) + 1
    groups = torch.where(valid, layout.view, -1)
    per_view = torch.zeros(b, n_views + 1, dtype=torch.long, device=dev)
    per_view.scatter_add_(1, torch.where(groups >= 0, groups, n_views), torch.ones_like(groups))
    per_view = per_view[:, :n_views]
    n0, crops_cap = per_view[:, 0], per_view[:, 1:]
    has = layout.has_crops
    k0 = torch.floor(counts.double() * float(alpha)).long().minimum(n0)
    crop_total = (counts - k0).minimum(crops_cap.sum(1))
    k0 = torch.where(has, counts - crop_total, counts)
    # visual content: the thumbnail's top (1 - alpha) tokens of the initial layer, counted per crop region
    early = float32(cls_attn_layers[:, 0]) if cls_attn_layers is not None else scores
    m = torch.floor(torch.full((b,), float(t), dtype=torch.float64, device=dev) * (1.0 - float(alpha))).long()
    m = m.minimum(n0)
    top = topk_indices(early[:, :t], m.clamp(min=1), None if mask is None else mask[:, :t])
    top = torch.where(torch.arange(top.shape[1], device=dev)[None, :] < m[:, None], top, -1)
    side = torch.full((b,), g, dtype=torch.long, device=dev)
    cell = partition_cells(top, side, side, layout.rows.clamp(min=1), layout.cols.clamp(min=1))
    weight = torch.zeros(b, n_views, dtype=torch.float64, device=dev)  # crops, then a dump column for -1
    weight.scatter_add_(1, torch.where(cell >= 0, cell, n_views - 1), (cell >= 0).double())
    weight = weight[:, : n_views - 1]
    crop_counts = apportion(torch.where(has, crop_total, 0), weight, crops_cap)
    view_counts = torch.cat([k0[:, None], crop_counts], dim=1)
    order = topk_per_group(scores, groups, view_counts)
    return reduction_from_indices(tokens, order, extras={"order": order, "view_counts": view_counts})
