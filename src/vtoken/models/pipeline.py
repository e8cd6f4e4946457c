"""A composed list of methods (stage order) run on the visual tokens of a batch of images.

Indices, ``assign`` and ``sizes`` of consecutive reductions are composed, so the final :class:`Reduction` speaks of
the image's original visual tokens; per-token signals are gathered along with the kept tokens for later steps.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from ..api import reduce
from ..core import CATALOGUE, SIGNALS, Reduction, gather_rows, resolve_keep
from ..methods import STAGES, MethodInfo, MethodSpec, get_method

#: signals indexed by token along this dim (gathered when tokens are dropped; a view of the catalogue's
#: ``Signal.token_axis``); others pass through unchanged (``attn``, with two token axes, is gathered on both)
TOKEN_DIM = {name: sig.token_axis for name, sig in CATALOGUE.items() if sig.token_axis is not None}


@dataclass
class Step:
    """One method of a pipeline with its ``keep`` and knobs."""

    info: MethodInfo
    keep: int | float | None
    kwargs: dict[str, Any] = field(default_factory=dict)

    @property
    def space(self) -> str:
        return self.info.space


def build_steps(method: Any, keep: int | float | None, kwargs: dict[str, Any]) -> list[Step]:
    """Validate ``method`` (a name, a :func:`vtoken.method` spec, or a list of names / specs / ``(name, {knobs,
    keep})`` pairs) into stage-ordered steps.

    ``keep`` and ``kwargs`` apply to every method that accepts them (a spec's or a pair's own take precedence); a knob
    no method accepts is a ``TypeError``. Every step's knobs go through the method's own check (type, range, rules:
    :func:`vtoken.methods.registry.check_knobs`, as :func:`vtoken.reduce` runs it), so a bad knob fails here, naming
    the method and the knob.
    """
    if isinstance(method, (str, MethodSpec)):
        items = [method]
    elif isinstance(method, tuple) and len(method) == 2 and isinstance(method[0], str) and not isinstance(
            method[1], (str, tuple, dict, MethodSpec)):
        name, value = method
        raise TypeError(f"method {method!r} is not a (name, {{knobs}}) pair; for a budget write "
                        f"apply(model, {name!r}, keep={value!r}) or vtoken.method({name!r}, keep={value!r})")
    elif isinstance(method, (list, tuple)):
        items = list(method)
    else:
        raise TypeError(f"method must be a registered method name (a str such as 'divprune'; see vtoken.methods()), "
                        f"a vtoken.method(...) spec or a list of them / (name, {{knobs}}) pairs, got {method!r}")
    if not items:
        raise ValueError("method must name at least one method (a name or a list of names)")
    steps: list[Step] = []
    for item in items:
        if isinstance(item, MethodSpec):
            item = item.pair()
        pair = isinstance(item, tuple) and len(item) == 2 and isinstance(item[1], dict)
        if not (isinstance(item, str) or pair):
            raise TypeError(f"method: list entries must be names, vtoken.method(...) specs or (name, {{knobs}}) "
                            f"pairs, got {item!r}")
        name, own = (item, {}) if isinstance(item, str) else (item[0], dict(item[1]))
        info = get_method(name)
        step_keep = own.pop("keep", keep) if own else keep
        if info.needs_keep:
            if step_keep is None:
                raise ValueError(f"keep is required for method {info.name!r}: an int >= 1 or a float in (0, 1]")
            resolve_keep(step_keep, 1)  # validates type and range, raises naming keep
        signals = sorted(k for k in own if k in SIGNALS)
        if signals:
            raise TypeError(f"{signals} are signals the model adapter collects itself; do not pass them to apply()")
        info.check_arguments(own)
        knobs = {k: v for k, v in kwargs.items() if k in info.defaults}
        knobs.update(own)
        steps.append(Step(info, step_keep, info.check_knobs(knobs)))  # the check vtoken.reduce runs, at apply()
    for k in kwargs:
        if k in SIGNALS or k == "mask":
            raise TypeError(f"{k!r} is a signal the model adapter collects itself; do not pass it to apply()")
        if not any(k in s.info.defaults for s in steps):
            raise TypeError(f"no method in {[s.info.name for s in steps]} accepts the argument {k!r}")
    order = {"vision": 0, "projected": 1}
    return sorted(steps, key=lambda s: (STAGES.index(s.info.stage), order.get(s.space, 1)))


def gather_signal(name: str, value: Any, red: Reduction) -> Any:
    """Signal ``value`` of the inputs of ``red`` -> the same signal for its outputs: per-token signals
    (:data:`TOKEN_DIM`) are gathered at ``red.indices`` (``attn [I, N, N]`` on both token dims), ``grid``
    and ``video_grid`` no longer apply (``None``), anything else passes through."""
    if name in ("grid", "video_grid") or not isinstance(value, Tensor):
        return None if name in ("grid", "video_grid") else value
    if name == "attn":
        rows = gather_rows(value, red.indices, red.mask)
        return gather_rows(rows.transpose(1, 2), red.indices, red.mask).transpose(1, 2)
    dim = TOKEN_DIM.get(name)
    if dim is None:
        return value
    if dim == 1:
        return gather_rows(value, red.indices, red.mask)
    return gather_rows(value.transpose(1, 2), red.indices, red.mask).transpose(1, 2)


def slot_map(red: Reduction, k_in: int) -> Tensor:
    """``[I, k_in]``: the output slot each of the ``k_in`` input slots of ``red`` went to (``-1`` if dropped):
    ``assign`` for a merging method, else the inverse of ``indices``."""
    if red.assign is not None:
        return red.assign
    b, k = red.indices.shape
    out = torch.full((b, k_in), -1, dtype=torch.long, device=red.indices.device)
    rows = torch.arange(b, device=out.device)[:, None].expand(b, k)
    slots = torch.arange(k, device=out.device).expand(b, k)
    out[rows[red.mask], red.indices[red.mask]] = slots[red.mask]
    return out


def to_llm(x: Tensor, tokens: Tensor, index: Tensor, valid: Tensor, project: Callable[[Tensor], Tensor],
           exact: Callable[[Tensor, Tensor], Tensor] | None) -> Tensor:
    """``project(x [I, K, C])``; with ``exact``, rows of ``x`` still equal to their source row of ``tokens [I, N, C]``
    (``index [I, K]``, ``valid [I, K]``) take ``exact(index, valid)``'s value instead."""
    if exact is None:
        return project(x)
    ref = exact(index, valid)
    same = (x == gather_rows(tokens, index, valid)).all(-1) | ~valid
    if bool(same.all()):
        return ref
    out = project(x)
    return torch.where(same[..., None], ref.to(out.dtype), out)


