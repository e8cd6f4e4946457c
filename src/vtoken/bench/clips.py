"""Fashion clips: a small, offline, deterministic video QA task built from Fashion-MNIST.

A clip is ``steps`` time steps (default 6), each shown for ``hold`` identical frames (default 2: one temporal patch of
Qwen2.5-VL's tower, so a patch never blends two states), of a 3x3 collage (:func:`vtoken.bench.fashion.
render_collage`, cells of ``cell`` px, default 42: 126 x 126 frames). One to five **objects** take part, each a
distinct class with its own Fashion-MNIST item and tint. An object appears at a step, stays in its cell, may leave
before the end and, for at most one object per clip, moves once to another free cell. Questions need different
amounts of temporal detail:

============  ===============================================================  =========================================
qtype         question                                                         answer
============  ===============================================================  =========================================
``first``     ``what appears first?``                                          the class that appears alone at the
                                                                               earliest step
``last``      ``what appears last?``                                           the class that appears alone at the
                                                                               latest step (after the first)
``end``       ``what is in the top left at the end?``                          a class or ``nothing`` (the last step)
``count``     ``how many different items appear?``                             ``one`` .. ``five``
``presence``  ``does a coat appear?``                                          ``yes`` / ``no``
``moves``     ``which item moves?``                                            the mover's class or ``nothing``
``change``    ``does anything change between the first and last frame?``       ``yes`` / ``no`` (the cells' contents)
============  ===============================================================  =========================================

Balance: clips are made for a target: each clip's question type is the least-asked one, its answer the least-given
among the type's answers (ties to the seeded RNG), and the clip is sampled until it allows that exact question
(the sampler is steered by the target, the answer always computed from the clip by :func:`candidate_questions`). So
every type's answers are (near) uniform: :func:`majority_baseline` reports what always answering the most common
one scores.

Splits: ``train`` clips use only Fashion-MNIST training images, ``test`` only its test images. A clip is stored as
its object table and item tiles (:func:`save_clips`: a few bytes per object), rendered on load; the shipped test set
(``vtoken/assets/fashion_clips_test.npz``) needs no dataset files.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np

from .fashion import (
    CLASS_NAMES,
    ITEM,
    NOTHING,
    NUMBER_WORDS,
    PALETTE,
    SPLITS,
    _pick_balanced,
    _Pool,
    load_fashion,
    normalize,
    position_phrases,
    render_collage,
    words,
)

QTYPES = ("first", "last", "end", "count", "presence", "moves", "change")
STEPS, HOLD, ROWS, COLS, CELL, BORDER = 6, 2, 3, 3, 42, 1
OBJECTS = (1, 5)
"""Default range (inclusive) of objects per clip."""
DEFAULT_TEST_CLIPS = 420
DEFAULT_TEST_SEED = 0
DEFAULT_TEST_FILE = "fashion_clips_test.npz"
_FORMAT = 1
_SPLIT_IDS = {"train": 10, "test": 11}
#: columns of a clip's object table
FIELDS = ("cls", "tint", "source", "appear", "leave", "cell", "move_step", "move_cell")
_MAX_TRIES = 200


@dataclass(frozen=True)
class ClipSpec:
    """What happens in a clip: ``objects int64 [K, len(FIELDS)]`` (:data:`FIELDS`: class, tint, source index in the
    split, appear step, leave step (``steps`` = stays to the end), cell (row-major), move step and cell (``-1``: no
    move)) on a ``rows x cols`` grid over ``steps`` steps."""

    objects: np.ndarray
    steps: int = STEPS
    rows: int = ROWS
    cols: int = COLS

    def field(self, name: str) -> np.ndarray:
        return self.objects[:, FIELDS.index(name)]

    def cells_at(self, step: int) -> np.ndarray:
        """Class id per cell at ``step`` (``[rows, cols]``, ``-1`` empty)."""
        at = self.object_at(step)
        return np.where(at >= 0, self.field("cls")[np.maximum(at, 0)] if len(self.objects) else -1,
                        -1).reshape(self.rows, self.cols)

    def object_at(self, step: int) -> np.ndarray:
        """Object index per cell at ``step`` (``[rows * cols]``, ``-1`` empty)."""
        out = np.full(self.rows * self.cols, -1, np.int64)
        for i, obj in enumerate(self.objects):
            _, _, _, appear, leave, cell, move_step, move_cell = (int(v) for v in obj)
            if appear <= step < leave:
                out[move_cell if 0 <= move_step <= step else cell] = i
        return out


@dataclass(eq=False)
class ClipExample:
    """One question about one clip. ``frames`` (``uint8 [F, H, W, 3]``) is shared by the questions of a clip."""

    frames: np.ndarray
    question: str
    answer: str
    qtype: str
    spec: ClipSpec
    tiles: np.ndarray        # uint8 [K, 28, 28]: each object's item
    split: str
    clip_id: int


# ---------------------------------------------------------------------------------------------------- questions
def candidate_questions(spec: ClipSpec) -> dict[str, list[tuple[str, str]]]:
    """Every ``(question, answer)`` a clip allows, by type (a type the clip cannot answer unambiguously is empty:
    ``first`` / ``last`` need one object alone at the earliest / latest appearance)."""
    cls, appear = spec.field("cls"), spec.field("appear")
    out: dict[str, list[tuple[str, str]]] = {t: [] for t in QTYPES}
    if len(cls):
        first, last = appear.min(), appear.max()
        if (appear == first).sum() == 1:
            out["first"].append(("what appears first?", CLASS_NAMES[int(cls[appear.argmin()])]))
        if (appear == last).sum() == 1 and last != first:
            out["last"].append(("what appears last?", CLASS_NAMES[int(cls[appear.argmax()])]))
    end = spec.cells_at(spec.steps - 1).reshape(-1)
    out["end"] = [(f"what is in the {p} at the end?", CLASS_NAMES[int(k)] if k >= 0 else NOTHING)
                  for p, k in zip(position_phrases(spec.rows, spec.cols), end, strict=True)]
    out["count"].append(("how many different items appear?", NUMBER_WORDS[len(cls)]))
    present = set(cls.tolist())
    out["presence"] = [(f"does a {name} appear?", "yes" if k in present else "no")
                       for k, name in enumerate(CLASS_NAMES)]
    movers = cls[spec.field("move_step") >= 0]
    out["moves"].append(("which item moves?", CLASS_NAMES[int(movers[0])] if len(movers) else NOTHING))
    changed = not np.array_equal(spec.cells_at(0), spec.cells_at(spec.steps - 1))
    out["change"].append(("does anything change between the first and last frame?", "yes" if changed else "no"))
    return out


def answer_options(qtype: str, rows: int = ROWS, cols: int = COLS, objects: tuple[int, int] = OBJECTS) -> list[str]:
    """Every answer a question type can have (the balancing targets)."""
    if qtype in ("first", "last"):
        return list(CLASS_NAMES)
    if qtype in ("end", "moves"):
        return [*CLASS_NAMES, NOTHING]
    if qtype == "count":
        return list(NUMBER_WORDS[objects[0]:objects[1] + 1])
    if qtype in ("presence", "change"):
        return ["yes", "no"]
    raise ValueError(f"qtype must be one of {QTYPES}, got {qtype!r}")


def questions(rows: int = ROWS, cols: int = COLS) -> list[str]:
    """Every question text of the task."""
    return ["what appears first?", "what appears last?",
            *(f"what is in the {p} at the end?" for p in position_phrases(rows, cols)),
            "how many different items appear?", *(f"does a {c} appear?" for c in CLASS_NAMES), "which item moves?",
            "does anything change between the first and last frame?"]


def vocabulary(rows: int = ROWS, cols: int = COLS) -> list[str]:
    """Every word of every question and answer (:func:`~vtoken.bench.fashion.words` split), sorted."""
    found: set[str] = set()
    for text in [*questions(rows, cols), *(a for t in QTYPES for a in answer_options(t, rows, cols))]:
        found.update(words(text))
    return sorted(found)


# ---------------------------------------------------------------------------------------------------- sampling
def _sample_spec(rng: np.random.Generator, qtype: str, answer: str, steps: int, rows: int, cols: int,
                 objects: tuple[int, int]) -> ClipSpec:
    """A random clip steered towards allowing ``(qtype, answer)``; the caller checks that it does."""
    n_cells = rows * cols
    want = CLASS_NAMES.index(answer) if answer in CLASS_NAMES else None
    k = NUMBER_WORDS.index(answer) if qtype == "count" else int(rng.integers(objects[0], objects[1] + 1))
    if qtype in ("first", "last"):
        k = max(k, 2)
    k = max(1, min(k, n_cells - 1))  # a free cell for a mover
    classes = rng.permutation(len(CLASS_NAMES))[:k]
    if want is not None and want not in classes:
        classes[int(rng.integers(k))] = want
    i = int(np.flatnonzero(classes == want)[0]) if want is not None else None
    appear = rng.integers(0, steps - 1, size=k)
    leave = np.where(rng.random(k) < 0.3, rng.integers(appear + 1, steps + 1), steps)
    others = np.arange(k) != (i if i is not None else -1)
    if qtype == "first" and i is not None:
        appear[i] = int(rng.integers(0, steps - 2))
        appear[others] = rng.integers(appear[i] + 1, steps - 1, size=int(others.sum()))
    if qtype == "last" and i is not None:
        appear[i] = int(rng.integers(1, steps))
        appear[others] = rng.integers(0, appear[i], size=int(others.sum()))
    leave = np.maximum(leave, appear + 1)
    if qtype == "end" and i is not None:
        leave[i] = steps
    mover = i if qtype == "moves" else None if qtype in ("moves", "change") else (
        int(rng.integers(k)) if rng.random() < 0.4 else None)
    if qtype == "change" and answer == "yes" and rng.random() < 0.4:
        mover = int(rng.integers(k))
    if qtype == "change" and answer == "no":  # equal ends: every object there at both, or only in between
        whole = rng.random(k) < 0.5
        mid_appear = rng.integers(1, steps - 1, size=k)
        appear = np.where(whole, 0, mid_appear)
        leave = np.where(whole, steps, rng.integers(mid_appear + 1, steps))
    move_step, move_cell = np.full(k, -1), np.full(k, -1)
    cells = rng.permutation(n_cells)
    if mover is not None:
        if leave[mover] - appear[mover] < 2:  # seen before and after the move
            appear[mover] = min(int(appear[mover]), steps - 2)
            leave[mover] = max(int(leave[mover]), int(appear[mover]) + 2)
        move_step[mover] = int(rng.integers(appear[mover] + 1, leave[mover]))
        move_cell[mover] = cells[k]
    table = np.stack([classes, np.zeros(k, np.int64), np.full(k, -1), appear, leave, cells[:k], move_step,
                      move_cell], axis=1).astype(np.int64)
    return ClipSpec(table, steps, rows, cols)


def render_clip(spec: ClipSpec, tiles: np.ndarray, hold: int = HOLD, cell: int = CELL,
                border: int = BORDER) -> np.ndarray:
    """The frames ``uint8 [steps * hold, rows * cell, cols * cell, 3]`` of a clip: every step's collage (objects'
    items ``tiles [K, 28, 28]`` tinted with their :data:`PALETTE` colour) repeated ``hold`` times."""
    tint = spec.field("tint")
    frames = []
    for step in range(spec.steps):
        at = spec.object_at(step)
        grey = np.where((at >= 0)[:, None, None], tiles[np.maximum(at, 0)], 0).astype(np.uint8) if len(tiles) else \
            np.zeros((at.size, ITEM, ITEM), np.uint8)
        colors = PALETTE[np.where(at >= 0, tint[np.maximum(at, 0)] if len(tint) else 0, 0)]
        frame = render_collage(grey.reshape(spec.rows, spec.cols, ITEM, ITEM),
                               colors.reshape(spec.rows, spec.cols, 3), cell, border)
        frames += [frame] * hold
    out = np.stack(frames)
    out.flags.writeable = False
    return out


def make_clips(split: str, n_clips: int, seed: int, root: str | Path | None = None, questions_per_clip: int = 1,
               steps: int = STEPS, hold: int = HOLD, rows: int = ROWS, cols: int = COLS, cell: int = CELL,
               border: int = BORDER, objects: tuple[int, int] = OBJECTS, render: bool = True) -> list[ClipExample]:
    """``n_clips * questions_per_clip`` balanced examples (module docstring) on clips of Fashion-MNIST ``split``
    items only, deterministic in ``seed``. A clip's questions are of distinct types. ``render=False`` leaves
    ``frames`` empty (``uint8 [0]``; :func:`render_clip` makes them from ``spec`` and ``tiles``): a training set
    of many clips then holds a few hundred bytes a clip."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if n_clips < 1 or not 1 <= questions_per_clip <= len(QTYPES):
        raise ValueError(f"n_clips must be >= 1 and questions_per_clip in [1, {len(QTYPES)}], got {n_clips}, "
                         f"{questions_per_clip}")
    if steps < 3:
        raise ValueError(f"steps must be >= 3 (an object can then appear, move and leave), got {steps}")
    if not 1 <= objects[0] <= objects[1] <= min(rows * cols - 1, len(NUMBER_WORDS) - 1, len(CLASS_NAMES)):
        raise ValueError(f"objects must be (min, max) with 1 <= min <= max <= {rows * cols - 1} (a free cell), got "
                         f"{objects!r}")
    images, labels = load_fashion(split, root)
    rng = np.random.default_rng(np.random.SeedSequence([seed, _SPLIT_IDS[split]]))
    pool = _Pool(labels, rng)
    type_counts: Counter = Counter()
    answer_counts: dict[str, Counter] = {t: Counter() for t in QTYPES}
    out: list[ClipExample] = []
    for clip_id in range(n_clips):
        order = sorted(rng.permutation(len(QTYPES)), key=lambda j: type_counts[QTYPES[j]])
        lead = QTYPES[order[0]]
        target = _pick_balanced(rng, answer_options(lead, rows, cols, objects), answer_counts[lead], key=lambda a: a)
        for _ in range(_MAX_TRIES):
            spec = _sample_spec(rng, lead, str(target), steps, rows, cols, objects)
            cands = candidate_questions(spec)
            if any(a == target for _, a in cands[lead]):
                break
        else:  # pragma: no cover - the sampler is steered; this guards its invariants
            raise RuntimeError(f"no clip allows {lead}={target!r} after {_MAX_TRIES} tries")
        k = len(spec.objects)
        sources = np.array([pool.take(int(c)) for c in spec.field("cls")], np.int64)
        table = spec.objects.copy()
        table[:, FIELDS.index("tint")] = rng.integers(len(PALETTE), size=k)
        table[:, FIELDS.index("source")] = sources
        spec = ClipSpec(table, steps, rows, cols)
        tiles = images[sources].astype(np.uint8) if k else np.zeros((0, ITEM, ITEM), np.uint8)
        frames = render_clip(spec, tiles, hold, cell, border) if render else np.zeros(0, np.uint8)
        types = [lead] + [QTYPES[j] for j in order[1:] if candidate_questions(spec)[QTYPES[j]]]
        for n, qtype in enumerate(types[:questions_per_clip]):
            options = cands[qtype] if n else [qa for qa in cands[qtype] if qa[1] == target]
            question, answer = _pick_balanced(rng, options, answer_counts[qtype], key=lambda qa: qa[1])
            type_counts[qtype] += 1
            answer_counts[qtype][answer] += 1
            out.append(ClipExample(frames, question, answer, qtype, spec, tiles, split, clip_id))
    return out


