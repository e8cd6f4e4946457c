"""Parity of ``centerclip`` with CenterCLIP's official ``batch_fast_kmedoids`` (fixture ``centerclip``).

Adapter: every row of ``X [B, N, L]`` is one clustering problem (no ``frame_ids``: one segment) with ``keep = K``.
Every parameter of the official call maps to a knob of the same name (``distance``, ``norm_p``, ``threshold``,
``iter_limit``, ``id_sort``; absent ones take the official function's defaults), plus ``stop="batch"``: the official
joint stopping rule (batch mean of the medoid shifts). A parameter the adapter does not know fails the test.

The Reduction is sorted by medoid index, which is the official ``id_sort=True`` output (``indices`` = medoids,
``assign`` = cluster labels); for ``id_sort=False`` the official medoids are in KKZ slot order,
``extras["slot_medoids"]``, and the labels are mapped back to that order.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch

import vtoken
from tests.parity.fixtures import Case, assert_exact, cases
from vtoken.methods.centerclip import centerclip

#: the official ``batch_fast_kmedoids`` keyword defaults, used for parameters a case does not carry
OFFICIAL_DEFAULTS: dict[str, Any] = {"distance": "euclidean", "threshold": 1e-5, "iter_limit": 60, "id_sort": True,
                                     "norm_p": 2.0}
#: fixture parameter -> (vtoken knob, type)
KNOBS: dict[str, tuple[str, type]] = {"distance": ("distance", str), "norm_p": ("norm_p", float),
                                      "threshold": ("threshold", float), "iter_limit": ("iter_limit", int),
                                      "id_sort": ("id_sort", bool)}


def knobs(params: dict[str, Any]) -> dict[str, Any]:
    """vtoken knobs for a case's parameters; unknown parameters fail loudly."""
    unknown = sorted(set(params) - set(KNOBS) - {"K"})
    if unknown:
        pytest.fail(f"centerclip adapter: fixture parameters {unknown} have no vtoken mapping")
    full = {**OFFICIAL_DEFAULTS, **params}
    return {knob: tp(full[name]) for name, (knob, tp) in KNOBS.items()} | {"stop": "batch"}


@pytest.mark.parametrize("case", cases("centerclip"))
def test_centerclip_parity(case: Case) -> None:
    ins, exp, p = case.load()
    x = ins["X"]
    b, n = x.shape[:2]
    k = int(p["K"])
    assert 1 <= k <= n, f"K = {k} must be in [1, N = {n}]"
    kw = knobs(p)
    red = vtoken.reduce(x, keep=k, method="centerclip", **kw)
    if k == n:  # vtoken.reduce returns the identity; the official code still clusters (KKZ order, iterations)
        red = centerclip(x, torch.full((b,), k, dtype=torch.long), **kw)
    if kw["id_sort"]:
        medoids, assign = red.indices, red.assign
    else:
        medoids = red.extras["slot_medoids"]
        slot_of = torch.searchsorted(red.indices.contiguous(), medoids.contiguous())  # sorted position of each slot
        inverse = torch.empty_like(slot_of).scatter_(1, slot_of, torch.arange(medoids.shape[1]).expand_as(slot_of))
        assign = inverse.gather(1, red.assign)
    assert_exact(assign, exp["assign"], "assign")
    assert_exact(medoids, exp["medoids"], "medoids")
    assert bool(red.mask.all())
    ascending = exp["medoids"].sort(dim=1).values  # the Reduction's order
    assert_exact(red.tokens, x.gather(1, ascending[..., None].expand(-1, -1, x.shape[-1])), "medoid tokens")
    if "iterations_run" in exp:
        assert_exact(red.extras["iterations"].max().reshape(1), exp["iterations_run"], "iterations_run")
