"""vtoken.apply on LLaVA-OneVision (images): the adapter contract and docs/design.md invariants 1-3 for every supported
method, plus the AnyRes-max layout (unpadding, bilinear downscaling, image_newline tokens) and the per-view keep
split."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F
from transformers.models.llava_onevision.modeling_llava_onevision import image_size_to_num_patches

import vtoken
from tests.models import contract
from tests.models.contract import logits
from tests.models.tiny_onevision import IMAGE_TOKEN, VIDEO_TOKEN, onevision_inputs, sample_inputs, tiny_onevision
from vtoken.methods import get_method
from vtoken.models import families_supporting
from vtoken.models.base import Handle
from vtoken.models.llava_onevision import LlavaOnevisionAdapter, dominant_taps, image_layout
from vtoken.models.pipeline import Step
from vtoken.models.views import split_proportional

SUPPORTED = contract.supported(LlavaOnevisionAdapter)
ATTENTION = contract.attention_methods(LlavaOnevisionAdapter)
#: (60, 50): 2 x 2 crops, unpadded to 8 x 6 and downscaled to 6 x 4 (+ 6 newlines); (30, 50): 1 x 2 crops unpadded
#: to 4 x 6 (+ 4 newlines). Both: 16 base tokens + 24 canvas tokens = 40 visual tokens.
SIZES = [(60, 50), (30, 50)]
N_VISUAL, N_NEWLINES = [40, 40], [6, 4]
MULTI = [2, 1]  # a two-image sample (one view each, one newline each) and a one-image sample


@pytest.fixture(scope="module")
def model():
    return tiny_onevision()


@pytest.fixture(scope="module")
def inputs(model):
    return onevision_inputs(model, SIZES)


@pytest.fixture(scope="module")
def reference(model, inputs):
    return logits(model, inputs), model.generate(**inputs, max_new_tokens=4, do_sample=False)


@pytest.fixture(scope="module")
def multi(model):
    return onevision_inputs(model, [(20, 30), (40, 40), (30, 90)], images_per_sample=MULTI, seed=3)


def _newline_columns(model, inputs):
    """[B, L] bool: placeholder columns the model fills with image_newline."""
    with torch.no_grad():
        emb = model.model.get_input_embeddings()(inputs["input_ids"])
        feats = torch.cat(model.model.get_image_features(
            pixel_values=inputs["pixel_values"], image_sizes=inputs["image_sizes"],
            batch_num_images=inputs.get("batch_num_images")).pooler_output)
        emb[inputs["input_ids"] == IMAGE_TOKEN] = feats
    return (emb == model.model.image_newline).all(-1) & (inputs["input_ids"] == IMAGE_TOKEN)


# ---------------------------------------------------------------------------------------------------------------
# capability
# ---------------------------------------------------------------------------------------------------------------


def test_supported_methods_and_reasons():
    expected = contract.pre_llm_methods()
    for m in vtoken.methods():
        why = LlavaOnevisionAdapter.unsupported(m)
        if m.name in expected and why is not None:
            assert "CLS" in why, (m.name, why)
    assert {"visionzip", "hiprune", "divprune", "cdpruner", "pool", "uniform"} <= set(SUPPORTED)
    for name in ("hired", "vtc_cls", "prumerge", "prumerge_plus"):
        assert "no CLS token" in LlavaOnevisionAdapter.unsupported(get_method(name))
    assert "llava_onevision" in families_supporting(
        get_method("visionzip"))


# ---------------------------------------------------------------------------------------------------------------
# layout helpers
# ---------------------------------------------------------------------------------------------------------------


def test_split_proportional_is_proportional_and_exact():
    image = torch.tensor([0, 0, 0, 0, 0, 1, 1, 1])
    prev = torch.tensor([16, 4, 4, 4, 4, 16, 12, 12])
    assert split_proportional(8, prev, image, 2).tolist() == [4, 1, 1, 1, 1, 3, 3, 2]
    assert split_proportional(3, prev, image, 2).tolist() == [2, 1, 0, 0, 0, 1, 1, 1]
    assert split_proportional(100, prev, image, 2).tolist() == prev.tolist()
    share = split_proportional(7, torch.tensor([5, 5, 5]), torch.tensor([0, 0, 0]), 1)
    assert share.tolist() == [3, 2, 2]  # ties go to the earlier view


@pytest.mark.parametrize("n_in,n_out", [(8, 6), (6, 4), (16, 12), (27, 19), (9, 5), (5, 4)])
def test_dominant_taps_match_torch_bilinear(n_in, n_out):
    eye = torch.eye(n_in)[None, :, :, None]  # channel c = one-hot of input c
    weights = F.interpolate(eye, size=(n_out, 1), mode="bilinear")[0, :, :, 0]  # [n_in, n_out]
    assert dominant_taps(n_in, n_out).tolist() == weights.argmax(0).tolist()


@pytest.mark.parametrize("size", [(60, 50), (30, 50), (100, 30), (64, 64), (20, 90)])
def test_layout_matches_the_models_packing(model, size):
    """Pack one-hot slot features with the model's own pack_image_features: each packed token's largest weight is on
    the view slot the adapter maps it to (exact copies where the canvas is not resized)."""
    cfg = model.config
    g = cfg.vision_config.image_size // cfg.vision_config.patch_size
    image_size = torch.tensor(size)
    views = image_size_to_num_patches(image_size, cfg.image_grid_pinpoints, cfg.vision_config.image_size)
    slots, lines, down = image_layout(g, views, image_size, cfg.image_grid_pinpoints, cfg.vision_config.image_size,
                                      cfg.vision_aspect_ratio)
    onehot = torch.eye(views * g * g).reshape(views, g * g, -1)
    packed = model.model.pack_image_features([onehot], image_size[None], image_newline=None,
                                             vision_aspect_ratio=cfg.vision_aspect_ratio)[0][0]
    cells = slots[slots >= 0]
    assert packed.shape[0] == cells.numel()
    assert packed.argmax(1).tolist() == cells.tolist()
    if not down:
        assert torch.equal(packed, onehot.reshape(-1, onehot.shape[-1])[cells])
    assert len(set(cells.tolist())) == cells.numel()  # one packed token per slot
    newline = slots < 0
    assert (lines[newline] == torch.arange(int(newline.sum()))).all()  # a newline closes each canvas row


# ---------------------------------------------------------------------------------------------------------------
# invariants for every contract.supported method
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", SUPPORTED)
def test_keep_all_gives_identical_logits_and_generation(model, inputs, reference, method):
    def full(last):
        assert last.mask.sum(1).tolist() == N_VISUAL
        assert last.extras["newlines"].tolist() == N_NEWLINES
        assert bool((last.indices[:, 1:] > last.indices[:, :-1]).all())

    contract.check_keep_all(model, inputs, method, full, reference)


@pytest.mark.parametrize("method", SUPPORTED)
def test_remove_restores_exactly(model, inputs, reference, method):
    contract.check_remove(model, inputs, method, keep=8, reference=reference[0])


@pytest.mark.parametrize("method", SUPPORTED)
def test_batch_equals_each_sample(model, inputs, method):
    last = contract.check_batch(model, inputs, method, 8, [sample_inputs(inputs, b) for b in range(2)])
    counts = last.mask.sum(1)
    if get_method(method).exact:
        assert counts.tolist() == [8, 8]
    assert bool((counts <= 8).all())


@pytest.mark.parametrize("method", ["divprune", "visionzip", "random", "hiprune", "lavit_dynamic"])
def test_cache_holds_only_kept_tokens(model, inputs, method):
    contract.check_cache(model, inputs, method, 8)


@pytest.mark.parametrize("method", ["divprune", "hiprune"])
def test_kept_tokens_keep_their_columns_and_positions(model, inputs, method):
    """What the language model receives: at each kept column the model's own embedding of that column (packed visual
    token or image_newline) with the column's original position id; a newline stays iff its canvas row keeps a token;
    the logits equal a hand-built call on exactly those columns."""
    seen = {}

    def grab(_module, args, kwargs):
        seen.update(embeds=kwargs["inputs_embeds"], pos=kwargs["position_ids"], mask=kwargs["attention_mask"])

    hook = model.model.language_model.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        with vtoken.apply(model, method, keep=8) as handle:
            got = logits(model, inputs)
            counts = handle.last.mask.sum(1)
    finally:
        hook.remove()
    ids, amask = inputs["input_ids"], inputs["attention_mask"]
    with torch.no_grad():
        full = model.model.get_input_embeddings()(ids)
        feats = torch.cat(model.model.get_image_features(pixel_values=inputs["pixel_values"],
                                                         image_sizes=inputs["image_sizes"]).pooler_output)
        full[ids == IMAGE_TOKEN] = feats
    newline = _newline_columns(model, inputs)
    keep = torch.zeros_like(ids, dtype=torch.bool)
    for b in range(2):
        real = seen["mask"][b].bool()
        cols = seen["pos"][b, real]
        assert torch.equal(seen["embeds"][b, real], full[b, cols])
        assert bool((cols[1:] > cols[:-1]).all())
        image = (ids[b, cols] == IMAGE_TOKEN)
        assert set(torch.nonzero(amask[b].bool() & (ids[b] != IMAGE_TOKEN))[:, 0].tolist()) <= set(cols.tolist())
        assert int((image & ~newline[b, cols]).sum()) == int(counts[b])
        # newline rule: walk the image block; base = first 16 tokens, then rows closed by newlines
        block = torch.nonzero(ids[b] == IMAGE_TOKEN)[:, 0]
        kept = set(cols.tolist())
        row_has = False
        for c in block[16:].tolist():
            if newline[b, c]:
                assert (c in kept) == row_has
                row_has = False
            else:
                row_has |= c in kept
        keep[b, cols] = True
    contract.check_hand_built(model, got, full, keep, amask)  # the model on exactly those columns, at their positions


@pytest.mark.parametrize("method", ATTENTION)
def test_sdpa_and_eager_select_identical_tokens(inputs, method):
    contract.check_sdpa_eager(lambda attn: tiny_onevision(attn=attn), inputs, method, 8)


def test_visionzip_cls_substitute_is_the_attention_received(inputs):
    """SigLIP has no CLS: visionzip's ``cls_attn`` is the attention each token receives (head mean, mean over all query
    rows) of layer -2, checked against the eager tower's own attention probabilities."""
    m = tiny_onevision(attn="eager")
    with vtoken.apply(m, "visionzip", keep=8) as handle:
        adapter = handle.adapter
        recorded = {}
        original = adapter.collect_signals

        def record(images, kw):
            recorded.update(original(images, kw))
            return recorded

        adapter.collect_signals = record
        logits(m, inputs)
    pixels = torch.cat([inputs["pixel_values"][0, :5], inputs["pixel_values"][1, :3]])
    with torch.no_grad():
        att = m.model.vision_tower(pixels, output_attentions=True).attentions[-2]  # [V, H, n, n]
    torch.testing.assert_close(recorded["cls_attn"], att.mean(1).mean(1), atol=1e-6, rtol=1e-5)
    assert recorded["keys"].shape == (8, 16, 8)


