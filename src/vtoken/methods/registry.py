"""The method registry: one :class:`MethodInfo` per named method, filled by the :func:`register` decorator."""

from __future__ import annotations

import dataclasses
import functools
import inspect
import math
import re
import types
import typing
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from torch import Tensor

from ..core import SIGNAL_SHAPES, SIGNALS

#: ``decode``: at every decoding step, inside the language model, on the visual tokens of the KV cache
STAGES = ("encoder", "pre_llm", "llm", "video", "decode")
#: the stages that run inside the language model, placed by an :class:`LLMSchedule`
LM_STAGES = ("llm", "decode")
KINDS = ("prune", "merge", "cluster", "pool", "layout")
#: where a pre-LLM method runs in a VLM: on the tower's features before the projector, or on the projected tokens
SPACES = ("vision", "projected")
#: where a knob's default comes from: the paper, the official code's own default, the official evaluation scripts
#: (what the reported numbers ran with), or vtoken's choice (a budget derived from ``keep``, another depth, a batch
#: rule that keeps each sample independent); each ``knob_sources`` entry starts with one of these
SOURCE_KINDS = ("paper", "official code", "official scripts", "vtoken")

_REGISTRY: dict[str, MethodInfo] = {}
Fn = Callable[..., Any]


_LAYER_WORDS = ("same", "previous", "current")


@dataclass(frozen=True, eq=False)
class SignalSpec(Mapping[str, Any]):
    """How a model adapter collects one signal for a method, the way the method's official code does.

    A frozen, typed value: a mistyped field is a ``TypeError`` and a bad value a ``ValueError`` when the method's
    module is imported. It reads as the mapping of the fields that are set (``spec == {"layer": -2}``).

    Args:
        layer: the one layer the signal is read from: a vision layer index (negative counts from the end), ``"same"``
            (the encoder block being reduced), or inside the language model ``"previous"`` (the layer before the
            pruning one, default) or ``"current"`` (the pruning layer's own projections of its input).
        layers: several vision layers (indices), or ``"all"``.
        ref_depth: the tower depth non-negative indices are given for; other depths scale them
            (``round(l * depth / ref_depth)``).
        feature_layer: ``-2`` in ``layer``/``layers`` is LLaVA's select layer, the one its projector reads: a family
            whose projector reads another layer reads that one instead.
        heads: ``"mean"`` (head-averaged, default) or ``"full"`` (the full projection width as one head).
        space: ``"clip_joint"``: the signal lives in CLIP's joint image-text space (adapters without a CLIP text tower
            use the language model's embedding space on both sides).
        temperature, iters: parameters of a signal computed by power iteration (``llm_attn_rank``).
        proportional_attention: for ``sizes``: the tower's attention adds ``log(size)`` to its logits (ToMe).
        without_cls: a [CLS] signal's fallback on a tower without a [CLS] token: ``"received"``, the attention each
            token receives in the same layer (softmax probabilities averaged over heads and over every query row).
            ``None``: the method cannot run on such towers.
        families: per-family overrides, e.g. ``{"qwen2_vl": SignalSpec(layers=(15, -1), ref_depth=32)}``: a family's
            own official setting (its set fields replace these).
        note: how the official code computes it (documentation only).
    """

    layer: int | str | None = None
    layers: tuple[int, ...] | str | None = None
    ref_depth: int | None = None
    feature_layer: bool = False
    heads: str | None = None
    space: str | None = None
    temperature: float | None = None
    iters: int | None = None
    proportional_attention: bool = False
    without_cls: str | None = None
    families: Mapping[str, SignalSpec] = field(default_factory=dict)
    note: str = ""

    def __post_init__(self) -> None:
        def bad(what: str) -> ValueError:
            return ValueError(f"SignalSpec: {what}")

        if isinstance(self.layer, str) and self.layer not in _LAYER_WORDS:
            raise bad(f"layer is an int or one of {_LAYER_WORDS}, got {self.layer!r}")
        if (self.layer is not None and not isinstance(self.layer, (int, str))) or isinstance(self.layer, bool):
            raise bad(f"layer is an int or one of {_LAYER_WORDS}, got {self.layer!r}")
        if isinstance(self.layers, list):
            object.__setattr__(self, "layers", tuple(self.layers))
        if (isinstance(self.layers, str) and self.layers != "all") or (isinstance(self.layers, tuple) and not all(
                isinstance(v, int) and not isinstance(v, bool) for v in self.layers)):
            raise bad(f"layers is a tuple of int layer indices or 'all', got {self.layers!r}")
        if self.ref_depth is not None and (isinstance(self.ref_depth, bool) or not isinstance(self.ref_depth, int)
                                           or self.ref_depth < 1):
            raise bad(f"ref_depth is an int >= 1, got {self.ref_depth!r}")
        for name, allowed in (("heads", ("mean", "full")), ("space", ("clip_joint",)),
                              ("without_cls", ("received",))):
            value = getattr(self, name)
            if value is not None and value not in allowed:
                raise bad(f"{name} is one of {allowed} or None, got {value!r}")
        if not all(isinstance(k, str) and isinstance(v, SignalSpec) and not v.families
                   for k, v in dict(self.families).items()):
            raise bad("families maps a family name to a SignalSpec without families of its own")
        object.__setattr__(self, "families", types.MappingProxyType(dict(self.families)))

    @classmethod
    def of(cls, value: SignalSpec | Mapping[str, Any], where: str) -> SignalSpec:
        """``value`` as a :class:`SignalSpec`; a mapping's keys must be its fields (errors name ``where``)."""
        if isinstance(value, SignalSpec):
            return value
        if not isinstance(value, Mapping):
            raise TypeError(f"{where}: a signal spec is a SignalSpec, got {value!r}")
        unknown = sorted(set(value) - set(cls.__dataclass_fields__))
        if unknown:
            raise TypeError(f"{where}: unknown signal spec key(s) {unknown}; a SignalSpec has "
                            f"{sorted(cls.__dataclass_fields__)}")
        try:
            return cls(**value)
        except ValueError as e:
            raise ValueError(f"{where}: {e}") from None

    def for_family(self, family: str) -> SignalSpec:
        """This spec with ``families[family]``'s set fields applied."""
        own = self.families.get(family)
        base = dataclasses.replace(self, families={})
        return dataclasses.replace(base, **dict(own)) if own is not None else base

    # ---- read as the mapping of the fields that are set ----------------------------------------------------------
    def _set(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                if getattr(self, f.name) != (f.default if f.default is not dataclasses.MISSING else {})}

    def __getitem__(self, key: str) -> Any:
        return self._set()[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._set())

    def __len__(self) -> int:
        return len(self._set())

    def __repr__(self) -> str:
        return f"SignalSpec({', '.join(f'{k}={v!r}' for k, v in self._set().items())})"

    __hash__ = None  # type: ignore[assignment]


