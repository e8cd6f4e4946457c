"""Selection overhead of every method: median ``vtoken.reduce`` time on CPU at VLM scales.

Scales: LLaVA-1.5 (N=576, D=4096, keep=64) and LLaVA-NeXT (N=2880, D=4096, keep=320), batch 1 and 8. Signals are
the deterministic stand-ins of ``vtoken.synthetic`` (built outside the timed region).

    python benchmarks/selection.py                     # every method, all four settings
    python benchmarks/selection.py --methods divprune tome --repeats 9 --markdown out/selection.md
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

import vtoken
from vtoken.synthetic import make_signals

SCALES = [("LLaVA-1.5", 576, (24, 24), 64), ("LLaVA-NeXT", 2880, (48, 60), 320)]


def time_method(name: str, b: int, n: int, grid: tuple[int, int], keep: int, d: int, repeats: int) -> float:
    """Median milliseconds of one ``reduce`` call."""
    gen = torch.Generator().manual_seed(0)
    centers = torch.randn(32, d, generator=gen)
    x = centers[torch.randint(0, 32, (b, n), generator=gen)] + 0.5 * torch.randn(b, n, d, generator=gen)
    info = vtoken.get_method(name)
    sig = make_signals(info, x, grid=grid)
    vtoken.reduce(x, keep, name, **sig)  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        vtoken.reduce(x, keep, name, **sig)
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--methods", nargs="+", help="method names (default: every method with a keep)")
    p.add_argument("--batch", nargs="+", type=int, default=[1, 8])
    p.add_argument("--dim", type=int, default=4096)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--markdown", help="also write the table as Markdown to this path")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    names = args.methods or [m.name for m in vtoken.methods() if m.needs_keep and m.kind != "layout"]
    cols = [(label, n, grid, keep, b) for label, n, grid, keep in SCALES for b in args.batch]
    header = ["method", "stage"] + [f"{label} N={n} k={keep} B={b}" for label, n, _, keep, b in cols]
    rows = []
    for name in names:
        info = vtoken.get_method(name)
        row = [name, info.stage]
        for _, n, grid, keep, b in cols:
            try:
                row.append(f"{time_method(name, b, n, grid, keep, args.dim, args.repeats):.1f}")
            except Exception as err:  # a benchmark reports failures instead of hiding the other rows
                row.append(f"error: {type(err).__name__}")
        rows.append(row)
        print(" | ".join(row), flush=True)
    lines = [
        f"Median `vtoken.reduce` time in ms, CPU, torch {torch.__version__}, {torch.get_num_threads()} threads, "
        f"D={args.dim}, {args.repeats} repeats.",
        "",
        "| " + " | ".join(header) + " |",
        "|" + "---|" * len(header),
    ] + ["| " + " | ".join(r) + " |" for r in rows]
    text = "\n".join(lines)
    print()
    print(text)
    if args.markdown:
        Path(args.markdown).parent.mkdir(parents=True, exist_ok=True)
        Path(args.markdown).write_text(text + "\n")


if __name__ == "__main__":
    main()
