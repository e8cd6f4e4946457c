"""``vtoken bench --suite video``: video methods x clip budgets on a video VLM (default: the shipped micro video VLM
on the Fashion clips test set), measured end to end through :func:`vtoken.apply`, as the image bench
(:mod:`vtoken.bench.run`) measures images.

For every method and ``keep`` (the clip's budget for a video method, each frame's for an image method run per frame)
the model is patched, the test questions are answered with greedy ``generate`` (exact match per question type), and
the first batch is timed as a prefill. Each row also reports the visual tokens per clip entering the language model,
the tokens kept per time step (a temporal patch: :func:`kept_per_step`), analytic FLOPs (tower over every patch,
language model at the per-layer token counts) and KV-cache bytes. Data parallel under ``torchrun`` and resumable
from ``<out>/partial.jsonl`` like the image bench. Files: ``results.json`` / ``.csv`` / ``.md``, ``pareto.png`` and
``strips/keep_<k>_clip<i>.png`` (an example clip's steps in a row per method, kept tokens bright).
"""

from __future__ import annotations

import hashlib
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..methods import LM_STAGES, all_methods, get_method
from . import clips as C
from .common import default_video_model_path, progress_bar
from .cost import kv_cache_bytes, llm_prefill_flops, qwen_vit_flops
from .errors import UsageError, user_input
from .run import (
    PARTIAL,
    Row,
    check_device,
    check_keeps,
    check_methods,
    check_out_dir,
    dist_context,
    gather_answers,
    keep_label,
    model_fingerprint,
    prefill_ms,
    resume_state,
    run_configs,
    visual_per_layer,
)
from .videoqa import VIDEO_ID, answer_videos, load_video_model, prepare_video_batches

DEFAULT_VIDEO_KEEPS = ("all", "0.5", "0.25", "0.1")
#: image methods the default run also applies per frame (the baselines and one diversity method)
PER_FRAME = ("uniform", "random", "pool", "divprune")
DEFAULT_VIDEO_LIMIT = 140
"""Questions of a default run (20 per type, the first of the shipped 420): the run then fits 10 minutes on 2 CPU
cores; ``--limit 420`` scores all."""


def default_video_methods(model: nn.Module) -> list[str]:
    """Every video-stage method the model's adapter runs, the llm-stage ones that read a video's frames
    (``llm_frame_slots``), then :data:`PER_FRAME`."""
    from ..models import find_adapter

    adapter = find_adapter(model)
    ok = [m for m in all_methods() if adapter.unsupported(m) is None]
    video = [m.name for m in ok if m.stage == "video"]
    llm = [m.name for m in ok if m.stage in LM_STAGES and "llm_frame_slots" in m.all_signals]
    return [*video, *llm, *(n for n in PER_FRAME if n not in video)]


