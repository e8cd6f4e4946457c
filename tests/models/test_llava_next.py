"""vtoken.apply on LLaVA-NeXT: the adapter contract and DESIGN.md invariants 1-3 for every supported method, on
images of different sizes (different crop grids, unpadding and token counts) in one batch, plus the per-view ``keep``
split, the newline rule and the crop-aware methods (``hired``, ``globalcom2``)."""

from __future__ import annotations

import pytest
import torch

import vtoken
from tests.models.tiny_llava_next import IMAGE_TOKEN, image_tokens, llava_next_inputs, tiny_llava_next
from vtoken.models.llava_next import LlavaNextAdapter
from vtoken.ops.crops import apportion

SUPPORTED = [m.name for m in vtoken.methods() if LlavaNextAdapter.unsupported(m) is None]
ATTENTION = [m.name for m in vtoken.methods() if LlavaNextAdapter.unsupported(m) is None
             and {"cls_attn", "cls_attn_layers", "attn_logits", "attn", "attn_received_layers", "keys"}
             & set(m.signals)]
SIZES = [(40, 70), (32, 32)]  # 2 x 2 crops with rows cut by unpadding; 1 x 2 crops with columns cut
N = 16                        # tokens per view (4 x 4)


@pytest.fixture(scope="module")
def model():
    return tiny_llava_next()


@pytest.fixture(scope="module")
def inputs(model):
    return llava_next_inputs(model, SIZES, [(3, 5), (6, 2)])


@torch.no_grad()
def _logits(model, inputs):
    return model(**inputs).logits


def _alone(inputs, b):
    real = inputs["attention_mask"][b].bool()
    return {"input_ids": inputs["input_ids"][b : b + 1, real], "pixel_values": inputs["pixel_values"][b : b + 1],
            "image_sizes": inputs["image_sizes"][b : b + 1]}


def _packed(model, inputs) -> list[torch.Tensor]:
    """Per image, the view-major index (``view * N + slot``) of every placeholder, ``-1`` on newlines: the model's own
    ``pack_image_features`` run on features that hold their index."""
    cfg = model.config
    views = [int(v) for v in (inputs["pixel_values"].abs().sum((2, 3, 4)) > 0).sum(1)]
    feats = [torch.arange(v * N, dtype=torch.float32).reshape(v, N, 1) for v in views]
    packed, _ = model.model.pack_image_features(feats, inputs["image_sizes"], cfg.vision_feature_select_strategy,
                                                image_newline=torch.tensor([-1.0]))
    return [p[:, 0].long() for p in packed]


def _rows(packed: torch.Tensor) -> torch.Tensor:
    """Canvas row of every placeholder (``-1`` on the base view), from the newline positions."""
    nl = (packed == -1).long()
    row = torch.cumsum(nl, 0) - nl
    row[:N] = -1
    return row


def test_every_pre_llm_method_is_supported():
    expected = {m.name for m in vtoken.methods() if m.stage in ("pre_llm", "video") and m.kind != "layout"}
    assert expected <= set(SUPPORTED)
    assert {"hired", "globalcom2"} <= set(SUPPORTED)
    assert "llava_next" in vtoken.models.families_supporting(vtoken.get_method("globalcom2"))


@pytest.mark.parametrize("method", SUPPORTED)
def test_keep_all_gives_identical_logits_and_generation(model, inputs, method):
    ref = _logits(model, inputs)
    gen_ref = model.generate(**inputs, max_new_tokens=4, do_sample=False)
    packed = _packed(model, inputs)
    with vtoken.apply(model, method, keep=1.0) as handle:
        assert torch.equal(_logits(model, inputs), ref)
        assert torch.equal(model.generate(**inputs, max_new_tokens=4, do_sample=False), gen_ref)
        for b, p in enumerate(packed):
            got = handle.last.indices[b][handle.last.mask[b]]
            assert got.tolist() == sorted(p[p >= 0].tolist())
            assert int(handle.last.extras["newlines"][b]) == int((p == -1).sum())


@pytest.mark.parametrize("method", SUPPORTED)
def test_remove_restores_exactly(model, inputs, method):
    ref = _logits(model, inputs)
    tower = model.model.vision_tower
    q_proj = getattr(tower, "vision_model", tower).encoder.layers[0].self_attn.q_proj
    hooks_before = len(q_proj._forward_hooks)
    handle = vtoken.apply(model, method, keep=8)
    reduced = _logits(model, inputs)
    assert reduced.shape[1] < ref.shape[1]
    handle.remove()
    assert "forward" not in model.__dict__
    assert len(q_proj._forward_hooks) == hooks_before
    assert torch.equal(_logits(model, inputs), ref)
    handle.remove()  # idempotent


