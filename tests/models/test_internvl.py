"""vtoken.apply on InternVL: the adapter contract and docs/design.md invariants 1-3 for every supported method, with a
multi-view (tiled) image next to single-view ones, the keep split over views and the pixel-shuffle signal rule."""

from __future__ import annotations

import pytest
import torch

import vtoken
from tests.models import contract
from tests.models.contract import kept_rows, logits
from tests.models.tiny_internvl import PER_VIEW, internvl_inputs, sample_inputs, tiny_internvl
from vtoken.methods import get_method
from vtoken.models import families_supporting
from vtoken.models.internvl import InternVLAdapter
from vtoken.models.views import block_mean, split_even

SUPPORTED = contract.supported(InternVLAdapter)
ATTENTION = contract.attention_methods(InternVLAdapter)
LAYOUT = [[3], [1, 1]]  # sample 0: one image of 3 views (2 tiles + thumbnail); sample 1: two single-view images
IMAGE_SAMPLE = [0, 1, 1]  # batch row of each image (rows of handle.last)
IMAGE_VIEWS = [3, 1, 1]


@pytest.fixture(scope="module")
def model():
    return tiny_internvl()


@pytest.fixture(scope="module")
def eager():
    return tiny_internvl(attn="eager")


@pytest.fixture(scope="module")
def inputs():
    return internvl_inputs(LAYOUT)


def test_every_pre_llm_method_is_supported():
    assert contract.pre_llm_methods() <= set(SUPPORTED)
    assert "internvl" in families_supporting(get_method("hired"))


@pytest.mark.parametrize("method", SUPPORTED)
def test_keep_all_gives_identical_logits_and_generation(model, inputs, method):
    def full(last):
        assert kept_rows(last.indices) == [list(range(v * PER_VIEW)) for v in IMAGE_VIEWS]

    contract.check_keep_all(model, inputs, method, full)


@pytest.mark.parametrize("method", SUPPORTED)
def test_remove_restores_exactly(model, inputs, method):
    contract.check_remove(model, inputs, method, keep=8)


@pytest.mark.parametrize("method", SUPPORTED)
def test_batch_equals_each_sample(model, inputs, method):
    samples = [sample_inputs(inputs, LAYOUT, b) for b in range(len(LAYOUT))]
    contract.check_batch(model, inputs, method, 8, samples, IMAGE_SAMPLE)


def test_keep_is_split_over_the_views_of_an_image(model, inputs):
    with vtoken.apply(model, "divprune", keep=8) as handle:
        logits(model, inputs)
    last = handle.last
    assert last.mask.sum(1).tolist() == [8, 8, 8]
    views = last.extras["views"]
    assert last.extras["view_image"].tolist() == [0, 0, 0, 1, 2]
    assert last.extras["view_position"].tolist() == [0, 1, 2, 0, 0]
    assert views.mask.sum(1).tolist() == [3, 3, 2, 8, 8]  # 8 = 3 + 3 + 2 over the 3 views, in prompt order
    # image-level indices: view v owns [v * 16, (v + 1) * 16)
    got = kept_rows(last.indices)[0]
    per_view = [[v * PER_VIEW + i for i in row] for v, row in enumerate(kept_rows(views.indices)[:3])]
    assert got == [i for row in per_view for i in row]
    with vtoken.apply(model, "divprune", keep=0.5) as handle:  # a ratio applies to every view
        logits(model, inputs)
    assert handle.last.extras["views"].mask.sum(1).tolist() == [8] * 5
    assert handle.last.mask.sum(1).tolist() == [24, 8, 8]
    with vtoken.apply(model, "hired", keep=2) as handle:  # fewer tokens than views: the thumbnail is dropped whole
        out = model.generate(**inputs, max_new_tokens=3, do_sample=False, return_dict_in_generate=True)
    assert handle.last.mask.sum(1).tolist() == [2, 2, 2]
    assert handle.last.extras["views"].mask.sum(1).tolist() == [1, 1, 0, 2, 2]
    assert all(0 <= i < 2 * PER_VIEW for i in kept_rows(handle.last.indices)[0])
    text = (inputs["input_ids"] != model.config.image_token_id).sum(1)
    assert out.past_key_values.get_seq_length() == int((text + torch.tensor([2, 4])).max()) + 3 - 1


