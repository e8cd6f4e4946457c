"""vtoken.apply on InternVL: the adapter contract and DESIGN.md invariants 1-3 for every supported method, with a
multi-view (tiled) image next to single-view ones, the keep split over views and the pixel-shuffle signal rule."""

from __future__ import annotations

import pytest
import torch

import vtoken
from tests.models.tiny_internvl import PER_VIEW, internvl_inputs, sample_inputs, tiny_internvl
from vtoken.methods import get_method
from vtoken.models import families_supporting
from vtoken.models.internvl import InternVLAdapter, block_mean, split_keep

SUPPORTED = [m.name for m in vtoken.methods() if InternVLAdapter.unsupported(m) is None]
ATTENTION = [m.name for m in vtoken.methods() if InternVLAdapter.unsupported(m) is None
             and {"cls_attn", "cls_attn_layers", "attn", "attn_received_layers", "keys"} & set(m.signals)]
LAYOUT = [[3], [1, 1]]  # sample 0: one image of 3 views (2 tiles + thumbnail); sample 1: two single-view images
IMAGE_SAMPLE = [0, 1, 1]  # batch row of each image (rows of handle.last)
IMAGE_VIEWS = [3, 1, 1]


@pytest.fixture(scope="module")
def model():
    return tiny_internvl()


@pytest.fixture(scope="module")
def inputs():
    return internvl_inputs(LAYOUT)


@torch.no_grad()
def _logits(model, inputs):
    return model(**inputs).logits


def _rows(indices):
    return [[i for i in row if i >= 0] for row in indices.tolist()]


def test_every_pre_llm_method_is_supported():
    expected = {m.name for m in vtoken.methods() if m.stage in ("pre_llm", "video") and m.kind != "layout"}
    assert expected <= set(SUPPORTED)
    assert "internvl" in families_supporting(get_method("hired"))


@pytest.mark.parametrize("method", SUPPORTED)
def test_keep_all_gives_identical_logits_and_generation(model, inputs, method):
    ref = _logits(model, inputs)
    gen_ref = model.generate(**inputs, max_new_tokens=4, do_sample=False)
    with vtoken.apply(model, method, keep=1.0) as handle:
        assert torch.equal(_logits(model, inputs), ref)
        assert torch.equal(model.generate(**inputs, max_new_tokens=4, do_sample=False), gen_ref)
        assert _rows(handle.last.indices) == [list(range(v * PER_VIEW)) for v in IMAGE_VIEWS]


@pytest.mark.parametrize("method", SUPPORTED)
def test_remove_restores_exactly(model, inputs, method):
    ref = _logits(model, inputs)
    q_norm = model.model.vision_tower.encoder.layer[0].attention.q_norm
    hooks_before = len(q_norm._forward_hooks)
    handle = vtoken.apply(model, method, keep=8)
    reduced = _logits(model, inputs)
    assert reduced.shape[1] < ref.shape[1]
    handle.remove()
    assert "forward" not in model.__dict__
    assert len(q_norm._forward_hooks) == hooks_before
    assert torch.equal(_logits(model, inputs), ref)
    handle.remove()  # idempotent


@pytest.mark.parametrize("method", SUPPORTED)
def test_batch_equals_each_sample(model, inputs, method):
    with vtoken.apply(model, method, keep=8) as handle:
        batch = _logits(model, inputs)[:, -1]
        batch_idx = _rows(handle.last.indices)
        for b in range(len(LAYOUT)):
            alone = _logits(model, sample_inputs(inputs, LAYOUT, b))[:, -1]
            mine = [row for row, s in zip(batch_idx, IMAGE_SAMPLE, strict=True) if s == b]
            assert _rows(handle.last.indices) == mine
            torch.testing.assert_close(alone[0], batch[b], atol=2e-5, rtol=1e-4)


