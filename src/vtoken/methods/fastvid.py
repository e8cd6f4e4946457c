"""FastVID: dynamic temporal segmentation, then density-based spatio-temporal pruning of every segment.

Shen et al., "FastVID: Dynamic Density Pruning for Fast Video Large Language Models" (NeurIPS 2025, arXiv
2503.11187), https://github.com/LunarShen/FastVID (the LLaVA-OneVision integration: the FastVID block of
``Qwen2Model.forward`` at prefill, inputs from ``llava_arch.prepare_inputs_labels_for_multimodal``).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ..core import Reduction, reduction_from_merge
from ..ops.dpc import dpc_distance, knn_density, parent_distance
from ..ops.similarity import float32
from ..ops.video import clip_frames, frame_valid
from .registry import SignalSpec, register

#: the official evaluation settings (``scripts/eval.sh``): retention ratio, DySeg c and tau, STPrune d, DTM p, beta
OFFICIAL_RETENTION_RATIO = 0.10
OFFICIAL_SEGMENTS = 8
OFFICIAL_CUT_THRESHOLD = 0.9
OFFICIAL_CONTEXT_RATIO = 0.4
OFFICIAL_ANCHOR_STEP = 4
OFFICIAL_MERGE_BETA = 0.6
#: neighbours of the kNN density, the candidate itself included (fixed in the official code)
DENSITY_KNN = 4


def official_keep(frames: int, tokens_per_frame: int, retention_ratio: float = OFFICIAL_RETENTION_RATIO) -> int:
    """The clip budget of the official ``retention_ratio``: ``frames * int(tokens_per_frame * retention_ratio)``
    (Python float arithmetic, truncated, as the official per-frame budget ``frame_retain_num``). Pass it as ``keep``
    to reproduce the official setting: ``counts // frames`` is then the official frame budget (e.g.
    ``official_keep(32, 196) == 608``, 19 tokens a frame). The official code keeps at most this many video tokens
    (a multi-frame segment's context budget is floor-divided over its anchor frames)."""
    for name, v in (("frames", frames), ("tokens_per_frame", tokens_per_frame)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"fastvid.official_keep: {name} must be an int >= 1, got {v!r}")
    if isinstance(retention_ratio, bool) or not isinstance(retention_ratio, (int, float)) \
            or not 0.0 < retention_ratio <= 1.0:
        raise ValueError(f"fastvid.official_keep: retention_ratio must be a float in (0, 1], got {retention_ratio!r}")
    return frames * int(tokens_per_frame * retention_ratio)


def smallest_frame_budget(context_ratio: float, tokens_per_frame: int) -> int | None:
    """The smallest frame budget ``R`` with at least one context token, ``int(R * context_ratio) >= 1`` (Python float
    arithmetic, as the official split), or ``None`` when no ``R <= tokens_per_frame`` has one."""
    r = max(1, math.ceil(1.0 / context_ratio) - 1)
    while r <= tokens_per_frame and int(r * context_ratio) < 1:
        r += 1
    return r if r <= tokens_per_frame else None


def _first_argmax(x: Tensor, dim: int) -> Tensor:
    """Index of the maximum along ``dim``, ties to the lowest index (as ``torch.argmax``, device independent)."""
    top = x.amax(dim, keepdim=True)
    ar = torch.arange(x.shape[dim], device=x.device).reshape(-1, *([1] * (x.dim() - 1 - (dim % x.dim()))))
    return torch.where(x == top, ar, x.shape[dim]).amin(dim).clamp(max=x.shape[dim] - 1)


def _unit(x: Tensor) -> Tensor:
    """``x / ||x||`` (a plain division as the official cosine; a zero vector stays zero instead of NaN)."""
    return x / x.norm(dim=-1, keepdim=True).clamp_min(torch.finfo(x.dtype).tiny)


def segment_frames(frame_features: Tensor, frames: Tensor, segments: int, cut_threshold: float
                   ) -> tuple[Tensor, Tensor, Tensor]:
    """DySeg: ``(similarity [B, T-1], cuts [B, T-1] bool, segment_ids [B, T])`` of clips of ``frames [B]`` valid
    frames with one global embedding per frame (``frame_features [B, T, G]``).

    ``similarity[t]`` is the cosine similarity of frames ``t`` and ``t + 1`` (0 past a clip); a cut separates frame
    ``t`` from frame ``t + 1`` when ``similarity[t] < cut_threshold`` or when it is one of the ``segments - 1``
    smallest of its clip (ties to the lower ``t``; every transition when the clip has fewer than ``segments``
    frames). ``segment_ids`` numbers the segments of each clip from 0 in temporal order (``-1`` on padded frames).
    """
    b, t = frame_features.shape[:2]
    dev = frame_features.device
    g = _unit(frame_features)
    sim = (g[:, :-1] * g[:, 1:]).sum(-1)                                   # [B, T-1]
    valid = torch.arange(t - 1, device=dev)[None, :] < (frames - 1)[:, None]
    sim = torch.where(valid, sim, 0.0)
    order = torch.sort(torch.where(valid, sim, float("inf")), dim=1, stable=True).indices
    rank = torch.empty_like(order).scatter_(1, order, torch.arange(t - 1, device=dev).expand(b, t - 1))
    low = rank < (frames - 1).clamp(max=segments - 1)[:, None]
    cuts = valid & (low | (sim < cut_threshold))
    ids = torch.cat([torch.zeros(b, 1, dtype=torch.long, device=dev), cuts.long().cumsum(1)], 1)
    return sim, cuts, torch.where(frame_valid(frames, t), ids, -1)


@register("fastvid", paper="FastVID: Dynamic Density Pruning for Fast Video Large Language Models",
          venue="NeurIPS 2025", repo="https://github.com/LunarShen/FastVID", stage="video", kind="merge",
          signals=("video_grid", "cls_attn", "frame_features"), parity=True, fixture="fastvid", exact=False,
          signal_spec={
              "cls_attn": SignalSpec(without_cls="received",
                                     note="LLaVA-OneVision (SigLIP, no CLS): the attention of the vision tower's "
                                          "attention-pooling head's probe over the patches (averaged over heads), "
                                          "resized like the features (27 x 27 -> 14 x 14 bilinear) and taken per "
                                          "frame (official llava_arch.get_attn_2dPool). Hugging Face's OneVision "
                                          "and Qwen towers carry no such head, so vtoken substitutes the attention "
                                          "each token receives (vtoken's choice, the CLS-free statistic the "
                                          "other methods use)"),
              "frame_features": SignalSpec(note="one global embedding per frame: the output of the SigLIP "
                                                "attention-pooling head (official in_frame_global_features)"),
          },
          knob_ranges={"segments": ">= 1", "cut_threshold": "[-1, 1]", "context_ratio": "(0, 1]",
                       "anchor_step": ">= 1", "merge_beta": "[0, 1]"},
          main_knobs=("cut_threshold", "context_ratio"),
          knob_sources={
              "segments": "official scripts: DySeg_c = 8 (scripts/eval.sh)",
              "cut_threshold": "official scripts: DySeg_tau = 0.9 (scripts/eval.sh)",
              "context_ratio": "official scripts: STPrune_d = 0.4 (scripts/eval.sh)",
              "anchor_step": "official scripts: DTM_p = 4 (scripts/eval.sh)",
              "merge_beta": "official scripts: DTM_beta = 0.6 (scripts/eval.sh)",
          })
def fastvid(tokens: Tensor, counts: Tensor, *, mask: Tensor | None = None,
            video_grid: tuple[int, int, int] | None = None, cls_attn: Tensor | None = None,
            frame_features: Tensor | None = None, segments: int = OFFICIAL_SEGMENTS,
            cut_threshold: float = OFFICIAL_CUT_THRESHOLD, context_ratio: float = OFFICIAL_CONTEXT_RATIO,
            anchor_step: int = OFFICIAL_ANCHOR_STEP, merge_beta: float = OFFICIAL_MERGE_BETA) -> Reduction:
    """FastVID (Shen et al., NeurIPS 2025): cut the clip into segments of similar frames (DySeg), keep the most
    attended tokens of every frame and merge the rest into density peaks shared across each segment (STPrune).

    ``tokens [B, T * H * W, D]`` are ``T`` frames of ``P = H * W`` tokens (``video_grid = (T, H, W)``; in the
    official code the projected video tokens at the language model's input), ``cls_attn [B, N]`` the vision
    attention of every token, ``frame_features [B, T, G]`` one global embedding per frame; clips shorter than ``T``
    are padded with whole masked frames at the end. Per clip of ``F`` valid frames:

    1. Budget: the frame budget ``R = counts[b] // F`` (the official ``int(P * retention_ratio)``, see
       :func:`official_keep`), ``C = int(R * context_ratio)`` context and ``S = R - C`` salient tokens a frame.
    2. DySeg (:func:`segment_frames`): cuts where adjacent frames' cosine similarity is below ``cut_threshold``,
       plus the ``segments - 1`` least similar transitions.
    3. Context budgets: a segment of ``L`` frames has ``ceil(L / anchor_step)`` anchor frames, its last frame and
       every ``anchor_step``-th frame before it, each with ``K = (C * L) // ceil(L / anchor_step)`` context tokens;
       the other frames have none (a single frame, or ``anchor_step = 1``: every frame ``C``).
    4. Salient tokens: the ``S`` tokens of highest ``cls_attn`` in every frame, kept unchanged.
    5. Density (per frame, over its other ``P - S`` candidates, ascending position): ``dist = ||x_i - x_j|| /
       sqrt(D)``, ``rho = exp(-mean of the 4 smallest dist^2)`` (the candidate itself included), ``delta`` = the
       distance to the nearest denser candidate (the densest: the frame's largest distance), score ``rho * delta``.
       Exact density ties count the lower position as denser (the official code adds ``rand * 1e-6`` instead).
    6. Context tokens: an anchor frame's ``K`` highest-scoring candidates are its anchors. A frame whose budget is
       ``C`` merges its own candidates, an anchor frame of a multi-frame segment (``K > C``) all candidates of its
       segment (each candidate once per anchor frame): every candidate joins its most cosine-similar anchor (ties to
       the higher-scoring), and anchor ``k`` with ``n`` members (itself included) becomes ``w x_k + (1 - w) mean``,
       ``w = max(1 / (n + 1), merge_beta)``, at its own position.

    Output: the salient and context tokens at their source positions, ascending (at most ``counts[b]``: a
    multi-frame segment keeps ``n_anchor * K <= C * L`` context tokens, so ``exact=False``). ``sizes`` holds the
    members of each context token (1 for salient tokens); ``assign`` is None, since a candidate of a multi-frame
    segment goes into one token of every anchor frame of its segment.

    Differences from the official code, only where it fails: it needs ``segments <= F`` (here a shorter clip cuts
    every transition), ``P - S >= 4`` (here the kNN uses all candidates when fewer) and ``K <= P - S`` (here an
    anchor frame takes at most all its candidates as anchors). It runs on one clip (batch 1) and only at prefill.

    Budget: ``C >= 1`` is required (the official merge fails without context tokens), so ``keep`` must give every
    frame at least the smallest ``R`` with ``int(R * context_ratio) >= 1`` (:func:`smallest_frame_budget`; 3 at
    0.4); a smaller budget is a ``ValueError``.

    Args:
        segments: DySeg ``c``: the minimum number of segments; the ``c - 1`` least similar transitions are always
            cuts (official 8).
        cut_threshold: DySeg ``tau``: every transition whose frame similarity is below it is a cut (official 0.9).
        context_ratio: STPrune ``d``: the share of the frame budget given to merged context tokens,
            ``C = int(R * d)``; the rest are salient tokens (official 0.4).
        anchor_step: DTM ``p``: the anchor-frame stride inside a multi-frame segment, counted back from its last
            frame (official 4).
        merge_beta: DTM ``beta``: the lower bound of an anchor's own weight in its merge (official 0.6).

    Extras (padded frames hold 0 / -1): ``frame_counts [B, T]`` tokens kept per frame; ``frame_similarity [B, T-1]``;
    ``cuts [B, T-1]`` bool; ``cut_indices [B, X]`` (ascending, ``-1`` padded); ``segment_ids [B, T]``;
    ``segment_sizes [B, Y]`` (frames per segment in temporal order, 0 padded); ``context_counts [B, T]`` (the
    official ``frm_context_num_list``); ``salient_indices [B, T, S]`` (in-frame positions, descending attention,
    ``-1`` padded); ``candidate_indices [B, T, P - S]`` (ascending, ``-1`` padded); ``density``, ``delta``,
    ``density_score [B, T, P - S]`` (``-inf`` padded); ``anchor_indices [B, T, K]`` (in-frame positions of each
    frame's anchors, descending score, ``-1`` padded); ``frame_budget``, ``salient_count``, ``context_count [B]``.
    ``tokens [B, N, D]`` -> ``[B, M, D]``.
    """
    t, h, w = video_grid
    b, _, d = tokens.shape
    p, dev = h * w, tokens.device
    frames = clip_frames(mask, b, t, p, dev)
    counts = counts.to(dev)
    if frame_features.shape[1] != t:
        raise ValueError(f"fastvid: frame_features must hold one embedding per frame, [B, T, G] with T = {t} "
                         f"(video_grid), got {list(frame_features.shape)}")

    # 1. budgets (Python-float arithmetic in float64, truncated as int())
    budget = counts // frames
    ctx = torch.floor(budget.double() * float(context_ratio)).long()
    if bool((ctx < 1).any()):
        i = int(torch.nonzero(ctx < 1)[0, 0])
        fr, r_min = int(frames[i]), smallest_frame_budget(float(context_ratio), p)
        if r_min is None:
            raise ValueError(f"fastvid: with context_ratio = {context_ratio} no frame budget of at most H * W = {p} "
                             f"tokens leaves a context token (int(R * context_ratio) >= 1), so no keep works; raise "
                             f"context_ratio to at least {1.0 / p:.4g}")
        raise ValueError(f"fastvid: keep resolves to {int(counts[i])} tokens for clip {i} ({fr} frames of {p} "
                         f"tokens), {int(budget[i])} a frame, which leaves no context token at context_ratio = "
                         f"{context_ratio} (the official merge needs int(R * context_ratio) >= 1); pass keep >= "
                         f"{fr * r_min} ({r_min} tokens a frame; as a ratio >= "
                         f"{math.ceil(r_min / p * 1e4) / 1e4:g})")
    sal = budget - ctx                                                           # [B]
    fvalid = frame_valid(frames, t)                                              # [B, T]

    # 2. DySeg
    sim, cuts, seg = segment_frames(frame_features, frames, int(segments), float(cut_threshold))
    seg_c = seg.clamp(min=0)
    seg_len = torch.zeros(b, t, dtype=torch.long, device=dev).scatter_add_(1, seg_c, fvalid.long())
    seg_start = seg_len.cumsum(1) - seg_len
    length, start = seg_len.gather(1, seg_c), seg_start.gather(1, seg_c)
    to_end = start + length - 1 - torch.arange(t, device=dev)[None, :]

    # 3. context budget of every frame
    step = int(anchor_step)
    n_anchor = (length + step - 1) // step
    per_anchor = (ctx[:, None] * length) // n_anchor.clamp(min=1)
    context = torch.where(fvalid & (to_end % step == 0), per_anchor, 0)          # [B, T]
    multi = context > ctx[:, None]

    # 4. salient tokens and candidates
    attn = cls_attn.reshape(b, t, p)
    pos = torch.arange(p, device=dev)
    by_attn = torch.sort(attn, dim=-1, descending=True, stable=True).indices
    s_max = int(sal.max())
    salient = torch.where(fvalid[..., None] & (torch.arange(s_max, device=dev) < sal[:, None, None]),
                          by_attn[..., :s_max], -1)                               # [B, T, S]
    is_sal = torch.zeros(b, t, p + 1, dtype=torch.bool, device=dev)
    is_sal.scatter_(2, torch.where(salient >= 0, salient, p), True)
    is_sal = is_sal[..., :p]
    n_cand = p - sal                                                              # [B]
    c_max = int(n_cand.max())
    cand = torch.sort(is_sal.long() * p + pos, dim=-1).indices[..., :c_max]       # [B, T, Pc] ascending positions
    cand_ok = fvalid[..., None] & (torch.arange(c_max, device=dev) < n_cand[:, None, None])

    # 5. density peaks per frame
    x = float32(tokens).reshape(b, t, p, d)
    xc = x.gather(2, cand[..., None].expand(b, t, c_max, d))                      # [B, T, Pc, D]
    flat_ok = cand_ok.reshape(b * t, c_max)
    xf = xc.reshape(b * t, c_max, d)
    dist = dpc_distance(xf, flat_ok)                                              # [B * T, Pc, Pc]
    density = knn_density(dist, DENSITY_KNN, flat_ok)
    delta = parent_distance(dist, density, flat_ok)
    score = (density * delta).masked_fill(~flat_ok, float("-inf")).reshape(b, t, c_max)
    density = density.reshape(b, t, c_max)
    delta = delta.reshape(b, t, c_max)

    # 6. anchors of every anchor frame, then the merge over its pool (its own frame or its whole segment)
    k_frame = context.minimum(n_cand[:, None])                                    # [B, T]
    k_max = max(int(k_frame.max()), 1)
    by_score = torch.sort(score, dim=-1, descending=True, stable=True).indices[..., :k_max]
    anchor_ok = torch.arange(k_max, device=dev) < k_frame[..., None]              # [B, T, K]
    is_anchor_frame = k_frame > 0
    a_max = int(is_anchor_frame.sum(1).max())
    fr_idx = torch.arange(t, device=dev).expand(b, t)
    af = torch.sort(torch.where(is_anchor_frame, fr_idx, t), dim=1).values[:, :a_max]   # [B, A] ascending
    af_ok = af < t
    af = af.clamp(max=t - 1)
    a_slot = by_score.gather(1, af[..., None].expand(b, a_max, k_max))            # [B, A, K] candidate slots
    a_ok = anchor_ok.gather(1, af[..., None].expand(b, a_max, k_max)) & af_ok[..., None]
    a_vec = xc.gather(1, af[..., None, None].expand(b, a_max, c_max, d)).gather(
        2, a_slot[..., None].expand(b, a_max, k_max, d))                          # [B, A, K, D]
    a_multi = multi.gather(1, af)
    a_seg = seg.gather(1, af)
    member = torch.where(a_multi[..., None], seg[:, None, :] == a_seg[..., None],
                         fr_idx[:, None, :] == af[..., None]) & fvalid[:, None, :] & af_ok[..., None]  # [B, A, T]
    member = (member[..., None] & cand_ok[:, None]).reshape(b, a_max, t * c_max)  # [B, A, T * Pc]
    pool = xc.reshape(b, t * c_max, d)
    cos = torch.einsum("bakd,bnd->bakn", _unit(a_vec), _unit(pool))               # [B, A, K, T * Pc]
    cos = cos.masked_fill(~a_ok[..., None], float("-inf"))
    best = _first_argmax(cos, 2)                                                  # [B, A, T * Pc]
    onehot = (best[:, :, None, :] == torch.arange(k_max, device=dev)[:, None]) & member[:, :, None, :]
    onehot = onehot.to(x.dtype).reshape(b, a_max * k_max, t * c_max)
    size = onehot.sum(-1)                                                          # [B, A * K]
    mean = (onehot @ pool) / size.clamp(min=1)[..., None]
    weight = torch.maximum(1.0 / (size + 1.0), torch.tensor(float(merge_beta), dtype=x.dtype, device=dev))
    merged = weight[..., None] * a_vec.reshape(b, a_max * k_max, d) + (1.0 - weight[..., None]) * mean

    # output: salient tokens unchanged and context tokens, at their source positions
    frame_off = (torch.arange(t, device=dev) * p)[None, :, None]
    sal_src = (frame_off + salient.clamp(min=0)).reshape(b, t * s_max)
    sal_ok = (salient >= 0).reshape(b, t * s_max)
    a_pos = cand.gather(1, af[..., None].expand(b, a_max, c_max)).gather(2, a_slot)   # [B, A, K] in-frame
    ctx_src = (af[..., None] * p + a_pos).reshape(b, a_max * k_max)
    ctx_ok = a_ok.reshape(b, a_max * k_max)
    out = torch.cat([tokens.gather(1, sal_src[..., None].expand(-1, -1, d)), merged.to(tokens.dtype)], 1)
    rep = torch.cat([sal_src, ctx_src], 1)
    ok = torch.cat([sal_ok, ctx_ok], 1)
    sizes = torch.cat([torch.ones(b, t * s_max, dtype=x.dtype, device=dev), size], 1)
    red = reduction_from_merge(out, torch.where(ok, rep, -1), sizes=sizes, valid=ok)

    n_cuts = cuts.sum(1)
    width = int(n_cuts.max()) if t > 1 else 0
    tr = torch.arange(t - 1, device=dev).expand(b, t - 1)
    cut_indices = torch.sort(torch.where(cuts, tr, t), dim=1).values[:, :width]
    n_seg = n_cuts + 1
    seg_sizes = torch.where(torch.arange(t, device=dev) < n_seg[:, None], seg_len, 0)[:, :int(n_seg.max())]
    anchors = torch.where(anchor_ok & fvalid[..., None], cand.gather(2, by_score), -1)
    red.extras.update({
        "frame_counts": torch.where(fvalid, sal[:, None] + k_frame, 0),
        "frame_similarity": sim, "cuts": cuts, "cut_indices": torch.where(cut_indices < t, cut_indices, -1),
        "segment_ids": seg, "segment_sizes": seg_sizes, "context_counts": context, "salient_indices": salient,
        "candidate_indices": torch.where(cand_ok, cand, -1),
        "density": density.masked_fill(~cand_ok, float("-inf")), "delta": delta.masked_fill(~cand_ok, float("-inf")),
        "density_score": score, "anchor_indices": anchors,
        "frame_budget": budget, "salient_count": sal, "context_count": ctx,
    })
    return red
