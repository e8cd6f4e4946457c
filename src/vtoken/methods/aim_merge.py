"""AIM, merge stage: per-frame bipartite token merging with an unweighted mean before the LLM.

Zhong et al. "AIM: Adaptive Inference of Multi-Modal LLMs via Token Merging and Pruning",
ICCV 2025. https://github.com/LaVi-Lab/AIM
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from ..core import Reduction
from ..ops.matching import repeated_bipartite_merge
from ..ops.merge import MergeState
from .registry import register
from .tome import finish, per_round_caps


@register("aim_merge", paper="AIM: Adaptive Inference of Multi-Modal LLMs via Token Merging and Pruning",
          venue="ICCV 2025", repo="https://github.com/LaVi-Lab/AIM", stage="video", kind="merge",
          optional_signals=("keys",), parity=True, fixture="aim_merge")
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

    Returns a :class:`Reduction` (``assign [F, T]``, ``sizes [F, K]`` member counts); ``extras`` as ``tome``:
    per-round ``unm_idx``/``src_idx``/``dst_idx``/``r`` lists and ``order`` (official output order of the last round).
    """
    caps = per_round_caps(r)
    state = MergeState.start(tokens, mask, metric=keys)
    counts = torch.minimum(counts, state.n)
    rounds = repeated_bipartite_merge(state, counts, protected=0, weighted=False, sort_unmerged=False, caps=caps)
    return finish(state, tokens, dict(rounds))
