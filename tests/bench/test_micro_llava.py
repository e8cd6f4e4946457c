"""The micro LLaVA: transformers' own classes, Auto loading, the chat format, the trainer."""

import json
import shutil

import numpy as np
import pytest
import torch

from vtoken.bench import fashion
from vtoken.bench.common import default_model_path
from vtoken.training.micro_llava import (
    EOS_ID,
    IMAGE_ID,
    NUM_IMAGE_TOKENS,
    PAD_ID,
    build_processor,
    build_tokenizer,
    load_micro_llava,
    micro_llava_config,
    pixel_values,
    rendered_prompt,
    vocab,
)
from vtoken.training.train_llava import (
    CHECKPOINT,
    TOWER,
    Conversations,
    TowerHeads,
    augment_collages,
    generate_answers,
    lm_logits,
    teacher_forced_accuracy,
    tower_features,
    tower_readout,
    train_llava,
)

TINY = dict(vision_hidden=16, vision_layers=1, text_hidden=16, text_layers=2, heads=2)


def tiny_model(seed=0):
    from transformers import LlavaForConditionalGeneration

    torch.manual_seed(seed)
    return LlavaForConditionalGeneration(micro_llava_config(**TINY)).eval()


@pytest.fixture(scope="module")
def test_examples():
    return fashion.load_default_test_set()[:12]


@pytest.fixture
def fake_fashion(monkeypatch):
    """Random 'Fashion-MNIST' so training runs without the dataset."""
    rng = np.random.default_rng(0)
    data = {s: (rng.integers(0, 256, (200, 28, 28), dtype=np.uint8), np.arange(200) % 10) for s in fashion.SPLITS}
    monkeypatch.setattr(fashion, "load_fashion", lambda split, root=None: data[split])


def test_vocabulary_covers_every_task_word():
    tok = build_tokenizer()
    v = vocab()
    assert all(w in v for w in fashion.vocabulary())
    for ex in fashion.load_default_test_set()[:50]:
        ids = tok(rendered_prompt(ex.question) + " " + ex.answer, add_special_tokens=False)["input_ids"]
        assert tok.unk_token_id not in ids
        assert ids.count(IMAGE_ID) == 1
        assert tok.decode(tok(ex.answer, add_special_tokens=False)["input_ids"]) == ex.answer


def test_processor_renders_llava_prompt_and_expands_144_image_tokens(test_examples):
    proc = build_processor()
    ex = test_examples[0]
    text = proc.apply_chat_template([{"role": "user", "content": [{"type": "image"}, {"type": "text",
                                     "text": ex.question}]}], add_generation_prompt=True)
    assert text == rendered_prompt(ex.question)
    inputs = proc(images=[e.image for e in test_examples[:3]], text=[rendered_prompt(e.question) for e in
                                                                     test_examples[:3]],
                  return_tensors="pt", padding=True)
    assert ((inputs["input_ids"] == IMAGE_ID).sum(1) == NUM_IMAGE_TOKENS).all()
    assert inputs["input_ids"][0, 0] == build_tokenizer().bos_token_id or inputs["attention_mask"][0, 0] == 0
    expect = pixel_values(np.stack([e.image for e in test_examples[:3]]))
    torch.testing.assert_close(inputs["pixel_values"], expect)


def test_save_and_load_with_auto_classes(tmp_path, test_examples):
    from transformers import AutoModelForImageTextToText, AutoProcessor, LlavaForConditionalGeneration

    model = tiny_model()
    model.save_pretrained(tmp_path)
    build_processor().save_pretrained(tmp_path)
    loaded = AutoModelForImageTextToText.from_pretrained(tmp_path)
    proc = AutoProcessor.from_pretrained(tmp_path)
    assert type(loaded) is LlavaForConditionalGeneration
    assert type(proc).__name__ == "LlavaProcessor"
    assert loaded.model.vision_tower.config.model_type == "clip_vision_model"
    assert loaded.model.language_model.config.model_type == "llama"
    m2, p2 = load_micro_llava(tmp_path)
    ans = generate_answers(m2, p2, test_examples[:2], batch_size=2)
    assert len(ans) == 2 and all(isinstance(a, str) for a in ans)
    with pytest.raises(FileNotFoundError, match="train-micro"):
        load_micro_llava(tmp_path / "missing")


def test_lm_logits_equals_llava_forward(test_examples):
    model = tiny_model()
    conv = Conversations()
    ids, _, mask4, pos = conv.batch([conv.sequence(test_examples[i:i + 1]) for i in (0, 2)])
    mask = (ids != PAD_ID).long()    # single turns: the 4-D mask is causal + padding
    imgs = np.stack([test_examples[i].image for i in (0, 2)])
    with torch.no_grad():
        ours = lm_logits(model, tower_features(model, imgs), ids, mask4, pos)
        ref = model(input_ids=ids, attention_mask=mask, pixel_values=pixel_values(imgs)).logits
    valid = mask.bool()
    torch.testing.assert_close(ours[valid], ref[valid], atol=1e-5, rtol=1e-4)


