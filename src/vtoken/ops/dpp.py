"""Determinantal point processes: conditional kernels and fast greedy MAP inference, batched over ``B``.

Greedy MAP follows Chen, Zhang and Zhou, "Fast Greedy MAP Inference for Determinantal Point Process to Improve
Recommendation Diversity" (NeurIPS 2018): the Cholesky factor of the selected sub-kernel grows by one row per step
(a rank-one update of every token's residual variance ``d2``), so no determinant is ever recomputed.

Shapes: ``B`` batch, ``N`` items, ``K = max(counts)`` selected items.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .similarity import float32

__all__ = ["conditional_kernel", "greedy_map"]

#: residual variances at or below this fraction of the largest diagonal entry count as exhausted (the kernel's
#: numerical rank is used up): float32 rounding leaves residuals of ~1e-7 relative, so such picks would be noise
_RTOL = 1e-5


def conditional_kernel(similarity: Tensor, quality: Tensor, mask: Tensor | None = None) -> Tensor:
    """Quality-diversity DPP kernel ``L = diag(q) S diag(q)``: ``[B, N, N]``.

    Args:
        similarity: ``[B, N, N]`` positive semi-definite similarity ``S`` (e.g. cosine similarity).
        quality: ``[B, N]`` per-item quality ``q`` (e.g. a relevance to an instruction, which makes the DPP
            conditional on it).
        mask: optional ``[B, N]`` bool; rows and columns of masked-out items are zeroed.
    """
    q = float32(quality)
    kernel = q[:, :, None] * float32(similarity) * q[:, None, :]
    if mask is not None:
        kernel = kernel.masked_fill(~(mask[:, :, None] & mask[:, None, :]), 0.0)
    return kernel


def greedy_map(kernel: Tensor, counts: Tensor, mask: Tensor | None = None) -> Tensor:
    """Fast greedy MAP inference of a DPP, batched over ``B``.

    Args:
        kernel: ``[B, N, N]`` positive semi-definite DPP kernel ``L``.
        counts: ``[B]`` long, items to select per sample (``1 <= counts[b] <=`` valid items of ``b``).
        mask: optional ``[B, N]`` bool, True on real items; others are never selected.

    Step ``i`` picks ``j = argmax d2`` (the item with the largest marginal log-determinant gain; ties -> lowest
    index), computes the new Cholesky row ``e = (L[j] - c[:i, j] . c[:i]) / sqrt(d2[j])`` and updates ``d2 -= e**2``:
    O(i * N) per step. Once the kernel's numerical rank is exhausted (``d2[j] <= 1e-5 * max(diag L)``) the new row
    is set to zero and the remaining picks go to the lowest remaining index, so the output never has NaN or duplicates
and does not depend on rounding noise.

    Returns:
        ``[B, K]`` long, the selection order, ``-1`` after ``counts[b]`` picks.
    """
    kernel = float32(kernel)
    b, n = kernel.shape[:2]
    k = int(counts.max())
    ar = torch.arange(b, device=kernel.device)
    diag = kernel.diagonal(dim1=1, dim2=2)
    if mask is not None:
        diag = diag.masked_fill(~mask, 0.0)
    tiny = (diag.amax(dim=1) * _RTOL).clamp_min(torch.finfo(kernel.dtype).tiny)
    d2 = diag.clone() if mask is None else diag.masked_fill(~mask, float("-inf"))
    cis = kernel.new_zeros(k, b, n)
    order = torch.empty(b, k, dtype=torch.long, device=kernel.device)
    for i in range(k):
        # exhausted residuals compare as exact zeros, so rank-deficient picks go to the lowest index, not to noise
        live = d2 > tiny[:, None]
        j = torch.where(live, d2, torch.where(torch.isinf(d2), d2, 0.0)).argmax(dim=1)
        order[:, i] = j
        dj = d2[ar, j]
        row = kernel[ar, j]
        if i > 0:
            row = row - torch.einsum("tb,tbn->bn", cis[:i, ar, j], cis[:i])
        ok = dj > tiny
        e = torch.where(ok[:, None], row / dj.clamp_min(tiny).sqrt()[:, None], 0.0)
        cis[i] = e
        d2 = d2 - e * e
        d2[ar, j] = float("-inf")
    keep = torch.arange(k, device=kernel.device)[None, :] < counts.to(kernel.device)[:, None]
    return torch.where(keep, order, -1)
