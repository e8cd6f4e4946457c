"""Tiny random-weight LLaVA-OneVision models (SigLIP tower, Qwen2 LM) built from configs, and prompts for them."""

from __future__ import annotations

import math
from typing import Any

import torch
from transformers import (
    LlavaOnevisionConfig,
    LlavaOnevisionForConditionalGeneration,
    Qwen2Config,
    SiglipVisionConfig,
)
from transformers.models.llava_onevision.modeling_llava_onevision import image_size_to_num_patches

from tests.models.tiny import TOWER, build, left_pad, stack_samples, text_config, text_tokens, unpadded_ids

IMAGE_TOKEN = 250
VIDEO_TOKEN = 251
#: crop layouts for a 32 px tower: 1x1, 1x2, 2x1, 2x2, 1x3 and 3x1 crops of 32 px
PINPOINTS = [[32, 32], [32, 64], [64, 32], [64, 64], [32, 96], [96, 32]]


def tiny_onevision(attn: str = "sdpa", seed: int = 0, aspect: str = "anyres_max_2", lm_layers: int = 2) -> \
        LlavaOnevisionForConditionalGeneration:
    """LLaVA-OneVision: SigLIP tower (32 px images, 8 px patches -> 4 x 4 = 16 tokens per view, 3 layers, no CLS),
    Qwen2 LM (2 layers), fp32. ``aspect="anyres_max_2"`` downscales crop grids larger than ~2.4 views of tokens, so a
    2 x 2-crop image is bilinearly resized while a 1 x 2-crop one is not."""
    torch.manual_seed(seed)
    vision = SiglipVisionConfig(**TOWER, image_size=32, patch_size=8, vision_use_head=False)
    cfg = LlavaOnevisionConfig(vision_config=vision, text_config=text_config(Qwen2Config, tie_word_embeddings=False,
                                                                               num_hidden_layers=lm_layers),
                               image_token_index=IMAGE_TOKEN, video_token_index=VIDEO_TOKEN, vision_feature_layer=-1,
                               vision_feature_select_strategy="full", image_grid_pinpoints=PINPOINTS,
                               vision_aspect_ratio=aspect)
    return build(LlavaOnevisionForConditionalGeneration, cfg, attn)


@torch.no_grad()
def image_lengths(model, pixel_values: torch.Tensor, image_sizes: torch.Tensor,
                  batch_num_images: torch.Tensor | None = None) -> list[int]:
    """Placeholder tokens per image, as the model packs them (content tokens + image_newline tokens)."""
    feats = model.model.get_image_features(pixel_values=pixel_values, image_sizes=image_sizes,
                                           batch_num_images=batch_num_images).pooler_output
    return [int(f.shape[0]) for f in feats]


