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
from tests.models.tiny_llava_next import llava_next_video_inputs, tiny_llava_next_video
from tests.models.tiny_onevision import onevision_media_inputs, tiny_onevision
from tests.models.tiny_qwen import TINY as QWEN
from tests.models.tiny_qwen import VIDEO_TOKEN as QWEN_VIDEO
from tests.models.tiny_qwen import VISION_START, qwen_media_inputs
from tests.models.tiny_qwen3 import TINY as QWEN3
from tests.models.tiny_qwen3 import qwen3_media_inputs
from vtoken.methods import get_method
from vtoken.models import families_supporting
from vtoken.models.qwen2_vl import Qwen2VLAdapter

GEN = {"max_new_tokens": 2, "do_sample": False}
Inputs = dict[str, Tensor]


@dataclass(frozen=True)
class VideoFamily:
    """What the contract needs of a family: a builder, a batch mixing images and clips with each sample alone, the
    model's own input embeddings with every visual feature at its placeholder and the original position ids (for the
    hand-built reference: ``(embeds [B, L, D], fn (b, columns) -> ids or None for 1-D columns)``)."""

    build: Callable[..., nn.Module]
    inputs: Callable[[nn.Module], tuple[Inputs, list[Inputs]]]
    reference: Callable[[nn.Module, Inputs], tuple[Tensor, Callable[[int, Tensor], Tensor] | None]]


def _qwen_inputs(seconds: bool) -> Callable[[nn.Module], tuple[Inputs, list[Inputs]]]:
    def make(_model: nn.Module) -> tuple[Inputs, list[Inputs]]:
        # clips of 4, 3 and 2 frames (T = temporal patches), two frame sizes (2 x 2 and 2 x 4 merged tokens), one
        # sample with an image before its video, left padding, different prompts
        return qwen_media_inputs([[("video", (4, 4, 4))], [("image", (4, 4)), ("video", (3, 4, 8))],
                                  [("video", (2, 4, 4))]], [(3, 2), (2, 4), (5, 1)], seed=11,
                                 seconds=[1.0, 2.0, 0.5] if seconds else None)
    return make


@torch.no_grad()
def _qwen_reference(model: nn.Module, inputs: Inputs) -> tuple[Tensor, Callable[[int, Tensor], Tensor]]:
    cfg = model.config
    ids = inputs["input_ids"]
    embeds = model.get_input_embeddings()(ids)
    if "pixel_values" in inputs:
        feats = model.model.get_image_features(inputs["pixel_values"], inputs["image_grid_thw"]).pooler_output
        embeds[ids == cfg.image_token_id] = torch.cat(list(feats))
    feats = model.model.get_video_features(inputs["pixel_values_videos"], inputs["video_grid_thw"]).pooler_output
    embeds[ids == cfg.video_token_id] = torch.cat(list(feats))
    kw = {"second_per_grid_ts": inputs["second_per_grid_ts"]} if "second_per_grid_ts" in inputs else {}
    pos, _ = model.model.get_rope_index(ids, inputs["mm_token_type_ids"], image_grid_thw=inputs.get("image_grid_thw"),
                                        video_grid_thw=inputs["video_grid_thw"],
                                        attention_mask=inputs["attention_mask"], **kw)
    return embeds, lambda b, columns: pos[:, b : b + 1, columns]


def _onevision_inputs(model: nn.Module) -> tuple[Inputs, list[Inputs]]:
    # two clips of 3 frames (OneVision batches videos as one tensor), images (crops, newlines) in two samples
    return onevision_media_inputs(model, [[("video", None)], [("image", (30, 50)), ("video", None)],
                                          [("image", (40, 60))]], [(3, 2), (2, 4), (5, 1)], frames=3, seed=4)


@torch.no_grad()
def _onevision_reference(model: nn.Module, inputs: Inputs) -> tuple[Tensor, None]:
    cfg = model.config
    ids = inputs["input_ids"]
    embeds = model.get_input_embeddings()(ids)
    feats = model.model.get_image_features(pixel_values=inputs["pixel_values"],
                                           image_sizes=inputs["image_sizes"]).pooler_output
    embeds[ids == cfg.image_token_id] = torch.cat(list(feats))
    video = model.model.get_video_features(pixel_values_videos=inputs["pixel_values_videos"]).pooler_output
    embeds[ids == cfg.video_token_id] = video.reshape(-1, video.shape[-1])
    return embeds, None


