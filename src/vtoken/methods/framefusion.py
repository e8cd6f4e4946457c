"""FrameFusion: merge each visual token into the same slot of the previous frame while the frames are similar, then
prune the rest by importance, inside the language model, under one compute budget.

Fu, Chen, Zhou, Li, Wang, Ning, Yan, Wang, "FrameFusion: Combining Similarity and Importance for Video Token Reduction
on Large Vision Language Models", ICCV 2025. https://github.com/thu-nics/FrameFusion

Reimplemented from the paper and the parity fixture's description. FrameFusion is a cascade: one call per decoder
layer boundary of the prefill (``LLMSchedule(cascade=True)``: before layer 0, on the input embeddings, then before
every later layer), each call one step (:func:`framefusion_step`) on the visual hidden states, its state carried to
the next call in ``llm_state`` (returned in ``Reduction.extras["state"]``) until every sample is done; the driver
skips the layers after that. ``vtoken.reduce`` (no ``llm_state``) runs the whole cascade on the given tokens. Per
sample:

1. **Similarity merging**, from the input embeddings on: every visual token whose cosine similarity with the previous
   remaining token of its frame slot (same spatial position, earlier frame) is ``>= similarity_lower_bound`` is
   averaged into the first token of its run and removed. The merged fraction joins the sample's sparsity list and the
   cascade goes on at the next call while it is ``>= ratio_lower_bound``. A call that would merge at least the
   budget's bound merges only the ``int(bound * N)`` most similar tokens and ends FrameFusion (no pruning).
2. **Importance pruning**, once, at the next call: the visual tokens the last prompt token attends to most (the
   attention of the layer just run, heads averaged) are kept, as many as the budget allows.

The budget (:func:`pruning_ratio`, the official ``_compute_pruning_ratio``): ``cost`` is the average fraction of the
visual tokens' per-layer compute over ``cost_layers`` layers; each merging call counts as one layer at its kept
fraction, and the rest is spread evenly over the remaining layers. vtoken's ``keep`` is that cost (``cost = keep``'s
share of the visual tokens entering the language model; ``keep=1.0`` the identity), or ``keep=1.0`` with the
official ``cost`` knob.

Where the official code calls FrameFusion (Qwen2 decoder layers): layer 0 before its attention, then every layer
``l`` after its attention, before its MLP. vtoken's driver reduces between layers (hooks on whole decoder layers,
the same for every family): the official call after layer ``l``'s attention runs here before layer ``l + 1``, so layer
``l``'s MLP still sees every token and the similarities compare the hidden states after it; the pruning reads layer
``l``'s attention (the last prompt token's row, as the official code) all the same. The parity fixture replays the
official call pattern with a stand-in transformer, which both placements share.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..core import Reduction, compute_dtype, gather_rows
from ._schedule import resolve_llm_keep
from .registry import CASCADE_START, LLMSchedule, register

#: the official defaults (README: cost 0.3; code: similarity_lower_bound 0.6, ratio_lower_bound 0.1, and
#: ``_compute_pruning_ratio``'s ``n = 28`` layers, Qwen2-7B's depth, whatever the model)
OFFICIAL_COST = 0.3
OFFICIAL_SIMILARITY_LOWER_BOUND = 0.6
OFFICIAL_RATIO_LOWER_BOUND = 0.1
OFFICIAL_COST_LAYERS = 28

#: ``llm_state`` columns: phase, the budget's keep count and visual tokens at the first call, the number of
#: threshold merges, then one (merged, visual tokens) pair per threshold merge
PHASE, KEEP, FIRST, MERGES = 0, 1, 2, 3
_PAIRS = 4
#: phases: merging, pruning next, done
MERGING, PRUNING, DONE = 0, 1, 2
#: ``extras["action"]``: what a call did to each sample
NOTHING, THRESHOLD_MERGE, TOPK_MERGE, PRUNE = -1, 0, 1, 2


def pruning_ratio(merged: Tensor, visual: Tensor, calls: Tensor, cost: Tensor, layers: int) -> tuple[Tensor, Tensor]:
    """The official budget function, per sample in float64 (each operation the one of the official Python floats,
    in the same order, so the values are bit-identical).

    Args:
        merged, visual: ``[B, C]`` long, merged and visual tokens of each threshold merge so far (the sparsity list is
            ``merged / visual``); entries ``>= calls`` are unused.
        calls: ``[B]`` long, threshold merges so far (the list's length).
        cost: ``[B]`` float64, the budget.
        layers: ``n`` of the official function (28).

    Returns ``(ratio [B], rem [B])``: ``s = prod(1 - x)``, ``tot`` the sum of the running products, ``rem = n * cost
    - tot``, ``q = rem / ((n - len) * s)``, ``ratio = 0 if q > 1 else 1 - q`` (the fraction of the remaining visual
    tokens to remove). Where the official code raises "The cost is too small" (``rem < 0``: the merging calls spent
    the budget) the ratio is 1 here (remove all that may go), as it is where the list is as long as ``n``.
    """
    b = calls.shape[0]
    dev = calls.device
    s = torch.ones(b, dtype=torch.float64, device=dev)
    tot = torch.zeros(b, dtype=torch.float64, device=dev)
    for j in range(merged.shape[1]):
        on = j < calls
        x = merged[:, j].double() / visual[:, j].clamp(min=1).double()
        s = torch.where(on, s * (1 - x), s)
        tot = torch.where(on, tot + s, tot)
    rem = layers * cost - tot
    den = (layers - calls).double() * s
    inf = torch.full_like(rem, float("inf"))
    q = torch.where(den > 0, rem / den.clamp(min=torch.finfo(torch.float64).tiny), torch.where(rem >= 0, inf, -inf))
    ratio = torch.where(q > 1, torch.zeros_like(q), (1 - q).clamp(max=1))
    return ratio, rem


def _layers(depth: int) -> list[int]:
    return list(range(depth))


def _counts(n: Tensor, keep: int | float, images: Tensor, depth: int) -> list[Tensor]:
    return [resolve_llm_keep(keep, n, images)] * depth


def _rank_desc(scores: Tensor) -> Tensor:
    """``[B, N]`` rank of every entry in a stable descending sort (ties: lowest index first)."""
    order = torch.sort(scores, dim=1, descending=True, stable=True).indices
    return torch.empty_like(order).scatter_(1, order, torch.arange(scores.shape[1], device=scores.device)
                                            .expand_as(order).contiguous())


def _start(state: Tensor | None, counts: Tensor, valid_n: Tensor) -> Tensor:
    """The state entering this call: the given one, with fresh rows (absent, or every entry negative) started."""
    b = counts.shape[0]
    fresh = torch.zeros(b, _PAIRS, dtype=torch.long, device=counts.device)
    fresh[:, PHASE], fresh[:, KEEP], fresh[:, FIRST] = MERGING, counts, valid_n
    if state is None:
        return fresh
    state = state.long().to(counts.device)
    if state.shape[1] < _PAIRS:
        state = torch.cat([state, state.new_full((b, _PAIRS - state.shape[1]), -1)], 1)
    new = (state < 0).all(1)
    width = state.shape[1] + (state.shape[1] - _PAIRS) % 2
    state = torch.cat([state, state.new_zeros(b, width - state.shape[1])], 1)
    fresh = torch.cat([fresh, fresh.new_zeros(b, width - _PAIRS)], 1)
    return torch.where(new[:, None], fresh, state)


@register("framefusion", paper="FrameFusion: Combining Similarity and Importance for Video Token Reduction on Large "
          "Vision Language Models", venue="ICCV 2025", repo="https://github.com/thu-nics/FrameFusion", stage="llm",
          kind="merge", signals=("llm_frame_slots",), optional_signals=("llm_attn", "llm_state"), parity=True,
          fixture="framefusion", exact=False,
          schedule=LLMSchedule(_layers, _counts, cascade=True),
          knob_ranges={"cost": "(0, 1]", "similarity_lower_bound": "[-1, 1]", "ratio_lower_bound": "[0, 1]",
                       "cost_layers": ">= 1"},
          main_knobs=("cost", "similarity_lower_bound"),
          knob_sources={
              "cost": "vtoken: None, the budget is keep (cost = keep's share of the visual tokens, so keep=0.3 is the "
                      "README's cost 0.3); give the official cost with keep=1.0",
              "similarity_lower_bound": "official code: similarity_lower_bound=0.6 (the README's setting)",
              "ratio_lower_bound": "official code: ratio_lower_bound=0.1 (the README's setting)",
              "cost_layers": "official code: _compute_pruning_ratio's n = 28 layers, whatever the model's depth",
          })
def framefusion(tokens: Tensor, counts: Tensor, *, mask: Tensor | None = None, llm_frame_slots: Tensor | None = None,
                llm_attn: Tensor | None = None, llm_state: Tensor | None = None, cost: float | None = None,
                similarity_lower_bound: float = OFFICIAL_SIMILARITY_LOWER_BOUND,
                ratio_lower_bound: float = OFFICIAL_RATIO_LOWER_BOUND,
                cost_layers: int = OFFICIAL_COST_LAYERS) -> Reduction:
    """FrameFusion (ICCV 2025): in the first layers, merge each visual token into the same slot of the previous frame
    while the frames are similar; then keep the visual tokens the last prompt token attends to most; one budget.

    See the module docstring for the algorithm.

    Args:
        tokens: ``[B, N, D]`` hidden states of the visual tokens (in sequence order) entering the next decoder layer;
            at the first call the input embeddings.
        counts: ``[B]`` long, the budget as a count: at a sample's first call ``cost = counts / N`` (``keep``
            resolved on the visual tokens entering the language model); later calls read it from the state.
        mask: optional ``[B, N]`` bool, True on real tokens.
        llm_frame_slots: ``[B, N]`` long, the frame slot of every visual token (tokens at one spatial position of
            the frames of one video share a slot; ``-1``: in no frame, never merged, still pruned).
        llm_attn: ``[B, N]`` the last prompt token's attention to each visual token in the decoder layer just run
            (heads averaged); read only by the pruning call.
        llm_state: ``[B, S]`` long: given, this is ONE call of a stepwise run (the driver's, one per decoder-layer
            boundary): ``extras["state"]`` of the previous call, ``CASCADE_START`` (-2) everywhere at the first.
            Absent (or every entry -1): the whole cascade on these tokens, the layers between its calls identities
            (``vtoken.reduce``; ``extras["steps"]`` the calls' extras).
        cost: the official budget, the target average fraction of the visual tokens' per-layer compute over
            ``cost_layers`` layers, for every sample; then ``keep`` must be 1.0. Default None: ``cost = keep``'s
            share of the visual tokens (``keep=0.3`` is the README's cost 0.3, ``keep=1.0`` the identity).
        similarity_lower_bound: ``S_th``: a token merges when its cosine similarity is ``>=`` this (official 0.6).
        ratio_lower_bound: the cascade ends after a threshold merge that merges less than this fraction of the
            slotted tokens (official 0.1).
        cost_layers: the layers ``cost`` averages over (official 28, whatever the model's depth).

    ``keep`` and ``cost``: the budget is spent on the merging layers first (each at its kept fraction), so fewer than
    ``keep`` visual tokens reach the deep layers (about ``(cost_layers * cost - spent) / (cost_layers - merges)``
    of them; ``exact=False``). Deviations: where the official code raises "The cost is too small" (the merging calls
    already spent the budget) the prune keeps as few as it may; a prune keeps at least one visual token.

    Merges are plain means of the current hidden states (a token that already holds several frames weighs as one);
    the kept token of a run is its earliest. Ties in the top-k merge and the prune break by lowest index (official:
    ``torch.topk``). Returns a merging :class:`Reduction` in source order (``assign``; ``extras`` of
    :func:`framefusion_step`).
    """
    assert llm_frame_slots is not None
    knobs = {"cost": cost, "similarity_lower_bound": similarity_lower_bound, "ratio_lower_bound": ratio_lower_bound,
             "cost_layers": cost_layers}
    if llm_state is not None and not bool((llm_state == -1).all()):
        return framefusion_step(tokens, counts, llm_frame_slots, mask=mask, attn=llm_attn, state_in=llm_state,
                                **knobs)
    b, n, _ = tokens.shape
    dev = tokens.device
    x, valid, slots, attn = tokens, mask, llm_frame_slots, llm_attn
    state = torch.full((b, 1), CASCADE_START, dtype=torch.long, device=dev)
    index = torch.arange(n, device=dev).expand(b, n)             # original token of every current one
    assign = index.clone()                                       # current token of every original one
    steps = []
    for _ in range(cost_layers + 1):                             # each call is one of the budget's layers
        red = framefusion_step(x, counts, slots, mask=valid, attn=attn, state_in=state, **knobs)
        steps.append(red.extras)
        assign = torch.where(assign >= 0, red.assign.gather(1, assign.clamp(min=0)), -1)
        index = torch.where(red.mask, index.gather(1, red.indices.clamp(min=0)), -1)
        keep = red.indices.clamp(min=0)
        slots = torch.where(red.mask, slots.gather(1, keep), -1)
        attn = None if attn is None else gather_rows(attn[..., None], keep, red.mask)[..., 0]
        x, valid, state = red.tokens, red.mask, red.extras["state"]
        if bool(red.extras["done"].all()):
            break
    return Reduction(x, index, valid, assign, None, {**steps[-1], "steps": steps})


def framefusion_step(tokens: Tensor, counts: Tensor, slots_in: Tensor, *, mask: Tensor | None = None,
                     attn: Tensor | None = None, state_in: Tensor | None = None, cost: float | None = None,
                     similarity_lower_bound: float = OFFICIAL_SIMILARITY_LOWER_BOUND,
                     ratio_lower_bound: float = OFFICIAL_RATIO_LOWER_BOUND,
                     cost_layers: int = OFFICIAL_COST_LAYERS) -> Reduction:
    """ONE FrameFusion call (the official ``FrameFusion.forward``) on the visual tokens: per sample a merge, the
    prune, or nothing, by its state (see :func:`framefusion` for the arguments; ``slots_in`` / ``attn`` /
    ``state_in`` are ``llm_frame_slots`` / ``llm_attn`` / ``llm_state``, a row of negative entries a first call).

    Returns a merging :class:`Reduction` in source order (``assign``); ``extras``: ``state`` (the next call's
    ``llm_state``), ``done [B]``, ``action [B]`` (-1 nothing, 0 threshold merge, 1 top-k merge, 2 prune), ``budget
    [B]`` (the merge bound or the pruning ratio, float64, NaN where nothing ran), ``above_ratio [B]`` (fraction of
    the slotted tokens at or above ``S_th``; -1 at a prune), ``similarity [B, N]`` and ``patch_order [B, N]`` (the
    similarities in slot-major patch order, -2 at the first token of a slot, -inf / -1 past the slotted tokens; the
    token at each position).
    """
    b, n, d = tokens.shape
    dev = tokens.device
    valid = torch.ones(b, n, dtype=torch.bool, device=dev) if mask is None else mask
    pos = torch.arange(n, device=dev).expand(b, n)
    nv = valid.sum(1)
    state = _start(state_in, counts.to(dev), nv)
    phase = state[:, PHASE]
    first = state[:, FIRST]
    if cost is not None and bool(((state[:, KEEP] < first) & (phase == MERGING) & (state[:, MERGES] == 0)).any()):
        raise ValueError(f"framefusion: give the budget once: keep (cost=None: cost is keep's share of the visual "
                         f"tokens) or cost={cost!r} with keep=1.0; got a keep below the visual tokens")
    budget_cost = (torch.full((b,), float(cost), dtype=torch.float64, device=dev) if cost is not None
                   else state[:, KEEP].double() / first.clamp(min=1).double())
    calls = state[:, MERGES]
    pairs = state[:, _PAIRS:].reshape(b, -1, 2)
    ratio, _ = pruning_ratio(pairs[..., 0], pairs[..., 1], calls, budget_cost, cost_layers)
    active = phase != DONE
    x = tokens.to(compute_dtype(tokens))

    # ---- merging: similarity with the previous remaining token of the same slot, in patch order --------------
    merging = phase == MERGING
    slots = slots_in.long().to(dev)
    slotted = valid & (slots >= 0)
    n_slot = slotted.sum(1)
    key = torch.where(slotted, slots.clamp(min=0) * n + pos, (slots.amax().clamp(min=0) + 1) * n + pos)
    tip = key.argsort(dim=1, stable=True)                                             # [B, N] token of each position
    in_slot = pos < n_slot[:, None]
    xs = x.gather(1, tip[..., None].expand(b, n, d))
    ss = slots.gather(1, tip)
    prev = torch.cat([xs[:, :1], xs[:, :-1]], 1)
    same = in_slot & (pos > 0) & (ss == torch.cat([ss[:, :1], ss[:, :-1]], 1))
    cos = (xs * prev).sum(-1) / (xs.norm(dim=-1) * prev.norm(dim=-1))
    sim = torch.where(same, cos.nan_to_num(nan=-2.0), torch.full_like(cos, -2.0))
    sim = torch.where(in_slot, sim, torch.full_like(sim, float("-inf")))
    above = (sim >= similarity_lower_bound) & same
    n_above = above.sum(1)
    above_ratio = n_above.double() / n_slot.clamp(min=1).double()
    threshold = merging & (above_ratio < ratio)
    k_top = torch.floor(ratio * n_slot.double()).long()
    if cost is None:  # keep's budget before any merge: the bound is exactly 1 - keep / N, in integers (no float edge)
        exact = calls == 0
        spare = (first - state[:, KEEP]).clamp(min=0)
        threshold = torch.where(exact, merging & (n_above * first < spare * n_slot), threshold)
        k_top = torch.where(exact, spare * n_slot // first.clamp(min=1), k_top)
    top = merging & ~threshold
    chosen = (_rank_desc(sim) < k_top[:, None]) & same
    merged = torch.where(threshold[:, None], above, chosen) & merging[:, None]
    # every merged position joins the last unmerged position before it (the token before its run, same slot)
    last_kept = torch.where(merged, -1, pos).cummax(1).values
    dest_tok = tip.gather(1, last_kept.clamp(min=0))                               # [B, N] by position
    rows = torch.arange(b, device=dev)[:, None].expand(b, n)
    acc = x.reshape(b * n, d).clone()
    flat_dest = (rows * n + dest_tok)[merged]
    acc.index_add_(0, flat_dest, xs[merged])
    members = torch.zeros(b * n, dtype=x.dtype, device=dev).index_add_(0, flat_dest, torch.ones_like(flat_dest,
                                                                                                   dtype=x.dtype))
    absorbs = members > 0
    mean = acc[absorbs] / (members[absorbs] + 1)[:, None]
    removed = torch.zeros(b, n, dtype=torch.bool, device=dev)
    removed[rows[merged], tip[merged]] = True
    into = torch.full((b, n), -1, dtype=torch.long, device=dev)                    # token each removed one joins
    into[rows[merged], tip[merged]] = dest_tok[merged]

    # ---- pruning: the last prompt token's attention ----------------------------------------------------------
    pruning = phase == PRUNING
    kept = valid & ~removed
    if bool(pruning.any()):
        if attn is None:
            raise ValueError("framefusion needs the signal 'llm_attn' (the last prompt token's attention to each "
                             "visual token in the layer just run) at its pruning call")
        k_prune = torch.round(nv.double() * (1 - ratio)).long().clamp(min=1)  # official: 0 possible
        score = attn.float().masked_fill(~valid, float("-inf"))
        top_attn = (_rank_desc(score) < k_prune[:, None]) & valid
        kept = torch.where(pruning[:, None], top_attn, kept)

    # ---- the result ------------------------------------------------------------------------------------------
    out_all = tokens.clone(memory_format=torch.contiguous_format)
    if bool(absorbs.any()):
        out_all.reshape(b * n, d)[absorbs] = mean.to(tokens.dtype)
    big = n + pos
    indices = torch.sort(torch.where(kept, pos, big), dim=1).values
    k = int(kept.sum(1).max()) if n else 0
    indices = indices[:, :k]
    out_mask = indices < n
    indices = torch.where(out_mask, indices, -1)
    out = out_all.gather(1, indices.clamp(min=0)[..., None].expand(b, k, d)).masked_fill(~out_mask[..., None], 0)
    slot_of = kept.long().cumsum(1) - 1
    assign = torch.where(kept, slot_of, -1)
    assign = torch.where(removed & (into >= 0), assign.gather(1, into.clamp(min=0)), assign)

    new_phase = torch.where(threshold & (above_ratio < ratio_lower_bound), PRUNING, phase)
    new_phase = torch.where(top | pruning, DONE, new_phase)
    new_calls = calls + threshold.long()
    width = max(int(new_calls.max()) if b else 0, pairs.shape[1])
    grown = torch.cat([pairs, pairs.new_zeros(b, width - pairs.shape[1], 2)], 1)
    slot = calls.clamp(max=width - 1) if width else calls
    if width:
        entry = torch.stack([n_above, n_slot], -1)
        grown[torch.arange(b, device=dev)[threshold], slot[threshold]] = entry[threshold]
    new_state = torch.cat([torch.stack([new_phase, state[:, KEEP], first, new_calls], 1), grown.reshape(b, -1)], 1)
    action = torch.full((b,), NOTHING, dtype=torch.long, device=dev)
    action = torch.where(threshold, THRESHOLD_MERGE, torch.where(top, TOPK_MERGE, torch.where(pruning, PRUNE,
                                                                                            action)))
    budget = torch.where(active, ratio, torch.full_like(ratio, float("nan")))
    extras = {
        "state": new_state, "done": new_phase == DONE, "action": action, "budget": budget,
        "above_ratio": torch.where(pruning, torch.full_like(above_ratio, -1.0),
                                   torch.where(merging, above_ratio, torch.full_like(above_ratio, float("nan")))),
        "similarity": sim, "patch_order": torch.where(in_slot, tip, -1),
    }
    return Reduction(out, indices, out_mask, assign, None, extras)
