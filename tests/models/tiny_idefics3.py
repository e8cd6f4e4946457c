"""Tiny random-weight Idefics3 / SmolVLM models (no hub) and prompts in the processor's format.

Tower: SigLIP-like, 8 x 8 patches (32 px, patch 4), 3 layers, no CLS; pixel shuffle s = 2 -> 16 tokens per view.
"""

from __future__ import annotations

import torch
from transformers import (
    Idefics3Config,
    Idefics3ForConditionalGeneration,
    Idefics3VisionConfig,
    LlamaConfig,
    SmolVLMConfig,
    SmolVLMForConditionalGeneration,
    SmolVLMVisionConfig,
)

IMAGE_TOKEN, FAKE, GLOBAL, NEWLINE = 250, 251, 252, 253
ROW_COL = 260  # <row_i_col_j> = ROW_COL + 4 * (i - 1) + (j - 1)
VOCAB = 300
PER_VIEW = 16


def tiny_idefics3(attn: str = "sdpa", seed: int = 0, smol: bool = False):
    """Idefics3ForConditionalGeneration (or SmolVLMForConditionalGeneration with ``smol``), fp32."""
    torch.manual_seed(seed)
    vcls, ccls, mcls = ((SmolVLMVisionConfig, SmolVLMConfig, SmolVLMForConditionalGeneration) if smol else
                        (Idefics3VisionConfig, Idefics3Config, Idefics3ForConditionalGeneration))
    vision = vcls(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4, image_size=32,
                  patch_size=4)
    text = LlamaConfig(vocab_size=VOCAB, hidden_size=48, intermediate_size=96, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, pad_token_id=0)
    cfg = ccls(vision_config=vision, text_config=text, image_token_id=IMAGE_TOKEN, scale_factor=2)
    for c in (cfg, cfg.vision_config, cfg.text_config):
        c._attn_implementation = attn
    return mcls(cfg).eval()


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
        parts = [torch.randint(1, 200, (p,), generator=g)]
        for r, c in images:
            parts += [torch.tensor(image_prompt(r, c)), torch.randint(1, 200, (2,), generator=g)]
        parts.append(torch.randint(1, 200, (s,), generator=g))
        rows.append(torch.cat(parts))
        views.append(sum(r * c + 1 for r, c in images))
    width = max(r.numel() for r in rows)
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for b, r in enumerate(rows):
        ids[b, width - r.numel():] = r
        mask[b, width - r.numel():] = 1
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
    real = inputs["attention_mask"][b].bool()
    out = {"input_ids": inputs["input_ids"][b : b + 1, real], "pixel_values": inputs["pixel_values"][b : b + 1]}
    if "pixel_attention_mask" in inputs:
        out["pixel_attention_mask"] = inputs["pixel_attention_mask"][b : b + 1]
    return out
