"""Reproducible trainer for the micro video VLM on Fashion clips (``vtoken bench --suite video``'s model).

The image model's recipe (:mod:`vtoken.training.train_llava`), for clips:

1. **Tower** (``tower_steps``): Qwen2.5-VL's vision tower and its patch merger learn to see the frames with dense
   supervision: every merged token predicts what its cell holds at its time step (empty or one of 10 classes) through
   a linear head (discarded afterwards). A batch is one random time step (one temporal patch) of each of
   ``tower_batch`` clips: many different collages a step rather than the correlated steps of a few clips. The
   test clips' cells are read back every 200 steps (``test_cell_acc``: occupied cells, each by the majority of its
   tokens).
2. **Language model** (``lm_steps``): the tower's blocks are frozen; its patch merger (the projector between tower
   and language model: Qwen has no other) and the language model learn to answer. A training sequence is one clip
   followed by every question it was drawn with (:func:`~vtoken.bench.clips.make_clips`, up to 7 types), each turn
   attending to the clip and to itself only, at the M-RoPE positions a single-turn prompt has (``get_rope_index``
   of the model): one pass trains several single-turn examples. Scored every ``eval_every`` steps by teacher
   forcing on a subset of the shipped test clips (every answer is one word, so the argmax at the prompt's end is
   greedy decoding's answer).

Everything random derives from ``seed`` (batch ``s`` of stage ``k`` from ``SeedSequence([seed, k, s])``), so a run
resumes from ``<out>/checkpoint.pt`` to the same weights; ``<out>/tower.pt`` keeps stage 1. Outputs in ``out_dir``:
the model (:func:`~vtoken.training.micro_video.save_micro_video`: ``config.json``, ``model.safetensors``, tokenizer
with the chat template, processor configs) and ``metrics.json`` (greedy ``generate`` accuracy per question type on
the shipped test clips, their majority baseline, history, arguments, timing).

CLI: ``python -m vtoken.training.train_video OUT_DIR``; ``vtoken train-micro --only video``.
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
import torch.nn.functional as F
from torch import Tensor, nn

from ..bench import clips as C
from ..bench.common import progress_bar
from ..bench.videoqa import (
    GRID,
    IM_END,
    IM_START,
    MERGE,
    PAD_ID,
    VIDEO_ID,
    VISION_END,
    VISION_START,
    MicroVideoProcessor,
    video_pixels,
)
from .common import CHECKPOINT, METRICS, check_resume, pick_device, rng_state, save_atomic, set_rng_state
from .micro_video import build_model, build_tokenizer, micro_video_config, save_micro_video

TOWER = "tower.pt"
_STAGES = ("tower", "lm")
_EMPTY = len(C.CLASS_NAMES)
_RUN_KEYS = ("seed", "clips", "tower_steps", "tower_batch", "tower_lr", "lm_steps", "lm_batch", "lm_lr", "model")
_TOWER_KEYS = ("seed", "clips", "tower_steps", "tower_batch", "tower_lr", "vision")


def token_labels(spec: C.ClipSpec, per_side: int) -> Tensor:
    """``[steps * per_side^2]`` long: what the cell of each merged token holds at its step (class id, 10 empty), in
    the tower's token order (step, row, column)."""
    cells = np.stack([spec.cells_at(s) for s in range(spec.steps)]).reshape(-1)          # [(step, cell)]
    lab = cells[_token_cells(spec, per_side).numpy()]
    return torch.as_tensor(np.where(lab >= 0, lab, _EMPTY))


def clip_features(model: nn.Module, frames: list[np.ndarray]) -> tuple[Tensor, Tensor]:
    """The tower's merged features ``[n, T * 81, D]`` of clips (in the model's token order) and their grids."""
    pixels, grids = zip(*(video_pixels(f) for f in frames), strict=True)
    dev = next(model.parameters()).device
    grid = torch.stack(grids).to(dev)
    out = model.model.get_video_features(pixel_values_videos=torch.cat(pixels).to(dev), video_grid_thw=grid)
    feats = out.pooler_output if hasattr(out, "pooler_output") else out
    return torch.stack(list(feats)), grid


