"""Attention rows computed on the side from hooked query/key projections, batched over ``B``.

Several methods score tokens by the attention of one query (the ``[CLS]`` token) to every key. Model adapters hook
the ``q``/``k`` projections of one vision layer and call these functions for that single query row, so the model
keeps its own attention kernel (SDPA, FlashAttention) and never materialises the ``[T, T]`` map.

Shapes: ``B`` batch, ``T`` sequence length (``1 + N`` with the CLS token first), ``E`` projection width, ``H`` heads,
``d = E // H`` head width. Everything is computed in float32 (float64 stays float64) whatever the input dtype.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from .similarity import float32

__all__ = ["ClsAttention", "attention_pagerank", "cls_attention", "cls_attention_logits", "head_mean", "split_heads"]


def split_heads(x: Tensor, num_heads: int) -> Tensor:
    """``[B, T, E]`` projection output -> ``[B, H, T, E // H]`` per-head tensor (the usual ``view`` + transpose)."""
    if x.dim() != 3:
        raise ValueError(f"x must have shape [B, T, E], got {tuple(x.shape)}")
    b, t, e = x.shape
    if num_heads < 1 or e % num_heads:
        raise ValueError(f"num_heads must divide the width E = {e}, got {num_heads}")
    return x.reshape(b, t, num_heads, e // num_heads).transpose(1, 2)


def head_mean(x: Tensor, num_heads: int | None = None) -> Tensor:
    """Average per-head vectors over heads: ``[B, H, T, d]`` (or ``[B, T, E]`` with ``num_heads``) -> ``[B, T, d]``.

    This is the head-mean key metric of ToMe / VisionZip (``keys`` signal).
    """
    if x.dim() == 3:
        if num_heads is None:
            raise ValueError("num_heads is required for a [B, T, E] input")
        x = split_heads(x, num_heads)
    if x.dim() != 4:
        raise ValueError(f"x must have shape [B, H, T, d] or [B, T, E], got {tuple(x.shape)}")
    return x.mean(1)


def _per_head(x: Tensor, num_heads: int | None, name: str) -> Tensor:
    if x.dim() == 4:
        return x
    if x.dim() != 3:
        raise ValueError(f"{name} must have shape [B, T, E] or [B, H, T, d], got {tuple(x.shape)}")
    return split_heads(x, num_heads or 1)


def cls_attention_logits(q: Tensor, k: Tensor, num_heads: int | None = None, scale: float | None = None,
                         query_index: int = 0) -> Tensor:
    """Pre-softmax attention logits of one query row: ``(q_i @ k^T) * scale`` -> ``[B, H, T]``.

    Args:
        q: ``[B, T, E]`` query projection (split into ``num_heads`` heads) or ``[B, H, T, d]`` already split.
        k: the keys, same layout as ``q``.
        num_heads: heads to split a ``[B, T, E]`` input into; ``None`` or ``1`` keeps the full width as one head
            (LLaVA-PruMerge's convention). Ignored for 4-D inputs.
        scale: logit scale, default ``d ** -0.5`` with ``d`` the head width (the full width ``E`` without heads).
        query_index: which query row (0 = the CLS token).

    The product is taken before scaling, as ``softmax((q @ k^T) * scale)`` in the official codes.
    """
    qh = _per_head(q, num_heads, "q")
    # only the query row is converted; k is converted while contiguous, then split (13 ms -> 4 ms for a bf16
    # [5, 577, 768] layer), with bit-identical results
    kh = _per_head(float32(k), num_heads, "k")
    if qh.shape[:2] != kh.shape[:2] or qh.shape[-1] != kh.shape[-1]:
        raise ValueError(f"q {tuple(qh.shape)} and k {tuple(kh.shape)} must agree in batch, heads and width")
    d = qh.shape[-1]
    s = d ** -0.5 if scale is None else float(scale)
    i = query_index % qh.shape[2]
    row = float32(qh[:, :, i:i + 1, :])
    return (row @ kh.transpose(-1, -2)).squeeze(-2) * s


class ClsAttention(NamedTuple):
    """Attention of one query (the CLS token) to every key, as returned by :func:`cls_attention`.

    Attributes:
        rows: ``[B, H, T]`` softmax probabilities per head (over all ``T`` keys, CLS included).
        mean: ``[B, T - 1]`` head-mean probabilities of the patch keys (CLS column removed): the ``cls_attn`` signal.
        logits: ``[B, H, T]`` the pre-softmax logits.
    """

    rows: Tensor
    mean: Tensor
    logits: Tensor


def cls_attention(q: Tensor, k: Tensor, num_heads: int | None = None, scale: float | None = None,
                  query_index: int = 0) -> ClsAttention:
    """Softmax attention of the CLS query (row ``query_index``) from hooked q/k projections.

    ``q``/``k`` are ``[B, T, E]`` (split into ``num_heads`` heads; ``None``/``1`` = one full-width head, as
    LLaVA-PruMerge) or ``[B, H, T, d]``. ``scale`` defaults to ``d ** -0.5``. Returns :class:`ClsAttention` with the
    per-head rows ``[B, H, T]``, the head-mean over patch keys ``[B, T - 1]`` (keys other than ``query_index``) and
    the logits ``[B, H, T]``.
    """
    logits = cls_attention_logits(q, k, num_heads, scale, query_index)
    rows = logits.softmax(-1)
    mean = rows.mean(1)
    i = query_index % mean.shape[-1]
    return ClsAttention(rows, torch.cat([mean[:, :i], mean[:, i + 1:]], dim=-1), logits)


def attention_pagerank(q: Tensor, k: Tensor, valid: Tensor, *, temperature: float = 1.0, iters: int = 5,
                       damping: float = 0.0, budget: int = 1 << 28) -> Tensor:
    """PageRank-style centrality of every token in a causal attention graph, per head, combined over heads.

    Args:
        q: ``[B, L, H, d]`` queries (RoPE applied, already multiplied by the logit scale).
        k: ``[B, L, H_kv, d]`` keys; ``H_kv`` divides ``H`` (query head ``h`` reads key head ``h // (H / H_kv)``).
        valid: ``[B, L]`` bool, real tokens (padding is neither a query nor a key).
        temperature: the transition matrix is ``M = softmax(q k^T / temperature)`` over the keys a row may see
            (causal: ``j <= i``, real keys only), row-stochastic.
        iters: power steps ``p <- (1 - damping) p M + damping u`` from the uniform distribution ``u`` over the real
            tokens (mass flows from a query to the keys it attends to).
        damping: teleport probability (0: plain power iteration).
        budget: bytes of float32 transition rows held at once: ``M`` is built in blocks of query rows and kept
            between steps only when all of it fits, else rebuilt at each step (memory ``O(budget)``, not ``O(L^2)``).

    Returns ``[B, L]`` float32: the root mean square over heads of each token's mass after ``iters`` steps (0 on
    padding). Computed in float32; a sample's scores do not depend on the other samples or on its padding.
    """
    if q.dim() != 4 or k.dim() != 4 or q.shape[:2] != k.shape[:2] or q.shape[-1] != k.shape[-1]:
        raise ValueError(f"q [B, L, H, d] and k [B, L, H_kv, d] must agree, got {tuple(q.shape)} and {tuple(k.shape)}")
    b, n, h, d = q.shape
    hkv = k.shape[2]
    if h % hkv:
        raise ValueError(f"the key heads ({hkv}) must divide the query heads ({h})")
    if tuple(valid.shape) != (b, n):
        raise ValueError(f"valid must have shape [B, L] = {(b, n)}, got {tuple(valid.shape)}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature!r}")
    if isinstance(iters, bool) or not isinstance(iters, int) or iters < 0:
        raise ValueError(f"iters must be an int >= 0, got {iters!r}")
    if not 0.0 <= damping <= 1.0:
        raise ValueError(f"damping must be in [0, 1], got {damping!r}")
    g = h // hkv
    qf = float32(q).reshape(b, n, hkv, g, d) / temperature
    kf = float32(k)
    valid = valid.to(device=q.device, dtype=torch.bool)
    slots = torch.arange(n, device=q.device)
    uniform = valid.float() / valid.sum(1, keepdim=True).clamp(min=1).float()  # [B, L]
    rows = max(1, budget // max(1, b * h * n * 4))
    blocks = [(a, min(a + rows, n)) for a in range(0, n, rows)]
    keep = b * h * n * n * 4 <= budget
    cache: dict[int, Tensor] = {}

    def transition(a: int, e: int) -> Tensor:  # rows a:e of M, [B, H, r, L]
        if a in cache:
            return cache[a]
        logits = torch.einsum("brkgd,blkd->bkgrl", qf[:, a:e], kf).reshape(b, h, e - a, n)
        allowed = valid[:, None, :] & (slots[None, None, :] <= slots[a:e, None])
        allowed = allowed | ((slots[None, None, :] == slots[a:e, None]) & ~valid[:, a:e, None])  # padding: itself
        m = torch.softmax(logits.masked_fill(~allowed[:, None], float("-inf")), dim=-1)
        if keep:
            cache[a] = m
        return m

    dist = uniform[:, None, :].expand(b, h, n)
    for _ in range(iters):
        new = torch.zeros(b, h, n, device=q.device)
        for a, e in blocks:
            new += torch.einsum("bhr,bhrl->bhl", dist[..., a:e], transition(a, e))
        dist = new if damping == 0.0 else (1.0 - damping) * new + damping * uniform[:, None, :]
    return dist.pow(2).mean(1).sqrt() * valid
