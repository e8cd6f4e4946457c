"""HoliTom: holistic token merging for video LLMs. Outer-LLM: global temporal segmentation of the clip, then
spatio-temporal merging inside each segment (``holitom``); inner-LLM: similarity merging at one decoder layer
(``holitom_llm``).

Shao, Tao, Qin, You, Sui & Wang, "HoliTom: Holistic Token Merging for Fast Video Large Language Models" (NeurIPS
2025, arXiv 2505.21334), https://github.com/cokeshao/HoliTom (official ``LlavaMetaForCausalLM_holitom`` in
``holitom/llava_arch.py`` and ``Qwen2Model_holitom`` in ``holitom/modeling_qwen2.py``).

Reimplemented from the paper and the parity fixture's description. The video-stage method works on the tokens the
language model would see, frame by frame (LLaVA-OneVision: each frame's 27 x 27 SigLIP grid after the model's own
2 x 2 pooling, bilinear to 14 x 14, or average to 13 x 13 for LLaVA-Video). The pooling and the ``image_newline``
tokens belong to the model, not to HoliTom: the official code pools before HoliTom sees the frames and pools the
vision attention map the same way, so the attention signal must come on the same (pooled) grid as the tokens; the
newline tokens are added by the model around the result (the ``order`` extra gives the official ``one_token``
order; the ``grid`` layout is source order with a newline after every non-empty row).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from ..core import Reduction, reduction_from_merge, topk_indices
from ..ops.dpc import dpc_distance, knn_density, parent_distance
from ..ops.similarity import float32
from ..ops.video import clip_frames, frame_valid
from ._schedule import resolve_llm_keep, scale_layer
from .registry import LLMSchedule, SignalSpec, register

#: the official defaults (environment variables of ``holitom/llava_arch.py``); ``T`` and ``RETAIN_RATIO`` as the
#: README's lmms-eval command runs them (``RETAIN_RATIO=0.15 T=0.80 HOLITOM_k=18 HOLITOM_r=0.5``)
OFFICIAL_THRESHOLD = 0.8
OFFICIAL_RETAIN_RATIO = 0.15
OFFICIAL_BETA = 0.6
OFFICIAL_KNN = 7
OFFICIAL_MAX_WINDOW_SIZE = 1024
OFFICIAL_LLM_LAYER = 18
OFFICIAL_LLM_MERGE_RATIO = 0.5
#: ``torch.nn.functional.cosine_similarity``'s eps, as the official feature similarity uses it
_COS_EPS = 1e-8


# ---------------------------------------------------------------------------------------------------------------
# temporal segmentation
# ---------------------------------------------------------------------------------------------------------------


def frame_similarity(x: Tensor) -> Tensor:
    """``[B, T - 1, P]``: cosine similarity of every token with the token at the same position of the next frame,
    for ``x [B, T, P, D]`` (L2-normalised first, then ``cosine_similarity`` with eps 1e-8, as the official code)."""
    xn = F.normalize(x, p=2, dim=-1)
    return F.cosine_similarity(xn[:, :-1], xn[:, 1:], dim=-1, eps=_COS_EPS)


class _Segments:
    """The temporal windows of a batch of clips (see :func:`temporal_windows`)."""

    def __init__(self, sim: Tensor, start: Tensor, end: Tensor, static: Tensor, total_reduced: Tensor,
                 valid: Tensor) -> None:
        self.sim, self.start, self.end, self.static = sim, start, end, static
        self.total_reduced, self.valid = total_reduced, valid
        self.width = torch.where(valid, end - start + 1, 0)                       # [B, T] frames of its window
        t = valid.shape[1]
        self.head = valid & (start == torch.arange(t, device=valid.device))       # [B, T] a window starts here
        p = static.shape[-1]
        n_s = static.sum(-1)                                                      # [B, T]
        self.n_static = torch.where(self.head, n_s, 0)                            # per window, at its first frame
        self.n_dynamic = torch.where(valid, p - n_s, 0)                           # per frame


def temporal_windows(x: Tensor, frames: Tensor, threshold: float, max_window_size: int) -> _Segments:
    """HoliTom's global temporal segmentation of clips ``x [B, T, P, D]`` with ``frames [B]`` valid frames.

    A token is static over a window of frames ``s..e`` when its similarity with the next frame
    (:func:`frame_similarity`) is strictly above ``threshold`` for every pair of the window; a window's gain is its
    static positions times ``e - s`` (the copies it saves). A dynamic programme over the frames picks the windows
    (at most ``max_window_size`` frames) that maximise the total gain: ``dp[i] = max_w dp[i - w] + gain(i - w + 1,
    i)``, the smallest ``w`` on ties (the official strict ``>`` over increasing sizes). Integer arithmetic: the
    official float32 sums are integers, exact here.
    """
    b, t, p, _ = x.shape
    dev = x.device
    valid = frame_valid(frames, t)
    if t > 1:
        sim = frame_similarity(x)                                                  # [B, T - 1, P]
        pair_ok = valid[:, 1:, None]
        above = (sim > threshold) & pair_ok
        idx = torch.arange(t - 1, device=dev)[None, :, None]
        last_false = torch.where(above, -1, idx).cummax(1).values
        run = idx - last_false                                                     # trues ending at each pair
        ge = torch.zeros(b, t - 1, t + 1, dtype=torch.long, device=dev)
        ge.scatter_add_(2, run, torch.ones_like(run))
        ge = ge.flip(-1).cumsum(-1).flip(-1)                                       # [B, T-1, l]: #{run >= l}
        # gain[b, e, w]: window of w frames ending at frame e (w >= 2 needs e >= w - 1)
        w_ax = torch.arange(t + 1, device=dev)
        gain = torch.zeros(b, t, t + 1, dtype=torch.long, device=dev)
        gain[:, 1:, 2:] = ge[:, :, 1:t] * (w_ax[2:] - 1)
        sim = torch.where(pair_ok, sim, 0.0)
    else:
        sim = x.new_zeros(b, 0, p)
        run = torch.zeros(b, 0, p, dtype=torch.long, device=dev)
        gain = torch.zeros(b, t, t + 1, dtype=torch.long, device=dev)

    dp = torch.zeros(b, t + 1, dtype=torch.long, device=dev)                       # dp[:, i + 1]: frames 0..i
    first = torch.zeros(b, t, dtype=torch.long, device=dev)
    for i in range(t):  # the programme is sequential over the frames (T is a few dozen)
        ws = torch.arange(1, min(i + 1, max_window_size) + 1, device=dev)
        vals = dp[:, i + 1 - ws] + gain[:, i, ws]
        best = vals.amax(1)
        w = torch.where(vals == best[:, None], ws, t + 1).amin(1)
        dp[:, i + 1] = best
        first[:, i] = i - w + 1

    cur = frames - 1
    is_end = torch.zeros(b, t, dtype=torch.bool, device=dev)
    f_ax = torch.arange(t, device=dev)
    for _ in range(t):  # backtrack the windows from the last frame
        active = cur >= 0
        if not bool(active.any()):
            break
        is_end |= f_ax == cur[:, None]
        cur = torch.where(active, first.gather(1, cur.clamp(min=0)[:, None])[:, 0] - 1, -1)
    is_start = valid & torch.cat([torch.ones(b, 1, dtype=torch.bool, device=dev), is_end[:, :-1]], 1)
    start = torch.where(is_start, f_ax, 0).cummax(1).values
    end = torch.where(is_end, f_ax, t).flip(1).cummin(1).values.flip(1)
    start, end = torch.where(valid, start, -1), torch.where(valid, end, -1)
    width = end - start + 1
    if t > 1:
        row = run.gather(1, (end - 1).clamp(0, t - 2)[:, :, None].expand(b, t, p))   # runs at the window's last pair
        static = valid[..., None] & (width >= 2)[..., None] & (row >= (width - 1)[..., None])
    else:
        static = torch.zeros(b, t, p, dtype=torch.bool, device=dev)
    total_reduced = dp.gather(1, frames[:, None])[:, 0]
    return _Segments(sim, start, end, static, total_reduced, valid)


# ---------------------------------------------------------------------------------------------------------------
# the budget
# ---------------------------------------------------------------------------------------------------------------


def _allocation(seg: _Segments, r: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """At ratio ``r [B]`` (float64): ``(dynamic tokens kept per frame [B, T], clusters per window [B, T] at its
    first frame, total [B])``: ``ceil(n_dynamic * r)`` per frame and ``round(n_static * r)`` (half to even) per
    window, the official budgets (Python float arithmetic, as here in float64)."""
    dyn = torch.ceil(seg.n_dynamic.double() * r[:, None]).long().minimum(seg.n_dynamic)
    clus = torch.round(seg.n_static.double() * r[:, None]).long().minimum(seg.n_static)
    return dyn, clus, dyn.sum(1) + clus.sum(1)


def _total_at(seg: _Segments, r: Tensor) -> Tensor:
    return _allocation(seg, r)[2]


def _candidates(seg: _Segments) -> Tensor:
    """``[B, C]`` ascending ratios (``inf`` padded) that visit every step of the allocation's total as a function of
    the ratio in ``(0, 1]``: every jump (``k / n_dynamic``, ``(k + 1/2) / n_static``), the midpoints between
    consecutive jumps, a point below the first and 1."""
    b = seg.valid.shape[0]
    p = seg.static.shape[-1]
    dev = seg.valid.device
    k = torch.arange(1, p + 1, dtype=torch.float64, device=dev)
    nd = torch.where(seg.head, seg.n_dynamic, 0).double()[..., None]
    ns = seg.n_static.double()[..., None]
    inf = torch.tensor(float("inf"), dtype=torch.float64, device=dev)
    up = torch.where(k <= nd, k / nd.clamp(min=1), inf)
    rnd = torch.where(k <= ns, (k - 0.5) / ns.clamp(min=1), inf)
    jumps = torch.cat([up.reshape(b, -1), rnd.reshape(b, -1), torch.ones(b, 1, dtype=torch.float64, device=dev)], 1)
    jumps = jumps.sort(1).values
    mids = (jumps[:, 1:] + jumps[:, :-1]) / 2
    return torch.cat([jumps[:, :1] / 2, jumps, mids], 1).sort(1).values


def _last_fit(seg: _Segments, cand: Tensor, limit: Tensor) -> Tensor:
    """``[B]`` the last index of ``cand`` whose total is at most ``limit [B]`` (``-1`` for none), by bisection (the
    total is non-decreasing in the ratio)."""
    b, c = cand.shape
    lo = torch.full((b,), -1, dtype=torch.long, device=cand.device)
    hi = torch.full((b,), c, dtype=torch.long, device=cand.device)
    for _ in range(max(1, math.ceil(math.log2(c + 1))) + 1):
        mid = (lo + hi) // 2
        active = hi - lo > 1
        r = cand.gather(1, mid.clamp(0, c - 1)[:, None])[:, 0]
        ok = torch.isfinite(r) & (_total_at(seg, torch.where(torch.isfinite(r), r, 1.0)) <= limit)
        lo = torch.where(active & ok, mid, lo)
        hi = torch.where(active & ~ok, mid, hi)
    return lo


def official_ratio(seg: _Segments, retain_ratio: float, p: int) -> Tensor:
    """``[B]`` float64: the official rescaled ratio ``min(RETAIN_RATIO / ((F P - total_reduced) / (F P)), 1)``."""
    fp = (seg.valid.sum(1) * p).double()
    return (float(retain_ratio) / ((fp - seg.total_reduced.double()) / fp)).clamp(max=1.0)


def official_keep(tokens: Tensor, video_grid: tuple[int, int, int], retain_ratio: float = OFFICIAL_RETAIN_RATIO, *,
                  mask: Tensor | None = None, threshold: float = OFFICIAL_THRESHOLD,
                  max_window_size: int = OFFICIAL_MAX_WINDOW_SIZE) -> Tensor:
    """``[B]`` long: the number of tokens the official HoliTom outer stage keeps of each clip at ``RETAIN_RATIO =
    retain_ratio`` (newline tokens not counted). Pass it as ``keep`` (with ``retain_ratio``, or alone) to reproduce
    the official output exactly.

    The official budget is a ratio, not a count: it rescales ``RETAIN_RATIO`` by the tokens the temporal windows
    already remove (:func:`official_ratio`) and keeps ``ceil(n_dynamic * r')`` tokens per frame and ``round(n_static
    * r')`` clusters per window, so the count depends on the clip (often a little above ``RETAIN_RATIO * F * P``)
    and is computed here from the tokens, ``[B, T * H * W, D]`` frame-major as :func:`holitom` takes them, with the
    same ``threshold`` and ``max_window_size``.
    """
    t, h, w = video_grid
    b, p = tokens.shape[0], h * w
    frames = clip_frames(mask, b, t, p, tokens.device)
    seg = temporal_windows(float32(tokens).reshape(b, t, p, -1), frames, threshold, max_window_size)
    return _total_at(seg, official_ratio(seg, retain_ratio, p))


def llm_keep_count(n: int, merge_ratio: float = OFFICIAL_LLM_MERGE_RATIO) -> int:
    """Visual tokens the official inner-LLM merge keeps of ``n`` at ``HOLITOM_r = merge_ratio``: ``round(n * (1 -
    merge_ratio))`` (Python ``round``, half to even). Pass it as ``keep`` of ``holitom_llm``."""
    return round(n * (1 - merge_ratio))


# ---------------------------------------------------------------------------------------------------------------
# the outer-LLM method
# ---------------------------------------------------------------------------------------------------------------


def received_attention(x: Tensor) -> Tensor:
    """``[B, T, P]`` the fallback attention map without a vision attention signal: the attention each token
    receives in one parameter-free self-attention over its frame (``softmax(x x^T / sqrt(D))``, the tokens as
    queries and keys), averaged over the queries, for ``x [B, T, P, D]``."""
    logits = x @ x.transpose(-1, -2) / math.sqrt(x.shape[-1])
    return torch.softmax(logits, dim=-1).mean(-2)


def _static_clusters(xs: Tensor, static: Tensor, clusters: Tensor, knn: int) -> tuple[Tensor, Tensor]:
    """DPC-kNN of the static tokens of ``A`` windows: ``xs [A, P, D]`` window means, ``static [A, P]`` which
    positions are static, ``clusters [A]`` centres each. Returns ``(is_centre [A, P], nearest [A, P])`` (the centre
    position every static token joins, ``-1`` elsewhere)."""
    a, p = static.shape
    dist = dpc_distance(xs, static)                                        # Euclidean / sqrt(D), inf off the mask
    kk = clusters.clamp(max=knn)
    density = knn_density(dist, kk, static)
    delta = parent_distance(dist, density, static)
    score = (delta * density).masked_fill(~static, float("-inf"))
    ranked = torch.sort(score, dim=1, descending=True, stable=True).indices
    rank = torch.empty_like(ranked).scatter_(1, ranked, torch.arange(p, device=xs.device).expand(a, p))
    is_centre = static & (rank < clusters[:, None])
    to_centre = dist.masked_fill(~is_centre[:, None, :], float("inf"))
    nearest = to_centre.argmin(-1)                                         # ties: the lowest centre position
    pos = torch.arange(p, device=xs.device).expand(a, p)
    nearest = torch.where(is_centre, pos, nearest)
    return is_centre, torch.where(static, nearest, -1)


@register("holitom", paper="HoliTom: Holistic Token Merging for Fast Video Large Language Models",
          venue="NeurIPS 2025", repo="https://github.com/cokeshao/HoliTom", stage="video", kind="merge",
          signals=("video_grid",), optional_signals=("attn_received_layers",), parity=True, fixture="holitom",
          exact=False,
          signal_spec={"attn_received_layers": SignalSpec(
              layers=(-2,), feature_layer=True,
              note="the layer whose features the projector reads (the official SigLIP tower returns that layer's "
                   "attention probabilities averaged over heads and over every query row); a family that pools "
                   "the frames before the language model (LLaVA-OneVision: bilinear 27 x 27 -> 14 x 14) pools this "
                   "map the same way, as the official code does, so it lies on the tokens' grid")},
          knob_ranges={"threshold": "[-1, 1]", "retain_ratio": "(0, 1]", "beta": "[0, 1]", "knn": ">= 1",
                       "max_window_size": ">= 1"},
          main_knobs=("threshold",),
          knob_sources={
              "threshold": "official scripts: T=0.80 in the README's lmms-eval command (also the code's default; "
                           "other official settings use 0.65)",
              "retain_ratio": "vtoken: None, the largest ratio whose allocation fits keep, so keep is the one budget; "
                              "the official RETAIN_RATIO (0.15 in the README's command) with keep = official_keep(...) "
                              "reproduces the official allocation exactly",
              "beta": "official code: BETA=0.6",
              "knn": "official code: K=7",
              "max_window_size": "official code: MAX_WINDOW_SIZE=1024 (no limit on 32- to 64-frame clips)",
              "no_beta": "official code: NO_BETA unset (the Beta-weighted merge)",
          })
def holitom(tokens: Tensor, counts: Tensor, *, mask: Tensor | None = None,
            video_grid: tuple[int, int, int] | None = None, attn_received_layers: Tensor | None = None,
            threshold: float = OFFICIAL_THRESHOLD, retain_ratio: float | None = None, beta: float = OFFICIAL_BETA,
            knn: int = OFFICIAL_KNN, max_window_size: int = OFFICIAL_MAX_WINDOW_SIZE,
            no_beta: bool = False) -> Reduction:
    """HoliTom's outer-LLM stage (NeurIPS 2025): segment the clip into windows of similar frames, merge each
    window's static tokens over time and by clustering, keep each frame's most attended dynamic tokens.

    ``tokens [B, T * H * W, D]`` are ``T`` frames of ``P = H * W`` tokens (``video_grid = (T, H, W)``, frame-major,
    each row-major; for LLaVA-OneVision the pooled 14 x 14 frames); shorter clips are padded with whole masked
    frames at the end. Per clip of ``F`` valid frames:

    1. Temporal segmentation (:func:`temporal_windows`): per position the cosine similarity with the next frame;
       a dynamic programme picks windows maximising the copies of tokens that stay above ``threshold`` through a
       whole window.
    2. In a window of two or more frames the positions above ``threshold`` at every pair are static: each becomes
       its mean over the window's frames; the ``n_s`` static tokens are clustered by DPC-kNN (distances / sqrt(D),
       density from the ``min(knn, clusters)`` nearest, itself included; centres = the top density x delta, taken
       in position order; every other token joins its nearest centre) into ``round(n_s r)`` tokens: ``beta *
       centre + (1 - beta) * mean(members)`` (``no_beta``: the mean of centre and members; a centre alone is
       copied). Density ties break by the lowest position (official: ``rand * 1e-6`` noise).
    3. Every other (dynamic) token stays in its frame: each frame keeps its ``ceil(n_d r)`` dynamic tokens with the
       highest attention (ties: lowest position). The attention is ``attn_received_layers[:, -1]`` (the attention
       each token receives, heads and queries averaged, on the tokens' grid); without it,
       :func:`received_attention` of the tokens themselves (a vtoken fallback).

    The budget: the official ratio ``r' = min(RETAIN_RATIO / ((F P - removed) / (F P)), 1)`` rescales the retain
    ratio by what step 2's averaging already removes, and the count follows from ``ceil`` and ``round`` per frame
    and window, so it is not a fixed count. Here ``counts[b]`` (``keep``) is the clip's budget: ``r`` is the largest
    ratio whose allocation fits it (every step of the allocation is visited, so the output is at most ``keep``,
    usually a little below; ``exact=False``). ``keep =`` :func:`official_keep` ``(tokens, video_grid,
    RETAIN_RATIO)`` reproduces the official allocation; ``retain_ratio`` then makes it exact even on ties of the
    rounding (it is used when its allocation fits keep). The smallest allocation keeps one dynamic token per frame
    that has any: a smaller ``keep`` is a ``ValueError``. A budget covering the whole clip keeps it unchanged
    (vtoken's identity; the official ratio 1 would still average the static tokens). Scores run in float32
    (float64 for float64 tokens). The official dominant/contextual split of the dynamic tokens (``D > 0``) is not
    available (the released code fails with it), as there: dynamic tokens are only selected.

    Args:
        threshold: ``T``: a token is static between two frames when their cosine similarity is above it (0.8).
        retain_ratio: the official ``RETAIN_RATIO``, for exact reproduction (default None: from ``keep``).
        beta: weight of a cluster's centre in the merge of the static tokens (official 0.6).
        knn: ``K``, neighbours of the DPC-kNN density, at most the window's cluster count (official 7).
        max_window_size: the most frames a temporal window may span (official 1024).
        no_beta: merge a cluster as the plain mean of centre and members (the official ``NO_BETA=1``).

    Output: a merging :class:`Reduction` in source order; a merged static token sits at its centre's place in the
    window's first frame (``indices``), ``assign`` maps every token of its cluster in every frame of the window to
    it, ``sizes`` counts them. ``extras``: ``order [B, K]`` the kept source indices in the official ``one_token``
    order (per window: the merged static tokens, then the dynamic tokens frame by frame; the official ``grid``
    order is source order), ``frame_counts [B, T]`` output tokens per frame (of their index), ``windows [B, T, 2]``
    the ``(start, end)`` frames of each window, inclusive, in order (``-1`` padded), ``feature_sim [B, T - 1, P]``,
    ``static [B, T, P]``, ``scores [B, T, P]`` (the attention map read), ``dynamic_keep [B, T]`` per frame,
    ``clusters [B, T]`` per window (at its first frame), ``ratio [B]`` (``r``, float64) and ``total_reduced [B]``.
    """
    t, h, w = video_grid
    b, n, d = tokens.shape
    p, dev = h * w, tokens.device
    frames = clip_frames(mask, b, t, p, dev)
    counts = counts.to(dev)
    x = float32(tokens).reshape(b, t, p, d)
    seg = temporal_windows(x, frames, threshold, max_window_size)
    valid = seg.valid
    whole = counts >= frames * p                    # a budget covering the clip keeps it unchanged

    # the ratio: the largest whose allocation fits keep (or the official one when given and it fits)
    cand = _candidates(seg)
    fit = _last_fit(seg, cand, counts)
    r = cand.gather(1, fit.clamp(min=0)[:, None])[:, 0]
    r = torch.where(fit >= 0, r, cand[:, 0])
    total = _total_at(seg, r)
    bad = ~whole & ((fit < 0) | (total < 1))
    if bool(bad.any()):
        i = int(torch.nonzero(bad)[0, 0])
        floor_at = (_last_fit(seg, cand, torch.zeros_like(counts)) + 1).clamp(max=cand.shape[1] - 1)
        floor = int(_total_at(seg, cand.gather(1, floor_at[:, None])[:, 0])[i])
        raise ValueError(f"holitom: keep resolves to {int(counts[i])} tokens for clip {i} ({int(frames[i])} frames of "
                         f"{p} tokens), below HoliTom's smallest allocation for it ({floor} tokens: one per frame "
                         f"with dynamic tokens, one per window of static ones if none); pass keep >= {floor}")
    if retain_ratio is not None:
        r_off = official_ratio(seg, retain_ratio, p)
        r = torch.where(_total_at(seg, r_off) <= counts, r_off, r)
    r = torch.where(whole, 1.0, r)
    dyn, clus, _ = _allocation(seg, r)
    dyn_frame = dyn                                                       # per frame already
    clus_head = torch.where(whole[:, None], 0, clus)

    # dynamic tokens: each frame's most attended
    if attn_received_layers is not None:
        scores = attn_received_layers[:, -1].reshape(b, t, p).to(x.dtype)
    else:
        scores = received_attention(x)
    dynamic = valid[..., None] & ~seg.static
    s = scores.masked_fill(~dynamic, float("-inf"))
    ranked = torch.sort(s, dim=-1, descending=True, stable=True).indices
    rank = torch.empty_like(ranked).scatter_(-1, ranked, torch.arange(p, device=dev).expand(b, t, p))
    kept_dyn = dynamic & (rank < dyn_frame[..., None])

    # static tokens: the window means, clustered
    f_ax = torch.arange(t, device=dev)
    start = seg.start.clamp(min=0)
    win_sum = torch.zeros_like(x).scatter_add_(1, start[:, :, None, None].expand(b, t, p, d),
                                               x * valid[:, :, None, None].to(x.dtype))
    width = seg.width.clamp(min=1).to(x.dtype)
    win_mean = win_sum / width[:, :, None, None]                          # at each window's first frame
    active = seg.head & (clus_head > 0)
    ab, af = torch.nonzero(active, as_tuple=True)
    out = x.clone()
    centre_at = torch.zeros(b, t, p, dtype=torch.bool, device=dev)       # a merged static token sits here
    cluster_of = torch.full((b, t, p), -1, dtype=torch.long, device=dev)  # per window (first frame): centre pos
    sizes = torch.ones(b, t, p, dtype=x.dtype, device=dev)
    if ab.numel():
        xs, st = win_mean[ab, af], seg.static[ab, af]
        is_centre, nearest = _static_clusters(xs, st, clus_head[ab, af], knn)
        member = st & ~is_centre
        slot = torch.where(member, nearest, p)
        msum = torch.zeros(xs.shape[0], p + 1, d, dtype=x.dtype, device=dev)
        msum.scatter_add_(1, slot[..., None].expand(-1, -1, d), xs * member[..., None].to(x.dtype))
        mcount = torch.zeros(xs.shape[0], p + 1, dtype=x.dtype, device=dev).scatter_add_(
            1, slot, member.to(x.dtype))
        msum, mcount = msum[:, :p], mcount[:, :p]
        if no_beta:
            merged = (xs + msum) / (1 + mcount)[..., None]
        else:
            merged = torch.where(mcount[..., None] > 0, beta * xs + (1 - beta) * msum / mcount.clamp(min=1)[..., None],
                                 xs)
        out[ab, af] = torch.where(is_centre[..., None], merged, out[ab, af])
        centre_at[ab, af] = is_centre
        cluster_of[ab, af] = nearest
        sizes[ab, af] = torch.where(is_centre, (1 + mcount) * seg.width[ab, af, None].to(x.dtype), 1.0)

    keep_here = kept_dyn | centre_at
    pos = torch.arange(p, device=dev)
    own = f_ax[None, :, None] * p + pos                                   # [1, T, P] flat source index
    centre_of = cluster_of.gather(1, start[:, :, None].expand(b, t, p))  # the centre of a static token's cluster
    assign = torch.where(kept_dyn, own, torch.where(seg.static & (centre_of >= 0), start[..., None] * p + centre_of,
                                                    -1))
    if bool(whole.any()):
        wv = whole[:, None, None] & valid[..., None]
        keep_here = torch.where(whole[:, None, None], valid[..., None], keep_here)
        assign = torch.where(whole[:, None, None], torch.where(wv, own, -1), assign)
        sizes = torch.where(whole[:, None, None], 1.0, sizes)
        out = torch.where(whole[:, None, None, None], x, out)
    keep_here &= valid[..., None]
    assign = torch.where(valid[..., None], assign, -1)

    rep = torch.arange(n, device=dev).expand(b, n)
    red = reduction_from_merge(out.reshape(b, n, d).to(tokens.dtype), rep, assign.reshape(b, n),
                               (sizes * keep_here).reshape(b, n), valid=keep_here.reshape(b, n))

    # the official one_token order: per window, its static tokens, then its dynamic tokens frame by frame
    k_out = red.tokens.shape[1]
    idx = red.indices.clamp(min=0)
    f_of, j_of = idx // p, idx % p
    head_of = start.gather(1, f_of)
    is_static_out = centre_at.reshape(b, n).gather(1, idx)
    big = (t + 1) * p
    key = head_of * big + torch.where(is_static_out, 0, p + (f_of - head_of) * p) + j_of
    key = torch.where(red.mask, key, t * big + torch.arange(k_out, device=dev))
    order = red.indices.gather(1, key.argsort(1))
    frame_counts = keep_here.sum(-1)
    heads = torch.where(seg.head, f_ax, t).sort(1).values
    n_win = seg.head.sum(1)
    win_ok = f_ax[None, :] < n_win[:, None]
    hc = heads.clamp(max=t - 1)
    windows = torch.stack([torch.where(win_ok, hc, -1), torch.where(win_ok, seg.end.gather(1, hc), -1)], -1)
    red.extras = {
        "order": order, "frame_counts": frame_counts, "windows": windows, "feature_sim": seg.sim,
        "static": seg.static, "scores": scores, "dynamic_keep": torch.where(valid, dyn_frame, 0),
        "clusters": clus_head, "ratio": r, "total_reduced": seg.total_reduced,
    }
    return red


# ---------------------------------------------------------------------------------------------------------------
# the inner-LLM merge
# ---------------------------------------------------------------------------------------------------------------


def similarity_merge(tokens: Tensor, scores: Tensor, counts: Tensor, mask: Tensor | None = None) -> Reduction:
    """HoliTom's inner-LLM merge of ``tokens [B, N, D]``: keep the ``counts[b]`` tokens of highest ``scores [B, N]``
    (ties: lowest index); every other token joins the kept token of highest cosine similarity (``x.y / (|x| |y|)``,
    all computed before merging; ties: the first kept token in score order), and each kept token absorbs its
    tokens in ascending position as a running average ``h = (h + x) / 2`` (so a token absorbing ``x_1..x_m`` ends
    ``h / 2^m + sum_i x_i / 2^(m - i + 1)``). Returns a merging :class:`Reduction` in source order."""
    b, n, d = tokens.shape
    dev = tokens.device
    x = float32(tokens)
    valid = torch.ones(b, n, dtype=torch.bool, device=dev) if mask is None else mask
    top = topk_indices(scores, counts, valid)                            # [B, K] in score order, -1 padded
    top_ok = top >= 0
    kept = torch.zeros(b, n + 1, dtype=torch.bool, device=dev)
    kept.scatter_(1, torch.where(top_ok, top, n), True)
    kept = kept[:, :n]
    rows = torch.arange(b, device=dev)[:, None]
    kx = x[rows, top.clamp(min=0)]                                       # [B, K, D]
    norms = x.norm(dim=-1)
    sim = (x @ kx.transpose(1, 2)) / (norms[:, :, None] * norms[rows, top.clamp(min=0)][:, None, :])
    sim = sim.masked_fill(~top_ok[:, None, :], float("-inf"))
    best_slot = sim.argmax(-1)                                           # first max in score order
    target = top.gather(1, best_slot)                                    # [B, N] kept token absorbing each
    absorbed = valid & ~kept
    # rank of each absorbed token among those of its target (ascending position) and their number
    pos = torch.arange(n, device=dev).expand(b, n)
    key = torch.where(absorbed, target * n + pos, n * n + pos)
    order = key.argsort(1)
    sorted_target = torch.where(absorbed, target, n).gather(1, order)
    first = torch.searchsorted(sorted_target.contiguous(), sorted_target.contiguous())
    rank_sorted = torch.arange(n, device=dev) - first
    rank = torch.empty_like(rank_sorted).scatter_(1, order, rank_sorted)
    m = torch.zeros(b, n + 1, dtype=torch.long, device=dev).scatter_add_(
        1, torch.where(absorbed, target, n), absorbed.long())[:, :n]
    m_of = m.gather(1, target)
    weight = torch.where(absorbed, torch.exp2(-(m_of - rank).to(x.dtype)), 0.0)
    acc = torch.zeros(b, n + 1, d, dtype=x.dtype, device=dev)
    acc.scatter_add_(1, torch.where(absorbed, target, n)[..., None].expand(b, n, d), x * weight[..., None])
    acc = acc[:, :n]
    out = torch.where(kept[..., None], x * torch.exp2(-m.to(x.dtype))[..., None] + acc, x)
    assign = torch.where(kept, pos, torch.where(absorbed, target, -1))
    red = reduction_from_merge(out.to(tokens.dtype), pos, assign, (1 + m).to(x.dtype), valid=kept,
                               extras={"kept_order": top, "absorbed": m})
    return red


def holitom_llm_merge(hidden: Tensor, attn_last_row: Tensor, visual_start: int, visual_len: int,
                      merge_ratio: float = OFFICIAL_LLM_MERGE_RATIO) -> tuple[Tensor, Tensor]:
    """The official inner-LLM step on a whole sequence: ``hidden [B, S, D]`` the hidden states entering layer
    ``HOLITOM_k``, ``attn_last_row [B, H, S]`` (or ``[B, S]``, heads averaged) the last query row of layer
    ``HOLITOM_k - 1``'s attention, the visual span ``[visual_start, visual_start + visual_len)`` (newline tokens
    included, as the official code counts them) and ``HOLITOM_r = merge_ratio``. The span keeps
    :func:`llm_keep_count` tokens (:func:`similarity_merge`); the rest of the sequence is untouched.

    Returns ``(hidden' [B, S', D], keep_indices [B, S'])``: the cut sequence and the original positions of its rows
    (ascending; the official new ``position_ids``).
    """
    if attn_last_row.dim() == 3:
        attn_last_row = attn_last_row.mean(1)
    b, s, _ = hidden.shape
    lo, hi = visual_start, visual_start + visual_len
    keep = llm_keep_count(visual_len, merge_ratio)
    if not 1 <= keep <= visual_len:
        raise ValueError(f"holitom_llm_merge: merge_ratio = {merge_ratio} keeps {keep} of {visual_len} visual "
                         "tokens; it must keep between 1 and all of them (merge_ratio in [0, 1))")
    counts = torch.full((b,), keep, dtype=torch.long, device=hidden.device)
    red = similarity_merge(hidden[:, lo:hi], float32(attn_last_row[:, lo:hi]), counts)
    seq = torch.cat([hidden[:, :lo], red.tokens, hidden[:, hi:]], 1)
    ar = torch.arange(s, device=hidden.device).expand(b, s)
    idx = torch.cat([ar[:, :lo], red.indices + lo, ar[:, hi:]], 1)
    return seq, idx


def _llm_layers(depth: int, layer: int = OFFICIAL_LLM_LAYER, ref_depth: int = 28) -> list[int]:
    return [scale_layer("layer", layer, depth, ref_depth, "holitom_llm", lo=1, hi=depth - 1)]


def _llm_counts(n: Tensor, keep: int | float, images: Tensor) -> list[Tensor]:
    return [resolve_llm_keep(keep, n, images)]


@register("holitom_llm", paper="HoliTom: Holistic Token Merging for Fast Video Large Language Models",
          venue="NeurIPS 2025", repo="https://github.com/cokeshao/HoliTom", stage="llm", kind="merge",
          signals=("llm_attn",), parity=True, fixture="holitom",
          schedule=LLMSchedule(_llm_layers, _llm_counts),
          knob_ranges={"ref_depth": ">= 1"},
          main_knobs=("layer",),
          knob_sources={
              "layer": "official scripts: HOLITOM_k=18 of Qwen2-7B's 28 layers (the README's command), scaled by "
                       "depth",
              "ref_depth": "official scripts: Qwen2-7B's 28 decoder layers (LLaVA-OneVision-7B)",
          })
def holitom_llm(tokens: Tensor, counts: Tensor, *, mask: Tensor | None = None,
                llm_attn: Tensor | None = None) -> Reduction:
    """HoliTom's inner-LLM merge (NeurIPS 2025): keep the visual tokens the last prompt token attends to most and
    average every other one into its most similar kept token.

    Args:
        tokens: ``[B, N, D]`` hidden states of the visual tokens entering decoder layer ``layer`` (the official code
            counts the video's newline tokens among them).
        counts: ``[B]`` long, tokens kept per sample: ``keep`` is ``1 - HOLITOM_r`` (``keep=0.5`` is the official
            ``HOLITOM_r=0.5``; the official count is ``round(n (1 - r))``, half to even, :func:`llm_keep_count`).
        mask: optional ``[B, N]`` bool, True on real tokens.
        llm_attn: ``[B, N]`` the last prompt token's attention to each visual token in layer ``layer - 1``, heads
            averaged.
        layer: ``HOLITOM_k``, the first decoder layer that sees the merged tokens (official 18 of 28), given for
            ``ref_depth`` and scaled to the model.
        ref_depth: the depth ``layer`` is given for (default 28, Qwen2-7B).

    Every non-kept token joins the kept token of highest cosine similarity of the hidden states, and each kept
    token absorbs its tokens in ascending position by a running average ``h = (h + x) / 2``
    (:func:`similarity_merge`; :func:`holitom_llm_merge` is the same step on a whole sequence). Kept tokens keep
    their positions. Returns a merging :class:`Reduction` in source order (``assign``, ``sizes``).
    """
    assert llm_attn is not None
    return similarity_merge(tokens, llm_attn.float(), counts, mask)
