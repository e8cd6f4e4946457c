"""MCTF: multi-criteria token fusion with one-step-ahead attention.

Lee, Choi, Kim. "Multi-criteria Token Fusion with One-step-ahead Attention for Efficient Vision Transformers",
CVPR 2024. https://github.com/mlvlab/MCTF
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from ..core import Reduction
from ..ops.matching import (
    ab_scores,
    bipartite_dest,
    bipartite_soft_matching,
    order_key,
    pad_rows,
    round_cap,
    round_sizes,
)
from ..ops.merge import MergeState, merge_attention
from .registry import register
from .tome import finish, per_round_caps

POOLINGS = {"size": "mean", "attn": "mean", "max": "amax", "mean": "mean"}


def _normalized_inverse(v: Tensor, real: Tensor) -> Tensor:
    """``(1 / v) / max(1 / v)`` over the real entries of ``v [B, W]`` (1 on padding)."""
    inv = 1.0 / v.clamp_min(torch.finfo(torch.float32).tiny)
    top = inv.masked_fill(~real, 0.0).amax(dim=1, keepdim=True)
    return torch.where(real, inv / top, 1.0)


def received_attention(attn: Tensor, real: Tensor) -> Tensor:
    """``[B, W]`` attention each token receives, averaged over the real query rows of ``attn [B, W, W]``."""
    q = real.to(attn.dtype)
    return (attn * q[:, :, None]).sum(1) / q.sum(1, keepdim=True).clamp_min(1.0)


def mctf_scores(state: MergeState, real: Tensor, have_sizes: bool, tau_sim: float, tau_info: float,
                tau_size: float) -> Tensor:
    """Multi-criteria score ``W_sim * W_info * W_size`` ``[B, nA, nB]`` between even (A) and odd (B) slots.

    ``W_sim = ((cos + 1) / 2) ** (1 / tau_sim)``; ``W_info = (i_A i_B) ** (1 / tau_info)`` with ``i`` the inverse of the
    attention a token receives (head and query mean), normalised by its maximum; ``W_size = (s_A s_B) ** (1 /
    tau_size)`` with ``s`` the inverse size normalised by its maximum. A temperature of 0 disables its criterion.
    """
    sim = ab_scores(state.x)
    scores = ((sim + 1.0) / 2.0) ** (1.0 / tau_sim) if tau_sim > 0 else torch.ones_like(sim)
    if tau_info > 0:
        info = _normalized_inverse(received_attention(state.attn, real), real)
        scores = scores * (info[:, 0::2, None] * info[:, None, 1::2]) ** (1.0 / tau_info)
    if tau_size > 0 and have_sizes:
        s = _normalized_inverse(state.sizes, real)
        scores = scores * (s[:, 0::2, None] * s[:, None, 1::2]) ** (1.0 / tau_size)
    return scores


def pooling_weights(state: MergeState, real: Tensor, pooling: str) -> Tensor | None:
    """Merge weights ``[B, W]``: sizes (``"size"``), received attention x size / max size (``"attn"``), or none."""
    if pooling == "size":
        return state.sizes
    if pooling == "attn":
        top = state.sizes.masked_fill(~real, 0.0).amax(dim=1, keepdim=True)
        return received_attention(state.attn, real) * state.sizes / top
    return None


@register("mctf", paper="Multi-criteria Token Fusion with One-step-ahead Attention for Efficient Vision Transformers",
          venue="CVPR 2024", repo="https://github.com/mlvlab/MCTF",
          space="vision", stage="encoder", kind="merge", signals=("attn",),
          optional_signals=("sizes",), parity=True, fixture="mctf",
          encoder_schedule={"layers": "all", "schedule": "constant"},
          signal_spec={"sizes": {"proportional_attention": True}},
          knob_ranges={"tau_sim": ">= 0", "tau_info": ">= 0", "tau_size": ">= 0", "pooling": tuple(POOLINGS),
                       "r": ">= 1"})
def mctf(tokens: Tensor, counts: Tensor, *, mask: Tensor | None = None, attn: Tensor | None = None,
         sizes: Tensor | None = None, class_token: bool = False, tau_sim: float = 1.0, tau_info: float = 20.0,
         tau_size: float = 40.0, bidirection: bool = True, pooling: str = "attn", one_step_ahead: bool = True,
         r: int | Sequence[int] | None = None) -> Reduction:
    """MCTF token fusion: multi-criteria bidirectional bipartite matching and attention-weighted pooling.

    Scores between even (``A``) and odd (``B``) tokens multiply similarity (cosine of the tokens), informativeness
    (inverse attention received, from ``attn [B, N, N]``) and size criteria (see :func:`mctf_scores`). With
    ``bidirection``, ``r // 2`` ``A`` tokens merge into their best ``B`` partner, then ``r - r // 2`` ``B`` tokens
    (by their best score against the unmerged ``A`` tokens; protected columns excluded) merge into that ``A`` token.
    Merged tokens are pooled by ``pooling``: ``"attn"`` (paper default, attention received x size), ``"size"``,
    ``"mean"`` or ``"max"``; sizes add up. The one-step-ahead attention of the fused tokens is the attention merged
    the same way (keys summed, queries pooled) and is returned as ``extras["attn_next"] [B, K, K]``.

    Signals: ``attn`` is the head-averaged attention over the same ``N`` tokens (CLS included when ``class_token``).
    Nothing is lost by head averaging: MCTF reads attention only as the mean over heads and query rows, and the fused
    attention is linear per head (``ops.merge.merge_attention`` applied to per-head maps with ``extras["weights"]``
    gives the per-head result). ``sizes`` ``[B, N]`` is optional: without it the size criterion is skipped in the
    first round (as the official first layer), later rounds use the tracked sizes.

    ``keep`` maps to ``r = N - keep`` (the official ``T - r >= 10`` floor is not applied: ``keep`` decides). A round
    merges at most ``(N - protected) // 2``; smaller ``keep`` runs several rounds on the previous output in the official
    order, reading the previous round's fused (one-step-ahead) attention. ``r`` caps the merges per round.

    Returns a :class:`Reduction` with ``sizes``/``assign``; ``extras``: ``order`` (official output order, source
    indices), ``attn_next`` (if ``one_step_ahead``), ``weights`` (pooling weights of the last round's input slots,
    ``None`` for ``"max"``), ``r`` (per-round merges).
    """
    if pooling not in POOLINGS:
        raise ValueError(f"mctf: pooling must be one of {sorted(POOLINGS)}, got {pooling!r}")
    caps = per_round_caps(r)
    protected = int(bool(class_token))
    have_sizes = sizes is not None
    state = MergeState.start(tokens, mask, sizes=sizes, attn=attn)
    counts = torch.minimum(counts.clamp(min=protected + 1), state.n)
    remaining = state.n - counts
    extras: dict = {"r": [], "weights": None}
    step = 0
    while bool((remaining > 0).any()):
        rr = round_sizes(remaining, state.n, protected, round_cap(caps, step))
        if not bool((rr > 0).any()):
            break
        width = state.width
        real = state.real()
        real_a, real_b = pad_rows(state.n, width)
        prot = torch.arange(width, device=tokens.device) >= protected
        row_ok, col_ok = real_a & prot[0::2], real_b & prot[1::2]
        scores = mctf_scores(state, real, have_sizes, tau_sim, tau_info, tau_size)
        r1 = torch.div(rr, 2, rounding_mode="floor") if bidirection else rr
        m1 = bipartite_soft_matching(scores, r1, row_ok, col_ok)
        dest = bipartite_dest(m1, width)
        b_key = None
        if bidirection:
            m2 = bipartite_soft_matching(scores.transpose(1, 2), rr - r1, col_ok, row_ok & ~m1.merged)
            dest = bipartite_dest(m2, width, reverse=True).gather(1, dest)
            b_key = torch.where(m2.merged | ~real_b, float("inf"), m2.rank.double())
        key = order_key(m1, real_a, width, sort_unmerged=bool(class_token), b_key=b_key)
        weights = pooling_weights(state, real, pooling)
        state.step(dest, key, weights, POOLINGS[pooling])
        extras["weights"] = weights
        extras["r"].append(rr)
        remaining = remaining - rr
        have_sizes = True
        step += 1
    red = finish(state, tokens, extras)
    if one_step_ahead:
        red.extras["attn_next"] = _reorder_attention(state.attn, red)
    return red


def _reorder_attention(attn: Tensor, red: Reduction) -> Tensor:
    """Put the state's attention ``[B, W, W]`` (state order) into the Reduction's ascending order ``[B, K, K]``."""
    order = red.extras["order"]
    big = torch.iinfo(torch.long).max
    sorted_idx = torch.where(red.mask, red.indices, big).contiguous()  # padding (-1) sorts last
    slot = torch.searchsorted(sorted_idx, order.clamp(min=0).contiguous())
    slot = torch.where(order >= 0, slot, -1)
    k = red.tokens.shape[1]
    return merge_attention(attn, slot, k, None, "sum").to(torch.float32)
