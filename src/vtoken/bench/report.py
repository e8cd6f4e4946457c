"""Files of a ``vtoken bench`` run: ``results.json`` (+ ``predictions.json``), ``results.csv``, ``results.md``,
``pareto.png`` (accuracy against visual tokens and against prefill latency) and ``overlays/*.png`` (which tokens
each method kept on example images)."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import Any

import numpy as np

from .fashion import QTYPES, Example

_COLUMNS = ("method", "keep", "stage", "visual_tokens", "visual_tokens_mean", *(f"acc_{t}" for t in QTYPES),
            "acc_overall", "relative", "latency_ms", "speedup", "gflops", "kv_bytes", "error")


def columns(report: dict[str, Any]) -> list[str]:
    """The CSV columns: the row fields, one accuracy per question type of the report (``qtypes``), and the tokens
    kept per time step for a video report."""
    qtypes = report.get("qtypes") or list(QTYPES)
    head, tail = list(_COLUMNS[:5]), list(_COLUMNS[5 + len(QTYPES):])
    extra = ["kept_per_step"] if any(r.get("frame_counts") for r in report["rows"]) else []
    return [*head, *(f"acc_{t}" for t in qtypes), *tail, *extra]


def flat_rows(report: dict[str, Any]) -> list[dict[str, Any]]:
    """One flat dictionary per row (the :func:`columns`)."""
    out = []
    for r in report["rows"]:
        row = {k: r.get(k) for k in columns(report) if not k.startswith("acc_")}
        for t in (*(report.get("qtypes") or QTYPES), "overall"):
            row[f"acc_{t}"] = r["accuracy"].get(t)
        if "kept_per_step" in row:
            row["kept_per_step"] = " ".join(f"{v:g}" for v in r.get("frame_counts") or [])
        out.append(row)
    return out


def _fmt(v: Any, spec: str) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    return format(v, spec)


def markdown_table(report: dict[str, Any]) -> str:
    """The results as a Markdown table (accuracy in %, latency in ms, FLOPs in GFLOPs, KV cache in KiB)."""
    qtypes = report.get("qtypes") or list(QTYPES)
    steps = any(r.get("frame_counts") for r in report["rows"])
    head = ["method", "keep", "visual tokens", *qtypes, "overall", "rel.", "prefill ms", "speedup", "GFLOPs",
            "KV KiB", *(["kept per step"] if steps else [])]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    for r in report["rows"]:
        if r.get("error"):
            lines.append(f"| {r['method']} | {r['keep']} | " + " | ".join("-" for _ in head[2:-1])
                         + f" | error: {r['error'][:80]} |")
            continue
        acc = r["accuracy"]
        vis = _fmt(r["visual_tokens"], ".0f")
        if r.get("visual_tokens_mean") is not None and abs(r["visual_tokens_mean"] - r["visual_tokens"]) > 0.5:
            vis += f" (mean {r['visual_tokens_mean']:.0f})"
        cells = [r["method"], r["keep"], vis, *(_fmt(100 * acc[t], ".1f") for t in qtypes if t in acc),
                 _fmt(100 * acc["overall"], ".1f"), _fmt(r.get("relative"), ".3f"), _fmt(r.get("latency_ms"), ".1f"),
                 _fmt(r.get("speedup"), ".2f") + "x" if r.get("speedup") else "-", _fmt(r.get("gflops"), ".3f"),
                 _fmt(r["kv_bytes"] / 1024 if r.get("kv_bytes") is not None else None, ".0f")]
        if steps:
            cells.append(" ".join(f"{v:.0f}" for v in r.get("frame_counts") or []) or "-")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def pareto_front(points: list[tuple[float, float]]) -> list[int]:
    """Indices of the points not dominated (lower x and higher y are better), by increasing x."""
    order = sorted(range(len(points)), key=lambda i: (points[i][0], -points[i][1]))
    front, best = [], -math.inf
    for i in order:
        if points[i][1] > best:
            front.append(i)
            best = points[i][1]
    return front


def pareto_plot(report: dict[str, Any], path: Path) -> Path:
    """Two panels: overall accuracy against mean visual tokens and against prefill latency; one line per method
    across its budgets, the unpatched model as a star, the Pareto front dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in report["rows"] if not r.get("error") and r["accuracy"]]
    full = next((r for r in rows if r["keep"] == "all"), None)
    fig, axes = plt.subplots(1, 2, figsize=(13, 5.5))
    methods = sorted({r["method"] for r in rows if r["keep"] != "all"})
    cmap = plt.get_cmap("tab20", max(len(methods), 1))
    for ax, key, label in ((axes[0], "visual_tokens_mean", "visual tokens per image (mean over LM layers)"),
                           (axes[1], "latency_ms", "prefill latency (ms, median)")):
        pts = [(r[key], 100 * r["accuracy"]["overall"]) for r in rows if r.get(key) is not None]
        for j, m in enumerate(methods):
            mr = sorted((r for r in rows if r["method"] == m and r.get(key) is not None), key=lambda r: r[key])
            ax.plot([r[key] for r in mr], [100 * r["accuracy"]["overall"] for r in mr], "o-", color=cmap(j),
                    label=m, markersize=4, linewidth=1)
        if full is not None and full.get(key) is not None:
            ax.plot([full[key]], [100 * full["accuracy"]["overall"]], "*", color="black", markersize=14,
                    label="full model")
        front = pareto_front(pts)
        ax.plot([pts[i][0] for i in front], [pts[i][1] for i in front], "--", color="grey", linewidth=1,
                label="Pareto front")
        ax.set_xlabel(label)
        ax.set_ylabel("accuracy (%)")
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=7, ncol=2, loc="lower right")
    fig.suptitle(f"vtoken bench: {report['model']} ({report['questions']} questions)")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def overlay_tile(image: np.ndarray, indices: Any, mask: Any, grid: tuple[int, int],
                 assign: Any = None) -> np.ndarray:
    """The image with the patches of dropped tokens dimmed; for merging methods each merged group's patches keep
    full brightness only at the group's representative (the kept index) and are tinted by group elsewhere."""
    h, w = grid
    ph, pw = image.shape[0] // h, image.shape[1] // w
    kept = np.zeros(h * w, bool)
    idx = np.asarray(indices)[np.asarray(mask, bool)]
    kept[idx[idx >= 0]] = True
    m = kept.reshape(h, w).repeat(ph, 0).repeat(pw, 1)[..., None]
    tile = np.where(m, image, (image * 0.25).astype(np.uint8))
    if assign is not None:
        a = np.asarray(assign)
        merged = (a >= 0) & ~kept
        tint = np.zeros((h * w, 3), np.uint8)
        rng = np.random.default_rng(0)
        colors = rng.integers(60, 200, size=(int(a.max()) + 2, 3)).astype(np.uint8)
        tint[merged] = colors[a[merged]]
        t = tint.reshape(h, w, 3).repeat(ph, 0).repeat(pw, 1)
        mm = merged.reshape(h, w).repeat(ph, 0).repeat(pw, 1)[..., None]
        tile = np.where(mm, (tile * 0.5 + t * 0.5).astype(np.uint8), tile)
    return tile


