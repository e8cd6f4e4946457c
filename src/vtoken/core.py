"""Core types of vtoken: :class:`Reduction`, ``keep`` resolution, the signal catalogue, validation and the
gather/scatter helpers every method builds its result with.

Shapes: ``B`` batch, ``N`` input tokens, ``K`` output tokens, ``D`` channels.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

__all__ = [
    "SIGNALS",
    "Reduction",
    "all_finite",
    "check_mask",
    "check_signal",
    "check_tokens",
    "gather_rows",
    "identity_reduction",
    "prefix_mask",
    "reduction_from_indices",
    "reduction_from_merge",
    "resolve_keep",
    "topk_indices",
]

#: Every signal a method may consume, by its fixed keyword name. A method declares which ones it needs in its
#: registration; a missing one is a ``ValueError`` naming the signal and the method. Shapes use ``B`` (batch),
#: ``N`` (visual tokens passed as ``tokens``), ``L`` (layers), ``T`` (text tokens), ``H`` (heads).
SIGNALS: dict[str, str] = {
    "cls_attn": "[B, N] head-averaged CLS->patch attention probabilities of one vision layer (CLS column removed).",
    "cls_attn_layers": "[B, L, N] the same for L layers, shallow to deep.",
    "attn_logits": "[B, N] head-averaged PRE-softmax CLS->patch attention logits (q*scale @ k^T) of one layer.",
    "attn": "[B, N, N] head-averaged patch->patch attention probabilities of one layer (rows are queries).",
    "attn_received_layers": ("[B, L, N] attention each visual token receives in L vision layers (shallow to deep): "
                             "probabilities averaged over heads, then over ALL query rows (CLS row included), "
                             "CLS column dropped."),
    "cls_q": "[B, H, d] per-head CLS query of one layer (for methods that rebuild attention themselves).",
    "keys": "[B, N, d] attention keys of one layer, averaged over heads (ToMe/VisionZip metric).",
    "vision_features": "[B, N, C] a second view of the same tokens (e.g. pre-projector CLIP features).",
    "text": "[B, T, D] text token embeddings of the prompt (same width as the tokens unless a method says).",
    "text_mask": "[B, T] bool, True on real text tokens.",
    "grid": "(H, W) ints with H * W == N: raster layout of the visual tokens.",
    "crop_ids": "[B, N] long, which crop (0 = global view) each token comes from.",
    "frame_ids": "[B, N] long, which video frame each token comes from (non-decreasing).",
    "positions": "[B, N] or [B, N, P] position ids of the tokens in the full sequence.",
    "llm_attn": ("[B, N] attention probabilities from the last token of the prompt to each visual token inside the "
                 "LLM (one decoder layer, averaged over heads; softmax over the whole sequence)."),
    "llm_text_attn": ("[B, T, N] the same from each instruction token (the prompt's text after its last visual "
                      "token; rows marked by text_mask) to each visual token."),
    "llm_keys": "[B, N, d] keys of the visual tokens in one decoder layer (RoPE applied, heads concatenated).",
    "llm_hidden": "[B, N, D] hidden states of the visual tokens entering a decoder layer, after the LM's final norm.",
    "llm_text_keys": "[B, T, d] llm_keys of the instruction tokens (rows marked by text_mask).",
    "llm_text_hidden": "[B, T, D] llm_hidden of the instruction tokens (rows marked by text_mask).",
    "llm_embeds": "[B, N, D] input embeddings of the visual tokens (what the language model's first layer received).",
    "llm_attn_rank": ("[B, N] importance of each visual token in one decoder layer's attention graph over the whole "
                      "sequence: PageRank-style power steps per head through the causal softmax(logits / temperature) "
                      "rows of EVERY token (ops.attention.attention_pagerank), heads combined by root mean square."),
    "sizes": "[B, N] float, how many original patches each token already represents (merging methods).",
}


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


def resolve_keep(keep: int | float, n_valid: Tensor | int, *, name: str = "keep") -> Tensor:
    """Resolve ``keep`` into a per-sample count.

    ``keep`` is an ``int >= 1`` (a count, clipped to the tokens available) or a ``float`` in ``(0, 1]`` (a ratio of
    the valid count, rounded half-up, at least 1). ``n_valid`` is ``[B]`` (or an int). Returns ``[B]`` long.
    """
    n = torch.as_tensor(n_valid, dtype=torch.long).reshape(-1)
    if isinstance(keep, bool) or not isinstance(keep, (int, float)):
        if isinstance(keep, Tensor) and keep.numel() == 1:
            keep = keep.item()
        else:
            raise TypeError(f"{name} must be an int >= 1 (a count) or a float in (0, 1] (a ratio), got {keep!r}")
    if isinstance(keep, float):
        if not math.isfinite(keep) or not 0.0 < keep <= 1.0:
            raise ValueError(f"{name} as a ratio must be a float in (0, 1], got {keep!r}; use an int for a count")
        counts = torch.floor(n.double() * keep + 0.5).long()
        return counts.clamp(min=1).minimum(n.clamp(min=1))
    if keep < 1:
        raise ValueError(f"{name} must be an int >= 1 (a count) or a float in (0, 1] (a ratio), got {keep!r}")
    return torch.full_like(n, int(keep)).minimum(n.clamp(min=1))


def check_tokens(tokens: Any, *, name: str = "tokens") -> Tensor:
    """Validate a ``[B, N, D]`` floating tensor with finite values."""
    if not isinstance(tokens, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape [B, N, D], got {type(tokens).__name__}")
    if tokens.dim() != 3:
        hint = " (add a batch dimension: tokens[None])" if tokens.dim() == 2 else ""
        raise ValueError(f"{name} must have shape [B, N, D], got {tuple(tokens.shape)}{hint}")
    if not tokens.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {tokens.dtype}")
    if tokens.shape[1] == 0 or tokens.shape[0] == 0:
        raise ValueError(f"{name} must have at least one sample and one token, got {tuple(tokens.shape)}")
    if not all_finite(tokens):
        raise ValueError(f"{name} contains NaN or inf values")
    return tokens


def all_finite(x: Tensor) -> bool:
    """True when ``x`` has no NaN/inf (``aminmax`` propagates both; ~40x faster than ``isfinite().all()``)."""
    if x.numel() == 0:
        return True
    lo, hi = torch.aminmax(x.detach().reshape(-1))
    return bool(torch.isfinite(lo) & torch.isfinite(hi))


def check_mask(mask: Any, tokens: Tensor, *, name: str = "mask") -> Tensor | None:
    """Validate an optional ``[B, N]`` bool mask (True = real token); every sample needs one real token."""
    if mask is None:
        return None
    if not isinstance(mask, Tensor):
        raise TypeError(f"{name} must be a bool torch.Tensor of shape [B, N], got {type(mask).__name__}")
    if tuple(mask.shape) != tuple(tokens.shape[:2]):
        raise ValueError(f"{name} must have shape [B, N] = {tuple(tokens.shape[:2])}, got {tuple(mask.shape)}")
    mask = mask.to(device=tokens.device, dtype=torch.bool)
    if not bool(mask.any(-1).all()):
        raise ValueError(f"{name} must mark at least one real token in every sample")
    return mask


def check_signal(name: str, value: Any, tokens: Tensor, method: str) -> Any:
    """Check a signal's type and leading dimensions against :data:`SIGNALS`; returns it on the tokens' device."""
    b, n = tokens.shape[:2]
    where = f"signal {name!r} for method {method!r}"
    if name == "grid":
        try:
            h, w = (int(v) for v in value)
        except (TypeError, ValueError):
            raise TypeError(f"{where} must be a pair of ints (H, W), got {value!r}") from None
        if h < 1 or w < 1 or h * w != n:
            raise ValueError(f"{where} must satisfy H * W == N = {n}, got {(h, w)}")
        return (h, w)
    if not isinstance(value, Tensor):
        raise TypeError(f"{where} must be a torch.Tensor ({SIGNALS.get(name, '')}), got {type(value).__name__}")
    if value.dim() == 0 or value.shape[0] != b:
        raise ValueError(f"{where} must have batch size {b} first ({SIGNALS.get(name, '')}), got {tuple(value.shape)}")
    expect_n = {"cls_attn": 1, "attn_logits": 1, "attn": 1, "keys": 1, "vision_features": 1, "crop_ids": 1,
                "frame_ids": 1, "positions": 1, "llm_attn": 1, "sizes": 1, "cls_attn_layers": 2,
                "attn_received_layers": 2, "llm_keys": 1, "llm_hidden": 1, "llm_text_attn": 2,
                "llm_embeds": 1, "llm_attn_rank": 1}
    if name in expect_n:
        dim = expect_n[name]
        if value.dim() <= dim or value.shape[dim] != n:
            raise ValueError(f"{where} must have N = {n} at dim {dim} ({SIGNALS[name]}), got {tuple(value.shape)}")
    if name == "attn" and (value.dim() != 3 or value.shape[2] != n):
        raise ValueError(f"{where} must have shape [B, N, N] = {(b, n, n)}, got {tuple(value.shape)}")
    if value.is_floating_point() and not all_finite(value):
        raise ValueError(f"{where} contains NaN or inf values")
    return value.to(tokens.device)


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
