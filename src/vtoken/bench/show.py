"""``vtoken show``: an overlay PNG of the visual tokens a method keeps on one image, with the model's answers."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch

from ..core import resolve_keep
from ..methods import get_method
from .errors import UsageError, user_input
from .images import open_rgb
from .report import overlay_tile
from .run import load_model, writable_dir
from .vqa import chat_prompt

#: output file extensions ``show`` writes (those of them the installed Pillow can save)
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")


def saveable_extensions() -> list[str]:
    """The :data:`IMAGE_EXTENSIONS` the installed Pillow can write."""
    from PIL import Image

    formats = Image.registered_extensions()
    return [e for e in IMAGE_EXTENSIONS if formats.get(e) in Image.SAVE]


def output_path(out: str | Path | None, image: str | Path, method: str, keep: int | float) -> Path:
    """The file ``show`` writes (default: ``out/show/<image>_<method>_<keep>.png``), its folder created and probed;
    a :class:`~.errors.UsageError` naming ``--out`` for a folder, a missing or unsupported extension or a place
    that cannot be written."""
    target = Path(out).expanduser() if out is not None else Path("out/show") / f"{Path(image).stem}_{method}_{keep}.png"
    accepted = saveable_extensions()
    if target.is_dir():
        raise UsageError(f"--out {out}: a folder; give an image file name ending in {', '.join(accepted)}")
    if target.suffix.lower() not in accepted:
        raise UsageError(f"--out {out}: " + (f"unsupported extension {target.suffix!r}" if target.suffix else
                                             "no file extension") + f"; end it in one of {', '.join(accepted)}")
    try:
        writable_dir(target.parent, arg="its folder")
    except UsageError as err:
        raise UsageError(f"--out {out if out is not None else target}: {err}") from err
    return target


def show(image: str | Path, method: str, keep: int | float, *, model_path: str | Path | None = None,
         question: str = "what is in the middle center?", out: str | Path | None = None, scale: int = 4,
         allow_download: bool = False) -> Path:
    """Run ``method`` at ``keep`` on ``image`` through the model (default: the bundled micro LLaVA) and write
    ``[image | kept tokens]`` side by side with the full and the reduced model's answers; returns the PNG path.

    The method, ``keep``, the image, ``out`` and the model folder are checked before the model loads
    (:class:`~.errors.UsageError` or ``FileNotFoundError``); ``allow_download`` lets ``model_path`` be a hub id."""
    from PIL import Image, ImageDraw

    from ..models import apply, find_adapter

    with user_input("--method"):
        info = get_method(method)
    with user_input("--keep"):
        resolve_keep(keep, 1, name="--keep")
    if isinstance(scale, bool) or not isinstance(scale, int) or scale < 1:
        raise UsageError(f"scale must be an int >= 1, got {scale!r}")
    path = Path(image)
    if not path.is_file():
        raise FileNotFoundError(f"IMAGE {image!s}: no such file")
    with user_input("IMAGE"):
        pil = open_rgb(path)
    target = output_path(out, path, info.name, keep)
    model, processor = load_model(model_path, allow_download=allow_download)
    with user_input(f"--model {model_path}"):
        adapter = find_adapter(model)
    why = adapter.unsupported(info)
    if why:
        raise UsageError(f"--method {info.name}: cannot run on {type(model).__name__}: {why}")
    prompt = chat_prompt(processor, question)
    inputs = processor(images=[pil], text=[prompt], return_tensors="pt")
    pad = getattr(processor.tokenizer, "pad_token_id", None)

    def ask() -> str:
        with torch.inference_mode():
            gen = model.generate(**inputs, max_new_tokens=8, do_sample=False, pad_token_id=pad)
        return processor.batch_decode(gen[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)[0].strip()

    full_answer = ask()
    with apply(model, info.name, keep=keep) as handle:
        reduced_answer = ask()
        red = handle.last
    if red is None:
        raise UsageError(f"--method {info.name} recorded no reduction on this image with this model")
    n = int((inputs["input_ids"] == model.config.image_token_id).sum())
    side = math.isqrt(n)
    if side * side != n:
        raise UsageError(f"--model {model_path}: gives {n} visual tokens per image, not a square grid; show needs "
                         "one")
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
    draw.text((4, 4), f"{info.name}, keep={keep}: {kept} of {n} visual tokens", fill="black")
    draw.text((4, 20), f"Q: {question}", fill="black")
    draw.text((4, 36), f"full: {full_answer!r}   reduced: {reduced_answer!r}", fill="black")
    canvas.save(target)
    return target
