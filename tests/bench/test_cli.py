"""The command line's input handling: no hub access without ``--allow-download``, ``--out`` probed before any work,
resumable benches, method / budget checks before the model loads, non-zero exits on bad input, one-line errors, and
16-bit images scaled by their bit depth."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import vtoken.bench.run as run_mod
import vtoken.models
from vtoken import cli
from vtoken.bench import fashion
from vtoken.bench.images import load_image, open_rgb, to_rgb
from vtoken.bench.run import PARTIAL, hub_offline, load_model, resolve_model, run_bench, writable_dir
from vtoken.bench.show import output_path, show
from vtoken.cli import UsageError, main
from vtoken.training.micro_llava import build_processor, micro_llava_config

TINY = dict(vision_hidden=16, vision_layers=2, text_hidden=16, text_layers=2, heads=2)
FAST = ["--limit", "4", "--batch-size", "4", "--repeats", "1", "--overlays", "0", "--no-progress"]


@pytest.fixture(scope="module")
def tiny_path(tmp_path_factory) -> Path:
    from transformers import LlavaForConditionalGeneration

    path = tmp_path_factory.mktemp("tiny_llava_cli")
    torch.manual_seed(0)
    LlavaForConditionalGeneration(micro_llava_config(**TINY)).save_pretrained(path)
    build_processor().save_pretrained(path)
    return path


@pytest.fixture
def no_network(monkeypatch):
    """Any socket connection fails the test."""
    def refuse(*args, **kwargs):
        raise AssertionError(f"network access attempted: {args[1:]}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


@pytest.fixture
def no_model_load(monkeypatch):
    """Loading a model fails the test: the input must be rejected before."""
    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the input was checked")

    monkeypatch.setattr(run_mod, "load_model", refuse)
    monkeypatch.setattr("vtoken.bench.show.load_model", refuse)


@pytest.fixture
def collage(tmp_path) -> Path:
    path = tmp_path / "collage.png"
    Image.fromarray(fashion.load_default_test_set()[0].image).save(path)
    return path


def run_cli(argv: list[str], capsys) -> tuple[int, str]:
    """``main(argv)``'s exit status (argparse's ``SystemExit`` included) and stderr."""
    capsys.readouterr()
    try:
        code = main(argv)
    except SystemExit as exit_:
        code = exit_.code if isinstance(exit_.code, int) else 1
    return code, capsys.readouterr().err


def assert_one_line_error(err: str, *words: str) -> None:
    """``err`` is one ``vtoken: error: ...`` line (besides transformers' weight-loading progress bar)."""
    lines = [ln for ln in err.strip().splitlines() if not ln.strip("\r").startswith("Loading weights")]
    assert len(lines) == 1, err
    assert lines[0].startswith("vtoken: error: "), err
    assert "Traceback" not in err
    for w in words:
        assert w in lines[0], (w, err)


def table_rows(report: dict) -> list[dict]:
    return [{k: v for k, v in r.items() if k != "latency_ms" and k != "speedup"} for r in report["rows"]]


# ---------------------------------------------------------------------------------------------- 1: no downloads
def test_missing_model_is_a_local_error_without_network(tmp_path, capsys, no_network):
    for command in (["bench", *FAST, "--out", str(tmp_path / "out")],
                    ["show", str(tmp_path / "x.png"), "--method", "random", "--keep", "4", "--out",
                     str(tmp_path / "s.png")]):
        if command[0] == "show":
            Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "x.png")
        t0 = time.perf_counter()
        code, err = run_cli([*command, "--model", "no-such-org/no-such-model"], capsys)
        assert code == 2
        assert time.perf_counter() - t0 < 5
        assert_one_line_error(err, "--model no-such-org/no-such-model", "--allow-download")


def test_resolve_model(tmp_path, tiny_path):
    assert resolve_model(tiny_path) == (str(tiny_path), True)
    assert resolve_model(None)[1] is True
    with pytest.raises(FileNotFoundError, match="--allow-download"):
        resolve_model("org/name")
    assert resolve_model("org/name", allow_download=True) == ("org/name", False)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=r"no config\.json"):
        resolve_model(tmp_path / "empty", allow_download=True)
    (tmp_path / "file").write_text("x")
    with pytest.raises(FileNotFoundError, match="not a model folder"):
        resolve_model(tmp_path / "file")


