"""``centerclip`` over the whole parameter space of CenterCLIP's official ``batch_fast_kmedoids`` (fixture manifest
``centerclip``): both distances, ``norm_p``, ``threshold``, ``iter_limit`` (including runs stopped before
convergence) and ``id_sort`` on and off, with the official joint stopping rule (``stop="batch"``).

The reference below is a plain loop written from the manifest's algorithm text (shifted negative distances, KKZ
initialisation, alternating assignment / medoid update, batch-mean shift test, optional id sort and re-assignment).
"""

from __future__ import annotations

import itertools

import pytest
import torch

import vtoken


class NearTieError(Exception):
    """A choice of the reference is decided by less than 1e-6: the data tests rounding, not the algorithm."""


def reference(x: torch.Tensor, k: int, distance: str, threshold: float, iter_limit: int, id_sort: bool,
              p: float) -> tuple[list[list[int]], list[list[int]], int]:
    """(assign [B][N], medoids [B][K], iterations) of the official k-medoids on ``x [B, N, L]`` (float64)."""
    b, n, _ = x.shape
    d = torch.empty(b, n, n, dtype=torch.float64)
    for s, i, j in itertools.product(range(b), range(n), range(n)):
        if distance == "euclidean":
            d[s, i, j] = float(((x[s, i] - x[s, j]).abs() ** p).sum() ** (1 / p))
        else:
            xi, xj = x[s, i] / (x[s, i].norm() + 1e-6), x[s, j] / (x[s, j].norm() + 1e-6)
            d[s, i, j] = 1 - float(xi @ xj)
    d = d - d.max() - 1  # the WHOLE batch's max: every entry <= -1
    for i in range(n):
        d[:, i, i] -= 1  # self is always nearest

    def argmin(values: list[float]) -> int:
        best = min(range(len(values)), key=lambda i: (values[i], i))  # first on ties
        gaps = [v - values[best] for i, v in enumerate(values) if i != best]
        # exact ties (a 2-member cluster's medoid) break by lowest index; near ties would test rounding, not logic
        if any(0 < g < 1e-6 for g in gaps):
            raise NearTieError
        return best

    def assign_to(s: int, med: list[int]) -> list[int]:
        return [argmin([float(d[s, m, j]) for m in med]) for j in range(n)]

    medoids = []
    for s in range(b):
        norms = [float(x[s, i].norm()) for i in range(n)]
        med = [argmin([-v for v in norms])]
        for _ in range(1, k):
            far = [min(float(d[s, m, j]) for m in med) for j in range(n)]
            med.append(argmin([-v for v in far]))
        medoids.append(med)
    assign = None
    step = 0
    for step in range(iter_limit):  # noqa: B007 (the official code reports step + 1)
        assign = [assign_to(s, medoids[s]) for s in range(b)]
        new = []
        for s in range(b):
            cost = [sum(float(d[s, i, j]) for j in range(n) if assign[s][j] == c and assign[s][i] == c)
                    for c in range(k) for i in range(n)]
            new.append([argmin(cost[c * n:(c + 1) * n]) for c in range(k)])
        shift = sum(sum(float((x[s, a] - x[s, o]).norm()) for a, o in zip(new[s], medoids[s], strict=True))
                    for s in range(b)) / b
        medoids = new
        if shift < threshold:
            break
    iterations = step + 1 if iter_limit > 0 else 0
    if id_sort:
        medoids = [sorted(m) for m in medoids]
        assign = [assign_to(s, medoids[s]) for s in range(b)]
    assert assign is not None, "the official code has no assignment without iterations unless id_sort"
    return assign, medoids, iterations


def official_outputs(red: vtoken.Reduction, id_sort: bool) -> tuple[list[list[int]], list[list[int]]]:
    """The Reduction's clusters as the official (assign, medoids): ascending, or in KKZ slot order."""
    if id_sort:
        return red.assign.tolist(), red.indices.tolist()
    slots = red.extras["slot_medoids"]
    pos = torch.searchsorted(red.indices.contiguous(), slots.contiguous())  # sorted position of each slot
    label = torch.empty_like(pos).scatter_(1, pos, torch.arange(slots.shape[1]).expand_as(pos))
    return label.gather(1, red.assign).tolist(), slots.tolist()


def blobs(b: int, n: int, d: int, k: int, seed: int, spread: float) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(b, k, d, generator=g, dtype=torch.float64) * 3
    which = torch.stack([torch.randperm(n, generator=g) % k for _ in range(b)])
    noise = torch.randn(b, n, d, generator=g, dtype=torch.float64)
    return centres.gather(1, which[..., None].expand(b, n, d)) + spread * noise


SPACE = [("euclidean", 2.0), ("euclidean", 1.0), ("euclidean", 3.0), ("cosine", 2.0)]