#: runs one step of :func:`run_steps`: ``(step, x [I, M, C], valid [I, M], index [I, M], signals) -> Reduction``
StepRunner = Callable[[Step, Tensor, Tensor, Tensor, dict[str, Any]], Reduction]


def follow(index: Tensor, slot: Tensor, red: Reduction, k_in: int) -> tuple[Tensor, Tensor]:
    """Compose one more reduction ``red`` (run on ``k_in`` current tokens) into the running maps.

    ``index [I, K]``: original source index of each current token; ``slot [I, N]``: current slot of each original
    token (``-1`` dropped). Returns both maps after ``red``.
    """
    slot = torch.where(slot >= 0, slot_map(red, k_in).gather(1, slot.clamp(min=0)), -1)
    index = torch.where(red.mask, index.gather(1, red.indices.clamp(min=0)), -1)
    return index, slot


def run_one(step: Step, x: Tensor, valid: Tensor, signals: dict[str, Any]) -> Reduction:
    """:func:`vtoken.reduce` of one step on ``x [I, M, C]`` (``valid [I, M]``) with the signals its method reads."""
    info = step.info
    needed = {k: signals[k] for k in (*info.signals, *info.optional_signals) if signals.get(k) is not None}
    return reduce(x, step.keep, info.name, mask=None if bool(valid.all()) else valid, **needed, **step.kwargs)


