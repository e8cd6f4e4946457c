"""vtoken: training-free visual-token reduction for vision transformers and vision-language models."""

from __future__ import annotations

from .api import methods, reduce
from .core import SIGNALS, Reduction, resolve_keep
from .methods import MethodInfo, MethodSpec, get_method, method, register
from .models import Handle, apply, handle_of

__version__ = "0.1.0"

__all__ = [
    "SIGNALS",
    "Handle",
    "MethodInfo",
    "MethodSpec",
    "Reduction",
    "__version__",
    "apply",
    "get_method",
    "handle_of",
    "method",
    "methods",
    "reduce",
    "register",
    "resolve_keep",
]
