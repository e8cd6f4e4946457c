"""CenterCLIP: multi-segment token clustering with k-medoids.

Zhao, Zhu, Wang & Yang, "CenterCLIP: Token Clustering for Efficient Text-Video Retrieval", SIGIR 2022.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..core import Reduction, reduction_from_merge
from ..ops.cluster import kmedoids
from ..ops.similarity import float32
from .registry import register


def segment_ids(frame_ids: Tensor | None, mask: Tensor | None, segment_frames: int, b: int, n: int,
                device: torch.device) -> Tensor:
    """``[B, N]`` long temporal segment of every token (``-1`` for masked tokens): the distinct frames of a sample,
    in order, grouped ``segment_frames`` at a time (all tokens form one segment without ``frame_ids``)."""
    valid = torch.ones(b, n, dtype=torch.bool, device=device) if mask is None else mask
    if frame_ids is None:
        return torch.where(valid, 0, -1)
    f = frame_ids.long()
    low = torch.iinfo(torch.long).min
    # carry the last valid frame id over masked tokens, so they never start a new frame
    carried = torch.where(valid, f, low).cummax(dim=1).values
    prev = torch.cat([torch.full((b, 1), low, dtype=torch.long, device=device), carried[:, :-1]], dim=1)
    new_frame = valid & (carried != prev)
    rank = (new_frame.long().cumsum(1) - 1).clamp(min=0)
    return torch.where(valid, rank // segment_frames, -1)


def split_keep(counts: Tensor, sizes: Tensor) -> Tensor:
    """Split ``counts [B]`` over segments with ``sizes [B, S]`` tokens: one per non-empty segment, the rest in
    proportion to ``size - 1`` by largest remainder (ties to the earlier segment). Never more than a segment's size.
    Returns ``[B, S]`` long summing to ``counts``."""
    nonempty = sizes > 0
    base = nonempty.long()
    rest = (counts - base.sum(-1)).clamp(min=0)
    room = (sizes - base).clamp(min=0)
    total = room.sum(-1).clamp(min=1)
    quota = rest[:, None] * room  # exact integer quotas: quota / total
    floor = quota // total[:, None]
    remainder = quota - floor * total[:, None]
    left = rest - floor.sum(-1)
    s = sizes.shape[1]
    order = torch.sort(-remainder, dim=1, stable=True).indices  # largest remainder first, ties to earlier
    rank = torch.empty_like(order).scatter_(1, order, torch.arange(s, device=sizes.device).expand_as(order))
    bonus = (rank < left[:, None]).long()
    return base + floor + bonus


@register("centerclip", paper="CenterCLIP: Token Clustering for Efficient Text-Video Retrieval", venue="SIGIR 2022",
          repo="https://github.com/mzhaoshuai/CenterCLIP", stage="video", kind="cluster",
          optional_signals=("frame_ids",), parity=True, fixture="centerclip",
          knob_ranges={"segment_frames": ">= 1", "distance": ("euclidean", "cosine"), "norm_p": ">= 0",
                       "threshold": ">= 0", "iter_limit": ">= 0", "center": ("medoid", "mean"),
                       "stop": ("sample", "batch")},
          main_knobs=("segment_frames",),
          knob_sources={
              "segment_frames": "paper: 2 (the released MSR-VTT/MSVD runs use 3, ActivityNet 5)",
              "distance": "official code: euclidean",
              "norm_p": "official code: 2",
              "threshold": "official scripts: 1e-6 in every released run (the argparse default is 1e-5)",
              "iter_limit": "official code: 100",
              "center": "paper: medoids",
              "stop": "vtoken: each sample stops on its own, so a batch equals each sample alone (invariant 3)",
              "id_sort": "official code: True",
          })
def centerclip(tokens: Tensor, counts: Tensor, *, mask: Tensor | None = None, frame_ids: Tensor | None = None,
               segment_frames: int = 2, distance: str = "euclidean", norm_p: float = 2.0, threshold: float = 1e-6,
               iter_limit: int = 100, center: str = "medoid", stop: str = "sample", id_sort: bool = True) -> Reduction:
    """CenterCLIP (Zhao et al., SIGIR 2022): k-medoids token clustering per temporal segment; each cluster is
    represented by its medoid token.

    Without ``frame_ids`` all tokens of a sample are clustered into ``counts[b]`` clusters. With ``frame_ids [B, N]``
    (non-decreasing) the distinct frames are grouped ``segment_frames`` at a time into segments and each segment is
    clustered on its own; ``keep`` is the total per sample, split over its segments with one per segment and the
    rest in proportion to their token counts (largest remainder, ties to the earlier segment; equal segments get
    equal shares), so ``keep`` must be at least the number of segments. All segments of all samples run as one
    batched k-medoids problem (:func:`vtoken.ops.cluster.kmedoids`: KKZ initialisation, ``distance`` ``"euclidean"``
    (``norm_p``-norm) or ``"cosine"``, medoid shift ``< threshold`` or ``iter_limit`` iterations; ``stop="batch"``
    reproduces the official joint stopping rule over the batch, the default ``"sample"`` keeps samples independent).
    ``id_sort`` (official default ``True``): every token joins its nearest final medoid, ties to the lowest medoid
    index; ``False``: the clusters of the last iteration, formed before its medoid update (the official
    ``id_sort=False`` labels; the same clusters once the medoids have converged, they differ when ``iter_limit``
    stops the iterations first). Each medoid belongs to its own cluster either way.

    Args:
        segment_frames: frames per temporal segment, clustered on its own when ``frame_ids`` is given (paper 2).
        distance: ``"euclidean"`` (the ``norm_p``-norm, official default) or ``"cosine"`` distance between tokens.
        norm_p: the ``p`` of the euclidean distance (official default 2).
        threshold: stop when every medoid moves less than this (default 1e-6, the official scripts' value).
        iter_limit: the most k-medoids iterations (official default 100; 0 keeps the KKZ initial medoids).
        center: the token representing a cluster, ``"medoid"`` (paper) or ``"mean"`` (the cluster average).
        stop: ``"sample"`` stops each sample on its own; ``"batch"`` reproduces the official joint stopping rule.
        id_sort: re-assign every token to the sorted final medoids (official default True); False keeps the last
            iteration's clusters.

    Output: medoid tokens (``center="mean"``: cluster means) sorted by medoid index, ``indices`` = medoids,
    ``assign`` = cluster of every input, ``sizes`` = cluster sizes; ``extras``: ``iterations [B]`` (the most any
    segment ran) and ``slot_medoids [B, K]`` (medoids in KKZ slot order, segment by segment, ``-1`` padded: the
    official ``medoids`` output of ``id_sort=False``). ``tokens [B, N, D]`` -> ``[B, K, D]``.
    """
    if center not in ("medoid", "mean"):
        raise ValueError(f"centerclip: center must be 'medoid' or 'mean', got {center!r}")
    if isinstance(segment_frames, bool) or not isinstance(segment_frames, int) or segment_frames < 1:
        raise ValueError(f"centerclip: segment_frames must be an int >= 1, got {segment_frames!r}")
    b, n, d = tokens.shape
    dev = tokens.device
    seg = segment_ids(frame_ids, mask, segment_frames, b, n, dev)
    valid = seg >= 0
    s = int(seg.max()) + 1
    safe_seg = torch.where(valid, seg, s)
    seg_size = torch.zeros(b, s + 1, dtype=torch.long, device=dev).scatter_add_(1, safe_seg, valid.long())[:, :s]
    n_seg = (seg_size > 0).sum(-1)
    if bool((counts < n_seg).any()):
        bad = int(torch.nonzero(counts < n_seg)[0, 0])
        raise ValueError(f"centerclip: keep resolves to {int(counts[bad])} tokens for sample {bad}, which has "
                         f"{int(n_seg[bad])} segments; keep must give at least one token per segment (raise keep or "
                         f"segment_frames)")
    seg_keep = split_keep(counts, seg_size)  # [B, S]
    offset = seg_keep.cumsum(-1) - seg_keep  # first output slot of each segment

    # lay every (sample, segment) out as one padded clustering problem
    rank = valid.long().cumsum(1) - 1
    big = torch.iinfo(torch.long).max
    first = torch.full((b, s + 1), big, dtype=torch.long, device=dev).scatter_reduce(1, safe_seg, rank, "amin")
    local = torch.where(valid, rank - first.gather(1, safe_seg), 0)
    length = int(seg_size.max())
    prob = torch.arange(b, device=dev)[:, None] * s + seg.clamp(min=0)  # [B, N] problem of each token
    flat = torch.where(valid, prob * length + local, b * s * length)  # invalid tokens go to a spill slot
    x = float32(tokens)
    xp = torch.zeros(b * s * length + 1, d, dtype=x.dtype, device=dev)
    xp.index_copy_(0, flat[valid], x[valid])
    src = torch.full((b * s * length + 1,), -1, dtype=torch.long, device=dev)
    src.index_copy_(0, flat[valid], torch.arange(n, device=dev).expand(b, n)[valid])
    xp, src = xp[:-1].reshape(b * s, length, d), src[:-1].reshape(b * s, length)
    live = (seg_keep.reshape(-1) > 0).nonzero().squeeze(1)  # non-empty segments only
    res = kmedoids(xp[live], seg_keep.reshape(-1)[live], valid=src[live] >= 0, metric=distance, p=norm_p,
                   threshold=threshold, iter_limit=iter_limit, stop=stop, id_sort=id_sort)

    # back to samples: global slot = segment offset + local slot
    kmax = res.medoids.shape[1]
    m = int(counts.max())
    ok = res.medoids >= 0
    sample_of = live // s
    g_slot = sample_of[:, None] * m + offset.reshape(-1)[live][:, None] + torch.arange(kmax, device=dev)
    live_src = src[live]

    def to_samples(medoids: Tensor) -> Tensor:  # [problems, kmax] local medoids -> [B, m] source indices
        out = torch.zeros(b * m, dtype=torch.long, device=dev)
        out[g_slot[ok]] = live_src.gather(1, medoids.clamp(min=0))[ok]
        return out.reshape(b, m)

    rep, slot_rep = to_samples(res.medoids), to_samples(res.slots)
    slot_valid = torch.arange(m, device=dev)[None, :] < counts[:, None]
    local_assign = torch.full((b * s, length), -1, dtype=torch.long, device=dev)
    local_assign[live] = res.assign
    assign = torch.where(valid, offset.gather(1, seg.clamp(min=0)) + local_assign.reshape(-1)[
        torch.where(valid, prob * length + local, 0)], -1)
    safe_assign = torch.where(valid, assign, m)
    sizes = torch.zeros(b, m + 1, dtype=x.dtype, device=dev).scatter_add_(1, safe_assign, valid.to(x.dtype))[:, :m]
    if center == "medoid":
        out = tokens.gather(1, rep[..., None].expand(b, m, d))
    else:
        sums = torch.zeros(b, m + 1, d, dtype=x.dtype, device=dev)
        sums.scatter_add_(1, safe_assign[..., None].expand(b, n, d), x)
        out = (sums[:, :m] / sizes.clamp(min=1)[..., None]).to(tokens.dtype)
    iters = torch.zeros(b, dtype=torch.long, device=dev).scatter_reduce(0, sample_of, res.iterations, "amax")
    return reduction_from_merge(out, rep, assign=assign, sizes=sizes, valid=slot_valid,
                                extras={"iterations": iters, "slot_medoids": torch.where(slot_valid, slot_rep, -1)})
