"""Qwen3-VL and Qwen3-VL-MoE (``Qwen3VLForConditionalGeneration``, ``Qwen3VLMoeForConditionalGeneration``).

The tower is Qwen2-VL's (fused ``qkv``, vision RoPE, attention segments per frame, a 2 x 2 ``PatchMerger``), so the
adapter is :class:`~vtoken.models.qwen2_vl.Qwen2VLAdapter`'s, with two differences:

- **DeepStack.** Tower blocks ``deepstack_visual_indexes`` each give a second set of merged tokens
  (``deepstack_features``), which the language model adds to the hidden states of the visual positions after its
  first decoder layers. They follow the kept tokens: a kept token brings its own DeepStack features, a merged token
  the mean of its members'. The adapter hands the language model the compacted ``visual_pos_masks`` and
  ``deepstack_visual_embeds`` itself (a forward pre-hook on the decoder, one prefill at a time).
- **Videos** are laid out frame by frame, each frame ``<timestamp text> <vision_start> <video_pad> x n
  <vision_end>``; ``get_rope_index`` numbers every frame as its own grid after its timestamp. Kept tokens keep those
  original ids (timestamps are text and always stay), so a pruned frame leaves its timestamp in place.

llm-stage methods run as on Qwen2-VL; DeepStack injections after a shortened layer follow that layer's layout (the
kept visual tokens' own features, a merged token its representative's: :func:`follow_layout`).
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from ..core import Reduction
from .base import Images
from .qwen2_vl import Qwen2VLAdapter


def follow_members(values: Tensor, red: Reduction) -> Tensor:
    """Per-token values of a reduction's inputs ``values [I, N, C]`` -> its outputs ``[I, K, C]``: a kept token's own
    value, a merged token's the mean over the inputs assigned to it (0 on padding)."""
    if red.assign is None:
        idx = red.indices.clamp(min=0)
        out = values.gather(1, idx[..., None].expand(*idx.shape, values.shape[-1]))
        return out * red.mask[..., None]
    i, k = red.indices.shape
    slot = torch.where(red.assign >= 0, red.assign, k)  # [I, N]
    out = values.new_zeros(i, k + 1, values.shape[-1]).scatter_add_(1, slot[..., None].expand_as(values), values)
    count = torch.zeros(i, k + 1, dtype=values.dtype, device=values.device).scatter_add_(
        1, slot, torch.ones_like(slot, dtype=values.dtype))
    return (out / count.clamp(min=1)[..., None])[:, :k]


def follow_layout(llm: Any, hidden: Tensor, mask: Tensor, embeds: Tensor) -> tuple[Tensor, Tensor]:
    """DeepStack inputs ``(visual_pos_masks [B, L], deepstack_visual_embeds [n, D])`` of the prefill -> those of the
    layout an llm-stage step left (``llm.cur.cols [B, L']``, the prefill column of each slot): the kept visual
    tokens' own features (a merged token keeps its representative's)."""
    lay = llm.cur if llm.mode == "prefill" else None
    if lay is None or hidden.shape[1] == mask.shape[1]:
        return mask, embeds
    cols = lay.cols
    full = embeds.new_zeros(*mask.shape, embeds.shape[-1])
    full[mask] = embeds
    idx = cols.clamp(min=0)
    kept = mask.gather(1, idx) & (cols >= 0)
    return kept, full.gather(1, idx[..., None].expand(*idx.shape, embeds.shape[-1]))[kept]


