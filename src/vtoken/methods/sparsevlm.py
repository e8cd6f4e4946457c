"""SparseVLM: text raters rank the visual tokens at a few decoder layers; deleted tokens are recycled by clustering.

Zhang et al., "SparseVLM: Visual Token Sparsification for Efficient Vision-Language Model Inference", ICML 2025.
https://github.com/Gumpest/SparseVLMs
"""

from __future__ import annotations

from collections.abc import Sequence
from itertools import pairwise

import torch
from torch import Tensor

from ..core import Reduction, check_keep, reduction_from_merge, resolve_keep
from ._schedule import at_depth
from ._sparsevlm_ops import (
    SPARSEVLM_BUDGETS,
    sparsevlm_raters,
    sparsevlm_recycle,
    sparsevlm_relevance,
    sparsevlm_topk,
)
from .registry import LLMSchedule, register

#: the reference visual-token count of the official budget table (LLaVA-1.5, 576 tokens)
REF_TOKENS = 576


def _check_layers(layers: Sequence[int], depth: int) -> list[int]:
    if isinstance(layers, (int, str)) or not layers or not all(isinstance(v, int) and not isinstance(v, bool)
                                                               for v in layers):
        raise TypeError(f"sparsevlm: layers must be a sequence of 3 int decoder layer indices, got {layers!r}")
    if len(layers) != 3:
        raise ValueError(f"sparsevlm: layers must name 3 layers (the official 2, 6, 15), got {list(layers)}")
    if not all(0 <= v < depth - 1 for v in layers) or any(b <= a for a, b in pairwise(layers)):
        raise ValueError(f"sparsevlm: layers={list(layers)} must be ascending in [0, {depth - 1}) for a language model "
                         f"of {depth} decoder layers (the tokens are pruned after each of them)")
    return [v + 1 for v in layers]


def _layers(depth: int, layers: Sequence[int] = (2, 6, 15), ref_depth: int = 32) -> list[int]:
    """``layers`` given for a ``ref_depth``-layer model (the official 32-layer LLaVA-1.5), scaled to ``depth``
    (``round(l * depth / ref_depth)``, clamped to the layers that can prune) and checked."""
    at_depth(0, depth, ref_depth, "sparsevlm")
    if ref_depth != depth and not isinstance(layers, (int, str)) and all(
            isinstance(v, int) and not isinstance(v, bool) and 0 <= v < ref_depth for v in layers):
        layers = [min(max(at_depth(v, depth, ref_depth, "sparsevlm"), 0), depth - 2) for v in layers]
    return _check_layers(layers, depth)


def budgets(n: Tensor, keep: int | float, images: Tensor) -> list[Tensor]:
    """The per-layer top-k budgets ``[B]`` x 3 of SparseVLM v1.0 for ``keep``.

    With ``n == 576`` tokens per image and ``keep`` one of the official ``RETAIN_TOKN`` (192, 128, 96, 64), the
    official table. Otherwise the table's budgets, as fractions of 576, are interpolated linearly in
    ``keep / n`` through ``(0, 0)``, the four official points and ``(1, 1)`` (``keep = n`` keeps everything), and
    scaled to ``n``.
    """
    table = SPARSEVLM_BUDGETS["1_0"]
    points = sorted(table)
    xs = torch.tensor([0.0] + [p / REF_TOKENS for p in points] + [1.0], dtype=torch.float64)
    ys = torch.tensor([[0.0] * 3] + [[v / REF_TOKENS for v in table[p]] for p in points] + [[1.0] * 3],
                      dtype=torch.float64)
    per_image = n.double() / images.clamp(min=1).double()
    keep = check_keep(keep)
    if isinstance(keep, float):
        ratio = resolve_keep(keep, n).double() / n.clamp(min=1).double()
    else:
        ratio = (float(keep) / per_image.clamp(min=1)).clamp(max=1.0)
    out = []
    for s in range(3):
        idx = torch.searchsorted(xs, ratio.clamp(0, 1), right=True).clamp(1, xs.numel() - 1)
        x0, x1, y0, y1 = xs[idx - 1], xs[idx], ys[idx - 1, s], ys[idx, s]
        frac = y0 + (y1 - y0) * (ratio - x0) / (x1 - x0)
        c = torch.floor(n.double() * frac + 0.5).long()
        out.append(torch.where(n > 0, c.clamp(min=1), 0).minimum(n))
    return out


