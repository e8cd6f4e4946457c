"""Videos through ``vtoken.apply``: the shared contract for every video family x video method (and image methods run
per frame): keep=all is identical, ``remove()`` is exact, a batch of clips of different lengths and frame sizes mixed
with images equals each sample alone, kept tokens keep their original positions (M-RoPE t/h/w against a hand-built
reference), the cache holds only the kept tokens, sdpa and eager select the same tokens."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest
import torch
from torch import Tensor, nn

import vtoken
from tests.models import contract
from tests.models.contract import kept_rows, logits
from tests.models.tiny_qwen import TINY as QWEN
from tests.models.tiny_qwen import VIDEO_TOKEN as QWEN_VIDEO
from tests.models.tiny_qwen import VISION_START, qwen_media_inputs
from vtoken.models.qwen2_vl import Qwen2VLAdapter

GEN = {"max_new_tokens": 2, "do_sample": False}
Inputs = dict[str, Tensor]


@dataclass(frozen=True)
class VideoFamily:
    """What the contract needs of a family: a builder, a mixed image + video batch with each sample alone, and the
    model's own visual features and original positions (for the hand-built reference)."""

    build: Callable[..., nn.Module]
    inputs: Callable[[], tuple[Inputs, list[Inputs]]]
    adapter: Any
    #: (model, inputs) -> (embeddings with every image / video feature at its placeholder [B, L, D], video columns
    #: [B, L] bool, image columns [B, L] bool, position ids fn (b, columns) -> the ids the LM gets for those columns)
    reference: Callable[[nn.Module, Inputs], tuple[Tensor, Tensor, Tensor, Callable[[int, Tensor], Tensor]]]


def _qwen_inputs(seconds: bool) -> Callable[[], tuple[Inputs, list[Inputs]]]:
    def make() -> tuple[Inputs, list[Inputs]]:
        # clips of 4, 3 and 2 frames (T = temporal patches), two frame sizes (2 x 2 and 2 x 4 merged tokens), one
        # sample with an image before its video, left padding, different prompts
        return qwen_media_inputs([[("video", (4, 4, 4))], [("image", (4, 4)), ("video", (3, 4, 8))],
                                  [("video", (2, 4, 4))]], [(3, 2), (2, 4), (5, 1)], seed=11,
                                 seconds=[1.0, 2.0, 0.5] if seconds else None)
    return make


@torch.no_grad()
def _qwen_reference(model: nn.Module, inputs: Inputs) -> tuple[Tensor, Tensor, Tensor, Callable[[int, Tensor], Tensor]]:
    cfg = model.config
    ids = inputs["input_ids"]
    embeds = model.get_input_embeddings()(ids)
    image, video = ids == cfg.image_token_id, ids == cfg.video_token_id
    if "pixel_values" in inputs:
        feats = model.model.get_image_features(inputs["pixel_values"], inputs["image_grid_thw"]).pooler_output
        embeds[image] = torch.cat(list(feats))
    feats = model.model.get_video_features(inputs["pixel_values_videos"], inputs["video_grid_thw"]).pooler_output
    embeds[video] = torch.cat(list(feats))
    kw = {"second_per_grid_ts": inputs["second_per_grid_ts"]} if "second_per_grid_ts" in inputs else {}
    pos, _ = model.model.get_rope_index(ids, inputs["mm_token_type_ids"], image_grid_thw=inputs.get("image_grid_thw"),
                                        video_grid_thw=inputs["video_grid_thw"],
                                        attention_mask=inputs["attention_mask"], **kw)
    return embeds, video, image, lambda b, columns: pos[:, b : b + 1, columns]


FAMILIES = {
    "qwen2_vl": VideoFamily(QWEN["qwen2_vl"], _qwen_inputs(False), Qwen2VLAdapter, _qwen_reference),
    "qwen2_5_vl": VideoFamily(QWEN["qwen2_5_vl"], _qwen_inputs(True), Qwen2VLAdapter, _qwen_reference),
}
#: every method that reads a video's frame layout, and image methods per frame (token-, attention- and grid-based)
VIDEO_METHODS = contract.supported(Qwen2VLAdapter, video=True)
PER_FRAME = ["divprune", "visionzip", "pool", "uniform"]
METHODS = VIDEO_METHODS + PER_FRAME
KEEP = {"pool": 0.25, "uniform": 2}  # others: half the clip (a video method) or of each frame (an image method)