def onevision_inputs(model, sizes: list[tuple[int, int]] | None = None, lengths: list[tuple[int, int]] | None = None,
                     images_per_sample: list[int] | None = None, seed: int = 0) -> dict[str, torch.Tensor]:
    """Left-padded prompts: sample ``b`` is ``prefix`` text, its images' placeholders, ``suffix`` text.

    ``sizes`` are the images' ``(H, W)`` (flattened over samples), ``lengths`` the ``(prefix, suffix)`` text lengths and
    ``images_per_sample`` how many images each sample holds (a sample with more than one image sends
    ``batch_num_images``, and the model then encodes each of them as one view without crops).
    """
    sizes = sizes or [(40, 60), (30, 50)]
    images_per_sample = images_per_sample or [1] * len(sizes)
    lengths = lengths or [(3 + 2 * b, 5 - b) for b in range(len(images_per_sample))]
    cfg = model.config
    side = cfg.vision_config.image_size
    multi = any(n > 1 for n in images_per_sample)
    patching = [n == 1 for n in images_per_sample for _ in range(n)]
    counts = [image_size_to_num_patches(s, cfg.image_grid_pinpoints, side) if p else 1
              for s, p in zip(sizes, patching, strict=True)]
    g = torch.Generator().manual_seed(seed + 1)
    pixels = torch.zeros(len(sizes), max(counts), 3, side, side)
    for i, c in enumerate(counts):
        pixels[i, :c] = torch.randn(c, 3, side, side, generator=g)
    image_sizes = torch.tensor(sizes, dtype=torch.long)
    bni = torch.tensor(images_per_sample, dtype=torch.long) if multi else None
    n_tokens = image_lengths(model, pixels, image_sizes, bni)
    gt = torch.Generator().manual_seed(seed)
    rows, k = [], 0
    for (p, s), n in zip(lengths, images_per_sample, strict=True):
        parts = [text_tokens(p, gt)]
        for _ in range(n):
            parts += [torch.full((n_tokens[k],), IMAGE_TOKEN), text_tokens(1, gt)]
            k += 1
        parts.append(text_tokens(s, gt))
        rows.append(torch.cat(parts))
    ids, mask = left_pad(rows)
    out = {"input_ids": ids, "attention_mask": mask, "pixel_values": pixels, "image_sizes": image_sizes}
    if bni is not None:
        out["batch_num_images"] = bni
    return out


def sample_inputs(inputs: dict[str, torch.Tensor], b: int, images_per_sample: list[int] | None = None) -> \
        dict[str, torch.Tensor]:
    """Sample ``b`` of a batch from :func:`onevision_inputs`, alone and without padding."""
    per = images_per_sample or [1] * inputs["input_ids"].shape[0]
    start = sum(per[:b])
    out = {"input_ids": unpadded_ids(inputs, b),
           "pixel_values": inputs["pixel_values"][start : start + per[b]],
           "image_sizes": inputs["image_sizes"][start : start + per[b]]}
    if "batch_num_images" in inputs:
        out["batch_num_images"] = inputs["batch_num_images"][b : b + 1]
    return out


def onevision_media_inputs(model, samples: list[list[tuple[str, Any]]], lengths: list[tuple[int, int]], frames: int,
                           seed: int = 0) -> tuple[dict[str, torch.Tensor], list[dict[str, torch.Tensor]]]:
    """Left-padded prompts mixing images and videos, and each sample alone (unpadded, its own pixels).

    Sample ``b`` is ``prefix`` text, its media (``("image", (H, W))``: the image's packed placeholders, or
    ``("video", None)``: a clip of ``frames`` frames, ``frames * P + 1`` video placeholders) and ``suffix`` text. Every
    video of the batch has ``frames`` frames (``pixel_values_videos`` is one tensor)."""
    cfg = model.config
    side = cfg.vision_config.image_size
    g = torch.Generator().manual_seed(seed)
    per_frame = math.ceil(side // cfg.vision_config.patch_size / 2) ** 2
    alone = []
    for media, (p, s) in zip(samples, lengths, strict=True):
        parts = [text_tokens(p, g)]
        one: dict[str, torch.Tensor] = {}
        for kind, size in media:
            if kind == "image":
                views = image_size_to_num_patches(size, cfg.image_grid_pinpoints, side)
                pixels = torch.randn(1, views, 3, side, side, generator=g)
                sizes = torch.tensor([size], dtype=torch.long)
                n = image_lengths(model, pixels, sizes)[0]
                one["pixel_values"], one["image_sizes"] = pixels, sizes
                parts.append(torch.full((n,), IMAGE_TOKEN))
            else:
                one["pixel_values_videos"] = torch.randn(1, frames, 3, side, side, generator=g)
                parts.append(torch.full((frames * per_frame + 1,), VIDEO_TOKEN))
            parts.append(text_tokens(1, g))
        parts.append(text_tokens(s, g))
        one["input_ids"] = torch.cat(parts)[None]
        alone.append(one)
    return stack_samples(alone, ("pixel_values", "image_sizes", "pixel_values_videos")), alone
