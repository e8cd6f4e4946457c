"""Weighted merging of token rows into slots, attention merging, unmerging and source/assign bookkeeping.

Every function is batched over a leading ``B``. An *assignment* ``index [B, N]`` (long) sends input row ``n`` to
output slot ``index[b, n]`` in ``[0, K)``; ``-1`` drops the row (padding). Merged rows are reduced by a weighted mean
(``sum_n w_n x_n / sum_n w_n``, e.g. ToMe's size-weighted average), a plain sum or an element-wise max.

:class:`MergeState` carries tokens through several merge rounds (bipartite soft matching applied repeatedly): it keeps
the real tokens of each sample packed at the front of the rows, in an order chosen by the caller, and composes the
per-round assignments into one ``assign [B, N]`` from the original tokens to the current slots.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ..core import prefix_mask
from .similarity import float32

__all__ = [
    "MergeState",
    "merge_attention",
    "merge_rows",
    "slot_sizes",
    "source_matrix",
    "unmerge",
]

MODES = ("mean", "sum", "amax")


def _route(index: Tensor, k: int) -> Tensor:
    """``index [B, N]`` with ``-1`` sent to a dummy slot ``k`` (dropped by callers)."""
    return torch.where(index < 0, k, index)


def merge_rows(x: Tensor, index: Tensor, k: int, weights: Tensor | None = None, mode: str = "mean") -> Tensor:
    """Reduce rows of ``x [B, N, D]`` into ``k`` slots following ``index [B, N]``.

    ``mode="mean"``: ``out[b, s] = sum_{n: index=s} w[b, n] x[b, n] / sum_{n: index=s} w[b, n]`` with ``weights
    [B, N]`` (ones when omitted: a plain average; ToMe passes sizes). ``"sum"``: the weighted sum. ``"amax"``: the
    element-wise maximum (weights ignored). Slots that receive nothing are zeros; ``index == -1`` rows are dropped.
    Returns ``[B, k, D]`` in ``x``'s dtype.
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    b, _, d = x.shape
    idx = _route(index, k)[..., None].expand(-1, -1, d)
    if mode == "amax":
        out = torch.full((b, k + 1, d), float("-inf"), dtype=x.dtype, device=x.device)
        out = out.scatter_reduce(1, idx, x, reduce="amax", include_self=True)
        return torch.where(torch.isinf(out) & (out < 0), 0.0, out)[:, :k].to(x.dtype)
    w = None if weights is None else weights.to(x.dtype)
    src = x if w is None else x * w[..., None]
    out = torch.zeros(b, k + 1, d, dtype=x.dtype, device=x.device).scatter_add(1, idx, src)[:, :k]
    if mode == "sum":
        return out
    w = torch.ones(index.shape, dtype=x.dtype, device=x.device) if w is None else w
    den = torch.zeros(b, k + 1, dtype=x.dtype, device=x.device).scatter_add(1, _route(index, k), w)[:, :k]
    return torch.where(den[..., None] != 0, out / torch.where(den != 0, den, 1.0)[..., None], 0.0)


def merge_attention(attn: Tensor, index: Tensor, k: int, weights: Tensor | None = None,
                    query_mode: str = "mean") -> Tensor:
    """Merge an attention map ``attn [B, ..., N, N]`` (rows are queries) into ``[B, ..., k, k]`` by ``index [B, N]``.

    Keys are summed (a merged token receives the attention of all its members); queries are reduced with
    :func:`merge_rows`'s ``query_mode`` (``"mean"`` weighted by ``weights [B, N]``, ``"sum"`` or ``"amax"``).
    This is MCTF's one-step-ahead attention (Lee et al., CVPR 2024). It is linear per head for ``"mean"``/``"sum"``,
    so merging a head-averaged map equals averaging the per-head merged maps.
    """
    lead = attn.shape[:-2]
    n = attn.shape[-1]
    b = lead[0]
    extra = lead[1:]
    flat = attn.reshape(b, -1, n, n)
    h = flat.shape[1]
    idx = index[:, None, :].expand(b, h, n).reshape(b * h, n)
    w = None if weights is None else weights[:, None, :].expand(b, h, n).reshape(b * h, n)
    # keys: sum columns into slots (rows of the transposed map)
    keys = merge_rows(flat.reshape(b * h, n, n).transpose(1, 2), idx, k, mode="sum").transpose(1, 2)
    out = merge_rows(keys, idx, k, w, query_mode)
    return out.reshape(b, *extra, k, k)


def slot_sizes(index: Tensor, k: int, sizes: Tensor | None = None) -> Tensor:
    """``[B, k]`` float32: total size of the rows each slot receives (``sizes [B, N]``, ones when omitted)."""
    w = torch.ones(index.shape, dtype=torch.float32, device=index.device) if sizes is None else sizes.float()
    out = torch.zeros(index.shape[0], k + 1, dtype=torch.float32, device=index.device)
    return out.scatter_add(1, _route(index, k), w)[:, :k]


def unmerge(tokens: Tensor, assign: Tensor) -> Tensor:
    """Inverse mapping of a merge: ``[B, N, D]`` where input ``n`` gets the output row it was merged into.

    ``tokens [B, K, D]`` are merged outputs, ``assign [B, N]`` the slot of every input (``-1`` gives zeros). This is
    ToMe's ``unmerge`` (Bolya et al., ICLR 2023), e.g. to bring merged tokens back to full resolution.
    """
    safe = assign.clamp(min=0)[..., None].expand(-1, -1, tokens.shape[-1])
    out = tokens.gather(1, safe)
    return out * (assign >= 0)[..., None].to(out.dtype)


