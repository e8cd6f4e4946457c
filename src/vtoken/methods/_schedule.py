"""Helpers shared by the ``llm``-stage methods' schedules: ``keep`` per sample and decoder-layer knobs."""

from __future__ import annotations

from collections.abc import Sequence
from itertools import pairwise

import torch
from torch import Tensor

from ..core import check_keep, resolve_keep
from .registry import LLMSchedule


def resolve_llm_keep(keep: int | float, n: Tensor, images: Tensor) -> Tensor:
    """Visual tokens kept per sample inside the language model, ``[B]`` long.

    ``n [B]``: visual tokens of each sample entering the stage (0 for a sample without images), ``images [B]`` its
    images. An ``int`` keep counts tokens per image (``keep * images``), a ``float`` in ``(0, 1]`` is a ratio of
    ``n`` (rounded half-up, at least 1); never more than ``n``.
    """
    keep = check_keep(keep)  # a Python int or float, validated, errors naming keep
    if isinstance(keep, float):
        out = resolve_keep(keep, n)
    else:  # clipped to the most tokens a sample has first: keep * images stays far from overflowing
        most = int(n.max()) if n.numel() else 0
        out = torch.as_tensor(min(keep, max(most, 1)), dtype=torch.long) * images.long()
    return out.to(n.device).minimum(n).clamp(min=0)


def check_layer(name: str, value: object, depth: int, method: str) -> int:
    """A decoder-layer knob as an int in ``[1, depth)`` (the layer before supplies the signals)."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{method}: {name} must be an int decoder layer index, got {value!r}")
    if not 1 <= value < depth:
        raise ValueError(f"{method}: {name}={value} is out of range for a language model with {depth} decoder layers "
                         f"(it prunes before that decoder layer, using the one before it: 1 <= {name} < {depth})")
    return value


def at_depth(layer: int, depth: int, ref_depth: int, method: str) -> int:
    """A decoder-layer index given for a ``ref_depth``-layer model, at ``depth`` layers: ``round(layer * depth /
    ref_depth)`` (the one place the schedules scale with depth; unchanged when ``depth == ref_depth``)."""
    if isinstance(ref_depth, bool) or not isinstance(ref_depth, int) or ref_depth < 1:
        raise ValueError(f"{method}: ref_depth must be an int >= 1 (the depth the layers are given for), "
                         f"got {ref_depth!r}")
    return round(layer * depth / ref_depth) if ref_depth != depth else int(layer)


def scale_layers(name: str, layers: Sequence[int], depth: int, ref_depth: int, method: str) -> list[int]:
    """Layer indices given for a ``ref_depth``-layer model, scaled to ``depth`` (:func:`at_depth`), validated ascending
    and distinct in ``[1, depth)``."""
    at_depth(0, depth, ref_depth, method)
    if isinstance(layers, (int, str)) or not all(isinstance(v, int) and not isinstance(v, bool) for v in layers) \
            or not len(layers):
        raise TypeError(f"{method}: {name} must be a non-empty sequence of int decoder layer indices, got {layers!r}")
    out = [at_depth(v, depth, ref_depth, method) for v in layers]
    for v, raw in zip(out, layers, strict=True):
        if not 1 <= v < depth:
            raise ValueError(f"{method}: {name} entry {raw} (layer {v} at depth {depth}) is out of range: each must "
                             f"be in [1, {depth}) after scaling from ref_depth={ref_depth}")
    if any(b <= a for a, b in pairwise(out)):
        raise ValueError(f"{method}: {name}={list(layers)} gives layers {out} at depth {depth}; they must be strictly "
                         "ascending (use fewer stages or a deeper model)")
    return out


def scale_layer(name: str, layer: int, depth: int, ref_depth: int, method: str, *, lo: int, hi: int) -> int:
    """One decoder-layer index given for a ``ref_depth``-layer model, scaled to ``depth`` (:func:`at_depth`) and
    validated in ``[lo, hi]`` (errors name ``name``). A layer that is in range at ``ref_depth`` but rounds outside
    ``[lo, hi]`` on a much shallower model is clamped into it."""
    if isinstance(layer, bool) or not isinstance(layer, int):
        at_depth(0, depth, ref_depth, method)
        raise TypeError(f"{method}: {name} must be an int decoder layer index, got {layer!r}")
    out = at_depth(layer, depth, ref_depth, method)
    if ref_depth != depth and 0 <= layer < ref_depth and lo <= hi:
        out = min(max(out, lo), hi)
    if not lo <= out <= hi:
        raise ValueError(f"{method}: {name}={layer} gives layer {out} at depth {depth} (from ref_depth={ref_depth}); "
                         f"it must be in [{lo}, {hi}] for a language model with {depth} decoder layers")
    return out


def one_layer(method: str, default: int) -> LLMSchedule:
    """The schedule of a method that prunes once, before decoder layer ``layer`` (knob, default ``default``, not
    scaled with depth), keeping ``keep`` visual tokens (:func:`resolve_llm_keep`)."""

    def layers(depth: int, layer: int = default) -> list[int]:
        return [check_layer("layer", layer, depth, method)]

    def counts(n: Tensor, keep: int | float, images: Tensor) -> list[Tensor]:
        return [resolve_llm_keep(keep, n, images)]

    return LLMSchedule(layers, counts)


def linear_counts(n: Tensor, start: int, end: int, layers: Sequence[int], floor: Tensor) -> list[Tensor]:
    """Per layer ``K`` of ``layers``, ``max(floor(n * r_K), floor_count)`` visual tokens, ``[B]`` long, at most ``n``:
    ``r_K = clamp((end - K) / (end - start), 0, 1)`` falls linearly from 1 (layers ``<= start``) to 0 (``>= end``);
    the product is floored in integer arithmetic."""
    out = []
    for k in layers:
        part = torch.div(n * min(max(end - k, 0), end - start), end - start, rounding_mode="floor")
        out.append(part.maximum(floor.to(n.device)).minimum(n))
    return out