def _qwen3_inputs(_model: nn.Module) -> tuple[Inputs, list[Inputs]]:
    # Qwen3-VL's layout: a timestamp before every frame; clips of 3 and 2 frames, two frame sizes, an image sample
    return qwen3_media_inputs([[("video", (3, 4, 4))], [("image", (4, 4)), ("video", (2, 4, 8))],
                               [("image", (4, 8))]], [(3, 2), (2, 4), (5, 1)], seed=12)


@torch.no_grad()
def deepstack_reference(model: nn.Module, inputs: Inputs) -> tuple[Tensor, list[Tensor], Tensor]:
    """Qwen3-VL: the model's own input embeddings with every visual feature at its placeholder, its DeepStack features
    ``[B, L, D]`` per tap at the same columns, and the visual columns ``[B, L]``."""
    cfg = model.config
    ids = inputs["input_ids"]
    embeds = model.get_input_embeddings()(ids)
    visual = (ids == cfg.image_token_id) | (ids == cfg.video_token_id)
    taps: list[Tensor] = []
    for token, pixels, grid, get in ((cfg.image_token_id, "pixel_values", "image_grid_thw",
                                      model.model.get_image_features),
                                     (cfg.video_token_id, "pixel_values_videos", "video_grid_thw",
                                      model.model.get_video_features)):
        out = get(inputs[pixels], inputs[grid])
        where = ids == token
        embeds[where] = torch.cat(list(out.pooler_output))
        for i, feat in enumerate(out.deepstack_features):
            feat = torch.cat(list(feat)) if isinstance(feat, (list, tuple)) else feat
            if len(taps) <= i:
                taps.append(embeds.new_zeros(*ids.shape, feat.shape[-1]))
            taps[i][where] = feat
    return embeds, taps, visual


def _llava_next_video_inputs(model: nn.Module) -> tuple[Inputs, list[Inputs]]:
    # two clips of 3 frames, AnyRes images (crops, newlines) in two samples
    return llava_next_video_inputs(model, [[("video", None)], [("image", (64, 32)), ("video", None)],
                                           [("image", (32, 64))]], [(3, 2), (2, 4), (5, 1)], frames=3, seed=5)


@torch.no_grad()
def _decoder_inputs(model: nn.Module, inputs: Inputs) -> tuple[Tensor, Callable[[int, Tensor], Tensor] | None]:
    """The input embeddings (every visual feature at its placeholder, the model's own packing) and position ids the
    UNPATCHED model hands its decoder for ``inputs``."""
    seen: dict[str, Any] = {}

    def hook(_module, _args, kwargs):
        seen.update(kwargs)

    h = model.model.language_model.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        model(**inputs)
    finally:
        h.remove()
    pos = seen.get("position_ids")
    return seen["inputs_embeds"].clone(), None if pos is None else (lambda b, columns: pos[b : b + 1, columns])


FAMILIES = {
    "qwen2_vl": VideoFamily(QWEN["qwen2_vl"], _qwen_inputs(False), _qwen_reference),
    "qwen2_5_vl": VideoFamily(QWEN["qwen2_5_vl"], _qwen_inputs(True), _qwen_reference),
    "llava_onevision": VideoFamily(tiny_onevision, _onevision_inputs, _onevision_reference),
    "llava_next_video": VideoFamily(tiny_llava_next_video, _llava_next_video_inputs, _decoder_inputs),
    "qwen3_vl": VideoFamily(QWEN3["qwen3_vl"], _qwen3_inputs, _qwen_reference),
    "qwen3_vl_moe": VideoFamily(QWEN3["qwen3_vl_moe"], _qwen3_inputs, _qwen_reference),
}
#: every method that reads a video's frame layout
VIDEO_METHODS = contract.supported(Qwen2VLAdapter, video=True)
#: image methods per frame; aim_merge per frame (its contract: one frame a row), centerclip per segment (frame_ids)
PER_FRAME = ["divprune", "visionzip", "pool", "uniform", "aim_merge", "centerclip"]
METHODS = VIDEO_METHODS + PER_FRAME
#: others: half the clip (a video method) or of each frame (an image method); fastvid needs a context token a frame
KEEP = {"pool": 0.25, "uniform": 2, "fastvid": 0.75}


