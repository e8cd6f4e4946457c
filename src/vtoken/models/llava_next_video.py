"""LLaVA-NeXT-Video (``LlavaNextVideoForConditionalGeneration``): LLaVA-NeXT's images, and videos.

Images are LLaVA-NeXT's (:mod:`vtoken.models.llava_next`: AnyRes views, newlines). A video ``pixel_values_videos
[V, F, 3, H, W]`` is ``F`` frames through the same CLIP tower (CLS dropped, ``"default"`` strategy), the model's
``vision_resampler`` (a ``spatial_pool_stride`` pooling of each frame's ``g x g`` grid) and the projector: a clip of
``F`` frames of ``(g / stride)^2`` tokens, no newline. Tower signals of each frame (its own CLS row) are pooled like
the features (an average over each pooling window: the resampler's own average, and the same statistic where it
max-pools or convolves); ``vision_features`` are the resampled tower features.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from ..methods import MethodInfo
from .base import ClsTowerAdapter, Images
from .llava_next import LlavaNextAdapter
from .video import POOLED, pool_frame_signal


class LlavaNextVideoAdapter(LlavaNextAdapter):
    family = "llava_next_video"
    model_classes = ("LlavaNextVideoForConditionalGeneration",)
    provides = LlavaNextAdapter.provides | frozenset({"video_grid", "frame_ids", "frame_features"})
    options = ("reuse_videos",)

    def video_key(self) -> str | None:
        return "pixel_values_videos"

    def video_token_mask(self, input_ids: Tensor) -> Tensor:
        return input_ids == self.model.config.video_token_id

    def encode_videos(self, kw: dict[str, Any]) -> Images:
        strategy = self.select_strategy(kw)
        if strategy != "default":
            raise ValueError(f"llava_next_video adapter: vision_feature_select_strategy={strategy!r} keeps the CLS "
                             "token as a visual token; vtoken supports 'default' (patch tokens only)")
        pixels = kw["pixel_values_videos"]
        if pixels.dim() != 5:
            raise ValueError(f"llava_next_video adapter: pixel_values_videos must be [videos, frames, 3, H, W], got "
                             f"{tuple(pixels.shape)}")
        v, f = pixels.shape[:2]
        feats = self.tower_features(pixels.flatten(0, 1), self.feature_layer(kw))  # [V * F, n, C], q/k recorded
        pooled = self.inner.vision_resampler(feats)  # [V * F, P, C]
        tokens = self.inner.multi_modal_projector(pooled).reshape(v, -1, self.model.config.text_config.hidden_size)
        ids = kw["input_ids"]
        rows, cols = self.video_token_mask(ids).nonzero(as_tuple=True)
        if rows.numel() != tokens.shape[0] * tokens.shape[1]:
            raise ValueError(f"llava_next_video adapter: the prompt has {rows.numel()} video tokens, the {v} video(s) "
                             f"of {f} frames give {tokens.shape[0] * tokens.shape[1]}")
        rows, cols = rows.reshape(v, -1), cols.reshape(v, -1)
        if bool((rows != rows[:, :1]).any()):
            raise ValueError("llava_next_video adapter: the tokens of one video span several samples")
        side = math.isqrt(pooled.shape[1])
        grids = torch.tensor([[f, side, side]] * v, device=tokens.device)
        extra = {"video_grids": grids, "frames": (v, f), "vision_features": pooled.reshape(v, -1, pooled.shape[-1]),
                 "frame_features": feats.mean(1).reshape(v, f, -1)}
        return Images(tokens, cols, rows[:, 0], None, lambda x: x, space="projected", extra=extra)

    def pooled(self, x: Tensor, clips: Images) -> Tensor:
        """Per-patch values of every frame ``[V * F, n, ...]`` -> per clip token ``[V, F * P, ...]``: the mean over
        each of the resampler's pooling windows."""
        v, _ = clips.extra["frames"]
        g = math.isqrt(x.shape[1])
        stride = self.model.config.spatial_pool_stride
        flat = x.reshape(x.shape[0], g, g, -1).permute(0, 3, 1, 2).float()
        out = F.avg_pool2d(flat, kernel_size=stride, stride=stride).flatten(2).transpose(1, 2)
        return out.reshape(v, -1, *x.shape[2:])

    def video_signal(self, name: str, info: MethodInfo, clips: Images, kw: dict[str, Any]) -> Any:
        if name in POOLED:
            value = ClsTowerAdapter.signal(self, name, info, clips, kw)  # per frame, from the recorded q/k
            return pool_frame_signal(name, value, lambda x: self.pooled(x, clips))
        if name == "vision_features" and self.signal_spec(info, name).space == "clip_joint":
            return clips.tokens  # relevance to the prompt is measured in the LLM embedding space (as for images)
        if name in ("vision_features", "frame_features"):
            return clips.extra[name]
        if name == "positions":
            return clips.columns
        return super().video_signal(name, info, clips, kw)
