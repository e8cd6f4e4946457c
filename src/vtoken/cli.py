"""The ``vtoken`` command line: ``methods`` lists the registry, ``bench`` measures methods x budgets on a VLM,
``show`` draws the tokens a method keeps, ``demo`` reduces a sample image's pixel patches, ``train-micro`` trains the
bundled micro models.

Bad input (an unknown method, a budget out of range, a missing model folder, an unwritable ``--out``) is found before
any model loads and ends the command with one line, ``vtoken: error: ...``, on stderr and exit status 2. Anything
else is a bug and keeps its traceback; ``VTOKEN_DEBUG=1`` shows the traceback of input errors too."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NoReturn

from .bench.errors import UsageError, user_input
from .methods import STAGES, all_methods, get_method

#: exit status of bad input (argparse's convention)
USAGE_EXIT = 2


def one_line(text: str) -> str:
    """``text`` with its line breaks (and runs of blanks) folded into single spaces."""
    return " ".join(str(text).split())


def _read_keep(text: str, allow_all: bool) -> int | float | None:
    """``text`` read by the one ``--keep`` grammar, :func:`vtoken.bench.run.parse_keep` (an int count, a float ratio
    or a percentage such as ``25%``; ``'all'`` only where ``allow_all``); an argparse error otherwise."""
    from .bench.run import parse_keep

    try:
        value = parse_keep(text)
    except ValueError as err:
        if allow_all:
            raise argparse.ArgumentTypeError(str(err)) from None
        value = None
    if value is None and not allow_all:
        raise argparse.ArgumentTypeError(f"keep {text!r}: use an int count >= 1, a ratio in (0, 1] or a "
                                         "percentage")
    return value


def keep_arg(text: str) -> int | float:
    """argparse ``type`` of ``demo`` / ``show --keep``: ``"64"`` -> 64 (a count), ``"0.25"`` or ``"25%"`` -> 0.25."""
    return _read_keep(text, allow_all=False)  # type: ignore[return-value]  # None only with allow_all


def budget_arg(text: str) -> str:
    """argparse ``type`` of ``bench --keep``: the label, checked (``'all'``, a count, a ratio or a percentage) and
    returned as given."""
    _read_keep(text, allow_all=True)
    return text


def method_name(text: str) -> str:
    """A registered method's name (``-`` and case normalised); an argparse error listing the known names otherwise."""
    try:
        return get_method(text).name
    except (ValueError, TypeError) as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def _int_at_least(low: int) -> Callable[[str], int]:
    """An argparse ``type``: an integer >= ``low``."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be an integer >= {low}, got {value}")
        return value

    return parse


positive_int = _int_at_least(1)
non_negative_int = _int_at_least(0)


class _Parser(argparse.ArgumentParser):
    """An ``ArgumentParser`` whose errors are one line, ``vtoken: error: ...`` (no usage block), exit status 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(USAGE_EXIT, f"vtoken: error: {one_line(message)} (see `{self.prog} --help`)\n")


def _console():
    from rich.console import Console

    return Console(width=200) if not sys.stdout.isatty() else Console()


def fixture_cases(info: Any) -> dict[str, int | None]:
    """Golden cases per fixture directory of ``info`` (``None`` where the fixtures are not on this machine: they
    live in ``VTOKEN_PARITY_FIXTURES``, default ``../shared/fixtures/parity`` beside the checkout)."""
    env = os.environ.get("VTOKEN_PARITY_FIXTURES")
    root = Path(env) if env else Path(__file__).resolve().parents[3] / "shared" / "fixtures" / "parity"
    dirs = info.fixture if isinstance(info.fixture, tuple) else (info.fixture or info.name,)
    out: dict[str, int | None] = {}
    for d in dirs:
        manifest = root / d / "manifest.json"
        out[d] = len(json.loads(manifest.read_text()).get("cases", [])) if manifest.is_file() else None
    return out