_SCHEDULE_ARGS = {"layers": ("depth",), "counts": ("n", "keep", "images", "depth")}
#: every entry of the ``llm_state`` a cascade's first call gets from the language-model driver (a stepwise run, one
#: call per layer); a call without ``llm_state`` (``vtoken.reduce``) runs the whole cascade itself
CASCADE_START = -2


@dataclass(frozen=True)
class LLMSchedule:
    """Where and how much an ``llm``-stage method prunes inside a language model of ``depth`` decoder layers.

    ``layers(depth, *, <knobs>) -> list[int]``: the decoder layers BEFORE which the method runs (ascending, each in
    ``[1, depth)``; its signals come from the layer before; ``0``, before the first layer, only for a method whose
    attention signals are optional there); a bad knob is a ``ValueError`` naming it.
    ``counts(n, keep, images[, depth], *, <knobs>) -> list[Tensor]``: per layer, ``[B]`` long visual tokens kept per
    sample, from ``n [B]`` visual tokens entering the language model, ``images [B]`` images per sample and ``keep``
    (see :func:`vtoken.methods._schedule.resolve_llm_keep`).

    ``cascade=True``: a stateful method whose stopping depends on the data (FrameFusion). Its step runs at each of
    its layers in turn, every sample's budget given as ``counts`` (not clipped to, nor skipped on, the visual tokens
    present: the step decides what it keeps, keep=all included), and returns ``extras["state"]`` (``[B, S]`` long,
    handed to its next call as the ``llm_state`` signal; its first call gets :data:`CASCADE_START` in every entry)
    and ``extras["done"]`` (``[B]`` bool); once every sample is done its later layers are skipped. Called without
    ``llm_state`` (``vtoken.reduce``) the step runs the whole cascade on the given tokens, as if the layers between
    its calls were identities.

    The schedule knobs (where the method prunes: ``layer``, ``layers``, ``ref_depth``, ...) are declared ONCE, as
    keyword parameters with defaults and annotations of ``layers``; ``counts`` may name any of them (or of the step's
    knobs) without a default. The step function does not declare them: they say where inside the language model a
    step runs, which ``vtoken.reduce`` (one step on given tokens) has no use for. Parameters are read once, here.
    """

    layers: Callable[..., list[int]]
    counts: Callable[..., list[Any]]
    cascade: bool = False
    #: the schedule knobs' defaults (from ``layers``' signature) and the keywords each function takes
    knobs: dict[str, Any] = field(init=False)
    layer_params: frozenset[str] = field(init=False)
    count_params: frozenset[str] = field(init=False)
    count_depth: bool = field(init=False)

    def __post_init__(self) -> None:
        params = {}
        for role, fn in (("layers", self.layers), ("counts", self.counts)):
            sig = inspect.signature(fn).parameters
            fixed = [k for k in sig if k in _SCHEDULE_ARGS[role]]
            extra = [k for k, p in sig.items() if k not in _SCHEDULE_ARGS[role]]
            if role == "counts" and any(sig[k].default is not inspect.Parameter.empty for k in extra):
                raise TypeError(f"LLMSchedule.counts ({fn.__name__}) names knobs without defaults: they are declared "
                                "once, in layers")
            params[role] = (fixed, extra)
        sig = inspect.signature(self.layers).parameters
        knobs = {k: sig[k].default for k in params["layers"][1]}
        if any(v is inspect.Parameter.empty for v in knobs.values()):
            raise TypeError(f"LLMSchedule.layers ({self.layers.__name__}): every knob needs a default")
        object.__setattr__(self, "knobs", knobs)
        object.__setattr__(self, "layer_params", frozenset(params["layers"][1]))
        object.__setattr__(self, "count_params", frozenset(params["counts"][1]))
        object.__setattr__(self, "count_depth", "depth" in params["counts"][0])
        # counts called on its own (tests, notebooks) takes the schedule's defaults for the knobs it names
        fill = {k: knobs[k] for k in params["counts"][1] if k in knobs}
        if fill:
            object.__setattr__(self, "counts", functools.partial(self.counts, **fill))

    def plan_layers(self, depth: int, knobs: dict[str, Any]) -> list[int]:
        """The layers for ``depth`` decoder layers with ``knobs`` (a method's knobs, given or default)."""
        return self.layers(depth, **{k: knobs[k] for k in self.layer_params})

    def plan_counts(self, n: Any, keep: Any, images: Any, depth: int, knobs: dict[str, Any]) -> list[Any]:
        """The per-layer counts (see the class docstring) with ``knobs``."""
        extra = {"depth": depth} if self.count_depth else {}
        return self.counts(n, keep, images, **extra, **{k: knobs[k] for k in self.count_params})


