"""vtoken.apply on Qwen2-VL / Qwen2.5-VL: the adapter contract and design.md invariants 1-3 for every supported method,
M-RoPE positions (prefill and decode), images of different sizes in one batch, and the attention signals."""

from __future__ import annotations

import pytest
import torch

import vtoken
from tests.models import contract
from tests.models.contract import logits
from tests.models.tiny_qwen import IMAGE_TOKEN, PIXELS, TINY, VIDEO_TOKEN, qwen_inputs, sample_inputs
from vtoken.methods import get_method
from vtoken.models import families_supporting
from vtoken.models.base import CLS_SIGNALS
from vtoken.models.qwen2_vl import Qwen2VLAdapter, Qwen25VLAdapter

FAMILIES = list(TINY)
SUPPORTED = contract.supported(Qwen2VLAdapter)
ATTENTION = ["visionzip", "hiprune"]
GEN = {"max_new_tokens": 2, "do_sample": False}
# three samples, three image sizes (16, 12, 12 merged tokens; the 3 x 4 grid has partial Qwen2.5-VL windows), left
# padding, different prompts
GRIDS, LENGTHS = [(8, 8), (6, 8), (4, 12)], [(3, 5), (6, 2), (2, 3)]


@pytest.fixture(scope="module")
def models():
    return {name: build() for name, build in TINY.items()}


@pytest.fixture(scope="module")
def inputs():
    return qwen_inputs(GRIDS, LENGTHS)


@pytest.fixture(scope="module")
def reference(models, inputs):
    """Unpatched logits and generations per family."""
    with torch.no_grad():
        return {name: (m(**inputs).logits, m.generate(**inputs, **GEN)) for name, m in models.items()}


def test_supported_methods_and_reasons():
    expected = {m.name for m in vtoken.methods() if m.stage in ("pre_llm", "video") and m.kind != "layout"
                and m.needs_keep and set(m.signals) <= Qwen2VLAdapter.provides
                and not (CLS_SIGNALS & set(m.signals))} | {  # methods that declare a [CLS] fallback
        m.name for m in vtoken.methods() if any(spec.without_cls for spec in m.signal_spec.values())}
    assert set(SUPPORTED) | set(contract.supported(Qwen2VLAdapter, video=True)) == expected
    assert {"visionzip", "hiprune", "divprune", "cdpruner", "mmtok", "aim_merge"} <= set(SUPPORTED)
    for name in ("vtc_cls", "hired", "prumerge", "prumerge_plus"):
        why = Qwen25VLAdapter.unsupported(get_method(name))
        assert why is not None and "[CLS]" in why and "substitute" in why
        assert "qwen2_vl" not in families_supporting(get_method(name))
    info = get_method("visionzip")
    assert {"qwen2_vl", "qwen2_5_vl"} <= set(families_supporting(info))


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("method", SUPPORTED)
def test_keep_all_is_identical_and_remove_restores(models, inputs, reference, family, method):
    """keep=1.0: logits and generate equal the unpatched model's; after a reducing handle, remove() restores the model
    bit-exactly and leaves no hooks."""
    model = models[family]
    n = inputs["image_grid_thw"].prod(-1) // 4

    def full(last):
        idx = last.indices
        assert idx.tolist() == [list(range(int(k))) + [-1] * (idx.shape[1] - int(k)) for k in n]

    contract.check_keep_all(model, inputs, method, full, reference[family], GEN["max_new_tokens"])
    contract.check_remove(model, inputs, method, keep=6, reference=reference[family][0])


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("method", SUPPORTED)
def test_batch_equals_each_sample(models, inputs, family, method):
    """Different prompts, image sizes and (ratio) kept counts per sample; each sample alone gives the same."""
    samples = [sample_inputs(inputs, b) for b in range(len(GRIDS))]
    last = contract.check_batch(models[family], inputs, method, 0.5, samples)
    if get_method(method).exact:
        assert last.mask.sum(1).tolist() == [8, 6, 6]


