"""The functional core: keep resolution, validation errors, result construction."""

import pytest
import torch

import vtoken
from vtoken.core import reduction_from_indices, reduction_from_merge, resolve_keep, topk_indices


@pytest.mark.parametrize(("keep", "n", "expected"), [
    (64, 576, 64), (1000, 576, 576), (1, 5, 1), (0.5, 5, 3), (0.25, 10, 3), (0.11, 576, 63), (1.0, 7, 7),
    (0.01, 5, 1), (0.5, 1, 1),
])
def test_resolve_keep(keep, n, expected):
    assert resolve_keep(keep, n).tolist() == [expected]


def test_resolve_keep_per_sample():
    assert resolve_keep(0.5, torch.tensor([4, 5, 1])).tolist() == [2, 3, 1]
    assert resolve_keep(3, torch.tensor([4, 2])).tolist() == [3, 2]


@pytest.mark.parametrize("keep", [0, -3, 0.0, 1.5, float("nan"), float("inf"), -0.2])
def test_bad_keep_names_keep(keep):
    with pytest.raises(ValueError, match="keep"):
        vtoken.reduce(torch.randn(1, 8, 4), keep, "random")


@pytest.mark.parametrize("keep", ["64", None, True, [3]])
def test_keep_wrong_type(keep):
    with pytest.raises((TypeError, ValueError), match="keep"):
        vtoken.reduce(torch.randn(1, 8, 4), keep, "random")


def test_bad_tokens():
    with pytest.raises(ValueError, match=r"tokens.*\[B, N, D\].*tokens\[None\]"):
        vtoken.reduce(torch.randn(8, 4), 2, "random")
    with pytest.raises(TypeError, match="tokens"):
        vtoken.reduce([[1.0]], 2, "random")
    with pytest.raises(TypeError, match="floating"):
        vtoken.reduce(torch.ones(1, 8, 4, dtype=torch.long), 2, "random")
    bad = torch.randn(1, 8, 4)
    bad[0, 3, 1] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        vtoken.reduce(bad, 2, "random")
    bad[0, 3, 1] = float("inf")
    with pytest.raises(ValueError, match="inf"):
        vtoken.reduce(bad, 2, "random")


def test_bad_mask():
    x = torch.randn(2, 8, 4)
    with pytest.raises(ValueError, match="mask"):
        vtoken.reduce(x, 2, "random", mask=torch.ones(2, 7, dtype=torch.bool))
    with pytest.raises(ValueError, match="mask"):
        vtoken.reduce(x, 2, "random", mask=torch.zeros(2, 8, dtype=torch.bool))


def test_unknown_method_lists_known():
    with pytest.raises(ValueError, match=r"unknown method 'nope'.*random"):
        vtoken.reduce(torch.randn(1, 8, 4), 2, "nope")


def test_unknown_argument_named():
    with pytest.raises(TypeError, match="'bogus'"):
        vtoken.reduce(torch.randn(1, 8, 4), 2, "random", bogus=1)


def test_keep_all_is_identity():
    x = torch.randn(2, 9, 4)
    red = vtoken.reduce(x, 100, "random")
    assert torch.equal(red.tokens, x)
    assert red.indices.tolist() == [list(range(9))] * 2
    assert bool(red.mask.all())


def test_reduction_from_indices_pads_and_sorts():
    x = torch.arange(2 * 5 * 1, dtype=torch.float32).reshape(2, 5, 1)
    red = reduction_from_indices(x, torch.tensor([[4, 0, 2], [3, 1, 0]]), counts=torch.tensor([3, 2]))
    assert red.indices.tolist() == [[0, 2, 4], [1, 3, -1]]
    assert red.mask.tolist() == [[True, True, True], [True, True, False]]
    assert red.tokens[:, :, 0].tolist() == [[0, 2, 4], [6, 8, 0]]


def test_reduction_from_merge_remaps_assign():
    out = torch.tensor([[[10.0], [20.0], [30.0]]])
    rep = torch.tensor([[5, 1, 3]])
    assign = torch.tensor([[1, 1, 2, 2, 0, 0]])
    red = reduction_from_merge(out, rep, assign, sizes=torch.tensor([[2.0, 2.0, 2.0]]))
    assert red.indices.tolist() == [[1, 3, 5]]
    assert red.tokens[0, :, 0].tolist() == [20.0, 30.0, 10.0]
    assert red.assign.tolist() == [[0, 0, 1, 1, 2, 2]]


def test_topk_ties_lowest_index():
    s = torch.tensor([[1.0, 3.0, 3.0, 0.0, 3.0]])
    assert topk_indices(s, torch.tensor([2])).tolist() == [[1, 2]]


def test_missing_signal_named():
    needs = [m for m in vtoken.methods() if m.signals and m.signals != ("grid",)]
    if not needs:
        pytest.skip("no method with a required signal is registered")
    m = needs[0]
    with pytest.raises(ValueError, match=f"{m.name}.*{m.signals[0]}|{m.signals[0]}.*{m.name}"):
        vtoken.reduce(torch.randn(1, 16, 8), 4, m.name)


def test_signal_wrong_shape_named():
    needs = [m for m in vtoken.methods() if "cls_attn" in m.signals]
    if not needs:
        pytest.skip("no method needs cls_attn")
    with pytest.raises(ValueError, match="cls_attn"):
        vtoken.reduce(torch.randn(1, 16, 8), 4, needs[0].name, cls_attn=torch.rand(1, 15))
