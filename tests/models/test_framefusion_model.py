"""FrameFusion end to end on the tiny Qwen2-VL (4 decoder layers) with video prompts: keep=all is the identity, the
official ``cost`` equals the same share as ``keep``, merges (plain means of a slot's frames) then the prune, a batch
equals each sample alone (logits, generation, kept columns), the KV cache holds only the kept tokens, ``remove()``
restores exactly, and the adapter's frame-slot map."""

from __future__ import annotations

import pytest
import torch

import vtoken
from tests.models import contract
from tests.models.contract import logits
from tests.models.tiny_qwen import qwen_media_inputs, tiny_qwen2_vl

LAYERS = 4
#: a video, an image then a video, a short video (t x h x w patches; 2 x 2 merged: 16, 16 + 24, 16 tokens a frame)
MEDIA = [[("video", (4, 8, 8))], [("image", (8, 8)), ("video", (6, 4, 8))], [("video", (2, 8, 8))]]
LENGTHS = [(3, 5), (6, 2), (4, 4)]
GEN = {"max_new_tokens": 3, "do_sample": False}


def static_after_first(inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Every video's temporal groups from the second on are copies of the second (frames 1, 2, ... identical)."""
    pix, out, start = inputs["pixel_values_videos"], [], 0
    for t, h, w in inputs["video_grid_thw"].tolist():
        v = pix[start:start + t * h * w].reshape(t, h * w, -1)
        out.append(v[torch.arange(t).clamp(max=1)].reshape(t * h * w, -1))
        start += t * h * w
    return {**inputs, "pixel_values_videos": torch.cat(out)}


@pytest.fixture(scope="module")
def model():
    return tiny_qwen2_vl(lm_layers=LAYERS)


@pytest.fixture(scope="module")
def media():
    batch, alone = qwen_media_inputs(MEDIA, LENGTHS)
    return static_after_first(batch), [static_after_first(a) for a in alone]


def stage_actions(info: dict) -> list[list[int]]:
    return [r["reduction"].extras["action"].tolist() for r in info["stages"] if "reduction" in r]


def test_keep_all_is_the_identity(model, media):
    batch, _ = media
    contract.check_keep_all(model, batch, "framefusion", lambda last: None, max_new_tokens=GEN["max_new_tokens"])
    with vtoken.apply(model, "framefusion", keep=1.0) as handle:
        logits(model, batch)
        info = handle.last.extras["llm"]
        assert info["lengths"] == [batch["input_ids"].shape[1]] * LAYERS
        assert stage_actions(info) == [[1, 1, 1]]  # cost 1: the first call merges nothing and ends FrameFusion


def test_merges_then_prunes_and_the_batch_equals_each_sample_alone(model, media):
    batch, alone = media
    with vtoken.apply(model, "framefusion", keep=0.3) as handle:
        out = logits(model, batch)
        info = handle.last.extras["llm"]
        actions = stage_actions(info)
        assert actions[0] == [0, 0, 0], "the first call (before layer 0) merges by threshold"
        assert [a[0] for a in actions] == [0, 0, 2], "video 0: frames 2-3 merge at layer 0, a cascade, the prune"
        assert bool(torch.isfinite(out).all())
        length = batch["input_ids"].shape[1]
        for b, one in enumerate(alone):
            got = logits(model, one)
            torch.testing.assert_close(got[0, -1], out[b, -1], atol=2e-5, rtol=1e-4)
            mine = handle.last.extras["llm"]["columns"][0]
            pad = length - one["input_ids"].shape[1]  # left padding
            cols = info["columns"][b]
            assert (cols[cols >= 0] - pad).tolist() == mine[mine >= 0].tolist()
            calls = [r["visual_out"][0] for r in handle.last.extras["llm"]["stages"]]
            in_batch = [r["visual_out"][b] for r in info["stages"]]  # later calls of others leave it as it is
            assert in_batch == calls + calls[-1:] * (len(in_batch) - len(calls))


def test_a_merged_token_is_the_mean_of_its_frames(model, media):
    batch, _ = media
    with vtoken.apply(model, "framefusion", keep=0.3) as handle:
        logits(model, batch)
        video = handle.video  # the clips as they entered the language model (no pre-LLM step: every token)
        first = handle.last.extras["llm"]["stages"][0]["reduction"]
    x = video.tokens[0][video.mask[0]].double()  # sample 0's visual tokens: its one video, 4 frames of 16
    kept, assign = first.indices[0][first.mask[0]], first.assign[0][:64]
    assert kept.tolist() == list(range(32)), "frames 2 and 3 (copies of frame 1) merge into frame 1"
    for j in range(len(kept)):
        members = (assign == j).nonzero()[:, 0]
        torch.testing.assert_close(first.tokens[0, j].double(), x[members].mean(0), atol=1e-6, rtol=1e-5)


def test_official_cost_is_keeps_share(model, media):
    batch, _ = media  # 64, 40 (16 + 24 a frame's slots, 16 image + 48 video) and 32 visual tokens: 0.5 is exact
    with vtoken.apply(model, "framefusion", keep=0.5):
        by_keep = logits(model, batch)
    with vtoken.apply(model, "framefusion", keep=1.0, cost=0.5):
        by_cost = logits(model, batch)
    assert torch.equal(by_keep, by_cost)
    with pytest.raises(ValueError, match="give the budget once"), vtoken.apply(model, "framefusion", keep=0.5,
                                                                                 cost=0.5):
        logits(model, batch)


def test_generation_cache_and_remove(model, media):
    batch, alone = media
    n = GEN["max_new_tokens"]
    contract.check_remove(model, batch, "framefusion", keep=0.3)
    with vtoken.apply(model, "framefusion", keep=0.3) as handle:
        out = model.generate(**batch, **GEN, return_dict_in_generate=True)
        lengths = handle.last.extras["llm"]["lengths"]
        assert lengths[0] < batch["input_ids"].shape[1] and lengths[-1] < lengths[0]
        assert [layer.keys.shape[2] for layer in out.past_key_values.layers] == [v + n - 1 for v in lengths]
        for b, one in enumerate(alone):
            seq = model.generate(**one, **GEN)
            assert torch.equal(out.sequences[b, -n:], seq[0, -n:])


def test_the_adapter_gives_each_video_frame_its_slots(model, media):
    batch, _ = media
    with vtoken.apply(model, "framefusion", keep=0.3) as handle:
        logits(model, batch)
        slots = handle.adapter.llm.slots  # the compacted prompt's columns (no pre-LLM step: the prompt itself)
    ids = batch["input_ids"]
    visual = (ids == 250) | (ids == 251)
    assert bool(((slots >= 0) == visual).all())
    assert slots[0][visual[0]].tolist() == list(range(16)) * 4
    assert slots[1][visual[1]].tolist() == list(range(16)) + list(range(16, 24)) * 6  # an image, then a video
    assert slots[2][visual[2]].tolist() == list(range(16)) * 2
