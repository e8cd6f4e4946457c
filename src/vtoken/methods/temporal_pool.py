"""Temporal pooling baseline: average each run of s adjacent frames into one frame."""

from __future__ import annotations

import torch
from torch import Tensor

from ..core import Reduction, reduction_from_merge
from ..ops.similarity import float32
from ..ops.video import budget_frames, clip_frames, frame_step, frame_valid
from .registry import register


@register("temporal_pool", paper="Temporal average pooling (baseline)", venue="baseline", repo=None,
          stage="video", kind="pool", signals=("video_grid",), exact=False,
          knob_ranges={"window": ">= 1"}, main_knobs=("window",),
          knob_sources={"window": "vtoken: None, the smallest window whose pooled frames fit keep"})
def temporal_pool(tokens: Tensor, counts: Tensor, *, mask: Tensor | None = None,
                  video_grid: tuple[int, int, int] | None = None, window: int | None = None) -> Reduction:
    """Average each run of ``window`` adjacent frames, position by position, into one frame of ``H * W`` tokens.

    ``tokens [B, T * H * W, D]`` are ``T`` frames of ``H * W`` tokens (``video_grid = (T, H, W)``); clips shorter
    than ``T`` are padded with whole masked frames, and a clip's last run may be shorter. A pooled token's index is
    the token at its position in the run's first frame; ``sizes`` counts the frames averaged. A budget below one
    frame is a ``ValueError``.

    Args:
        window: frames averaged per output frame (default None: the smallest window whose pooled frames fit the
            budget, ``ceil(frames / (counts // (H * W)))``); with a window given, the first pooled frames that fit.

    Extras: ``frame_counts [B, T]`` tokens kept per input frame (``H * W`` on each run's first frame).
    """
    t, h, w = video_grid
    b, d, p = tokens.shape[0], tokens.shape[-1], h * w
    dev = tokens.device
    frames = clip_frames(mask, b, t, p, dev)
    fit = budget_frames(counts.to(dev), p, "temporal_pool")
    size = frame_step(frames, fit, window)
    f = torch.arange(t, device=dev)[None, :]
    group = f // size[:, None]                                            # [B, T] output frame of each frame
    used = frame_valid(frames, t) & (group < fit[:, None])
    slot = (group[:, :, None] * p + torch.arange(p, device=dev)).reshape(b, t * p)
    token_used = used[:, :, None].expand(b, t, p).reshape(b, t * p)
    assign = torch.where(token_used, slot, -1)
    x = float32(tokens)
    sums = torch.zeros(b, t * p, d, dtype=x.dtype, device=dev)
    sums.scatter_add_(1, assign.clamp(min=0)[..., None].expand(-1, -1, d), x * token_used[..., None].to(x.dtype))
    sizes = torch.zeros(b, t * p, dtype=x.dtype, device=dev).scatter_add_(1, assign.clamp(min=0),
                                                                          token_used.to(x.dtype))
    valid = sizes > 0
    out = (sums / sizes.clamp(min=1)[..., None]).to(tokens.dtype)
    rep_of_group = (torch.arange(t, device=dev)[None, :, None] * size[:, None, None] * p
                    + torch.arange(p, device=dev))                        # [B, G, P]: run's first frame
    rep = torch.where(valid, rep_of_group.reshape(b, t * p), -1)
    starts = used & (f % size[:, None] == 0)
    return reduction_from_merge(out, rep, assign, sizes, valid,
                                extras={"frame_counts": starts.long() * p})
