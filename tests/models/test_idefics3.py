"""vtoken.apply on Idefics3 and SmolVLM: the adapter contract and DESIGN.md invariants 1-3 for every supported method,
with a split image (tiles + global view) next to unsplit ones, padded pixels, structural prompt tokens always kept,
the no-CLS rules (VisionZip's substitute, clear reasons for the other CLS methods)."""

from __future__ import annotations

import pytest
import torch

import vtoken
from tests.models.tiny_idefics3 import IMAGE_TOKEN, PER_VIEW, idefics3_inputs, sample_inputs, tiny_idefics3
from vtoken.methods import get_method
from vtoken.models import families_supporting
from vtoken.models.idefics3 import Idefics3Adapter
from vtoken.models.internvl import block_mean

SUPPORTED = [m.name for m in vtoken.methods() if Idefics3Adapter.unsupported(m) is None]
ATTENTION = [m.name for m in vtoken.methods() if Idefics3Adapter.unsupported(m) is None
             and {"cls_attn", "attn", "attn_received_layers", "keys"} & set(m.signals)]
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
def inputs():
    return idefics3_inputs(LAYOUT, pad_pixels=True)


@torch.no_grad()
def _logits(model, inputs):
    return model(**inputs).logits


def _rows(indices):
    return [[i for i in row if i >= 0] for row in indices.tolist()]


def test_supported_methods_and_reasons():
    expected = {m.name for m in vtoken.methods() if m.stage in ("pre_llm", "video") and m.kind != "layout"
                and not {"cls_attn", "cls_attn_layers", "attn_logits"} & set(m.signals)}
    assert expected | {"visionzip"} <= set(SUPPORTED)
    for name in ("hired", "prumerge", "prumerge_plus", "vtc_cls"):
        assert "no CLS token" in Idefics3Adapter.unsupported(get_method(name))
        assert "idefics3" not in families_supporting(get_method(name))
    assert "idefics3" in families_supporting(get_method("visionzip"))


@pytest.mark.parametrize("method", SUPPORTED)
@pytest.mark.parametrize("smol_model", [False, True], ids=["idefics3", "smolvlm"])
def test_keep_all_gives_identical_logits_and_generation(model, smol, inputs, method, smol_model):
    m = smol if smol_model else model
    ref = _logits(m, inputs)
    gen_ref = m.generate(**inputs, max_new_tokens=4, do_sample=False)
    with vtoken.apply(m, method, keep=1.0) as handle:
        assert torch.equal(_logits(m, inputs), ref)
        assert torch.equal(m.generate(**inputs, max_new_tokens=4, do_sample=False), gen_ref)
        assert _rows(handle.last.indices) == [list(range(v * PER_VIEW)) for v in IMAGE_VIEWS]


@pytest.mark.parametrize("method", SUPPORTED)
def test_remove_restores_exactly(model, inputs, method):
    ref = _logits(model, inputs)
    q_proj = model.model.vision_model.encoder.layers[0].self_attn.q_proj
    hooks_before = len(q_proj._forward_hooks)
    handle = vtoken.apply(model, method, keep=8)
    reduced = _logits(model, inputs)
    assert reduced.shape[1] < ref.shape[1]
    handle.remove()
    assert "forward" not in model.__dict__
    assert len(q_proj._forward_hooks) == hooks_before
    assert torch.equal(_logits(model, inputs), ref)
    handle.remove()  # idempotent


BATCH_CASES = [(m, False) for m in SUPPORTED] + [(m, True) for m in ("divprune", "visionzip", "hiprune")]


@pytest.mark.parametrize(("method", "smol_model"), BATCH_CASES,
                         ids=[f"{'smolvlm' if s else 'idefics3'}-{m}" for m, s in BATCH_CASES])
def test_batch_equals_each_sample(model, smol, inputs, method, smol_model):
    """Every method on Idefics3; SmolVLM shares the whole vision path, a few methods suffice there."""
    m = smol if smol_model else model
    with vtoken.apply(m, method, keep=8) as handle:
        batch = _logits(m, inputs)[:, -1]
        batch_idx = _rows(handle.last.indices)
        for b in range(len(LAYOUT)):
            alone = _logits(m, sample_inputs(inputs, b))[:, -1]
            assert _rows(handle.last.indices) == [row for row, s in zip(batch_idx, IMAGE_SAMPLE, strict=True) if s == b]
            torch.testing.assert_close(alone[0], batch[b], atol=2e-5, rtol=1e-4)


def test_views_are_grouped_into_images_and_structural_tokens_stay(model, inputs):
    with vtoken.apply(model, "divprune", keep=8) as handle:
        got = _logits(model, inputs)
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
        _logits(m, one)
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
    with vtoken.apply(model, method, keep=8) as handle:
        out = model.generate(**inputs, max_new_tokens=4, do_sample=False, return_dict_in_generate=True)
        kept = handle.last.mask.sum(1)
    per_sample = torch.zeros(len(LAYOUT), dtype=torch.long).index_add_(0, torch.tensor(IMAGE_SAMPLE), kept)
    text = (inputs["input_ids"] != IMAGE_TOKEN).sum(1)
    prefill = int((text + per_sample).max())
    assert out.past_key_values.get_seq_length() == prefill + 4 - 1
    assert out.sequences.shape[1] == inputs["input_ids"].shape[1] + 4


@pytest.mark.parametrize("method", ["divprune", "hiprune", "uniform"])
def test_kept_tokens_keep_their_positions(model, inputs, method):
    """Reference built by hand: the full embeddings at the kept columns, with their original position ids."""
    with vtoken.apply(model, method, keep=8) as handle:
        got = _logits(model, inputs)
        kept = _rows(handle.last.indices)
    with torch.no_grad():
        ids, mask = inputs["input_ids"], inputs["attention_mask"]
        image = ids == IMAGE_TOKEN
        embeds = model.get_input_embeddings()(ids)
        feats = model.model.get_image_features(inputs["pixel_values"], inputs["pixel_attention_mask"]).pooler_output
        embeds[image] = torch.cat(list(feats))
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
    return tiny_idefics3(attn="eager")


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


def test_labels_are_compacted(model, inputs):
    labels = inputs["input_ids"].masked_fill(inputs["attention_mask"] == 0, -100)
    with vtoken.apply(model, "divprune", keep=8):
        out = model(**inputs, labels=labels)
    assert torch.isfinite(out.loss)


def test_errors_leave_the_model_unpatched(model, inputs):
    ref = _logits(model, inputs)
    for name in ("hired", "vtc_cls", "prumerge"):
        with pytest.raises(ValueError, match="no CLS token"):
            vtoken.apply(model, name, keep=8)
    with pytest.raises(ValueError, match="no CLS token"):
        vtoken.apply(model, ["divprune", "hired"], keep=8)
    with pytest.raises(ValueError, match="keep"):
        vtoken.apply(model, "divprune", keep=0)
    assert "forward" not in model.__dict__
    with vtoken.apply(model, "divprune", keep=8), pytest.raises(ValueError, match="already"):
        vtoken.apply(model, "random", keep=8)
    assert "forward" not in model.__dict__
    assert torch.equal(_logits(model, inputs), ref)
