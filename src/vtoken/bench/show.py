"""``vtoken show``: an overlay PNG of the visual tokens a method keeps on one image, with the model's answers."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch

from .report import overlay_tile
from .run import chat_prompt, load_model


def show(image: str | Path, method: str, keep: int | float, *, model_path: str | Path | None = None,
         question: str = "what is in the middle center?", out: str | Path | None = None, scale: int = 4) -> Path:
    """Run ``method`` at ``keep`` on ``image`` through the model (default: the bundled micro LLaVA) and write
    ``[image | kept tokens]`` side by side with the full and the reduced model's answers; returns the PNG path."""
    from PIL import Image, ImageDraw

    from ..models import apply

    path = Path(image)
    if not path.is_file():
        raise FileNotFoundError(f"IMAGE {image!s}: no such file")
    model, processor = load_model(model_path)
    pil = Image.open(path).convert("RGB")
    prompt = chat_prompt(processor, question)
    inputs = processor(images=[pil], text=[prompt], return_tensors="pt")
    pad = getattr(processor.tokenizer, "pad_token_id", None)

    def ask() -> str:
        with torch.inference_mode():
            gen = model.generate(**inputs, max_new_tokens=8, do_sample=False, pad_token_id=pad)
        return processor.batch_decode(gen[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)[0].strip()

    full_answer = ask()
    with apply(model, method, keep=keep) as handle:
        reduced_answer = ask()
        red = handle.last
    if red is None:
        raise ValueError(f"{method!r} recorded no reduction on this image")
    n = int((inputs["input_ids"] == model.config.image_token_id).sum())
    side = math.isqrt(n)
    if side * side != n:
        raise ValueError(f"the model gives {n} visual tokens per image, not a square grid; show needs one")
    pixels = inputs["pixel_values"][0]
    size = (int(pixels.shape[-1]) * scale, int(pixels.shape[-2]) * scale)
    base = np.asarray(pil.resize((int(pixels.shape[-1]), int(pixels.shape[-2]))).resize(size, Image.NEAREST))
    tile = overlay_tile(base, red.indices[0], red.mask[0], (side, side),
                        red.assign[0] if red.assign is not None else None)
    kept = int(red.mask[0].sum())
    canvas = Image.new("RGB", (2 * size[0] + 12, size[1] + 58), "white")
    canvas.paste(Image.fromarray(base), (0, 58))
    canvas.paste(Image.fromarray(tile), (size[0] + 12, 58))
    draw = ImageDraw.Draw(canvas)
    draw.text((4, 4), f"{method}, keep={keep}: {kept} of {n} visual tokens", fill="black")
    draw.text((4, 20), f"Q: {question}", fill="black")
    draw.text((4, 36), f"full: {full_answer!r}   reduced: {reduced_answer!r}", fill="black")
    target = Path(out) if out is not None else Path("out/show") / f"{path.stem}_{method}_{keep}.png"
    target.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(target)
    return target
