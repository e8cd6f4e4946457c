"""Tiny random-weight Idefics3 / SmolVLM models (no hub) and prompts in the processor's format.

Tower: SigLIP-like, 8 x 8 patches (32 px, patch 4), 3 layers, no CLS; pixel shuffle s = 2 -> 16 tokens per view.
"""

from __future__ import annotations

import torch
from transformers import (
    Idefics3Config,
    Idefics3ForConditionalGeneration,
    Idefics3VisionConfig,
    SmolVLMConfig,
    SmolVLMForConditionalGeneration,
    SmolVLMVisionConfig,
)

from tests.models.tiny import TOWER, build, left_pad, text_config, text_tokens, unpadded_ids

IMAGE_TOKEN, FAKE, GLOBAL, NEWLINE = 250, 251, 252, 253
ROW_COL = 260  # <row_i_col_j> = ROW_COL + 4 * (i - 1) + (j - 1)
VOCAB = 300
PER_VIEW = 16


def tiny_idefics3(attn: str = "sdpa", seed: int = 0, smol: bool = False):
    """Idefics3ForConditionalGeneration (or SmolVLMForConditionalGeneration with ``smol``), fp32."""
    torch.manual_seed(seed)
    vcls, ccls, mcls = ((SmolVLMVisionConfig, SmolVLMConfig, SmolVLMForConditionalGeneration) if smol else
                        (Idefics3VisionConfig, Idefics3Config, Idefics3ForConditionalGeneration))
    vision = vcls(**TOWER, image_size=32, patch_size=4)
    cfg = ccls(vision_config=vision, text_config=text_config(vocab_size=VOCAB), image_token_id=IMAGE_TOKEN,
               scale_factor=2)
    return build(mcls, cfg, attn)


def image_prompt(rows: int, cols: int) -> list[int]:
    """The processor's token layout of one image split into ``rows x cols`` tiles (0, 0: unsplit) + its global view."""
    out: list[int] = []
    for i in range(rows):
        for j in range(cols):
            out += [FAKE, ROW_COL + 4 * i + j] + [IMAGE_TOKEN] * PER_VIEW
        out.append(NEWLINE)
    if rows:
        out.append(NEWLINE)
    return out + [FAKE, GLOBAL] + [IMAGE_TOKEN] * PER_VIEW + [FAKE]


def idefics3_inputs(layout: list[list[tuple[int, int]]], lengths: list[tuple[int, int]] | None = None, seed: int = 0,
                    pad_pixels: bool = False) -> dict[str, torch.Tensor]:
    """Left-padded inputs: ``layout[b]`` lists the ``(rows, cols)`` split of each image of sample ``b``.
    ``pixel_values [B, max_views, 3, 32, 32]`` (all-zero padding views); ``pad_pixels`` adds a
    ``pixel_attention_mask`` marking the lower 12 pixel rows of each sample's last (global) view as padding."""
    g = torch.Generator().manual_seed(seed)
    lengths = lengths or [(3 + b, 5 - b) for b in range(len(layout))]
    rows, views = [], []
    for images, (p, s) in zip(layout, lengths, strict=True):
        parts = [text_tokens(p, g)]
        for r, c in images:
            parts += [torch.tensor(image_prompt(r, c)), text_tokens(2, g)]
        parts.append(text_tokens(s, g))
        rows.append(torch.cat(parts))
        views.append(sum(r * c + 1 for r, c in images))
    ids, mask = left_pad(rows)
    pixels = torch.zeros(len(layout), max(views), 3, 32, 32)
    pg = torch.Generator().manual_seed(seed + 1)
    for b, v in enumerate(views):
        pixels[b, :v] = torch.randn(v, 3, 32, 32, generator=pg)
    out = {"input_ids": ids, "attention_mask": mask, "pixel_values": pixels}
    if pad_pixels:
        pam = torch.ones(len(layout), max(views), 32, 32, dtype=torch.bool)
        for b, v in enumerate(views):
            pam[b, v - 1, 20:] = False
            pixels[b, v - 1, :, 20:] = 0.0
        out["pixel_attention_mask"] = pam
    return out


def sample_inputs(inputs: dict[str, torch.Tensor], b: int) -> dict[str, torch.Tensor]:
    """Sample ``b`` of a batch alone (padding removed)."""
    out = {"input_ids": unpadded_ids(inputs, b), "pixel_values": inputs["pixel_values"][b : b + 1]}
    if "pixel_attention_mask" in inputs:
        out["pixel_attention_mask"] = inputs["pixel_attention_mask"][b : b + 1]
    return out
