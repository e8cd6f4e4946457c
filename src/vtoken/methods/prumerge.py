"""LLaVA-PruMerge: adaptive (IQR-outlier) selection by [CLS] attention, key-nearest-neighbour merge.

Shang et al., "LLaVA-PruMerge: Adaptive Token Reduction for Efficient Large Multimodal Models" (ICCV 2025;
arXiv 2403.15388), https://github.com/42Shawn/LLaVA-PruMerge. PruMerge+ (spatial supplement) is in
:mod:`vtoken.methods.prumerge_plus` and shares the helpers below.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ..core import Reduction, reduction_from_merge, topk_indices
from ..ops.similarity import float32, l2_normalize
from ..ops.stats import iqr_outlier_fraction
from .registry import SignalSpec, register

#: How a model adapter collects PruMerge's signals the official way (CLIP ViT-L/14-336 in LLaVA-1.5: the hooks sit on
#: the last layer's q_proj/k_proj, whose input is hidden_states[-2], the features LLaVA uses).
PRUMERGE_SIGNAL_SPEC: dict[str, SignalSpec] = {
    "cls_attn": SignalSpec(layer=-1, heads="full",
                 note="softmax((q k^T) * E**-0.5) of the CLS query with the FULL projection width E as one head "
                         "(ops.attention.cls_attention(q, k, num_heads=1)), CLS column removed"),
    "keys": SignalSpec(layer=-1, heads="full", note="k_proj output of the same layer, full width, CLS row removed"),
}


def adaptive_keep(cls_attn: Tensor, valid: Tensor, pooled: bool) -> tuple[Tensor, Tensor]:
    """PruMerge's adaptive count: ``(left [B] long, ratio [B] float64)``.

    ``ratio`` is the IQR outlier fraction of the valid CLS attention (per sample, or over the whole batch with
    ``pooled``, as the official NumPy code) and ``left = int(n * ratio)`` with ``n`` the sample's valid count,
    evaluated in float64 exactly as Python does (so ``left`` can be one below the outlier count).
    """
    _, ratio = iqr_outlier_fraction(cls_attn, valid, pooled=pooled)
    left = torch.floor(valid.sum(-1).double() * ratio).long()
    return left, ratio


def index_mask(idx: Tensor, n: int) -> Tensor:
    """``[B, n]`` bool, True at the entries of ``idx [B, M]`` (``-1`` ignored)."""
    hit = torch.zeros(idx.shape[0], n + 1, dtype=torch.bool, device=idx.device)
    hit.scatter_(1, torch.where(idx >= 0, idx, n), True)
    return hit[:, :n]


def compact(idx: Tensor) -> Tensor:
    """Move the ``-1`` entries of ``idx [B, M]`` to the end, keeping the order of the others."""
    return idx.gather(1, torch.sort((idx < 0).long(), dim=1, stable=True).indices)


def merge_and_summarise(tokens: Tensor, keep_order: Tensor, valid: Tensor, cls_attn: Tensor, keys: Tensor,
                        neighbors: int, extras: dict[str, Any]) -> Reduction:
    """PruMerge's merge step for kept tokens ``keep_order [B, K]`` (emission order, ``-1`` padded).

    Each kept token ``i`` becomes ``x_i + sum_j a_j x_j`` over its ``neighbors`` most key-similar valid tokens ``j``
    (cosine of L2-normalised keys, ``j != i``, kept or not; ``a`` the raw CLS attention); one summary token
    ``sum_j a_j x_j`` over every valid non-kept token is appended (index: its smallest member). ``assign`` maps kept
    tokens to themselves and non-kept tokens to the summary token; ``sizes`` counts that partition.
    """
    b, n, c = tokens.shape
    dev = tokens.device
    ar = torch.arange(n, device=dev)
    k = keep_order.shape[1]
    ok = keep_order >= 0
    safe = keep_order.clamp(min=0)
    a = float32(cls_attn)
    x = float32(tokens)

    rest = valid & ~index_mask(keep_order, n)

    kn = l2_normalize(float32(keys), eps=1e-12)
    sim = kn.gather(1, safe[..., None].expand(b, k, kn.shape[-1])) @ kn.transpose(1, 2)       # [B, K, N]
    cand = valid[:, None, :] & (ar[None, None, :] != safe[..., None])
    sim = sim.masked_fill(~cand, float("-inf"))
    n_nb = min(int(neighbors), n - 1)
    top = torch.sort(sim, dim=-1, descending=True, stable=True)
    nb_idx, nb_ok = top.indices[..., :n_nb], torch.isfinite(top.values[..., :n_nb])
    nb_w = a.gather(1, nb_idx.reshape(b, -1)).reshape(b, k, n_nb).to(x.dtype)
    w = torch.zeros(b, k, n, dtype=x.dtype, device=dev)
    w.scatter_(2, nb_idx, torch.where(nb_ok, nb_w, 0.0))
    merged = x.gather(1, safe[..., None].expand(b, k, c)) + w @ x                            # [B, K, D]

    wr = torch.where(rest, a, torch.zeros((), dtype=a.dtype, device=dev))
    summary = (x * wr[..., None]).sum(1, keepdim=True)                                       # [B, 1, D]
    has_rest = rest.any(-1)
    summary_rep = torch.where(has_rest, torch.where(rest, ar, n).amin(-1), -1)

    out = torch.cat([merged, summary], dim=1).to(tokens.dtype)
    rep = torch.cat([torch.where(ok, keep_order, -1), summary_rep[:, None]], dim=1)
    slot_ok = rep >= 0
    assign = torch.full((b, n + 1), -1, dtype=torch.long, device=dev)
    assign.scatter_(1, torch.where(ok, keep_order, n), torch.arange(k, device=dev).expand(b, k))
    assign = torch.where(rest, k, assign[:, :n])
    sizes = torch.cat([ok.float(), rest.sum(-1, keepdim=True).float()], dim=1) * slot_ok.float()
    extras = dict(extras)
    extras["order"] = compact(rep)[:, :int(slot_ok.sum(-1).max())]
    return reduction_from_merge(out, rep, assign=assign, sizes=sizes, valid=slot_ok, extras=extras)


@register("prumerge", paper="LLaVA-PruMerge: Adaptive Token Reduction for Efficient Large Multimodal Models",
          venue="ICCV 2025", repo="https://github.com/42Shawn/LLaVA-PruMerge",
          space="vision", stage="pre_llm", kind="merge",
          signals=("cls_attn", "keys"), parity=True, fixture="prumerge", exact=False,
          signal_spec=PRUMERGE_SIGNAL_SPEC,
          knob_ranges={"neighbors": ">= 0"},
          main_knobs=("adaptive",),
          knob_sources={
              "adaptive": "paper: PruMerge's IQR-adaptive count",
              "pooled_iqr": "vtoken: per sample, so a batch equals each sample alone (invariant 3); the official "
                            "code pools the IQR over the batch (True)",
              "neighbors": "official code: 32",
          })
def prumerge(tokens: Tensor, counts: Tensor, *, mask: Tensor | None = None, cls_attn: Tensor | None = None,
             keys: Tensor | None = None, adaptive: bool = True, pooled_iqr: bool = False,
             neighbors: int = 32) -> Reduction:
    """Keep the [CLS]-attention outliers, let each absorb its key-nearest neighbours, summarise the rest.

    ``tokens [B, N, D]`` patch features (CLS removed); ``cls_attn [B, N]`` the CLS attention and ``keys [B, N, d]``
    the keys of the scoring layer (officially the last CLIP layer, full width without heads: see ``signal_spec``).

    1. With ``adaptive`` (the paper's PruMerge), the kept count is the number of IQR outliers of the sample's CLS
       attention (values above ``Q3 + 1.5 IQR``; ``int(n * fraction)``, NumPy-exact), at most ``counts[b] - 1``;
       without it exactly ``counts[b] - 1`` tokens are kept. The official code pools the IQR statistic over the whole
       batch; vtoken computes it per sample (a sample gives the same result alone or in a batch) unless
       ``pooled_iqr=True`` reproduces the pooled statistic.
    2. The top tokens by CLS attention are kept; each becomes ``x_i + sum_j a_j x_j`` over its ``neighbors`` (32)
       most key-similar other tokens (cosine; kept or not; raw attention weights, unnormalised).
    3. One summary token ``sum_j a_j x_j`` over every non-kept token is appended; it counts toward ``keep``.

    Args:
        adaptive: choose the kept count by the IQR outliers of the CLS attention, capped by ``keep`` (default True,
            the paper's PruMerge). Without it exactly ``counts[b] - 1`` tokens are kept.
        pooled_iqr: compute the IQR statistic over the whole batch, as the official code (default False: per
            sample). Only used with ``adaptive``.
        neighbors: how many most key-similar tokens each kept token absorbs (default 32, as the official code).

    Output counts are adaptive (``exact=False``): at most ``counts[b]``. Extras: ``order [B, K]`` output indices in
    the official emission order (kept by descending attention, then the summary token), ``ratio [B]`` float64 the
    IQR outlier fraction (``(counts - 1) / n`` without ``adaptive``).
    """
    b, n = tokens.shape[:2]
    valid = torch.ones(b, n, dtype=torch.bool, device=tokens.device) if mask is None else mask
    a = float32(cls_attn)
    if adaptive:
        left, ratio = adaptive_keep(a, valid, pooled_iqr)
        n_keep = left.minimum(counts - 1)
    else:
        n_keep = counts - 1
        ratio = n_keep.double() / valid.sum(-1).double()
    order = topk_indices(a, n_keep, valid)
    return merge_and_summarise(tokens, order, valid, a, keys, neighbors, {"ratio": ratio})