@pytest.mark.parametrize("family", FAMILIES)
def test_several_images_per_sample(models, family):
    model = models[family]
    inputs = qwen_inputs([(4, 4), (8, 4), (4, 8)], [(2, 3), (4, 2)], seed=3, images_per_sample=[2, 1])
    with torch.no_grad():
        ref = model(**inputs).logits
    with vtoken.apply(model, "divprune", keep=1.0):
        assert torch.equal(logits(model, inputs), ref)
    last = contract.check_batch(model, inputs, "uniform", 3, [sample_inputs(inputs, b) for b in range(2)], [0, 0, 1])
    assert last.mask.sum(1).tolist() == [3, 3, 3]


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("method", ["divprune", "visionzip", "lavit_dynamic"])
def test_cache_holds_only_kept_tokens(models, inputs, family, method):
    contract.check_cache(models[family], inputs, method, 6, max_new_tokens=GEN["max_new_tokens"])


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("method", ["divprune", "visionzip", "uniform"])
def test_kept_tokens_keep_their_mrope_positions(models, inputs, family, method):
    """Reference built by hand: the reduced tokens at their columns, the text embeddings, and every kept column's
    ORIGINAL 3-D position ids (from ``get_rope_index`` on the full sequence)."""
    model = models[family]
    with vtoken.apply(model, method, keep=6) as handle:
        got = logits(model, inputs)
        kept, tokens, valid = handle.last.indices, handle.last.tokens, handle.last.mask
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    with torch.no_grad():
        pos, _ = model.model.get_rope_index(ids, inputs["mm_token_type_ids"], image_grid_thw=inputs["image_grid_thw"],
                                            attention_mask=mask)
        embeds = model.get_input_embeddings()(ids)
    keep = ids != IMAGE_TOKEN
    for b in range(len(GRIDS)):
        cols = (ids[b] == IMAGE_TOKEN).nonzero()[:, 0]
        embeds[b, cols[kept[b][valid[b]]]] = tokens[b][valid[b]]
        keep[b, cols[kept[b][valid[b]]]] = True
    real = contract.check_hand_built(model, got, embeds, keep, mask, lambda b, columns: pos[:, b : b + 1, columns])
    for b in range(len(GRIDS)):  # the reduced sequence is really shorter than the original positions span
        assert int(real[b].sum()) < int(mask[b].sum())


def _record_positions(model):
    seen = []

    def hook(_module, _args, kwargs):
        pos = kwargs["position_ids"]
        seen.append(pos if pos.dim() == 3 else pos[None].expand(3, -1, -1))

    return seen, model.model.language_model.register_forward_pre_hook(hook, with_kwargs=True)


@pytest.mark.parametrize("family", FAMILIES)
def test_decode_positions_continue_the_original_sequence(models, inputs, family):
    """generate and a manual decode loop after a reduced prefill use the positions of the unreduced model:
    ``max(original M-RoPE ids) + 1 + step``, not the compacted length."""
    model = models[family]
    steps = 3
    gen = {"max_new_tokens": steps, "do_sample": False}
    seen, hook = _record_positions(model)
    try:
        model.generate(**inputs, **gen)
        plain = [p[-3:] for p in seen[1:]]
        seen.clear()
        with vtoken.apply(model, "divprune", keep=4):
            model.generate(**inputs, **gen)
            prefill_len = seen[0].shape[-1]
            reduced = [p[-3:] for p in seen[1:]]
        assert prefill_len < inputs["input_ids"].shape[1]
        assert len(reduced) == len(plain) == steps - 1
        for a, b in zip(plain, reduced, strict=True):
            assert torch.equal(a, b)

        # a manual loop (no position_ids; the decode mask in original columns): the same positions. (The unpatched
        # model cannot be the reference here: transformers 5 builds [3, B, L] decode positions from a 2-D mask.)
        pos, _ = model.model.get_rope_index(inputs["input_ids"], inputs["mm_token_type_ids"],
                                            image_grid_thw=inputs["image_grid_thw"],
                                            attention_mask=inputs["attention_mask"])
        first = pos.amax(0).amax(1) + 1  # [B]
        seen.clear()
        with vtoken.apply(model, "divprune", keep=4), torch.no_grad():
            out = model(**inputs, use_cache=True)
            cache, mask = out.past_key_values, inputs["attention_mask"]
            nxt = out.logits[:, -1:].argmax(-1)
            for _ in range(steps):
                mask = torch.cat([mask, torch.ones_like(nxt)], dim=1)
                out = model(input_ids=nxt, attention_mask=mask, past_key_values=cache, use_cache=True)
                cache, nxt = out.past_key_values, out.logits[:, -1:].argmax(-1)
        assert cache.get_seq_length() == prefill_len + steps
        loop = [p[-3:] for p in seen[1:]]
        for step, got in enumerate(loop):
            assert torch.equal(got, (first + step)[None, :, None].expand(3, -1, 1))
            if step < len(plain):
                assert torch.equal(got, plain[step])
    finally:
        hook.remove()