def test_local_model_loads_offline_and_restores_the_environment(tiny_path, no_network, tmp_path):
    from huggingface_hub import constants

    before = (os.environ.get("HF_HUB_OFFLINE"), os.environ.get("TRANSFORMERS_OFFLINE"), constants.HF_HUB_OFFLINE)
    model, processor = load_model(tiny_path)
    assert type(model).__name__ == "LlavaForConditionalGeneration" and processor is not None
    assert (os.environ.get("HF_HUB_OFFLINE"), os.environ.get("TRANSFORMERS_OFFLINE"),
            constants.HF_HUB_OFFLINE) == before
    with hub_offline():
        assert os.environ["HF_HUB_OFFLINE"] == "1" and constants.HF_HUB_OFFLINE is True
    assert os.environ.get("HF_HUB_OFFLINE") == before[0]
    # a folder transformers cannot read is one clean error too
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text("{}")
    with pytest.raises(UsageError, match=r"--model .*broken: cannot load"):
        load_model(broken)


# ---------------------------------------------------------------------------------------------- 2: --out, resume
def test_writable_dir(tmp_path):
    assert writable_dir(tmp_path / "a" / "b") == tmp_path / "a" / "b"
    assert (tmp_path / "a" / "b").is_dir() and not list((tmp_path / "a" / "b").iterdir())
    (tmp_path / "file").write_text("x")
    for bad in ("/proc/vtoken-out", tmp_path / "file" / "sub", tmp_path / "file"):
        with pytest.raises(UsageError, match="--out"):
            writable_dir(bad)


def test_unwritable_out_fails_before_the_model_loads(tmp_path, capsys, no_model_load):
    (tmp_path / "file").write_text("x")
    for out in ("/proc/vtoken-out", str(tmp_path / "file" / "sub"), str(tmp_path / "file")):
        code, err = run_cli(["bench", *FAST, "--out", out], capsys)
        assert code == 2
        assert_one_line_error(err, f"--out {out}")


def test_bench_resumes_finished_configurations(tiny_path, tmp_path, monkeypatch):
    out = tmp_path / "bench"
    kw = dict(methods=["random", "divprune"], keeps=["all", "0.5"], limit=4, batch_size=4, repeats=1, overlays=2,
              progress=False, log=None, out_dir=out)
    first = run_bench(tiny_path, **kw)
    records = [json.loads(line) for line in (out / PARTIAL).read_text().splitlines()]
    assert [(r["key"]["method"], r["key"]["keep"]) for r in records] == [("full", "all"), ("random", "0.5"),
                                                                        ("divprune", "0.5")]
    assert {r["key"]["limit"] for r in records} == {4} and all(r["key"]["model"] for r in records)
    results = (out / "results.json").read_text()
    overlay = (out / "overlays" / "keep_0.5.png").read_bytes()
    for name in ("results.json", "results.csv", "results.md", "predictions.json", "overlays/keep_0.5.png"):
        (out / name).unlink()

    calls: list[int] = []
    real_answer = run_mod.answer
    monkeypatch.setattr(run_mod, "answer", lambda *a, **k: calls.append(1) or real_answer(*a, **k))
    again = run_bench(tiny_path, **kw)  # everything is in partial.jsonl: nothing recomputed
    assert calls == []
    assert table_rows(again) == table_rows(first)
    assert json.loads((out / "results.json").read_text())["rows"] == json.loads(results)["rows"]
    assert (out / "overlays" / "keep_0.5.png").read_bytes() == overlay
    for name in ("predictions.json", "results.csv", "results.md", "pareto.png"):
        assert (out / name).is_file()

    one = {**kw, "methods": ["random"], "overlays": 0}
    run_bench(tiny_path, **{**one, "overlays": 2, "keeps": ["0.5", "0.25"]})  # a new budget: only it runs
    assert len(calls) == 1
    run_bench(tiny_path, **{**one, "limit": 3})  # other settings never mix: recomputed
    assert len(calls) == 3
    run_bench(tiny_path, **{**one, "limit": 3, "resume": False})  # fresh: recomputed, partial.jsonl restarted
    assert len(calls) == 5
    assert len((out / PARTIAL).read_text().splitlines()) == 2


