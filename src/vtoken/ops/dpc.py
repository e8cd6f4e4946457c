"""Density-peak clustering with k-nearest-neighbour densities (DPC-kNN) and the per-cluster mean, batched over ``B``.

Density peaks clustering (Rodriguez & Laio, "Clustering by fast search and find of density peaks", Science 2014) with
the kNN density of Du, Ding & Jia ("Study on density peaks clustering based on k-nearest neighbors and principal
component analysis", Knowledge-Based Systems 2016), in the form token-clustering transformers use (TCFormer, CVPR
2022): every point gets a density ``rho`` from its ``knn`` nearest points and a distance ``delta`` to the nearest point
of higher density; the points with the largest ``rho * delta`` are the centres and every point joins its nearest
centre.

Determinism: implementations usually add ``rand * 1e-6`` to the densities to break exact ties. Here ties are broken
deterministically instead: among equal densities the LOWEST index counts as the denser point (a strict total order),
and equal centre scores rank the lowest index first. This is the noise-free limit of the random version (identical
whenever no two densities are within the noise amplitude), so it needs no seed and a batch equals each sample alone.

Shapes: ``B`` batch, ``N`` points, ``C`` channels, ``K = max(counts)`` clusters.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor

from .merge import merge_rows, slot_sizes
from .similarity import float32

__all__ = ["DensityPeaks", "cluster_mean", "dpc_distance", "dpc_knn", "knn_density", "parent_distance"]


class DensityPeaks(NamedTuple):
    """Result of :func:`dpc_knn`.

    Attributes:
        centers: ``[B, K]`` long, centre point indices in descending ``rho * delta`` order (the order defines the
            cluster ids); ``-1`` beyond ``counts[b]``.
        assign: ``[B, N]`` long, cluster id (position in ``centers``) of every point; ``-1`` for masked-out points.
    """

    centers: Tensor
    assign: Tensor


def _as_counts(k: int | Tensor, b: int, device: torch.device) -> Tensor:
    if isinstance(k, Tensor):
        return k.to(device=device, dtype=torch.long).reshape(-1).expand(b)
    return torch.full((b,), int(k), dtype=torch.long, device=device)


def dpc_distance(x: Tensor, mask: Tensor | None = None, scale: bool = True) -> Tensor:
    """Pairwise Euclidean distances ``[B, N, N]`` (float32/float64) of ``x [B, N, C]``, divided by ``sqrt(C)``.

    Computed from the Gram matrix in float64 (``|a|^2 + |b|^2 - 2 a.b``, one matrix product: the cancellation of
    small distances costs about ``1e-16 |a|^2``, far below float32's resolution of the coordinates themselves), then
    rounded to the working dtype, the diagonal exactly 0. Entries involving a masked-out point (``mask [B, N]``
    False) are ``+inf``. ``scale=False`` skips the ``1 / sqrt(C)`` factor.
    """
    x = float32(x)
    w = x.double()
    sq = w.square().sum(-1)
    d2 = (sq[:, :, None] + sq[:, None, :] - 2.0 * (w @ w.transpose(1, 2))).clamp(min=0.0)
    d = d2.sqrt().to(x.dtype)
    d.diagonal(dim1=1, dim2=2).zero_()
    if scale:
        d = d / math.sqrt(x.shape[-1])
    if mask is not None:
        d = d.masked_fill(~(mask[:, :, None] & mask[:, None, :]), float("inf"))
    return d


def knn_density(dist: Tensor, knn: int | Tensor, mask: Tensor | None = None) -> Tensor:
    """kNN density ``rho_i = exp(-mean_{j in kNN(i)} d_ij^2)``: ``[B, N]``.

    Args:
        dist: ``[B, N, N]`` distances with a zero diagonal (``+inf`` on masked pairs, see :func:`dpc_distance`).
        knn: ``int`` or ``[B]`` long, neighbours per point. The neighbourhood INCLUDES the point itself (its zero
            self-distance is one of the ``knn`` smallest), as in TCFormer/SparseVLM. Clipped to ``[1, valid points]``.
        mask: optional ``[B, N]`` bool; masked-out points get density ``-inf``.
    """
    b, n = dist.shape[:2]
    n_valid = torch.full((b,), n, dtype=torch.long, device=dist.device) if mask is None else mask.sum(-1)
    kk = _as_counts(knn, b, dist.device).clamp(min=1).minimum(n_valid.clamp(min=1))
    near = dist.topk(int(kk.max()), dim=-1, largest=False).values  # ascending
    sq = near.square()
    take = torch.arange(sq.shape[-1], device=dist.device)[None, None, :] < kk[:, None, None]
    mean = torch.where(take, sq, 0.0).sum(-1) / kk[:, None].to(sq.dtype)
    density = torch.exp(-mean)
    return density if mask is None else density.masked_fill(~mask, float("-inf"))


def parent_distance(dist: Tensor, density: Tensor, mask: Tensor | None = None) -> Tensor:
    """``delta_i``: distance from point ``i`` to its nearest point of higher density, ``[B, N]``.

    "Higher" is the strict total order ``rho_j > rho_i`` or (``rho_j == rho_i`` and ``j < i``): exact ties make the
    lowest index the denser point (the deterministic replacement of density noise). The densest point (no higher
    point) gets the largest distance of its sample (over valid pairs), so it always ranks as a centre. Masked-out
    points get ``-inf``.
    """
    n = dist.shape[1]
    idx = torch.arange(n, device=dist.device)
    di, dj = density[:, :, None], density[:, None, :]
    higher = (dj > di) | ((dj == di) & (idx[None, None, :] < idx[None, :, None]))
    finite = torch.where(torch.isinf(dist), float("-inf"), dist)
    dist_max = finite.flatten(1).amax(-1)[:, None, None]
    if mask is not None:
        higher = higher & mask[:, None, :]
    delta = torch.where(higher, dist, dist_max).amin(-1)
    return delta if mask is None else delta.masked_fill(~mask, float("-inf"))


def dpc_knn(x: Tensor, k: int | Tensor, *, mask: Tensor | None = None, knn: int | Tensor | None = None,
            dist: Tensor | None = None) -> DensityPeaks:
    """DPC-kNN clustering of ``x [B, N, C]`` into ``k`` clusters per sample (density peaks, kNN density).

    Args:
        x: ``[B, N, C]`` points (float32 math whatever the dtype).
        k: ``int`` or ``[B]`` long, clusters per sample (clipped to the valid points of each sample).
        mask: optional ``[B, N]`` bool, True on real points; others are never centres and get ``assign = -1``.
        knn: neighbours of the density (``int`` or ``[B]``), default ``k`` (TCFormer/SparseVLM use the cluster count).
        dist: optional precomputed ``[B, N, N]`` distances (default :func:`dpc_distance`: Euclidean / ``sqrt(C)``).

    Algorithm: ``rho`` = :func:`knn_density`, ``delta`` = :func:`parent_distance`, centres = the ``k`` largest
    ``rho * delta`` in descending order (ties: lowest index), each point joins its nearest centre (ties: the first
    centre) and every centre is forced into its own cluster. Deterministic (no density noise, see the module
    docstring). Memory ``O(B N^2)``.

    Returns:
        :class:`DensityPeaks` ``(centers [B, K], assign [B, N])``.
    """
    b, n = x.shape[:2]
    dev = x.device
    n_valid = torch.full((b,), n, dtype=torch.long, device=dev) if mask is None else mask.sum(-1)
    counts = _as_counts(k, b, dev).clamp(min=1).minimum(n_valid.clamp(min=1))
    d = dpc_distance(x, mask) if dist is None else float32(dist)
    density = knn_density(d, counts if knn is None else knn, mask)
    delta = parent_distance(d, density, mask)
    score = delta * density
    if mask is not None:
        score = score.masked_fill(~mask, float("-inf"))
    kmax = int(counts.max())
    centers = torch.sort(score, dim=1, descending=True, stable=True).indices[:, :kmax]
    slot_ok = torch.arange(kmax, device=dev)[None, :] < counts[:, None]
    centers = torch.where(slot_ok, centers, -1)
    rows = torch.arange(b, device=dev)[:, None]
    to_center = d[rows, centers.clamp(min=0)]  # [B, K, N]
    to_center = to_center.masked_fill(~slot_ok[:, :, None], float("inf"))
    assign = to_center.argmin(1)
    slots = torch.arange(kmax, device=dev).expand(b, kmax)
    # each centre belongs to its own cluster (a duplicate point could otherwise be claimed by an earlier centre);
    # unused slots write into a dummy column n that is cut off
    assign = torch.cat([assign, assign.new_zeros(b, 1)], 1).scatter(1, torch.where(slot_ok, centers, n), slots)[:, :n]
    if mask is not None:
        assign = torch.where(mask, assign, -1)
    return DensityPeaks(centers, assign)


def cluster_mean(x: Tensor, assign: Tensor, k: int, eps: float = 1e-6) -> Tensor:
    """Per-cluster average with a stabilised count: ``out[b, s] = sum_{n: assign=s} x[b, n] / (|s| + eps)``.

    ``x [B, N, D]``, ``assign [B, N]`` long (``-1`` rows are dropped) -> ``[B, k, D]`` in ``x``'s dtype. Each row is
    weighted by ``1 / (|s| + eps)`` and the weighted rows are summed (the TCFormer/SparseVLM ``index_add_`` merge);
    with the default ``eps = 1e-6`` this is the mean scaled by ``|s| / (|s| + 1e-6)``, NOT exactly the mean (kept for
    parity; ``eps=0`` gives the plain mean of non-empty clusters). Empty clusters are zeros.
    """
    size = slot_sizes(assign, k)  # [B, k] float32
    w = 1.0 / (size.gather(1, assign.clamp(min=0)) + eps)
    return merge_rows(x, assign, k, weights=w, mode="sum")
