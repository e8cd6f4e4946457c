"""DivPrune: greedy max-min diversity selection of visual tokens.

Alvar, Singh, Akbari, Zhang, "DivPrune: Diversity-based Visual Token Pruning for Large Multimodal Models",
CVPR 2025. Official code: https://github.com/vbdi/divprune (reimplemented from the paper, not copied).
"""

from __future__ import annotations

from torch import Tensor

from ..core import Reduction, reduction_from_indices
from ..ops.select import max_min_select
from ..ops.similarity import cosine_distance, float32
from .registry import register


@register("divprune", paper="DivPrune: Diversity-based Visual Token Pruning for Large Multimodal Models",
          venue="CVPR 2025", repo="https://github.com/vbdi/divprune", stage="pre_llm", kind="prune",
          parity=True, fixture="divprune")
def divprune(tokens: Tensor, counts: Tensor, *, mask: Tensor | None = None) -> Reduction:
    """Keep the ``counts[b]`` most mutually distant tokens (greedy max-min cosine-distance selection, DivPrune).

    Solves the max-min diversity problem greedily on the cosine distance ``1 - cos`` of ``tokens [B, N, D]`` (the
    post-projector LLM-space tokens in LLaVA): the first pick is the token with the largest nearest-neighbour
    distance, each next pick the token farthest from its nearest selected token (an incremental min-distance
    vector: O(N) per step, batched over ``B``). Ties break by lowest index; masked tokens are never selected.

    Note the official keep rule is ``round(ratio * N)`` with Python's banker's rounding; vtoken's ``keep`` ratio
    rounds half-up (pass an int ``keep`` for the official count).

    Returns ``[B, K, D]`` tokens in source order; ``extras["order"]`` is ``[B, K]`` the selection order (``-1``
    padded).
    """
    dist = cosine_distance(float32(tokens), eps=1e-12)
    order = max_min_select(dist, counts, mask)
    return reduction_from_indices(tokens, order, extras={"order": order})
