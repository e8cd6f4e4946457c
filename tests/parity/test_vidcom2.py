"""Parity of ``vidcom2`` with vLLM's ``compute_retention_mask`` (fixture ``vidcom2``), and of its per-frame selection
before reconciliation with the authors' repository (``official_repo_keep_index``).

Adapter: one video ``video_embeds [T * rows * cols, D]`` (post-merge, frame-major) is a batch of one clip,
``video_grid = (T, H // m, W // m)`` from the pre-merge ``video_size_thw`` and ``spatial_merge_size`` ``m``. vLLM's
pruning rate ``q`` gives both numbers the official code uses: the count it retains, ``max(T, min(int(T * P * (1 -
q)), T * P))`` (``compute_retained_tokens_count``), passed as ``keep``, and the ratio its frame budgets are scaled
from, ``1 - q``, passed as ``retention_ratio``. The captured locals are compared with the Reduction's extras (padded
frames do not occur: one clip), ``retention_mask`` is rebuilt from the kept indices.
"""

from __future__ import annotations

import pytest
import torch

import vtoken
from tests.parity.fixtures import Case, assert_close, assert_exact, cases, check_keys

PARAMS = {"video_size_thw", "spatial_merge_size", "q"}
#: every output the manifest's cases may carry; an unknown one fails the test (the adapter would not compare it)
OUTPUTS = {"retention_mask", "kept_index", "retained_count", "target_retained", "budget_sum", "ks", "low_var_idx",
           "v_score", "f_score", "similarity", "probs", "scales", "official_repo_keep_index"}
#: (atol, rtol) of the float outputs, from the manifest's comparison rules
CLOSE = {"v_score": (1e-5, 1e-5), "f_score": (1e-5, 1e-5), "similarity": (1e-5, 1e-5), "probs": (5e-5, 1e-4),
         "scales": (1e-5, 1e-4)}


def retained_count(tokens_per_frame: int, frames: int, q: float) -> int:
    """The count vLLM retains for pruning rate ``q`` (its ``compute_retained_tokens_count``, then capped)."""
    total = tokens_per_frame * frames
    return min(max(frames, min(int(total * (1.0 - q)), total)), total)


@pytest.mark.parametrize("case", cases("vidcom2"))
def test_vidcom2_parity(case: Case) -> None:
    ins, exp, p = case.load()
    check_keys(case, p, PARAMS, outputs=exp, compared=OUTPUTS, inputs=ins, mapped={"video_embeds"})

    t, hh, ww = (int(v) for v in p["video_size_thw"])
    m, q = int(p["spatial_merge_size"]), float(p["q"])
    rows, cols = hh // m, ww // m
    embeds = ins["video_embeds"]
    n = embeds.shape[0]
    assert n == t * rows * cols, f"{case}: {n} tokens != T * rows * cols = {t} * {rows} * {cols}"
    keep = retained_count(rows * cols, t, q)
    tokens, grid = embeds[None], (t, rows, cols)
    red = vtoken.reduce(tokens, keep, "vidcom2", video_grid=grid, retention_ratio=1.0 - q)
    kept = red.indices[0][red.mask[0]]
    extras = red.extras
    if keep >= n:  # q = 0: vtoken.reduce returns the identity; the diagnostics come from the method itself
        extras = vtoken.get_method("vidcom2").fn(tokens, torch.tensor([keep]), video_grid=grid,
                                                 retention_ratio=1.0 - q).extras

    mask = torch.zeros(n, dtype=torch.bool)
    mask[kept] = True
    got = {"retention_mask": mask, "kept_index": kept, "retained_count": red.counts,
           "target_retained": extras["target_retained"], "budget_sum": extras["budget_sum"],
           "ks": extras["ks"][0], "official_repo_keep_index": extras["budget_indices"][0]}
    for name in ("retention_mask", "kept_index", "retained_count", "target_retained", "budget_sum", "ks",
                 "official_repo_keep_index"):
        if name in exp:
            assert_exact(got[name], exp[name], name)
    if "low_var_idx" in exp:  # set-level: the order only affects float summation order
        assert_exact(extras["low_var_idx"][0].sort().values, exp["low_var_idx"].sort().values, "low_var_idx (set)")
    for name, (atol, rtol) in CLOSE.items():
        if name in exp:
            assert_close(extras[name][0], exp[name], name, atol=atol, rtol=rtol)
    assert int(red.counts[0]) == keep
    assert int(extras["frame_counts"].sum()) == keep
