"""``llm``-stage methods under the inputs serving code produces: both padding sides, with and without explicit
``position_ids``, through ``forward`` and ``generate`` (invariant 3, ``contract.check_padding_sides``), and static KV
caches (``cache_implementation="static"``, the ``torch.compile`` route), under SDPA and eager."""

from __future__ import annotations

from typing import Any

import pytest
import torch

import vtoken
from tests.models import contract
from tests.models.test_llm_stage import GEN, LAYERS, LLM, QWEN_GRIDS, QWEN_LENGTHS, method
from tests.models.tiny import llava_inputs, tiny_llava
from tests.models.tiny_qwen import qwen_inputs, sample_inputs, tiny_qwen2_vl

Inputs = dict[str, torch.Tensor]


def alone(inputs: Inputs, b: int) -> Inputs:
    """LLaVA sample ``b`` alone, without padding (``position_ids`` renumbered the same way when the batch had them)."""
    real = inputs["attention_mask"][b].bool()
    out: Inputs = {"input_ids": inputs["input_ids"][b : b + 1, real], "pixel_values": inputs["pixel_values"][b : b + 1]}
    if "position_ids" in inputs:
        out["position_ids"] = torch.arange(int(real.sum()))[None]
    return out


@pytest.fixture(scope="module")
def llava():
    return tiny_llava(lm_layers=LAYERS)


@pytest.fixture(scope="module")
def llava_eager():
    return tiny_llava(attn="eager", lm_layers=LAYERS)


@pytest.fixture(scope="module")
def llava_in(llava):
    return llava_inputs(llava, [(3, 5), (7, 1), (2, 2)])  # three lengths: padding on either side


@pytest.mark.parametrize("name", LLM)
def test_batch_equals_each_sample_for_both_padding_sides(llava, llava_in, name):
    contract.check_padding_sides(llava, llava_in, method(name), 0.25, alone)


@pytest.mark.parametrize("name", LLM)
def test_qwen_batch_equals_each_sample_for_both_padding_sides(name):
    """M-RoPE positions (``get_rope_index`` on either padding side) and a right-padded sample's instruction rows."""
    model = tiny_qwen2_vl(lm_layers=LAYERS)
    contract.check_padding_sides(model, qwen_inputs(QWEN_GRIDS, QWEN_LENGTHS), method(name), 0.5, sample_inputs,
                                 positions=False)


def check_static_cache(model: Any, inputs: Inputs, method: Any, keep: int | float) -> None:
    """``generate(cache_implementation="static")`` (a pre-allocated buffer per layer, as ``torch.compile`` needs)
    under ``method``: the same tokens and logits as the default dynamic cache."""
    opts = {**GEN, "return_dict_in_generate": True, "output_logits": True}
    with vtoken.apply(model, method, keep=keep):
        dynamic = model.generate(**inputs, **opts)
        static = model.generate(**inputs, **opts, cache_implementation="static")
    assert torch.equal(static.sequences, dynamic.sequences)
    for a, b in zip(static.logits, dynamic.logits, strict=True):
        torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("name", [*LLM, "divprune"])
def test_static_cache_generates_what_the_dynamic_cache_does(llava, llava_eager, llava_in, name, attn):
    """Left padding and per-sample kept counts included; an llm-stage method and a pre-LLM one."""
    check_static_cache(llava if attn == "sdpa" else llava_eager, llava_in, method(name), 0.25)


def test_static_cache_on_qwen_with_mrope():
    check_static_cache(tiny_qwen2_vl(lm_layers=LAYERS), qwen_inputs(QWEN_GRIDS, QWEN_LENGTHS), "pdrop", 0.5)


def test_the_transformers_surface_reads_either_cache_keyword_and_static_buffers():
    """``vtoken.models.hf``: the cache under ``cache`` (transformers >= 5.24) or ``past_key_values``; a static cache's
    key width is its buffer; a model-built 4-D mask gives back the padding mask."""
    from transformers import DynamicCache

    from vtoken.models.hf import cache_of, cached_length, key_width, padding_mask

    cache = DynamicCache()
    cache.update(torch.zeros(1, 2, 5, 4), torch.zeros(1, 2, 5, 4), 0)
    for key in ("cache", "past_key_values"):
        assert cache_of({key: cache}) is cache
    assert cache_of({}) is None and cached_length(None) == 0
    assert cached_length(cache) == 5 and key_width(cache, 0, 1) == 6

    class Static:
        layers = (type("Layer", (), {"max_cache_len": 32})(),)

        def get_seq_length(self, layer: int = 0) -> int:
            return 7

    assert key_width(Static(), 0, 1) == 32
    pad = torch.tensor([[0, 0, 1, 1], [1, 1, 1, 1]])
    allowed = torch.ones(4, 6, dtype=torch.bool).tril()[None, None] & torch.cat([pad, torch.ones(2, 2)], 1).bool()[
        :, None, None, :]
    for mask in (allowed, {"full_attention": allowed},
                 torch.zeros(allowed.shape).masked_fill(~allowed, torch.finfo(torch.float32).min)):
        assert torch.equal(padding_mask(mask, 4), pad)
    assert padding_mask(pad, 4) is pad