def write_overlays(overlay_data: dict[str, Any], examples: list[Example], out: Path,
                   scale: int = 2) -> list[Path]:
    """One contact sheet per budget: a row per example image, a column per method."""
    from PIL import Image

    from .demo import save_sheet

    by_keep: dict[str, list[tuple[str, Any]]] = {}
    for key, data in overlay_data.items():
        method, keep = key.rsplit("@", 1)
        by_keep.setdefault(keep, []).append((method, data))
    paths = []
    for keep, items in sorted(by_keep.items()):
        tiles = []
        n = min(min(d["indices"].shape[0] for _, d in items), len(examples))
        for i in range(n):
            image = np.asarray(examples[i].image)
            big = np.asarray(Image.fromarray(image).resize((image.shape[1] * scale, image.shape[0] * scale),
                                                           Image.NEAREST))
            tiles.append((f"image {i}", big))
            for method, d in items:
                side = math.isqrt(int(d["n_tokens"]))
                if side * side != int(d["n_tokens"]):
                    continue  # not a square grid of patches (crops, video): no overlay
                tile = overlay_tile(big, d["indices"][i], d["mask"][i], (side, side),
                                    d["assign"][i] if d["assign"] is not None else None)
                tiles.append((f"{method} ({int(d['mask'][i].sum())})", tile))
        path = out / "overlays" / f"keep_{keep}.png"
        save_sheet(tiles, path, cols=len(items) + 1)
        paths.append(path)
    return paths


def write_report(report: dict[str, Any], out: Path, overlay_data: dict[str, Any] | None = None,
                 examples: list[Example] | None = None) -> list[Path]:
    """Write every report file to ``out``; returns their paths."""
    out.mkdir(parents=True, exist_ok=True)
    slim = {**report, "rows": [{k: v for k, v in r.items() if k != "predictions"} for r in report["rows"]]}
    paths = [out / "results.json", out / "predictions.json", out / "results.csv", out / "results.md"]
    paths[0].write_text(json.dumps(slim, indent=2) + "\n")
    paths[1].write_text(json.dumps({f"{r['method']}@{r['keep']}": r["predictions"] for r in report["rows"]}) + "\n")
    rows = flat_rows(report)
    with paths[2].open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns(report))
        writer.writeheader()
        writer.writerows(rows)
    paths[3].write_text(markdown_table(report))
    paths.append(pareto_plot(report, out / "pareto.png"))
    if overlay_data and examples:
        paths += write_overlays(overlay_data, examples, out)
    return paths