def keep_of(method: str) -> int | float:
    return KEEP.get(method, 0.5)


@pytest.fixture(scope="module")
def models() -> dict[str, nn.Module]:
    return {name: fam.build() for name, fam in FAMILIES.items()}


@pytest.fixture(scope="module")
def media() -> dict[str, tuple[Inputs, list[Inputs]]]:
    return {name: fam.inputs() for name, fam in FAMILIES.items()}


@pytest.fixture(scope="module")
def reference(models, media) -> dict[str, tuple[Tensor, Tensor]]:
    with torch.no_grad():
        return {name: (m(**media[name][0]).logits, m.generate(**media[name][0], **GEN)) for name, m in models.items()}


def test_every_video_method_is_in_the_contract():
    assert {"evs", "vidcom2", "dycoke", "sttm", "frame_stride", "temporal_pool"} <= set(VIDEO_METHODS)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("method", METHODS)
def test_keep_all_is_identical_and_remove_restores(models, media, reference, family, method):
    model, (batch, _) = models[family], media[family]
    ref, gen_ref = reference[family]
    n = batch["video_grid_thw"].prod(-1) // 4
    with vtoken.apply(model, method, keep=1.0) as handle:
        assert torch.equal(logits(model, batch), ref)
        assert kept_rows(handle.video.indices) == [list(range(int(k))) for k in n]
        assert torch.equal(model.generate(**batch, **GEN), gen_ref)
    contract.check_remove(model, batch, method, keep_of(method), reference=ref)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("method", METHODS)
