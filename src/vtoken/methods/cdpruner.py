"""CDPruner: conditional-DPP visual token selection (instruction relevance x token diversity).

Zhang et al., "Beyond Attention or Similarity: Maximizing Conditional Diversity for Token Pruning in MLLMs",
arXiv 2506.10967 (2025). Official code: https://github.com/Theia-4869/CDPruner (reimplemented, not copied).
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..core import Reduction, reduction_from_indices
from ..ops.dpp import conditional_kernel, greedy_map, greedy_map_rows
from ..ops.similarity import float32, l2_normalize
from .registry import SignalSpec, register

_NORM_EPS = 1e-12  # only changes all-zero rows (plain division, as the official code does, would give NaN)


def instruction_relevance(vision_features: Tensor, text: Tensor, *, text_mask: Tensor | None = None,
                          mask: Tensor | None = None, norm: str = "sample") -> Tensor:
    """CDPruner's relevance of each visual token to the instruction: ``[B, N]`` in about ``(0, 1]``.

    ``rel = -mean_t cos(vision_features[n], text[t])`` (the released code negates the similarity: tokens less
    similar to the instruction in CLIP space score higher), then min-max normalised as
    ``(rel - min + 1e-6) / (max - min)``.

    Args:
        vision_features: ``[B, N, E]`` CLIP patch embeddings in the joint image-text space.
        text: ``[B, T, E]`` CLIP text embeddings of the instruction (one row per 77-token chunk).
        text_mask: optional ``[B, T]`` bool, True on real text rows (the mean runs over those).
        mask: optional ``[B, N]`` bool, True on real tokens (min/max run over those; others get 0). Where every
            token has the same relevance (``max == min``, a division by zero in the official code) it is 1.
        norm: ``"sample"`` (min/max per sample, so a sample scores the same alone or in a batch) or ``"batch"``
            (min/max over every real token of the batch, as the official code does over the images of one prompt).
    """
    if norm not in ("sample", "batch"):
        raise ValueError(f"relevance_norm must be 'sample' or 'batch', got {norm!r}")
    if text.dim() != 3 or text.shape[-1] != vision_features.shape[-1]:
        raise ValueError(f"text must have shape [B, T, E] with E = vision_features width {vision_features.shape[-1]}"
                         f" (CLIP joint space), got {tuple(text.shape)}")
    sim = -(l2_normalize(float32(vision_features), _NORM_EPS) @ l2_normalize(float32(text), _NORM_EPS).transpose(1, 2))
    if text_mask is None:
        rel = sim.mean(dim=-1)
    else:
        tm = text_mask.to(device=sim.device, dtype=torch.bool)
        if not bool(tm.any(-1).all()):
            raise ValueError("text_mask must mark at least one real text token in every sample")
        rel = sim.masked_fill(~tm[:, None, :], 0.0).sum(-1) / tm.sum(-1, keepdim=True).to(sim.dtype)
    valid = torch.ones_like(rel, dtype=torch.bool) if mask is None else mask
    dims = (0, 1) if norm == "batch" else (1,)
    lo = rel.masked_fill(~valid, float("inf")).amin(dim=dims, keepdim=True)
    hi = rel.masked_fill(~valid, float("-inf")).amax(dim=dims, keepdim=True)
    span = hi - lo
    rel = torch.where(span > 0, (rel - lo + 1e-6) / torch.where(span > 0, span, 1.0), 1.0)  # all equal -> 1
    return torch.where(valid, rel, 0.0)


@register("cdpruner", paper="Beyond Attention or Similarity: Maximizing Conditional Diversity for Token Pruning in "
          "MLLMs", venue="arXiv 2025", repo="https://github.com/Theia-4869/CDPruner", stage="pre_llm", kind="prune",
          signals=("vision_features", "text"), optional_signals=("text_mask",), parity=True, fixture="cdpruner",
          signal_spec={"vision_features": SignalSpec(space="clip_joint", note="CLIP's patch embeddings: "
                                                     "post_layernorm + visual_projection of the patch tokens"),
                       "text": SignalSpec(space="clip_joint", note="CLIP's text embeddings of the instruction, one "
                                                                   "row per 77-token chunk")},
          knob_ranges={"relevance_norm": ("sample", "batch")},
          signal_shapes={"text": "B T C"},
          knob_sources={
              "relevance_norm": "vtoken: per sample, so a batch equals each sample alone (invariant 3); the "
                                "official code normalises over the whole batch ('batch')",
          })  # text in the CLIP joint space of vision_features
def cdpruner(tokens: Tensor, counts: Tensor, *, mask: Tensor | None = None, vision_features: Tensor | None = None,
             text: Tensor | None = None, text_mask: Tensor | None = None,
             relevance_norm: str = "sample") -> Reduction:
    """Keep ``counts[b]`` tokens maximising the conditional DPP ``det(L_S)`` by fast greedy MAP (CDPruner).

    The kernel is ``L = diag(r) S diag(r)``: ``S [B, N, N]`` the cosine similarity of the post-projector ``tokens
    [B, N, D]`` (diversity) and ``r [B, N]`` the instruction relevance of :func:`instruction_relevance`, computed
    from ``vision_features [B, N, E]`` (CLIP patch embeddings in the joint space) against ``text [B, T, E]`` (CLIP
    text embeddings). ``E`` may differ from ``D``: the text is only compared with ``vision_features``. Greedy MAP
    uses rank-one Cholesky updates (O(i * N) per step), batched over ``B``; when ``K <= N / 16`` it computes only the
    ``K`` kernel rows it picks (O(K N D)) instead of the ``N x N`` kernel. As in the released code, relevance is
    the min-max normalised NEGATED mean CLIP similarity and the paper's ``theta`` re-weighting is not applied.

    ``relevance_norm="sample"`` (default) normalises each sample on its own; ``"batch"`` reproduces the official
    batch-global min/max (images of one prompt then influence each other).

    Args:
        relevance_norm: where the relevance's min-max normalisation runs, ``"sample"`` (per sample, default) or
            ``"batch"`` (over the whole batch, as the official code).

    Returns ``[B, K, D]`` tokens in source order; ``extras``: ``"order"`` ``[B, K]`` selection order (``-1``
    padded), ``"relevance"`` ``[B, N]``.
    """
    if vision_features is None or text is None:
        raise ValueError("method 'cdpruner' needs the signals 'vision_features' and 'text'")
    rel = instruction_relevance(vision_features, text, text_mask=text_mask, mask=mask, norm=relevance_norm)
    xn = l2_normalize(float32(tokens), _NORM_EPS)
    q = rel if mask is None else rel * mask.to(rel.dtype)
    n, k = xn.shape[1], int(counts.max())
    if 16 * k > n:  # most rows are needed: one N x N product (compute-bound) beats K matrix-vector passes
        order = greedy_map(conditional_kernel(xn @ xn.transpose(1, 2), q, mask), counts, mask)
    else:
        ar = torch.arange(xn.shape[0], device=xn.device)

        def kernel_row(j: Tensor) -> Tensor:  # L[j, :] = r_j cos(x_j, x) r: only the K rows the greedy reads
            return q[ar, j][:, None] * (xn @ xn[ar, j][:, :, None])[..., 0] * q

        order = greedy_map_rows(q * q * (xn * xn).sum(-1), kernel_row, counts, mask)
    return reduction_from_indices(tokens, order, extras={"order": order, "relevance": rel})
