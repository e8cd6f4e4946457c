"""Entry-point validation over every registered method (``vtoken.reduce`` and ``build_steps``, what ``vtoken.apply``
runs): dtypes and mixed-dtype signals, full signal shapes (also across signals), knob types and ranges, ``keep`` /
``mask`` / ``grid`` coercion, meta tensors and method names. Errors name the argument (and the method)."""

from __future__ import annotations

import math
import typing
from collections.abc import Sequence
from typing import Any

import numpy as np
import pytest
import torch

import vtoken
from vtoken.core import SIGNAL_SHAPES, SIGNALS, resolve_keep
from vtoken.methods.registry import MethodInfo, Range
from vtoken.models.pipeline import build_steps
from vtoken.synthetic import make_signals

METHODS = vtoken.methods()
NAMES = [m.name for m in METHODS]
KEEP_METHODS = [m.name for m in METHODS if m.needs_keep]
assert {m.stage for m in METHODS} >= {"pre_llm", "encoder", "llm"}

#: (tokens dtype, signals dtype): the same dtype for both, then mixed; "mixed" gives the floating signals of one call
#: different dtypes (float64, float32, float16, bfloat16 in turn; "mixed_reversed" from the last signal), e.g. a
#: float64 text with float32 vision_features or llm_embeds
DTYPE_CASES = [
    (torch.float64, torch.float64), (torch.float32, torch.float32), (torch.float16, torch.float16),
    (torch.bfloat16, torch.bfloat16), (torch.float16, torch.float32), (torch.float32, torch.float64),
    (torch.float64, torch.float32), (torch.bfloat16, torch.float16),
    *((dt, mode) for mode in ("mixed", "mixed_reversed") for dt in (torch.float64, torch.float32, torch.float16)),
]
MIXED = [torch.float64, torch.float32, torch.float16, torch.bfloat16]


def _cast(signals: dict[str, Any], dtype: torch.dtype | str | None) -> dict[str, Any]:
    if dtype is None:
        return dict(signals)
    floating = [k for k, v in signals.items() if isinstance(v, torch.Tensor) and v.is_floating_point()]
    if dtype == "mixed_reversed":
        floating.reverse()
    want = {k: MIXED[i % 4] if isinstance(dtype, str) else dtype for i, k in enumerate(floating)}
    return {k: v.to(want[k]) if k in want else v for k, v in signals.items()}


