"""Fashion collage VQA: a small, offline, deterministic VQA task built from Fashion-MNIST.

Each image is a grid of cells (default 3x3 cells of 28 px = 84x84 RGB, 2 to 5 of them occupied: :data:`ITEMS`); a
cell is empty or holds one Fashion-MNIST item tinted with a colour. Questions are templated and need different
amounts of visual detail:

===========  =====================================  ===========================================================
qtype        question                               answer
===========  =====================================  ===========================================================
``what``     ``what is in the top left?``           a class name or ``nothing``
``count``    ``how many bags are there?``           a number word ``zero`` .. (at most the number of cells)
``presence`` ``is there a sneaker?``                ``yes`` / ``no``
``where``    ``where is the coat?``                 a position phrase; only asked for a class seen exactly once
===========  =====================================  ===========================================================

Layout (pixel-exact, see :func:`render_collage`): cell ``(r, c)`` covers rows ``r*cell .. (r+1)*cell - 1`` and
columns ``c*cell .. (c+1)*cell - 1``. Its outer ``border`` px ring is grid grey (:data:`GRID_COLOR`), so neighbouring
cells are separated by a ``2*border`` px line (``border`` px at the image edge); the interior
``(cell - 2*border)`` px square is black background, or the 28x28 item resized (nearest) to it and tinted:
``pixel = item * colour / 255`` with a colour from :data:`PALETTE` (channels 0 or 255, so the tint is exact). With
the defaults and a 14 px patch each cell is exactly 2x2 patches (4x4 with a 7 px patch).

Text (word-level friendly): lower-case ASCII words separated by single spaces, a question ends in ``?``. Every
class name is one alphabetic word (:data:`CLASS_NAMES`: the dataset's "T-shirt/top" is ``tshirt``, "Ankle boot" is
``boot``), so a tokenizer that splits on whitespace, or on whitespace and punctuation, sees one token per class;
:func:`words` is the reference split and :func:`vocabulary` lists every word used.

Position phrases (:func:`position_phrases`): for grids with at most 3 rows and 3 columns, a row word (``top``,
``middle``, ``bottom``; ``top``/``bottom`` with 2 rows; omitted with 1 row) then a column word (``left``, ``center``,
``right``; ``left``/``right`` with 2 columns; omitted with 1 column), e.g. ``top left``, ``middle center``
(``center`` for a 1x1 grid). Larger grids use ``row <r> column <c>`` with number words, 1-based. Grids have at
most 20 cells so every count is one number word.

Balance: question types are assigned greedily to the least-asked type (exactly balanced when the total is a
multiple of 4; types differ within an image), and within a type the answer is the least-given one among those the
image allows (ties broken by the seeded RNG), so yes/no is balanced, counts are not dominated by zero and ``what``
answers spread over classes and ``nothing``.

Splits: collages for ``train`` use only Fashion-MNIST training images, ``test`` only the 10k test images; each
example records the source index (into its split) of every cell's item. Data: the Debian package
``dataset-fashion-mnist`` (``/usr/share/datasets/fashion-mnist``, MIT licence), or any directory holding the four
idx files (gzipped or not) passed as ``root`` or in ``$VTOKEN_FASHION_MNIST``.
"""

from __future__ import annotations

import gzip
import json
import os
import re
from collections import Counter
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources
from pathlib import Path

import numpy as np

DEFAULT_ROOT = Path("/usr/share/datasets/fashion-mnist")
APT_PACKAGE = "dataset-fashion-mnist"
SPLITS = ("train", "test")
_FILES = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
          "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}

FASHION_LABELS = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                  "Ankle boot")
"""The dataset's own label names, index = label."""
CLASS_NAMES = ("tshirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "boot")
"""One alphabetic word per label, used in questions and answers."""
CLASS_PLURALS = ("tshirts", "trousers", "pullovers", "dresses", "coats", "sandals", "shirts", "sneakers", "bags",
                 "boots")
NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven",
                "twelve", "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen", "nineteen", "twenty")
QTYPES = ("what", "count", "presence", "where")
NOTHING = "nothing"
MAX_CELLS = len(NUMBER_WORDS) - 1

PALETTE = np.array([[255, 0, 0], [0, 255, 0], [0, 0, 255], [255, 255, 0], [255, 0, 255], [0, 255, 255],
                    [255, 255, 255]], dtype=np.uint8)
