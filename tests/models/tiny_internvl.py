"""A tiny random-weight InternVL (no hub) and multi-view prompts for it.

Tower: CLS + 8 x 8 patches (32 px, patch 4), 3 layers; pixel shuffle 0.5 -> 16 tokens per view (4 x 4); Qwen2 LM.
"""

from __future__ import annotations

import torch
from transformers import InternVLConfig, InternVLForConditionalGeneration, InternVLVisionConfig, Qwen2Config

from tests.models.tiny import TOWER, build, left_pad, text_config, text_tokens, unpadded_ids

IMAGE_TOKEN, IMG_START, IMG_END = 250, 251, 252
PER_VIEW = 16


def tiny_internvl(attn: str = "sdpa", seed: int = 0, qk_norm: bool = False) -> InternVLForConditionalGeneration:
    torch.manual_seed(seed)
    vision = InternVLVisionConfig(**TOWER, image_size=32, patch_size=4, use_qk_norm=qk_norm)
    cfg = InternVLConfig(vision_config=vision, text_config=text_config(Qwen2Config), image_token_id=IMAGE_TOKEN,
                         image_seq_length=PER_VIEW, downsample_ratio=0.5, vision_feature_layer=-1)
    model = build(InternVLForConditionalGeneration, cfg, attn)
    emb = model.model.vision_tower.embeddings
    with torch.no_grad():  # HF initialises CLS and position embeddings to zeros: make the CLS row informative
        emb.cls_token.normal_(0, 1.0)
        emb.position_embeddings.normal_(0, 1.0)
    return model


def internvl_inputs(layout: list[list[int]], lengths: list[tuple[int, int]] | None = None,
                    seed: int = 0) -> dict[str, torch.Tensor]:
    """Left-padded inputs: ``layout[b]`` lists the views of each image of sample ``b`` (e.g. ``[[3], [1, 1]]``: sample 0
    has one image of 3 views, sample 1 two single-view images); ``lengths[b] = (prefix, suffix)`` text lengths."""
    g = torch.Generator().manual_seed(seed)
    lengths = lengths or [(3 + b, 5 - b) for b in range(len(layout))]
    rows = []
    for views, (p, s) in zip(layout, lengths, strict=True):
        parts = [text_tokens(p, g)]
        for v in views:
            parts += [torch.tensor([IMG_START]), torch.full((v * PER_VIEW,), IMAGE_TOKEN), torch.tensor([IMG_END]),
                      text_tokens(2, g)]
        parts.append(text_tokens(s, g))
        rows.append(torch.cat(parts))
    ids, mask = left_pad(rows)
    n_views = sum(sum(v) for v in layout)
    pixels = torch.randn(n_views, 3, 32, 32, generator=torch.Generator().manual_seed(seed + 1))
    return {"input_ids": ids, "attention_mask": mask, "pixel_values": pixels}


def sample_inputs(inputs: dict[str, torch.Tensor], layout: list[list[int]], b: int) -> dict[str, torch.Tensor]:
    """Sample ``b`` of a batch alone (padding removed, its own views)."""
    start = sum(sum(v) for v in layout[:b])
    n = sum(layout[b])
    return {"input_ids": unpadded_ids(inputs, b), "pixel_values": inputs["pixel_values"][start : start + n]}