def method_card(info: Any, cases: bool = True) -> str:
    """The card ``vtoken methods NAME`` prints: paper, stage, signals, every knob (type, default, range, doc, the
    source of the default; the main ones first), the families it runs on and its parity status (with the number of
    golden cases on this machine unless ``cases`` is False)."""
    from .methods.registry import type_name
    from .models import ADAPTERS

    lines = [f"{info.name}: {info.summary}", "",
             f"  paper    {info.paper} ({info.venue})", f"  code     {info.repo or '-'}",
             f"  stage    {info.stage}, {info.kind}" + ("" if info.exact else " (adaptive count: at most keep)")]
    sig = [f"{s} (required)" for s in info.signals] + [f"{s} (optional)" for s in info.optional_signals]
    lines.append(f"  signals  {', '.join(sig) or 'none (the tokens alone)'}")

    def knob(k: str) -> str:
        rng = info.knob_ranges.get(k)
        where = "" if rng is None else f", {'one of ' + str(rng) if isinstance(rng, tuple) else rng}"
        return (f"    {k}: {type_name(info.knob_types.get(k, Any))} = {info.defaults[k]!r}{where}\n"
                f"        {info.knob_docs.get(k, '(undocumented)')}\n"
                f"        default from {info.knob_sources.get(k, '-')}")

    main = [k for k in info.main_knobs if k in info.defaults]
    rest = [k for k in info.defaults if k not in main]
    if not info.defaults:
        lines.append("  knobs    none (keep is the only budget)")
    if main:
        lines += ["  important knobs", *map(knob, main)]
    if rest:
        lines += ["  knobs to tinker with" if main else "  knobs", *map(knob, rest)]
    runs = [(a.family, a.unsupported(info)) for a in ADAPTERS]
    lines.append(f"  runs on  {', '.join(f for f, why in runs if why is None) or 'no model family (tensor API only)'}")
    for family, why in runs:
        if why is not None:
            lines.append(f"    not {family}: {why}")
    if info.parity and not cases:
        dirs = info.fixture if isinstance(info.fixture, tuple) else (info.fixture or info.name,)
        lines.append(f"  parity   golden fixtures from the official code ({', '.join(dirs)})")
    elif info.parity:
        got = ", ".join(f"{d}: {n if n is not None else 'fixtures not on this machine'}"
                        + (" cases" if n is not None else "") for d, n in fixture_cases(info).items())
        lines.append(f"  parity   golden fixtures from the official code ({got})")
    else:
        lines.append("  parity   no golden fixtures " + ("(reimplemented from the paper)" if info.repo else
                                                     "(no official code)"))
    return "\n".join(lines)


def methods_markdown() -> str:
    """``docs/methods.md``: every method's card under its own heading (``vtoken methods --markdown`` prints it)."""
    out = ["# Methods", "", "Every method's card, as `vtoken methods NAME` prints it (generated by "
           "`vtoken methods --markdown > docs/methods.md`; a test keeps it current).", ""]
    for m in all_methods():
        out += [f"## {m.name}", "", f"{m.paper} ({m.venue}){f', <{m.repo}>' if m.repo else ''}", "", "```",
                method_card(m, cases=False), "```", ""]
    return "\n".join(out)


def support_matrix() -> str:
    """The README's support matrix: one row per method, ✓ where a family runs it (``vtoken methods --matrix``)."""
    from .models import ADAPTERS, families_supporting

    families = list(dict.fromkeys(a.family for a in ADAPTERS))
    out = ["| method | stage | " + " | ".join(families) + " |", "|---|---|" + "---|" * len(families)]
    for m in sorted(all_methods(), key=lambda m: (STAGES.index(m.stage), m.name)):
        ok = set(families_supporting(m))
        out.append(f"| {m.name} | {m.stage} | " + " | ".join("✓" if f in ok else "–" for f in families) + " |")
    return "\n".join(out) + "\n"