def kept_per_step(handle: Any, steps: int, per_step: int) -> list[float] | None:
    """Mean tokens kept per temporal patch over the latest video-only prefill's clips (``handle.last``: the clips'
    reduction, composed with any llm-stage pruning: the tokens that reached the last decoder layer), from the kept
    indices (a merged token counts at its representative's step)."""
    red = getattr(handle, "last", None)
    if red is None:
        return None
    idx = torch.where(red.mask, red.indices // per_step, steps)
    counts = torch.zeros(idx.shape[0], steps + 1, dtype=torch.long).scatter_add_(
        1, idx.cpu(), torch.ones_like(idx.cpu()))
    return [round(float(v), 2) for v in counts[:, :steps].float().mean(0)]


def video_cost(config: Any, batch: dict[str, torch.Tensor], visual: list[float],
               dtype: torch.dtype = torch.float32) -> tuple[float, int]:
    """``(FLOPs, KV bytes)`` per clip of a prefill: the tower over every patch of the clip (its work does not shrink)
    and the language model at the per-layer token counts (text + ``visual[layer]``)."""
    n_vis = (batch["input_ids"] == VIDEO_ID).sum(1).float()
    text = float((batch["attention_mask"].sum(1) - n_vis).float().mean())
    lengths = [max(1, round(text + v)) for v in visual]
    flops = llm_prefill_flops(config, lengths) + qwen_vit_flops(config, batch["video_grid_thw"][0].tolist())
    return float(flops), int(kv_cache_bytes(config, lengths, dtype=dtype))


def _examples_digest(examples: Sequence[C.ClipExample]) -> str:
    h = hashlib.sha256()
    for e in examples:
        h.update(f"{e.qtype}\0{e.question}\0{e.answer}\0".encode())
        h.update(np.ascontiguousarray(e.spec.objects).tobytes())
    return h.hexdigest()


def run_video_bench(model_path: str | Path | None = None, methods: Sequence[str] | None = None,
                    keeps: Sequence[str] = DEFAULT_VIDEO_KEEPS, limit: int | None = DEFAULT_VIDEO_LIMIT,
                    batch_size: int = 20, repeats: int = 3, out_dir: str | Path | None = "out/bench-video",
                    examples: list[C.ClipExample] | None = None, strips: int = 2, max_new_tokens: int = 3,
                    progress: bool = True, device: str | None = None, log: Callable[[str], None] | None = print,
                    resume: bool = True) -> dict[str, Any]:
    """Run the video bench; returns the report dictionary (written to ``out_dir`` on rank 0). Arguments as
    :func:`vtoken.bench.run.run_bench`; ``limit`` defaults to :data:`DEFAULT_VIDEO_LIMIT` questions (``None``: all),
    ``strips`` example clips get a strip per method and budget."""
    from ..models import find_adapter
    from .report import write_report

    rank, world = dist_context()
    say = (log or (lambda _m: None)) if rank == 0 else (lambda _m: None)
    for arg, value, low in (("--batch-size", batch_size, 1), ("--repeats", repeats, 1), ("--limit", limit, 1),
                            ("--strips", strips, 0)):
        if value is None and arg == "--limit":
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise UsageError(f"{arg} must be an integer >= {low}, got {value!r}")
    keep_values = check_keeps(keeps)
    requested = check_methods(methods) if methods else None
    check_device(device)
    folder = Path(model_path).expanduser() if model_path is not None else default_video_model_path()
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"--model {folder}: no video model there (config.json missing); train one with "
                                "`vtoken train-micro --only video --install` or pass --model FOLDER")
    check_out_dir(out_dir, rank, world)
    exs = examples if examples is not None else C.load_default_test_set()
    exs = exs[:limit] if limit is not None else exs
    if not exs:
        raise UsageError("no questions to answer (empty example set)")
    model, processor = load_video_model(folder)
    if device is not None:
        with user_input(f"--device {device}"):
            model.to(device)
    with user_input(f"--model {folder}"):
        adapter = find_adapter(model)
    names = requested or default_video_methods(model)
    for n in names:
        why = adapter.unsupported(get_method(n))
        if why:
            say(f"bench: {n} cannot run on {type(model).__name__}, its rows will say why: {why}")
    batches = prepare_video_batches(processor, exs, batch_size)
    mine = list(range(rank, len(batches), world))
    configs = [("full", None)] + [(n, k) for n in names for k in keep_values if k is not None]
    cfg = model.config
    layers = int(cfg.text_config.num_hidden_layers)
    timing = batches[0]
    n_visual = (timing["input_ids"] == VIDEO_ID).sum(1)
    steps = int(timing["video_grid_thw"][0, 0])
    per_step = int(n_visual[0]) // steps
    partial = Path(out_dir) / PARTIAL if rank == 0 and out_dir is not None else None
    keys, done = resume_state(partial, configs, resume, world, lambda: {
        "suite": "video", "model": model_fingerprint(str(folder)), "data": _examples_digest(exs),
        "questions": len(exs), "batch_size": batch_size, "repeats": repeats, "strips": strips,
        "max_new_tokens": max_new_tokens, "device": str(next(model.parameters()).device)})
    say(f"bench video: {len(configs)} configurations x {len(exs)} questions ({len(batches)} batches of "
        f"{batch_size}" + (f", {world} processes" if world > 1 else "") + ")")
    def measure(name: str, keep: int | float | None, stage: str, handle: Any,
                advance: Callable[[], None] | None) -> tuple[Row, Any]:
        local = answer_videos(model, processor, batches, mine, max_new_tokens, on_batch=advance)
        merged = gather_answers(local, world)
        preds = [a for i in range(len(batches)) for a in merged[i]]
        acc = C.accuracy_by_type(preds, exs)
        ms = prefill_ms(model, timing, repeats) if rank == 0 else None
        visual = visual_per_layer(handle, n_visual, layers)
        flops, kv = video_cost(cfg, timing, visual, model.dtype)
        counts = kept_per_step(handle, steps, per_step) if handle is not None else [float(per_step)] * steps
        row = Row(name, keep_label(keep), stage, visual[0], float(np.mean(visual)), acc, latency_ms=ms,
                  gflops=flops / 1e9, kv_bytes=kv, predictions=preds, frame_counts=counts)
        red = handle.last if handle is not None else None
        strip = {"indices": red.indices[:strips].tolist(), "mask": red.mask[:strips].tolist()} if (
            red is not None and strips) else None
        return row, strip

    t0 = time.perf_counter()
    with progress_bar(progress and rank == 0) as bar:
        rows, strip_data = run_configs(model, configs, done, measure, bar=bar, label="bench video", units=len(mine),
                                       partial=partial, keys=keys, extra="strip")
    report = {"suite": "video", "model": str(model_path) if model_path is not None else "micro_video (shipped)",
              "questions": len(exs), "qtypes": [t for t in C.QTYPES if any(e.qtype == t for e in exs)],
              "majority_baseline": {k: v[1] for k, v in C.majority_baseline(exs).items()},
              "tokens_per_step": per_step, "steps": steps, "batch_size": batch_size, "repeats": repeats,
              "world_size": world, "device": str(next(model.parameters()).device),
              "threads": torch.get_num_threads(), "seconds": round(time.perf_counter() - t0, 1),
              "rows": [asdict(r) for r in rows]}
    if rank == 0 and out_dir is not None:
        paths = write_report(report, Path(out_dir))
        paths += write_strips(strip_data, exs[:strips], Path(out_dir), steps, per_step)
        report["files"] = [str(p) for p in paths]
        say("wrote " + ", ".join(str(p) for p in paths[:6]) + (f" and {len(paths) - 6} strips" if len(paths) > 6
                                                                 else ""))
    return report


