"""VidCom²: frame-adaptive video token pruning by multi-scale Gaussian uniqueness.

Liu et al., "Video Compression Commander: Plug-and-Play Inference Acceleration for Video Large Language Models"
(EMNLP 2025, arXiv 2505.14454), https://github.com/xuyang-liu16/VidCom2; the budget reconciliation follows vLLM's
port (vllm/multimodal/video_prune/vidcom2.py).
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..core import Reduction, reduction_from_indices
from ..ops.gaussian import multi_scale_gaussian
from ..ops.similarity import float32, l2_normalize
from ..ops.video import clip_frames, frame_valid
from .registry import register

#: the Gaussian bandwidths of the official code: 2**-3 ... 2**1
BANDWIDTHS: tuple[float, ...] = (0.125, 0.25, 0.5, 1.0, 2.0)
_EPS = 1e-12  # F.normalize's eps


def _stable_order(key: Tensor, group: Tensor) -> Tensor:
    """``[B, N]`` indices sorted by ``group`` then ``key`` ascending, ties to the lowest index."""
    first = torch.sort(key, dim=1, stable=True).indices
    second = torch.sort(group.gather(1, first), dim=1, stable=True).indices
    return first.gather(1, second)


@register("vidcom2", paper="Video Compression Commander: Plug-and-Play Inference Acceleration for Video Large "
                           "Language Models",
          venue="EMNLP 2025", repo="https://github.com/xuyang-liu16/VidCom2", stage="video", kind="prune",
          signals=("video_grid",), parity=True, fixture="vidcom2",
          knob_ranges={"retention_ratio": "(0, 1]", "temperature": "> 0", "channel_ratio": "(0, 1]",
                       "bandwidths": "> 0"},
          knob_rules=[("bandwidths must name at least one Gaussian bandwidth", lambda bandwidths: len(bandwidths) > 0)],
          main_knobs=("temperature",),
          knob_sources={
              "retention_ratio": "vtoken: None, from keep (keep / the clip's valid tokens) so keep is the one budget; "
                                 "vLLM's 1 - q, the authors' base_scale",
              "temperature": "official code: 0.01 (the frame softmax's temperature, vLLM and the authors' code)",
              "channel_ratio": "official code: 0.5 (scores use the lowest-variance half of the channels)",
              "bandwidths": "official code: 2**-3, 2**-2, 2**-1, 1, 2",
          })
def vidcom2(tokens: Tensor, counts: Tensor, *, mask: Tensor | None = None,
            video_grid: tuple[int, int, int] | None = None, retention_ratio: float | None = None,
            temperature: float = 0.01, channel_ratio: float = 0.5,
            bandwidths: tuple[float, ...] = BANDWIDTHS) -> Reduction:
    """VidCom² (Liu et al., EMNLP 2025): every frame keeps its most unique tokens, distinctive frames keep more.

    ``tokens [B, N, D]`` are ``T`` frames of ``P = H * W`` tokens (``video_grid = (T, H, W)``, frame by frame); a
    shorter clip of a batch is padded with whole masked frames at the end. Per clip, over its valid frames only:

    1. Channels: the ``max(1, int(D * channel_ratio))`` channels of lowest population variance over the clip's
       tokens (ties to the lowest channel); each token restricted to them is L2-normalised (eps 1e-12).
    2. Uniqueness: ``v = G(x, mean over the clip)``, ``f = G(x, mean over its frame)`` with ``G`` the multi-scale
       Gaussian similarity :func:`vtoken.ops.gaussian.multi_scale_gaussian` (``bandwidths``); ``similarity = v + f``
       (high = redundant).
    3. Frame budgets: ``probs = softmax(-mean_p v / temperature)`` over the frames, ``scales = min(r (1 + probs -
       mean(probs)), 1)`` with ``r`` the retention ratio (``retention_ratio``, else ``counts[b] / valid tokens``),
       ``ks = clamp(round(scales * P), 1, P)`` (half to even). Frame ``t`` selects its ``ks[t]`` lowest-similarity
       tokens (the authors' code stops here and keeps ``sum(ks)``).
    4. Reconciliation (vLLM's port): the clip keeps exactly ``counts[b]``: when ``sum(ks)`` is larger, the selected
       tokens with the largest similarity across all frames are dropped; when smaller, the unselected tokens with the
       smallest similarity across all frames are added. Ties go to the lowest index. A frame can so end with more
       or fewer than ``ks[t]`` tokens, down to none.

    Every frame's budget is at least one token, so ``keep`` must give at least one token per valid frame (the
    official count is ``max(T, int(T * P * (1 - q)))``); a smaller budget is a ``ValueError``.

    Args:
        retention_ratio: the ratio ``r`` the frame budgets are scaled from (default None: ``keep`` / the clip's valid
            tokens); vLLM passes ``1 - q`` while its count is ``max(T, int(T * P * (1 - q)))``.
        temperature: temperature of the softmax over the frames' mean video similarity (official 0.01); small
            values give nearly all the extra budget to the most distinctive frame.
        channel_ratio: the fraction of channels (lowest variance over the clip) the scores use (official 0.5).
        bandwidths: the Gaussian bandwidths ``a`` of ``exp(-d^2 / (2 a))`` summed into the similarity (official
            0.125, 0.25, 0.5, 1, 2).

    Extras (padded frames hold 0): ``frame_counts [B, T]`` kept tokens per frame; ``ks [B, T]`` frame budgets before
    reconciliation; ``budget_sum [B]`` their sum; ``target_retained [B]`` the count kept; ``budget_indices [B, M]``
    the per-frame selection before reconciliation (ascending, ``-1`` padded: the authors' code's output);
    ``low_var_idx [B, C]`` the channels used, in ascending variance; ``v_score``, ``f_score``, ``similarity
    [B, T, P]``; ``probs``, ``scales [B, T]``. ``tokens [B, N, D]`` -> ``[B, K, D]``.
    """
    b, n, d = tokens.shape
    t, h, w = video_grid
    p = h * w
    dev = tokens.device
    frames = clip_frames(mask, b, t, p, dev)
    if bool((counts < frames).any()):
        i = int(torch.nonzero(counts < frames)[0, 0])
        raise ValueError(f"vidcom2: keep resolves to {int(counts[i])} tokens for sample {i}, which has "
                         f"{int(frames[i])} frames; every frame keeps at least one token (the official floor), so "
                         f"keep must be at least {int(frames[i])} (e.g. keep={int(frames[i])} or a larger ratio)")
    fvalid = frame_valid(frames, t)  # [B, T]
    tvalid = fvalid[:, :, None].expand(b, t, p).reshape(b, n)
    x = float32(tokens)
    wt = tvalid.to(x.dtype)[..., None]
    n_valid = (frames * p).to(x.dtype)

    # 1. the lowest-variance channels of each clip
    mean = (x * wt).sum(1, keepdim=True) / n_valid[:, None, None]
    var = (((x - mean) * wt) ** 2).sum(1) / n_valid[:, None]  # [B, D] population variance
    kc = max(1, int(d * channel_ratio))
    low_var_idx = torch.sort(var, dim=1, stable=True).indices[:, :kc]
    sel = x.gather(2, low_var_idx[:, None, :].expand(b, n, kc))
    xf = l2_normalize(sel, _EPS).reshape(b, t, p, kc)

    # 2. multi-scale Gaussian similarity to the clip's centre and to each frame's centre
    fw = fvalid.to(x.dtype)[:, :, None, None]
    vid_center = (xf * fw).sum((1, 2), keepdim=True) / n_valid[:, None, None, None]  # [B, 1, 1, C]
    frame_center = xf.mean(2, keepdim=True)  # [B, T, 1, C]
    v_score = multi_scale_gaussian(xf, vid_center, bandwidths) * fw[..., 0]
    f_score = multi_scale_gaussian(xf, frame_center, bandwidths) * fw[..., 0]
    similarity = v_score + f_score  # [B, T, P]

    # 3. frame budgets: a softmax over the frames' distance from the clip
    if retention_ratio is None:
        base = counts.to(x.dtype) / n_valid
    else:
        base = torch.full((b,), float(retention_ratio), dtype=x.dtype, device=dev)
    frame_scores = -v_score.mean(-1)
    top = torch.where(fvalid, frame_scores, float("-inf")).amax(1, keepdim=True)
    probs = torch.softmax(torch.where(fvalid, (frame_scores - top) / float(temperature), float("-inf")), dim=1)
    probs_mean = probs.sum(1, keepdim=True) / frames.to(x.dtype)[:, None]
    scales = ((base[:, None] * (1.0 + probs - probs_mean)).clamp(max=1.0)) * fvalid
    ks = torch.where(fvalid, (scales * p).round().long().clamp(1, p), 0)

    # each frame selects its ks lowest-similarity tokens
    order = torch.sort(similarity, dim=-1, stable=True).indices
    rank = torch.empty_like(order).scatter_(-1, order, torch.arange(p, device=dev).expand_as(order))
    selected = (rank < ks[..., None]).reshape(b, n)

    # 4. reconcile to counts: selected tokens by similarity first, then the others, then the padding
    group = torch.where(selected, 0, torch.where(tvalid, 1, 2))
    ranked = _stable_order(similarity.reshape(b, n), group)
    red = reduction_from_indices(tokens, ranked, counts)

    kept = torch.zeros(b, n + 1, dtype=torch.long, device=dev)
    kept.scatter_(1, torch.where(red.mask, red.indices, n), 1)
    frame_counts = kept[:, :n].reshape(b, t, p).sum(-1)
    budget_sum = ks.sum(-1)
    arange = torch.arange(n, device=dev).expand(b, n)
    budget = torch.sort(torch.where(selected, arange, n + arange), dim=1).values[:, :int(budget_sum.max())]
    red.extras.update({
        "frame_counts": frame_counts, "ks": ks, "budget_sum": budget_sum, "target_retained": counts.clone(),
        "budget_indices": torch.where(budget < n, budget, -1), "low_var_idx": low_var_idx, "v_score": v_score,
        "f_score": f_score, "similarity": similarity, "probs": probs, "scales": scales,
    })
    return red