def test_keep_is_split_over_the_views_of_an_image(model, inputs):
    with vtoken.apply(model, "divprune", keep=8) as handle:
        _logits(model, inputs)
    last = handle.last
    assert last.mask.sum(1).tolist() == [8, 8, 8]
    views = last.extras["views"]
    assert last.extras["view_image"].tolist() == [0, 0, 0, 1, 2]
    assert last.extras["view_position"].tolist() == [0, 1, 2, 0, 0]
    assert views.mask.sum(1).tolist() == [3, 3, 2, 8, 8]  # 8 = 3 + 3 + 2 over the 3 views, in prompt order
    # image-level indices: view v owns [v * 16, (v + 1) * 16)
    got = _rows(last.indices)[0]
    per_view = [[v * PER_VIEW + i for i in row] for v, row in enumerate(_rows(views.indices)[:3])]
    assert got == [i for row in per_view for i in row]
    with vtoken.apply(model, "divprune", keep=0.5) as handle:  # a ratio applies to every view
        _logits(model, inputs)
    assert handle.last.extras["views"].mask.sum(1).tolist() == [8] * 5
    assert handle.last.mask.sum(1).tolist() == [24, 8, 8]
    with vtoken.apply(model, "hired", keep=2) as handle:  # fewer tokens than views: the thumbnail is dropped whole
        out = model.generate(**inputs, max_new_tokens=3, do_sample=False, return_dict_in_generate=True)
    assert handle.last.mask.sum(1).tolist() == [2, 2, 2]
    assert handle.last.extras["views"].mask.sum(1).tolist() == [1, 1, 0, 2, 2]
    assert all(0 <= i < 2 * PER_VIEW for i in _rows(handle.last.indices)[0])
    text = (inputs["input_ids"] != model.config.image_token_id).sum(1)
    assert out.past_key_values.get_seq_length() == int((text + torch.tensor([2, 4])).max()) + 3 - 1


def test_split_keep_rule():
    views = torch.tensor([3, 3, 3, 1, 5, 5, 5, 5, 5])
    pos = torch.tensor([0, 1, 2, 0, 0, 1, 2, 3, 4])
    assert split_keep(8, views, pos).tolist() == [3, 3, 2, 8, 2, 2, 2, 1, 1]
    assert split_keep(2, views, pos).tolist() == [1, 1, 0, 2, 1, 1, 0, 0, 0]  # views with no share are dropped
    assert split_keep(0.25, views, pos) is None


@pytest.mark.parametrize("qk_norm", [False, True])
def test_cls_signal_is_the_block_mean_of_the_cls_row(qk_norm, inputs):
    """hired keeps the top-k of cls_attn: compare with the model's own eager attentions, CLS row averaged over heads,
    CLS column dropped, then averaged over each 2 x 2 pixel-shuffle block."""
    m = tiny_internvl(attn="eager", qk_norm=qk_norm)
    one = sample_inputs(inputs, LAYOUT, 1)  # two single-view images
    with vtoken.apply(m, "hired", keep=5) as handle:
        _logits(m, one)
    layer = handle.adapter.spec_layers(get_method("hired"), "cls_attn")[0]
    with torch.no_grad():
        att = m.model.vision_tower(pixel_values=one["pixel_values"], output_attentions=True).attentions[layer]
    cls = block_mean(att.mean(1)[:, 0, 1:], 8, 2)
    expect = cls.topk(5, dim=1).indices.sort(dim=1).values
    assert torch.equal(handle.last.indices, expect)


@pytest.mark.parametrize("method", ["divprune", "vtc_cls", "random", "visionzip", "lavit_dynamic"])
def test_cache_holds_only_kept_tokens(model, inputs, method):
    with vtoken.apply(model, method, keep=8) as handle:
        out = model.generate(**inputs, max_new_tokens=4, do_sample=False, return_dict_in_generate=True)
        kept = handle.last.mask.sum(1)
    per_sample = torch.zeros(len(LAYOUT), dtype=torch.long).index_add_(0, torch.tensor(IMAGE_SAMPLE), kept)
    text = (inputs["input_ids"] != model.config.image_token_id).sum(1)  # padding columns stay (they are masked)
    prefill = int((text + per_sample).max())
    assert out.past_key_values.get_seq_length() == prefill + 4 - 1
    assert out.sequences.shape[1] == inputs["input_ids"].shape[1] + 4