def majority_baseline(examples: list[ClipExample]) -> dict[str, tuple[str, float]]:
    """Per qtype (and ``"overall"``, answering each type's majority): the most common answer and the accuracy of
    always giving it."""
    by: dict[str, Counter] = {}
    for ex in examples:
        by.setdefault(ex.qtype, Counter())[ex.answer] += 1
    out = {}
    hits = total = 0
    for t in [q for q in QTYPES if q in by]:
        answer, n = by[t].most_common(1)[0]
        out[t] = (answer, n / sum(by[t].values()))
        hits, total = hits + n, total + sum(by[t].values())
    out["overall"] = ("", hits / total if total else 0.0)
    return out


def accuracy_by_type(predictions: list[str], examples: list[ClipExample]) -> dict[str, float]:
    """Exact-match accuracy after :func:`~vtoken.bench.fashion.normalize`, per qtype present and ``"overall"``."""
    if len(predictions) != len(examples) or not examples:
        raise ValueError(f"{len(predictions)} predictions for {len(examples)} examples")
    hits: Counter = Counter()
    totals: Counter = Counter()
    for p, ex in zip(predictions, examples, strict=True):
        for key in (ex.qtype, "overall"):
            hits[key] += normalize(p) == normalize(ex.answer)
            totals[key] += 1
    return {t: hits[t] / totals[t] for t in [*(q for q in QTYPES if q in totals), "overall"]}


