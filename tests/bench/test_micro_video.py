"""The micro video VLM (``vtoken.training.micro_video``) and its trainer: transformers' own classes loaded with the
Auto classes, the processor's arithmetic against transformers' own image processor, the training forward against
the model's forward, and a tiny seeded run that resumes to the same weights."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import vtoken
from vtoken.bench import clips as C
from vtoken.bench import videoqa as V
from vtoken.training import micro_video as M
from vtoken.training import train_video as TV

TINY = {"vision_hidden": 32, "vision_layers": 2, "text_hidden": 64, "text_layers": 2}


@pytest.fixture(scope="module")
def examples():
    return C.load_default_test_set()[:4]


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    path = tmp_path_factory.mktemp("micro_video")
    M.save_micro_video(M.build_model(**TINY), path)
    return path


def test_saved_model_loads_with_the_auto_classes(saved, examples):
    from transformers import AutoConfig, AutoModelForImageTextToText, AutoTokenizer

    assert type(AutoModelForImageTextToText.from_pretrained(saved)).__name__ == "Qwen2_5_VLForConditionalGeneration"
    cfg = AutoConfig.from_pretrained(saved)
    assert cfg.vision_config.temporal_patch_size == 2 and cfg.vision_config.patch_size == V.PATCH
    tok = AutoTokenizer.from_pretrained(saved)
    assert tok.chat_template == V.CHAT_TEMPLATE
    files = {p.name for p in saved.iterdir()}
    assert {"preprocessor_config.json", "video_preprocessor_config.json", "processor_config.json"} <= files
    video = json.loads((saved / "video_preprocessor_config.json").read_text())
    assert video["video_processor_type"] == "Qwen2VLVideoProcessor" and video["merge_size"] == V.MERGE
    model, proc = V.load_video_model(saved)
    batch = proc([e.frames for e in examples], [e.question for e in examples])
    assert int((batch["input_ids"][0] == V.VIDEO_ID).sum()) == C.STEPS * V.TOKENS_PER_STEP >= 400
    assert examples[0].frames.shape[0] >= 8
    with torch.no_grad():
        out = model.generate(**batch, max_new_tokens=2, do_sample=False)
    assert out.shape == (4, batch["input_ids"].shape[1] + 2)


def test_prompt_tokens_are_the_chat_template_s(saved):
    from transformers import AutoTokenizer

    proc = V.MicroVideoProcessor(AutoTokenizer.from_pretrained(saved))
    ids = proc.tokenizer(proc.prompt("what appears first?"), add_special_tokens=False)["input_ids"]
    words = proc.tokenizer.convert_ids_to_tokens(ids)
    assert words == ["<|im_start|>", "user", "<|vision_start|>", "<|video_pad|>", "<|vision_end|>", "what",
                     "appears", "first", "?", "<|im_end|>", "<|im_start|>", "assistant"]
    assert "<unk>" not in words


def test_video_pixels_follow_transformers_layout(examples):
    """Held frames (two equal frames a temporal patch): each temporal patch's rows are what transformers' own
    Qwen2-VL image processor gives for that frame (which repeats a frame over the temporal patch)."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    ip = Qwen2VLImageProcessorPil(patch_size=V.PATCH, temporal_patch_size=V.TEMPORAL, merge_size=V.MERGE,
                                  min_pixels=196, max_pixels=4 * V.FRAME ** 2, image_mean=list(V.MEAN),
                                  image_std=list(V.STD))
    frames = examples[0].frames
    px, grid = V.video_pixels(frames)
    assert grid.tolist() == [C.STEPS, V.GRID, V.GRID]
    per = V.GRID * V.GRID
    for t in range(C.STEPS):
        ref = ip(images=[frames[2 * t]], return_tensors="pt")
        assert ref["image_grid_thw"].tolist() == [[1, V.GRID, V.GRID]]
        torch.testing.assert_close(px[t * per:(t + 1) * per], ref["pixel_values"], atol=1e-5, rtol=0)
    # two different frames of a pair land in the two halves of each row's temporal axis
    pair = np.stack([frames[0], 255 - frames[0]])
    rows, _ = V.video_pixels(pair)
    rows = rows.reshape(per, 3, V.TEMPORAL, V.PATCH, V.PATCH)
    a, b = (V.video_pixels(np.stack([f, f]))[0].reshape(per, 3, V.TEMPORAL, V.PATCH, V.PATCH) for f in pair)
    torch.testing.assert_close(rows[:, :, 0], a[:, :, 0])
    torch.testing.assert_close(rows[:, :, 1], b[:, :, 1])