def test_interrupted_bench_keeps_finished_configurations(tiny_path, tmp_path, monkeypatch, capsys):
    out = tmp_path / "bench"
    argv = ["bench", "--model", str(tiny_path), "--methods", "random", "divprune", "--keep", "0.5", *FAST,
            "--out", str(out)]
    real_apply = vtoken.models.apply

    def interrupt_divprune(model, name, **kw):
        if name == "divprune":
            raise KeyboardInterrupt
        return real_apply(model, name, **kw)

    monkeypatch.setattr(vtoken.models, "apply", interrupt_divprune)
    code, err = run_cli(argv, capsys)
    assert code == 130
    assert_one_line_error(err, "interrupted", PARTIAL)
    assert not (out / "results.json").exists()
    assert [json.loads(line)["key"]["method"] for line in (out / PARTIAL).read_text().splitlines()] == [
        "full", "random"]

    monkeypatch.setattr(vtoken.models, "apply", real_apply)
    calls: list[int] = []
    real_answer = run_mod.answer
    monkeypatch.setattr(run_mod, "answer", lambda *a, **k: calls.append(1) or real_answer(*a, **k))
    code, _ = run_cli(argv, capsys)
    assert code == 0 and len(calls) == 1  # only divprune ran
    rows = json.loads((out / "results.json").read_text())["rows"]
    assert [(r["method"], r["error"]) for r in rows] == [("full", None), ("random", None), ("divprune", None)]
    code, _ = run_cli([*argv, "--fresh"], capsys)
    assert code == 0 and len(calls) == 4


# ---------------------------------------------------------------------------------------------- 3, 4: checks, exits
@pytest.mark.parametrize("argv, words", [
    (["bench", "--methods", "nosuch"], ["--methods", "unknown method 'nosuch'", "visionzip"]),
    (["bench", "--methods", "random", "nosuch"], ["--methods", "nosuch"]),
    (["bench", "--keep", "0"], ["--keep", "'0'"]),
    (["bench", "--keep", "1.5"], ["--keep", "'1.5'"]),
    (["bench", "--keep", "abc"], ["--keep"]),
    (["bench", "--limit", "0"], ["--limit", ">= 1"]),
    (["bench", "--batch-size", "x"], ["--batch-size"]),
    (["bench", "--repeats", "-1"], ["--repeats"]),
    (["bench", "--overlays", "-1"], ["--overlays"]),
    (["bench", "--device", "nosuch"], ["--device 'nosuch'", "cpu"]),
    (["bench", "--device", "cuda:7"], ["--device cuda:7", "CUDA device"]),
    (["train-micro", "--device", "nosuch"], ["--device"]),
    (["demo", "--methods", "nosuch"], ["--methods", "unknown method"]),
    (["demo", "--keep", "0"], ["--keep", "'0'"]),
    (["demo", "--keep", "all"], ["--keep", "'all'"]),
    (["demo", "--methods", "token_unshuffle"], ["--methods", "token_unshuffle", "keep"]),
    (["demo", "--image", "no-such-image.png"], ["--image", "no-such-image.png"]),
    (["show", "x.png", "--method", "nosuch", "--keep", "4"], ["--method", "nosuch"]),
    (["show", "x.png", "--method", "random", "--keep", "0"], ["--keep"]),
    (["show", "x.png", "--method", "random", "--keep", "2.0"], ["--keep"]),
    (["show", "x.png", "--method", "random"], ["--keep"]),
    (["show", "no-such-image.png", "--method", "random", "--keep", "4"], ["IMAGE", "no-such-image.png"]),
    (["nosuch"], ["invalid choice"]),
    ([], ["command"]),
])
def test_bad_input_is_one_line_and_exit_2_before_any_model_loads(argv, words, capsys, no_model_load,
                                                                 monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "x.png")
    code, err = run_cli(argv, capsys)
    assert code == 2
    assert_one_line_error(err, *words)


def test_library_checks_before_loading(no_model_load, tmp_path):
    with pytest.raises(UsageError, match="unknown method 'nope'"):
        run_bench(None, methods=["nope"], out_dir=None, progress=False, log=None)
    with pytest.raises(ValueError, match="keep"):
        run_bench(None, methods=["random"], keeps=["0"], out_dir=None, progress=False, log=None)
    with pytest.raises(UsageError, match="--batch-size"):
        run_bench(None, batch_size=0, out_dir=None, progress=False, log=None)
    with pytest.raises(UsageError, match="--out"):
        run_bench(None, out_dir="/proc/vtoken-out", progress=False, log=None)