# ---------------------------------------------------------------------------------------------------- files
def save_clips(path: str | Path, examples: list[ClipExample], meta: dict | None = None) -> None:
    """Write ``examples`` compactly: per clip its object table and item tiles (frames are rendered on load), per
    example the clip index, question, answer and qtype; ``meta`` as JSON (the rendering parameters included)."""
    if not examples:
        raise ValueError("no examples to save")
    index: dict[tuple[str, int], int] = {}
    firsts: list[ClipExample] = []
    for ex in examples:
        key = (ex.split, ex.clip_id)
        if key not in index:
            index[key] = len(firsts)
            firsts.append(ex)
    f0 = firsts[0]
    hold = f0.frames.shape[0] // f0.spec.steps
    cell = f0.frames.shape[1] // f0.spec.rows
    info = {"format": _FORMAT, "steps": f0.spec.steps, "rows": f0.spec.rows, "cols": f0.spec.cols, "hold": hold,
            "cell": cell, **(meta or {})}
    counts = np.array([len(e.spec.objects) for e in firsts], np.int32)
    np.savez_compressed(
        path,
        objects=np.concatenate([e.spec.objects for e in firsts]).astype(np.int32),
        tiles=np.concatenate([e.tiles for e in firsts]).astype(np.uint8),
        object_counts=counts,
        clip_split=np.array([e.split for e in firsts]),
        clip_id=np.array([e.clip_id for e in firsts], np.int32),
        clip_index=np.array([index[(e.split, e.clip_id)] for e in examples], np.int32),
        question=np.array([e.question for e in examples]),
        answer=np.array([e.answer for e in examples]),
        qtype=np.array([e.qtype for e in examples]),
        meta=np.array(json.dumps(info, sort_keys=True)),
    )


