"""Uniform spatial sampling baseline."""

from __future__ import annotations

import torch
from torch import Tensor

from ..core import Reduction, reduction_from_indices
from ..ops.grid import layout_positions, uniform_positions
from .registry import register


@register("uniform", paper="Uniform spatial sampling (baseline)", venue="baseline", repo=None, stage="pre_llm",
          kind="prune", optional_signals=("grid",))
def uniform(tokens: Tensor, counts: Tensor, *, mask: Tensor | None = None,
            grid: tuple[int, int] | None = None) -> Reduction:
    """Keep ``counts[b]`` tokens spread evenly over the token grid (exactly ``counts[b]``).

    A strong training-free baseline: kept rows are evenly spaced over the ``grid = (H, W)``, each row holds
    ``k // rows`` (or one more) evenly spaced columns, with ``rows ~ sqrt(k * H / W)`` so the kept set is a near-square
    lattice (``24 x 24 -> 64`` is the centred ``8 x 8`` lattice); see :func:`vtoken.ops.grid.uniform_positions`.
    Without ``grid`` the tokens are 1-D and the kept ones are the centres of ``k`` equal bins. A sample with padding
    (``mask``) is spread 1-D over its valid tokens. ``tokens [B, N, D]`` -> ``[B, K, D]``.
    """
    b, n = tokens.shape[:2]
    h, w, _, src = layout_positions(b, n, grid, mask, tokens.device)
    pos = uniform_positions(h, w, counts)
    idx = torch.where(pos >= 0, src.gather(1, pos.clamp(min=0)), -1)
    return reduction_from_indices(tokens, idx)