"""Item tints (red, green, blue, yellow, magenta, cyan, white)."""
GRID_COLOR = np.array([96, 96, 96], dtype=np.uint8)
ITEM = 28
ITEMS = (2, 5)
"""Default range (inclusive) of the number of items per collage, clipped to the grid's cells."""

DEFAULT_TEST_IMAGES = 500
DEFAULT_TEST_QUESTIONS = 2
DEFAULT_TEST_SEED = 0
DEFAULT_TEST_FILE = "fashion_vqa_test.npz"
_FORMAT = 1
_SPLIT_IDS = {"train": 0, "test": 1}


# ---------------------------------------------------------------------------------------------------- data
_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: np.dtype(">i2"), 0x0C: np.dtype(">i4"), 0x0D: np.dtype(">f4"),
               0x0E: np.dtype(">f8")}


def read_idx(path: str | Path) -> np.ndarray:
    """An idx file (gzipped if the name ends in ``.gz``) as a numpy array of its declared shape and type."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    if len(data) < 4 or data[0] or data[1] or data[2] not in _IDX_DTYPES:
        raise ValueError(f"{path}: not an idx file (bad magic {data[:4]!r})")
    ndim = data[3]
    dims = tuple(int(d) for d in np.frombuffer(data, ">u4", count=ndim, offset=4)) if ndim else ()
    dtype = np.dtype(_IDX_DTYPES[data[2]])
    offset = 4 + 4 * ndim
    n = int(np.prod(dims, dtype=np.int64))
    if len(data) - offset != n * dtype.itemsize:
        raise ValueError(f"{path}: idx header declares shape {dims} ({n * dtype.itemsize} bytes) but the file "
                         f"holds {len(data) - offset} bytes of data")
    return np.frombuffer(data, dtype, count=n, offset=offset).reshape(dims).astype(dtype.newbyteorder("="))


def _resolve_root(root: str | Path | None) -> Path:
    if root is not None:
        return Path(root)
    return Path(os.environ.get("VTOKEN_FASHION_MNIST") or DEFAULT_ROOT)


def _find(root: Path, stem: str) -> Path:
    for name in (stem + ".gz", stem):
        if (root / name).is_file():
            return root / name
    raise FileNotFoundError(
        f"Fashion-MNIST file {root / (stem + '.gz')} not found. Install the Debian package "
        f"(`apt install {APT_PACKAGE}`, files in {DEFAULT_ROOT}) or pass root= / set $VTOKEN_FASHION_MNIST to a "
        f"directory holding {', '.join(s + '[.gz]' for pair in _FILES.values() for s in pair)}.")


def load_fashion(split: str, root: str | Path | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Fashion-MNIST ``split`` (``"train"`` 60k or ``"test"`` 10k): images ``uint8 [n, 28, 28]``, labels
    ``int64 [n]``. ``root``: a directory with the idx files; default ``$VTOKEN_FASHION_MNIST`` or the Debian
    package's directory. Arrays are cached and read-only."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    return _load(split, str(_resolve_root(root).resolve()))


@lru_cache(maxsize=4)
def _load(split: str, root: str) -> tuple[np.ndarray, np.ndarray]:
    img_stem, lab_stem = _FILES[split]
    images = read_idx(_find(Path(root), img_stem))
    labels = read_idx(_find(Path(root), lab_stem)).astype(np.int64)
    if images.dtype != np.uint8 or images.ndim != 3 or images.shape[1:] != (ITEM, ITEM):
        raise ValueError(f"{root}: {img_stem} should be uint8 [n, 28, 28], got {images.dtype} {images.shape}")
    if labels.shape != images.shape[:1] or labels.min(initial=0) < 0 or labels.max(initial=0) >= len(CLASS_NAMES):
        raise ValueError(f"{root}: {lab_stem} should hold {len(images)} labels in 0..9")
    images.flags.writeable = False
    labels.flags.writeable = False
    return images, labels


# ---------------------------------------------------------------------------------------------------- text
def words(text: str) -> list[str]:
    """The reference word-level split: lower-case letter runs and single punctuation marks."""
    return re.findall(r"[a-z]+|[^a-z\s]", text.lower())


def normalize(text: str) -> str:
    """Lower case, surrounding whitespace stripped, inner whitespace runs collapsed to one space."""
    return " ".join(text.lower().split())


def _check_grid(rows: int, cols: int) -> None:
    if rows < 1 or cols < 1 or rows * cols > MAX_CELLS:
        raise ValueError(f"grid rows={rows}, cols={cols}: need rows, cols >= 1 and rows * cols <= {MAX_CELLS}")


def position_phrases(rows: int = 3, cols: int = 3) -> list[str]:
    """The position phrase of every cell, row-major (``[rows * cols]``); see the module docstring."""
    _check_grid(rows, cols)
    if rows > 3 or cols > 3:
        return [f"row {NUMBER_WORDS[r + 1]} column {NUMBER_WORDS[c + 1]}" for r in range(rows) for c in range(cols)]
    axis = {1: [""], 2: ["top", "bottom"], 3: ["top", "middle", "bottom"]}
    col_axis = {1: [""], 2: ["left", "right"], 3: ["left", "center", "right"]}
    return [f"{r} {c}".strip() or "center" for r in axis[rows] for c in col_axis[cols]]


DESCRIBE = "list the items."
"""A training-only request (not a test question type): its answer, :func:`describe`, names every cell's content
after its position phrase (in reading order or a given order), which teaches a model to tie position words to image
regions."""


def describe_pairs(cells: np.ndarray, order: np.ndarray | None = None) -> list[tuple[str, str]]:
    """``(position phrase, content)`` of every cell of class ids ``cells [rows, cols]`` (-1 empty, content
    ``nothing``), row-major or in ``order`` (a permutation of the row-major cell indices): :func:`describe`'s parts."""
    pos = position_phrases(*cells.shape)
    flat = cells.reshape(-1).tolist()
    idx = range(len(flat)) if order is None else np.asarray(order).tolist()
    if sorted(idx) != list(range(len(flat))):
        raise ValueError(f"order must be a permutation of 0..{len(flat) - 1}, got {idx}")
    return [(pos[i], CLASS_NAMES[flat[i]] if flat[i] >= 0 else NOTHING) for i in idx]


