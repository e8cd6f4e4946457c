"""Feature-norm baseline: keep the tokens of largest L2 norm (no signal needed)."""

from __future__ import annotations

from torch import Tensor

from ..core import Reduction, reduction_from_indices, topk_indices
from ..ops.similarity import float32
from .registry import register


@register("norm", paper="L2-norm top-k (signal-free baseline)", venue="baseline", repo=None, stage="pre_llm",
          kind="prune")
def norm(tokens: Tensor, counts: Tensor, *, mask: Tensor | None = None) -> Reduction:
    """Keep the ``counts[b]`` tokens of largest feature L2 norm per sample (ties: lowest index).

    High-norm visual tokens carry much of the attention mass in ViTs, so the norm is a signal-free importance
    baseline. ``tokens [B, N, D]`` -> ``[B, K, D]`` in source order.
    """
    return reduction_from_indices(tokens, topk_indices(float32(tokens).norm(dim=-1), counts, mask))
