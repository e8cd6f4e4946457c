"""Tiny random-weight Qwen3-VL models (dense and MoE) built from configs (no hub), and prompts for them: images, and
videos as Qwen3-VL's processor lays them out (a timestamp text before every frame, each frame its own
``<vision_start> <video_pad> x n <vision_end>`` block)."""

from __future__ import annotations

import torch
from transformers import (
    Qwen3VLConfig,
    Qwen3VLForConditionalGeneration,
    Qwen3VLMoeConfig,
    Qwen3VLMoeForConditionalGeneration,
)

from tests.models.tiny import TEXT, VOCAB, build, left_pad, text_tokens
from tests.models.tiny_qwen import IMAGE_TOKEN, PATCH, PIXELS, TEMPORAL, VIDEO_TOKEN, VISION_END, VISION_START

Inputs = dict[str, torch.Tensor]
#: the text config as a dict, with interleaved M-RoPE sections (head_dim 12: 6 rotary pairs)
QWEN3_TEXT = dict(vocab_size=VOCAB, **TEXT, head_dim=12, bos_token_id=None, eos_token_id=None,
                  rope_parameters={"rope_type": "default", "mrope_section": [2, 2, 2], "mrope_interleaved": True,
                                   "rope_theta": 10000.0})
#: tower: 3 blocks, DeepStack taps after blocks 0 and 1 (injected after LM layers 0 and 1)
VISION = dict(depth=3, hidden_size=32, out_hidden_size=48, intermediate_size=64, num_heads=4, patch_size=PATCH,
              spatial_merge_size=2, temporal_patch_size=TEMPORAL, in_channels=3, num_position_embeddings=16,
              deepstack_visual_indexes=[0, 1])
TOKENS = dict(image_token_id=IMAGE_TOKEN, video_token_id=VIDEO_TOKEN, vision_start_token_id=VISION_START,
              vision_end_token_id=VISION_END)


def _finish(model_cls, cfg, attn: str):
    model = build(model_cls, cfg, attn)
    model.generation_config.eos_token_id = None
    model.generation_config.bos_token_id = None
    return model


def tiny_qwen3_vl(attn: str = "sdpa", seed: int = 0, lm_layers: int = 3) -> Qwen3VLForConditionalGeneration:
    """Qwen3-VL: a 3-block tower (width 32, 4 heads, 2 x 2 merge, DeepStack after blocks 0 and 1), Qwen3 LM
    (``lm_layers`` layers), fp32."""
    torch.manual_seed(seed)
    cfg = Qwen3VLConfig(text_config={**QWEN3_TEXT, "num_hidden_layers": lm_layers}, vision_config=VISION, **TOKENS)
    return _finish(Qwen3VLForConditionalGeneration, cfg, attn)


def tiny_qwen3_vl_moe(attn: str = "sdpa", seed: int = 0, lm_layers: int = 3) -> Qwen3VLMoeForConditionalGeneration:
    """Qwen3-VL-MoE: the same tower, a Qwen3-MoE LM (4 experts, 2 active)."""
    torch.manual_seed(seed)
    text = {**QWEN3_TEXT, "num_hidden_layers": lm_layers, "num_experts": 4, "num_experts_per_tok": 2,
            "moe_intermediate_size": 32, "decoder_sparse_step": 1}
    cfg = Qwen3VLMoeConfig(text_config=text, vision_config=VISION, **TOKENS)
    return _finish(Qwen3VLMoeForConditionalGeneration, cfg, attn)


TINY = {"qwen3_vl": tiny_qwen3_vl, "qwen3_vl_moe": tiny_qwen3_vl_moe}


def qwen3_media_inputs(samples: list[list[tuple[str, tuple[int, ...]]]], lengths: list[tuple[int, int]],
                       seed: int = 0) -> tuple[Inputs, list[Inputs]]:
    """As :func:`tests.models.tiny_qwen.qwen_media_inputs`, with Qwen3-VL's video layout: before every frame
    (temporal patch) a 2-token timestamp text, then ``<start> <video_pad> x (h * w / 4) <end>``."""
    g = torch.Generator().manual_seed(seed)
    alone = []
    for media, (p, s) in zip(samples, lengths, strict=True):
        parts = [text_tokens(p, g)]
        pix: dict[str, list[torch.Tensor]] = {"image": [], "video": []}
        thw: dict[str, list[list[int]]] = {"image": [], "video": []}
        for kind, size in media:
            t, h, w = (1, *size) if kind == "image" else size
            n = h * w // 4
            if kind == "image":
                parts += [torch.tensor([VISION_START]), torch.full((n,), IMAGE_TOKEN), torch.tensor([VISION_END])]
            else:
                for _ in range(t):
                    parts += [text_tokens(2, g), torch.tensor([VISION_START]), torch.full((n,), VIDEO_TOKEN),
                              torch.tensor([VISION_END])]
            pix[kind].append(torch.randn(t * h * w, PIXELS, generator=g))
            thw[kind].append([t, h, w])
        parts.append(text_tokens(s, g))
        ids = torch.cat(parts)[None]
        one = {"input_ids": ids, "mm_token_type_ids": (ids == IMAGE_TOKEN).int() + 2 * (ids == VIDEO_TOKEN).int()}
        if pix["image"]:
            one["pixel_values"], one["image_grid_thw"] = torch.cat(pix["image"]), torch.tensor(thw["image"])
        if pix["video"]:
            one["pixel_values_videos"], one["video_grid_thw"] = torch.cat(pix["video"]), torch.tensor(thw["video"])
        alone.append(one)
    ids, mask = left_pad([a["input_ids"][0] for a in alone])
    batch = {"input_ids": ids, "attention_mask": mask,
             "mm_token_type_ids": (ids == IMAGE_TOKEN).int() + 2 * (ids == VIDEO_TOKEN).int()}
    for key in ("pixel_values", "image_grid_thw", "pixel_values_videos", "video_grid_thw"):
        got = [a[key] for a in alone if key in a]
        if got:
            batch[key] = torch.cat(got)
    return batch, alone