def describe(cells: np.ndarray, order: np.ndarray | None = None) -> str:
    """The answer to :data:`DESCRIBE` for class ids ``cells [rows, cols]`` (-1 empty): each cell's position phrase
    then its content, row-major (or in ``order``, a permutation of the row-major cell indices), e.g.
    ``top left bag top center nothing ...``."""
    return " ".join(f"{where} {what}" for where, what in describe_pairs(cells, order))


def answer_vocabulary(rows: int = 3, cols: int = 3) -> list[str]:
    """Every possible answer for a grid: class names, ``nothing``, number words, yes/no, position phrases."""
    return [*CLASS_NAMES, NOTHING, *NUMBER_WORDS[: rows * cols + 1], "yes", "no", *position_phrases(rows, cols)]


def _templates(rows: int, cols: int) -> list[str]:
    return ([f"what is in the {p}?" for p in position_phrases(rows, cols)]
            + [f"how many {p} are there?" for p in CLASS_PLURALS]
            + [f"is there a {n}?" for n in CLASS_NAMES] + [f"where is the {n}?" for n in CLASS_NAMES])


def vocabulary(rows: int = 3, cols: int = 3) -> list[str]:
    """Sorted list of every word (per :func:`words`) in any question or answer for the grid."""
    texts = [*_templates(rows, cols), DESCRIBE, *answer_vocabulary(rows, cols)]
    return sorted({w for t in texts for w in words(t)})


# ---------------------------------------------------------------------------------------------------- images
def _resize_index(n: int) -> np.ndarray:
    return ((2 * np.arange(n) + 1) * ITEM) // (2 * n)