@pytest.mark.parametrize(("distance", "norm_p"), SPACE)
@pytest.mark.parametrize("id_sort", [True, False])
@pytest.mark.parametrize(("iter_limit", "threshold"), [(1, 1e-5), (2, 1e-5), (100, 1e-5), (100, 0.0), (100, 0.5)])
def test_matches_the_manifest_reference(distance, norm_p, id_sort, iter_limit, threshold):
    seed = SPACE.index((distance, norm_p)) * 1000 + iter_limit * 10 + int(threshold * 10)
    k = 4
    for attempt in range(10):  # redraw data whose choices are near ties (as the fixtures' robustness policy)
        x = blobs(3, 24, 6, 4, seed=seed + 100 * attempt, spread=1.2)  # touching blobs: the KKZ extremes move
        try:
            assign, medoids, iterations = reference(x, k, distance, threshold, iter_limit, id_sort, norm_p)
            break
        except NearTieError:
            continue
    else:
        pytest.fail("no clear-cut data drawn")
    red = vtoken.reduce(x, k, "centerclip", distance=distance, norm_p=norm_p, threshold=threshold,
                        iter_limit=iter_limit, id_sort=id_sort, stop="batch")
    got_assign, got_medoids = official_outputs(red, id_sort)
    assert got_medoids == medoids
    assert got_assign == assign
    assert red.extras["iterations"].tolist() == [iterations] * 3, "the batch stops together"
    assert torch.equal(red.tokens, x.gather(1, red.indices[..., None].expand(-1, -1, x.shape[-1])))


def test_iter_limit_zero_keeps_the_kkz_medoids():
    x = blobs(2, 20, 4, 3, seed=7, spread=0.5)
    red = vtoken.reduce(x, 3, "centerclip", iter_limit=0, stop="batch")
    assign, medoids, _ = reference(x, 3, "euclidean", 1e-5, 0, True, 2.0)
    assert red.indices.tolist() == medoids and red.assign.tolist() == assign
    assert red.extras["iterations"].tolist() == [0, 0]


def line(points: list[float]) -> torch.Tensor:
    """Points on the x axis of a plane, ``[1, N, 2]``."""
    return torch.tensor([[[p, 0.0] for p in points]])


def test_id_sort_off_keeps_the_last_iterations_clusters():
    """KKZ picks 13 (largest norm) then 0 (farthest from it). The one iteration assigns 5.8 to 0 (5.8 < 7.2), then
    the medoids move to 10 and 1, to which 5.8 is nearer 10 (4.2 < 4.8)."""
    x = line([0, 1, 5.8, 9, 10, 13])
    off = vtoken.reduce(x, 2, "centerclip", iter_limit=1, id_sort=False, stop="batch")
    on = vtoken.reduce(x, 2, "centerclip", iter_limit=1, id_sort=True, stop="batch")
    assert off.extras["slot_medoids"].tolist() == [[4, 1]]  # KKZ slots (13, 0) after their update
    assert off.indices.tolist() == on.indices.tolist() == [[1, 4]]
    # id_sort=False: the clusters the iteration formed (against 13 and 0), labelled by slot: [1, 1, 1, 0, 0, 0]
    assert official_outputs(off, False)[0] == [[1, 1, 1, 0, 0, 0]]
    assert off.assign.tolist() == [[0, 0, 0, 1, 1, 1]] and off.sizes.tolist() == [[3.0, 3.0]]
    # id_sort=True: re-assigned to the nearest final medoid, 5.8 joins 10
    assert on.assign.tolist() == [[0, 0, 1, 1, 1, 1]] and on.sizes.tolist() == [[2.0, 4.0]]
    # converged, both give the same clusters
    a = vtoken.reduce(x, 2, "centerclip", id_sort=False, stop="batch")
    b = vtoken.reduce(x, 2, "centerclip", stop="batch")
    assert torch.equal(a.assign, b.assign) and torch.equal(a.indices, b.indices)


def test_assignment_ties_follow_the_medoid_order():
    """(1, 0) is 4 from both KKZ medoids (5, 0) (slot 0, the largest norm) and (-3, 0) (slot 1). Without iterations,
    id_sort re-assigns it to the lower medoid index (token 0); id_sort=False keeps the lowest slot (token 2)."""
    x = line([-3, 1, 5])
    on = vtoken.reduce(x, 2, "centerclip", iter_limit=0)
    off = vtoken.reduce(x, 2, "centerclip", iter_limit=0, id_sort=False)
    assert on.indices.tolist() == off.indices.tolist() == [[0, 2]]
    assert on.assign.tolist() == [[0, 0, 1]]
    assert off.assign.tolist() == [[0, 1, 1]] and off.extras["slot_medoids"].tolist() == [[2, 0]]


def test_threshold_decides_when_to_stop():
    x = blobs(2, 30, 6, 4, seed=8, spread=1.5)
    never = vtoken.reduce(x, 5, "centerclip", threshold=0.0, iter_limit=7, stop="batch")
    once = vtoken.reduce(x, 5, "centerclip", threshold=1e9, iter_limit=7, stop="batch")
    assert never.extras["iterations"].tolist() == [7, 7], "a shift is never < 0"
    assert once.extras["iterations"].tolist() == [1, 1]
