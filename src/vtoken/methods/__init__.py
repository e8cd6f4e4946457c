"""One module per named method (paper). Importing this package registers every method found here."""

from __future__ import annotations

import importlib
import pkgutil

from .registry import KINDS, LM_STAGES, STAGES, LLMSchedule, MethodInfo, SignalSpec, all_methods, get_method, register
from .spec import MethodSpec, method

__all__ = ["KINDS", "LM_STAGES", "STAGES", "LLMSchedule", "MethodInfo", "MethodSpec", "SignalSpec", "all_methods",
           "get_method", "method", "register"]

for _mod in sorted(m.name for m in pkgutil.iter_modules(__path__)):
    if _mod not in ("registry", "spec") and not _mod.startswith("_"):
        importlib.import_module(f"{__name__}.{_mod}")
