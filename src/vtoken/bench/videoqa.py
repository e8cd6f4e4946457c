"""Answering Fashion clips questions with a Qwen2.5-VL-style video VLM: inputs as ``Qwen2_5_VLProcessor`` builds
them for a video, then greedy ``generate`` (the video counterpart of :mod:`vtoken.bench.vqa`).

transformers' video processors need torchvision, which this project cannot depend on (the CPU torch breaks it), so
:func:`video_pixels` does Qwen2-VL's video arithmetic in torch (rescale, normalise, Qwen's patch layout; tested
against transformers' own image processor on held frames) and :class:`MicroVideoProcessor` adds the chat template
through the model folder's ``AutoTokenizer``. The micro video VLM (:mod:`vtoken.training.micro_video`) saves the
processor configs transformers reads too, so ``AutoProcessor`` loads it where torchvision is installed.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from . import clips as C
from .common import default_video_model_path

FRAME = C.ROWS * C.CELL
PATCH, TEMPORAL, MERGE = 7, 2, 2
GRID = FRAME // PATCH                          # patches per side
TOKENS_PER_STEP = (GRID // MERGE) ** 2         # merged tokens per temporal patch
SPECIAL = ("<pad>", "<unk>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|video_pad|>",
           "<|image_pad|>")
PAD_ID, UNK_ID, IM_START, IM_END, VISION_START, VISION_END, VIDEO_ID, IMAGE_ID = range(len(SPECIAL))
#: Qwen2-VL's image mean / std (OpenAI CLIP's)
MEAN = (0.48145466, 0.4578275, 0.40821073)
STD = (0.26862954, 0.26130258, 0.27577711)
FPS = 2.0                                       # frames a second: one step (2 frames) is one second
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for item in message['content'] %}{% if item['type'] == 'video' %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}{% endfor %}{% endif %}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
"""Qwen2.5-VL's conversation format, for a video and a question."""


def video_pixels(frames: np.ndarray) -> tuple[Tensor, Tensor]:
    """``uint8 [F, H, W, 3]`` frames -> ``(pixel_values_videos [T * h * w, 3 * 2 * 7 * 7], video_grid_thw [3])``,
    what Qwen2-VL's video processor computes: rescale by 1/255, normalise (:data:`MEAN` / :data:`STD`), pad ``F`` to
    a multiple of 2 with the last frame, then one row per patch in Qwen's order (temporal patch, then 2 x 2 merge
    groups in raster order, then the patches of a group), each row ``(channel, frame of the pair, y, x)``. Frames
    must be multiples of 14 px (the factor Qwen's resize rounds to; no resize here)."""
    x = torch.tensor(np.asarray(frames)).permute(0, 3, 1, 2).float().div_(255.0)
    x = (x - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)
    f, c, h, w = x.shape
    if h % (PATCH * MERGE) or w % (PATCH * MERGE):
        raise ValueError(f"frames must be multiples of {PATCH * MERGE} px, got {h} x {w}")
    if f % TEMPORAL:
        x = torch.cat([x, x[-1:].expand(TEMPORAL - f % TEMPORAL, -1, -1, -1)])
    t, gh, gw = x.shape[0] // TEMPORAL, h // PATCH, w // PATCH
    x = x.reshape(t, TEMPORAL, c, gh // MERGE, MERGE, PATCH, gw // MERGE, MERGE, PATCH)
    x = x.permute(0, 3, 6, 4, 7, 2, 1, 5, 8)  # t, gh/m, gw/m, m, m, C, tps, p, p
    return x.reshape(t * gh * gw, c * TEMPORAL * PATCH * PATCH).contiguous(), torch.tensor([t, gh, gw])


def video_token_count(grid: Tensor) -> int:
    return int(grid.prod()) // (MERGE * MERGE)


class MicroVideoProcessor:
    """What ``Qwen2_5_VLProcessor`` does for this model's videos, in torch (module docstring): ``tokenizer`` is the
    ``AutoTokenizer`` with the chat template."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer

    def prompt(self, question: str) -> str:
        """The chat template's rendering of one user turn (a video, then ``question``), generation prompt added."""
        messages = [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": question}]}]
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

    def __call__(self, clips: list[np.ndarray], questions: list[str]) -> dict[str, Tensor]:
        """A left-padded batch: ``input_ids``, ``attention_mask``, ``mm_token_type_ids``, ``pixel_values_videos``,
        ``video_grid_thw``, ``second_per_grid_ts`` (one video per prompt, its placeholder expanded)."""
        if len(clips) != len(questions):
            raise ValueError(f"{len(clips)} clips for {len(questions)} questions")
        pixels, grids, texts = [], [], []
        pad = SPECIAL[VIDEO_ID]
        for frames, q in zip(clips, questions, strict=True):
            px, grid = video_pixels(frames)
            pixels.append(px)
            grids.append(grid)
            texts.append(self.prompt(q).replace(pad, " ".join([pad] * video_token_count(grid)), 1))
        enc = self.tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
        ids = enc["input_ids"]
        return {"input_ids": ids, "attention_mask": enc["attention_mask"],
                "mm_token_type_ids": 2 * (ids == VIDEO_ID).int(),
                "pixel_values_videos": torch.cat(pixels), "video_grid_thw": torch.stack(grids),
                "second_per_grid_ts": torch.full((len(clips),), TEMPORAL / FPS)}

    def decode(self, ids: Tensor) -> list[str]:
        return [t.strip() for t in self.tokenizer.batch_decode(ids, skip_special_tokens=True)]




def load_video_model(path: str | Path | None = None, dtype: torch.dtype = torch.float32):
    """``(model, processor)``: the model with ``AutoModelForImageTextToText``, the tokenizer with ``AutoTokenizer``,
    wrapped in :class:`MicroVideoProcessor` (default path: the shipped micro video VLM)."""
    from transformers import AutoModelForImageTextToText, AutoTokenizer

    path = Path(path) if path is not None else default_video_model_path()
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"no video model at {path} (config.json missing); train one with "
                                "`vtoken train-micro --only video` or pass --model")
    model = AutoModelForImageTextToText.from_pretrained(path, dtype=dtype).eval()
    return model, MicroVideoProcessor(AutoTokenizer.from_pretrained(path))


def prepare_video_batches(processor: MicroVideoProcessor, examples: Sequence[C.ClipExample],
                          batch_size: int) -> list[dict[str, Tensor]]:
    """Processor inputs for consecutive batches of ``examples``."""
    return [processor([e.frames for e in examples[i:i + batch_size]],
                      [e.question for e in examples[i:i + batch_size]]) for i in range(0, len(examples), batch_size)]


@torch.inference_mode()
def answer_videos(model: nn.Module, processor: MicroVideoProcessor, batches: list[dict[str, Tensor]],
                  indices: Sequence[int], max_new_tokens: int = 4,
                  on_batch: Callable[[], None] | None = None) -> dict[int, list[str]]:
    """Greedy answers of the batches numbered ``indices``."""
    dev = next(model.parameters()).device
    out: dict[int, list[str]] = {}
    for i in indices:
        inputs = {k: v.to(dev) for k, v in batches[i].items()}
        gen = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=PAD_ID)
        out[i] = processor.decode(gen[:, inputs["input_ids"].shape[1]:])
        if on_batch is not None:
            on_batch()
    return out


__all__ = ["MicroVideoProcessor", "answer_videos", "load_video_model", "prepare_video_batches", "video_pixels"]
