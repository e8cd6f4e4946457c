"""The functional entry point: :func:`reduce` runs one registered method on a batch of tokens, through
:func:`run_method`, the one dispatch every caller (the model adapters included) uses."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from .core import SIGNALS, Reduction, check_mask, check_signals, check_tokens, identity_reduction, resolve_keep
from .methods import MethodInfo, MethodSpec, all_methods, get_method


def methods() -> list[MethodInfo]:
    """Every registered method with its metadata (name, paper, venue, repo, stage, signals, defaults, parity)."""
    return all_methods()


def run_method(info: MethodInfo, tokens: Tensor, counts: Tensor | None = None, *, keep: Any = None,
               mask: Tensor | None = None, signals: dict[str, Any] | None = None,
               knobs: dict[str, Any] | None = None) -> Reduction:
    """Run ``info``'s method after every check: the tokens, the mask, each argument is one of the method's signals
    or knobs, knob types, ranges and rules, required signals present, every signal's full shape.

    The budget is either ``keep`` (resolved per sample, see :func:`vtoken.core.resolve_keep`) or per-sample
    ``counts [B]``, clipped to each sample's valid tokens (at least 1); neither for a method that sets its own count.
    Where every sample keeps all its valid tokens the result is the identity. :func:`reduce`, the model adapters'
    per-view and per-layer calls all run methods through this one function."""
    signals, knobs = dict(signals or {}), dict(knobs or {})
    tokens = check_tokens(tokens)
    mask = check_mask(mask, tokens)
    info.check_arguments([*signals, *knobs])
    knobs = info.check_knobs(knobs)  # a bad value is reported as such, schedule knobs included
    info.check_one_step(knobs)
    for name in info.signals:
        if signals.get(name) is None:
            raise ValueError(f"method {info.name!r} needs the signal {name!r}: {SIGNALS[name]}")
    signals = check_signals({k: v for k, v in signals.items() if v is not None}, tokens, info.name,
                            shapes=info.signal_shapes)
    if counts is not None and keep is not None:
        raise ValueError("give the budget once: keep or per-sample counts")
    n_valid = mask.sum(-1) if mask is not None else torch.full((tokens.shape[0],), tokens.shape[1],
                                                               device=tokens.device)
    if keep is not None:
        counts = resolve_keep(keep, n_valid) if info.needs_keep else keep
    if not info.needs_keep:
        if counts is not None:
            raise ValueError(f"method {info.name!r} sets its own output count; pass keep=None")
        return info.fn(tokens, None, mask=mask, **signals, **knobs)
    if counts is None:
        raise ValueError(f"keep is required for method {info.name!r}: an int >= 1 or a float in (0, 1]")
    counts = torch.as_tensor(counts, device=tokens.device).long().expand(tokens.shape[0])
    counts = counts.minimum(n_valid).clamp(min=1).contiguous()
    if bool((counts >= n_valid).all()) and not info.cascade:  # a cascade's budget is not a count: it decides
        return identity_reduction(tokens, mask)
    return info.fn(tokens, counts, mask=mask, **signals, **knobs)


def reduce(tokens: Tensor, keep: int | float | MethodSpec | None = None, method: str | MethodSpec = "divprune", *,
           mask: Tensor | None = None, **kwargs: Any) -> Reduction:
    """Reduce ``tokens [B, N, D]`` to ``keep`` tokens per sample with ``method``.

    Args:
        tokens: ``[B, N, D]`` floating tensor (float64, float32, float16 or bfloat16). Scores are computed in float64
            for float64 tokens and in float32 otherwise (floating signals are cast to that dtype, whatever their
            own); the output tokens keep the tokens' dtype.
        keep: an ``int >= 1`` (tokens per sample, clipped to the tokens available) or a ``float`` in ``(0, 1]``
            (ratio of each sample's count, rounded half-up, at least 1). ``keep >= N`` returns every token unchanged.
            Bools are rejected; a one-element tensor or NumPy scalar counts as its value.
        method: a registered name (see :func:`methods` or ``vtoken methods``), or a :func:`vtoken.method` spec
            (its knobs and ``keep`` apply; ``vtoken.reduce(tokens, spec)`` works too).
        mask: optional ``[B, N]`` bool (or 0/1), True on real tokens of padded, variable-length inputs.
        **kwargs: the method's signals (names and full shapes in :data:`vtoken.core.SIGNALS` and
            :data:`vtoken.core.SIGNAL_SHAPES`) and its own knobs (type- and range-checked before the method runs,
            see :func:`vtoken.methods.registry.check_knobs`).

    Returns:
        A :class:`~vtoken.core.Reduction` (``tokens``, ascending ``indices``, ``mask``, ``assign`` for merges).
    """
    if isinstance(keep, MethodSpec):
        keep, method = None, keep
    if isinstance(method, MethodSpec):
        if keep is not None and method.keep is not None:
            raise ValueError(f"keep is given twice: keep={keep!r} and {method!r}; give it once")
        keep = method.keep if keep is None else keep
        clash = sorted(set(kwargs) & set(method.knobs))
        if clash:
            raise ValueError(f"{clash} given both in {method!r} and as arguments; give each once")
        kwargs = {**method.knobs, **kwargs}
        method = method.name
    if not isinstance(method, str):
        hint = ("; vtoken.reduce runs one method: pass keep and knobs as arguments, e.g. "
                "vtoken.reduce(tokens, 8, 'divprune') (lists of methods are for vtoken.apply)"
                if isinstance(method, (tuple, list)) else "")
        raise TypeError(f"method must be a registered method name (a str such as 'divprune'; see vtoken.methods()) "
                        f"or a vtoken.method(...) spec, got {method!r}{hint}")
    return run_method(get_method(method), tokens, keep=keep, mask=mask,
                      signals={k: v for k, v in kwargs.items() if k in SIGNALS},
                      knobs={k: v for k, v in kwargs.items() if k not in SIGNALS})
