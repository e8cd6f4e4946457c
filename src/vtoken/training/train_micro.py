"""``vtoken train-micro``: train both bundled micro models with the recipes that produced the shipped weights.

- ``<out>/vit``: the micro ViT classifier (:mod:`vtoken.training.train_vit`, :data:`VIT_RECIPE`).
- ``<out>/llava``: the micro LLaVA (:mod:`vtoken.training.train_llava`, its defaults).
- ``<out>/video``: the micro video VLM on Fashion clips (:mod:`vtoken.training.train_video`, its defaults).

Both are seeded and resume from their checkpoints (run the same command again after an interruption); both use
CUDA when present. ``install=True`` copies the trained models into the package (``vtoken/assets``), replacing the
shipped ones.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from ..bench.common import default_model_path, default_video_model_path, default_vit_path

VIT_RECIPE: dict[str, Any] = {"epochs": 6, "batch_size": 128, "lr": 2e-3, "augment": False}
"""The micro ViT's training arguments (model: :func:`~vtoken.training.train_vit.micro_vit_config`)."""
_MODEL_FILES = ("config.json", "model.safetensors", "generation_config.json", "processor_config.json",
                "preprocessor_config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                "chat_template.jinja", "chat_template.json", "metrics.json", "video_preprocessor_config.json")


def install_model(src: Path, dst: Path) -> Path:
    """Copy a trained model's files (not its checkpoint) from ``src`` to ``dst``."""
    if not (src / "config.json").is_file():
        raise FileNotFoundError(f"{src}: no trained model (config.json missing)")
    dst.mkdir(parents=True, exist_ok=True)
    for name in _MODEL_FILES:
        if (src / name).is_file():
            shutil.copy2(src / name, dst / name)
    return dst


def train_micro(out: str | Path = "out/micro", *, seed: int = 0, root: str | Path | None = None,
                device: str | None = None, install: bool = False, only: str | None = None,
                resume: bool = True) -> dict[str, Any]:
    """Train the micro ViT, the micro LLaVA and the micro video VLM into ``out``; returns ``{"vit": metrics,
    "llava": metrics, "video": metrics}`` (those trained)."""
    from .train_llava import train_llava
    from .train_video import train_video
    from .train_vit import train_vit

    if only not in (None, "vit", "llava", "video"):
        raise ValueError(f"only must be None, 'vit', 'llava' or 'video', got {only!r}")
    out = Path(out)
    metrics: dict[str, Any] = {}
    if only in (None, "vit"):
        metrics["vit"] = train_vit(out / "vit", seed=seed, root=root, device=device, resume=resume, **VIT_RECIPE)
        if install and metrics["vit"].get("finished"):
            install_model(out / "vit", default_vit_path())
    if only in (None, "llava"):
        metrics["llava"] = train_llava(out / "llava", seed=seed, root=root, device=device, resume=resume)
        if install and metrics["llava"].get("finished"):
            install_model(out / "llava", default_model_path())
    if only in (None, "video"):
        metrics["video"] = train_video(out / "video", seed=seed, root=root, device=device, resume=resume)
        if install and metrics["video"].get("finished"):
            install_model(out / "video", default_video_model_path())
    return metrics