class Qwen3VLAdapter(Qwen2VLAdapter):
    """Qwen3-VL: Qwen2-VL's tower and M-RoPE, DeepStack features that follow the kept tokens, per-frame video blocks."""

    family = "qwen3_vl"
    model_classes: ClassVar[tuple[str, ...]] = ("Qwen3VLForConditionalGeneration",
                                                "Qwen3VLMoeForConditionalGeneration")

    def __init__(self, model: nn.Module, steps: list[Any], **options: Any) -> None:
        super().__init__(model, steps, **options)
        self._deepstack: tuple[Tensor, list[Tensor]] | None = None
        self._media: list[tuple[Images, Reduction]] = []
        self._hook: Any = None

    def attach(self, handle: Any) -> None:
        super().attach(handle)
        lm = self.inner.language_model
        self._hook = lm.register_forward_pre_hook(self._inject, with_kwargs=True)
        if self.llm is not None:  # DeepStack after layers the llm-stage steps already shortened: their layout
            original = lm._deepstack_process
            llm = self.llm

            def deepstack(hidden: Tensor, visual_pos_masks: Tensor, visual_embeds: Tensor) -> Tensor:
                return original(hidden, *follow_layout(llm, hidden, visual_pos_masks, visual_embeds))

            lm._deepstack_process = deepstack
            self._deepstack_patch = (lm, deepstack)

    def detach(self) -> None:
        if self._hook is not None:
            self._hook.remove()
            self._hook = None
        patch = getattr(self, "_deepstack_patch", None)
        if patch is not None and patch[0].__dict__.get("_deepstack_process") is patch[1]:
            del patch[0].__dict__["_deepstack_process"]
        self._deepstack_patch = None
        self._deepstack = None
        super().detach()

    def _inject(self, _module: nn.Module, args: Any, kwargs: dict[str, Any]) -> tuple[Any, dict[str, Any]] | None:
        """The compacted prefill's DeepStack inputs, once (decode steps get none, as in the unpatched model)."""
        if self._deepstack is None or kwargs.get("visual_pos_masks") is not None:
            return None
        mask, embeds = self._deepstack
        self._deepstack = None
        return args, {**kwargs, "visual_pos_masks": mask, "deepstack_visual_embeds": embeds}

    # ---- encoding: keep the DeepStack features with the tokens --------------------------------------------------
    def encode_media(self, kw: dict[str, Any], pixels: str, grid_key: str, token_id: int, kind: str) -> Images:
        images = super().encode_media(kw, pixels, grid_key, token_id, kind)
        deep = self._last_out.deepstack_features  # per tap [S, D], the merger's order
        images.extra["deepstack"] = [self.to_tokens(d, images) for d in deep]  # no window order: merger order
        return images

    def tower(self, pixel_values: Tensor, grid_thw: Tensor) -> Any:
        self._last_out = super().tower(pixel_values, grid_thw)
        return self._last_out

    # ---- splice: DeepStack inputs of the compacted prefill ------------------------------------------------------
    def prefill_inputs(self, kw: dict[str, Any]) -> dict[str, Any]:
        self._deepstack = None
        return super().prefill_inputs(kw)

    def splice(self, kw: dict[str, Any], input_ids: Tensor, embeds: Tensor, keep: Tensor) -> dict[str, Any]:
        assert self.handle is not None
        media = []
        if kw.get("pixel_values") is not None:
            media.append((self._images, self.handle.last))
        if kw.get("pixel_values_videos") is not None:
            media.append((self._clips, self.handle.video))
        out = super().splice(kw, input_ids, embeds, keep)
        comp = self._state
        assert comp is not None
        b, length = input_ids.shape
        visual = torch.zeros(b, length, dtype=torch.bool, device=input_ids.device)
        taps: list[Tensor] | None = None
        for vis, red in media:
            deep = [follow_members(d, red) for d in vis.extra["deepstack"]]
            if taps is None:
                taps = [d.new_zeros(b, length, d.shape[-1]) for d in deep]
            rows = vis.sample[:, None].expand_as(red.indices)[red.mask]
            cols = vis.columns.gather(1, red.indices.clamp(min=0))[red.mask]
            visual[rows, cols] = True
            for full, d in zip(taps, deep, strict=True):
                full[rows, cols] = d[red.mask].to(full.dtype)
        if taps is not None:
            mask = comp.take(visual)
            self._deepstack = (mask, [comp.take(full)[mask] for full in taps])
        return out
