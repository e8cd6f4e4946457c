"""ToDRE stage 2 (``todre_llm``) and AIM's in-LLM pruning (``aim``) on tiny LLaVA (Llama LM) and Qwen2-VL (M-RoPE):
schedules and sequence lengths, the selection against an unpatched EAGER model's own attention maps, sdpa = eager,
per-sample adaptive drops in a padded batch, generation after every visual token is gone, composition with the pre-LLM
stages (``todre`` / ``aim_merge``), keep=all identity and errors naming the argument."""

from __future__ import annotations

from typing import Any

import pytest
import torch

import vtoken
from tests.models import contract
from tests.models.contract import logits
from tests.models.tiny import llava_inputs, llava_sample, tiny_llava
from tests.models.tiny_qwen import IMAGE_TOKEN as QWEN_IMAGE
from tests.models.tiny_qwen import qwen_inputs, sample_inputs, tiny_qwen2_vl

LAYERS = 4
GEN = {"max_new_tokens": 3, "do_sample": False}
#: todre_llm deciding at layer 2 of 4 (tokens removed before layer 3)
TODRE = {"layer": 2, "ref_depth": LAYERS}


@pytest.fixture(scope="module")
def llava():
    return tiny_llava(lm_layers=LAYERS)


@pytest.fixture(scope="module")
def eager():
    return tiny_llava(attn="eager", lm_layers=LAYERS)


@pytest.fixture(scope="module")
def llava_in(llava):
    return llava_inputs(llava, [(3, 5), (6, 2)])


@pytest.fixture(scope="module")
def qwen_in():
    return qwen_inputs([(8, 8), (6, 8)], [(3, 5), (6, 2)])


