"""``llm``-stage methods (pruning between decoder layers) on tiny LLaVA (Llama LM), Qwen2-VL / Qwen2.5-VL (M-RoPE),
LLaVA-OneVision (Qwen2 LM) and LLaVA-NeXT: keep=all is exact, the schedule's sequence lengths, a hand-built layer-by-
layer reference (kept columns, original positions), per-layer KV cache, generation with padding, sdpa = eager, FastV
against an eager model's own attention maps, composition with pre-LLM methods, remove() and errors."""

from __future__ import annotations

from typing import Any

import pytest
import torch

import vtoken
from tests.models import contract
from tests.models.contract import logits
from tests.models.tiny import llava_inputs, llava_sample, tiny_llava
from tests.models.tiny_llava_next import llava_next_inputs, tiny_llava_next
from tests.models.tiny_onevision import onevision_inputs, tiny_onevision
from tests.models.tiny_qwen import IMAGE_TOKEN as QWEN_IMAGE
from tests.models.tiny_qwen import qwen_inputs, sample_inputs, tiny_qwen2_5_vl, tiny_qwen2_vl
from vtoken.methods.sparsevlm import budgets
from vtoken.models import families_supporting

LAYERS = 4  # decoder layers of the tiny language models here
LLM = [m.name for m in vtoken.methods() if m.stage == "llm"]
#: knobs that fit a 4-layer language model (paper defaults are for 32 layers)
KNOBS: dict[str, dict[str, Any]] = {"sparsevlm": {"layers": (0, 1, 2), "ref_depth": 4},
                                    # decide at layer 2 of 4; threshold 0: the all-or-nothing rule never fires, so
                                    # the checks exercise the relevance top-k (test_llm_todre_aim.py covers the rule)
                                    "todre_llm": {"layer": 2, "ref_depth": 4, "threshold": 0.0}}
GEN = {"max_new_tokens": 3, "do_sample": False}
QWEN_GRIDS, QWEN_LENGTHS = [(8, 8), (6, 8), (4, 12)], [(3, 5), (6, 2), (2, 3)]


def method(name: str, **over: Any) -> list[tuple[str, dict[str, Any]]]:
    return [(name, {**KNOBS.get(name, {}), **over})]


@pytest.fixture(scope="module")
def llava():
    return tiny_llava(lm_layers=LAYERS)


@pytest.fixture(scope="module")
def llava_in(llava):
    return llava_inputs(llava, [(3, 5), (6, 2)])


@pytest.fixture(scope="module")
def qwen():
    return tiny_qwen2_vl(lm_layers=LAYERS)


@pytest.fixture(scope="module")
def qwen_in():
    return qwen_inputs(QWEN_GRIDS, QWEN_LENGTHS)


def test_methods_are_registered_for_the_llm_stage():
    assert {"fastv", "pdrop"} <= set(LLM)
    for name in LLM:
        info = vtoken.get_method(name)
        assert info.schedule is not None and info.paper and info.venue
        assert {"llava", "llava_next", "llava_onevision", "qwen2_vl", "qwen2_5_vl"} <= set(families_supporting(info))
        assert "vit" not in families_supporting(info)


# ---- invariants ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", LLM)
def test_keep_all_is_identical_on_llava(llava, llava_in, name):
    def full(last):
        assert last.indices.tolist() == [list(range(64))] * 2
        assert last.extras["llm"]["lengths"] == [llava_in["input_ids"].shape[1]] * LAYERS

    contract.check_keep_all(llava, llava_in, method(name), full, max_new_tokens=GEN["max_new_tokens"])


FAMILIES = {
    "qwen2_vl": (lambda: tiny_qwen2_vl(lm_layers=LAYERS), lambda m: qwen_inputs(QWEN_GRIDS, QWEN_LENGTHS)),
    "qwen2_5_vl": (lambda: tiny_qwen2_5_vl(lm_layers=LAYERS), lambda m: qwen_inputs(QWEN_GRIDS, QWEN_LENGTHS)),
    "llava_onevision": (lambda: tiny_onevision(lm_layers=LAYERS), lambda m: onevision_inputs(m)),
    "llava_next": (lambda: tiny_llava_next(lm_layers=LAYERS),
                   lambda m: llava_next_inputs(m, [(32, 64), (64, 64)], [(3, 5), (6, 2)])),
}


