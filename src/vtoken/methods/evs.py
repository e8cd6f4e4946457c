"""EVS: Efficient Video Sampling, pruning the tokens that barely change from the previous frame.

Bagrov et al. (NVIDIA), "Efficient Video Sampling: Pruning Temporally Redundant Tokens for Faster VLM Inference",
arXiv 2510.14624 (2025). The official implementation ships in vLLM (``video_pruning_rate``,
``vllm/multimodal/video_prune/evs.py``), https://github.com/vllm-project/vllm.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ..core import Reduction, reduction_from_indices
from ..ops.similarity import float32
from ..ops.video import clip_frames, frame_valid
from .registry import register

#: the score the official code gives every token of the first frame (cosine dissimilarity is at most 2), so the
#: first frame is always kept whole
FIRST_FRAME_SCORE = 255.0


def retained_count(tokens_per_frame: int, frames: int, q: float) -> int:
    """The tokens vLLM's EVS keeps of a clip of ``frames`` frames of ``tokens_per_frame`` tokens at pruning rate
    ``q`` in ``[0, 1)``: ``max(tokens_per_frame, int(tokens_per_frame * frames * (1 - q)))`` (Python float
    arithmetic, truncated; the first frame is the floor). Pass it as ``keep`` to reproduce a ``video_pruning_rate``."""
    if isinstance(q, bool) or not isinstance(q, (int, float)) or not 0.0 <= q < 1.0:
        raise ValueError(f"evs: the pruning rate q must be a float in [0, 1), got {q!r}")
    total = tokens_per_frame * frames
    return max(tokens_per_frame, int(total * (1 - q)))


def temporal_dissimilarity(tokens: Tensor, video_grid: tuple[int, int, int]) -> Tensor:
    """``[B, T, H, W]``: ``1 - cos`` between every token and the token at the same grid position in the previous
    frame (``torch.nn.functional.cosine_similarity``, eps 1e-8), :data:`FIRST_FRAME_SCORE` on frame 0. Computed in
    float32 (float64 stays float64) for ``tokens [B, T * H * W, D]`` in frame-major, row-major order."""
    t, h, w = video_grid
    b, _, d = tokens.shape
    x = float32(tokens).reshape(b, t, h, w, d)
    dissimilarity = 1 - F.cosine_similarity(x[:, 1:], x[:, :-1], dim=-1)
    first = torch.full((b, 1, h, w), FIRST_FRAME_SCORE, dtype=x.dtype, device=x.device)
    return torch.cat([first, dissimilarity], dim=1)


@register("evs", paper="Efficient Video Sampling: Pruning Temporally Redundant Tokens for Faster VLM Inference",
          venue="arXiv 2025", repo="https://github.com/vllm-project/vllm", stage="video", kind="prune",
          signals=("video_grid",), parity=True, fixture="evs")
def evs(tokens: Tensor, counts: Tensor, *, mask: Tensor | None = None,
        video_grid: tuple[int, int, int] | None = None) -> Reduction:
    """EVS (arXiv 2510.14624, as vLLM ships it): keep the first frame whole, then the tokens that changed most since
    the previous frame, chosen globally over the clip.

    ``tokens [B, T * H * W, D]`` are ``T`` frames of ``H x W`` tokens (``video_grid = (T, H, W)``, the grid after
    the spatial merge), frame by frame; shorter clips are padded with whole masked frames at the end. Every token of
    frame 0 scores :data:`FIRST_FRAME_SCORE`; every later token ``1 - cos`` with the token at the same position of
    the previous frame (not the last kept one), see :func:`temporal_dissimilarity`. Each clip keeps its
    ``counts[b]`` highest-scoring valid tokens (a stable descending sort over the flat clip: ties to the lower
    index), so a frame may keep anything from all to none of its tokens.

    The budget: vLLM takes a pruning rate ``q`` and keeps ``max(H * W, int(T * H * W * (1 - q)))`` tokens
    (:func:`retained_count`); vtoken takes ``keep`` (that count, or a ratio ``~ 1 - q`` rounded half-up). The
    first frame is the floor: a ``keep`` resolving to fewer than ``H * W`` tokens is a ``ValueError``.

    M-RoPE: the kept tokens keep their original ``(t, h, w)`` ids (the model adapter does that). vLLM instead
    rewrites the prompt's positions after pruning (``recompute_mrope_positions``) and resumes the text after a
    media item at its base + grid width rather than at its largest position + 1; vtoken does not imitate that.

    Output: the kept tokens in source order, ``[B, K, D]``. Extras: ``frame_counts [B, T]`` tokens kept per frame
    (0 on padded frames) and ``dissimilarity [B, T, H, W]`` the scores (``-inf`` on padded frames).
    """
    t, h, w = video_grid
    b, n = tokens.shape[:2]
    p, dev = h * w, tokens.device
    frames = clip_frames(mask, b, t, p, dev)
    counts = counts.to(dev)
    if bool((counts < p).any()):
        bad = int(torch.nonzero(counts < p)[0, 0])
        n_valid = int(frames[bad]) * p
        raise ValueError(f"evs always keeps the first frame whole (H * W = {p} tokens), but keep resolves to "
                         f"{int(counts[bad])} tokens for clip {bad} ({n_valid} tokens); use keep >= {p} (a count) "
                         f"or a ratio keep >= {p / n_valid:.4g}")
    valid = frame_valid(frames, t)  # [B, T]
    score = temporal_dissimilarity(tokens, video_grid).masked_fill(~valid[:, :, None, None], float("-inf"))
    order = torch.sort(score.reshape(b, n), dim=1, descending=True, stable=True).indices
    k = int(counts.max())
    idx = order[:, :k]
    red = reduction_from_indices(tokens, idx, counts)
    frame_of = torch.where(red.mask, red.indices // p, t)
    frame_counts = torch.zeros(b, t + 1, dtype=torch.long, device=dev).scatter_add_(
        1, frame_of, torch.ones_like(frame_of))[:, :t]
    red.extras.update(frame_counts=frame_counts, dissimilarity=score)
    return red
