"""The handle and the patched instance outside a plain forward: copies, pickling and ``torch.save``, reuse of a removed
handle, ``handle.last`` after a text-only call, ``torch.compile`` wrappers and adapter options checked at ``apply``."""

from __future__ import annotations

import copy
import io
import pickle

import pytest
import torch

import vtoken
from tests.models.contract import assert_unpatched, hook_counts, logits
from tests.models.test_llm_stage import LAYERS
from tests.models.tiny import llava_inputs, tiny_llava

#: a pre-LLM method with tower signals, an llm-stage method, and both composed
RECIPES = [("visionzip", {"keep": 16}), ("fastv", {"keep": 16}),
           ([("visionzip", {"keep": 32}), ("fastv", {"keep": 8})], {})]


@pytest.fixture(scope="module")
def inputs():
    return llava_inputs(tiny_llava(lm_layers=LAYERS), [(3, 5), (6, 2)])


def fresh() -> torch.nn.Module:
    return tiny_llava(lm_layers=LAYERS)


@pytest.mark.parametrize(("method", "kw"), RECIPES, ids=["pre_llm", "llm", "both"])
def test_a_deep_copy_runs_its_own_weights_with_its_own_patch(inputs, method, kw):
    model = fresh()
    handle = vtoken.apply(model, method, **kw)
    reduced = logits(model, inputs)
    clone = copy.deepcopy(model)
    twin = vtoken.handle_of(clone)
    assert twin is not None and twin is not handle and twin.methods == handle.methods
    assert vtoken.handle_of(model) is handle
    torch.testing.assert_close(logits(clone, inputs), reduced, atol=0, rtol=0)
    with torch.no_grad():  # the copy's weights are its own
        clone.lm_head.weight.mul_(2)
    assert not torch.equal(logits(clone, inputs), reduced)
    assert torch.equal(logits(model, inputs), reduced)
    handle.remove()  # removing the original's patch leaves the copy's
    assert vtoken.handle_of(model) is None
    assert twin.active and twin.last is not None
    logits(clone, inputs)
    hooks = hook_counts(model)  # transformers' own hooks, installed at the first forward
    twin.remove()
    assert_unpatched(clone, hooks)
    unpatched = fresh()
    with torch.no_grad():
        unpatched.lm_head.weight.mul_(2)
    assert torch.equal(logits(clone, inputs), logits(unpatched, inputs))


def test_a_copy_of_a_removed_or_never_patched_model_is_plain(inputs):
    model = fresh()
    vtoken.apply(model, "divprune", keep=8).remove()
    clone = copy.deepcopy(model)
    assert vtoken.handle_of(clone) is None
    assert "forward" not in clone.__dict__
    assert torch.equal(logits(clone, inputs), logits(model, inputs))


def test_pickle_and_torch_save_of_a_patched_model_explain_what_to_save(inputs):
    model = fresh()
    with vtoken.apply(model, "fastv", keep=8):
        for dump in (lambda: pickle.dumps(model), lambda: torch.save(model, io.BytesIO()), lambda: copy.copy(model)):
            with pytest.raises(TypeError, match=r"patched by vtoken.apply.*state_dict"):
                dump()
        buffer = io.BytesIO()
        torch.save(model.state_dict(), buffer)  # the weights save as usual
    # once removed, the model pickles as any other
    clone = pickle.loads(pickle.dumps(model))
    assert torch.equal(logits(clone, inputs), logits(model, inputs))


def test_a_removed_handle_cannot_be_reentered():
    model = fresh()
    handle = vtoken.apply(model, "divprune", keep=8)
    with handle:
        pass
    with pytest.raises(RuntimeError, match="removed"), handle:
        pass
    handle.remove()  # still idempotent


def test_last_is_cleared_by_a_text_only_call(inputs):
    model = fresh()
    text = {"input_ids": inputs["input_ids"][:, -6:], "attention_mask": inputs["attention_mask"][:, -6:]}
    for method in ("divprune", "fastv"):
        with vtoken.apply(model, method, keep=8) as handle:
            logits(model, inputs)
            assert handle.last is not None
            logits(model, text)
            assert handle.last is None
            model.generate(**inputs, max_new_tokens=2, do_sample=False)
            assert handle.last is not None  # decode steps keep the prefill's reduction


def test_apply_on_a_compiled_model_says_to_apply_first():
    model = fresh()
    compiled = torch.compile(model)  # compiles lazily: wrapping costs nothing
    with pytest.raises(TypeError, match=r"apply vtoken first, then compile"):
        vtoken.apply(compiled, "divprune", keep=8)
    assert "forward" not in model.__dict__


def test_vit_layers_are_checked_at_apply():
    from tests.models.test_vit import tiny_vit

    model = tiny_vit()
    hooks = hook_counts(model)
    depth = len(model.vit.layers)
    for bad, exc in (([99], ValueError), ([depth], ValueError), ([-depth - 1], ValueError), ([True], ValueError),
                     ([1.0], ValueError), ([], TypeError), ("first", TypeError), (3, TypeError)):
        with pytest.raises(exc, match="layers"):
            vtoken.apply(model, "tome", keep=0.5, layers=bad)
        assert_unpatched(model, hooks)
    with vtoken.apply(model, "tome", keep=0.5, layers=[-1, 0]):
        pass


def test_a_method_that_is_not_a_name_is_named_at_apply():
    model = fresh()
    hooks = hook_counts(model)
    for bad, match in ((None, r"method must be a registered method name"),
                       (("divprune", 8), r"keep=8\) or vtoken.method\('divprune', keep=8\)"),
                       ([("divprune", 8)], r"method: list entries"), (42, "method must be")):
        with pytest.raises(TypeError, match=match):
            vtoken.apply(model, bad, keep=8)
        assert_unpatched(model, hooks)
