"""Determinantal point processes: conditional kernels and fast greedy MAP inference, batched over ``B``.

Greedy MAP follows Chen, Zhang and Zhou, "Fast Greedy MAP Inference for Determinantal Point Process to Improve
Recommendation Diversity" (NeurIPS 2018): the Cholesky factor of the selected sub-kernel grows by one row per step
(a rank-one update of every token's residual variance ``d2``), so no determinant is ever recomputed.

Shapes: ``B`` batch, ``N`` items, ``K = max(counts)`` selected items.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from .similarity import float32

__all__ = ["conditional_kernel", "greedy_map", "greedy_map_rows"]

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
    """Fast greedy MAP inference of a DPP with an explicit kernel ``[B, N, N]`` (see :func:`greedy_map_rows`)."""
    kernel = float32(kernel)
    ar = torch.arange(kernel.shape[0], device=kernel.device)
    return greedy_map_rows(kernel.diagonal(dim1=1, dim2=2), lambda j: kernel[ar, j], counts, mask)


def greedy_map_rows(diag: Tensor, row: Callable[[Tensor], Tensor], counts: Tensor,
                    mask: Tensor | None = None) -> Tensor:
    """Fast greedy MAP inference of a DPP, batched over ``B``, reading only the kernel rows it picks.

    Args:
        diag: ``[B, N]`` the kernel's diagonal ``L_jj``.
        row: ``row(j [B]) -> [B, N]`` the kernel row ``L[b, j[b], :]`` (computed on demand: ``K`` rows, never the
            ``N x N`` matrix).
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
    diag = float32(diag)
    b, n = diag.shape
    k = int(counts.max())
    ar = torch.arange(b, device=diag.device)
    if mask is not None:
        diag = diag.masked_fill(~mask, 0.0)
    tiny = (diag.amax(dim=1) * _RTOL).clamp_min(torch.finfo(diag.dtype).tiny)
    d2 = diag.clone() if mask is None else diag.masked_fill(~mask, float("-inf"))
    cis = diag.new_zeros(k, b, n)
    order = torch.empty(b, k, dtype=torch.long, device=diag.device)
    for i in range(k):
        # exhausted residuals compare as exact zeros, so rank-deficient picks go to the lowest index, not to noise
        live = d2 > tiny[:, None]
        j = torch.where(live, d2, torch.where(torch.isinf(d2), d2, 0.0)).argmax(dim=1)
        order[:, i] = j
        dj = d2[ar, j]
        r = float32(row(j))
        if i > 0:
            r = r - torch.einsum("tb,tbn->bn", cis[:i, ar, j], cis[:i])
        ok = dj > tiny
        e = torch.where(ok[:, None], r / dj.clamp_min(tiny).sqrt()[:, None], 0.0)
        cis[i] = e
        d2 = d2 - e * e
        d2[ar, j] = float("-inf")
    keep = torch.arange(k, device=diag.device)[None, :] < counts.to(diag.device)[:, None]
    return torch.where(keep, order, -1)
