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
    BipartiteMatch,
    ab_scores,
    bipartite_dest,
    bipartite_soft_matching,
    order_key,
    pad_rows,
    round_cap,
    round_sizes,
)
from ..ops.merge import MergeState, merge_attention
from ..ops.similarity import float32
from .registry import SignalSpec, register
from .tome import finish, per_round_caps

POOLINGS = {"size": "mean", "attn": "mean", "max": "amax", "mean": "mean"}


def official_r(r: float, tokens: int, num_protected: int = 1) -> int:
    """Tokens the official ``mctf`` merges in one call on ``tokens`` tokens for its ``r`` (``r_eval``), in its order:
    first ``r = tokens - 10`` where ``tokens - r < 10`` (on the value as given, so a ratio is affected only when
    ``tokens <= 10``), then a value ``< 1`` is a fraction of the unprotected tokens, ``int((tokens - num_protected)
    * r)`` (truncated), and the result is at most ``(tokens - num_protected) // 2``. ``keep = tokens -
    official_r(...)`` reproduces an official layer. ``0`` means no merging (the official code fails where its clip
    goes negative, ``tokens < 10``)."""
    if tokens - r < 10:
        r = tokens - 10
    if r < 1:
        r = int((tokens - num_protected) * r)
    return max(0, min(int(r), (tokens - num_protected) // 2))


def _normalized_inverse(v: Tensor, real: Tensor) -> Tensor:
    """``(1 / v) / max(1 / v)`` over the real entries of ``v [B, W]`` (1 on padding)."""
    inv = 1.0 / v.clamp_min(torch.finfo(torch.float32).tiny)
    top = inv.masked_fill(~real, 0.0).amax(dim=1, keepdim=True)
    return torch.where(real, inv / top, 1.0)


def received_attention(attn: Tensor, real: Tensor) -> Tensor:
    """``[B, W]`` attention each token receives, averaged over the real query rows of ``attn [B, W, W]``."""
    q = real.to(attn.dtype)
    return (attn * q[:, :, None]).sum(1) / q.sum(1, keepdim=True).clamp_min(1.0)


def mctf_scores(x: Tensor, sizes: Tensor | None, attn: Tensor, real: Tensor, tau_sim: float, tau_info: float,
                tau_size: float) -> Tensor:
    """Multi-criteria score ``W_sim * W_info * W_size`` ``[B, nA, nB]`` between even (A) and odd (B) slots.

    ``x [B, W, D]`` tokens, ``sizes [B, W]`` (``None``: no size criterion), ``attn [B, W, W]`` head-mean attention,
    ``real [B, W]`` real slots. ``W_sim = ((cos + 1) / 2) ** (1 / tau_sim)``; ``W_info = (i_A i_B) ** (1 / tau_info)``
    with ``i`` the inverse of the attention a token receives (head and query mean), normalised by its maximum;
    ``W_size = (s_A s_B) ** (1 / tau_size)`` with ``s`` the inverse size normalised by its maximum. A temperature of
    0 disables its criterion (a factor of 1, never a division by zero); with all three off every pair scores 1 and
    the ties break by lowest index.
    """
    sim = ab_scores(x)
    scores = ((sim + 1.0) / 2.0) ** (1.0 / tau_sim) if tau_sim > 0 else torch.ones_like(sim)
    if tau_info > 0:
        info = _normalized_inverse(received_attention(attn, real), real)
        scores = scores * (info[:, 0::2, None] * info[:, None, 1::2]) ** (1.0 / tau_info)
    if tau_size > 0 and sizes is not None:
        s = _normalized_inverse(sizes, real)
        scores = scores * (s[:, 0::2, None] * s[:, None, 1::2]) ** (1.0 / tau_size)
    return scores


def pooling_weights(sizes: Tensor, attn: Tensor, real: Tensor, pooling: str) -> Tensor | None:
    """Merge weights ``[B, W]``: sizes (``"size"``), received attention x size / max size (``"attn"``), or none
    (``"mean"``: plain average, ``"max"``: element-wise maximum)."""
    if pooling == "size":
        return sizes
    if pooling == "attn":
        top = sizes.masked_fill(~real, 0.0).amax(dim=1, keepdim=True)
        return received_attention(attn, real) * sizes / top
    return None


def _match(scores: Tensor, r: Tensor, row_valid: Tensor, col_valid: Tensor, ties: str,
           col_order: Tensor | None = None) -> BipartiteMatch:
    """Bipartite soft matching of ``scores [B, rows, cols]`` (:func:`vtoken.ops.matching.bipartite_soft_matching`).

    ``ties="index"``: equal scores break by lowest index. ``ties="official"``: as the official code on CPU: each
    row's partner is its first best column in ``col_order [B, cols]`` (a priority, lowest first; the official second
    step scans the unmerged ``A`` tokens in their ``unm_idx`` order), and rows are ranked by torch's default
    (unstable) descending sort, whose order among equal scores is the sort implementation's.
    """
    if ties == "index":
        return bipartite_soft_matching(scores, r, row_valid, col_valid)
    ninf = float("-inf")
    s = scores.masked_fill(~col_valid[:, None, :], ninf).masked_fill(~row_valid[:, :, None], ninf)
    node_max, node_idx = s.max(dim=-1)
    if col_order is not None:
        big = torch.iinfo(torch.long).max
        prio = torch.where(s == node_max[..., None], col_order[:, None, :], big)
        node_idx = prio.argmin(dim=-1)
    edge_order = torch.sort(node_max, dim=-1, descending=True, stable=False).indices
    rank = torch.argsort(edge_order, dim=-1)
    return BipartiteMatch(node_idx, node_max, edge_order, rank, r, rank < r[:, None], row_valid)


def _pack_attention(attn: Tensor, rep: Tensor) -> Tensor:
    """``attn [B, (H,) N, N]`` in the merge state's packing (``rep [B, W]`` source of each slot, ``-1`` padding):
    float32 ``[B, (H,) W, W]``, zero on padding rows and columns."""
    a = float32(attn)
    lead = (1,) * (a.dim() - 3)
    b, w = rep.shape
    n = a.shape[-1]
    idx = rep.clamp(min=0).reshape(b, *lead, w)
    a = a.gather(-2, idx[..., None].expand(*a.shape[:-2], w, n))
    a = a.gather(-1, idx[..., None, :].expand(*a.shape[:-2], w, w))
    real = (rep >= 0).to(a.dtype).reshape(b, *lead, w)
    return a * real[..., :, None] * real[..., None, :]


@register("mctf", paper="Multi-criteria Token Fusion with One-step-ahead Attention for Efficient Vision Transformers",
          venue="CVPR 2024", repo="https://github.com/mlvlab/MCTF",
          space="vision", stage="encoder", kind="merge", signals=("attn",),
          optional_signals=("sizes",), parity=True, fixture="mctf",
          encoder_schedule={"layers": "all", "schedule": "constant"},
          signal_spec={"sizes": SignalSpec(proportional_attention=True)},
          signal_shapes={"attn": "B N N | B H N N"},
          knob_ranges={"tau_sim": ">= 0", "tau_info": ">= 0", "tau_size": ">= 0", "pooling": tuple(POOLINGS),
                       "r": ">= 1", "ties": ("index", "official")},
          main_knobs=("r", "one_step_ahead"),
          knob_sources={
              "class_token": "vtoken: tokens without a CLS row (official num_protected=1); the ViT adapter passes True",
              "tau_sim": "paper: DeiT setting (official code's default 1)",
              "tau_info": "paper: DeiT setting (official code's default 20)",
              "tau_size": "paper: DeiT setting (official code's default 40)",
              "bidirection": "paper: two-step bidirectional matching (official default)",
              "pooling": "paper: attention-weighted pooling (official default)",
              "one_step_ahead": "paper: one-step-ahead attention (official default)",
              "r": "vtoken: None, as many merges as keep needs; the official DeiT runs use r=16 per block and skip "
                   "block 0",
              "ties": "vtoken: lowest index (invariant 4); 'official' reproduces the official CPU order",
          })
def mctf(tokens: Tensor, counts: Tensor, *, mask: Tensor | None = None, attn: Tensor | None = None,
         sizes: Tensor | None = None, class_token: bool = False, tau_sim: float = 1.0, tau_info: float = 20.0,
         tau_size: float = 40.0, bidirection: bool = True, pooling: str = "attn", one_step_ahead: bool = True,
         r: int | Sequence[int] | None = None, ties: str = "index") -> Reduction:
    """MCTF token fusion: multi-criteria bidirectional bipartite matching and attention-weighted pooling.

    Scores between even (``A``) and odd (``B``) tokens multiply similarity (cosine of the tokens), informativeness
    (inverse attention received) and size criteria (see :func:`mctf_scores`; a temperature ``tau_* = 0`` switches
    its criterion off). With ``bidirection``, ``r // 2`` ``A`` tokens merge into their best ``B`` partner, then
    ``r - r // 2`` ``B`` tokens (by their best score against the unmerged ``A`` tokens; protected columns excluded)
    merge into that ``A`` token; without it ``r`` ``A`` tokens merge into ``B``. Merged tokens are pooled by
    ``pooling``: ``"attn"`` (paper default: weights attention received x size / max size), ``"size"`` (weights
    sizes), ``"mean"`` (plain average) or ``"max"`` (element-wise maximum); sizes add up. With ``one_step_ahead``
    the fused tokens' attention for the next layer, the attention merged the same way (keys summed, queries pooled
    as the tokens: weighted mean, or maximum for ``"max"``), is returned as ``extras["attn_next"]``.

    Signals: ``attn`` is the attention over the same ``N`` tokens (CLS included when ``class_token``), either
    head-averaged ``[B, N, N]`` or per head ``[B, H, N, N]`` (the official input); ``extras["attn_next"]`` has the
    same layout (``[B, K, K]`` or ``[B, H, K, K]``). MCTF reads attention only as the mean over heads and query rows,
    so the merge itself is the same for both; the fused attention of the mean pooling types is linear per head (the
    head-averaged result is the mean of the per-head one), the ``"max"`` one is not (pass per-head maps for it).
    ``sizes`` ``[B, N]`` is optional: without it the size criterion is skipped in the first round (as the official
    first layer), later rounds use the tracked sizes.

    ``keep`` maps to ``r = N - keep``; the official ``r_eval`` (a count or a ratio, with its ``T - r >= 10`` floor)
    maps to ``keep = N - official_r(r_eval, N, protected)`` (:func:`official_r`). A round merges at most
    ``(N - protected) // 2``; smaller ``keep`` runs several rounds on the previous output in the official order,
    reading the previous round's fused (one-step-ahead) attention. ``r`` caps the merges per round.

    Ties (equal scores: all temperatures 0, or only the size criterion on integer sizes) break by lowest index
    (``ties="index"``). ``ties="official"`` orders them as the official code does on CPU (torch's unstable sort; see
    :func:`_match`): it reproduces official outputs on unpadded inputs, but its order among ties is not
    batch-invariant under padding and may differ on other devices.

    Args:
        class_token: token 0 is a CLS token, always kept and never merged (official ``num_protected=1``).
        tau_sim: temperature of the similarity criterion (paper DeiT default 1; 0 switches it off).
        tau_info: temperature of the informativeness criterion (paper default 20; 0 switches it off).
        tau_size: temperature of the size criterion (paper default 40; 0 switches it off).
        bidirection: two-step bidirectional matching, A into B then B into A (paper default True).
        pooling: how merged tokens combine, ``"attn"`` (paper default), ``"size"``, ``"mean"`` or ``"max"``.
        one_step_ahead: return the fused tokens' attention for the next layer as ``extras["attn_next"]`` (default
            True).
        r: the most merges per round, an int or one per round (default None: as many as ``keep`` needs).
        ties: how equal scores break, ``"index"`` (lowest index, default) or ``"official"`` (the official CPU order).

    Returns a :class:`Reduction` with ``sizes``/``assign``; ``extras``: ``order`` (official output order, source
    indices), ``attn_next`` (if ``one_step_ahead``), ``weights`` (pooling weights of the last round's input slots,
    ``None`` for ``"mean"`` and ``"max"``), ``r`` (per-round merges).
    """
    if pooling not in POOLINGS:
        raise ValueError(f"mctf: pooling must be one of {sorted(POOLINGS)}, got {pooling!r}")
    if ties not in ("index", "official"):
        raise ValueError(f"mctf: ties must be 'index' or 'official', got {ties!r}")
    if attn is None:
        raise ValueError("mctf needs the signal 'attn'")
    caps = per_round_caps(r)
    protected = int(bool(class_token))
    mode = POOLINGS[pooling]
    state = MergeState.start(tokens, mask, sizes=sizes)
    att = _pack_attention(attn, state.rep)  # [B, (H,) W, W], merged alongside the state
    per_head = att.dim() == 4
    counts = torch.minimum(counts.clamp(min=protected + 1), state.n)
    remaining = state.n - counts
    extras: dict = {"r": [], "weights": None}
    have_sizes = sizes is not None
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
        mean_att = att.mean(1) if per_head else att
        scores = mctf_scores(state.x, state.sizes if have_sizes else None, mean_att, real, tau_sim, tau_info,
                             tau_size)
        r1 = torch.div(rr, 2, rounding_mode="floor") if bidirection else rr
        m1 = _match(scores, r1, row_ok, col_ok, ties)
        dest = bipartite_dest(m1, width)
        b_key = None
        if bidirection:
            unm_order = torch.arange(row_ok.shape[1], device=tokens.device).expand_as(m1.rank) if class_token \
                else m1.rank  # official unm_idx order of the A tokens (ascending when a token is protected)
            m2 = _match(scores.transpose(1, 2), rr - r1, col_ok, row_ok & ~m1.merged, ties, unm_order)
            dest = bipartite_dest(m2, width, reverse=True).gather(1, dest)
            b_key = torch.where(m2.merged | ~real_b, float("inf"), m2.rank.double())
        key = order_key(m1, real_a, width, sort_unmerged=bool(class_token), b_key=b_key)
        weights = pooling_weights(state.sizes, mean_att, real, pooling)
        slot_map = state.step(dest, key, weights, mode)
        att = merge_attention(att, slot_map, state.width, weights, mode)
        extras["weights"] = weights
        extras["r"].append(rr)
        remaining = remaining - rr
        have_sizes = True
        step += 1
    red = finish(state, tokens, extras)
    if one_step_ahead:
        red.extras["attn_next"] = _reorder_attention(att, red)
    return red


def _reorder_attention(attn: Tensor, red: Reduction) -> Tensor:
    """Put the state's attention ``[B, (H,) W, W]`` (state order) into the Reduction's ascending order
    ``[B, (H,) K, K]``."""
    order = red.extras["order"]
    big = torch.iinfo(torch.long).max
    sorted_idx = torch.where(red.mask, red.indices, big).contiguous()  # padding (-1) sorts last
    slot = torch.searchsorted(sorted_idx, order.clamp(min=0).contiguous())
    slot = torch.where(order >= 0, slot, -1)
    k = red.tokens.shape[1]
    return merge_attention(attn, slot, k, None, "sum").to(torch.float32)
