"""The adapter contract and the machinery shared by every VLM family.

An adapter patches ONE model instance: it wraps that instance's ``forward`` (an instance attribute, so other
instances and the class stay untouched) and registers q/k hooks on the vision tower for the signals the methods
need. On a prefill with images it encodes the images itself (the same ops as the model), runs the method pipeline
on the visual tokens, splices the kept tokens into the input embeddings, drops the removed positions from the
sequence (kept tokens keep their original position ids) and calls the model's own forward with ``inputs_embeds``.
Decode steps only get their attention mask re-aligned to the shorter cache. ``llm``-stage steps run inside the
language model's decoder layers (:mod:`vtoken.models.llm`), after the pre-LLM steps.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import inspect
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from ..core import Reduction, reduction_from_indices, signals_where
from ..methods import LM_STAGES, MethodInfo, SignalSpec
from .capture import QKCapture, QKLayer, cls_rows, full_attention, mean_keys
from .hf import cache_of, cached_length, padding_mask
from .llm import LLM_SIGNALS, DecoderPruner, frame_slots
from .pipeline import Step, run_steps
from .sequence import Compaction, compact
from .video import VIDEO_SIGNALS, check_video_steps, frame_means, place_tokens, reduce_clips

#: signals that depend on the prompt (a method reading one is not query-agnostic)
QUERY_SIGNALS = frozenset({"text", "text_mask", "positions"})


class VideoMemo:
    """The last few reduced videos by content (``apply(..., reuse_videos=True)``): the same clip asked about again is
    neither encoded nor reduced again. Keyed by a hash of the pixels and of the layout arguments."""

    SIZE = 4

    def __init__(self) -> None:
        self.entries: dict[str, tuple[Any, Reduction]] = {}

    @staticmethod
    def key(kw: dict[str, Any], pixels: str) -> str:
        h = hashlib.blake2b(digest_size=16)
        for name in (pixels, "video_grid_thw", "second_per_grid_ts", "vision_feature_layer"):
            value = kw.get(name)
            if isinstance(value, Tensor):
                t = value.detach().contiguous().cpu()
                h.update(f"{name}{tuple(t.shape)}{t.dtype}".encode())
                h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
            elif value is not None:
                h.update(f"{name}{value!r}".encode())
        return h.hexdigest()

    def get(self, key: str | None) -> tuple[Any, Reduction] | None:
        return None if key is None else self.entries.get(key)

    def put(self, key: str | None, clips: Any, red: Reduction) -> None:
        if key is None:
            return
        self.entries[key] = (clips, red)
        while len(self.entries) > self.SIZE:
            self.entries.pop(next(iter(self.entries)))


#: signals that only a [CLS] query row gives (a view of the catalogue; towers without one run the method's declared
#: fallback, ``SignalSpec.without_cls``, or cannot run it)
CLS_SIGNALS = signals_where(cls=True)


@dataclass
class Images:
    """The visual tokens of one prefill.

    Attributes:
        tokens: ``[I, N, C]`` tokens of ``I`` images in ``space`` (``"vision"``: before the projector).
        columns: ``[I, N]`` long, sequence column of each visual token's placeholder in its sample.
        sample: ``[I]`` long, which batch row each image belongs to.
        grid: ``(H, W)`` of the token grid.
        project: maps vision-space tokens ``[I, K, C]`` to LLM space ``[I, K, D]``.
        space: ``"vision"`` (before the projector) or ``"projected"`` (after it).
        mask: optional ``[I, N]`` bool when images have different token counts (padded; ``columns`` is ``-1`` on
            padding).
        extra: family-specific data (cached text embeddings, crop layout, ...).
    """

    tokens: Tensor
    columns: Tensor
    sample: Tensor
    grid: tuple[int, int] | None
    project: Any
    space: str = "vision"
    mask: Tensor | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def project_cached(self, x: Tensor) -> Tensor:
        """``project(x)``, computed once for the full ``tokens`` (a signal and the pipeline may both need it)."""
        if x is not self.tokens:
            return self.project(x)
        if "projected" not in self.extra:
            self.extra["projected"] = self.project(x)
        return self.extra["projected"]


class Handle:
    """What :func:`vtoken.apply` returns: ``remove()`` restores the model; usable as a context manager.

    ``last`` is the composed :class:`~vtoken.core.Reduction` of the latest prefill (indices relative to each
    image's visual tokens, one row per image), ``last.extras["steps"]`` the per-method reductions.
    """

    #: what a patched model instance carries besides the adapter's own patches: ``copy.deepcopy`` gives a copy with
    #: its own patch, ``pickle`` / ``torch.save`` explain what to save instead, and :func:`handle_of` finds the handle
    GUARDS = ("__deepcopy__", "__reduce_ex__", "_vtoken_handle")

    def __init__(self, model: nn.Module, adapter: Adapter, steps: list[Step],
                 recipe: tuple[Any, Any, dict[str, Any]] | None = None) -> None:
        self.model = model
        self.adapter = adapter
        self.steps = steps
        #: ``(method, keep, kwargs)`` as given to :func:`vtoken.apply` (to patch a copy the same way)
        self.recipe = recipe
        self.last: Reduction | None = None
        #: the videos' reduction of the latest prefill (one row per clip, ``extras["frame_counts"]``), or ``None``
        self.video: Reduction | None = None
        self.active = False

    @property
    def methods(self) -> list[str]:
        return [s.info.name for s in self.steps]

    def remove(self) -> None:
        """Undo every patch on the model (idempotent)."""
        if self.active:
            self.adapter.detach()
            for key in self.GUARDS:
                self.model.__dict__.pop(key, None)
            self.active = False

    def guard(self) -> None:
        """After the adapter attached: make copies and pickling of the patched instance behave (see ``GUARDS``)."""
        d = self.model.__dict__
        d["__deepcopy__"] = self._deepcopy
        d["__reduce_ex__"] = self._refuse_pickle
        d["_vtoken_handle"] = self

    def _deepcopy(self, memo: dict[int, Any]) -> nn.Module:
        """``copy.deepcopy`` of the patched model: a copy of the unpatched model (its own weights), patched again with
        the same methods; ``vtoken.handle_of(copy)`` is its handle."""
        from . import apply

        model = self.model
        self.adapter.detach()
        saved = {k: model.__dict__.pop(k) for k in self.GUARDS if k in model.__dict__}
        try:
            clone = copy.deepcopy(model, memo)
        finally:
            model.__dict__.update(saved)
            self.adapter.attach(self)
        if self.recipe is None:
            return clone
        method, keep, kwargs = self.recipe
        apply(clone, method, keep, **copy.deepcopy(kwargs))
        return clone

    def _refuse_pickle(self, protocol: int) -> Any:
        raise TypeError(f"this {type(self.model).__name__} is patched by vtoken.apply ({self.methods}): the patch "
                        "lives in this process, so the model cannot be pickled, saved whole (torch.save(model)) or "
                        "shallow-copied (copy.copy). Save the weights instead (torch.save(model.state_dict(), path); "
                        "vtoken never changes them) and vtoken.apply again after loading, or handle.remove() first; "
                        "copy.deepcopy(model) works and patches the copy the same way")

    def __enter__(self) -> Handle:
        if not self.active:
            raise RuntimeError("this vtoken handle was removed (remove() or the end of its with block) and no longer "
                               "patches the model; call vtoken.apply(...) again for a new one")
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()

    def __repr__(self) -> str:
        state = "active" if self.active else "removed"
        return f"<vtoken.Handle {self.adapter.family} {self.methods} {state}>"


class Adapter:
    """Base class of a model family's adapter. Subclasses set the class attributes and implement the hooks."""

    family: ClassVar[str] = ""
    model_classes: ClassVar[tuple[str, ...]] = ()
    stages: ClassVar[tuple[str, ...]] = ("pre_llm", "llm", "video", "decode")
    #: signals the family can provide
    provides: ClassVar[frozenset[str]] = frozenset()
    #: apply() options the family itself takes (not method knobs); video families take ``reuse_videos``
    options: ClassVar[tuple[str, ...]] = ()
    #: whether the vision tower has a [CLS] token; without one a [CLS] signal (``Signal.cls``) is the method's declared
    #: fallback (``SignalSpec.without_cls``, computed by :meth:`received_attention`) or the method cannot run
    has_cls: ClassVar[bool] = True
    #: the vision layer a ``SignalSpec(feature_layer=True)`` reads for LLaVA's select layer ``-2`` (``None``: -2)
    select_layer: int | None = None

    def __init__(self, model: nn.Module, steps: list[Step], reuse_videos: bool = False) -> None:
        if not isinstance(reuse_videos, bool):
            raise TypeError(f"reuse_videos must be True or False, got {reuse_videos!r}")
        self.model = model
        #: the steps run on the visual tokens before the language model; ``llm_steps`` run inside it
        #: steps on videos: image methods per frame, then video methods per clip (:mod:`vtoken.models.video`)
        self.video_steps = check_video_steps([s for s in steps if s.info.stage not in LM_STAGES])
        #: steps on images: every pre-LLM step that does not need a video's frame layout
        self.steps = [s for s in self.video_steps if not VIDEO_SIGNALS & set(s.info.signals)]
        self.llm_steps = [s for s in steps if s.info.stage in LM_STAGES]
        if reuse_videos:
            # a decode-stage step prunes the cache of each new prompt while it decodes: the clip's reduction stays
            aware = [s.info.name for s in self.video_steps
                     if QUERY_SIGNALS & {*s.info.signals, *s.info.optional_signals}] or [
                s.info.name for s in self.llm_steps if s.info.stage == "llm"]
            if aware:
                raise ValueError(f"reuse_videos=True reuses a video's reduction across prompts, so every method must "
                                 f"be query-agnostic; {aware} read the prompt")
        #: the last reduced videos by content (``reuse_videos``): fingerprint -> (clips, reduction)
        self.video_memo: VideoMemo | None = VideoMemo() if reuse_videos else None
        self.llm: DecoderPruner | None = None
        self.handle: Handle | None = None
        self.capture: QKCapture | None = None
        self._installed: Any = None

    # ---- capability -------------------------------------------------------------------------------------------
    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        return type(model).__name__ in cls.model_classes

    @classmethod
    def unsupported(cls, info: MethodInfo) -> str | None:
        """Why this family cannot run ``info`` (``None`` when it can)."""
        if info.stage not in cls.stages:
            return f"stage {info.stage!r} is not supported on {cls.family} (supported: {', '.join(cls.stages)})"
        if not cls.has_cls:
            need = [s for s in info.signals if s in CLS_SIGNALS and cls.cls_fallback(info, s) is None]
            if need:
                return (f"{info.name!r} ranks tokens by [CLS] attention ({', '.join(need)}); the {cls.family} vision "
                        f"tower has no CLS token and {info.name!r} declares no substitute for it (its paper and "
                        "official code define none)")
        provided = LLM_SIGNALS if info.stage in LM_STAGES else cls.provides
        missing = [s for s in info.signals if s not in provided]
        if missing:
            return f"{cls.family} cannot provide the signal(s) {missing} that {info.name!r} needs"
        if not info.needs_keep:
            return f"{info.name!r} restores tokens and has no place inside a model"
        if info.kind == "layout":
            return (f"{info.name!r} changes the channel width (D x window^2); a language model needs trained layers "
                    "to read such tokens")
        return None

    # ---- patching ---------------------------------------------------------------------------------------------
    def attach(self, handle: Handle) -> None:
        self.handle = handle
        model = self.model
        if "forward" in model.__dict__:
            raise ValueError("this model instance already has a patched forward (another vtoken handle or wrapper); "
                             "remove it first")
        self._original = model.forward
        self._signature = inspect.signature(self._original)
        self._state: Compaction | None = None
        self._next_position: Tensor | None = None
        self.capture = self.make_capture()
        if self.capture is not None:
            self.capture.want(self.wanted_layers())
            self.capture.attach()
        if self.llm_steps:
            self.llm = DecoderPruner(self.language_model(), self.llm_steps)
            self.llm.attach()

        def forward(*args: Any, **kwargs: Any) -> Any:
            return self.forward(*args, **kwargs)

        # generate() reads the signature: it must see the model's own arguments, less ``mm_encoder_outputs`` so that it
        # hands pixels to this forward (images are encoded here, with the signal hooks) instead of pre-encoding them
        params = [p for name, p in self._signature.parameters.items() if name != "mm_encoder_outputs"]
        forward.__signature__ = self._signature.replace(parameters=params)  # type: ignore[attr-defined]
        model.forward = forward
        self._installed = forward
        handle.active = True

    def detach(self) -> None:
        """Undo what :meth:`attach` did (only that: another patch on the instance is left alone)."""
        if self._installed is not None and self.model.__dict__.get("forward") is self._installed:
            del self.model.__dict__["forward"]
        self._installed = None
        if self.capture is not None:
            self.capture.detach()
            self.capture = None
        if self.llm is not None:
            self.llm.detach()
            self.llm = None
        self._state = None

    # ---- family hooks -----------------------------------------------------------------------------------------
    def make_capture(self) -> QKCapture | None:
        """q/k hooks on the vision tower (``None`` when the family collects no attention signals)."""
        return None

    def wanted_layers(self) -> list[int]:
        """Vision layers whose q/k the steps need."""
        layers: set[int] = set()
        for step in self.video_steps:
            for name in (*step.info.signals, *step.info.optional_signals):
                if self.has_cls or name not in CLS_SIGNALS:
                    layers.update(self.signal_layers(step.info, name))
                elif self.cls_fallback(step.info, name) == "received":
                    layers.update(self.spec_layers(step.info, name))
        return sorted(layers)

    # ---- signal specs -----------------------------------------------------------------------------------------
    @classmethod
    def cls_fallback(cls, info: MethodInfo, name: str) -> str | None:
        """The method's fallback for [CLS] signal ``name`` on this family (``SignalSpec.without_cls``)."""
        spec = info.signal_spec.get(name)
        return spec.for_family(cls.family).without_cls if spec is not None else None

    def signal_spec(self, info: MethodInfo, name: str) -> SignalSpec:
        """How ``info`` wants ``name`` collected on this family: its :class:`SignalSpec` with the family's override
        applied, and LLaVA's select layer ``-2`` read as :attr:`select_layer` where the spec says so."""
        spec = info.signal_spec.get(name, SignalSpec()).for_family(self.family)
        if spec.feature_layer and self.select_layer is not None:
            def read(v: Any) -> Any:
                return self.select_layer if v == -2 else v

            layers = tuple(read(v) for v in spec.layers) if isinstance(spec.layers, tuple) else spec.layers
            spec = dataclasses.replace(spec, layer=read(spec.layer), layers=layers)
        return spec

    def spec_layers(self, info: MethodInfo, name: str) -> list[int]:
        """Vision layers of signal ``name`` for ``info`` (families with attention signals implement it)."""
        raise NotImplementedError

    def received_attention(self, layers: list[int], images: Images) -> Tensor:
        """``[I, L, N]`` the attention each visual token receives in each of ``layers`` (softmax probabilities
        averaged over heads and over every query row): ``attn_received_layers``, and the fallback for a [CLS]
        signal on towers without one (``SignalSpec(without_cls="received")``). Families without [CLS] implement it."""
        raise NotImplementedError

    def signal_layers(self, info: MethodInfo, name: str) -> list[int]:
        return []

    def encode(self, kwargs: dict[str, Any]) -> Images:
        raise NotImplementedError

    def image_key(self) -> str:
        return "pixel_values"

    def language_model(self) -> nn.Module:
        """The decoder whose layers ``llm``-stage steps hook (``.layers``, ``.norm``, ``.config``)."""
        inner = self.model.model
        lm = getattr(inner, "language_model", None) or getattr(inner, "text_model", None)
        if lm is None or not hasattr(lm, "layers") or not hasattr(lm, "norm"):
            raise ValueError(f"{self.family} adapter: no decoder with .layers and .norm found for llm-stage methods")
        return lm

    def images_per_sample(self, images: Images, batch: int) -> Tensor:
        """``[B]`` images of each sample (``int`` keep of an llm-stage method counts per image)."""
        return torch.bincount(images.sample, minlength=batch)

    def last_columns(self, red: Reduction, images: Images) -> tuple[Tensor, Tensor] | None:
        """Sample ``[I]`` and prompt column ``[I, K]`` of each output token of ``red`` (the pre-LLM reduction, one row
        per image), to compose ``handle.last`` with llm-stage pruning; ``None`` where the family cannot say."""
        if red.indices.shape[0] != images.columns.shape[0]:
            return None
        cols = images.columns.gather(1, red.indices.clamp(min=0))
        return images.sample, torch.where(red.mask, cols, -1)

    def positions(self, kwargs: dict[str, Any], input_ids: Tensor) -> Tensor:
        """Original position ids of the prefill: the caller's, or what the language model would compute."""
        if kwargs.get("position_ids") is not None:
            return kwargs["position_ids"]
        offset = cached_length(cache_of(kwargs))
        b, length = input_ids.shape
        return (torch.arange(length, device=input_ids.device) + offset).expand(b, length)

    def alone_positions(self, kw: dict[str, Any], attention_mask: Tensor | None, positions: Tensor,
                        comp: Compaction) -> Tensor | None:
        """Position ids each sample would get alone, in the compacted prefill, where they differ from the model's:
        without caller ``position_ids`` a decoder numbers padded columns too, so a left-padded sample's positions
        are offset. Attention is blind to the offset (RoPE is relative), but signals that read RoPE'd keys
        themselves (their norms) are not; llm-stage signals use these positions (``None``: the model's are right)."""
        if kw.get("position_ids") is not None or attention_mask is None or positions.dim() != 2:
            return None
        real = attention_mask.bool()
        if bool(real.all()):
            return None
        alone = (real.long().cumsum(1) - 1).clamp(min=0) + positions[:, :1]
        return comp.take(alone, fill=0)

    # ---- forward ----------------------------------------------------------------------------------------------
    def forward(self, *args: Any, **kwargs: Any) -> Any:
        bound = self._signature.bind_partial(*args, **kwargs)
        kw = dict(bound.arguments)
        kw.update(kw.pop("kwargs", {}) or {})
        if kw.get("mm_encoder_outputs"):
            raise ValueError("vtoken encodes images itself (to collect signals); pass pixel values, not "
                             "mm_encoder_outputs, to a model patched by vtoken.apply")
        kw.pop("mm_encoder_outputs", None)
        video = self.video_key()
        if kw.get(self.image_key()) is None and (video is None or kw.get(video) is None):
            return self._original(**self.decode_inputs(kw))
        if kw.get("input_ids") is not None:
            kw["attention_mask"] = padding_mask(kw.get("attention_mask"), kw["input_ids"].shape[1])
        inputs = self.prefill_inputs(kw)
        if self.llm is None:
            return self._original(**inputs)
        try:
            out = self._original(**inputs)
        finally:
            final = self.llm.end_prefill()
        self.compose_llm(final)
        return out

    def decode_inputs(self, kw: dict[str, Any]) -> dict[str, Any]:
        """Re-align a decode step's attention mask (original columns) to the compacted cache."""
        state = self._state
        mask = kw.get("attention_mask")
        past_len = cached_length(cache_of(kw))
        if past_len == 0:  # a new text-only prefill: the previous image prefill's layout no longer applies
            self._state = self._next_position = None
            if self.llm is not None:
                self.llm.reset()
            if self.handle is not None:
                self.handle.last = self.handle.video = None
            return kw
        if state is None:
            return kw
        ids = kw.get("input_ids") if kw.get("input_ids") is not None else kw.get("inputs_embeds")
        q = ids.shape[1]
        generated = past_len - state.new_length
        if generated < 0:
            return kw
        if mask is not None and not (isinstance(mask, Tensor) and mask.dim() == 2):
            # a 4-D mask generate built ahead for a static cache: its padding columns follow the caller's prompt, not
            # the compacted cache; the compacted prompt's padding mask and the generated tokens replace it
            ones = torch.ones(state.attention_mask.shape[0], generated + q, dtype=torch.long, device=ids.device)
            kw["attention_mask"] = torch.cat([state.attention_mask.to(ids.device), ones], dim=1)
        elif isinstance(mask, Tensor) and mask.dim() == 2 and mask.shape[1] == state.length + generated + q:
            kw["attention_mask"] = state.extend_mask(mask)
        if kw.get("position_ids") is None and self._next_position is not None:
            step = torch.arange(q, device=ids.device) + generated
            kw["position_ids"] = self._next_position[:, None] + step[None, :]
        return kw

    def reduce_prefill(self, kw: dict[str, Any]) -> tuple[Images, Reduction]:
        """Encode a prefill's images, collect the signals and run the pipeline: ``(images, reduction)``."""
        images = self.encode(kw)
        self._images = images
        signals = self.collect_signals(images, kw)
        return images, self.reduce_images(images, signals)

    def prefill_inputs(self, kw: dict[str, Any]) -> dict[str, Any]:
        """A prefill with images and / or videos: reduce each, write the kept tokens into the input embeddings, mark
        the removed placeholder columns, and splice. ``handle.last`` is the images' reduction (the videos' on a prefill
        with videos only), ``handle.video`` the videos' (``None`` without videos)."""
        input_ids = kw.get("input_ids")
        if input_ids is None:
            raise ValueError("vtoken needs input_ids (not only inputs_embeds) on a call with images or videos, to find "
                             "the placeholder tokens")
        assert self.handle is not None
        embeds = self.model.get_input_embeddings()(input_ids).clone()
        keep = torch.ones_like(input_ids, dtype=torch.bool)
        self.handle.last = self.handle.video = None
        if kw.get(self.image_key()) is not None:
            self.place_images(kw, input_ids, embeds, keep)
        pixels = self.video_key()
        if pixels is not None and kw.get(pixels) is not None:
            memo = self.video_memo
            key = memo.key(kw, pixels) if memo is not None else None
            hit = memo.get(key) if memo is not None else None
            if hit is not None:  # the same videos again: their reduction, placed in this prompt
                clips, video = self.relocate_videos(kw, hit[0]), hit[1]
            else:
                clips = self.encode_videos(kw)
                video = self.reduce_videos(clips, kw)
                if memo is not None:
                    memo.put(key, clips, video)
            self._clips = clips
            place_tokens(embeds, keep, clips.columns, clips.sample, video)
            if "fixed" in clips.extra:  # placeholders that are not clip tokens (e.g. a newline after each clip)
                rows, cols, values = clips.extra["fixed"]
                embeds[rows, cols] = values.to(embeds.dtype)
            self.handle.video = video
            if self.handle.last is None:
                self.handle.last, self._images = video, clips
        return self.splice(kw, input_ids, embeds, keep)

    def place_images(self, kw: dict[str, Any], input_ids: Tensor, embeds: Tensor, keep: Tensor) -> None:
        """Reduce the prefill's images and write them in place: kept tokens into ``embeds [B, L, D]`` at their
        placeholders, removed placeholders False in ``keep [B, L]``; sets ``handle.last``. Families whose images
        carry more than tokens (newline rows) override it."""
        images, red = self.reduce_prefill(kw)
        assert self.handle is not None
        self.handle.last = red
        place_tokens(embeds, keep, images.columns, images.sample, red)

    # ---- videos -----------------------------------------------------------------------------------------------
    def video_key(self) -> str | None:
        """The forward argument holding video pixels (``None``: the family takes no videos)."""
        return None

    def encode_videos(self, kw: dict[str, Any]) -> Images:
        """The prefill's videos as clips: ``tokens [V, N, D]`` (LLM space, frame-major, each frame in raster order;
        shorter clips padded with whole frames), ``columns`` / ``sample`` / ``mask`` as for images, and
        ``extra["video_grids"] [V, 3]`` long, each clip's ``(T, H, W)``; optionally ``extra["fixed"]`` ``(rows, cols,
        values)``, placeholders that always stay and the values they get (a clip's trailing newline). Video families
        implement it."""
        raise NotImplementedError

    def relocate_videos(self, kw: dict[str, Any], clips: Images) -> Images:
        """Clips encoded for another prompt, placed in this one: the same tokens, the placeholder columns (and
        ``extra["fixed"]`` ones) of this prompt's video placeholders, in order."""
        ids = kw["input_ids"]
        rows, cols = self.video_token_mask(ids).nonzero(as_tuple=True)
        n = (clips.columns >= 0).sum(1)
        fixed = clips.extra.get("fixed")
        per = n + (1 if fixed is not None else 0)  # placeholders per clip (a fixed one follows its tokens)
        if rows.numel() != int(per.sum()):
            raise ValueError(f"reuse_videos: the prompt has {rows.numel()} video placeholders, the reused videos need "
                             f"{int(per.sum())}")
        start = per.cumsum(0) - per
        local = torch.arange(clips.columns.shape[1], device=ids.device)
        at = (start[:, None] + local[None, :]).clamp(max=rows.numel() - 1)
        columns = torch.where(local[None, :] < n[:, None], cols[at], -1)
        sample = rows[start]
        extra = dict(clips.extra)
        if fixed is not None:
            last = start + per - 1
            extra["fixed"] = (rows[last], cols[last], fixed[2])
        return dataclasses.replace(clips, columns=columns, sample=sample, extra=extra)

    def video_signal(self, name: str, info: MethodInfo, clips: Images, kw: dict[str, Any]) -> Any:
        """One signal for the clips, ``[V, N, ...]`` over their padded tokens (``video_grid`` and ``frame_ids`` are
        built by :func:`vtoken.models.video.reduce_clips`); families add attention or frame signals."""
        if name == "text":
            return self.text_embeddings(kw, clips)[0]
        if name == "text_mask":
            return self.text_embeddings(kw, clips)[1]
        if name == "frame_features":  # no global frame embedding: the mean of each frame's tokens
            return frame_means(clips.tokens, clips.extra["video_grids"])
        return None

    def reduce_videos(self, clips: Images, kw: dict[str, Any]) -> Reduction:
        """Run the pipeline on the clips: image methods per frame (``keep`` per frame), video methods per clip
        (``keep`` is the clip's budget); one row per clip, ``extras["frame_counts"] [V, T]``."""
        signals: dict[str, Any] = {}
        for step in self.video_steps:
            for name in (*step.info.signals, *step.info.optional_signals):
                if name in signals or name in ("video_grid", "frame_ids", "grid"):
                    continue
                value = self.video_signal(name, step.info, clips, kw)
                if value is not None:
                    signals[name] = value
                elif name in step.info.signals:
                    raise ValueError(f"{self.family} could not provide the signal {name!r} that {step.info.name!r} "
                                     "needs on videos")
        return reduce_clips(self.video_steps, clips.tokens, clips.extra["video_grids"], signals)

    def reduce_images(self, images: Images, signals: dict[str, Any]) -> Reduction:
        """Run the method pipeline on ``images.tokens`` -> a :class:`Reduction` with one row per image (indices into
        that image's tokens, LLM-space tokens). Families whose images have several views override this (e.g. to split
        ``keep`` over the views)."""
        return run_steps(self.steps, images.tokens, signals, images.project_cached, images.space, mask=images.mask)

    def splice(self, kw: dict[str, Any], input_ids: Tensor, embeds: Tensor, keep: Tensor) -> dict[str, Any]:
        """Drop the removed columns and call the language model on ``inputs_embeds``."""
        attention_mask = kw.get("attention_mask")
        positions = self.positions(kw, input_ids)
        comp = compact(keep, attention_mask)
        alone = self.alone_positions(kw, attention_mask, positions, comp) if self.llm is not None else None
        removed = bool((comp.removed > 0).any())
        kw = {k: v for k, v in kw.items() if k not in (self.image_key(), self.video_key(), "input_ids", "image_sizes")}
        kw["inputs_embeds"] = comp.take(embeds)
        pos_dim = 2 if positions.dim() == 3 else 1
        if removed or kw.get("position_ids") is not None:
            kw["position_ids"] = comp.take(positions, fill=1, dim=pos_dim)
        if removed or attention_mask is not None:
            kw["attention_mask"] = comp.attention_mask.to(attention_mask.dtype if attention_mask is not None
                                                          else torch.long)
        if kw.get("labels") is not None:
            if self.llm is not None:
                raise ValueError(f"labels: llm-stage methods ({[s.info.name for s in self.llm_steps]}) shorten the "
                                 "sequence inside the language model, so the logits no longer align with labels; "
                                 "compute the loss without them")
            kw["labels"] = comp.take(kw["labels"], fill=-100)
        self._state = comp
        if self.llm is not None:
            if cached_length(cache_of(kw)) > 0:
                raise ValueError("past_key_values / cache: llm-stage methods need the images in the first prefill "
                                 "(an empty cache)")
            g = comp.gather
            visual = self.visual_token_mask(input_ids) & keep
            visual = visual.gather(1, g.clamp(min=0)) & (g >= 0)
            # vtoken/framefusion: the frame slot of every column (llm_frame_slots, -1 on text) from this prefill's
            # images and clips (handle.video is set only with videos; a video-only prefill's _images are its clips)
            clips = self._clips if self.handle is not None and self.handle.video is not None else None
            slots = frame_slots(None if self._images is clips else self._images, clips, *input_ids.shape,
                                input_ids.device)
            self.llm.arm(visual, comp.attention_mask.bool(), self.images_per_sample(self._images, input_ids.shape[0]),
                         alone, comp.take(slots, fill=-1))
        last = positions if pos_dim == 1 else positions.amax(0)
        self._next_position = last.amax(1) + 1
        return kw

    def compose_llm(self, final: Tensor) -> None:
        """After a prefill with llm-stage pruning: ``handle.last`` keeps only the tokens that reached the last decoder
        layer; ``extras["llm"]`` holds ``lengths`` (sequence length entering each decoder layer), ``stages`` (per
        pruning: layer, method, visual tokens in / out per sample, the length after, the method's reduction),
        ``columns`` (``[B, L']`` prompt column, in the caller's sequence, of each slot of the last layout, ``-1`` on
        padding), ``pre_llm`` (the reduction before the language model) and, with a decode-stage step, ``decode``
        (one record per decoding step, :mod:`vtoken.models.decode`)."""
        assert self.handle is not None and self.llm is not None and self._state is not None
        g = self._state.gather
        cols = torch.where(final >= 0, g.gather(1, final.clamp(min=0)), -1)
        stages = [{**r, "columns": torch.where(r["columns"] >= 0, g.gather(1, r["columns"].clamp(min=0)), -1)}
                  if "columns" in r else r for r in self.llm.records]
        info = {"lengths": list(self.llm.lengths), "stages": stages, "columns": cols}
        if self.llm.kv is not None:  # one record per decoding step, appended while generating
            info["decode"] = self.llm.kv.records
        red = self.handle.last
        if red is None:
            return
        b = g.shape[0]
        survive = torch.zeros(b, self._state.length + 1, dtype=torch.bool, device=g.device)
        rows = torch.arange(b, device=g.device)[:, None].expand_as(cols)
        survive[rows, torch.where(cols >= 0, cols, self._state.length)] = True
        survive = survive[:, :-1]
        got = self.last_columns(red, self._images)
        info["pre_llm"] = red
        if got is None:
            red.extras["llm"] = info
            return
        sample, where = got
        alive = red.mask & survive[sample[:, None].expand_as(where), where.clamp(min=0)] & (where >= 0)
        k = red.indices.shape[1]
        slots = torch.where(alive, torch.arange(k, device=g.device).expand_as(alive), -1)
        out = reduction_from_indices(red.tokens, slots)
        keep = out.mask
        indices = torch.where(keep, red.indices.gather(1, out.indices.clamp(min=0)), -1)
        sizes = None if red.sizes is None else red.sizes.gather(1, out.indices.clamp(min=0)) * keep
        assign = None
        if red.assign is not None:
            inverse = torch.full((alive.shape[0], k + 1), -1, dtype=torch.long, device=g.device)
            inverse.scatter_(1, torch.where(keep, out.indices, k), torch.arange(keep.shape[1], device=g.device)
                             .expand_as(keep).masked_fill(~keep, -1))
            assign = torch.where(red.assign >= 0, inverse[:, :k].gather(1, red.assign.clamp(min=0)), -1)
        self.handle.last = Reduction(out.tokens, indices, keep, assign, sizes, {**red.extras, "llm": info})

    # ---- signals ----------------------------------------------------------------------------------------------
    def collect_signals(self, images: Images, kw: dict[str, Any]) -> dict[str, Any]:
        names: dict[str, MethodInfo] = {}
        for step in self.steps:
            for name in (*step.info.signals, *step.info.optional_signals):
                names.setdefault(name, step.info)
        out: dict[str, Any] = {}
        for name, info in names.items():
            value = self.signal(name, info, images, kw)
            if value is not None:
                out[name] = value
            elif name in info.signals:
                raise ValueError(f"{self.family} could not provide the signal {name!r} that {info.name!r} needs")
        return out

    def without_cls(self, name: str, info: MethodInfo, images: Images) -> Any:
        """A [CLS] signal on a tower without [CLS]: the method's declared fallback (``SignalSpec.without_cls``), or
        ``None``. Every family's :meth:`signal` answers [CLS] signals through here first."""
        if self.cls_fallback(info, name) != "received":
            return None
        value = self.received_attention(self.spec_layers(info, name), images)
        return value[:, 0] if name == "cls_attn" else value

    def signal(self, name: str, info: MethodInfo, images: Images, kw: dict[str, Any]) -> Any:
        """One signal for the images (families override to add or substitute signals)."""
        if not self.has_cls and name in CLS_SIGNALS:
            return self.without_cls(name, info, images)
        if name == "grid":
            return images.grid
        if name == "text":
            return self.text_embeddings(kw, images)[0]
        if name == "text_mask":
            return self.text_embeddings(kw, images)[1]
        return None

    def text_embeddings(self, kw: dict[str, Any], images: Images) -> tuple[Tensor, Tensor]:
        """Prompt text embeddings per image ``[I, T, D]`` and their mask ``[I, T]`` (non-image, non-padding)."""
        cache = images.extra.get("text")
        if cache is not None:
            return cache
        input_ids = kw["input_ids"]
        is_text = ~self.visual_token_mask(input_ids)
        if kw.get("attention_mask") is not None:
            is_text &= kw["attention_mask"].bool()
        counts = is_text.sum(1)
        t = max(int(counts.max()), 1)
        order = torch.sort((~is_text).to(torch.int8), dim=1, stable=True).indices[:, :t]
        valid = torch.arange(t, device=input_ids.device)[None, :] < counts[:, None]
        emb = self.model.get_input_embeddings()(input_ids.gather(1, order))
        emb = emb * valid[..., None].to(emb.dtype)
        cache = (emb[images.sample], valid[images.sample])
        images.extra["text"] = cache
        return cache

    def image_token_mask(self, input_ids: Tensor) -> Tensor:
        raise NotImplementedError

    def video_token_mask(self, input_ids: Tensor) -> Tensor:
        """``[B, L]`` bool: the video placeholders (none for families without videos)."""
        return torch.zeros_like(input_ids, dtype=torch.bool)

    def visual_token_mask(self, input_ids: Tensor) -> Tensor:
        """Image or video placeholders: not text for the ``text`` signal, visual for llm-stage methods."""
        return self.image_token_mask(input_ids) | self.video_token_mask(input_ids)


class ClsTowerAdapter(Adapter):
    """Families whose vision tower has a CLS token at position 0 and q/k projections per layer (CLIP-like)."""

    provides = frozenset({"cls_attn", "cls_attn_layers", "attn_logits", "attn", "attn_received_layers", "keys",
                          "vision_features", "text", "text_mask", "grid", "positions", "sizes"})
    default_layer: int = -2

    def qk_layers(self) -> list[QKLayer]:
        raise NotImplementedError

    def make_capture(self) -> QKCapture | None:
        return QKCapture(self.qk_layers())

    def spec_layers(self, info: MethodInfo, name: str) -> list[int]:
        """Vision layers for a signal from the method's ``signal_spec``. Non-negative indices given for a tower of
        ``ref_depth`` layers (e.g. HiRED's layer 22 of CLIP ViT-L's 24) scale to this tower's depth."""
        spec = self.signal_spec(info, name)
        n = len(self.qk_layers())
        ref = spec.ref_depth or n

        def scale(layer: Any) -> int:
            layer = int(layer)
            return layer if layer < 0 or ref == n else min(n - 1, round(layer * n / ref))

        if name in ("cls_attn_layers",):
            layers = spec.layers or "all"
            return list(range(n)) if layers == "all" else [scale(v) for v in layers]
        if name == "attn_received_layers":
            return [scale(v) for v in spec.layers or [n // 3, self.default_layer]]
        layer = self.default_layer if spec.layer is None else spec.layer
        return [self.default_layer if layer == "same" else scale(layer)]

    def signal_layers(self, info: MethodInfo, name: str) -> list[int]:
        if name in ("cls_attn", "cls_attn_layers", "attn_logits", "attn", "attn_received_layers", "keys"):
            return self.spec_layers(info, name)
        return []

    def signal(self, name: str, info: MethodInfo, images: Images, kw: dict[str, Any]) -> Any:
        if not self.has_cls and name in CLS_SIGNALS:
            return self.without_cls(name, info, images)
        cap = self.capture
        assert cap is not None
        spec = self.signal_spec(info, name)
        if name in ("cls_attn", "attn_logits"):
            q, k, layer = cap.qk(self.spec_layers(info, name)[0])
            probs, logits = cls_rows(q, k, layer, full_width=spec.heads == "full")
            return probs if name == "cls_attn" else logits
        if name == "cls_attn_layers":
            return torch.stack([cls_rows(*cap.qk(i))[0] for i in self.spec_layers(info, name)], dim=1)
        if name == "attn":
            q, k, layer = cap.qk(self.spec_layers(info, name)[0])
            return full_attention(q, k, layer)[:, 1:, 1:]
        if name == "attn_received_layers":
            return torch.stack([full_attention(*cap.qk(i)).mean(1)[:, 1:] for i in self.spec_layers(info, name)],
                               dim=1)
        if name == "keys":
            q, k, layer = cap.qk(self.spec_layers(info, name)[0])
            return (k.float() if spec.heads == "full" else mean_keys(k, layer))[:, 1:]
        if name == "vision_features":
            if spec.space == "clip_joint":
                # no CLIP text tower in a VLM: relevance to the prompt is measured in the LLM embedding space, so the
                # visual side is the projected tokens (the text side is the prompt's token embeddings)
                return images.project_cached(images.tokens) if images.space == "vision" else images.tokens
            return images.extra.get("vision_features", images.tokens)
        if name == "positions":
            return images.columns
        return super().signal(name, info, images, kw)

