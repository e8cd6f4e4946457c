"""AIM: per-frame bipartite token merging before the LLM (``aim_merge``) and progressive pruning by multimodal
importance inside it (``aim``).

Zhong et al. "AIM: Adaptive Inference of Multi-Modal LLMs via Token Merging and Pruning",
ICCV 2025. https://github.com/LaVi-Lab/AIM
The full method composes as ``vtoken.apply(model, [("aim_merge", {"keep": 0.25}), ("aim", {"keep": 1})])``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from ..core import Reduction, reduction_from_indices, topk_indices
from ..ops.matching import repeated_bipartite_merge
from ..ops.merge import MergeState
from ._schedule import at_depth, linear_counts, resolve_llm_keep, scale_layer
from .registry import LLMSchedule, SignalSpec, register
from .tome import finish, per_round_caps


@register("aim_merge", paper="AIM: Adaptive Inference of Multi-Modal LLMs via Token Merging and Pruning",
          venue="ICCV 2025", repo="https://github.com/LaVi-Lab/AIM", stage="video", kind="merge",
          optional_signals=("keys",), parity=True, fixture="aim_merge",
          knob_ranges={"r": ">= 1"},
          main_knobs=("r",),
          knob_sources={
              "r": "vtoken: None, unlimited per round so keep sets the count",
          })
def aim_merge(tokens: Tensor, counts: Tensor, *, mask: Tensor | None = None, keys: Tensor | None = None,
              r: int | Sequence[int] | None = None) -> Reduction:
    """AIM's pre-LLM merge: ToMe-style bipartite soft matching per frame, unweighted mean, nothing protected.

    Each batch row is one video frame (``tokens [F, T, C]``, the projected and pooled visual tokens of each frame;
    ``keep`` counts tokens per frame). A round alternates tokens into ``A``/``B``, matches every ``A`` token to its most
    cosine-similar ``B`` token (metric: ``keys [F, T, d]`` if given, else the tokens) and merges the ``r`` best edges
    by a plain average that includes the destination (no size weighting, so a destination already holding several
    patches weighs as one). Rounds repeat on the previous output in the official order ``[unmerged A (descending
    score), B]``, each merging ``min(T_current // 2, remaining)`` tokens: ``keep = T - T // 2 - T // 4`` (about 0.25)
    reproduces the official two-call schedule ``r = T // 2`` then ``T // 4``. ``r`` caps the merges per round (an int,
    or a per-round list such as ``[T // 2, T // 4]``; later rounds unlimited). A given metric is averaged along.

    Args:
        r: the most tokens merged per round, an int for every round or a per-round list (default None, unlimited).
            Rounds past the list are unlimited; ``keep`` sets the total.

    Returns a :class:`Reduction` (``assign [F, T]``, ``sizes [F, K]`` member counts); ``extras`` as ``tome``:
    per-round ``unm_idx``/``src_idx``/``dst_idx``/``r`` lists and ``order`` (official output order of the last round).
    """
    caps = per_round_caps(r)
    state = MergeState.start(tokens, mask, metric=keys)
    counts = torch.minimum(counts, state.n)
    rounds = repeated_bipartite_merge(state, counts, protected=0, weighted=False, sort_unmerged=False, caps=caps)
    return finish(state, tokens, dict(rounds))


def _bounds(depth: int, start: int, end: int, ref_depth: int) -> tuple[int, int]:
    lo = scale_layer("start", start, depth, ref_depth, "aim", lo=0, hi=depth - 2)
    if isinstance(end, bool) or not isinstance(end, int):
        raise TypeError(f"aim: end must be an int decoder layer index, got {end!r}")
    hi = at_depth(end, depth, ref_depth, "aim")
    if hi <= lo:
        raise ValueError(f"aim: end={end} gives layer {hi} at depth {depth}, not after start (layer {lo}); the "
                         "schedule needs start < end")
    return lo, hi


def _aim_layers(depth: int, start: int = 14, end: int = 22, ref_depth: int = 28) -> list[int]:
    lo, hi = _bounds(depth, start, end, ref_depth)
    return list(range(lo + 1, min(hi, depth - 1) + 1))


def _aim_counts(n: Tensor, keep: int | float, images: Tensor, depth: int, *, start: int, end: int,
                ref_depth: int) -> list[Tensor]:
    lo, hi = _bounds(depth, start, end, ref_depth)
    floor = resolve_llm_keep(keep, n, images)
    return linear_counts(n, lo, hi, _aim_layers(depth, start, end, ref_depth), floor)


@register("aim", paper="AIM: Adaptive Inference of Multi-Modal LLMs via Token Merging and Pruning",
          venue="ICCV 2025", repo="https://github.com/LaVi-Lab/AIM", stage="llm", kind="prune",
          signals=("llm_attn_rank",), signal_spec={"llm_attn_rank": SignalSpec(temperature=0.1, iters=5)},
          schedule=LLMSchedule(_aim_layers, _aim_counts),
          knob_ranges={"ref_depth": ">= 1"},
          main_knobs=("start", "end"),
          knob_sources={
              "start": "paper: 14 of Qwen2-7B's 28 layers, scaled by depth (the official LLaMA-32 runs use 13)",
              "end": "paper: 22 of Qwen2-7B's 28 layers, scaled by depth (the official LLaMA-32 runs use 21)",
              "ref_depth": "paper: Qwen2-7B's 28 decoder layers",
          })
def aim(tokens: Tensor, counts: Tensor, *, mask: Tensor | None = None,
        llm_attn_rank: Tensor | None = None) -> Reduction:
    """One step of AIM's progressive in-LLM pruning: keep the ``counts[b]`` visual tokens of highest multimodal
    importance.

    Args:
        tokens: ``[B, N, D]`` hidden states of the visual tokens entering a pruning layer ``K``.
        counts: ``[B]`` long, visual tokens kept per sample at this layer (from the schedule below).
        mask: optional ``[B, N]`` bool, True on real visual tokens.
        llm_attn_rank: ``[B, N]`` importance from layer ``K - 1``'s attention over the WHOLE sequence (text and
            visual tokens): per head, 5 power steps of a uniform distribution through ``softmax(logits / 0.1)``
            (causal), heads combined by root mean square (the official ``get_importance``). Text tokens are never
            pruned (AIM protects them).
        start, end: the decoder layers where the linear pruning schedule starts and ends (official 14 and 22 of
            Qwen2-7B's 28 layers), given for ``ref_depth`` and scaled to the model. Layers up to ``start`` see every
            visual token, layer ``K`` sees ``floor(n * (end - K) / (end - start))`` of the ``n`` entering the
            language model (the official ``retain_rate`` of layer ``K - 1``: 7/8 at layer 15, ..., 1/8 at 21, none
            from 22).
        ref_depth: the depth ``start`` and ``end`` are given for (default 28, Qwen2-7B's decoder layers).

    ``keep`` is the schedule's floor: no layer keeps fewer than ``keep`` visual tokens (an int per image, or a ratio
    of ``n``), so ``keep=1.0`` is the identity and ``keep=1`` (one per image) is closest to the official schedule,
    which removes every visual token from layer ``end`` on. Deviations: the official code only masks pruned tokens
    as keys (they stay as query rows and as PageRank mass, and keep their compute); here they leave the sequence, so
    from the second pruning on the importance is the PageRank over the tokens still present (identical at the first
    pruning). Ties break by lowest index (official: unstable sort). Returns ``[B, K, D]`` in source order.
    """
    assert llm_attn_rank is not None
    return reduction_from_indices(tokens, topk_indices(llm_attn_rank.float(), counts, mask))