def test_packed_turns_equal_single_turn_prompts(test_examples):
    """Every turn of a packed training sequence gets the logits of its own single-turn prompt."""
    model = tiny_model(seed=1)
    conv = Conversations()
    turns = test_examples[:3]
    feats = tower_features(model, np.stack([turns[0].image]))
    ids, _, mask, pos = conv.batch([conv.sequence(turns)])
    _, _, turn = conv.sequence(turns)
    with torch.no_grad():
        packed = lm_logits(model, feats, ids, mask, pos)[0]
        for j, ex in enumerate(turns):
            sids, _, smask, spos = conv.batch([conv.sequence([ex])])
            single = lm_logits(model, feats, sids, smask, spos)[0]
            cols = torch.tensor(turn) == j + 1
            head = len(conv.head)
            torch.testing.assert_close(packed[cols], single[head:], atol=1e-5, rtol=1e-4)


def test_conversation_labels_are_answers_only(test_examples):
    conv = Conversations()
    ids, labels, turn = conv.sequence(test_examples[:3])
    assert turn[:len(conv.head)] == [0] * len(conv.head) and max(turn) == 3
    assert ids[:3 + NUM_IMAGE_TOKENS].count(IMAGE_ID) == NUM_IMAGE_TOKENS
    supervised = [t for t in labels if t != -100]
    answers = [t for e in test_examples[:3] for t in [*conv.ids(e.answer), EOS_ID]]
    assert supervised == answers
    # the first turn is exactly the single-turn prompt the processor builds
    tok = build_tokenizer()
    first = tok(rendered_prompt(test_examples[0].question))["input_ids"]
    expanded = [t for i in first for t in ([IMAGE_ID] * NUM_IMAGE_TOKENS if i == IMAGE_ID else [i])]
    assert ids[:len(expanded)] == expanded


def test_describe_turn_lists_every_cell(test_examples):
    conv = Conversations()
    ex = test_examples[0]
    ids, labels, turn = conv.sequence([ex], describe_cells=ex.cells)
    assert max(turn) == 2
    last = [i for i, t in zip(ids, turn, strict=True) if t == 2]
    reply = conv.ids(fashion.describe(ex.cells))
    assert last == [*conv.ids(fashion.DESCRIBE), *conv.assistant, *reply, EOS_ID]
    assert [t for t in labels if t != -100] == [*conv.ids(ex.answer), EOS_ID, *reply, EOS_ID]
    assert len(reply) == 3 * ex.cells.size                      # "row column content" per cell


def test_shuffled_describe_turn_labels_only_the_contents(test_examples):
    conv = Conversations()
    ex = test_examples[0]
    order = np.arange(ex.cells.size)[::-1]
    ids, labels, turn = conv.sequence([ex], describe_cells=ex.cells, describe_order=order)
    last = [i for i, t in zip(ids, turn, strict=True) if t == 2]
    reply = conv.ids(fashion.describe(ex.cells, order))
    assert last == [*conv.ids(fashion.DESCRIBE), *conv.assistant, *reply, EOS_ID]
    contents = [t for _, what in fashion.describe_pairs(ex.cells, order) for t in conv.ids(what)]
    assert len(contents) == ex.cells.size
    assert [t for t in labels if t != -100] == [*conv.ids(ex.answer), EOS_ID, *contents, EOS_ID]


def _cells(images: np.ndarray) -> np.ndarray:
    return images.reshape(len(images), 3, 28, 3, 28, 3).transpose(0, 1, 3, 2, 4, 5)


def test_augment_collages_moves_pictures_within_their_cells(test_examples):
    x = np.stack([e.image for e in test_examples[:8]])
    truth = np.stack([e.cells for e in test_examples[:8]])
    a = augment_collages(x, np.random.default_rng(0))
    assert a.shape == x.shape and a.dtype == np.uint8 and not np.array_equal(a, x)
    assert np.array_equal(a, augment_collages(x, np.random.default_rng(0)))
    grid = np.isin(np.arange(84) % 28, (0, 27))
    assert np.array_equal(a[:, grid], x[:, grid]) and np.array_equal(a[:, :, grid], x[:, :, grid])
    assert (_cells(a)[truth < 0] == _cells(x)[truth < 0]).all()               # empty cells stay empty
    flipped = _cells(augment_collages(x, np.random.default_rng(1), shift=0))
    same = (flipped == _cells(x)).all((3, 4, 5))
    mirrored = (flipped == _cells(x)[:, :, :, :, ::-1]).all((3, 4, 5))
    assert (same | mirrored).all() and not same[truth >= 0].all()
    with pytest.raises(ValueError, match=r"\[n, 84, 84, 3\]"):
        augment_collages(x[:, :80], np.random.default_rng(0))


def test_teacher_forced_accuracy_equals_generate(test_examples):
    model = tiny_model(seed=3)
    proc = build_processor()
    conv = Conversations()
    feats = tower_features(model, np.stack([e.image for e in test_examples]))
    tf = teacher_forced_accuracy(model, feats, test_examples, conv, batch_size=5)
    gen = fashion.accuracy_by_type(generate_answers(model, proc, test_examples, batch_size=5), test_examples)
    assert tf == gen


