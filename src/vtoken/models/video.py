"""Video clips through the method pipeline: image methods per frame, video methods per clip.

A clip is ``T`` frames of ``H x W`` tokens, frame by frame (each frame in raster order). Clips of one prefill with the
same frame size run together, shorter ones padded with whole masked frames at the end (the ``video_grid`` layout);
clips of another frame size run separately. In one pipeline:

- a ``pre_llm`` (image) method runs on every frame as on an image (``keep`` per frame, ``grid = (H, W)`` while the
  frames are whole), the frames of all clips batched as rows; its outputs are laid back into their clips;
- a ``video`` method runs on whole clips (``keep`` is the clip's budget, a ratio of its tokens or a count); a method
  that reads ``video_grid`` needs whole frames, so it comes first (:func:`check_video_steps`); one that reads no frame
  layout at all takes one frame per row by its contract and runs per frame (:func:`runs_per_frame`).

Every per-token signal follows the tokens (``frame_ids`` included), so methods compose as on images.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from ..core import CATALOGUE, Reduction
from .pipeline import TOKEN_DIM, Step, fold_rows, run_one, run_steps, stack_reductions

#: signals with one entry per frame along dim 1 (the catalogue's ``B F ...``)
FRAME_AXIS = frozenset(name for name, sig in CATALOGUE.items() if (sig.dims or "").startswith("B F"))
#: signals only a video gives (a family that takes no videos cannot run methods that need them)
VIDEO_SIGNALS = frozenset({"video_grid", "frame_features"})


def check_video_steps(steps: list[Step]) -> list[Step]:
    """``steps`` unchanged; a ``ValueError`` when a method that reads the clip's frame layout (``video_grid``) follows
    another method of the clip pipeline, whose output is no longer whole frames."""
    for i, step in enumerate(steps):
        if "video_grid" in step.info.signals and i > 0:
            before = [s.info.name for s in steps[:i]]
            raise ValueError(f"method: {step.info.name!r} reads whole video frames (video_grid), but {before} run "
                             f"before it and change the frames; list {step.info.name!r} alone or first")
    return steps


def runs_per_frame(step: Step) -> bool:
    """Whether a step runs on each frame (``keep`` per frame) rather than on the clip: image (``pre_llm``) methods,
    and video methods that read no frame layout (neither ``video_grid``, ``frame_ids`` nor ``frame_features``), which
    by their contract take one frame per batch row (e.g. ``aim_merge``)."""
    info = step.info
    layout = {"video_grid", "frame_ids", "frame_features"} & {*info.signals, *info.optional_signals}
    return info.stage == "pre_llm" or (info.stage == "video" and not layout)


def place_tokens(embeds: Tensor, keep: Tensor, columns: Tensor, sample: Tensor, red: Reduction) -> None:
    """Write a reduction of visual rows (images or clips: ``columns [I, N]`` placeholder column of each token, ``-1``
    on padding; ``sample [I]`` batch row) into the prompt, in place: every placeholder column is dropped from ``keep
    [B, L]`` except those of kept tokens, whose values go into ``embeds [B, L, D]``."""
    real = columns >= 0
    keep[sample[:, None].expand_as(columns)[real], columns[real]] = False
    rows = sample[:, None].expand_as(red.indices)[red.mask]
    cols = columns.gather(1, red.indices.clamp(min=0))[red.mask]
    keep[rows, cols] = True
    embeds[rows, cols] = red.tokens[red.mask].to(embeds.dtype)


def select_rows(name: str, value: Any, rows: Tensor, n: int) -> Any:
    """Signal ``value`` of the visual rows ``rows``, cut to their first ``n`` tokens (non-tensors pass)."""
    if not isinstance(value, Tensor):
        return value
    value = value[rows]
    if name == "attn":
        return value[:, :n, :n]
    dim = TOKEN_DIM.get(name)
    return value if dim is None else value.narrow(dim, 0, n)


def frame_counts(red: Reduction, p: int, t: int) -> Tensor:
    """``[V, T]`` kept tokens of each frame (source index // ``p``) of a clip reduction."""
    frame = torch.where(red.mask, red.indices // p, t)
    out = torch.zeros(red.mask.shape[0], t + 1, dtype=torch.long, device=red.mask.device)
    return out.scatter_add_(1, frame, torch.ones_like(frame))[:, :t]


#: per-token tower signals of a video frame, pooled like the frame's features where a family pools them: the token
#: axis of each (``[F, n]`` / ``[F, n, d]``: 1; ``[F, L, n]``: 2)
POOLED = {"cls_attn": 1, "attn_logits": 1, "keys": 1, "cls_attn_layers": 2, "attn_received_layers": 2}


def pool_frame_signal(name: str, value: Tensor, pool: Callable[[Tensor], Tensor]) -> Tensor:
    """A per-frame signal ``value`` (token axis per :data:`POOLED`) through ``pool`` (``[F, n, ...]`` -> per clip
    token ``[V, T * P, ...]``)."""
    return pool(value.transpose(1, 2)).transpose(1, 2) if POOLED[name] == 2 else pool(value)


def frame_means(tokens: Tensor, grids: Tensor) -> Tensor:
    """``[V, T_max, D]`` the mean token of each frame of clips ``tokens [V, N, D]`` (clip ``v`` is ``grids[v] = (T, H,
    W)``, frame by frame; frames past a clip's ``T`` are 0)."""
    v, n, d = tokens.shape
    grids = grids.to(tokens.device).long()
    p = grids[:, 1:].prod(-1, keepdim=True)
    t = int(grids[:, 0].max())
    pos = torch.arange(n, device=tokens.device)[None, :]
    frame = torch.where(pos < grids[:, :1] * p, pos // p, t)  # [V, N], t on padding
    out = torch.zeros(v, t + 1, d, dtype=torch.float32, device=tokens.device)
    out.scatter_add_(1, frame[..., None].expand(v, n, d), tokens.float())
    return (out[:, :t] / p[..., None].float()).to(tokens.dtype)


def per_frame(step: Step, x: Tensor, valid: Tensor, signals: dict[str, Any], t: int, p: int,
              grid: tuple[int, int]) -> Reduction:
    """Run an image method on every frame of the clips ``x [V, M, C]`` (``valid [V, M]`` a prefix of each row;
    ``signals["frame_ids"] [V, M]`` the frame of each token): the frames are the rows of one batch, ``keep`` per
    frame. Returns the clips' reduction, frame by frame; ``extras["frames"]`` is the per-frame one."""
    v, m = valid.shape
    dev = x.device
    count = valid.sum(1)
    if not bool((valid == (torch.arange(m, device=dev)[None, :] < count[:, None])).all()):
        raise RuntimeError("per_frame: the valid tokens of a clip must come first")
    key = torch.where(valid, signals["frame_ids"], t)
    per = torch.zeros(v, t + 1, dtype=torch.long, device=dev).scatter_add_(1, key, torch.ones_like(key))[:, :t]
    start = per.cumsum(1) - per
    rank = torch.arange(m, device=dev)[None, :] - start.gather(1, key.clamp(max=t - 1))
    row = torch.arange(v, device=dev)[:, None] * t + key
    live = per.reshape(-1) > 0
    live_rows = live.nonzero()[:, 0]
    kf = int(per.max())
    r_at, k_at = row[valid], rank[valid]

    def spread(val: Tensor) -> Tensor:  # [V, M, ...] -> [R, kf, ...], the frames with tokens
        out = val.new_zeros(v * t, kf, *val.shape[2:])
        out[r_at, k_at] = val[valid]
        return out[live]

    xf = spread(x)
    vf = (torch.arange(kf, device=dev)[None, :] < per.reshape(-1)[:, None])[live]
    whole = bool((per.reshape(-1)[live] == p).all()) and x.shape[1] == t * p
    fsig: dict[str, Any] = {}
    for name in (*step.info.signals, *step.info.optional_signals):
        value = signals.get(name)
        if name == "grid":
            fsig[name] = grid if whole else None
        elif name in ("frame_ids", "video_grid", "attn") or value is None:
            continue
        elif not isinstance(value, Tensor):
            fsig[name] = value
        elif TOKEN_DIM.get(name) == 1:
            fsig[name] = spread(value)
        elif TOKEN_DIM.get(name) == 2:
            fsig[name] = spread(value.transpose(1, 2)).transpose(1, 2)
        else:  # per clip: every frame gets its clip's
            fsig[name] = value[live_rows // t]
    red = run_one(step, xf, vf, fsig)

    # lay the frames' outputs back into their clips, frame by frame: frame row r reduced the clip slots src[r]
    src = torch.full((v * t, kf), -1, dtype=torch.long, device=dev)
    src[r_at, k_at] = torch.arange(m, device=dev).expand(v, m)[valid]
    out = fold_rows(red, live_rows // t, src[live], v, m, {"frames": red})
    out.extras["frame_counts"] = frame_counts(out, p, t)
    return out


def reduce_clips(steps: Sequence[Step], tokens: Tensor, grids: Tensor, signals: dict[str, Any]) -> Reduction:
    """Run ``steps`` on clips ``tokens [V, N, C]`` (LLM space; clip ``v`` is ``grids[v] = (T, H, W)``, its first
    ``T * H * W`` tokens valid) with per-clip ``signals`` (``[V, N, ...]`` per token, or ``[V, ...]``). One run per
    frame size; ``video_grid`` and ``frame_ids`` are added here. Returns one row per clip (indices into the clip's
    tokens), ``extras["frame_counts"] [V, T_max]``, ``extras["steps"]`` per frame size."""
    v, n = tokens.shape[:2]
    dev = tokens.device
    grids = grids.to(dev).long()
    if not steps:
        return Reduction(tokens, torch.where(_valid(grids, n), torch.arange(n, device=dev), -1), _valid(grids, n),
                         extras={"frame_counts": _all_frames(grids)})
    sizes, inverse = torch.unique(grids[:, 1:], dim=0, return_inverse=True)
    parts, counts = [], []
    for g in range(sizes.shape[0]):  # one run per frame size
        rows = (inverse == g).nonzero()[:, 0]
        h, w = (int(x) for x in sizes[g])
        p = h * w
        frames = grids[rows, 0]
        t = int(frames.max())
        m = t * p
        sig = {name: select_rows(name, value, rows, m) for name, value in signals.items()}
        for name in FRAME_AXIS & set(sig):  # per-frame signals of the longest clip of this frame size
            sig[name] = sig[name][:, :t]
        sig["video_grid"] = (t, h, w)
        sig["frame_ids"] = (torch.arange(m, device=dev) // p).expand(rows.numel(), m)
        mask = torch.arange(m, device=dev)[None, :] < (frames * p)[:, None]

        def run(step: Step, x: Tensor, valid: Tensor, _index: Tensor, s: dict[str, Any], t: int = t, p: int = p,
                hw: tuple[int, int] = (h, w)) -> Reduction:
            if runs_per_frame(step):
                return per_frame(step, x, valid, s, t, p, hw)
            return run_one(step, x, valid, s)

        red = run_steps(steps, tokens[rows, :m], sig, None, "projected", mask=mask, run=run)
        parts.append((rows, red))
        counts.append((rows, frame_counts(red, p, t)))
    out = stack_reductions(parts, v, width=n)
    per = torch.zeros(v, int(grids[:, 0].max()), dtype=torch.long, device=dev)
    for rows, c in counts:
        per[rows, :c.shape[1]] = c
    out.extras["frame_counts"] = per
    return out


def _valid(grids: Tensor, n: int) -> Tensor:
    return torch.arange(n, device=grids.device)[None, :] < grids.prod(-1)[:, None]


def _all_frames(grids: Tensor) -> Tensor:
    t = int(grids[:, 0].max())
    on = torch.arange(t, device=grids.device)[None, :] < grids[:, :1]
    return torch.where(on, grids[:, 1:].prod(-1, keepdim=True), 0)

