"""The model-free demo: reduce the pixel-patch tokens of a sample image with every method.

Each method sees the 24x24 grid of 14-pixel patches of a 336x336 image (the LLaVA-1.5 layout) as tokens; signals a
model would provide (CLS attention, keys, text) are the synthetic stand-ins of :mod:`vtoken.synthetic`. The
image is rebuilt from the kept tokens (each patch takes the output token it was merged into, or its most similar
kept token) and scored by PSNR; overlays show which patches each method kept.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..api import reduce
from ..core import Reduction, resolve_keep
from ..methods import MethodInfo, all_methods, get_method
from ..ops.similarity import cosine_similarity
from ..synthetic import make_signals
from .images import load_image, patchify, unpatchify


@dataclass
class DemoRow:
    method: str
    stage: str
    kept: int
    ms: float
    psnr: float
    note: str = ""


def reconstruct(tokens: torch.Tensor, red: Reduction) -> torch.Tensor:
    """``[N, D]`` patches rebuilt from a one-image reduction: merged inputs take their output token, dropped inputs
    their most cosine-similar kept token."""
    x = tokens[0].float()
    out = red.tokens[0, red.mask[0]].float()
    if out.shape[-1] != x.shape[-1]:
        raise ValueError("output width differs from input width")
    if red.assign is not None:
        slot = red.assign[0].clone()
        dropped = slot < 0
    else:
        slot = torch.full((x.shape[0],), -1, dtype=torch.long)
        slot[red.indices[0, red.mask[0]]] = torch.arange(out.shape[0])
        dropped = slot < 0
    if bool(dropped.any()):
        sim = cosine_similarity(x[None, dropped], out[None], eps=1e-8)[0]
        slot[dropped] = sim.argmax(-1)
    return out[slot]


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    mse = float(((a.float() - b.float()) ** 2).mean())
    return float("inf") if mse == 0 else 10 * math.log10(1.0 / mse)


def overlay(image: np.ndarray, red: Reduction, grid: tuple[int, int], patch: int = 14,
            tokens: torch.Tensor | None = None) -> np.ndarray:
    """Pruning: the image with dropped patches dimmed and kept patches at full brightness. Merging (``assign`` set,
    ``tokens`` given): every patch painted with the mean of the source patches of its group (dropped ones dimmed),
    so the merge groups show whatever arithmetic the method applies to them."""
    h, w = grid
    if red.assign is not None and tokens is not None:
        x = tokens[0].float()
        slot = red.assign[0]
        groups = int(slot.max()) + 1
        sums = torch.zeros(groups, x.shape[1]).index_add_(0, slot.clamp(min=0), x * (slot >= 0)[:, None])
        sizes = torch.zeros(groups).index_add_(0, slot.clamp(min=0), (slot >= 0).float()).clamp(min=1)
        painted = torch.where((slot >= 0)[:, None], (sums / sizes[:, None])[slot.clamp(min=0)], x * 0.25)
        return unpatchify(painted, grid, patch)
    keep = torch.zeros(h * w, dtype=torch.bool)
    keep[red.indices[0, red.mask[0]].clamp(min=0)] = True
    m = keep.reshape(h, w).numpy().repeat(patch, 0).repeat(patch, 1)[..., None]
    return np.where(m, image, (image * 0.25).astype(np.uint8))


def select_methods(methods: Sequence[str] | None = None) -> list[MethodInfo]:
    """The methods the demo runs: every method that takes a ``keep`` budget, or the named ones (a ``ValueError``
    for an unknown name or one without a budget, e.g. a token-restoring step)."""
    if methods is None:
        return [m for m in all_methods() if m.needs_keep]
    if isinstance(methods, str):
        methods = [methods]
    infos: list[MethodInfo] = []
    for name in methods:
        info = get_method(name)
        if not info.needs_keep:
            raise ValueError(f"{info.name!r} takes no keep budget (it restores tokens); the demo runs methods that "
                             "reduce to a budget, see `vtoken methods`")
        if info not in infos:
            infos.append(info)
    if not infos:
        raise ValueError("no method named; leave --methods out to run every method")
    return infos


def run_demo(image_path: str | Path, keep: int | float = 64, methods: Sequence[str] | None = None,
             out_dir: str | Path | None = None) -> list[DemoRow]:
    """Run every (or the named) method on the image; optionally write ``overlays.png`` to ``out_dir``.

    ``keep`` and the method names are checked first (``ValueError`` / ``TypeError``)."""
    resolve_keep(keep, 1)
    infos = select_methods(methods)
    image = load_image(image_path)
    tokens, grid = patchify(image)
    rows, tiles = [], []
    for info in infos:
        sig = make_signals(info, tokens, grid=grid)
        try:
            red = reduce(tokens, keep, info.name, **sig)  # warm-up run, then a timed one
        except (ValueError, TypeError) as err:
            rows.append(DemoRow(info.name, info.stage, 0, 0.0, float("nan"), f"skipped: {err}"))
            continue
        t0 = time.perf_counter()
        red = reduce(tokens, keep, info.name, **sig)
        ms = (time.perf_counter() - t0) * 1e3
        if info.kind == "layout":  # channels grow by the window area; token_unshuffle restores the input exactly
            score, note = float("inf"), f"lossless: {red.tokens.shape[-1]} channels per token"
        else:
            score, note = psnr(reconstruct(tokens, red), tokens[0]), ""
        rows.append(DemoRow(info.name, info.stage, int(red.mask[0].sum()), ms, score, note))
        tiles.append((info.name, overlay(image, red, grid, tokens=tokens)))
    if out_dir is not None and tiles:
        save_sheet(tiles, Path(out_dir) / "overlays.png")
    return rows


def save_sheet(tiles: list[tuple[str, np.ndarray]], path: Path, cols: int = 6) -> Path:
    """A labelled contact sheet of overlay tiles."""
    from PIL import Image, ImageDraw

    size = tiles[0][1].shape[0]
    rows = (len(tiles) + cols - 1) // cols
    sheet = Image.new("RGB", (cols * size, rows * (size + 18)), "white")
    draw = ImageDraw.Draw(sheet)
    for i, (name, tile) in enumerate(tiles):
        x, y = (i % cols) * size, (i // cols) * (size + 18)
        sheet.paste(Image.fromarray(tile), (x, y + 18))
        draw.text((x + 4, y + 3), name, fill="black")
    path.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(path)
    return path