def test_the_training_forward_is_the_model_s_forward(saved, examples):
    """Isolated turns with hand-placed M-RoPE positions and a 4-D mask give, for a single turn, exactly the logits
    of the model's own forward on the processor's prompt (which computes its positions with get_rope_index)."""
    model, proc = V.load_video_model(saved)
    seqs = TV.Sequences(model, C.STEPS * V.TOKENS_PER_STEP)
    with torch.no_grad():
        feats, grid = TV.clip_features(model, [e.frames for e in examples])
        ids, _, mask, pos = seqs.batch([[(e.question, e.answer)] for e in examples], grid)
        got = TV.lm_logits(model, feats, ids, mask, pos)
        batch = proc([e.frames for e in examples], [e.question for e in examples])
        ref = model(**batch).logits
        for b in range(len(examples)):
            n = int(batch["attention_mask"][b].sum())
            assert ids[b, :n].tolist() == batch["input_ids"][b, -n:].tolist()
            torch.testing.assert_close(got[b, :n], ref[b, -n:], atol=1e-5, rtol=1e-5)
        # a second turn sees the clip and itself only: its logits equal the same question asked alone
        ids2, _, mask2, pos2 = seqs.batch([[(examples[1].question, examples[1].answer),
                                            (examples[0].question, examples[0].answer)]], grid[:1])
        second = TV.lm_logits(model, feats[:1], ids2, mask2, pos2)
        n0, head = int(batch["attention_mask"][0].sum()), len(seqs.prefix)
        start = ids2.shape[1] - (n0 - head) - 2  # the second turn: its prompt, then "answer <|im_end|>"
        torch.testing.assert_close(second[0, start:start + n0 - head], got[0, head:n0], atol=1e-5, rtol=1e-5)


def test_token_labels_follow_the_cells():
    spec = C.ClipSpec(np.array([[4, 0, 0, 1, 6, 0, 3, 8]]))  # a coat in the top left from step 1, moves at step 3
    lab = TV.token_labels(spec, V.GRID // V.MERGE).reshape(C.STEPS, 9, 9)
    assert (lab[0] == 10).all()
    assert (lab[1, :3, :3] == 4).all() and (lab[1][3:] == 10).all()
    assert (lab[3, 6:, 6:] == 4).all() and (lab[3, :3, :3] == 10).all()


def test_the_micro_video_model_runs_under_vtoken(saved, examples):
    model, proc = V.load_video_model(saved)
    batch = proc([e.frames for e in examples], [e.question for e in examples])
    with vtoken.apply(model, "evs", keep=0.25) as handle, torch.no_grad():
        model.generate(**batch, max_new_tokens=2, do_sample=False)
        assert handle.video.extras["frame_counts"].shape == (4, C.STEPS)
        assert int(handle.video.mask.sum(1).max()) <= round(0.25 * 486) + 1


def test_training_is_seeded_and_resumes_to_the_same_weights(tmp_path):
    kw = dict(clips=40, tower_steps=2, lm_steps=2, tower_batch=2, lm_batch=2, eval_every=2, eval_limit=7,
              test_limit=14, checkpoint_every=1, progress=False, config=TINY, log=lambda _s: None)
    whole = TV.train_video(tmp_path / "a", **kw)
    TV.train_video(tmp_path / "b", budget=3, **kw)
    part = TV.train_video(tmp_path / "b", **kw)
    assert whole["finished"] and part["finished"]
    a = torch.load(tmp_path / "a" / "checkpoint.pt", weights_only=False)["model"]
    b = torch.load(tmp_path / "b" / "checkpoint.pt", weights_only=False)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert set(whole["test"]) == {*C.QTYPES, "overall"} and whole["test_questions"] == 14
    assert set(whole["majority_baseline"]) == {*C.QTYPES, "overall"}
    with pytest.raises(ValueError, match="other arguments"):
        TV.train_video(tmp_path / "b", **{**kw, "lm_lr": 1e-4})

