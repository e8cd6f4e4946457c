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


def test_every_default_says_where_it_comes_from():
    from vtoken.methods.registry import SOURCE_KINDS, register

    for m in vtoken.methods():
        assert set(m.knob_sources) == set(m.defaults), m.name
        assert all(v.startswith(SOURCE_KINDS) for v in m.knob_sources.values()), m.name
        assert set(m.main_knobs) <= set(m.defaults), m.name
    assert vtoken.get_method("vtc_cls").knob_sources["start_layer"].startswith("official scripts")

    def fn(tokens: torch.Tensor, counts: torch.Tensor, *, mask: torch.Tensor | None = None, alpha: float = 0.5,
           beta: int = 2) -> vtoken.Reduction:
        raise AssertionError

    common = {"paper": "-", "venue": "-", "repo": None, "stage": "pre_llm", "kind": "prune"}
    with pytest.raises(ValueError, match=r"no source for \['alpha', 'beta'\]"):
        register("no_sources", **common)(fn)
    with pytest.raises(ValueError, match="must start with one of"):
        register("bad_source", knob_sources={"*": "my guess"}, **common)(fn)
    with pytest.raises(ValueError, match=r"knob_sources names \['gamma'\]"):
        register("stray_source", knob_sources={"*": "vtoken: x", "gamma": "paper: y"}, **common)(fn)
    assert {"no_sources", "bad_source", "stray_source"}.isdisjoint(m.name for m in vtoken.methods())


def test_vtc_cls_starts_two_thirds_deep_as_the_official_scripts():
    """The official eval scripts pass ``--layer 16`` on CLIP-L's 24 layers; the default is ``2L // 3`` at any depth,
    and at most the last layer the slice reaches on a shallow tower."""
    tokens = torch.zeros(1, 6, 4)
    for depth, first in ((24, 16), (3, 1)):
        layers = torch.zeros(1, depth, 6)
        layers[:, first, 5] = 1.0       # the first summed layer decides ...
        layers[:, first - 1, 0] = 5.0   # ... the layer before it does not
        red = vtoken.reduce(tokens, 1, "vtc_cls", cls_attn_layers=layers)
        assert red.indices.tolist() == [[5]], depth


def test_methods_card_and_summaries(capsys):
    assert main(["methods", "visionzip"]) == 0
    card = capsys.readouterr().out
    for text in ("VisionZip", "cls_attn (required)", "contextual:", ">= 0", "runs on  llava", "parity"):
        assert text in card
    assert "important knobs" in card and "default from paper: 10 contextual tokens for 64 kept" in card
    assert main(["methods", "--json"]) == 0
    assert '"summary"' in capsys.readouterr().out
    assert main(["methods", "nosuch"]) == 2
    assert "unknown method 'nosuch'" in capsys.readouterr().err


def test_method_docs_are_current_and_the_readme_links_every_card():
    from pathlib import Path

    from vtoken.cli import methods_markdown

    root = Path(__file__).resolve().parents[2]
    assert (root / "docs" / "methods.md").read_text() == methods_markdown(), (
        "docs/methods.md is stale: run `vtoken methods --markdown > docs/methods.md`")
    readme = (root / "README.md").read_text()
    for m in vtoken.methods():
        assert f"[{m.name}](docs/methods.md#{m.name})" in readme, f"README's method table lacks {m.name}"
    from vtoken.cli import support_matrix

    assert support_matrix() in readme, "README's support matrix is stale: paste `vtoken methods --matrix`"


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


def test_llm_schedule_knobs_are_declared_once_and_refused_by_reduce():
    """A schedule knob lives in its LLMSchedule only: the registry reads it from there, apply places it, and reduce
    (one step on given tokens) refuses it instead of ignoring it."""
    import inspect

    from vtoken.methods.registry import LLMSchedule, register
    from vtoken.models.pipeline import build_steps

    for m in vtoken.methods():
        if m.schedule is not None:
            step = set(inspect.signature(m.fn).parameters)
            assert not step & m.schedule_knobs, f"{m.name}: {sorted(step & m.schedule_knobs)} declared twice"
            assert m.schedule_knobs <= set(m.defaults) and m.schedule_knobs <= set(m.knob_docs)
    x, attn = torch.randn(1, 10, 4), torch.rand(1, 10)
    with pytest.raises(TypeError, match=r"'layer' is a schedule knob of the llm-stage method 'fastv'.*vtoken.apply"):
        vtoken.reduce(x, 4, "fastv", llm_attn=attn, layer=9)
    with pytest.raises(TypeError, match=r"schedule knob"):
        vtoken.reduce(x, vtoken.method("pdrop", keep=4, layers=(4, 8)), llm_attn=attn)
    assert build_steps("fastv", 4, {"layer": 9})[0].kwargs == {"layer": 9}
    assert vtoken.get_method("fastv").knob_types["layer"] is int

    def layers(depth: int, layer: int = 1) -> list[int]:
        return [layer]

    def counts(n, keep, images):
        return [n]

    with pytest.raises(ValueError, match=r"\['layer'\] are declared by its schedule and again by the step"):
        @register("twice_declared", paper="-", venue="-", repo=None, stage="llm", kind="prune",
                  schedule=LLMSchedule(layers, counts))
        def twice(tokens, counts, *, mask=None, layer: int = 1):
            return None


