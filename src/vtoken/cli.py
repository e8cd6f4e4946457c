"""The ``vtoken`` command line: ``methods`` lists the registry, ``bench`` measures methods x budgets on a VLM,
``show`` draws the tokens a method keeps, ``demo`` reduces a sample image's pixel patches, ``train-micro`` trains the
bundled micro models."""

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


def cmd_bench(args: argparse.Namespace) -> int:
    from .bench.report import markdown_table
    from .bench.run import run_bench

    report = run_bench(args.model, methods=args.methods, keeps=args.keep, limit=args.limit,
                       batch_size=args.batch_size, repeats=args.repeats, out_dir=args.out, overlays=args.overlays,
                       progress=not args.no_progress, device=args.device)
    if report.get("files"):  # rank 0 under torchrun
        _console().print(markdown_table(report), markup=False)
        _console().print(f"{report['questions']} questions, {len(report['rows'])} configurations in "
                         f"{report['seconds']:.0f}s; report in {args.out}")
    return 0


def cmd_show(args: argparse.Namespace) -> int:
    from .bench.show import show

    path = show(args.image, args.method, args.keep, model_path=args.model, question=args.question, out=args.out)
    print(path)
    return 0


def cmd_train_micro(args: argparse.Namespace) -> int:
    from .bench.train_micro import train_micro

    train_micro(args.out, seed=args.seed, root=args.root, device=args.device, install=args.install,
                only=args.only, resume=not args.no_resume)
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
    b = sub.add_parser("bench", help="accuracy, latency, FLOPs and KV cache of methods x budgets on a VLM "
                                     "(default: the bundled micro LLaVA on Fashion collage VQA)")
    b.add_argument("--model", default=None, help="a Hugging Face image-text-to-text model path (default: bundled)")
    b.add_argument("--methods", nargs="+", help="method names (default: every method the model runs)")
    b.add_argument("--keep", nargs="+", default=["all", "0.5", "0.25", "0.11"],
                   help="budgets: 'all', int counts, ratios or percentages (default: all 0.5 0.25 0.11)")
    b.add_argument("--limit", type=int, default=None, help="only the first N test questions")
    b.add_argument("--batch-size", type=int, default=50)
    b.add_argument("--repeats", type=int, default=3, help="timed prefill repeats (median)")
    b.add_argument("--overlays", type=int, default=3, help="example images in the overlay sheets (0: none)")
    b.add_argument("--out", default="out/bench", help="report folder")
    b.add_argument("--device", default=None, help="torch device (default: the model's, CPU)")
    b.add_argument("--no-progress", action="store_true")
    b.set_defaults(func=cmd_bench)
    s = sub.add_parser("show", help="write an overlay PNG of the visual tokens a method keeps on an image")
    s.add_argument("image", help="an image file")
    s.add_argument("--method", required=True)
    s.add_argument("--keep", type=parse_keep, required=True, help="int count or float ratio")
    s.add_argument("--model", default=None, help="a Hugging Face VLM path (default: the bundled micro LLaVA)")
    s.add_argument("--question", default="what is in the middle center?", help="the prompt's question")
    s.add_argument("--out", default=None, help="output PNG (default: <image>_<method>_<keep>.png in out/show)")
    s.set_defaults(func=cmd_show)
    t = sub.add_parser("train-micro", help="train the micro ViT and micro LLaVA (seeded, resumable)")
    t.add_argument("--out", default="out/micro", help="run folder (checkpoints, models, metrics)")
    t.add_argument("--only", choices=("vit", "llava"), default=None, help="train only one of the two")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--root", default=None, help="Fashion-MNIST directory (default: Debian package / env)")
    t.add_argument("--device", default=None, help="torch device (default: CUDA when present)")
    t.add_argument("--install", action="store_true", help="copy the trained models into the package assets")
    t.add_argument("--no-resume", action="store_true")
    t.set_defaults(func=cmd_train_micro)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    raise SystemExit(main())