@pytest.mark.parametrize("method", ["divprune", "vtc_cls", "hiprune"])
def test_kept_tokens_keep_their_positions(model, inputs, method):
    """Reference built by hand: the full embeddings at the kept columns, with their original position ids."""
    with vtoken.apply(model, method, keep=8) as handle:
        got = _logits(model, inputs)
        kept = _rows(handle.last.indices)
    with torch.no_grad():
        ids, mask = inputs["input_ids"], inputs["attention_mask"]
        image = ids == model.config.image_token_id
        embeds = model.get_input_embeddings()(ids)
        feats = model.model.get_image_features(pixel_values=inputs["pixel_values"]).pooler_output
        embeds[image] = feats.reshape(-1, feats.shape[-1])
        keep = ~image
        rows, cols = image.nonzero(as_tuple=True)
        start = 0
        for img, views in enumerate(IMAGE_VIEWS):
            n = views * PER_VIEW
            keep[rows[start : start + n][kept[img]], cols[start : start + n][kept[img]]] = True
            start += n
        for b in range(len(LAYOUT)):
            real = keep[b] & mask[b].bool()
            pos = torch.arange(ids.shape[1])[real]  # the model numbers a call without position_ids by column
            out = model(inputs_embeds=embeds[b : b + 1, real], position_ids=pos[None],
                        attention_mask=torch.ones(1, int(real.sum()), dtype=torch.long)).logits
            torch.testing.assert_close(got[b, -int(real.sum()):], out[0], atol=2e-5, rtol=1e-4)


@pytest.fixture(scope="module")
def eager():
    return tiny_internvl(attn="eager")


@pytest.mark.parametrize("method", ATTENTION)
def test_sdpa_and_eager_select_identical_tokens(model, eager, inputs, method):
    chosen = []
    for attn, m in (("sdpa", model), ("eager", eager)):
        assert m.config.vision_config._attn_implementation == attn
        with vtoken.apply(m, method, keep=8) as handle:
            _logits(m, inputs)
            chosen.append(handle.last.indices.clone())
    assert torch.equal(chosen[0], chosen[1])


def test_composition_runs_in_stage_order(model, inputs):
    with vtoken.apply(model, [("visionzip", {"keep": 0.5}), ("divprune", {"keep": 4})]) as handle:
        _logits(model, inputs)
        steps = handle.last.extras["steps"]  # per view
        assert [s.mask.sum(1).tolist() for s in steps] == [[8] * 5, [2, 1, 1, 4, 4]]
        assert handle.last.mask.sum(1).tolist() == [4, 4, 4]
        views = handle.last.extras["views"]
        assert torch.equal(views.indices, torch.where(views.mask, steps[0].indices.gather(
            1, steps[1].indices.clamp(min=0)), -1))


def test_labels_are_compacted(model, inputs):
    labels = inputs["input_ids"].masked_fill(inputs["attention_mask"] == 0, -100)
    with vtoken.apply(model, "divprune", keep=8):
        out = model(**inputs, labels=labels)
    assert torch.isfinite(out.loss)


def test_errors_leave_the_model_unpatched(model, inputs):
    ref = _logits(model, inputs)
    with pytest.raises(ValueError, match="token_shuffle"):
        vtoken.apply(model, "token_shuffle", keep=16)
    with pytest.raises(ValueError, match="stage"):
        vtoken.apply(model, "tome", keep=16)
    with pytest.raises(ValueError, match="keep"):
        vtoken.apply(model, "divprune", keep=0)
    with pytest.raises(TypeError, match="bogus"):
        vtoken.apply(model, "divprune", keep=8, bogus=1)
    assert "forward" not in model.__dict__
    with vtoken.apply(model, "divprune", keep=8), pytest.raises(ValueError, match="already"):
        vtoken.apply(model, "random", keep=8)
    assert "forward" not in model.__dict__
    bad = dict(inputs, pixel_values=inputs["pixel_values"][:4])
    with vtoken.apply(model, "divprune", keep=8), pytest.raises(ValueError, match="views"):
        _logits(model, bad)
    assert "forward" not in model.__dict__
    assert torch.equal(_logits(model, inputs), ref)
