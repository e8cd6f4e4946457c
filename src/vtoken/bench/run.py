"""``vtoken bench``: methods x budgets on a VLM, measured end to end through :func:`vtoken.apply`.

For every method and ``keep`` the model is patched, the test questions are answered with greedy ``generate``
(exact match per question type, :func:`~vtoken.bench.fashion.accuracy_by_type`), and a fixed batch is timed as a
prefill (median over repeats). Analytic FLOPs (vision tower + projector + language model, per-layer token counts
for pruning inside the language model) and KV-cache bytes come from :mod:`vtoken.bench.cost` at the token counts
the model actually saw. ``keep="all"`` is the unpatched model, the reference for relative accuracy and speedup.

Data parallel: under ``torchrun`` (``WORLD_SIZE > 1``) each rank answers every ``world``-th batch and the
predictions are gathered to every rank in the single-process order, so the merged results equal a single-process
run; rank 0 times the prefill and writes the report.

Resume: as each configuration finishes, rank 0 appends its row to ``<out>/partial.jsonl``, keyed by the model (its
folder and files), the questions and every setting that changes a row (limit, batch size, repeats, overlays,
device, generated tokens). A rerun with the same ``--out`` and settings reuses those rows and computes only the
rest; ``resume=False`` (``--fresh``) recomputes everything. Input is checked, and ``--out`` is probed for writing,
before the model loads.
"""

from __future__ import annotations

import hashlib
import json
import os
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..methods import all_methods, get_method
from .common import default_model_path, progress_bar
from .cost import kv_cache_bytes, llm_prefill_flops, projector_flops, vit_flops
from .errors import UsageError, user_input
from .fashion import QTYPES, Example, accuracy_by_type, load_default_test_set
from .vqa import answer, prepare_batches, to_device

DEFAULT_KEEPS = ("all", "0.5", "0.25", "0.11")
#: stages a default run covers on an image VLM (video methods are for frames, encoder methods for ViT classifiers)
DEFAULT_STAGES = ("pre_llm", "llm")
#: the file in ``out_dir`` that holds each finished configuration (one JSON object a line)
PARTIAL = "partial.jsonl"


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
    frame_counts: list[float] | None = None  # video: mean tokens kept per time step of a clip


# ---------------------------------------------------------------------------------------------------- parsing
def parse_keep(text: str) -> int | float | None:
    """vtoken's one ``--keep`` grammar (``vtoken bench``, ``show``, ``demo``, ``benchmarks/prefill.py``):
    ``"all"`` -> None, ``"64"`` -> 64 (an int count >= 1), ``"0.25"`` / ``"25%"`` -> 0.25 (a ratio in (0, 1]);
    a ``ValueError`` naming ``text`` otherwise."""
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
def resolve_model(path: str | Path | None, allow_download: bool = False) -> tuple[str, bool]:
    """``(source, local)``: the model folder to load (default: the shipped micro LLaVA) and whether it is local.

    Without ``allow_download`` only an existing folder with a ``config.json`` is accepted (a ``FileNotFoundError``
    that says so otherwise, before anything is imported or requested); with it, a path that does not exist is taken
    as a Hugging Face hub id."""
    if path is None:
        folder = default_model_path()
        if not (folder / "config.json").is_file():
            raise FileNotFoundError(f"no bundled micro LLaVA at {folder} (config.json missing); train one with "
                                    "`vtoken train-micro --install` or pass --model FOLDER")
        return str(folder), True
    folder = Path(path).expanduser()
    if folder.exists():
        if not folder.is_dir():
            raise FileNotFoundError(f"--model {path}: a file, not a model folder; pass the folder save_pretrained "
                                    "wrote (with config.json)")
        if not (folder / "config.json").is_file():
            raise FileNotFoundError(f"--model {path}: no config.json there; pass the folder save_pretrained wrote")
        return str(folder), True
    if allow_download:
        return str(path), False
    raise FileNotFoundError(f"--model {path}: no such folder; pass a local model folder (with config.json), or add "
                            "--allow-download to fetch it as a Hugging Face hub id")