def run_steps(steps: Sequence[Step], tokens: Tensor, signals: dict[str, Any],
              project: Callable[[Tensor], Tensor] | None = None, space: str = "projected",
              mask: Tensor | None = None, exact: Callable[[Tensor, Tensor], Tensor] | None = None,
              run: StepRunner | None = None) -> Reduction:
    """Run ``steps`` on ``tokens [I, N, C]`` (in ``space``: ``"vision"`` before the projector, ``"projected"`` after).

    ``project`` maps vision-space tokens to the LLM space; it runs once, before the first LLM-space step (or at the
    end).
    ``mask [I, N]`` marks real tokens when images have different counts. Returns the composed :class:`Reduction`
    whose ``tokens`` are in the LLM space.
    ``exact`` (optional) maps source indices ``[I, K]`` with their validity ``[I, K]`` to the model's own LLM-space
    tokens ``[I, K, D]`` (zeros where invalid): at projection, tokens still bitwise equal to their source token take
    that value instead of ``project(x)`` (for families whose model does more than project each vision token, e.g.
    LLaVA-OneVision resizes the projected crop grid).
    ``run`` (optional) runs one step (:data:`StepRunner`: the current tokens ``x [I, M, C]``, their validity, the
    source index of each and the signals gathered along with them) for families that split a step themselves (e.g.
    per view); by default :func:`vtoken.reduce` runs on ``x`` with the signals the step's method reads.
    """
    i, n = tokens.shape[:2]
    index = torch.arange(n, device=tokens.device).expand(i, n)
    valid = torch.ones(i, n, dtype=torch.bool, device=tokens.device) if mask is None else mask.bool()
    index = torch.where(valid, index, -1)
    slot = index.clone()
    merged, sizes, history = False, None, []
    x, sig = tokens, dict(signals)
    for step in steps:
        if step.space == "projected" and space == "vision":
            x, space = to_llm(x, tokens, index, valid, project, exact), "projected"
        red = run_one(step, x, valid, sig) if run is None else run(step, x, valid, index, sig)
        history.append(red)
        index, slot = follow(index, slot, red, x.shape[1])
        merged |= red.assign is not None
        sizes = red.sizes if red.sizes is not None else (
            None if sizes is None else gather_rows(sizes[..., None], red.indices, red.mask)[..., 0])
        x, valid = red.tokens, red.mask
        sig = {k: gather_signal(k, v, red) for k, v in sig.items()}
        if sizes is not None:
            sig["sizes"] = sizes
    if space == "vision" and project is not None:
        x = to_llm(x, tokens, index, valid, project, exact)
    return Reduction(x, index, valid, slot if merged else None, sizes, {"steps": history})


def _empty(rows: int, like: Reduction) -> Reduction:
    """A reduction that keeps nothing of ``rows`` rows (views whose share of ``keep`` is 0)."""
    dev = like.indices.device
    return Reduction(like.tokens.new_zeros(rows, 0, like.tokens.shape[-1]),
                     torch.zeros(rows, 0, dtype=torch.long, device=dev),
                     torch.zeros(rows, 0, dtype=torch.bool, device=dev))


