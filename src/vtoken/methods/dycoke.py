"""DyCoke, stage 1: temporal token merging (TTM), pruning the tokens of a frame that repeat an earlier frame.

Tao, Qin, Liu, Yang, Wang & Zhang, "DyCoke: Dynamic Compression of Tokens for Fast Video Large Language Models"
(CVPR 2025), https://github.com/KD-TAO/DyCoke (official function ``dycole_ttm`` in ``llava/model/llava_arch.py``).

Only the first stage, applied to the video tokens before the language model, is here. DyCoke's second stage
(dynamic pruning of the visual KV cache at every decoding step) is a decode-time mechanism and is implemented
separately, not by this method.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ..core import Reduction, reduction_from_indices
from ..ops.similarity import float32
from ..ops.video import as_frames, clip_frames, frame_valid
from .registry import register

#: the official merging ratio ``K`` (share of tokens pruned in each pruned frame): the default of the lmms-eval
#: wrapper that ``eval.sh`` runs, the README's setting and ``dycole_ttm``'s own default
OFFICIAL_MERGING_RATIO = 0.7


def frame_roles(frames: Tensor, t: int, whole_clip: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """``(whole, pruned, reference)`` for clips of ``frames [B]`` valid frames laid out on ``t`` frames.

    ``whole [B, T]`` bool: frames kept whole (the first frame of every pair that is not re-pruned); ``pruned
    [B, T]`` bool: the second frame of every pair (against the first) and frames ``4j + 2`` with ``4j < frames - 4``
    (against frame ``4j``); ``reference [B, T]`` long: the frame a pruned frame is compared with (``-1`` otherwise).
    A trailing unpaired frame (odd ``frames``) is in neither, so it is dropped, as in the official code, unless
    ``whole_clip [B]`` marks the clip as kept whole (its budget covers every token), where it is kept whole.
    """
    f = torch.arange(t, device=frames.device)[None, :]
    valid = frame_valid(frames, t)
    second = valid & (f % 2 == 1)
    again = valid & (f % 4 == 2) & (f < frames[:, None] - 2)
    pruned = second | again
    trailing = valid & (f % 2 == 0) & (f == frames[:, None] - 1)
    if whole_clip is not None:
        trailing &= ~whole_clip[:, None]
    whole = valid & ~pruned & ~trailing
    reference = torch.where(second, f - 1, torch.where(again, f - 2, -1))
    return whole, pruned, reference


def official_keep(frames: int, tokens_per_frame: int, merging_ratio: float = OFFICIAL_MERGING_RATIO) -> int:
    """The number of tokens the official ``dycole_ttm(tokens, tokens_per_frame, merging_ratio)`` returns for a clip
    of ``frames`` frames: ``P`` per frame kept whole plus ``int((1 - merging_ratio) * P)`` per pruned frame. Pass it
    as ``keep`` to reproduce the official setting (e.g. ``official_keep(32, 196) == 3098``)."""
    whole, pruned, _ = frame_roles(torch.tensor([frames]), frames)
    per_pruned = int((1 - merging_ratio) * tokens_per_frame)
    return int(whole.sum()) * tokens_per_frame + int(pruned.sum()) * per_pruned


@register("dycoke", paper="DyCoke: Dynamic Compression of Tokens for Fast Video Large Language Models",
          venue="CVPR 2025", repo="https://github.com/KD-TAO/DyCoke", stage="video", kind="prune",
          signals=("video_grid",), parity=True, fixture="dycoke_ttm", exact=False,
          knob_ranges={}, main_knobs=(), knob_sources={})
def dycoke(tokens: Tensor, counts: Tensor, *, mask: Tensor | None = None,
           video_grid: tuple[int, int, int] | None = None) -> Reduction:
    """DyCoke's temporal token merging (stage 1): in every pair of frames keep the first whole and, of the second,
    only the tokens least similar to the token at the same position of the first; then, every 4 frames, re-prune
    frame ``i + 2`` the same way against frame ``i``. DyCoke's stage 2 (dynamic KV-cache pruning during decoding) is
    implemented separately, not here.

    ``tokens [B, T * H * W, D]`` are ``T`` frames of ``P = H * W`` tokens (``video_grid = (T, H, W)``); clips
    shorter than ``T`` are padded with whole masked frames at the end. Per clip of ``F`` valid frames:

    1. Pairs ``(i, i + 1)``, ``i = 0, 2, 4, ...``, ``i + 1 < F``: frame ``i + 1`` is scored by the cosine similarity
       of each token with the token at the same position of frame ``i`` (both L2-normalised first). A trailing
       unpaired frame (odd ``F``) is dropped, as in the official code.
    2. Frames ``i + 2`` for ``i = 0, 4, 8, ...``, ``i < F - 4`` (so frame ``F - 2`` of a clip of ``F = 4m + 2``
       frames is not) are scored instead by the cosine similarity with frame ``i`` (the raw tokens).
    3. Every other frame (``0, 4, 8, ...`` and the frames ``4j + 2`` of step 2's tail) is kept whole; each pruned
       frame keeps its least similar tokens (ties to the lowest position).

    The budget: the official knob is the merging ratio ``K`` (``dycoke_k``, 0.7 in the official scripts): every
    pruned frame keeps ``int((1 - K) * P)`` tokens. Here ``counts[b]`` (from ``keep``) is the clip's budget and sets
    that share: after the ``P`` tokens of each frame kept whole, the rest is split evenly over the pruned frames
    (the first ones, in frame order, take one more token when it does not divide). So ``keep =``
    :func:`official_keep` ``(F, P, K)`` reproduces the official output exactly (``official_keep(32, 196) == 3098``,
    about ``keep=0.494`` as a ratio of 32 frames of 196 tokens). A budget below the tokens of the frames kept whole
    (``P`` times their number) is a ``ValueError``, as is any budget below a whole single-frame clip (no pair to
    prune). The output meets the budget exactly except on clips of an odd number of frames, whose trailing frame is
    dropped however large the budget (``exact=False``); a budget covering every token keeps the clip whole. The
    official code needs ``F >= 5`` (it fails on fewer frames); here clips of 2 to 4 frames run step 1 only.

    Output: the kept tokens in source order; ``extras``: ``order [B, K]`` the kept source indices in the official
    output order (frame by frame; a pruned frame's tokens in ascending similarity, whole frames in position order;
    ``-1`` padded), ``frame_counts [B, T]`` tokens kept per frame (0 on dropped and padded frames) and ``reference
    [B, T]`` the frame each pruned frame was compared with (``-1`` for frames kept whole or dropped).
    ``tokens [B, N, D]`` -> ``[B, K, D]``.
    """
    t, h, w = video_grid
    b, p = tokens.shape[0], h * w
    dev = tokens.device
    frames = clip_frames(mask, b, t, p, dev)
    counts = counts.to(dev)
    whole_clip = counts >= frames * p
    whole, pruned, reference = frame_roles(frames, t, whole_clip)

    n_whole, n_pruned = whole.sum(1), pruned.sum(1)
    floor = torch.where(n_pruned > 0, n_whole * p, frames * p)
    low = ~whole_clip & (counts < floor)
    if bool(low.any()):
        i = int(torch.nonzero(low)[0, 0])
        c, fr, fl = int(counts[i]), int(frames[i]), int(floor[i])
        if int(n_pruned[i]) == 0:
            raise ValueError(f"dycoke: keep resolves to {c} tokens for clip {i}, a single frame of {p} tokens: DyCoke "
                             f"prunes a frame against the one before it and drops an unpaired frame, so a clip of one "
                             f"frame can only be kept whole; pass keep >= {fl} (or give clips of at least 2 frames)")
        raise ValueError(f"dycoke: keep resolves to {c} tokens for clip {i} ({fr} frames of {p} tokens), below the "
                         f"{fl} tokens of its {int(n_whole[i])} frames DyCoke keeps whole (frames 0, 4, 8, ... and "
                         f"any 4j + 2 not re-pruned); pass keep >= {fl} (as a ratio, >= {fl / (fr * p):.4g} of the "
                         f"clip)")

    # split what the whole frames leave over the pruned frames: k each, one more for the first r
    rest = (counts - n_whole * p).clamp(min=0)
    q = n_pruned.clamp(min=1)
    full = whole_clip | (rest >= n_pruned * p)
    k = torch.where(full, p, rest // q)
    r = torch.where(full, 0, rest - k * q)
    rank = pruned.long().cumsum(1) - 1
    frame_counts = torch.where(whole, p, torch.where(pruned, k[:, None] + (rank < r[:, None]).long(), 0))

    # scores: similarity of each token with the same position of its reference frame
    x = as_frames(float32(tokens), t, p)                                   # [B, T, P, D]
    score = torch.zeros(b, t, p, dtype=x.dtype, device=dev)
    m1 = t // 2
    if m1:
        a = F.normalize(x[:, 0:2 * m1:2], p=2, dim=-1)
        c1 = F.normalize(x[:, 1::2], p=2, dim=-1)
        score[:, 1::2] = F.cosine_similarity(a, c1, dim=-1)
    m2 = len(range(2, t, 4))
    if m2:
        score[:, 2::4] = F.cosine_similarity(x[:, 0::4][:, :m2], x[:, 2::4], dim=-1)

    # per frame: positions in the official order (ascending similarity for pruned frames), first frame_counts kept
    pos = torch.arange(p, device=dev).expand(b, t, p)
    ranked = torch.sort(score, dim=-1, stable=True).indices
    order_pos = torch.where(pruned[..., None], ranked, pos)
    kept = (pos < frame_counts[..., None]).reshape(b, t * p)
    src = (torch.arange(t, device=dev)[None, :, None] * p + order_pos).reshape(b, t * p)
    first = torch.sort((~kept).to(torch.uint8), dim=1, stable=True).indices  # kept slots first, in order
    total = frame_counts.sum(1)
    width = int(total.max())
    order = src.gather(1, first[:, :width])
    order = torch.where(torch.arange(width, device=dev)[None, :] < total[:, None], order, -1)
    return reduction_from_indices(tokens, order, extras={"order": order, "frame_counts": frame_counts,
                                                         "reference": torch.where(pruned, reference, -1)})