@contextmanager
def hub_offline(enabled: bool = True) -> Iterator[None]:
    """Offline Hugging Face hub for the block only: ``HF_HUB_OFFLINE`` / ``TRANSFORMERS_OFFLINE`` set and
    huggingface_hub's offline flag (read once, at its import) raised, all restored on exit."""
    if not enabled:
        yield
        return
    names = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
    saved = {k: os.environ.get(k) for k in names}
    try:
        from huggingface_hub import constants as hub
    except ImportError:  # pragma: no cover - transformers depends on it
        hub = None
    flag = getattr(hub, "HF_HUB_OFFLINE", None)
    os.environ.update(dict.fromkeys(names, "1"))
    if isinstance(flag, bool):
        hub.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        if isinstance(flag, bool):
            hub.HF_HUB_OFFLINE = flag


def load_model(path: str | Path | None, dtype: torch.dtype = torch.float32, device: str | None = None,
               allow_download: bool = False):
    """``(model, processor)`` of an image-text-to-text checkpoint (default: the shipped micro LLaVA).

    A local folder loads with ``local_files_only`` and the hub offline; only ``allow_download`` lets a hub id
    through (see :func:`resolve_model`). A folder transformers cannot load is a :class:`~.errors.UsageError`."""
    source, local = resolve_model(path, allow_download)
    from transformers import AutoModelForImageTextToText, AutoProcessor

    try:
        with hub_offline(local):
            model = AutoModelForImageTextToText.from_pretrained(source, dtype=dtype, local_files_only=local).eval()
            processor = AutoProcessor.from_pretrained(source, local_files_only=local)
    except (OSError, ValueError) as err:
        raise UsageError(f"--model {path if path is not None else source}: cannot load it as an image-text-to-text "
                         f"model ({type(err).__name__}: {err})") from err
    if device is not None:
        with user_input(f"--device {device}"):
            model.to(device)
    return model, processor


def check_device(device: str | torch.device | None, arg: str = "--device") -> torch.device | None:
    """``device`` as a ``torch.device`` that exists here (``None`` stays ``None``); a
    :class:`~.errors.UsageError` naming ``arg`` otherwise."""
    if device is None:
        return None
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError, TypeError) as err:
        raise UsageError(f"{arg} {device!r}: not a torch device ({err}); e.g. cpu, cuda, cuda:1") from None
    if dev.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0 or (dev.index is not None and dev.index >= count):
            raise UsageError(f"{arg} {device}: this machine has {count} CUDA device(s); use cpu"
                             + (f" or cuda:0..cuda:{count - 1}" if count else ""))
    elif dev.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise UsageError(f"{arg} {device}: no MPS device here; use cpu")
    return dev


def writable_dir(path: str | Path, arg: str = "--out") -> Path:
    """``path`` as a folder that exists and takes a new file (created and probed); a :class:`~.errors.UsageError`
    naming ``arg`` otherwise."""
    folder = Path(path).expanduser()
    if folder.exists() and not folder.is_dir():
        raise UsageError(f"{arg} {path}: a file, not a folder; give a folder to write into")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".vtoken-probe-", dir=folder)
        os.close(fd)
        os.unlink(probe)
    except OSError as err:
        raise UsageError(f"{arg} {path}: cannot write there ({err.strerror or err}); give a folder you can "
                         "write to") from err
    return folder


@torch.inference_mode()
def prefill_ms(model: nn.Module, batch: dict[str, torch.Tensor], repeats: int = 5, warmup: int = 1) -> float:
    """Median wall time (ms) of one prefill forward (``use_cache=True``, as generate's first step)."""
    dev = next(model.parameters()).device
    inputs = to_device(batch, dev)
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


def broadcast(obj: Any, world: int) -> Any:
    """Rank 0's ``obj`` on every rank (identity when ``world == 1``)."""
    if world == 1:
        return obj
    import torch.distributed as dist

    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


# ---------------------------------------------------------------------------------------------------- resume
def model_fingerprint(source: str) -> list[Any]:
    """What identifies a model's weights: its folder's files (name, size, mtime), or the hub id itself."""
    folder = Path(source)
    if not folder.is_dir():
        return [source]
    return [str(folder.resolve()), *([f.name, f.stat().st_size, f.stat().st_mtime_ns]
                                     for f in sorted(folder.iterdir()) if f.is_file())]


def examples_fingerprint(examples: Sequence[Example]) -> str:
    """A digest of the questions, answers and images."""
    h = hashlib.sha256()
    for e in examples:
        h.update(f"{e.qtype}\0{e.question}\0{e.answer}\0".encode())
        h.update(np.ascontiguousarray(e.image).tobytes())
    return h.hexdigest()


