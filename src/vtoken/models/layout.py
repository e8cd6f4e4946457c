"""The sequence a decoder layer runs on once vtoken has shortened it, and the tensors that go with it.

A :class:`Layout` names, per slot of a shortened sequence, its column in the prompt (after the pre-LLM splice),
``-1`` on padding vtoken added; it builds the causal + padding masks of its layers at prefill and decode. The helpers
gather along a sequence axis, apply RoPE and compute the head-mean attention of a few query rows the way the model
does. Used by the llm stage (:mod:`vtoken.models.llm`) and the decode stage (:mod:`vtoken.models.decode`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from .hf import allows


def take_seq(x: Tensor, cols: Tensor, seq_dim: int) -> Tensor:
    """Gather ``x``'s sequence axis ``seq_dim`` (batch axis just before it, size ``B`` or 1) at ``cols [B, L']``
    (``-1`` reads column 0; callers mask those)."""
    seq_dim %= x.dim()
    bd = seq_dim - 1
    b, n = cols.shape
    shape = list(x.shape)
    shape[bd] = b
    x = x.expand(shape)
    view = [1] * bd + [b, n] + [1] * (x.dim() - seq_dim - 1)
    idx = cols.clamp(min=0).reshape(view).expand(*x.shape[:bd], b, n, *x.shape[seq_dim + 1:])
    return x.gather(seq_dim, idx)


def rotate(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotary embedding of ``x [B, L, H, d]`` with ``cos``/``sin [B, L, d]`` (the ``rotate_half`` convention of
    Llama, Qwen2 and Qwen2-VL's text model, whose M-RoPE sections are already folded into ``cos``/``sin``)."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos[:, :, None] + torch.cat([-x2, x1], dim=-1) * sin[:, :, None]


def row_attention(q: Tensor, k: Tensor, rows: Tensor, key_valid: Tensor, scale: float) -> Tensor:
    """Head-mean causal attention probabilities of a few query rows, float32.

    Args:
        q: ``[B, R, H, d]`` queries of the rows (RoPE applied); k: ``[B, L, H_kv, d]`` keys of the sequence.
        rows: ``[B, R]`` long, sequence slot of each query row (it sees keys at slots ``<= rows``).
        key_valid: ``[B, L]`` bool, real (non-padding) keys.
        scale: logit scale.

    Returns ``[B, R, L]``: ``softmax(q k^T * scale)`` over the allowed keys, averaged over the ``H`` heads (key head
    ``h // (H / H_kv)`` serves query head ``h``, as ``repeat_kv``).
    """
    h, hkv = q.shape[2], k.shape[2]
    kf = k.float().repeat_interleave(h // hkv, dim=2) if h != hkv else k.float()
    logits = torch.einsum("brhd,blhd->bhrl", q.float(), kf) * scale
    slots = torch.arange(k.shape[1], device=k.device)
    allowed = key_valid[:, None, :] & (slots[None, None, :] <= rows[:, :, None])
    logits = logits.masked_fill(~allowed[:, None], float("-inf"))
    return torch.softmax(logits, dim=-1).mean(1)


def order_first(flag: Tensor) -> tuple[Tensor, Tensor]:
    """Slots where ``flag [B, L]`` is True, first and in order: ``(slots [B, M], valid [B, M])``, ``M`` the largest
    count (at least 1)."""
    counts = flag.sum(1)
    m = max(int(counts.max()), 1)
    order = torch.sort((~flag).to(torch.int8), dim=1, stable=True).indices[:, :m]
    return order, torch.arange(m, device=flag.device)[None, :] < counts[:, None]


@dataclass
class Layout:
    """The sequence one or more decoder layers run on: ``cols [B, L']`` prompt column (after the pre-LLM splice) of
    each slot, ``-1`` on added padding; ``valid [B, L']`` real tokens."""

    cols: Tensor
    valid: Tensor
    _taken: dict[tuple[str, int], tuple[Tensor, Tensor]] = field(default_factory=dict)
    _mask: dict[str, Any] = field(default_factory=dict)

    def take(self, name: str, x: Tensor, seq_dim: int) -> Tensor:
        """``x`` gathered at this layout's columns, computed once per source tensor (every layer gets the same)."""
        key = (name, seq_dim)
        got = self._taken.get(key)
        if got is not None and got[0] is x:
            return got[1]
        out = take_seq(x, self.cols, seq_dim)
        self._taken[key] = (x, out)
        return out

    def prefill_mask(self, like: Any, dtype: torch.dtype, width: int) -> Tensor | None:
        """Causal + padding mask ``[B, 1, L', width]`` of this layout (additive, ``dtype``), ``width >= L'`` the
        keys the layer attends over (a static cache's buffer is wider; its unused columns are masked). ``None``
        where the model passed none (its kernel is causal by itself) and nothing needs masking. Added padding rows
        see themselves."""
        valid = self.valid
        n = valid.shape[1]
        if like is None and width == n and bool(valid.all()):
            return None
        key = ("prefill", dtype, width)
        if key not in self._mask:
            eye = torch.eye(n, dtype=torch.bool, device=valid.device)
            allowed = torch.ones(n, n, dtype=torch.bool, device=valid.device).tril()[None] & valid[:, None, :]
            allowed = allowed | (eye[None] & ~valid[:, :, None])
            self._mask[key] = additive(pad_columns(allowed[:, None], width), dtype)
        return self._mask[key]

    def decode_mask(self, like: Any, dtype: torch.dtype, q: int, length0: int, cached: int, width: int) -> Any:
        """The mask ``[B, 1, q, width]`` (additive, ``dtype``) of a decode step of ``q`` tokens for a layer of this
        layout holding ``cached`` tokens before the step: its layout slots (padding masked), then the generated
        tokens' columns as the model's own mask ``like`` (sized for layer 0's cache of ``length0`` prompt slots)
        has them, causal where it has none, then the unused columns of a static cache's buffer."""
        b, n = self.cols.shape
        new = cached - n + q  # generated so far + this step
        if like is None and width == n + new and bool(self.valid.all()):
            return None
        prefix = self.valid[:, None, None, :].expand(b, 1, q, n)
        tail = allowed_of(like, b, q, length0, new)
        if tail is None:
            j, r = torch.arange(new, device=self.cols.device), torch.arange(q, device=self.cols.device)
            tail = (j[None, :] <= new - q + r[:, None])[None, None].expand(b, 1, q, new)
        return additive(pad_columns(torch.cat([prefix, tail], dim=-1), width), dtype)


def allowed_of(like: Any, b: int, q: int, start: int, count: int) -> Tensor | None:
    """``[B, 1, q, count]`` bool: which of columns ``start:start + count`` the model's decode mask ``like`` (bool or
    additive, ``[B or 1, heads or 1, q, >= start + count]``) allows; ``None`` when ``like`` is no such tensor."""
    if not isinstance(like, Tensor) or like.dim() != 4 or like.shape[-2] != q or like.shape[-1] < start + count:
        return None
    return allows(like[:, :1, :, start:start + count]).expand(b, 1, q, count)


def pad_columns(allowed: Tensor, width: int) -> Tensor:
    """``allowed [..., W]`` bool with masked columns appended up to ``width``."""
    extra = width - allowed.shape[-1]
    if extra < 0:
        raise RuntimeError(f"vtoken: a decoder layer attends over {width} keys, fewer than its {allowed.shape[-1]} "
                           "cached and new tokens")
    if extra == 0:
        return allowed
    return torch.cat([allowed, allowed.new_zeros(*allowed.shape[:-1], extra)], dim=-1)


def additive(allowed: Tensor, dtype: torch.dtype) -> Tensor:
    """An additive float mask (0 where allowed, the dtype's lowest value elsewhere): eager and SDPA, with or
    without grouped-query packing, read it the same way."""
    return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill(~allowed, torch.finfo(dtype).min)
