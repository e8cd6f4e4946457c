"""Grid layout helpers: output-grid choice, evenly spread selections, pooling cells, bilinear taps, token
shuffle / unshuffle and buffer neighbourhoods. Batched over ``B``; no paper names.

A *layout* is a per-sample raster grid ``(h[b], w[b])`` with ``h[b] * w[b]`` positions and a map from tokens to
positions (:func:`layout_positions`). Samples without padding use the caller's grid (or ``(1, N)``: 1-D); a sample
with padded tokens has no 2-D meaning and is laid out 1-D over its valid tokens in order, ``(1, n_valid[b])``.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = [
    "bilinear_taps",
    "buffer_neighbours",
    "even_positions",
    "layout_positions",
    "output_grid",
    "partition_cells",
    "shuffle",
    "uniform_positions",
    "unshuffle",
    "valid_windows",
    "window_index",
]


# ---------------------------------------------------------------------------------------------------------------
# layouts
# ---------------------------------------------------------------------------------------------------------------


def layout_positions(b: int, n: int, grid: tuple[int, int] | None, mask: Tensor | None,
                     device: torch.device | str) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Per-sample raster layouts of ``[B, N]`` tokens.

    Returns ``(h [B], w [B], pos [B, N], src [B, N])``: sample ``b`` lies on an ``h[b] x w[b]`` grid; ``pos[b, n]``
    is token ``n``'s raster position (``-1`` for a masked-out token) and ``src[b, p]`` the token at position ``p``
    (``-1`` beyond ``h[b] * w[b]``). Fully valid samples use ``grid`` (``(1, N)`` when ``grid`` is None); samples
    with masked tokens use ``(1, n_valid[b])`` over their valid tokens in source order.
    """
    ar = torch.arange(n, device=device)
    gh, gw = grid if grid is not None else (1, n)
    if mask is None:
        h = torch.full((b,), gh, dtype=torch.long, device=device)
        w = torch.full((b,), gw, dtype=torch.long, device=device)
        pos = ar.expand(b, n).clone()
        return h, w, pos, pos.clone()
    n_valid = mask.sum(-1)
    full = n_valid == n
    h = torch.where(full, gh, 1).long()
    w = torch.where(full, gw, n_valid).long()
    rank = mask.long().cumsum(-1) - 1
    pos = torch.where(mask, rank, -1)
    src = torch.full((b, n + 1), -1, dtype=torch.long, device=device)
    src.scatter_(1, torch.where(mask, rank, n), ar.expand(b, n).contiguous())  # masked tokens land in column n
    src = torch.where(ar[None, :] < n_valid[:, None], src[:, :n], -1)
    return h, w, pos, src