def _canonical(key: dict[str, Any]) -> str:
    return json.dumps(key, sort_keys=True, default=str)


def read_partial(path: Path, keys: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """The records of ``path`` (one JSON object a line) whose key is one of ``keys`` (``{config: key}``), by config
    (the last record wins; a line cut short by an interruption is ignored)."""
    wanted = {_canonical(k): name for name, k in keys.items()}
    found: dict[str, dict[str, Any]] = {}
    if not path.is_file():
        return found
    for line in path.read_text().splitlines():
        try:
            rec = json.loads(line)
            name = wanted.get(_canonical(rec["key"]))
        except (ValueError, KeyError, TypeError):
            continue
        if name is not None and isinstance(rec.get("row"), dict):
            found[name] = rec
    return found


def append_partial(path: Path, record: dict[str, Any]) -> None:
    """Append one record to ``path`` and flush it to disk."""
    with path.open("a") as f:
        f.write(json.dumps(record) + "\n")
        f.flush()
        os.fsync(f.fileno())


def _overlay_to_json(data: dict[str, Any] | None) -> dict[str, Any] | None:
    if data is None:
        return None
    return {"indices": data["indices"].tolist(), "mask": data["mask"].tolist(), "n_tokens": data["n_tokens"],
            "assign": data["assign"].tolist() if data["assign"] is not None else None, "llm": data.get("llm", [])}


def _overlay_from_json(data: dict[str, Any] | None) -> dict[str, Any] | None:
    if data is None:
        return None
    return {"indices": torch.tensor(data["indices"], dtype=torch.long),
            "mask": torch.tensor(data["mask"], dtype=torch.bool), "n_tokens": int(data["n_tokens"]),
            "assign": torch.tensor(data["assign"], dtype=torch.long) if data["assign"] is not None else None,
            "llm": list(data.get("llm", []))}


# ---------------------------------------------------------------------------------------------------- run
def check_methods(names: Sequence[str]) -> list[str]:
    """The registry names of ``names`` (duplicates dropped); a :class:`~.errors.UsageError` for an unknown one."""
    out: list[str] = []
    for n in names:
        with user_input("--methods"):
            name = get_method(n).name
        if name not in out:
            out.append(name)
    return out


def check_keeps(keeps: Sequence[str]) -> list[int | float | None]:
    """The budgets of the ``keeps`` labels, the unpatched reference (``None``) first, duplicates dropped."""
    if isinstance(keeps, (str, int, float)):
        keeps = [keeps]  # type: ignore[list-item]
    values: list[int | float | None] = [None]
    for k in keeps:
        with user_input("--keep"):
            v = parse_keep(k)
        if keep_label(v) not in {keep_label(x) for x in values}:
            values.append(v)
    return values


def check_out_dir(out_dir: str | Path | None, rank: int, world: int) -> None:
    """Rank 0 probes ``out_dir`` for writing (:func:`writable_dir`); every rank raises its
    :class:`~.errors.UsageError` (so no rank is left waiting on the others)."""
    problem = None
    if rank == 0 and out_dir is not None:
        try:
            writable_dir(out_dir)
        except UsageError as err:
            problem = str(err)
    problem = broadcast(problem, world)
    if problem:
        raise UsageError(problem)


def resume_state(partial: Path | None, configs: Sequence[tuple[str, int | float | None]], resume: bool, world: int,
                 settings: Callable[[], dict[str, Any]]) -> tuple[dict[str, dict[str, Any]], dict[str, Any]]:
    """``(keys, done)``: each configuration's ``partial.jsonl`` key (``settings()`` plus method and keep) and the
    records already there (``resume``; otherwise the file is restarted), rank 0's view broadcast to every rank."""
    keys: dict[str, dict[str, Any]] = {}
    done: dict[str, Any] = {}
    if partial is not None:
        base = settings()
        keys = {f"{n}@{keep_label(k)}": {**base, "method": n, "keep": keep_label(k)} for n, k in configs}
        if resume:
            done = read_partial(partial, keys)
        elif partial.exists():
            partial.unlink()
    return keys, broadcast(done, world)


def run_configs(model: nn.Module, configs: Sequence[tuple[str, int | float | None]], done: dict[str, Any],
                measure: Callable[..., tuple[Row, Any]], *, bar: Any, label: str, units: int, partial: Path | None,
                keys: dict[str, dict[str, Any]], extra: str, to_json: Callable[[Any], Any] = lambda x: x,
                from_json: Callable[[Any], Any] = lambda x: x) -> tuple[list[Row], dict[str, Any]]:
    """The loop both benches share: for each ``(method, keep)`` (``keep=None``: the unpatched model, first) reuse
    its finished row from ``done`` or patch the model, ``measure(name, keep, stage, handle, advance)`` it
    (``advance`` moves the progress bar by one of the config's ``units``; returns the row and an ``extra`` artifact
    such as overlay data) and remove the patch; a ``ValueError``/``TypeError``/``NotImplementedError`` becomes an
    error row. Finished rows (not errors: they are cheap to find again) are appended to ``partial`` under
    ``keys``. Relative accuracy and speedup are set against the first row. Returns the rows and the artifacts by
    ``method@keep``."""
    from ..models import apply

    rows: list[Row] = []
    extras: dict[str, Any] = {}
    task = bar.add_task(label, total=len(configs) * units, info="") if bar is not None else None
    advance = (lambda: bar.advance(task)) if bar is not None else None
    for name, keep in configs:
        config = f"{name}@{keep_label(keep)}"
        if config in done:
            rows.append(Row(**done[config]["row"]))
            if done[config].get(extra) is not None:
                extras[config] = from_json(done[config][extra])
            if bar is not None:
                bar.advance(task, units)
            continue
        if bar is not None:
            bar.update(task, info=f"{name} keep={keep_label(keep)}")
        stage = "-" if keep is None else get_method(name).stage
        handle = None
        try:
            if keep is not None:
                handle = apply(model, name, keep=keep)
            row, artifact = measure(name, keep, stage, handle, advance)
            rows.append(row)
            if artifact is not None:
                extras[config] = artifact
        except (ValueError, TypeError, NotImplementedError) as err:
            rows.append(Row(name, keep_label(keep), stage, float("nan"), float("nan"), {}, error=str(err)))
            if bar is not None:
                bar.advance(task, units)
        finally:
            if handle is not None:
                handle.remove()
        if partial is not None and rows[-1].error is None:
            append_partial(partial, {"key": keys[config], "row": asdict(rows[-1]),
                                     extra: to_json(extras.get(config))})
    full = rows[0]
    for r in rows:
        if r.accuracy and full.accuracy.get("overall"):
            r.relative = r.accuracy["overall"] / full.accuracy["overall"]
        if r.latency_ms and full.latency_ms:
            r.speedup = full.latency_ms / r.latency_ms
    return rows, extras


def run_bench(model_path: str | Path | None = None, methods: Sequence[str] | None = None,
              keeps: Sequence[str] = DEFAULT_KEEPS, limit: int | None = None, batch_size: int = 50,
              repeats: int = 3, out_dir: str | Path | None = "out/bench", examples: list[Example] | None = None,
              overlays: int = 3, max_new_tokens: int = 4, progress: bool = True, device: str | None = None,
              log: Callable[[str], None] | None = print, allow_download: bool = False,
              resume: bool = True) -> dict[str, Any]:
    """Run the bench; returns the report dictionary (and writes it to ``out_dir`` on rank 0).

    ``methods``: names (default :func:`default_methods`); ``keeps``: labels as in :func:`parse_keep`;
    ``limit``: first ``limit`` test questions; ``examples``: a question set instead of the shipped test set;
    ``allow_download``: let ``model_path`` be a hub id (default: a local folder only, no network);
    ``resume``: reuse the configurations ``out_dir/partial.jsonl`` holds for the same model, data and settings.

    Every argument, the model folder and ``out_dir`` (created, probed for writing) are checked before the model
    loads; bad ones raise :class:`~.errors.UsageError` (a ``ValueError``) or ``FileNotFoundError``.
    """
    from ..models import find_adapter
    from .report import write_report

    rank, world = dist_context()
    say = (log or (lambda _m: None)) if rank == 0 else (lambda _m: None)
    for arg, value, low in (("--batch-size", batch_size, 1), ("--repeats", repeats, 1), ("--limit", limit, 1),
                            ("--overlays", overlays, 0), ("max_new_tokens", max_new_tokens, 1)):
        if value is None and arg == "--limit":  # no limit: every question
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise UsageError(f"{arg} must be an integer >= {low}, got {value!r}")
    keep_values = check_keeps(keeps)
    requested = check_methods(methods) if methods else None
    check_device(device)
    source, _ = resolve_model(model_path, allow_download)
    model_arg = f"--model {model_path if model_path is not None else source}"
    check_out_dir(out_dir, rank, world)
    exs = examples if examples is not None else load_default_test_set()
    if limit is not None:
        exs = exs[:limit]
    if not exs:
        raise UsageError("no questions to answer (empty example set)")

    model, processor = load_model(model_path, device=device, allow_download=allow_download)
    with user_input(model_arg):
        adapter = find_adapter(model)
    if requested is None:
        names = default_methods(model)
        if not names:
            raise UsageError(f"{model_arg}: no registered method of the stages {DEFAULT_STAGES} runs on "
                             f"{type(model).__name__}; name some with --methods")
    else:
        names = requested
        why = {n: adapter.unsupported(get_method(n)) for n in names}
        if all(why.values()):
            raise UsageError(f"--methods: none of them can run on {type(model).__name__}: "
                             + "; ".join(f"{n}: {w}" for n, w in why.items()) + " (`vtoken methods` lists which "
                             "family runs which method)")
        for n, w in why.items():
            if w:
                say(f"bench: {n} cannot run on {type(model).__name__}, its rows will say why: {w}")
    batches = prepare_batches(processor, exs, batch_size)
    mine = list(range(rank, len(batches), world))
    configs: list[tuple[str, int | float | None]] = [("full", None)] + [
        (n, k) for n in names for k in keep_values if k is not None]
    cfg = model.config
    layers = int(getattr(cfg, "text_config", cfg).num_hidden_layers)
    image_id = int(getattr(cfg, "image_token_id", getattr(cfg, "image_token_index", -1)))
    timing_batch = batches[0]
    n_visual = _num_visual(timing_batch, image_id)
    partial = Path(out_dir) / PARTIAL if rank == 0 and out_dir is not None else None
    keys, done = resume_state(partial, configs, resume, world, lambda: {
        "model": model_fingerprint(source), "data": examples_fingerprint(exs), "questions": len(exs),
        "limit": limit, "batch_size": batch_size, "repeats": repeats, "overlays": overlays,
        "max_new_tokens": max_new_tokens, "device": str(next(model.parameters()).device), "dtype": str(model.dtype)})
    say(f"bench: {len(configs)} configurations x {len(exs)} questions ({len(batches)} batches of {batch_size}"
        + (f", {world} processes" if world > 1 else "") + ")")
    if done:
        say(f"bench: resuming, {len(done)} of {len(configs)} configurations already in {partial} "
            "(--fresh recomputes them)")

    def measure(name: str, keep: int | float | None, stage: str, handle: Any,
                advance: Callable[[], None] | None) -> tuple[Row, Any]:
        local = answer(model, processor, batches, mine, max_new_tokens, on_batch=advance)
        merged = gather_answers(local, world)
        preds = [a for i in range(len(batches)) for a in merged[i]]
        acc = accuracy_by_type(preds, exs)
        ms = prefill_ms(model, timing_batch, repeats) if rank == 0 else None
        visual = visual_per_layer(handle, n_visual, layers)
        flops, kv = prefill_cost(cfg, timing_batch, visual, model.dtype)
        overlay = _first_reductions(handle, int(n_visual[0]), overlays) if (
            handle is not None and overlays and handle.last is not None) else None
        return Row(name, keep_label(keep), stage, visual[0], float(np.mean(visual)), acc, latency_ms=ms,
                   gflops=flops / 1e9, kv_bytes=kv, predictions=preds), overlay

    t_start = time.perf_counter()
    with progress_bar(progress and rank == 0) as bar:
        rows, overlay_data = run_configs(model, configs, done, measure, bar=bar, label="bench", units=len(mine),
                                         partial=partial, keys=keys, extra="overlay", to_json=_overlay_to_json,
                                         from_json=_overlay_from_json)
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
            "llm": [{key: stage[key] for key in ("layer", "method", "visual_in", "visual_out")}
                    for stage in (red.extras.get("llm") or {}).get("stages", [])]}