def test_signals_are_available(model, inputs):
    """Every signal the family provides, on a probe method that needs them all (rows = views, N = 16 view slots)."""
    names = ("attn", "attn_received_layers", "keys", "vision_features", "text", "text_mask", "grid", "positions",
             "crop_ids")
    info = replace(get_method("divprune"), name="probe", signals=names, signal_spec={})
    assert LlavaOnevisionAdapter.unsupported(info) is None
    steps = [Step(info, 8)]
    adapter = LlavaOnevisionAdapter(model, steps)
    adapter.attach(Handle(model, adapter, steps))
    try:
        with torch.no_grad():
            images = adapter.encode(dict(inputs))
            sig = adapter.collect_signals(images, dict(inputs))
    finally:
        adapter.detach()
    assert "forward" not in model.__dict__
    v = 8  # 5 views + 3 views
    assert sig["attn"].shape == (v, 16, 16)
    torch.testing.assert_close(sig["attn"].sum(-1), torch.ones(v, 16))
    assert sig["attn_received_layers"].shape == (v, 2, 16)  # default: layers [n // 3, feature layer]
    torch.testing.assert_close(sig["attn_received_layers"].sum(-1), torch.ones(v, 2))
    assert sig["keys"].shape == (v, 16, 8)
    assert sig["vision_features"].shape == (v, 16, 32)
    assert sig["text"].shape[:2] == sig["text_mask"].shape and sig["text"].shape[0] == v
    assert sig["grid"] == (4, 4)
    assert sig["crop_ids"].tolist() == [[i] * 16 for i in [0, 1, 2, 3, 4, 0, 1, 2]]
    assert torch.equal(sig["positions"], images.columns)


