"""DyCoke: temporal token merging before the language model, then dynamic pruning of the visual KV cache while
decoding.

Tao, Qin, You, Sui & Wang, "DyCoke: Dynamic Compression of Tokens for Fast Video Large Language Models" (CVPR 2025),
https://github.com/KD-TAO/DyCoke (official functions ``dycole_ttm`` in ``llava/model/llava_arch.py`` and the
``PrunableDynamicCache`` of ``llava/model/language_model/modeling_qwen2.py``).

* ``dycoke`` (stage ``video``): stage 1, temporal token merging (TTM) on the clip's tokens.
* ``dycoke_kv`` (stage ``decode``): stage 2, at every decoding step, the decoder layers from ``layer`` on attend only
  to the visual tokens the new token attends to most in layer ``layer - 1``; the others wait outside the cache and
  come back when the attention moves (:mod:`vtoken.models.decode` runs it inside the model).

DyCoke in full is both: ``vtoken.apply(model, ["dycoke", vtoken.method("dycoke_kv", keep=0.3)], keep=0.5)``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ..core import Reduction, reduction_from_indices, topk_indices
from ..ops.similarity import float32
from ..ops.video import as_frames, clip_frames, frame_valid
from ._schedule import one_layer
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
    the decode-stage method ``dycoke_kv``: compose the two for DyCoke in full.

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


#: the official pruning ratio ``P`` of the visual KV cache while decoding (``dycoke_p=0.7`` in the README's and
#: ``eval.sh``'s model_args): ``keep=0.3`` for ``dycoke_kv``
OFFICIAL_KV_PRUNING_RATIO = 0.7


@register("dycoke_kv", paper="DyCoke: Dynamic Compression of Tokens for Fast Video Large Language Models",
          venue="CVPR 2025", repo="https://github.com/KD-TAO/DyCoke", stage="decode", kind="prune",
          signals=("llm_attn",), optional_signals=("decode_state",), schedule=one_layer("dycoke_kv", default=3),
          knob_ranges={"threshold": "[-1, 1]"}, main_knobs=("layer",),
          knob_sources={
              "layer": "official scripts: dycoke_l=3 in the README's and eval.sh's model_args",
              "threshold": "official code: a new selection when the cosine similarity of the visual attention with "
                           "the previous step's falls below 0.9 (dycoke_pruning)",
          })
def dycoke_kv(tokens: Tensor, counts: Tensor, *, mask: Tensor | None = None, llm_attn: Tensor | None = None,
              decode_state: Tensor | None = None, threshold: float = 0.9) -> Reduction:
    """DyCoke's dynamic KV-cache pruning (stage 2): at each decoding step, the visual tokens the new token attends
    to most stay in the KV cache of the deeper decoder layers; the selection is renewed only when that attention
    has moved since the previous step.

    At decoding step ``t`` (the prefill prunes nothing), with ``a_t [N]`` the new token's attention to the
    sample's visual tokens in decoder layer ``layer - 1`` (head mean, softmax over its whole cache; every visual
    token is still there, as layers before ``layer`` keep them all):

    1. ``s = cos(a_t, a_{t-1})`` over the visual tokens (no previous step: a new selection);
    2. ``s < threshold``: the kept set becomes the ``counts[b]`` tokens of highest ``a_t`` (ties to the lowest
       index); otherwise the previous step's kept set stays (unless it holds another count than ``counts[b]``);
    3. ``a_t`` becomes the reference of the next step either way.

    The decoder layers from ``layer`` on then attend to the kept visual tokens only (text and generated tokens
    always stay); a pruned token's keys and values wait outside the cache and come back when a later selection
    picks it (:mod:`vtoken.models.decode`).

    Args:
        tokens: ``[B, N, dk]`` keys of the visual tokens in decoder layer ``layer - 1`` (RoPE applied, heads
            concatenated); DyCoke scores by attention only.
        counts: ``[B]`` long, visual tokens kept per sample at each step: ``keep`` is ``1 - P`` for the official
            pruning ratio ``P`` (``dycoke_p = 0.7``, ``keep=0.3``; the official count ``int(N * (1 - P))`` floors
            where a ratio ``keep`` rounds half-up).
        mask: optional ``[B, N]`` bool, True on real tokens.
        llm_attn: ``[B, N]`` the new token's attention probabilities to each visual token in layer ``layer - 1``.
        decode_state: ``[B, N, 2]`` the previous step's ``extras["state"]``: its ``llm_attn`` and its kept set
            (1.0 on kept tokens); absent at the first decoding step.
        layer: the first decoder layer whose cache holds only the kept visual tokens (official ``dycoke_l = 3``);
            the attention is read from the layer before it (a schedule knob: ``vtoken.apply`` places the step).
        threshold: a new selection when the similarity falls below it (official 0.9); ``1`` selects at every step
            (ties aside), ``-1`` keeps the first step's selection for good.

    The official code (``PrunableDynamicCache``) resets its kept set at every step, so on a step whose attention
    did not move (step 2's "otherwise") its deeper layers attend to every visual token; the paper's rule, followed
    here, keeps the previous step's selection instead, so every step attends to ``counts[b]`` visual tokens.

    Returns the kept tokens in source order; ``extras``: ``state [B, N, 2]`` (this step's ``llm_attn`` and kept set,
    the next step's ``decode_state``) and ``reselected [B]`` bool (whether this step made a new selection).
    """
    assert llm_attn is not None
    b, n = llm_attn.shape
    valid = mask if mask is not None else torch.ones(b, n, dtype=torch.bool, device=llm_attn.device)
    attn = llm_attn.float().masked_fill(~valid, 0.0)
    fresh = torch.zeros(b, n + 1, dtype=torch.bool, device=attn.device)
    top = topk_indices(attn, counts, valid)
    fresh.scatter_(1, torch.where(top >= 0, top, n), True)
    fresh = fresh[:, :n]
    if decode_state is None:
        renew = torch.ones(b, dtype=torch.bool, device=attn.device)
        kept = fresh
    else:
        before, was_kept = decode_state[..., 0].float().masked_fill(~valid, 0.0), decode_state[..., 1] > 0.5
        was_kept = was_kept & valid
        # a state kept at another budget (not this call's counts) cannot be reused: a new selection
        renew = (F.cosine_similarity(attn, before, dim=1) < threshold) | (was_kept.sum(1) != counts.to(attn.device))
        kept = torch.where(renew[:, None], fresh, was_kept)
    slots = torch.arange(n, device=attn.device).expand(b, n)
    out = reduction_from_indices(tokens, torch.where(kept, slots, -1))
    state = torch.stack([attn, kept.float()], dim=-1)
    return Reduction(out.tokens, out.indices, out.mask, None, None, {"state": state, "reselected": renew})
