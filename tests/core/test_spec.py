"""A method as a value (``vtoken.method``), the one dispatch (``vtoken.api.run_method``), knob docs and the
``vtoken methods NAME`` card."""

from __future__ import annotations

import dataclasses

import pytest
import torch

import vtoken
from tests.models.contract import assert_unpatched, hook_counts, logits
from tests.models.tiny import llava_inputs, tiny_llava
from vtoken.api import run_method
from vtoken.cli import main


def test_a_spec_is_frozen_validated_and_readable():
    spec = vtoken.method("visionzip", keep=64, contextual=10)
    assert repr(spec) == "vtoken.method('visionzip', keep=64, contextual=10)"
    assert spec == vtoken.method("visionzip", contextual=10, keep=64) and hash(spec) == hash(
        vtoken.method("visionzip", contextual=10, keep=64))
    with pytest.raises(dataclasses.FrozenInstanceError):
        spec.keep = 8  # type: ignore[misc]
    for kw, exc, match in (({"contextual": -1}, ValueError, "contextual must be >= 0"),
                           ({"bogus": 1}, TypeError, "unexpected argument 'bogus'"),
                           ({"cls_attn": torch.ones(1, 4)}, TypeError, "signals, not knobs"),
                           ({"keep": 0}, ValueError, "keep"), ({"keep": True}, TypeError, "keep")):
        with pytest.raises(exc, match=match):
            vtoken.method("visionzip", **kw)
    with pytest.raises(ValueError, match="unknown method"):
        vtoken.method("nosuch")


def test_reduce_takes_a_spec():
    x = torch.randn(2, 36, 8, generator=torch.Generator().manual_seed(0))
    ref = vtoken.reduce(x, 9, "divprune")
    for got in (vtoken.reduce(x, vtoken.method("divprune", keep=9)),
                vtoken.reduce(x, method=vtoken.method("divprune", keep=9)),
                vtoken.reduce(x, 9, vtoken.method("divprune"))):
        assert torch.equal(got.indices, ref.indices)
    with pytest.raises(ValueError, match="keep is given twice"):
        vtoken.reduce(x, 9, vtoken.method("divprune", keep=4))
    with pytest.raises(ValueError, match="given both"):
        vtoken.reduce(x, vtoken.method("random", keep=4, seed=1), seed=2)


def test_apply_takes_specs_and_lists_of_them():
    model = tiny_llava()
    inputs = llava_inputs(model)
    with vtoken.apply(model, "visionzip", keep=16, contextual=4) as handle:
        ref = logits(model, inputs)
    with vtoken.apply(model, vtoken.method("visionzip", keep=16, contextual=4)) as handle:
        assert torch.equal(logits(model, inputs), ref)
    with vtoken.apply(model, [vtoken.method("divprune", keep=8), vtoken.method("visionzip", keep=32)]) as handle:
        assert handle.methods == ["visionzip", "divprune"]
        logits(model, inputs)
        assert handle.last.mask.sum(1).tolist() == [8, 8]
    hooks = hook_counts(model)
    with pytest.raises(ValueError, match="contextual"):
        vtoken.apply(model, "visionzip", keep=16, contextual=-1)
    assert_unpatched(model, hooks)


def test_run_method_checks_and_clips_counts():
    info = vtoken.get_method("divprune")
    x = torch.randn(2, 10, 4)
    red = run_method(info, x, torch.tensor([3, 99]))
    assert red.mask.sum(1).tolist() == [3, 10]
    assert torch.equal(run_method(info, x, torch.tensor([10, 10])).tokens, x)  # identity
    with pytest.raises(TypeError, match="unexpected argument 'bogus'"):
        run_method(info, x, torch.tensor([3, 3]), knobs={"bogus": 1})
    with pytest.raises(ValueError, match="needs the signal 'cls_attn'"):
        run_method(vtoken.get_method("visionzip"), x, torch.tensor([3, 3]))


def test_every_knob_is_documented_for_the_card():
    for m in vtoken.methods():
        missing = sorted(set(m.defaults) - set(m.knob_docs))
        assert not missing, f"{m.name}: document {missing} in its Args: block"


def test_methods_card_and_summaries(capsys):
    assert main(["methods", "visionzip"]) == 0
    card = capsys.readouterr().out
    for text in ("VisionZip", "cls_attn (required)", "contextual:", ">= 0", "runs on  llava", "parity"):
        assert text in card
    assert main(["methods", "--json"]) == 0
    assert '"summary"' in capsys.readouterr().out
    assert main(["methods", "nosuch"]) == 2
    assert "unknown method 'nosuch'" in capsys.readouterr().err


def test_a_new_method_needs_no_model_code():
    """``norm`` lives in one file under methods/: every VLM family runs it, batched, through apply."""
    info = vtoken.get_method("norm")
    assert info.signals == () and info.optional_signals == ()
    x = torch.tensor([[[3.0, 0], [0, 1], [0, 5], [1, 1]]])
    assert vtoken.reduce(x, 2, "norm").indices.tolist() == [[0, 2]]
    model = tiny_llava()
    inputs = llava_inputs(model)
    with vtoken.apply(model, "norm", keep=8) as handle:
        logits(model, inputs)
        assert handle.last.mask.sum(1).tolist() == [8, 8]