def example(info: MethodInfo, dtype: torch.dtype = torch.float32, signal_dtype: torch.dtype | str | None = None,
            seed: int = 0) -> tuple[torch.Tensor, Any, dict[str, Any]]:
    """``(tokens [2, N, D], keep, kwargs)`` of a valid call of ``info``: every required and optional signal
    (synthetic, :mod:`vtoken.bench.synthetic`) in ``signal_dtype`` where floating, plus the knobs the call needs."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 16, 8, generator=g)
    keep: Any = 0.5
    extra: dict[str, Any] = {}
    if info.name == "token_shuffle":
        keep = 4  # a 2 x 2 window on the 4 x 4 grid
    elif info.name == "token_unshuffle":
        x, keep, extra = torch.randn(2, 4, 32, generator=g), None, {"window": 2, "grid": (2, 2)}
    elif info.name == "fastvid":
        extra = {"context_ratio": 1.0}  # 2 tokens a frame here: the default 0.4 leaves a frame no context token
    sig = {**make_signals(info, x, seed=seed), **extra}
    return x.to(dtype), keep, _cast(sig, signal_dtype)


def _signals(info: MethodInfo) -> list[str]:
    return [s for s in (*info.signals, *info.optional_signals) if s in SIGNAL_SHAPES]


def _dims(info: MethodInfo, name: str) -> list[str]:
    """The axes of signal ``name`` for ``info`` (the method's exception, or its first alternative)."""
    dims = info.signal_shapes.get(name, SIGNAL_SHAPES[name].dims)
    return dims.split("|")[0].split()


# ------------------------------------------------------------------------------------------------------------ dtypes


@pytest.mark.parametrize(("dtype", "signal_dtype"), DTYPE_CASES, ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.parametrize("name", NAMES)
def test_every_dtype_and_mixed_signals(name: str, dtype: torch.dtype, signal_dtype: torch.dtype | str) -> None:
    info = vtoken.get_method(name)
    x, keep, kw = example(info, dtype, signal_dtype)
    red = vtoken.reduce(x, keep, name, **kw)
    assert red.tokens.dtype == dtype, "output tokens keep the tokens' dtype"
    assert bool(torch.isfinite(red.tokens.float()).all())
    assert bool(((red.indices >= 0) == red.mask).all()) and bool(red.mask.any(-1).all())
    # scores run in float64 for float64 tokens and float32 otherwise: a floating signal in any dtype is cast to
    # that dtype, so the result equals the one with the signals given in it already
    compute = torch.float64 if dtype == torch.float64 else torch.float32
    same = vtoken.reduce(x, keep, name, **_cast(kw, compute))
    assert torch.equal(red.indices, same.indices) and torch.equal(red.tokens, same.tokens)


@pytest.mark.parametrize("name", KEEP_METHODS)
def test_float64_padded_batch(name: str) -> None:
    info = vtoken.get_method(name)
    if info.kind == "layout":
        pytest.skip("layout methods rearrange a full grid (no padding)")
    if "video_grid" in info.signals:
        pytest.skip("clips pad whole frames: tests/methods/test_video_properties.py")
    x, keep, kw = example(info, torch.float64, torch.float32)
    mask = torch.ones(2, 16, dtype=torch.bool)
    mask[1, 11:] = False
    red = vtoken.reduce(x, keep, name, mask=mask, **kw)
    assert red.tokens.dtype == torch.float64
    assert bool((red.indices[1][red.mask[1]] < 11).all())


# ----------------------------------------------------------------------------------------------------- signal shapes


def _shape_cases() -> list[Any]:
    out = []
    for info in METHODS:
        for s in _signals(info):
            out.append(pytest.param(info.name, s, id=f"{info.name}-{s}"))
    return out


SHAPE_CASES = _shape_cases()


def _grow(v: torch.Tensor, axis: int) -> torch.Tensor:
    return torch.cat([v, v.narrow(axis, 0, 1)], dim=axis)


@pytest.mark.parametrize(("name", "signal"), SHAPE_CASES)
def test_signal_rank_is_checked(name: str, signal: str) -> None:
    info = vtoken.get_method(name)
    x, keep, kw = example(info)
    v = kw[signal]
    bad = [v[..., 0]]  # a missing axis, e.g. keys [B, N] or llm_hidden [B, N]
    if len(SIGNAL_SHAPES[signal].dims.split("|")) == 1:
        bad.append(v[..., None])  # an extra axis (positions may be [B, N] or [B, N, P])
    for value in bad:
        with pytest.raises(ValueError, match=rf"signal '{signal}' for method '{name}' must have shape \["):
            vtoken.reduce(x, keep, name, **{**kw, signal: value})


@pytest.mark.parametrize(("name", "signal"), SHAPE_CASES)
def test_signal_axes_are_checked(name: str, signal: str) -> None:
    """Every axis tied to the tokens (B, N, D) or to an earlier signal (T of text, dk of llm_keys, ...) is checked,
    naming the signal, the method, the expected shape with its symbols and the actual shape."""
    info = vtoken.get_method(name)
    x, keep, kw = example(info)
    given = [s for s in SIGNALS if s in kw and s in SIGNAL_SHAPES]
    dims = _dims(info, signal)
    checked = 0
    for axis, sym in enumerate(dims):
        holders = [s for s in given if sym in _dims(info, s)]
        if sym in ("B", "N", "D") or holders.index(signal) > 0:
            culprit = signal
        elif len(holders) > 1:
            culprit = holders[1]  # this signal sets the size: the next one that shares it disagrees
        else:
            continue  # a free axis (d, C, L, ...): any size is fine
        bad = _grow(kw[signal], axis)
        with pytest.raises(ValueError, match=rf"signal '{culprit}' for method '{name}' must have shape "
                                             rf"\[.*{sym}.*\].*got \[") as err:
            vtoken.reduce(x, keep, name, **{**kw, signal: bad})
        assert str(list(bad.shape if culprit == signal else kw[culprit].shape)) in str(err.value)
        checked += 1
    assert checked, f"{signal} has no checked axis"


def test_cross_signal_text_lengths() -> None:
    x = torch.randn(2, 16, 8)
    text = torch.randn(2, 5, 8)
    with pytest.raises(ValueError, match=r"'text_mask' for method 'mmtok'.*\[B, T\] = \[2, 5\].*T = 5 from 'text'"):
        vtoken.reduce(x, 4, "mmtok", text=text, text_mask=torch.ones(2, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"'text' for method 'mmtok'.*\[B, T, D\] = \[2, 5, 8\].*got \[2, 5, 7\]"):
        vtoken.reduce(x, 4, "mmtok", text=torch.randn(2, 5, 7))
    # cdpruner compares the text with vision_features: the text has their width C, not the tokens' D
    vis = torch.randn(2, 16, 6)
    vtoken.reduce(x, 4, "cdpruner", vision_features=vis, text=torch.randn(2, 3, 6))
    with pytest.raises(ValueError, match=r"'text' for method 'cdpruner'.*C = 6 from 'vision_features'"):
        vtoken.reduce(x, 4, "cdpruner", vision_features=vis, text=torch.randn(2, 3, 8))
    with pytest.raises(ValueError, match=r"'llm_text_attn' for method 'todre_llm'.*T = 3 from 'text_mask'"):
        vtoken.reduce(x, 4, "todre_llm", text_mask=torch.ones(2, 3, dtype=torch.bool),
                      llm_text_attn=torch.rand(2, 4, 16))


@pytest.mark.parametrize(("name", "signal"), SHAPE_CASES)
def test_signal_dtype_class_and_values(name: str, signal: str) -> None:
    info = vtoken.get_method(name)
    x, keep, kw = example(info)
    v = kw[signal]
    kind = SIGNAL_SHAPES[signal].kind
    where = rf"signal '{signal}' for method '{name}'"
    if kind == "float":
        with pytest.raises(TypeError, match=rf"{where} must be a floating-point tensor"):
            vtoken.reduce(x, keep, name, **{**kw, signal: v.long()})
        nan = v.clone()
        nan.view(-1)[0] = float("nan")
        with pytest.raises(ValueError, match=rf"{where} contains NaN"):
            vtoken.reduce(x, keep, name, **{**kw, signal: nan})
    elif kind == "int":
        with pytest.raises(TypeError, match=rf"{where} must be an integer tensor"):
            vtoken.reduce(x, keep, name, **{**kw, signal: v.float() + 0.5})
    else:
        half = v.float() * 0.5
        with pytest.raises(ValueError, match=rf"{where} must be a bool tensor"):
            vtoken.reduce(x, keep, name, **{**kw, signal: half})
        same = vtoken.reduce(x, keep, name, **{**kw, signal: v.float()})  # 0/1 floats are the bool mask
        assert torch.equal(same.indices, vtoken.reduce(x, keep, name, **kw).indices)
    with pytest.raises(ValueError, match=rf"{where} is on the meta device"):
        vtoken.reduce(x, keep, name, **{**kw, signal: torch.empty_like(v, device="meta")})


@pytest.mark.parametrize("name", [m.name for m in METHODS if "grid" in (*m.signals, *m.optional_signals)])
def test_grid_must_be_integral(name: str) -> None:
    info = vtoken.get_method(name)
    x, keep, kw = example(info)
    h, w = kw["grid"]
    for bad in ((h + 0.5, w), (float(h), w), (True, h * w), ("4", w), (h,)):
        with pytest.raises(TypeError, match=rf"signal 'grid' for method '{name}' must be a pair of ints"):
            vtoken.reduce(x, keep, name, **{**kw, "grid": bad})
    with pytest.raises(ValueError, match=r"signal 'grid'.*H \* W == N"):
        vtoken.reduce(x, keep, name, **{**kw, "grid": (h, w + 1)})
    ref = vtoken.reduce(x, keep, name, **kw)
    for ok in ((np.int64(h), np.int32(w)), (torch.tensor(h), torch.tensor(w)), torch.tensor([h, w])):
        assert torch.equal(vtoken.reduce(x, keep, name, **{**kw, "grid": ok}).indices, ref.indices)


# ------------------------------------------------------------------------------------------------------------- knobs


def _admits(tp: Any) -> set[Any]:
    """The plain types an annotation admits (``int | Sequence[int] | None`` -> ``{int, Sequence, None}``)."""
    if typing.get_origin(tp) in (typing.Union, __import__("types").UnionType):
        return set().union(*(_admits(a) for a in typing.get_args(tp)))
    if tp is type(None) or tp is None:
        return {None}
    origin = typing.get_origin(tp)
    return {Sequence} if origin in (list, tuple, Sequence) else {tp}


def _bad_types(tp: Any) -> list[Any]:
    """Values of the wrong type for a knob annotated ``tp``."""
    kinds = _admits(tp)
    out: list[Any] = ["a"] if str not in kinds else []
    if bool not in kinds:
        out.append(True)
    if bool in kinds and not kinds & {int, float}:
        out += [1, 1.0]
    if int in kinds and float not in kinds:
        out.append(2.5)
    if Sequence in kinds and int in kinds:
        out.append([2.5])
    if kinds <= {str, None}:
        out.append(3)
    return out


def _out_of_range(rng: Range) -> list[Any]:
    out = []
    if rng.lo is not None:
        out.append(rng.lo if rng.lo_open else rng.lo - 1)
    if rng.hi is not None:
        out.append(rng.hi if rng.hi_open else rng.hi + 1)
    return out


def _knob_cases() -> list[Any]:
    cases = []
    for info in METHODS:
        for knob, tp in info.knob_types.items():
            for v in _bad_types(tp):
                cases.append(pytest.param(info.name, knob, v, TypeError, id=f"{info.name}-{knob}-{v!r}"))
            if float in _admits(tp):
                for v in (math.nan, math.inf):
                    cases.append(pytest.param(info.name, knob, v, ValueError, id=f"{info.name}-{knob}-{v!r}"))
            rng = info.knob_ranges.get(knob)
            bad = ["not-a-choice"] if isinstance(rng, tuple) else _out_of_range(rng) if rng is not None else []
            if isinstance(rng, Range) and Sequence in _admits(tp):  # a list knob checks each entry
                scalar = bool(_admits(tp) & {int, float})
                bad = (bad if scalar else []) + [[1, v] for v in bad]
            for v in bad:
                cases.append(pytest.param(info.name, knob, v, ValueError, id=f"{info.name}-{knob}-{v!r}"))
    return cases


KNOB_CASES = _knob_cases()


@pytest.mark.parametrize("name", NAMES)
def test_declarations_accept_the_defaults(name: str) -> None:
    info = vtoken.get_method(name)
    assert set(info.knob_ranges) <= set(info.defaults)
    assert info.check_knobs(dict(info.defaults)) == info.defaults


@pytest.mark.parametrize(("name", "knob", "value", "error"), KNOB_CASES)
def test_bad_knob_fails_at_reduce_and_at_apply(name: str, knob: str, value: Any, error: type) -> None:
    info = vtoken.get_method(name)
    x, keep, kw = example(info)
    pattern = rf"method '{name}': .*{knob}"
    with pytest.raises(error, match=pattern):
        vtoken.reduce(x, keep, name, **{**kw, knob: value})
    step_keep = 1.0 if info.needs_keep else None
    with pytest.raises(error, match=pattern):  # vtoken.apply(model, name, knob=value)
        build_steps(name, step_keep, {knob: value})
    with pytest.raises(error, match=pattern):  # vtoken.apply(model, [(name, {knob: value})])
        build_steps([(name, {knob: value})], step_keep, {})


def test_knob_examples() -> None:
    x = torch.randn(2, 16, 8)
    sig = {"cls_attn": torch.rand(2, 16), "keys": torch.randn(2, 16, 4)}
    for call in (lambda: vtoken.reduce(x, 8, "visionzip", contextual=-1, **sig),
                 lambda: build_steps("visionzip", 8, {"contextual": -1})):
        with pytest.raises(ValueError, match=r"method 'visionzip': contextual must be >= 0, got -1"):
            call()
    with pytest.raises(ValueError, match=r"contextual is an int count >= 0 or a float ratio of keep in \[0, 1\]"):
        vtoken.reduce(x, 8, "visionzip", contextual=1.5, **sig)
    assert vtoken.reduce(x, 8, "visionzip", contextual=3, **sig).tokens.shape[1] == 8  # an int is a count
    with pytest.raises(TypeError, match=r"method 'random': seed must be an int, got 'a'"):
        vtoken.reduce(x, 4, "random", seed="a")
    with pytest.raises(ValueError, match=r"method 'random': seed must be in \["):
        vtoken.reduce(x, 4, "random", seed=2**70)
    assert vtoken.reduce(x, 4, "random", seed=-3).tokens.shape[1] == 4  # torch accepts negative seeds
    with pytest.raises(ValueError, match=r"method 'mmtok': alpha must be finite"):
        vtoken.reduce(x, 4, "mmtok", text=torch.randn(2, 3, 8), alpha=float("nan"))
    with pytest.raises(ValueError, match=r"method 'dart': pivot_image_token \+ pivot_text_token must be >= 1"):
        build_steps("dart", 64, {"pivot_image_token": 0, "pivot_text_token": 0})
    with pytest.raises(TypeError, match=r"method 'tome': class_token must be a bool"):
        build_steps("tome", 8, {"class_token": 1})
    # NumPy scalars and one-element tensors count as their value
    a = vtoken.reduce(x, 4, "mmtok", text=torch.randn(2, 3, 8, generator=torch.Generator().manual_seed(1)),
                      alpha=np.float32(0.25))
    b = vtoken.reduce(x, 4, "mmtok", text=torch.randn(2, 3, 8, generator=torch.Generator().manual_seed(1)),
                      alpha=torch.tensor(0.25))
    assert torch.equal(a.indices, b.indices)
    own = {"keep": 4, "seed": 1}
    build_steps([("random", own)], None, {})
    assert own == {"keep": 4, "seed": 1}, "build_steps leaves the caller's dict alone"


# -------------------------------------------------------------------------------------------------- keep, mask, meta


@pytest.mark.parametrize("keep", [True, False, torch.tensor(True), torch.tensor([True]), np.bool_(True),
                                  torch.tensor([2, 3]), "4", None, 4 + 0j])
def test_keep_bools_and_non_numbers_are_rejected(keep: Any) -> None:
    with pytest.raises((TypeError, ValueError), match="keep"):
        vtoken.reduce(torch.randn(2, 16, 8), keep, "divprune")
    if keep is not None:
        with pytest.raises((TypeError, ValueError), match="keep"):
            build_steps("divprune", keep, {})


@pytest.mark.parametrize(("keep", "same"), [(torch.tensor(4), 4), (torch.tensor(0.5), 0.5), (np.int64(4), 4),
                                            (np.float32(0.5), 0.5), (torch.tensor([3]), 3)])
def test_keep_scalars_count_as_their_value(keep: Any, same: Any) -> None:
    x = torch.randn(2, 16, 8)
    assert torch.equal(vtoken.reduce(x, keep, "divprune").indices, vtoken.reduce(x, same, "divprune").indices)
    assert resolve_keep(keep, 16).tolist() == resolve_keep(same, 16).tolist()


@pytest.mark.parametrize("name", KEEP_METHODS)
def test_huge_keep_is_clipped_to_the_tokens(name: str) -> None:
    info = vtoken.get_method(name)
    x, _, kw = example(info)
    red = vtoken.reduce(x, 2**70, name, **kw)
    assert torch.equal(red.tokens, x)
    assert resolve_keep(2**70, torch.tensor([3, 16])).tolist() == [3, 16]
    build_steps(name, 2**70, {})
    if info.schedule is not None:  # the llm-stage schedule resolves keep per image without overflowing
        n, images = torch.tensor([16, 32]), torch.tensor([1, 2])
        counts = info.schedule.counts(n, 2**70, images, **(
            {"depth": 32} if "depth" in __import__("inspect").signature(info.schedule.counts).parameters else {}))
        assert all(c.tolist() == n.tolist() for c in counts)


@pytest.mark.parametrize("bad", [0.5, 2.0, math.nan, -1.0])
def test_mask_values_must_be_zero_or_one(bad: float) -> None:
    x = torch.randn(2, 16, 8)
    mask = torch.ones(2, 16)
    mask[1, 3] = bad
    with pytest.raises(ValueError, match="mask must be a bool tensor"):
        vtoken.reduce(x, 4, "divprune", mask=mask)
    with pytest.raises(ValueError, match="mask must be a bool tensor"):
        vtoken.reduce(x, 4, "divprune", mask=mask.long() * 2 if bad == 2.0 else mask.double())


@pytest.mark.parametrize("name", [n for n in KEEP_METHODS if vtoken.get_method(n).kind != "layout"])
def test_zero_one_mask_is_the_bool_mask(name: str) -> None:
    info = vtoken.get_method(name)
    x, keep, kw = example(info)
    mask = torch.ones(2, 16, dtype=torch.bool)
    mask[1, 12:] = False
    ref = vtoken.reduce(x, keep, name, mask=mask, **kw)
    for m in (mask.float(), mask.long(), mask.to(torch.uint8)):
        red = vtoken.reduce(x, keep, name, mask=m, **kw)
        assert torch.equal(red.indices, ref.indices) and torch.equal(red.tokens, ref.tokens)


@pytest.mark.parametrize("name", NAMES)
def test_meta_tokens_are_named(name: str) -> None:
    info = vtoken.get_method(name)
    x, keep, kw = example(info)
    with pytest.raises(ValueError, match="tokens is on the meta device"):
        vtoken.reduce(x.to("meta"), keep, name, **kw)
    if info.needs_keep and info.kind != "layout":
        with pytest.raises(ValueError, match="mask is on the meta device"):
            vtoken.reduce(x, keep, name, mask=torch.ones(2, 16, dtype=torch.bool, device="meta"), **kw)
    if info.needs_keep:
        with pytest.raises(TypeError, match="keep must be"):
            vtoken.reduce(x, torch.tensor(4, device="meta"), name, **kw)


@pytest.mark.parametrize("method", [None, ("divprune", 8), ["divprune"], 3, b"divprune"])
def test_method_must_be_a_name(method: Any) -> None:
    with pytest.raises(TypeError, match=r"method must be a registered method name \(a str such as 'divprune'"):
        vtoken.reduce(torch.randn(1, 8, 4), 2, method)
    if not isinstance(method, list):
        with pytest.raises(TypeError, match="method"):
            build_steps(method, 2, {})


# ------------------------------------------------------------------------------------------------------ declarations


def test_range_strings() -> None:
    cases = {"[0, 1]": (0, 1, -0.1, 1.1), "(0, 1]": (0.5, 1, 0, 2), "> 0": (1e-9, 5, 0, -1), ">= 1": (1, 9, 0.5, -1),
             "[-3, 2.5)": (-3, 2, 2.5, -4)}
    for text, (in1, in2, out1, out2) in cases.items():
        rng = Range.parse(text)
        assert in1 in rng and in2 in rng and out1 not in rng and out2 not in rng, text
    with pytest.raises(ValueError, match="knob range"):
        Range.parse("0..1")


def test_bad_declarations_are_rejected_at_registration() -> None:
    from vtoken.methods.registry import register

    def fn(tokens: torch.Tensor, counts: torch.Tensor, *, mask: torch.Tensor | None = None,
           alpha: float = 0.5) -> vtoken.Reduction:
        raise AssertionError

    common = {"paper": "test", "venue": "test", "repo": None, "stage": "pre_llm", "kind": "prune"}
    with pytest.raises(ValueError, match="knob_ranges names"):
        register("_test_bad_range", knob_ranges={"beta": ">= 0"}, **common)(fn)
    with pytest.raises(ValueError, match="knob range"):
        register("_test_bad_range", knob_ranges={"alpha": "0..1"}, **common)(fn)
    with pytest.raises(ValueError, match="knob rule"):
        register("_test_bad_range", knob_rules=[("beta > 0", lambda beta: beta > 0)], **common)(fn)
    with pytest.raises(ValueError, match="signal_shapes"):
        register("_test_bad_range", signal_shapes={"text": "B T C"}, **common)(fn)
    assert "_test_bad_range" not in {m.name for m in vtoken.methods()}
