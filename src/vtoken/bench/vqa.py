"""Answering VQA questions through a model's public path: the processor's chat template, then greedy ``generate``.

Shared by ``vtoken bench`` (:mod:`vtoken.bench.run`), ``vtoken show`` and the micro LLaVA trainer's final test
(:func:`vtoken.training.train_llava.generate_answers`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn

from .fashion import Example

__all__ = ["answer", "chat_prompt", "prepare_batches", "to_device"]


def chat_prompt(processor, question: str) -> str:
    """The processor's chat template for one user turn: an image, then ``question``."""
    return processor.apply_chat_template([{"role": "user", "content": [
        {"type": "image"}, {"type": "text", "text": question}]}], add_generation_prompt=True)


def prepare_batches(processor, examples: Sequence[Example], batch_size: int) -> list[dict[str, torch.Tensor]]:
    """Processor inputs (chat prompt + image, left padded) for consecutive batches of ``examples``."""
    out = []
    for i in range(0, len(examples), batch_size):
        exs = examples[i:i + batch_size]
        prompts = [chat_prompt(processor, e.question) for e in exs]
        out.append(dict(processor(images=[e.image for e in exs], text=prompts, return_tensors="pt",
                                  padding=True)))
    return out


def to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    """``batch`` with its tensors on ``device`` (other values unchanged)."""
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


@torch.inference_mode()
def answer(model: nn.Module, processor, batches: list[dict[str, torch.Tensor]], indices: Sequence[int],
           max_new_tokens: int = 4, on_batch: Callable[[], None] | None = None) -> dict[int, list[str]]:
    """Greedy answers of the batches numbered ``indices``."""
    dev = next(model.parameters()).device
    pad = getattr(processor.tokenizer, "pad_token_id", None)
    out: dict[int, list[str]] = {}
    for i in indices:
        inputs = to_device(batches[i], dev)
        gen = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad)
        out[i] = [s.strip() for s in processor.batch_decode(gen[:, inputs["input_ids"].shape[1]:],
                                                            skip_special_tokens=True)]
        if on_batch is not None:
            on_batch()
    return out
