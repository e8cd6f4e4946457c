"""Encoder-stage methods inside a ViT classifier: schedule, proportional attention, invariants."""

from __future__ import annotations

import pytest
import torch
from transformers import ViTConfig, ViTForImageClassification

import vtoken
from vtoken.models.vit import VitAdapter, layer_counts

METHODS = [m.name for m in vtoken.methods() if VitAdapter.unsupported(m) is None]


def tiny_vit(attn: str = "sdpa", seed: int = 0) -> ViTForImageClassification:
    torch.manual_seed(seed)
    cfg = ViTConfig(hidden_size=32, num_hidden_layers=4, num_attention_heads=4, intermediate_size=64, image_size=28,
                    patch_size=4, num_channels=1, num_labels=10)
    cfg._attn_implementation = attn
    return ViTForImageClassification(cfg).eval()


@pytest.fixture(scope="module")
def model():
    return tiny_vit()


@pytest.fixture(scope="module")
def pixels():
    return torch.randn(3, 1, 28, 28, generator=torch.Generator().manual_seed(1))


@torch.no_grad()
def _logits(model, pixels):
    return model(pixel_values=pixels).logits


def test_encoder_methods_are_supported():
    assert {"tome", "evit", "mctf"} <= set(METHODS)


def test_layer_counts():
    assert layer_counts(50, 18, [0, 1, 2, 3]) == [42, 34, 26, 18]
    assert layer_counts(50, 17, [0, 1, 2, 3]) == [41, 33, 25, 17]
    assert layer_counts(197, 50, [3, 6, 9], "geometric")[-1] == 50
    g = layer_counts(197, 50, [3, 6, 9], "geometric")
    assert g == sorted(g, reverse=True) and abs(g[0] / 197 - (50 / 197) ** (1 / 3)) < 0.01


@pytest.mark.parametrize("method", METHODS)
def test_keep_all_identical_and_remove_restores(model, pixels, method):
    ref = _logits(model, pixels)
    with vtoken.apply(model, method, keep=1.0):
        assert torch.equal(_logits(model, pixels), ref)
    with vtoken.apply(model, method, keep=16) as handle:
        out = _logits(model, pixels)
        assert not torch.equal(out, ref)
        assert handle.last.tokens.shape[1] == 16
        assert bool((handle.last.indices[:, 0] == 0).all()), "the CLS token stays first"
    assert all("forward" not in block.__dict__ for block in model.vit.layers)
    assert torch.equal(_logits(model, pixels), ref)


@pytest.mark.parametrize("method", METHODS)
def test_schedule_reduces_per_layer(model, pixels, method):
    with vtoken.apply(model, method, keep=17) as handle:
        _logits(model, pixels)
        steps = handle.last.extras["steps"]
        layers = handle.last.extras["layers"]
    if method == "evit":
        assert layers == [1, 2, 3]
    else:
        assert layers == [0, 1, 2, 3]
    assert [s.tokens.shape[1] for s in steps][-1] == 17
    sizes = handle.last.sizes
    if sizes is not None and method != "evit":
        torch.testing.assert_close(sizes.sum(1), torch.full((3,), 50.0))


@pytest.mark.parametrize("method", METHODS)
def test_batch_equals_each_sample(model, pixels, method):
    with vtoken.apply(model, method, keep=20) as handle:
        batch = _logits(model, pixels)
        idx = handle.last.indices.clone()
        for i in range(3):
            one = _logits(model, pixels[i : i + 1])
            torch.testing.assert_close(one[0], batch[i], atol=2e-5, rtol=1e-4)
            assert torch.equal(handle.last.indices[0], idx[i])


@pytest.mark.parametrize("method", METHODS)
def test_sdpa_and_eager_select_identical_tokens(pixels, method):
    got = []
    for attn in ("sdpa", "eager"):
        m = tiny_vit(attn)
        with vtoken.apply(m, method, keep=20) as handle:
            logits = _logits(m, pixels)
            got.append((handle.last.indices.clone(), logits))
    assert torch.equal(got[0][0], got[1][0])
    torch.testing.assert_close(got[0][1], got[1][1], atol=1e-5, rtol=1e-4)


def test_tome_proportional_attention_matches_reference(model, pixels):
    """One ToMe layer by hand: merge after layer 0's attention, then layer 1 attends with log(size) added."""
    with vtoken.apply(model, "tome", keep=34, layers=[0]) as handle:
        got = _logits(model, pixels)
        red = handle.last
    with torch.no_grad():
        emb = model.vit.embeddings(pixels)
        b0 = model.vit.layers[0]
        h = b0.attention(b0.layernorm_before(emb), None)[0] + emb
        k = b0.attention.k_proj(b0.layernorm_before(emb)).reshape(3, 50, 4, 8).mean(2)
        merged = vtoken.reduce(h, 34, "tome", keys=k, class_token=True)
        assert torch.equal(merged.indices, red.indices)
        h = merged.tokens
        h = b0.mlp(b0.layernorm_after(h)) + h
        bias = merged.sizes.log()[:, None, None, :]
        for blk in model.vit.layers[1:]:
            h = blk.attention(blk.layernorm_before(h), bias)[0] + h
            h = blk.mlp(blk.layernorm_after(h)) + h
        ref = model.classifier(model.vit.layernorm(h)[:, 0])
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)


def test_vit_errors(model):
    with pytest.raises(ValueError, match="stage"):
        vtoken.apply(model, "divprune", keep=8)
    with pytest.raises(ValueError, match="schedule"):
        vtoken.apply(model, "tome", keep=8, schedule="cubic")
    assert all("forward" not in block.__dict__ for block in model.vit.layers)
