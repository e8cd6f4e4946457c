"""The micro video VLM: a ``Qwen2_5_VLForConditionalGeneration`` small enough to train on a CPU, built only from
transformers' own classes so that it goes through exactly the adapter real Qwen2.5-VL checkpoints use (videos with
``video_grid_thw``, temporal patches of 2, ``second_per_grid_ts`` and M-RoPE).

- Vision tower: Qwen2.5-VL's ViT, 7 px patches over 126 x 126 frames (18 x 18 patches), temporal patches of 2 frames,
  the 2 x 2 patch merger (9 x 9 = 81 tokens a temporal patch), attention in windows of 42 px (one Fashion clips cell:
  3 x 3 merged tokens) except in its full-attention blocks. A 12-frame clip (6 steps held 2 frames each,
  :mod:`vtoken.bench.clips`) is 6 x 81 = 486 visual tokens.
- Language model: Qwen2 (M-RoPE sections for its head width) over a word-level vocabulary (every word of the
  Fashion clips task and Qwen's chat special tokens).
- Chat template: Qwen's, ``<|im_start|>user <|vision_start|><|video_pad|><|vision_end|>{question}<|im_end|>
  <|im_start|>assistant`` (answers end with ``<|im_end|>``).

Saving writes what ``Qwen2_5_VLProcessor`` reads (tokenizer with the chat template, ``preprocessor_config.json``,
``video_preprocessor_config.json``, ``processor_config.json``), so ``AutoProcessor`` loads it where torchvision is
installed; here (no torchvision) :mod:`vtoken.bench.videoqa` loads it (``AutoModelForImageTextToText``,
``AutoTokenizer`` and the same video arithmetic in torch).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from ..bench import clips as C
from ..bench.videoqa import (
    CHAT_TEMPLATE,
    FPS,
    FRAME,
    IM_END,
    IMAGE_ID,
    MEAN,
    MERGE,
    PAD_ID,
    PATCH,
    SPECIAL,
    STD,
    TEMPORAL,
    VIDEO_ID,
    VISION_END,
    VISION_START,
)

CHAT_WORDS = ("user", "assistant")


def vocab() -> dict[str, int]:
    """Word -> id: the special tokens, the chat words, then every task word in sorted order."""
    words = [*SPECIAL, *CHAT_WORDS, *(w for w in C.vocabulary() if w not in CHAT_WORDS)]
    return {w: i for i, w in enumerate(words)}


def build_tokenizer():
    """The word-level ``PreTrainedTokenizerFast`` (left padding, for batched generation); no BOS, as Qwen."""
    from tokenizers import AddedToken, Tokenizer, decoders, normalizers, pre_tokenizers
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(WordLevel(vocab(), unk_token="<unk>"))
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL])
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=True)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|im_end|>", unk_token="<unk>", pad_token="<pad>",
        extra_special_tokens={"image_token": "<|image_pad|>", "video_token": "<|video_pad|>",
                              "vision_start_token": "<|vision_start|>", "vision_end_token": "<|vision_end|>"},
        additional_special_tokens=list(SPECIAL[2:]), padding_side="left", model_max_length=1024,
        chat_template=CHAT_TEMPLATE)


def micro_video_config(vision_hidden: int = 96, vision_layers: int = 4, text_hidden: int = 192, text_layers: int = 4,
                       heads: int = 4, **overrides: Any):
    """The micro video VLM's ``Qwen2_5_VLConfig``: the tower above (blocks 1 and 3 of 4 attend over the whole frame,
    the others within 42 px windows), a Qwen2 LM with M-RoPE sections ``[h/8, 3h/16, 3h/16]`` of its head width
    ``h`` (Qwen2.5-VL's 16/24/24 of 128)."""
    from transformers import Qwen2_5_VLConfig

    head = text_hidden // heads
    half = head // 2
    section = [half // 4, (half - half // 4) // 2, half - half // 4 - (half - half // 4) // 2]
    vision = dict(depth=vision_layers, hidden_size=vision_hidden, intermediate_size=2 * vision_hidden,
                  num_heads=heads, in_channels=3, patch_size=PATCH, spatial_merge_size=MERGE,
                  temporal_patch_size=TEMPORAL, window_size=C.CELL, out_hidden_size=text_hidden,
                  fullatt_block_indexes=list(range(1, vision_layers, 2)), tokens_per_second=1)
    text = dict(vocab_size=len(vocab()), hidden_size=text_hidden, intermediate_size=3 * text_hidden,
                num_hidden_layers=text_layers, num_attention_heads=heads, num_key_value_heads=max(1, heads // 2),
                max_position_embeddings=2048, pad_token_id=PAD_ID, bos_token_id=None, eos_token_id=IM_END,
                tie_word_embeddings=False,
                rope_parameters={"rope_type": "default", "mrope_section": section, "rope_theta": 10000.0})
    kwargs: dict[str, Any] = dict(text_config=text, vision_config=vision, image_token_id=IMAGE_ID,
                                  video_token_id=VIDEO_ID, vision_start_token_id=VISION_START,
                                  vision_end_token_id=VISION_END, pad_token_id=PAD_ID, eos_token_id=IM_END,
                                  tie_word_embeddings=False)
    kwargs.update(overrides)
    return Qwen2_5_VLConfig(**kwargs)


def build_model(seed: int = 0, **config: Any):
    """A freshly initialised micro video VLM (``Qwen2_5_VLForConditionalGeneration``, fp32, SDPA), seeded."""
    from transformers import Qwen2_5_VLForConditionalGeneration

    torch.manual_seed(seed)
    cfg = micro_video_config(**config)
    cfg._attn_implementation = "sdpa"
    model = Qwen2_5_VLForConditionalGeneration(cfg).eval()
    model.generation_config.eos_token_id = IM_END
    model.generation_config.pad_token_id = PAD_ID
    model.generation_config.bos_token_id = None
    return model


def processor_files() -> dict[str, dict[str, Any]]:
    """The processor configs ``Qwen2_5_VLProcessor`` reads (image, video and processor), matching the arithmetic of
    :func:`video_pixels`."""
    common = {"do_resize": True, "size": {"shortest_edge": 14 * 14, "longest_edge": 4 * FRAME * FRAME},
              "min_pixels": 14 * 14, "max_pixels": 4 * FRAME * FRAME, "do_rescale": True, "rescale_factor": 1 / 255,
              "do_normalize": True, "image_mean": list(MEAN), "image_std": list(STD), "do_convert_rgb": True,
              "patch_size": PATCH, "temporal_patch_size": TEMPORAL, "merge_size": MERGE}
    return {
        "preprocessor_config.json": {**common, "image_processor_type": "Qwen2VLImageProcessor",
                                     "processor_class": "Qwen2_5_VLProcessor"},
        "video_preprocessor_config.json": {**common, "video_processor_type": "Qwen2VLVideoProcessor",
                                           "processor_class": "Qwen2_5_VLProcessor", "fps": FPS,
                                           "do_sample_frames": False},
        "processor_config.json": {"processor_class": "Qwen2_5_VLProcessor"},
    }


def save_micro_video(model: Any, path: str | Path) -> None:
    """``save_pretrained`` of the model and tokenizer (chat template included) and the processor configs."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    build_tokenizer().save_pretrained(path)
    for name, data in processor_files().items():
        (path / name).write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
