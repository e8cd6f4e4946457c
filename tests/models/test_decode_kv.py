"""DyCoke's decode stage (``dycoke_kv``): dynamic pruning of the visual KV cache at every decoding step.

The reference is independent of vtoken's machinery: the unpatched model generates with its full cache, and hooks
mask, in every decoder layer from ``layer`` on, the visual tokens the paper's rule prunes at that step (the new
token's head-mean attention in layer ``layer - 1``, top-k per sample, renewed when its cosine similarity with the
previous step's falls below the threshold; a plain loop per sample). vtoken instead removes them from the cache.
"""

from __future__ import annotations

import inspect
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import DynamicCache

import vtoken
from tests.models import contract
from tests.models.test_video import FAMILIES
from tests.models.tiny import IMAGE_TOKEN, llava_inputs, llava_sample, tiny_llava
from tests.models.tiny_qwen import VIDEO_TOKEN, qwen_media_inputs, tiny_qwen2_5_vl

Inputs = dict[str, Tensor]
LAYERS = 5
LAYER = 2
GEN = {"max_new_tokens": 6, "do_sample": False}


def kv(keep: int | float = 12, **knobs: Any) -> vtoken.MethodSpec:
    return vtoken.method("dycoke_kv", keep=keep, layer=LAYER, **knobs)


@pytest.fixture(scope="module")
def llava() -> dict[str, nn.Module]:
    return {attn: tiny_llava(attn=attn, lm_layers=LAYERS) for attn in ("sdpa", "eager")}


@pytest.fixture(scope="module")
def llava_in(llava) -> Inputs:
    return llava_inputs(llava["sdpa"], [(3, 5), (7, 1), (2, 2)])


def cache_key(model: nn.Module) -> str:
    """The keyword generate takes a cache under in this transformers release."""
    return "cache" if "cache" in inspect.signature(type(model).forward).parameters else "past_key_values"


