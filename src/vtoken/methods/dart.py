"""DART: keep the visual tokens least duplicated with a few pivot tokens, inside the language model.

Wen et al., "Stop Looking for Important Tokens in Multimodal Language Models: Duplication Matters More",
arXiv 2502.11494 (EMNLP 2025). https://github.com/ZichenWen1/DART
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..core import Reduction, reduction_from_indices
from ..ops.duplication import pivot_dissimilar_select
from ._dart_ops import PIVOT_ORDERS, dart_pivots, order_pivots
from ._schedule import one_layer
from .registry import register


@register("dart", paper="Stop Looking for Important Tokens in Multimodal Language Models: Duplication Matters More",
          venue="arXiv 2025", repo="https://github.com/ZichenWen1/DART", stage="llm", kind="prune",
          signals=("llm_hidden", "llm_keys", "llm_text_hidden", "llm_text_keys", "text_mask"),
          optional_signals=("positions",), parity=True, fixture="dart", exact=False,
          schedule=one_layer("dart", default=2),
          knob_ranges={"pivot_image_token": ">= 0", "pivot_text_token": ">= 0", "pivot_order": PIVOT_ORDERS},
          knob_rules=[("pivot_image_token + pivot_text_token must be >= 1",
                       lambda pivot_image_token, pivot_text_token: pivot_image_token + pivot_text_token >= 1)],
          main_knobs=("layer",),
          knob_sources={
              "pivot_image_token": "official scripts: 4 + 4 pivots in the LLaVA runs",
              "pivot_text_token": "official scripts: 4 + 4 pivots in the LLaVA runs",
              "pivot_order": "official code: its own pivot order",
              "layer": "paper: K = 2",
          })
def dart(tokens: Tensor, counts: Tensor, *, mask: Tensor | None = None, llm_hidden: Tensor | None = None,
         llm_keys: Tensor | None = None, llm_text_hidden: Tensor | None = None, llm_text_keys: Tensor | None = None,
         text_mask: Tensor | None = None, positions: Tensor | None = None, pivot_image_token: int = 4,
         pivot_text_token: int = 4, pivot_order: str = "official") -> Reduction:
    """DART's retained visual tokens at decoder layer ``layer`` (``get_retained_image_token``), per sample.

    Args:
        tokens: ``[B, N, D]`` hidden states of the visual tokens entering layer ``layer``.
        counts: ``[B]`` long, the budget per sample (at most this many are kept, see below).
        mask: optional ``[B, N]`` bool, True on real visual tokens.
        llm_hidden, llm_text_hidden: ``[B, N, D]`` / ``[B, T, D]`` the same hidden states after the LM's final norm
            (the official ``norm(layer_outputs[0])`` of layer ``K - 1``), for the visual and the instruction tokens
            (the text after the image; rows marked by ``text_mask [B, T]``).
        llm_keys, llm_text_keys: ``[B, N, d]`` / ``[B, T, d]`` their RoPE'd keys in layer ``K - 1``, heads
            concatenated (the pivots' L1 norm runs over all heads).
        positions: optional ``[B, N]`` sequence index of each visual token (the instruction tokens follow the last
            one); only the ``"official"`` pivot order reads it. Default ``0 .. N - 1``.
        layer: ``K``, the first decoder layer that sees only the kept tokens (paper default 2). Layers ``< K`` see
            every token (a schedule knob: ``vtoken.apply`` places the step).
        pivot_image_token, pivot_text_token: pivot tokens taken among the visual / the instruction tokens by largest
            key L1 norm (``Pi``, ``Pt``, official LLaVA setting 4 + 4). Text pivots only pick, they are not kept.
        pivot_order: the order in which the pivots take their picks, ``"official"``, ``"topk"`` or ``"position"``
            (default ``"official"``, the official code's order). ``"official"`` is CPython's ``set`` iteration order
            over the pivots' positions, ``"topk"`` image then text pivots by descending norm, ``"position"`` ascending
            position (:func:`~vtoken.methods._dart_ops.order_pivots`).

    Pivots are the tokens of largest key L1 norm; each pivot in turn keeps the ``TOKEN_TOPK`` visual tokens of the
    pool LEAST cosine-similar to it (normed hidden states) and removes them from the pool; kept = image pivots + all
    picks (text pivots are dropped). ``TOKEN_TOPK = (counts - Pi) // (Pi + Pt)``, so at most ``counts`` tokens stay
    (the official ``max_num_trunction`` is ``counts - Pi``; e.g. keep 128 of LLaVA's 576 keeps 4 + 8 * 15 = 124, as
    the official ratio 0.778). A budget below ``Pi`` keeps the ``counts`` image pivots of largest norm.
    Returns ``[B, K, D]`` in source order.
    """
    if pivot_order not in PIVOT_ORDERS:
        raise ValueError(f"pivot_order must be one of {PIVOT_ORDERS}, got {pivot_order!r}")
    for name, v in (("pivot_image_token", pivot_image_token), ("pivot_text_token", pivot_text_token)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            raise ValueError(f"dart: {name} must be an int >= 0, got {v!r}")
    if pivot_image_token + pivot_text_token < 1:
        raise ValueError("dart: pivot_image_token + pivot_text_token must be >= 1")
    assert llm_hidden is not None and llm_keys is not None and llm_text_hidden is not None
    assert llm_text_keys is not None and text_mask is not None
    b, n = tokens.shape[:2]
    dev = tokens.device
    t = text_mask.shape[1]
    valid = torch.ones(b, n, dtype=torch.bool, device=dev) if mask is None else mask
    text_mask = text_mask.to(device=dev, dtype=torch.bool)
    hidden = torch.cat([llm_hidden.float(), llm_text_hidden.float().to(dev)], 1)
    keys = torch.cat([llm_keys.float(), llm_text_keys.float().to(dev)], 1)
    none_n = torch.zeros(b, n, dtype=torch.bool, device=dev)
    image_region = torch.cat([valid, torch.zeros(b, t, dtype=torch.bool, device=dev)], 1)
    text_region = torch.cat([none_n, text_mask], 1)
    image_piv, text_piv = dart_pivots(keys, image_region, text_region, pivot_image_token, pivot_text_token)
    # pivots of largest norm first; a budget below Pi keeps only the first `counts` image pivots
    rank = torch.arange(image_piv.shape[1], device=dev)[None, :]
    image_piv = torch.where(rank < counts[:, None], image_piv, -1)
    pos = torch.arange(n, device=dev).expand(b, n) if positions is None else positions.long().to(dev)
    last = torch.where(valid, pos, -1).amax(1, keepdim=True)
    text_pos = last + 1 + torch.arange(t, device=dev)[None, :]
    order = order_pivots(image_piv, text_piv, pivot_order, positions=torch.cat([pos, text_pos], 1))
    pool = image_region.clone()
    ok = image_piv >= 0
    pool[torch.arange(b, device=dev)[:, None].expand_as(image_piv)[ok], image_piv[ok]] = False
    topk = (counts - ok.sum(1)).clamp(min=0) // (pivot_image_token + pivot_text_token)
    picks = pivot_dissimilar_select(hidden, order, pool, topk)
    kept = torch.cat([image_piv, picks.reshape(b, -1)], 1)
    return reduction_from_indices(tokens, kept, extras={"image_pivots": image_piv, "text_pivots": text_piv,
                                                        "token_topk": topk, "pivot_order": order})
