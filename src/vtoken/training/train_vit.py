"""Reproducible trainer for the micro ViT classifier on Fashion-MNIST (the encoder-stage methods' test model).

The model is a plain ``transformers.ViTForImageClassification`` (:func:`micro_vit_config`): 28x28 grayscale input,
patch size 2, so 196 patch tokens + CLS = 197 tokens, small width and depth so it trains on a laptop CPU.

Input: ``pixel_values = (image / 255 - 0.5) / 0.5`` as ``float32 [n, 1, 28, 28]`` (:func:`preprocess`), the ViT
image processor's default mean/std of 0.5.

Reproducibility: everything random is derived from ``seed`` without hidden state: the initial weights from
``torch.manual_seed(seed)``, the order of epoch ``e`` from ``SeedSequence([seed, e])``, the augmentation of
batch ``b`` of epoch ``e`` from ``SeedSequence([seed, e, b])``. A run therefore resumes from any checkpoint (model,
optimizer, scheduler, RNG states and step, written atomically to ``<out>/checkpoint.pt`` every
``checkpoint_every`` steps and at the end of every epoch) to the same final weights as an uninterrupted run,
bit-exact on CPU with the same number of threads.

Outputs in ``out_dir``: the final model (``save_pretrained``: ``config.json`` + ``model.safetensors``, loadable
with ``AutoModelForImageClassification.from_pretrained``), ``metrics.json`` (test accuracy, per-epoch history,
arguments, timing) and ``checkpoint.pt``.

CLI: ``python -m vtoken.training.train_vit OUT_DIR --epochs 3 --batch-size 128 --lr 2e-3``.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..bench.common import progress_bar
from ..bench.fashion import CLASS_NAMES, load_fashion
from .common import CHECKPOINT, METRICS, check_resume, pick_device, rng_state, save_atomic, set_rng_state

MEAN = 0.5
STD = 0.5
_CKPT_FORMAT = 1
# arguments that must match for a checkpoint to be resumed
_RUN_KEYS = ("epochs", "batch_size", "lr", "seed", "limit", "weight_decay", "warmup", "augment", "model")


def micro_vit_config(hidden_size: int = 64, num_layers: int = 4, num_heads: int = 4, mlp_ratio: int = 2,
                     **overrides: Any):
    """The micro ViT's ``ViTConfig``: 28x28x1 input, patch 2 (196 patch tokens + CLS), ``num_labels`` 10 with the
    label names of :data:`vtoken.bench.fashion.CLASS_NAMES`. ``overrides`` go to ``ViTConfig``."""
    from transformers import ViTConfig

    kwargs: dict[str, Any] = dict(
        image_size=28, patch_size=2, num_channels=1, hidden_size=hidden_size, num_hidden_layers=num_layers,
        num_attention_heads=num_heads, intermediate_size=mlp_ratio * hidden_size, hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0, qkv_bias=True, num_labels=len(CLASS_NAMES),
        id2label=dict(enumerate(CLASS_NAMES)), label2id={n: i for i, n in enumerate(CLASS_NAMES)},
    )
    kwargs.update(overrides)
    return ViTConfig(**kwargs)


def num_patch_tokens(config) -> int:
    """Patch tokens the config gives (CLS excluded)."""
    return (config.image_size // config.patch_size) ** 2


def preprocess(images: np.ndarray | torch.Tensor) -> torch.Tensor:
    """``uint8 [n, 28, 28]`` images -> ``float32 [n, 1, 28, 28]`` pixel values, ``(x / 255 - 0.5) / 0.5``."""
    x = torch.as_tensor(np.array(images, copy=True)).float().div_(255.0)
    return x.sub_(MEAN).div_(STD).unsqueeze(1)


def augment_batch(images: np.ndarray, rng: np.random.Generator, shift: int = 2) -> np.ndarray:
    """Light augmentation of ``uint8 [n, h, w, ...]`` (trailing channel axes allowed): random horizontal flip
    (p=0.5) and a random translation of up to ``shift`` px (zero padding), per image, drawn from ``rng``."""
    n, h, w = images.shape[:3]
    flip = rng.random(n) < 0.5
    dy = rng.integers(-shift, shift + 1, n)
    dx = rng.integers(-shift, shift + 1, n)
    src = np.where(flip.reshape(-1, *[1] * (images.ndim - 1)), images[:, :, ::-1], images)
    padded = np.zeros((n, h + 2 * shift, w + 2 * shift, *images.shape[3:]), images.dtype)
    padded[:, shift:shift + h, shift:shift + w] = src
    rows = (shift + dy)[:, None] + np.arange(h)                                  # [n, h]
    cols = (shift + dx)[:, None] + np.arange(w)                                  # [n, w]
    return padded[np.arange(n)[:, None, None], rows[:, :, None], cols[:, None, :]]


@torch.no_grad()
def evaluate(model: nn.Module, images: np.ndarray, labels: np.ndarray, batch_size: int = 256,
             device: str | torch.device | None = None) -> float:
    """Top-1 accuracy of ``model`` on ``uint8 [n, 28, 28]`` ``images`` / ``int [n]`` ``labels``."""
    if len(images) == 0:
        raise ValueError("no images to evaluate")
    device = torch.device(device) if device is not None else next(model.parameters()).device
    was_training = model.training
    model.eval()
    correct = 0
    for i in range(0, len(images), batch_size):
        x = preprocess(images[i:i + batch_size]).to(device)
        pred = model(pixel_values=x).logits.argmax(-1).cpu().numpy()
        correct += int((pred == np.asarray(labels[i:i + batch_size])).sum())
    model.train(was_training)
    return correct / len(images)


def train_vit(out_dir: str | Path, epochs: int = 3, batch_size: int = 128, lr: float = 2e-3, seed: int = 0,
              root: str | Path | None = None, limit: int | None = None, resume: bool = True,
              device: str | torch.device | None = None, *, config=None, weight_decay: float = 0.05,
              warmup: float = 0.05, augment: bool = True, checkpoint_every: int = 500, eval_batch_size: int = 512,
              eval_every_epoch: bool = True, stop_after: int | None = None, progress: bool = True,
              data: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray] | None = None,
              log: Callable[[str], None] | None = print) -> dict:
    """Train the micro ViT on Fashion-MNIST and save it to ``out_dir``; returns the metrics dictionary (also in
    ``<out_dir>/metrics.json``).

    ``limit``: use only the first ``limit`` training and test images. ``resume``: continue from
    ``<out_dir>/checkpoint.pt`` when it exists (its run arguments must match). ``device``: default CUDA when
    available. ``config``: a ``ViTConfig`` (default :func:`micro_vit_config`). ``warmup``: fraction of the steps
    with a linear warm-up before the cosine decay (AdamW; ``weight_decay`` on the >= 2-d weights of the encoder and
    classifier, none on biases, norms and the embeddings; gradients clipped to norm 1). ``stop_after``: stop (after
    checkpointing) once this many steps are done, without saving the final model, e.g. to split a run into parts;
    the metrics then have ``"finished": False``. ``data``: ``(train_images, train_labels, test_images,
    test_labels)`` instead of reading Fashion-MNIST (``uint8 [n, 28, 28]``, ``int [n]``).
    """
    from transformers import ViTForImageClassification, get_cosine_schedule_with_warmup

    if epochs < 1 or batch_size < 1:
        raise ValueError(f"epochs and batch_size must be >= 1, got {epochs}, {batch_size}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    say = log or (lambda _msg: None)
    dev = pick_device(device)

    if data is None:
        tr_x, tr_y = load_fashion("train", root)
        te_x, te_y = load_fashion("test", root)
    else:
        tr_x, tr_y, te_x, te_y = data
    if limit is not None:
        tr_x, tr_y, te_x, te_y = tr_x[:limit], tr_y[:limit], te_x[:limit], te_y[:limit]
    tr_x, te_x = np.asarray(tr_x, np.uint8), np.asarray(te_x, np.uint8)
    tr_y, te_y = np.asarray(tr_y, np.int64), np.asarray(te_y, np.int64)

    cfg = config if config is not None else micro_vit_config()
    run = {"epochs": epochs, "batch_size": batch_size, "lr": lr, "seed": seed, "limit": limit,
           "weight_decay": weight_decay, "warmup": warmup, "augment": augment, "model": cfg.to_diff_dict()}
    run = json.loads(json.dumps(run))  # the form it takes in a checkpoint (int keys -> str)
    steps_per_epoch = -(-len(tr_x) // batch_size)
    total = epochs * steps_per_epoch

    torch.manual_seed(seed)
    model = ViTForImageClassification(cfg).to(dev)
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "embeddings" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "embeddings" not in n)]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=lr, betas=(0.9, 0.999))
    scheduler = get_cosine_schedule_with_warmup(optimizer, round(warmup * total), total)
    step, history, seconds = 0, [], 0.0

    ckpt_path = out / CHECKPOINT
    if resume and ckpt_path.is_file():
        ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=False)
        check_resume(ckpt.get("run", {}), run, _RUN_KEYS, ckpt_path)
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        set_rng_state(ckpt["rng"])
        step, history, seconds = ckpt["step"], ckpt["history"], ckpt["seconds"]
        say(f"resumed from {ckpt_path} at step {step}/{total}")

    def checkpoint() -> None:
        save_atomic({"format": _CKPT_FORMAT, "run": run, "step": step, "history": history,
                      "seconds": seconds + time.perf_counter() - t0, "model": model.state_dict(),
                      "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                      "rng": rng_state()}, ckpt_path)

    loss_fn = nn.CrossEntropyLoss()
    model.train()
    t0 = time.perf_counter()
    epoch_t0 = t0
    stop = total if stop_after is None else min(total, stop_after)
    with progress_bar(progress) as bar:
        task = bar.add_task("train", total=total, completed=step, info="") if bar is not None else None
        while step < stop:
            epoch, b = divmod(step, steps_per_epoch)
            order = np.random.default_rng(np.random.SeedSequence([seed, epoch])).permutation(len(tr_x))
            idx = np.sort(order[b * batch_size:(b + 1) * batch_size])
            xb = tr_x[idx]
            if augment:
                xb = augment_batch(xb, np.random.default_rng(np.random.SeedSequence([seed, epoch, b])))
            x = preprocess(xb).to(dev)
            y = torch.from_numpy(tr_y[idx]).to(dev)
            loss = loss_fn(model(pixel_values=x).logits, y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            scheduler.step()
            step += 1
            if bar is not None:
                bar.update(task, completed=step, info=f"epoch {epoch + 1}/{epochs} loss {loss.item():.3f}")
            end_of_epoch = step % steps_per_epoch == 0
            if end_of_epoch:
                entry = {"epoch": epoch + 1, "step": step, "loss": round(loss.item(), 5),
                         "seconds": round(time.perf_counter() - epoch_t0, 2)}
                if eval_every_epoch:
                    entry["test_accuracy"] = evaluate(model, te_x, te_y, eval_batch_size, dev)
                history.append(entry)
                say(f"epoch {epoch + 1}/{epochs}: " + ", ".join(f"{k} {v}" for k, v in entry.items() if k != "epoch"))
                epoch_t0 = time.perf_counter()
            if end_of_epoch or step % checkpoint_every == 0 or step == stop:
                checkpoint()

    finished = step >= total
    metrics: dict[str, Any] = {"finished": finished, "step": step, "total_steps": total,
                               "steps_per_epoch": steps_per_epoch, "train_images": len(tr_x),
                               "test_images": len(te_x), "history": history, "device": str(dev),
                               "torch_threads": torch.get_num_threads(),
                               "seconds": round(seconds + time.perf_counter() - t0, 2), "run": run,
                               "preprocess": {"mean": MEAN, "std": STD, "scale": 1 / 255}}
    if finished:
        acc = history[-1]["test_accuracy"] if history and "test_accuracy" in history[-1] else \
            evaluate(model, te_x, te_y, eval_batch_size, dev)
        metrics["test_accuracy"] = acc
        model.save_pretrained(out)
        say(f"test accuracy {acc:.4f}; model saved to {out}")
    (out / METRICS).write_text(json.dumps(metrics, indent=2) + "\n")
    return metrics


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="Train the micro ViT classifier on Fashion-MNIST.")
    p.add_argument("out_dir")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--root", default=None, help="Fashion-MNIST directory (default: Debian package / env)")
    p.add_argument("--limit", type=int, default=None)
    p.add_argument("--no-resume", action="store_true")
    p.add_argument("--device", default=None)
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--mlp-ratio", type=int, default=2)
    p.add_argument("--no-augment", action="store_true")
    p.add_argument("--checkpoint-every", type=int, default=500)
    p.add_argument("--stop-after", type=int, default=None)
    a = p.parse_args(argv)
    cfg = micro_vit_config(a.hidden, a.layers, a.heads, a.mlp_ratio)
    m = train_vit(a.out_dir, a.epochs, a.batch_size, a.lr, a.seed, a.root, a.limit, not a.no_resume, a.device,
                  config=cfg, augment=not a.no_augment, checkpoint_every=a.checkpoint_every,
                  stop_after=a.stop_after)
    print(json.dumps({k: m[k] for k in ("finished", "step", "test_accuracy", "seconds") if k in m}))


if __name__ == "__main__":
    main()