@pytest.mark.parametrize("method", SUPPORTED)
def test_batch_equals_each_sample(model, inputs, method):
    with vtoken.apply(model, method, keep=8) as handle:
        batch = _logits(model, inputs)[:, -1]
        batch_idx = handle.last.indices.clone()
        for b in range(2):
            alone = _logits(model, _alone(inputs, b))[:, -1]
            assert handle.last.indices[0].tolist() == batch_idx[b][batch_idx[b] >= 0].tolist()
            torch.testing.assert_close(alone[0], batch[b], atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("method", ["divprune", "random", "visionzip", "lavit_dynamic", "hired", "globalcom2"])
def test_cache_holds_only_kept_tokens(model, inputs, method):
    with vtoken.apply(model, method, keep=8) as handle:
        out = model.generate(**inputs, max_new_tokens=4, do_sample=False, return_dict_in_generate=True)
        kept = handle.last.mask.sum(1) + handle.last.extras["newlines"]
    text = (inputs["input_ids"] != IMAGE_TOKEN).sum(1)  # padding columns stay (they are masked)
    prefill = int((text + kept).max())
    assert out.past_key_values.get_seq_length() == prefill + 4 - 1
    assert out.sequences.shape[1] == inputs["input_ids"].shape[1] + 4


@pytest.mark.parametrize("method", ["divprune", "vtc_cls", "hired", "globalcom2"])
def test_kept_tokens_keep_their_positions(model, inputs, method):
    """Reference built by hand from the model's own packing: the full embeddings at the kept placeholders (tokens and
    the newlines of rows with a kept token), with their original position ids."""
    with vtoken.apply(model, method, keep=8) as handle:
        got = _logits(model, inputs)
        kept, kmask = handle.last.indices, handle.last.mask
    packed = _packed(model, inputs)
    with torch.no_grad():
        ids, mask = inputs["input_ids"], inputs["attention_mask"]
        embeds = model.get_input_embeddings()(ids)
        feats = model.model.get_image_features(pixel_values=inputs["pixel_values"],
                                               image_sizes=inputs["image_sizes"]).pooler_output
        for b in range(2):
            cols = (ids[b] == IMAGE_TOKEN).nonzero()[:, 0]
            embeds[b, cols] = feats[b]
            on = torch.isin(packed[b], kept[b][kmask[b]])
            row = _rows(packed[b])
            on |= (packed[b] == -1) & torch.isin(row, row[on & (row >= 0)])
            keep = ids[b] != IMAGE_TOKEN
            keep[cols[on]] = True
            real = keep & mask[b].bool()
            pos = torch.arange(ids.shape[1])[real]  # the model numbers a call without position_ids by column
            out = model(inputs_embeds=embeds[b : b + 1, real], position_ids=pos[None],
                        attention_mask=torch.ones(1, int(real.sum()), dtype=torch.long)).logits
            torch.testing.assert_close(got[b, -int(real.sum()):], out[0], atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("method", ATTENTION)
def test_sdpa_and_eager_select_identical_tokens(inputs, method):
    chosen = []
    for attn in ("sdpa", "eager"):
        m = tiny_llava_next(attn=attn)
        assert m.config.text_config._attn_implementation == attn
        with vtoken.apply(m, method, keep=8) as handle:
            _logits(m, inputs)
            chosen.append(handle.last.indices.clone())
    assert torch.equal(chosen[0], chosen[1])


def test_keep_is_split_over_views_in_proportion(model, inputs):
    packed = _packed(model, inputs)
    with vtoken.apply(model, "random", keep=10) as handle:
        _logits(model, inputs)
        last = handle.last
    for b, p in enumerate(packed):
        kept = last.indices[b][last.mask[b]]
        assert kept.numel() == 10
        assert bool(torch.isin(kept, p[p >= 0]).all()), "a token cut by unpadding was kept"
        per_view = torch.bincount(p[p >= 0] // N, minlength=5)
        want = apportion(torch.tensor([10]), per_view[None], per_view[None])[0]
        assert torch.bincount(kept // N, minlength=5).tolist() == want.tolist()
    # a ratio: each image keeps round(ratio * its valid tokens)
    with vtoken.apply(model, "random", keep=0.25) as handle:
        _logits(model, inputs)
        assert handle.last.mask.sum(1).tolist() == [int((p >= 0).sum() * 0.25 + 0.5) for p in packed]


def test_newline_stays_iff_its_row_keeps_a_token(model, inputs):
    packed = _packed(model, inputs)
    for keep in (1, 3, 12):
        with vtoken.apply(model, "divprune", keep=keep) as handle:
            _logits(model, inputs)
            last = handle.last
        for b, p in enumerate(packed):
            row = _rows(p)
            on = torch.isin(p, last.indices[b][last.mask[b]])
            assert int(last.extras["newlines"][b]) == int(row[on & (row >= 0)].unique().numel())


def test_hired_splits_the_budget_by_thumbnail_attention(model, inputs):
    with vtoken.apply(model, "hired", keep=12, alpha=0.5) as handle:
        _logits(model, inputs)
        last = handle.last
        view_counts = last.extras["steps"][0].extras["view_counts"]
    assert last.mask.sum(1).tolist() == [12, 12]
    assert view_counts[:, 0].tolist() == [6, 6]          # floor(alpha * keep) for the thumbnail
    for b in range(2):
        kept = last.indices[b][last.mask[b]]
        assert torch.bincount(kept // N, minlength=view_counts.shape[1]).tolist() == view_counts[b].tolist()
    with vtoken.apply(model, "hired", keep=12, alpha=1.0) as handle:
        _logits(model, inputs)
        assert bool((handle.last.indices[handle.last.mask] < N).all()), "alpha = 1 keeps only the thumbnail"


def test_globalcom2_keeps_at_most_keep_with_thumbnail_share(model, inputs):
    packed = _packed(model, inputs)
    with vtoken.apply(model, "globalcom2", keep=0.25) as handle:
        _logits(model, inputs)
        last = handle.last
        extras = last.extras["steps"][0].extras
    for b, p in enumerate(packed):
        n_valid = int((p >= 0).sum())
        k = int(n_valid * 0.25 + 0.5)
        assert int(last.mask[b].sum()) <= k
        assert int(extras["view_counts"][b, 0]) == N * k // n_valid   # floor(g^2 r), r = keep / valid
        scales = extras["crop_scales"][b]
        assert bool((scales <= 1.0).all())


def test_composition_mixes_per_view_and_crop_aware_steps(model, inputs):
    for plan in ([("globalcom2", {"keep": 0.5}), ("divprune", {"keep": 8})],
                 [("divprune", {"keep": 30}), ("hired", {"keep": 8})]):
        with vtoken.apply(model, plan) as handle:
            _logits(model, inputs)
            steps = handle.last.extras["steps"]
            assert handle.last.mask.sum(1).tolist() == [8, 8]
            composed = steps[0].indices.gather(1, steps[1].indices.clamp(min=0))
            assert torch.equal(handle.last.indices, torch.where(handle.last.mask, composed, -1))


def test_several_images_in_one_sample(model):
    one = llava_next_inputs(model, [(40, 70)], [(2, 1)], seed=3)
    two = llava_next_inputs(model, [(32, 32)], [(1, 2)], seed=4)
    ids = torch.cat([one["input_ids"][0], two["input_ids"][0]])[None]
    both = {"input_ids": ids, "attention_mask": torch.ones_like(ids),
            "pixel_values": torch.cat([one["pixel_values"], torch.nn.functional.pad(two["pixel_values"],
                                                                                    (0, 0, 0, 0, 0, 0, 0, 2))]),
            "image_sizes": torch.cat([one["image_sizes"], two["image_sizes"]])}
    ref = _logits(model, both)
    with vtoken.apply(model, "visionzip", keep=1.0):
        assert torch.equal(_logits(model, both), ref)
    with vtoken.apply(model, "visionzip", keep=6) as handle:
        out = _logits(model, both)
        assert handle.last.mask.sum(1).tolist() == [6, 6]
        placeholders = image_tokens(model, (40, 70)) + image_tokens(model, (32, 32))
        assert out.shape[1] == ids.shape[1] - placeholders + 12 + int(handle.last.extras["newlines"].sum())


def test_stacked_4d_pixel_values(model, inputs):
    views = [5, 3]
    flat = {**inputs, "pixel_values": torch.cat([inputs["pixel_values"][b, :v] for b, v in enumerate(views)])}
    assert torch.equal(_logits(model, flat), _logits(model, inputs))
    with vtoken.apply(model, "divprune", keep=8) as handle:
        a = _logits(model, inputs)
        idx = handle.last.indices.clone()
        assert torch.equal(_logits(model, flat), a) and torch.equal(handle.last.indices, idx)


def test_labels_are_compacted(model, inputs):
    labels = inputs["input_ids"].masked_fill(inputs["attention_mask"] == 0, -100)
    with vtoken.apply(model, "divprune", keep=8):
        out = model(**inputs, labels=labels)
    assert torch.isfinite(out.loss)


def test_errors_leave_the_model_unpatched(model, inputs):
    ref = _logits(model, inputs)
    with pytest.raises(ValueError, match="encoder"):
        vtoken.apply(model, "tome", keep=8)
    with pytest.raises(ValueError, match="token_shuffle"):
        vtoken.apply(model, "token_shuffle", keep=16)
    with pytest.raises(ValueError, match="keep"):
        vtoken.apply(model, "hired", keep=0)
    with pytest.raises(TypeError, match="bogus"):
        vtoken.apply(model, "globalcom2", keep=8, bogus=1)
    assert "forward" not in model.__dict__
    with vtoken.apply(model, "divprune", keep=8):
        with pytest.raises(ValueError, match="image_sizes"):
            model(**{k: v for k, v in inputs.items() if k != "image_sizes"})
        with pytest.raises(ValueError, match="full"):
            model(**inputs, vision_feature_select_strategy="full")
        with pytest.raises(ValueError, match="already"):
            vtoken.apply(model, "random", keep=8)
    with vtoken.apply(model, "globalcom2", keep=8, retention_ratio=2.0), pytest.raises(ValueError, match="retention"):
        model(**inputs)
    assert "forward" not in model.__dict__
    assert torch.equal(_logits(model, inputs), ref)
