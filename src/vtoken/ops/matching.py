"""Bipartite soft matching (Bolya et al., "Token Merging: Your ViT But Faster", ICLR 2023) and its repeated use.

Tokens are split by alternation into a source set ``A`` (even slots) and a destination set ``B`` (odd slots). Every
``A`` token finds its best ``B`` partner under a score matrix ``[B, nA, nB]``; the ``r`` ``A`` tokens with the best
edges are merged into their partners. Index conventions follow the official code: ``A``/``B`` positions index the
halves (token slot ``2 * a`` or ``2 * j + 1``).

Batched over ``B`` with per-sample ``r [B]`` and per-sample real-token counts (padding is packed at the end, so the
alternation is over each sample's real tokens only).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ..core import prefix_mask
from .merge import MergeState
from .similarity import float32, l2_normalize

__all__ = [
    "BipartiteMatch",
    "ab_scores",
    "bipartite_dest",
    "bipartite_soft_matching",
    "order_key",
    "pad_rows",
    "repeated_bipartite_merge",
    "round_cap",
    "round_sizes",
]


@dataclass
class BipartiteMatch:
    """Result of :func:`bipartite_soft_matching` on ``scores [B, nA, nB]``.

    Attributes:
        node_idx: ``[B, nA]`` long, best ``B`` partner of each ``A`` row (first maximum on ties).
        node_max: ``[B, nA]`` float, that best score (``-inf`` for disallowed rows).
        edge_order: ``[B, nA]`` long, ``A`` rows sorted by ``node_max`` descending (stable: ties by lowest row).
        rank: ``[B, nA]`` long, position of each row in ``edge_order``.
        r: ``[B]`` long, merges per sample: the first ``r[b]`` rows of ``edge_order`` are merged.
        merged: ``[B, nA]`` bool, True on merged ``A`` rows.
        row_valid: ``[B, nA]`` bool, rows that were allowed to merge (real and not protected).
    """

    node_idx: Tensor
    node_max: Tensor
    edge_order: Tensor
    rank: Tensor
    r: Tensor
    merged: Tensor
    row_valid: Tensor

    def src_idx(self) -> Tensor:
        """``[B, max r]`` merged ``A`` rows in descending score order, ``-1`` padded (the official ``src_idx``)."""
        k = int(self.r.max()) if self.r.numel() else 0
        src = self.edge_order[:, :k]
        return torch.where(prefix_mask(self.r, k), src, -1)

    def dst_idx(self) -> Tensor:
        """``[B, max r]`` ``B`` partner of each ``src_idx`` entry, ``-1`` padded (the official ``dst_idx``)."""
        src = self.src_idx()
        return torch.where(src >= 0, self.node_idx.gather(1, src.clamp(min=0)), -1)

    def unm_idx(self, real: Tensor, sort: bool) -> Tensor:
        """Kept real ``A`` rows (``real [B, nA]``): ascending if ``sort`` else in descending-score order, ``-1`` padded
        (the official ``unm_idx``)."""
        keep = real & ~self.merged
        na = keep.shape[1]
        pos = torch.arange(na, device=keep.device).expand_as(keep)
        key = torch.where(keep, pos if sort else self.rank, na + pos)
        order = torch.sort(key, dim=1, stable=True).indices
        k = int(keep.sum(-1).max()) if keep.numel() else 0
        return torch.where(prefix_mask(keep.sum(-1), k), order[:, :k], -1)

    def unm_key(self, real: Tensor, sort: bool) -> Tensor:
        """``[B, nA]`` float: position of each kept real ``A`` row in the ``unm_idx`` order (``inf`` elsewhere)."""
        keep = real & ~self.merged
        pos = torch.arange(keep.shape[1], device=keep.device).expand_as(keep)
        return torch.where(keep, (pos if sort else self.rank).double(), float("inf"))


def ab_scores(metric: Tensor) -> Tensor:
    """Cosine similarities ``[B, ceil(W/2), floor(W/2)]`` between even and odd slots of ``metric [B, W, C]``.

    The metric is divided by its norm (clamped at 1e-12 only to keep all-zero padding rows finite).
    """
    m = l2_normalize(float32(metric), eps=1e-12)
    return m[:, 0::2] @ m[:, 1::2].transpose(-1, -2)


def bipartite_soft_matching(scores: Tensor, r: Tensor, row_valid: Tensor, col_valid: Tensor) -> BipartiteMatch:
    """Match each ``A`` row of ``scores [B, nA, nB]`` to its best allowed column; mark the ``r[b]`` best rows merged.

    ``row_valid [B, nA]`` / ``col_valid [B, nB]``: rows that may merge and columns that may receive (protected tokens
    and padding are False: their scores become ``-inf``, as the official code does for the class token). ``r[b]`` must
    not exceed the number of valid rows of ``b``. Deterministic: ties go to the lowest index.
    """
    ninf = float("-inf")
    s = scores.masked_fill(~col_valid[:, None, :], ninf).masked_fill(~row_valid[:, :, None], ninf)
    node_max, node_idx = s.max(dim=-1)
    edge_order = torch.sort(node_max, dim=-1, descending=True, stable=True).indices
    rank = torch.argsort(edge_order, dim=-1)
    merged = rank < r[:, None]
    return BipartiteMatch(node_idx, node_max, edge_order, rank, r, merged, row_valid)


def bipartite_dest(match: BipartiteMatch, width: int, reverse: bool = False) -> Tensor:
    """``[B, width]`` long destination slot of every slot after one matching step.

    Forward (``A`` rows merged into ``B`` columns): ``A`` row ``a`` (slot ``2a``) goes to slot ``2 * node_idx + 1``.
    ``reverse=True`` is for a matching whose rows are ``B`` tokens and columns ``A`` tokens (MCTF's second step): row
    ``j`` (slot ``2j + 1``) goes to slot ``2 * node_idx``. Unmerged slots point to themselves.
    """
    b = match.merged.shape[0]
    dest = torch.arange(width, device=match.merged.device).expand(b, width).clone()
    rows = match.merged.shape[1]
    slot = 2 * torch.arange(rows, device=dest.device) + (1 if reverse else 0)
    target = 2 * match.node_idx + (0 if reverse else 1)
    dest[:, slot] = torch.where(match.merged, target, slot.expand(b, rows))
    return dest


def pad_rows(n: Tensor, width: int) -> tuple[Tensor, Tensor]:
    """``(real_A [B, ceil(W/2)], real_B [B, floor(W/2)])``: which even/odd slots are real given ``n [B]`` real slots."""
    real = prefix_mask(n, width)
    return real[:, 0::2], real[:, 1::2]


def round_sizes(remaining: Tensor, n: Tensor, protected: int, cap: int | None) -> Tensor:
    """Merges per sample in one round: ``min(remaining, (n - protected) // 2, cap)`` (the official clip), ``>= 0``."""
    r = torch.minimum(remaining, torch.div(n - protected, 2, rounding_mode="floor")).clamp(min=0)
    return r if cap is None else r.clamp(max=int(cap))


def round_cap(caps: list[int] | int | None, step: int) -> int | None:
    """The merge cap of round ``step``: an int applies to every round, a list to its rounds (later ones unlimited)."""
    if isinstance(caps, list):
        return caps[step] if step < len(caps) else None
    return caps


def _protect(width: int, b: int, protected: int, device: torch.device) -> tuple[Tensor, Tensor]:
    """Rows/columns of the ``protected`` leading slots (even ones are ``A`` rows, odd ones ``B`` columns)."""
    slots = torch.arange(width, device=device) >= protected
    return slots[0::2].expand(b, -1), slots[1::2].expand(b, -1)


def repeated_bipartite_merge(state: MergeState, counts: Tensor, *, protected: int = 0, weighted: bool = True,
                             sort_unmerged: bool = False, distill: bool = False,
                             caps: list[int] | int | None = None) -> dict[str, list[Tensor]]:
    """Bipartite soft matching rounds on ``state`` until sample ``b`` holds ``counts[b]`` tokens.

    Each round matches ``A`` (even slots) to ``B`` (odd slots) by cosine similarity of ``state.metric`` (or of the
    tokens when it is ``None``), merges ``r[b] = min(remaining, (n[b] - protected) // 2, cap)`` edges (the most a round
    can merge) and repacks the survivors in the official output order ``[unmerged A, B]`` (``unmerged A`` ascending
    if ``sort_unmerged`` else in descending-score order; ``distill`` puts slot 1 second, as ToMe's DeiT variant).
    ``weighted``: size-weighted mean (ToMe ``merge_wavg``); otherwise the plain mean of the round's members (AIM).
    The ``protected`` leading slots never merge and never receive. ``caps``: per-round maximum ``r`` (an int for
    every round, or a list whose later rounds are unlimited).

    Returns per-round lists ``unm_idx``, ``src_idx``, ``dst_idx`` (official index conventions, ``-1`` padded) and
    ``r`` (``[B]``).
    """
    rounds: dict[str, list[Tensor]] = {"unm_idx": [], "src_idx": [], "dst_idx": [], "r": []}
    remaining = (state.n - counts).clamp(min=0)
    step = 0
    while bool((remaining > 0).any()):
        r = round_sizes(remaining, state.n, protected, round_cap(caps, step))
        if not bool((r > 0).any()):
            break
        width, b = state.width, state.x.shape[0]
        metric = state.x if state.metric is None else state.metric
        scores = ab_scores(metric)
        real_a, real_b = pad_rows(state.n, width)
        prot_a, prot_b = _protect(width, b, protected, state.x.device)
        match = bipartite_soft_matching(scores, r, real_a & prot_a, real_b & prot_b)
        dest = bipartite_dest(match, width)
        key = order_key(match, real_a, width, sort_unmerged, distill=distill)
        weights = state.sizes if weighted else None
        state.step(dest, key, weights, "mean")
        rounds["unm_idx"].append(match.unm_idx(real_a, sort_unmerged))
        rounds["src_idx"].append(match.src_idx())
        rounds["dst_idx"].append(match.dst_idx())
        rounds["r"].append(r)
        remaining = remaining - r
        step += 1
    return rounds


def order_key(match: BipartiteMatch, real_a: Tensor, width: int, sort_unmerged: bool, *, distill: bool = False,
              b_key: Tensor | None = None) -> Tensor:
    """``[B, width]`` float sort key giving the official output order ``[unmerged A, B]`` of a matching round.

    ``b_key [B, nB]`` orders the ``B`` slots (default by position); ``distill`` moves slot 1 right after slot 0.
    """
    b = real_a.shape[0]
    na = real_a.shape[1]
    nb = width // 2
    key = torch.empty(b, width, dtype=torch.float64, device=real_a.device)
    key[:, 0::2] = match.unm_key(real_a, sort_unmerged)
    bk = torch.arange(nb, device=key.device, dtype=torch.float64).expand(b, nb) if b_key is None else b_key.double()
    key[:, 1::2] = na + bk
    if distill and width > 1:
        key[:, 0] = -2.0
        key[:, 1] = -1.0
    return key
