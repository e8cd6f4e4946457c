"""vtoken.apply on LLaVA-NeXT: the adapter contract and docs/design.md invariants 1-3 for every supported method, on
images of different sizes (different crop grids, unpadding and token counts) in one batch, plus the per-view ``keep``
split, the newline rule and the crop-aware methods (``hired``, ``globalcom2``)."""

from __future__ import annotations

import pytest
import torch

import vtoken
from tests.models import contract
from tests.models.contract import logits
from tests.models.tiny_llava_next import IMAGE_TOKEN, image_tokens, llava_next_inputs, sample_inputs, tiny_llava_next
from vtoken.models.llava_next import LlavaNextAdapter
from vtoken.ops.crops import apportion

SUPPORTED = contract.supported(LlavaNextAdapter)
ATTENTION = contract.attention_methods(LlavaNextAdapter, contract.ATTENTION_SIGNALS)
SIZES = [(40, 70), (32, 32)]  # 2 x 2 crops with rows cut by unpadding; 1 x 2 crops with columns cut
N = 16                        # tokens per view (4 x 4)


@pytest.fixture(scope="module")
def model():
    return tiny_llava_next()


@pytest.fixture(scope="module")
def inputs(model):
    return llava_next_inputs(model, SIZES, [(3, 5), (6, 2)])


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
    assert contract.pre_llm_methods() <= set(SUPPORTED)
    assert {"hired", "globalcom2"} <= set(SUPPORTED)
    assert "llava_next" in vtoken.models.families_supporting(vtoken.get_method("globalcom2"))


@pytest.mark.parametrize("method", SUPPORTED)
def test_keep_all_gives_identical_logits_and_generation(model, inputs, method):
    packed = _packed(model, inputs)

    def full(last):
        for b, p in enumerate(packed):
            assert last.indices[b][last.mask[b]].tolist() == sorted(p[p >= 0].tolist())
            assert int(last.extras["newlines"][b]) == int((p == -1).sum())

    contract.check_keep_all(model, inputs, method, full)


@pytest.mark.parametrize("method", SUPPORTED)
def test_remove_restores_exactly(model, inputs, method):
    contract.check_remove(model, inputs, method, keep=8)


@pytest.mark.parametrize("method", SUPPORTED)
def test_batch_equals_each_sample(model, inputs, method):
    contract.check_batch(model, inputs, method, 8, [sample_inputs(inputs, b) for b in range(2)])


@pytest.mark.parametrize("method", ["divprune", "random", "visionzip", "lavit_dynamic", "hired", "globalcom2"])
def test_cache_holds_only_kept_tokens(model, inputs, method):
    contract.check_cache(model, inputs, method, 8)


@pytest.mark.parametrize("method", ["divprune", "vtc_cls", "hired", "globalcom2"])
def test_kept_tokens_keep_their_positions(model, inputs, method):
    """Reference built by hand from the model's own packing: the full embeddings at the kept placeholders (tokens and
    the newlines of rows with a kept token), with their original position ids."""
    with vtoken.apply(model, method, keep=8) as handle:
        got = logits(model, inputs)
        kept, kmask = handle.last.indices, handle.last.mask
    packed = _packed(model, inputs)
    ids = inputs["input_ids"]
    feats = model.model.get_image_features(pixel_values=inputs["pixel_values"],
                                           image_sizes=inputs["image_sizes"]).pooler_output
    keep = ids != IMAGE_TOKEN
    for b in range(2):
        cols = (ids[b] == IMAGE_TOKEN).nonzero()[:, 0]
        on = torch.isin(packed[b], kept[b][kmask[b]])
        row = _rows(packed[b])
        on |= (packed[b] == -1) & torch.isin(row, row[on & (row >= 0)])
        keep[b, cols[on]] = True
    contract.check_hand_built(model, got, contract.embed_images(model, ids, feats), keep, inputs["attention_mask"])


@pytest.mark.parametrize("method", ATTENTION)
def test_sdpa_and_eager_select_identical_tokens(inputs, method):
    contract.check_sdpa_eager(lambda attn: tiny_llava_next(attn=attn), inputs, method, 8)


