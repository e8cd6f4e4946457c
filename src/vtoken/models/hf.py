"""Everything vtoken assumes about transformers' internals, in one place.

The adapters call a model's own ``forward`` and wrap its decoder layers; they rely on public behaviour only, except
for what this module reads. Each helper works across the supported transformers releases (see the README's
compatibility table); when a release renames something, this is the file to change.

* The KV cache reaches ``forward`` and the decoder layers as ``cache`` (transformers >= 5.24) or
  ``past_key_values`` (earlier releases): :func:`cache_of`.
* :func:`cached_length` and :func:`key_width` read a cache through ``get_seq_length(layer)`` and, for layers that
  pre-allocate their key buffers (``StaticCache``), ``layers[i].max_cache_len``.
* :func:`layer_kv` and :func:`set_layer_kv` read and replace what one cache layer holds (``layers[i].keys`` /
  ``.values`` ``[B, H_kv, T, d]``; a static layer's ``cumulative_length`` counts its filled columns).
* The attention implementation is ``config._attn_implementation``: :func:`attention_implementation`.
* ``generate`` may hand ``forward`` 4-D masks it built for a static cache (:func:`padding_mask` reads them back);
  masks are bool or additive (:func:`allows`).
* The decoder's ``rotary_emb`` module (:func:`rotary`); per-axis M-RoPE tables of older releases such as 5.16
  (:func:`flat_rotary`).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

#: the keyword names a KV cache travels under, newest first
CACHE_KEYS = ("cache", "past_key_values")


def cache_of(kwargs: dict[str, Any]) -> Any:
    """The KV cache among a forward's keyword arguments (``None`` when there is none)."""
    for key in CACHE_KEYS:
        value = kwargs.get(key)
        if value is not None:
            return value
    return None


def cached_length(cache: Any, layer: int | None = None) -> int:
    """Tokens held by ``cache`` (of one decoder ``layer``, or of layer 0); 0 for no cache."""
    if cache is None:
        return 0
    n = cache.get_seq_length() if layer is None else cache.get_seq_length(layer)
    return int(n)


def key_width(cache: Any, layer: int, new: int) -> int:
    """Width of the keys decoder ``layer`` attends over when ``new`` tokens are appended to ``cache``: the cached
    tokens plus the new ones, or the whole pre-allocated buffer (``max_cache_len``) of a static cache layer, whose
    unused columns must be masked."""
    layers = getattr(cache, "layers", None)
    if isinstance(layers, (list, tuple, nn.ModuleList)) and layer < len(layers):
        size = getattr(layers[layer], "max_cache_len", None)
        if isinstance(size, int) and size > 0:
            return size
    return cached_length(cache, layer) + new


def cache_layer(cache: Any, layer: int) -> Any:
    """Decoder ``layer``'s entry of ``cache.layers`` (a ``RuntimeError`` for a cache without per-layer entries)."""
    layers = getattr(cache, "layers", None)
    if not isinstance(layers, (list, tuple, nn.ModuleList)) or layer >= len(layers):
        raise RuntimeError(f"vtoken: decode-stage methods need a cache with per-layer key/value entries (a "
                           f"DynamicCache or StaticCache), got {type(cache).__name__}")
    return layers[layer]


def layer_kv(cache: Any, layer: int) -> tuple[Tensor, Tensor]:
    """The keys and values ``[B, H_kv, T, d]`` decoder ``layer`` holds (a static layer's filled columns only)."""
    entry = cache_layer(cache, layer)
    n = cached_length(cache, layer)
    return entry.keys[:, :, :n], entry.values[:, :, :n]


def set_layer_kv(cache: Any, layer: int, keys: Tensor, values: Tensor) -> None:
    """Make decoder ``layer`` hold exactly ``keys`` / ``values`` ``[B, H_kv, T', d]``: a dynamic layer takes the
    tensors, a static layer's buffer gets them in its first ``T'`` columns (its address is kept, as compiled graphs
    need) and its ``cumulative_length`` set to ``T'``, so the next token is written after them."""
    entry = cache_layer(cache, layer)
    size = getattr(entry, "max_cache_len", None)
    if isinstance(size, int) and size > 0:
        n = keys.shape[2]
        if n > size:
            raise RuntimeError(f"vtoken: {n} tokens do not fit a static cache layer of {size}")
        entry.keys[:, :, :n].copy_(keys)
        entry.values[:, :, :n].copy_(values)
        length = getattr(entry, "cumulative_length", None)
        if isinstance(length, Tensor):
            length.fill_(n)
        else:
            entry.cumulative_length = n
        return
    entry.keys, entry.values = keys.contiguous(), values.contiguous()


def attention_implementation(config: Any) -> str:
    """The attention kernel a (sub)model config selects (``"eager"`` when unset)."""
    return str(getattr(config, "_attn_implementation", None) or "eager")


def padding_mask(mask: Any, length: int) -> Any:
    """A 2-D ``[B, length]`` padding mask (1 on real tokens) from what a model's ``forward`` may receive as its
    ``attention_mask``: the 2-D mask itself (returned as is), or the 4-D causal masks ``generate`` builds ahead for a
    compilable (static) cache, bool or additive ``[B, 1, q, keys]``, possibly in a ``{layer type: mask}`` dict.

    The 4-D mask's last query row allows exactly the real tokens up to it (padding masks keys, never queries), so its
    first ``length`` columns are the padding mask of a sequence of ``length`` columns. The model then rebuilds its
    4-D mask from the 2-D one for the shortened sequence."""
    if isinstance(mask, dict):
        mask = mask.get("full_attention", next(iter(mask.values()), None))
    if not isinstance(mask, Tensor) or mask.dim() == 2:
        return mask
    if mask.dim() != 4 or mask.shape[-1] < length:
        raise ValueError(f"attention_mask: vtoken takes a [B, L] padding mask or a model-built [B, 1, q, keys] mask, "
                         f"got shape {tuple(mask.shape)} for {length} columns")
    return allows(mask[:, 0, -1, :length]).long()


def allows(mask: Tensor) -> Tensor:
    """Where an attention mask lets a query see a key: a bool mask as is, an additive one where it is not (about) the
    dtype's lowest value."""
    return mask if mask.dtype == torch.bool else mask > torch.finfo(mask.dtype).min / 2


def rotary(lm: nn.Module, x: Tensor, position_ids: Tensor) -> tuple[Tensor, Tensor] | None:
    """The rotary table ``(cos, sin)`` a decoder ``lm`` computes for ``position_ids`` (its ``rotary_emb`` module),
    ``None`` when it has none."""
    emb = getattr(lm, "rotary_emb", None)
    if emb is None:
        return None
    cos, sin = emb(x, position_ids)
    return cos, sin


def flat_rotary(table: Tensor, attn: nn.Module) -> Tensor:
    """A rotary table ``[B, L, d]`` from what a decoder layer receives: already that, or (transformers before the
    M-RoPE sections moved into the rotary module) ``[3, B, L, d]`` per axis, folded here as the attention would
    (the ``mrope_section`` of its config: section ``i`` of the channel halves takes axis ``i % 3``)."""
    if table.dim() != 4:
        return table
    params = getattr(getattr(attn, "config", None), "rope_parameters", None) or {}
    section = params.get("mrope_section") if isinstance(params, dict) else None
    if not section:
        raise RuntimeError(f"vtoken: a per-axis rotary table {tuple(table.shape)} without an mrope_section in the "
                           "attention's config")
    parts = table.split(list(section) * 2, dim=-1)
    return torch.cat([part[i % 3] for i, part in enumerate(parts)], dim=-1)
