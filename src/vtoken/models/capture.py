"""Signals from a vision tower without eager attention: forward hooks capture the q/k projections of the layers a
method needs, and the attention rows are recomputed on the side for only the query rows needed.

The model keeps its own attention kernel (SDPA, FlashAttention); the hooks only read projection outputs.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from ..ops.attention import cls_attention, head_mean, split_heads


@dataclass
class QKLayer:
    """Where one vision layer's queries and keys come from.

    ``q``/``k`` are the projection modules (outputs ``[B, T, E]``); ``qkv`` a fused projection whose output is split
    into three equal parts (Qwen2-VL style); ``num_heads`` and ``scale`` as the layer's attention uses them.
    """

    num_heads: int
    q: nn.Module | None = None
    k: nn.Module | None = None
    qkv: nn.Module | None = None
    scale: float | None = None


@dataclass
class QKCapture:
    """Forward hooks recording q/k of selected layers while :attr:`active`.

    ``layers`` lists every hookable layer of the tower (shallow to deep); :meth:`want` chooses which of them to record.
    """

    layers: Sequence[QKLayer]
    active: bool = False
    wanted: set[int] = field(default_factory=set)
    store: dict[int, dict[str, Tensor]] = field(default_factory=dict)
    _handles: list[Any] = field(default_factory=list)

    def resolve(self, layer: int) -> int:
        """A layer index (negative counts from the end) as a non-negative index, with a clear error."""
        n = len(self.layers)
        if not -n <= layer < n:
            raise ValueError(f"vision layer {layer} is out of range for a tower with {n} layers")
        return layer % n

    def want(self, layers: Sequence[int]) -> None:
        self.wanted = {self.resolve(i) for i in layers}

    def attach(self) -> None:
        for i, layer in enumerate(self.layers):
            if layer.qkv is not None:
                self._handles.append(layer.qkv.register_forward_hook(self._hook(i, "qkv")))
            else:
                self._handles.append(layer.q.register_forward_hook(self._hook(i, "q")))
                self._handles.append(layer.k.register_forward_hook(self._hook(i, "k")))

    def detach(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self.store.clear()

    def _hook(self, index: int, part: str):
        def hook(_module: nn.Module, _inputs: Any, output: Tensor) -> None:
            if self.active and index in self.wanted:
                if part == "qkv":
                    q, k, _ = output.detach().chunk(3, dim=-1)
                    self.store.setdefault(index, {}).update(q=q, k=k)
                else:
                    self.store.setdefault(index, {})[part] = output.detach()

        return hook

    @contextmanager
    def recording(self) -> Iterator[None]:
        """Record the wanted layers while the block runs (the tower's forward), from an empty store."""
        self.store.clear()
        self.active = True
        try:
            yield
        finally:
            self.active = False

    def qk(self, layer: int) -> tuple[Tensor, Tensor, QKLayer]:
        i = self.resolve(layer)
        got = self.store.get(i)
        if not got or "q" not in got or "k" not in got:
            raise RuntimeError(f"vision layer {layer} was not captured (wanted: {sorted(self.wanted)})")
        return got["q"], got["k"], self.layers[i]


def cls_rows(q: Tensor, k: Tensor, layer: QKLayer, full_width: bool = False) -> tuple[Tensor, Tensor]:
    """Head-mean CLS->patch attention ``[B, N]`` and head-mean pre-softmax logits ``[B, N]`` (CLS column dropped),
    from q/k ``[B, 1 + N, E]`` with the CLS token at 0. ``full_width`` treats the projection as one head (PruMerge)."""
    att = cls_attention(q, k, None if full_width else layer.num_heads, None if full_width else layer.scale)
    return att.mean, att.logits.mean(1)[:, 1:]


def full_attention(q: Tensor, k: Tensor, layer: QKLayer, bias: Tensor | None = None) -> Tensor:
    """Head-mean attention probabilities ``[B, T, T]`` of every query row (for methods that need whole maps);
    ``bias`` is an additive logit bias broadcastable to ``[B, H, T, T]`` (e.g. ToMe's ``log(size)``)."""
    qh, kh = split_heads(q.float(), layer.num_heads), split_heads(k.float(), layer.num_heads)
    scale = layer.scale if layer.scale is not None else qh.shape[-1] ** -0.5
    logits = (qh @ kh.transpose(-1, -2)) * scale
    return torch.softmax(logits if bias is None else logits + bias.float(), dim=-1).mean(1)


def _bias(key_mask: Tensor | None, like: Tensor) -> Tensor | None:
    if key_mask is None:
        return None
    return torch.zeros(key_mask.shape, dtype=like.dtype, device=like.device).masked_fill(~key_mask, float("-inf"))


def attention_maps(q: Tensor, k: Tensor, layer: QKLayer, key_mask: Tensor | None = None,
                   reduce: str = "received") -> Tensor:
    """Attention of a tower layer recomputed from hooked q/k ``[B, T, E]`` in float32, one head at a time.

    ``key_mask [B, T]`` (True = real token) masks padded keys as the model does and drops padded query rows.
    ``reduce="received"``: ``[B, T]`` the attention each token receives, softmax probabilities averaged over heads
    and over the real query rows (the CLS substitute of CLS-free towers). ``reduce="full"``: ``[B, T, T]`` the
    head-mean probabilities of every row.
    """
    qh, kh = split_heads(q.float(), layer.num_heads), split_heads(k.float(), layer.num_heads)
    scale = layer.scale if layer.scale is not None else qh.shape[-1] ** -0.5
    bias = _bias(key_mask, qh)
    b, h, t, _ = qh.shape
    out = torch.zeros((b, t) if reduce == "received" else (b, t, t), dtype=qh.dtype, device=qh.device)
    rows = None if key_mask is None else key_mask.to(qh.dtype)
    for i in range(h):
        logits = (qh[:, i] @ kh[:, i].transpose(-1, -2)) * scale
        if bias is not None:
            logits = logits + bias[:, None, :]
        att = logits.softmax(-1)
        if reduce == "full":
            out += att
        elif rows is None:
            out += att.mean(1)
        else:
            out += (att * rows[:, :, None]).sum(1) / rows.sum(1, keepdim=True).clamp(min=1)
    return out / h


def mean_keys(k: Tensor, layer: QKLayer) -> Tensor:
    """Head-mean keys ``[B, T, d]`` (ToMe's and VisionZip's matching metric)."""
    return head_mean(k.float(), layer.num_heads)
