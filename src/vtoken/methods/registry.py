"""The method registry: one :class:`MethodInfo` per named method, filled by the :func:`register` decorator."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ..core import SIGNALS

STAGES = ("encoder", "pre_llm", "llm", "video")
KINDS = ("prune", "merge", "cluster", "pool", "layout")

_REGISTRY: dict[str, MethodInfo] = {}
Fn = Callable[..., Any]


@dataclass(frozen=True)
class LLMSchedule:
    """Where and how much an ``llm``-stage method prunes inside a language model of ``depth`` decoder layers.

    ``layers(depth, **knobs) -> list[int]``: the decoder layers BEFORE which the method runs (ascending, each in
    ``[1, depth)``; its signals come from the layer before); a bad knob is a ``ValueError`` naming it.
    ``counts(n, keep, images, **knobs) -> list[Tensor]``: per layer, ``[B]`` long visual tokens kept per sample, from
    ``n [B]`` visual tokens entering the language model, ``images [B]`` images per sample and ``keep`` (see
    :func:`vtoken.models.llm.resolve_llm_keep`). Both receive the step's knobs they name in their signature; ``counts``
    may also name ``depth`` (the decoder layers) to rebuild layer-dependent counts.
    """

    layers: Callable[..., list[int]]
    counts: Callable[..., list[Any]]


@dataclass(frozen=True)
class MethodInfo:
    """Metadata of a registered method.

    ``fn(tokens [B, N, D], counts [B] long, *, mask [B, N] | None, **signals, **knobs) -> Reduction`` receives the
    per-sample output counts already resolved from ``keep`` (``1 <= counts[b] <= valid tokens of b``).
    """

    name: str
    fn: Callable[..., Any]
    paper: str
    venue: str
    repo: str | None
    stage: str
    kind: str
    signals: tuple[str, ...]
    optional_signals: tuple[str, ...]
    defaults: dict[str, Any] = field(default_factory=dict)
    parity: bool = False
    fixture: str | tuple[str, ...] | None = None
    needs_keep: bool = True
    exact: bool = True
    space: str = "llm"
    encoder_schedule: dict[str, Any] = field(default_factory=dict)
    signal_spec: dict[str, dict[str, Any]] = field(default_factory=dict)
    summary: str = ""
    schedule: LLMSchedule | None = None


def register(name: str, *, paper: str, venue: str, repo: str | None, stage: str, kind: str,
             signals: tuple[str, ...] = (), optional_signals: tuple[str, ...] = (), parity: bool = False,
             fixture: str | tuple[str, ...] | None = None, needs_keep: bool = True, exact: bool = True,
             space: str = "llm",
             signal_spec: dict[str, dict[str, Any]] | None = None,
             encoder_schedule: dict[str, Any] | None = None,
             schedule: LLMSchedule | None = None) -> Callable[[Fn], Fn]:
    """Register a method function under ``name`` with its paper metadata.

    ``signals`` are required keyword signals (names from :data:`vtoken.core.SIGNALS`), ``optional_signals`` are
    used when given. ``parity`` says whether golden fixtures from the official code are tested (``fixture`` names
    their directory when it differs from ``name``, or a tuple of directories when several fixture sets cover one
    method). ``exact`` is False for adaptive methods whose output count is
    decided by the method, at most the resolved ``keep`` per sample. ``needs_keep`` is False for methods that set
    their own output count (e.g. an exact inverse). ``signal_spec`` tells model adapters how to collect each signal
    the way the official code does (e.g. ``{"cls_attn": {"layer": -2}}``). Knob defaults are read from the
    function's signature. ``space`` is where the official code applies the method in a VLM: ``"vision"`` on the
    vision tower's features before the projector (merging there differs from merging after it), ``"llm"`` on the
    projected tokens the language model sees. ``encoder_schedule`` says how an encoder-stage method spreads ``keep``
    over a ViT's layers: ``{"layers": "all" | [fractions of depth or indices], "schedule": "constant" | "geometric"}``.
    ``schedule`` (required for ``stage="llm"``) says at which decoder layers and with how many tokens an LLM-stage
    method prunes (:class:`LLMSchedule`); its function is one pruning step on the visual hidden states.
    """
    if stage not in STAGES:
        raise ValueError(f"stage must be one of {STAGES}, got {stage!r}")
    if space not in ("vision", "llm"):
        raise ValueError(f"space must be 'vision' or 'llm', got {space!r}")
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    if (stage == "llm") != (schedule is not None):
        raise ValueError(f"method {name!r}: a schedule is required for stage 'llm' and only allowed there")
    for s in (*signals, *optional_signals):
        if s not in SIGNALS:
            raise ValueError(f"unknown signal {s!r} for method {name!r}; known: {sorted(SIGNALS)}")

    def deco(fn: Fn) -> Fn:
        if fixture is not None and not isinstance(fixture, (str, tuple)):
            raise TypeError(f"fixture must be a directory name or a tuple of them, got {fixture!r}")
        if name in _REGISTRY:
            raise ValueError(f"method {name!r} is registered twice")
        params = inspect.signature(fn).parameters
        defaults = {k: p.default for k, p in params.items()
                    if p.kind is inspect.Parameter.KEYWORD_ONLY and p.default is not inspect.Parameter.empty
                    and k not in SIGNALS and k != "mask"}
        doc = inspect.getdoc(fn) or ""
        _REGISTRY[name] = MethodInfo(
            name=name, fn=fn, paper=paper, venue=venue, repo=repo, stage=stage, kind=kind,
            signals=tuple(signals), optional_signals=tuple(optional_signals), defaults=defaults, parity=parity,
            fixture=fixture, needs_keep=needs_keep, exact=exact, space=space, signal_spec=dict(signal_spec or {}),
            encoder_schedule=dict(encoder_schedule or {}),
            summary=doc.split("\n\n")[0].replace("\n", " "), schedule=schedule,
        )
        return fn

    return deco


def get_method(name: str) -> MethodInfo:
    """The registered method ``name``; a ``ValueError`` listing the known names otherwise."""
    if not isinstance(name, str):
        raise TypeError(f"method must be a method name (str), got {type(name).__name__}")
    key = name.lower().replace("-", "_")
    if key not in _REGISTRY:
        raise ValueError(f"unknown method {name!r}; known methods: {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[key]


def all_methods() -> list[MethodInfo]:
    """Every registered method, sorted by stage then name."""
    return sorted(_REGISTRY.values(), key=lambda m: (STAGES.index(m.stage), m.name))
