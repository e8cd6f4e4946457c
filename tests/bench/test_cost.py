"""vtoken.bench.cost: analytic FLOPs, KV-cache bytes and parameter counts against hand-computed numbers, torch's
FLOP counter (eager attention, which it can see) and the caches / parameters of tiny random-weight models."""

from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode
from transformers import (
    CLIPVisionConfig,
    CLIPVisionModel,
    LlamaConfig,
    LlamaForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from tests.models.tiny import tiny_llava
from vtoken.bench import cost


def llama_config(attn: str = "eager", **kw) -> LlamaConfig:
    cfg = LlamaConfig(vocab_size=100, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, **kw)
    cfg._attn_implementation = attn
    return cfg


def cache_bytes(cache) -> int:
    return sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values))


def test_llm_flops_by_hand():
    # H=64, 2 layers, 4 heads x 16, 2 kv heads, I=128 (gated), V=100; B=3, L=10
    cfg = llama_config()
    d = cost.llm_prefill_flops(cfg, 10, 3, detail=True)
    assert d["proj"] == 2 * 30 * 64 * (2 * 64 + 2 * 32) * 2 == 1_474_560
    assert d["mlp"] == 2 * 30 * 3 * 64 * 128 * 2 == 2_949_120
    assert d["attention"] == 4 * 3 * 4 * 16 * 55 * 2 == 84_480  # causal: 10 * 11 / 2 pairs
    assert d["lm_head"] == 2 * 3 * 1 * 64 * 100 == 38_400  # logits of the last position only
    assert d["total"] == cost.llm_prefill_flops(cfg, 10, 3) == 4_546_560
    full = cost.llm_prefill_flops(cfg, 10, 3, causal=False, logits=None, detail=True)
    assert full["attention"] == 4 * 3 * 4 * 16 * 100 * 2 and full["lm_head"] == 2 * 30 * 64 * 100
    # after 6 cached tokens, 4 new queries see 7..10 keys
    assert cost.llm_prefill_flops(cfg, 4, 1, past=6, detail=True)["attention"] == 4 * 4 * 16 * (7 + 8 + 9 + 10) * 2


def test_per_layer_lengths_by_hand():
    """Pruning inside the LM: layer i processes seq_len[i] tokens; the LM head reads the last layer's output."""
    cfg = llama_config()
    d = cost.llm_prefill_flops(cfg, [10, 4], 3, logits=None, detail=True)
    assert d["proj"] == 2 * 3 * (10 + 4) * 64 * (2 * 64 + 2 * 32)
    assert d["mlp"] == 2 * 3 * (10 + 4) * 3 * 64 * 128
    assert d["attention"] == 4 * 3 * 4 * 16 * (55 + 10)
    assert d["lm_head"] == 2 * 3 * 4 * 64 * 100
    assert cost.llm_prefill_flops(cfg, [10, 10], 3) == cost.llm_prefill_flops(cfg, 10, 3)
    assert cost.kv_cache_bytes(cfg, [10, 4], 2) == 2 * 2 * 2 * 16 * 4 * (10 + 4)
    with pytest.raises(ValueError, match="seq_len"):
        cost.llm_prefill_flops(cfg, [10, 4, 2])


def test_sliding_window_pairs_and_kv_by_hand():
    cfg = Qwen2Config(vocab_size=100, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                      num_attention_heads=4, num_key_value_heads=2, use_sliding_window=True, sliding_window=4,
                      max_window_layers=1)
    assert cost.text_dims(cfg).layer_types == ("full_attention", "sliding_attention", "sliding_attention")
    # 10 queries: full layer 55 pairs; sliding layers min(i + 1, 4) -> 1 + 2 + 3 + 4 * 7 = 34 pairs
    assert cost.llm_prefill_flops(cfg, 10, 1, detail=True)["attention"] == 4 * 4 * 16 * (55 + 34 + 34)
    # full layer caches 10 tokens, sliding layers the last window - 1 = 3
    assert cost.kv_cache_bytes(cfg, 10, 2) == 2 * 2 * 2 * 16 * 4 * (10 + 3 + 3)


