"""vtoken.bench.clips (Fashion clips video QA): answers read back from the rendered frames, balance and majority
baselines, split disjointness, determinism, the compact file format and the shipped test clips. Uses the fake
Fashion-MNIST of ``test_fashion``; checks against the real data run only where the Debian package's files exist."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

from tests.bench.test_fashion import fake_root, needs_debian  # noqa: F401 - the fixture
from vtoken.bench import clips as C
from vtoken.bench import fashion as F

N = 140  # 20 clips per question type


@pytest.fixture(scope="module")
def test_clips(fake_root):  # noqa: F811
    return C.make_clips("test", N, seed=3, root=fake_root, questions_per_clip=2)


def cell_box(spec: C.ClipSpec, cell: int, index: int) -> tuple[slice, slice]:
    r, c = divmod(index, spec.cols)
    return slice(r * cell + C.BORDER, (r + 1) * cell - C.BORDER), slice(c * cell + C.BORDER, (c + 1) * cell - C.BORDER)


def occupied(ex: C.ClipExample, frame: int) -> np.ndarray:
    """``[rows * cols]`` bool: cells whose interior holds any lit pixel in ``frame`` (read from the pixels)."""
    return np.array([ex.frames[frame][cell_box(ex.spec, C.CELL, i)].any() for i in range(ex.spec.rows * ex.spec.cols)])


def test_answers_read_back_from_the_frames(test_clips):
    """Every answer against what the pixels (and the object table for identities) show, frame by frame."""
    for ex in test_clips:
        spec, frames = ex.spec, ex.frames
        assert frames.shape == (C.STEPS * C.HOLD, C.ROWS * C.CELL, C.COLS * C.CELL, 3)
        assert all(np.array_equal(frames[2 * s], frames[2 * s + 1]) for s in range(C.STEPS))  # held for 2 frames
        cls = spec.field("cls")
        if ex.qtype == "change":
            assert ex.answer == ("no" if np.array_equal(frames[0], frames[-1]) else "yes")
        elif ex.qtype == "count":
            assert ex.answer == F.NUMBER_WORDS[len(cls)] and len(set(cls.tolist())) == len(cls)
        elif ex.qtype == "presence":
            name = ex.question.split()[2]
            assert ex.answer == ("yes" if F.CLASS_NAMES.index(name) in cls.tolist() else "no")
        elif ex.qtype == "end":
            phrase = ex.question[len("what is in the "):-len(" at the end?")]
            i = F.position_phrases(spec.rows, spec.cols).index(phrase)
            assert (ex.answer == F.NOTHING) == (not occupied(ex, -1)[i])
        elif ex.qtype in ("first", "last"):
            lit = np.array([occupied(ex, f).sum() for f in range(0, len(frames), C.HOLD)])
            i = cls.tolist().index(F.CLASS_NAMES.index(ex.answer))
            appear, home = int(spec.field("appear")[i]), int(spec.field("cell")[i])
            assert occupied(ex, C.HOLD * appear)[home]
            assert appear == 0 or not occupied(ex, C.HOLD * (appear - 1))[home]
            if ex.qtype == "first":
                assert lit[:appear].sum() == 0 and lit[appear] == 1  # alone on screen when it appears
            else:
                others = np.delete(spec.field("appear"), i)
                assert (others < appear).all()
        elif ex.qtype == "moves":
            movers = cls[spec.field("move_step") >= 0]
            assert ex.answer == (F.CLASS_NAMES[int(movers[0])] if len(movers) else F.NOTHING)
            if len(movers):  # the mover's home cell empties and its new cell fills at the move step
                i = int(np.flatnonzero(spec.field("move_step") >= 0)[0])
                step, home, new = (int(spec.objects[i, C.FIELDS.index(f)]) for f in ("move_step", "cell",
                                                                                       "move_cell"))
                before, after = occupied(ex, C.HOLD * (step - 1)), occupied(ex, C.HOLD * step)
                assert before[home] and not before[new] and after[new] and not after[home]
        assert (ex.question, ex.answer) in C.candidate_questions(spec)[ex.qtype]


def test_answers_are_balanced_and_priors_do_not_solve_a_type(fake_root):  # noqa: F811
    firsts = C.make_clips("test", N, seed=4, root=fake_root)
    types = Counter(ex.qtype for ex in firsts)
    assert set(types) == set(C.QTYPES) and max(types.values()) - min(types.values()) <= 1
    for t in C.QTYPES:
        answers = Counter(ex.answer for ex in firsts if ex.qtype == t)
        assert set(answers) <= set(C.answer_options(t))
        assert max(answers.values()) - min(answers.values()) <= 1, (t, answers)
    base = C.majority_baseline(firsts)
    for t in C.QTYPES:
        assert base[t][1] <= 1 / len(C.answer_options(t)) + 0.06, (t, base[t])
    assert base["overall"][1] < 0.3


def test_train_and_test_clips_use_their_own_split(fake_root):  # noqa: F811
    """The fake data draws train items as vertical bars and test items as horizontal ones: every tile of a clip
    is an item of its split, at its recorded source index."""
    for split in C.SPLITS:
        images, labels = F.load_fashion(split, fake_root)
        for ex in C.make_clips(split, 30, seed=1, root=fake_root):
            src = ex.spec.field("source")
            assert ex.split == split and np.array_equal(ex.tiles, images[src])
            assert np.array_equal(labels[src], ex.spec.field("cls"))
            outside = ex.tiles[:, :, [*range(10), *range(18, 28)]] if split == "train" else \
                ex.tiles[:, [*range(10), *range(18, 28)], :]
            assert not outside.any()  # vertical bars only in train, horizontal only in test


def test_deterministic_in_the_seed(fake_root):  # noqa: F811
    a, b = (C.make_clips("test", 12, seed=5, root=fake_root) for _ in range(2))
    c = C.make_clips("test", 12, seed=6, root=fake_root)
    key = [(e.question, e.answer, e.spec.objects.tolist()) for e in a]
    assert key == [(e.question, e.answer, e.spec.objects.tolist()) for e in b]
    assert key != [(e.question, e.answer, e.spec.objects.tolist()) for e in c]
    assert all(np.array_equal(x.frames, y.frames) for x, y in zip(a, b, strict=True))


def test_save_and_load_round_trip(test_clips, tmp_path):
    path = tmp_path / "clips.npz"
    C.save_clips(path, test_clips, {"note": "x"})
    back = C.load_clips(path)
    assert len(back) == len(test_clips)
    for x, y in zip(back, test_clips, strict=True):
        assert (x.question, x.answer, x.qtype, x.split, x.clip_id) == (y.question, y.answer, y.qtype, y.split,
                                                                        y.clip_id)
        assert np.array_equal(x.frames, y.frames) and np.array_equal(x.spec.objects, y.spec.objects)
    assert back[0].frames is back[1].frames  # a clip's questions share its frames
    assert path.stat().st_size < 40 * len(test_clips) * 1024 // 10  # tables and tiles, not frames


def test_vocabulary_covers_every_question_and_answer(test_clips):
    vocab = set(C.vocabulary())
    for ex in test_clips:
        assert set(F.words(ex.question)) | set(F.words(ex.answer)) <= vocab


def test_errors_name_the_argument(fake_root):  # noqa: F811
    with pytest.raises(ValueError, match="split must be one of"):
        C.make_clips("val", 2, 0, root=fake_root)
    with pytest.raises(ValueError, match="questions_per_clip"):
        C.make_clips("test", 2, 0, root=fake_root, questions_per_clip=8)
    with pytest.raises(ValueError, match="steps must be >= 3"):
        C.make_clips("test", 2, 0, root=fake_root, steps=2)
    with pytest.raises(ValueError, match="objects must be"):
        C.make_clips("test", 2, 0, root=fake_root, objects=(0, 3))


def test_shipped_test_clips_load_without_the_dataset():
    examples = C.load_default_test_set()
    assert len(examples) == C.DEFAULT_TEST_CLIPS
    assert Counter(e.qtype for e in examples) == {t: C.DEFAULT_TEST_CLIPS // len(C.QTYPES) for t in C.QTYPES}
    assert {e.split for e in examples} == {"test"}
    assert C.default_test_path().stat().st_size < 3_000_000


@needs_debian
def test_shipped_test_clips_are_the_rebuilt_ones():
    shipped, rebuilt = C.load_default_test_set(), C.build_default_test_set()
    assert [(e.question, e.answer, e.spec.objects.tolist()) for e in shipped] == \
        [(e.question, e.answer, e.spec.objects.tolist()) for e in rebuilt]
    assert all(np.array_equal(a.frames, b.frames) for a, b in zip(shipped[:20], rebuilt[:20], strict=True))
