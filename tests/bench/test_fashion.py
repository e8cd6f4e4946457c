"""vtoken.bench.fashion: idx reading, collage layout, answer consistency, determinism, split disjointness, the
shipped test set and scoring. Uses a tiny fake Fashion-MNIST written to a tmp dir; checks against the real data
run only where the Debian package's files exist."""

from __future__ import annotations

import gzip
import re
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from vtoken.bench import fashion as F

HAVE_DEBIAN = all((F.DEFAULT_ROOT / f"{s}.gz").is_file() for pair in F._FILES.values() for s in pair)
needs_debian = pytest.mark.skipif(not HAVE_DEBIAN, reason=f"{F.DEFAULT_ROOT} absent (apt install {F.APT_PACKAGE})")


def write_idx(path: Path, array: np.ndarray, code: int = 0x08, compress: bool = True) -> None:
    header = bytes([0, 0, code, array.ndim]) + np.array(array.shape, ">u4").tobytes()
    data = header + array.astype(array.dtype.newbyteorder(">")).tobytes()
    (gzip.open if compress else open)(path, "wb").write(data)


@pytest.fixture(scope="module")
def fake_root(tmp_path_factory) -> Path:
    """Fashion-MNIST-format files: 5 images per class per split; train items are vertical bars, test horizontal."""
    root = tmp_path_factory.mktemp("fmnist")
    rng = np.random.default_rng(0)
    for split, (img_name, lab_name) in F._FILES.items():
        labels = rng.permutation(np.repeat(np.arange(10), 5)).astype(np.uint8)
        images = np.zeros((len(labels), 28, 28), np.uint8)
        for i in range(len(labels)):
            bar = (slice(4, 24), slice(10, 18)) if split == "train" else (slice(10, 18), slice(4, 24))
            images[i][bar] = rng.integers(60, 256, size=(8, 20) if split == "test" else (20, 8))
        write_idx(root / f"{img_name}.gz", images)
        write_idx(root / f"{lab_name}.gz", labels)
    return root


# -------------------------------------------------------------------------------- reading
def test_read_idx_gz_and_plain(tmp_path):
    a = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    write_idx(tmp_path / "a.gz", a)
    write_idx(tmp_path / "a", a, compress=False)
    for p in ("a.gz", "a"):
        out = F.read_idx(tmp_path / p)
        assert out.dtype == np.uint8 and out.shape == (2, 3, 4) and np.array_equal(out, a)
    b = np.array([1, -2, 300000], np.int32)
    write_idx(tmp_path / "b.gz", b, code=0x0C)
    assert np.array_equal(F.read_idx(tmp_path / "b.gz"), b)


def test_read_idx_rejects_bad_files(tmp_path):
    (tmp_path / "bad").write_bytes(b"\x01\x02\x03\x04")
    with pytest.raises(ValueError, match="not an idx"):
        F.read_idx(tmp_path / "bad")
    a = np.zeros((4, 5), np.uint8)
    write_idx(tmp_path / "short", a, compress=False)
    (tmp_path / "short").write_bytes((tmp_path / "short").read_bytes()[:-3])
    with pytest.raises(ValueError, match="declares shape"):
        F.read_idx(tmp_path / "short")


def test_load_fashion(fake_root):
    images, labels = F.load_fashion("train", root=fake_root)
    assert images.dtype == np.uint8 and images.shape == (50, 28, 28)
    assert labels.dtype == np.int64 and labels.shape == (50,) and np.array_equal(np.bincount(labels), [5] * 10)
    assert not images.flags.writeable
    with pytest.raises(ValueError, match="split"):
        F.load_fashion("validation", root=fake_root)


def test_missing_files_error_names_path_and_package(tmp_path):
    with pytest.raises(FileNotFoundError) as e:
        F.load_fashion("test", root=tmp_path)
    assert str(tmp_path / "t10k-images-idx3-ubyte.gz") in str(e.value) and F.APT_PACKAGE in str(e.value)


# -------------------------------------------------------------------------------- text
def test_position_phrases_and_vocabulary():
    assert F.position_phrases(3, 3) == ["top left", "top center", "top right", "middle left", "middle center",
                                        "middle right", "bottom left", "bottom center", "bottom right"]
    assert F.position_phrases(2, 2) == ["top left", "top right", "bottom left", "bottom right"]
    assert F.position_phrases(1, 3) == ["left", "center", "right"]
    assert F.position_phrases(1, 1) == ["center"]
    assert F.position_phrases(4, 2)[3] == "row two column two"
    for r, c in [(1, 2), (2, 3), (3, 1), (4, 5)]:
        assert len(set(F.position_phrases(r, c))) == r * c
    with pytest.raises(ValueError, match="rows"):
        F.position_phrases(5, 5)
    vocab = F.vocabulary()
    assert set(F.CLASS_NAMES) <= set(vocab) and "?" in vocab
    assert all(F.words(n) == [n] for n in F.CLASS_NAMES + F.CLASS_PLURALS)
    assert F.words("What is in the top left?") == ["what", "is", "in", "the", "top", "left", "?"]
    assert len(vocab) < 80
    assert set(F.words(F.DESCRIBE)) <= set(vocab)


