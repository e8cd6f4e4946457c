"""Token-Shuffle: merge every ``s x s`` window of the token grid along channels, and its exact inverse.

Ma et al., "Token-Shuffle: Towards High-Resolution Image Generation with Autoregressive Models", 2025.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..core import Reduction
from ..ops.grid import shuffle, unshuffle, valid_windows, window_index
from .registry import register

_PAPER = "Token-Shuffle: Towards High-Resolution Image Generation with Autoregressive Models"


def _no_padding(mask: Tensor | None, method: str) -> None:
    if mask is not None and not bool(mask.all()):
        raise ValueError(f"method {method!r} rearranges a full token grid; a mask with padded tokens is not supported")


@register("token_shuffle", paper=_PAPER, venue="arXiv 2025", repo=None, stage="pre_llm", kind="layout",
          signals=("grid",),
          knob_ranges={"window": ">= 1"},
          main_knobs=("window",),
          knob_sources={
              "window": "vtoken: None, from keep",
          })
def token_shuffle(tokens: Tensor, counts: Tensor, *, mask: Tensor | None = None,
                  grid: tuple[int, int] | None = None, window: int | None = None) -> Reduction:
    """Token-Shuffle (Ma et al., 2025): every ``s x s`` window of the ``grid = (H, W)`` becomes one token whose
    channels are the window's tokens concatenated in raster order: ``tokens [B, N, D]`` -> ``[B, N / s^2, s^2 D]``.

    ``keep`` picks the window: it must resolve to ``N / s^2`` for an integer ``s`` dividing both ``H`` and ``W``
    (``keep=144`` or ``keep=0.25`` on ``24 x 24`` gives ``s = 2``); otherwise a ``ValueError`` lists the valid keeps.
    ``window=s`` states the window explicitly and is checked against ``keep``. The paper's learned channel
    compression around the shuffle is not part of this training-free operator. ``indices`` = each window's top-left
    token, ``assign`` = each input's window, ``sizes = s^2``. Inverse: ``token_unshuffle`` (bit for bit) or
    :func:`vtoken.ops.grid.unshuffle`.

    Args:
        window: the side ``s`` of the ``s x s`` windows merged into one token (default None: derived from ``keep``).
            A given window must match ``keep`` and divide both sides of the grid (``s > 1``).
    """
    _no_padding(mask, "token_shuffle")
    h, w = grid
    b, n = tokens.shape[:2]
    k = int(counts.max())
    if int(counts.min()) != k:
        raise ValueError(f"token_shuffle needs the same keep for every sample, got {counts.tolist()}")
    windows = [s for s in valid_windows((h, w)) if s > 1]
    valid = {n // (s * s): s for s in windows}
    s = valid.get(k)
    if window is not None:
        if isinstance(window, bool) or not isinstance(window, int) or window not in windows:
            raise ValueError(f"token_shuffle: window must divide both sides of the grid {(h, w)} and be > 1; "
                             f"valid windows: {windows}")
        if s != window:
            raise ValueError(f"token_shuffle: window={window} gives keep={n // (window * window)}, but keep resolves "
                             f"to {k}; pass keep={n // (window * window)} (or the ratio 1/{window * window})")
    if s is None:
        raise ValueError(f"token_shuffle: keep must resolve to N / s**2 for a window s dividing both sides of the "
                         f"grid {(h, w)}; valid keeps for N = {n}: {sorted(valid, reverse=True)} "
                         f"(windows {windows}), got keep -> {k}")
    out = shuffle(tokens, (h, w), s)
    slot, top_left = window_index((h, w), s, tokens.device)
    m = top_left.shape[0]
    return Reduction(out, top_left.expand(b, m).clone(), torch.ones(b, m, dtype=torch.bool, device=tokens.device),
                     assign=slot.expand(b, n).clone(),
                     sizes=torch.full((b, m), float(s * s), device=tokens.device),
                     extras={"window": s, "grid": (h // s, w // s)})


@register("token_unshuffle", paper=_PAPER, venue="arXiv 2025", repo=None, stage="pre_llm", kind="layout",
          signals=("grid",), needs_keep=False,
          knob_ranges={"window": ">= 1"},
          main_knobs=("window",),
          knob_sources={
              "window": "vtoken: required, the window token_shuffle used",
          })
def token_unshuffle(tokens: Tensor, counts: Tensor | None = None, *, mask: Tensor | None = None,
                    grid: tuple[int, int] | None = None, window: int | None = None) -> Reduction:
    """Token-Unshuffle (Ma et al., 2025), the exact inverse of ``token_shuffle``: ``tokens [B, M, s^2 D]`` on the
    shuffled ``grid = (h, w)`` (``M = h * w``) -> ``[B, M s^2, D]`` on the ``(h s, w s)`` grid, bit for bit.

    Sets its own count: call with ``keep=None`` and ``window=s``. ``indices`` are the restored raster positions
    ``0 .. M s^2 - 1`` (the index each token had before ``token_shuffle``); ``extras["source"] [M s^2]`` is the
    shuffled token each output came from (many outputs per input, so there is no ``assign``).

    Args:
        window: the side ``s`` of the ``s x s`` windows ``token_shuffle`` merged (required: the default None
            raises). The channels must be divisible by ``s^2``.
    """
    _no_padding(mask, "token_unshuffle")
    if window is None:
        raise ValueError("token_unshuffle needs window=s, the side of the windows token_shuffle merged")
    if isinstance(window, bool) or not isinstance(window, int) or window < 1:
        raise ValueError(f"token_unshuffle: window must be an int >= 1, got {window!r}")
    s = window
    b, _, c = tokens.shape
    if c % (s * s):
        raise ValueError(f"token_unshuffle: channels {c} are not divisible by window**2 = {s * s}")
    h, w = grid
    full = (h * s, w * s)
    out = unshuffle(tokens, full, s)
    n = out.shape[1]
    slot, _ = window_index(full, s, tokens.device)
    return Reduction(out, torch.arange(n, device=tokens.device).expand(b, n).clone(),
                     torch.ones(b, n, dtype=torch.bool, device=tokens.device),
                     extras={"window": s, "grid": full, "source": slot})

