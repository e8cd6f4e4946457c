"""What both trainers share: file names, the device choice, RNG state and checkpoint helpers for bit-exact resume."""

from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

__all__ = ["CHECKPOINT", "METRICS", "check_resume", "pick_device", "rng_state", "save_atomic", "set_rng_state"]

CHECKPOINT = "checkpoint.pt"
"""The resumable state a trainer writes in its ``out_dir``."""
METRICS = "metrics.json"
"""The metrics a trainer writes in its ``out_dir``."""


def pick_device(device: str | torch.device | None) -> torch.device:
    """``device`` as a ``torch.device``; ``None``: CUDA when available, else the CPU."""
    if device is not None:
        return torch.device(device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def rng_state() -> dict:
    """The torch, numpy and Python RNG states (and CUDA's when present), for a checkpoint."""
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    """Restore the RNG states :func:`rng_state` returned."""
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _comparable(run: dict) -> dict:
    """Run arguments as compared on resume (the transformers version that wrote the config does not count)."""
    model = {k: v for k, v in run.get("model", {}).items() if k != "transformers_version"}
    return {**run, "model": model}


def check_resume(saved: dict, run: dict, keys: tuple[str, ...], path: Path) -> None:
    """Raise a ``ValueError`` naming the differing ``keys`` when the checkpoint at ``path`` was written by a run
    whose arguments (``saved``) differ from ``run``."""
    if _comparable(saved) != _comparable(run):
        diff = sorted(k for k in keys if _comparable(saved).get(k) != _comparable(run).get(k))
        raise ValueError(f"{path} was written by a run with other arguments ({', '.join(diff)}); "
                         "use another out_dir or resume=False")


def save_atomic(obj: Any, path: Path) -> None:
    """``torch.save(obj, path)`` through a temporary file, so that an interrupted write leaves the old file."""
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)