def test_bench_with_no_runnable_method_exits_2_before_answering(tiny_path, tmp_path, capsys, monkeypatch):
    from vtoken.methods import all_methods
    from vtoken.models import find_adapter

    model, _ = load_model(tiny_path)
    adapter = find_adapter(model)
    cannot = [m.name for m in all_methods() if adapter.unsupported(m) is not None][:2]
    assert cannot, "the llava adapter runs every method: pick another unsupported case"
    monkeypatch.setattr(run_mod, "answer", lambda *a, **k: pytest.fail("answered questions"))
    code, err = run_cli(["bench", "--model", str(tiny_path), "--methods", *cannot, *FAST, "--out",
                         str(tmp_path / "o")], capsys)
    assert code == 2
    assert_one_line_error(err, "--methods", "none of them can run", *cannot)


def test_bench_where_every_method_fails_exits_1(tiny_path, tmp_path, capsys, monkeypatch):
    def fail(model, name, **kw):
        raise ValueError(f"{name} cannot run here")

    monkeypatch.setattr(vtoken.models, "apply", fail)
    code, err = run_cli(["bench", "--model", str(tiny_path), "--methods", "random", "--keep", "0.5", *FAST,
                         "--out", str(tmp_path / "o")], capsys)
    assert code == 1
    assert_one_line_error(err, "random@0.5", "cannot run here")
    assert (tmp_path / "o" / "results.json").is_file()  # the report still says why


def test_demo_exit_codes(tmp_path, capsys, monkeypatch):
    code, _ = run_cli(["demo", "--methods", "random", "uniform", "--keep", "16", "--out", str(tmp_path / "d")],
                      capsys)
    assert code == 0 and (tmp_path / "d" / "overlays.png").is_file()
    (tmp_path / "file").write_text("x")
    code, err = run_cli(["demo", "--methods", "random", "--out", str(tmp_path / "file" / "d")], capsys)
    assert code == 2
    assert_one_line_error(err, "--out")

    def fail(*a, **k):
        raise ValueError("no budget fits")

    monkeypatch.setattr("vtoken.bench.demo.reduce", fail)
    code, err = run_cli(["demo", "--methods", "random", "--out", ""], capsys)
    assert code == 1
    assert_one_line_error(err, "no method ran", "no budget fits")


# ---------------------------------------------------------------------------------------------- 5: errors, bugs
def test_bugs_keep_their_traceback(monkeypatch, capsys):
    def bug(*a, **k):
        raise ValueError("a bug, not bad input")

    monkeypatch.setattr(run_mod, "run_bench", bug)
    with pytest.raises(ValueError, match="a bug"):
        main(["bench", *FAST])


def test_vtoken_debug_reraises_input_errors(monkeypatch, no_model_load, tmp_path):
    monkeypatch.setenv("VTOKEN_DEBUG", "1")
    with pytest.raises(FileNotFoundError, match="--allow-download"):
        main(["bench", "--model", "no-such-model", *FAST, "--out", str(tmp_path / "o")])
    with pytest.raises(UsageError, match="--out"):
        main(["bench", *FAST, "--out", "/proc/vtoken-out"])


def test_user_input_names_the_argument():
    with pytest.raises(UsageError, match=r"^--x: bad$"), cli.user_input("--x"):
        raise ValueError("bad")
    with pytest.raises(UsageError, match=r"^--x 3: bad$"), cli.user_input("--x"):
        raise ValueError("--x 3: bad")
    with pytest.raises(KeyError), cli.user_input("--x"):
        raise KeyError("not input checking")