@pytest.fixture(scope="module")
def family_models():
    return {name: (build(), make) for name, (build, make) in FAMILIES.items()}


@pytest.mark.parametrize("family", list(FAMILIES))
def test_families_keep_all_prune_generate_and_remove(family_models, family):
    """Every family: keep=all identical logits and generation; a reducing run shortens the sequence after the pruning
    layer, keeps only kept tokens in later layers' caches, generates, and remove() restores exactly."""
    model, make = family_models[family]
    inputs = make(model)
    ref = logits(model, inputs)
    gen_ref = model.generate(**inputs, **GEN)
    for name in LLM:
        contract.check_keep_all(model, inputs, method(name), lambda last: None, (ref, gen_ref), GEN["max_new_tokens"])
    hooks = contract.hook_counts(model)
    with vtoken.apply(model, "fastv", keep=0.5) as handle:
        out = model.generate(**inputs, **GEN, return_dict_in_generate=True)
        info = handle.last.extras["llm"]
        length0, pruned = info["lengths"][0], info["lengths"][2]
        assert info["lengths"] == [length0, length0, pruned, pruned] and pruned < length0
        cache = [layer.keys.shape[2] for layer in out.past_key_values.layers]
        assert cache == [length0 + 2] * 2 + [pruned + 2] * 2
        # every token handle.last keeps reached the last layer
        stage = info["stages"][0]
        assert sum(stage["visual_out"]) >= int(handle.last.mask.sum())
    contract.assert_unpatched(model, hooks)
    assert all("forward" not in layer.__dict__ for layer in model.model.language_model.layers)
    assert torch.equal(logits(model, inputs), ref)


@pytest.mark.parametrize("name", LLM)
def test_remove_restores_exactly(llava, llava_in, name):
    contract.check_remove(llava, llava_in, method(name), keep=8)
    assert all("forward" not in layer.__dict__ for layer in llava.model.language_model.layers)


# ---- schedules -------------------------------------------------------------------------------------------------


def test_fastv_sequence_length_follows_the_schedule(llava, llava_in):
    ids, mask = llava_in["input_ids"], llava_in["attention_mask"]
    text = (mask.bool() & (ids != llava.config.image_token_id)).sum(1)
    for layer in (1, 2, 3):
        with vtoken.apply(llava, "fastv", keep=8, layer=layer) as handle:
            got = logits(llava, llava_in)
        info = handle.last.extras["llm"]
        pruned = int((text + 8).max())
        assert info["lengths"] == [ids.shape[1]] * layer + [pruned] * (LAYERS - layer)
        assert got.shape[1] == pruned
        assert [s["layer"] for s in info["stages"]] == [layer]
        assert info["stages"][0]["visual_out"] == [8, 8]
        assert handle.last.mask.sum(1).tolist() == [8, 8]


def test_pdrop_sequence_length_follows_the_pyramid(llava, llava_in):
    """Paper boundaries 8/16/24 of 32 -> 1/2/3 of 4; keep=0.5 halves the visual tokens at each boundary."""
    ids, mask = llava_in["input_ids"], llava_in["attention_mask"]
    text = int((mask.bool() & (ids != llava.config.image_token_id)).sum(1).max())
    with vtoken.apply(llava, "pdrop", keep=0.5) as handle:
        logits(llava, llava_in)
    info = handle.last.extras["llm"]
    assert [s["layer"] for s in info["stages"]] == [1, 2, 3]
    assert [s["visual_out"] for s in info["stages"]] == [[32, 32], [16, 16], [8, 8]]
    assert info["lengths"] == [ids.shape[1], text + 32, text + 16, text + 8]
    with vtoken.apply(llava, "pdrop", keep=16, layers=(8, 24)) as handle:  # lambda = 16/64 = 0.25
        logits(llava, llava_in)
    assert [s["visual_out"] for s in handle.last.extras["llm"]["stages"]] == [[16, 16], [4, 4]]


