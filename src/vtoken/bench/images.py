"""Bundled sample images and pixel-patch tokens for the demo (no model needed)."""

from __future__ import annotations

from importlib import resources
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

SAMPLES = ("astronaut", "chelsea")


def sample_path(name: str = "astronaut") -> Path:
    """Path of a bundled 336x336 sample image (public-domain scikit-image samples)."""
    if name not in SAMPLES:
        raise ValueError(f"unknown sample image {name!r}; bundled: {', '.join(SAMPLES)}")
    return Path(str(resources.files("vtoken") / "assets" / f"{name}.png"))


def load_image(path: str | Path, size: int = 336) -> np.ndarray:
    """An RGB image as ``uint8 [size, size, 3]`` (center-cropped to a square, then resized)."""
    from PIL import Image

    im = Image.open(path).convert("RGB")
    w, h = im.size
    s = min(w, h)
    im = im.crop(((w - s) // 2, (h - s) // 2, (w - s) // 2 + s, (h - s) // 2 + s)).resize((size, size))
    return np.asarray(im)


def patchify(image: np.ndarray, patch: int = 14) -> tuple[Tensor, tuple[int, int]]:
    """Pixel patches as tokens: ``uint8 [S, S, 3]`` -> ``float32 [1, H*W, patch*patch*3]`` in [0, 1], and ``(H, W)``."""
    s = image.shape[0]
    if s % patch:
        raise ValueError(f"image size {s} is not a multiple of patch={patch}")
    g = s // patch
    x = torch.from_numpy(image.astype(np.float32) / 255.0)
    x = x.reshape(g, patch, g, patch, 3).permute(0, 2, 1, 3, 4).reshape(1, g * g, patch * patch * 3)
    return x, (g, g)


def unpatchify(tokens: Tensor, grid: tuple[int, int], patch: int = 14) -> np.ndarray:
    """Inverse of :func:`patchify` for one image: ``[H*W, patch*patch*3]`` -> ``uint8 [H*p, W*p, 3]``."""
    h, w = grid
    x = tokens.float().clamp(0, 1).reshape(h, w, patch, patch, 3).permute(0, 2, 1, 3, 4)
    return (x.reshape(h * patch, w * patch, 3).numpy() * 255).round().astype(np.uint8)
