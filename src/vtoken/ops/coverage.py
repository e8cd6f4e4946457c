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


def _gains(cover: Tensor, best: Tensor) -> Tensor:
    """``[B, N]`` marginal gains ``sum_r max(C[r, j] - best_r, 0)`` of every column."""
    return (cover - best[:, :, None]).clamp_min(0.0).sum(dim=1)


def greedy_max_coverage(cover: Tensor, counts: Tensor, candidates: Tensor | None = None, lazy: int = 32) -> Tensor:
    """Greedy maximum coverage of ``cover [B, R, N]`` (non-negative), batched over ``B``.

    Step: pick ``argmax_j gain_j`` over candidate, unselected ``j`` (ties -> lowest index), where
    ``gain_j = sum_r max(C[r, j] - best_r, 0)``, then ``best = max(best, C[:, pick])`` with ``best`` starting at 0.

    Lazy evaluation (Minoux, 1978), exact: gains only shrink as ``best`` grows (submodularity), so the last known gain
    of a column bounds its current one. Each step re-evaluates only the ``lazy`` columns with the highest bounds
    (O(R * lazy)); when the best of them beats every other bound strictly, it is the exact argmax. Otherwise (a
    rare near-tie) every gain is recomputed, O(R * N), as plain greedy does. ``lazy=0`` always recomputes.

    Args:
        cover: ``[B, R, N]`` coverage matrix.
        counts: ``[B]`` long, picks per sample (at most the number of candidates of each sample).
        candidates: optional ``[B, N]`` bool, True on selectable columns.
        lazy: columns re-evaluated per step before falling back to a full recomputation.

    Returns:
        ``[B, K]`` long, the selection order, ``-1`` after ``counts[b]`` picks.
    """
    cover = float32(cover)
    b, _, n = cover.shape
    k = int(counts.max())
    ar = torch.arange(b, device=cover.device)
    avail = torch.ones(b, n, dtype=torch.bool, device=cover.device) if candidates is None else candidates.clone()
    best = cover.new_zeros(b, cover.shape[1])
    bound = _gains(cover, best)
    order = torch.empty(b, k, dtype=torch.long, device=cover.device)
    m = min(int(lazy), n)
    for i in range(k):
        open_bound = bound.masked_fill(~avail, float("-inf"))
        pick = None
        if i > 0 and m > 0:
            top = torch.sort(open_bound, dim=1, descending=True, stable=True)
            cand = top.indices[:, :m]
            exact = (cover.gather(2, cand[:, None, :].expand(-1, cover.shape[1], -1)) - best[:, :, None]) \
                .clamp_min(0.0).sum(dim=1)
            exact = exact.masked_fill(~avail.gather(1, cand), float("-inf"))
            bound.scatter_(1, cand, exact)
            top_exact = exact.max(dim=1).values
            rival = top.values[:, m] if m < n else torch.full_like(top_exact, float("-inf"))
            if bool((top_exact > rival).all()):
                pick = torch.where(exact == top_exact[:, None], cand, n).min(dim=1).values
        if pick is None:
            bound = _gains(cover, best)
            pick = bound.masked_fill(~avail, float("-inf")).argmax(dim=1)
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
