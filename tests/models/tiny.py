"""Tiny random-weight VLMs built from configs (no hub), and prompts for them."""

from __future__ import annotations

import torch
from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

IMAGE_TOKEN = 250
VOCAB = 256


def tiny_llava(attn: str = "sdpa", seed: int = 0, image_size: int = 32,
               patch: int = 4) -> LlavaForConditionalGeneration:
    """LLaVA: CLIP tower (CLS + (image_size / patch)^2 patches, 3 layers), Llama LM (2 layers), fp32."""
    torch.manual_seed(seed)
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                              image_size=image_size, patch_size=patch, projection_dim=32)
    text = LlamaConfig(vocab_size=VOCAB, hidden_size=48, intermediate_size=96, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, pad_token_id=0)
    cfg = LlavaConfig(vision_config=vision, text_config=text, image_token_id=IMAGE_TOKEN,
                      vision_feature_layer=-2, vision_feature_select_strategy="default")
    cfg._attn_implementation = attn
    cfg.vision_config._attn_implementation = attn
    cfg.text_config._attn_implementation = attn
    return LlavaForConditionalGeneration(cfg).eval()


def image_prompts(n_image_tokens: int, lengths: list[tuple[int, int]],
                  seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded ``input_ids`` / ``attention_mask`` with one image per sample: ``(prefix, suffix)`` text lengths."""
    g = torch.Generator().manual_seed(seed)
    rows = [torch.cat([torch.randint(1, 200, (p,), generator=g), torch.full((n_image_tokens,), IMAGE_TOKEN),
                       torch.randint(1, 200, (s,), generator=g)]) for p, s in lengths]
    width = max(r.numel() for r in rows)
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for b, r in enumerate(rows):
        ids[b, width - r.numel():] = r
        mask[b, width - r.numel():] = 1
    return ids, mask


def llava_inputs(model, lengths: list[tuple[int, int]] | None = None, seed: int = 0) -> dict[str, torch.Tensor]:
    cfg = model.config.vision_config
    n = (cfg.image_size // cfg.patch_size) ** 2
    lengths = lengths or [(3, 5), (5, 2)]
    ids, mask = image_prompts(n, lengths, seed)
    g = torch.Generator().manual_seed(seed + 1)
    pixels = torch.randn(len(lengths), 3, cfg.image_size, cfg.image_size, generator=g)
    return {"input_ids": ids, "attention_mask": mask, "pixel_values": pixels}