@dataclass(frozen=True)
class Range:
    """A knob's numeric range, written ``"[0, 1]"``, ``"(0, 1]"``, ``"> 0"``, ``">= 1"``, ... in ``register``."""

    text: str
    lo: float | None = None
    hi: float | None = None
    lo_open: bool = False
    hi_open: bool = False

    @classmethod
    def parse(cls, text: str) -> Range:
        def num(v: str) -> float:
            return int(v) if re.fullmatch(r"[+-]?\d+", v) else float(v)

        t = text.strip()
        m = re.fullmatch(r"([\[(])\s*(\S+?)\s*,\s*(\S+?)\s*([\])])", t)
        if m:
            return cls(t, num(m[2]), num(m[3]), m[1] == "(", m[4] == ")")
        m = re.fullmatch(r"(>=|>|<=|<)\s*(\S+)", t)
        if not m:
            raise ValueError(f"a knob range is an interval such as '[0, 1]' or '(0, 1]', or a bound such as '>= 1', "
                             f"got {text!r}")
        if m[1].startswith(">"):
            return cls(t, lo=num(m[2]), lo_open=m[1] == ">")
        return cls(t, hi=num(m[2]), hi_open=m[1] == "<")

    def __contains__(self, v: float) -> bool:
        if self.lo is not None and (v <= self.lo if self.lo_open else v < self.lo):
            return False
        return self.hi is None or (v < self.hi if self.hi_open else v <= self.hi)

    def __str__(self) -> str:
        return f"in {self.text}" if self.text[0] in "[(" else self.text