def clip_strip(frames: np.ndarray, steps: int, per_step: int, kept: Sequence[int] | None = None,
               scale: int = 2) -> np.ndarray:
    """The first frame of each of a clip's ``steps`` time steps side by side (``frames [F, H, W, 3]``), scaled by
    ``scale`` (nearest); with ``kept`` (token indices into the clip, ``per_step`` tokens a step in a square grid)
    the dropped tokens' patches are dimmed (:func:`~vtoken.bench.report.overlay_tile`)."""
    from .report import overlay_tile

    side = math.isqrt(per_step)
    hold = frames.shape[0] // steps
    tokens = None if kept is None else np.asarray(kept)
    tiles = []
    for t in range(steps):
        frame = frames[t * hold].repeat(scale, 0).repeat(scale, 1)
        if tokens is not None:
            local = tokens[(tokens >= t * per_step) & (tokens < (t + 1) * per_step)] - t * per_step
            frame = overlay_tile(frame, local, np.ones(len(local), bool), (side, side))
        tiles.append(np.pad(frame, ((0, 0), (0, 4), (0, 0)), constant_values=255))
    return np.concatenate(tiles, axis=1)


def save_rows(rows: list[tuple[str, np.ndarray]], path: Path) -> Path:
    """Labelled image rows (same width) stacked into one PNG."""
    from PIL import Image, ImageDraw

    width = max(r.shape[1] for _, r in rows)
    band = 16
    sheet = Image.new("RGB", (width, sum(r.shape[0] + band for _, r in rows)), "white")
    draw = ImageDraw.Draw(sheet)
    y = 0
    for label, img in rows:
        draw.text((4, y + 2), label, fill="black")
        sheet.paste(Image.fromarray(img), (0, y + band))
        y += img.shape[0] + band
    path.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(path)
    return path


def write_strips(strip_data: dict[str, Any], examples: list[C.ClipExample], out: Path, steps: int,
                 per_step: int) -> list[Path]:
    """Per budget and example clip, one sheet: the clip's steps in a row, then a row per method with its kept
    tokens bright (dimmed: dropped; a merged group shows at its representative)."""
    by_keep: dict[str, list[tuple[str, Any]]] = {}
    for key, data in strip_data.items():
        method, keep = key.rsplit("@", 1)
        by_keep.setdefault(keep, []).append((method, data))
    paths = []
    for keep, items in sorted(by_keep.items()):
        for i, ex in enumerate(examples):
            rows = [(f"clip {i}: {ex.question} ({ex.answer}); keep {keep}; bright = kept tokens, dim = dropped",
                     clip_strip(ex.frames, steps, per_step))]
            for method, d in items:
                if i < len(d["indices"]):
                    kept = np.asarray(d["indices"][i])[np.asarray(d["mask"][i], bool)]
                    rows.append((f"{method}: {len(kept)} tokens", clip_strip(ex.frames, steps, per_step, kept)))
            paths.append(save_rows(rows, out / "strips" / f"keep_{keep}_clip{i}.png"))
    return paths


