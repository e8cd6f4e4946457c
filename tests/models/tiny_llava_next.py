"""A tiny random-weight LLaVA-NeXT built from configs (no hub), and any-resolution prompts for it.

CLIP tower: 32 px images, 8 px patches (a 4 x 4 grid per view, CLS first), 3 layers; crops on a 32 px grid
(``image_grid_pinpoints`` 32 x 64, 64 x 32, 64 x 64: 1 x 2, 2 x 1 or 2 x 2 crops plus the base view).
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import CLIPVisionConfig, LlavaNextConfig, LlavaNextForConditionalGeneration
from transformers.models.llava_next.modeling_llava_next import (
    get_anyres_image_grid_shape,
    image_size_to_num_patches,
    unpad_image,
)

from tests.models.tiny import TOWER, build, left_pad, stack_samples, text_config, text_tokens, unpadded_ids

IMAGE_TOKEN = 250
PINPOINTS = [[32, 64], [64, 32], [64, 64]]


def tiny_llava_next(attn: str = "sdpa", seed: int = 0, lm_layers: int = 2) -> LlavaNextForConditionalGeneration:
    """LLaVA-NeXT: CLIP tower (CLS + 4 x 4 patches per view, 3 layers), Llama LM (``lm_layers`` layers), fp32."""
    torch.manual_seed(seed)
    vision = CLIPVisionConfig(**TOWER, image_size=32, patch_size=8, projection_dim=32)
    cfg = LlavaNextConfig(vision_config=vision, text_config=text_config(num_hidden_layers=lm_layers),
                          image_token_id=IMAGE_TOKEN,
                          image_grid_pinpoints=PINPOINTS, vision_feature_layer=-2,
                          vision_feature_select_strategy="default")
    return build(LlavaNextForConditionalGeneration, cfg, attn)


def image_tokens(model, size: tuple[int, int]) -> int:
    """Placeholder tokens of one image of ``size = (H, W)``: the base view plus the unpadded crop canvas with one
    newline per row (the model's own helpers)."""
    cfg = model.config
    g = cfg.vision_config.image_size // cfg.vision_config.patch_size
    rows, cols = get_anyres_image_grid_shape(list(size), cfg.image_grid_pinpoints, cfg.vision_config.image_size)
    h, w = unpad_image(torch.zeros(1, rows * g, cols * g), list(size)).shape[1:]
    return g * g + h * (w + 1)


def llava_next_inputs(model, sizes: list[tuple[int, int]], lengths: list[tuple[int, int]] | None = None,
                      seed: int = 0) -> dict[str, torch.Tensor]:
    """One image of ``sizes[b] = (H, W)`` per sample between ``lengths[b] = (prefix, suffix)`` random text tokens;
    left padding; ``pixel_values [B, P_max, 3, 32, 32]`` (random views, zero-padded) and ``image_sizes [B, 2]``."""
    cfg = model.config
    lengths = lengths or [(3, 5)] * len(sizes)
    g = torch.Generator().manual_seed(seed)
    ids, mask = left_pad([torch.cat([text_tokens(p, g), torch.full((image_tokens(model, s),), IMAGE_TOKEN),
                                     text_tokens(q, g)]) for s, (p, q) in zip(sizes, lengths, strict=True)])
    views = [image_size_to_num_patches(list(s), cfg.image_grid_pinpoints, cfg.vision_config.image_size) for s in sizes]
    px = cfg.vision_config.image_size
    pixels = torch.zeros(len(sizes), max(views), 3, px, px)
    for b, v in enumerate(views):
        pixels[b, :v] = torch.randn(v, 3, px, px, generator=g)
    return {"input_ids": ids, "attention_mask": mask, "pixel_values": pixels,
            "image_sizes": torch.tensor(sizes, dtype=torch.long)}


def sample_inputs(inputs: dict[str, torch.Tensor], b: int) -> dict[str, torch.Tensor]:
    """Sample ``b`` of :func:`llava_next_inputs` alone, without padding."""
    return {"input_ids": unpadded_ids(inputs, b), "pixel_values": inputs["pixel_values"][b : b + 1],
            "image_sizes": inputs["image_sizes"][b : b + 1]}


VIDEO_TOKEN = 251
Inputs = dict[str, torch.Tensor]


def tiny_llava_next_video(attn: str = "sdpa", seed: int = 0, lm_layers: int = 2, pool: str = "average"):
    """LLaVA-NeXT-Video: LLaVA-NeXT's tower and AnyRes images; videos pooled 2 x 2 per frame (``pool``: the
    ``spatial_pool_mode``) to 2 x 2 tokens a frame."""
    from transformers import LlavaNextVideoConfig, LlavaNextVideoForConditionalGeneration

    torch.manual_seed(seed)
    vision = CLIPVisionConfig(**TOWER, image_size=32, patch_size=8, projection_dim=32)
    cfg = LlavaNextVideoConfig(vision_config=vision, text_config=text_config(num_hidden_layers=lm_layers),
                               image_token_id=IMAGE_TOKEN, video_token_id=VIDEO_TOKEN, image_grid_pinpoints=PINPOINTS,
                               vision_feature_layer=-2, vision_feature_select_strategy="default",
                               spatial_pool_mode=pool, spatial_pool_stride=2)
    return build(LlavaNextVideoForConditionalGeneration, cfg, attn)


def llava_next_video_inputs(model, samples: list[list[tuple[str, Any]]], lengths: list[tuple[int, int]],
                            frames: int, seed: int = 0) -> tuple[Inputs, list[Inputs]]:
    """Prompts mixing images (``("image", (H, W))``) and clips of ``frames`` frames (``("video", None)``: ``frames *
    4`` video placeholders), left-padded, and each sample alone."""
    cfg = model.config
    px = cfg.vision_config.image_size
    g = torch.Generator().manual_seed(seed)
    alone = []
    for media, (p, s) in zip(samples, lengths, strict=True):
        parts = [text_tokens(p, g)]
        one: dict[str, torch.Tensor] = {}
        for kind, size in media:
            if kind == "image":
                views = image_size_to_num_patches(list(size), cfg.image_grid_pinpoints, px)
                one["pixel_values"] = torch.randn(1, views, 3, px, px, generator=g)
                one["image_sizes"] = torch.tensor([size], dtype=torch.long)
                parts.append(torch.full((image_tokens(model, size),), IMAGE_TOKEN))
            else:
                one["pixel_values_videos"] = torch.randn(1, frames, 3, px, px, generator=g)
                parts.append(torch.full((frames * 4,), VIDEO_TOKEN))
            parts.append(text_tokens(1, g))
        parts.append(text_tokens(s, g))
        one["input_ids"] = torch.cat(parts)[None]
        alone.append(one)
    return stack_samples(alone, ("pixel_values", "image_sizes", "pixel_values_videos")), alone