#: what ``register(knob_ranges=...)`` takes per knob: a range (``"[0, 1]"``, ``"> 0"``, see :class:`Range`; applied to
#: each entry of a sequence knob, ``None`` passes) or the tuple of the knob's allowed values
KnobRange = str | tuple[Any, ...]
#: ``(requirement, predicate)``: the predicate receives the knobs it names (given or default) and says whether the
#: requirement holds, e.g. ``("pivot_image_token + pivot_text_token >= 1", lambda pivot_image_token,
#: pivot_text_token: pivot_image_token + pivot_text_token >= 1)``
KnobRule = tuple[str, Callable[..., bool]]


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
    space: str = "projected"
    encoder_schedule: dict[str, Any] = field(default_factory=dict)
    signal_spec: dict[str, SignalSpec] = field(default_factory=dict)
    summary: str = ""
    schedule: LLMSchedule | None = None
    knob_types: dict[str, Any] = field(default_factory=dict)
    knob_ranges: dict[str, Range | tuple[Any, ...]] = field(default_factory=dict)
    knob_rules: tuple[KnobRule, ...] = ()
    signal_shapes: dict[str, str] = field(default_factory=dict)
    #: one-line documentation of each knob (from the function's ``Args:``), and the knobs that matter most (shown
    #: apart from those kept for parity in ``vtoken methods NAME``)
    knob_docs: dict[str, str] = field(default_factory=dict)
    main_knobs: tuple[str, ...] = ()
    #: where each knob's default comes from (starts with one of :data:`SOURCE_KINDS`)
    knob_sources: dict[str, str] = field(default_factory=dict)
    #: every keyword the function takes (signals, knobs, ``mask``), computed once at registration
    params: frozenset[str] = frozenset()

    def check_knobs(self, knobs: dict[str, Any]) -> dict[str, Any]:
        """:func:`check_knobs` for this method."""
        return check_knobs(self, knobs)

    @property
    def all_signals(self) -> tuple[str, ...]:
        """Required then optional signals."""
        return (*self.signals, *self.optional_signals)

    @property
    def cascade(self) -> bool:
        """Whether this is an ``llm``-stage cascade (:class:`LLMSchedule` ``cascade=True``)."""
        return self.schedule is not None and self.schedule.cascade

    @property
    def schedule_knobs(self) -> frozenset[str]:
        """The knobs of an ``llm``-stage method's :class:`LLMSchedule` (where it prunes); not the step's."""
        return self.schedule.layer_params if self.schedule is not None else frozenset()

    def step_knobs(self, knobs: dict[str, Any]) -> dict[str, Any]:
        """``knobs`` without the schedule's: what one step of the method receives."""
        return {k: v for k, v in knobs.items() if k not in self.schedule_knobs}

    def check_one_step(self, names: Iterable[str]) -> None:
        """A ``TypeError`` naming the first of ``names`` that is a schedule knob: a call on given tokens (as
        :func:`vtoken.reduce`) is one step, and a schedule knob says where inside the language model the step runs,
        which only ``vtoken.apply`` places."""
        for key in names:
            if key in self.schedule_knobs:
                raise TypeError(f"{key!r} is a schedule knob of the llm-stage method {self.name!r}: it says where "
                                f"inside the language model the method prunes. vtoken.reduce runs one pruning step on "
                                f"the tokens you pass; give {key} to vtoken.apply(model, {self.name!r}, ...)")

    def check_arguments(self, names: Iterable[str]) -> None:
        """A ``TypeError`` naming the first of ``names`` that is neither a signal nor a knob of this method."""
        for key in names:
            if key in self.schedule_knobs:
                continue
            if key not in self.params or key == "mask":
                raise TypeError(f"method {self.name!r} got an unexpected argument {key!r}; its knobs: "
                                f"{sorted(self.defaults)}, its signals: {list(self.all_signals)}")