def masked_reference(model: nn.Module, inputs: Inputs, visual_token: int, keep: int, threshold: float,
                     layer: int = LAYER, beams: int = 1) -> Any:
    """``generate`` of the unpatched (eager) ``model`` with its full cache, the paper's pruned visual tokens masked in
    every layer from ``layer`` on at every decoding step (with ``beams``, each beam's rule follows its beam)."""
    lm = model.model.language_model
    visual = (inputs["input_ids"] == visual_token).repeat_interleave(beams, 0)       # prompt columns
    b = visual.shape[0]
    prev: list[Tensor | None] = [None] * b
    kept: list[set[int]] = [set() for _ in range(b)]
    cache = DynamicCache(config=model.config.get_text_config())
    reorder = cache.reorder_cache

    def follow(beam_idx: Tensor) -> None:
        reorder(beam_idx)
        prev[:], kept[:] = [prev[i] for i in beam_idx.tolist()], [kept[i] for i in beam_idx.tolist()]

    cache.reorder_cache = follow
    seen: dict[str, Tensor] = {}
    pruned: dict[str, Tensor] = {}

    def capture(_mod: nn.Module, _args: Any, out: Any) -> None:
        if out[1] is not None and out[1].shape[-2] == 1:
            seen["weights"] = out[1].detach()

    def select(_mod: nn.Module, args: Any, kwargs: dict[str, Any]) -> None:
        hidden = args[0] if args else kwargs["hidden_states"]
        if hidden.shape[1] != 1:
            pruned.pop("cols", None)
            return
        attn = seen["weights"].float().mean(1)[:, -1]                                  # [B, T]
        cols = torch.zeros_like(attn, dtype=torch.bool)
        for i in range(b):
            where = visual[i].nonzero()[:, 0]
            a = attn[i, where]
            if prev[i] is None or float(F.cosine_similarity(a, prev[i], dim=0)) < threshold:
                order = torch.sort(a, descending=True, stable=True).indices[:keep]
                kept[i] = set(where[order].tolist())
            prev[i] = a
            for c in where.tolist():
                cols[i, c] = c not in kept[i]
        pruned["cols"] = cols

    def mask(_mod: nn.Module, args: Any, kwargs: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
        cols = pruned.get("cols")
        hidden = args[0] if args else kwargs["hidden_states"]
        if cols is None or hidden.shape[1] != 1:
            return args, kwargs
        t = cols.shape[1]
        m = kwargs.get("attention_mask")
        m = torch.zeros(b, 1, 1, t, dtype=hidden.dtype) if m is None else m.clone()
        m[..., :t] = m[..., :t].masked_fill(cols[:, None, None, :], torch.finfo(m.dtype).min)
        return args, {**kwargs, "attention_mask": m}

    hooks = [lm.layers[layer - 1].self_attn.register_forward_hook(capture),
             lm.layers[layer].register_forward_pre_hook(select, with_kwargs=True)]
    hooks += [lm.layers[j].register_forward_pre_hook(mask, with_kwargs=True) for j in range(layer, len(lm.layers))]
    try:
        with torch.no_grad():
            return model.generate(**inputs, **GEN, num_beams=beams, **{cache_key(model): cache},
                                  return_dict_in_generate=True, output_logits=True)
    finally:
        for h in hooks:
            h.remove()


def check_against_reference(model: nn.Module, eager: nn.Module, inputs: Inputs, visual_token: int, keep: int,
                            threshold: float) -> Any:
    ref = masked_reference(eager, inputs, visual_token, keep, threshold)
    with vtoken.apply(model, kv(keep, threshold=threshold)) as h, torch.no_grad():
        got = model.generate(**inputs, **GEN, return_dict_in_generate=True, output_logits=True)
        records = h.last.extras["llm"]["decode"]
    assert torch.equal(got.sequences, ref.sequences)
    for a, b in zip(got.logits, ref.logits, strict=True):
        torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-4)
    assert len(records) == GEN["max_new_tokens"] - 1  # every decoding step (the first token comes from the prefill)
    return records


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("threshold", [0.9, 1.0, -1.0])
def test_generate_matches_the_masked_full_cache_reference(llava, llava_in, attn, threshold):
    records = check_against_reference(llava[attn], llava["eager"], llava_in, IMAGE_TOKEN, 12, threshold)
    assert all(r["kept"] == [12, 12, 12] and r["visual"] == [64, 64, 64] for r in records)
    assert records[0]["reselected"] == [True] * 3
    later = [any(r["reselected"]) for r in records[1:]]
    if threshold == -1.0:
        assert not any(later) and not any(r["rebuilt"] for r in records[1:])
    if threshold == 1.0:  # a new selection at every step, and the kept set moves
        assert all(later) and any(r["rebuilt"] for r in records[1:])


def test_qwen_video_matches_the_reference_with_mrope():
    """Qwen2.5-VL clips (M-RoPE, ``second_per_grid_ts``), a sample with an image too: the image's tokens are visual
    tokens of the decode stage as well."""
    models = {attn: tiny_qwen2_5_vl(attn=attn, lm_layers=LAYERS) for attn in ("sdpa", "eager")}
    inputs, _ = qwen_media_inputs([[("video", (4, 4, 4))], [("video", (3, 4, 8))]], [(3, 2), (2, 4)], seed=11,
                                  seconds=[1.0, 0.5])
    check_against_reference(models["sdpa"], models["eager"], inputs, VIDEO_TOKEN, 6, 1.0)


def layer_lengths(cache: Any) -> list[int]:
    return [int(cache.get_seq_length(j)) for j in range(LAYERS)]


