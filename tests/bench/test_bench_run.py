"""``vtoken bench`` / ``vtoken show``: the eval loop, the metrics, the report files and the distributed merge."""

import csv
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from vtoken.bench import fashion
from vtoken.bench.report import markdown_table, pareto_front
from vtoken.bench.run import keep_label, parse_keep, run_bench
from vtoken.cli import main
from vtoken.training.micro_llava import build_processor, micro_llava_config

TINY = dict(vision_hidden=16, vision_layers=2, text_hidden=16, text_layers=2, heads=2)


@pytest.fixture(scope="module")
def tiny_path(tmp_path_factory):
    from transformers import LlavaForConditionalGeneration

    path = tmp_path_factory.mktemp("tiny_llava")
    torch.manual_seed(0)
    LlavaForConditionalGeneration(micro_llava_config(**TINY)).save_pretrained(path)
    build_processor().save_pretrained(path)
    return path


def test_parse_keep():
    assert parse_keep("all") is None
    assert parse_keep("64") == 64
    assert parse_keep("0.25") == 0.25
    assert parse_keep("11%") == pytest.approx(0.11)
    for bad in ("0", "-3", "1.5", "abc", "0%"):
        with pytest.raises(ValueError, match="keep"):
            parse_keep(bad)
    assert keep_label(None) == "all" and keep_label(0.5) == "0.5" and keep_label(64) == "64"


def test_pareto_front():
    pts = [(10, 0.5), (20, 0.7), (15, 0.4), (30, 0.7), (5, 0.1), (40, 0.9)]
    assert pareto_front(pts) == [4, 0, 1, 5]


def test_bench_reports_every_metric(tiny_path, tmp_path):
    out = tmp_path / "bench"
    rep = run_bench(tiny_path, methods=["visionzip", "random"], keeps=["0.5", "0.11"], limit=8, batch_size=4,
                    repeats=1, out_dir=out, progress=False, log=None, overlays=2)
    rows = rep["rows"]
    assert [(r["method"], r["keep"]) for r in rows] == [("full", "all"), ("visionzip", "0.5"), ("visionzip", "0.11"),
                                                         ("random", "0.5"), ("random", "0.11")]
    full = rows[0]
    assert full["relative"] == pytest.approx(1.0) or full["accuracy"]["overall"] == 0
    assert full["speedup"] == pytest.approx(1.0)
    assert full["visual_tokens"] == 144
    by = {(r["method"], r["keep"]): r for r in rows}
    assert by[("visionzip", "0.5")]["visual_tokens"] == 72
    assert by[("random", "0.11")]["visual_tokens"] == 16
    for r in rows[1:]:
        assert r["error"] is None
        assert r["gflops"] < full["gflops"] and r["kv_bytes"] < full["kv_bytes"]
        assert set(r["accuracy"]) == {*rep["qtypes"], "overall"}
        assert r["latency_ms"] > 0
    for name in ("results.json", "predictions.json", "results.csv", "results.md", "pareto.png",
                 "overlays/keep_0.5.png", "overlays/keep_0.11.png"):
        assert (out / name).is_file(), name
    assert Image.open(out / "pareto.png").size[0] > 500
    with (out / "results.csv").open() as f:
        table = list(csv.DictReader(f))
    assert len(table) == 5 and float(table[2]["visual_tokens"]) == 16
    preds = json.loads((out / "predictions.json").read_text())
    assert len(preds["full@all"]) == 8
    md = (out / "results.md").read_text()
    assert md == markdown_table(json.loads((out / "results.json").read_text()))
    assert "visionzip" in md and "| method |" in md
    # accuracy is recomputed from the predictions
    exs = fashion.load_default_test_set()[:8]
    assert fashion.accuracy_by_type(preds["random@0.11"], exs) == by[("random", "0.11")]["accuracy"]


def test_bench_unknown_method_and_bad_args(tiny_path):
    with pytest.raises(ValueError, match="unknown method"):
        run_bench(tiny_path, methods=["nope"], limit=2, out_dir=None, progress=False, log=None)
    with pytest.raises(ValueError, match="limit"):
        run_bench(tiny_path, methods=["random"], limit=0, out_dir=None, progress=False, log=None)


def test_show_writes_overlay(tiny_path, tmp_path):
    img = tmp_path / "collage.png"
    Image.fromarray(fashion.load_default_test_set()[0].image).save(img)
    out = tmp_path / "show.png"
    assert main(["show", str(img), "--method", "visionzip", "--keep", "16", "--model", str(tiny_path),
                 "--out", str(out)]) == 0
    im = np.asarray(Image.open(out))
    assert im.shape[1] > 2 * 84 * 4


def test_distributed_merge_equals_single_process(tiny_path, tmp_path):
    """torchrun with 2 gloo processes: merged predictions and accuracies equal a single-process run."""
    args = ["bench", "--model", str(tiny_path), "--methods", "divprune", "--keep", "0.25", "--limit", "10",
            "--batch-size", "3", "--repeats", "1", "--overlays", "0", "--no-progress"]
    single = tmp_path / "single"
    assert main([*args, "--out", str(single)]) == 0
    multi = tmp_path / "multi"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           "-m", "vtoken.cli", *args, "--out", str(multi)], env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    a = json.loads((single / "predictions.json").read_text())
    b = json.loads((multi / "predictions.json").read_text())
    assert a == b
    ra = json.loads((single / "results.json").read_text())
    rb = json.loads((multi / "results.json").read_text())
    assert rb["world_size"] == 2
    assert [r["accuracy"] for r in ra["rows"]] == [r["accuracy"] for r in rb["rows"]]
    # resume under torchrun: rank 0 decides what is done and tells the other ranks; only rank 0 appends
    at = args.index("--keep") + 1
    more = [*args[:at], "0.25", "0.5", *args[at + 1:]]
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           "-m", "vtoken.cli", *more, "--out", str(multi)], env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "resuming, 2 of 3 configurations" in proc.stdout
    partial = [json.loads(line)["key"] for line in (multi / "partial.jsonl").read_text().splitlines()]
    assert [(k["method"], k["keep"]) for k in partial] == [("full", "all"), ("divprune", "0.25"), ("divprune", "0.5")]
    c = json.loads((multi / "predictions.json").read_text())
    assert {k: c[k] for k in a} == a and len(c["divprune@0.5"]) == 10
