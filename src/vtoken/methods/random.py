"""Random selection baseline."""

from __future__ import annotations

import torch
from torch import Tensor

from ..core import Reduction, reduction_from_indices, topk_indices
from .registry import register

#: the seeds ``torch.Generator.manual_seed`` accepts
SEED_RANGE = f"[{-2 ** 63}, {2 ** 64 - 1}]"


@register("random", paper="Random token selection (baseline)", venue="baseline", repo=None, stage="pre_llm",
          kind="prune",
          knob_ranges={"seed": SEED_RANGE},
          knob_sources={
              "seed": "vtoken: 0",
          })
def random(tokens: Tensor, counts: Tensor, *, mask: Tensor | None = None, seed: int = 0) -> Reduction:
    """Keep a uniformly random subset of ``counts[b]`` tokens per sample, seeded.

    Each sample draws its own scores from a generator seeded with ``seed`` (so a sample gives the same subset
    alone or in a batch). ``tokens [B, N, D]`` -> ``[B, K, D]``.

    Args:
        seed: the seed of the CPU ``torch.Generator`` that draws the scores (default 0). The same seed keeps the same
            subset.
    """
    b, n = tokens.shape[:2]
    gen = torch.Generator(device="cpu").manual_seed(int(seed))
    scores = torch.rand(n, generator=gen).to(tokens.device).expand(b, n)
    return reduction_from_indices(tokens, topk_indices(scores, counts, mask))