def register(name: str, *, paper: str, venue: str, repo: str | None, stage: str, kind: str,
             signals: tuple[str, ...] = (), optional_signals: tuple[str, ...] = (), parity: bool = False,
             fixture: str | tuple[str, ...] | None = None, needs_keep: bool = True, exact: bool = True,
             space: str = "projected",
             signal_spec: Mapping[str, SignalSpec | Mapping[str, Any]] | None = None,
             encoder_schedule: dict[str, Any] | None = None,
             schedule: LLMSchedule | None = None,
             knob_ranges: dict[str, KnobRange] | None = None,
             knob_rules: Sequence[KnobRule] = (),
             signal_shapes: dict[str, str] | None = None,
             main_knobs: Sequence[str] = (),
             knob_sources: Mapping[str, str] | None = None) -> Callable[[Fn], Fn]:
    """Register a method function under ``name`` with its paper metadata.

    ``signals`` are required keyword signals (names from :data:`vtoken.core.SIGNALS`), ``optional_signals`` are
    used when given. ``parity`` says whether golden fixtures from the official code are tested (``fixture`` names
    their directory when it differs from ``name``, or a tuple of directories when several fixture sets cover one
    method). ``exact`` is False for adaptive methods whose output count is
    decided by the method, at most the resolved ``keep`` per sample. ``needs_keep`` is False for methods that set
    their own output count (e.g. an exact inverse). ``signal_spec`` tells model adapters how to collect each signal
    the way the official code does (``{"cls_attn": SignalSpec(layer=-2)}``, :class:`SignalSpec`; a plain mapping is
    converted, an unknown key fails here). Knob defaults are read from the
    function's signature. ``space`` is where the official code applies the method in a VLM: ``"vision"`` on the
    vision tower's features before the projector (merging there differs from merging after it), ``"projected"`` on the
    projected tokens the language model sees. ``encoder_schedule`` says how an encoder-stage method spreads ``keep``
    over a ViT's layers: ``{"layers": "all" | [fractions of depth or indices], "schedule": "constant" | "geometric"}``.
    ``schedule`` (required for ``stage="llm"``) says at which decoder layers and with how many tokens an LLM-stage
    method prunes (:class:`LLMSchedule`); its function is one pruning step on the visual hidden states. A
    ``stage="decode"`` method runs at every decoding step instead: its schedule names one decoder layer (from which
    on the KV cache holds only the visual tokens it keeps) and its function is one step's selection.

    Knobs are checked when ``vtoken.reduce`` is called and when ``vtoken.apply`` builds its steps (:func:`check_knobs`):
    each against its annotated type (from the function's signature), ``knob_ranges`` (a :class:`Range` string such as
    ``"[0, 1]"`` or ``"> 0"``, or a tuple of allowed values) and ``knob_rules`` (:data:`KnobRule`, for requirements
    between knobs). ``signal_shapes`` overrides a signal's axes in :data:`vtoken.core.SIGNAL_SHAPES` (e.g. ``{"text":
    "B T C"}``: text in the width ``C`` of ``vision_features`` instead of the tokens' ``D``).

    ``main_knobs`` are the one or two knobs that matter (``vtoken methods NAME`` shows them apart from those kept for
    parity). ``knob_sources`` says where each knob's default comes from, one entry per knob, each starting with one
    of :data:`SOURCE_KINDS` (``"official scripts: --layer 16 in the eval scripts"``); ``"*"`` covers the knobs not
    named. A knob without a source fails here.
    """
    if stage not in STAGES:
        raise ValueError(f"stage must be one of {STAGES}, got {stage!r}")
    if space not in SPACES:
        raise ValueError(f"method {name!r}: space must be 'vision' (the tower's features, before the projector) or "
                         f"'projected' (after it), got {space!r}")
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    if (stage in LM_STAGES) != (schedule is not None):
        raise ValueError(f"method {name!r}: a schedule is required for the stages {LM_STAGES} (inside the language "
                         "model) and only allowed there")
    if stage == "decode" and schedule is not None and schedule.cascade:
        raise ValueError(f"method {name!r}: a decode-stage schedule is no cascade (it names one decoder layer)")
    for s in (*signals, *optional_signals):
        if s not in SIGNALS:
            raise ValueError(f"unknown signal {s!r} for method {name!r}; known: {sorted(SIGNALS)}")
    for s, dims in (signal_shapes or {}).items():
        if s not in (*signals, *optional_signals) or s not in SIGNAL_SHAPES:
            raise ValueError(f"method {name!r}: signal_shapes names {s!r}, not one of its tensor signals")
        if not all(alt.split() for alt in dims.split("|")):
            raise ValueError(f"method {name!r}: signal_shapes[{s!r}] must name axes such as 'B T C', got {dims!r}")
    ranges = {k: v if isinstance(v, tuple) else Range.parse(v) for k, v in (knob_ranges or {}).items()}
    specs = {k: SignalSpec.of(v, f"method {name!r}: signal_spec[{k!r}]") for k, v in (signal_spec or {}).items()}
    for k, spec in specs.items():
        if any(s.without_cls for s in (spec, *spec.families.values())) and k not in ("cls_attn", "cls_attn_layers"):
            raise ValueError(f"method {name!r}: signal_spec[{k!r}].without_cls: only cls_attn and cls_attn_layers "
                             "have a fallback ('received') on towers without a [CLS] token")
    stray = sorted(set(specs) - {*signals, *optional_signals})
    if stray:
        raise ValueError(f"method {name!r}: signal_spec names {stray}, not among its signals "
                         f"{[*signals, *optional_signals]}")

    def deco(fn: Fn) -> Fn:
        if fixture is not None and not isinstance(fixture, (str, tuple)):
            raise TypeError(f"fixture must be a directory name or a tuple of them, got {fixture!r}")
        if name in _REGISTRY:
            raise ValueError(f"method {name!r} is registered twice")
        params = inspect.signature(fn).parameters
        defaults = {k: p.default for k, p in params.items()
                    if p.kind is inspect.Parameter.KEYWORD_ONLY and p.default is not inspect.Parameter.empty
                    and k not in SIGNALS and k != "mask"}
        types = _knob_types(fn, defaults)
        if schedule is not None:
            twice = set(schedule.knobs) & set(defaults)
            if twice:
                raise ValueError(f"method {name!r}: {sorted(twice)} are declared by its schedule and again by the step "
                                 "function; declare each knob once (schedule knobs in LLMSchedule.layers)")
            types |= _knob_types(schedule.layers, schedule.knobs)
            defaults = {**defaults, **schedule.knobs}
            stray = sorted(schedule.count_params - set(defaults))
            if stray:
                raise ValueError(f"method {name!r}: its schedule's counts names {stray}, not among its knobs "
                                 f"{sorted(defaults)}")
        unknown = set(ranges) - set(defaults)
        if unknown:
            raise ValueError(f"method {name!r}: knob_ranges names {sorted(unknown)}, not among its knobs "
                             f"{sorted(defaults)}")
        if set(main_knobs) - set(defaults):
            raise ValueError(f"method {name!r}: main_knobs names {sorted(set(main_knobs) - set(defaults))}, not "
                             f"among its knobs {sorted(defaults)}")
        if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
            raise TypeError(f"method {name!r}: name every signal and knob in the signature (no **kwargs)")
        for _, rule in knob_rules:
            if set(inspect.signature(rule).parameters) - set(defaults):
                raise ValueError(f"method {name!r}: a knob rule names arguments that are not its knobs")
        sources = _knob_sources(name, knob_sources or {}, defaults)
        doc = inspect.getdoc(fn) or ""
        _REGISTRY[name] = MethodInfo(
            name=name, fn=fn, paper=paper, venue=venue, repo=repo, stage=stage, kind=kind,
            signals=tuple(signals), optional_signals=tuple(optional_signals), defaults=defaults, parity=parity,
            fixture=fixture, needs_keep=needs_keep, exact=exact, space=space, signal_spec=specs,
            encoder_schedule=dict(encoder_schedule or {}),
            summary=doc.split("\n\n")[0].replace("\n", " "), schedule=schedule,
            knob_types=types, knob_ranges=ranges, knob_rules=tuple(knob_rules),
            signal_shapes=dict(signal_shapes or {}), knob_docs=_arg_docs(doc, defaults),
            main_knobs=tuple(main_knobs), knob_sources=sources,
            params=frozenset(k for k in params if k not in ("tokens", "counts")),
        )
        return fn

    return deco