@pytest.mark.parametrize("family", FAMILIES)
def test_rope_deltas_as_the_unpatched_model_sets_them(models, inputs, family):
    model = models[family]
    logits(model, inputs)
    ref = model.model.rope_deltas.clone()
    model.model.rope_deltas = None
    with vtoken.apply(model, "divprune", keep=4):
        logits(model, inputs)
    assert torch.equal(model.model.rope_deltas, ref)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("method", ATTENTION)
def test_sdpa_and_eager_select_identical_tokens(inputs, family, method):
    contract.check_sdpa_eager(lambda attn: TINY[family](attn=attn), inputs, method, 6)


def _encoded(model, method, inputs):
    """The adapter of a fresh handle after encoding ``inputs`` (signals are read from its capture)."""
    handle = vtoken.apply(model, method, keep=6)
    adapter = handle.adapter
    kw = dict(inputs)
    with torch.no_grad():
        images = adapter.encode(kw)
    return handle, adapter, images


def _reference_received(model, inputs, layer):
    """Attention received per merged token, by hand: each segment (window / image) of the block's own cu_seqlens,
    the model's RoPE, per-head softmax averaged over heads, summed over queries, divided by the image's patches,
    4-patch mean, back to raster order."""
    import importlib
    import itertools

    visual = model.model.visual
    attn = visual.blocks[layer].attn
    module = importlib.import_module(type(attn).__module__)
    rec = {}
    hook = attn.register_forward_pre_hook(lambda _m, a, kw: rec.update(x=a[0], cu=kw["cu_seqlens"],
                                                                        pe=kw["position_embeddings"]),
                                          with_kwargs=True)
    with torch.no_grad():
        visual(inputs["pixel_values"], grid_thw=inputs["image_grid_thw"])
        hook.remove()
        x = rec["x"]
        p = x.shape[0]
        q, k, _ = attn.qkv(x).reshape(p, 3, attn.num_heads, -1).permute(1, 0, 2, 3).unbind(0)
        q, k = module.apply_rotary_pos_emb_vision(q, k, *rec["pe"])
        got = torch.zeros(p)
        cu = rec["cu"].tolist()
        for s, e in itertools.pairwise(cu):
            a = torch.softmax(q[s:e].transpose(0, 1) @ k[s:e].transpose(0, 1).transpose(1, 2) * attn.scaling, -1)
            got[s:e] = a.mean(0).sum(0)
    patches = inputs["image_grid_thw"].prod(-1)
    got = got / torch.repeat_interleave(patches, patches).float()
    merged = got.reshape(-1, 4).mean(1)
    if hasattr(visual, "window_size"):
        from transformers.vision_utils import get_vision_window_index

        order, _ = get_vision_window_index(inputs["image_grid_thw"], visual.spatial_merge_size, visual.window_size,
                                           visual.patch_size)
        merged = merged[torch.argsort(order)]
    return list(torch.split(merged, (patches // 4).tolist()))


@pytest.mark.parametrize("family", FAMILIES)
def test_attention_signals_match_a_hand_reference(models, inputs, family):
    model = models[family]
    info = get_method("hiprune")
    handle, adapter, images = _encoded(model, "hiprune", inputs)
    try:
        layers = adapter.spec_layers(info, "attn_received_layers")
        depth = len(model.model.visual.blocks)
        assert layers == [round(15 * depth / 32), depth - 1]  # HiPrune's Qwen2.5-VL setting, scaled
        sig = adapter.signal("attn_received_layers", info, images, inputs)
        n = images.extra["counts"]
        assert sig.shape == (len(GRIDS), 2, int(n.max()))
        for j, layer in enumerate(layers):
            for i, ref in enumerate(_reference_received(model, inputs, layer)):
                torch.testing.assert_close(sig[i, j, : int(n[i])], ref, atol=1e-6, rtol=1e-5)
                assert bool((sig[i, j, int(n[i]):] == 0).all())
                # each query row is a distribution over the image's patches; a token is the mean of its 4 patches
                torch.testing.assert_close(sig[i, j].sum(), torch.tensor(0.25), atol=1e-5, rtol=0)
    finally:
        handle.remove()
    if family == "qwen2_5_vl":  # the object layer is a windowed block here: windows matter
        full = _reference_received(model, inputs, depth - 1)
        assert not torch.allclose(full[0], sig[0, 0, : int(n[0])])


@pytest.mark.parametrize("family", FAMILIES)
def test_visionzip_substitute_keys_features_and_positions(models, inputs, family):
    model = models[family]
    info = get_method("visionzip")
    handle, adapter, images = _encoded(model, "visionzip", inputs)
    try:
        depth = len(model.model.visual.blocks)
        assert adapter.spec_layers(info, "cls_attn") == [depth - 1] == adapter.spec_layers(info, "keys")
        cls = adapter.signal("cls_attn", info, images, inputs)
        for i, ref in enumerate(_reference_received(model, inputs, depth - 1)):
            torch.testing.assert_close(cls[i, : ref.numel()], ref, atol=1e-6, rtol=1e-5)
        keys = adapter.signal("keys", info, images, inputs)
        attn = model.model.visual.blocks[-1].attn
        assert keys.shape == (*images.tokens.shape[:2], attn.head_dim)
        # vision_features: the merger's input of each token (4 patch vectors), in the order of the merged tokens
        feats = images.extra["vision_features"]
        merger = model.model.visual.merger
        with torch.no_grad():
            again = merger.mlp(merger.ln_q(feats.reshape(-1, feats.shape[-1] // 4)).reshape(*feats.shape[:2], -1))
        mask = images.columns >= 0
        torch.testing.assert_close(again[mask], images.tokens[mask], atol=1e-6, rtol=1e-5)
        # positions: the original M-RoPE ids at each token's column
        pos, _ = model.model.get_rope_index(inputs["input_ids"], inputs["mm_token_type_ids"],
                                            image_grid_thw=inputs["image_grid_thw"],
                                            attention_mask=inputs["attention_mask"])
        got = adapter.signal("positions", info, images, inputs)
        want = pos.permute(1, 2, 0)[images.sample[:, None], images.columns.clamp(min=0)]
        assert torch.equal(got[mask], want[mask])
        assert images.extra["grids"].tolist() == [[h // 2, w // 2] for h, w in GRIDS]
    finally:
        handle.remove()
    # LaVIT's optional cls_attn is not substituted
    lavit = get_method("lavit_dynamic")
    assert adapter.signal("cls_attn", lavit, images, inputs) is None


@pytest.mark.parametrize("family", FAMILIES)
def test_composition_runs_in_stage_order(models, inputs, family):
    model = models[family]
    with vtoken.apply(model, [("visionzip", {"keep": 10}), ("uniform", {"keep": 4})]) as handle:
        logits(model, inputs)
        steps = handle.last.extras["steps"]
        assert [s.mask.sum(1).tolist() for s in steps] == [[10, 10, 10], [4, 4, 4]]
        assert handle.last.mask.sum(1).tolist() == [4, 4, 4]
        assert torch.equal(handle.last.indices, steps[0].indices.gather(1, steps[1].indices))


@pytest.mark.parametrize("family", FAMILIES)
def test_labels_are_compacted(models, inputs, family):
    contract.check_labels(models[family], inputs, keep=6)


@pytest.mark.parametrize("family", FAMILIES)
def test_text_only_and_video_prompts(models, family):
    """A text-only prompt after an image prompt and a prompt with a video and an image behave as unpatched; an image
    method reduces the image and every frame of the video (keep per frame)."""
    model = models[family]
    g = torch.Generator().manual_seed(5)
    text = {"input_ids": torch.randint(1, 200, (2, 7), generator=g),
            "attention_mask": torch.ones(2, 7, dtype=torch.long)}
    image = qwen_inputs([(4, 4)], [(2, 2)], seed=6)
    video_ids = torch.tensor([[5, 6, VIDEO_TOKEN, *[VIDEO_TOKEN] * 7, 7, 252, *[IMAGE_TOKEN] * 4, 253, 8, 9]])
    video = {"input_ids": video_ids, "attention_mask": torch.ones_like(video_ids),
             "mm_token_type_ids": (video_ids == IMAGE_TOKEN).int() + 2 * (video_ids == VIDEO_TOKEN).int(),
             "pixel_values": torch.randn(16, PIXELS, generator=g), "image_grid_thw": torch.tensor([[1, 4, 4]]),
             "pixel_values_videos": torch.randn(32, PIXELS, generator=g), "video_grid_thw": torch.tensor([[2, 4, 4]])}
    with torch.no_grad():
        ref_text, ref_video = model(**text).logits, model(**video).logits
    gen_text = model.generate(**text, **GEN)
    with vtoken.apply(model, "divprune", keep=1.0):
        assert torch.equal(logits(model, video), ref_video)
    with vtoken.apply(model, "divprune", keep=2) as handle:
        model.generate(**image, **GEN)
        assert torch.equal(model.generate(**text, **GEN), gen_text)
        assert torch.equal(logits(model, text), ref_text)
        out = logits(model, video)
        assert out.shape[1] == video_ids.shape[1] - 2 - 4  # 4 image tokens -> 2; 2 frames of 4 video tokens -> 2 + 2
        assert handle.last.mask.sum().item() == 2
        assert handle.video.extras["frame_counts"].tolist() == [[2, 2]]


def test_two_models_side_by_side(inputs):
    contract.check_two_models(TINY["qwen2_5_vl"](seed=0), TINY["qwen2_5_vl"](seed=0), inputs, 6)


@pytest.mark.parametrize("family", FAMILIES)
def test_errors_leave_the_model_unpatched(models, inputs, reference, family):
    ids = inputs["input_ids"].clone()
    ids[0, (ids[0] == IMAGE_TOKEN).nonzero()[0, 0]] = 5  # one placeholder short
    cls_methods = ("vtc_cls", "hired", "prumerge", "prumerge_plus")
    contract.check_errors(models[family], inputs, [
        *[(ValueError, r"\[CLS\]", method, {"keep": 6}) for method in cls_methods],
        (ValueError, "encoder", "tome", {"keep": 6}),
        (ValueError, "token_shuffle", "token_shuffle", {"keep": 6}),
        (ValueError, "keep", "divprune", {"keep": 0}),
        (TypeError, "bogus", "divprune", {"keep": 6, "bogus": 1}),
    ], failing=[("divprune", {"keep": 6}, dict(inputs, input_ids=ids), ValueError, "image tokens")], keep=6,
        reference=reference[family][0])


def test_received_attention_is_computed_per_segment():
    """The attention each patch receives, batched over attention segments (frames, windows), against a loop over
    segments: each segment's softmax rows summed at its keys, over heads and the image's query rows."""
    from vtoken.models.qwen2_vl import received_attention

    g = torch.Generator().manual_seed(0)
    segs = torch.tensor([0] * 4 + [1] * 6 + [2] * 6)       # image 0: segments of 4 and 6 patches; image 1: one of 6
    image = torch.tensor([0] * 10 + [1] * 6)
    counts = torch.tensor([10, 6])
    q, k = torch.randn(16, 3, 5, generator=g), torch.randn(16, 3, 5, generator=g)
    got = received_attention(q, k, segs, image, counts, 0.4, max_elements=50)  # small chunks: several passes
    ref = torch.zeros(16)
    for s in range(3):
        idx = (segs == s).nonzero()[:, 0]
        probs = (torch.einsum("qhd,khd->hqk", q[idx], k[idx]) * 0.4).softmax(-1)
        ref[idx] = probs.sum((0, 1)) / (3 * counts[image[idx]].float())
    torch.testing.assert_close(got, ref)