class Sequences:
    """Token ids, 4-D masks and M-RoPE positions of training sequences: a clip then isolated question turns."""

    def __init__(self, model: nn.Module, tokens_per_clip: int) -> None:
        self.tok = build_tokenizer()
        self.model = model
        self.prefix = [IM_START, *self.ids("user"), VISION_START, *[VIDEO_ID] * tokens_per_clip, VISION_END]
        self.assistant = [IM_END, IM_START, *self.ids("assistant")]
        self._cache: dict[str, list[int]] = {}

    def ids(self, text: str) -> list[int]:
        return self.tok(text, add_special_tokens=False)["input_ids"]

    def cached(self, text: str) -> list[int]:
        if text not in self._cache:
            self._cache[text] = self.ids(text)
        return self._cache[text]

    def prefix_positions(self, grid: Tensor) -> Tensor:
        """``[3, n, len(prefix)]`` M-RoPE positions of the prefix, from the model's own ``get_rope_index``."""
        n = grid.shape[0]
        ids = torch.tensor([[*self.prefix, IM_END]]).expand(n, -1)
        pos, _ = self.model.model.get_rope_index(ids.to(grid.device), (2 * (ids == VIDEO_ID).int()).to(grid.device),
                                                 video_grid_thw=grid,
                                                 second_per_grid_ts=torch.ones(n, device=grid.device))
        return pos[:, :, :len(self.prefix)]

    def batch(self, turns: list[list[tuple[str, str]]], grid: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """``(input_ids, labels, mask [n, 1, L, L] bool, position_ids [3, n, L])`` for clips with their ``(question,
        answer)`` turns, right-padded; labels are each turn's answer and ``<|im_end|>``."""
        seqs = []
        for qa in turns:
            ids, labels, turn = list(self.prefix), [-100] * len(self.prefix), [0] * len(self.prefix)
            for j, (q, a) in enumerate(qa):
                prompt, reply = self.cached(q) + self.assistant, [*self.cached(a), IM_END]
                ids += prompt + reply
                labels += [-100] * len(prompt) + reply
                turn += [j + 1] * (len(prompt) + len(reply))
            seqs.append((ids, labels, turn))
        n, length, head = len(seqs), max(len(s[0]) for s in seqs), len(self.prefix)
        ids = torch.full((n, length), PAD_ID, dtype=torch.long)
        labels = torch.full((n, length), -100, dtype=torch.long)
        turn = torch.full((n, length), -1, dtype=torch.long)
        for b, (s, lab, t) in enumerate(seqs):
            ids[b, :len(s)], labels[b, :len(s)], turn[b, :len(s)] = torch.tensor(s), torch.tensor(lab), torch.tensor(t)
        idx = torch.arange(length)
        causal = idx[:, None] >= idx[None, :]
        key_ok = (turn[:, None, :] == 0) | (turn[:, None, :] == turn[:, :, None])
        mask = (causal[None] & key_ok & (turn[:, None, :] >= 0)) | torch.eye(length, dtype=torch.bool)[None]
        starts = (turn != F.pad(turn, (1, 0), value=-2)[:, :-1]) & (turn > 0)
        first = torch.zeros_like(turn)
        first[starts] = idx.expand(n, length)[starts]
        first = torch.cummax(first, dim=1).values
        pre = self.prefix_positions(grid).cpu()                                        # [3, n, head]
        after = pre.amax(dim=(0, 2)) + 1                                               # [n]
        text = after[:, None] + idx[None] - first                                      # a turn's positions
        pos = torch.where((turn > 0)[None], text[None].expand(3, n, length), 0)
        pos[:, :, :head] = pre
        return ids, labels, mask[:, None], pos


def lm_logits(model: nn.Module, features: Tensor, ids: Tensor, mask: Tensor, pos: Tensor) -> Tensor:
    """The forward from tower features: the video placeholders' embeddings replaced by ``features`` in order."""
    inner = model.model
    embeds = inner.get_input_embeddings()(ids)
    embeds = embeds.masked_scatter((ids == VIDEO_ID)[..., None], features.to(embeds.dtype))
    hidden = inner.language_model(inputs_embeds=embeds, attention_mask=mask, position_ids=pos).last_hidden_state
    return model.lm_head(hidden)


@torch.no_grad()
def teacher_forced_accuracy(model: nn.Module, seqs: Sequences, examples: list[C.ClipExample],
                            batch_size: int = 20) -> dict[str, float]:
    """Accuracy of the argmax at each prompt's end (one word answers: greedy decoding's answer) per qtype."""
    preds = []
    for i in range(0, len(examples), batch_size):
        part = examples[i:i + batch_size]
        feats, grid = clip_features(model, [e.frames for e in part])
        ids, _, mask, pos = seqs.batch([[(e.question, e.answer)] for e in part], grid)
        logits = lm_logits(model, feats, ids.to(grid.device), mask.to(grid.device), pos.to(grid.device))
        at = (ids != PAD_ID).sum(1) - 3  # a turn ends "answer <|im_end|>": the answer's logits are one slot before
        top = logits[torch.arange(len(part)), at.to(logits.device)].argmax(-1).tolist()
        preds += [seqs.tok.decode([t]) for t in top]
    return C.accuracy_by_type(preds, examples)


@torch.no_grad()
def generate_answers(model: nn.Module, processor: MicroVideoProcessor, examples: list[C.ClipExample],
                     batch_size: int = 20) -> list[str]:
    """Greedy answers through the processor and ``generate``, as the bench asks them."""
    out = []
    dev = next(model.parameters()).device
    for i in range(0, len(examples), batch_size):
        part = examples[i:i + batch_size]
        batch = {k: v.to(dev) for k, v in processor([e.frames for e in part], [e.question for e in part]).items()}
        gen = model.generate(**batch, max_new_tokens=4, do_sample=False)
        out += processor.decode(gen[:, batch["input_ids"].shape[1]:])
    return out


def train_video(out_dir: str | Path, *, seed: int = 0, clips: int = 20000, tower_steps: int = 1000,
                tower_batch: int = 48, tower_lr: float = 2e-3, lm_steps: int = 1200, lm_batch: int = 16,
                lm_lr: float = 2e-3, root: str | Path | None = None, resume: bool = True,
                device: str | torch.device | None = None, config: dict[str, Any] | None = None,
                checkpoint_every: int = 100, eval_every: int = 250, eval_limit: int = 140,
                test_limit: int | None = None, budget: int | None = None, progress: bool = True,
                log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Train the micro video VLM into ``out_dir`` (module docstring); returns the metrics. ``budget`` stops after
    that many steps over both stages (a later call resumes); ``test_limit`` scores only the first test questions
    (smoke runs)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    say = log or print
    dev = pick_device(device)
    cfg = dict(config or {})
    model = build_model(seed, **cfg).to(dev)
    vision_cfg = model.config.vision_config.to_dict()
    run = {"seed": seed, "clips": clips, "tower_steps": tower_steps, "tower_batch": tower_batch, "tower_lr": tower_lr,
           "lm_steps": lm_steps, "lm_batch": lm_batch, "lm_lr": lm_lr, "model": micro_video_config(**cfg).to_dict(),
           "vision": {k: v for k, v in vision_cfg.items() if k != "transformers_version"}}
    torch.manual_seed(seed)
    head = nn.Linear(model.config.text_config.hidden_size, _EMPTY + 1).to(dev)
    t_data = time.perf_counter()
    train = C.make_clips("train", clips, seed, root=root, questions_per_clip=len(C.QTYPES), render=False)
    groups: dict[int, list[C.ClipExample]] = {}
    for ex in train:
        groups.setdefault(ex.clip_id, []).append(ex)
    group_list = list(groups.values())
    test = C.load_default_test_set()
    say(f"data: {len(group_list)} training clips, {len(train)} questions in {time.perf_counter() - t_data:.1f}s")
    per_side = GRID // MERGE
    seqs = Sequences(model, C.STEPS * per_side * per_side)
    state: dict[str, Any] = {"stage": "tower", "step": 0, "history": [], "seconds": 0.0}
    steps = {"tower": tower_steps, "lm": lm_steps}
    lrs = {"tower": tower_lr, "lm": lm_lr}
    visual = model.model.visual

    def begin(stage: str, step: int = 0) -> None:
        from transformers import get_cosine_schedule_with_warmup

        state["stage"], state["step"] = stage, step
        params = [*visual.parameters(), *head.parameters()] if stage == "tower" else [
            p for n, p in model.named_parameters() if not n.startswith("model.visual.") or ".merger." in n]
        state["opt"] = torch.optim.AdamW(params, lr=lrs[stage], weight_decay=0.01)
        state["sched"] = get_cosine_schedule_with_warmup(state["opt"], max(1, round(0.05 * steps[stage])),
                                                         max(1, steps[stage]))

    def checkpoint() -> None:
        save_atomic({"run": run, "stage": state["stage"], "step": state["step"], "history": state["history"],
                     "seconds": elapsed(), "model": model.state_dict(), "head": head.state_dict(),
                     "optimizer": state["opt"].state_dict(), "scheduler": state["sched"].state_dict(),
                     "rng": rng_state()}, out / CHECKPOINT)

    t0 = time.perf_counter()

    def elapsed() -> float:
        return state["seconds"] + time.perf_counter() - t0

    ckpt_path, tower_path = out / CHECKPOINT, out / TOWER
    if resume and ckpt_path.is_file():
        ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=False)
        check_resume(ckpt["run"], run, _RUN_KEYS, ckpt_path)
        model.load_state_dict(ckpt["model"])
        head.load_state_dict(ckpt["head"])
        state["history"], state["seconds"] = ckpt["history"], ckpt["seconds"]
        begin(ckpt["stage"], ckpt["step"])
        state["opt"].load_state_dict(ckpt["optimizer"])
        state["sched"].load_state_dict(ckpt["scheduler"])
        set_rng_state(ckpt["rng"])
        say(f"resumed from {ckpt_path}: stage {state['stage']}, step {state['step']}")
    elif resume and tower_path.is_file():
        snap = torch.load(tower_path, map_location="cpu", weights_only=False)
        check_resume(snap["run"], {k: run[k] for k in _TOWER_KEYS}, _TOWER_KEYS, tower_path)
        visual.load_state_dict(snap["visual"])
        head.load_state_dict(snap["head"])
        state["history"], state["seconds"] = snap["history"], snap["seconds"]
        begin("lm")
        say(f"stage 1 restored from {tower_path}")
    else:
        begin("tower")

    def done() -> int:
        return state["step"] + (steps["tower"] if state["stage"] == "lm" else 0)

    limit = budget if budget is not None else tower_steps + lm_steps
    total = tower_steps + lm_steps

    def rng() -> np.random.Generator:
        return np.random.default_rng(np.random.SeedSequence([seed, _STAGES.index(state["stage"]), state["step"]]))

    def update(loss: Tensor, bar: Any, task: Any) -> None:
        opt = state["opt"]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for g in opt.param_groups for p in g["params"]], 1.0)
        opt.step()
        state["sched"].step()
        state["step"] += 1
        if bar is not None:
            bar.update(task, completed=done(), info=f"{state['stage']} loss {loss.item():.3f}")

    def frames_of(group: list[C.ClipExample]) -> np.ndarray:
        return C.render_clip(group[0].spec, group[0].tiles)

    test_tower = test[:eval_limit]
    with progress_bar(progress) as bar:
        task = bar.add_task("train-micro video", total=total, completed=done(), info="") if bar is not None else None
        # ---- stage 1: the tower
        while state["stage"] == "tower" and state["step"] < tower_steps and done() < limit:
            r = rng()
            idx = r.choice(len(group_list), tower_batch, replace=False)
            at = r.integers(C.STEPS, size=tower_batch)  # one time step (a temporal patch) of each clip
            model.train()
            frames = [frames_of(group_list[i])[C.HOLD * t:C.HOLD * (t + 1)] for i, t in zip(idx, at, strict=True)]
            feats, _ = clip_features(model, frames)
            per = per_side * per_side
            labels = torch.stack([token_labels(group_list[i][0].spec, per_side)[t * per:(t + 1) * per]
                                  for i, t in zip(idx, at, strict=True)]).to(dev)
            loss = F.cross_entropy(head(feats).flatten(0, 1), labels.flatten())
            update(loss, bar, task)
            last = state["step"] == tower_steps
            if state["step"] % 200 == 0 or last:
                model.eval()
                acc = tower_readout(model, head, test_tower, per_side)
                state["history"].append({"stage": "tower", "step": state["step"], "loss": round(loss.item(), 4),
                                         "test_cell_acc": round(acc, 4)})
                say(f"tower step {state['step']}/{tower_steps}: loss {loss.item():.3f}, test cells {acc:.3f}")
            if state["step"] % checkpoint_every == 0 or last or done() >= limit:
                checkpoint()
            if last:
                save_atomic({"run": {k: run[k] for k in _TOWER_KEYS}, "visual": visual.state_dict(),
                             "head": head.state_dict(), "history": state["history"], "seconds": elapsed()},
                            tower_path)
                begin("lm")
        # ---- stage 2: the language model on the frozen tower
        if state["stage"] == "lm":
            visual.eval().requires_grad_(False)
            visual.merger.requires_grad_(True)  # the merger learns on: the projector between tower and LM
        while state["stage"] == "lm" and state["step"] < lm_steps and done() < limit:
            r = rng()
            idx = r.choice(len(group_list), lm_batch, replace=False)
            feats, grid = clip_features(model, [frames_of(group_list[i]) for i in idx])  # grads: the merger only
            turns = [[(e.question, e.answer) for e in (group_list[i][j] for j in r.permutation(len(group_list[i])))]
                     for i in idx]
            ids, labels, mask, pos = seqs.batch(turns, grid)
            model.model.language_model.train()
            logits = lm_logits(model, feats, ids.to(dev), mask.to(dev), pos.to(dev))
            loss = F.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].to(dev).flatten(), ignore_index=-100)
            update(loss, bar, task)
            last = state["step"] == lm_steps
            if state["step"] % eval_every == 0 or last:
                model.eval()
                acc = teacher_forced_accuracy(model, seqs, test[:eval_limit])
                state["history"].append({"stage": "lm", "step": state["step"], "loss": round(loss.item(), 4),
                                         "test_subset": {k: round(v, 4) for k, v in acc.items()}})
                say(f"lm step {state['step']}/{lm_steps}: loss {loss.item():.3f}, test[:{eval_limit}] "
                    + ", ".join(f"{k} {v:.3f}" for k, v in acc.items()))
            if state["step"] % checkpoint_every == 0 or last or done() >= limit:
                checkpoint()
    finished = state["stage"] == "lm" and state["step"] >= lm_steps
    metrics: dict[str, Any] = {"finished": finished, "steps_done": done(), "seconds": round(elapsed(), 1),
                               "history": state["history"], "args": {k: v for k, v in run.items() if k != "model"}}
    if finished:
        model.eval()
        save_micro_video(model, out)
        processor = MicroVideoProcessor(build_tokenizer())
        scored = test[:test_limit] if test_limit is not None else test
        answers = generate_answers(model, processor, scored)
        metrics["test"] = C.accuracy_by_type(answers, scored)
        metrics["majority_baseline"] = {k: v[1] for k, v in C.majority_baseline(scored).items()}
        metrics["test_questions"] = len(scored)
        say("test (greedy generate): " + ", ".join(f"{k} {v:.3f}" for k, v in metrics["test"].items()))
    (out / METRICS).write_text(json.dumps(metrics, indent=1) + "\n")
    return metrics