def test_the_cache_holds_only_kept_tokens_and_the_store_the_rest(llava, llava_in):
    model = llava["sdpa"]
    with torch.no_grad():
        full = model.generate(**llava_in, **GEN, return_dict_in_generate=True)
    with vtoken.apply(model, kv(12, threshold=1.0)) as h, torch.no_grad():
        out = model.generate(**llava_in, **GEN, return_dict_in_generate=True)
        pruner = h.adapter.llm
        records = h.last.extras["llm"]["decode"]
        store = pruner.kv.store
    prompt = llava_in["input_ids"].shape[1]
    text = int((llava_in["attention_mask"].bool() & (llava_in["input_ids"] != IMAGE_TOKEN)).sum(1).max())
    generated = GEN["max_new_tokens"] - 1  # tokens fed back (the last one is not)
    full_len, got = layer_lengths(full.past_key_values), layer_lengths(out.past_key_values)
    assert got[:LAYER] == full_len[:LAYER] == [prompt + generated] * LAYER
    assert got[LAYER:] == [text + 12 + generated] * (LAYERS - LAYER)
    # the cache grows by one token a step from the first decoding step on: text + kept, then the generated tokens
    assert [r["length"] for r in records] == [text + 12 + i for i in range(generated)]
    for j in range(LAYER, LAYERS):  # what left the cache waits in the store: 64 - 12 per sample
        assert store[j][0].shape[2] == 64 - 12 and store[j][1].shape[2] == 64 - 12
    assert not store.keys() & set(range(LAYER))


def test_static_cache_generates_what_the_dynamic_cache_does(llava, llava_in):
    model = llava["sdpa"]
    opts = {**GEN, "return_dict_in_generate": True, "output_logits": True}
    with vtoken.apply(model, kv(12, threshold=1.0)), torch.no_grad():
        dynamic = model.generate(**llava_in, **opts)
        static = model.generate(**llava_in, **opts, cache_implementation="static")
    assert torch.equal(static.sequences, dynamic.sequences)
    for a, b in zip(static.logits, dynamic.logits, strict=True):
        torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-4)


def test_batched_generate_equals_each_sample_alone(llava, llava_in):
    model = llava["sdpa"]
    with vtoken.apply(model, kv(12, threshold=1.0)), torch.no_grad():
        batch = model.generate(**llava_in, **GEN)
        for b in range(3):
            one = model.generate(**llava_sample(llava_in, b), **GEN)
            assert torch.equal(batch[b, -GEN["max_new_tokens"]:], one[0, -GEN["max_new_tokens"]:])


def test_keep_all_is_identical_and_remove_restores(llava, llava_in):
    model = llava["sdpa"]
    hooks = contract.hook_counts(model)
    with torch.no_grad():
        ref = model.generate(**llava_in, **GEN, return_dict_in_generate=True, output_logits=True)
        with vtoken.apply(model, kv(1.0)):
            got = model.generate(**llava_in, **GEN, return_dict_in_generate=True, output_logits=True)
        with vtoken.apply(model, kv(12)):
            model.generate(**llava_in, **GEN)
        after = model.generate(**llava_in, **GEN, return_dict_in_generate=True, output_logits=True)
    contract.assert_unpatched(model, hooks)
    for out in (got, after):
        assert torch.equal(out.sequences, ref.sequences)
        for a, b in zip(out.logits, ref.logits, strict=True):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_a_text_prefill_after_a_video_decodes_unpruned(llava, llava_in):
    """A later text-only prompt on the same handle: no visual tokens, nothing pruned, the model's own output."""
    model = llava["sdpa"]
    text = {"input_ids": llava_in["input_ids"][:1, :6], "attention_mask": llava_in["attention_mask"][:1, :6]}
    with torch.no_grad():
        ref = model.generate(**text, **GEN)
        with vtoken.apply(model, kv(12)):
            model.generate(**llava_in, **GEN)
            got = model.generate(**text, **GEN)
    assert torch.equal(got, ref)