def test_llm_flops_match_torch_flop_counter():
    torch.manual_seed(0)
    cfg = llama_config("eager")  # eager attention: the counter sees the two attention matmuls
    model = LlamaForCausalLM(cfg).eval()
    ids = torch.randint(0, 100, (3, 10))
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(ids)
    # some transformers releases build the rotary table with a (tiny) matmul: not part of the per-token cost
    rotary = sum(sum(ops.values()) for name, ops in counter.get_flop_counts().items() if name.endswith("rotary_emb"))
    assert counter.get_total_flops() - rotary == cost.llm_prefill_flops(cfg, 10, 3, causal=False, logits=None)


def test_vit_and_projector_flops():
    v = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                         image_size=32, patch_size=4)
    v._attn_implementation = "eager"
    d = cost.vit_flops(v, 2, detail=True)  # 64 patches + CLS = 65 tokens
    assert d["embed"] == 2 * 2 * 64 * 48 * 32
    assert d["proj"] == 2 * 2 * 65 * 4 * 32 * 32 * 3
    assert d["attention"] == 4 * 2 * 65 * 65 * 32 * 3
    assert d["mlp"] == 2 * 2 * 65 * 2 * 32 * 64 * 3
    model = CLIPVisionModel(v).eval()
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(torch.randn(2, 3, 32, 32))
    assert counter.get_total_flops() == d["total"]
    vlm = tiny_llava().config  # CLIP 32 -> Llama 48
    assert cost.projector_flops(vlm, 64, 2) == 2 * 2 * 64 * (32 * 48 + 48 * 48)
    assert cost.vision_dims(vlm).tokens == 65 and cost.text_dims(vlm).hidden == 48


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kv_bytes_match_the_cache_of_a_tiny_model(dtype):
    torch.manual_seed(0)
    cfg = llama_config("sdpa")
    assert cost.kv_cache_bytes(cfg, 10, 3) == 2 * 2 * 3 * 2 * 10 * 16 * 4
    model = LlamaForCausalLM(cfg).eval().to(dtype)
    with torch.no_grad():
        out = model(torch.randint(0, 100, (3, 10)), use_cache=True)
    assert cache_bytes(out.past_key_values) == cost.kv_cache_bytes(cfg, 10, 3, dtype)
    qcfg = Qwen2Config(vocab_size=100, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                       num_attention_heads=4, num_key_value_heads=2, use_sliding_window=True, sliding_window=4,
                       max_window_layers=1)
    qwen = Qwen2ForCausalLM(qcfg).eval().to(dtype)
    with torch.no_grad():
        out = qwen(torch.randint(0, 100, (2, 10)), use_cache=True)
    assert cache_bytes(out.past_key_values) == cost.kv_cache_bytes(qcfg, 10, 2, dtype)


def test_kv_bytes_of_a_tiny_vlm_prefill():
    model = tiny_llava()
    ids = torch.cat([torch.tensor([[5, 6]]), torch.full((1, 64), 250), torch.tensor([[7, 8, 9]])], dim=1)
    with torch.no_grad():
        out = model(input_ids=ids, pixel_values=torch.randn(1, 3, 32, 32), use_cache=True)
    assert cache_bytes(out.past_key_values) == cost.kv_cache_bytes(model.config, ids.shape[1])


@pytest.mark.parametrize("tied", [False, True])
def test_param_count_matches_the_model(tied):
    cfg = llama_config(tie_word_embeddings=tied)
    model = LlamaForCausalLM(cfg)
    assert cost.llm_param_count(cfg) == sum(p.numel() for p in model.parameters())
    q = Qwen2Config(vocab_size=100, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=tied)
    assert cost.llm_param_count(q) == sum(p.numel() for p in Qwen2ForCausalLM(q).parameters())


def test_moe_is_refused():
    cfg = llama_config()
    cfg.num_local_experts = 8
    with pytest.raises(ValueError, match="mixture-of-experts"):
        cost.text_dims(cfg)