def load_clips(path: str | Path) -> list[ClipExample]:
    """Examples written by :func:`save_clips`, their frames rendered (questions of one clip share its frames)."""
    with np.load(path, allow_pickle=False) as z:
        d = {k: z[k] for k in z.files}
    info = json.loads(str(d["meta"]))
    if info.get("format") != _FORMAT:
        raise ValueError(f"{path}: unsupported format {d['meta']!s}")
    ends = np.cumsum(d["object_counts"])
    starts = ends - d["object_counts"]
    clips = []
    for s0, e0 in zip(starts.tolist(), ends.tolist(), strict=True):
        spec = ClipSpec(d["objects"][s0:e0].astype(np.int64), info["steps"], info["rows"], info["cols"])
        tiles = d["tiles"][s0:e0]
        clips.append((spec, tiles, render_clip(spec, tiles, info["hold"], info["cell"])))
    return [ClipExample(clips[i][2], str(q), str(a), str(t), clips[i][0], clips[i][1], str(d["clip_split"][i]),
                        int(d["clip_id"][i]))
            for i, q, a, t in zip(d["clip_index"].tolist(), d["question"], d["answer"], d["qtype"], strict=True)]


def default_test_path() -> Path:
    """Path of the shipped test clips (``vtoken/assets/fashion_clips_test.npz``)."""
    return Path(str(resources.files("vtoken") / "assets" / DEFAULT_TEST_FILE))


def build_default_test_set(path: str | Path | None = None, root: str | Path | None = None) -> list[ClipExample]:
    """The shipped test clips, rebuilt from Fashion-MNIST test images: 420 clips x 1 question (60 per type), seed 0.
    Written to ``path`` when given."""
    examples = make_clips("test", DEFAULT_TEST_CLIPS, DEFAULT_TEST_SEED, root=root)
    if path is not None:
        save_clips(path, examples, {"split": "test", "n_clips": DEFAULT_TEST_CLIPS, "seed": DEFAULT_TEST_SEED,
                                    "objects": list(OBJECTS),
                                    "source": "Fashion-MNIST t10k (Zalando Research, MIT licence)"})
    return examples


def load_default_test_set() -> list[ClipExample]:
    """The shipped test clips (no dataset files needed)."""
    return load_clips(default_test_path())


if __name__ == "__main__":  # regenerate the shipped asset: python -m vtoken.bench.clips [path]
    import sys

    target = Path(sys.argv[1]) if len(sys.argv) > 1 else default_test_path()
    build_default_test_set(target)
    print(f"wrote {target} ({target.stat().st_size / 1e6:.2f} MB)")