def keep_of(method: str) -> int | float:
    return KEEP.get(method, 0.5)


@pytest.fixture(scope="module")
def models() -> dict[str, nn.Module]:
    return {name: fam.build() for name, fam in FAMILIES.items()}


@pytest.fixture(scope="module")
def media(models) -> dict[str, tuple[Inputs, list[Inputs]]]:
    return {name: fam.inputs(models[name]) for name, fam in FAMILIES.items()}


@pytest.fixture(scope="module")
def reference(models, media) -> dict[str, tuple[Tensor, Tensor]]:
    with torch.no_grad():
        return {name: (m(**media[name][0]).logits, m.generate(**media[name][0], **GEN)) for name, m in models.items()}


def test_every_video_method_is_in_the_contract():
    assert {"evs", "vidcom2", "dycoke", "sttm", "frame_stride", "temporal_pool"} <= set(VIDEO_METHODS)
    for method in VIDEO_METHODS:
        assert {"qwen2_vl", "qwen2_5_vl", "llava_onevision", "qwen3_vl", "llava_next_video"} <= set(families_supporting(
            get_method(method))), method


def clip_sizes(model: nn.Module, inputs: Inputs) -> list[int]:
    """Tokens of each clip (its placeholders less those that always stay, e.g. OneVision's newline)."""
    with vtoken.apply(model, "evs", keep=1.0) as handle:
        logits(model, inputs)
        return handle.video.mask.sum(1).tolist()


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("method", METHODS)
def test_keep_all_is_identical_and_remove_restores(models, media, reference, family, method):
    model, (batch, alone) = models[family], media[family]
    ref, gen_ref = reference[family]
    n = (batch["video_grid_thw"].prod(-1) // 4).tolist() if "video_grid_thw" in batch else clip_sizes(model, batch)
    with vtoken.apply(model, method, keep=1.0) as handle:
        assert torch.equal(logits(model, batch), ref)
        assert kept_rows(handle.video.indices) == [list(range(int(k))) for k in n]
        assert torch.equal(model.generate(**batch, **GEN), gen_ref)
    # (padding columns stay, so an image-only sample would keep the batch's length: the first sample, a video)
    contract.check_remove(model, alone[0], method, keep_of(method))


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("method", METHODS)
def test_batch_equals_each_sample(models, media, family, method):
    """Clips of different lengths and frame sizes (where the family allows), images in some samples, different
    prompts: each sample alone gives the same logits and keeps the same tokens of its clip and its image."""
    model, (batch, alone) = models[family], media[family]
    with vtoken.apply(model, method, keep=keep_of(method)) as handle:
        got = logits(model, batch)[:, -1]
        clips, counts = kept_rows(handle.video.indices), handle.video.extras["frame_counts"]
        images = kept_rows(handle.last.indices) if handle.last is not handle.video else []
        c = i = 0
        for b, one in enumerate(alone):
            torch.testing.assert_close(logits(model, one)[0, -1], got[b], atol=2e-5, rtol=1e-4)
            if handle.video is not None:
                assert kept_rows(handle.video.indices) == [clips[c]]
                t = int((handle.video.extras["frame_counts"][0] >= 0).sum())
                assert handle.video.extras["frame_counts"][0].tolist() == counts[c, :t].tolist()
                c += 1
            if handle.last is not handle.video:
                assert kept_rows(handle.last.indices) == [images[i]]
                i += 1
    assert counts.sum(1).tolist() == [len(r) for r in clips]


def kept_columns(handle: Any, inputs: Inputs) -> Tensor:
    """``[B, L]`` the caller's columns the patched prefill kept, checked against ``handle.video``: every text column,
    and of the video placeholders exactly the kept clip tokens' (plus those that always stay)."""
    adapter = handle.adapter
    gather = adapter._state.gather
    ids = inputs["input_ids"]
    keep = torch.zeros_like(ids, dtype=torch.bool)
    rows = torch.arange(ids.shape[0])[:, None].expand_as(gather)
    keep[rows[gather >= 0], gather[gather >= 0]] = True
    visual = adapter.visual_token_mask(ids)
    assert bool(keep[~visual & inputs["attention_mask"].bool()].all()), "a text column was dropped"
    clips, red = adapter._clips, handle.video
    want = torch.zeros_like(keep)
    want[clips.sample[:, None].expand_as(red.indices)[red.mask], clips.columns.gather(1, red.indices.clamp(min=0))
         [red.mask]] = True
    if "fixed" in clips.extra:
        fixed_rows, fixed_cols, _ = clips.extra["fixed"]
        want[fixed_rows, fixed_cols] = True
    video = ids == adapter.model.config.video_token_id
    assert torch.equal(keep & video, want)
    return keep


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("method", ["evs", "vidcom2", "divprune", "uniform"])
def test_kept_tokens_keep_their_positions(models, media, family, method):
    """The reduced logits equal the model on its own full embeddings at only the text and kept columns, with the
    ORIGINAL position ids of those columns (M-RoPE from the unreduced prompt)."""
    model, (batch, _) = models[family], media[family]
    with vtoken.apply(model, method, keep=keep_of(method)) as handle:
        got = logits(model, batch)
        keep = kept_columns(handle, batch)
    embeds, pos = FAMILIES[family].reference(model, batch)
    if family.startswith("qwen3"):
        embeds, taps, visual = deepstack_reference(model, batch)
        real = check_deepstack(model, got, embeds, taps, visual, keep, batch["attention_mask"], pos)
    else:
        real = contract.check_hand_built(model, got, embeds, keep, batch["attention_mask"], pos)
    assert sum(int(r.sum()) for r in real) < int(batch["attention_mask"].sum())


@torch.no_grad()
def check_deepstack(model: nn.Module, got: Tensor, embeds: Tensor, taps: list[Tensor], visual: Tensor, keep: Tensor,
                    attention_mask: Tensor, pos: Callable[[int, Tensor], Tensor],
                    want_effect: bool = True) -> list[Tensor]:
    """Qwen3-VL: per sample, the decoder on only the kept columns with their original position ids and the DeepStack
    features of exactly the kept visual tokens (``visual_pos_masks`` of the kept sequence) gives ``got``'s logits;
    without the DeepStack features it would not (so the check can fail)."""
    out = []
    for b in range(keep.shape[0]):
        real = keep[b] & attention_mask[b].bool()
        vis = visual[b][real]
        args = {"inputs_embeds": embeds[b : b + 1, real], "position_ids": pos(b, real),
                "attention_mask": torch.ones(1, int(real.sum()), dtype=torch.long)}
        lm = model.model.language_model
        hidden = lm(**args, visual_pos_masks=vis[None],
                    deepstack_visual_embeds=[t[b, real][vis] for t in taps]).last_hidden_state
        ref = model.lm_head(hidden)[0]
        torch.testing.assert_close(got[b, -int(real.sum()):], ref, atol=2e-5, rtol=1e-4)
        if want_effect and bool(vis.any()):
            plain = model.lm_head(lm(**args).last_hidden_state)[0]
            assert not torch.allclose(plain, ref, atol=1e-4), "DeepStack features had no effect"
        out.append(real)
    return out


@pytest.mark.parametrize("family", ["qwen3_vl", "qwen3_vl_moe"])
@pytest.mark.parametrize("method", ["temporal_pool", "sttm"])
def test_deepstack_of_a_merged_token_is_its_members_mean(models, media, family, method):
    """A merging method: each merged video token's DeepStack features are the mean of its members'."""
    model, (batch, _) = models[family], media[family]
    with vtoken.apply(model, method, keep=0.5) as handle:
        got = logits(model, batch)
        keep = kept_columns(handle, batch)
        red, clips = handle.video, handle.adapter._clips
    embeds, taps, visual = deepstack_reference(model, batch)
    for i, tap in enumerate(taps):  # the merged tokens' values at their representatives' columns
        rows = clips.sample[:, None].expand_as(red.indices)[red.mask]
        cols = clips.columns.gather(1, red.indices.clamp(min=0))[red.mask]
        members = torch.zeros(red.indices.shape[0], red.indices.shape[1], tap.shape[-1])
        count = torch.zeros(red.indices.shape[0], red.indices.shape[1], 1)
        for v in range(red.indices.shape[0]):
            for j, slot in enumerate(red.assign[v].tolist()):
                if slot >= 0:
                    members[v, slot] += tap[clips.sample[v], clips.columns[v, j]]
                    count[v, slot] += 1
        taps[i] = tap.clone()
        taps[i][rows, cols] = (members / count.clamp(min=1))[red.mask]
    embeds[rows, cols] = red.tokens[red.mask]
    check_deepstack(model, got, embeds, taps, visual, keep, batch["attention_mask"],
                    FAMILIES[family].reference(model, batch)[1])


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl"])
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
    """After generate the cache holds the longest compacted prompt (text, padding, kept image and video tokens) plus
    the generated tokens but the last."""
    model, (batch, _) = models[family], media[family]
    with vtoken.apply(model, method, keep=keep_of(method)) as handle:
        out = model.generate(**batch, **GEN, return_dict_in_generate=True)
        keep = kept_columns(handle, batch)
    prefill = int((keep | (batch["attention_mask"] == 0)).sum(1).max())
    assert int((keep & batch["attention_mask"].bool()).sum()) < int(batch["attention_mask"].sum())
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
    with vtoken.apply(model, "divprune", keep=1.0) as handle:
        logits(model, batch)
        images = handle.last.mask.sum(1).tolist()
    sizes = clip_sizes(model, batch)
    with vtoken.apply(model, "evs", keep=0.5) as handle:
        logits(model, batch)
        assert handle.last.mask.sum(1).tolist() == images and handle.last is not handle.video
        assert handle.video.extras["frame_counts"].sum(1).tolist() == [n // 2 for n in sizes]
        logits(model, {"input_ids": batch["input_ids"][:, -3:]})
        assert handle.last is None and handle.video is None


def test_a_frame_layout_method_after_another_is_refused(models):
    model = models["qwen2_vl"]
    with pytest.raises(ValueError, match="'evs' reads whole video frames"):
        vtoken.apply(model, ["divprune", "evs"], keep=0.5)
    assert "forward" not in model.__dict__


@pytest.mark.parametrize("family", ["qwen2_vl", "llava_onevision"])
def test_aim_merge_runs_per_frame_and_centerclip_per_segment(models, media, family):
    """aim_merge (no frame layout signal) merges within each frame, ``keep`` per frame; centerclip reads
    ``frame_ids`` and clusters each segment of ``segment_frames`` frames under the clip's budget."""
    model, (batch, _) = models[family], media[family]
    sizes = clip_sizes(model, batch)
    with vtoken.apply(model, "aim_merge", keep=0.5) as handle:
        logits(model, batch)
        counts = handle.video.extras["frame_counts"]
        grids = handle.adapter._clips.extra["video_grids"]
    per_frame = (grids[:, 1] * grids[:, 2]) // 2
    for v, t in enumerate(grids[:, 0].tolist()):
        assert counts[v, :t].tolist() == [int(per_frame[v])] * t
    with vtoken.apply(model, "centerclip", keep=0.5, segment_frames=1) as handle:
        logits(model, batch)
        assert handle.video.mask.sum(1).tolist() == [(n + 1) // 2 for n in sizes]


def _another_question(one: Inputs, seed: int) -> Inputs:
    """The same video (same pixels) with other text around it, three tokens longer (the placeholders move)."""
    g = torch.Generator().manual_seed(seed)
    ids = one["input_ids"]
    text = ids < 200
    ids = torch.where(text, torch.randint(1, 200, ids.shape, generator=g), ids)
    ids = torch.cat([torch.randint(1, 200, (1, 3), generator=g), ids], dim=1)
    out = {**one, "input_ids": ids}
    if "mm_token_type_ids" in one:
        out["mm_token_type_ids"] = torch.cat([torch.zeros(1, 3, dtype=one["mm_token_type_ids"].dtype),
                                              one["mm_token_type_ids"]], dim=1)
    return out


@pytest.mark.parametrize("family", FAMILIES)
def test_reduce_once_ask_many(models, media, family):
    """``reuse_videos=True`` with a query-agnostic method (sttm): the same clip asked about again is neither encoded
    nor reduced again, and every answer equals the one computed from scratch; a query-aware method is refused."""
    model, (_, alone) = models[family], media[family]
    first = alone[0]
    questions = [first, _another_question(first, 1), _another_question(first, 2)]
    tower = getattr(model.model, "visual", None) or model.model.vision_tower
    calls = []
    h = tower.register_forward_hook(lambda *_: calls.append(1))
    try:
        with vtoken.apply(model, "sttm", keep=0.5) as plain:
            want = [logits(model, q) for q in questions]
            reductions = [kept_rows(plain.video.indices) for _ in questions]
        calls.clear()
        with vtoken.apply(model, "sttm", keep=0.5, reuse_videos=True) as handle:
            for q, ref, kept in zip(questions, want, reductions, strict=True):
                torch.testing.assert_close(logits(model, q), ref, atol=2e-5, rtol=1e-4)
                assert kept_rows(handle.video.indices) == kept
            out = model.generate(**questions[1], **GEN)
        assert len(calls) == 1, "the video was encoded more than once"
        assert out.shape[1] == questions[1]["input_ids"].shape[1] + GEN["max_new_tokens"]
    finally:
        h.remove()
    with pytest.raises(ValueError, match="query-agnostic"):
        vtoken.apply(model, "mmtok", keep=0.5, reuse_videos=True)
    assert "forward" not in model.__dict__


@pytest.mark.parametrize("family", FAMILIES)
def test_every_image_method_runs_per_frame(models, media, family):
    """Every image method the family runs takes ``keep`` per frame on a clip: an exact method keeps half of every
    frame's tokens (rounded half-up), any method at most that."""
    from vtoken.core import resolve_keep
    from vtoken.models import find_adapter

    model, (_, alone) = models[family], media[family]
    names = [n for n in contract.supported(find_adapter(model)) if get_method(n).stage == "pre_llm"]
    assert {"divprune", "uniform", "pool"} <= set(names)
    for name in names:
        with vtoken.apply(model, name, keep=0.5) as handle:
            logits(model, alone[0])
            counts = handle.video.extras["frame_counts"][0]
            t, h, w = handle.adapter._clips.extra["video_grids"][0].tolist()
        want = int(resolve_keep(0.5, h * w))
        if get_method(name).exact:
            assert counts.tolist() == [want] * t, name
        assert int(counts.max()) <= want and int(counts.min()) >= 1, name


@pytest.mark.parametrize("family", ["qwen3_vl", "qwen3_vl_moe"])
@pytest.mark.parametrize(("method", "knobs"), [("fastv", {"layer": 1}), ("pdrop", {"layers": [1, 2], "ref_depth": 3}),
                                               ("framefusion", {})])
def test_llm_stage_with_deepstack(models, media, family, method, knobs):
    """llm-stage pruning before the last DeepStack injection (layer 1 of a tower tapped twice): the later injections
    follow the shortened layout; keep=1.0 is identical, a batch equals each sample alone, and the injection after
    the pruning adds features to exactly the visual tokens that layer still holds."""
    model, (batch, alone) = models[family], media[family]
    ref = reference_logits(model, batch)
    with vtoken.apply(model, method, keep=1.0, **knobs):
        assert torch.equal(logits(model, batch), ref)
    cls = type(model.model.language_model)
    seen: list[tuple[int, int, int]] = []
    inner = cls._deepstack_process

    def spy(self, hidden, mask, embeds):  # what the model's own injection receives (after vtoken's translation)
        seen.append((hidden.shape[1], int(mask.sum()), embeds.shape[0]))
        return inner(self, hidden, mask, embeds)

    cls._deepstack_process = spy
    try:
        with vtoken.apply(model, method, keep=0.5, **knobs):
            got = logits(model, batch)[:, -1]
            for b, one in enumerate(alone):
                torch.testing.assert_close(logits(model, one)[0, -1], got[b], atol=2e-5, rtol=1e-4)
    finally:
        cls._deepstack_process = inner
    assert seen and all(n_mask == n_embeds for _, n_mask, n_embeds in seen)
    if method == "fastv":  # the batch's injection after layer 1 runs on the pruned layout
        assert seen[1][0] < seen[0][0] and seen[1][1] < seen[0][1]


@torch.no_grad()
def reference_logits(model: nn.Module, inputs: Inputs) -> Tensor:
    return model(**inputs).logits
