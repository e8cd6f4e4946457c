"""ToMe: bipartite soft matching with size-weighted merging.

Bolya, Fu, Dai, Zhang, Feichtenhofer, Hoffman. "Token Merging: Your ViT But Faster", ICLR 2023.
https://github.com/facebookresearch/ToMe
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from ..core import Reduction, reduction_from_merge
from ..ops.matching import repeated_bipartite_merge
from ..ops.merge import MergeState
from .registry import SignalSpec, register


def per_round_caps(r: int | Sequence[int] | None, name: str = "r") -> int | list[int] | None:
    """Validate a per-round merge cap: ``None``, an int ``>= 1`` or a sequence of such ints."""
    if r is None:
        return None
    if isinstance(r, bool):
        raise TypeError(f"{name} must be an int >= 1 or a sequence of ints, got {r!r}")
    if isinstance(r, int):
        if r < 1:
            raise ValueError(f"{name} must be >= 1 (tokens merged per round), got {r}")
        return r
    if isinstance(r, Sequence) and not isinstance(r, str):
        caps = [int(v) for v in r]
        if not caps or any(v < 1 for v in caps):
            raise ValueError(f"{name} must be a non-empty sequence of ints >= 1, got {list(r)!r}")
        return caps
    raise TypeError(f"{name} must be an int >= 1 or a sequence of ints, got {type(r).__name__}")


def finish(state: MergeState, tokens: Tensor, extras: dict) -> Reduction:
    """Build the :class:`Reduction` from a merge state; ``extras["order"]`` keeps the official output order."""
    real = state.real()
    extras["order"] = torch.where(real, state.rep, -1)
    out = state.x.to(tokens.dtype)
    return reduction_from_merge(out, state.rep.clamp(min=0), state.assign, state.sizes, real, extras)


@register("tome", paper="Token Merging: Your ViT But Faster", venue="ICLR 2023",
          repo="https://github.com/facebookresearch/ToMe", space="vision", stage="encoder", kind="merge",
          optional_signals=("keys", "sizes"), parity=True, fixture="tome",
          encoder_schedule={"layers": "all", "schedule": "constant"},
          signal_spec={"sizes": SignalSpec(proportional_attention=True)},
          knob_ranges={"r": ">= 1"},
          knob_rules=[("distill_token=True needs class_token=True (DeiT layout [CLS, DIST, patches])",
                       lambda distill_token, class_token: class_token or not distill_token)],
          main_knobs=("r",),
          knob_sources={
              "class_token": "vtoken: tokens without a CLS row (official class_token); the ViT adapter passes True",
              "distill_token": "official code: False (DeiT's distillation token off)",
              "r": "vtoken: None, unlimited per round so keep sets the count; the official code takes r per layer",
          })
def tome(tokens: Tensor, counts: Tensor, *, mask: Tensor | None = None, keys: Tensor | None = None,
         sizes: Tensor | None = None, class_token: bool = False, distill_token: bool = False,
         r: int | Sequence[int] | None = None) -> Reduction:
    """ToMe bipartite soft matching: merge the most similar even/odd token pairs by size-weighted average.

    One round alternates the real tokens into ``A`` (even) and ``B`` (odd), finds each ``A`` token's most cosine-similar
    ``B`` token under the metric (``keys [B, N, d]``, the head-averaged attention keys ToMe uses; the tokens when
    omitted), and merges the ``r`` best ``A`` tokens into their partners: ``x = sum(size * x) / sum(size)``,
    ``size = sum(size)``. ``keep`` maps to ``r = N - keep``. One round merges at most ``(N - protected) // 2`` tokens
    (the ``A`` set), so a smaller ``keep`` runs several rounds, each on the previous round's output in the official
    order ``[unmerged A, B]`` (as chained ToMe layers see it), with the metric merged by the same size-weighted
    average. ``r`` caps the merges per round (an int for every round, or a per-round list, e.g. a layer schedule;
    rounds past the list are unlimited).

    Args:
        tokens: ``[B, N, D]``; with ``class_token`` token 0 is the CLS token (``distill_token``: token 1 is DeiT's
            distillation token and ``class_token`` is required).
        counts: ``[B]`` tokens to keep (protected tokens count). Raised to ``protected + 1`` where smaller (the last
            mergeable token has no partner left).
        mask: ``[B, N]``; padding is never merged and the alternation runs over each sample's real tokens.
        keys: optional ``[B, N, d]`` matching metric.
        sizes: optional ``[B, N]`` tokens already represented by each token (ToMe's ``size``; ones when omitted).
        class_token: treat token 0 as the CLS token, never merged and kept first (default False, as the official
            ``class_token``).
        distill_token: treat token 1 as DeiT's distillation token, never merged (default False, needs
            ``class_token``).
        r: the most tokens merged per round, an int for every round or a per-round list (default None, unlimited).
            Rounds past the list are unlimited; ``keep`` sets the total.

    Returns a :class:`Reduction` with ``sizes [B, K]`` and ``assign [B, N]`` (source tracking: ``source_matrix``/
    ``unmerge`` in :mod:`vtoken.ops.merge`). ``extras``: per-round lists ``unm_idx``, ``src_idx``, ``dst_idx``
    (official index conventions, ``-1`` padded), ``r`` (``[B]`` merges), and ``order`` ``[B, K]``: the source index
    of each output in the official output order of the last round.
    """
    if distill_token and not class_token:
        raise ValueError("tome: distill_token=True needs class_token=True (DeiT layout [CLS, DIST, patches])")
    caps = per_round_caps(r)
    protected = int(class_token) + int(distill_token)
    state = MergeState.start(tokens, mask, sizes=sizes, metric=keys)
    counts = torch.minimum(counts.clamp(min=protected + 1), state.n)
    rounds = repeated_bipartite_merge(state, counts, protected=protected, weighted=True, sort_unmerged=class_token,
                                      distill=distill_token, caps=caps)
    return finish(state, tokens, dict(rounds))
