"""Analytic prefill cost of a VLM: FLOPs of the language model and of a ViT tower, KV-cache bytes, parameter counts.

FLOPs count matrix multiplications only (2 FLOPs per multiply-add): projections, MLP, the two attention products
(``Q K^T`` and ``P V``, the quadratic term) and the LM head. Norms, activations, softmax, rotary embeddings and
biases are ignored (how much that leaves out: ``docs/notes.md``). Dense decoder-only language models (Llama, Qwen2,
Mistral, Vicuna, ...) and CLIP/SigLIP-style encoders are covered; mixture-of-experts layers are not.

Every function takes a Hugging Face config (a VLM config is reduced to its text / vision part), a sequence length
and a batch size, so ``vtoken bench`` and ``benchmarks/prefill.py`` share one cost model.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

__all__ = [
    "TextDims",
    "VisionDims",
    "kv_cache_bytes",
    "llm_param_count",
    "llm_prefill_flops",
    "projector_flops",
    "text_dims",
    "vision_dims",
    "vit_flops",
]

#: model types whose MLP is a plain ``fc1 -> act -> fc2`` (2 matrices); every other type is taken as gated
#: (``gate``, ``up``, ``down``: 3 matrices), as in Llama, Qwen2, Mistral, Gemma.
PLAIN_MLP = frozenset({"gpt2", "opt", "gpt_neox", "gptj", "phi", "falcon", "bloom", "starcoder2"})


def _text_config(config: Any) -> Any:
    getter = getattr(config, "get_text_config", None)
    return getter() if callable(getter) else getattr(config, "text_config", config)


def _vision_config(config: Any) -> Any:
    return getattr(config, "vision_config", None) or config


@dataclass(frozen=True)
class TextDims:
    """Widths of a dense decoder: ``E = heads * head_dim`` query width, ``kv_heads * head_dim`` key/value width."""

    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    mlp_matrices: int
    tied: bool
    layer_types: tuple[str, ...]
    sliding_window: int | None


def text_dims(config: Any) -> TextDims:
    """The :class:`TextDims` of a language-model config (or of a VLM config's text part)."""
    cfg = _text_config(config)
    if getattr(cfg, "num_experts", None) or getattr(cfg, "num_local_experts", None):
        raise ValueError(f"{cfg.model_type}: mixture-of-experts layers are not covered by vtoken.bench.cost")
    heads = int(cfg.num_attention_heads)
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    kv = getattr(cfg, "num_key_value_heads", None) or heads
    layers = int(cfg.num_hidden_layers)
    window = getattr(cfg, "sliding_window", None)
    # as transformers' caches: without explicit layer types, a configured sliding window makes every layer sliding
    types = tuple(getattr(cfg, "layer_types", None)
                  or ("sliding_attention" if window is not None else "full_attention",) * layers)
    return TextDims(hidden=int(cfg.hidden_size), layers=layers, heads=heads, kv_heads=int(kv),
                    head_dim=int(head_dim), intermediate=int(cfg.intermediate_size), vocab=int(cfg.vocab_size),
                    mlp_matrices=2 if getattr(cfg, "model_type", "") in PLAIN_MLP else 3,
                    tied=bool(getattr(cfg, "tie_word_embeddings", False)), layer_types=types,
                    sliding_window=window)


def _attention_pairs(q_len: int, past: int, causal: bool, window: int | None = None) -> int:
    """Query-key pairs scored by ``q_len`` queries after ``past`` cached tokens (causal: only earlier keys)."""
    if not causal:
        return q_len * (past + q_len)
    lo, hi = past + 1, past + q_len  # keys seen by the first and the last query
    if window is None or hi <= window:
        return (lo + hi) * q_len // 2
    if lo > window:  # each query sees at most `window` keys (itself included)
        return q_len * window
    m = window - lo + 1
    return (lo + window) * m // 2 + (q_len - m) * window


def _per_layer(d: TextDims, seq_len: int | Sequence[int], what: str) -> list[int]:
    """``seq_len`` as one length per decoder layer (an int: the same in every layer)."""
    if isinstance(seq_len, int):
        return [seq_len] * d.layers
    lengths = [int(v) for v in seq_len]
    if len(lengths) != d.layers:
        raise ValueError(f"{what}: seq_len lists {len(lengths)} per-layer lengths for a model of {d.layers} layers")
    return lengths


def llm_prefill_flops(config: Any, seq_len: int | Sequence[int], batch: int = 1, *, past: int = 0,
                      causal: bool = True, logits: int | None = 1, detail: bool = False) -> float | dict[str, float]:
    """FLOPs of a language-model forward over ``seq_len`` new tokens per sample (after ``past`` cached ones).

    ``seq_len`` may list one length per decoder layer (pruning inside the language model: layer ``i`` processes
    ``seq_len[i]`` tokens and attends over them; the LM head reads the last layer's output).

    Per layer and token: Q/K/V/O projections ``2 * H * (2 E + 2 E_kv)``, MLP ``2 * m * H * I`` (``m`` = 3 gated,
    2 plain); per layer, head and scored query-key pair: ``4 * head_dim`` (``Q K^T`` and ``P V``). ``causal``
    counts only the lower triangle (what causal kernels such as SDPA with ``is_causal`` compute); ``False`` the full
    square. ``logits``: positions whose LM-head logits are computed (1 = the last one, as ``generate`` asks with
    ``logits_to_keep=1``; ``None`` = every position). ``detail=True`` returns ``{"proj", "attention", "mlp",
    "lm_head", "total"}``.
    """
    d = text_dims(config)
    lengths = _per_layer(d, seq_len, "llm_prefill_flops")
    q_width, kv_width = d.heads * d.head_dim, d.kv_heads * d.head_dim
    tokens = batch * sum(lengths)
    proj = 2.0 * tokens * d.hidden * (2 * q_width + 2 * kv_width)
    mlp = 2.0 * tokens * d.mlp_matrices * d.hidden * d.intermediate
    attention = 0.0
    for kind, n in zip(d.layer_types, lengths, strict=True):
        window = d.sliding_window if kind == "sliding_attention" else None
        attention += 4.0 * batch * d.heads * d.head_dim * _attention_pairs(n, past, causal, window)
    rows = lengths[-1] if logits is None else min(int(logits), lengths[-1])
    lm_head = 2.0 * batch * rows * d.hidden * d.vocab
    out = {"proj": proj, "attention": attention, "mlp": mlp, "lm_head": lm_head}
    out["total"] = sum(out.values())
    return out if detail else out["total"]


def kv_cache_bytes(config: Any, seq_len: int | Sequence[int], batch: int = 1,
                   dtype: torch.dtype = torch.float32) -> int:
    """Bytes of the key + value tensors a ``DynamicCache`` holds after a prefill of ``seq_len`` tokens per sample
    (or one length per layer, after pruning inside the language model):
    ``2 * batch * kv_heads * cached * head_dim * itemsize`` summed over layers, where a sliding-window layer keeps
    only its last ``sliding_window - 1`` tokens (as transformers' ``DynamicSlidingWindowLayer``)."""
    d = text_dims(config)
    item = torch.empty((), dtype=dtype).element_size()
    total = 0
    for kind, n in zip(d.layer_types, _per_layer(d, seq_len, "kv_cache_bytes"), strict=True):
        if kind == "dummy":  # a layer that reuses another layer's cache (or has no attention) stores nothing
            continue
        cached = n
        if kind == "sliding_attention" and d.sliding_window:
            cached = min(n, d.sliding_window - 1)
        total += 2 * batch * d.kv_heads * cached * d.head_dim * item
    return total


def llm_param_count(config: Any, *, norms: bool = True) -> int:
    """Parameters of a dense Llama/Qwen2-style language model with its LM head (counted once when tied)."""
    d = text_dims(config)
    cfg = _text_config(config)
    q_width, kv_width = d.heads * d.head_dim, d.kv_heads * d.head_dim
    attn = d.hidden * (2 * q_width + 2 * kv_width)
    if getattr(cfg, "model_type", "") == "qwen2":  # q/k/v biases
        attn += q_width + 2 * kv_width
    elif getattr(cfg, "attention_bias", False):
        attn += q_width + 2 * kv_width + d.hidden
    mlp = d.mlp_matrices * d.hidden * d.intermediate + (
        d.intermediate + d.hidden if getattr(cfg, "mlp_bias", False) else 0)
    per_layer = attn + mlp + (2 * d.hidden if norms else 0)
    embed = d.vocab * d.hidden
    return d.layers * per_layer + embed + (0 if d.tied else embed) + (d.hidden if norms else 0)


@dataclass(frozen=True)
class VisionDims:
    """Widths of a ViT tower: ``tokens`` per image (patches plus a CLS token when the tower has one)."""

    hidden: int
    layers: int
    intermediate: int
    patches: int
    patch_size: int
    channels: int
    cls: bool

    @property
    def tokens(self) -> int:
        return self.patches + int(self.cls)


def vision_dims(config: Any) -> VisionDims:
    """The :class:`VisionDims` of a CLIP/SigLIP-style vision config (or of a VLM config's vision part)."""
    cfg = _vision_config(config)
    grid = int(cfg.image_size) // int(cfg.patch_size)
    return VisionDims(hidden=int(cfg.hidden_size), layers=int(cfg.num_hidden_layers),
                      intermediate=int(cfg.intermediate_size), patches=grid * grid, patch_size=int(cfg.patch_size),
                      channels=int(getattr(cfg, "num_channels", 3)),
                      cls=getattr(cfg, "model_type", "") not in ("siglip_vision_model", "siglip2_vision_model"))


def vit_flops(config: Any, images: int = 1, *, layers: int | None = None, detail: bool = False
              ) -> float | dict[str, float]:
    """FLOPs of a ViT tower on ``images`` images: patch embedding ``2 * P * (C p^2) * W``, per layer
    ``2 T (4 W^2) + 4 T^2 W`` (bidirectional attention) ``+ 2 T (2 W I)`` (plain MLP), ``T`` tokens per image.
    ``layers`` defaults to the whole tower (LLaVA runs every layer even when it reads the features of layer -2)."""
    d = vision_dims(config)
    n_layers = d.layers if layers is None else layers
    t = d.tokens
    embed = 2.0 * images * d.patches * d.channels * d.patch_size**2 * d.hidden
    proj = 2.0 * images * t * 4 * d.hidden**2 * n_layers
    attention = 4.0 * images * t * t * d.hidden * n_layers
    mlp = 2.0 * images * t * 2 * d.hidden * d.intermediate * n_layers
    out = {"embed": embed, "proj": proj, "attention": attention, "mlp": mlp}
    out["total"] = sum(out.values())
    return out if detail else out["total"]


def qwen_vit_flops(config: Any, grid_thw: Sequence[int]) -> float:
    """FLOPs of a Qwen2-VL / Qwen2.5-VL vision tower on one image or clip of ``grid_thw = (t, h, w)`` patches: patch
    embedding over ``C * temporal_patch * p^2`` inputs, per block projections ``2 P (4 W^2)``, attention ``4 P S W``
    with ``S`` the keys a patch sees (its ``h * w`` frame in full-attention blocks, its window of
    ``(window_size / patch)^2`` patches in the others; Qwen2-VL attends over the frame in every block) and the MLP
    (three ``W x I`` matrices for Qwen2.5-VL's SwiGLU, two for Qwen2-VL's), then the 2 x 2 patch merger."""
    cfg = _vision_config(config)
    t, h, w = (int(v) for v in grid_thw)
    patches = t * h * w
    width = int(getattr(cfg, "embed_dim", None) or cfg.hidden_size)
    depth = int(getattr(cfg, "depth", None) or cfg.num_hidden_layers)
    p, tp = int(cfg.patch_size), int(getattr(cfg, "temporal_patch_size", 2))
    merge = int(getattr(cfg, "spatial_merge_size", 2))
    out_w = int(getattr(cfg, "out_hidden_size", None) or getattr(cfg, "hidden_size", width))
    windowed = getattr(cfg, "fullatt_block_indexes", None) is not None
    if windowed:
        inter, mats = int(cfg.intermediate_size), 3
        full = set(cfg.fullatt_block_indexes)
        window = min((int(cfg.window_size) // p) ** 2, h * w)
    else:
        inter, mats = int(width * getattr(cfg, "mlp_ratio", 4)), 2
        full, window = set(range(depth)), h * w
    embed = 2.0 * patches * 3 * tp * p * p * width
    proj = 2.0 * patches * 4 * width * width * depth
    attention = sum(4.0 * patches * (h * w if i in full else window) * width for i in range(depth))
    mlp = 2.0 * patches * mats * width * inter * depth
    m = merge * merge * width
    merger = 2.0 * (patches // (merge * merge)) * (m * m + m * out_w)
    return embed + proj + attention + mlp + merger


def projector_flops(config: Any, tokens: int, batch: int = 1) -> float:
    """FLOPs of LLaVA's two-layer MLP projector (vision width -> text width -> text width) on ``tokens`` tokens per
    sample; a list-valued ``vision_feature_layer`` concatenates that many feature layers on the input side."""
    v = vision_dims(config)
    t = text_dims(config)
    layer = getattr(config, "vision_feature_layer", -1)
    width = v.hidden * (len(layer) if isinstance(layer, (list, tuple)) else 1)
    return 2.0 * batch * tokens * (width * t.hidden + t.hidden * t.hidden)
