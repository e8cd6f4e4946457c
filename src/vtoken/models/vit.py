"""Encoder-stage reduction inside a ViT (``ViTForImageClassification``, ``ViTModel``): ToMe, EViT, MCTF.

Each reducing layer runs as the paper places the step: after the attention residual and before the MLP
(``x = x + attn(norm1(x)); x = reduce(x); x = x + mlp(norm2(x))``). The layer's own q/k (hooked, attention recomputed
on the side for the rows needed) give the signals: head-mean keys (ToMe's metric), the CLS row (EViT), the
head-mean attention map (MCTF). Merged tokens carry their sizes; methods whose ``signal_spec`` asks for it get
proportional attention in later layers (``softmax(qk^T / sqrt(d) + log size)``, ToMe §3) through the additive
attention mask, so the model keeps its attention kernel.

``keep`` is the number of tokens (CLS included) left after the last reducing layer; the reduction is spread over
the reducing layers: the same number of tokens removed per layer (ToMe's constant ``r``) by default, or a
constant ratio (``schedule="geometric"``, EViT's keep rate per stage). ``layers`` picks the reducing layers
(default: every layer for merging methods; for EViT the layers at 1/4, 1/2 and 3/4 depth, as its DeiT setup 3/6/9).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from ..api import reduce
from ..core import Reduction, resolve_keep
from ..methods import MethodInfo, SignalSpec
from .base import Adapter, Handle
from .capture import QKCapture, QKLayer, full_attention, mean_keys
from .pipeline import Step, follow


def layer_counts(n: int, keep: int, layers: Sequence[int], schedule: str = "constant") -> list[int]:
    """Tokens left after each reducing layer, from ``n`` down to ``keep``.

    ``constant`` removes the same number per layer (the remainder goes to the first layers); ``geometric`` keeps the
    same ratio per layer, rounded to the nearest count and made non-increasing. Always ends at ``keep``.
    """
    m = len(layers)
    if schedule == "constant":
        total = n - keep
        per = [total // m + (1 if i < total % m else 0) for i in range(m)]
        out, cur = [], n
        for r in per:
            cur -= r
            out.append(cur)
        return out
    if schedule == "geometric":
        ratio = (keep / n) ** (1.0 / m)
        out = [max(keep, round(n * ratio ** (i + 1))) for i in range(m)]
        out[-1] = keep
        return out
    raise ValueError(f"schedule must be 'constant' or 'geometric', got {schedule!r}")


class VitAdapter(Adapter):
    """``ViTForImageClassification`` / ``ViTModel``: encoder-stage methods inside the transformer blocks."""

    family = "vit"
    model_classes = ("ViTForImageClassification", "ViTModel")
    stages = ("encoder",)
    provides = frozenset({"cls_attn", "keys", "attn", "sizes"})
    options = ("layers", "schedule")

    def __init__(self, model: nn.Module, steps: list[Step], layers: Sequence[int] | None = None,
                 schedule: str | None = None) -> None:
        if len(steps) != 1:
            raise ValueError("the vit adapter runs one encoder-stage method per model, got "
                             f"{[s.info.name for s in steps]}")
        if schedule not in (None, "constant", "geometric"):
            raise ValueError(f"schedule must be 'constant' or 'geometric', got {schedule!r}")
        super().__init__(model, steps)
        self.step = steps[0]
        self.knobs = dict(self.step.kwargs)
        self.layers_knob = self.check_layers(layers)
        self.schedule = schedule

    def check_layers(self, layers: Any) -> Any:
        """``layers``: ``None`` (the method's default), ``"all"`` or indices of this ViT's blocks (negative from the
        end), checked here so that a wrong one fails at ``apply``."""
        if layers is None or layers == "all":
            return layers
        n = len(self.blocks())
        if isinstance(layers, (str, bytes)) or not isinstance(layers, Sequence) or not layers:
            raise TypeError(f"layers must be 'all' or a non-empty list of block indices in [-{n}, {n}), got {layers!r}")
        for i in layers:
            if isinstance(i, bool) or not isinstance(i, int) or not -n <= i < n:
                raise ValueError(f"layers must hold block indices in [-{n}, {n}) (this ViT has {n} blocks), got "
                                 f"{i!r} in {list(layers)!r}")
        return list(layers)

    @classmethod
    def unsupported(cls, info: MethodInfo) -> str | None:
        why = super().unsupported(info)
        if why is None and "class_token" not in info.defaults:
            return f"{info.name!r} has no class_token knob to protect the ViT's CLS token"
        return why

    @property
    def vit(self) -> nn.Module:
        return getattr(self.model, "vit", self.model)

    def blocks(self) -> list[nn.Module]:
        return list(self.vit.layers)

    def reducing_layers(self) -> list[int]:
        """``layers`` knob, else the method's ``encoder_schedule`` (fractions of depth), else every layer."""
        n = len(self.blocks())
        layers = self.layers_knob
        if layers is None:
            layers = self.step.info.encoder_schedule.get("layers", "all")
            if layers != "all":
                layers = [int(f * n) if isinstance(f, float) else f for f in layers]
        if layers == "all":
            return list(range(n))
        return sorted({int(i) % n for i in layers})

    def attach(self, handle: Handle) -> None:
        self.handle = handle
        blocks = self.blocks()
        if any("forward" in b.__dict__ for b in blocks):
            raise ValueError("this model's layers already have patched forwards (another vtoken handle?); remove "
                             "it first")
        self.layer_ids = self.reducing_layers()
        self.capture = QKCapture([QKLayer(b.attention.num_attention_heads, q=b.attention.q_proj, k=b.attention.k_proj,
                                          scale=b.attention.scaling) for b in blocks])
        self.capture.want(self.layer_ids)
        self.capture.attach()
        self._hook = self.vit.register_forward_pre_hook(self._start)
        self._patched = []
        for i, block in enumerate(blocks):
            block.forward = self._block_forward(i, block)
            self._patched.append(block)
        handle.active = True

    def detach(self) -> None:
        for block in getattr(self, "_patched", []):
            block.__dict__.pop("forward", None)
        self._patched = []
        if getattr(self, "_hook", None) is not None:
            self._hook.remove()
            self._hook = None
        if self.capture is not None:
            self.capture.detach()
            self.capture = None

    # ---- per forward ------------------------------------------------------------------------------------------
    def _start(self, _module: nn.Module, args: tuple[Any, ...]) -> None:
        self._sizes: Tensor | None = None
        self._index: Tensor | None = None
        self._slot: Tensor | None = None
        self._counts: list[int] | None = None
        self._history: list[Reduction] = []

    def _plan(self, n: int) -> list[int]:
        keep = int(resolve_keep(self.step.keep, n)[0])
        sched = self.schedule or self.step.info.encoder_schedule.get("schedule", "constant")
        return layer_counts(n, keep, self.layer_ids, sched)

    def _block_forward(self, i: int, block: nn.Module):
        def forward(hidden_states: Tensor, attention_mask: Tensor | None = None, **kwargs: Any) -> Tensor:
            bias = self._attention_bias()
            if bias is not None:
                if attention_mask is not None:
                    raise ValueError("vtoken's proportional attention cannot combine with a caller attention_mask")
                attention_mask = bias.to(hidden_states.dtype)
            residual = hidden_states
            h = block.layernorm_before(hidden_states)
            self.capture.active = i in self.layer_ids
            try:
                h, _ = block.attention(h, attention_mask, **kwargs)
            finally:
                self.capture.active = False
            h = block.dropout(h)
            h = h + residual
            if i in self.layer_ids:
                h = self._reduce(i, h)
            residual = h
            h = block.layernorm_after(h)
            h = block.mlp(h)
            h = block.dropout(h)
            return h + residual

        return forward

    def _attention_bias(self) -> Tensor | None:
        if self._sizes is None or not self.step.info.signal_spec.get("sizes", SignalSpec()).proportional_attention:
            return None
        return self._sizes.log()[:, None, None, :]

    def _reduce(self, i: int, h: Tensor) -> Tensor:
        b, n = h.shape[:2]
        if self._counts is None:
            self._counts = self._plan(n)
            self._index = torch.arange(n, device=h.device).expand(b, n)
            self._slot = self._index.clone()
        count = self._counts[self.layer_ids.index(i)]
        q, k, layer = self.capture.qk(i)
        info = self.step.info
        sig: dict[str, Any] = {}
        wanted = (*info.signals, *info.optional_signals)
        if "keys" in wanted:
            sig["keys"] = mean_keys(k, layer)
        bias = self._attention_bias()  # the bias this layer attended with
        if "attn" in wanted:
            sig["attn"] = full_attention(q, k, layer, bias)
        if "cls_attn" in wanted:  # only the CLS query row
            sig["cls_attn"] = sig["attn"][:, 0] if "attn" in sig else full_attention(q[:, :1], k, layer, bias)[:, 0]
        if "sizes" in wanted and self._sizes is not None:
            sig["sizes"] = self._sizes
        red = reduce(h, count, info.name, class_token=True, **sig, **self.knobs)
        self._history.append(red)
        assert self._index is not None and self._slot is not None
        self._index, self._slot = follow(self._index, self._slot, red, n)
        if red.sizes is not None:
            self._sizes = red.sizes.clamp(min=1e-6)
        elif self._sizes is not None:
            self._sizes = self._sizes.gather(1, red.indices.clamp(min=0))
        assert self.handle is not None
        self.handle.last = Reduction(red.tokens, self._index, red.mask, self._slot, self._sizes,
                                     {"steps": list(self._history), "layers": self.layer_ids[: len(self._history)]})
        if not bool(red.mask.all()):
            raise ValueError(f"{info.name!r} kept different counts per image inside the ViT; encoder-stage "
                             "reduction needs one count per layer")
        return red.tokens


__all__ = ["VitAdapter", "layer_counts"]