def test_keep_is_split_over_views_in_proportion(model, inputs):
    packed = _packed(model, inputs)
    with vtoken.apply(model, "random", keep=10) as handle:
        logits(model, inputs)
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
        logits(model, inputs)
        assert handle.last.mask.sum(1).tolist() == [int((p >= 0).sum() * 0.25 + 0.5) for p in packed]


def test_newline_stays_iff_its_row_keeps_a_token(model, inputs):
    packed = _packed(model, inputs)
    for keep in (1, 3, 12):
        with vtoken.apply(model, "divprune", keep=keep) as handle:
            logits(model, inputs)
            last = handle.last
        for b, p in enumerate(packed):
            row = _rows(p)
            on = torch.isin(p, last.indices[b][last.mask[b]])
            assert int(last.extras["newlines"][b]) == int(row[on & (row >= 0)].unique().numel())


def test_hired_splits_the_budget_by_thumbnail_attention(model, inputs):
    with vtoken.apply(model, "hired", keep=12, alpha=0.5) as handle:
        logits(model, inputs)
        last = handle.last
        view_counts = last.extras["steps"][0].extras["view_counts"]
    assert last.mask.sum(1).tolist() == [12, 12]
    assert view_counts[:, 0].tolist() == [6, 6]          # floor(alpha * keep) for the thumbnail
    for b in range(2):
        kept = last.indices[b][last.mask[b]]
        assert torch.bincount(kept // N, minlength=view_counts.shape[1]).tolist() == view_counts[b].tolist()
    with vtoken.apply(model, "hired", keep=12, alpha=1.0) as handle:
        logits(model, inputs)
        assert bool((handle.last.indices[handle.last.mask] < N).all()), "alpha = 1 keeps only the thumbnail"


def test_globalcom2_keeps_at_most_keep_with_thumbnail_share(model, inputs):
    packed = _packed(model, inputs)
    with vtoken.apply(model, "globalcom2", keep=0.25) as handle:
        logits(model, inputs)
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
            logits(model, inputs)
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
    ref = logits(model, both)
    with vtoken.apply(model, "visionzip", keep=1.0):
        assert torch.equal(logits(model, both), ref)
    with vtoken.apply(model, "visionzip", keep=6) as handle:
        out = logits(model, both)
        assert handle.last.mask.sum(1).tolist() == [6, 6]
        placeholders = image_tokens(model, (40, 70)) + image_tokens(model, (32, 32))
        assert out.shape[1] == ids.shape[1] - placeholders + 12 + int(handle.last.extras["newlines"].sum())


def test_stacked_4d_pixel_values(model, inputs):
    views = [5, 3]
    flat = {**inputs, "pixel_values": torch.cat([inputs["pixel_values"][b, :v] for b, v in enumerate(views)])}
    assert torch.equal(logits(model, flat), logits(model, inputs))
    with vtoken.apply(model, "divprune", keep=8) as handle:
        a = logits(model, inputs)
        idx = handle.last.indices.clone()
        assert torch.equal(logits(model, flat), a) and torch.equal(handle.last.indices, idx)


def test_labels_are_compacted(model, inputs):
    contract.check_labels(model, inputs)


def test_errors_leave_the_model_unpatched(model, inputs):
    no_sizes = {k: v for k, v in inputs.items() if k != "image_sizes"}
    contract.check_errors(model, inputs, [
        (ValueError, "encoder", "tome", {"keep": 8}),
        (ValueError, "token_shuffle", "token_shuffle", {"keep": 16}),
        (ValueError, "keep", "hired", {"keep": 0}),
        (TypeError, "bogus", "globalcom2", {"keep": 8, "bogus": 1}),
        (ValueError, "retention_ratio", "globalcom2", {"keep": 8, "retention_ratio": 2.0}),  # at apply, not later
    ], failing=[
        ("divprune", {"keep": 8}, no_sizes, ValueError, "image_sizes"),
        ("divprune", {"keep": 8}, dict(inputs, vision_feature_select_strategy="full"), ValueError, "full"),
    ])