def output_grid(h: Tensor, w: Tensor, counts: Tensor) -> tuple[Tensor, Tensor]:
    """The pooled / resized output grid for an ``h x w`` input and at most ``counts`` cells (all ``[B]`` long).

    Rule (keeps the aspect ratio): ``rows = floor(sqrt(counts * h / w))`` (computed exactly in integers), clipped to
    ``[1, h]``; ``cols = min(w, counts // rows)``; then ``rows = min(h, counts // cols)`` so a clipped side gives its
    room back. So ``rows * cols <= counts``; on a square grid with a square ``counts`` it is exactly
    ``sqrt(counts) x sqrt(counts)`` (``576 -> 64`` gives ``8 x 8``), and on a 1-D layout ``(1, n)`` exactly
    ``1 x counts``.
    """
    h, w, k = h.long(), w.long(), counts.long()
    target = (k * h) // w
    rows = torch.sqrt(target.double()).floor().long()
    rows = torch.where((rows + 1) * (rows + 1) <= target, rows + 1, rows)
    rows = torch.where(rows * rows > target, rows - 1, rows)
    rows = rows.clamp(min=1).minimum(h)
    cols = (k // rows).clamp(min=1).minimum(w)
    rows = (k // cols).clamp(min=1).minimum(h)
    return rows, cols


def even_positions(n: Tensor | int, m: Tensor, width: int | None = None) -> Tensor:
    """``m[b]`` evenly spread positions out of ``n[b]``: ``floor((2i + 1) * n / (2m))`` for ``i < m[b]`` (cell
    centres of ``m`` equal bins), strictly increasing when ``m <= n``. Returns ``[B, width]`` long, ``-1`` beyond
    ``m[b]`` (``width`` defaults to ``max(m)``)."""
    m = m.long()
    n = torch.as_tensor(n, dtype=torch.long, device=m.device).expand_as(m)
    width = int(m.max()) if width is None else width
    i = torch.arange(width, device=m.device)[None, :]
    pos = ((2 * i + 1) * n[:, None]) // (2 * m[:, None]).clamp(min=1)
    return torch.where(i < m[:, None], pos, -1)


def uniform_positions(h: Tensor, w: Tensor, counts: Tensor) -> Tensor:
    """Exactly ``counts[b]`` raster positions spread evenly over an ``h[b] x w[b]`` grid, ascending.

    Rows: ``r = round(sqrt(k * h / w))`` clipped to ``[max(1, ceil(k / w)), min(h, k)]``, picked with
    :func:`even_positions`; each row holds ``k // r`` tokens and ``k % r`` evenly spread rows hold one more, placed
    at :func:`even_positions` of ``w``. So kept rows are at most ``ceil(h / r)`` apart and the columns of a row at
    most ``ceil(w / (k // r))`` apart. Returns ``[B, max(counts)]`` long, ``-1`` padded.
    """
    h, w, k = h.long(), w.long(), counts.long()
    dev = k.device
    r = torch.round(torch.sqrt(k.double() * h.double() / w.double())).long()
    r = r.minimum(h).minimum(k).maximum((k + w - 1) // w).clamp(min=1)
    rmax = int(r.max())
    base, extra = k // r, k % r
    plus = torch.zeros(k.shape[0], rmax + 1, dtype=torch.long, device=dev)
    plus.scatter_(1, even_positions(r, extra, rmax) % (rmax + 1), 1)  # -1 (none) lands in the spare column
    rid = torch.arange(rmax, device=dev)[None, :]
    per_row = torch.where(rid < r[:, None], base[:, None] + plus[:, :rmax], 0)
    ends = per_row.cumsum(-1)
    kmax = int(k.max())
    t = torch.arange(kmax, device=dev).expand(k.shape[0], kmax).contiguous()
    row = torch.searchsorted(ends, t, right=True).clamp(max=rmax - 1)
    start = ends.gather(1, row) - per_row.gather(1, row)
    c = per_row.gather(1, row)
    col = ((2 * (t - start) + 1) * w[:, None]) // (2 * c).clamp(min=1)
    rpos = ((2 * row + 1) * h[:, None]) // (2 * r[:, None])
    return torch.where(t < k[:, None], rpos * w[:, None] + col, -1)


def partition_cells(pos: Tensor, h: Tensor, w: Tensor, rows: Tensor, cols: Tensor) -> Tensor:
    """Output cell of every position when an ``h x w`` grid is cut into ``rows x cols`` cells.

    Input row ``y`` goes to output row ``floor(y * rows / h)`` (same for columns): a partition into contiguous
    bins whose sizes differ by at most one (equal to ``avg_pool2d`` bins when the sizes divide; unlike
    ``adaptive_avg_pool2d`` the bins never overlap, so every input belongs to exactly one cell). ``pos [B, N]``
    (``-1`` = none) -> ``[B, N]`` raster cell id in ``[0, rows * cols)``, ``-1`` where ``pos`` is.
    """
    y, x = pos // w[:, None], pos % w[:, None]
    cell = (y * rows[:, None] // h[:, None]) * cols[:, None] + x * cols[:, None] // w[:, None]
    return torch.where(pos >= 0, cell, -1)


def bilinear_taps(size: Tensor, out: Tensor, width: int) -> tuple[Tensor, Tensor, Tensor]:
    """1-D bilinear sampling of ``size[b]`` inputs at ``out[b]`` outputs (``align_corners=False``, no antialias,
    as ``F.interpolate(mode="bilinear")``): output ``i`` samples ``(i + 0.5) * size / out - 0.5`` (clamped at 0).

    Returns ``(lo, hi, frac)``, each ``[B, width]``: output ``i`` = ``(1 - frac) * x[lo] + frac * x[hi]``.
    """
    i = torch.arange(width, device=size.device, dtype=torch.float64)[None, :]
    scale = size.double()[:, None] / out.double().clamp(min=1)[:, None]
    src = ((i + 0.5) * scale - 0.5).clamp(min=0.0)
    lo = src.floor().long().minimum(size[:, None] - 1)
    hi = (lo + 1).minimum(size[:, None] - 1)
    return lo, hi, (src - lo.double()).clamp(0.0, 1.0)


# ---------------------------------------------------------------------------------------------------------------
# token shuffle
# ---------------------------------------------------------------------------------------------------------------


def valid_windows(grid: tuple[int, int]) -> list[int]:
    """Window sizes ``s >= 1`` that divide both sides of ``grid``."""
    g = math.gcd(int(grid[0]), int(grid[1]))
    return [s for s in range(1, g + 1) if g % s == 0]


def _check_window(grid: tuple[int, int], s: int) -> tuple[int, int]:
    h, w = int(grid[0]), int(grid[1])
    if isinstance(s, bool) or not isinstance(s, int) or s < 1:
        raise ValueError(f"window must be an int >= 1, got {s!r}")
    if h % s or w % s:
        raise ValueError(f"window {s} must divide both sides of the grid {(h, w)}; "
                         f"valid windows: {valid_windows(grid)}")
    return h, w


def shuffle(x: Tensor, grid: tuple[int, int], s: int) -> Tensor:
    """Token shuffle: every ``s x s`` window of the ``grid = (H, W)`` raster is merged along channels.

    ``x [B, H*W, D]`` -> ``[B, (H/s)*(W/s), s*s*D]``; output tokens follow the windows in raster order, and the
    channels of a window are its tokens in raster order (``(dy, dx)`` major, then ``D``). A pure permutation: exact
    for every dtype. Inverse: :func:`unshuffle` with the same (full-resolution) ``grid`` and ``s``.
    """
    h, w = _check_window(grid, s)
    b, n, d = x.shape
    if n != h * w:
        raise ValueError(f"grid {(h, w)} does not match N = {n}")
    y = x.reshape(b, h // s, s, w // s, s, d).permute(0, 1, 3, 2, 4, 5)
    return y.reshape(b, (h // s) * (w // s), s * s * d)


def unshuffle(y: Tensor, grid: tuple[int, int], s: int) -> Tensor:
    """Inverse of :func:`shuffle`: ``y [B, (H/s)*(W/s), s*s*D]`` -> ``[B, H*W, D]`` for the full-resolution
    ``grid = (H, W)``. Bit-for-bit ``unshuffle(shuffle(x, grid, s), grid, s) == x``."""
    h, w = _check_window(grid, s)
    b, m, c = y.shape
    if m != (h // s) * (w // s):
        raise ValueError(f"{m} shuffled tokens do not match grid {(h, w)} with window {s}")
    if c % (s * s):
        raise ValueError(f"channels {c} are not divisible by window**2 = {s * s}")
    d = c // (s * s)
    x = y.reshape(b, h // s, w // s, s, s, d).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(b, h * w, d)


def window_index(grid: tuple[int, int], s: int, device: torch.device | str = "cpu") -> tuple[Tensor, Tensor]:
    """Bookkeeping of :func:`shuffle` on ``grid = (H, W)``: ``(slot [H*W], top_left [(H/s)*(W/s)])``: the shuffled
    token each input goes into, and each shuffled token's top-left source index (ascending)."""
    h, w = _check_window(grid, s)
    ar = torch.arange(h * w, device=device)
    y, x = ar // w, ar % w
    slot = (y // s) * (w // s) + x // s
    wy = torch.arange(h // s, device=device)
    wx = torch.arange(w // s, device=device)
    top_left = ((wy[:, None] * s) * w + wx[None, :] * s).reshape(-1)
    return slot, top_left


# ---------------------------------------------------------------------------------------------------------------
# neighbourhoods
# ---------------------------------------------------------------------------------------------------------------


def buffer_neighbours(idx: Tensor, grid: tuple[int, int], mode: str = "raster") -> Tensor:
    """The token and its 4 neighbours for every ``idx [B, A]`` (``-1`` = none) on ``grid = (H, W)``.

    Returns ``[B, 5A]`` long laid out as ``[idx, idx - 1, idx + 1, idx - W, idx + W]`` (each block ``A`` wide), ``-1``
    where the anchor is ``-1`` or the neighbour does not exist. ``mode="raster"`` reproduces a flat-index rule:
    ``+-1`` wrap across rows and every neighbour is clamped into ``[0, H*W - 1]`` (so border anchors repeat
    themselves); ``mode="grid"`` uses true 2-D neighbours and drops those off the grid.
    """
    h, w = int(grid[0]), int(grid[1])
    n = h * w
    offs = torch.tensor([0, -1, 1, -w, w], device=idx.device)
    cand = idx[:, None, :] + offs[None, :, None]  # [B, 5, A]
    if mode == "raster":
        cand = cand.clamp(0, n - 1)
    elif mode == "grid":
        y, x = idx // w, idx % w
        ok = torch.stack([torch.ones_like(idx, dtype=torch.bool), x > 0, x < w - 1, y > 0, y < h - 1], dim=1)
        cand = torch.where(ok, cand, -1)
    else:
        raise ValueError(f"neighbours must be 'raster' or 'grid', got {mode!r}")
    cand = torch.where(idx[:, None, :] >= 0, cand, -1)
    return cand.reshape(idx.shape[0], -1)
