"""VTC-CLS: keep the patches the vision encoder's [CLS] token attends to most, ensembled over layers.

Wang et al., "[CLS] Token Tells Everything Needed for Training-free Efficient MLLMs" (arXiv 2412.05819, 2024),
https://github.com/THU-MIG/VTC-CLS.
"""

from __future__ import annotations

from torch import Tensor

from ..core import Reduction, reduction_from_indices, topk_indices
from ..ops.similarity import float32
from .registry import SignalSpec, register


@register("vtc_cls", paper="[CLS] Token Tells Everything Needed for Training-free Efficient MLLMs",
          venue="arXiv 2024 (2412.05819)", repo="https://github.com/THU-MIG/VTC-CLS",
          space="vision", stage="pre_llm", kind="prune",
          signals=("cls_attn_layers",), parity=True, fixture="vtc_cls",
          signal_spec={"cls_attn_layers": SignalSpec(layers="all", heads="mean",
                                                      note="every vision layer, shallow to deep; the method "
                                                           "slices [start_layer:end_layer]")})
def vtc_cls(tokens: Tensor, counts: Tensor, *, mask: Tensor | None = None, cls_attn_layers: Tensor | None = None,
            start_layer: int | None = None, end_layer: int | None = -1) -> Reduction:
    """Keep the ``counts[b]`` patches with the highest [CLS] attention summed over a range of vision layers.

    ``tokens [B, N, D]`` are the patch features (CLS removed); ``cls_attn_layers [B, L, N]`` holds the head-mean CLS
    attention of every vision layer, shallow to deep. The score of a patch is the sum of its per-layer scores over
    ``cls_attn_layers[:, start_layer:end_layer]``; the official code uses ``attentions[start_layer:-1]``, i.e. the
    last layer is excluded (``end_layer=-1``; ``None`` includes it). The default ``start_layer=None`` is ``L // 2``:
    layers 12..22 of LLaVA-1.5's 24-layer CLIP ViT-L (the official code reads the start from the model config), and
    the second half of any other tower. Output tokens are in positional order.

    Args:
        start_layer: the first layer of ``cls_attn_layers`` whose CLS attention is summed (default None: ``L // 2``,
            layer 12 of LLaVA-1.5's 24-layer CLIP). A Python slice start, so negative values count from the end.
        end_layer: the slice end of the summed layers, exclusive (default -1: the last layer is excluded, as the
            official code). ``None`` includes the last layer.

    Extras: ``order [B, K]`` kept indices in descending score order (``-1`` padded), ``scores [B, N]`` the summed
    attention.
    """
    a = float32(cls_attn_layers)
    if a.dim() != 3:
        raise ValueError(f"cls_attn_layers must have shape [B, L, N], got {tuple(a.shape)}")
    start = a.shape[1] // 2 if start_layer is None else start_layer
    sel = a[:, start:end_layer]
    if sel.shape[1] == 0:
        raise ValueError(f"vtc_cls: start_layer={start}, end_layer={end_layer} select no layer of the L = {a.shape[1]} "
                         "layers in cls_attn_layers")
    scores = sel.sum(1)
    order = topk_indices(scores, counts, mask)
    return reduction_from_indices(tokens, order, extras={"order": order, "scores": scores})

