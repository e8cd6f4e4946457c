"""vtoken.apply on LLaVA: the adapter contract and DESIGN.md invariants 1-3 for every supported method."""

from __future__ import annotations

import pytest
import torch

import vtoken
from tests.models.tiny import IMAGE_TOKEN, llava_inputs, tiny_llava
from vtoken.models.llava import LlavaAdapter

SUPPORTED = [m.name for m in vtoken.methods() if LlavaAdapter.unsupported(m) is None]
ATTENTION = [m.name for m in vtoken.methods() if LlavaAdapter.unsupported(m) is None
             and {"cls_attn", "cls_attn_layers", "attn", "attn_received_layers", "keys"} & set(m.signals)]


@pytest.fixture(scope="module")
def model():
    return tiny_llava()


@pytest.fixture(scope="module")
def inputs(model):
    return llava_inputs(model, [(3, 5), (6, 2)])


@torch.no_grad()
def _logits(model, inputs):
    return model(**inputs).logits


def test_every_pre_llm_method_is_supported():
    expected = {m.name for m in vtoken.methods() if m.stage in ("pre_llm", "video") and m.kind != "layout"}
    assert expected <= set(SUPPORTED)


@pytest.mark.parametrize("method", SUPPORTED)
def test_keep_all_gives_identical_logits_and_generation(model, inputs, method):
    ref = _logits(model, inputs)
    gen_ref = model.generate(**inputs, max_new_tokens=4, do_sample=False)
    with vtoken.apply(model, method, keep=1.0) as handle:
        assert torch.equal(_logits(model, inputs), ref)
        assert torch.equal(model.generate(**inputs, max_new_tokens=4, do_sample=False), gen_ref)
        assert handle.last.indices.tolist() == [list(range(64))] * 2


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
            real = inputs["attention_mask"][b].bool()
            one = {"input_ids": inputs["input_ids"][b : b + 1, real], "pixel_values": inputs["pixel_values"][b : b + 1]}
            alone = _logits(model, one)[:, -1]
            assert handle.last.indices[0].tolist() == batch_idx[b][batch_idx[b] >= 0].tolist()
            torch.testing.assert_close(alone[0], batch[b], atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("method", ["divprune", "vtc_cls", "random", "visionzip", "lavit_dynamic"])
def test_cache_holds_only_kept_tokens(model, inputs, method):
    with vtoken.apply(model, method, keep=8) as handle:
        out = model.generate(**inputs, max_new_tokens=4, do_sample=False, return_dict_in_generate=True)
        kept = handle.last.mask.sum(1)
    text = (inputs["input_ids"] != IMAGE_TOKEN).sum(1)  # padding columns stay (they are masked)
    prefill = int((text + kept).max())
    assert out.past_key_values.get_seq_length() == prefill + 4 - 1
    assert out.sequences.shape[1] == inputs["input_ids"].shape[1] + 4


@pytest.mark.parametrize("method", ["divprune", "vtc_cls", "hired"])
def test_kept_tokens_keep_their_positions(model, inputs, method):
    """Reference built by hand: the full embeddings at the kept columns, with their original position ids."""
    with vtoken.apply(model, method, keep=8) as handle:
        got = _logits(model, inputs)
        kept = handle.last.indices
    with torch.no_grad():
        ids, mask = inputs["input_ids"], inputs["attention_mask"]
        embeds = model.get_input_embeddings()(ids)
        feats = model.model.get_image_features(pixel_values=inputs["pixel_values"]).pooler_output
        for b in range(2):
            cols = (ids[b] == IMAGE_TOKEN).nonzero()[:, 0]
            embeds[b, cols] = feats[b]
            keep = ids[b] != IMAGE_TOKEN
            keep[cols[kept[b]]] = True
            real = keep & mask[b].bool()
            pos = torch.arange(ids.shape[1])[real]  # the model numbers a call without position_ids by column
            out = model(inputs_embeds=embeds[b : b + 1, real], position_ids=pos[None],
                        attention_mask=torch.ones(1, int(real.sum()), dtype=torch.long)).logits
            torch.testing.assert_close(got[b, -int(real.sum()):], out[0], atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("method", ATTENTION)
def test_sdpa_and_eager_select_identical_tokens(inputs, method):
    chosen = []
    for attn in ("sdpa", "eager"):
        m = tiny_llava(attn=attn)
        assert m.config.text_config._attn_implementation == attn
        with vtoken.apply(m, method, keep=8) as handle:
            _logits(m, inputs)
            chosen.append(handle.last.indices.clone())
    assert torch.equal(chosen[0], chosen[1])


def test_composition_runs_in_stage_order(model, inputs):
    with vtoken.apply(model, [("visionzip", {"keep": 32}), ("divprune", {"keep": 8})]) as handle:
        _logits(model, inputs)
        steps = handle.last.extras["steps"]
        assert [s.tokens.shape[1] for s in steps] == [32, 8]
        assert handle.last.mask.sum(1).tolist() == [8, 8]
        first = steps[0].indices
        assert torch.equal(handle.last.indices, first.gather(1, steps[1].indices))


def test_labels_are_compacted(model, inputs):
    labels = inputs["input_ids"].masked_fill(inputs["attention_mask"] == 0, -100)
    with vtoken.apply(model, "divprune", keep=8):
        out = model(**inputs, labels=labels)
    assert torch.isfinite(out.loss)


def test_two_models_side_by_side(inputs):
    a, b = tiny_llava(seed=0), tiny_llava(seed=0)
    ref_b = _logits(b, inputs)
    with vtoken.apply(a, "divprune", keep=8) as ha:
        assert "forward" not in b.__dict__
        assert torch.equal(_logits(b, inputs), ref_b)
        with vtoken.apply(b, "random", keep=4) as hb:
            _logits(a, inputs)
            _logits(b, inputs)
            assert ha.last.mask.sum(1).tolist() == [8, 8]
            assert hb.last.mask.sum(1).tolist() == [4, 4]


def test_errors_leave_the_model_unpatched(model, inputs):
    ref = _logits(model, inputs)
    from transformers import LlamaConfig, LlamaForCausalLM

    with pytest.raises(TypeError, match="llava"):
        vtoken.apply(LlamaForCausalLM(LlamaConfig(vocab_size=16, hidden_size=16, intermediate_size=16,
                                                  num_hidden_layers=1, num_attention_heads=2)), "divprune", keep=8)
    with pytest.raises(ValueError, match="unknown method"):
        vtoken.apply(model, "nope", keep=8)
    with pytest.raises(ValueError, match="keep"):
        vtoken.apply(model, "divprune", keep=0)
    with pytest.raises(ValueError, match="keep"):
        vtoken.apply(model, "divprune")
    with pytest.raises(TypeError, match="bogus"):
        vtoken.apply(model, "divprune", keep=8, bogus=1)
    with pytest.raises(ValueError, match="token_shuffle"):
        vtoken.apply(model, "token_shuffle", keep=16)
    assert "forward" not in model.__dict__
    with vtoken.apply(model, "divprune", keep=8), pytest.raises(ValueError, match="already"):
        vtoken.apply(model, "random", keep=8)
    assert "forward" not in model.__dict__
    assert torch.equal(_logits(model, inputs), ref)
