"""Tiny random-weight VLMs built from configs (no hub), and prompts for them: the pieces every family's tiny model
shares (tower and language-model sizes, building in fp32 with one attention implementation, left-padded prompts) and
LLaVA's own model and inputs."""

from __future__ import annotations

from typing import Any

import torch
from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

IMAGE_TOKEN = 250
VOCAB = 256

#: the vision towers' size (width 32, 3 layers, 4 heads)
TOWER = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4)
#: the language models' size (width 48, 2 layers, 4 heads / 2 KV heads)
TEXT = dict(hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            max_position_embeddings=512, pad_token_id=0)


def text_config(cls: Any = LlamaConfig, vocab_size: int = VOCAB, **extra: Any) -> Any:
    """A :data:`TEXT`-sized language-model config of class ``cls``."""
    return cls(**{**TEXT, "vocab_size": vocab_size, **extra})


def build(model_cls: Any, cfg: Any, attn: str) -> Any:
    """``model_cls(cfg)`` in eval mode with attention implementation ``attn`` in the model, tower and LM configs."""
    for c in (cfg, cfg.vision_config, cfg.text_config):
        c._attn_implementation = attn
    return model_cls(cfg).eval()


def text_tokens(n: int, generator: torch.Generator) -> torch.Tensor:
    """``n`` random text token ids (below every special id)."""
    return torch.randint(1, 200, (n,), generator=generator)


def left_pad(rows: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Token id rows -> left-padded ``input_ids`` and ``attention_mask`` ``[B, max length]`` (pad id 0)."""
    width = max(r.numel() for r in rows)
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for b, r in enumerate(rows):
        ids[b, width - r.numel():] = r
        mask[b, width - r.numel():] = 1
    return ids, mask


def unpadded_ids(inputs: dict[str, torch.Tensor], b: int) -> torch.Tensor:
    """``input_ids`` of sample ``b`` alone ``[1, L_b]``, padding removed."""
    return inputs["input_ids"][b : b + 1, inputs["attention_mask"][b].bool()]


def tiny_llava(attn: str = "sdpa", seed: int = 0, image_size: int = 32,
               patch: int = 4, lm_layers: int = 2) -> LlavaForConditionalGeneration:
    """LLaVA: CLIP tower (CLS + (image_size / patch)^2 patches, 3 layers), Llama LM (``lm_layers`` layers), fp32."""
    torch.manual_seed(seed)
    vision = CLIPVisionConfig(**TOWER, image_size=image_size, patch_size=patch, projection_dim=32)
    cfg = LlavaConfig(vision_config=vision, text_config=text_config(num_hidden_layers=lm_layers),
                      image_token_id=IMAGE_TOKEN, vision_feature_layer=-2, vision_feature_select_strategy="default")
    return build(LlavaForConditionalGeneration, cfg, attn)


def image_prompts(n_image_tokens: int, lengths: list[tuple[int, int]],
                  seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded ``input_ids`` / ``attention_mask`` with one image per sample: ``(prefix, suffix)`` text lengths."""
    g = torch.Generator().manual_seed(seed)
    return left_pad([torch.cat([text_tokens(p, g), torch.full((n_image_tokens,), IMAGE_TOKEN), text_tokens(s, g)])
                     for p, s in lengths])


def llava_inputs(model, lengths: list[tuple[int, int]] | None = None, seed: int = 0) -> dict[str, torch.Tensor]:
    cfg = model.config.vision_config
    n = (cfg.image_size // cfg.patch_size) ** 2
    lengths = lengths or [(3, 5), (5, 2)]
    ids, mask = image_prompts(n, lengths, seed)
    g = torch.Generator().manual_seed(seed + 1)
    pixels = torch.randn(len(lengths), 3, cfg.image_size, cfg.image_size, generator=g)
    return {"input_ids": ids, "attention_mask": mask, "pixel_values": pixels}


def llava_sample(inputs: dict[str, torch.Tensor], b: int) -> dict[str, torch.Tensor]:
    """Sample ``b`` of :func:`llava_inputs` alone, without padding."""
    return {"input_ids": unpadded_ids(inputs, b), "pixel_values": inputs["pixel_values"][b : b + 1]}


def stack_samples(alone: list[dict[str, torch.Tensor]], keys: tuple[str, ...]) -> dict[str, torch.Tensor]:
    """Samples alone (``input_ids [1, L_b]`` and their media) -> one left-padded batch: ``input_ids``,
    ``attention_mask`` and, per key in ``keys`` that some sample has, the samples' tensors concatenated in order
    (5-D ``[n, views, C, H, W]`` pixels zero-padded to the most views)."""
    ids, mask = left_pad([a["input_ids"][0] for a in alone])
    batch = {"input_ids": ids, "attention_mask": mask}
    for key in keys:
        got = [a[key] for a in alone if key in a]
        if not got:
            continue
        if got[0].dim() == 5:
            views = max(t.shape[1] for t in got)
            got = [torch.cat([t, t.new_zeros(t.shape[0], views - t.shape[1], *t.shape[2:])], 1) for t in got]
        batch[key] = torch.cat(got)
    return batch
