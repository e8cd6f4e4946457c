"""MMTok: greedy multimodal coverage maximisation of the question tokens and of the visual tokens.

Dong et al., "MMTok: Multimodal Coverage Maximization for Efficient Inference of VLMs", arXiv 2508.18264 (2025).
Official code: https://github.com/Ironieser/MMTok (reimplemented, not copied).
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..core import Reduction, reduction_from_indices
from ..ops.coverage import greedy_max_coverage, softmax_affinity
from .registry import SignalSpec, register


def coverage_matrix(tokens: Tensor, text: Tensor, vision_features: Tensor | None = None, *,
                    mask: Tensor | None = None, text_mask: Tensor | None = None, alpha: float = 0.5,
                    tv_temp: float = 0.02, vv_temp: float = 0.2) -> Tensor:
    """MMTok's coverage matrix ``[B, T + N, N]``: ``cat([P, alpha * Q], dim=1)``.

    ``P = softmax(cos(text, tokens) / tv_temp) / T`` (each question token is a distribution over the visual tokens)
    and ``Q = softmax(cos(v, v) / vv_temp) / N`` with ``v = vision_features`` (CLIP features, default ``tokens``).
    Rows are L2-normalised with a norm floor of 1e-8. Masked visual tokens (``mask [B, N]``) and text tokens
    (``text_mask [B, T]``) give zero rows and columns and are not counted in ``N`` and ``T``.

    Args:
        tokens: ``[B, N, D]`` post-projector visual tokens; text: ``[B, T, D]`` question-token embeddings in the
            same (LLM) space; vision_features: optional ``[B, N, C]``.
    """
    if text.dim() != 3 or text.shape[-1] != tokens.shape[-1]:
        raise ValueError(f"text must have shape [B, T, D] with D = tokens width {tokens.shape[-1]} (LLM embedding "
                         f"space of the question tokens), got {tuple(text.shape)}")
    if text_mask is not None:
        text_mask = text_mask.to(device=text.device, dtype=torch.bool)
        if tuple(text_mask.shape) != tuple(text.shape[:2]):
            raise ValueError(f"text_mask must have shape [B, T] = {tuple(text.shape[:2])}, got "
                             f"{tuple(text_mask.shape)}")
    vis = tokens if vision_features is None else vision_features
    if vis.dim() != 3 or vis.shape[:2] != tokens.shape[:2]:
        raise ValueError(f"vision_features must have shape [B, N, C] with [B, N] = {tuple(tokens.shape[:2])}, got "
                         f"{tuple(vis.shape)}")
    p = softmax_affinity(text, tokens, tv_temp, query_mask=text_mask, key_mask=mask)
    q = softmax_affinity(vis, vis, vv_temp, query_mask=mask, key_mask=mask)
    return torch.cat([p, alpha * q], dim=1)


@register("mmtok", paper="MMTok: Multimodal Coverage Maximization for Efficient Inference of VLMs",
          venue="arXiv 2025", repo="https://github.com/Ironieser/MMTok", stage="pre_llm", kind="prune",
          signals=("text",), optional_signals=("text_mask", "vision_features"), parity=True, fixture="mmtok",
          signal_spec={"text": SignalSpec(note="the language model's input embeddings of the question keywords"),
                       "vision_features": SignalSpec(note="pre-projector CLIP features of the layer the projector "
                                                          "reads (LLaVA: -2), [CLS] excluded")},
          knob_ranges={"alpha": ">= 0", "tv_temp": "> 0", "vv_temp": "> 0"},
          main_knobs=("alpha",),
          knob_sources={
              "alpha": "official code: 0.5",
              "tv_temp": "official code: 0.02, the LLaVA selector (its Qwen runs use 0.01)",
              "vv_temp": "official code: 0.2",
              "exclude": "vtoken: None; the adapters mask padding instead (the official code excludes LLaVA-1.5's "
                         "padded patches)",
          })
def mmtok(tokens: Tensor, counts: Tensor, *, mask: Tensor | None = None, text: Tensor | None = None,
          text_mask: Tensor | None = None, vision_features: Tensor | None = None, alpha: float = 0.5,
          tv_temp: float = 0.02, vv_temp: float = 0.2, exclude: Tensor | None = None) -> Reduction:
    """Keep ``counts[b]`` tokens that greedily maximise the multimodal coverage (MMTok).

    The coverage matrix of :func:`coverage_matrix` (``[B, T + N, N]``: text->vision softmax similarities and
    ``alpha`` times vision->vision ones) defines the facility-location objective ``sum_r max_{j in S} C[r, j]``,
    maximised greedily (:func:`vtoken.ops.coverage.greedy_max_coverage`, O((T + N) * N) per step, batched).

    Args:
        tokens: ``[B, N, D]`` post-projector visual tokens.
        counts: ``[B]`` long, tokens kept per sample.
        mask: optional ``[B, N]`` bool, True on real tokens; padding is removed from the objective entirely.
        text: ``[B, T, D]`` embeddings of the question (keyword) tokens, same width as ``tokens``.
        text_mask: optional ``[B, T]`` bool, True on real text tokens.
        vision_features: optional ``[B, N, C]`` CLIP features for the vision->vision term (default ``tokens``).
        alpha: the weight of the vision->vision coverage block against the text->vision one (official default 0.5).
        tv_temp: the softmax temperature of the text->vision cosine similarities (official selector default 0.02).
            The official Qwen and InternVL setups use 0.01.
        vv_temp: the softmax temperature of the vision->vision cosine similarities (official default 0.2).
        exclude: optional ``[B, N]`` bool, True on tokens that are never selected but still have to be covered
            (the official ``padding_patch_indices``: padded image regions). A sample keeps at most its number of
            selectable tokens.

    Returns ``[B, K, D]`` tokens in source order; ``extras["order"]`` is ``[B, K]`` the selection order.
    """
    if text is None:
        raise ValueError("method 'mmtok' needs the signal 'text'")
    cover = coverage_matrix(tokens, text, vision_features, mask=mask, text_mask=text_mask, alpha=alpha,
                            tv_temp=tv_temp, vv_temp=vv_temp)
    candidates = mask
    if exclude is not None:
        if not isinstance(exclude, Tensor) or tuple(exclude.shape) != tuple(tokens.shape[:2]):
            raise ValueError(f"exclude must be a bool tensor of shape [B, N] = {tuple(tokens.shape[:2])}")
        keep_ok = ~exclude.to(device=tokens.device, dtype=torch.bool)
        candidates = keep_ok if candidates is None else candidates & keep_ok
        n_cand = candidates.sum(-1)
        if not bool((n_cand > 0).all()):
            raise ValueError("exclude leaves no selectable token in some sample")
        counts = counts.minimum(n_cand)
    order = greedy_max_coverage(cover, counts, candidates)
    return reduction_from_indices(tokens, order, extras={"order": order})