def render_collage(tiles: np.ndarray, colors: np.ndarray, cell: int = ITEM, border: int = 1) -> np.ndarray:
    """The collage image ``uint8 [rows*cell, cols*cell, 3]`` from grey items ``uint8 [rows, cols, 28, 28]`` (all
    zero for an empty cell) and tints ``uint8 [rows, cols, 3]``; layout in the module docstring."""
    rows, cols = tiles.shape[:2]
    inner = cell - 2 * border
    if border < 0 or inner < 1:
        raise ValueError(f"cell={cell}, border={border}: need border >= 0 and cell - 2*border >= 1")
    if tiles.shape[2:] != (ITEM, ITEM) or colors.shape != (rows, cols, 3):
        raise ValueError(f"tiles must be [rows, cols, 28, 28] and colors [rows, cols, 3], got {tiles.shape}, "
                         f"{colors.shape}")
    ix = _resize_index(inner)
    small = tiles[:, :, ix][:, :, :, ix].astype(np.uint32)                       # [rows, cols, inner, inner]
    tinted = (small[..., None] * colors[:, :, None, None, :] + 127) // 255         # [rows, cols, inner, inner, 3]
    img = np.empty((rows, cell, cols, cell, 3), np.uint8)
    img[...] = GRID_COLOR
    img[:, border:cell - border, :, border:cell - border] = tinted.transpose(0, 2, 1, 3, 4)
    return img.reshape(rows * cell, cols * cell, 3)


# ---------------------------------------------------------------------------------------------------- examples
@dataclass(eq=False)
class Example:
    """One question about one collage. ``image`` is shared by the questions of the same collage."""

    image: np.ndarray        # uint8 [H, W, 3]
    question: str
    answer: str
    qtype: str               # one of QTYPES
    cells: np.ndarray        # int64 [rows, cols]: class id per cell, -1 empty
    sources: np.ndarray      # int64 [rows, cols]: index of the item in its Fashion-MNIST split, -1 empty
    tints: np.ndarray        # int64 [rows, cols]: PALETTE index per cell, -1 empty
    split: str               # "train" | "test": the Fashion-MNIST split the items come from
    image_id: int            # collage index within its generated set


def candidate_questions(cells: np.ndarray) -> dict[str, list[tuple[str, str]]]:
    """Every ``(question, answer)`` a collage with class ids ``cells`` ``[rows, cols]`` (-1 empty) allows, by type."""
    rows, cols = cells.shape
    flat = cells.reshape(-1)
    counts = np.bincount(flat[flat >= 0], minlength=len(CLASS_NAMES))
    pos = position_phrases(rows, cols)
    return {
        "what": [(f"what is in the {p}?", CLASS_NAMES[k] if k >= 0 else NOTHING)
                 for p, k in zip(pos, flat, strict=True)],
        "count": [(f"how many {CLASS_PLURALS[k]} are there?", NUMBER_WORDS[counts[k]]) for k in range(len(counts))],
        "presence": [(f"is there a {CLASS_NAMES[k]}?", "yes" if counts[k] else "no") for k in range(len(counts))],
        "where": [(f"where is the {CLASS_NAMES[k]}?", pos[int(np.flatnonzero(flat == k)[0])])
                  for k in range(len(counts)) if counts[k] == 1],
    }


def _sample_layout(rng: np.random.Generator, n_cells: int, items: tuple[int, int]) -> np.ndarray:
    """Class id per cell (row-major, -1 empty): ``items[0] .. items[1]`` items (clipped to ``n_cells``), classes
    repeating with probability 0.4 per item, at least one class seen exactly once."""
    k = int(rng.integers(min(items[0], n_cells), min(items[1], n_cells) + 1))
    while True:
        classes: list[int] = []
        for _ in range(k):
            unused = [c for c in range(len(CLASS_NAMES)) if c not in classes]
            if classes and (not unused or rng.random() < 0.4):
                classes.append(classes[int(rng.integers(len(classes)))])
            else:
                classes.append(unused[int(rng.integers(len(unused)))])
        if 1 in Counter(classes).values():
            break
    flat = np.full(n_cells, -1, np.int64)
    flat[rng.permutation(n_cells)[:k]] = classes
    return flat


class _Pool:
    """Per-class queues of split indices, each a fresh permutation when exhausted (items repeat only after all of a
    class has been used)."""

    def __init__(self, labels: np.ndarray, rng: np.random.Generator):
        self.by_class = [np.flatnonzero(labels == k) for k in range(len(CLASS_NAMES))]
        missing = [CLASS_NAMES[k] for k, ix in enumerate(self.by_class) if len(ix) == 0]
        if missing:
            raise ValueError(f"the split has no images of class(es) {', '.join(missing)}")
        self.rng = rng
        self.queues: list[list[int]] = [[] for _ in CLASS_NAMES]

    def take(self, k: int) -> int:
        if not self.queues[k]:
            self.queues[k] = self.rng.permutation(self.by_class[k]).tolist()[::-1]
        return self.queues[k].pop()


