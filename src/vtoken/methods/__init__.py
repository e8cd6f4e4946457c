"""One module per named method (paper). Importing this package registers every method found here."""

from __future__ import annotations

import importlib
import pkgutil

from .registry import KINDS, STAGES, LLMSchedule, MethodInfo, all_methods, get_method, register

__all__ = ["KINDS", "STAGES", "LLMSchedule", "MethodInfo", "all_methods", "get_method", "register"]

for _mod in sorted(m.name for m in pkgutil.iter_modules(__path__)):
    if _mod != "registry" and not _mod.startswith("_"):
        importlib.import_module(f"{__name__}.{_mod}")
