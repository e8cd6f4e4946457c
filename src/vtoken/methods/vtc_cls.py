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
                                                           "slices [start_layer:end_layer]")},
          main_knobs=("start_layer",),
          knob_sources={
              "start_layer": "official scripts: --layer 16 of CLIP-L's 24 layers (model_vqa_loader.py), i.e. 2L/3 "
                             "at any depth",
              "end_layer": "official code: attentions[start_layer:-1], the last layer excluded",
          })
def vtc_cls(tokens: Tensor, counts: Tensor, *, mask: Tensor | None = None, cls_attn_layers: Tensor | None = None,
            start_layer: int | None = None, end_layer: int | None = -1) -> Reduction:
    """Keep the ``counts[b]`` patches with the highest [CLS] attention summed over a range of vision layers.

    ``tokens [B, N, D]`` are the patch features (CLS removed); ``cls_attn_layers [B, L, N]`` holds the head-mean CLS
    attention of every vision layer, shallow to deep. The score of a patch is the sum of its per-layer scores over
    ``cls_attn_layers[:, start_layer:end_layer]``; the official code uses ``attentions[start_layer:-1]``, i.e. the
    last layer is excluded (``end_layer=-1``; ``None`` includes it). The default ``start_layer=None`` is ``2L // 3``:
    layers 16..22 of LLaVA-1.5's 24-layer CLIP ViT-L, as the official eval scripts' ``--layer 16``, and the same
    share of any other tower (at most the last layer the slice reaches, so a shallow tower still sums one layer).
    Output tokens are in positional order.

    Args:
        start_layer: the first layer of ``cls_attn_layers`` whose CLS attention is summed (default None: ``2L // 3``,
            layer 16 of LLaVA-1.5's 24-layer CLIP). A Python slice start, so negative values count from the end.
        end_layer: the slice end of the summed layers, exclusive (default -1: the last layer is excluded, as the
            official code). ``None`` includes the last layer.

    Extras: ``order [B, K]`` kept indices in descending score order (``-1`` padded), ``scores [B, N]`` the summed
    attention.
    """
    a = float32(cls_attn_layers)
    if a.dim() != 3:
        raise ValueError(f"cls_attn_layers must have shape [B, L, N], got {tuple(a.shape)}")
    depth = a.shape[1]
    start = min(2 * depth // 3, max(len(range(depth)[:end_layer]) - 1, 0)) if start_layer is None else start_layer
    sel = a[:, start:end_layer]
    if sel.shape[1] == 0:
        raise ValueError(f"vtc_cls: start_layer={start}, end_layer={end_layer} select no layer of the L = {a.shape[1]} "
                         "layers in cls_attn_layers")
    scores = sel.sum(1)
    order = topk_indices(scores, counts, mask)
    return reduction_from_indices(tokens, order, extras={"order": order, "scores": scores})