def test_signal_spec_is_a_typed_value_checked_at_registration():
    from vtoken.methods import SignalSpec
    from vtoken.methods.registry import register

    spec = vtoken.get_method("hiprune").signal_spec["attn_received_layers"]
    assert isinstance(spec, SignalSpec) and spec.layers == (8, -2) and spec.feature_layer
    assert spec.for_family("qwen2_vl").layers == (15, -1) and spec.for_family("llava").layers == (8, -2)
    assert SignalSpec(layer=-2) == {"layer": -2} and "SignalSpec(layer=-2)" == repr(SignalSpec(layer=-2))
    with pytest.raises(TypeError):
        SignalSpec(layr=-2)
    for bad in ({"layer": "middle"}, {"heads": "sum"}, {"ref_depth": 0}, {"layers": (1.5,)}):
        with pytest.raises(ValueError, match="SignalSpec"):
            SignalSpec(**bad)

    def fn(tokens, counts, *, mask=None, cls_attn=None):
        return None

    with pytest.raises(TypeError, match=r"signal_spec\['cls_attn'\]: unknown signal spec key\(s\) \['source'\]"):
        register("typo_spec", paper="-", venue="-", repo=None, stage="pre_llm", kind="prune", signals=("cls_attn",),
                 signal_spec={"cls_attn": {"layer": -2, "source": "qk"}})(fn)
    with pytest.raises(ValueError, match="not among its signals"):
        register("stray_spec", paper="-", venue="-", repo=None, stage="pre_llm", kind="prune", signals=("cls_attn",),
                 signal_spec={"keys": SignalSpec(layer=-2)})(fn)
    with pytest.raises(ValueError, match="without_cls"):
        register("bad_fallback", paper="-", venue="-", repo=None, stage="pre_llm", kind="prune", signals=("keys",),
                 signal_spec={"keys": SignalSpec(without_cls="received")})(fn)
    assert "typo_spec" not in {m.name for m in vtoken.methods()}


def test_models_name_no_method_and_specs_name_real_families():
    """Adapters implement the mechanisms (a [CLS] fallback, a family's own signal layers, LLaVA's select layer); the
    methods declare them. No string constant in models/ code is a method name."""
    import ast
    from pathlib import Path

    from vtoken.models import ADAPTERS

    names = {m.name for m in vtoken.methods()}
    root = Path(vtoken.__file__).parent / "models"
    for path in root.glob("*.py"):
        tree = ast.parse(path.read_text())
        docs = {id(n.body[0].value) for n in ast.walk(tree) if isinstance(n, (ast.Module, ast.ClassDef,
                ast.FunctionDef)) and n.body and isinstance(n.body[0], ast.Expr)}
        attrs = {id(a) for n in ast.walk(tree) if isinstance(n, ast.Call) and isinstance(n.func, ast.Name)
                 and n.func.id in ("hasattr", "getattr") for a in n.args}  # module attributes such as lm.norm
        found = {n.value for n in ast.walk(tree) if isinstance(n, ast.Constant) and id(n) not in docs | attrs
                 and n.value in names}
        assert not found, f"{path.name} names methods {sorted(found)}"
    families = {a.family for a in ADAPTERS}
    for m in vtoken.methods():
        for spec in m.signal_spec.values():
            assert set(spec.families) <= families, (m.name, set(spec.families) - families)


def test_cls_free_towers_run_only_the_declared_fallbacks():
    from vtoken.models.idefics3 import Idefics3Adapter
    from vtoken.models.llava_onevision import LlavaOnevisionAdapter
    from vtoken.models.qwen2_vl import Qwen2VLAdapter

    for adapter in (Idefics3Adapter, LlavaOnevisionAdapter, Qwen2VLAdapter):
        assert not adapter.has_cls
        assert adapter.unsupported(vtoken.get_method("visionzip")) is None  # declares without_cls="received"
        why = adapter.unsupported(vtoken.get_method("hired"))
        assert why is not None and "no CLS token" in why and "'hired' declares no substitute" in why