def test_real_process_prints_one_line_and_no_traceback(tmp_path):
    """Through ``python -m vtoken.cli`` (how torchrun runs it): the UsageError the library raises is the class main
    catches, so the process prints one line, no traceback."""
    env = {k: v for k, v in os.environ.items() if k != "VTOKEN_DEBUG"}
    proc = subprocess.run([sys.executable, "-m", "vtoken.cli", "bench", *FAST, "--out", "/proc/vtoken-out"],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert_one_line_error(proc.stderr, "--out /proc/vtoken-out")
    assert proc.stdout == ""


# ---------------------------------------------------------------------------------------------- 6: images, show --out
def _gray8(seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (40, 56), dtype=np.uint8)


def test_16_bit_png_is_scaled_by_its_bit_depth(tmp_path):
    g8 = _gray8()
    noise = np.random.default_rng(1).integers(0, 257, g8.shape)
    g16 = (g8.astype(np.int64) * 257 + noise).clip(0, 65535).astype(np.uint16)  # 8-bit value v -> [257 v, 257 v + 256]
    Image.fromarray(g16).save(tmp_path / "g16.png")
    Image.fromarray(g8).save(tmp_path / "g8.png")
    assert Image.open(tmp_path / "g16.png").mode.startswith("I")
    a = np.asarray(open_rgb(tmp_path / "g16.png")).astype(int)
    b = np.asarray(open_rgb(tmp_path / "g8.png")).astype(int)
    assert a.shape == b.shape == (*g8.shape, 3)
    assert np.abs(a - b).max() <= 1
    side = min(g8.shape)  # load_image's square crop, at its own size (no resampling)
    assert np.abs(load_image(tmp_path / "g16.png", side).astype(int)
                  - load_image(tmp_path / "g8.png", side).astype(int)).max() <= 1


@pytest.mark.parametrize("kind", ["I;16B", "I", "I-wide", "F", "F-wide", "L"])
def test_to_rgb_modes(kind):
    g8 = _gray8(2)
    if kind == "I;16B":
        im = Image.fromarray((g8.astype(np.uint16) * 257).astype(">u2"))
        assert im.mode == "I;16B"
    elif kind == "I":
        im = Image.fromarray(g8.astype(np.int32) * 257)
    elif kind == "I-wide":  # 32-bit data: the int32 range
        im = Image.fromarray((g8.astype(np.int64) * ((2**31 - 1) // 255)).astype(np.int32))
    elif kind == "F":
        im = Image.fromarray(g8.astype(np.float32) / 255)
    elif kind == "F-wide":  # not a [0, 1] ratio: stretched over its own range
        im = Image.fromarray(g8.astype(np.float32) * 10 + 5)
        g8 = ((g8.astype(float) - g8.min()) * 255 / (g8.max() - g8.min())).round().astype(np.uint8)
    else:
        im = Image.fromarray(g8)
    out = to_rgb(im)
    assert out.mode == "RGB"
    assert np.abs(np.asarray(out).astype(int) - g8[..., None].astype(int)).max() <= 1, kind


def test_open_rgb_rejects_non_images(tmp_path):
    (tmp_path / "a.png").write_text("not a png")
    with pytest.raises(ValueError, match=r"a\.png: not an image"):
        open_rgb(tmp_path / "a.png")


def test_show_out_is_checked_before_the_model_loads(tmp_path, collage, capsys, no_model_load, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "folder").mkdir()
    (tmp_path / "file").write_text("x")
    for out, words in ((tmp_path / "result", ["no file extension", ".png"]),
                       (tmp_path / "result.txt", ["unsupported extension '.txt'", ".png"]),
                       (tmp_path / "folder", ["a folder", ".png"]),
                       (tmp_path / "file" / "x.png", ["a file, not a folder"]),
                       (Path("/proc/vtoken/x.png"), ["cannot write"])):
        code, err = run_cli(["show", str(collage), "--method", "random", "--keep", "4", "--out", str(out)], capsys)
        assert code == 2, out
        assert_one_line_error(err, f"--out {out}", *words)
    assert output_path(tmp_path / "r.JPG", collage, "random", 4) == tmp_path / "r.JPG"
    assert output_path(None, collage, "random", 0.5).name == "collage_random_0.5.png"


def test_show_16_bit_image_matches_8_bit(tiny_path, tmp_path, capsys):
    g8 = np.asarray(Image.fromarray(fashion.load_default_test_set()[0].image).convert("L"))
    Image.fromarray(g8).save(tmp_path / "g8.png")
    Image.fromarray(g8.astype(np.uint16) * 257).save(tmp_path / "g16.png")
    outs = []
    for name in ("g8", "g16"):
        outs.append(tmp_path / f"{name}_show.png")
        assert main(["show", str(tmp_path / f"{name}.png"), "--method", "random", "--keep", "16", "--model",
                     str(tiny_path), "--out", str(outs[-1])]) == 0
    a, b = (np.asarray(Image.open(p)).astype(int)[58:] for p in outs)  # below the caption
    assert np.abs(a - b).max() <= 1
    assert a.mean() < 200  # a Fashion collage is mostly dark, not white


def test_show_method_the_model_cannot_run(tiny_path, collage, tmp_path):
    from vtoken.methods import all_methods
    from vtoken.models import find_adapter

    model, _ = load_model(tiny_path)
    cannot = next(m.name for m in all_methods() if m.needs_keep and find_adapter(model).unsupported(m))
    with pytest.raises(UsageError, match=f"--method {cannot}: cannot run on LlavaForConditionalGeneration"):
        show(collage, cannot, 4, model_path=tiny_path, out=tmp_path / "o.png")
