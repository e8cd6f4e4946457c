"""Sequence bookkeeping for splicing reduced visual tokens back into a language model's input.

A prefill sequence ``[B, L]`` keeps every text and padding position and the kept visual tokens; samples that keep
fewer tokens are padded on the left (generation appends on the right). Kept tokens keep their original position
ids (1-D ``[B, L]`` or M-RoPE ``[P, B, L]``), so the positions of later text and of generated tokens are unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class Compaction:
    """How an original sequence ``[B, L]`` maps to the compacted one ``[B, L']``.

    Attributes:
        gather: ``[B, L']`` long, original column of each compacted column (``-1`` on added left padding).
        length: original length ``L``.
        attention_mask: ``[B, L']`` long mask of the compacted prefill (0 on original and added padding).
        removed: ``[B]`` number of positions dropped per sample.
    """

    gather: Tensor
    length: int
    attention_mask: Tensor
    removed: Tensor

    @property
    def new_length(self) -> int:
        return self.gather.shape[1]

    @property
    def padded(self) -> Tensor:
        return self.gather < 0

    def take(self, x: Tensor, fill: float | int = 0, dim: int = 1) -> Tensor:
        """Gather ``x`` (``[B, L, ...]``, or ``[P, B, L]`` with ``dim=2``) into the compacted layout."""
        idx = self.gather.clamp(min=0)
        pad = self.padded
        if dim == 2:  # [P, B, L] position ids (M-RoPE)
            out = x.gather(2, idx[None].expand(x.shape[0], -1, -1))
            return out.masked_fill(pad[None], fill)
        view = idx.reshape(*idx.shape, *([1] * (x.dim() - 2))).expand(*idx.shape, *x.shape[2:])
        out = x.gather(1, view)
        return out.masked_fill(pad.reshape(*pad.shape, *([1] * (x.dim() - 2))), fill)

    def extend_mask(self, attention_mask: Tensor) -> Tensor:
        """A decode-time mask ``[B, L + t]`` in original columns -> ``[B, L' + t]`` matching the cache."""
        return torch.cat([self.attention_mask.to(attention_mask.dtype), attention_mask[:, self.length:]], dim=1)


def compact(keep: Tensor, attention_mask: Tensor | None) -> Compaction:
    """Build the :class:`Compaction` that keeps the columns where ``keep [B, L]`` is True, right-aligned."""
    b, length = keep.shape
    counts = keep.sum(1)
    new_len = int(counts.max())
    order = torch.sort((~keep).to(torch.int8), dim=1, stable=True).indices[:, :new_len]  # kept columns, in order
    slot = torch.arange(new_len, device=keep.device)[None, :] - (new_len - counts)[:, None]
    gather = torch.where(slot >= 0, order.gather(1, slot.clamp(min=0)), -1)
    base = torch.ones(b, length, dtype=torch.long, device=keep.device) if attention_mask is None \
        else attention_mask.long()
    mask = base.gather(1, gather.clamp(min=0)).masked_fill(gather < 0, 0)
    return Compaction(gather, length, mask, length - counts)