def test_split_even_rule():
    views = torch.tensor([3, 3, 3, 1, 5, 5, 5, 5, 5])
    pos = torch.tensor([0, 1, 2, 0, 0, 1, 2, 3, 4])
    assert split_even(8, views, pos).tolist() == [3, 3, 2, 8, 2, 2, 2, 1, 1]
    assert split_even(2, views, pos).tolist() == [1, 1, 0, 2, 1, 1, 0, 0, 0]  # views with no share are dropped
    assert split_even(0.25, views, pos) is None


@pytest.mark.parametrize("qk_norm", [False, True])
def test_cls_signal_is_the_block_mean_of_the_cls_row(qk_norm, inputs):
    """hired keeps the top-k of cls_attn: compare with the model's own eager attentions, CLS row averaged over heads,
    CLS column dropped, then averaged over each 2 x 2 pixel-shuffle block."""
    m = tiny_internvl(attn="eager", qk_norm=qk_norm)
    one = sample_inputs(inputs, LAYOUT, 1)  # two single-view images
    with vtoken.apply(m, "hired", keep=5) as handle:
        logits(m, one)
    layer = handle.adapter.spec_layers(get_method("hired"), "cls_attn")[0]
    with torch.no_grad():
        att = m.model.vision_tower(pixel_values=one["pixel_values"], output_attentions=True).attentions[layer]
    cls = block_mean(att.mean(1)[:, 0, 1:], 8, 2)
    expect = cls.topk(5, dim=1).indices.sort(dim=1).values
    assert torch.equal(handle.last.indices, expect)


@pytest.mark.parametrize("method", ["divprune", "vtc_cls", "random", "visionzip", "lavit_dynamic"])
def test_cache_holds_only_kept_tokens(model, inputs, method):
    contract.check_cache(model, inputs, method, 8, IMAGE_SAMPLE)


@pytest.mark.parametrize("method", ["divprune", "vtc_cls", "hiprune"])
def test_kept_tokens_keep_their_positions(model, inputs, method):
    """Reference built by hand: the full embeddings at the kept columns, with their original position ids."""
    feats = model.model.get_image_features(pixel_values=inputs["pixel_values"]).pooler_output
    contract.check_positions(model, inputs, method, 8, feats, [v * PER_VIEW for v in IMAGE_VIEWS])


@pytest.mark.parametrize("method", ATTENTION)
def test_sdpa_and_eager_select_identical_tokens(model, eager, inputs, method):
    contract.check_sdpa_eager({"sdpa": model, "eager": eager}.get, inputs, method, 8)


def test_composition_runs_in_stage_order(model, inputs):
    with vtoken.apply(model, [("visionzip", {"keep": 0.5}), ("divprune", {"keep": 4})]) as handle:
        logits(model, inputs)
        steps = handle.last.extras["steps"]  # per view
        assert [s.mask.sum(1).tolist() for s in steps] == [[8] * 5, [2, 1, 1, 4, 4]]
        assert handle.last.mask.sum(1).tolist() == [4, 4, 4]
        views = handle.last.extras["views"]
        assert torch.equal(views.indices, torch.where(views.mask, steps[0].indices.gather(
            1, steps[1].indices.clamp(min=0)), -1))


def test_labels_are_compacted(model, inputs):
    contract.check_labels(model, inputs)


def test_errors_leave_the_model_unpatched(model, inputs):
    bad = dict(inputs, pixel_values=inputs["pixel_values"][:4])
    contract.check_errors(model, inputs, [
        (ValueError, "token_shuffle", "token_shuffle", {"keep": 16}),
        (ValueError, "stage", "tome", {"keep": 16}),
        (ValueError, "keep", "divprune", {"keep": 0}),
        (TypeError, "bogus", "divprune", {"keep": 8, "bogus": 1}),
    ], failing=[("divprune", {"keep": 8}, bad, ValueError, "views")])
