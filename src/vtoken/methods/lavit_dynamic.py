"""LaVIT-style dynamic token count: keep the tokens whose score passes a threshold, merge the rest into them.

Jin et al. "Unified Language-Vision Pretraining in LLM with Dynamic Discrete Visual Tokenization", ICLR 2024.
https://github.com/jy0205/LaVIT
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ..core import Reduction, reduction_from_merge
from ..ops.merge import merge_rows, slot_sizes
from ..ops.similarity import cosine_similarity, float32, l2_normalize
from .registry import register

SCORES = ("auto", "cls_attn", "distinct", "norm")


def distinctiveness(tokens: Tensor, mask: Tensor | None = None) -> Tensor:
    """``[B, N]`` float32: ``1 - `` mean cosine similarity of each token to the other real tokens (in ``[0, 2]``).

    High for tokens unlike the rest of the image (objects, details), low for redundant ones (flat background).
    """
    xn = l2_normalize(float32(tokens), 1e-12)
    b, n = xn.shape[:2]
    real = torch.ones(b, n, dtype=torch.bool, device=xn.device) if mask is None else mask
    r = real.to(xn.dtype)
    # sum_j r_j cos(i, j) = x_i . sum_j r_j x_j: O(N D), no N x N matrix
    total = (xn @ (xn * r[..., None]).sum(1)[..., None])[..., 0] - (xn * xn).sum(-1) * r
    return 1.0 - total / (r.sum(-1, keepdim=True) - 1.0).clamp_min(1.0)


@register("lavit_dynamic",
          paper="Unified Language-Vision Pretraining in LLM with Dynamic Discrete Visual Tokenization",
          venue="ICLR 2024", repo="https://github.com/jy0205/LaVIT", stage="pre_llm", kind="merge",
          optional_signals=("cls_attn", "sizes"), exact=False,
          knob_ranges={"score": SCORES, "threshold": ">= 0"},
          main_knobs=("threshold",),
          knob_sources={
              "score": "vtoken: LaVIT's selector is learned; 'auto' picks the training-free score the signals allow",
              "threshold": "vtoken: above-average tokens (no training-free threshold in the paper)",
          })
def lavit_dynamic(tokens: Tensor, counts: Tensor, *, mask: Tensor | None = None, cls_attn: Tensor | None = None,
                  sizes: Tensor | None = None, score: str = "auto", threshold: float = 1.0) -> Reduction:
    """LaVIT's dynamic visual tokenizer, training-free: an image keeps as many tokens as its content needs.

    LaVIT learns a token selector (a keep/drop decision per patch) and a token merger that folds the dropped patches
    into the kept ones. Training-free substitute used here: a per-token importance ``score`` replaces the learned
    selector, and each dropped token is averaged into its most cosine-similar kept token (size-weighted; ``sizes``
    ``[B, N]`` optional) instead of the learned cross-attention merger.

    A token is kept when its score is at least ``threshold`` times the mean score of the sample's real tokens
    (``threshold=1``: above-average tokens), so the count adapts per image; at most ``counts[b]`` (the resolved
    ``keep``, a cap: the highest scores win, ties to the lowest index) and at least one token are kept. ``keep >= N``
    returns every token (library invariant), so pass the largest count you can afford as ``keep``.

    Scores (``score``): ``"cls_attn"`` the ``cls_attn [B, N]`` signal; ``"distinct"`` one minus the mean cosine
    similarity to the other tokens (see :func:`distinctiveness`); ``"norm"`` the token L2 norm; ``"auto"`` uses
    ``cls_attn`` when given, else ``"distinct"``. Scores must be non-negative.

    Args:
        score: the per-token importance that replaces LaVIT's learned selector, ``"auto"`` (default), ``"cls_attn"``,
            ``"distinct"`` or ``"norm"``. ``"auto"`` is ``cls_attn`` when that signal is given, else ``"distinct"``.
        threshold: a token is kept when its score is at least ``threshold`` times the sample's mean score (default
            1.0, above-average tokens). Higher values keep fewer tokens; ``keep`` caps the count.

    Returns a :class:`Reduction` with per-sample counts (padded; ``mask``), ``assign [B, N]`` and ``sizes``;
    ``extras["scores"] [B, N]`` (float32) and ``extras["kept"] [B, N]`` bool.
    """
    if score not in SCORES:
        raise ValueError(f"lavit_dynamic: score must be one of {SCORES}, got {score!r}")
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not math.isfinite(threshold) \
            or threshold < 0:
        raise ValueError(f"lavit_dynamic: threshold must be a finite float >= 0, got {threshold!r}")
    if score == "auto":
        score = "cls_attn" if cls_attn is not None else "distinct"
    if score == "cls_attn" and cls_attn is None:
        raise ValueError("method 'lavit_dynamic' with score='cls_attn' needs the signal 'cls_attn'")
    b, n = tokens.shape[:2]
    dev = tokens.device
    real = torch.ones(b, n, dtype=torch.bool, device=dev) if mask is None else mask
    x = float32(tokens)
    if score == "cls_attn":
        s = float32(cls_attn)
    elif score == "norm":
        s = x.norm(dim=-1)
    else:
        s = distinctiveness(x, mask)
    r = real.to(s.dtype)
    mean = (s * r).sum(-1, keepdim=True) / r.sum(-1, keepdim=True)
    order = torch.sort(s.masked_fill(~real, float("-inf")), dim=1, descending=True, stable=True).indices
    rank = torch.argsort(order, dim=1)
    kept = real & (rank < counts[:, None]) & ((s >= threshold * mean) | (rank == 0))

    # the kept set is a prefix of the score order: compare every token with the kept ones only (O(N K D)), in
    # ascending index order so that ties go to the lowest index
    kmax = int(kept.sum(-1).max())
    kept_idx = torch.sort(torch.where(kept.gather(1, order[:, :kmax]), order[:, :kmax], n), dim=1).values
    kept_ok = kept_idx < n
    sim = cosine_similarity(x, x.gather(1, kept_idx.clamp(max=n - 1)[..., None].expand(b, kmax, x.shape[-1])),
                            eps=1e-12).masked_fill(~kept_ok[:, None, :], float("-inf"))
    nearest = kept_idx.gather(1, sim.argmax(dim=-1))
    ar = torch.arange(n, device=dev).expand(b, n)
    dest = torch.where(kept, ar, torch.where(real, nearest, -1))
    w = None if sizes is None else float32(sizes)
    out = merge_rows(x, dest, n, w, "mean").to(tokens.dtype)
    new_sizes = slot_sizes(dest, n, w)
    extras = {"scores": s, "kept": kept}
    return reduction_from_merge(out, ar, dest, new_sizes, kept, extras)
