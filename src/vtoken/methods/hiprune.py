"""HiPrune: hierarchical-attention token pruning with anchors, buffers and registers.

"HiPrune: Training-Free Visual Token Pruning via Hierarchical Attention in Vision-Language Models", arXiv 2508.00553
(2025), https://github.com/Danielement321/HiPrune.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ..core import Reduction, reduction_from_indices, topk_indices
from ..ops.grid import buffer_neighbours
from ..ops.similarity import float32
from .registry import SignalSpec, register

#: HiPrune's official Qwen2.5-VL setting
QWEN_NOTE = ("HiPrune's Qwen2.5-VL code: object layer 16 (1-based) and the last block of a 32-block tower, column sums "
             "of the head-mean map, 4-patch mean, un-permuted windows")


def _layer(value: int, n_layers: int, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not -n_layers <= value < n_layers:
        raise ValueError(f"hiprune: {name} must index the L = {n_layers} layers of attn_received_layers, got {value!r}")
    return value % n_layers


@register("hiprune", paper="HiPrune: Training-Free Visual Token Pruning via Hierarchical Attention in "
          "Vision-Language Models", venue="arXiv 2025", repo="https://github.com/Danielement321/HiPrune",
          space="vision", stage="pre_llm", kind="prune", signals=("attn_received_layers",),
          optional_signals=("grid",), parity=True, fixture="hiprune",
          signal_spec={"attn_received_layers": SignalSpec(
              layers=(8, -2), ref_depth=24, feature_layer=True, families=dict.fromkeys(
                  ("qwen2_vl", "qwen2_5_vl"), SignalSpec(layers=(15, -1), ref_depth=32, note=QWEN_NOTE)),
              note="0-based indices into the vision tower's per-layer attentions: the object layer (HiPrune's "
                      "OBJECT_LAYER=9, 1-based, for CLIP ViT-L/14) and LLaVA's select layer (-2); per layer the "
                      "softmax probabilities are averaged over heads, then over every query row including CLS, and "
                      "the CLS column is dropped")},
          knob_ranges={"alpha": "[0, 1]", "neighbours": ("raster", "grid")},
          main_knobs=("alpha",),
          knob_sources={
              "alpha": "official scripts: HIPRUNE_ALPHA=0.1",
              "object_layer": "official code: the first collected layer (CLIP layer 9 on LLaVA-1.5)",
              "deep_layer": "official code: the last collected layer (LLaVA's select layer)",
              "neighbours": "official code: the flat-index buffer rule",
          })
def hiprune(tokens: Tensor, counts: Tensor, *, mask: Tensor | None = None, attn_received_layers: Tensor | None = None,
            grid: tuple[int, int] | None = None, alpha: float = 0.1, object_layer: int = 0, deep_layer: int = -1,
            neighbours: str = "raster") -> Reduction:
    """HiPrune (arXiv 2025): anchors from an object (middle) layer, their grid neighbours as buffers, registers from a
    deep layer.

    Per sample with budget ``k = counts[b]``:

    1. ``anchors = round(k * alpha / 5)`` (round half to even, as Python) tokens with the highest attention received
       in the object layer (``attn_received_layers[:, object_layer]``);
    2. buffers: each anchor's neighbours ``-1, +1, -W, +W`` on the ``grid = (H, W)`` (default: square). The default
       ``neighbours="raster"`` is the official flat-index rule (``+-1`` wrap across rows, indices clamped into the
       image, so border anchors repeat themselves and duplicates shrink the buffer set); ``"grid"`` uses true 2-D
       neighbours (see :func:`vtoken.ops.grid.buffer_neighbours`). Should anchors + buffers exceed ``k`` (only for
       ``alpha`` near 1), anchors are kept first, then left, right, up and down neighbours;
    3. registers: the remaining ``k - |anchors + buffers|`` tokens with the highest attention received in the deep
       layer (``attn_received_layers[:, deep_layer]``), excluding the anchors and buffers.

    Args:
        alpha: the anchor fraction, ``round(k * alpha / 5)`` anchors for a budget of ``k`` (default 0.1, as the
            official ``HIPRUNE_ALPHA`` runs). Each anchor brings up to 4 buffers, so anchors and buffers take about
            ``alpha`` of the budget.
        object_layer: the index into ``attn_received_layers``'s ``L`` layers of the object layer that picks the
            anchors (default 0, the first collected layer: CLIP layer 9 of 24, 1-based, HiPrune's ``OBJECT_LAYER``).
        deep_layer: the index into ``attn_received_layers``'s ``L`` layers of the deep layer that picks the registers
            (default -1, the last collected layer: LLaVA's select layer -2).
        neighbours: the buffer rule, ``"raster"`` (the official flat-index rule, default) or ``"grid"`` (true 2-D
            neighbours).

    ``attn_received_layers [B, L, N]``: see :data:`vtoken.core.SIGNALS` (the official code averages the full softmax
    map over heads and over all query rows, CLS included). ``tokens [B, N, D]`` -> ``[B, K, D]`` with exactly
    ``counts[b]`` tokens. ``extras``: ``anchors [B, A]`` (descending score, ``-1`` padded), ``object_attention`` and
    ``deep_attention`` ``[B, N]``.
    """
    b, n = tokens.shape[:2]
    dev = tokens.device
    sig = attn_received_layers
    if sig.dim() != 3 or sig.shape[2] != n:
        raise ValueError(f"signal 'attn_received_layers' for method 'hiprune' must have shape [B, L, N] with N = {n}, "
                         f"got {tuple(sig.shape)}")
    if not isinstance(alpha, (int, float)) or isinstance(alpha, bool) or not 0.0 <= float(alpha) <= 1.0:
        raise ValueError(f"hiprune: alpha must be a float in [0, 1], got {alpha!r}")
    if grid is None:
        side = math.isqrt(n)
        if side * side != n:
            raise ValueError(f"hiprune needs the signal 'grid' for N = {n} tokens (not a square grid)")
        grid = (side, side)
    sig = float32(sig)
    shallow = sig[:, _layer(object_layer, sig.shape[1], "object_layer")]
    deep = sig[:, _layer(deep_layer, sig.shape[1], "deep_layer")]
    valid = torch.ones(b, n, dtype=torch.bool, device=dev) if mask is None else mask

    n_anchor = torch.round(counts.double() * float(alpha) / 5).long().minimum(counts)
    anchors = topk_indices(shallow, n_anchor, mask)  # [B, A]
    cand = buffer_neighbours(anchors, grid, neighbours)  # [B, 5A]: anchors, left, right, up, down
    cand = torch.where(cand >= 0, cand, n)  # n: no candidate
    ok = torch.cat([valid, valid.new_zeros(b, 1)], 1).gather(1, cand)  # masked-out neighbours are dropped
    # priority of each candidate token: its first position in [anchors, left, right, up, down]
    spill = torch.where(ok, cand, n)
    pos = torch.arange(cand.shape[1], device=dev).expand_as(cand)
    big = cand.shape[1] + 1
    prio = torch.full((b, n + 1), big, dtype=torch.long, device=dev).scatter_reduce(1, spill, pos, "amin")[:, :n]
    is_cand = prio < big
    if bool((is_cand.sum(-1) > counts).any()):
        rank = torch.empty_like(prio).scatter_(1, torch.sort(prio, dim=1, stable=True).indices,
                                               torch.arange(n, device=dev).expand(b, n).contiguous())
        is_cand = is_cand & (rank < counts[:, None])
    n_reg = counts - is_cand.sum(-1)
    registers = topk_indices(deep.masked_fill(is_cand, float("-inf")), n_reg, valid)
    chosen = torch.zeros(b, n + 1, dtype=torch.bool, device=dev)
    chosen.scatter_(1, torch.where(registers >= 0, registers, n), True)
    kept = is_cand | chosen[:, :n]
    idx = torch.where(kept, torch.arange(n, device=dev), -1)
    return reduction_from_indices(tokens, idx, extras={"anchors": anchors, "object_attention": shallow,
                                                       "deep_attention": deep})
