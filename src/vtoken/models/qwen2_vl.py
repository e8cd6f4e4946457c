"""Qwen2-VL and Qwen2.5-VL (``Qwen2VLForConditionalGeneration``, ``Qwen2_5_VLForConditionalGeneration``).

The vision tower reads ``pixel_values [P, C * t * p * p]`` (``P`` patches of all images, concatenated) with
``image_grid_thw [I, 3]`` (``t, h, w`` in patches), runs its blocks on the whole sequence with attention segments
(``cu_seqlens``: one per frame; Qwen2.5-VL: windows of ``window_size`` pixels except in ``fullatt_block_indexes``,
on a window-permuted patch order) and its ``PatchMerger`` turns every 2 x 2 block of patches into ONE token
(``ln_q`` + an MLP on the four patch vectors concatenated). The prompt holds one ``image_token_id`` placeholder per
merged token, and the language model uses M-RoPE: 3-D ``(t, h, w)`` position ids ``[3, B, L]`` from
``get_rope_index`` on the ORIGINAL sequence.

What vtoken does here:

- Visual tokens are the merged tokens (``N_i = t * h * w / 4`` per image), in the raster order of the merged grid
  ``(t * h / 2, w / 2)`` (the ``grid`` signal; frames stacked vertically). Images of different sizes in one batch
  are padded (``Images.mask``); a pipeline that reads ``grid`` runs once per distinct grid instead.
- Space: every method runs on the merged tokens, AFTER the merger (``Images.space == "projected"``). The merger's input
  (four patch vectors per token) is per token, but its MLP is part of the 2 x 2 merge, so "vision space" methods
  (VisionZip, HiPrune, ...) also select / merge the merged tokens here. ``vision_features`` (MMTok's and ToDRE's
  second view) is the merger's input of each token: its four last-layer patch vectors concatenated ``[4 * C]``.
- Attention signals come from hooked ``qkv`` outputs plus the ``position_embeddings`` / ``cu_seqlens`` each block's
  attention receives (forward pre-hook), so the tower keeps SDPA / FlashAttention. Queries and keys get the vision
  RoPE as in the model; each layer's attention is recomputed within ITS OWN segments (window or full image, exactly
  as the model attends), per head, then averaged. Per merged token a patch statistic is the mean over its 4 patches.
  - ``attn_received_layers``: softmax probabilities averaged over heads and over all query rows of the image (no
    [CLS] row exists), 4-patch mean: HiPrune's official Qwen2.5-VL code (column sums of the head-mean map, 4-patch
    mean, un-permuted windows), with its Qwen setting object layer 16 (1-based) and the last layer of a 32-block
    tower (``[15, -1]``, scaled to other depths). Both are full-attention blocks in the released Qwen2.5-VL.
  - ``cls_attn`` (only for methods that declare a fallback, ``SignalSpec(without_cls="received")``): the same
    received-attention statistic of the last block (the features the merger reads; full attention in Qwen2.5-VL).
  - ``keys``: keys after the vision RoPE (the ones the layer attends with), head mean, 4-patch mean.
- Methods that need a [CLS] token without a documented Qwen substitute (VTC-CLS, HiRED, PruMerge, PruMerge+,
  GlobalCom2) are unsupported (:meth:`Qwen2VLAdapter.unsupported` says why); LaVIT's optional ``cls_attn`` is not
  provided (it scores by distinctiveness instead).
- Positions: kept tokens keep their original M-RoPE ids (the caller's ``position_ids`` as ``generate`` passes them,
  ``[4, B, L]`` text row + 3-D, or ``get_rope_index`` on the original sequence); ``model.model.rope_deltas`` is set as
  the unpatched model sets it, and decode steps continue at ``max(original ids) + 1 + step`` (the unpatched model's
  rule), not at the compacted length.
- Videos (``pixel_values_videos``, ``video_grid_thw``, ``second_per_grid_ts``) go through the same tower call and
  are reduced as clips (:mod:`vtoken.models.video`): ``video_grid = (t, h / 2, w / 2)``, one frame per temporal patch
  (``temporal_patch_size`` input frames), in the merger's order. Attention statistics are recomputed within each
  frame's attention segment. Kept video tokens keep their original ``(t, h, w)`` ids (``t`` scaled by
  ``second_per_grid_ts * tokens_per_second`` on Qwen2.5-VL), so ``rope_deltas`` are the unpatched model's.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from ..core import Reduction
from ..methods import MethodInfo
from .base import Adapter, Images
from .capture import QKCapture, QKLayer
from .hf import cache_of, cached_length
from .pipeline import run_steps, stack_reductions
from .video import select_rows


def rotate(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """The vision RoPE of Qwen2-VL on ``x [P, H, d]`` with ``cos``/``sin [P, d]`` (float32)."""
    x = x.float()
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos.float()[:, None] + torch.cat([-x2, x1], dim=-1) * sin.float()[:, None]


def received_attention(q: Tensor, k: Tensor, segments: Tensor, image: Tensor, counts: Tensor, scale: float,
                       max_elements: int = 1 << 26) -> Tensor:
    """Attention each patch receives in one layer, recomputed within the layer's attention segments.

    Args:
        q, k: ``[P, H, d]`` queries / keys (RoPE applied) of the ``P`` patches of all images, tower order.
        segments: ``[P]`` long, non-decreasing: the attention segment of each patch (a frame, or a window of
            Qwen2.5-VL's windowed blocks; patches attend only within their segment, which lies in one image).
        image: ``[P]`` long, image of each patch.
        counts: ``[I]`` patches per image.
        scale: logit scale (``head_dim ** -0.5``).
        max_elements: size of one chunk of logits (segments are processed in chunks).

    Returns ``[P]`` float32: the softmax probabilities ``softmax(q k^T * scale)`` each patch receives as a key,
    summed over the query rows of its segment, averaged over heads and over every query row of its image (rows of
    other segments give it nothing). Segments are batched padded to the longest, so the cost is that of the
    attention the tower itself computed, not of the whole image's ``P^2``.
    """
    p, h, d = q.shape
    lengths = torch.bincount(segments, minlength=int(segments.max()) + 1 if p else 0)
    starts = lengths.cumsum(0) - lengths
    n_seg, lmax = lengths.numel(), int(lengths.max()) if p else 0
    pos = torch.arange(p, device=q.device) - starts[segments]
    qs = q.new_zeros(n_seg, lmax, h, d, dtype=torch.float32)
    ks = torch.zeros_like(qs)
    qs[segments, pos], ks[segments, pos] = q.float(), k.float()
    qs, ks = qs.transpose(1, 2), ks.transpose(1, 2)                                  # [S, H, L, d]
    valid = torch.arange(lmax, device=q.device)[None, :] < lengths[:, None]          # [S, L]
    recv = torch.zeros(n_seg, lmax, dtype=torch.float32, device=q.device)
    step = max(1, max_elements // max(1, h * lmax * lmax))
    for s0 in range(0, n_seg, step):  # chunks of segments bound the memory of the [S, H, L, L] logits
        sl = slice(s0, s0 + step)
        logits = (qs[sl] @ ks[sl].transpose(-1, -2)) * scale
        probs = torch.softmax(logits.masked_fill(~valid[sl, None, None, :], float("-inf")), dim=-1)
        recv[sl] = probs.masked_fill(~valid[sl, None, :, None], 0.0).sum((1, 2))
    return recv[segments, pos] / (h * counts[image].float())


@dataclass
class QwenCapture(QKCapture):
    """:class:`QKCapture` on the fused ``qkv`` projections plus a forward pre-hook on each block's attention that
    records its ``cu_seqlens`` (attention segments) and ``position_embeddings`` (vision RoPE ``cos, sin [P, d]``)."""

    attn_modules: Sequence[nn.Module] = field(default_factory=list)

    def attach(self) -> None:
        super().attach()
        for i, module in enumerate(self.attn_modules):
            self._handles.append(module.register_forward_pre_hook(self._pre_hook(i), with_kwargs=True))

    def _pre_hook(self, index: int):
        def hook(_module: nn.Module, _args: Any, kwargs: dict[str, Any]) -> None:
            if self.active and index in self.wanted:
                cos, sin = kwargs["position_embeddings"]
                self.store.setdefault(index, {}).update(cu=kwargs["cu_seqlens"].detach(), cos=cos.detach(),
                                                        sin=sin.detach())

        return hook


class Qwen2VLAdapter(Adapter):
    """Qwen2-VL: merged 2 x 2 patch tokens, M-RoPE positions, full attention (per frame) in every vision block."""

    family = "qwen2_vl"
    model_classes: ClassVar[tuple[str, ...]] = ("Qwen2VLForConditionalGeneration",)
    provides = frozenset({"cls_attn", "attn_received_layers", "keys", "vision_features", "text", "text_mask", "grid",
                          "video_grid", "frame_ids", "frame_features",
                          "positions"})
    #: the block whose output the merger reads (the last); also where a spec's ``feature_layer`` -2 reads
    default_layer: ClassVar[int] = -1
    select_layer = -1
    options: ClassVar[tuple[str, ...]] = ("reuse_videos",)
    has_cls = False

    def __init__(self, model: nn.Module, steps: list[Any], **options: Any) -> None:
        super().__init__(model, steps, **options)
        self._rope: Tensor | None = None  # original position ids of the current prefill ([3 or 4, B, L])

    # ---- capability -------------------------------------------------------------------------------------------
    # ---- model parts ------------------------------------------------------------------------------------------
    @property
    def inner(self) -> Any:
        return self.model.model

    @property
    def visual(self) -> Any:
        return self.inner.visual

    def image_token_mask(self, input_ids: Tensor) -> Tensor:
        cfg = self.model.config
        return (input_ids == cfg.image_token_id) | (input_ids == cfg.video_token_id)

    def video_token_mask(self, input_ids: Tensor) -> Tensor:
        return input_ids == self.model.config.video_token_id

    def make_capture(self) -> QKCapture | None:
        blocks = self.visual.blocks
        layers = [QKLayer(num_heads=b.attn.num_heads, qkv=b.attn.qkv, scale=b.attn.scaling) for b in blocks]
        return QwenCapture(layers, attn_modules=[b.attn for b in blocks])

    def window_index(self, grid_thw: Tensor) -> Tensor | None:
        """``[S]`` merged-token order inside the tower (window-permuted), ``None`` when the tower keeps input order."""
        return None

    # ---- signal specs -----------------------------------------------------------------------------------------
    def spec_layers(self, info: MethodInfo, name: str) -> list[int]:
        """Vision blocks (non-negative) of a signal: the Qwen spec, else the method's, else the last block."""
        spec = self.signal_spec(info, name)
        n = len(self.visual.blocks)
        ref = spec.ref_depth or n

        def scale(layer: Any) -> int:
            layer = self.default_layer if layer == "same" else int(layer)
            if layer >= 0 and ref != n:
                layer = min(n - 1, round(layer * n / ref))
            if not -n <= layer < n:
                raise ValueError(f"{self.family}: vision layer {layer} of {info.name!r} is out of range for a tower "
                                 f"with {n} blocks")
            return layer % n

        if name == "attn_received_layers":
            return [scale(v) for v in spec.layers or [n // 2, self.default_layer]]
        return [scale(self.default_layer if spec.layer is None else spec.layer)]

    def signal_layers(self, info: MethodInfo, name: str) -> list[int]:
        if name in ("cls_attn", "attn_received_layers", "keys"):
            return self.spec_layers(info, name)
        return []

    # ---- encoding ---------------------------------------------------------------------------------------------
    def encode(self, kw: dict[str, Any]) -> Images:
        return self.encode_media(kw, "pixel_values", "image_grid_thw", self.model.config.image_token_id, "image")

    def video_key(self) -> str | None:
        return "pixel_values_videos"

    def encode_videos(self, kw: dict[str, Any]) -> Images:
        """Videos as clips: ``video_grid_thw`` ``(t, h, w)`` gives ``T = t`` frames (temporal patches of
        ``temporal_patch_size`` frames) of ``h / 2 x w / 2`` merged tokens, the order the merger emits them."""
        return self.encode_media(kw, "pixel_values_videos", "video_grid_thw", self.model.config.video_token_id,
                                 "video")

    def encode_media(self, kw: dict[str, Any], pixels: str, grid_key: str, token_id: int, kind: str) -> Images:
        """Images or videos through the vision tower (signals recorded): tokens in the merger's order (raster per
        frame, frame by frame), placeholder columns, and what the signals need."""
        grid_thw = kw.get(grid_key)
        if grid_thw is None:
            raise ValueError(f"{self.family} adapter: {grid_key} is required with {pixels}")
        visual = self.visual
        unit = visual.spatial_merge_size ** 2
        assert self.capture is not None
        with self.capture.recording():
            out = self.tower(kw[pixels], grid_thw)
        merged = out.pooler_output  # [S, D], raster order per image / frame
        dev = merged.device
        grid_thw = grid_thw.to(dev)
        n = (grid_thw.prod(-1) // unit).long()  # [I] merged tokens per image
        n_img, nmax = n.numel(), int(n.max())
        img = torch.repeat_interleave(torch.arange(n_img, device=dev), n)
        start = torch.cumsum(n, 0) - n
        local = torch.arange(img.numel(), device=dev) - start[img]

        input_ids = kw["input_ids"]
        rows, cols = (input_ids == token_id).nonzero(as_tuple=True)
        if rows.numel() != merged.shape[0]:
            raise ValueError(f"{self.family} adapter: the prompt has {rows.numel()} {kind} tokens but {grid_key} "
                             f"gives {merged.shape[0]} merged tokens")
        sample = rows[start]
        if not bool((rows == sample[img]).all()):
            raise ValueError(f"{self.family} adapter: a {kind}'s placeholder tokens span two samples")
        tokens = merged.new_zeros(n_img, nmax, merged.shape[-1])
        tokens[img, local] = merged
        columns = torch.full((n_img, nmax), -1, dtype=torch.long, device=dev)
        columns[img, local] = cols
        mask = None if bool((n == nmax).all()) else torch.arange(nmax, device=dev)[None, :] < n[:, None]

        m = visual.spatial_merge_size
        grids = torch.stack([grid_thw[:, 0] * grid_thw[:, 1] // m, grid_thw[:, 2] // m], dim=1)  # [I, 2] (rows, cols)
        common = tuple(grids[0].tolist()) if bool((grids == grids[0]).all()) else None

        # tower order -> per-image raster order of the merged tokens
        order = self.window_index(grid_thw)
        reverse = None if order is None else torch.argsort(order.to(dev))
        p = out.last_hidden_state.shape[0]
        p_img = torch.repeat_interleave(torch.arange(n_img, device=dev), n * unit)
        p_local = torch.arange(p, device=dev) - (torch.cumsum(n * unit, 0) - n * unit)[p_img]
        hidden = out.last_hidden_state.reshape(p // unit, -1)  # the merger's input per token, before ln_q
        extra: dict[str, Any] = {"grids": grids, "counts": n, "img": img, "local": local, "reverse": reverse,
                                 "p_img": p_img, "p_local": p_local, "unit": unit,
                                 "video_grids": torch.stack([grid_thw[:, 0], grid_thw[:, 1] // m,
                                                             grid_thw[:, 2] // m], dim=1)}
        images = Images(tokens, columns, sample, common, lambda x: x, space="projected", mask=mask, extra=extra)
        extra["vision_features"] = self.to_tokens(hidden, images)

        if self._rope is None:
            self._rope = self.rope_positions(kw, input_ids)
        pos = self._rope
        rope = pos[-3:] if pos.dim() == 3 else pos[None].expand(3, -1, -1)
        extra["positions"] = rope.permute(1, 2, 0)[sample[:, None], columns.clamp(min=0)].masked_fill(
            (columns < 0)[..., None], 0)  # [I, N, 3]
        return images

    def tower(self, pixel_values: Tensor, grid_thw: Tensor) -> Any:
        """The vision tower's output on ``pixel_values`` (images or video frames)."""
        return self.visual(pixel_values.type(self.visual.dtype), grid_thw=grid_thw)

    def to_tokens(self, x: Tensor, images: Images) -> Tensor:
        """Per-merged-token values ``[S, ...]`` in tower order -> ``[I, N, ...]`` (raster order, zero padding)."""
        ex = images.extra
        if ex["reverse"] is not None:
            x = x[ex["reverse"]]
        out = x.new_zeros(*images.tokens.shape[:2], *x.shape[1:])
        out[ex["img"], ex["local"]] = x
        return out

    def pool(self, x: Tensor, images: Images) -> Tensor:
        """Per-patch values ``[P, ...]`` (tower order) -> per-token means over the 2 x 2 patches ``[I, N, ...]``."""
        unit = images.extra["unit"]
        return self.to_tokens(x.reshape(x.shape[0] // unit, unit, *x.shape[1:]).mean(1), images)

    def rope_positions(self, kw: dict[str, Any], input_ids: Tensor) -> Tensor:
        """Original position ids of the prefill: the caller's (``[4, B, L]`` from ``generate``, or ``[3, B, L]``), else
        ``get_rope_index`` on the original sequence (``[3, B, L]``; sets ``rope_deltas`` as the model does)."""
        if kw.get("position_ids") is not None:
            return kw["position_ids"]
        if cached_length(cache_of(kw)) > 0:
            raise ValueError(f"{self.family} adapter: images after a non-empty cache need explicit position_ids "
                             "(generate passes them)")
        cfg = self.model.config
        mm = kw.get("mm_token_type_ids")
        if mm is None:
            mm = (input_ids == cfg.image_token_id).int() + 2 * (input_ids == cfg.video_token_id).int()
        args = {"image_grid_thw": kw.get("image_grid_thw"), "video_grid_thw": kw.get("video_grid_thw"),
                "attention_mask": kw.get("attention_mask")}
        if "second_per_grid_ts" in inspect.signature(self.inner.get_rope_index).parameters:
            args["second_per_grid_ts"] = kw.get("second_per_grid_ts")
        pos, deltas = self.inner.get_rope_index(input_ids, mm, **args)
        self.inner.rope_deltas = deltas
        return pos

    # ---- signals ----------------------------------------------------------------------------------------------
    def rotated(self, layer: int) -> tuple[Tensor, Tensor, dict[str, Tensor], QKLayer]:
        """q, k ``[P, H, d]`` of a captured block with the vision RoPE applied, its record and layer."""
        assert self.capture is not None
        q, k, spec = self.capture.qk(layer)
        rec = self.capture.store[self.capture.resolve(layer)]
        h = spec.num_heads
        q = rotate(q.reshape(q.shape[0], h, -1), rec["cos"], rec["sin"])
        k = rotate(k.reshape(k.shape[0], h, -1), rec["cos"], rec["sin"])
        return q, k, rec, spec

    def received(self, layer: int, images: Images) -> Tensor:
        """``[I, N]`` attention each merged token receives in ``layer`` (see the module docstring)."""
        cache = images.extra.setdefault("received", {})
        if layer not in cache:
            q, k, rec, spec = self.rotated(layer)
            p = q.shape[0]
            segments = torch.searchsorted(rec["cu"][1:].to(q.device).long(), torch.arange(p, device=q.device),
                                          right=True)
            ex = images.extra
            counts = ex["counts"] * ex["unit"]
            scale = spec.scale if spec.scale is not None else q.shape[-1] ** -0.5
            per_patch = received_attention(q, k, segments, ex["p_img"], counts, scale)
            cache[layer] = self.pool(per_patch, images)
        return cache[layer]

    def received_attention(self, layers: list[int], images: Images) -> Tensor:
        return torch.stack([self.received(i, images) for i in layers], dim=1)

    def signal(self, name: str, info: MethodInfo, images: Images, kw: dict[str, Any]) -> Any:
        if name == "attn_received_layers":
            return self.received_attention(self.spec_layers(info, name), images)
        if name == "keys":
            _, k, _, _ = self.rotated(self.spec_layers(info, name)[0])
            k = k.reshape(k.shape[0], -1) if self.signal_spec(info, name).heads == "full" else k.mean(1)
            return self.pool(k, images)
        if name == "vision_features":
            if self.signal_spec(info, name).space == "clip_joint":
                return images.tokens  # relevance to the prompt is measured in the LLM embedding space
            return images.extra["vision_features"]
        if name == "positions":
            return images.extra["positions"]
        return super().signal(name, info, images, kw)

    def video_signal(self, name: str, info: MethodInfo, clips: Images, kw: dict[str, Any]) -> Any:
        """As for images (the tower ran on the videos' frames): attention statistics within each frame's attention
        segment, keys, the merger's input, the original M-RoPE ids."""
        if name in ("text", "text_mask", "frame_features"):
            return super().video_signal(name, info, clips, kw)
        return self.signal(name, info, clips, kw)

    # ---- reduction and splicing -------------------------------------------------------------------------------
    def reduce_images(self, images: Images, signals: dict[str, Any]) -> Reduction:
        """One pipeline run on the padded images; when a method reads ``grid`` and the images' grids differ, one run
        per distinct grid (each exact), stacked back into one row per image."""
        uses_grid = any("grid" in (*s.info.signals, *s.info.optional_signals) for s in self.steps)
        if images.grid is not None or not uses_grid:
            return super().reduce_images(images, signals)
        grids = images.extra["grids"]
        keys, inverse = torch.unique(grids, dim=0, return_inverse=True)
        parts = []
        for g in range(keys.shape[0]):  # one run per distinct image size
            rows = (inverse == g).nonzero()[:, 0]
            h, w = (int(v) for v in keys[g])
            n = h * w
            sig = {name: select_rows(name, v, rows, n) for name, v in signals.items()}
            sig["grid"] = (h, w)
            parts.append((rows, run_steps(self.steps, images.tokens[rows, :n], sig, images.project, images.space)))
        n_img, n_tok = images.tokens.shape[:2]
        # padded to the largest image; assign over its n_tok tokens, each step's over the previous step's outputs
        return stack_reductions(parts, n_img, width=n_tok)

    def prefill_inputs(self, kw: dict[str, Any]) -> dict[str, Any]:
        self._rope = None  # computed once per prefill, by the first media encoded
        return super().prefill_inputs(kw)

    def splice(self, kw: dict[str, Any], input_ids: Tensor, embeds: Tensor, keep: Tensor) -> dict[str, Any]:
        kw = dict(kw)
        if self._rope is None:  # no media encoded (reused videos): the positions of this prompt
            self._rope = self.rope_positions(kw, input_ids)
        for name in ("image_grid_thw", "pixel_values_videos", "video_grid_thw", "second_per_grid_ts"):
            kw.pop(name, None)
        mm = kw.pop("mm_token_type_ids", None)
        positions, self._rope = self._rope, None  # this prefill's; the next one computes its own
        assert positions is not None
        kw["position_ids"] = positions
        out = super().splice(kw, input_ids, embeds, keep)
        assert self._state is not None
        if mm is not None:
            out["mm_token_type_ids"] = self._state.take(mm)
        rope = positions[-3:] if positions.dim() == 3 else positions[None]
        self._next_position = rope.amax(0).amax(1) + 1  # the unpatched model's first decode position
        return out


class Qwen25VLAdapter(Qwen2VLAdapter):
    """Qwen2.5-VL: as Qwen2-VL, with windowed attention outside ``fullatt_block_indexes`` on a window-permuted patch
    order (statistics are recomputed within each block's own windows and un-permuted)."""

    family = "qwen2_5_vl"
    model_classes: ClassVar[tuple[str, ...]] = ("Qwen2_5_VLForConditionalGeneration",)

    def window_index(self, grid_thw: Tensor) -> Tensor | None:
        from transformers.vision_utils import get_vision_window_index

        v = self.visual
        index, _ = get_vision_window_index(grid_thw, spatial_merge_size=v.spatial_merge_size, window_size=v.window_size,
                                           patch_size=v.patch_size)
        return index
