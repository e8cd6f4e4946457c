"""PyramidDrop: drop a fixed fraction of the visual tokens at the end of each stage of the language model.

Xing et al., "PyramidDrop: Accelerating Your Large Vision-Language Models via Pyramid Visual Redundancy Reduction",
CVPR 2025. https://github.com/Cooperx521/PyramidDrop
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from ..core import Reduction, reduction_from_indices, topk_indices
from ._schedule import resolve_llm_keep, scale_layers
from .registry import LLMSchedule, SignalSpec, register


def _layers(depth: int, layers: Sequence[int] = (8, 16, 24), ref_depth: int = 32) -> list[int]:
    return scale_layers("layers", layers, depth, ref_depth, "pdrop")


def _counts(n: Tensor, keep: int | float, images: Tensor, layers: Sequence[int]) -> list[Tensor]:
    first = resolve_llm_keep(keep, n, images)
    ratio = first.double() / n.clamp(min=1).double()  # lambda, per sample
    out = []
    for s in range(len(layers)):
        c = torch.floor(n.double() * ratio ** (s + 1) + 0.5).long()
        out.append(torch.where(n > 0, c.clamp(min=1), 0).minimum(n))
    return out


@register("pdrop", paper="PyramidDrop: Accelerating Your Large Vision-Language Models via Pyramid Visual Redundancy "
          "Reduction", venue="CVPR 2025", repo="https://github.com/Cooperx521/PyramidDrop", stage="llm", kind="prune",
          signals=("llm_attn",), signal_spec={"llm_attn": SignalSpec(layer="current")},
          schedule=LLMSchedule(_layers, _counts),
          knob_ranges={"ref_depth": ">= 1"},
          main_knobs=("layers",),
          knob_sources={
              "layers": "paper: 8, 16, 24 of LLaVA-1.5-7B's 32 layers, scaled by depth (the official 13B runs keep "
                        "them unscaled)",
              "ref_depth": "paper: LLaVA-1.5-7B's 32 decoder layers",
          })
def pdrop(tokens: Tensor, counts: Tensor, *, mask: Tensor | None = None, llm_attn: Tensor | None = None) -> Reduction:
    """One PyramidDrop stage boundary: keep the ``counts[b]`` visual tokens the last instruction token attends to most.

    Args:
        tokens: ``[B, N, D]`` hidden states of the visual tokens entering a stage-boundary layer.
        counts: ``[B]`` long, tokens kept per sample.
        mask: optional ``[B, N]`` bool, True on real tokens.
        llm_attn: ``[B, N]`` attention probabilities of the last prompt token to each visual token, computed with the
            boundary layer's own query/key projections of its input (heads averaged), as PyramidDrop ranks.
        layers: the stage boundaries (paper: 8, 16, 24 of LLaVA-1.5's 32 layers), given for ``ref_depth`` layers
            and scaled to the model's depth (``round(l * depth / ref_depth)``).
        ref_depth: the depth ``layers`` are given for (default 32, LLaVA-1.5's decoder layers).

    Schedule: ``keep`` sets the first boundary's count ``c1`` (an int per image or a ratio of the visual tokens
    entering the language model, ``N``); its ratio ``lambda = c1 / N`` is applied again at every boundary, so boundary
    ``s`` keeps ``round(N * lambda^s)`` (half-up, at least 1). ``keep=0.5`` is the paper's ``lambda = 0.5``;
    ``keep=1.0`` keeps everything. Ties break by lowest index; returns ``[B, K, D]`` in source order.
    """
    assert llm_attn is not None
    return reduction_from_indices(tokens, topk_indices(llm_attn.float(), counts, mask))