def source_matrix(assign: Tensor, k: int) -> Tensor:
    """``[B, k, N]`` float32 0/1 membership: ``out[b, s, n] = 1`` iff input ``n`` went into output ``s`` (ToMe's
    ``source``)."""
    onehot = torch.zeros(assign.shape[0], k + 1, assign.shape[1], dtype=torch.float32, device=assign.device)
    onehot.scatter_(1, _route(assign, k)[:, None, :], 1.0)
    return onehot[:, :k]


@dataclass
class MergeState:
    """Tokens carried through several merge rounds, packed: slots ``[0, n[b])`` of each row are real.

    Attributes:
        x: ``[B, W, D]`` tokens in float32 (float64 stays float64).
        rep: ``[B, W]`` long, representative source index of each slot (``-1`` on padding).
        n: ``[B]`` long, real slots per sample.
        sizes: ``[B, W]`` float32, original tokens per slot.
        assign: ``[B, N0]`` long, current slot of every original token (``-1`` for masked-out inputs).
        metric: optional ``[B, W, C]`` float32 matching metric merged along with ``x``.
        attn: optional ``[B, W, W]`` float32 attention (queries x keys) merged with :func:`merge_attention`.
    """

    x: Tensor
    rep: Tensor
    n: Tensor
    sizes: Tensor
    assign: Tensor
    metric: Tensor | None = None
    attn: Tensor | None = None

    @classmethod
    def start(cls, tokens: Tensor, mask: Tensor | None = None, sizes: Tensor | None = None,
              metric: Tensor | None = None, attn: Tensor | None = None) -> MergeState:
        """Pack the real tokens of ``tokens [B, N, D]`` (``mask [B, N]``) to the front, in ascending source order."""
        b, n = tokens.shape[:2]
        dev = tokens.device
        ar = torch.arange(n, device=dev).expand(b, n)
        valid = torch.ones(b, n, dtype=torch.bool, device=dev) if mask is None else mask
        order = torch.sort((~valid).to(torch.int8), dim=1, stable=True).indices
        counts = valid.sum(-1)
        real = ar < counts[:, None]
        rep = torch.where(real, order, -1)
        assign = torch.full((b, n), -1, dtype=torch.long, device=dev)
        assign.scatter_(1, order, torch.where(real, ar, -1))

        def pack(v: Tensor | None) -> Tensor | None:
            if v is None:
                return None
            v = float32(v).gather(1, order.reshape(b, n, *([1] * (v.dim() - 2))).expand_as(v))
            return v * real.reshape(b, n, *([1] * (v.dim() - 2))).to(v.dtype)

        s = torch.ones(b, n, dtype=torch.float32, device=dev) if sizes is None else float32(sizes)
        a = None
        if attn is not None:
            a = float32(attn).gather(1, order[..., None].expand(b, n, n)).gather(2, order[:, None, :].expand(b, n, n))
            a = a * (real[:, :, None] & real[:, None, :]).to(a.dtype)
        return cls(pack(tokens), rep, counts, pack(s), assign, pack(metric), a)

    @property
    def width(self) -> int:
        return self.x.shape[1]

    def real(self) -> Tensor:
        """``[B, W]`` bool, True on real slots."""
        return torch.arange(self.width, device=self.x.device)[None, :] < self.n[:, None]

    def step(self, dest: Tensor, key: Tensor, weights: Tensor | None = None, mode: str = "mean",
             attn_mode: str | None = None) -> Tensor:
        """Merge every slot ``w`` into slot ``dest[b, w]`` (itself for survivors) and repack the survivors.

        Args:
            dest: ``[B, W]`` long, destination slot of every slot; a slot survives iff ``dest == itself``. Destinations
                must be survivors. Padding slots are ignored.
            key: ``[B, W]`` order of the survivors in the new packing (ascending; ties by slot).
            weights: ``[B, W]`` merge weights for ``x`` (``mode="mean"``), ones if omitted. The metric is averaged with
                the same weights (plainly when ``mode`` is not ``"mean"``).
            attn_mode: query reduction of the attention (``None``: ``mode``; keys are summed).

        Returns the ``[B, W]`` long map from old slots to new slots (``-1`` on padding).
        """
        b, w = dest.shape
        dev = dest.device
        ar = torch.arange(w, device=dev).expand(b, w)
        real = self.real()
        survive = (dest == ar) & real
        counts = survive.sum(-1)
        k = int(counts.max())
        big = torch.finfo(torch.float64).max
        order = torch.sort(torch.where(survive, key.double(), big), dim=1, stable=True).indices[:, :k]
        newpos = torch.full((b, w), -1, dtype=torch.long, device=dev)
        newpos.scatter_(1, order, torch.arange(k, device=dev).expand(b, k))
        slot_map = torch.where(real, newpos.gather(1, torch.where(real, dest, ar)), -1)
        self.x = merge_rows(self.x, slot_map, k, weights, mode)
        if self.metric is not None:
            self.metric = merge_rows(self.metric, slot_map, k, weights if mode == "mean" else None, "mean")
        if self.attn is not None:
            self.attn = merge_attention(self.attn, slot_map, k, weights, attn_mode or mode)
        self.sizes = slot_sizes(slot_map, k, self.sizes)
        new_real = prefix_mask(counts, k)
        self.rep = torch.where(new_real, self.rep.gather(1, order), -1)
        self.assign = torch.where(self.assign >= 0, slot_map.gather(1, self.assign.clamp(min=0)), -1)
        self.n = counts
        return slot_map