CLIP_IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")


def is_clip(path: str | Path) -> bool:
    """Whether ``vtoken show`` takes ``path`` as a clip: a folder (of frames), a GIF or an ``.npy`` array."""
    p = Path(path)
    return p.is_dir() or p.suffix.lower() in (".gif", ".npy")


def read_clip(path: str | Path, size: int = C.ROWS * C.CELL) -> np.ndarray:
    """A clip as ``uint8 [F, size, size, 3]``: a folder of frames (image files in name order), an animated GIF (every
    frame) or an ``.npy`` array ``[F, H, W, 3]`` (uint8, or floats in [0, 1]); frames of another size are resized
    (bilinear) to ``size`` x ``size``. A :class:`~.errors.UsageError` names the problem."""
    from PIL import Image, ImageSequence

    p = Path(path)
    if p.is_dir():
        files = sorted(f for f in p.iterdir() if f.suffix.lower() in CLIP_IMAGE_EXTENSIONS)
        if not files:
            raise UsageError(f"CLIP {path}: a folder without frames ({', '.join(CLIP_IMAGE_EXTENSIONS)} files)")
        frames = [Image.open(f).convert("RGB") for f in files]
    elif p.suffix.lower() == ".gif":
        frames = [f.convert("RGB") for f in ImageSequence.Iterator(Image.open(p))]
    elif p.suffix.lower() == ".npy":
        arr = np.load(p, allow_pickle=False)
        if arr.ndim != 4 or arr.shape[-1] != 3:
            raise UsageError(f"CLIP {path}: an .npy clip is [frames, height, width, 3], got shape {arr.shape}")
        if arr.dtype != np.uint8:
            arr = (np.clip(arr.astype(np.float32), 0, 1) * 255 + 0.5).astype(np.uint8)
        frames = [Image.fromarray(a) for a in arr]
    else:
        raise UsageError(f"CLIP {path}: give a folder of frames, a .gif or an .npy clip")
    out = [np.asarray(f if f.size == (size, size) else f.resize((size, size), Image.BILINEAR)) for f in frames]
    return np.stack(out).astype(np.uint8)


def show_clip(clip: str | Path, method: str, keep: int | float, *, model_path: str | Path | None = None,
              question: str = "what appears first?", out: str | Path | None = None, scale: int = 2) -> Path:
    """Run ``method`` at ``keep`` on a clip (:func:`read_clip`) through the video model (default: the shipped micro
    video VLM) and write the clip's strip with the kept tokens and the full and reduced answers; returns the PNG."""
    from ..core import resolve_keep
    from ..models import apply, find_adapter
    from .show import output_path

    with user_input("--method"):
        info = get_method(method)
    with user_input("--keep"):
        resolve_keep(keep, 1, name="--keep")
    if not Path(clip).exists():
        raise FileNotFoundError(f"CLIP {clip!s}: no such file or folder")
    frames = read_clip(clip)
    if len(frames) % 2:
        frames = np.concatenate([frames, frames[-1:]])  # a whole temporal patch, as the processor pads
    target = output_path(out, Path(clip), info.name, keep)
    model, processor = load_video_model(model_path)
    why = find_adapter(model).unsupported(info)
    if why:
        raise UsageError(f"--method {info.name}: cannot run on {type(model).__name__}: {why}")
    batch = processor([frames], [question])

    def ask() -> str:
        return answer_videos(model, processor, [batch], [0], max_new_tokens=4)[0][0]

    full = ask()
    with apply(model, info.name, keep=keep) as handle:
        reduced = ask()
        red = handle.last
    steps = int(batch["video_grid_thw"][0, 0])
    per_step = int((batch["input_ids"] == VIDEO_ID).sum()) // steps
    kept = red.indices[0][red.mask[0]].tolist() if red is not None else []
    rows = [(f"Q: {question}   full: {full!r}   {info.name} keep={keep}: {reduced!r}", clip_strip(
        frames, steps, per_step, scale=scale)),
            (f"{info.name}: {len(kept)} of {steps * per_step} tokens kept (bright)", clip_strip(
                frames, steps, per_step, kept, scale=scale))]
    return save_rows(rows, target)
