"""Coverage maximisation: soft affinity targets and the greedy max-coverage selection, batched over ``B``.

A coverage matrix ``C [B, R, N]`` says how well candidate ``j`` covers target row ``r``. The objective of a selected
set ``S`` is ``f(S) = sum_r max_{j in S} C[r, j]`` (a facility-location function: monotone and submodular, so the
greedy pick of the largest marginal gain is a ``1 - 1/e`` approximation).

Shapes: ``B`` batch, ``R`` target rows, ``N`` candidates, ``C`` channels, ``K = max(counts)``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .similarity import float32, l2_normalize

__all__ = ["coverage_value", "greedy_max_coverage", "softmax_affinity"]


def softmax_affinity(queries: Tensor, keys: Tensor, temperature: float, *, query_mask: Tensor | None = None,
                     key_mask: Tensor | None = None, eps: float = 1e-8) -> Tensor:
    """Row-stochastic cosine affinity ``softmax(cos(q, k) / temperature) / R_valid``: ``[B, R, N]``.

    Args:
        queries: ``[B, R, C]`` target rows; keys: ``[B, N, C]`` candidates (rows L2-normalised with norm floor
            ``eps``, computed in float32).
        temperature: softmax temperature (logits are multiplied by ``1 / temperature``).
        query_mask: optional ``[B, R]`` bool; masked rows are all zero and not counted in ``R_valid``.
        key_mask: optional ``[B, N]`` bool; masked columns get zero probability.

    Each valid row is a distribution over the valid keys divided by the number of valid rows, so the block sums to 1.
    """
    q = l2_normalize(float32(queries), eps)
    k = l2_normalize(float32(keys), eps)
    logits = (q @ k.transpose(-1, -2)) * (1.0 / temperature)
    if key_mask is not None:
        logits = logits.masked_fill(~key_mask[:, None, :], float("-inf"))
    prob = logits.softmax(dim=-1)
    if query_mask is None:
        return prob / queries.shape[1]
    rows = query_mask.sum(-1).clamp(min=1).to(prob.dtype)
    return torch.where(query_mask[:, :, None], prob / rows[:, None, None], 0.0)


def greedy_max_coverage(cover: Tensor, counts: Tensor, candidates: Tensor | None = None) -> Tensor:
    """Greedy maximum coverage of ``cover [B, R, N]`` (non-negative), batched over ``B``.

    Step: ``gain_j = sum_r max(C[r, j] - best_r, 0)`` over candidate, unselected ``j``; pick the argmax (ties ->
    lowest index); ``best = max(best, C[:, pick])`` with ``best`` starting at 0. Exact greedy costs O(R * N) per step
    (every gain may change when ``best`` moves).

    Args:
        cover: ``[B, R, N]`` coverage matrix.
        counts: ``[B]`` long, picks per sample (at most the number of candidates of each sample).
        candidates: optional ``[B, N]`` bool, True on selectable columns.

    Returns:
        ``[B, K]`` long, the selection order, ``-1`` after ``counts[b]`` picks.
    """
    cover = float32(cover)
    b, _, n = cover.shape
    k = int(counts.max())
    ar = torch.arange(b, device=cover.device)
    avail = torch.ones(b, n, dtype=torch.bool, device=cover.device) if candidates is None else candidates.clone()
    best = cover.new_zeros(b, cover.shape[1])
    order = torch.empty(b, k, dtype=torch.long, device=cover.device)
    for i in range(k):
        gain = (cover - best[:, :, None]).clamp_min(0.0).sum(dim=1)
        pick = gain.masked_fill(~avail, float("-inf")).argmax(dim=1)
        order[:, i] = pick
        avail[ar, pick] = False
        best = torch.maximum(best, cover[ar, :, pick])
    keep = torch.arange(k, device=cover.device)[None, :] < counts.to(cover.device)[:, None]
    return torch.where(keep, order, -1)


def coverage_value(cover: Tensor, selected: Tensor) -> Tensor:
    """``[B]`` facility-location value ``sum_r max_{j in S} C[r, j]`` of ``selected [B, K]`` (``-1`` ignored)."""
    cover = float32(cover)
    cols = cover.gather(2, selected.clamp(min=0)[:, None, :].expand(-1, cover.shape[1], -1))
    cols = cols.masked_fill((selected < 0)[:, None, :], 0.0)
    return cols.max(dim=2).values.clamp_min(0.0).sum(dim=1)
