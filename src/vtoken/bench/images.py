"""Bundled sample images and pixel-patch tokens for the demo (no model needed)."""

from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import Tensor

if TYPE_CHECKING:
    from PIL import Image

SAMPLES = ("astronaut", "chelsea")


def sample_path(name: str = "astronaut") -> Path:
    """Path of a bundled 336x336 sample image (public-domain scikit-image samples)."""
    if name not in SAMPLES:
        raise ValueError(f"unknown sample image {name!r}; bundled: {', '.join(SAMPLES)}")
    return Path(str(resources.files("vtoken") / "assets" / f"{name}.png"))


def to_rgb(im: Image.Image) -> Image.Image:
    """A Pillow image as 8-bit RGB, scaled by its bit depth rather than clipped at 255 (Pillow's own ``convert``
    clips, which turns a 16-bit photo almost white).

    - ``I;16*`` (16-bit grayscale, e.g. a 16-bit PNG): ``v / 257`` (65535 -> 255).
    - ``I`` (32-bit int): 16-bit data when every value is in [0, 65535] (how older Pillow and several formats hand
      over 16-bit images), ``v / 257``; otherwise the int32 range, ``v / (2**31 - 1) * 255`` (negatives -> 0).
    - ``F`` (float): values in [0, 1] are ratios, ``v * 255``; otherwise the image's own range is stretched to
      [0, 255].
    - everything else (``L``, ``P``, ``RGBA``, ``CMYK``, ...): Pillow's ``convert("RGB")``.
    """
    from PIL import Image

    mode = im.mode
    if mode.startswith("I;16") or mode in ("I", "F"):
        x = np.asarray(im).astype(np.float64)
        lo, hi = (float(x.min()), float(x.max())) if x.size else (0.0, 0.0)
        if mode == "F":
            if not np.isfinite(x).all():
                x = np.nan_to_num(x, nan=0.0, posinf=hi if np.isfinite(hi) else 1.0, neginf=0.0)
                lo, hi = float(x.min()), float(x.max())
            x = x * 255.0 if lo >= 0.0 and hi <= 1.0 else (x - lo) * (255.0 / (hi - lo) if hi > lo else 0.0)
        elif mode.startswith("I;16") or (lo >= 0 and hi <= 65535):
            x = x / 257.0
        else:
            x = x.clip(0, None) * (255.0 / (2**31 - 1))
        gray = Image.fromarray(np.rint(x).clip(0, 255).astype(np.uint8))
        return gray.convert("RGB")
    return im.convert("RGB")


def open_rgb(path: str | Path) -> Image.Image:
    """The image file ``path`` as 8-bit RGB (:func:`to_rgb`; EXIF orientation applied, first frame of an
    animation); a ``ValueError`` naming the file when Pillow cannot read it."""
    from PIL import Image, ImageOps, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            im.load()
            im = ImageOps.exif_transpose(im)
            return to_rgb(im)
    except UnidentifiedImageError:
        raise ValueError(f"{path}: not an image file Pillow can read (png, jpeg, webp, tiff, bmp, ...)") from None
    except (OSError, SyntaxError) as err:  # truncated or corrupt data
        if isinstance(err, (FileNotFoundError, IsADirectoryError, PermissionError)):
            raise
        raise ValueError(f"{path}: cannot decode the image ({err})") from None


def load_image(path: str | Path, size: int = 336) -> np.ndarray:
    """An RGB image as ``uint8 [size, size, 3]`` (center-cropped to a square, then resized; 16-bit and float images
    scaled by their bit depth, see :func:`to_rgb`)."""
    im = open_rgb(path)
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
