"""Clip layout helpers: tokens ``[B, N, D]`` that are ``T`` frames of ``P = H * W`` tokens each, frame by frame.

A batch of clips of different lengths is padded with whole masked frames at the end of each sample, so a sample's
frame count is its valid tokens divided by ``P``.
"""

from __future__ import annotations

import torch
from torch import Tensor


def clip_frames(mask: Tensor | None, b: int, t: int, p: int, device: torch.device, where: str = "mask") -> Tensor:
    """``[B]`` long: the valid frames of each clip. ``mask [B, T * P]`` must mark, per sample, a prefix of whole
    frames (a ``ValueError`` naming ``where`` otherwise); ``None`` means every clip has all ``t`` frames."""
    if mask is None:
        return torch.full((b,), t, dtype=torch.long, device=device)
    per_frame = mask.reshape(b, t, p)
    whole = per_frame.all(-1)
    if not bool((per_frame.any(-1) == whole).all()):
        raise ValueError(f"{where} must mark whole frames of P = {p} tokens (a video's padding is whole frames at "
                         "the end of the clip), got a frame that is only partly valid")
    frames = whole.sum(-1)
    prefix = torch.arange(t, device=device)[None, :] < frames[:, None]
    if not bool((whole == prefix).all()):
        raise ValueError(f"{where} must mark the first frames of each clip (padding frames at the end), got a "
                         "masked frame before a valid one")
    return frames


def frame_valid(frames: Tensor, t: int) -> Tensor:
    """``[B, T]`` bool: True on the first ``frames[b]`` frames of each clip."""
    return torch.arange(t, device=frames.device)[None, :] < frames[:, None]


def as_frames(x: Tensor, t: int, p: int) -> Tensor:
    """``[B, T * P, ...]`` -> ``[B, T, P, ...]`` (a view)."""
    return x.reshape(x.shape[0], t, p, *x.shape[2:])


def budget_frames(counts: Tensor, p: int, method: str) -> Tensor:
    """``[B]`` long: the whole frames of ``p`` tokens that fit each clip's budget ``counts [B]``; a ``ValueError``
    when a budget is below one frame (methods that keep or pool whole frames)."""
    whole = counts // p
    if bool((whole < 1).any()):
        low = int(counts.min())
        raise ValueError(f"{method} keeps whole frames of H * W = {p} tokens, but keep resolves to {low} tokens for a "
                         f"clip, less than one frame; pass keep >= {p} (or a ratio of at least one frame per clip)")
    return whole


def frame_step(frames: Tensor, fit: Tensor, step: int | None) -> Tensor:
    """``[B]`` long: every how many frames a clip of ``frames`` frames keeps (or pools) one, so that at most
    ``fit`` frames result: ``step`` when given (at least 1), else the smallest step that fits,
    ``ceil(frames / fit)``."""
    if step is not None:
        return torch.full_like(frames, int(step))
    return ((frames + fit - 1) // fit).clamp(min=1)