def _knob_sources(name: str, given: Mapping[str, str], defaults: Mapping[str, Any]) -> dict[str, str]:
    """One source per knob of ``defaults`` from ``given`` (``"*"`` for the rest); a ``ValueError`` naming what is
    missing, unknown or not of :data:`SOURCE_KINDS`."""
    unknown = sorted(set(given) - set(defaults) - {"*"})
    if unknown:
        raise ValueError(f"method {name!r}: knob_sources names {unknown}, not among its knobs {sorted(defaults)}")
    for key, text in given.items():
        if not isinstance(text, str) or not text.startswith(SOURCE_KINDS):
            raise ValueError(f"method {name!r}: knob_sources[{key!r}] must start with one of {SOURCE_KINDS} (where the "
                             f"default comes from), got {text!r}")
    out = {k: given.get(k, given.get("*")) for k in defaults}
    missing = sorted(k for k, v in out.items() if v is None)
    if missing:
        raise ValueError(f"method {name!r}: knob_sources gives no source for {missing}; say where each default comes "
                         f"from ({', '.join(SOURCE_KINDS)}), or give '*' for the rest")
    return {k: str(v) for k, v in out.items()}


def get_method(name: str) -> MethodInfo:
    """The registered method ``name``; a ``ValueError`` listing the known names otherwise."""
    if not isinstance(name, str):
        raise TypeError(f"method must be a registered method name (a str such as 'divprune'; see vtoken.methods() "
                        f"or `vtoken methods`), got {name!r} ({type(name).__name__})")
    key = name.lower().replace("-", "_")
    if key not in _REGISTRY:
        raise ValueError(f"unknown method {name!r}; known methods: {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[key]


def all_methods() -> list[MethodInfo]:
    """Every registered method, sorted by stage then name."""
    return sorted(_REGISTRY.values(), key=lambda m: (STAGES.index(m.stage), m.name))


# ---------------------------------------------------------------------------------------------------------------
# knob validation
# ---------------------------------------------------------------------------------------------------------------


def _arg_docs(doc: str, names: Iterable[str]) -> dict[str, str]:
    """The first sentence documenting each of ``names`` in a Google-style ``Args:`` block (entries such as ``knob:
    text`` or ``a, b: text``, continuation lines indented)."""
    wanted = set(names)
    out: dict[str, str] = {}
    entries: list[tuple[list[str], list[str]]] = []
    block = False
    for line in doc.splitlines():
        if line.strip() == "Args:":
            block = True
            continue
        if not block:
            continue
        if line and not line.startswith(" "):
            break
        m = re.match(r"^ {4}([A-Za-z_][\w, ]*):\s*(.*)$", line)
        if m:
            entries.append(([n.strip() for n in m[1].split(",")], [m[2]]))
        elif entries and line.strip():
            entries[-1][1].append(line.strip())
    for keys, text in entries:
        first = _first_sentence(" ".join(text).strip())
        for key in keys:
            if key in wanted:
                out[key] = first.rstrip(".;") + "."
    return out


def _first_sentence(text: str) -> str:
    """``text`` up to its first ``.`` or ``;`` followed by a blank outside parentheses and backquotes."""
    depth, quoted = 0, False
    for i, ch in enumerate(text):
        if ch == "`":
            quoted = not quoted
        elif not quoted and ch in "([{":
            depth += 1
        elif not quoted and ch in ")]}":
            depth = max(depth - 1, 0)
        elif not quoted and depth == 0 and ch in ".;" and (i + 1 == len(text) or text[i + 1] == " "):
            return text[:i]
    return text


def _knob_types(fn: Fn, defaults: dict[str, Any]) -> dict[str, Any]:
    """Each knob's annotated type (the default's type where the annotation cannot be evaluated)."""
    try:
        hints = typing.get_type_hints(fn)
    except (NameError, TypeError, AttributeError):  # an annotation naming what the module does not define
        hints = {}
    return {k: hints.get(k, Any if v is None else type(v)) for k, v in defaults.items()}


def _union(tp: Any) -> bool:
    return typing.get_origin(tp) in (typing.Union, types.UnionType)


def _fits(value: Any, tp: Any) -> bool:
    """Whether ``value`` has the annotated type ``tp``: ``bool`` only ``True``/``False``, ``int`` no bool, ``float``
    any int or float, ``Sequence[X]`` / ``list[X]`` / ``tuple[X, ...]`` a list or tuple of ``X``."""
    if tp is Any:
        return True
    if tp is None or tp is type(None):
        return value is None
    if _union(tp):
        return any(_fits(value, a) for a in typing.get_args(tp))
    if tp is bool:
        return isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    origin = typing.get_origin(tp)
    if origin in (list, tuple, Sequence):
        if not isinstance(value, (list, tuple)):
            return False
        args = typing.get_args(tp)
        if origin is tuple and args and args[-1] is not Ellipsis:
            return len(value) == len(args) and all(_fits(v, a) for v, a in zip(value, args, strict=True))
        return all(_fits(v, args[0] if args else Any) for v in value)
    return isinstance(value, origin or tp) if isinstance(origin or tp, type) else True


def type_name(tp: Any) -> str:
    if _union(tp):
        return " or ".join(type_name(a) for a in typing.get_args(tp))
    if tp is None or tp is type(None):
        return "None"
    origin = typing.get_origin(tp)
    if origin in (list, tuple, Sequence):
        args = [a for a in typing.get_args(tp) if a is not Ellipsis]
        if origin is tuple and len(typing.get_args(tp)) > 1 and typing.get_args(tp)[-1] is not Ellipsis:
            return f"a tuple ({', '.join(type_name(a) for a in args)})"
        plural = {bool: "bools", int: "ints", float: "floats", str: "strs"}
        return f"a list or tuple of {plural.get(args[0], type_name(args[0])) if args else 'values'}"
    names = {bool: "a bool (True or False)", int: "an int", float: "a float", str: "a str", Tensor: "a torch.Tensor"}
    return names.get(tp, getattr(tp, "__name__", str(tp)))


def _scalar(value: Any, tp: Any) -> Any:
    """A NumPy scalar or a one-element tensor (where the knob is not a tensor) as its Python value."""
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, Tensor) and not _fits(value, tp) and value.numel() == 1 and not value.is_meta:
        return value.item()
    return value