def test_describe_names_every_cell_in_reading_order():
    cells = np.array([[0, -1, 2], [3, 4, -1], [-1, -1, 9]])
    assert F.describe(cells) == ("top left tshirt top center nothing top right pullover middle left dress middle "
                                 "center coat middle right nothing bottom left nothing bottom center nothing "
                                 "bottom right boot")
    assert F.describe(np.array([[7, -1]])) == "left sneaker right nothing"
    assert set(F.words(F.describe(cells))) <= set(F.vocabulary())
    assert F.describe(np.array([[7, -1]]), order=[1, 0]) == "right nothing left sneaker"
    with pytest.raises(ValueError, match="permutation"):
        F.describe(np.array([[7, -1]]), order=[1, 1])


# -------------------------------------------------------------------------------- layout
@pytest.mark.parametrize(("rows", "cols", "cell", "border"), [(3, 3, 28, 1), (2, 3, 20, 2), (1, 1, 28, 0)])
def test_render_layout(rows, cols, cell, border):
    rng = np.random.default_rng(1)
    occupied = rng.random((rows, cols)) < 0.5
    occupied.flat[0] = True
    tiles = np.where(occupied[..., None, None], np.uint8(255), np.uint8(0)) * np.ones((28, 28), np.uint8)
    colors = F.PALETTE[rng.integers(len(F.PALETTE), size=(rows, cols))]
    img = F.render_collage(tiles, colors, cell, border)
    assert img.shape == (rows * cell, cols * cell, 3) and img.dtype == np.uint8
    inner = slice(border, cell - border)
    for r in range(rows):
        for c in range(cols):
            block = img[r * cell:(r + 1) * cell, c * cell:(c + 1) * cell]
            ring = np.ones((cell, cell), bool)
            ring[inner, inner] = False
            assert (block[ring] == F.GRID_COLOR).all()
            expected = colors[r, c] if occupied[r, c] else np.zeros(3, np.uint8)
            assert (block[inner, inner] == expected).all()


