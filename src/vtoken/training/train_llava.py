"""Reproducible trainer for the micro LLaVA on Fashion collage VQA (the bench's default model).

Two stages, as LLaVA's alignment-then-tuning (why two, and what each choice measured: ``docs/notes.md``):

1. **Tower** (``tower_steps``, :func:`_train_tower`): the CLIP vision tower learns to see the collages with dense,
   cheap supervision (:class:`TowerHeads`): every patch token predicts its cell's content (empty or one of 10
   classes) and its cell row and column, the CLS token predicts which classes are present (multi-label). The heads
   are discarded afterwards; what stays is a tower whose patch tokens carry "what" and "where" linearly.
   ``tower_augment`` flips and shifts each cell's picture on its own (:func:`augment_collages`); off by default.
   Every 200 steps and at the end of the stage, :func:`tower_readout` answers the test questions from what the
   heads read in each cell: the reference for what the features hold (``test_*`` entries of the tower history).
2. **Language model** (``lm_steps``, :func:`_train_lm`): the tower is frozen (its features are computed once and
   cached, float16), the projector and the Llama language model learn to answer. Each training sequence is one
   collage followed by ``turns`` question/answer turns in the llava-1.5 conversation format, so one pass over the
   144 image tokens supervises several answers; the first turn is exactly the single-turn prompt used at test time.
   With ``describe`` a last turn asks :data:`~vtoken.bench.fashion.DESCRIBE` and is answered with every cell
   (``top left bag top center nothing ...``): position words each followed by what is there (a training-only
   request; the test set has only the four question types). ``describe=True`` lists the cells in reading order;
   the default, ``describe="shuffled"``, in a fresh random order per sequence, with the position words given
   rather than labelled.

Everything random derives from ``seed`` without hidden state (batch ``s`` of stage ``k`` from
``SeedSequence([seed, k, s])``), so a run resumes from ``<out>/checkpoint.pt`` to the same weights. The state at
the end of stage 1 (the vision tower and heads) is also kept in ``<out>/tower.pt``: a run that differs only in its
stage-2 arguments or its language model starts from it (in an out_dir without ``checkpoint.pt``); the tower's
seeded initialisation does not depend on the language model's config.
Outputs in ``out_dir``: ``config.json`` + ``model.safetensors`` + processor files (load with
``AutoModelForImageTextToText`` / ``AutoProcessor``), ``metrics.json`` (per-question-type accuracy of greedy
``generate`` on the shipped test set, history, arguments, timing) and ``checkpoint.pt``.

CLI: ``python -m vtoken.training.train_llava OUT_DIR`` (see ``--help``); ``vtoken train-micro`` trains both micro
models.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..bench.common import progress_bar
from ..bench.fashion import (
    CLASS_NAMES,
    DESCRIBE,
    ITEM,
    Example,
    accuracy_by_type,
    candidate_questions,
    describe_pairs,
    load_default_test_set,
    make_split,
)
from ..bench.vqa import answer, prepare_batches
from .common import CHECKPOINT, METRICS, check_resume, pick_device, rng_state, save_atomic, set_rng_state
from .micro_llava import (
    BOS_ID,
    EOS_ID,
    IMAGE_ID,
    NUM_IMAGE_TOKENS,
    PAD_ID,
    build_processor,
    build_tokenizer,
    micro_llava_config,
    pixel_values,
)
from .train_vit import augment_batch

_CKPT_FORMAT = 1
_STAGES = ("tower", "lm")
_RUN_KEYS = ("seed", "images", "turns", "tower_steps", "tower_batch", "tower_lr", "tower_augment", "lm_steps",
             "lm_batch", "lm_lr", "describe", "model")
_TOWER_KEYS = ("seed", "images", "turns", "tower_steps", "tower_batch", "tower_lr", "tower_augment", "vision")
TOWER = "tower.pt"
_DEFAULT_DESCRIBE: bool | str = "shuffled"
_DESCRIBE_NAMES = {True: "reading", "shuffled": "shuffled", False: "none"}


class TowerHeads(nn.Module):
    """Stage-1 heads on the tower's last hidden state ``[n, 1 + 144, C]``: patch -> cell content (11 way: empty +
    classes; also scored on the logits averaged over the cell's patches), patch -> cell row and column (3 + 3
    way), CLS -> classes present (10 logits)."""

    def __init__(self, hidden: int, rows: int = 3, cols: int = 3) -> None:
        super().__init__()
        self.rows, self.cols = rows, cols
        self.content = nn.Linear(hidden, len(CLASS_NAMES) + 1)
        self.position = nn.Linear(hidden, rows + cols)
        self.present = nn.Linear(hidden, len(CLASS_NAMES))

    def loss(self, hidden: Tensor, cells: Tensor) -> tuple[Tensor, dict[str, float]]:
        """Sum of the three losses for tower states ``[n, 1 + P, C]`` and cell class ids ``[n, rows, cols]``."""
        n = hidden.shape[0]
        side = round((hidden.shape[1] - 1) ** 0.5)
        r = torch.arange(side, device=hidden.device) * self.rows // side
        c = torch.arange(side, device=hidden.device) * self.cols // side
        target = (cells[:, r][:, :, c] + 1).reshape(n, -1)                               # [n, P]
        patches = hidden[:, 1:]
        logits = self.content(patches)
        content = F.cross_entropy(logits.flatten(0, 1), target.flatten())
        pos = self.position(patches)
        rows_t = r[:, None].expand(side, side).reshape(-1).repeat(n)
        cols_t = c[None, :].expand(side, side).reshape(-1).repeat(n)
        where = (F.cross_entropy(pos[..., :self.rows].flatten(0, 1), rows_t)
                 + F.cross_entropy(pos[..., self.rows:].flatten(0, 1), cols_t))
        present_t = (cells.flatten(1)[:, :, None] == torch.arange(len(CLASS_NAMES), device=cells.device)).any(1)
        present = F.binary_cross_entropy_with_logits(self.present(hidden[:, 0]), present_t.float())
        cell = F.cross_entropy(self._cell_logits(logits).flatten(0, 2), (cells + 1).flatten())
        acc = (logits.argmax(-1) == target).float().mean().item()
        return content + cell + where + present, {"content": content.item(), "cell": cell.item(),
                                                  "where": where.item(), "present": present.item(),
                                                  "patch_acc": acc}

    def _cell_logits(self, patch_logits: Tensor) -> Tensor:
        """Content logits ``[n, P, 11]`` of a square patch grid -> averaged over each cell ``[n, rows, cols, 11]``."""
        n, p, k = patch_logits.shape
        side = round(p ** 0.5)
        return patch_logits.reshape(n, self.rows, side // self.rows, self.cols, side // self.cols, k).mean((2, 4))

    @torch.no_grad()
    def read_cells(self, hidden: Tensor) -> Tensor:
        """Class id per cell ``[n, rows, cols]`` (-1 empty) from the patch logits averaged over each cell."""
        return self._cell_logits(self.content(hidden[:, 1:])).argmax(-1) - 1


@torch.no_grad()
def tower_readout(model: nn.Module, heads: TowerHeads, examples: list[Example]) -> dict[str, float]:
    """What the stage-1 tower alone knows: each question answered from the cell contents its heads read
    (:meth:`TowerHeads.read_cells`), per question type, plus ``item`` (accuracy on occupied cells). A ceiling-like
    reference for the language model, which sees the same features."""
    hidden = tower_features(model, np.stack([e.image for e in examples]), cls=True)
    read = heads.read_cells(hidden.to(next(heads.parameters()).device)).cpu()
    preds = [dict(qa for qas in candidate_questions(r.numpy()).values() for qa in qas).get(e.question, "")
             for e, r in zip(examples, read, strict=True)]
    truth = torch.as_tensor(np.stack([e.cells for e in examples]))
    occupied = truth >= 0
    return {**accuracy_by_type(preds, examples), "item": (read[occupied] == truth[occupied]).float().mean().item()}


def augment_collages(images: np.ndarray, rng: np.random.Generator, rows: int = 3, cols: int = 3,
                     shift: int = 2) -> np.ndarray:
    """Stage-1 augmentation of ``uint8 [n, rows*28, cols*28, 3]`` collages: each cell's picture (inside its 1-px
    grid border) is flipped horizontally (p=0.5) and shifted by up to ``shift`` px on its own
    (:func:`~vtoken.training.train_vit.augment_batch`); the grid and the cell contents' classes are unchanged."""
    n, h, w, ch = images.shape
    if h != rows * ITEM or w != cols * ITEM:
        raise ValueError(f"images must be [n, {rows * ITEM}, {cols * ITEM}, 3] for a {rows}x{cols} grid, "
                         f"got {images.shape}")
    cells = images.reshape(n, rows, ITEM, cols, ITEM, ch).transpose(0, 1, 3, 2, 4, 5).copy()
    inner = cells[:, :, :, 1:-1, 1:-1].reshape(n * rows * cols, ITEM - 2, ITEM - 2, ch)
    cells[:, :, :, 1:-1, 1:-1] = augment_batch(inner, rng, shift).reshape(n, rows, cols, ITEM - 2, ITEM - 2, ch)
    return cells.transpose(0, 1, 3, 2, 4, 5).reshape(n, h, w, ch)


