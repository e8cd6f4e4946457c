"""A method as a value: :func:`method` makes a frozen, validated :class:`MethodSpec` (name, ``keep``, knobs) that
``vtoken.apply`` and ``vtoken.reduce`` take wherever they take a name; lists of specs compose."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ..core import SIGNALS, resolve_keep
from .registry import MethodInfo, get_method


@dataclass(frozen=True)
class MethodSpec:
    """One method with its budget and knobs, checked when made (use :func:`method`)."""

    name: str
    keep: int | float | None = None
    knobs: dict[str, Any] = field(default_factory=dict)

    @property
    def info(self) -> MethodInfo:
        return get_method(self.name)

    def __repr__(self) -> str:
        args = [repr(self.name)] + ([f"keep={self.keep!r}"] if self.keep is not None else [])
        return f"vtoken.method({', '.join(args + [f'{k}={v!r}' for k, v in self.knobs.items()])})"

    def __hash__(self) -> int:
        return hash((self.name, self.keep, repr(sorted(self.knobs.items()))))

    def pair(self) -> tuple[str, dict[str, Any]]:
        """The ``(name, {knobs, "keep"})`` pair ``vtoken.apply`` also takes."""
        return self.name, {**self.knobs, **({"keep": self.keep} if self.keep is not None else {})}


def method(name: str, *, keep: int | float | None = None, **knobs: Any) -> MethodSpec:
    """A method as a value, e.g. ``vtoken.method("visionzip", keep=64, contextual=10)``.

    ``name`` must be registered, ``keep`` an ``int >= 1`` or a ratio in ``(0, 1]`` (or ``None``: given later, by
    ``apply``/``reduce``), and every knob one of the method's with a valid type and range: a wrong one fails here,
    naming it. Signals are not knobs: the model adapter (or the ``reduce`` caller) passes them.
    """
    info = get_method(name)
    signals = sorted(k for k in knobs if k in SIGNALS or k == "mask")
    if signals:
        raise TypeError(f"vtoken.method({info.name!r}): {signals} are signals, not knobs; pass them to vtoken.reduce "
                        "(a model adapter collects them itself)")
    info.check_arguments(knobs)
    checked = info.check_knobs(knobs)
    if keep is not None:
        if not info.needs_keep:
            raise ValueError(f"vtoken.method({info.name!r}): the method sets its own output count; leave keep out")
        resolve_keep(keep, 1)  # type and range, naming keep
    return MethodSpec(info.name, keep, dict(checked))
