"""vtoken.apply on LLaVA: the adapter contract and docs/design.md invariants 1-3 for every supported method (the checks
are in :mod:`tests.models.contract`)."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import vtoken
from tests.models import contract
from tests.models.contract import logits
from tests.models.tiny import llava_inputs, llava_sample, tiny_llava
from vtoken.models.llava import LlavaAdapter

SUPPORTED = contract.supported(LlavaAdapter)
ATTENTION = contract.attention_methods(LlavaAdapter)


@pytest.fixture(scope="module")
def model():
    return tiny_llava()


@pytest.fixture(scope="module")
def inputs(model):
    return llava_inputs(model, [(3, 5), (6, 2)])


def test_every_pre_llm_method_is_supported():
    assert contract.pre_llm_methods() <= set(SUPPORTED)


@pytest.mark.parametrize("method", SUPPORTED)
def test_keep_all_gives_identical_logits_and_generation(model, inputs, method):
    def full(last):
        assert last.indices.tolist() == [list(range(64))] * 2

    contract.check_keep_all(model, inputs, method, full)


@pytest.mark.parametrize("method", SUPPORTED)
def test_remove_restores_exactly(model, inputs, method):
    contract.check_remove(model, inputs, method, keep=8)


@pytest.mark.parametrize("method", SUPPORTED)
def test_batch_equals_each_sample(model, inputs, method):
    contract.check_batch(model, inputs, method, 8, [llava_sample(inputs, b) for b in range(2)])


@pytest.mark.parametrize("method", ["divprune", "vtc_cls", "random", "visionzip", "lavit_dynamic"])
def test_cache_holds_only_kept_tokens(model, inputs, method):
    contract.check_cache(model, inputs, method, 8)


@pytest.mark.parametrize("method", ["divprune", "vtc_cls", "hired"])
def test_kept_tokens_keep_their_positions(model, inputs, method):
    """Reference built by hand: the full embeddings at the kept columns, with their original position ids."""
    feats = model.model.get_image_features(pixel_values=inputs["pixel_values"]).pooler_output
    contract.check_positions(model, inputs, method, 8, feats, [64, 64])


@pytest.mark.parametrize("method", ATTENTION)
def test_sdpa_and_eager_select_identical_tokens(inputs, method):
    contract.check_sdpa_eager(lambda attn: tiny_llava(attn=attn), inputs, method, 8)


def test_composition_runs_in_stage_order(model, inputs):
    with vtoken.apply(model, [("visionzip", {"keep": 32}), ("divprune", {"keep": 8})]) as handle:
        logits(model, inputs)
        steps = handle.last.extras["steps"]
        assert [s.tokens.shape[1] for s in steps] == [32, 8]
        assert handle.last.mask.sum(1).tolist() == [8, 8]
        first = steps[0].indices
        assert torch.equal(handle.last.indices, first.gather(1, steps[1].indices))


def test_labels_are_compacted(model, inputs):
    contract.check_labels(model, inputs)


def test_two_models_side_by_side(inputs):
    contract.check_two_models(tiny_llava(seed=0), tiny_llava(seed=0), inputs, 8)


def test_errors_leave_the_model_unpatched(model, inputs):
    with pytest.raises(TypeError, match="llava"):
        vtoken.apply(LlamaForCausalLM(LlamaConfig(vocab_size=16, hidden_size=16, intermediate_size=16,
                                                  num_hidden_layers=1, num_attention_heads=2)), "divprune", keep=8)
    contract.check_errors(model, inputs, [
        (ValueError, "unknown method", "nope", {"keep": 8}),
        (ValueError, "keep", "divprune", {"keep": 0}),
        (ValueError, "keep", "divprune", {}),
        (TypeError, "bogus", "divprune", {"keep": 8, "bogus": 1}),
        (ValueError, "token_shuffle", "token_shuffle", {"keep": 16}),
    ])
