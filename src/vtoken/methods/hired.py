"""HiRED: keep the patches with the highest [CLS] attention of a late vision layer (single-image form).

Arif et al., "HiRED: Attention-Guided Token Dropping for Efficient Inference of High-Resolution Vision-Language
Models in Resource-Constrained Environments" (AAAI 2025), https://github.com/hasanar1f/HiRED.
"""

from __future__ import annotations

from torch import Tensor

from ..core import Reduction, reduction_from_indices, topk_indices
from ..ops.similarity import float32
from .registry import register


@register("hired", paper="HiRED: Attention-Guided Token Dropping for Efficient Inference of High-Resolution "
                         "Vision-Language Models in Resource-Constrained Environments",
          venue="AAAI 2025", repo="https://github.com/hasanar1f/HiRED", space="vision", stage="pre_llm", kind="prune",
          signals=("cls_attn",), parity=True, fixture="hired",
          signal_spec={"cls_attn": {"layer": 22, "ref_depth": 24, "source": "qk", "heads": "mean",
                                    "note": "per-head softmax(q k^T * head_dim**-0.5) of CLIP layer 22 (LLaVA-1.5), "
                                            "recomputed from hooked q_proj/k_proj; the official sum over heads "
                                            "ranks identically"}})
def hired(tokens: Tensor, counts: Tensor, *, mask: Tensor | None = None, cls_attn: Tensor | None = None) -> Reduction:
    """Keep the ``counts[b]`` patches with the highest [CLS] attention of one vision layer, in positional order.

    ``tokens [B, N, D]`` are the patch features, ``cls_attn [B, N]`` the head-mean CLS attention of the scoring layer
    (layer 22 of CLIP ViT-L in HiRED's LLaVA-1.5 variant). This is HiRED's token-dropping phase for one image; the
    official code keeps ``int(N * token_budget_rate)`` tokens (pass that count as ``keep``). The crop-level budget
    distribution of the high-resolution variant is not part of this function.

    Extras: ``order [B, K]`` kept indices in descending score order (``-1`` padded).
    """
    order = topk_indices(float32(cls_attn), counts, mask)
    return reduction_from_indices(tokens, order, extras={"order": order})