def test_item_pixels_stay_in_their_cell():
    tiles = np.zeros((3, 3, 28, 28), np.uint8)
    item = np.zeros((28, 28), np.uint8)
    item[3:25, 5:9] = 200                                          # a bar reaching near the item's edges
    tiles[1, 2] = item
    colors = np.zeros((3, 3, 3), np.uint8)
    colors[1, 2] = [255, 0, 255]
    img = F.render_collage(tiles, colors)
    lit = np.argwhere((img != F.GRID_COLOR).any(-1) & (img > 0).any(-1))
    assert len(lit) and (lit[:, 0] // 28 == 1).all() and (lit[:, 1] // 28 == 2).all()
    assert (img[lit[:, 0], lit[:, 1]] == [200, 0, 200]).all()          # tint: 200 * (255, 0, 255) / 255


def test_split_images_are_rendered_from_recorded_sources(fake_root):
    examples = F.make_split("train", 12, 2, seed=3, root=fake_root, rows=2, cols=3, cell=24, border=2)
    images, labels = F.load_fashion("train", root=fake_root)
    for ex in examples:
        occ = ex.sources >= 0
        assert np.array_equal(occ, ex.cells >= 0) and np.array_equal(occ, ex.tints >= 0)
        assert np.array_equal(labels[ex.sources[occ]], ex.cells[occ])
        tiles = np.where(occ[..., None, None], images[np.maximum(ex.sources, 0)], 0).astype(np.uint8)
        colors = F.PALETTE[np.maximum(ex.tints, 0)]
        assert np.array_equal(ex.image, F.render_collage(tiles, colors, 24, 2))


# -------------------------------------------------------------------------------- questions
def expected_answer(ex: F.Example) -> str:
    """The answer recomputed from the cell classes, independently of the generator."""
    rows, cols = ex.cells.shape
    flat = ex.cells.reshape(-1)
    pos = F.position_phrases(rows, cols)
    q = ex.question
    if m := re.fullmatch(r"what is in the ([a-z ]+)\?", q):
        assert ex.qtype == "what"
        k = flat[pos.index(m[1])]
        return F.CLASS_NAMES[k] if k >= 0 else "nothing"
    if m := re.fullmatch(r"how many ([a-z]+) are there\?", q):
        assert ex.qtype == "count"
        return F.NUMBER_WORDS[int((flat == F.CLASS_PLURALS.index(m[1])).sum())]
    if m := re.fullmatch(r"is there a ([a-z]+)\?", q):
        assert ex.qtype == "presence"
        return "yes" if (flat == F.CLASS_NAMES.index(m[1])).any() else "no"
    if m := re.fullmatch(r"where is the ([a-z]+)\?", q):
        assert ex.qtype == "where"
        where = np.flatnonzero(flat == F.CLASS_NAMES.index(m[1]))
        assert len(where) == 1, "where-questions only for classes seen exactly once"
        return pos[where[0]]
    raise AssertionError(f"unknown template: {q!r}")


def check_examples(examples: list[F.Example]) -> None:
    by_image: dict = {}
    for ex in examples:
        assert ex.answer == expected_answer(ex), ex.question
        assert ex.answer in F.answer_vocabulary(*ex.cells.shape)
        by_image.setdefault((ex.split, ex.image_id), []).append(ex)
    for group in by_image.values():
        assert len({e.question for e in group}) == len(group)
        assert all(e.image is group[0].image for e in group)


@pytest.mark.parametrize("grid", [(3, 3), (2, 2), (4, 5)])
def test_answers_consistent_on_generated_split(fake_root, grid):
    examples = F.make_split("test", 40, 3, seed=0, root=fake_root, rows=grid[0], cols=grid[1])
    assert len(examples) == 120
    check_examples(examples)
    assert Counter(e.qtype for e in examples) == dict.fromkeys(F.QTYPES, 30)
    per_image = Counter((e.image_id, e.qtype) for e in examples)
    assert max(per_image.values()) == 1                      # distinct types within an image


def test_many_questions_per_image(fake_root):
    examples = F.make_split("test", 5, 9, seed=2, root=fake_root)
    check_examples(examples)


def test_determinism(fake_root):
    a = F.make_split("test", 20, 2, seed=7, root=fake_root)
    b = F.make_split("test", 20, 2, seed=7, root=fake_root)
    c = F.make_split("test", 20, 2, seed=8, root=fake_root)
    for x, y in zip(a, b, strict=True):
        assert (x.question, x.answer, x.qtype, x.image_id) == (y.question, y.answer, y.qtype, y.image_id)
        for k in ("image", "cells", "sources", "tints"):
            assert np.array_equal(getattr(x, k), getattr(y, k))
    assert any(not np.array_equal(x.image, z.image) for x, z in zip(a, c, strict=True))


@pytest.mark.parametrize(("grid", "items", "expect"), [((3, 3), F.ITEMS, F.ITEMS), ((3, 3), (1, 1), (1, 1)),
                                                     ((2, 2), (2, 5), (2, 4)), ((1, 1), (2, 5), (1, 1))])
def test_items_per_collage(fake_root, grid, items, expect):
    examples = F.make_split("train", 30, 1, seed=4, root=fake_root, rows=grid[0], cols=grid[1], items=items)
    counts = Counter(int((e.cells >= 0).sum()) for e in examples)
    assert set(counts) <= set(range(expect[0], expect[1] + 1))
    assert len(counts) == expect[1] - expect[0] + 1           # every count in the range occurs


def test_bad_arguments(fake_root):
    with pytest.raises(ValueError, match="split"):
        F.make_split("val", 2, 1, 0, root=fake_root)
    with pytest.raises(ValueError, match="n_images"):
        F.make_split("test", 0, 1, 0, root=fake_root)
    with pytest.raises(ValueError, match="rows"):
        F.make_split("test", 2, 1, 0, root=fake_root, rows=5, cols=5)
    for items in [(0, 3), (4, 2), (3,)]:
        with pytest.raises(ValueError, match="items"):
            F.make_split("test", 2, 1, 0, root=fake_root, items=items)


# -------------------------------------------------------------------------------- splits
def test_train_and_test_draw_from_their_own_split(fake_root):
    for split in F.SPLITS:
        _, labels = F.load_fashion(split, root=fake_root)
        for ex in F.make_split(split, 10, 1, seed=0, root=fake_root):
            assert ex.split == split
            occ = ex.sources >= 0
            assert np.array_equal(labels[ex.sources[occ]], ex.cells[occ])
            # train items are vertical bars, test items horizontal: the pixels prove the split
            for r, c in np.argwhere(occ):
                lit = ex.image[r * 28 + 1:(r + 1) * 28 - 1, c * 28 + 1:(c + 1) * 28 - 1].max(-1) > 0
                tall, wide = lit.any(1).sum(), lit.any(0).sum()
                assert (tall > wide) if split == "train" else (wide > tall)


@needs_debian
def test_debian_train_split_is_from_training_images():
    examples = F.make_split("train", 8, 2, seed=0, root=F.DEFAULT_ROOT)
    _, labels = F.load_fashion("train", root=F.DEFAULT_ROOT)
    assert len(labels) == 60000
    sources = np.stack([e.sources for e in examples])
    assert sources.max() < 60000 and (sources >= 0).any()
    for ex in examples:
        occ = ex.sources >= 0
        assert np.array_equal(labels[ex.sources[occ]], ex.cells[occ])
    check_examples(examples)


# -------------------------------------------------------------------------------- files
def test_save_load_roundtrip(fake_root, tmp_path):
    examples = F.make_split("train", 6, 2, seed=1, root=fake_root) + F.make_split("test", 4, 3, seed=1, root=fake_root)
    F.save_examples(tmp_path / "x.npz", examples, meta={"note": "t"})
    back = F.load_examples(tmp_path / "x.npz")
    assert F.load_meta(tmp_path / "x.npz")["note"] == "t"
    assert len(back) == len(examples)
    for x, y in zip(examples, back, strict=True):
        assert (x.question, x.answer, x.qtype, x.split, x.image_id) == (y.question, y.answer, y.qtype, y.split,
                                                                          y.image_id)
        for k in ("image", "cells", "sources", "tints"):
            assert np.array_equal(getattr(x, k), getattr(y, k)) and getattr(y, k).dtype == getattr(x, k).dtype
    with np.load(tmp_path / "x.npz") as z:
        assert z["images"].shape == (10, 84, 84, 3) and z["question"].dtype.kind == "U"


def test_shipped_test_set():
    path = F.default_test_path()
    assert path.is_file() and path.stat().st_size < 3_000_000
    examples = F.load_default_test_set()
    meta = F.load_meta(path)
    n = meta["n_images"] * meta["questions_per_image"]
    assert len(examples) == n == F.DEFAULT_TEST_IMAGES * F.DEFAULT_TEST_QUESTIONS
    assert {e.split for e in examples} == {"test"}
    assert all(e.image.shape == (84, 84, 3) and e.image.dtype == np.uint8 for e in examples)
    sources = np.stack([e.sources for e in examples])
    assert sources.max() < 10000 and (sources[sources >= 0] >= 0).all()
    check_examples(examples)
    types = Counter(e.qtype for e in examples)
    assert types == dict.fromkeys(F.QTYPES, n // 4)
    yn = Counter(e.answer for e in examples if e.qtype == "presence")
    assert yn["yes"] == yn["no"]
    counts = Counter(e.answer for e in examples if e.qtype == "count")
    assert counts["zero"] <= 0.3 * types["count"] and len(counts) >= 4
    what = Counter(e.answer for e in examples if e.qtype == "what")
    assert len(what) == 11 and max(what.values()) <= 2 * min(what.values())
    where = Counter(e.answer for e in examples if e.qtype == "where")
    assert len(where) == 9


@needs_debian
def test_shipped_test_set_is_reproducible_and_from_test_images():
    shipped = F.load_default_test_set()
    rebuilt = F.build_default_test_set(root=F.DEFAULT_ROOT)
    _, labels = F.load_fashion("test", root=F.DEFAULT_ROOT)
    assert len(shipped) == len(rebuilt)
    for x, y in zip(shipped, rebuilt, strict=True):
        assert (x.question, x.answer, x.qtype) == (y.question, y.answer, y.qtype)
        assert np.array_equal(x.image, y.image) and np.array_equal(x.sources, y.sources)
        occ = x.sources >= 0
        assert np.array_equal(labels[x.sources[occ]], x.cells[occ])


# -------------------------------------------------------------------------------- scoring
def test_accuracy_by_type():
    def ex(qtype, answer):
        z = np.zeros((3, 3), np.int64)
        return F.Example(np.zeros((84, 84, 3), np.uint8), "q?", answer, qtype, z, z, z, "test", 0)

    examples = [ex("what", "bag"), ex("what", "nothing"), ex("count", "two"), ex("presence", "yes"),
                ex("where", "top left"), ex("where", "bottom right")]
    preds = ["  Bag ", "bag", "two", "no", "top   LEFT", "bottom"]
    acc = F.accuracy_by_type(preds, examples)
    assert acc == {"what": 0.5, "count": 1.0, "presence": 0.0, "where": 0.5, "overall": 0.5}
    assert list(acc) == ["what", "count", "presence", "where", "overall"]
    with pytest.raises(ValueError, match="predictions"):
        F.accuracy_by_type(preds[:-1], examples)
