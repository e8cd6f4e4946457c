"""Deterministic stand-ins for every signal in :data:`vtoken.core.SIGNALS`, derived from the tokens.

Used by property tests, the selection benchmark and the image demo, where no model produced real signals. The
attention-like signals are a saliency proxy (distance of each token from the mean token), not a model's attention.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from .methods import MethodInfo


def grid_for(n: int) -> tuple[int, int]:
    """The most square ``(H, W)`` with ``H * W == n`` (``H <= W``)."""
    h = math.isqrt(n)
    while n % h:
        h -= 1
    return h, n // h


def _saliency(tokens: Tensor, temperature: float = 1.0) -> Tensor:
    x = tokens.float()
    d = (x - x.mean(1, keepdim=True)).norm(dim=-1)
    d = d / d.std(dim=1, keepdim=True, unbiased=False).clamp_min(1e-6)
    return torch.softmax(d / temperature, dim=-1)


def _projection(d_in: int, d_out: int, seed: int) -> Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(d_in, d_out, generator=gen) / math.sqrt(d_in)


def make_signal(name: str, tokens: Tensor, *, grid: tuple[int, int] | None = None, layers: int = 4,
                text_len: int = 8, seed: int = 0) -> Any:
    """One synthetic signal of the documented shape for ``tokens [B, N, D]``."""
    b, n, d = tokens.shape
    x = tokens.float()
    dev = tokens.device
    if name == "grid":
        return grid or grid_for(n)
    if name == "frame_features":
        frames = make_signal("video_grid", tokens)[0]
        return x.reshape(b, frames, n // frames, d).mean(2)
    if name == "video_grid":
        frames = next(t for t in (8, 6, 4, 3, 2, 1) if n % t == 0)
        return (frames, *grid_for(n // frames))
    if name == "cls_attn":
        return _saliency(tokens)
    if name == "attn_logits":
        return _saliency(tokens).log()
    if name in ("cls_attn_layers", "attn_received_layers"):
        return torch.stack([_saliency(tokens, 1.0 + i) for i in range(layers)], dim=1)
    if name == "attn":
        return torch.softmax(x @ x.transpose(1, 2) / math.sqrt(d), dim=-1)
    if name == "cls_q":
        return torch.randn(b, 4, 16, generator=torch.Generator().manual_seed(seed)).to(dev)
    if name in ("keys", "vision_features"):
        return x @ _projection(d, min(d, 64), seed + (1 if name == "keys" else 2)).to(dev)
    if name == "text":
        gen = torch.Generator().manual_seed(seed + 3)
        idx = torch.randint(0, n, (text_len,), generator=gen)
        return (x[:, idx] + 0.1 * torch.randn(text_len, d, generator=gen).to(dev)).to(tokens.dtype)
    if name == "text_mask":
        return torch.ones(b, text_len, dtype=torch.bool, device=dev)
    if name in ("crop_ids", "frame_ids"):
        return torch.zeros(b, n, dtype=torch.long, device=dev)
    if name == "positions":
        return torch.arange(n, device=dev).expand(b, n).clone()
    if name in ("llm_attn", "llm_attn_rank"):
        return torch.softmax(x @ x.mean(1, keepdim=True).transpose(1, 2) / math.sqrt(d), dim=1)[..., 0]
    if name == "sizes":
        return torch.ones(b, n, device=dev)
    if name == "llm_frame_slots":  # the frames of make_signal("video_grid"), one slot per position of a frame
        frames = make_signal("video_grid", tokens)[0]
        return torch.arange(n, device=dev).remainder(n // frames).expand(b, n).clone()
    if name == "llm_state":  # a first call
        return torch.full((b, 1), -1, dtype=torch.long, device=dev)
    if name == "decode_state":  # a previous step: a slightly different attention, its top half kept
        before = make_signal("llm_attn", tokens, seed=seed).float()
        kept = (before >= before.median(dim=1, keepdim=True).values).float()
        return torch.stack([before.roll(1, dims=1), kept], dim=-1)
    if name in ("llm_hidden", "llm_embeds"):
        return x
    if name == "llm_keys":
        return x @ _projection(d, min(d, 64), seed + 4).to(dev)
    if name in ("llm_text_hidden", "llm_text_keys"):
        text = make_signal("text", tokens, text_len=text_len, seed=seed).float()
        return text if name == "llm_text_hidden" else text @ _projection(d, min(d, 64), seed + 4).to(dev)
    if name == "llm_text_attn":
        text = make_signal("text", tokens, text_len=text_len, seed=seed).float()
        return torch.softmax(text @ x.transpose(1, 2) / math.sqrt(d), dim=-1)
    raise ValueError(f"no synthetic stand-in for signal {name!r}")


def make_signals(info: MethodInfo, tokens: Tensor, *, grid: tuple[int, int] | None = None, optional: bool = True,
                 seed: int = 0) -> dict[str, Any]:
    """Every signal ``info`` requires (and its optional ones when ``optional``), synthesised from ``tokens``."""
    names = list(info.signals) + (list(info.optional_signals) if optional else [])
    out = {name: make_signal(name, tokens, grid=grid, seed=seed) for name in names}
    spec = info.signal_spec
    text_space = spec["text"].space if "text" in spec else None
    if "text" in out and text_space is not None and text_space == (spec["vision_features"].space
                                                                   if "vision_features" in spec else None):
        # the method compares text with vision_features (e.g. CLIP's joint space): make the text in that space
        feats = out.get("vision_features", make_signal("vision_features", tokens, seed=seed))
        out["text"] = make_signal("text", feats, seed=seed)
    if "text" in out and "text_mask" not in names and "text_mask" in info.optional_signals:
        out["text_mask"] = make_signal("text_mask", tokens)
    return out