def stack_reductions(parts: Sequence[tuple[Tensor, Reduction | None]], total: int,
                     width: int | None = None) -> Reduction:
    """Reductions of disjoint row subsets ``(rows [r], Reduction [r, K_p])`` -> one ``Reduction`` of ``total`` rows,
    padded to the widest ``K_p`` (rows of no part keep nothing; so does a part given as ``None``).

    ``sizes`` of parts without them are their mask. ``assign`` (when any part merges; a pruning part's is the inverse
    of its indices, :func:`~vtoken.models.pipeline.slot_map`) is ``[total, width]``: ``width`` is the parts' input
    count when given, else the widest ``assign`` or largest kept index + 1. ``extras["steps"]`` stacks the parts'
    per-step reductions the same way (with ``width``: step 0 reads ``width`` inputs, step ``i`` the widest output of
    step ``i - 1``).
    """
    ref = next(r for _, r in parts if r is not None)
    parts = [(rows, r if r is not None else _empty(len(rows), ref)) for rows, r in parts]
    k = max(r.indices.shape[1] for _, r in parts)
    dev, dt = ref.tokens.device, ref.tokens.dtype
    tokens = torch.zeros(total, k, ref.tokens.shape[-1], dtype=dt, device=dev)
    indices = torch.full((total, k), -1, dtype=torch.long, device=dev)
    mask = torch.zeros(total, k, dtype=torch.bool, device=dev)
    merged = any(r.assign is not None for _, r in parts)
    sized = any(r.sizes is not None for _, r in parts)
    n_in = width if width is not None else max(
        (r.assign.shape[1] if r.assign is not None else int(r.indices.max()) + 1 if r.indices.numel() else 0)
        for _, r in parts)
    assign = torch.full((total, n_in), -1, dtype=torch.long, device=dev) if merged else None
    sizes = torch.zeros(total, k, dtype=torch.float32, device=dev) if sized else None
    for rows, r in parts:
        kk = r.indices.shape[1]
        tokens[rows, :kk] = r.tokens
        indices[rows, :kk] = r.indices
        mask[rows, :kk] = r.mask
        if assign is not None:
            a = slot_map(r, n_in)
            assign[rows, : a.shape[1]] = a
        if sizes is not None:
            sizes[rows, :kk] = r.sizes.float() if r.sizes is not None else r.mask.float()
    extras: dict[str, Any] = {}
    steps = [p.extras.get("steps") for _, p in parts]
    depth = max((len(s) for s in steps if s is not None), default=0)
    if depth and all(s is None or len(s) == depth for s in steps):
        stacked, step_width = [], width
        for i in range(depth):
            stacked.append(stack_reductions([(rows, s[i] if s is not None else None)
                                             for (rows, _), s in zip(parts, steps, strict=True)], total, step_width))
            if width is not None:
                step_width = max(s[i].tokens.shape[1] for s in steps if s is not None)
        extras["steps"] = stacked
    return Reduction(tokens, indices, mask, assign, sizes, extras)


def fold_rows(red: Reduction, image: Tensor, src: Tensor, n_images: int, width: int,
              extras: dict[str, Any]) -> Reduction:
    """Row reductions -> one row per image: rows ``[R]`` of images ``image [R]`` (non-decreasing), row ``r`` reducing
    the image slots ``src [R, W]`` (``-1``: none). An image's outputs are its rows' outputs in row order; indices are
    image slots (``src`` gathered at ``red.indices``), ``assign`` is ``[I, width]`` over the image slots, ``sizes``
    follow."""
    r, k = red.indices.shape
    dev = red.indices.device
    counts = red.mask.sum(1)
    per_image = torch.zeros(n_images, dtype=torch.long, device=dev).index_add_(0, image, counts)
    image_start = per_image.cumsum(0) - per_image
    start = (counts.cumsum(0) - counts) - image_start[image]  # first output slot of each row within its image
    slot = start[:, None] + torch.arange(k, device=dev)[None, :]
    rows = image[:, None].expand(r, k)
    m = red.mask
    out_width = int(per_image.max())
    tokens = red.tokens.new_zeros(n_images, out_width, red.tokens.shape[-1])
    tokens[rows[m], slot[m]] = red.tokens[m]
    indices = torch.full((n_images, out_width), -1, dtype=torch.long, device=dev)
    indices[rows[m], slot[m]] = src.gather(1, red.indices.clamp(min=0))[m]
    mask = torch.zeros(n_images, out_width, dtype=torch.bool, device=dev)
    mask[rows[m], slot[m]] = True
    sizes = None
    if red.sizes is not None:
        sizes = torch.zeros(n_images, out_width, dtype=red.sizes.dtype, device=dev)
        sizes[rows[m], slot[m]] = red.sizes[m]
    assign = None
    if red.assign is not None:
        assign = torch.full((n_images, width), -1, dtype=torch.long, device=dev)
        a = red.assign[:, : src.shape[1]]
        ok = (a >= 0) & (src >= 0)
        assign[image[:, None].expand_as(a)[ok], src[ok]] = (a + start[:, None])[ok]
    return Reduction(tokens, indices, mask, assign, sizes, extras)