def _encode(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


class Conversations:
    """Token ids for training sequences: one collage and several question/answer turns (llava-1.5 format)."""

    def __init__(self) -> None:
        self.tok = build_tokenizer()
        self._cache: dict[str, list[int]] = {}
        self.head = [BOS_ID, *self.ids("USER:"), *[IMAGE_ID] * NUM_IMAGE_TOKENS]
        self.assistant = self.ids("ASSISTANT:")

    def ids(self, text: str) -> list[int]:
        if text not in self._cache:
            self._cache[text] = _encode(self.tok, text)
        return self._cache[text]

    def sequence(self, turns: list[Example], describe_cells: np.ndarray | None = None,
                 describe_order: np.ndarray | None = None) -> tuple[list[int], list[int], list[int]]:
        """``(input_ids, labels, turn)``: the collage prefix then each turn's ``question ASSISTANT: answer </s>``
        (plus a last :data:`~vtoken.bench.fashion.DESCRIBE` turn for ``describe_cells``); labels are the answer
        words and ``</s>``, -100 elsewhere; ``turn`` is 0 on the prefix, ``j + 1`` on turn ``j``. The describe turn
        lists the cells in reading order, or in ``describe_order``: then its position words are given, not
        labelled (a random order cannot be predicted; only what each named cell holds is). Under :meth:`batch`'s
        mask and positions every turn sees only the prefix and itself, at the positions a single-turn prompt has:
        one pass trains ``len(turns)`` independent single-turn examples."""
        ids = list(self.head)
        labels = [-100] * len(ids)
        turn = [0] * len(ids)
        replies = [(ex.question, self.ids(ex.answer), self.ids(ex.answer)) for ex in turns]
        if describe_cells is not None:
            pairs = [(self.ids(w), self.ids(c)) for w, c in describe_pairs(describe_cells, describe_order)]
            hide = describe_order is not None
            replies.append((DESCRIBE, [t for w, c in pairs for t in (*w, *c)],
                            [t for w, c in pairs for t in ([-100] * len(w) if hide else w) + c]))
        for j, (question, reply, reply_labels) in enumerate(replies):
            prompt = self.ids(question) + self.assistant
            ids += prompt + reply + [EOS_ID]
            labels += [-100] * len(prompt) + reply_labels + [EOS_ID]
            turn += [j + 1] * (len(prompt) + len(reply) + 1)
        return ids, labels, turn

    def batch(self, seqs: list[tuple[list[int], list[int], list[int]]]) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Right-padded ``(input_ids, labels, attention_mask [n, 1, L, L] bool, position_ids)``: causal, no padding
        keys, and a turn attends to the prefix and to its own tokens only (positions restart after the prefix)."""
        length = max(len(s[0]) for s in seqs)
        n = len(seqs)
        ids = torch.full((n, length), PAD_ID, dtype=torch.long)
        labels = torch.full((n, length), -100, dtype=torch.long)
        turn = torch.full((n, length), -1, dtype=torch.long)
        for b, (s, lab, t) in enumerate(seqs):
            ids[b, :len(s)] = torch.tensor(s)
            labels[b, :len(s)] = torch.tensor(lab)
            turn[b, :len(s)] = torch.tensor(t)
        head = len(self.head)
        idx = torch.arange(length)
        causal = idx[:, None] >= idx[None, :]
        key_ok = (turn[:, None, :] == 0) | (turn[:, None, :] == turn[:, :, None])
        mask = (causal[None] & key_ok & (turn[:, None, :] >= 0)) | torch.eye(length, dtype=torch.bool)[None]
        first = torch.zeros_like(turn)
        starts = (turn != torch.nn.functional.pad(turn, (1, 0), value=-2)[:, :-1]) & (turn > 0)
        first[starts] = idx.expand(n, length)[starts]
        first = torch.cummax(first, dim=1).values
        positions = torch.where(turn > 0, head + idx[None] - first, idx[None].expand(n, length))
        return ids, labels, mask[:, None], positions


def lm_logits(model: nn.Module, features: Tensor, input_ids: Tensor, attention_mask: Tensor,
              position_ids: Tensor | None = None) -> Tensor:
    """The LLaVA forward from cached tower features ``[n, 144, C]`` (last layer, CLS dropped): what
    ``LlavaForConditionalGeneration.forward`` computes for the same pixels (tested). ``attention_mask`` may be 2-D
    (padding) or a prepared 4-D bool mask (with ``position_ids``, see :meth:`Conversations.batch`)."""
    inner = model.model
    embeds = inner.get_input_embeddings()(input_ids)
    image = inner.multi_modal_projector(features).to(embeds.dtype)
    embeds = embeds.masked_scatter((input_ids == IMAGE_ID)[..., None], image)
    hidden = inner.language_model(inputs_embeds=embeds, attention_mask=attention_mask,
                                  position_ids=position_ids).last_hidden_state
    return model.lm_head(hidden)


@torch.no_grad()
def tower_features(model: nn.Module, images: np.ndarray, batch_size: int = 256, cls: bool = False,
                   dtype: torch.dtype = torch.float32) -> Tensor:
    """Last-layer states of the vision tower ``[n, 144, C]`` (``[n, 1 + 144, C]`` with ``cls``) for ``uint8
    [n, 84, 84, 3]`` collages, stored as ``dtype`` (stage 2 caches them in float16 to halve the memory)."""
    tower = model.model.vision_tower
    dev = next(tower.parameters()).device
    out = [tower(pixel_values=pixel_values(images[i:i + batch_size]).to(dev)).last_hidden_state[:, 0 if cls else 1:]
           .to(dtype) for i in range(0, len(images), batch_size)]
    return torch.cat(out)


@torch.no_grad()
def teacher_forced_accuracy(model: nn.Module, features: Tensor, examples: list[Example], conv: Conversations,
                            batch_size: int = 100) -> dict[str, float]:
    """Exact-match accuracy of greedy decoding, computed with one teacher-forced pass (greedy output equals the
    answer iff every answer token and ``</s>`` is the argmax given the correct prefix). ``features[i]`` belongs
    to ``examples[i]``."""
    hits = []
    for i in range(0, len(examples), batch_size):
        exs = examples[i:i + batch_size]
        ids, labels, mask, pos = conv.batch([conv.sequence([e]) for e in exs])
        dev = features.device
        logits = lm_logits(model, features[i:i + batch_size], ids.to(dev), mask.to(dev), pos.to(dev))
        pred, target = logits[:, :-1].argmax(-1).cpu(), labels[:, 1:]
        hits += ((pred == target) | (target == -100)).all(1).tolist()
    preds = [e.answer if h else "" for e, h in zip(examples, hits, strict=True)]
    return accuracy_by_type(preds, examples)


def generate_answers(model: nn.Module, processor, examples: list[Example], batch_size: int = 50,
                     max_new_tokens: int = 4) -> list[str]:
    """Greedy answers through the public path: ``processor`` (chat prompt + image) and ``model.generate``."""
    batches = prepare_batches(processor, examples, batch_size)
    out = answer(model, processor, batches, range(len(batches)), max_new_tokens)
    return [a for i in range(len(batches)) for a in out[i]]


@dataclass
class _Data:
    """Stage inputs: the training collages (``turns`` questions each) and the shipped test set."""

    groups: list[list[Example]]     # the questions of each training collage
    images: np.ndarray              # uint8 [n, 84, 84, 3], one per group
    cells: Tensor                   # class id per cell [n, rows, cols] (-1 empty)
    test: list[Example]


def _load_data(images: int, turns: int, seed: int, root: str | Path | None, say: Callable[[str], None]) -> _Data:
    t_data = time.perf_counter()
    train = make_split("train", images, turns, seed, root=root)
    groups = [train[i:i + turns] for i in range(0, len(train), turns)]
    cells = torch.as_tensor(np.stack([g[0].cells for g in groups]))
    data = _Data(groups, np.stack([g[0].image for g in groups]), cells, load_default_test_set())
    say(f"data: {len(groups)} training collages x {turns} questions in {time.perf_counter() - t_data:.1f}s")
    return data


class _State:
    """What :func:`train_llava` carries from stage to stage: the model and heads, the current stage with its
    optimizer and step, the history, and the checkpoint."""

    def __init__(self, out: Path, run: dict[str, Any], model: nn.Module, heads: TowerHeads, dev: torch.device,
                 steps: dict[str, int], lrs: dict[str, float], say: Callable[[str], None]) -> None:
        self.out, self.run, self.model, self.heads, self.dev, self.say = out, run, model, heads, dev, say
        self.steps, self.lrs = steps, lrs
        self.conv = Conversations()
        self.stage, self.step, self.history, self.seconds = "tower", 0, [], 0.0
        self.t0 = time.perf_counter()
        self.bar: Any = None
        self.task: Any = None

    @property
    def done(self) -> int:
        """Steps done over both stages."""
        return self.step + sum(self.steps[s] for s in _STAGES[:_STAGES.index(self.stage)])

    def begin(self, stage: str, step: int = 0) -> None:
        """Enter ``stage`` at ``step`` with a fresh AdamW and cosine schedule (5% warm-up) over what it trains: the
        tower and the heads (``tower``), everything but the tower (``lm``)."""
        from transformers import get_cosine_schedule_with_warmup

        self.stage, self.step = stage, step
        if stage == "tower":
            params = [*self.model.model.vision_tower.parameters(), *self.heads.parameters()]
        else:
            params = [p for n, p in self.model.named_parameters() if not n.startswith("model.vision_tower.")]
        total = self.steps[stage]
        self.opt = torch.optim.AdamW(params, lr=self.lrs[stage], weight_decay=0.01)
        self.sched = get_cosine_schedule_with_warmup(self.opt, max(1, round(0.05 * total)), max(1, total))

    def restore(self) -> None:
        """Continue from ``checkpoint.pt`` (any stage) or else from ``tower.pt`` (stage 2, step 0), when present
        and written with the same arguments; otherwise start stage 1."""
        ckpt_path, tower_path = self.out / CHECKPOINT, self.out / TOWER
        if ckpt_path.is_file():
            ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=False)
            check_resume(ckpt.get("run", {}), self.run, _RUN_KEYS, ckpt_path)
            self.model.load_state_dict(ckpt["model"])
            self.heads.load_state_dict(ckpt["heads"])
            self.history, self.seconds = ckpt["history"], ckpt["seconds"]
            self.begin(ckpt["stage"], ckpt["step"])
            self.opt.load_state_dict(ckpt["optimizer"])
            self.sched.load_state_dict(ckpt["scheduler"])
            set_rng_state(ckpt["rng"])
            self.say(f"resumed from {ckpt_path}: stage {self.stage}, step {self.step}")
        elif tower_path.is_file():
            snap = torch.load(tower_path, map_location="cpu", weights_only=False)
            check_resume(snap["run"], {k: self.run[k] for k in _TOWER_KEYS}, _TOWER_KEYS, tower_path)
            self.model.model.vision_tower.load_state_dict(snap["tower"])
            self.heads.load_state_dict(snap["heads"])
            self.history, self.seconds = snap["history"], snap["seconds"]
            self.begin("lm")
            self.say(f"stage 1 restored from {tower_path}")
        else:
            self.begin("tower")

    def elapsed(self) -> float:
        return self.seconds + time.perf_counter() - self.t0

    def rng(self) -> np.random.Generator:
        """The generator of the current step: ``SeedSequence([seed, stage index, step])``."""
        return np.random.default_rng(np.random.SeedSequence([self.run["seed"], _STAGES.index(self.stage), self.step]))

    def update(self, loss: Tensor) -> None:
        """One optimizer step on ``loss`` (gradients clipped to norm 1), counted and shown on the progress bar."""
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for g in self.opt.param_groups for p in g["params"]], 1.0)
        self.opt.step()
        self.sched.step()
        self.step += 1
        if self.bar is not None:
            self.bar.update(self.task, completed=self.done, info=f"{self.stage} loss {loss.item():.3f}")

    def checkpoint(self) -> None:
        save_atomic({"format": _CKPT_FORMAT, "run": self.run, "stage": self.stage, "step": self.step,
                     "history": self.history, "seconds": self.elapsed(), "model": self.model.state_dict(),
                     "heads": self.heads.state_dict(), "optimizer": self.opt.state_dict(),
                     "scheduler": self.sched.state_dict(), "rng": rng_state()}, self.out / CHECKPOINT)


def _train_tower(state: _State, data: _Data, *, batch_size: int, augment: bool, budget: int,
                 checkpoint_every: int) -> None:
    """Stage 1 up to ``tower_steps`` (or ``budget`` steps over both stages); once it is complete (within the budget),
    the tower and heads go to ``tower.pt`` and ``state`` enters stage 2."""
    model, heads, tower = state.model, state.heads, state.model.model.vision_tower
    steps = state.steps["tower"]
    while state.step < steps and state.done < budget:
        rng = state.rng()
        tower.train()
        idx = np.sort(rng.choice(len(data.groups), batch_size, replace=False))
        batch = data.images[idx]
        if augment:
            batch = augment_collages(batch, rng, *data.cells.shape[1:])
        hidden = tower(pixel_values=pixel_values(batch).to(state.dev)).last_hidden_state
        loss, info = heads.loss(hidden, data.cells[idx].to(state.dev))
        state.update(loss)
        last = state.step == steps
        if state.step % 200 == 0 or last:
            tower.eval()
            info.update({f"test_{k}": v for k, v in tower_readout(model, heads, data.test).items()})
            tower.train()
            state.history.append({"stage": "tower", "step": state.step, **{k: round(v, 4) for k, v in info.items()}})
            state.say(f"tower step {state.step}/{steps}: " + ", ".join(f"{k} {v:.3f}" for k, v in info.items()))
        if state.step % checkpoint_every == 0 or last or state.done >= budget:
            state.checkpoint()
    if state.step >= steps and state.done < budget:
        save_atomic({"run": {k: state.run[k] for k in _TOWER_KEYS}, "tower": tower.state_dict(),
                     "heads": heads.state_dict(), "history": state.history, "seconds": state.elapsed()},
                    state.out / TOWER)
        state.begin("lm")


def _train_lm(state: _State, data: _Data, *, turns: int, batch_size: int, describe: bool | str, eval_every: int,
              eval_limit: int, budget: int, checkpoint_every: int) -> None:
    """Stage 2 up to ``lm_steps`` (or ``budget`` steps over both stages) on the frozen tower's cached features,
    scored every ``eval_every`` steps by :func:`teacher_forced_accuracy` on the first ``eval_limit`` test
    questions."""
    model, conv, dev = state.model, state.conv, state.dev
    steps = state.steps["lm"]
    if not (state.step < steps and state.done < budget):
        return
    test = data.test[:eval_limit]
    model.model.vision_tower.eval().requires_grad_(False)
    features = tower_features(model, data.images, dtype=torch.float16)
    test_features = tower_features(model, np.stack([e.image for e in test]))
    while state.step < steps and state.done < budget:
        rng = state.rng()
        idx = rng.choice(len(data.groups), batch_size, replace=False)
        cells = [data.groups[i][0].cells for i in idx]
        orders = [rng.permutation(c.size) if describe == "shuffled" else None for c in cells]
        seqs = [conv.sequence([data.groups[i][j] for j in rng.permutation(turns)], c if describe else None, o)
                for i, c, o in zip(idx, cells, orders, strict=True)]
        ids, labels, mask, pos = conv.batch(seqs)
        logits = lm_logits(model, features[torch.as_tensor(idx)].float(), ids.to(dev), mask.to(dev), pos.to(dev))
        loss = F.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].to(dev).flatten(), ignore_index=-100)
        state.update(loss)
        last = state.step == steps
        if state.step % eval_every == 0 or last:
            model.eval()
            acc = teacher_forced_accuracy(model, test_features, test, conv)
            model.train()
            state.history.append({"stage": "lm", "step": state.step, "loss": round(loss.item(), 4),
                                  "test_subset": {k: round(v, 4) for k, v in acc.items()}})
            state.say(f"lm step {state.step}/{steps}: loss {loss.item():.3f}, test[:{eval_limit}] "
                      + ", ".join(f"{k} {v:.3f}" for k, v in acc.items()))
        if state.step % checkpoint_every == 0 or last or state.done >= budget:
            state.checkpoint()


def train_llava(out_dir: str | Path, *, seed: int = 0, images: int = 40000, turns: int = 8, tower_steps: int = 3000,
                tower_batch: int = 48, tower_lr: float = 2e-3, tower_augment: bool = False, lm_steps: int = 3000,
                lm_batch: int = 24, lm_lr: float = 2e-3, describe: bool | str = _DEFAULT_DESCRIBE,
                root: str | Path | None = None, resume: bool = True, device: str | torch.device | None = None,
                config=None, checkpoint_every: int = 200, eval_every: int = 250, eval_limit: int = 400,
                stop_after: int | None = None, progress: bool = True, log=print) -> dict[str, Any]:
    """Train the micro LLaVA (two stages, module docstring) and save it with its processor to ``out_dir``.

    ``images``: training collages (``turns`` questions each, from Fashion-MNIST's training images only).
    ``tower_augment``: flip and shift each cell's picture in stage 1 (:func:`augment_collages`).
    ``describe``: add the describe turn (``True``: cells in reading order; ``"shuffled"``: in a fresh random order per
    sequence, so position words cannot be tracked by counting, and only the contents are labelled; ``False``: no
    describe turn).
    ``stop_after``: stop after this many steps in all (both stages count), checkpointed, to split a run into parts.
    Returns the metrics (also written to ``<out_dir>/metrics.json``); ``"test"`` holds the greedy accuracy per
    question type on the shipped test set once the run is finished.
    """
    from transformers import LlavaForConditionalGeneration

    if describe not in (True, False, "shuffled"):
        raise ValueError(f"describe must be True, False or 'shuffled', got {describe!r}")
    if min(images, turns, tower_batch, lm_batch) < 1 or min(tower_steps, lm_steps) < 0:
        raise ValueError("images, turns, tower_batch and lm_batch must be >= 1 and the step counts >= 0")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    say = log or (lambda _msg: None)
    dev = pick_device(device)
    cfg = config if config is not None else micro_llava_config()
    run = json.loads(json.dumps({"seed": seed, "images": images, "turns": turns, "tower_steps": tower_steps,
                                 "tower_batch": tower_batch, "tower_lr": tower_lr, "tower_augment": tower_augment,
                                 "lm_steps": lm_steps, "lm_batch": lm_batch, "lm_lr": lm_lr, "describe": describe,
                                 "model": cfg.to_diff_dict(), "vision": cfg.to_diff_dict()["vision_config"]}))
    data = _load_data(images, turns, seed, root, say)
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(cfg).to(dev)
    heads = TowerHeads(cfg.vision_config.hidden_size, *data.cells.shape[1:]).to(dev)
    state = _State(out, run, model, heads, dev, {"tower": tower_steps, "lm": lm_steps},
                   {"tower": tower_lr, "lm": lm_lr}, say)
    if resume:
        state.restore()
    else:
        state.begin("tower")
    state.t0 = time.perf_counter()
    budget = tower_steps + lm_steps if stop_after is None else min(tower_steps + lm_steps, stop_after)
    with progress_bar(progress) as bar:
        if bar is not None:
            state.bar, state.task = bar, bar.add_task("train", total=tower_steps + lm_steps, completed=state.done,
                                                      info="")
        if state.stage == "tower":
            _train_tower(state, data, batch_size=tower_batch, augment=tower_augment, budget=budget,
                         checkpoint_every=checkpoint_every)
        if state.stage == "lm":
            _train_lm(state, data, turns=turns, batch_size=lm_batch, describe=describe, eval_every=eval_every,
                      eval_limit=eval_limit, budget=budget, checkpoint_every=checkpoint_every)
    return _finish(state, data)


def _finish(state: _State, data: _Data) -> dict[str, Any]:
    """The metrics (written to ``metrics.json``); a finished run also saves the model and processor and scores
    greedy ``generate`` on the shipped test set."""
    finished = state.stage == "lm" and state.step >= state.steps["lm"]
    metrics: dict[str, Any] = {"finished": finished, "stage": state.stage, "step": state.step,
                               "history": state.history, "device": str(state.dev),
                               "torch_threads": torch.get_num_threads(), "seconds": round(state.elapsed(), 1),
                               "run": state.run, "train_collages": len(data.groups)}
    if finished:
        state.model.eval()
        processor = build_processor()
        state.model.save_pretrained(state.out)
        processor.save_pretrained(state.out)
        answers = generate_answers(state.model, processor, data.test)
        metrics["test"] = accuracy_by_type(answers, data.test)
        metrics["test_questions"] = len(data.test)
        state.say("test accuracy (greedy generate, shipped test set): "
                  + ", ".join(f"{k} {v:.3f}" for k, v in metrics["test"].items()))
    (state.out / METRICS).write_text(json.dumps(metrics, indent=2) + "\n")
    return metrics


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="Train the micro LLaVA on Fashion collage VQA.")
    p.add_argument("out_dir")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--images", type=int, default=40000)
    p.add_argument("--turns", type=int, default=8)
    p.add_argument("--tower-steps", type=int, default=3000)
    p.add_argument("--lm-steps", type=int, default=3000)
    p.add_argument("--lm-batch", type=int, default=24)
    p.add_argument("--lm-lr", type=float, default=2e-3)
    p.add_argument("--describe", choices=("reading", "shuffled", "none"), default=_DESCRIBE_NAMES[_DEFAULT_DESCRIBE],
                   help="the training-only describe turn: cells in reading order, in a random order, or none")
    p.add_argument("--tower-augment", action="store_true", help="per-cell flips and shifts in stage 1")
    p.add_argument("--root", default=None)
    p.add_argument("--device", default=None)
    p.add_argument("--no-resume", action="store_true")
    p.add_argument("--stop-after", type=int, default=None)
    a = p.parse_args(argv)
    m = train_llava(a.out_dir, seed=a.seed, images=a.images, turns=a.turns, tower_steps=a.tower_steps,
                    lm_steps=a.lm_steps, lm_batch=a.lm_batch, lm_lr=a.lm_lr,
                    describe={v: k for k, v in _DESCRIBE_NAMES.items()}[a.describe],
                    tower_augment=a.tower_augment, root=a.root, device=a.device,
                    resume=not a.no_resume, stop_after=a.stop_after)
    print(json.dumps({k: m[k] for k in ("finished", "stage", "step", "test", "seconds") if k in m}))


if __name__ == "__main__":
    main()
