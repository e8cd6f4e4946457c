"""``vtoken bench``: methods x budgets on a VLM, measured end to end through :func:`vtoken.apply`.

For every method and ``keep`` the model is patched, the test questions are answered with greedy ``generate``
(exact match per question type, :func:`~vtoken.bench.fashion.accuracy_by_type`), and a fixed batch is timed as a
prefill (median over repeats). Analytic FLOPs (vision tower + projector + language model, per-layer token counts
for pruning inside the language model) and KV-cache bytes come from :mod:`vtoken.bench.cost` at the token counts
the model actually saw. ``keep="all"`` is the unpatched model, the reference for relative accuracy and speedup.

Data parallel: under ``torchrun`` (``WORLD_SIZE > 1``) each rank answers every ``world``-th batch and the
predictions are gathered to every rank in the single-process order, so the merged results equal a single-process
run; rank 0 times the prefill and writes the report.
"""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..methods import all_methods, get_method
from .cost import kv_cache_bytes, llm_prefill_flops, projector_flops, vit_flops
from .fashion import QTYPES, Example, accuracy_by_type, load_default_test_set
from .train_vit import _progress

DEFAULT_KEEPS = ("all", "0.5", "0.25", "0.11")
#: stages a default run covers on an image VLM (video methods are for frames, encoder methods for ViT classifiers)
DEFAULT_STAGES = ("pre_llm", "llm")


@dataclass
class Row:
    """One (method, keep) result."""

    method: str
    keep: str
    stage: str
    visual_tokens: float          # mean visual tokens per image the language model's first layer sees
    visual_tokens_mean: float     # mean over decoder layers (differs for pruning inside the language model)
    accuracy: dict[str, float]
    relative: float | None = None  # overall accuracy / full model's
    latency_ms: float | None = None
    speedup: float | None = None
    gflops: float | None = None
    kv_bytes: int | None = None
    error: str | None = None
    predictions: list[str] = field(default_factory=list, repr=False)


# ---------------------------------------------------------------------------------------------------- parsing
def parse_keep(text: str) -> int | float | None:
    """``"all"`` -> None, ``"64"`` -> 64, ``"0.25"`` / ``"25%"`` -> 0.25."""
    t = str(text).strip().lower()
    if t in ("all", "full", "none"):
        return None
    try:
        if t.endswith("%"):
            value: float = float(t[:-1]) / 100
        elif "." in t or "e" in t:
            value = float(t)
        else:
            n = int(t)
            if n < 1:
                raise ValueError
            return n
    except ValueError:
        raise ValueError(f"keep {text!r}: use 'all', an int count >= 1, a ratio in (0, 1] or a percentage") from None
    if not 0 < value <= 1:
        raise ValueError(f"keep {text!r}: a ratio must be in (0, 1]")
    return value


def keep_label(keep: int | float | None) -> str:
    if keep is None:
        return "all"
    return f"{keep:g}" if isinstance(keep, float) else str(keep)


def default_methods(model: nn.Module) -> list[str]:
    """Every registered method the model's adapter runs, of the stages in :data:`DEFAULT_STAGES`."""
    from ..models import find_adapter

    adapter = find_adapter(model)
    return [m.name for m in all_methods() if m.stage in DEFAULT_STAGES and adapter.unsupported(m) is None]


# ---------------------------------------------------------------------------------------------------- model
def load_model(path: str | Path | None, dtype: torch.dtype = torch.float32, device: str | None = None):
    """``(model, processor)`` of an image-text-to-text checkpoint (default: the shipped micro LLaVA)."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from .micro_llava import default_model_path

    path = Path(path) if path is not None else default_model_path()
    if not (Path(path) / "config.json").is_file() and path.exists():
        raise FileNotFoundError(f"--model {path}: no config.json there")
    model = AutoModelForImageTextToText.from_pretrained(str(path), dtype=dtype).eval()
    if device is not None:
        model.to(device)
    return model, AutoProcessor.from_pretrained(str(path))


def chat_prompt(processor, question: str) -> str:
    """The processor's chat template for one user turn: an image, then ``question``."""
    return processor.apply_chat_template([{"role": "user", "content": [
        {"type": "image"}, {"type": "text", "text": question}]}], add_generation_prompt=True)


def prepare_batches(processor, examples: Sequence[Example], batch_size: int) -> list[dict[str, torch.Tensor]]:
    """Processor inputs (chat prompt + image, left padded) for consecutive batches of ``examples``."""
    out = []
    for i in range(0, len(examples), batch_size):
        exs = examples[i:i + batch_size]
        prompts = [chat_prompt(processor, e.question) for e in exs]
        out.append(dict(processor(images=[e.image for e in exs], text=prompts, return_tensors="pt",
                                  padding=True)))
    return out