@torch.no_grad()
def tower_readout(model: nn.Module, head: nn.Module, examples: list[C.ClipExample], per_side: int) -> float:
    """Share of occupied (step, cell) pairs of the test clips whose tokens' majority class is right."""
    hits = total = 0
    seen: set[int] = set()
    part = [e for e in examples if not (e.clip_id in seen or seen.add(e.clip_id))]
    for i in range(0, len(part), 20):
        chunk = part[i:i + 20]
        feats, _ = clip_features(model, [e.frames for e in chunk])
        pred = head(feats).argmax(-1).cpu()
        for e, p in zip(chunk, pred, strict=True):
            lab = token_labels(e.spec, per_side)
            cell = _token_cells(e.spec, per_side)
            for key in torch.unique(cell):
                sel = cell == key
                truth = int(lab[sel][0])
                if truth == _EMPTY:
                    continue
                total += 1
                hits += int(torch.mode(p[sel]).values) == truth
    return hits / max(total, 1)


def _token_cells(spec: C.ClipSpec, per_side: int) -> Tensor:
    """``[steps * per_side^2]``: (step, cell) key of each merged token."""
    r = np.arange(per_side) * spec.rows // per_side
    c = np.arange(per_side) * spec.cols // per_side
    cell = r[:, None] * spec.cols + c[None, :]
    keys = np.arange(spec.steps)[:, None, None] * (spec.rows * spec.cols) + cell[None]
    return torch.as_tensor(keys.reshape(-1))


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out_dir")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--clips", type=int, default=20000)
    p.add_argument("--tower-steps", type=int, default=1000)
    p.add_argument("--lm-steps", type=int, default=1200)
    p.add_argument("--budget", type=int)
    p.add_argument("--root")
    p.add_argument("--device")
    p.add_argument("--no-resume", action="store_true")
    a = p.parse_args(argv)
    train_video(a.out_dir, seed=a.seed, clips=a.clips, tower_steps=a.tower_steps, lm_steps=a.lm_steps,
                budget=a.budget, root=a.root, device=a.device, resume=not a.no_resume)


if __name__ == "__main__":
    main()

