"""Clustering: batched k-medoids with KKZ (Katsavounidis-Kuo-Zhang) initialisation. Batched over ``B``."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .similarity import pairwise_sq_euclidean

__all__ = ["KMedoids", "kkz_init", "kmedoids", "medoid_distance"]


def medoid_distance(x: Tensor, metric: str = "euclidean", p: float = 2.0) -> Tensor:
    """Pairwise distances ``[B, N, N]`` (float32 or float64 as ``x``) of ``x [B, N, D]`` with the diagonal set to -1.

    ``metric="euclidean"``: the ``p``-norm distance (``p = 2`` via the Gram matrix, otherwise ``torch.cdist``);
    ``metric="cosine"``: ``1 - <x_i, x_j>`` of ``x / (||x|| + 1e-6)``. Every off-diagonal entry is ``>= 0`` (up to
    rounding), so the ``-1`` diagonal makes each token strictly its own nearest point (a medoid always belongs to
    its own cluster and is never re-picked by KKZ). The matrix is made exactly symmetric.
    """
    if metric == "euclidean":
        if float(p) == 2.0:
            d = pairwise_sq_euclidean(x).sqrt()
        else:
            d = torch.cdist(x, x, p=float(p))
    elif metric == "cosine":
        xn = x / (x.norm(dim=-1, keepdim=True) + 1e-6)
        d = 1.0 - xn @ xn.transpose(-1, -2)
    else:
        raise ValueError(f"distance must be 'euclidean' or 'cosine', got {metric!r}")
    # exactly symmetric: d(i, j) and d(j, i) may round differently; the 2-member-cluster tie (both members cost
    # d(i, j)) must stay an exact tie so that it breaks by lowest index in any batch
    d = 0.5 * (d + d.transpose(-1, -2))
    return d.diagonal_scatter(torch.full(d.shape[:2], -1.0, dtype=d.dtype, device=d.device), dim1=-2, dim2=-1)


def kkz_init(x: Tensor, dist: Tensor, k: int, valid: Tensor | None = None) -> Tensor:
    """KKZ initialisation (Katsavounidis, Kuo & Zhang, 1994): the first centre is the point of largest L2 norm, each
    next one the point farthest (in ``dist``) from its nearest chosen centre; ties pick the lowest index.

    ``x [B, N, D]``, ``dist [B, N, N]`` (diagonal below every other entry, see :func:`medoid_distance`),
    ``valid [B, N]`` -> ``[B, k]`` long medoid indices in selection order (a prefix-consistent greedy order: the
    first ``k_b`` serve a smaller count). ``k`` steps of ``O(N)`` batched work.
    """
    b = x.shape[0]
    neg = torch.tensor(float("-inf"), dtype=dist.dtype, device=dist.device)
    norm = x.norm(dim=-1)
    if valid is not None:
        norm = norm.masked_fill(~valid, float("-inf"))
    first = norm.argmax(-1)
    rows = torch.arange(b, device=x.device)
    out = [first]
    mind = dist[rows, first]
    if valid is not None:
        mind = torch.where(valid, mind, neg)
    mind[rows, first] = neg
    for _ in range(1, k):
        nxt = mind.argmax(-1)
        out.append(nxt)
        mind = torch.minimum(mind, dist[rows, nxt])
        mind[rows, nxt] = neg
    return torch.stack(out, dim=1)


@dataclass
class KMedoids:
    """Result of :func:`kmedoids`: ``assign [B, N]`` cluster of each point (the position of its medoid in
    ``medoids``; ``-1`` for invalid points), ``medoids [B, K]`` point index of each cluster's medoid (ascending with
    ``id_sort``, else in KKZ slot order; ``-1`` beyond ``counts[b]``), ``slots [B, K]`` the medoids in KKZ slot order
    and ``iterations [B]`` iterations run per sample."""

    assign: Tensor
    medoids: Tensor
    iterations: Tensor
    slots: Tensor


def _assign(dist: Tensor, medoids: Tensor, slot_ok: Tensor, valid: Tensor | None) -> Tensor:
    rows = torch.arange(dist.shape[0], device=dist.device)[:, None]
    dm = dist[rows, medoids.clamp(min=0)]  # [B, K, N]: rows of the medoids
    dm = dm.masked_fill(~slot_ok[..., None], float("inf"))
    assign = dm.argmin(1)  # first (lowest slot) on ties
    return assign if valid is None else torch.where(valid, assign, -1)


def kmedoids(x: Tensor, counts: Tensor, *, valid: Tensor | None = None, metric: str = "euclidean", p: float = 2.0,
             threshold: float = 1e-5, iter_limit: int = 100, stop: str = "sample", id_sort: bool = True) -> KMedoids:
    """Batched k-medoids (alternating assignment / medoid update) with KKZ initialisation.

    Args:
        x: ``[B, N, D]`` points (computed in its dtype; pass float32).
        counts: ``[B]`` long, clusters per sample (``1 <= counts[b] <=`` valid points of ``b``).
        valid: optional ``[B, N]`` bool; invalid points are never medoids and get ``assign = -1``.
        metric, p: see :func:`medoid_distance`.
        threshold, iter_limit: an iteration assigns every point to its nearest medoid (ties: lowest slot), then moves
            each medoid to the member with the smallest summed distance to its cluster (ties: lowest index); the
            shift is the summed ``||x[new] - x[old]||`` over a sample's medoids. Stops after ``iter_limit`` iterations
            or once the shift is ``< threshold``.
        stop: ``"sample"`` (each sample stops on its own shift, so a batch equals each sample alone) or ``"batch"``
            (every sample stops together once the batch mean of the shifts is ``< threshold``).
        id_sort: sort each sample's medoids ascending at the end and assign every point to its nearest medoid in that
            order (ties: lowest medoid index), as CenterCLIP's ``id_sort=True``. ``False`` keeps the KKZ slot order and
            the assignment of the last iteration, made against the medoids before their last update (the official
            ``id_sort=False`` output; it is the nearest-medoid assignment once the medoids have converged, and the
            nearest KKZ medoid when ``iter_limit`` is 0). Either way every medoid is a member of its own cluster.

    Memory ``O(B N^2 + B N K)``; each iteration is one ``[B, N, N] @ [B, N, K]`` product.
    """
    if stop not in ("sample", "batch"):
        raise ValueError(f"stop must be 'sample' or 'batch', got {stop!r}")
    b = x.shape[0]
    k = int(counts.max())
    dist = medoid_distance(x, metric, p)
    medoids = kkz_init(x, dist, k, valid)
    slot_ok = torch.arange(k, device=x.device)[None, :] < counts[:, None]
    medoids = torch.where(slot_ok, medoids, -1)
    rows = torch.arange(b, device=x.device)[:, None]
    active = torch.ones(b, dtype=torch.bool, device=x.device)
    iterations = torch.zeros(b, dtype=torch.long, device=x.device)
    slots = torch.arange(k, device=x.device)
    last_assign = None
    for _ in range(int(iter_limit)):
        assign = _assign(dist, medoids, slot_ok, valid)
        last_assign = assign if last_assign is None else torch.where(active[:, None], assign, last_assign)
        member = assign[..., None] == slots  # [B, N, K]
        cost = dist @ member.to(dist.dtype)  # cost[b, i, c] = sum_j dist[b, i, j] [j in c]
        cost = cost.masked_fill(~member, float("inf"))
        new = torch.where(slot_ok, cost.argmin(1), -1)
        moved = (x[rows, new.clamp(min=0)] - x[rows, medoids.clamp(min=0)]).norm(dim=-1)
        shift = (moved * slot_ok.to(moved.dtype)).sum(-1)
        iterations = iterations + active.long()
        medoids = torch.where(active[:, None], new, medoids)
        if stop == "batch":
            if float(shift.mean()) < threshold:
                break
        else:
            active = active & (shift >= threshold)
            if not bool(active.any()):
                break
    if not id_sort:
        assign = _assign(dist, medoids, slot_ok, valid) if last_assign is None else last_assign
        return KMedoids(assign, medoids, iterations, medoids)
    big = torch.iinfo(torch.long).max
    ordered = torch.sort(torch.where(slot_ok, medoids, big), dim=1).values  # the counts[b] medoids first
    ordered = torch.where(slot_ok, ordered, -1)
    return KMedoids(_assign(dist, ordered, slot_ok, valid), ordered, iterations, medoids)