def _numbers(value: Any) -> list[Any]:
    items = value if isinstance(value, (list, tuple)) else [value]
    return [v for v in items if isinstance(v, (int, float)) and not isinstance(v, bool)]


def check_knobs(info: MethodInfo, knobs: dict[str, Any]) -> dict[str, Any]:
    """Validate the knobs of one call of ``info``'s method; returns them with NumPy scalars as Python values.

    Each knob must have its annotated type (an int knob rejects ``2.5`` and ``True``, a bool knob rejects ``1`` and
    ``1.0``, a float knob accepts ints; list/tuple knobs check their entries), every float is finite, and the
    method's ``knob_ranges`` and ``knob_rules`` hold. Errors (``TypeError`` for a type, ``ValueError`` for a value)
    name the method, the knob and what it accepts. Names that are not knobs (signals, ``mask``) pass unchecked.
    """
    out = dict(knobs)
    where = f"method {info.name!r}"
    for key, value in knobs.items():
        if key not in info.defaults:
            continue
        tp = info.knob_types.get(key, Any)
        value = out[key] = _scalar(value, tp)
        if not _fits(value, tp):
            raise TypeError(f"{where}: {key} must be {type_name(tp)}, got {value!r} ({type(value).__name__})")
        nums = _numbers(value)
        if any(isinstance(v, float) and not math.isfinite(v) for v in nums):
            raise ValueError(f"{where}: {key} must be finite, got {value!r}")
        rng = info.knob_ranges.get(key)
        if isinstance(rng, tuple):
            if value not in rng:
                raise ValueError(f"{where}: {key} must be one of {rng}, got {value!r}")
        elif rng is not None and not all(v in rng for v in nums):
            each = "each entry of " if isinstance(value, (list, tuple)) else ""
            raise ValueError(f"{where}: {each}{key} must be {rng}, got {value!r}")
    full = {**info.defaults, **{k: v for k, v in out.items() if k in info.defaults}}
    for requirement, rule in info.knob_rules:
        names = list(inspect.signature(rule).parameters)
        if not rule(**{k: full[k] for k in names}):
            got = ", ".join(f"{k}={full[k]!r}" for k in names)
            raise ValueError(f"{where}: {requirement}; got {got}")
    return out
