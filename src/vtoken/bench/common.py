"""What the bench shares with :mod:`vtoken.training`: the bundled micro models' folders and the progress bar.

The trainers import this module (and :mod:`~vtoken.bench.fashion`, :mod:`~vtoken.bench.vqa`); nothing in
``vtoken.bench`` imports ``vtoken.training``.
"""

from __future__ import annotations

from contextlib import nullcontext
from importlib import resources
from pathlib import Path

__all__ = ["default_model_path", "default_video_model_path", "default_vit_path", "progress_bar"]


def default_model_path() -> Path:
    """Directory of the shipped, trained micro LLaVA (``vtoken/assets/micro_llava``): ``vtoken bench``'s default
    model."""
    return Path(str(resources.files("vtoken") / "assets" / "micro_llava"))


def default_video_model_path() -> Path:
    """Directory of the shipped, trained micro video VLM (``vtoken/assets/micro_video``): ``vtoken bench --suite
    video``'s default model."""
    return Path(str(resources.files("vtoken") / "assets" / "micro_video"))


def default_vit_path() -> Path:
    """Directory of the shipped, trained micro ViT classifier (``vtoken/assets/micro_vit``)."""
    return Path(str(resources.files("vtoken") / "assets" / "micro_vit"))


def progress_bar(enabled: bool):
    """A ``rich`` progress bar (description, bar, done/total, elapsed, remaining, the task's ``info`` field) as a
    context manager, or ``nullcontext(None)`` when not ``enabled``."""
    if not enabled:
        return nullcontext(None)
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    return Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    TimeRemainingColumn(), TextColumn("{task.fields[info]}"))