# ---- correctness against references ----------------------------------------------------------------------------


@torch.no_grad()
def layerwise(model: Any, embeds: torch.Tensor, positions: torch.Tensor,
              stages: dict[int, torch.Tensor]) -> torch.Tensor:
    """The language model run by hand on ONE unpadded sample: ``embeds [1, L, D]``, position ids ``[1, L]`` or
    ``[3, 1, L]``; before layer ``i`` in ``stages`` only the columns ``stages[i]`` (original columns, ascending) stay,
    with their rows of the rotary table. Causal attention without a mask. Returns the logits ``[1, L', V]``."""
    lm = model.model.language_model
    hidden = embeds
    cos, sin = lm.rotary_emb(hidden, positions)
    cols = torch.arange(embeds.shape[1])
    for i, layer in enumerate(lm.layers):
        if i in stages:
            sel = torch.searchsorted(cols, stages[i])
            assert torch.equal(cols[sel], stages[i])
            hidden, cos, sin, cols = hidden[:, sel], cos[..., sel, :], sin[..., sel, :], stages[i]  # [(3,) 1, L, d]
        hidden = layer(hidden, attention_mask=None, position_embeddings=(cos, sin), position_ids=None)
    return model.lm_head(lm.norm(hidden))


def stage_columns(info: dict[str, Any], b: int, pad: int) -> dict[int, torch.Tensor]:
    """Per pruning layer, sample ``b``'s kept prompt columns (padding offset ``pad`` removed)."""
    out = {}
    for s in info["stages"]:
        cols = s["columns"][b]
        out[s["layer"]] = cols[cols >= 0] - pad
    return out


