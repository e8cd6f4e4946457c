"""vtoken.apply on Idefics3 and SmolVLM: the adapter contract and design.md invariants 1-3 for every supported method,
with a split image (tiles + global view) next to unsplit ones, padded pixels, structural prompt tokens always kept,
the no-CLS rules (VisionZip's substitute, clear reasons for the other CLS methods)."""

from __future__ import annotations

import pytest
import torch

import vtoken
from tests.models import contract
from tests.models.contract import kept_rows, logits
from tests.models.tiny_idefics3 import IMAGE_TOKEN, PER_VIEW, idefics3_inputs, sample_inputs, tiny_idefics3
from vtoken.methods import get_method
from vtoken.models import families_supporting
from vtoken.models.idefics3 import Idefics3Adapter
from vtoken.models.views import block_mean

SUPPORTED = contract.supported(Idefics3Adapter)
ATTENTION = contract.attention_methods(Idefics3Adapter)
LAYOUT = [[(2, 1)], [(0, 0), (0, 0)]]  # sample 0: 2 x 1 tiles + global view; sample 1: two unsplit images
IMAGE_SAMPLE = [0, 1, 1]
IMAGE_VIEWS = [3, 1, 1]


@pytest.fixture(scope="module")
def model():
    return tiny_idefics3()


@pytest.fixture(scope="module")
def smol():
    return tiny_idefics3(smol=True)


@pytest.fixture(scope="module")
def eager():
    return tiny_idefics3(attn="eager")


@pytest.fixture(scope="module")
def inputs():
    return idefics3_inputs(LAYOUT, pad_pixels=True)


def test_supported_methods_and_reasons():
    expected = {name for name in contract.pre_llm_methods()
                if not {"cls_attn", "cls_attn_layers", "attn_logits"} & set(get_method(name).signals)}
    assert expected | {"visionzip"} <= set(SUPPORTED)
    for name in ("hired", "prumerge", "prumerge_plus", "vtc_cls"):
        assert "no CLS token" in Idefics3Adapter.unsupported(get_method(name))
        assert "idefics3" not in families_supporting(get_method(name))
    assert "idefics3" in families_supporting(get_method("visionzip"))


@pytest.mark.parametrize("method", SUPPORTED)
@pytest.mark.parametrize("smol_model", [False, True], ids=["idefics3", "smolvlm"])
def test_keep_all_gives_identical_logits_and_generation(model, smol, inputs, method, smol_model):
    def full(last):
        assert kept_rows(last.indices) == [list(range(v * PER_VIEW)) for v in IMAGE_VIEWS]

    contract.check_keep_all(smol if smol_model else model, inputs, method, full)


@pytest.mark.parametrize("method", SUPPORTED)
def test_remove_restores_exactly(model, inputs, method):
    contract.check_remove(model, inputs, method, keep=8)


BATCH_CASES = [(m, False) for m in SUPPORTED] + [(m, True) for m in ("divprune", "visionzip", "hiprune")]


@pytest.mark.parametrize(("method", "smol_model"), BATCH_CASES,
                         ids=[f"{'smolvlm' if s else 'idefics3'}-{m}" for m, s in BATCH_CASES])
def test_batch_equals_each_sample(model, smol, inputs, method, smol_model):
    """Every method on Idefics3; SmolVLM shares the whole vision path, a few methods suffice there."""
    samples = [sample_inputs(inputs, b) for b in range(len(LAYOUT))]
    contract.check_batch(smol if smol_model else model, inputs, method, 8, samples, IMAGE_SAMPLE)


def test_views_are_grouped_into_images_and_structural_tokens_stay(model, inputs):
    with vtoken.apply(model, "divprune", keep=8) as handle:
        got = logits(model, inputs)
    last = handle.last
    assert last.extras["view_image"].tolist() == [0, 0, 0, 1, 2]
    assert last.extras["views"].mask.sum(1).tolist() == [3, 3, 2, 8, 8]
    assert last.mask.sum(1).tolist() == [8, 8, 8]
    text = (inputs["input_ids"] != IMAGE_TOKEN).sum(1)  # fake tokens, row/col and global tags, newlines: all kept
    assert got.shape[1] == int((text + torch.tensor([8, 16])).max())
    # another prompt format (tags differing between samples): every view is an image of its own
    img = IMAGE_TOKEN
    ids = torch.tensor([[5, img, img, 7, img, img], [0, 0, 9, img, img, 1]])
    cols = torch.tensor([[1, 2], [4, 5], [3, 4]])
    assert Idefics3Adapter.view_images(ids, cols, torch.tensor([0, 0, 1])).tolist() == [0, 1, 2]
    ids[1, 2] = 7
    assert Idefics3Adapter.view_images(ids, cols, torch.tensor([0, 0, 1])).tolist() == [0, 0, 1]


def test_visionzip_substitute_is_the_mean_attention_received(inputs):
    """VisionZip's dominant tokens on SigLIP: attention received (mean over heads and real query rows) of the signal
    layer, from the model's own eager attentions, averaged over each 2 x 2 pixel-shuffle block."""
    m = tiny_idefics3(attn="eager")
    one = sample_inputs(inputs, 1)  # two unsplit images; the second has padded pixel rows
    with vtoken.apply(m, "visionzip", keep=6, contextual=0) as handle:
        logits(m, one)
    layer = handle.adapter.spec_layers(get_method("visionzip"), "cls_attn")[0]
    pixels = one["pixel_values"][0, :2]  # the third view is all-zero padding
    patch_mask = one["pixel_attention_mask"][0, :2].unfold(1, 4, 4).unfold(2, 4, 4).sum((-1, -2)) > 0
    assert not bool(patch_mask.all())
    with torch.no_grad():
        att = m.model.vision_model(pixel_values=pixels, patch_attention_mask=patch_mask,
                                   output_attentions=True).attentions[layer]
    rows = patch_mask.reshape(2, 1, -1, 1).float()
    received = (att * rows).sum(2) / rows.sum(2)  # [2, H, T]: mean over real query rows
    score = block_mean(received.mean(1), 8, 2)
    expect = score.topk(6, dim=1).indices.sort(dim=1).values
    assert torch.equal(handle.last.indices, expect)


@pytest.mark.parametrize("method", ["divprune", "visionzip", "random", "hiprune", "lavit_dynamic"])
def test_cache_holds_only_kept_tokens(model, inputs, method):
    contract.check_cache(model, inputs, method, 8, IMAGE_SAMPLE)


@pytest.mark.parametrize("method", ["divprune", "hiprune", "uniform"])
def test_kept_tokens_keep_their_positions(model, inputs, method):
    """Reference built by hand: the full embeddings at the kept columns, with their original position ids."""
    feats = model.model.get_image_features(inputs["pixel_values"], inputs["pixel_attention_mask"]).pooler_output
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


def test_labels_are_compacted(model, inputs):
    contract.check_labels(model, inputs)


def test_errors_leave_the_model_unpatched(model, inputs):
    contract.check_errors(model, inputs, [
        *[(ValueError, "no CLS token", name, {"keep": 8}) for name in ("hired", "vtc_cls", "prumerge")],
        (ValueError, "no CLS token", ["divprune", "hired"], {"keep": 8}),
        (ValueError, "keep", "divprune", {"keep": 0}),
    ])
