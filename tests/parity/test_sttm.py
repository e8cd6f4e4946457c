"""Parity of ``sttm`` with the official ``get_quadtree_features`` -> ``quadtree_build_video`` (fixture ``sttm``).

Adapter: the case's ``video_feature [T, C, H, W]`` is one clip; vtoken's tokens are its frames in raster order,
``tokens = video_feature.permute(0, 2, 3, 1).reshape(1, T * H * W, C)`` with ``video_grid = (T, H, W)``. Every case
parameter is mapped: ``threshold``, ``temporal_thresh``, ``root_level``, ``weighted_avg``, ``slow_ver`` and
``head_dim`` are the knobs of the same names; ``num_frames``/``grid_h``/``grid_w`` must equal the input's shape.
STTM's count comes from the thresholds; ``keep`` only caps it, so the test passes the official output count
(the method must then return the official result, uncapped) and checks that a larger keep changes nothing.

A token's index is its representative node's top-left source token, so the official output order (the one
``tlbr`` / ``num_patches`` define) is ascending index order: ``extras["order"]`` gives it, and ``features``,
``num_patches`` and ``tlbr`` are compared in it. The spatial-stage outputs are in the extras of the same names;
``final_representative`` and ``merge_pairs`` are official spatial-node indices, mapped from vtoken's token ids through
the sorted spatial nodes (``extras["spatial_tokens"]``); ``merge_pairs`` is compared as a set of rows.
"""

from __future__ import annotations

import pytest
import torch

import vtoken
from tests.parity.fixtures import Case, assert_close, assert_exact, cases

KNOBS = ("threshold", "temporal_thresh", "root_level", "weighted_avg", "slow_ver", "head_dim")
SHAPE = ("num_frames", "grid_h", "grid_w")
INPUTS = {"video_feature"}
OUTPUTS = {"features", "num_patches", "tlbr", "spatial_tlbr", "spatial_num_patches", "final_representative",
           "merge_pairs"}


def run(tokens: torch.Tensor, keep: int, grid: tuple[int, int, int], knobs: dict) -> vtoken.Reduction:
    if keep < tokens.shape[1]:
        return vtoken.reduce(tokens, keep, "sttm", video_grid=grid, **knobs)
    # nothing merged: vtoken.reduce would return the identity without the extras; run the method itself
    return vtoken.get_method("sttm").fn(tokens, torch.tensor([keep]), video_grid=grid, **knobs)


def in_order(red: vtoken.Reduction, x: torch.Tensor) -> torch.Tensor:
    """Rows of ``x [1, K, ...]`` (Reduction order) in ``extras["order"]``."""
    order = red.extras["order"][0]
    pos = (red.indices[0][None, :] == order[:, None]).float().argmax(-1)
    return x[0, pos]


def sorted_rows(x: torch.Tensor) -> torch.Tensor:
    """Rows of ``x [L, 2]`` in lexicographic order."""
    if x.shape[0] == 0:
        return x
    key = x[:, 0].long() * (int(x.max()) + 1) + x[:, 1].long()
    return x[torch.sort(key, stable=True).indices]


@pytest.mark.parametrize("case", cases("sttm"))
def test_sttm_parity(case: Case) -> None:
    ins, exp, params = case.load()
    for what, got, known in (("parameter", params, {*KNOBS, *SHAPE}), ("input", ins, INPUTS),
                             ("output", exp, OUTPUTS)):
        if set(got) - set(known):
            pytest.fail(f"{case}: unmapped {what}(s) {sorted(set(got) - set(known))}; the adapter maps "
                        f"{sorted(known)}")
    for need in ("features", "num_patches", "tlbr"):
        if need not in exp:
            pytest.fail(f"{case}: the case has no {need!r} output")
    video = ins["video_feature"]
    t, c, h, w = video.shape
    for name, size in zip(SHAPE, (t, h, w), strict=True):
        if name in params and int(params[name]) != size:
            pytest.fail(f"{case}: {name} = {params[name]} but video_feature is {tuple(video.shape)}")
    knobs = {k: params[k] for k in KNOBS if k in params}
    for k in ("threshold", "temporal_thresh"):
        if k in knobs:
            knobs[k] = float(knobs[k])
    if knobs.get("head_dim") is not None:
        knobs["head_dim"] = int(knobs["head_dim"])
    tokens = video.permute(0, 2, 3, 1).reshape(1, t * h * w, c)
    grid = (t, h, w)
    n_out = exp["num_patches"].shape[0]

    red = run(tokens, n_out, grid, knobs)
    ex = red.extras
    assert not bool(ex["capped"][0]), "keep = the official count must leave the official result uncapped"
    assert int(ex["threshold_counts"][0]) == n_out
    assert_exact(ex["order"][0], red.indices[0], "extras['order'] (official order = ascending indices)")
    assert_exact(in_order(red, ex["tlbr"]), exp["tlbr"], "tlbr")
    assert_exact(in_order(red, ex["num_patches"]), exp["num_patches"], "num_patches")
    assert_close(in_order(red, red.tokens), exp["features"], "features", atol=1e-5, rtol=1e-5)
    # the Reduction's own fields agree with the official ones
    tl = exp["tlbr"].long()
    assert_exact(red.indices[0], tl[:, 0] * h * w + tl[:, 1] * w + tl[:, 2], "indices (representative top-left)")
    assert_exact(red.sizes[0], exp["num_patches"].float(), "sizes")
    assert int(ex["frame_counts"].sum()) == n_out
    assert_exact(ex["frame_counts"][0], torch.bincount(tl[:, 0], minlength=t), "frame_counts")

    spatial = ex["spatial_tokens"][0]
    spatial = spatial[spatial >= 0]
    if "spatial_tlbr" in exp:
        assert_exact(ex["spatial_tlbr"][0, :spatial.numel()], exp["spatial_tlbr"], "spatial_tlbr")
    if "spatial_num_patches" in exp:
        assert_exact(ex["spatial_num_patches"][0, :spatial.numel()], exp["spatial_num_patches"],
                     "spatial_num_patches")
    if "final_representative" in exp:
        rep = ex["final_representative"][0, :spatial.numel()]
        assert_exact(torch.searchsorted(spatial, rep), exp["final_representative"], "final_representative")
    if "merge_pairs" in exp:
        pairs = ex["merge_pairs"][0]
        pairs = pairs[pairs[:, 0] >= 0]
        got = torch.searchsorted(spatial, pairs.contiguous())
        assert_exact(sorted_rows(got), sorted_rows(exp["merge_pairs"].long()), "merge_pairs (as a set)")

    # a larger budget caps nothing: the same tokens
    if n_out + 1 < tokens.shape[1]:
        more = vtoken.reduce(tokens, tokens.shape[1] - 1, "sttm", video_grid=grid, **knobs)
        assert_exact(more.indices, red.indices, "indices with keep = N - 1")
        assert_close(more.tokens, red.tokens, "tokens with keep = N - 1", atol=0, rtol=0)
