"""``ops.attention.attention_pagerank``: a dense reference, GQA, padding, blocked vs cached transitions, errors."""

from __future__ import annotations

import pytest
import torch

from vtoken.ops.attention import attention_pagerank


def _qk(b: int, n: int, h: int, hkv: int, d: int = 8, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(b, n, h, d, generator=gen), torch.randn(b, n, hkv, d, generator=gen)


def dense(q: torch.Tensor, k: torch.Tensor, temperature: float, iters: int, damping: float = 0.0) -> torch.Tensor:
    """The definition, one unpadded sample at a time, float64: full ``[H, L, L]`` transition matrices."""
    out = []
    for qb, kb in zip(q.double(), k.double(), strict=True):
        n, h = qb.shape[0], qb.shape[1]
        kb = kb.repeat_interleave(h // kb.shape[1], dim=1)
        logits = torch.einsum("ihd,jhd->hij", qb, kb) / temperature
        causal = torch.ones(n, n, dtype=torch.bool).tril()
        m = torch.softmax(logits.masked_fill(~causal, float("-inf")), dim=-1)
        p = torch.full((h, 1, n), 1.0 / n, dtype=torch.float64)
        for _ in range(iters):
            p = (1 - damping) * (p @ m) + damping / n
        out.append(p[:, 0].pow(2).mean(0).sqrt())
    return torch.stack(out)


@pytest.mark.parametrize(("h", "hkv"), [(4, 4), (4, 2), (6, 1)])
def test_matches_the_dense_definition(h, hkv):
    q, k = _qk(2, 13, h, hkv)
    got = attention_pagerank(q, k, torch.ones(2, 13, dtype=torch.bool), temperature=0.1, iters=5)
    assert got.dtype == torch.float32 and got.shape == (2, 13)
    torch.testing.assert_close(got.double(), dense(q, k, 0.1, 5), atol=1e-6, rtol=1e-4)
    damped = attention_pagerank(q, k, torch.ones(2, 13, dtype=torch.bool), temperature=0.5, iters=3, damping=0.15)
    torch.testing.assert_close(damped.double(), dense(q, k, 0.5, 3, 0.15), atol=1e-6, rtol=1e-4)


def test_gqa_equals_repeated_key_heads():
    q, k = _qk(1, 9, 6, 2, seed=1)
    valid = torch.ones(1, 9, dtype=torch.bool)
    torch.testing.assert_close(attention_pagerank(q, k, valid, temperature=0.1),
                               attention_pagerank(q, k.repeat_interleave(3, dim=2), valid, temperature=0.1))


def test_zero_steps_is_uniform_and_padding_gets_zero():
    q, k = _qk(1, 5, 2, 2)
    valid = torch.tensor([[False, True, True, True, True]])
    got = attention_pagerank(q, k, valid, iters=0)
    assert got.tolist() == [[0.0, 0.25, 0.25, 0.25, 0.25]]


def test_left_padding_and_other_samples_do_not_change_a_sample():
    q, k = _qk(2, 11, 4, 2, seed=2)
    pad = 3
    valid = torch.ones(2, 11, dtype=torch.bool)
    valid[1, :pad] = False
    got = attention_pagerank(q, k, valid, temperature=0.1)
    alone = attention_pagerank(q[1:, pad:], k[1:, pad:], torch.ones(1, 11 - pad, dtype=torch.bool), temperature=0.1)
    torch.testing.assert_close(got[1, pad:], alone[0])
    assert bool((got[1, :pad] == 0).all())
    torch.testing.assert_close(got[0], attention_pagerank(q[:1], k[:1], valid[:1], temperature=0.1)[0])


def test_blocked_rebuilt_transitions_equal_the_cached_ones():
    q, k = _qk(2, 17, 4, 2, seed=3)
    valid = torch.ones(2, 17, dtype=torch.bool)
    valid[0, :4] = False
    full = attention_pagerank(q, k, valid, temperature=0.1)
    for budget in (1, 2 * 4 * 17 * 4 * 3):  # one query row per block / three rows, rebuilt at every step
        torch.testing.assert_close(attention_pagerank(q, k, valid, temperature=0.1, budget=budget), full)


def test_half_precision_inputs_compute_in_float32():
    q, k = _qk(1, 7, 2, 2, seed=4)
    valid = torch.ones(1, 7, dtype=torch.bool)
    got = attention_pagerank(q.bfloat16(), k.bfloat16(), valid, temperature=0.1)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, attention_pagerank(q.bfloat16().float(), k.bfloat16().float(), valid,
                                                       temperature=0.1))


@pytest.mark.parametrize(("kw", "match"), [({"temperature": 0.0}, "temperature"), ({"iters": -1}, "iters"),
                                           ({"iters": 1.5}, "iters"), ({"damping": 2.0}, "damping")])
def test_bad_arguments_are_named(kw, match):
    q, k = _qk(1, 4, 2, 2)
    with pytest.raises(ValueError, match=match):
        attention_pagerank(q, k, torch.ones(1, 4, dtype=torch.bool), **kw)


def test_bad_shapes_are_named():
    q, k = _qk(1, 4, 4, 3)
    with pytest.raises(ValueError, match="key heads"):
        attention_pagerank(q, k, torch.ones(1, 4, dtype=torch.bool))
    q, k = _qk(1, 4, 2, 2)
    with pytest.raises(ValueError, match="valid"):
        attention_pagerank(q, k, torch.ones(1, 5, dtype=torch.bool))
    with pytest.raises(ValueError, match="q"):
        attention_pagerank(q[0], k, torch.ones(1, 4, dtype=torch.bool))
