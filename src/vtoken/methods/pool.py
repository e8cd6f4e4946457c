"""2-D average pooling baseline."""

from __future__ import annotations

import torch
from torch import Tensor

from ..core import Reduction, reduction_from_merge
from ..ops.grid import layout_positions, output_grid, partition_cells
from ..ops.similarity import float32
from .registry import register


def grid_cells(tokens: Tensor, counts: Tensor, mask: Tensor | None, grid: tuple[int, int] | None
               ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Shared bookkeeping of :func:`pool` and :func:`downsample`.

    Returns ``(h, w, src, rows, cols, cell, rep, sizes, valid)``: the per-sample layout ``h x w`` ``[B]`` with its
    position -> token map ``src [B, N]``, the output grid ``rows x cols`` ``[B]`` (:func:`output_grid`), the
    output cell of every token ``cell [B, N]`` (``-1`` for masked tokens), each cell's representative (its
    smallest, i.e. top-left, source index) ``rep [B, M]``, its input count ``sizes [B, M]`` and ``valid [B, M]``.
    """
    b, n = tokens.shape[:2]
    dev = tokens.device
    h, w, pos, src = layout_positions(b, n, grid, mask, dev)
    rows, cols = output_grid(h, w, counts)
    m_b = rows * cols
    m = int(m_b.max())
    cell = partition_cells(pos, h, w, rows, cols)
    safe = torch.where(cell >= 0, cell, m)
    ar = torch.arange(n, device=dev).expand(b, n)
    rep = torch.full((b, m + 1), n, dtype=torch.long, device=dev).scatter_reduce(1, safe, ar, "amin")[:, :m]
    sizes = torch.zeros(b, m + 1, device=dev).scatter_add_(1, safe, torch.ones(b, n, device=dev))[:, :m]
    valid = torch.arange(m, device=dev)[None, :] < m_b[:, None]
    return h, w, src, rows, cols, cell, rep, sizes, valid


@register("pool", paper="2-D average pooling of the token grid (baseline)", venue="baseline", repo=None,
          stage="pre_llm", kind="pool", optional_signals=("grid",), exact=False)
def pool(tokens: Tensor, counts: Tensor, *, mask: Tensor | None = None,
         grid: tuple[int, int] | None = None) -> Reduction:
    """Average-pool the token grid to the largest aspect-preserving output grid with at most ``counts[b]`` cells.

    Output grid: ``rows = floor(sqrt(k * H / W))`` (clipped to ``[1, H]``), ``cols = min(W, k // rows)``, then
    ``rows = min(H, k // cols)`` (:func:`vtoken.ops.grid.output_grid`; ``24 x 24`` with ``k = 64`` pools ``3 x 3``
    windows to ``8 x 8``, with ``k = 100`` gives ``10 x 10``), so ``rows * cols <= k`` (``exact=False``). Input row
    ``y`` goes to output row ``floor(y * rows / H)`` (columns alike): ``avg_pool2d`` when the sizes divide,
    otherwise a partition into bins differing by at most one token (never overlapping). Each output token is the
    mean of its cell (computed in float32); ``indices`` = the cell's top-left source token, ``assign`` = each input's
    cell, ``sizes`` = tokens per cell. Without ``grid`` the tokens are 1-D (exactly ``k`` contiguous bins); a sample
    with padding (``mask``) is pooled 1-D over its valid tokens. ``tokens [B, N, D]`` -> ``[B, K, D]``.
    """
    b, n, d = tokens.shape
    _, _, _, _, _, cell, rep, sizes, valid = grid_cells(tokens, counts, mask, grid)
    m = rep.shape[1]
    safe = torch.where(cell >= 0, cell, m)
    x = float32(tokens)
    sums = torch.zeros(b, m + 1, d, device=tokens.device, dtype=x.dtype)
    sums.scatter_add_(1, safe[..., None].expand(b, n, d), x)
    out = (sums[:, :m] / sizes.clamp(min=1)[..., None].to(x.dtype)).to(tokens.dtype)
    return reduction_from_merge(out, rep, assign=cell, sizes=sizes, valid=valid)
