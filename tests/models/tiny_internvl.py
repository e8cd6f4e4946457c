"""A tiny random-weight InternVL (no hub) and multi-view prompts for it.

Tower: CLS + 8 x 8 patches (32 px, patch 4), 3 layers; pixel shuffle 0.5 -> 16 tokens per view (4 x 4); Qwen2 LM.
"""

from __future__ import annotations

import torch
from transformers import InternVLConfig, InternVLForConditionalGeneration, InternVLVisionConfig, Qwen2Config

IMAGE_TOKEN, IMG_START, IMG_END = 250, 251, 252
VOCAB = 256
PER_VIEW = 16


def tiny_internvl(attn: str = "sdpa", seed: int = 0, qk_norm: bool = False) -> InternVLForConditionalGeneration:
    torch.manual_seed(seed)
    vision = InternVLVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                                  image_size=32, patch_size=4, use_qk_norm=qk_norm)
    text = Qwen2Config(vocab_size=VOCAB, hidden_size=48, intermediate_size=96, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, pad_token_id=0)
    cfg = InternVLConfig(vision_config=vision, text_config=text, image_token_id=IMAGE_TOKEN, image_seq_length=PER_VIEW,
                         downsample_ratio=0.5, vision_feature_layer=-1)
    for c in (cfg, cfg.vision_config, cfg.text_config):
        c._attn_implementation = attn
    model = InternVLForConditionalGeneration(cfg).eval()
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
        parts = [torch.randint(1, 200, (p,), generator=g)]
        for v in views:
            parts += [torch.tensor([IMG_START]), torch.full((v * PER_VIEW,), IMAGE_TOKEN), torch.tensor([IMG_END]),
                      torch.randint(1, 200, (2,), generator=g)]
        parts.append(torch.randint(1, 200, (s,), generator=g))
        rows.append(torch.cat(parts))
    width = max(r.numel() for r in rows)
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for b, r in enumerate(rows):
        ids[b, width - r.numel():] = r
        mask[b, width - r.numel():] = 1
    n_views = sum(sum(v) for v in layout)
    pixels = torch.randn(n_views, 3, 32, 32, generator=torch.Generator().manual_seed(seed + 1))
    return {"input_ids": ids, "attention_mask": mask, "pixel_values": pixels}


def sample_inputs(inputs: dict[str, torch.Tensor], layout: list[list[int]], b: int) -> dict[str, torch.Tensor]:
    """Sample ``b`` of a batch alone (padding removed, its own views)."""
    real = inputs["attention_mask"][b].bool()
    start = sum(sum(v) for v in layout[:b])
    n = sum(layout[b])
    return {"input_ids": inputs["input_ids"][b : b + 1, real],
            "pixel_values": inputs["pixel_values"][start : start + n]}
