"""Duplication-aware selection around pivot tokens, batched over ``B``.

A few *pivot* tokens are chosen first (e.g. by a norm); then, pivot by pivot, the tokens of a pool that are LEAST
similar to the pivot are kept and removed from the pool, so the kept set avoids near-duplicates of the pivots. The
loop runs over the pivots (a handful), each step is O(N * D) batched work.

Shapes: ``B`` batch, ``N`` tokens, ``D`` channels, ``P`` pivots, ``K = max(counts)`` picks per pivot.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ..core import topk_indices
from .similarity import float32

__all__ = ["masked_topk", "pivot_dissimilar_select"]


def masked_topk(scores: Tensor, region: Tensor, k: int | Tensor) -> Tensor:
    """The ``k`` highest ``scores [B, N]`` among the tokens where ``region [B, N]`` is True, per sample.

    ``k`` is an ``int`` or ``[B]`` long, clipped to the region's size (``k`` larger than the region returns the
    whole region). Returns ``[B, max k]`` long indices in descending score order (ties: lowest index), ``-1`` padded.
    """
    b = scores.shape[0]
    kk = torch.as_tensor(k, dtype=torch.long, device=scores.device).reshape(-1).expand(b)
    kk = kk.clamp(min=0).minimum(region.sum(-1))
    if int(kk.max()) == 0:
        return torch.empty(b, 0, dtype=torch.long, device=scores.device)
    return topk_indices(float32(scores), kk, region)


def pivot_dissimilar_select(x: Tensor, pivots: Tensor, pool: Tensor, counts: int | Tensor,
                            eps: float = 1e-8) -> Tensor:
    """For each pivot in turn, the ``counts`` pool tokens least cosine-similar to it; picks leave the pool.

    Args:
        x: ``[B, N, D]`` token features (cosine similarity in float32, ``F.cosine_similarity`` with ``eps``).
        pivots: ``[B, P]`` long pivot indices in PROCESSING order (the order matters: earlier pivots take their picks
            out of the pool first); ``-1`` entries are skipped.
        pool: ``[B, N]`` bool, the candidate tokens (pivots are usually excluded from it by the caller).
        counts: ``int`` or ``[B]`` long, picks per pivot; a pivot takes fewer when the pool runs out.

    Step ``p`` computes ``-cos(x[pivot_p], x[j])`` for every token, keeps the ``counts`` largest among the remaining
    pool (ties: lowest index) and removes them from the pool. ``P`` steps of ``O(N D)`` batched work.

    Returns:
        ``[B, P, K]`` long picks per pivot in descending dissimilarity order, ``-1`` padded.
    """
    b = x.shape[0]
    p = pivots.shape[1]
    dev = x.device
    kk = torch.as_tensor(counts, dtype=torch.long, device=dev).reshape(-1).expand(b).clamp(min=0)
    kmax = int(kk.max()) if b else 0
    out = torch.full((b, p, kmax), -1, dtype=torch.long, device=dev)
    if kmax == 0 or p == 0:
        return out
    xf = float32(x)
    rows = torch.arange(b, device=dev)
    avail = pool.clone()
    for i in range(p):
        piv = pivots[:, i]
        live = piv >= 0
        ref = xf[rows, piv.clamp(min=0)]  # [B, D]
        dissim = -F.cosine_similarity(xf, ref[:, None, :], dim=-1, eps=eps)  # [B, N]
        take = torch.where(live, kk, 0).minimum(avail.sum(-1))
        picks = masked_topk(dissim, avail, take)
        width = picks.shape[1]
        if width == 0:
            continue
        out[:, i, :width] = picks
        ok = picks >= 0
        avail[rows[:, None].expand_as(picks)[ok], picks[ok]] = False
    return out
