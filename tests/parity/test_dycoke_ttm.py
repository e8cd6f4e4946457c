"""Parity of ``dycoke`` with the official ``dycole_ttm`` (DyCoke's stage 1, fixture ``dycoke_ttm``).

Adapter: the case's ``image_feature [F * P, D]`` is one clip, ``tokens = image_feature[None]`` with ``video_grid =
(F, 1, P)`` (``P = num_tokens_per_frame``; the layout inside a frame does not matter, every comparison is position
to position). As the official code, ``F = rows // P`` and any rows past ``F * P`` are ignored. The official knob is
the merging ratio; vtoken takes the clip's budget, so ``keep`` is the count the official code returns, computed
here from the manifest's rule: ``P`` per frame kept whole plus ``int((1 - merging_ratio) * P)`` per pruned frame
(frames ``1, 3, 5, ...`` and ``i + 2`` for ``i = 0, 4, ...``, ``i < F - 4``; a trailing unpaired frame is dropped).
The official output lists a pruned frame's tokens in ascending similarity, not in position order, so ``source_index``
(order-sensitive) is compared with ``extras["order"]`` and ``tokens`` with the input rows in that order; the
Reduction's ascending ``indices`` are the same set.
"""

from __future__ import annotations

import pytest
import torch

import vtoken
from tests.parity.fixtures import Case, assert_exact, cases
from vtoken.methods.dycoke import official_keep

PARAMS = {"num_tokens_per_frame", "merging_ratio"}
INPUTS = {"image_feature"}
OUTPUTS = {"tokens", "source_index"}


def manifest_count(frames: int, p: int, merging_ratio: float) -> int:
    """The official output count, frame by frame from the manifest's algorithm."""
    per_pruned = int((1 - merging_ratio) * p)
    entries = [p, per_pruned] * (frames // 2)  # pairs (i, i + 1); a trailing unpaired frame is dropped
    for i in range(0, frames - 4, 4):
        entries[i + 2] = per_pruned
    return sum(entries)


@pytest.mark.parametrize("case", cases("dycoke_ttm"))
def test_dycoke_ttm_parity(case: Case) -> None:
    ins, exp, params = case.load()
    for what, got, known in (("parameter", params, PARAMS), ("input", ins, INPUTS), ("output", exp, OUTPUTS)):
        if set(got) - known:
            pytest.fail(f"{case}: unmapped {what}(s) {sorted(set(got) - known)}; the adapter maps {sorted(known)}")
    p, ratio = int(params["num_tokens_per_frame"]), float(params["merging_ratio"])
    feature = ins["image_feature"]
    frames = feature.shape[0] // p
    if frames < 2:
        pytest.fail(f"{case}: {frames} frames of {p} tokens; the official function needs at least one frame pair")
    tokens = feature[None, :frames * p]
    keep = manifest_count(frames, p, ratio)
    assert official_keep(frames, p, ratio) == keep
    assert keep == exp["source_index"].shape[0], "the official count does not match the fixture's output"

    grid = (frames, 1, p)
    if keep < tokens.shape[1]:
        red = vtoken.reduce(tokens, keep, "dycoke", video_grid=grid)
    else:  # no frame pruned (ratio <= 0): vtoken.reduce returns the identity, without the official order
        red = vtoken.get_method("dycoke").fn(tokens, torch.tensor([keep]), video_grid=grid)
    order = red.extras["order"][0]
    assert_exact(order, exp["source_index"], "source_index (official order)")
    assert_exact(feature[order], exp["tokens"], "tokens (official order)")
    assert_exact(red.indices[0], exp["source_index"].sort().values, "indices (ascending)")
    assert_exact(red.tokens[0], feature[exp["source_index"].sort().values], "Reduction tokens (ascending)")
    assert int(red.extras["frame_counts"].sum()) == keep
