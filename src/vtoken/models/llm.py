"""Pruning inside the language model (``llm``-stage methods) with the model's own attention kernel.

A Hugging Face decoder builds ONE attention mask and ONE rotary table ``(cos, sin)`` for the whole prompt and hands
them, with the hidden states, to every decoder layer. :class:`DecoderPruner` wraps the ``forward`` of each decoder
layer of one model instance (an instance attribute, deleted again by :meth:`DecoderPruner.detach`) and keeps, per
prefill, the **layout** of the sequence each layer runs on: the prompt column (after the pre-LLM splice) of every
slot, ``-1`` on padding it added.

* **Pruning.** Before a scheduled layer ``K`` the step's method runs on the hidden states of the visual tokens (the
  image placeholder columns still present), with signals from layer ``K - 1``: its q/k projections are read by
  forward hooks (the layer itself runs SDPA / eager / whatever it runs), RoPE is applied with the ``(cos, sin)`` that
  layer received, and only the query rows a method needs are scored (the last prompt token, the instruction tokens
  after the last visual token; every row only for ``llm_attn_rank``, in blocks), GQA-aware, in float32, causal and
  padding-masked like the model. The kept slots are
  compacted right-aligned (left padding where samples keep different counts, see :func:`~.sequence.compact`); a
  merging method's outputs replace the hidden state at their representative's slot.
* **Every later layer** gets the hidden states, ``position_embeddings``, ``position_ids`` and a causal + padding
  attention mask of its layout (the model's full-length ones gathered / rebuilt once per layout; kept tokens keep
  their original positions, 1-D or M-RoPE, as the rotary rows are gathered). Its KV cache therefore holds only the
  kept tokens; layers before ``K`` hold every token.
* **Cascades** (``LLMSchedule(cascade=True)``, FrameFusion): a step planned at several layers (``0`` included: before
  the first layer, on the input embeddings, without attention signals) whose stopping depends on the data. Each call
  gets the step's previous ``extras["state"]`` as ``llm_state`` and every sample's budget as ``counts`` unclipped;
  a call that removes nothing leaves the layout as it is, and once ``extras["done"]`` holds for every sample the
  step's later layers are skipped (and their attention no longer captured). ``llm_frame_slots`` is the frame slot
  map the adapter passes to :meth:`DecoderPruner.arm` (:func:`frame_slots`).
* **Decode.** The model still sizes its mask for layer 0's cache (every prompt token). Each pruned layer gets its
  own: its cache slots (padding masked), the generated tokens' columns as the model's mask has them, and the unused
  columns of a static cache's pre-allocated buffer, masked.
* **Masks.** Every mask vtoken builds is an additive float ``[B, 1, q, keys]`` in the hidden states' dtype, which
  eager and SDPA (with or without grouped-query packing on one-token decode steps) read the same way; ``None`` only
  where the model itself passed none and nothing needs masking. Cache lengths come from the cache object
  (``get_seq_length(layer)``; :mod:`vtoken.models.hf` holds every such assumption about transformers).

Only full-attention decoders with the ``sdpa`` or ``eager`` implementation are supported (other kernels take other
mask formats); layers are called with the hidden states as their only positional argument, as transformers does.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from ..api import run_method
from ..core import Reduction, gather_rows, signals_where
from ..methods import SignalSpec
from ..methods.registry import CASCADE_START
from ..ops.attention import attention_pagerank
from .decode import DecodeKV
from .hf import attention_implementation, cache_of, cached_length, flat_rotary, key_width, rotary
from .layout import Layout, order_first, rotate, row_attention, take_seq
from .pipeline import Step
from .sequence import compact

#: signals the decoder machinery computes. In this stage ``text [B, T, D]`` are the input embeddings of the
#: instruction tokens (the rows of the ``llm_text_*`` signals, marked by ``text_mask``) and ``positions [B, N]`` the
#: index of each visual token among its sample's real tokens in the sequence the layer runs on.
#: (views of the signal catalogue, :data:`vtoken.core.CATALOGUE`)
LLM_SIGNALS = signals_where(llm=True)
_NEEDS_QK = signals_where(llm_qk=True)
_TEXT = signals_where(llm_text=True)
_EMBEDS = signals_where(llm_embeds=True)
SUPPORTED_ATTENTION = ("sdpa", "eager")


def frame_slots(images: Any, clips: Any, batch: int, length: int, device: torch.device) -> Tensor:
    """``[B, L]`` long: the frame slot of every column of a prompt (the ``llm_frame_slots`` signal), ``-1`` on text
    and on visual placeholders of no frame (a clip's trailing newline).

    ``images`` / ``clips``: the prefill's images and videos (:class:`~vtoken.models.base.Images`, or ``None``): rows
    of ``columns [R, N]`` (``-1`` on padding) of samples ``sample [R]``. A clip's token ``j`` of ``T x H x W``
    (``extra["video_grids"] [R, 3]``) has slot ``j % (H * W)`` (its position within its frame); an image is one
    frame (slot ``j``). Every medium of a sample gets its own range of slots (images first, then clips, in row
    order), so tokens of different media never share one.
    """
    out = torch.full((batch, length), -1, dtype=torch.long, device=device)
    free = torch.zeros(batch, dtype=torch.long, device=device)  # the next unused slot of each sample
    for media, video in ((images, False), (clips, True)):
        if media is None:
            continue
        cols, sample = media.columns.to(device), media.sample.to(device)
        r, n = cols.shape
        j = torch.arange(n, device=device).expand(r, n)
        if video:
            grids = media.extra["video_grids"].to(device)
            per = (grids[:, 1] * grids[:, 2]).long()
            local = j % per[:, None]
        else:
            per = torch.full((r,), n, dtype=torch.long, device=device)
            local = j
        used = torch.zeros(r, batch, dtype=torch.long, device=device)
        used[torch.arange(r, device=device), sample] = per
        before = (used.cumsum(0) - used).gather(1, sample[:, None])[:, 0]  # slots of the sample's earlier rows
        offset = free[sample] + before
        free = free + used.sum(0)
        ok = cols >= 0
        out[sample[:, None].expand(r, n)[ok], cols[ok]] = (offset[:, None] + local)[ok]
    return out


def source(info: Any) -> str:
    """Which decoder layer's q/k score a method's attention signals: ``"previous"`` (layer ``K - 1``'s attention, as
    it ran; default) or ``"current"`` (layer ``K``'s own projections of its input), from its ``signal_spec``
    (``{"llm_attn": SignalSpec(layer="current")}``)."""
    for name in sorted(_NEEDS_QK):
        spec = info.signal_spec.get(name)
        if spec is not None and spec.layer is not None:
            return str(spec.layer)
    return "previous"


@dataclass
class Planned:
    """One pruning of a step: before decoder ``layer``, the ``stage``-th of the step's schedule."""

    layer: int
    step: Step
    stage: int
    knobs: dict[str, Any]


class DecoderPruner:
    """Runs the ``llm``-stage steps inside one language model (see the module docstring).

    ``lm`` is the decoder (``.layers``, ``.norm``, ``.config``), each layer with ``self_attn.{q_proj, k_proj}`` and
    ``self_attn.head_dim`` / ``scaling``.
    """

    def __init__(self, lm: nn.Module, steps: list[Step]) -> None:
        self.lm = lm
        self.layers = list(lm.layers)
        depth = len(self.layers)
        cfg = lm.config
        self.impl = attention_implementation(cfg)
        if self.impl not in SUPPORTED_ATTENTION:
            raise ValueError(f"llm-stage methods support attn_implementation in {SUPPORTED_ATTENTION}; this language "
                             f"model uses {self.impl!r} (load it with attn_implementation='sdpa')")
        types = set(getattr(cfg, "layer_types", None) or ["full_attention"])
        if types != {"full_attention"}:
            raise ValueError(f"llm-stage methods need full attention in every decoder layer; this language model has "
                             f"layer_types {sorted(types)}")
        self.plan: list[Planned] = []
        decode = [s for s in steps if s.info.stage == "decode"]
        steps = [s for s in steps if s.info.stage != "decode"]
        for step in steps:
            knobs = {**step.info.defaults, **step.kwargs}
            layers = step.info.schedule.plan_layers(depth, knobs)
            self.plan += [Planned(layer, step, s, knobs) for s, layer in enumerate(layers)]
        self.plan.sort(key=lambda p: p.layer)  # stable: steps in stage order at a shared layer
        for p in self.plan:  # before the first layer there is no layer before to read attention signals from
            need = _NEEDS_QK & set(p.step.info.signals)
            if p.layer == 0 and source(p.step.info) == "previous" and need:
                raise ValueError(f"{p.step.info.name!r} runs before decoder layer 0 but needs {sorted(need)} from the "
                                 "layer before it")
        #: the decode-stage step (:mod:`vtoken.models.decode`), at most one
        self.kv: DecodeKV | None = None
        if len(decode) > 1:
            raise ValueError(f"one decode-stage method at a time, got {[s.info.name for s in decode]}")
        if decode:
            step = decode[0]
            knobs = {**step.info.defaults, **step.kwargs}
            layer = step.info.schedule.plan_layers(depth, knobs)[0]
            late = [p for p in self.plan if p.layer >= layer]
            if late:
                raise ValueError(f"{step.info.name!r} prunes the KV cache of decoder layers {layer} and later while "
                                 f"decoding; {late[0].step.info.name!r} prunes before layer {late[0].layer} at the "
                                 f"prefill: llm-stage steps compose only before layer {layer} (give them an earlier "
                                 f"layer, or {step.info.name!r} a later one)")
            self.kv = DecodeKV(self, step, layer, knobs)
        previous = [p for p in self.plan if source(p.step.info) == "previous" and p.layer > 0]
        self.capture_layers = sorted({p.layer - 1 for p in previous})
        #: per captured layer, the steps that read it (a finished cascade no longer needs its capture)
        self.capture_for: dict[int, list[Step]] = {}
        for p in previous:
            self.capture_for.setdefault(p.layer - 1, []).append(p.step)
        self.keep_embeds = any(_EMBEDS & {*p.step.info.signals, *p.step.info.optional_signals} for p in self.plan)
        self.embeds: Tensor | None = None
        self.mode = "off"
        self._wrapped: list[tuple[nn.Module, Any]] = []
        self._hooks: list[Any] = []
        self.store: dict[int, dict[str, Any]] = {}
        self.layouts: dict[int, Layout] = {}
        self.cur: Layout | None = None
        self.records: list[dict[str, Any]] = []
        self.lengths: list[int] = []
        self.signal_positions: Tensor | None = None
        self.slots: Tensor | None = None
        self.states: dict[int, Tensor] = {}  # a cascade's state, by id(step)
        self.finished: set[int] = set()      # the cascades done for every sample, by id(step)

    # ---- patching ---------------------------------------------------------------------------------------------
    def attach(self) -> None:
        for layer in self.layers:
            if "forward" in layer.__dict__:
                raise ValueError("a decoder layer of this model already has a patched forward (another vtoken handle "
                                 "or wrapper); remove it first")
        for i, layer in enumerate(self.layers):
            original = layer.forward

            def forward(*args: Any, _i: int = i, _orig: Any = original, **kwargs: Any) -> Any:
                return self.layer_forward(_i, _orig, args, kwargs)

            layer.forward = forward
            self._wrapped.append((layer, forward))
        for i in self.capture_layers:
            attn = self.layers[i].self_attn
            for part, module in (("q", attn.q_proj), ("k", attn.k_proj)):
                self._hooks.append(module.register_forward_hook(self._hook(i, part)))
        if self.kv is not None:
            self.kv.attach()

    def detach(self) -> None:
        for layer, fwd in self._wrapped:
            if layer.__dict__.get("forward") is fwd:
                del layer.__dict__["forward"]
        self._wrapped.clear()
        for h in self._hooks:
            h.remove()
        self._hooks.clear()
        if self.kv is not None:
            self.kv.detach()
        self.reset()

    def _hook(self, index: int, part: str) -> Callable[..., None]:
        def hook(_module: nn.Module, _inputs: Any, output: Tensor) -> None:
            if self.mode == "prefill" and self.captures(index):
                self.store.setdefault(index, {})[part] = output.detach()

        return hook

    def captures(self, index: int) -> bool:
        """Whether layer ``index``'s q/k are still needed this prefill (a step after it is not a finished cascade)."""
        return any(id(step) not in self.finished for step in self.capture_for.get(index, ()))

    # ---- per prefill ------------------------------------------------------------------------------------------
    def reset(self) -> None:
        self.mode = "off"
        self.store.clear()
        self.layouts = {}
        self.cur = None
        self.embeds = None
        self.signal_positions = None
        self.slots = None
        self.states, self.finished = {}, set()
        if self.kv is not None:
            self.kv.reset()

    def arm(self, visual: Tensor, valid: Tensor, images: Tensor, positions: Tensor | None = None,
            slots: Tensor | None = None) -> None:
        """Before a prefill: ``visual [B, L]`` the image placeholder columns (after the pre-LLM splice), ``valid
        [B, L]`` real tokens, ``images [B]`` images per sample; ``positions [B, L]`` the position ids each sample
        would have alone, where they differ from the model's (the RoPE of the attention signals uses them);
        ``slots [B, L]`` the frame slot of every column (``llm_frame_slots``, :func:`frame_slots`; ``None``: no
        frame layout, every visual token in no frame)."""
        self.reset()
        self.visual, self.valid0, self.images = visual, valid, images
        self.signal_positions = positions
        self.slots = slots
        self.counts: dict[int, list[Tensor]] = {}
        self.records, self.lengths = [], []
        self.mode = "prefill"

    def end_prefill(self) -> Tensor:
        """After the prefill forward: switch to decode mode; returns the last layout's columns ``[B, L']``."""
        self.store.clear()
        self.embeds = None
        if self.mode == "prefill" and self.kv is not None:  # layers K - 1 and K ran on one layout (see __init__)
            base = self.cur if self.cur is not None else self.full_layout()
            self.kv.start(base, self.visual, self.images)
            for j in range(self.kv.layer, len(self.layers)):
                self.layouts[j] = base
        self.mode = "decode" if self.layouts else "off"
        cols = self.cur.cols if self.cur is not None else torch.where(
            self.valid0, torch.arange(self.valid0.shape[1], device=self.valid0.device), -1)
        return cols

    def full_layout(self) -> Layout:
        """The prompt as the model built it: every column (its padding marked invalid)."""
        b, length = self.valid0.shape
        return Layout(torch.arange(length, device=self.valid0.device).expand(b, length).clone(), self.valid0)

    # ---- the wrapped layer ------------------------------------------------------------------------------------
    def layer_forward(self, i: int, original: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        if self.mode == "off":
            return original(*args, **kwargs)
        if len(args) > 1:
            raise RuntimeError("vtoken: decoder layers must receive everything but the hidden states as keywords")
        hidden = args[0] if args else kwargs.pop("hidden_states")
        if self.mode == "decode":
            if self.kv is not None and i == self.kv.layer:
                self.kv.run(kwargs)
            lay = self.layouts.get(i)
            if lay is not None:
                cache, q = cache_of(kwargs), hidden.shape[1]
                cached = cached_length(cache, i) if cache is not None else lay.cols.shape[1]
                width = key_width(cache, i, q) if cache is not None else cached + q
                kwargs["attention_mask"] = lay.decode_mask(kwargs.get("attention_mask"), hidden.dtype, q,
                                                           self.visual.shape[1], cached, width)
            if self.kv is not None and i == self.kv.layer - 1:
                self.kv.observe(kwargs)
            return original(hidden, **kwargs)
        if i == 0 and self.keep_embeds:
            self.embeds = hidden
        for k in [k for k in self.store if k < i - 1]:  # only layer i - 1's capture is read from here on
            del self.store[k]
        for p in self.plan:
            if p.layer == i:
                hidden = self.prune(p, hidden, kwargs)
        lay = self.cur
        if lay is not None:
            kwargs = self.sliced(i, lay, kwargs, hidden.dtype)
            self.layouts[i] = lay
        if i in self.capture_layers and self.captures(i):
            self.store.setdefault(i, {})["rope"] = kwargs.get("position_embeddings")
        self.lengths.append(int(hidden.shape[1]))
        return original(hidden, **kwargs)

    def sliced(self, layer: int, lay: Layout, kwargs: dict[str, Any], dtype: torch.dtype) -> dict[str, Any]:
        """Decoder ``layer``'s keyword arguments for ``lay``: rotary rows, position ids and mask of its slots."""
        kw = dict(kwargs)
        length = self.visual.shape[1]
        pe = kw.get("position_embeddings")
        if pe is not None:
            kw["position_embeddings"] = tuple(lay.take(f"pe{j}", t, -2) for j, t in enumerate(pe))
        pos = kw.get("position_ids")
        if isinstance(pos, Tensor) and pos.shape[-1] == length:
            kw["position_ids"] = lay.take("position_ids", pos, -1)
        cache, n = cache_of(kw), lay.cols.shape[1]
        width = key_width(cache, layer, n) if cache is not None else n
        kw["attention_mask"] = lay.prefill_mask(kw.get("attention_mask"), dtype, width)
        return kw

    # ---- one pruning ------------------------------------------------------------------------------------------
    def prune(self, p: Planned, hidden: Tensor, kwargs: dict[str, Any]) -> Tensor:
        cascade = p.step.info.cascade
        if cascade and id(p.step) in self.finished:
            return hidden
        b, length = hidden.shape[:2]
        lay = self.cur if self.cur is not None else self.full_layout()
        cols, valid = lay.cols, lay.valid
        vis = self.visual.gather(1, cols.clamp(min=0)) & (cols >= 0) & valid
        nv = vis.sum(1)
        if id(p.step) not in self.counts:  # a step's schedule counts from the visual tokens its first pruning sees
            sched = p.step.info.schedule
            self.counts[id(p.step)] = [torch.as_tensor(c, dtype=torch.long, device=nv.device) for c in
                                       sched.plan_counts(nv, p.step.keep, self.images, len(self.layers), p.knobs)]
        counts = self.counts[id(p.step)][p.stage]
        counts = counts if cascade else counts.minimum(nv)  # a cascade's budget is not clipped (see the docstring)
        record = {"layer": p.layer, "method": p.step.info.name, "visual_in": nv.tolist()}
        nothing = not bool((nv > 0).any()) if cascade else bool((counts >= nv).all())
        if nothing:
            if cascade:
                self.finished.add(id(p.step))
            self.records.append({**record, "visual_out": nv.tolist(), "length": length})
            return hidden
        order, vmask = order_first(vis)
        tokens = gather_rows(hidden, order, vmask)
        signals = self.signals(p, hidden, lay, vis, order, vmask, kwargs)
        if cascade:  # one call of a stepwise run: its previous state, CASCADE_START at the first
            signals["llm_state"] = self.states.get(id(p.step), torch.full((b, 1), CASCADE_START, dtype=torch.long,
                                                                          device=hidden.device))
        red = self.run(p, tokens, counts, vmask, signals)
        if cascade:
            self.states[id(p.step)] = red.extras["state"]
            if bool(red.extras["done"].all()):
                self.finished.add(id(p.step))
            if bool((red.mask.sum(1) >= nv).all()):  # nothing removed (a merge removes its members): as it was
                self.records.append({**record, "visual_out": nv.tolist(), "length": length, "reduction": red})
                return hidden
        rows = torch.arange(b, device=hidden.device)[:, None].expand_as(red.indices)
        slots = order.gather(1, red.indices.clamp(min=0))
        keep = valid & ~vis
        keep[rows[red.mask], slots[red.mask]] = True
        comp = compact(keep, valid.long())
        new_hidden = comp.take(hidden)
        if red.assign is not None or red.sizes is not None:  # merged tokens replace their representative's state
            where = torch.full((b, length), -1, dtype=torch.long, device=hidden.device)
            g = comp.gather
            grow = torch.arange(b, device=g.device)[:, None].expand_as(g)
            where[grow[g >= 0], g[g >= 0]] = torch.arange(g.shape[1], device=g.device).expand_as(g)[g >= 0]
            dest = where.gather(1, slots.clamp(min=0))
            new_hidden[rows[red.mask], dest[red.mask]] = red.tokens[red.mask].to(new_hidden.dtype)
        g = comp.gather
        self.cur = Layout(torch.where(g >= 0, cols.gather(1, g.clamp(min=0)), -1), comp.attention_mask.bool())
        for rec in self.store.values():  # later steps at this layer read the captured tensors in the new layout
            for key in ("q", "k"):
                if isinstance(rec.get(key), Tensor) and rec[key].shape[1] == length:
                    rec[key] = take_seq(rec[key], g, 1)
            if rec.get("rope") is not None and rec["rope"][0].shape[-2] == length:
                rec["rope"] = tuple(take_seq(t, g, -2) for t in rec["rope"])
        self.records.append({**record, "visual_out": red.mask.sum(1).tolist(), "length": int(g.shape[1]),
                             "reduction": red, "columns": self.cur.cols})
        return new_hidden

    def run(self, p: Planned, tokens: Tensor, counts: Tensor, vmask: Tensor, signals: dict[str, Any]) -> Reduction:
        """The step's method on the samples that have visual tokens (the others keep nothing to prune)."""
        info = p.step.info
        has = vmask.any(1)
        sub = None if bool(has.all()) else has.nonzero()[:, 0]

        def rows(x: Any) -> Any:
            return x[sub] if sub is not None and isinstance(x, Tensor) else x

        x, m = rows(tokens), rows(vmask)
        wanted = set(info.all_signals)
        red = run_method(info, x, rows(counts), mask=None if bool(m.all()) else m,
                         signals={k: rows(v) for k, v in signals.items() if k in wanted},
                         knobs=info.step_knobs(p.step.kwargs))
        if sub is None:
            return red
        b = tokens.shape[0]
        k = red.indices.shape[1]
        idx = torch.full((b, k), -1, dtype=torch.long, device=tokens.device)
        msk = torch.zeros(b, k, dtype=torch.bool, device=tokens.device)
        out = tokens.new_zeros(b, k, tokens.shape[-1])
        idx[sub], msk[sub], out[sub] = red.indices, red.mask, red.tokens.to(out.dtype)
        assign = None
        if red.assign is not None:
            assign = torch.full(tokens.shape[:2], -1, dtype=torch.long, device=tokens.device)
            assign[sub] = red.assign
        extras = red.extras
        if info.cascade:  # a cascade's state for the whole batch: samples without visual tokens are done
            state = red.extras["state"]
            full = state.new_full((b, state.shape[1]), -1)
            full[sub] = state
            done = torch.ones(b, dtype=torch.bool, device=tokens.device)
            done[sub] = red.extras["done"].to(tokens.device)
            extras = {**extras, "state": full, "done": done}
        return Reduction(out, idx, msk, assign, None, extras)

    # ---- signals ----------------------------------------------------------------------------------------------
    def qk(self, p: Planned, hidden: Tensor, lay: Layout, kwargs: dict[str, Any]) -> tuple[Tensor, Any, Any, nn.Module]:
        """Query projections ``[B, L, E]`` (or a function of rows), keys ``[B, L, E_kv]``, ``(cos, sin)`` and the
        attention module that scores the step: layer ``K - 1`` as captured while it ran ("previous"), or layer ``K``'s
        own projections of its input ("current")."""
        if source(p.step.info) == "previous":
            rec = self.store.get(p.layer - 1, {})
            if "q" not in rec or "k" not in rec or rec.get("rope") is None:
                raise RuntimeError(f"vtoken: decoder layer {p.layer - 1} was not captured for {p.step.info.name!r}")
            return rec["q"], rec["k"], rec["rope"], self.layers[p.layer - 1].self_attn
        layer = self.layers[p.layer]
        h = layer.input_layernorm(hidden)
        pe = kwargs.get("position_embeddings")
        if pe is None:
            raise RuntimeError("vtoken: decoder layers receive no position_embeddings; llm-stage methods need them")
        if self.cur is not None:
            pe = tuple(lay.take(f"pe{j}", t, -2) for j, t in enumerate(pe))
        attn = layer.self_attn

        def q_rows(rows: Tensor) -> Tensor:
            return attn.q_proj(gather_rows(h, rows))

        return q_rows, attn.k_proj(h), pe, attn

    def signals(self, p: Planned, hidden: Tensor, lay: Layout, vis: Tensor, order: Tensor,
                vmask: Tensor, kwargs: dict[str, Any]) -> dict[str, Any]:
        info = p.step.info
        names = set(info.signals) | set(info.optional_signals)
        out: dict[str, Any] = {}
        b, length = hidden.shape[:2]
        valid = lay.valid
        slots = torch.arange(length, device=hidden.device)
        # the prompt's last real token (padding may sit on either side), and the instruction rows: real, non-visual
        # tokens after the sample's last visual token (else that last token)
        last = torch.where(valid, slots, -1).amax(1, keepdim=True).clamp(min=0)  # [B, 1]
        last_vis = torch.where(vis, slots, -1).amax(1)
        text = valid & ~vis & (slots[None, :] > last_vis[:, None])
        text.scatter_(1, last, text.gather(1, last) | ~text.any(1, keepdim=True))
        tslot, tmask = order_first(text)
        if names & _NEEDS_QK and (p.layer > 0 or source(info) == "current"):  # none before layer 0
            q_src, k_raw, rope, attn = self.qk(p, hidden, lay, kwargs)
            if self.signal_positions is not None:  # each sample's own positions, not the padded batch's
                rope = rotary(self.lm, hidden, take_seq(self.signal_positions, lay.cols, -1)) or rope
            hd = int(attn.head_dim)
            cos, sin = (flat_rotary(t, attn).float() for t in rope)
            cos, sin = cos.expand(b, *cos.shape[1:]), sin.expand(b, *sin.shape[1:])
            k = k_raw.reshape(b, length, -1, hd)
            if hasattr(attn, "k_norm"):
                k = attn.k_norm(k)
            k = rotate(k.float(), cos, sin)

            def queries(rows: Tensor) -> Tensor:
                q = q_src(rows) if callable(q_src) else gather_rows(q_src, rows)
                q = q.reshape(b, rows.shape[1], -1, hd)
                if hasattr(attn, "q_norm"):
                    q = attn.q_norm(q)
                return rotate(q.float(), gather_rows(cos, rows), gather_rows(sin, rows))

            scale = float(getattr(attn, "scaling", hd ** -0.5))
            if "llm_attn" in names:
                att = row_attention(queries(last), k, last, valid, scale)[:, 0]
                out["llm_attn"] = gather_rows(att[..., None], order, vmask)[..., 0]
            if "llm_text_attn" in names:
                rows = torch.where(tmask, tslot, last)
                att = row_attention(queries(rows), k, rows, valid, scale)  # [B, T, L]
                att = gather_rows(att.transpose(1, 2), order, vmask).transpose(1, 2)
                out["llm_text_attn"] = att * tmask[..., None].float()
            if "llm_attn_rank" in names:  # every row is a query here: chunked, O(budget) memory
                spec = info.signal_spec.get("llm_attn_rank", SignalSpec())
                every = torch.arange(length, device=hidden.device).expand(b, length)
                rank = attention_pagerank(queries(every) * scale, k, valid,
                                          temperature=1.0 if spec.temperature is None else float(spec.temperature),
                                          iters=5 if spec.iters is None else int(spec.iters))
                out["llm_attn_rank"] = gather_rows(rank[..., None], order, vmask)[..., 0]
            flat = k.reshape(b, length, -1)
            if "llm_keys" in names:
                out["llm_keys"] = gather_rows(flat, order, vmask)
            if "llm_text_keys" in names:
                out["llm_text_keys"] = gather_rows(flat, tslot, tmask)
        if names & {"llm_hidden", "llm_text_hidden"}:
            normed = self.lm.norm(hidden)
            if "llm_hidden" in names:
                out["llm_hidden"] = gather_rows(normed, order, vmask)
            if "llm_text_hidden" in names:
                out["llm_text_hidden"] = gather_rows(normed, tslot, tmask)
        if names & _EMBEDS:
            assert self.embeds is not None
            embeds = take_seq(self.embeds, lay.cols, 1)
            if "llm_embeds" in names:
                out["llm_embeds"] = gather_rows(embeds, order, vmask)
            if "text" in names:
                out["text"] = gather_rows(embeds, tslot, tmask)
        if "llm_frame_slots" in names:
            full = self.slots if self.slots is not None else torch.full_like(self.visual, -1, dtype=torch.long)
            here = torch.where(lay.cols >= 0, take_seq(full, lay.cols, 1), -1)
            out["llm_frame_slots"] = torch.where(vmask, gather_rows(here[..., None], order)[..., 0], -1)
        if "positions" in names:
            index = valid.long().cumsum(1) - 1
            out["positions"] = gather_rows(index[..., None], order, vmask)[..., 0]
        if names & _TEXT:
            out["text_mask"] = tmask
        return out
