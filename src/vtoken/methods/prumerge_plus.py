"""LLaVA-PruMerge+: PruMerge's adaptive outlier selection plus uniformly spaced spatial tokens.

Shang et al., "LLaVA-PruMerge: Adaptive Token Reduction for Efficient Large Multimodal Models" (ICCV 2025;
arXiv 2403.15388), https://github.com/42Shawn/LLaVA-PruMerge (PruMerge+).
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..core import Reduction, prefix_mask, topk_indices
from ..ops.similarity import float32
from .prumerge import PRUMERGE_SIGNAL_SPEC, adaptive_keep, compact, index_mask, merge_and_summarise
from .registry import register


def _raster_positions(valid: Tensor, stride: Tensor, offset: Tensor) -> Tensor:
    """``[B, N]`` bool: the valid tokens at raster ranks ``offset, offset + stride, ... < n - 1`` of each sample.

    The rank of a token is its position among the sample's valid tokens in row-major raster order (its flat index
    when there is no padding); ``n`` is the sample's valid count, so the last raster token is never sampled.
    """
    rank = valid.long().cumsum(1) - 1
    s, o = stride[:, None], offset[:, None]
    last = valid.sum(-1, keepdim=True) - 1
    return valid & (rank >= o) & ((rank - o) % s == 0) & (rank < last)


@register("prumerge_plus", paper="LLaVA-PruMerge: Adaptive Token Reduction for Efficient Large Multimodal Models "
                                 "(PruMerge+)",
          venue="ICCV 2025", repo="https://github.com/42Shawn/LLaVA-PruMerge",
          space="vision", stage="pre_llm", kind="merge",
          signals=("cls_attn", "keys"), optional_signals=("grid",), parity=True, fixture="prumerge_plus",
          exact=False, signal_spec=PRUMERGE_SIGNAL_SPEC,
          knob_ranges={"neighbors": ">= 0", "spatial_stride": ">= 1"},
          main_knobs=("adaptive",),
          knob_sources={
              "adaptive": "paper: PruMerge+'s IQR-adaptive count plus spatial picks",
              "pooled_iqr": "vtoken: per sample, so a batch equals each sample alone (invariant 3); the official "
                            "code pools the IQR over the batch (True)",
              "neighbors": "official code: 32",
              "spatial_stride": "vtoken: None, from keep (about half the budget); the official code strides 8 from "
                                "4 on LLaVA-1.5's 24 x 24 grid",
          })
def prumerge_plus(tokens: Tensor, counts: Tensor, *, mask: Tensor | None = None, cls_attn: Tensor | None = None,
                  keys: Tensor | None = None, grid: tuple[int, int] | None = None, adaptive: bool = True,
                  pooled_iqr: bool = False, neighbors: int = 32, spatial_stride: int | None = None) -> Reduction:
    """PruMerge with a spatial supplement: outliers by [CLS] attention plus uniformly spaced raster tokens.

    ``tokens [B, N, D]``, ``cls_attn [B, N]``, ``keys [B, N, d]`` as :func:`~vtoken.methods.prumerge.prumerge`.
    The spatial sampler walks the tokens in row-major raster order: ``grid (H, W)`` (optional; ``vtoken.reduce``
    checks ``H * W == N``) names that raster, and with padding (``mask``) the raster of a sample is its valid tokens
    in order, so positions below are ranks among a sample's ``n`` valid tokens (``n = H * W`` without padding).

    * ``adaptive`` (the paper's PruMerge+): ``ratio`` = IQR outlier fraction of the sample's CLS attention (per
      sample; ``pooled_iqr=True`` pools it over the batch as the official code), ``left = int(n * ratio)`` top tokens
      by attention, then the raster positions ``0, s, 2s, ... < n - 1`` with ``s = int(int(1 / ratio) / 3)``
      (at least 1) that are not already kept, in ascending order. The official sampler is ``arange(0, 575, s)``,
      hard-coded for LLaVA-1.5's 24 x 24 grid (575 = 24 * 24 - 1); vtoken generalises 575 to ``H * W - 1``, the
      same at N = 576. With no outlier at all (``ratio = 0``; a division by zero officially) only position 0 is
      sampled. At most ``counts[b] - 1`` tokens are kept: a prefix of that order, so spatial picks are cut first.
    * not ``adaptive``: exactly ``counts[b] - 1`` tokens: the raster positions ``s // 2, s // 2 + s, ... < n - 1``
      (``s`` = ``spatial_stride``, default ``n // ((counts[b] - 1) // 2)``, about half the budget; the official
      training branch uses ``int(1 / reduction_ratio)``), then the top-attention tokens among the others. Unlike
      that branch, a token is never kept twice (the official one concatenates both lists without de-duplication).

    Kept tokens are emitted as [attention picks by descending score, spatial picks ascending]; each absorbs its
    ``neighbors`` key-nearest tokens and one summary token of all non-kept tokens is appended (see PruMerge). Output
    counts are adaptive (``exact=False``) unless ``adaptive=False``.

    Args:
        adaptive: choose the kept count by the IQR outliers of the CLS attention plus the spatial picks, capped by
            ``keep`` (default True, the paper's PruMerge+). Without it exactly ``counts[b] - 1`` tokens are kept.
        pooled_iqr: compute the IQR statistic over the whole batch, as the official code (default False: per
            sample). Only used with ``adaptive``.
        neighbors: how many most key-similar tokens each kept token absorbs (default 32, as the official code).
        spatial_stride: the raster stride ``s`` of the spatial picks without ``adaptive`` (default None:
            ``n // ((counts[b] - 1) // 2)``, about half the budget). Ignored with ``adaptive``.

    Extras: ``order [B, K]`` output indices in the official emission order, ``ratio [B]`` float64 (the IQR outlier
    fraction; ``(counts - 1) / n`` without ``adaptive``).
    """
    b, n = tokens.shape[:2]
    dev = tokens.device
    valid = torch.ones(b, n, dtype=torch.bool, device=dev) if mask is None else mask
    a = float32(cls_attn)
    cap = counts - 1
    if adaptive:
        left, ratio = adaptive_keep(a, valid, pooled_iqr)
        step = torch.floor(1.0 / ratio)                                              # inf when ratio == 0
        stride = torch.floor(step / 3.0).clamp(1, n).long()
        spatial = _raster_positions(valid, stride, torch.zeros_like(stride))
        top = topk_indices(a, left, valid)
        extra = spatial & ~index_mask(top, n)
        emit = compact(torch.cat([top, torch.where(extra, torch.arange(n, device=dev), -1)], dim=1))
        n_keep = ((emit >= 0).sum(-1)).minimum(cap)
    else:
        ratio = cap.double() / valid.sum(-1).double()
        if spatial_stride is None:
            stride = (valid.sum(-1) // (cap // 2).clamp(min=1)).clamp(min=1)
        else:
            if int(spatial_stride) < 1:
                raise ValueError(f"spatial_stride must be >= 1, got {spatial_stride!r}")
            stride = torch.full_like(cap, int(spatial_stride))
        spatial = _raster_positions(valid, stride, stride // 2)
        rank = spatial.long().cumsum(1)
        spatial = spatial & (rank <= cap[:, None])                                   # at most cap spatial tokens
        n_fill = cap - spatial.sum(-1)
        top = topk_indices(a, n_fill, valid & ~spatial)
        emit = compact(torch.cat([top, torch.where(spatial, torch.arange(n, device=dev), -1)], dim=1))
        n_keep = cap
    emit = torch.where(prefix_mask(n_keep, emit.shape[1]), emit, -1)[:, :max(int(n_keep.max()), 0)]
    return merge_and_summarise(tokens, emit, valid, a, keys, neighbors, {"ratio": ratio})
