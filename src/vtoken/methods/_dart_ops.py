"""DART's retained-token selection as plain batched tensor functions (no model code, no registration).

Wen et al., "Stop Looking for Important Tokens in Multimodal Language Models: Duplication Matters More" (DART,
arXiv 2502.11494), official code https://github.com/ZichenWen1/DART (``DART.get_retained_image_token``). At a layer
``K`` of the LLM, a few pivot tokens are taken by the L1 norm of their keys (some among the image tokens, some among
the text tokens after the image), and for each pivot the image tokens least cosine-similar to it (in the layer's
normed hidden states) are kept. The official code uses batch element 0 only; here every sample is processed on its
own, vectorised over ``B`` (a loop runs over the handful of pivots only).

Shapes: ``B`` batch, ``L`` sequence length, ``D`` hidden width, ``H`` heads, ``hd`` head width.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from ..ops.duplication import masked_topk, pivot_dissimilar_select
from ..ops.similarity import float32

__all__ = ["PIVOT_ORDERS", "DartSelection", "dart_pivots", "dart_select", "dart_token_topk", "key_l1_norm",
           "order_pivots"]

#: pivot processing orders accepted by :func:`order_pivots` / :func:`dart_select`
PIVOT_ORDERS = ("official", "topk", "position")


class DartSelection(NamedTuple):
    """Result of :func:`dart_select`.

    Attributes:
        retained: ``[B, R]`` long, absolute sequence positions of the kept image tokens (image pivots + the picks of
            every pivot), ascending, ``-1`` padded (samples keep different counts when their spans differ).
        image_pivots: ``[B, Pi]`` long, image pivots (absolute positions) in descending key-L1 order, ``-1`` padded.
        text_pivots: ``[B, Pt]`` long, text pivots likewise (they lend their picks but are not in ``retained``).
        token_topk: ``[B]`` long, the picks per pivot (``TOKEN_TOPK``).
        pivot_order: ``[B, Pi + Pt]`` long, the pivots in the order they were processed, ``-1`` padded.
    """

    retained: Tensor
    image_pivots: Tensor
    text_pivots: Tensor
    token_topk: Tensor
    pivot_order: Tensor


def _per_sample(v: int | Tensor, b: int, device: torch.device) -> Tensor:
    return torch.as_tensor(v, dtype=torch.long, device=device).reshape(-1).expand(b)


def dart_token_topk(image_length: int | Tensor, pivot_image_token: int = 4, pivot_text_token: int = 4, *,
                    max_num_trunction: int | float | None = None, reduction_ratio: float = 0.778,
                    llava_next: bool = False, retain_token_num_for_llava_next: int | None = None) -> Tensor:
    """DART's ``TOKEN_TOPK``: image tokens each pivot adds (DART, arXiv 2502.11494). ``[B]`` long (``[1]`` for an int).

    Args:
        image_length: ``int`` or ``[B]``, image tokens per sample.
        pivot_image_token, pivot_text_token: pivots ``P = Pi + Pt``.
        max_num_trunction: the total budget added by the pivots; ``None`` -> ``image_length * (1 - reduction_ratio)``.
        llava_next: the official LLaVA-NeXT path (``config.text_length`` set; the caller derives ``image_length =
            L - text_length``): ``int(min(retain_token_num_for_llava_next, image_length - Pi) // P)``. With
            ``retain_token_num_for_llava_next=None`` the ratio budget ``image_length * (1 - reduction_ratio)`` is used
            in its place (the official would fail).

    Default path: ``ceil(budget // P)`` with Python's floor division (on a float when the budget is a float, so the
    ``ceil`` is a no-op), e.g. ``128 // 8 = 16`` and ``144 * (1 - 0.778) // 8 = 3``. Never negative.
    """
    n_img = torch.as_tensor(image_length, dtype=torch.long).reshape(-1)
    p = int(pivot_image_token) + int(pivot_text_token)
    if p < 1:
        raise ValueError(f"pivot_image_token + pivot_text_token must be >= 1, got {p}")
    if llava_next:
        retain = (n_img.double() * (1.0 - reduction_ratio) if retain_token_num_for_llava_next is None
                  else torch.full_like(n_img, int(retain_token_num_for_llava_next)).double())
        budget = torch.minimum(retain, (n_img - int(pivot_image_token)).double())
    elif max_num_trunction is None:
        budget = n_img.double() * (1.0 - reduction_ratio)
    else:
        budget = torch.full_like(n_img, 0).double() + float(max_num_trunction)
    # torch's float floor division matches Python's ``//`` (fmod-based), also at exact multiples
    topk = torch.div(budget, float(p), rounding_mode="floor")
    return torch.ceil(topk).long().clamp(min=0)


def key_l1_norm(keys: Tensor) -> Tensor:
    """``[B, L]`` L1 norm of every token's key over all heads: ``keys [B, H, L, hd]`` (or ``[B, L, E]``), float32."""
    k = float32(keys)
    if k.dim() == 4:
        return k.abs().sum(dim=(1, 3))
    if k.dim() == 3:
        return k.abs().sum(-1)
    raise ValueError(f"keys must have shape [B, H, L, hd] or [B, L, E], got {tuple(keys.shape)}")


def dart_pivots(keys: Tensor, image_region: Tensor, text_region: Tensor, pivot_image_token: int = 4,
                pivot_text_token: int = 4) -> tuple[Tensor, Tensor]:
    """DART's pivots: the tokens with the largest key L1 norm (DART, arXiv 2502.11494, Sec. 3).

    ``keys [B, H, L, hd]`` (or ``[B, L, E]``), ``image_region`` / ``text_region [B, L]`` bool (the image span and the
    real tokens after it). Returns ``(image_pivots [B, Pi], text_pivots [B, Pt])`` long absolute positions in
    descending norm order (ties: lowest position), ``-1`` where a region has fewer tokens than pivots.
    """
    norm = key_l1_norm(keys)
    b = norm.shape[0]

    def pick(region: Tensor, k: int) -> Tensor:
        out = masked_topk(norm, region, k)
        return torch.cat([out, out.new_full((b, k - out.shape[1]), -1)], 1) if out.shape[1] < k else out

    return pick(image_region, int(pivot_image_token)), pick(text_region, int(pivot_text_token))


def order_pivots(image_pivots: Tensor, text_pivots: Tensor, order: str = "official",
                 positions: Tensor | None = None) -> Tensor:
    """The order in which pivots take their picks: ``[B, Pi + Pt]`` long, ``-1`` padded at the end.

    ``order``:
      - ``"official"``: the iteration order of CPython's ``list(set(image_pivots + text_pivots))`` over the pivots'
        positions (what the official code iterates; deterministic for ints). It is computed on the host from
        ``positions`` (``[B, L]`` long, default the raw index), which should be the unpadded position of each token so
        that a padded batch orders its pivots like each sample alone.
      - ``"topk"``: image pivots then text pivots, each in descending key-norm order (the list before the set).
      - ``"position"``: ascending sequence position.
    """
    piv = torch.cat([image_pivots, text_pivots], 1)
    b, p = piv.shape
    if order == "topk":
        key = torch.where(piv >= 0, torch.arange(p, device=piv.device).expand(b, p), p)
    elif order == "position":
        key = torch.where(piv >= 0, piv, torch.iinfo(torch.long).max)
    elif order == "official":
        pos = piv if positions is None else torch.where(piv >= 0, positions.long().gather(1, piv.clamp(min=0)), -1)
        rank = torch.full((b, p), p, dtype=torch.long)
        for s, row in enumerate(pos.tolist()):  # P host ints per sample, never the tokens
            valid = [v for v in row if v >= 0]
            where = {v: j for j, v in enumerate(row) if v >= 0}
            for r, v in enumerate(list(set(valid))):
                rank[s, where[v]] = r
        key = rank.to(piv.device)
    else:
        raise ValueError(f"pivot_order must be one of {PIVOT_ORDERS}, got {order!r}")
    return piv.gather(1, torch.sort(key, dim=1, stable=True).indices)


def dart_select(hidden: Tensor, keys: Tensor, image_start: int | Tensor, image_length: int | Tensor | None = None,
                *, mask: Tensor | None = None, pivot_image_token: int = 4, pivot_text_token: int = 4,
                max_num_trunction: int | float | None = None, reduction_ratio: float = 0.778,
                text_length: int | Tensor | None = None, retain_token_num_for_llava_next: int | None = None,
                pivot_order: str = "official", positions: Tensor | None = None) -> DartSelection:
    """DART's retained image tokens at layer ``K`` (DART, arXiv 2502.11494; ``get_retained_image_token``), per sample.

    Args:
        hidden: ``[B, L, D]`` hidden states of layer ``K - 1`` after the final norm (the official
            ``self.norm(layer_outputs[0])``).
        keys: ``[B, H, L, hd]`` (RoPE'd) key states of the same layer (or ``[B, L, H * hd]``).
        image_start: ``int`` or ``[B]``, first image-token position of each sample.
        image_length: ``int`` or ``[B]``, image tokens per sample (ignored with ``text_length``).
        mask: optional ``[B, L]`` bool attention mask (True on real tokens); padding is never a pivot nor kept.
        pivot_image_token, pivot_text_token: pivots taken among the image tokens / the tokens after the image span.
        max_num_trunction, reduction_ratio: budget of :func:`dart_token_topk`.
        text_length: the LLaVA-NeXT path: ``image_length = L_b - text_length`` (``L_b`` the real length of sample
            ``b``) and ``TOKEN_TOPK = int(min(retain_token_num_for_llava_next, image_length - Pi) // P)``.
        pivot_order: see :func:`order_pivots`; ``"official"`` (default) reproduces the official CPython-set order.
        positions: optional ``[B, L]`` long, the sequence position of every token, used only by the ``"official"``
            order (the set order depends on the position values). Default: the index among the sample's real tokens
            (the raw index without padding). Pass the true positions when ``hidden``/``keys`` are a re-indexed view
            of the sequence (e.g. visual tokens concatenated with the text tokens, ``image_start = 0``).

    Algorithm: pivots = :func:`dart_pivots` on the keys' L1 norm; the pool is the image span minus the image pivots;
    every pivot in ``pivot_order`` keeps the ``TOKEN_TOPK`` pool tokens of lowest cosine similarity to it in
    ``hidden`` and removes them from the pool (:func:`~vtoken.ops.duplication.pivot_dissimilar_select`). Kept: the
    image pivots and all picks (the text pivots themselves are dropped). A budget larger than the pool keeps the whole
    image span (the official would fail). Each sample is independent of the others (batch = each sample alone).
    """
    if hidden.dim() != 3:
        raise ValueError(f"hidden must have shape [B, L, D], got {tuple(hidden.shape)}")
    b, seq, _ = hidden.shape
    dev = hidden.device
    pos = torch.arange(seq, device=dev)[None, :]
    real = torch.ones(b, seq, dtype=torch.bool, device=dev) if mask is None else mask.to(device=dev, dtype=torch.bool)
    start = _per_sample(image_start, b, dev)
    if text_length is not None:
        length = real.sum(-1) - _per_sample(text_length, b, dev)
    elif image_length is None:
        raise ValueError("image_length is required unless text_length is given")
    else:
        length = _per_sample(image_length, b, dev)
    length = length.clamp(min=0)
    end = start + length
    image_region = (pos >= start[:, None]) & (pos < end[:, None]) & real
    text_region = (pos >= end[:, None]) & real
    topk = dart_token_topk(image_region.sum(-1), pivot_image_token, pivot_text_token,
                           max_num_trunction=max_num_trunction, reduction_ratio=reduction_ratio,
                           llava_next=text_length is not None,
                           retain_token_num_for_llava_next=retain_token_num_for_llava_next).to(dev)
    image_piv, text_piv = dart_pivots(keys, image_region, text_region, pivot_image_token, pivot_text_token)
    if positions is None:
        positions = real.long().cumsum(1) - 1
    order = order_pivots(image_piv, text_piv, pivot_order, positions=positions.to(dev))
    pool = image_region.clone()
    rows = torch.arange(b, device=dev)[:, None].expand_as(image_piv)
    ok = image_piv >= 0
    pool[rows[ok], image_piv[ok]] = False
    picks = pivot_dissimilar_select(hidden, order, pool, topk)
    kept = torch.cat([image_piv, picks.reshape(b, -1)], 1)
    big = torch.iinfo(torch.long).max
    kept = torch.sort(torch.where(kept >= 0, kept, big), dim=1).values
    width = int((kept != big).sum(-1).max()) if b else 0
    kept = kept[:, :width]
    retained = torch.where(kept == big, -1, kept)
    return DartSelection(retained, image_piv, text_piv, topk, order)
