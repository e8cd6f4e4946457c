"""SparseVLM's text-guided visual-token scoring, top-k and token recycling as plain batched tensor functions.

Zhang et al., "SparseVLM: Visual Token Sparsification for Efficient Vision-Language Model Inference" (ICML 2025),
official code https://github.com/Gumpest/SparseVLMs (``score.py``: ``attn_postprocess_topk``,
``select_attn_head_by_sum``; ``utils.py``: ``cluster_and_merge``; driver ``modelling_sparse_llama.py``). Inside the
LLM, at layers 2, 6 and 15, the visual tokens are ranked by the attention they receive from a few "rater" text tokens
and only the layer's budget is kept; the deleted tokens with the highest relevance are recycled into a few merged
tokens by DPC-kNN clustering. No model code and no registration here (the method file composes these).

The official driver runs at batch size 1 (it writes only batch row 0 of the keep mask, OR-ing the top-k of every row
into it, and takes one global mean for the rater threshold). Every function here is per sample instead: on a single
sample it is exactly the official computation, and a batch equals each sample alone.

Shapes: ``B`` batch, ``N`` visual tokens, ``T`` text tokens, ``H`` heads, ``D`` hidden width.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from ..core import prefix_mask, topk_indices
from ..ops.dpc import cluster_mean, dpc_knn
from ..ops.similarity import float32

__all__ = [
    "SPARSEVLM_BUDGETS",
    "SPARSEVLM_LAYERS",
    "Recycled",
    "sparsevlm_budget",
    "sparsevlm_cluster_merge",
    "sparsevlm_raters",
    "sparsevlm_recycle",
    "sparsevlm_relevance",
    "sparsevlm_select_heads",
    "sparsevlm_topk",
]

#: decoder layers where SparseVLM prunes (the official ``layer_dict``)
SPARSEVLM_LAYERS: tuple[int, ...] = (2, 6, 15)

#: visual tokens kept at layers (2, 6, 15), by ``USE_VERSION`` then ``RETAIN_TOKN`` (the official module constants)
SPARSEVLM_BUDGETS: dict[str, dict[int, tuple[int, int, int]]] = {
    "1_0": {192: (300, 200, 110), 128: (303, 110, 36), 96: (238, 48, 26), 64: (66, 30, 17)},
    "2_0": {192: (300, 200, 118), 128: (238, 108, 60), 96: (246, 54, 28), 64: (66, 34, 20)},
}


def sparsevlm_budget(retain: int, layer: int, version: str = "1_0") -> int:
    """Visual tokens SparseVLM keeps at pruning ``layer`` (2, 6 or 15) for ``retain`` (192/128/96/64, the official
    ``RETAIN_TOKN``) and ``version`` (``"1_0"`` or ``"2_0"``, the official ``USE_VERSION``); the table of the official
    ``score.py`` (SparseVLM, ICML 2025). Raises ``ValueError`` on an unknown entry."""
    if version not in SPARSEVLM_BUDGETS:
        raise ValueError(f"version must be one of {sorted(SPARSEVLM_BUDGETS)}, got {version!r}")
    table = SPARSEVLM_BUDGETS[version]
    if int(retain) not in table:
        raise ValueError(f"retain must be one of {sorted(table)}, got {retain!r}")
    if int(layer) not in SPARSEVLM_LAYERS:
        raise ValueError(f"layer must be one of {SPARSEVLM_LAYERS}, got {layer!r}")
    return table[int(retain)][SPARSEVLM_LAYERS.index(int(layer))]


def sparsevlm_raters(visual: Tensor, text: Tensor, *, visual_mask: Tensor | None = None,
                     text_mask: Tensor | None = None) -> Tensor:
    """SparseVLM's text raters (Sec. 3.2): ``[B, T]`` bool, text tokens relevant to the image.

    ``visual [B, N, D]`` and ``text [B, T, D]`` are the LLM input embeddings of the visual and the text (question)
    tokens. ``r = softmax(visual @ text^T, over text).mean(over visual)`` ``[B, T]``; raters are the text tokens with
    ``r`` above the mean of ``r``. Per sample: the softmax runs over the sample's real text tokens (``text_mask``), the
    mean over its real visual tokens (``visual_mask``) and the threshold is the sample's own mean (the official takes
    one mean over the whole batch; identical at B = 1). Computed in float32.
    """
    v, t = float32(visual), float32(text)
    logits = v @ t.transpose(1, 2)  # [B, N, T]
    if text_mask is not None:
        logits = logits.masked_fill(~text_mask[:, None, :], float("-inf"))
    prob = logits.softmax(-1)
    if visual_mask is None:
        rel = prob.mean(1)
    else:
        w = visual_mask.to(prob.dtype)[:, :, None]
        rel = (prob * w).sum(1) / w.sum(1).clamp_min(1.0)
    if text_mask is None:
        thr = rel.mean(-1, keepdim=True)
        return rel > thr
    tm = text_mask.to(rel.dtype)
    thr = (rel * tm).sum(-1, keepdim=True) / tm.sum(-1, keepdim=True).clamp_min(1.0)
    return (rel > thr) & text_mask


def sparsevlm_select_heads(attn: Tensor, raters: Tensor, num_heads: int = 14) -> Tensor:
    """SparseVLM v2.0's text-visual priority heads (``select_attn_head_by_sum``): ``[B, h, T, N]``.

    ``attn [B, H, T, N]`` text->visual attention (rows: text queries, columns: visual keys), ``raters [B, T]`` bool.
    Keeps, per sample, the ``h = min(num_heads, H)`` heads with the largest total rater->visual attention, in
    descending order (ties: lowest head). The official picks the heads from batch row 0 for the whole batch.
    """
    a = float32(attn)
    mass = (a * raters.to(a.dtype)[:, None, :, None]).sum(dim=(2, 3))  # [B, H]
    h = min(int(num_heads), a.shape[1])
    heads = topk_indices(mass, torch.full((a.shape[0],), h, dtype=torch.long, device=a.device))
    return attn.gather(1, heads[:, :, None, None].expand(-1, -1, *attn.shape[2:]))


def sparsevlm_relevance(attn: Tensor, raters: Tensor) -> Tensor:
    """SparseVLM's visual-token relevance (``relation_vis_text``): ``[B, N]`` float32.

    ``attn [B, H, T, N]``: attention probabilities from the text queries to the visual keys at the pruning layer
    (the ``[text rows, visual columns]`` block of the full ``[B, H, L, L]`` map; the softmax ran over the whole row),
    or ``[B, T, N]`` already averaged over heads.
    ``raters [B, T]`` bool (or float weights, e.g. how often the official's index list repeats a row). Relevance =
    attention averaged over heads, then over the sample's rater rows. A sample without raters uses all its text rows
    (the official would average an empty set into NaN).
    """
    if attn.dim() not in (3, 4):
        raise ValueError(f"attn must have shape [B, H, T, N] or [B, T, N], got {tuple(attn.shape)}")
    a = float32(attn).mean(1) if attn.dim() == 4 else float32(attn)  # [B, T, N]
    w = raters.to(device=a.device, dtype=a.dtype) if raters.is_floating_point() else raters.to(a.device).to(a.dtype)
    w = torch.where((w > 0).any(-1, keepdim=True), w, torch.ones_like(w))[:, :, None]
    return (a * w).sum(1) / w.sum(1)


def sparsevlm_topk(relevance: Tensor, budget: int, *, mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """SparseVLM's keep mask (``attn_postprocess_topk``): ``(keep [B, N] bool, s_flag [B] bool)``.

    Each sample keeps its ``min(budget, n_b - 1)`` most relevant visual tokens (``n_b`` its real visual tokens under
    ``mask``; ties: lowest index). The ``- 1`` is the official cap: at least one token is always deleted, so a
    single visual token is deleted entirely. ``s_flag[b]`` (merge the deleted tokens) is False only for a sample
    without visual tokens, whose (empty) mask is all True. Per sample: the official writes the union of all rows'
    top-k into row 0 only (a B > 1 bug); both agree at B = 1.
    """
    b, n = relevance.shape
    dev = relevance.device
    valid = torch.ones(b, n, dtype=torch.bool, device=dev) if mask is None else mask.to(device=dev, dtype=torch.bool)
    n_valid = valid.sum(-1)
    k = (n_valid - 1).clamp(min=0).clamp(max=max(int(budget), 0))
    keep = torch.zeros(b, n, dtype=torch.bool, device=dev)
    if n and int(k.max()) > 0:
        idx = topk_indices(float32(relevance), k, valid)
        ok = idx >= 0
        keep[torch.arange(b, device=dev)[:, None].expand_as(idx)[ok], idx[ok]] = True
    s_flag = n_valid > 0
    return keep, s_flag


def sparsevlm_cluster_merge(x: Tensor, cluster_num: int | Tensor, *, mask: Tensor | None = None
                            ) -> tuple[Tensor, Tensor, Tensor]:
    """SparseVLM's ``cluster_and_merge``: DPC-kNN clustering of ``x [B, N, C]`` then the per-cluster mean.

    Returns ``(merged [B, K, C], centers [B, K], assign [B, N])`` with ``K = max(cluster_num)``: centres in descending
    density-peak score (:func:`vtoken.ops.dpc.dpc_knn`, kNN of ``cluster_num`` points including the point itself,
    distances ``||x_i - x_j|| / sqrt(C)``) and ``merged[k] = sum_{i in k} x_i / (|k| + 1e-6)`` (the official,
    not-quite mean). The official adds ``rand * 1e-6`` to the densities; here exact density ties go to the lowest
    index instead (deterministic; equal to the official whenever it is seed-invariant, which it is not for
    ``cluster_num <= 2``). Per-sample ``cluster_num`` ``[B]`` and ``mask [B, N]`` allowed (``-1`` padding).
    """
    dp = dpc_knn(x, cluster_num, mask=mask)
    merged = cluster_mean(x, dp.assign, dp.centers.shape[1])
    return merged, dp.centers, dp.assign


class Recycled(NamedTuple):
    """Result of :func:`sparsevlm_recycle`.

    Attributes:
        tokens: ``[B, M, C]`` merged tokens in centre order (descending density-peak score), zeros on padding.
        mask: ``[B, M]`` bool, True on real merged tokens (samples recycle different counts).
        centers: ``[B, M]`` long, visual-token index of each merged token's centre, ``-1`` on padding.
        assign: ``[B, N]`` long, merged token each recycled visual token went into, ``-1`` for kept, unrecycled
            and padded tokens.
    """

    tokens: Tensor
    mask: Tensor
    centers: Tensor
    assign: Tensor


def sparsevlm_recycle(x: Tensor, keep: Tensor, relevance: Tensor, *, mask: Tensor | None = None,
                      ratio: float = 0.3, tokens_per_cluster: int = 10) -> Recycled:
    """SparseVLM's token recycling (Sec. 3.4): merge the most relevant deleted visual tokens into a few tokens.

    Args:
        x: ``[B, N, C]`` hidden states of the visual tokens (the pruning layer's output).
        keep: ``[B, N]`` bool, the kept tokens (:func:`sparsevlm_topk`); the others are deleted.
        relevance: ``[B, N]`` the relevance used for the top-k (:func:`sparsevlm_relevance`).
        mask: optional ``[B, N]`` bool, real visual tokens.
        ratio, tokens_per_cluster: the official constants: of ``d`` deleted tokens the ``int(d * 0.3) + 1`` most
            relevant are recycled (descending relevance, ties: lowest index) into ``int(m / 10) + 1`` clusters.

    The recycled tokens are clustered in descending-relevance order by :func:`sparsevlm_cluster_merge` (so exact
    density ties go to the more relevant token). A sample with nothing deleted recycles nothing.
    """
    b, n, c = x.shape
    dev = x.device
    valid = torch.ones(b, n, dtype=torch.bool, device=dev) if mask is None else mask.to(device=dev, dtype=torch.bool)
    deleted = valid & ~keep.to(device=dev, dtype=torch.bool)
    d = deleted.sum(-1)
    m = torch.where(d > 0, (d.double() * ratio).floor().long() + 1, 0).minimum(d)
    if int(m.max()) == 0:
        return Recycled(x.new_zeros(b, 0, c), torch.zeros(b, 0, dtype=torch.bool, device=dev),
                        torch.full((b, 0), -1, dtype=torch.long, device=dev),
                        torch.full((b, n), -1, dtype=torch.long, device=dev))
    src = topk_indices(float32(relevance), m, deleted)  # [B, Mx] recycled tokens, most relevant first
    rec_mask = src >= 0
    rows = torch.arange(b, device=dev)[:, None]
    rec = x[rows, src.clamp(min=0)]
    k = torch.where(m > 0, m // int(tokens_per_cluster) + 1, 1)
    # samples with nothing to recycle run on a dummy single point and are blanked below
    dummy = ~rec_mask.any(-1)
    run_mask = rec_mask | (dummy[:, None] & (torch.arange(src.shape[1], device=dev)[None, :] == 0))
    merged, centers, assign_rec = sparsevlm_cluster_merge(rec, k, mask=run_mask)
    k = torch.where(dummy, 0, k)
    slot_ok = prefix_mask(k, centers.shape[1])
    merged = merged * slot_ok[:, :, None].to(merged.dtype)
    centers = torch.where(slot_ok, src.gather(1, centers.clamp(min=0)), -1)
    assign = torch.full((b, n + 1), -1, dtype=torch.long, device=dev)
    assign.scatter_(1, torch.where(rec_mask, src, n), torch.where(rec_mask, assign_rec, -1))
    return Recycled(merged, slot_ok, centers, assign[:, :n])
