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

from tests.models.tiny import TEXT, VOCAB
from tests.models.tiny_qwen import PATCH, TEMPORAL, TOKENS, _finish, qwen_media_inputs

Inputs = dict[str, torch.Tensor]
#: the text config as a dict, with interleaved M-RoPE sections (head_dim 12: 6 rotary pairs)
QWEN3_TEXT = dict(vocab_size=VOCAB, **TEXT, head_dim=12, bos_token_id=None, eos_token_id=None,
                  rope_parameters={"rope_type": "default", "mrope_section": [2, 2, 2], "mrope_interleaved": True,
                                   "rope_theta": 10000.0})
#: tower: 3 blocks, DeepStack taps after blocks 0 and 1 (injected after LM layers 0 and 1)
VISION = dict(depth=3, hidden_size=32, out_hidden_size=48, intermediate_size=64, num_heads=4, patch_size=PATCH,
              spatial_merge_size=2, temporal_patch_size=TEMPORAL, in_channels=3, num_position_embeddings=16,
              deepstack_visual_indexes=[0, 1])

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
    """:func:`tests.models.tiny_qwen.qwen_media_inputs` with Qwen3-VL's video layout: before every frame (temporal
    patch) a 2-token timestamp text, then ``<start> <video_pad> x (h * w / 4) <end>``."""
    return qwen_media_inputs(samples, lengths, seed=seed, timestamps=True)
