"""One adapter per model family, and :func:`apply`, which patches one model instance with a method pipeline."""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

from torch import nn

from ..methods import MethodInfo
from .base import Adapter, Handle
from .idefics3 import Idefics3Adapter
from .internvl import InternVLAdapter
from .llava import LlavaAdapter
from .llava_next import LlavaNextAdapter
from .llava_next_video import LlavaNextVideoAdapter
from .llava_onevision import LlavaOnevisionAdapter
from .pipeline import build_steps
from .qwen2_vl import Qwen2VLAdapter, Qwen25VLAdapter
from .qwen3_vl import Qwen3VLAdapter
from .vit import VitAdapter

ADAPTERS: list[type[Adapter]] = [LlavaAdapter, LlavaNextAdapter, LlavaNextVideoAdapter, LlavaOnevisionAdapter,
                                 Qwen2VLAdapter, Qwen25VLAdapter, Qwen3VLAdapter, InternVLAdapter, Idefics3Adapter,
                                 VitAdapter]

__all__ = ["ADAPTERS", "Adapter", "Handle", "apply", "families_supporting", "find_adapter", "handle_of"]


def find_adapter(model: Any) -> type[Adapter]:
    """The adapter class for ``model``; a ``TypeError`` listing the supported families otherwise."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module (a Hugging Face model), got {type(model).__name__}")
    inner = getattr(model, "_orig_mod", None)
    if isinstance(inner, nn.Module):
        raise TypeError(f"model is a torch.compile wrapper ({type(model).__name__}) of {type(inner).__name__}: apply "
                        "vtoken first, then compile: handle = vtoken.apply(model, ...); model = torch.compile(model)")
    for cls in ADAPTERS:
        if cls.matches(model):
            return cls
    known = ", ".join(f"{c.family} ({'/'.join(c.model_classes)})" for c in ADAPTERS)
    raise TypeError(f"unsupported model {type(model).__name__}; vtoken.apply supports: {known}")


def families_supporting(info: MethodInfo) -> list[str]:
    """Families whose adapter can run ``info``."""
    return [c.family for c in ADAPTERS if c.unsupported(info) is None]


def apply(model: nn.Module, method: str | Sequence[str | tuple[str, dict[str, Any]]], keep: int | float | None = None,
          **kwargs: Any) -> Handle:
    """Patch ``model`` (this instance only) so every forward with images reduces its visual tokens.

    Args:
        model: a supported Hugging Face VLM (see ``vtoken.models.ADAPTERS``).
        method: a method name, or a list of names / ``(name, {knob: value, "keep": k})`` pairs, run in stage order.
        keep: tokens kept per image, an ``int`` count or a ``float`` ratio (per method unless a pair overrides it).
        **kwargs: method knobs, given to every listed method that accepts them, and the family's own options
            (``Adapter.options``, e.g. ``layers``/``schedule`` for encoder-stage methods in a ViT).

    Returns:
        A :class:`Handle`: ``handle.remove()`` (or leaving a ``with`` block) restores the model exactly;
        ``handle.last`` holds the reduction of the latest forward.
    """
    adapter_cls = find_adapter(model)
    recipe = copy.deepcopy((method, keep, kwargs))  # to patch a deep copy the same way
    options = {k: kwargs.pop(k) for k in list(kwargs) if k in adapter_cls.options}
    steps = build_steps(method, keep, kwargs)
    for step in steps:
        why = adapter_cls.unsupported(step.info)
        if why is not None:
            raise ValueError(f"method {step.info.name!r} cannot run on {type(model).__name__}: {why}")
    adapter = adapter_cls(model, steps, **options)
    handle = Handle(model, adapter, steps, recipe)
    try:
        adapter.attach(handle)
    except Exception:
        adapter.detach()
        raise
    handle.guard()
    return handle


def handle_of(model: nn.Module) -> Handle | None:
    """The active :class:`Handle` patching ``model`` (e.g. a ``copy.deepcopy`` of a patched model), else ``None``."""
    handle = model.__dict__.get("_vtoken_handle")
    return handle if isinstance(handle, Handle) and handle.active else None
