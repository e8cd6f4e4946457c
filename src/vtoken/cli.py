"""The ``vtoken`` command line: ``methods`` lists the registry, ``demo`` reduces a sample image's tokens."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from .methods import STAGES, all_methods


def parse_keep(text: str) -> int | float:
    """``"64"`` -> 64 (a count), ``"0.25"`` -> 0.25 (a ratio)."""
    try:
        return int(text)
    except ValueError:
        pass
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"keep must be an int count or a float ratio, got {text!r}") from None


def _console():
    from rich.console import Console

    return Console(width=200) if not sys.stdout.isatty() else Console()


def cmd_methods(args: argparse.Namespace) -> int:
    from .models import families_supporting

    infos = [m for m in all_methods() if args.stage is None or m.stage == args.stage]
    if args.json:
        rows = [{"name": m.name, "paper": m.paper, "venue": m.venue, "repo": m.repo, "stage": m.stage,
                 "kind": m.kind, "signals": list(m.signals), "optional_signals": list(m.optional_signals),
                 "defaults": {k: repr(v) for k, v in m.defaults.items()}, "parity_tested": m.parity,
                 "models": families_supporting(m)}
                for m in infos]
        print(json.dumps(rows, indent=2))
        return 0
    from rich.table import Table

    table = Table(title=f"vtoken methods ({len(infos)})")
    for col in ("name", "paper", "venue", "stage", "kind", "signals", "parity", "models"):
        table.add_column(col, overflow="fold")
    for m in infos:
        sig = ", ".join(m.signals) or "-"
        if m.optional_signals:
            sig += f" (opt: {', '.join(m.optional_signals)})"
        table.add_row(m.name, m.paper, m.venue, m.stage, m.kind, sig, "yes" if m.parity else "-",
                      ", ".join(families_supporting(m)) or "-")
    _console().print(table)
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from rich.table import Table

    from .bench.demo import run_demo
    from .bench.images import SAMPLES, sample_path

    image = sample_path(args.image) if args.image in SAMPLES else Path(args.image)
    if not image.is_file():
        raise SystemExit(f"error: --image {args.image!r} is neither a bundled sample ({', '.join(SAMPLES)}) nor a file")
    rows = run_demo(image, keep=args.keep, methods=args.methods, out_dir=args.out)
    table = Table(title=f"{image.name}: 576 pixel-patch tokens (24x24), keep={args.keep}")
    for col in ("method", "stage", "kept", "ms", "PSNR dB", "note"):
        table.add_column(col)
    for r in sorted(rows, key=lambda r: -r.psnr if r.psnr == r.psnr else 1e9):
        table.add_row(r.method, r.stage, str(r.kept), f"{r.ms:.1f}", f"{r.psnr:.2f}", r.note)
    con = _console()
    con.print(table)
    con.print("Signals a model would give (CLS attention, keys, text) are synthetic stand-ins; PSNR of the image "
              "rebuilt from the kept tokens.")
    if args.out:
        con.print(f"overlays: {Path(args.out) / 'overlays.png'}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="vtoken", description="Training-free visual-token reduction.")
    sub = p.add_subparsers(dest="command", required=True)
    m = sub.add_parser("methods", help="list every method with paper, stage, signals and parity status")
    m.add_argument("--stage", choices=STAGES, help="only methods of this stage")
    m.add_argument("--json", action="store_true", help="print JSON instead of a table")
    m.set_defaults(func=cmd_methods)
    d = sub.add_parser("demo", help="reduce the pixel-patch tokens of a sample image with every method")
    d.add_argument("--image", default="astronaut", help="a bundled sample name or an image path")
    d.add_argument("--keep", type=parse_keep, default=64, help="tokens to keep: int count or float ratio")
    d.add_argument("--methods", nargs="+", help="method names (default: all)")
    d.add_argument("--out", default="out/demo", help="folder for overlays.png")
    d.set_defaults(func=cmd_demo)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    raise SystemExit(main())