def _to(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


@torch.inference_mode()
def answer(model: nn.Module, processor, batches: list[dict[str, torch.Tensor]], indices: Sequence[int],
           max_new_tokens: int = 4, on_batch: Callable[[], None] | None = None) -> dict[int, list[str]]:
    """Greedy answers of the batches numbered ``indices``."""
    dev = next(model.parameters()).device
    pad = getattr(processor.tokenizer, "pad_token_id", None)
    out: dict[int, list[str]] = {}
    for i in indices:
        inputs = _to(batches[i], dev)
        gen = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad)
        out[i] = [s.strip() for s in processor.batch_decode(gen[:, inputs["input_ids"].shape[1]:],
                                                            skip_special_tokens=True)]
        if on_batch is not None:
            on_batch()
    return out


@torch.inference_mode()
def prefill_ms(model: nn.Module, batch: dict[str, torch.Tensor], repeats: int = 5, warmup: int = 1) -> float:
    """Median wall time (ms) of one prefill forward (``use_cache=True``, as generate's first step)."""
    dev = next(model.parameters()).device
    inputs = _to(batch, dev)
    times = []
    for r in range(warmup + repeats):
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        t0 = time.perf_counter()
        model(**inputs, use_cache=True)
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        if r >= warmup:
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


# ---------------------------------------------------------------------------------------------------- cost
def _num_visual(batch: dict[str, torch.Tensor], image_token_id: int) -> torch.Tensor:
    return (batch["input_ids"] == image_token_id).sum(1)


def visual_per_layer(handle: Any, n_visual: torch.Tensor, layers: int) -> list[float]:
    """Mean visual tokens per image seen by each decoder layer in the latest prefill under ``handle`` (``None``:
    unpatched, every layer sees ``n_visual``)."""
    mean_in = float(n_visual.float().mean())
    if handle is None:
        return [mean_in] * layers
    red = handle.last
    llm = red.extras.get("llm") if red is not None else None
    if llm:    # pruning inside the language model: tokens entering it, then each stage's output from its layer on
        pre = llm.get("pre_llm")
        counts = [float(pre.mask.sum(1).float().mean()) if pre is not None else mean_in] * layers
        for stage in llm.get("stages", []):
            out = float(np.mean(stage["visual_out"]))
            for layer in range(int(stage["layer"]), layers):
                counts[layer] = out
        return counts
    return [float(red.mask.sum(1).float().mean()) if red is not None else mean_in] * layers


def prefill_cost(config: Any, batch: dict[str, torch.Tensor], visual: list[float],
                 dtype: torch.dtype = torch.float32) -> tuple[float, int]:
    """``(FLOPs, KV bytes)`` per sample of a prefill: tower + projector + language model at the per-layer token
    counts (text tokens of the batch's mean prompt + ``visual[layer]``)."""
    image_id = int(getattr(config, "image_token_id", getattr(config, "image_token_index", -1)))
    n_vis = _num_visual(batch, image_id).float()
    text = float((batch["attention_mask"].sum(1) - n_vis).float().mean())
    lengths = [max(1, round(text + v)) for v in visual]
    flops = llm_prefill_flops(config, lengths) + projector_flops(config, round(float(n_vis.mean())))
    vision = getattr(config, "vision_config", None)
    if vision is not None:
        flops += vit_flops(config)
    return float(flops), int(kv_cache_bytes(config, lengths, dtype=dtype))


# ---------------------------------------------------------------------------------------------------- distributed
def dist_context() -> tuple[int, int]:
    """``(rank, world)``; initialises ``torch.distributed`` (gloo on CPU, nccl on CUDA) under torchrun."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return dist.get_rank(), dist.get_world_size()


def gather_answers(local: dict[int, list[str]], world: int) -> dict[int, list[str]]:
    """Every rank's ``{batch index: answers}`` merged (identity when ``world == 1``)."""
    if world == 1:
        return local
    import torch.distributed as dist

    parts: list[Any] = [None] * world
    dist.all_gather_object(parts, local)
    merged: dict[int, list[str]] = {}
    for p in parts:
        merged.update(p)
    return merged