# ---------------------------------------------------------------------------------------------------------------
# views, keep split, multi-image samples, composition
# ---------------------------------------------------------------------------------------------------------------


def test_int_keep_is_split_over_views(model, inputs):
    with vtoken.apply(model, "divprune", keep=8) as handle:
        logits(model, inputs)
        views = handle.last.extras["views"]
        assert views.mask.sum(1).tolist() == [4, 1, 1, 1, 1, 3, 3, 2]
        assert handle.last.extras["view_image"].tolist() == [0, 0, 0, 0, 0, 1, 1, 1]
        pos = handle.last.extras["view_position"]
        for r in range(8):  # image-row indices are view * 16 + view-slot
            img = int(handle.last.extras["view_image"][r])
            own = views.indices[r][views.mask[r]] + 16 * int(pos[r])
            assert set(own.tolist()) <= set(handle.last.indices[img].tolist())
    with vtoken.apply(model, "divprune", keep=3) as handle:  # fewer than views: some views keep nothing
        reduced = logits(model, inputs)
        assert torch.isfinite(reduced).all()
        assert handle.last.mask.sum(1).tolist() == [3, 3]
        assert handle.last.extras["views"].mask.sum(1).tolist() == [1, 1, 1, 0, 0, 1, 1, 1]
        assert handle.last.extras["newlines"].tolist() == [1, 2]  # rows without a kept token lose their newline
        out = model.generate(**inputs, max_new_tokens=3, do_sample=False)
        assert out.shape[1] == inputs["input_ids"].shape[1] + 3
    with vtoken.apply(model, "divprune", keep=0.25) as handle:  # a ratio applies to every view
        logits(model, inputs)
        assert handle.last.extras["views"].mask.sum(1).tolist() == [4, 2, 2, 2, 2, 4, 3, 3]


