"""FastV: after layer K, keep the visual tokens the last token attends to most.

Chen et al., "An Image is Worth 1/2 Tokens After Layer 2: Plug-and-Play Inference Acceleration for Large
Vision-Language Models", ECCV 2024. https://github.com/pkunlp-icler/FastV
"""

from __future__ import annotations

from torch import Tensor

from ..core import Reduction, reduction_from_indices, topk_indices
from ._schedule import one_layer
from .registry import register


@register("fastv", paper="An Image is Worth 1/2 Tokens After Layer 2: Plug-and-Play Inference Acceleration for Large "
          "Vision-Language Models", venue="ECCV 2024", repo="https://github.com/pkunlp-icler/FastV", stage="llm",
          kind="prune", signals=("llm_attn",), schedule=one_layer("fastv", default=2),
          main_knobs=("layer",),
          knob_sources={
              "layer": "official scripts: K = 2 in the eval scripts (the demo uses 3)",
          })
def fastv(tokens: Tensor, counts: Tensor, *, mask: Tensor | None = None, llm_attn: Tensor | None = None) -> Reduction:
    """Keep the ``counts[b]`` visual tokens with the largest attention from the last prompt token (FastV).

    Args:
        tokens: ``[B, N, D]`` hidden states of the visual tokens entering decoder layer ``layer``.
        counts: ``[B]`` long, tokens kept per sample.
        mask: optional ``[B, N]`` bool, True on real tokens.
        llm_attn: ``[B, N]`` the last token's attention probabilities to each visual token in layer ``layer - 1``
            (averaged over heads, softmax over the whole sequence), as FastV reads the previous layer's attention map.
        layer: ``K``, the first decoder layer that sees only the kept tokens (paper default 2). Layers ``< K`` keep
            every token (a schedule knob: ``vtoken.apply`` places the step); ``keep`` is the paper's ``1 - R``
            (``keep=0.5`` is its R = 50%).

    Ties break by lowest index. Returns ``[B, K, D]`` in source order.
    """
    assert llm_attn is not None
    return reduction_from_indices(tokens, topk_indices(llm_attn.float(), counts, mask))