def test_tower_heads_loss_targets():
    heads = TowerHeads(8)
    cells = torch.full((2, 3, 3), -1)
    cells[0, 0, 0] = 4
    hidden = torch.zeros(2, 1 + NUM_IMAGE_TOKENS, 8, requires_grad=True)
    loss, info = heads.loss(hidden, cells)
    loss.backward()
    assert torch.isfinite(loss) and 0 <= info["patch_acc"] <= 1
    assert hidden.grad is not None and hidden.grad.abs().sum() > 0


def test_tower_readout_answers_from_the_cells_the_heads_read(test_examples):
    model = tiny_model()
    heads = TowerHeads(model.config.vision_config.hidden_size)
    truth = torch.as_tensor(np.stack([e.cells for e in test_examples]))
    heads.read_cells = lambda hidden: truth                                   # a perfect reader
    assert set(tower_readout(model, heads, test_examples).values()) == {1.0}
    heads.read_cells = lambda hidden: torch.full_like(truth, -1)              # sees nothing
    out = tower_readout(model, heads, test_examples)
    assert out["item"] == 0.0 and out["where"] == 0.0
    by_type = {t: [e for e in test_examples if e.qtype == t] for t in ("what", "presence")}
    assert out["what"] == pytest.approx(np.mean([e.answer == "nothing" for e in by_type["what"]]))
    assert out["presence"] == pytest.approx(np.mean([e.answer == "no" for e in by_type["presence"]]))


def test_train_llava_runs_saves_and_resumes_bit_exact(tmp_path, fake_fashion):
    kw = dict(images=6, turns=2, tower_steps=2, tower_batch=3, lm_steps=3, lm_batch=2,
              config=micro_llava_config(**TINY),
              eval_every=2, eval_limit=4, progress=False, log=None, checkpoint_every=1)
    full = train_llava(tmp_path / "a", **kw)
    assert full["finished"] and set(full["test"]) == {*fashion.QTYPES, "overall"}
    part = train_llava(tmp_path / "b", stop_after=3, **kw)
    assert not part["finished"] and (tmp_path / "b" / CHECKPOINT).is_file()
    rest = train_llava(tmp_path / "b", **kw)
    assert rest["finished"]
    from safetensors.torch import load_file

    a, b = load_file(tmp_path / "a" / "model.safetensors"), load_file(tmp_path / "b" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert json.loads((tmp_path / "a" / "metrics.json").read_text())["test"] == full["test"]
    with pytest.raises(ValueError, match="other arguments"):
        train_llava(tmp_path / "b", **{**kw, "lm_steps": 4})
    # a run differing only in stage 2 and in its language model starts from the stage-1 snapshot
    (tmp_path / "c").mkdir()
    shutil.copy(tmp_path / "a" / TOWER, tmp_path / "c" / TOWER)
    other = micro_llava_config(**{**TINY, "text_hidden": 24})
    again = train_llava(tmp_path / "c", **{**kw, "config": other, "lm_lr": 1e-3, "describe": "shuffled"})
    tower_entries = [h for h in full["history"] if h["stage"] == "tower"]
    assert again["finished"] and [h for h in again["history"] if h["stage"] == "tower"] == tower_entries
    c = load_file(tmp_path / "c" / "model.safetensors")
    assert all(torch.equal(a[k], c[k]) for k in a if k.startswith("model.vision_tower."))
    with pytest.raises(ValueError, match="describe"):
        train_llava(tmp_path / "e", **{**kw, "describe": "sorted"})
    with pytest.raises(ValueError, match="other arguments"):
        (tmp_path / "d").mkdir()
        shutil.copy(tmp_path / "a" / TOWER, tmp_path / "d" / TOWER)
        train_llava(tmp_path / "d", **{**kw, "tower_lr": 1e-4})
    with pytest.raises(ValueError, match="tower_augment"):
        train_llava(tmp_path / "d", **{**kw, "tower_augment": True})
    # stage 1 with per-cell augmentation trains another tower from the same seed
    aug = train_llava(tmp_path / "f", **{**kw, "tower_augment": True, "stop_after": 2})
    assert not aug["finished"] and aug["stage"] == "tower" and aug["step"] == 2
    f = torch.load(tmp_path / "f" / CHECKPOINT, weights_only=False)["model"]
    patch = [k for k in (*f, *a) if k.endswith("vision_tower.embeddings.patch_embedding.weight")]
    assert len(patch) == 2 and not torch.equal(f[patch[0]], a[patch[1]])


def test_shipped_model_loads_and_is_big_enough():
    path = default_model_path()
    if not (path / "config.json").is_file():
        pytest.skip("no shipped micro LLaVA in this checkout")
    model, _proc = load_micro_llava()
    assert type(model).__name__ == "LlavaForConditionalGeneration"
    assert model.config.image_seq_length >= 144
    metrics = json.loads((path / "metrics.json").read_text())
    assert set(metrics["test"]) >= {*fashion.QTYPES, "overall"}
