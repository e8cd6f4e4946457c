"""Similarities and distances between token sets, batched over ``B``."""

from __future__ import annotations

import torch
from torch import Tensor


def l2_normalize(x: Tensor, eps: float | None = None) -> Tensor:
    """``x / ||x||`` over the last dim. ``eps=None`` is a plain division (as several official codes do);
    a float clamps the norm from below (as ``F.normalize``)."""
    norm = x.norm(dim=-1, keepdim=True)
    return x / (norm if eps is None else norm.clamp_min(eps))


def cosine_similarity(a: Tensor, b: Tensor | None = None, eps: float | None = None) -> Tensor:
    """Pairwise cosine similarity ``[B, N, M]`` of ``a [B, N, D]`` and ``b [B, M, D]`` (``b = a`` if omitted)."""
    an = l2_normalize(a, eps)
    bn = an if b is None else l2_normalize(b, eps)
    return an @ bn.transpose(-1, -2)


def cosine_distance(a: Tensor, b: Tensor | None = None, eps: float | None = None) -> Tensor:
    """``1 - cosine_similarity``: ``[B, N, M]``."""
    return 1.0 - cosine_similarity(a, b, eps)


def pairwise_sq_euclidean(a: Tensor, b: Tensor | None = None) -> Tensor:
    """Squared Euclidean distances ``[B, N, M]`` (clamped at 0)."""
    b = a if b is None else b
    d = (a * a).sum(-1)[:, :, None] + (b * b).sum(-1)[:, None, :] - 2.0 * (a @ b.transpose(-1, -2))
    return d.clamp_min(0.0)


def float32(x: Tensor) -> Tensor:
    """``x`` in the dtype scores are computed in: float32 for float32/fp16/bf16, float64 stays float64 (the policy of
    :func:`vtoken.core.compute_dtype`; ``vtoken.reduce`` casts the floating signals to the same dtype)."""
    return x if x.dtype in (torch.float32, torch.float64) else x.float()
