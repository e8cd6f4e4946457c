"""ToDRE: diversity before the LLM (``todre``, stage 1) and task relevance inside it (``todre_llm``, stage 2).

Li, Yang, Lu, "ToDRE: Visual Token Pruning via Diversity and Task Awareness for Efficient Large Vision-Language
Models", arXiv 2505.18757 (2025; v2 "ToDRE: Effective Visual Token Pruning via Token Diversity and Task Relevance").
No official code is released; both stages follow the paper's text. The two compose as
``vtoken.apply(model, [("todre", {"keep": 0.1}), ("todre_llm", {"keep": 0.99})])``: stage 1 keeps a diverse 10%
before the language model, stage 2 removes every remaining visual token at a late decoder layer once the instruction
stops attending to them (``keep`` of stage 2 is a cap on what it keeps otherwise; ``keep=1.0`` turns it off, see
:func:`todre_llm`).
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..core import Reduction, reduction_from_indices, topk_indices
from ..ops.select import k_center_select, point_distances
from ..ops.similarity import float32, l2_normalize
from ._schedule import resolve_llm_keep, scale_layer
from .registry import LLMSchedule, register


@register("todre", paper="ToDRE: Visual Token Pruning via Diversity and Task Awareness for Efficient Large "
          "Vision-Language Models", venue="arXiv 2025", repo=None, stage="pre_llm", kind="prune",
          optional_signals=("vision_features",),
          knob_ranges={"metric": ("cosine", "euclidean")},
          knob_sources={
              "metric": "paper: cosine k-center",
          })
def todre(tokens: Tensor, counts: Tensor, *, mask: Tensor | None = None, vision_features: Tensor | None = None,
          metric: str = "cosine") -> Reduction:
    """Keep ``counts[b]`` tokens chosen by greedy k-center on their features (ToDRE stage 1).

    Args:
        tokens: ``[B, N, D]`` visual tokens.
        counts: ``[B]`` long, tokens kept per sample.
        mask: optional ``[B, N]`` bool, True on real tokens.
        vision_features: optional ``[B, N, C]`` features to measure diversity on (default: ``tokens``).
        metric: the distance of the k-center selection, ``"cosine"`` (``1 - cos``, default) or ``"euclidean"``.

    The first center is the token nearest to the mean of the sample's real tokens (their mean direction for the
    cosine metric, compared at 1e-5 so exact ties go to the lowest index); with no official code to follow, this
    deterministic, content-based seed is our choice. Each
    next center is the token farthest from its nearest center (Gonzalez' 2-approximation of the minimum covering
    radius), with an incremental min-distance vector: O(N * C) per step, batched over ``B``, no ``N x N`` matrix.

    Returns ``[B, K, D]`` tokens in source order; ``extras["order"]`` is ``[B, K]`` the selection order.
    """
    if metric not in ("cosine", "euclidean"):
        raise ValueError(f"metric must be 'cosine' or 'euclidean', got {metric!r}")
    feats = float32(tokens if vision_features is None else vision_features)
    if feats.dim() != 3:
        raise ValueError(f"vision_features must have shape [B, N, C], got {tuple(feats.shape)}")
    w = torch.ones(feats.shape[:2], device=feats.device) if mask is None else mask.to(feats.dtype)
    base = l2_normalize(feats, 1e-12) if metric == "cosine" else feats
    mean = (base * w[..., None]).sum(1, keepdim=True) / w.sum(1).clamp(min=1)[:, None, None]
    # rounded so that candidates tied in exact arithmetic (e.g. two tokens, equidistant from their mean) break by
    # lowest index whatever the float rounding of a batched or single-sample run
    to_mean = torch.round(point_distances(feats, mean, metric).squeeze(-1), decimals=5)
    if mask is not None:
        to_mean = to_mean.masked_fill(~mask, float("inf"))
    first = to_mean.argmin(dim=1)
    order = k_center_select(feats, counts, mask, first=first, metric=metric)
    return reduction_from_indices(tokens, order, extras={"order": order})


def _llm_layers(depth: int, layer: int = 28, ref_depth: int = 32) -> list[int]:
    # `layer` is the decoder layer whose attention decides; the tokens go before the next one
    return [scale_layer("layer", layer, depth, ref_depth, "todre_llm", lo=0, hi=depth - 2) + 1]


def _llm_counts(n: Tensor, keep: int | float, images: Tensor) -> list[Tensor]:
    return [resolve_llm_keep(keep, n, images)]


@register("todre_llm", paper="ToDRE: Visual Token Pruning via Diversity and Task Awareness for Efficient Large "
          "Vision-Language Models", venue="arXiv 2025", repo=None, stage="llm", kind="prune",
          signals=("llm_text_attn", "text_mask"), exact=False, schedule=LLMSchedule(_llm_layers, _llm_counts),
          knob_ranges={"threshold": "[0, 1]", "ref_depth": ">= 1"},
          main_knobs=("threshold",),
          knob_sources={
              "threshold": "paper: tau = 0.10",
              "layer": "paper: 7L/8 (28 of 32), scaled by depth",
              "ref_depth": "paper: a 32-layer language model",
          })
def todre_llm(tokens: Tensor, counts: Tensor, *, mask: Tensor | None = None, llm_text_attn: Tensor | None = None,
              text_mask: Tensor | None = None, threshold: float = 0.1) -> Reduction:
    """ToDRE stage 2 (relevance-driven token reduction, Sec. 4.2): drop every visual token once the instruction no
    longer attends to them; otherwise keep the ``counts[b]`` most task-relevant ones.

    Args:
        tokens: ``[B, N, D]`` hidden states of the visual tokens entering decoder layer ``layer + 1``.
        counts: ``[B]`` long, the most visual tokens a sample keeps when the rule does not fire.
        mask: optional ``[B, N]`` bool, True on real visual tokens.
        llm_text_attn: ``[B, T, N]`` attention probabilities (heads averaged, softmax over the whole sequence) from
            the instruction tokens (rows marked by ``text_mask [B, T]``) to the visual tokens in decoder layer
            ``layer``.
        layer: the decoder layer whose attention decides, after which the visual tokens are removed (default 28 of
            ``ref_depth`` 32, the paper's fractional depth 7L/8). Given for ``ref_depth`` layers and scaled to the
            model (``round(layer * depth / ref_depth)``, at most ``depth - 2``).
        ref_depth: the depth ``layer`` is given for (default 32, the paper's 7L/8 of a 32-layer model).
        threshold: ``tau``, the text-to-visual attention ratio below which every visual token is removed (paper
            0.10).

    Per sample, the text-to-visual ratio ``alpha_t->v = sum_{i in T, j in V} A_ij / sum_{i in T, j} A_ij`` is the
    mean, over the instruction rows, of the attention mass on the visual tokens (each row sums to 1). Where it is
    below ``threshold`` every visual token is removed (``extras["dropped"]``); elsewhere the ``counts[b]`` tokens of
    largest mean instruction attention (the same relevance, ties to the lowest index) are kept.

    Assumptions (no official code): the paper also requires ``alpha_v->t < tau``; with the instruction AFTER the image
    (its ``S, V, T`` layout) causal attention gives visual queries no text keys, so that ratio is identically 0 and is
    not computed. ``T`` is every token after the sample's last visual token (chat-template tokens included). The
    paper has no budget in stage 2 (it removes all or nothing); ``keep`` caps what survives when the rule does not
    fire, so ``keep=1.0`` is the identity (vtoken's invariant) and a ``keep`` just below 1 (e.g. ``0.99``) is the
    paper's all-or-nothing rule. A single decision layer (the paper's default); its multi-layer ablations are not
    reproduced. Returns ``[B, K, D]`` in source order (``K`` may be 0); ``extras``: ``ratio [B]``, ``dropped [B]``,
    ``relevance [B, N]``.
    """
    threshold = float(threshold)
    assert llm_text_attn is not None and text_mask is not None
    rows = text_mask.to(device=tokens.device, dtype=torch.bool)
    att = llm_text_attn.float().to(tokens.device) * rows[..., None]
    if mask is not None:
        att = att * mask[:, None, :]
    relevance = att.sum(1) / rows.sum(1, keepdim=True).clamp(min=1)  # [B, N]
    ratio = relevance.sum(1)
    dropped = ratio < threshold
    order = topk_indices(relevance, counts, mask).masked_fill(dropped[:, None], -1)
    return reduction_from_indices(tokens, order, extras={"ratio": ratio, "dropped": dropped, "relevance": relevance})