def test_batch_equals_each_sample(models, media, family, method):
    """Clips of 4, 3 and 2 frames and two frame sizes, an image in one sample, different prompts: each sample alone
    gives the same logits and keeps the same tokens of its clip (and of its image)."""
    model, (batch, alone) = models[family], media[family]
    with vtoken.apply(model, method, keep=keep_of(method)) as handle:
        got = logits(model, batch)[:, -1]
        clips, images = kept_rows(handle.video.indices), kept_rows(handle.last.indices)
        counts = handle.video.extras["frame_counts"]
        for b, one in enumerate(alone):
            torch.testing.assert_close(logits(model, one)[0, -1], got[b], atol=2e-5, rtol=1e-4)
            assert kept_rows(handle.video.indices) == [clips[b]]
            t = int(one["video_grid_thw"][0, 0])
            assert handle.video.extras["frame_counts"][0].tolist() == counts[b, :t].tolist()
            if "pixel_values" in one:
                assert kept_rows(handle.last.indices) == [images[0]]
    frames = batch["video_grid_thw"][:, 0]
    assert counts.sum(1).tolist() == [len(r) for r in clips]
    for b, t in enumerate(frames.tolist()):
        assert counts[b, t:].sum() == 0  # padded frames keep nothing


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("method", ["evs", "vidcom2", "divprune", "uniform"])
def test_kept_tokens_keep_their_positions(models, media, family, method):
    """The reduced logits equal the model on its own full embeddings at only the text and kept columns, with the
    ORIGINAL position ids of those columns (M-RoPE from the unreduced prompt)."""
    model, (batch, _) = models[family], media[family]
    with vtoken.apply(model, method, keep=keep_of(method)) as handle:
        got = logits(model, batch)
        clips, last, video_rows = handle.video, handle.last, handle.video.indices.shape[0]
    embeds, video, image, pos = FAMILIES[family].reference(model, batch)
    assert video_rows == batch["video_grid_thw"].shape[0]
    n_video = (batch["video_grid_thw"].prod(-1) // 4).tolist()
    keep = contract.kept_columns(video, kept_rows(clips.indices), n_video)
    if last is not clips:
        n_image = (batch["image_grid_thw"].prod(-1) // 4).tolist()
        keep &= contract.kept_columns(image, kept_rows(last.indices), n_image)
    real = contract.check_hand_built(model, got, embeds, keep, batch["attention_mask"], pos)
    for b in range(len(real)):
        assert int(real[b].sum()) < int(batch["attention_mask"][b].sum())


@pytest.mark.parametrize("family", FAMILIES)
def test_mrope_ids_of_kept_video_tokens_by_hand(models, family):
    """One clip alone: the (t, h, w) ids the language model receives for the kept video tokens are ``start + 1 +
    (t * second_per_grid * tokens_per_second, row, column)`` (Qwen2-VL: ``t``), built by hand."""
    model = models[family]
    seconds = family == "qwen2_5_vl"
    batch, _ = qwen_media_inputs([[("video", (3, 4, 8))]], [(4, 3)], seed=2, seconds=[2.0] if seconds else None)
    seen: list[Tensor] = []

    def hook(_module, _args, kwargs):
        seen.append(kwargs["position_ids"])

    h = model.model.language_model.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        with vtoken.apply(model, "evs", keep=0.5) as handle:
            logits(model, batch)
            kept = handle.video.indices[0][handle.video.mask[0]]
    finally:
        h.remove()
    pos = seen[0][-3:, 0]  # [3, L'] (a leading text row dropped)
    ids = batch["input_ids"][0]
    start = int((ids == VISION_START).nonzero()[0, 0])
    scale = 2.0 * model.config.vision_config.tokens_per_second if seconds else 1.0
    t, rows, cols = kept // (2 * 4), (kept % 8) // 4, kept % 4
    want = torch.stack([(t * scale).long(), rows, cols]) + start + 1
    video_cols = start + 1 + torch.arange(len(kept))  # the compacted prompt: text, start, the kept tokens, ...
    assert torch.equal(pos[:, video_cols], want)
    assert int((ids == QWEN_VIDEO).sum()) == 3 * 8 and len(kept) == 12


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("method", ["evs", "dycoke", "divprune"])
def test_cache_holds_only_kept_tokens(models, media, family, method):
    model, (batch, _) = models[family], media[family]
    with vtoken.apply(model, method, keep=keep_of(method)) as handle:
        out = model.generate(**batch, **GEN, return_dict_in_generate=True)
        video = torch.zeros(3, dtype=torch.long).index_add_(0, torch.arange(3), handle.video.mask.sum(1))
        image = torch.zeros(3, dtype=torch.long).index_add_(0, torch.tensor([1]), handle.last.mask.sum(1))
    cfg = model.config
    ids = batch["input_ids"]
    text = ((ids != cfg.image_token_id) & (ids != cfg.video_token_id)).sum(1)
    prefill = int((text + video + image).max())
    assert out.past_key_values.get_seq_length() == prefill + GEN["max_new_tokens"] - 1


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("method", ["evs", "visionzip"])
def test_sdpa_and_eager_select_identical_tokens(media, family, method):
    batch = media[family][0]
    chosen = []
    for attn in ("sdpa", "eager"):
        m = FAMILIES[family].build(attn=attn)
        with vtoken.apply(m, method, keep=keep_of(method)) as handle:
            logits(m, batch)
            chosen.append(handle.video.indices.clone())
    assert torch.equal(chosen[0], chosen[1])


@pytest.mark.parametrize("family", FAMILIES)
def test_video_method_leaves_images_and_text_alone(models, media, family):
    """A video method reduces only the clips: the image keeps every token; handle.last is the image's reduction and
    handle.video the clips'; a text-only prompt afterwards clears both."""
    model, (batch, _) = models[family], media[family]
    with vtoken.apply(model, "evs", keep=0.5) as handle:
        logits(model, batch)
        assert handle.last.mask.sum().item() == 4 and handle.last is not handle.video
        assert handle.video.extras["frame_counts"].sum(1).tolist() == [8, 12, 4]
        logits(model, {"input_ids": batch["input_ids"][:, -3:]})
        assert handle.last is None and handle.video is None


def test_a_frame_layout_method_after_another_is_refused(models):
    model = models["qwen2_vl"]
    with pytest.raises(ValueError, match="'evs' reads whole video frames"):
        vtoken.apply(model, ["divprune", "evs"], keep=0.5)
    assert "forward" not in model.__dict__