# ---------------------------------------------------------------------------------------------------- run
def run_bench(model_path: str | Path | None = None, methods: Sequence[str] | None = None,
              keeps: Sequence[str] = DEFAULT_KEEPS, limit: int | None = None, batch_size: int = 50,
              repeats: int = 3, out_dir: str | Path | None = "out/bench", examples: list[Example] | None = None,
              overlays: int = 3, max_new_tokens: int = 4, progress: bool = True, device: str | None = None,
              log: Callable[[str], None] | None = print) -> dict[str, Any]:
    """Run the bench; returns the report dictionary (and writes it to ``out_dir`` on rank 0).

    ``methods``: names (default :func:`default_methods`); ``keeps``: labels as in :func:`parse_keep`;
    ``limit``: first ``limit`` test questions; ``examples``: a question set instead of the shipped test set.
    """
    from ..models import apply
    from .report import write_report

    rank, world = dist_context()
    say = (log or (lambda _m: None)) if rank == 0 else (lambda _m: None)
    if batch_size < 1 or repeats < 1:
        raise ValueError(f"batch_size and repeats must be >= 1, got {batch_size}, {repeats}")
    keep_values = [parse_keep(k) for k in keeps]
    if None not in keep_values:
        keep_values = [None, *keep_values]        # the unpatched reference is always measured
    model, processor = load_model(model_path, device=device)
    names = list(methods) if methods else default_methods(model)
    for n in names:
        get_method(n)
    exs = examples if examples is not None else load_default_test_set()
    if limit is not None:
        if limit < 1:
            raise ValueError(f"limit must be >= 1, got {limit}")
        exs = exs[:limit]
    batches = prepare_batches(processor, exs, batch_size)
    mine = list(range(rank, len(batches), world))
    configs: list[tuple[str, int | float | None]] = [("full", None)] + [
        (n, k) for n in names for k in keep_values if k is not None]
    cfg = model.config
    layers = int(getattr(cfg, "text_config", cfg).num_hidden_layers)
    image_id = int(getattr(cfg, "image_token_id", getattr(cfg, "image_token_index", -1)))
    timing_batch = batches[0]
    n_visual = _num_visual(timing_batch, image_id)
    rows: list[Row] = []
    overlay_data: dict[str, Any] = {}
    say(f"bench: {len(configs)} configurations x {len(exs)} questions ({len(batches)} batches of {batch_size}"
        + (f", {world} processes" if world > 1 else "") + ")")

    bar_cm = _progress(progress and rank == 0)
    t_start = time.perf_counter()
    with bar_cm as bar:
        task = bar.add_task("bench", total=len(configs) * len(mine), info="") if bar is not None else None
        for name, keep in configs:
            label = keep_label(keep)
            if bar is not None:
                bar.update(task, info=f"{name} keep={label}")
            stage = "-" if keep is None else get_method(name).stage
            handle = None
            try:
                if keep is not None:
                    handle = apply(model, name, keep=keep)
                local = answer(model, processor, batches, mine, max_new_tokens,
                               on_batch=(lambda: bar.advance(task)) if bar is not None else None)
                merged = gather_answers(local, world)
                preds = [a for i in range(len(batches)) for a in merged[i]]
                acc = accuracy_by_type(preds, exs)
                ms = prefill_ms(model, timing_batch, repeats) if rank == 0 else None
                visual = visual_per_layer(handle, n_visual, layers)
                flops, kv = prefill_cost(cfg, timing_batch, visual, model.dtype)
                if handle is not None and overlays and handle.last is not None:
                    overlay_data[f"{name}@{label}"] = _first_reductions(handle, int(n_visual[0]), overlays)
                rows.append(Row(name, label, stage, visual[0], float(np.mean(visual)), acc, latency_ms=ms,
                                gflops=flops / 1e9, kv_bytes=kv,
                                predictions=preds))
            except (ValueError, TypeError, NotImplementedError) as err:
                rows.append(Row(name, label, stage, float("nan"), float("nan"), {}, error=str(err)))
                if bar is not None:
                    bar.advance(task, len(mine))
            finally:
                if handle is not None:
                    handle.remove()
    full = rows[0]
    for r in rows:
        if r.accuracy and full.accuracy.get("overall"):
            r.relative = r.accuracy["overall"] / full.accuracy["overall"]
        if r.latency_ms and full.latency_ms:
            r.speedup = full.latency_ms / r.latency_ms
    report = {
        "model": str(model_path) if model_path is not None else "micro_llava (shipped)",
        "questions": len(exs), "qtypes": [t for t in QTYPES if any(e.qtype == t for e in exs)],
        "batch_size": batch_size, "repeats": repeats, "world_size": world,
        "device": str(next(model.parameters()).device),
        "threads": torch.get_num_threads(), "seconds": round(time.perf_counter() - t_start, 1),
        "rows": [asdict(r) for r in rows],
    }
    if rank == 0 and out_dir is not None:
        paths = write_report(report, Path(out_dir), overlay_data=overlay_data, examples=exs[:batch_size])
        report["files"] = [str(p) for p in paths]
        say("wrote " + ", ".join(str(p) for p in paths))
    return report


@torch.inference_mode()
def _first_reductions(handle: Any, n_tokens: int, n: int) -> dict[str, Any]:
    """Kept visual-token indices (and merge groups) of the first ``n`` images of the timing batch."""
    red = handle.last
    k = min(n, red.indices.shape[0])
    return {"indices": red.indices[:k].cpu(), "mask": red.mask[:k].cpu(), "n_tokens": n_tokens,
            "assign": red.assign[:k].cpu() if red.assign is not None else None,
            "llm": [dict(r) for r in getattr(getattr(handle.adapter, "pruner", None), "records", None) or []]}