@pytest.mark.parametrize("family", ["llava_onevision", "qwen2_5_vl", "qwen3_vl"])
def test_dycoke_in_full_on_video_families(family):
    """Both stages, ``["dycoke", dycoke_kv]``: the clip merged before the LLM, its kept tokens pruned again while
    decoding; a batch mixing clips and images equals each sample alone; layers from ``layer`` on hold fewer."""
    fam = FAMILIES[family]
    model = fam.build(lm_layers=LAYERS)
    batch, alone = fam.inputs(model)
    spec = ["dycoke", kv(0.5, threshold=1.0)]
    with vtoken.apply(model, spec, keep=0.75) as h, torch.no_grad():
        out = model.generate(**batch, **GEN, return_dict_in_generate=True)
        records = h.last.extras["llm"]["decode"]
        assert h.video is not None
        lengths = layer_lengths(out.past_key_values)
        for b, one in enumerate(alone):
            single = model.generate(**one, **GEN)
            assert torch.equal(out.sequences[b, -GEN["max_new_tokens"]:], single[0, -GEN["max_new_tokens"]:])
    assert len(records) == GEN["max_new_tokens"] - 1
    assert all(k < v for r in records for k, v in zip(r["kept"], r["visual"], strict=True))
    assert lengths[LAYER] < lengths[LAYER - 1]


def test_errors_name_the_problem(llava, llava_in):
    model = llava["sdpa"]
    with pytest.raises(ValueError, match="llm-stage steps compose only before layer 2"):
        vtoken.apply(model, ["fastv", kv(12)], keep=0.5)
    with pytest.raises(ValueError, match="one decode-stage method at a time"):
        vtoken.apply(model, [kv(12), kv(10)])
    with pytest.raises(ValueError, match="layer=9 is out of range"):
        vtoken.apply(model, vtoken.method("dycoke_kv", keep=12, layer=9))
    with pytest.raises(ValueError, match=r"threshold must be in \[-1, 1\]"):
        vtoken.method("dycoke_kv", keep=12, threshold=1.5)
    contract.assert_unpatched(model, contract.hook_counts(model))
    # an llm-stage step before the decode layer composes
    with vtoken.apply(model, [vtoken.method("fastv", keep=0.5, layer=1), kv(8)]) as h, torch.no_grad():
        model.generate(**llava_in, **GEN)
        assert all(r["visual"] == [32, 32, 32] and r["kept"] == [8, 8, 8] for r in h.last.extras["llm"]["decode"])


def test_reduce_once_ask_many_then_prune_while_decoding():
    """``reuse_videos=True`` with DyCoke in full: TTM is query-agnostic, so the clip is merged once; the decode
    stage prunes each new prompt's cache on its own. Every answer equals the one computed from scratch."""
    from tests.models.test_video import _another_question

    fam = FAMILIES["qwen2_5_vl"]
    model = fam.build(lm_layers=LAYERS)
    _, alone = fam.inputs(model)
    questions = [alone[0], _another_question(alone[0], 1), _another_question(alone[0], 2)]
    spec = ["dycoke", kv(0.5, threshold=1.0)]
    with torch.no_grad():
        with vtoken.apply(model, spec, keep=0.75):
            want = [model.generate(**q, **GEN) for q in questions]
        calls = []
        h = model.model.visual.register_forward_hook(lambda *_: calls.append(1))
        try:
            with vtoken.apply(model, spec, keep=0.75, reuse_videos=True) as handle:
                for q, ref in zip(questions, want, strict=True):
                    assert torch.equal(model.generate(**q, **GEN), ref)
                    assert len(handle.last.extras["llm"]["decode"]) == GEN["max_new_tokens"] - 1
        finally:
            h.remove()
    assert len(calls) == 1, "the clip was encoded more than once"


def test_beam_search_follows_each_beam(llava, llava_in):
    """``num_beams=2``: generate reorders the cache's rows between steps; each row's store, state and layout
    follow its beam (the reference's per-row rule is reordered the same way)."""
    ref = masked_reference(llava["eager"], llava_in, IMAGE_TOKEN, 12, 1.0, beams=2)
    with vtoken.apply(llava["sdpa"], kv(12, threshold=1.0)), torch.no_grad():
        got = llava["sdpa"].generate(**llava_in, **GEN, num_beams=2, return_dict_in_generate=True)
    assert torch.equal(got.sequences, ref.sequences)
