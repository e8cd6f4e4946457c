"""The functional entry point: :func:`reduce` runs one registered method on a batch of tokens."""

from __future__ import annotations

import inspect
from typing import Any

from torch import Tensor

from .core import SIGNALS, Reduction, check_mask, check_signals, check_tokens, identity_reduction, resolve_keep
from .methods import MethodInfo, all_methods, get_method


def methods() -> list[MethodInfo]:
    """Every registered method with its metadata (name, paper, venue, repo, stage, signals, defaults, parity)."""
    return all_methods()


def reduce(tokens: Tensor, keep: int | float | None = None, method: str = "divprune", *, mask: Tensor | None = None,
           **kwargs: Any) -> Reduction:
    """Reduce ``tokens [B, N, D]`` to ``keep`` tokens per sample with ``method``.

    Args:
        tokens: ``[B, N, D]`` floating tensor (float64, float32, float16 or bfloat16). Scores are computed in float64
            for float64 tokens and in float32 otherwise (floating signals are cast to that dtype, whatever their
            own); the output tokens keep the tokens' dtype.
        keep: an ``int >= 1`` (tokens per sample, clipped to the tokens available) or a ``float`` in ``(0, 1]``
            (ratio of each sample's count, rounded half-up, at least 1). ``keep >= N`` returns every token unchanged.
            Bools are rejected; a one-element tensor or NumPy scalar counts as its value.
        method: a registered name (see :func:`methods` or ``vtoken methods``).
        mask: optional ``[B, N]`` bool (or 0/1), True on real tokens of padded, variable-length inputs.
        **kwargs: the method's signals (names and full shapes in :data:`vtoken.core.SIGNALS` and
            :data:`vtoken.core.SIGNAL_SHAPES`) and its own knobs (type- and range-checked before the method runs,
            see :func:`vtoken.methods.registry.check_knobs`).

    Returns:
        A :class:`~vtoken.core.Reduction` (``tokens``, ascending ``indices``, ``mask``, ``assign`` for merges).
    """
    if not isinstance(method, str):
        hint = ("; vtoken.reduce runs one method: pass keep and knobs as arguments, e.g. "
                "vtoken.reduce(tokens, 8, 'divprune') (lists of methods are for vtoken.apply)"
                if isinstance(method, (tuple, list)) else "")
        raise TypeError(f"method must be a registered method name (a str such as 'divprune'; see vtoken.methods()), "
                        f"got {method!r}{hint}")
    info = get_method(method)
    tokens = check_tokens(tokens)
    mask = check_mask(mask, tokens)
    params = inspect.signature(info.fn).parameters
    accepts_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    for key in kwargs:
        if key not in params and not accepts_any:
            allowed = sorted(set(info.signals) | set(info.optional_signals) | set(info.defaults))
            raise TypeError(f"method {info.name!r} got an unexpected argument {key!r}; it accepts: {allowed}")
    kwargs.update(info.check_knobs({k: v for k, v in kwargs.items() if k not in SIGNALS}))
    for name in info.signals:
        if kwargs.get(name) is None:
            raise ValueError(f"method {info.name!r} needs the signal {name!r}: {SIGNALS[name]}")
    kwargs.update(check_signals({k: kwargs[k] for k in (*info.signals, *info.optional_signals)
                                 if kwargs.get(k) is not None}, tokens, info.name))
    if not info.needs_keep:
        if keep is not None:
            raise ValueError(f"method {info.name!r} sets its own output count; pass keep=None")
        return info.fn(tokens, None, mask=mask, **kwargs)
    if keep is None:
        raise ValueError(f"keep is required for method {info.name!r}: an int >= 1 or a float in (0, 1]")
    n_valid = mask.sum(-1) if mask is not None else tokens.shape[1]
    counts = resolve_keep(keep, n_valid).to(tokens.device)
    if mask is None:
        counts = counts.expand(tokens.shape[0]).contiguous()
    full = counts >= (mask.sum(-1) if mask is not None else tokens.shape[1])
    if bool(full.all()):
        return identity_reduction(tokens, mask)
    return info.fn(tokens, counts, mask=mask, **kwargs)