def cmd_methods(args: argparse.Namespace) -> int:
    from .models import families_supporting

    if args.markdown:
        print(methods_markdown(), end="")
        return 0
    if args.matrix:
        print(support_matrix(), end="")
        return 0
    if args.name:
        with user_input("methods NAME"):
            info = get_method(args.name)
        print(method_card(info))
        return 0
    infos = [m for m in all_methods() if args.stage is None or m.stage == args.stage]
    if args.json:
        rows = [{"name": m.name, "paper": m.paper, "venue": m.venue, "repo": m.repo, "stage": m.stage,
                 "kind": m.kind, "signals": list(m.signals), "optional_signals": list(m.optional_signals),
                 "summary": m.summary, "defaults": {k: repr(v) for k, v in m.defaults.items()},
                 "knob_docs": m.knob_docs, "knob_sources": m.knob_sources,
                 "main_knobs": list(m.main_knobs), "parity_tested": m.parity,
                 "models": families_supporting(m)}
                for m in infos]
        print(json.dumps(rows, indent=2))
        return 0
    from rich.table import Table

    table = Table(title=f"vtoken methods ({len(infos)})")
    for col in ("name", "summary", "paper", "venue", "stage", "kind", "signals", "parity", "models"):
        table.add_column(col, overflow="fold")
    for m in infos:
        sig = ", ".join(m.signals) or "-"
        if m.optional_signals:
            sig += f" (opt: {', '.join(m.optional_signals)})"
        table.add_row(m.name, m.summary, m.paper, m.venue, m.stage, m.kind, sig, "yes" if m.parity else "-",
                      ", ".join(families_supporting(m)) or "-")
    _console().print(table)
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from rich.table import Table

    from .bench.demo import run_demo, select_methods
    from .bench.images import SAMPLES, open_rgb, sample_path
    from .bench.run import writable_dir

    image = sample_path(args.image) if args.image in SAMPLES else Path(args.image)
    if not image.is_file():
        raise UsageError(f"--image {args.image!r} is neither a bundled sample ({', '.join(SAMPLES)}) nor a file")
    with user_input("--image"):
        open_rgb(image)
    with user_input("--methods"):
        select_methods(args.methods)
    if args.out:
        writable_dir(args.out)
    rows = run_demo(image, keep=args.keep, methods=args.methods, out_dir=args.out or None)
    table = Table(title=f"{image.name}: 576 pixel-patch tokens (24x24), keep={args.keep}")
    for col in ("method", "stage", "kept", "ms", "PSNR dB", "note"):
        table.add_column(col)
    for r in sorted(rows, key=lambda r: -r.psnr if r.psnr == r.psnr else 1e9):
        table.add_row(r.method, r.stage, str(r.kept), f"{r.ms:.1f}", f"{r.psnr:.2f}", r.note)
    con = _console()
    con.print(table)
    ran = [r for r in rows if not r.note.startswith("skipped")]
    if not ran:
        _error(f"no method ran at keep={args.keep}: " + "; ".join(f"{r.method}: {r.note}" for r in rows))
        return 1
    con.print("Signals a model would give (CLS attention, keys, text) are synthetic stand-ins; PSNR of the image "
              "rebuilt from the kept tokens.")
    if args.out:
        con.print(f"overlays: {Path(args.out) / 'overlays.png'}")
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from .bench.report import markdown_table

    if args.suite == "video":
        from .bench.video import DEFAULT_VIDEO_KEEPS, DEFAULT_VIDEO_LIMIT, run_video_bench

        if args.allow_download:
            _error("--allow-download: the video suite reads a local model folder only")
        args.out = args.out or "out/bench-video"
        report = run_video_bench(args.model, methods=args.methods, keeps=args.keep or list(DEFAULT_VIDEO_KEEPS),
                                 limit=args.limit or DEFAULT_VIDEO_LIMIT, batch_size=args.batch_size or 20,
                                 repeats=args.repeats, out_dir=args.out,
                                 strips=2 if args.overlays is None else args.overlays,
                                 progress=not args.no_progress, device=args.device, resume=not args.fresh)
    else:
        from .bench.run import run_bench

        args.out = args.out or "out/bench"
        report = run_bench(args.model, methods=args.methods, keeps=args.keep or ["all", "0.5", "0.25", "0.11"],
                           limit=args.limit, batch_size=args.batch_size or 50, repeats=args.repeats,
                           out_dir=args.out, overlays=3 if args.overlays is None else args.overlays,
                           progress=not args.no_progress, device=args.device, allow_download=args.allow_download,
                           resume=not args.fresh)
    rows = report["rows"]
    failed = [r for r in rows[1:] if r.get("error")]
    if report.get("files"):  # rank 0 under torchrun
        _console().print(markdown_table(report), markup=False)
        _console().print(f"{report['questions']} questions, {len(rows)} configurations in "
                         f"{report['seconds']:.0f}s; report in {args.out}")
        if failed and len(failed) == len(rows) - 1:
            _error("no requested configuration ran: " + "; ".join(
                f"{r['method']}@{r['keep']}: {r['error']}" for r in failed))
    return 1 if failed and len(failed) == len(rows) - 1 else 0