@pytest.mark.parametrize("name", ["fastv", "pdrop"])
def test_llava_matches_a_hand_built_reference(llava, llava_in, name):
    """The batch (left padding, different prompts) equals the model run by hand on each sample's kept columns with
    their ORIGINAL position ids."""
    with vtoken.apply(llava, name, keep=0.25) as handle:
        got = logits(llava, llava_in)
        info = handle.last.extras["llm"]
    with vtoken.apply(llava, "fastv", keep=1.0) as handle:
        logits(llava, llava_in)
        feats = handle.last.tokens
    ids, mask = llava_in["input_ids"], llava_in["attention_mask"]
    embeds = contract.embed_images(llava, ids, feats)
    for b in range(ids.shape[0]):
        pad = int((mask[b] == 0).sum())
        real = mask[b].bool()
        pos = torch.arange(ids.shape[1])[real][None]  # the unpatched model's positions: padded columns
        ref = layerwise(llava, embeds[b : b + 1, real], pos, stage_columns(info, b, pad))
        torch.testing.assert_close(got[b, -ref.shape[1]:], ref[0], atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("name", ["fastv", "pdrop"])
def test_qwen_matches_a_hand_built_reference_with_mrope(qwen, qwen_in, name):
    """Qwen2-VL: kept tokens keep their 3-D M-RoPE position ids (from ``get_rope_index`` on the full prompt)."""
    with vtoken.apply(qwen, name, keep=0.5) as handle:
        got = logits(qwen, qwen_in)
        info = handle.last.extras["llm"]
    with vtoken.apply(qwen, "fastv", keep=1.0) as handle:
        logits(qwen, qwen_in)
        feats, valid = handle.last.tokens, handle.last.mask
    ids, mask = qwen_in["input_ids"], qwen_in["attention_mask"]
    embeds = contract.embed_images(qwen, ids, [f[v] for f, v in zip(feats, valid, strict=True)])
    with torch.no_grad():
        pos, _ = qwen.model.get_rope_index(ids, qwen_in["mm_token_type_ids"], image_grid_thw=qwen_in["image_grid_thw"],
                                           attention_mask=mask)
    for b in range(ids.shape[0]):
        pad = int((mask[b] == 0).sum())
        real = mask[b].bool()
        ref = layerwise(qwen, embeds[b : b + 1, real], pos[:, b : b + 1, real], stage_columns(info, b, pad))
        torch.testing.assert_close(got[b, -ref.shape[1]:], ref[0], atol=2e-5, rtol=1e-4)


def test_fastv_keeps_the_largest_last_token_attention_of_an_eager_model(llava_in):
    """Independent reference: the unpatched EAGER model's own attention maps (``output_attentions=True``) of layer
    K - 1, heads averaged, last row, image columns -> top-k."""
    eager = tiny_llava(attn="eager", lm_layers=LAYERS)
    with torch.no_grad():
        att = eager(**llava_in, output_attentions=True).attentions[1]  # layer K - 1 = 1
    ids = llava_in["input_ids"]
    row = att.mean(1)[:, -1]  # [B, L]
    image = ids == eager.config.image_token_id
    scores = row[image].reshape(ids.shape[0], -1)
    expected = torch.sort(scores, dim=1, descending=True, stable=True).indices[:, :10].sort(1).values
    for attn in ("sdpa", "eager"):
        model = tiny_llava(attn=attn, lm_layers=LAYERS)
        with vtoken.apply(model, "fastv", keep=10) as handle:
            logits(model, llava_in)
        assert torch.equal(handle.last.indices, expected)
        signal = handle.last.extras["llm"]["stages"][0]
        assert signal["visual_out"] == [10, 10]


@pytest.mark.parametrize("name", LLM)
def test_sdpa_and_eager_select_identical_tokens(llava_in, qwen_in, name):
    contract.check_sdpa_eager(lambda attn: tiny_llava(attn=attn, lm_layers=LAYERS), llava_in, method(name), 0.25)
    contract.check_sdpa_eager(lambda attn: tiny_qwen2_vl(attn=attn, lm_layers=LAYERS), qwen_in, method(name), 0.5)


# ---- batches, generation, cache --------------------------------------------------------------------------------


@pytest.mark.parametrize("name", LLM)
def test_batch_equals_each_sample(llava, llava_in, qwen, qwen_in, name):
    contract.check_batch(llava, llava_in, method(name), 0.25, [llava_sample(llava_in, b) for b in range(2)])
    contract.check_batch(qwen, qwen_in, method(name), 0.5, [sample_inputs(qwen_in, b) for b in range(3)])


@pytest.mark.parametrize("name", LLM)
def test_generate_with_left_padding_equals_each_sample_alone(qwen, qwen_in, name):
    """Different prompts and image sizes, left padding: every decode step's logits equal the sample's own run."""
    opts = {**GEN, "return_dict_in_generate": True, "output_logits": True}
    with vtoken.apply(qwen, method(name), keep=0.5):
        batch = qwen.generate(**qwen_in, **opts)
        for b in range(3):
            alone = qwen.generate(**sample_inputs(qwen_in, b), **opts)
            assert torch.equal(batch.sequences[b, -GEN["max_new_tokens"]:], alone.sequences[0, -GEN["max_new_tokens"]:])
            for step_b, step_1 in zip(batch.logits, alone.logits, strict=True):
                torch.testing.assert_close(step_b[b], step_1[0], atol=2e-5, rtol=1e-4)


def test_cache_holds_only_kept_tokens_after_the_pruning_layer(llava, llava_in):
    n = GEN["max_new_tokens"]
    with vtoken.apply(llava, "pdrop", keep=0.5) as handle:
        out = llava.generate(**llava_in, **GEN, return_dict_in_generate=True)
        lengths = handle.last.extras["llm"]["lengths"]
    assert [layer.keys.shape[2] for layer in out.past_key_values.layers] == [v + n - 1 for v in lengths]
    assert out.past_key_values.get_seq_length() == lengths[0] + n - 1
    assert out.sequences.shape[1] == llava_in["input_ids"].shape[1] + n


def test_a_text_only_prefill_after_an_image_prefill(llava, llava_in):
    text = {"input_ids": llava_in["input_ids"][:, -6:], "attention_mask": llava_in["attention_mask"][:, -6:]}
    ref = llava.generate(**text, **GEN)
    with vtoken.apply(llava, "fastv", keep=8):
        llava.generate(**llava_in, **GEN)
        assert torch.equal(llava.generate(**text, **GEN), ref)


# ---- composition ---------------------------------------------------------------------------------------------


def test_composition_after_a_pre_llm_method(llava, llava_in):
    ids = llava_in["input_ids"]
    text = (llava_in["attention_mask"].bool() & (ids != llava.config.image_token_id)).sum(1)
    with vtoken.apply(llava, [("fastv", {"keep": 8}), ("visionzip", {"keep": 32})]) as handle:
        assert handle.methods == ["visionzip", "fastv"]
        out = llava.generate(**llava_in, **GEN, return_dict_in_generate=True)
        last = handle.last
    info = last.extras["llm"]
    assert info["lengths"] == [int((text + 32).max())] * 2 + [int((text + 8).max())] * 2
    assert last.mask.sum(1).tolist() == [8, 8]
    pre = info["pre_llm"]
    assert pre.mask.sum(1).tolist() == [32, 32]
    for b in range(2):  # the LLM stage keeps a subset of what visionzip kept
        assert set(last.indices[b].tolist()) <= set(pre.indices[b].tolist())
    assert out.sequences.shape[1] == ids.shape[1] + GEN["max_new_tokens"]
    # one keep for both stages: each applies it to the tokens it sees (a ratio compounds)
    with vtoken.apply(llava, ["visionzip", "fastv"], keep=0.5) as handle:
        logits(llava, llava_in)
    assert handle.last.extras["llm"]["pre_llm"].mask.sum(1).tolist() == [32, 32]
    assert handle.last.mask.sum(1).tolist() == [16, 16]


def test_two_llm_methods_compose(llava, llava_in):
    with vtoken.apply(llava, [("fastv", {"keep": 32, "layer": 1}), ("pdrop", {"keep": 0.5, "layers": (24,)})]) as h:
        logits(llava, llava_in)
    info = h.last.extras["llm"]
    assert [(s["method"], s["layer"], s["visual_out"]) for s in info["stages"]] == [
        ("fastv", 1, [32, 32]), ("pdrop", 3, [16, 16])]


# ---- errors --------------------------------------------------------------------------------------------------


def test_bad_knobs_name_the_argument_and_leave_the_model_unpatched(llava, llava_in):
    contract.check_errors(llava, llava_in, [
        (ValueError, "layer", "fastv", {"keep": 8, "layer": 0}),
        (ValueError, "layer", "fastv", {"keep": 8, "layer": LAYERS}),
        (TypeError, "layer", "fastv", {"keep": 8, "layer": 1.5}),
        (ValueError, "layers", "pdrop", {"keep": 8, "layers": (8, 9)}),
        (ValueError, "layers", "pdrop", {"keep": 8, "layers": (40,)}),
        (ValueError, "ref_depth", "pdrop", {"keep": 8, "ref_depth": 0}),
        (ValueError, "keep", "fastv", {"keep": 0}),
        (ValueError, "keep", "fastv", {"keep": 1.5}),
        (TypeError, "bogus", "fastv", {"keep": 8, "bogus": 1}),
    ], failing=[
        ("fastv", {"keep": 8}, {**llava_in, "labels": llava_in["input_ids"]}, ValueError, "labels"),
    ])
    with pytest.raises(ValueError, match="attn_implementation"):
        model = tiny_llava(lm_layers=LAYERS)
        model.model.language_model.config._attn_implementation = "flex_attention"
        vtoken.apply(model, "fastv", keep=8)
    assert "forward" not in model.__dict__
    assert all("forward" not in layer.__dict__ for layer in model.model.language_model.layers)
    assert sum(contract.hook_counts(model).values()) == 0


def test_dart_in_the_model_equals_the_official_selection_on_the_full_sequence(llava, llava_in):
    """DART through vtoken.apply equals ``dart_select`` (the parity-tested official semantics) run on the unpatched
    model's own layer K - 1 output (final-normed) and its RoPE'd keys, recomputed here from the hidden states."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    from vtoken.methods._dart_ops import dart_select

    one = llava_sample(llava_in, 1)
    keep = 20
    with vtoken.apply(llava, "dart", keep=keep) as handle:
        logits(llava, one)
    lm = llava.model.language_model
    with torch.no_grad():
        out = llava(**one, output_hidden_states=True)
        hs = out.hidden_states  # hs[i]: input of decoder layer i
        attn = lm.layers[1].self_attn
        k = attn.k_proj(lm.layers[1].input_layernorm(hs[1]))
        k = k.view(1, k.shape[1], -1, attn.head_dim).transpose(1, 2)
        pos = torch.arange(k.shape[2])[None]
        cos, sin = lm.rotary_emb(hs[1], pos)
        _, k = apply_rotary_pos_emb(k, k, cos, sin)
    ids = one["input_ids"][0]
    image = (ids == llava.config.image_token_id).nonzero()[:, 0]
    sel = dart_select(lm.norm(hs[2]), k, int(image[0]), image.numel(), max_num_trunction=keep - 4,
                      pivot_order="official")
    expected = sel.retained[0][sel.retained[0] >= 0] - int(image[0])
    assert handle.last.indices[0].tolist() == expected.tolist()


def test_sparsevlm_recycles_deleted_tokens(llava, llava_in):
    with vtoken.apply(llava, "sparsevlm", keep=0.25, layers=(0, 1, 2), ref_depth=4) as handle:
        logits(llava, llava_in)
    stage = handle.last.extras["llm"]["stages"][0]
    red = stage["reduction"]
    assert red.assign is not None and red.sizes is not None
    merged = red.sizes > 1
    assert bool(merged.any())  # recycled tokens (DPC-kNN clusters of the deleted ones) stay in the sequence
    budget = budgets(torch.tensor([64, 64]), 0.25, torch.tensor([1, 1]))[0]
    assert ((red.sizes == 1) & red.mask).sum(1).tolist() == budget.tolist()  # the layer's top-k budget
    assert stage["visual_out"] == red.mask.sum(1).tolist()  # plus the recycled tokens


def test_qwen_image_tokens_stay_in_source_order(qwen, qwen_in):
    with vtoken.apply(qwen, "fastv", keep=4) as handle:
        logits(qwen, qwen_in)
    cols = handle.last.extras["llm"]["columns"]
    ids = qwen_in["input_ids"]
    for b in range(3):
        c = cols[b][cols[b] >= 0]
        assert torch.equal(c, c.sort().values)
        assert int((ids[b, c] == QWEN_IMAGE).sum()) == 4


@pytest.mark.parametrize("family", ["internvl", "idefics3"])
def test_internvl_and_idefics3(family):
    """Multi-view families (2-layer LMs): keep=all identical; pruning before layer 1 shortens layer 1's cache only."""
    from tests.models import test_idefics3, test_internvl
    from tests.models.tiny_idefics3 import idefics3_inputs, tiny_idefics3
    from tests.models.tiny_internvl import internvl_inputs, tiny_internvl

    if family == "internvl":
        model, inputs = tiny_internvl(), internvl_inputs(test_internvl.LAYOUT)
    else:
        model, inputs = tiny_idefics3(), idefics3_inputs(test_idefics3.LAYOUT, pad_pixels=True)
    contract.check_keep_all(model, inputs, [("fastv", {"layer": 1})], lambda last: None, max_new_tokens=2)
    with vtoken.apply(model, "fastv", keep=0.5, layer=1) as handle:
        out = model.generate(**inputs, max_new_tokens=2, do_sample=False, return_dict_in_generate=True)
        lengths = handle.last.extras["llm"]["lengths"]
    assert lengths[1] < lengths[0]
    assert [layer.keys.shape[2] for layer in out.past_key_values.layers] == [v + 1 for v in lengths]
