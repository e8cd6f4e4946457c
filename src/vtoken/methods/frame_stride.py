"""Frame-stride baseline: keep every k-th frame of a clip whole (uniform frame sampling at a lower rate)."""

from __future__ import annotations

import torch
from torch import Tensor

from ..core import Reduction, reduction_from_indices
from ..ops.video import budget_frames, clip_frames, frame_step, frame_valid
from .registry import register


@register("frame_stride", paper="Frame stride (baseline: uniform frame sampling)", venue="baseline", repo=None,
          stage="video", kind="prune", signals=("video_grid",), exact=False,
          knob_ranges={"stride": ">= 1"}, main_knobs=("stride",),
          knob_sources={"stride": "vtoken: None, the smallest stride whose frames fit keep"})
def frame_stride(tokens: Tensor, counts: Tensor, *, mask: Tensor | None = None,
                 video_grid: tuple[int, int, int] | None = None, stride: int | None = None) -> Reduction:
    """Keep frames ``0, k, 2k, ...`` of each clip whole, at most the whole frames that fit ``counts[b]``.

    ``tokens [B, T * H * W, D]`` are ``T`` frames of ``H * W`` tokens (``video_grid = (T, H, W)``); clips shorter
    than ``T`` are padded with whole masked frames. A budget below one frame is a ``ValueError``.

    Args:
        stride: keep every ``stride``-th frame (default None: the smallest stride whose frames fit the budget,
            ``ceil(frames / (counts // (H * W)))``); with a stride given, the first frames of that stride that fit.

    Extras: ``frame_counts [B, T]`` tokens kept per frame.
    """
    t, h, w = video_grid
    b, p = tokens.shape[0], h * w
    frames = clip_frames(mask, b, t, p, tokens.device)
    fit = budget_frames(counts.to(tokens.device), p, "frame_stride")
    step = frame_step(frames, fit, stride)
    f = torch.arange(t, device=tokens.device)[None, :]
    picked = frame_valid(frames, t) & (f % step[:, None] == 0)
    picked &= picked.long().cumsum(1) <= fit[:, None]
    token_kept = picked[:, :, None].expand(b, t, p).reshape(b, t * p)
    idx = torch.where(token_kept, torch.arange(t * p, device=tokens.device), -1)
    return reduction_from_indices(tokens, idx, extras={"frame_counts": picked.long() * p})
