"""Bilinear downsampling baseline."""

from __future__ import annotations

import torch
from torch import Tensor

from ..core import Reduction, reduction_from_merge
from ..ops.grid import bilinear_taps
from ..ops.similarity import float32
from .pool import grid_cells
from .registry import register


@register("downsample", paper="Bilinear resize of the token grid (baseline)", venue="baseline", repo=None,
          stage="pre_llm", kind="pool", optional_signals=("grid",), exact=False)
def downsample(tokens: Tensor, counts: Tensor, *, mask: Tensor | None = None,
               grid: tuple[int, int] | None = None) -> Reduction:
    """Bilinearly resize the token grid to the output grid of :func:`vtoken.methods.pool.pool` (same rule, at most
    ``counts[b]`` cells, ``exact=False``).

    Output ``(i, j)`` samples the input at ``((i + 0.5) * H / rows - 0.5, (j + 0.5) * W / cols - 0.5)``, i.e.
    ``F.interpolate(mode="bilinear", align_corners=False, antialias=False)`` (computed in float32). Bookkeeping as
    pooling: ``indices`` = top-left source token of the output's cell (input row ``y`` -> output row
    ``floor(y * rows / H)``), ``assign`` = each input's cell, ``sizes`` = tokens per cell. Without ``grid`` the tokens
    are 1-D (linear interpolation to exactly ``k`` tokens); a sample with padding (``mask``) is resized 1-D over its
    valid tokens. ``tokens [B, N, D]`` -> ``[B, K, D]``.
    """
    b, n, d = tokens.shape
    h, w, src, rows, cols, cell, rep, sizes, valid = grid_cells(tokens, counts, mask, grid)
    m = rep.shape[1]
    y0, y1, fy = bilinear_taps(h, rows, int(rows.max()))
    x0, x1, fx = bilinear_taps(w, cols, int(cols.max()))
    # output slot t = i * cols + j (raster over each sample's own output grid)
    t = torch.arange(m, device=tokens.device).expand(b, m)
    i = (t // cols[:, None]).clamp(max=y0.shape[1] - 1)
    j = (t % cols[:, None]).clamp(max=x0.shape[1] - 1)
    ya, yb, wy = y0.gather(1, i), y1.gather(1, i), fy.gather(1, i)
    xa, xb, wx = x0.gather(1, j), x1.gather(1, j), fx.gather(1, j)
    x = float32(tokens)
    out = torch.zeros(b, m, d, device=tokens.device, dtype=x.dtype)
    for yy, xx, wgt in ((ya, xa, (1 - wy) * (1 - wx)), (ya, xb, (1 - wy) * wx), (yb, xa, wy * (1 - wx)),
                        (yb, xb, wy * wx)):
        s = src.gather(1, (yy * w[:, None] + xx).clamp(0, n - 1)).clamp(min=0)
        out = out + wgt.to(x.dtype)[..., None] * x.gather(1, s[..., None].expand(b, m, d))
    return reduction_from_merge(out.to(tokens.dtype), rep, assign=cell, sizes=sizes, valid=valid)
