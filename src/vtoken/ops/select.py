"""Greedy diversity selection, batched over ``B``: farthest-point (max-min dispersion) and k-center.

Both are the same greedy loop (Gonzalez, 1985): keep a running vector ``min_dist [B, N]`` with each token's distance
to its nearest selected token, pick the token that maximises it, and fold in the distances to the newest pick only.
Each step is O(N) batched work given a distance matrix (:func:`max_min_select`) or O(N * C) from features
(:func:`k_center_select`, no ``N x N`` matrix); selected rows are never re-reduced.

Shapes: ``B`` batch, ``N`` tokens, ``C`` feature channels, ``K = max(counts)`` selected tokens.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from .similarity import float32, l2_normalize

__all__ = ["covering_radius", "farthest_point_order", "k_center_select", "max_min_select",
           "nearest_neighbor_distance", "point_distances"]

_NORM_EPS = 1e-12  # only changes all-zero rows (plain division would give NaN); any other row is divided exactly


def _valid(mask: Tensor | None, b: int, n: int, device: torch.device) -> Tensor:
    return torch.ones(b, n, dtype=torch.bool, device=device) if mask is None else mask


def farthest_point_order(first: Tensor, row: Callable[[Tensor], Tensor], counts: Tensor,
                         mask: Tensor | None = None) -> Tensor:
    """Greedy farthest-point order from a given first pick.

    Args:
        first: ``[B]`` long, the first selected token of each sample (a valid token).
        row: ``row(idx [B]) -> [B, N]`` float distances from token ``idx[b]`` to every token of sample ``b``.
        counts: ``[B]`` long, tokens to select per sample (``1 <= counts[b] <=`` valid tokens of ``b``).
        mask: optional ``[B, N]`` bool, True on real tokens; others are never selected.

    Step ``i > 0`` picks ``argmax_j min_{s in S} d(s, j)`` over valid, unselected ``j`` (ties -> lowest index), then
    updates ``min_dist = minimum(min_dist, row(pick))``: O(N) per step, batched over ``B``.

    Returns:
        ``[B, K]`` long, the selection order, ``-1`` after ``counts[b]`` picks.
    """
    b = first.shape[0]
    k = int(counts.max())
    pick = first.long()
    ar = torch.arange(b, device=pick.device)
    min_dist = float32(row(pick))
    n = min_dist.shape[1]
    avail = _valid(mask, b, n, pick.device).clone()
    order = torch.empty(b, k, dtype=torch.long, device=pick.device)
    order[:, 0] = pick
    avail[ar, pick] = False
    for i in range(1, k):
        pick = min_dist.masked_fill(~avail, float("-inf")).argmax(dim=1)
        order[:, i] = pick
        avail[ar, pick] = False
        min_dist = torch.minimum(min_dist, float32(row(pick)))
    keep = torch.arange(k, device=pick.device)[None, :] < counts.to(pick.device)[:, None]
    return torch.where(keep, order, -1)


def nearest_neighbor_distance(dist: Tensor, mask: Tensor | None = None) -> Tensor:
    """``[B, N]``: for each column ``j`` of ``dist [B, N, N]``, the second-smallest value over the valid rows.

    With a (near-)zero diagonal this is the distance from token ``j`` to its nearest other token. Columns of a
    sample with a single valid token get ``+inf``.
    """
    d = float32(dist)
    if mask is not None:
        d = d.masked_fill(~mask[:, :, None], float("inf"))
    return d.topk(2, dim=1, largest=False).values[:, 1]


def max_min_select(dist: Tensor, counts: Tensor, mask: Tensor | None = None, first: Tensor | None = None) -> Tensor:
    """Greedy max-min diversity (farthest-point) selection on a distance matrix.

    Args:
        dist: ``[B, N, N]`` distances; row ``i`` holds the distances from a selected token ``i`` to every token.
        counts: ``[B]`` long, tokens to select per sample.
        mask: optional ``[B, N]`` bool, True on real tokens (others are never selected nor used as rows).
        first: optional ``[B]`` long first pick. Default: the token whose nearest-neighbour distance
            (:func:`nearest_neighbor_distance`) is the largest, the most isolated token (as DivPrune, CVPR 2025).

    Returns:
        ``[B, K]`` long selection order, ``-1`` after ``counts[b]`` picks.
    """
    b = dist.shape[0]
    ar = torch.arange(b, device=dist.device)
    if first is None:
        score = nearest_neighbor_distance(dist, mask)
        if mask is not None:
            score = score.masked_fill(~mask, float("-inf"))
        first = score.argmax(dim=1)
    return farthest_point_order(first, lambda idx: dist[ar, idx], counts, mask)


def point_distances(x: Tensor, centers: Tensor, metric: str = "cosine") -> Tensor:
    """Distances ``[B, N, M]`` from every row of ``x [B, N, C]`` to every row of ``centers [B, M, C]``.

    ``metric`` is ``"cosine"`` (``1 - cos``) or ``"euclidean"``; computed in float32.
    """
    x, centers = float32(x), float32(centers)
    if metric == "cosine":
        return 1.0 - l2_normalize(x, _NORM_EPS) @ l2_normalize(centers, _NORM_EPS).transpose(-1, -2)
    if metric == "euclidean":
        return torch.cdist(x, centers)
    raise ValueError(f"metric must be 'cosine' or 'euclidean', got {metric!r}")


def k_center_select(x: Tensor, counts: Tensor, mask: Tensor | None = None, first: Tensor | None = None,
                    metric: str = "cosine") -> Tensor:
    """Greedy k-center (Gonzalez) selection on features, without an ``N x N`` matrix.

    Args:
        x: ``[B, N, C]`` features.
        counts: ``[B]`` long, centers per sample.
        mask: optional ``[B, N]`` bool, True on real tokens.
        first: optional ``[B]`` long first center; default the lowest-index valid token.
        metric: ``"cosine"`` (``1 - cos``) or ``"euclidean"``.

    Each step computes the distances from the newest center to all tokens (O(N * C)) and folds them into the running
    minimum, so the covering radius ``max_j min_s d(s, j)`` is at most twice the optimum.

    Returns:
        ``[B, K]`` long selection order, ``-1`` after ``counts[b]`` picks.
    """
    if metric not in ("cosine", "euclidean"):
        raise ValueError(f"metric must be 'cosine' or 'euclidean', got {metric!r}")
    b, n = x.shape[:2]
    ar = torch.arange(b, device=x.device)
    x = float32(x)
    if metric == "cosine":
        xn = l2_normalize(x, _NORM_EPS)

        def row(idx: Tensor) -> Tensor:
            return 1.0 - (xn @ xn[ar, idx][:, :, None]).squeeze(-1)
    else:

        def row(idx: Tensor) -> Tensor:
            return (x - x[ar, idx][:, None, :]).norm(dim=-1)

    if first is None:
        first = _valid(mask, b, n, x.device).long().argmax(dim=1)
    return farthest_point_order(first, row, counts, mask)


def covering_radius(x: Tensor, selected: Tensor, mask: Tensor | None = None, metric: str = "cosine") -> Tensor:
    """``[B]`` k-center objective: the largest distance from a valid token to its nearest selected token.

    ``x [B, N, C]``, ``selected [B, K]`` long (``-1`` entries ignored), ``mask [B, N]`` optional.
    """
    b, n = x.shape[:2]
    centers = x.gather(1, selected.clamp(min=0)[:, :, None].expand(-1, -1, x.shape[2]))
    d = point_distances(x, centers, metric).masked_fill((selected < 0)[:, None, :], float("inf"))
    nearest = d.min(dim=2).values
    return nearest.masked_fill(~_valid(mask, b, n, x.device), float("-inf")).max(dim=1).values
