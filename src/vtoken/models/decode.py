"""Decode-stage methods: at every decoding step, the deeper decoder layers' KV cache holds only the visual tokens a
method keeps (DyCoke's dynamic KV-cache pruning), and the others wait outside it until a later step picks them.

A decode step is scheduled at one decoder layer ``K`` (its :class:`~vtoken.methods.LLMSchedule`). The prefill
prunes nothing for it. At each decoding step, before layer ``K`` runs:

1. **Signals.** ``llm_attn``: the new token's attention to every visual token in layer ``K - 1`` (its query as
   ``q_proj`` produced it, with the layer's norm and RoPE; the keys as the cache holds them; head mean, softmax over
   the keys the layer's own mask allows, float32). Layers before ``K`` hold every visual token, so every visual
   token is scored, pruned or not. ``decode_state``: the method's previous ``extras["state"]``.
2. **Selection.** The method returns the visual tokens to keep (``counts`` from ``keep``, resolved once per prefill
   against the visual tokens each sample has in layer ``K``).
3. **The cache.** Where the kept set changed, every layer from ``K`` on is rebuilt: its prompt part becomes the text
   tokens and the kept visual tokens (right-aligned; samples keeping fewer get masked left padding, which a later
   rebuild drops), then the generated tokens as they were. The keys and values of pruned visual tokens move to a
   store beside the cache (one per layer, only what is not in the cache: together they hold what the full cache
   would), from which a later selection takes them back. A dynamic cache layer gets new tensors; a static one is
   rewritten in place with its filled length (``cumulative_length``) set, so the next token lands after them.
4. **Masks.** Layers from ``K`` on get the mask of their new layout (:class:`~vtoken.models.layout.Layout`).

Each step is recorded (``records``): the step index, the layer, visual tokens per sample, kept per sample, whether
a new selection was made, and the length the rebuilt layers hold. llm-stage steps compose when they all prune
before layer ``K`` (layers ``K - 1`` and ``K`` then share one layout); a decode step at or before an llm-stage
pruning is a ``ValueError``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from ..api import run_method
from ..core import Reduction, gather_rows
from .hf import allows, cache_of, flat_rotary, layer_kv, set_layer_kv
from .layout import Layout, rotate, row_attention, take_seq
from .pipeline import Step
from .sequence import compact

if TYPE_CHECKING:
    from .llm import DecoderPruner


class DecodeKV:
    """One decode-stage step inside the decoder ``pruner`` drives (see the module docstring)."""

    def __init__(self, pruner: DecoderPruner, step: Step, layer: int, knobs: dict[str, Any]) -> None:
        self.pruner = pruner
        self.step = step
        self.layer = layer
        self.knobs = knobs
        self._hook: Any = None
        self.records: list[dict[str, Any]] = []
        self.reset()

    # ---- patching ---------------------------------------------------------------------------------------------
    def attach(self) -> None:
        q_proj = self.pruner.layers[self.layer - 1].self_attn.q_proj

        def hook(_module: nn.Module, _inputs: Any, output: Tensor) -> None:
            if self.pruner.mode == "decode":
                self.query = output.detach()

        self._hook = q_proj.register_forward_hook(hook)

    def detach(self) -> None:
        if self._hook is not None:
            self._hook.remove()
            self._hook = None
        self.reset()

    def reset(self) -> None:
        self.cache: Any = None
        self.base: Layout | None = None
        self.query: Tensor | None = None
        self.seen: dict[str, Any] = {}
        self.state: Tensor | None = None
        self.steps = 0
        self.records = []

    # ---- per prefill ------------------------------------------------------------------------------------------
    def start(self, base: Layout, visual: Tensor, images: Tensor) -> None:
        """After a prefill: ``base`` is the layout layers ``K - 1`` and ``K`` ran on, ``visual [B, L]`` the visual
        columns of the prompt, ``images [B]`` images per sample."""
        self.reset()
        self.base = base
        cols = base.cols
        self.visual = take_seq(visual, cols, 1) & (cols >= 0) & base.valid                      # [B, n]
        nv = self.visual.sum(1)
        info = self.step.info
        depth = len(self.pruner.layers)
        counts = info.schedule.plan_counts(nv, self.step.keep, images, depth, self.knobs)[0]
        self.counts = torch.as_tensor(counts, dtype=torch.long, device=nv.device).minimum(nv)
        n = cols.shape[1]
        b = cols.shape[0]
        #: base slot of each prompt slot the layers from K hold (-1: padding), and of each stored (pruned) entry
        self.active = torch.where(base.valid, torch.arange(n, device=cols.device).expand(b, n), -1)
        self.stored = torch.full((b, 0), -1, dtype=torch.long, device=cols.device)
        self.store: dict[int, tuple[Tensor, Tensor]] = {}

    def layout(self) -> Layout:
        """The layout of the layers from ``K`` on: the base layout's columns at the active slots."""
        assert self.base is not None
        ok = self.active >= 0
        cols = torch.where(ok, take_seq(self.base.cols, self.active, 1), -1)
        return Layout(cols, ok & take_seq(self.base.valid, self.active, 1))

    # ---- per decoding step ------------------------------------------------------------------------------------
    def observe(self, kwargs: dict[str, Any]) -> None:
        """Layer ``K - 1``'s keyword arguments at this step (its mask and rotary table)."""
        self.seen = {"mask": kwargs.get("attention_mask"), "rope": kwargs.get("position_embeddings")}

    def run(self, kwargs: dict[str, Any]) -> None:
        """Before layer ``K`` at a decoding step: score, select and rebuild the cache of layers ``K`` on."""
        cache = cache_of(kwargs)
        if self.base is None or cache is None or self.query is None or not bool(self.visual.any()):
            return
        if cache is not self.cache:
            self.follow_beams(cache)
        vis, n = self.visual, self.visual.shape[1]
        if bool((self.counts >= vis.sum(1)).all()):  # a budget of every visual token: nothing to prune
            self.steps += 1
            return
        attn = self.attention(cache)                                                            # [B, T]
        slots = torch.arange(n, device=vis.device)
        order = torch.sort((~vis).to(torch.int8), dim=1, stable=True).indices[:, :max(int(vis.sum(1).max()), 1)]
        vmask = torch.gather(vis, 1, order)
        keys = layer_kv(cache, self.layer - 1)[0][:, :, :n].transpose(1, 2).flatten(2)          # [B, n, H_kv d]
        red = self.select(gather_rows(keys, order, vmask), gather_rows(attn[:, :n, None], order, vmask)[..., 0],
                          vmask)
        kept_slot = torch.zeros(vis.shape[0], n + 1, dtype=torch.bool, device=vis.device)
        at = torch.where(red.mask, order.gather(1, red.indices.clamp(min=0)), n)
        kept_slot.scatter_(1, at, True)
        keep = self.base.valid & (~vis | kept_slot[:, :n])
        comp = compact(keep, None)
        g = comp.gather
        active = torch.where(g >= 0, slots.expand_as(vis).gather(1, g.clamp(min=0)), -1)
        changed = active.shape != self.active.shape or not torch.equal(active, self.active)
        if changed:
            stored = compact(self.base.valid & vis & ~kept_slot[:, :n], None).gather
            stored = torch.where(stored >= 0, slots.expand_as(vis).gather(1, stored.clamp(min=0)), -1)
            for j in range(self.layer, len(self.pruner.layers)):
                self.rebuild(cache, j, active, stored)
            self.active, self.stored = active, stored
            lay = self.layout()
            for j in range(self.layer, len(self.pruner.layers)):
                self.pruner.layouts[j] = lay
        self.records.append({"step": self.steps, "layer": self.layer, "method": self.step.info.name,
                             "visual": vis.sum(1).tolist(), "kept": red.mask.sum(1).tolist(),
                             "reselected": red.extras["reselected"].tolist(), "rebuilt": changed,
                             "length": int(layer_kv(cache, self.layer)[0].shape[2])})
        self.steps += 1
        self.query = None

    def follow_beams(self, cache: Any) -> None:
        """Beam search reorders the cache's rows between steps (``cache.reorder_cache(beam_idx)``): the store, the
        state and the layout of each row follow (an instance attribute on this generate call's cache)."""
        self.cache = cache
        original = getattr(cache, "reorder_cache", None)
        if original is None:
            return

        def reorder_cache(beam_idx: Tensor, _original: Any = original) -> Any:
            out = _original(beam_idx)
            if self.cache is cache and self.base is not None:
                self.reorder(beam_idx)
            return out

        cache.reorder_cache = reorder_cache

    def reorder(self, beam_idx: Tensor) -> None:
        """Every per-row tensor of this generate call taken at ``beam_idx``."""
        assert self.base is not None
        idx = beam_idx.to(self.visual.device)
        self.base = Layout(self.base.cols.index_select(0, idx), self.base.valid.index_select(0, idx))
        self.visual, self.counts = self.visual.index_select(0, idx), self.counts.index_select(0, idx)
        self.active, self.stored = self.active.index_select(0, idx), self.stored.index_select(0, idx)
        if self.state is not None:
            self.state = self.state.index_select(0, idx)
        self.store = {j: (k.index_select(0, idx), v.index_select(0, idx)) for j, (k, v) in self.store.items()}
        lay = self.layout()
        for j in range(self.layer, len(self.pruner.layers)):
            self.pruner.layouts[j] = lay

    def attention(self, cache: Any) -> Tensor:
        """``[B, T]`` head-mean attention probabilities of this step's last new token over layer ``K - 1``'s cache
        (float32, over the keys its mask allows)."""
        attn_mod = self.pruner.layers[self.layer - 1].self_attn
        keys = layer_kv(cache, self.layer - 1)[0]                                               # [B, H_kv, T, d]
        b, _, t, hd = keys.shape
        q = self.query[:, -1:].reshape(b, 1, -1, hd)
        if hasattr(attn_mod, "q_norm"):
            q = attn_mod.q_norm(q)
        rope = self.seen.get("rope")
        if rope is not None:
            cos, sin = (flat_rotary(x, attn_mod).float()[:, -1:] for x in rope)
            q = rotate(q.float(), cos.expand(b, *cos.shape[1:]), sin.expand(b, *sin.shape[1:]))
        mask = self.seen.get("mask")
        if isinstance(mask, Tensor) and mask.dim() == 4:
            valid = allows(mask[:, :1, -1, :t]).reshape(-1, t).expand(b, t)
        else:
            valid = torch.ones(b, t, dtype=torch.bool, device=keys.device)
        scale = float(getattr(attn_mod, "scaling", hd ** -0.5))
        rows = torch.full((b, 1), t - 1, dtype=torch.long, device=keys.device)
        return row_attention(q, keys.transpose(1, 2), rows, valid, scale)[:, 0]

    def select(self, tokens: Tensor, llm_attn: Tensor, vmask: Tensor) -> Reduction:
        """The step's method on the samples with visual tokens; ``self.state`` becomes its ``extras["state"]``."""
        info = self.step.info
        has = vmask.any(1)
        sub = None if bool(has.all()) else has.nonzero()[:, 0]

        def rows(x: Any) -> Any:
            return x[sub] if sub is not None and isinstance(x, Tensor) else x

        signals: dict[str, Any] = {"llm_attn": llm_attn}
        if self.state is not None:
            signals["decode_state"] = self.state
        wanted = set(info.all_signals)
        m = rows(vmask)
        red = run_method(info, rows(tokens), rows(self.counts), mask=None if bool(m.all()) else m,
                         signals={k: rows(v) for k, v in signals.items() if k in wanted},
                         knobs=info.step_knobs(self.step.kwargs))
        state = red.extras["state"]
        if sub is None:
            self.state = state
            return red
        b, k = tokens.shape[0], red.indices.shape[1]
        idx = torch.full((b, k), -1, dtype=torch.long, device=tokens.device)
        msk = torch.zeros(b, k, dtype=torch.bool, device=tokens.device)
        idx[sub], msk[sub] = red.indices, red.mask
        full = state.new_zeros(b, *state.shape[1:])
        full[sub] = state
        again = torch.zeros(b, dtype=torch.bool, device=tokens.device)
        again[sub] = red.extras["reselected"]
        self.state = full
        return Reduction(tokens.new_zeros(b, k, tokens.shape[-1]), idx, msk, None, None,
                         {"state": full, "reselected": again})

    def rebuild(self, cache: Any, j: int, active: Tensor, stored: Tensor) -> None:
        """Layer ``j``'s cache: the prompt entries at the ``active`` base slots, then its generated tokens; the
        entries at the ``stored`` slots move to its store."""
        keys, values = layer_kv(cache, j)
        n_cur = self.active.shape[1]
        n = self.visual.shape[1]
        old_k, old_v = self.store.get(j, (keys[:, :, :0], values[:, :, :0]))
        out = []
        for now, old in ((keys, old_k), (values, old_v)):
            b, h, _, d = now.shape
            full = now.new_zeros(b, h, n + 1, d)
            for part, where in ((now[:, :, :n_cur], self.active), (old, self.stored)):
                at = torch.where(where >= 0, where, n)[:, None, :, None].expand(b, h, -1, d)
                full.scatter_(2, at, part)
            take = [full.gather(2, s.clamp(min=0)[:, None, :, None].expand(b, h, -1, d)) for s in (active, stored)]
            out.append((torch.cat([take[0], now[:, :, n_cur:]], dim=2), take[1]))
        set_layer_kv(cache, j, out[0][0], out[1][0])
        self.store[j] = (out[0][1], out[1][1])
