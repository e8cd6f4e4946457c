"""The micro LLaVA: a ``LlavaForConditionalGeneration`` small enough to train on a laptop CPU, built only from
transformers' own classes so that it goes through exactly the adapter real llava-hf checkpoints use.

- Vision tower: ``CLIPVisionModel`` (with its CLS token), 84x84 RGB input, patch 7: a 12x12 grid of 144 patch
  tokens (each 28 px collage cell is 4x4 patches).
- Projector: LLaVA's two-layer GELU MLP.
- Language model: ``LlamaForCausalLM`` with a word-level vocabulary (every word of the Fashion collage VQA task).
- Tokenizer: a ``tokenizers`` ``WordLevel`` model (lower-casing, whitespace + punctuation split, ``<s>`` prepended)
  wrapped in ``PreTrainedTokenizerFast``; ``<image>`` is a special token.
- Processor: ``LlavaProcessor`` (``CLIPImageProcessorPil``: resize to 84x84, CLIP mean/std) with a chat template
  that renders ``USER: <image>\\n{question} ASSISTANT:``, the llava-1.5 format.

Everything saves with ``save_pretrained`` and loads with ``AutoModelForImageTextToText`` / ``AutoProcessor``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..bench.common import default_model_path
from ..bench.fashion import vocabulary

IMAGE_SIZE = 84
PATCH = 7
GRID = IMAGE_SIZE // PATCH
NUM_IMAGE_TOKENS = GRID * GRID
SPECIAL = ("<pad>", "<unk>", "<s>", "</s>", "<image>")
PAD_ID, UNK_ID, BOS_ID, EOS_ID, IMAGE_ID = range(len(SPECIAL))
CHAT_WORDS = ("user", "assistant", ":")
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}USER: {% else %}ASSISTANT: {% endif %}"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for item in message['content'] %}{% if item['type'] == 'image' %}<image>\n{% endif %}{% endfor %}"
    "{% for item in message['content'] %}{% if item['type'] == 'text' %}{{ item['text'] }}{% endif %}{% endfor %}"
    "{% endif %}"
    "{% if message['role'] == 'user' %} {% else %}</s>{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)
"""llava-1.5's conversation format: ``USER: <image>\\n{question} ASSISTANT:`` (answers end with ``</s>``)."""


def vocab() -> dict[str, int]:
    """Word -> id: the special tokens, the chat words, then every task word in sorted order."""
    words = [*SPECIAL, *CHAT_WORDS, *(w for w in vocabulary() if w not in CHAT_WORDS)]
    return {w: i for i, w in enumerate(words)}


def build_tokenizer():
    """The word-level ``PreTrainedTokenizerFast`` (left padding, for batched generation)."""
    from tokenizers import Tokenizer, decoders, normalizers, pre_tokenizers, processors
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(WordLevel(vocab(), unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A $B",
                                                       special_tokens=[("<s>", BOS_ID)])
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=True)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   pad_token="<pad>", extra_special_tokens={"image_token": "<image>"},
                                   padding_side="left", model_max_length=512)


def build_processor():
    """``LlavaProcessor``: the PIL CLIP image processor at 84x84, the word-level tokenizer, the chat template."""
    from transformers import LlavaProcessor
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    image_processor = CLIPImageProcessorPil(
        do_resize=True, size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}, do_center_crop=False,
        do_rescale=True, do_normalize=True, image_mean=list(CLIP_MEAN), image_std=list(CLIP_STD),
        do_convert_rgb=True)
    return LlavaProcessor(image_processor=image_processor, tokenizer=build_tokenizer(), patch_size=PATCH,
                          vision_feature_select_strategy="default", num_additional_image_tokens=1,
                          chat_template=CHAT_TEMPLATE)


def micro_llava_config(vision_hidden: int = 128, vision_layers: int = 3, text_hidden: int = 128, text_layers: int = 4,
                       heads: int = 4, **overrides: Any):
    """The micro LLaVA's ``LlavaConfig`` (CLIP tower 84 px / patch 7 with CLS, Llama LM over :func:`vocab`); the
    projector reads the tower's last layer (``vision_feature_layer=-1``) without CLS (strategy ``"default"``)."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

    vision = CLIPVisionConfig(hidden_size=vision_hidden, intermediate_size=2 * vision_hidden,
                              num_hidden_layers=vision_layers, num_attention_heads=heads, image_size=IMAGE_SIZE,
                              patch_size=PATCH, num_channels=3, projection_dim=vision_hidden)
    text = LlamaConfig(vocab_size=len(vocab()), hidden_size=text_hidden, intermediate_size=3 * text_hidden,
                       num_hidden_layers=text_layers, num_attention_heads=heads, num_key_value_heads=heads,
                       max_position_embeddings=512, pad_token_id=PAD_ID, bos_token_id=BOS_ID,
                       eos_token_id=EOS_ID, tie_word_embeddings=False, rope_theta=10000.0)
    kwargs: dict[str, Any] = dict(vision_config=vision, text_config=text, image_token_index=IMAGE_ID,
                                  image_seq_length=NUM_IMAGE_TOKENS, vision_feature_layer=-1,
                                  vision_feature_select_strategy="default", projector_hidden_act="gelu",
                                  pad_token_id=PAD_ID, bos_token_id=BOS_ID, eos_token_id=EOS_ID)
    kwargs.update(overrides)
    return LlavaConfig(**kwargs)


def pixel_values(images: np.ndarray) -> torch.Tensor:
    """``uint8 [n, 84, 84, 3]`` collages -> ``float32 [n, 3, 84, 84]``, exactly what the processor computes."""
    x = torch.as_tensor(np.asarray(images)).permute(0, 3, 1, 2).float().div_(255.0)
    mean = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    return (x - mean) / std


def rendered_prompt(question: str) -> str:
    """The text the micro LLaVA's chat template renders for one user turn asking ``question`` (image first); the
    bench builds its prompts with the template itself (:func:`vtoken.bench.vqa.chat_prompt`)."""
    return f"USER: <image>\n{question} ASSISTANT:"


def load_micro_llava(path: str | Path | None = None, dtype: torch.dtype = torch.float32):
    """``(model, processor)`` loaded with the Auto classes from ``path`` (default: the shipped model)."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    path = Path(path) if path is not None else default_model_path()
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"no micro LLaVA at {path} (config.json missing); train one with "
                                "`vtoken train-micro` or pass --model")
    model = AutoModelForImageTextToText.from_pretrained(path, dtype=dtype).eval()
    return model, AutoProcessor.from_pretrained(path)
