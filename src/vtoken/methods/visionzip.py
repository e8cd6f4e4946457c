"""VisionZip: dominant tokens by [CLS] attention plus contextual tokens merged by key similarity.

Yang et al., "VisionZip: Longer is Better but Not Necessary in Vision Language Models" (CVPR 2025),
https://github.com/dvlab-research/VisionZip.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..core import Reduction, reduction_from_merge, topk_indices
from ..ops.similarity import float32, l2_normalize
from .registry import SignalSpec, register

#: The paper's split: 64 tokens = 54 dominant + 10 contextual (also 108 + 20 for 128, 162 + 30 for 192).
PAPER_CONTEXTUAL_RATIO = 10 / 64
#: the source of ``cls_attn``'s fallback on towers without a [CLS] token (SigLIP, Qwen2-VL's tower)
WITHOUT_CLS = ("Without a [CLS] token (SigLIP, Qwen2-VL) the dominant tokens are ranked by the attention each token "
               "receives from all queries: VisionZip's Qwen2.5-VL support (VisPruner's authors, "
               "Theia-4869/VisPruner#1; the maintainers on recomputing the tower's attention, "
               "JIA-Lab-research/VisionZip#24, #25; "
               "ModelTC/LightCompress's Qwen2.5-VL port: last block, heads averaged, summed over queries).")


def _contextual_counts(counts: Tensor, contextual: int | float) -> Tensor:
    if isinstance(contextual, bool) or not isinstance(contextual, (int, float)):
        raise TypeError(f"contextual must be an int count or a float ratio in [0, 1], got {contextual!r}")
    if isinstance(contextual, float):
        if not 0.0 <= contextual <= 1.0:
            raise ValueError(f"contextual as a ratio of keep must be in [0, 1], got {contextual!r}")
        m = torch.floor(counts.double() * contextual + 0.5).long()
    else:
        if contextual < 0:
            raise ValueError(f"contextual must be >= 0, got {contextual!r}")
        m = torch.full_like(counts, int(contextual))
    return m.minimum(counts)


def _first_argmax(x: Tensor) -> Tensor:
    """Index of the maximum over the last dim, ties -> lowest index (device independent)."""
    top = x.amax(-1, keepdim=True)
    ar = torch.arange(x.shape[-1], device=x.device)
    return torch.where(x == top, ar, x.shape[-1]).amin(-1)


@register("visionzip", paper="VisionZip: Longer is Better but Not Necessary in Vision Language Models",
          venue="CVPR 2025", repo="https://github.com/dvlab-research/VisionZip",
          space="vision", stage="pre_llm", kind="merge",
          signals=("cls_attn", "keys"), parity=True, fixture="visionzip",
          signal_spec={"cls_attn": SignalSpec(layer=-2, heads="mean", feature_layer=True, without_cls="received",
                                               note="CLS row of the layer's attention probabilities (official: head "
                                                    "sum, same ranking). " + WITHOUT_CLS),
                       "keys": SignalSpec(layer=-2, heads="mean", feature_layer=True,
                                          note="key states of the same layer averaged over heads, before the "
                                               "attention scale")},
          knob_ranges={"contextual": ">= 0"},
          knob_rules=[("contextual is an int count >= 0 or a float ratio of keep in [0, 1]",
                       lambda contextual: isinstance(contextual, int) or contextual <= 1.0)],
          main_knobs=("contextual",),
          knob_sources={
              "contextual": "paper: 10 contextual tokens for 64 kept (54 + 10, the README's setting), as a ratio of "
                            "keep",
          })
def visionzip(tokens: Tensor, counts: Tensor, *, mask: Tensor | None = None, cls_attn: Tensor | None = None,
              keys: Tensor | None = None, contextual: int | float = PAPER_CONTEXTUAL_RATIO) -> Reduction:
    """Keep the dominant patches by [CLS] attention and merge the rest into a few contextual tokens.

    ``tokens [B, N, D]`` are the patch features (CLS removed), ``cls_attn [B, N]`` the head-mean CLS attention and
    ``keys [B, N, d]`` the head-mean keys of the same vision layer (layer -2 in LLaVA). Each sample keeps
    ``counts[b] = dominant + contextual`` tokens: ``contextual`` is a count (int) or a ratio of ``counts[b]``
    (float, rounded half-up; default 10/64, the paper's 54 + 10 split of 64 tokens).

    1. Dominant: the ``counts[b] - contextual`` patches with the highest CLS attention.
    2. The remaining ``R`` patches, in positional order, are the candidates; every ``R // contextual``-th one
       (from the first) is a contextual target, up to ``contextual`` targets.
    3. Every other candidate joins the target whose normalised key is most similar (cosine; ties -> first target).
    4. A contextual token is ``target + mean(assigned)`` (the target is added to, not averaged with, its members).

    The official code also emits the CLS token (its public ``dominant=D`` keeps ``D - 1`` patches plus CLS); vtoken's
    tokens have no CLS, so official ``visionzip(D, M)`` corresponds to ``keep = D - 1 + M, contextual = M``.
    A contextual token's index is its target's.

    Args:
        contextual: contextual tokens merged from the rest, an int count or a float ratio of ``counts[b]`` (default
            10/64, the paper's 10 for 64 kept). The other ``counts[b] - contextual`` are the dominant tokens.

    Extras: ``order [B, K]`` output indices in the official emission order (dominant ascending, then contextual
    targets), ``dominant [B, Kd]`` dominant indices by descending attention (``-1`` padded).
    """
    b, n, c = tokens.shape
    dev = tokens.device
    ar = torch.arange(n, device=dev)
    valid = torch.ones(b, n, dtype=torch.bool, device=dev) if mask is None else mask
    m_ctx = _contextual_counts(counts, contextual)
    n_dom = counts - m_ctx

    dom_order = topk_indices(float32(cls_attn), n_dom, valid)                         # [B, kd] descending
    dom = torch.zeros(b, n + 1, dtype=torch.bool, device=dev)
    dom.scatter_(1, torch.where(dom_order >= 0, dom_order, n), True)
    dom = dom[:, :n]

    filt = valid & ~dom                                                                # candidates, positional order
    rank = filt.long().cumsum(1) - 1
    r = filt.sum(-1)
    step = (r // m_ctx.clamp(min=1)).clamp(min=1)
    slot = rank // step[:, None]
    is_target = filt & (rank % step[:, None] == 0) & (slot < m_ctx[:, None])
    mmax = int(m_ctx.max())
    tgt = torch.full((b, mmax + 1), n, dtype=torch.long, device=dev)
    tgt.scatter_(1, torch.where(is_target, slot, mmax), ar.expand(b, n))
    tgt = tgt[:, :mmax]                                                                # [B, M] target source index
    tgt_ok = tgt < n
    tgt_safe = tgt.clamp(max=n - 1)

    kn = l2_normalize(float32(keys))
    sim = kn @ kn.gather(1, tgt_safe[..., None].expand(b, mmax, kn.shape[-1])).transpose(1, 2)   # [B, N, M]
    sim = sim.masked_fill(~tgt_ok[:, None, :], float("-inf"))
    members = filt & ~is_target & (m_ctx > 0)[:, None]                                # contextual = 0: dropped
    best = _first_argmax(sim).clamp(max=mmax - 1) if mmax else torch.zeros_like(ar).expand(b, n)
    choice = torch.where(members, best, -1)

    x = float32(tokens)
    onehot = ((choice[..., None] == torch.arange(mmax, device=dev)) & members[..., None]).to(x.dtype)  # [B, N, M]
    sums = onehot.transpose(1, 2) @ x                                                  # [B, M, D]
    cnt = onehot.sum(1)                                                                # [B, M]
    x_t = x.gather(1, tgt_safe[..., None].expand(b, mmax, c))
    ctx = (x_t + sums / cnt.clamp(min=1)[..., None]).to(tokens.dtype)

    kd = dom_order.shape[1]
    out = torch.cat([tokens.gather(1, dom_order.clamp(min=0)[..., None].expand(b, kd, c)), ctx], dim=1)
    rep = torch.cat([dom_order, torch.where(tgt_ok, tgt, -1)], dim=1)
    ok = rep >= 0
    assign = torch.full((b, n + 1), -1, dtype=torch.long, device=dev)
    assign.scatter_(1, torch.where(dom_order >= 0, dom_order, n), torch.arange(kd, device=dev).expand(b, kd))
    assign = assign[:, :n]
    assign = torch.where(is_target, kd + slot, assign)
    assign = torch.where(members, kd + choice, assign)
    sizes = torch.cat([torch.ones(b, kd, device=dev), 1.0 + cnt.float()], dim=1) * ok.float()

    big = n + 1
    dom_pos = torch.sort(torch.where(dom_order >= 0, dom_order, big), dim=1).values
    emit = torch.cat([dom_pos, torch.where(tgt_ok, tgt, big)], dim=1)
    emit = emit.gather(1, torch.sort((emit == big).long(), dim=1, stable=True).indices)
    emit = torch.where(emit == big, -1, emit)[:, :int(ok.sum(-1).max())]
    extras = {"order": emit, "dominant": dom_order}
    return reduction_from_merge(out, rep, assign=assign, sizes=sizes, valid=ok, extras=extras)
