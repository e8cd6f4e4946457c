"""EViT: keep the attentive tokens, fuse the inattentive ones into one token.

Liang et al., "Not All Patches are What You Need: Expediting Vision Transformers via Token Reorganizations"
(ICLR 2022), https://github.com/youweiliang/evit.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..core import Reduction, reduction_from_merge, topk_indices
from ..ops.similarity import float32
from .registry import SignalSpec, register


@register("evit", paper="Not All Patches are What You Need: Expediting Vision Transformers via Token Reorganizations",
          venue="ICLR 2022", repo="https://github.com/youweiliang/evit", space="vision", stage="encoder", kind="merge",
          signals=("cls_attn",), parity=True, fixture="evit",
          encoder_schedule={"layers": [0.25, 0.5, 0.75], "schedule": "geometric"},
          signal_spec={"cls_attn": SignalSpec(layer="same", heads="mean",
                                    note="the CLS row of the reorganising block's own attention, per-head "
                                            "softmax(q k^T * head_dim**-0.5), head mean; with class_token=True it "
                                            "spans all N tokens (column 0 = CLS->CLS, ignored)")},
          main_knobs=("fuse_token",),
          knob_sources={
              "fuse_token": "official scripts: the released DeiT runs pass --fuse_token (the code's own default is "
                            "off)",
              "class_token": "vtoken: tokens without a CLS row; the ViT adapter passes True for its CLS token",
          })
def evit(tokens: Tensor, counts: Tensor, *, mask: Tensor | None = None, cls_attn: Tensor | None = None,
         fuse_token: bool = True, class_token: bool = False) -> Reduction:
    """Keep the patches with the highest [CLS] attention and fuse the rest into one attention-weighted token.

    ``tokens [B, N, D]``; ``cls_attn [B, N]`` the head-mean attention of the CLS query to every token. By default
    (``class_token=False``, as ToMe/MCTF in vtoken) the tokens are patches only and ``cls_attn`` excludes the CLS
    column. With ``class_token=True`` (EViT inside a ViT) token 0 is the CLS token: it is always kept and never fused,
    and ``cls_attn[:, 0]`` is ignored.

    ``counts[b]`` output tokens include the CLS token (if any) and, with ``fuse_token``, the fused token
    ``sum_j cls_attn_j * x_j`` over the dropped patches (the paper's unnormalised attention-weighted sum; its index is
    the smallest dropped index). The paper's ``keep_rate`` keeps ``ceil(keep_rate * (N - 1))`` patches of a ViT
    sequence of ``N`` tokens with its CLS, i.e. ``keep = 1 + ceil(keep_rate * (N - 1)) + fuse_token``. A sample that
    keeps all its tokens gets no fused token. Token 0 must be a real token when ``class_token`` is set.

    Args:
        fuse_token: fuse the dropped patches into one extra attention-weighted token (default True, EViT's fused
            inattentive token). Without it the dropped patches are discarded.
        class_token: treat token 0 as the CLS token, always kept and never fused (default False, patches only).

    Extras: ``order [B, K]`` output indices in the official emission order (CLS, kept patches by descending
    attention, fused token; ``-1`` padded).
    """
    b, n = tokens.shape[:2]
    dev = tokens.device
    ar = torch.arange(n, device=dev)
    valid = torch.ones(b, n, dtype=torch.bool, device=dev) if mask is None else mask
    n_valid = valid.sum(-1)
    cls = 1 if class_token else 0
    fuse = (counts > cls) & (counts < n_valid) if fuse_token else torch.zeros_like(counts, dtype=torch.bool)
    n_keep = counts - cls - fuse.long()

    a = float32(cls_attn)
    patch = valid & (ar >= cls)[None]
    order = topk_indices(a, n_keep, patch)                                   # [B, k] descending, -1 padded
    kept = torch.zeros(b, n + 1, dtype=torch.bool, device=dev)
    kept.scatter_(1, torch.where(order >= 0, order, n), True)
    kept = kept[:, :n]
    dropped = patch & ~kept

    x = float32(tokens)
    w = torch.where(dropped, a, torch.zeros((), dtype=a.dtype, device=dev))
    fused = (x * w[..., None].to(x.dtype)).sum(1, keepdim=True).to(tokens.dtype)   # [B, 1, D]
    fused_rep = torch.where(dropped, ar[None], n).min(1).values
    fused_rep = torch.where(fuse, fused_rep, -1)

    k = order.shape[1]
    head = torch.zeros(b, cls, dtype=torch.long, device=dev)
    rep = torch.cat([head, order, fused_rep[:, None]], dim=1)               # [B, cls + k + 1]
    out = torch.cat([tokens[:, :cls], tokens.gather(1, order.clamp(min=0)[..., None].expand(b, k, tokens.shape[2])),
                     fused], dim=1)
    slot_ok = rep >= 0
    assign = torch.full((b, n + 1), -1, dtype=torch.long, device=dev)
    slots = torch.arange(cls + k, device=dev).expand(b, cls + k)
    assign.scatter_(1, torch.where(slot_ok[:, :cls + k], rep[:, :cls + k], n), slots)
    assign = assign[:, :n]
    assign = torch.where(dropped & fuse[:, None], cls + k, assign)
    sizes = torch.cat([torch.ones(b, cls + k, device=dev),
                       dropped.sum(-1, keepdim=True).float()], dim=1) * slot_ok.float()

    emit = torch.sort((~slot_ok).long(), dim=1, stable=True).indices     # compact the -1 padding to the end
    extras = {"order": rep.gather(1, emit)[:, :int(slot_ok.sum(-1).max())]}
    return reduction_from_merge(out, rep, assign=assign, sizes=sizes, valid=slot_ok, extras=extras)
