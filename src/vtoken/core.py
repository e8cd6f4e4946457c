"""Core types of vtoken: :class:`Reduction`, ``keep`` resolution, the signal catalogue, validation and the
gather/scatter helpers every method builds its result with.

Shapes: ``B`` batch, ``N`` input tokens, ``K`` output tokens, ``D`` channels.

Dtypes: ``tokens`` may be float64, float32, float16 or bfloat16 and signals may come in any floating dtype.
:func:`check_signal` casts every floating signal to :func:`compute_dtype` (float64 for float64 tokens, float32 for
every other dtype), methods compute their scores in that dtype and return tokens in the tokens' own dtype.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "CATALOGUE",
    "SIGNALS",
    "SIGNAL_SHAPES",
    "Reduction",
    "Signal",
    "SignalShape",
    "all_finite",
    "check_keep",
    "check_mask",
    "check_signal",
    "check_signals",
    "check_tokens",
    "compute_dtype",
    "gather_rows",
    "identity_reduction",
    "prefix_mask",
    "reduction_from_indices",
    "reduction_from_merge",
    "resolve_keep",
    "signals_where",
    "topk_indices",
]

class SignalShape(NamedTuple):
    """The full shape of one tensor signal: ``dims``, its axes as symbols (alternatives separated by ``|``), and
    ``kind``, its dtype class: ``"float"`` (any floating dtype, cast to :func:`compute_dtype`), ``"bool"`` (bool, or
    integer/float holding only 0 and 1) or ``"int"`` (an integer dtype)."""

    dims: str
    kind: str


@dataclass(frozen=True)
class Signal:
    """One entry of the signal catalogue (:data:`CATALOGUE`): everything vtoken knows about a signal, declared once.

    ``dims`` is the full shape as axis symbols (alternatives separated by ``|``; ``None`` for ``grid``, a pair of
    ints): ``B``, ``N`` and ``D`` are the tokens' axes, every other symbol must have one size across the signals of
    one call. ``kind`` is the dtype class (:class:`SignalShape`). The flags say who can give it: ``cls`` only a
    [CLS] query row of the vision tower (a tower without one needs the method's declared fallback,
    ``SignalSpec.without_cls``); ``attention`` is read from a vision layer's queries/keys (multi-view families compute
    it per view); ``llm`` is computed inside the language model by the ``llm`` stage, ``llm_qk`` from a decoder
    layer's queries/keys, ``llm_text`` about the instruction tokens, ``llm_embeds`` from the input embeddings.
    """

    doc: str
    dims: str | None
    kind: str = "float"
    cls: bool = False
    attention: bool = False
    llm: bool = False
    llm_qk: bool = False
    llm_text: bool = False
    llm_embeds: bool = False

    def __post_init__(self) -> None:
        if self.kind not in ("float", "bool", "int", "pair", "triple"):
            raise ValueError(f"a signal's kind is 'float', 'bool', 'int', 'pair' or 'triple', got {self.kind!r}")
        if (self.dims is None) != (self.kind in ("pair", "triple")):
            raise ValueError("only a 'pair' or 'triple' signal (grid, video_grid) has no dims")

    @property
    def token_axes(self) -> tuple[int, ...]:
        """The axes indexed by visual token (``N``) in the first shape alternative (``attn``: ``(1, 2)``)."""
        first = (self.dims or "").split("|")[0].split()
        return tuple(i for i, sym in enumerate(first) if sym == "N")

    @property
    def token_axis(self) -> int | None:
        """The one axis indexed by visual token (gathered when tokens drop); ``None`` for none or two."""
        axes = self.token_axes
        return axes[0] if len(axes) == 1 else None


#: Every signal a method may consume, by its fixed keyword name: documentation, full shape, dtype class and who can
#: give it, declared once (:class:`Signal`). A method lists the ones it needs in its registration; a missing one is
#: a ``ValueError`` naming the signal and the method. Symbols: ``B`` batch, ``N`` the visual tokens passed as
#: ``tokens``, ``D`` their width, ``L`` layers, ``T`` text tokens, ``H`` heads.
CATALOGUE: dict[str, Signal] = {
    "cls_attn": Signal("[B, N] head-averaged CLS->patch attention probabilities of one vision layer (CLS column "
                       "removed).", "B N", cls=True, attention=True),
    "cls_attn_layers": Signal("[B, L, N] the same for L layers, shallow to deep.", "B L N", cls=True,
                              attention=True),
    "attn_logits": Signal("[B, N] head-averaged PRE-softmax CLS->patch attention logits (q*scale @ k^T) of one "
                          "layer.", "B N", cls=True, attention=True),
    "attn": Signal("[B, N, N] head-averaged patch->patch attention probabilities of one layer (rows are queries).",
                   "B N N", attention=True),
    "attn_received_layers": Signal("[B, L, N] attention each visual token receives in L vision layers (shallow to "
                                   "deep): probabilities averaged over heads, then over ALL query rows (CLS row "
                                   "included), CLS column dropped.", "B L N", attention=True),
    "cls_q": Signal("[B, H, d] per-head CLS query of one layer (for methods that rebuild attention themselves).",
                    "B H d", cls=True),
    "keys": Signal("[B, N, d] attention keys of one layer, averaged over heads (ToMe/VisionZip metric).", "B N d",
                   attention=True),
    "vision_features": Signal("[B, N, C] a second view of the same tokens (e.g. pre-projector CLIP features).",
                              "B N C"),
    "text": Signal("[B, T, D] text token embeddings of the prompt (same width as the tokens unless a method says).",
                   "B T D", llm=True, llm_text=True, llm_embeds=True),
    "text_mask": Signal("[B, T] bool, True on real text tokens.", "B T", "bool", llm=True, llm_text=True),
    "grid": Signal("(H, W) ints with H * W == N: raster layout of the visual tokens.", None, "pair"),
    "video_grid": Signal("(T, H, W) ints with T * H * W == N: the tokens are T frames of H x W tokens, frame by "
                         "frame, each in raster order; in a batch a shorter clip is padded with whole masked frames "
                         "at the end (its frame count is its valid tokens / (H * W)).", None, "triple"),
    "crop_ids": Signal("[B, N] long, which crop (0 = global view) each token comes from.", "B N", "int"),
    "frame_features": Signal("[B, F, G] one global embedding per video frame (e.g. the vision tower's attention-"
                             "pooling head output), frames in the order of video_grid's T (F == T).", "B F G"),
    "frame_ids": Signal("[B, N] long, which video frame each token comes from (non-decreasing).", "B N", "int"),
    "positions": Signal("[B, N] or [B, N, P] position ids of the tokens in the full sequence.", "B N | B N P", "int",
                        llm=True),
    "llm_attn": Signal("[B, N] attention probabilities from the last token of the prompt to each visual token inside "
                       "the LLM (one decoder layer, averaged over heads; softmax over the whole sequence).", "B N",
                       llm=True, llm_qk=True),
    "llm_text_attn": Signal("[B, T, N] the same from each instruction token (the prompt's text after its last visual "
                            "token; rows marked by text_mask) to each visual token.", "B T N", llm=True, llm_qk=True,
                            llm_text=True),
    "llm_keys": Signal("[B, N, dk] keys of the visual tokens in one decoder layer (RoPE applied, heads "
                       "concatenated).", "B N dk", llm=True, llm_qk=True),
    "llm_hidden": Signal("[B, N, D] hidden states of the visual tokens entering a decoder layer, after the LM's final "
                         "norm.", "B N D", llm=True),
    "llm_text_keys": Signal("[B, T, dk] llm_keys of the instruction tokens (rows marked by text_mask).", "B T dk",
                            llm=True, llm_qk=True, llm_text=True),
    "llm_text_hidden": Signal("[B, T, D] llm_hidden of the instruction tokens (rows marked by text_mask).", "B T D",
                              llm=True, llm_text=True),
    "llm_embeds": Signal("[B, N, D] input embeddings of the visual tokens (what the language model's first layer "
                         "received).", "B N D", llm=True, llm_embeds=True),
    "llm_attn_rank": Signal("[B, N] importance of each visual token in one decoder layer's attention graph over the "
                            "whole sequence: PageRank-style power steps per head through the causal softmax(logits / "
                            "temperature) rows of EVERY token (ops.attention.attention_pagerank), heads combined by "
                            "root mean square.", "B N", llm=True, llm_qk=True),
    "llm_frame_slots": Signal("[B, N] long, the frame slot of each visual token inside the LLM: tokens at one spatial "
                              "position of the frames of one video share a slot (an image is one frame); different "
                              "videos and images use disjoint slots; -1 on visual tokens in no frame (e.g. a video's "
                              "trailing newline).", "B N", "int", llm=True),
    "llm_state": Signal("[B, S] long, the state an llm-stage cascade (LLMSchedule(cascade=True)) carries from one of "
                        "its calls to the next: its previous call's Reduction.extras['state'], CASCADE_START (-2) "
                        "everywhere at the first; absent (or -1 everywhere), the call runs the whole cascade at once "
                        "(vtoken.reduce).", "B S", "int", llm=True),
    "decode_state": Signal("[B, N, S] float, what a decode-stage method carried about each visual token from its "
                           "previous decoding step: that step's Reduction.extras['state']; absent at the first "
                           "decoding step.", "B N S", llm=True),
    "sizes": Signal("[B, N] float, how many original patches each token already represents (merging methods).",
                    "B N"),
}

#: Each signal's documentation (a view of :data:`CATALOGUE`).
SIGNALS: dict[str, str] = {name: sig.doc for name, sig in CATALOGUE.items()}

#: The full shape of every tensor signal (a view of :data:`CATALOGUE`; ``grid`` is a pair of ints, see
#: :func:`check_signal`). A method whose signal differs registers the difference (``register(signal_shapes={"text":
#: "B T C"})``: CDPruner's text lives in the space of ``vision_features``).
SIGNAL_SHAPES: dict[str, SignalShape] = {name: SignalShape(sig.dims, sig.kind) for name, sig in CATALOGUE.items()
                                         if sig.dims is not None}


def signals_where(**flags: bool) -> frozenset[str]:
    """The catalogued signals whose :class:`Signal` flags have the given values (``signals_where(cls=True)``)."""
    return frozenset(name for name, sig in CATALOGUE.items()
                     if all(getattr(sig, flag) == want for flag, want in flags.items()))


@dataclass
class Reduction:
    """The result of every method.

    Attributes:
        tokens: ``[B, K, D]`` output tokens (padding rows are zeros).
        indices: ``[B, K]`` long, source index of each output token, ascending within a sample, ``-1`` on padding.
            A merged token carries the index of its representative (the kept / destination token); a token built
            only from dropped tokens (a fused "extra" token) carries the smallest index among its members.
        mask: ``[B, K]`` bool, True on real output tokens. Padding appears only where samples keep different counts.
        assign: ``[B, N]`` long for merging methods: the output slot each input token went into (``-1`` for
            dropped or padded inputs); ``None`` for pure pruning.
        sizes: ``[B, K]`` float, number of original tokens each output token represents (merging methods).
        extras: method-specific diagnostics (e.g. scores, selection order), never needed by adapters.
    """

    tokens: Tensor
    indices: Tensor
    mask: Tensor
    assign: Tensor | None = None
    sizes: Tensor | None = None
    extras: dict[str, Any] = field(default_factory=dict)

    @property
    def counts(self) -> Tensor:
        """``[B]`` number of real output tokens per sample."""
        return self.mask.sum(-1)

    def __len__(self) -> int:
        return self.tokens.shape[1]


# ---------------------------------------------------------------------------------------------------------------
# keep and validation
# ---------------------------------------------------------------------------------------------------------------

_KEEP_RULE = "an int >= 1 (a count) or a float in (0, 1] (a ratio)"


def check_keep(keep: Any, *, name: str = "keep") -> int | float:
    """``keep`` as a Python ``int >= 1`` (a count) or ``float`` in ``(0, 1]`` (a ratio); errors name ``name``.

    A one-element integer or floating tensor and a NumPy scalar count as their value; bools (``True``, a bool
    tensor, ``numpy.bool_``) are rejected rather than read as 1.
    """
    if isinstance(keep, Tensor):
        if keep.numel() != 1 or keep.dtype == torch.bool or keep.is_complex() or keep.is_meta:
            what = "a bool tensor" if keep.dtype == torch.bool else (
                "a meta tensor" if keep.is_meta else f"a tensor of shape {tuple(keep.shape)} and dtype {keep.dtype}")
            raise TypeError(f"{name} must be {_KEEP_RULE}, got {what}")
        keep = keep.item()
    elif isinstance(keep, np.generic) and not isinstance(keep, np.bool_):
        keep = keep.item()
    if isinstance(keep, bool) or not isinstance(keep, (int, float)):
        raise TypeError(f"{name} must be {_KEEP_RULE}, got {keep!r}")
    if isinstance(keep, float):
        if not math.isfinite(keep) or not 0.0 < keep <= 1.0:
            raise ValueError(f"{name} as a ratio must be a float in (0, 1], got {keep!r}; use an int for a count")
    elif keep < 1:
        raise ValueError(f"{name} must be {_KEEP_RULE}, got {keep!r}")
    return keep


def resolve_keep(keep: int | float, n_valid: Tensor | int, *, name: str = "keep") -> Tensor:
    """Resolve ``keep`` into a per-sample count.

    ``keep`` is an ``int >= 1`` (a count, clipped to the tokens available, however large) or a ``float`` in
    ``(0, 1]`` (a ratio of the valid count, rounded half-up, at least 1); see :func:`check_keep`. ``n_valid`` is
    ``[B]`` (or an int). Returns ``[B]`` long.
    """
    n = torch.as_tensor(n_valid, dtype=torch.long).reshape(-1)
    keep = check_keep(keep, name=name)
    if isinstance(keep, float):
        counts = torch.floor(n.double() * keep + 0.5).long()
        return counts.clamp(min=1).minimum(n.clamp(min=1))
    return torch.full_like(n, min(keep, torch.iinfo(torch.long).max)).minimum(n.clamp(min=1))


def compute_dtype(tokens: Tensor) -> torch.dtype:
    """The dtype scores are computed in: float64 for float64 tokens, float32 for every other dtype."""
    return torch.float64 if tokens.dtype == torch.float64 else torch.float32


def _no_meta(x: Tensor, what: str) -> None:
    if x.is_meta:
        raise ValueError(f"{what} is on the meta device (a shape without values); pass a tensor with data, e.g. on "
                         f"'cpu' or 'cuda'")


def check_tokens(tokens: Any, *, name: str = "tokens") -> Tensor:
    """Validate a ``[B, N, D]`` floating tensor with finite values."""
    if not isinstance(tokens, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape [B, N, D], got {type(tokens).__name__}")
    if tokens.dim() != 3:
        hint = " (add a batch dimension: tokens[None])" if tokens.dim() == 2 else ""
        raise ValueError(f"{name} must have shape [B, N, D], got {tuple(tokens.shape)}{hint}")
    if not tokens.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor (float64, float32, float16 or bfloat16), got dtype "
                        f"{tokens.dtype}")
    if tokens.shape[1] == 0 or tokens.shape[0] == 0:
        raise ValueError(f"{name} must have at least one sample and one token, got {tuple(tokens.shape)}")
    _no_meta(tokens, name)
    if not all_finite(tokens):
        raise ValueError(f"{name} contains NaN or inf values")
    return tokens


def all_finite(x: Tensor) -> bool:
    """True when ``x`` has no NaN/inf (``aminmax`` propagates both; ~40x faster than ``isfinite().all()``)."""
    if x.numel() == 0:
        return True
    lo, hi = torch.aminmax(x.detach().reshape(-1))
    return bool(torch.isfinite(lo) & torch.isfinite(hi))


def _as_bool(x: Tensor, what: str) -> Tensor:
    """``x`` as a bool tensor: bool as is, integer or floating only when every value is exactly 0 or 1."""
    if x.dtype == torch.bool:
        return x
    if x.is_complex() or not bool(((x == 0) | (x == 1)).all()):
        raise ValueError(f"{what} must be a bool tensor (True on real tokens), or an integer/float tensor holding "
                         f"only 0 and 1; got dtype {x.dtype} with other values (e.g. NaN, 0.5 or 2)")
    return x.to(torch.bool)


def check_mask(mask: Any, tokens: Tensor, *, name: str = "mask") -> Tensor | None:
    """Validate an optional ``[B, N]`` bool mask (True = real token); every sample needs one real token.

    An integer or float mask is accepted when it holds only 0 and 1 (anything else, NaN included, is an error).
    """
    if mask is None:
        return None
    if not isinstance(mask, Tensor):
        raise TypeError(f"{name} must be a bool torch.Tensor of shape [B, N], got {type(mask).__name__}")
    if tuple(mask.shape) != tuple(tokens.shape[:2]):
        raise ValueError(f"{name} must have shape [B, N] = {tuple(tokens.shape[:2])}, got {tuple(mask.shape)}")
    _no_meta(mask, name)
    mask = _as_bool(mask, name).to(device=tokens.device)
    if not bool(mask.any(-1).all()):
        raise ValueError(f"{name} must mark at least one real token in every sample")
    return mask


def _grid(value: Any, n: int, where: str, axes: str = "HW") -> tuple[int, ...]:
    def side(v: Any) -> int:
        if isinstance(v, Tensor) and v.numel() == 1 and not v.is_floating_point() and v.dtype != torch.bool \
                and not v.is_meta:
            v = v.item()
        elif isinstance(v, np.integer):
            v = int(v)
        if isinstance(v, bool) or not isinstance(v, int):
            raise TypeError
        return v

    names, product = ", ".join(axes), " * ".join(axes)
    try:
        sides = tuple(side(v) for v in value)
        if len(sides) != len(axes):
            raise ValueError
    except (TypeError, ValueError):
        count = "a pair of" if len(axes) == 2 else f"{len(axes)}"
        raise TypeError(f"{where} must be {count} ints ({names}) with {product} == N = {n}, got {value!r}") from None
    if min(sides) < 1 or math.prod(sides) != n:
        raise ValueError(f"{where} must satisfy {product} == N = {n}, got {sides}")
    return sides


def _dims(symbols: tuple[str, ...], bound: dict[str, tuple[int, str]], name: str) -> str:
    """``[B, T] = [2, 8] (T = 8 from 'text')``: the symbols, their sizes where known and where they come from."""
    sym = "[" + ", ".join(symbols) + "]"
    known = "[" + ", ".join(str(bound[s][0]) if s in bound else s for s in symbols) + "]"
    src = [f"{s} = {bound[s][0]} from {bound[s][1]!r}" for s in dict.fromkeys(symbols)
           if s in bound and bound[s][1] not in ("tokens", name)]
    return f"{sym} = {known}" + (f" ({', '.join(src)})" if src else "")


def check_signal(name: str, value: Any, tokens: Tensor, method: str, *,
                 bound: dict[str, tuple[int, str]] | None = None, shapes: dict[str, str] | None = None) -> Any:
    """Check one signal against its full shape and dtype class (:data:`SIGNAL_SHAPES`, or the method's own axes in
    ``shapes``, its ``MethodInfo.signal_shapes``); returns it on the tokens' device, floating signals cast to
    :func:`compute_dtype`, bool signals as bool.

    ``B``, ``N`` and ``D`` must equal the tokens' axes; the other symbols are bound in ``bound`` (``{symbol: (size,
    signal)}``, shared by :func:`check_signals` across the signals of one call) on first sight and checked after.
    Errors name the signal, the method, the expected shape (symbols and sizes) and the actual shape.
    """
    b, n, d = tokens.shape
    where = f"signal {name!r} for method {method!r}"
    if name in ("grid", "video_grid"):
        return _grid(value, n, where, "HW" if name == "grid" else "THW")
    doc = SIGNALS.get(name, "")
    if not isinstance(value, Tensor):
        raise TypeError(f"{where} must be a torch.Tensor ({doc}), got {type(value).__name__}")
    _no_meta(value, where)
    spec = SIGNAL_SHAPES.get(name)
    if spec is None:  # not a catalogued signal: only the batch axis is known
        if value.dim() == 0 or value.shape[0] != b:
            raise ValueError(f"{where} must have batch size {b} first, got {tuple(value.shape)}")
        return value.to(tokens.device)
    dims = (shapes or {}).get(name, spec.dims)
    shared = {"B": (b, "tokens"), "N": (n, "tokens"), "D": (d, "tokens"), **(bound if bound is not None else {})}
    options = [tuple(alt.split()) for alt in dims.split("|")]
    symbols = next((o for o in options if len(o) == value.dim()), None)
    got = list(value.shape)
    if symbols is None:
        want = " or ".join(_dims(o, shared, name) for o in options)
        raise ValueError(f"{where} must have shape {want}, got {got} ({value.dim()} dims); {name}: {doc}")
    new: dict[str, tuple[int, str]] = {}
    for axis, sym in enumerate(symbols):
        size = int(value.shape[axis])
        have = shared.get(sym, new.get(sym))
        if have is None:
            new[sym] = (size, name)
        elif have[0] != size:
            want = _dims(symbols, {**shared, **new}, name)
            raise ValueError(f"{where} must have shape {want}, got {got}: axis {axis} ({sym}) is {size}; {name}: {doc}")
    if spec.kind == "float":
        if not value.is_floating_point():
            raise TypeError(f"{where} must be a floating-point tensor ({doc}), got dtype {value.dtype}")
        if not all_finite(value):
            raise ValueError(f"{where} contains NaN or inf values")
        value = value.to(device=tokens.device, dtype=compute_dtype(tokens))
    elif spec.kind == "bool":
        value = _as_bool(value, where).to(tokens.device)
    else:
        if value.is_floating_point() or value.is_complex() or value.dtype == torch.bool:
            raise TypeError(f"{where} must be an integer tensor (e.g. torch.long; {doc}), got dtype {value.dtype}")
        value = value.to(tokens.device)
    if bound is not None:
        bound.update({k: v for k, v in new.items() if k not in ("B", "N", "D")})
    return value


def check_signals(signals: dict[str, Any], tokens: Tensor, method: str,
                  shapes: dict[str, str] | None = None) -> dict[str, Any]:
    """:func:`check_signal` for every signal of one call (``None`` values skipped), with the symbols other than
    ``B``, ``N``, ``D`` shared: ``text_mask`` must have the ``T`` of ``text``, ``llm_text_attn`` that of
    ``text_mask``, ... Signals are checked in :data:`SIGNALS` order, so a mismatch names the later signal."""
    order = {k: i for i, k in enumerate(SIGNALS)}
    bound: dict[str, tuple[int, str]] = {}
    return {k: check_signal(k, signals[k], tokens, method, bound=bound, shapes=shapes)
            for k in sorted(signals, key=lambda k: order.get(k, len(order))) if signals[k] is not None}


# ---------------------------------------------------------------------------------------------------------------
# building results
# ---------------------------------------------------------------------------------------------------------------


def prefix_mask(counts: Tensor, width: int) -> Tensor:
    """``[B, width]`` bool, True on the first ``counts[b]`` columns."""
    return torch.arange(width, device=counts.device)[None, :] < counts[:, None]


def gather_rows(x: Tensor, idx: Tensor, valid: Tensor | None = None) -> Tensor:
    """Rows of ``x [B, N, ...]`` at ``idx [B, K]`` -> ``[B, K, ...]``; rows where ``valid [B, K]`` is False are 0."""
    batch = torch.arange(x.shape[0], device=x.device)[:, None]
    out = x[batch, idx.clamp(min=0)]
    if valid is not None and not bool(valid.all()):
        out = out.masked_fill(~valid.reshape(*valid.shape, *([1] * (x.dim() - 2))), 0)
    return out


def identity_reduction(tokens: Tensor, mask: Tensor | None = None) -> Reduction:
    """Every real token, unchanged, in source order."""
    b, n = tokens.shape[:2]
    if mask is None or bool(mask.all()):
        idx = torch.arange(n, device=tokens.device).expand(b, n).clone()
        return Reduction(tokens, idx, torch.ones(b, n, dtype=torch.bool, device=tokens.device))
    idx = torch.where(mask, torch.arange(n, device=tokens.device).expand(b, n), -1)
    return reduction_from_indices(tokens, idx)


def reduction_from_indices(tokens: Tensor, idx: Tensor, counts: Tensor | None = None,
                           extras: dict[str, Any] | None = None) -> Reduction:
    """Pruning result from selected source indices.

    Args:
        tokens: ``[B, N, D]``.
        idx: ``[B, M]`` long, selected indices in any order; ``-1`` marks unused slots.
        counts: optional ``[B]``: keep only the first ``counts[b]`` entries of ``idx[b]`` (a greedy selection order
            or a descending top-k is prefix-consistent, so one run at ``max(counts)`` serves every sample).

    Returns a :class:`Reduction` with ascending indices, padded to the largest count.
    """
    idx = idx.long()
    if counts is not None:
        idx = torch.where(prefix_mask(counts.to(idx.device), idx.shape[1]), idx, -1)
    n = tokens.shape[1]
    key = torch.where(idx < 0, n + torch.arange(idx.shape[1], device=idx.device), idx)
    order = key.argsort(dim=1)
    idx = idx.gather(1, order)
    valid = idx >= 0
    k = int(valid.sum(-1).max())
    idx, valid = idx[:, :k], valid[:, :k]
    out = gather_rows(tokens, idx, valid)
    return Reduction(out, idx, valid, extras=extras or {})


def reduction_from_merge(out: Tensor, rep: Tensor, assign: Tensor | None = None, sizes: Tensor | None = None,
                         valid: Tensor | None = None, extras: dict[str, Any] | None = None) -> Reduction:
    """Merging result from output tokens in any order.

    Args:
        out: ``[B, M, D]`` output tokens in the method's own order.
        rep: ``[B, M]`` long, representative source index of each output token (unique per sample).
        assign: ``[B, N]`` long, output slot (into ``out``'s order) of each input token, ``-1`` if dropped.
        sizes: ``[B, M]`` float, original tokens per output token.
        valid: ``[B, M]`` bool, real outputs (default all).

    Sorts outputs by ``rep`` ascending, remaps ``assign`` to the sorted slots and pads to the largest count.
    """
    b, m = rep.shape
    valid = torch.ones_like(rep, dtype=torch.bool) if valid is None else valid
    big = torch.iinfo(torch.long).max // 4
    key = torch.where(valid, rep, big + torch.arange(m, device=rep.device))
    order = key.argsort(dim=1)
    valid_sorted = valid.gather(1, order)
    k = int(valid_sorted.sum(-1).max())
    order, valid_sorted = order[:, :k], valid_sorted[:, :k]
    tokens = gather_rows(out, order, valid_sorted)
    indices = torch.where(valid_sorted, rep.gather(1, order), -1)
    new_sizes = None if sizes is None else sizes.gather(1, order) * valid_sorted.to(sizes.dtype)
    new_assign = None
    if assign is not None:
        inverse = torch.full((b, m), -1, dtype=torch.long, device=rep.device)
        inverse.scatter_(1, order, torch.arange(k, device=rep.device).expand(b, k))
        new_assign = torch.where(assign >= 0, inverse.gather(1, assign.clamp(min=0)), -1)
    return Reduction(tokens, indices, valid_sorted, new_assign, new_sizes, extras or {})


def topk_indices(scores: Tensor, counts: Tensor, mask: Tensor | None = None) -> Tensor:
    """Indices of the ``counts[b]`` highest ``scores [B, N]`` per sample, in descending score order, ``-1`` padded.

    Ties break by lowest index (a stable descending sort). Masked-out tokens are never chosen.
    """
    s = scores.float()
    if mask is not None:
        s = s.masked_fill(~mask, float("-inf"))
    k = int(counts.max())
    order = torch.sort(s, dim=1, descending=True, stable=True).indices[:, :k]
    return torch.where(prefix_mask(counts.to(order.device), k), order, -1)