def cmd_show(args: argparse.Namespace) -> int:
    from .bench.show import show
    from .bench.video import is_clip, show_clip

    if is_clip(args.image):
        path = show_clip(args.image, args.method, args.keep, model_path=args.model,
                         question=args.question or "what appears first?", out=args.out)
    else:
        path = show(args.image, args.method, args.keep, model_path=args.model,
                    question=args.question or "what is in the middle center?", out=args.out,
                    allow_download=args.allow_download)
    print(path)
    return 0


def cmd_train_micro(args: argparse.Namespace) -> int:
    from .bench.run import check_device
    from .training.train_micro import train_micro

    check_device(args.device)
    train_micro(args.out, seed=args.seed, root=args.root, device=args.device, install=args.install,
                only=args.only, resume=not args.no_resume)
    return 0


_DOWNLOAD_HELP = ("let --model be a Hugging Face hub id, downloaded if not cached (default: only a local folder, "
                  "no network access)")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="vtoken", description="Training-free visual-token reduction.")
    sub = p.add_subparsers(dest="command", required=True)
    m = sub.add_parser("methods", help="list every method (summary, paper, stage, signals, parity), or print one "
                                       "method's card: vtoken methods NAME")
    m.add_argument("name", nargs="?", default=None, help="a method: print its card (knobs with type, default, range)")
    m.add_argument("--stage", choices=STAGES, help="only methods of this stage")
    m.add_argument("--json", action="store_true", help="print JSON instead of a table")
    m.add_argument("--markdown", action="store_true", help="print every card as Markdown (docs/methods.md)")
    m.add_argument("--matrix", action="store_true", help="print the method x family support matrix (README)")
    m.set_defaults(func=cmd_methods)
    d = sub.add_parser("demo", help="reduce the pixel-patch tokens of a sample image with every method")
    d.add_argument("--image", default="astronaut", help="a bundled sample name or an image path")
    d.add_argument("--keep", type=keep_arg, default=64,
                   help="tokens to keep: an int count >= 1, a ratio in (0, 1] or a percentage")
    d.add_argument("--methods", nargs="+", type=method_name, help="method names (default: all)")
    d.add_argument("--out", default="out/demo", help="folder for overlays.png ('': none)")
    d.set_defaults(func=cmd_demo)
    b = sub.add_parser("bench", help="accuracy, latency, FLOPs and KV cache of methods x budgets on a VLM "
                                     "(default: the bundled micro LLaVA on Fashion collage VQA; --suite video: the "
                                     "bundled micro video VLM on Fashion clips)")
    b.add_argument("--suite", choices=("image", "video"), default="image",
                   help="image: images and pre-LLM / llm-stage methods; video: clips, video methods and image "
                        "methods per frame")
    b.add_argument("--model", default=None, help="a local Hugging Face image-text-to-text model folder "
                                                 "(default: bundled)")
    b.add_argument("--allow-download", action="store_true", help=_DOWNLOAD_HELP)
    b.add_argument("--methods", nargs="+", type=method_name,
                   help="method names (default: every method the model runs)")
    b.add_argument("--keep", nargs="+", type=budget_arg, default=None,
                   help="budgets: 'all', int counts, ratios or percentages (default: all 0.5 0.25 0.11; video: all "
                        "0.5 0.25 0.1, the clip's budget)")
    b.add_argument("--limit", type=positive_int, default=None,
                   help="only the first N test questions (default: all; video: 140 of the 420)")
    b.add_argument("--batch-size", type=positive_int, default=None, help="default 50 (video: 20)")
    b.add_argument("--repeats", type=positive_int, default=3, help="timed prefill repeats (median)")
    b.add_argument("--overlays", type=non_negative_int, default=None,
                   help="example images in the overlay sheets (default 3; video: clips with strips, 2; 0: none)")
    b.add_argument("--out", default=None, help="report folder (default out/bench, video: out/bench-video); "
                                               "finished configurations go to partial.jsonl there as they finish")
    b.add_argument("--fresh", "--no-resume", dest="fresh", action="store_true",
                   help="recompute every configuration (default: reuse those partial.jsonl in --out holds for the "
                        "same model, data and settings)")
    b.add_argument("--device", default=None, help="torch device (default: the model's, CPU)")
    b.add_argument("--no-progress", action="store_true")
    b.set_defaults(func=cmd_bench)
    s = sub.add_parser("show", help="write an overlay PNG of the visual tokens a method keeps on an image or a clip")
    s.add_argument("image", help="an image file, or a clip: a folder of frames, a .gif or an .npy [F, H, W, 3] "
                                 "(then the model is a video VLM, default: the bundled micro video VLM)")
    s.add_argument("--method", required=True, type=method_name)
    s.add_argument("--keep", type=keep_arg, required=True,
                   help="an int count >= 1, a ratio in (0, 1] or a percentage")
    s.add_argument("--model", default=None, help="a local Hugging Face VLM folder (default: the bundled micro LLaVA)")
    s.add_argument("--allow-download", action="store_true", help=_DOWNLOAD_HELP)
    s.add_argument("--question", default=None, help="the prompt's question (default: what is in the middle "
                                                    "center? for an image, what appears first? for a clip)")
    s.add_argument("--out", default=None, help="output image, .png (or .jpg, .webp, ...) (default: "
                                               "<image>_<method>_<keep>.png in out/show)")
    s.set_defaults(func=cmd_show)
    t = sub.add_parser("train-micro", help="train the micro ViT, micro LLaVA and micro video VLM (seeded, resumable)")
    t.add_argument("--out", default="out/micro", help="run folder (checkpoints, models, metrics)")
    t.add_argument("--only", choices=("vit", "llava", "video"), default=None, help="train only one of them")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--root", default=None, help="Fashion-MNIST directory (default: Debian package / env)")
    t.add_argument("--device", default=None, help="torch device (default: CUDA when present)")
    t.add_argument("--install", action="store_true", help="copy the trained models into the package assets")
    t.add_argument("--no-resume", action="store_true")
    t.set_defaults(func=cmd_train_micro)
    return p


def _error(message: str) -> None:
    print(f"vtoken: error: {one_line(message)}", file=sys.stderr)


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command; bad input -> one ``vtoken: error: ...`` line on stderr and exit status 2 (argparse errors
    included, which exit through ``SystemExit(2)``)."""
    args = build_parser().parse_args(argv)
    debug = os.environ.get("VTOKEN_DEBUG", "").strip().lower() not in ("", "0", "false", "no")
    try:
        return int(args.func(args))
    except (UsageError, FileNotFoundError) as err:
        if debug:
            raise
        _error(str(err))
        return USAGE_EXIT
    except KeyboardInterrupt:
        if debug:
            raise
        _error("interrupted" + (f"; finished configurations are in {Path(args.out) / 'partial.jsonl'}, run the same "
                                "command again to resume" if args.command == "bench" and args.out else ""))
        return 130


if __name__ == "__main__":  # `python -m vtoken.cli` (torchrun)
    raise SystemExit(main())
