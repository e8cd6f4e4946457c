"""ToDRE, stage 1: greedy k-center diversity selection of the visual tokens after the vision encoder.

Li, Yang, Lu, "ToDRE: Visual Token Pruning via Diversity and Task Awareness for Efficient Large Vision-Language
Models", arXiv 2505.18757 (2025). No official code is released; this follows the paper's description of stage 1
(greedy k-center on token features). Stage 2 (task-relevance pruning inside the LLM) is not part of this method.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..core import Reduction, reduction_from_indices
from ..ops.select import k_center_select, point_distances
from ..ops.similarity import float32, l2_normalize
from .registry import register


@register("todre", paper="ToDRE: Visual Token Pruning via Diversity and Task Awareness for Efficient Large "
          "Vision-Language Models", venue="arXiv 2025", repo=None, stage="pre_llm", kind="prune",
          optional_signals=("vision_features",))
def todre(tokens: Tensor, counts: Tensor, *, mask: Tensor | None = None, vision_features: Tensor | None = None,
          metric: str = "cosine") -> Reduction:
    """Keep ``counts[b]`` tokens chosen by greedy k-center on their features (ToDRE stage 1).

    Args:
        tokens: ``[B, N, D]`` visual tokens.
        counts: ``[B]`` long, tokens kept per sample.
        mask: optional ``[B, N]`` bool, True on real tokens.
        vision_features: optional ``[B, N, C]`` features to measure diversity on (default: ``tokens``).
        metric: ``"cosine"`` (``1 - cos``, default) or ``"euclidean"``.

    The first center is the token nearest to the mean of the sample's real tokens (their mean direction for the
    cosine metric, compared at 1e-5 so exact ties go to the lowest index); with no official code to follow, this
    deterministic, content-based seed is our choice. Each
    next center is the token farthest from its nearest center (Gonzalez' 2-approximation of the minimum covering
    radius), with an incremental min-distance vector: O(N * C) per step, batched over ``B``, no ``N x N`` matrix.

    Returns ``[B, K, D]`` tokens in source order; ``extras["order"]`` is ``[B, K]`` the selection order.
    """
    if metric not in ("cosine", "euclidean"):
        raise ValueError(f"metric must be 'cosine' or 'euclidean', got {metric!r}")
    feats = float32(tokens if vision_features is None else vision_features)
    if feats.dim() != 3:
        raise ValueError(f"vision_features must have shape [B, N, C], got {tuple(feats.shape)}")
    w = torch.ones(feats.shape[:2], device=feats.device) if mask is None else mask.to(feats.dtype)
    base = l2_normalize(feats, 1e-12) if metric == "cosine" else feats
    mean = (base * w[..., None]).sum(1, keepdim=True) / w.sum(1).clamp(min=1)[:, None, None]
    # rounded so that candidates tied in exact arithmetic (e.g. two tokens, equidistant from their mean) break by
    # lowest index whatever the float rounding of a batched or single-sample run
    to_mean = torch.round(point_distances(feats, mean, metric).squeeze(-1), decimals=5)
    if mask is not None:
        to_mean = to_mean.masked_fill(~mask, float("inf"))
    first = to_mean.argmin(dim=1)
    order = k_center_select(feats, counts, mask, first=first, metric=metric)
    return reduction_from_indices(tokens, order, extras={"order": order})