def recycled(deleted: Tensor) -> Tensor:
    """Tokens v1.0's recycling adds for ``deleted [B]`` deleted tokens: ``(int(0.3 d) + 1) // 10 + 1`` (0 for none)."""
    m = torch.floor(deleted.double() * 0.3).long() + 1
    return torch.where(deleted > 0, m // 10 + 1, 0)


def split_total(total: Tensor, n: Tensor) -> Tensor:
    """The top-k budget ``k`` of a total output ``total [B]`` from ``n [B]`` tokens: ``f(k) = k + recycled(n - k)``
    never decreases in ``k``; the largest output ``f(k) <= total`` is reached, by the SMALLEST such ``k`` (where
    several budgets give the same output, the schedule's official budget is usually the smallest; it can differ by
    one token at a recycled-count boundary, for the same output count); ``-1`` where even ``k = 0`` exceeds ``total``
    (the method then keeps ``total`` by top-k alone)."""
    k = torch.arange(int(n.max()) + 1, device=n.device)[None, :]
    f = k + recycled((n[:, None] - k).clamp(min=0))
    inside = k <= n[:, None]
    best = torch.where((f <= total[:, None]) & inside, f, -1).amax(1, keepdim=True)
    big = torch.iinfo(torch.long).max
    k = torch.where((f == best) & inside, k, big).amin(1)
    return torch.where(best[:, 0] >= 0, k, -1)  # -1: even k = 0 recycles more than total


def _counts(n: Tensor, keep: int | float, images: Tensor) -> list[Tensor]:
    # the machinery passes TOTAL counts (kept + recycled); each stage's total is its official top-k budget plus the
    # tokens recycled from what it deletes, and the next stage starts from that total
    out, n_in = [], n
    for b in budgets(n, keep, images):
        b = b.minimum(n_in)
        total = torch.where(b < n_in, b + recycled(n_in - b), n_in)
        out.append(total)
        n_in = total
    return out


@register("sparsevlm", paper="SparseVLM: Visual Token Sparsification for Efficient Vision-Language Model Inference",
          venue="ICML 2025", repo="https://github.com/Gumpest/SparseVLMs", stage="llm", kind="merge",
          signals=("llm_text_attn", "llm_embeds", "text", "text_mask"), parity=True,
          fixture=("sparsevlm_attn_topk", "sparsevlm_cluster_merge"), exact=False,
          schedule=LLMSchedule(_layers, _counts),
          knob_ranges={"ref_depth": ">= 1"},
          main_knobs=("layers",),
          knob_sources={
              "recycle": "paper: token recycling (Sec 3.4)",
              "layers": "official code: 2, 6, 15 of a 32-layer Vicuna, scaled by depth",
              "ref_depth": "official code: LLaVA-1.5's 32-layer Vicuna",
          })
def sparsevlm(tokens: Tensor, counts: Tensor, *, mask: Tensor | None = None, llm_text_attn: Tensor | None = None,
              llm_embeds: Tensor | None = None, text: Tensor | None = None, text_mask: Tensor | None = None,
              recycle: bool = True) -> Reduction:
    """One SparseVLM (v1.0) pruning: rater-guided top-k of the visual tokens plus recycling of deleted ones.

    Args:
        tokens: ``[B, N, D]`` hidden states of the visual tokens after a pruning layer.
        counts: ``[B]`` long, output tokens per sample, recycled ones included: the top-k budget is the largest ``k``
            with ``k + recycled <= counts`` (:func:`split_total`; the schedule passes the official table's budget
            plus what recycling adds, see :func:`budgets`).
        mask: optional ``[B, N]`` bool, True on real visual tokens.
        llm_text_attn: ``[B, T, N]`` attention probabilities from the instruction tokens (rows, ``text_mask``) to the
            visual tokens in the pruning layer, heads averaged.
        llm_embeds, text: ``[B, N, D]`` / ``[B, T, D]`` the input embeddings of the visual and instruction tokens; the
            raters are the instruction tokens with above-mean ``softmax(v t^T)`` relevance (Sec. 3.2). They are
            re-evaluated at each pruning over the visual tokens still present (the official evaluates them once, on
            all of them; identical at the first pruning).
        ref_depth: the depth ``layers`` are given for (default 32, LLaVA-1.5's Vicuna). Other depths scale them.
        layers: the decoder layers whose attention ranks the tokens, pruned after each (official 2, 6, 15). The
            tokens leave before ``layer + 1``.
        recycle: merge the most relevant deleted tokens back as a few clustered tokens (default True, v1.0's token
            recycling of Sec 3.4).

    Each sample keeps its ``min(k, n - 1)`` most relevant tokens (relevance: attention from the raters,
    averaged); of the ``d`` deleted tokens the ``int(0.3 d) + 1`` most relevant are clustered by DPC-kNN into
    ``int(m / 10) + 1`` tokens (mean of the members). A recycled token sits at its smallest member's place (index and
    position). Returns a merging :class:`Reduction` (``assign``, ``sizes``) of at most ``counts`` tokens.
    """
    assert llm_text_attn is not None and llm_embeds is not None and text is not None and text_mask is not None
    b, n = tokens.shape[:2]
    dev = tokens.device
    valid = torch.ones(b, n, dtype=torch.bool, device=dev) if mask is None else mask
    raters = sparsevlm_raters(llm_embeds, text, visual_mask=valid, text_mask=text_mask.bool())
    rel = sparsevlm_relevance(llm_text_attn * text_mask[..., None].to(llm_text_attn.dtype), raters)
    n_valid = valid.sum(1)
    topk = split_total(counts, n_valid) if recycle else counts
    plain = topk < 0  # a budget below what recycling alone adds: top-k only, nothing recycled
    topk = torch.where(plain, counts, topk)
    keep_mask = torch.zeros(b, n, dtype=torch.bool, device=dev)
    for k in topk.unique().tolist():  # a handful of distinct budgets (one per image size)
        rows = topk == k
        keep_mask[rows] = sparsevlm_topk(rel[rows], int(k), mask=valid[rows])[0]
    # a sample whose budget covers every token keeps them all (no forced deletion when nothing is pruned)
    keep_mask |= (counts >= n_valid)[:, None] & valid
    index = torch.arange(n, device=dev).expand(b, n)
    out_tok, rep, assign, sizes = [tokens], [torch.where(keep_mask, index, -1)], [torch.where(keep_mask, index, -1)], \
        [keep_mask.to(tokens.dtype)]
    extras: dict = {"relevance": rel, "raters": raters}
    if recycle:
        rec = sparsevlm_recycle(tokens, keep_mask, rel, mask=valid)
        if bool(plain.any()):
            rec = rec._replace(mask=rec.mask & ~plain[:, None], assign=rec.assign.masked_fill(plain[:, None], -1),
                               tokens=rec.tokens * (~plain)[:, None, None].to(rec.tokens.dtype))
        m = rec.tokens.shape[1]
        if m:
            members = rec.assign >= 0
            smallest = torch.full((b, m + 1), n, dtype=torch.long, device=dev)
            smallest.scatter_reduce_(1, torch.where(members, rec.assign, m), index, "amin")
            smallest = torch.where(rec.mask, smallest[:, :m], -1)
            count = torch.zeros(b, m + 1, dtype=tokens.dtype, device=dev).scatter_add_(
                1, torch.where(members, rec.assign, m), members.to(tokens.dtype))[:, :m]
            out_tok.append(rec.tokens.to(tokens.dtype))
            rep.append(smallest)
            assign.append(torch.where(members, n + rec.assign, -1))
            sizes.append(count)
            extras["centers"] = rec.centers
    out = torch.cat(out_tok, 1)
    reps = torch.cat(rep, 1)
    slot_valid = reps >= 0
    # assign: each input token's output slot in out's order (kept: its own slot; recycled: n + cluster)
    assign_all = torch.where(assign[-1] >= 0, assign[-1], assign[0]) if len(assign) > 1 else assign[0]
    return reduction_from_merge(out, torch.where(slot_valid, reps, n + torch.arange(reps.shape[1], device=dev)),
                                assign_all, torch.cat(sizes, 1), valid=slot_valid, extras=extras)