@pytest.mark.parametrize("method", ["divprune", "visionzip"])
def test_multi_image_samples(model, multi, method):
    ref = logits(model, multi)
    with vtoken.apply(model, method, keep=1.0) as handle:
        assert torch.equal(logits(model, multi), ref)
        assert handle.last.extras["newlines"].tolist() == [1, 1, 3]
    samples = [sample_inputs(multi, b, MULTI) for b in range(len(MULTI))]
    last = contract.check_batch(model, multi, method, 6, samples, image_sample=[0, 0, 1])
    assert last.indices.shape[0] == 3  # one row per image
    assert bool((last.mask.sum(1) <= 6).all())


def test_composition_runs_in_stage_order(model, inputs):
    with vtoken.apply(model, [("visionzip", {"keep": 16}), ("divprune", {"keep": 8})]) as handle:
        logits(model, inputs)
        views = handle.last.extras["views"]
        first, second = views.extras["steps"]
        assert first.mask.sum(1).tolist() == [7, 3, 2, 2, 2, 6, 5, 5]  # 16 split over [16, 6, 6, 6, 6] / [16, 12, 12]
        assert views.mask.sum(1).tolist() == [4, 1, 1, 1, 1, 3, 3, 2]  # 8 split over the first step's shares
        assert handle.last.mask.sum(1).tolist() == [8, 8]
        composed = torch.where(second.mask, first.indices.gather(1, second.indices.clamp(min=0)), -1)
        assert torch.equal(views.indices, composed)


def test_videos_in_the_same_call_pass_through(model, inputs):
    """A 2-frame video per sample (2 x 2 pooled tokens per frame + 1 newline = 9 placeholders) before the images."""
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    pad = (mask == 0).sum(1)
    rows = [torch.cat([torch.zeros(int(p), dtype=torch.long), torch.full((9,), VIDEO_TOKEN), ids[b, int(p):]])
            for b, p in enumerate(pad)]
    video = dict(inputs, input_ids=torch.stack(rows), attention_mask=(torch.stack(rows) != 0).long(),
                 pixel_values_videos=torch.randn(2, 2, 3, 32, 32, generator=torch.Generator().manual_seed(5)))
    ref = logits(model, video)
    with vtoken.apply(model, "divprune", keep=1.0):
        assert torch.equal(logits(model, video), ref)
    with vtoken.apply(model, "divprune", keep=8) as handle:
        out = logits(model, video)
        kept = handle.last.mask.sum(1) + handle.last.extras["newlines"]
    assert out.shape[1] == int(((video["input_ids"] != IMAGE_TOKEN).sum(1) + kept).max())  # video tokens all stay


def test_labels_are_compacted(model, inputs):
    contract.check_labels(model, inputs)


def test_errors_leave_the_model_unpatched(model, inputs):
    no_sizes = {k: v for k, v in inputs.items() if k != "image_sizes"}
    contract.check_errors(model, inputs, [
        (ValueError, "no CLS token", "hired", {"keep": 8}),
        (ValueError, "no CLS token", ["divprune", "vtc_cls"], {"keep": 8}),
        (ValueError, "stage 'encoder'", "tome", {"keep": 8}),
        (ValueError, "token_shuffle", "token_shuffle", {"keep": 16}),
        (ValueError, "unknown method", "nope", {"keep": 8}),
        (ValueError, "keep", "divprune", {"keep": 0}),
        (TypeError, "bogus", "divprune", {"keep": 8, "bogus": 1}),
    ], failing=[
        ("divprune", {"keep": 8}, no_sizes, ValueError, "image_sizes"),
        ("divprune", {"keep": 8}, dict(inputs, vision_feature_select_strategy="default"), ValueError, "'full'"),
    ])
