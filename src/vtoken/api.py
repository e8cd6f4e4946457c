"""The functional entry point: :func:`reduce` runs one registered method on a batch of tokens."""

from __future__ import annotations

import inspect
from typing import Any

from torch import Tensor

from .core import SIGNALS, Reduction, check_mask, check_signal, check_tokens, identity_reduction, resolve_keep
from .methods import MethodInfo, all_methods, get_method


def methods() -> list[MethodInfo]:
    """Every registered method with its metadata (name, paper, venue, repo, stage, signals, defaults, parity)."""
    return all_methods()


def reduce(tokens: Tensor, keep: int | float | None = None, method: str = "divprune", *, mask: Tensor | None = None,
           **kwargs: Any) -> Reduction:
    """Reduce ``tokens [B, N, D]`` to ``keep`` tokens per sample with ``method``.

    Args:
        tokens: ``[B, N, D]`` floating tensor (fp32, fp16 or bf16).
        keep: an ``int >= 1`` (tokens per sample) or a ``float`` in ``(0, 1]`` (ratio of each sample's count, rounded
            half-up, at least 1). ``keep >= N`` returns every token unchanged.
        method: a registered name (see :func:`methods` or ``vtoken methods``).
        mask: optional ``[B, N]`` bool, True on real tokens of padded, variable-length inputs.
        **kwargs: the method's signals (names in :data:`vtoken.core.SIGNALS`) and its own knobs.

    Returns:
        A :class:`~vtoken.core.Reduction` (``tokens``, ascending ``indices``, ``mask``, ``assign`` for merges).
    """
    info = get_method(method)
    tokens = check_tokens(tokens)
    mask = check_mask(mask, tokens)
    params = inspect.signature(info.fn).parameters
    accepts_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    for key in kwargs:
        if key not in params and not accepts_any:
            allowed = sorted(set(info.signals) | set(info.optional_signals) | set(info.defaults))
            raise TypeError(f"method {info.name!r} got an unexpected argument {key!r}; it accepts: {allowed}")
    for name in info.signals:
        if kwargs.get(name) is None:
            raise ValueError(f"method {info.name!r} needs the signal {name!r}: {SIGNALS[name]}")
    for name in (*info.signals, *info.optional_signals):
        if kwargs.get(name) is not None:
            kwargs[name] = check_signal(name, kwargs[name], tokens, info.name)
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
