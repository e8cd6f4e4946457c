"""Behaviour of the diversity / coverage methods: divprune, todre, cdpruner, mmtok (and their ops)."""

from __future__ import annotations

import itertools

import pytest
import torch

import vtoken
from vtoken.methods.mmtok import coverage_matrix
from vtoken.ops.coverage import coverage_value, greedy_max_coverage
from vtoken.ops.dpp import conditional_kernel, greedy_map
from vtoken.ops.select import covering_radius, k_center_select, max_min_select, point_distances
from vtoken.ops.similarity import cosine_distance, cosine_similarity

METHODS = ("divprune", "todre", "cdpruner", "mmtok")


def clustered(b: int, n: int, d: int, clusters: int, seed: int, spread: float = 0.05) -> torch.Tensor:
    """``[b, n, d]`` tokens around ``clusters`` random centres; cluster sizes are very unequal."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(b, clusters, d, generator=g)
    sizes = torch.linspace(3.0, 1.0, clusters) ** 3
    which = torch.multinomial(sizes / sizes.sum(), b * n, replacement=True, generator=g).view(b, n)
    x = centres.gather(1, which[:, :, None].expand(-1, -1, d))
    return x + spread * torch.randn(b, n, d, generator=g)


def signals(method: str, x: torch.Tensor, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed + 100)
    b, n, d = x.shape
    if method == "cdpruner":
        e = d // 2  # CLIP width differs from the token width
        return {"vision_features": x[..., :e] + 0.1 * torch.randn(b, n, e, generator=g),
                "text": torch.randn(b, 3, e, generator=g)}
    if method == "mmtok":
        return {"text": torch.randn(b, 5, d, generator=g), "vision_features": x[..., : d // 2]}
    return {}


def min_pairwise_distance(x: torch.Tensor, idx: torch.Tensor) -> float:
    sel = x[idx]
    d = cosine_distance(sel[None])[0] + 10.0 * torch.eye(len(idx))
    return float(d.min())


# ---------------------------------------------------------------------------------------------------------------
# divprune / todre
# ---------------------------------------------------------------------------------------------------------------


def test_divprune_min_distance_beats_random_on_clustered_data() -> None:
    x = clustered(1, 300, 32, clusters=12, seed=1)
    div = vtoken.reduce(x, keep=12, method="divprune")
    rnd = vtoken.reduce(x, keep=12, method="random")
    assert min_pairwise_distance(x[0], div.indices[0]) > 2 * min_pairwise_distance(x[0], rnd.indices[0])
    # one token per cluster: every selected token is far from every other
    assert min_pairwise_distance(x[0], div.indices[0]) > 0.3


def test_divprune_first_pick_is_most_isolated_and_order_is_greedy() -> None:
    x = clustered(1, 120, 16, clusters=6, seed=2)
    x[0, 57] = torch.randn(16) * 5  # an isolated outlier
    red = vtoken.reduce(x, keep=10, method="divprune")
    order = red.extras["order"][0]
    assert int(order[0]) == 57
    dist = cosine_distance(x)[0]
    for i in range(1, 10):  # each pick maximises the distance to its nearest already-selected token
        nearest = dist[order[:i]].min(0).values
        nearest[order[:i]] = -1
        assert int(nearest.argmax()) == int(order[i])
    assert torch.equal(red.indices[0], order.sort().values)


def test_todre_covering_radius_beats_uniform() -> None:
    x = clustered(2, 256, 32, clusters=10, seed=3)
    keep = 16
    red = vtoken.reduce(x, keep=keep, method="todre")
    uniform = torch.arange(0, 256, 256 // keep)[:keep].expand(2, keep)
    r_kc = covering_radius(x, red.indices)
    r_uni = covering_radius(x, uniform)
    assert bool((r_kc < r_uni).all()), (r_kc, r_uni)
    # the greedy k-center radius only shrinks as centres are added
    radii = [float(covering_radius(x[:1], vtoken.reduce(x[:1], keep=k, method="todre").indices)[0])
             for k in (2, 4, 8, 16, 32)]
    assert radii == sorted(radii, reverse=True)


def test_k_center_on_features_matches_max_min_on_matrix() -> None:
    x = torch.randn(3, 90, 20, generator=torch.Generator().manual_seed(4))
    counts = torch.tensor([15, 7, 11])
    first = torch.tensor([5, 0, 89])
    a = k_center_select(x, counts, first=first)
    b = max_min_select(point_distances(x, x), counts, first=first)
    assert torch.equal(a, b)
    e = k_center_select(x, counts, first=first, metric="euclidean")
    f = max_min_select(torch.cdist(x, x), counts, first=first)
    assert torch.equal(e, f)
    assert bool(((a >= 0).sum(1) == counts).all())


def test_duplicates_and_zero_tokens_never_repeat() -> None:
    x = torch.randn(1, 40, 8, generator=torch.Generator().manual_seed(5)).repeat(1, 2, 1)  # every token twice
    x[0, 3] = 0.0  # a zero token (cosine undefined)
    for method in ("divprune", "todre"):
        red = vtoken.reduce(x, keep=60, method=method)
        idx = red.indices[0]
        assert len(set(idx.tolist())) == 60
        assert bool(torch.isfinite(red.tokens).all())


# ---------------------------------------------------------------------------------------------------------------
# cdpruner
# ---------------------------------------------------------------------------------------------------------------


def test_greedy_map_matches_brute_force_log_det_greedy() -> None:
    g = torch.Generator().manual_seed(6)
    f = torch.randn(2, 30, 12, generator=g, dtype=torch.float64)
    kernel = conditional_kernel(cosine_similarity(f), torch.rand(2, 30, generator=g, dtype=torch.float64) + 0.1)
    order = greedy_map(kernel, torch.tensor([8, 8]))
    for b in range(2):
        chosen: list[int] = []
        for _ in range(8):
            gains = torch.full((30,), float("-inf"), dtype=torch.float64)
            for j in range(30):
                if j not in chosen:
                    s = [*chosen, j]
                    gains[j] = torch.logdet(kernel[b][s][:, s].double())
            chosen.append(int(gains.argmax()))
        assert order[b].tolist() == chosen


def test_cdpruner_prefers_relevant_tokens() -> None:
    # orthogonal tokens: no redundancy, so the DPP keeps the most relevant ones
    n, e = 32, 16
    g = torch.Generator().manual_seed(7)
    tokens = torch.eye(n)[None]
    text = torch.randn(1, 2, e, generator=g)
    vis = torch.randn(1, n, e, generator=g)
    red = vtoken.reduce(tokens, keep=6, method="cdpruner", vision_features=vis, text=text)
    rel = red.extras["relevance"][0]
    assert set(red.indices[0].tolist()) == set(rel.topk(6).indices.tolist())
    # relevance is the normalised NEGATED mean CLIP similarity (as in the released code)
    sim = cosine_similarity(vis, text)[0].mean(-1)
    assert int(rel.argmax()) == int(sim.argmin()) and int(rel.argmin()) == int(sim.argmax())
    assert abs(float(rel.max()) - 1.0) < 1e-4 and float(rel.min()) > 0


def test_cdpruner_prefers_diverse_tokens() -> None:
    # equal relevance: among 4 groups of near-duplicates the DPP takes one per group before any second member
    g = torch.Generator().manual_seed(8)
    base = torch.randn(4, 16, generator=g)
    tokens = (base.repeat_interleave(8, 0) + 0.01 * torch.randn(32, 16, generator=g))[None]
    text = torch.randn(1, 1, 8, generator=g)
    vis = torch.ones(1, 32, 8)  # every token equally relevant
    red = vtoken.reduce(tokens, keep=4, method="cdpruner", vision_features=vis, text=text)
    assert sorted((red.indices[0] // 8).tolist()) == [0, 1, 2, 3]


def test_cdpruner_keep_beyond_kernel_rank_stays_finite() -> None:
    g = torch.Generator().manual_seed(9)
    tokens = torch.randn(2, 50, 4, generator=g)  # rank-4 similarity, keep 20
    red = vtoken.reduce(tokens, keep=20, method="cdpruner", vision_features=torch.randn(2, 50, 6, generator=g),
                        text=torch.randn(2, 2, 6, generator=g))
    assert bool((red.counts == 20).all())
    for b in range(2):
        assert len(set(red.indices[b].tolist())) == 20


def test_cdpruner_batch_relevance_norm_couples_samples() -> None:
    g = torch.Generator().manual_seed(10)
    x = torch.randn(2, 40, 16, generator=g)
    vis = torch.randn(2, 40, 8, generator=g)
    vis[1] *= 0.2  # different relevance range per sample
    text = torch.randn(2, 1, 8, generator=g)
    per = vtoken.reduce(x, keep=5, method="cdpruner", vision_features=vis, text=text).extras["relevance"]
    glob = vtoken.reduce(x, keep=5, method="cdpruner", vision_features=vis, text=text,
                         relevance_norm="batch").extras["relevance"]
    assert torch.allclose(per.amax(1), torch.ones(2), atol=1e-4)
    assert abs(float(glob.max()) - 1.0) < 1e-4 and not torch.allclose(per, glob)
    with pytest.raises(ValueError, match="relevance_norm"):
        vtoken.reduce(x, keep=5, method="cdpruner", vision_features=vis, text=text, relevance_norm="global")


def test_cdpruner_text_mask() -> None:
    g = torch.Generator().manual_seed(11)
    x, vis = torch.randn(1, 30, 8, generator=g), torch.randn(1, 30, 6, generator=g)
    text = torch.randn(1, 3, 6, generator=g)
    a = vtoken.reduce(x, keep=5, method="cdpruner", vision_features=vis, text=text[:, :2])
    padded = torch.cat([text[:, :2], 100 * torch.ones(1, 1, 6)], 1)
    b = vtoken.reduce(x, keep=5, method="cdpruner", vision_features=vis, text=padded,
                      text_mask=torch.tensor([[True, True, False]]))
    assert torch.equal(a.indices, b.indices)
    torch.testing.assert_close(a.extras["relevance"], b.extras["relevance"])


# ---------------------------------------------------------------------------------------------------------------
# mmtok
# ---------------------------------------------------------------------------------------------------------------


def test_mmtok_coverage_is_monotone_in_keep_and_greedy_is_prefix_consistent() -> None:
    x = clustered(1, 100, 24, clusters=8, seed=12)
    text = torch.randn(1, 6, 24, generator=torch.Generator().manual_seed(13))
    cover = coverage_matrix(x, text)
    values = []
    for k in (1, 2, 4, 8, 16, 32, 64):
        red = vtoken.reduce(x, keep=k, method="mmtok", text=text)
        values.append(float(coverage_value(cover, red.indices)[0]))
        assert torch.equal(red.extras["order"][0], greedy_max_coverage(cover, torch.tensor([64]))[0, :k])
    assert all(b > a for a, b in itertools.pairwise(values))
    assert values[-1] <= 1.0 + 0.5 + 1e-5  # P block sums to 1, alpha * Q block to alpha


def test_mmtok_covers_the_question_and_the_image() -> None:
    x = clustered(1, 80, 16, clusters=5, seed=14)
    text = x[:, [17, 63]] + 0.001  # two question tokens that match two visual tokens
    first_two = vtoken.reduce(x, keep=2, method="mmtok", text=text, alpha=0.0).indices[0]
    assert first_two.tolist() == [17, 63]
    # with an uninformative question the picks spread over the clusters (vision->vision coverage)
    g = torch.Generator().manual_seed(14)
    y = (torch.randn(5, 16, generator=g).repeat_interleave(16, 0) + 0.05 * torch.randn(80, 16, generator=g))[None]
    red = vtoken.reduce(y, keep=5, method="mmtok", text=torch.ones(1, 1, 16), alpha=1.0, tv_temp=1e3)
    assert sorted((red.indices[0] // 16).tolist()) == [0, 1, 2, 3, 4]


def mmtok_reference(x, text, clip, k, pad, alpha=0.5, tv_temp=0.02, vv_temp=0.2):
    """Straight single-image reading of the MMTok manifest (one Python loop), with ``padding_patch_indices``."""
    def norm(v):
        return v / v.norm(dim=-1, keepdim=True).clamp_min(1e-8)
    m, n = text.shape[0], x.shape[0]
    p = torch.softmax(norm(text) @ norm(x).T * (1 / tv_temp), dim=1) / m
    q = torch.softmax(norm(clip) @ norm(clip).T * (1 / vv_temp), dim=1) / n
    comb = torch.cat([p, alpha * q], 0)
    best = torch.zeros(m + n)
    penalty = torch.zeros(n)
    penalty[pad] = float("-inf")
    picked = []
    for _ in range(k):
        gain = (comb - best[:, None]).clamp_min(0).sum(0) + penalty
        j = int(gain.argmax())
        picked.append(j)
        penalty[j] = float("-inf")
        best = torch.maximum(best, comb[:, j])
    return sorted(picked)


def test_mmtok_exclude_follows_official_padding_semantics() -> None:
    g = torch.Generator().manual_seed(15)
    x = clustered(1, 90, 16, clusters=6, seed=15)
    text, clip = torch.randn(1, 4, 16, generator=g), x[..., :8] + 0.05 * torch.randn(1, 90, 8, generator=g)
    pad = list(range(70, 90))
    exclude = torch.zeros(1, 90, dtype=torch.bool)
    exclude[0, pad] = True
    red = vtoken.reduce(x, keep=12, method="mmtok", text=text, vision_features=clip, exclude=exclude)
    assert red.indices[0].tolist() == mmtok_reference(x[0], text[0], clip[0], 12, pad)
    assert not bool(exclude[0, red.indices[0]].any())


# ---------------------------------------------------------------------------------------------------------------
# shared contract: masks, per-sample counts, batch == alone, dtypes, errors
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", METHODS)
def test_mask_per_sample_counts_and_batch_equals_alone(method: str) -> None:
    x = clustered(3, 64, 16, clusters=6, seed=16)
    sig = signals(method, x)
    lengths = [64, 41, 23]
    mask = torch.arange(64)[None, :] < torch.tensor(lengths)[:, None]
    x = x.masked_fill(~mask[..., None], 0.0)  # padding rows are zeros
    red = vtoken.reduce(x, keep=0.25, method=method, mask=mask, **sig)
    expected = [int(n * 0.25 + 0.5) for n in lengths]
    assert red.counts.tolist() == expected
    for b, n in enumerate(lengths):
        idx = red.indices[b, : expected[b]]
        assert bool((idx < n).all()) and bool((red.indices[b, expected[b]:] == -1).all())
        assert bool((idx.diff() > 0).all())
        alone_sig = {k: v[b : b + 1, :n] if k != "text" else v[b : b + 1] for k, v in sig.items()}
        alone = vtoken.reduce(x[b : b + 1, :n], keep=0.25, method=method, **alone_sig)
        assert torch.equal(alone.indices[0], idx), (method, b)
        torch.testing.assert_close(alone.tokens[0], red.tokens[b, : expected[b]])
        assert torch.equal(red.extras["order"][b, : expected[b]], alone.extras["order"][0])


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_inputs(method: str, dtype: torch.dtype) -> None:
    x = clustered(2, 48, 16, clusters=5, seed=17)
    sig = {k: v.to(dtype) for k, v in signals(method, x).items()}
    xh = x.to(dtype)
    red = vtoken.reduce(xh, keep=8, method=method, **sig)
    assert red.tokens.dtype == dtype and red.tokens.shape == (2, 8, 16)
    assert torch.equal(red.tokens, xh.gather(1, red.indices[..., None].expand(-1, -1, 16)))
    ref = vtoken.reduce(xh.float(), keep=8, method=method, **{k: v.float() for k, v in sig.items()})
    assert torch.equal(red.indices, ref.indices)  # scores are computed in float32 from the same values


@pytest.mark.parametrize("method", METHODS)
def test_deterministic_and_full_keep_is_identity(method: str) -> None:
    x = clustered(2, 32, 8, clusters=4, seed=18)
    sig = signals(method, x)
    a = vtoken.reduce(x, keep=7, method=method, **sig)
    b = vtoken.reduce(x.clone(), keep=7, method=method, **sig)
    assert torch.equal(a.indices, b.indices)
    full = vtoken.reduce(x, keep=32, method=method, **sig)
    assert torch.equal(full.tokens, x)


def test_missing_and_bad_signals() -> None:
    x = torch.randn(1, 20, 8)
    with pytest.raises(ValueError, match="text"):
        vtoken.reduce(x, keep=4, method="cdpruner", vision_features=torch.randn(1, 20, 6))
    with pytest.raises(ValueError, match="vision_features"):
        vtoken.reduce(x, keep=4, method="cdpruner", text=torch.randn(1, 2, 6))
    with pytest.raises(ValueError, match="text"):
        vtoken.reduce(x, keep=4, method="cdpruner", vision_features=torch.randn(1, 20, 6), text=torch.randn(1, 2, 5))
    with pytest.raises(ValueError, match="text"):
        vtoken.reduce(x, keep=4, method="mmtok")
    with pytest.raises(ValueError, match="text"):
        vtoken.reduce(x, keep=4, method="mmtok", text=torch.randn(1, 3, 7))
    with pytest.raises(ValueError, match="metric"):
        vtoken.reduce(x, keep=4, method="todre", metric="manhattan")
    with pytest.raises(ValueError, match="exclude"):
        vtoken.reduce(x, keep=4, method="mmtok", text=torch.randn(1, 3, 8), exclude=torch.zeros(1, 5, dtype=torch.bool))


def test_registry_metadata() -> None:
    for name in METHODS:
        info = vtoken.get_method(name)
        assert info.stage == "pre_llm" and info.kind == "prune"
    assert vtoken.get_method("divprune").parity and vtoken.get_method("cdpruner").parity
    assert vtoken.get_method("mmtok").fixture == "mmtok" and not vtoken.get_method("todre").parity
    assert set(vtoken.get_method("cdpruner").signals) == {"vision_features", "text"}
    assert vtoken.get_method("mmtok").defaults == {"alpha": 0.5, "tv_temp": 0.02, "vv_temp": 0.2, "exclude": None}


def test_cdpruner_row_on_demand_path_matches_full_kernel():
    """K <= N/16 reads only the picked kernel rows; it must select exactly what the full N x N kernel selects."""
    from vtoken.methods.cdpruner import instruction_relevance
    from vtoken.ops.similarity import l2_normalize

    g = torch.Generator().manual_seed(7)
    x = torch.randn(3, 400, 32, generator=g)
    vf = torch.randn(3, 400, 16, generator=g)
    text = torch.randn(3, 5, 16, generator=g)
    red = vtoken.reduce(x, 20, "cdpruner", vision_features=vf, text=text)
    xn = l2_normalize(x, 1e-12)
    rel = instruction_relevance(vf, text)
    full = greedy_map(conditional_kernel(xn @ xn.transpose(1, 2), rel), torch.full((3,), 20))
    assert torch.equal(red.extras["order"], full)
