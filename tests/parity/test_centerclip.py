"""Parity of ``centerclip`` with CenterCLIP's official ``batch_fast_kmedoids`` (fixture ``centerclip``).

Adapter: every row of ``X [B, N, L]`` is one clustering problem (no ``frame_ids``: one segment) with ``keep = K``;
``distance``, ``norm_p``, ``threshold`` and ``iter_limit`` pass through and ``stop="batch"`` is the official joint
stopping rule (batch mean of the medoid shifts). The Reduction is sorted by medoid index, which is the official
``id_sort=True`` output (``indices`` = medoids, ``assign`` = cluster labels); for ``id_sort=False`` the labels and
medoids are mapped back to the KKZ slot order through ``extras["slot_medoids"]``.
"""

from __future__ import annotations

import pytest
import torch

import vtoken
from tests.parity.fixtures import Case, assert_exact, cases


@pytest.mark.parametrize("case", cases("centerclip"))
def test_centerclip_parity(case: Case) -> None:
    ins, exp, p = case.load()
    x = ins["X"]
    red = vtoken.reduce(x, keep=int(p["K"]), method="centerclip", distance=p["distance"], norm_p=float(p["norm_p"]),
                        threshold=float(p["threshold"]), iter_limit=int(p["iter_limit"]), stop="batch")
    if p["id_sort"]:
        medoids, assign = red.indices, red.assign
    else:
        medoids = red.extras["slot_medoids"]
        slot_of = torch.searchsorted(red.indices.contiguous(), medoids.contiguous())  # sorted position of each slot
        inverse = torch.empty_like(slot_of).scatter_(1, slot_of, torch.arange(medoids.shape[1]).expand_as(slot_of))
        assign = inverse.gather(1, red.assign)
    assert_exact(assign, exp["assign"], "assign")
    assert_exact(medoids, exp["medoids"], "medoids")
    assert bool(red.mask.all())
    assert_exact(red.tokens, x.gather(1, exp["medoids"][..., None].expand(-1, -1, x.shape[-1])), "medoid tokens")
    if "iterations" in red.extras:  # absent only when every token is kept (identity)
        assert_exact(red.extras["iterations"].max().reshape(1), exp["iterations_run"], "iterations_run")
