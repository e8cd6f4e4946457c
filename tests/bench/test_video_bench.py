"""``vtoken bench --suite video``: rows, per-step kept counts, cost, report files and strips, resume, the CLI, and the
data-parallel merge equal to a single process. A tiny random micro video VLM keeps it fast (accuracy is not the
point here; the shipped model's is in its metrics.json)."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys

import pytest
from PIL import Image

from vtoken.bench import clips as C
from vtoken.bench.report import markdown_table
from vtoken.bench.video import default_video_methods, run_video_bench
from vtoken.bench.videoqa import TOKENS_PER_STEP, load_video_model
from vtoken.cli import main
from vtoken.training import micro_video as M

TINY = {"vision_hidden": 16, "vision_layers": 2, "text_hidden": 32, "text_layers": 2, "heads": 2}
FAST = ["--limit", "7", "--batch-size", "4", "--repeats", "1", "--no-progress"]


@pytest.fixture(scope="module")
def tiny_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny_video")
    M.save_micro_video(M.build_model(**TINY), path)
    return path


def test_rows_report_every_metric_and_the_files(tiny_path, tmp_path):
    out = tmp_path / "bench"
    rep = run_video_bench(tiny_path, methods=["evs", "uniform", "dycoke", "framefusion"], keeps=["0.5", "0.25"],
                          limit=7, batch_size=4, repeats=1, out_dir=out, strips=1, progress=False, log=None)
    rows = {f"{r['method']}@{r['keep']}": r for r in rep["rows"]}
    assert set(rows) == {"full@all", *(f"{m}@{k}" for m in ("evs", "uniform", "dycoke", "framefusion")
                                        for k in ("0.5", "0.25"))}
    full = rows["full@all"]
    assert full["visual_tokens"] == C.STEPS * TOKENS_PER_STEP and full["frame_counts"] == [TOKENS_PER_STEP] * C.STEPS
    assert set(full["accuracy"]) == {*C.QTYPES, "overall"} and rep["qtypes"] == list(C.QTYPES)
    for key in ("evs@0.5", "uniform@0.25", "framefusion@0.5"):
        r = rows[key]
        assert r["error"] is None and r["visual_tokens"] < full["visual_tokens"]
        assert r["gflops"] < full["gflops"] and r["kv_bytes"] < full["kv_bytes"] and len(r["predictions"]) == 7
        assert len(r["frame_counts"]) == C.STEPS and sum(r["frame_counts"]) <= full["visual_tokens"]
    assert rows["evs@0.5"]["frame_counts"][0] == TOKENS_PER_STEP  # EVS keeps the first frame whole
    assert len(set(rows["uniform@0.25"]["frame_counts"])) == 1    # an image method per frame: the same per step
    assert "keep >=" in rows["dycoke@0.25"]["error"]              # below the frames DyCoke keeps whole
    names = {p.name for p in out.rglob("*") if p.is_file()}
    assert {"results.json", "results.csv", "results.md", "pareto.png", "predictions.json",
            "keep_0.5_clip0.png", "keep_0.25_clip0.png"} <= names
    with (out / "results.csv").open() as f:
        head = next(csv.reader(f))
    assert {f"acc_{t}" for t in C.QTYPES} <= set(head) and "kept_per_step" in head
    assert (out / "results.md").read_text() == markdown_table(rep) and "kept per step" in markdown_table(rep)
    strip = Image.open(out / "strips" / "keep_0.5_clip0.png")
    assert strip.width >= C.STEPS * 2 * C.ROWS * C.CELL  # the steps side by side, scaled up
    assert strip.height > 3 * 2 * C.ROWS * C.CELL        # the clip, then a row per method
    again = run_video_bench(tiny_path, methods=["evs"], keeps=["0.5"], limit=7, batch_size=4, repeats=1,
                            out_dir=out, strips=1, progress=False, log=None)  # resumed from partial.jsonl
    assert again["rows"][1]["predictions"] == rows["evs@0.5"]["predictions"]


def test_default_methods_cover_every_video_method(tiny_path):
    model, _ = load_video_model(tiny_path)
    names = default_video_methods(model)
    assert {"evs", "vidcom2", "fastvid", "holitom", "sttm", "dycoke", "frame_stride", "temporal_pool",
            "framefusion", "uniform", "divprune"} <= set(names)


def test_cli_runs_the_video_suite(tiny_path, tmp_path, capsys):
    out = tmp_path / "cli"
    code = main(["bench", "--suite", "video", "--model", str(tiny_path), "--methods", "temporal_pool", "--keep",
                 "0.5", "--overlays", "0", "--out", str(out), *FAST])
    assert code == 0
    assert "temporal_pool" in capsys.readouterr().out
    assert json.loads((out / "results.json").read_text())["suite"] == "video"


def test_distributed_merge_equals_single_process(tiny_path, tmp_path):
    args = ["bench", "--suite", "video", "--model", str(tiny_path), "--methods", "evs", "--keep", "0.25",
            "--overlays", "0", *FAST]
    single = tmp_path / "single"
    assert main([*args, "--out", str(single)]) == 0
    multi = tmp_path / "multi"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           "-m", "vtoken.cli", *args, "--out", str(multi)], env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads((single / "predictions.json").read_text()) == json.loads((multi / "predictions.json")
                                                                               .read_text())
    ra, rb = (json.loads((d / "results.json").read_text()) for d in (single, multi))
    assert rb["world_size"] == 2
    assert [r["accuracy"] for r in ra["rows"]] == [r["accuracy"] for r in rb["rows"]]


@pytest.mark.parametrize("kind", ["npy", "gif", "folder"])
def test_show_writes_a_clip_strip(tiny_path, tmp_path, kind, capsys):
    """``vtoken show CLIP``: a folder of frames, a GIF or an .npy clip, written as the clip's strip with the kept
    tokens and both answers; frames of another size are resized to the model's."""
    import numpy as np

    frames = C.load_default_test_set()[0].frames
    if kind == "npy":
        clip = tmp_path / "clip.npy"
        np.save(clip, frames)
    elif kind == "gif":
        clip = tmp_path / "clip.gif"
        marked = frames.copy()
        marked[:, 0, 0, 0] = np.arange(len(frames))  # Pillow merges equal consecutive GIF frames: keep them apart
        imgs = [Image.fromarray(f).resize((100, 100)) for f in marked]
        imgs[0].save(clip, save_all=True, append_images=imgs[1:], duration=100)
    else:
        clip = tmp_path / "frames"
        clip.mkdir()
        for i, f in enumerate(frames):
            Image.fromarray(f).save(clip / f"{i:03d}.png")
    out = tmp_path / "strip.png"
    code = main(["show", str(clip), "--method", "evs", "--keep", "0.25", "--model", str(tiny_path),
                 "--out", str(out)])
    assert code == 0 and str(out) in capsys.readouterr().out
    img = Image.open(out)
    steps = C.STEPS if kind != "gif" else 2  # GIF encoders may still drop or merge frames
    assert img.width >= steps * 2 * C.ROWS * C.CELL and img.height > 2 * 2 * C.ROWS * C.CELL


def test_show_rejects_a_bad_clip(tiny_path, tmp_path):
    import numpy as np

    from vtoken.bench.video import read_clip

    np.save(tmp_path / "bad.npy", np.zeros((4, 8, 8)))
    with pytest.raises(ValueError, match=r"\[frames, height, width, 3\]"):
        read_clip(tmp_path / "bad.npy")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="without frames"):
        read_clip(tmp_path / "empty")