def _pick_balanced(rng: np.random.Generator, options: list, counts: Counter, key) -> object:
    """The option whose ``key`` has the lowest count so far; ties broken by ``rng``."""
    lowest = min(counts[key(o)] for o in options)
    best = [o for o in options if counts[key(o)] == lowest]
    return best[int(rng.integers(len(best)))]


def make_split(split: str, n_images: int, questions_per_image: int, seed: int, root: str | Path | None = None,
               rows: int = 3, cols: int = 3, cell: int = ITEM, border: int = 1,
               items: tuple[int, int] = ITEMS) -> list[Example]:
    """``n_images * questions_per_image`` examples on collages of items from Fashion-MNIST ``split`` only,
    deterministic in ``seed`` (train and test draw different layouts for the same seed). Images are
    ``uint8 [rows*cell, cols*cell, 3]`` holding ``items[0] .. items[1]`` items (uniform, clipped to the cells);
    questions of one image are distinct and of distinct types while ``questions_per_image <= 4``."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if n_images < 1 or questions_per_image < 1:
        raise ValueError(f"n_images and questions_per_image must be >= 1, got {n_images}, {questions_per_image}")
    _check_grid(rows, cols)
    if len(items) != 2 or not 1 <= items[0] <= items[1]:
        raise ValueError(f"items must be (min, max) with 1 <= min <= max, got {items!r}")
    images, labels = load_fashion(split, root)
    rng = np.random.default_rng(np.random.SeedSequence([seed, _SPLIT_IDS[split]]))
    pool = _Pool(labels, rng)
    type_counts: Counter = Counter()
    answer_counts: dict[str, Counter] = {t: Counter() for t in QTYPES}
    out: list[Example] = []
    for image_id in range(n_images):
        flat = _sample_layout(rng, rows * cols, items)
        sources = np.array([pool.take(int(k)) if k >= 0 else -1 for k in flat], np.int64)
        tints = np.where(flat >= 0, rng.integers(len(PALETTE), size=flat.size), -1)
        tiles = np.where((sources >= 0)[:, None, None], images[np.maximum(sources, 0)], 0).astype(np.uint8)
        colors = PALETTE[np.maximum(tints, 0)]
        image = render_collage(tiles.reshape(rows, cols, ITEM, ITEM), colors.reshape(rows, cols, 3), cell, border)
        image.flags.writeable = False
        cells, src, tnt = (a.reshape(rows, cols) for a in (flat, sources, tints))
        cands = candidate_questions(cells)
        asked: set[str] = set()
        used: Counter = Counter()
        for _ in range(questions_per_image):
            order = rng.permutation(len(QTYPES))
            order = sorted(order, key=lambda i: (used[QTYPES[i]], type_counts[QTYPES[i]]))
            for i in order:
                qtype = QTYPES[i]
                options = [qa for qa in cands[qtype] if qa[0] not in asked]
                if options:
                    break
            else:
                raise ValueError(f"questions_per_image={questions_per_image} exceeds the distinct questions "
                                 f"collage {image_id} allows")
            question, answer = _pick_balanced(rng, options, answer_counts[qtype], key=lambda qa: qa[1])
            asked.add(question)
            used[qtype] += 1
            type_counts[qtype] += 1
            answer_counts[qtype][answer] += 1
            out.append(Example(image, question, answer, qtype, cells, src, tnt, split, image_id))
    return out


# ---------------------------------------------------------------------------------------------------- files
def save_examples(path: str | Path, examples: list[Example], meta: dict | None = None) -> None:
    """Write ``examples`` to a compressed npz: ``images uint8 [M, H, W, 3]`` (one per collage), ``cells`` /
    ``sources`` / ``tints`` ``[M, rows, cols]``, ``image_split [M]``, ``image_id [M]``; per example
    ``image_index [n]``, ``question`` / ``answer`` / ``qtype [n]`` strings; ``meta`` a JSON string."""
    if not examples:
        raise ValueError("no examples to save")
    index: dict[tuple[str, int], int] = {}
    firsts: list[Example] = []
    for ex in examples:
        key = (ex.split, ex.image_id)
        if key not in index:
            index[key] = len(firsts)
            firsts.append(ex)
    info = {"format": _FORMAT, **(meta or {})}
    np.savez_compressed(
        path,
        images=np.stack([e.image for e in firsts]).astype(np.uint8),
        cells=np.stack([e.cells for e in firsts]).astype(np.int8),
        sources=np.stack([e.sources for e in firsts]).astype(np.int32),
        tints=np.stack([e.tints for e in firsts]).astype(np.int8),
        image_split=np.array([e.split for e in firsts]),
        image_id=np.array([e.image_id for e in firsts], np.int32),
        image_index=np.array([index[(e.split, e.image_id)] for e in examples], np.int32),
        question=np.array([e.question for e in examples]),
        answer=np.array([e.answer for e in examples]),
        qtype=np.array([e.qtype for e in examples]),
        meta=np.array(json.dumps(info, sort_keys=True)),
    )


def load_examples(path: str | Path) -> list[Example]:
    """Examples written by :func:`save_examples` (questions of one collage share its image array)."""
    with np.load(path, allow_pickle=False) as z:
        d = {k: z[k] for k in z.files}
    if json.loads(str(d["meta"])).get("format") != _FORMAT:
        raise ValueError(f"{path}: unsupported format {d['meta']!s}")
    images = d["images"]
    images.flags.writeable = False
    cells, sources, tints = (d[k].astype(np.int64) for k in ("cells", "sources", "tints"))
    views = list(images)                                  # one array object per collage, shared by its questions
    return [Example(views[i], str(q), str(a), str(t), cells[i], sources[i], tints[i], str(d["image_split"][i]),
                    int(d["image_id"][i]))
            for i, q, a, t in zip(d["image_index"].tolist(), d["question"], d["answer"], d["qtype"], strict=True)]


def load_meta(path: str | Path) -> dict:
    """The ``meta`` dictionary of a file written by :func:`save_examples`."""
    with np.load(path, allow_pickle=False) as z:
        return json.loads(str(z["meta"]))


def default_test_path() -> Path:
    """Path of the shipped test set (``vtoken/assets/fashion_vqa_test.npz``)."""
    return Path(str(resources.files("vtoken") / "assets" / DEFAULT_TEST_FILE))


def build_default_test_set(path: str | Path | None = None, root: str | Path | None = None) -> list[Example]:
    """The shipped test set, rebuilt from Fashion-MNIST test images: 500 3x3 collages (2-5 items) x 2 questions, seed 0.
    Written to ``path`` when given."""
    examples = make_split("test", DEFAULT_TEST_IMAGES, DEFAULT_TEST_QUESTIONS, DEFAULT_TEST_SEED, root=root)
    if path is not None:
        meta = {"split": "test", "n_images": DEFAULT_TEST_IMAGES, "questions_per_image": DEFAULT_TEST_QUESTIONS,
                "seed": DEFAULT_TEST_SEED, "rows": 3, "cols": 3, "cell": ITEM, "border": 1, "items": list(ITEMS),
                "source": "Fashion-MNIST t10k (Zalando Research, MIT licence)"}
        save_examples(path, examples, meta)
    return examples


def load_default_test_set() -> list[Example]:
    """The shipped test set (no dataset files needed)."""
    return load_examples(default_test_path())


# ---------------------------------------------------------------------------------------------------- scoring
def accuracy_by_type(predictions: list[str], examples: list[Example]) -> dict[str, float]:
    """Exact-match accuracy after :func:`normalize`, per qtype present and ``"overall"``."""
    if len(predictions) != len(examples):
        raise ValueError(f"{len(predictions)} predictions for {len(examples)} examples")
    if not examples:
        raise ValueError("no examples to score")
    hits: Counter = Counter()
    totals: Counter = Counter()
    for p, ex in zip(predictions, examples, strict=True):
        ok = normalize(p) == normalize(ex.answer)
        for key in (ex.qtype, "overall"):
            hits[key] += ok
            totals[key] += 1
    order = [t for t in QTYPES if t in totals] + sorted(t for t in totals if t not in QTYPES and t != "overall")
    return {t: hits[t] / totals[t] for t in [*order, "overall"]}


if __name__ == "__main__":  # regenerate the shipped asset: python -m vtoken.bench.fashion [path]
    import sys

    target = Path(sys.argv[1]) if len(sys.argv) > 1 else default_test_path()
    build_default_test_set(target)
    print(f"wrote {target} ({target.stat().st_size / 1e6:.2f} MB)")