def text_counts(model: Any, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    return (mask.bool() & (ids != model.config.image_token_id)).sum(1)


@torch.no_grad()
def eager_attention(model: Any, inputs: dict[str, torch.Tensor], layer: int) -> torch.Tensor:
    """``[B, H, L, L]`` attention probabilities of decoder layer ``layer`` of the unpatched eager model."""
    return model(**inputs, output_attentions=True).attentions[layer].double()


def instruction_relevance(att: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor,
                          image_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """From head-averaged eager maps: per sample, the mean over the instruction rows (real tokens after the last
    image token) of the attention to each image column ``[B, N]``, and its sum (the text-to-visual ratio) ``[B]``."""
    mean = att.mean(1)
    rel = []
    for b in range(ids.shape[0]):
        image = (ids[b] == image_id).nonzero()[:, 0]
        rows = torch.arange(ids.shape[1]) > int(image.max())
        rows &= mask[b].bool()
        rel.append(mean[b][rows][:, image].mean(0))
    rel = torch.stack(rel)
    return rel, rel.sum(1)


def pagerank(att: torch.Tensor, temperature: float = 0.1, iters: int = 5) -> torch.Tensor:
    """AIM's importance from ONE unpadded sample's eager probabilities ``[1, H, L, L]``: ``softmax(log p / t)`` is
    ``softmax(logits / t)`` (a row's log-normaliser cancels), power steps from ``1 / L``, root mean square over
    heads."""
    m = torch.softmax(att[0].log() / temperature, dim=-1)
    n = m.shape[-1]
    p = torch.full((m.shape[0], 1, n), 1.0 / n, dtype=m.dtype)
    for _ in range(iters):
        p = p @ m
    return p[:, 0].pow(2).mean(0).sqrt()


def top(scores: torch.Tensor, k: int) -> list[int]:
    return torch.sort(scores, descending=True, stable=True).indices[:k].sort().values.tolist()


def test_registration():
    todre, aim = vtoken.get_method("todre_llm"), vtoken.get_method("aim")
    assert todre.stage == aim.stage == "llm" and not todre.exact and aim.exact
    assert set(todre.signals) == {"llm_text_attn", "text_mask"} and aim.signals == ("llm_attn_rank",)
    assert todre.defaults == {"layer": 28, "ref_depth": 32, "threshold": 0.1}
    assert aim.defaults == {"start": 14, "end": 22, "ref_depth": 28}
    assert aim.signal_spec["llm_attn_rank"] == {"temperature": 0.1, "iters": 5}


# ---- todre_llm -------------------------------------------------------------------------------------------------


def test_todre_llm_follows_the_eager_models_instruction_attention(llava, eager, llava_in):
    """A threshold between the two samples' text-to-visual ratios (computed independently from the eager model's
    layer-2 maps): the sample below it loses every visual token before layer 3, the other keeps its 8 most attended
    ones; sdpa and eager select the same; the sequence lengths follow."""
    ids, mask = llava_in["input_ids"], llava_in["attention_mask"]
    rel, ratio = instruction_relevance(eager_attention(eager, llava_in, 2), ids, mask, llava.config.image_token_id)
    assert abs(float(ratio[0] - ratio[1])) > 1e-3
    threshold = float(ratio.mean())
    low = int(ratio.argmin())
    kept = {}
    for name, model in (("sdpa", llava), ("eager", eager)):
        with vtoken.apply(model, "todre_llm", keep=8, threshold=threshold, **TODRE) as handle:
            logits(model, llava_in)
        info = handle.last.extras["llm"]
        stage = info["stages"][0]
        red = stage["reduction"]
        torch.testing.assert_close(red.extras["ratio"].double(), ratio, atol=1e-5, rtol=1e-5)
        assert red.extras["dropped"].tolist() == [b == low for b in range(2)]
        assert stage["layer"] == 3 and stage["visual_out"] == [0 if b == low else 8 for b in range(2)]
        high = 1 - low
        assert handle.last.mask.sum(1).tolist() == stage["visual_out"]
        assert handle.last.indices[high][handle.last.mask[high]].tolist() == top(rel[high], 8)
        text = text_counts(llava, llava_in)
        pruned = int(max(text[low], text[high] + 8))
        assert info["lengths"] == [ids.shape[1]] * 3 + [pruned]
        kept[name] = handle.last.indices.clone()
    assert torch.equal(kept["sdpa"], kept["eager"])


def test_todre_llm_drops_every_visual_token_and_generates(llava, llava_in):
    """threshold 1 (the ratio is always below it): no visual token reaches layer 3 or its KV cache; generation runs
    on the text alone from there, and a batch equals each sample alone."""
    n = GEN["max_new_tokens"]
    text = text_counts(llava, llava_in)
    with vtoken.apply(llava, "todre_llm", keep=0.5, threshold=1.0, **TODRE) as handle:
        out = llava.generate(**llava_in, **GEN, return_dict_in_generate=True, output_logits=True)
        info = handle.last.extras["llm"]
        assert info["stages"][0]["visual_out"] == [0, 0]
        assert handle.last.tokens.shape[1] == 0
        assert info["lengths"][3] == int(text.max())
        cache = [layer.keys.shape[2] for layer in out.past_key_values.layers]
        assert cache == [llava_in["input_ids"].shape[1] + n - 1] * 3 + [int(text.max()) + n - 1]
        for b in range(2):
            alone = llava.generate(**llava_sample(llava_in, b), **GEN, return_dict_in_generate=True,
                                   output_logits=True)
            assert torch.equal(out.sequences[b, -n:], alone.sequences[0, -n:])
            for step_b, step_1 in zip(out.logits, alone.logits, strict=True):
                torch.testing.assert_close(step_b[b], step_1[0], atol=2e-5, rtol=1e-4)


def test_todre_two_stages_compose(llava, llava_in):
    """``["todre", "todre_llm"]``: stage 1 keeps a diverse 16 before the language model; stage 2 keeps a subset of
    those (8 by instruction attention when the rule does not fire) or none (when it does)."""
    ids = llava_in["input_ids"]
    text = text_counts(llava, llava_in)
    stage2 = [("todre_llm", {"keep": 8, "threshold": 0.0, **TODRE})]
    with vtoken.apply(llava, [*stage2, ("todre", {"keep": 16})]) as handle:
        assert handle.methods == ["todre", "todre_llm"]
        out = llava.generate(**llava_in, **GEN, return_dict_in_generate=True)
        last = handle.last
    info = last.extras["llm"]
    assert info["pre_llm"].mask.sum(1).tolist() == [16, 16]
    assert last.mask.sum(1).tolist() == [8, 8]
    assert info["lengths"] == [int((text + 16).max())] * 3 + [int((text + 8).max())]
    for b in range(2):
        assert set(last.indices[b].tolist()) <= set(info["pre_llm"].indices[b].tolist())
    assert out.sequences.shape[1] == ids.shape[1] + GEN["max_new_tokens"]
    stage2 = [("todre_llm", {"keep": 8, "threshold": 1.0, **TODRE})]
    with vtoken.apply(llava, [("todre", {"keep": 16}), *stage2]) as handle:
        logits(llava, llava_in)
    assert handle.last.extras["llm"]["pre_llm"].mask.sum(1).tolist() == [16, 16]
    assert handle.last.mask.sum(1).tolist() == [0, 0]
    assert handle.last.extras["llm"]["lengths"][3] == int(text.max())


def test_todre_llm_default_layer_is_seven_eighths_of_the_depth():
    layers = vtoken.get_method("todre_llm").schedule.layers
    assert layers(32) == [29] and layers(40) == [36] and layers(28) == [25]  # decides at 28/32, 35/40, 24/28
    assert layers(4, layer=1, ref_depth=4) == [2]


# ---- aim ----------------------------------------------------------------------------------------------------------


def test_aim_official_schedule_on_28_layers():
    """The official ``retain_rate`` of Qwen2-7B (28 layers): after layer i >= 14, 1 - (i - 13) / 8 of the visual
    tokens; keep is only a floor (one token per image here)."""
    sched = vtoken.get_method("aim").schedule
    assert sched.layers(28) == list(range(15, 23))
    n = torch.tensor([196, 64])
    counts = sched.counts(n, 1, torch.tensor([1, 1]), depth=28)
    assert [c[0].item() for c in counts] == [171, 147, 122, 98, 73, 49, 24, 1]
    assert [c[1].item() for c in counts] == [56, 48, 40, 32, 24, 16, 8, 1]
    assert [c.tolist() for c in sched.counts(n, 0.5, torch.tensor([1, 1]), depth=28)][3:5] == [[98, 32], [98, 32]]
    assert sched.layers(32) == list(range(17, 26))  # 14, 22 of 28 -> 16, 25 of 32


def test_aim_sequence_length_follows_the_piecewise_linear_schedule(llava, llava_in):
    ids = llava_in["input_ids"]
    text = int(text_counts(llava, llava_in).max())
    with vtoken.apply(llava, "aim", keep=1, start=0, end=4, ref_depth=LAYERS) as handle:
        logits(llava, llava_in)
    info = handle.last.extras["llm"]
    assert [(s["layer"], s["visual_out"]) for s in info["stages"]] == [(1, [48, 48]), (2, [32, 32]), (3, [16, 16])]
    assert info["lengths"] == [ids.shape[1], text + 48, text + 32, text + 16]
    with vtoken.apply(llava, "aim", keep=0.5, start=0, end=4, ref_depth=LAYERS) as handle:  # floored at 32
        logits(llava, llava_in)
    info = handle.last.extras["llm"]
    assert [s["visual_out"] for s in info["stages"]] == [[48, 48], [32, 32], [32, 32]]
    assert info["lengths"] == [ids.shape[1], text + 48, text + 32, text + 32]
    with vtoken.apply(llava, "aim", keep=1) as handle:  # 14, 22 of 28 -> 2, 3 of 4: one pruning, to the floor
        logits(llava, llava_in)
    assert [(s["layer"], s["visual_out"]) for s in handle.last.extras["llm"]["stages"]] == [(3, [1, 1])]


@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
def test_aim_keeps_the_pagerank_top_of_the_eager_models_attention(family, llava, eager, llava_in, qwen_in):
    """Independent reference: each sample alone in the unpatched EAGER model, layer K - 1's probability maps of every
    row, AIM's PageRank (temperature 0.1, 5 steps, RMS over heads) -> top-k of the image columns; the sdpa and eager
    models, batched with padding, keep exactly those at the first pruning."""
    if family == "llava":
        models = {"sdpa": llava, "eager": eager}
        inputs, image_id, samples = llava_in, llava.config.image_token_id, [llava_sample(llava_in, b) for b in range(2)]
    else:
        models = {attn: tiny_qwen2_vl(attn=attn, lm_layers=LAYERS) for attn in ("sdpa", "eager")}
        inputs, image_id, samples = qwen_in, QWEN_IMAGE, [sample_inputs(qwen_in, b) for b in range(2)]
    knobs = {"start": 1, "end": 4, "ref_depth": LAYERS}  # prunes before layers 2 and 3: 2/3 then 1/3 of the tokens
    expected = []
    for one in samples:
        score = pagerank(eager_attention(models["eager"], one, 1))
        image = one["input_ids"][0] == image_id
        n = int(image.sum())
        expected.append(top(score[image], n * 2 // 3))
    for model in models.values():
        with vtoken.apply(model, "aim", keep=1, **knobs) as handle:
            logits(model, inputs)
        stages = handle.last.extras["llm"]["stages"]
        assert [s["layer"] for s in stages] == [2, 3]
        red = stages[0]["reduction"]
        for b in range(2):
            assert red.indices[b][red.mask[b]].tolist() == expected[b]
        n = [int((s["input_ids"][0] == image_id).sum()) for s in samples]
        assert stages[1]["visual_out"] == [v // 3 for v in n]


def test_aim_composes_after_its_merge(llava, llava_in):
    with vtoken.apply(llava, [("aim", {"keep": 1, "start": 0, "end": 4, "ref_depth": LAYERS}),
                              ("aim_merge", {"keep": 32})]) as handle:
        assert set(handle.methods) == {"aim_merge", "aim"}  # aim_merge (stage "video") runs before the LLM
        logits(llava, llava_in)
    info = handle.last.extras["llm"]
    assert info["pre_llm"].mask.sum(1).tolist() == [32, 32]
    assert [s["visual_out"] for s in info["stages"]] == [[24, 24], [16, 16], [8, 8]]
    for b in range(2):
        assert set(handle.last.indices[b].tolist()) <= set(info["pre_llm"].indices[b].tolist())


# ---- both ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("name", "knobs"), [("todre_llm", {**TODRE, "threshold": 1.0}), ("aim", {})])
def test_keep_all_is_identical_on_qwen(qwen_in, name, knobs):
    model = tiny_qwen2_vl(lm_layers=LAYERS)
    contract.check_keep_all(model, qwen_in, [(name, knobs)], lambda last: None, max_new_tokens=2)


def test_bad_knobs_name_the_argument(llava, llava_in):
    contract.check_errors(llava, llava_in, [
        (ValueError, "layer", "todre_llm", {"keep": 8, "layer": 3, "ref_depth": LAYERS}),
        (TypeError, "layer", "todre_llm", {"keep": 8, "layer": 1.5}),
        (ValueError, "threshold", "todre_llm", {"keep": 8, "threshold": 1.5, **TODRE}),
        (ValueError, "ref_depth", "todre_llm", {"keep": 8, "ref_depth": 0}),
        (ValueError, "start", "aim", {"keep": 8, "start": 3, "end": 4, "ref_depth": LAYERS}),
        (ValueError, "end", "aim", {"keep": 8, "start": 2, "end": 2, "ref_depth": LAYERS}),
        (TypeError, "end", "aim", {"keep": 8, "end": "x"}),
        (TypeError, "start", "aim", {"keep": 8, "start": 1.5}),
        (ValueError, "ref_depth", "aim", {"keep": 8, "ref_depth": 0}),
        (ValueError, "keep", "aim", {"keep": 0}),
        (TypeError, "bogus", "aim", {"keep": 8, "bogus": 1}),
    ])
