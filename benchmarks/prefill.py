"""End-to-end prefill cost of ``vtoken.apply`` on a LLaVA-shaped model with random weights (built from configs, no hub).

Model (defaults; random weights, SDPA attention everywhere):
  * vision: CLIP ViT, 336 px / patch 14 = 24 x 24 = 576 patches + CLS, width 768, 12 heads, MLP 3072, 6 layers
    (``--vision-layers``/``--vision-width``; why half a ViT-B: ``docs/notes.md``).
  * language model: ``--lm qwen2-0.5b`` (default) has Qwen2-0.5B's shapes (the LM of LLaVA-OneVision-0.5B): hidden 896,
    24 layers, 14 heads of 64, 2 KV heads, MLP 4864 (gated), vocab 151,936, tied embeddings = 494M parameters;
    ``--lm llama-0.4b``: hidden 1024, 24 layers, 16 heads (no GQA), MLP 2816, vocab 32,000 = 374M.
  * projector: LLaVA's 2-layer GELU MLP; features of vision layer -2, CLS dropped ("default" strategy).
Prompts (batch 1): 5 text tokens, the image placeholders, 35 text tokens (40 text tokens in all).
  * ``--scale llava``: one image, 576 visual tokens (LLaVA-1.5), sequence 616.
  * ``--scale next``: 2,880 visual tokens as LLaVA-NeXT's anyres 2 x 2 produces them: five 336-px views (base image +
    4 crops) of 576 tokens each, fed to LlavaForConditionalGeneration as 5 images of one prompt. The tower's work and
    the LM's sequence (2,920) are NeXT's (less its ~48 newline tokens); ``keep`` is per view, as vtoken applies it
    per image, so keep=64 leaves 320 visual tokens (VisionZip/PDrop's "NeXT 320" budget). The real NeXT family has its
    own adapter; this scale measures the cost curve, not NeXT's unpadding.

Measured for the unpatched model and for each method x keep (``all`` = keep 1.0, which still runs the adapter), from
``--repeats`` calls of ``generate(**inputs, max_new_tokens=1, do_sample=False)`` (medians):
  * TTFT: the whole ``generate`` call (vision encoding, reduction, prefill, picking the token);
  * prefill: the one model forward inside it (a forward over the prompt with ``use_cache=True`` and
    ``logits_to_keep=1``) plus the vision encoding, which transformers 5's ``generate`` runs just before that forward
    for the unpatched model (vtoken's forward encodes the images itself): the time inside the hooked tower, projector
    and top-level forward; timing it inside ``generate`` halves the run time against separate prefill calls;
  * KV: bytes of the key/value tensors in the cache after the prefill (checked against
    ``vtoken.bench.cost.kv_cache_bytes`` of the cached length, per layer for llm-stage methods);
  * select: time inside the reduction in the same prefills, from wrappers around the adapter's signal collection
    (``Adapter.collect_signals``: CLS attention rows / keys recomputed from hooked q/k, projections for text
    relevance) and around ``vtoken.reduce`` as the pipeline calls it (validation + the method); for llm-stage methods
    (fastv, pdrop, sparsevlm, dart, todre_llm, aim) around each pruning between decoder layers (attention rows on the
    side from the hooked q/k, the method, compaction); shown in ms and as a % of the patched prefill (goal <= 2%);
  * ideal speedup: (vision + projector + LM prefill FLOPs, full) / (the same, reduced), analytic from the configs
    (``vtoken.bench.cost``: projections, MLP, causal attention, LM head on 1 position; the tower is the same in both;
    llm-stage methods count each decoder layer at the length it ran with, the "seq" column showing first->last);
    measured = unpatched prefill / reduced prefill; the goal is measured/ideal >= 0.9.
A second table splits the median prefill into exclusive stage times (forward hooks on the tower, projector, language
model and LM head; wrappers around signals and selection); "other" is the rest (embedding lookup, splice, compaction,
mask/position bookkeeping, Python glue), and "LLM x" compares the language model's own measured and ideal speedups.
"time bound x" is the speedup if only the language model's time shrank, exactly with its FLOPs, and every other stage
kept its unpatched time (no selection cost); meas/bound is what is left for vtoken and the LM's small-shape
efficiency to explain.

The unpatched baseline is measured before and after the methods (pooled median); on a shared machine compare the
two medians printed under the table before trusting small differences, and use ``--threads 1 --clock cpu`` (the
"vision" column, the same work in every row, shows the remaining spread; why: ``docs/notes.md``).

    python benchmarks/prefill.py --quick                                     # smoke run, seconds
    python benchmarks/prefill.py --scale llava --repeats 3 --markdown out/prefill.md
    python benchmarks/prefill.py --threads 1 --clock cpu --dtype bf16                  # on a busy shared machine
    python benchmarks/prefill.py --scale next --methods divprune visionzip --keeps all 64 --dtype bf16
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration, Qwen2Config

import vtoken
import vtoken.models.pipeline as pipeline_module
from vtoken.bench import cost
from vtoken.bench.run import parse_keep
from vtoken.models import find_adapter

DEFAULT_METHODS = ["random", "uniform", "pool", "divprune", "visionzip", "vtc_cls", "cdpruner", "prumerge_plus", "tome",
                   "fastv", "pdrop", "sparsevlm", "dart", "todre_llm", "aim"]
PREFIX, SUFFIX = 5, 35  # text tokens before / after the image placeholders
LM_PRESETS: dict[str, tuple[type, dict[str, Any]]] = {
    "qwen2-0.5b": (Qwen2Config, dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                                     num_attention_heads=14, num_key_value_heads=2, vocab_size=151936,
                                     tie_word_embeddings=True, rope_theta=1e6, max_position_embeddings=32768)),
    "llama-0.4b": (LlamaConfig, dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=24,
                                     num_attention_heads=16, num_key_value_heads=16, vocab_size=32000,
                                     max_position_embeddings=4096)),
    "tiny": (LlamaConfig, dict(hidden_size=128, intermediate_size=256, num_hidden_layers=4, num_attention_heads=4,
                               num_key_value_heads=2, vocab_size=1000, max_position_embeddings=4096)),
}
SCALES = {"llava": 1, "next": 5}  # images (views) of 576 tokens per prompt
STAGES = ["vision", "projector", "signals", "select", "llm", "lm_head"]


# ---------------------------------------------------------------------------------------------------------------
# model and inputs
# ---------------------------------------------------------------------------------------------------------------


def build_model(args: argparse.Namespace) -> LlavaForConditionalGeneration:
    """A random-weight LLaVA from configs (seeded), SDPA attention, in ``args.dtype`` on ``args.device``."""
    torch.manual_seed(0)
    if args.quick:
        vision = CLIPVisionConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                                  image_size=224, patch_size=14)
    else:
        vision = CLIPVisionConfig(hidden_size=args.vision_width, intermediate_size=4 * args.vision_width,
                                  num_hidden_layers=args.vision_layers, num_attention_heads=args.vision_width // 64,
                                  image_size=336, patch_size=14, projection_dim=args.vision_width)
    cls, kw = LM_PRESETS["tiny" if args.quick else args.lm]
    text = cls(pad_token_id=0, bos_token_id=1, eos_token_id=2, **kw)
    cfg = LlavaConfig(vision_config=vision, text_config=text, image_token_id=text.vocab_size - 1,
                      vision_feature_layer=-2, vision_feature_select_strategy="default",
                      tie_word_embeddings=text.tie_word_embeddings)
    for c in (cfg, cfg.vision_config, cfg.text_config):
        c._attn_implementation = "sdpa"
    model = LlavaForConditionalGeneration(cfg).eval().to(device=args.device, dtype=args.torch_dtype)
    model.generation_config.pad_token_id = 0
    model.generation_config.eos_token_id = None
    return model


def make_inputs(model: LlavaForConditionalGeneration, images: int, device: str, dtype: torch.dtype
                ) -> dict[str, torch.Tensor]:
    """One prompt: ``PREFIX`` text tokens, ``images`` blocks of image placeholders, ``SUFFIX`` text tokens."""
    cfg = model.config
    n = (cfg.vision_config.image_size // cfg.vision_config.patch_size) ** 2
    g = torch.Generator().manual_seed(1)
    vocab = cfg.text_config.vocab_size
    ids = torch.cat([torch.randint(3, vocab - 1, (PREFIX,), generator=g),
                     torch.full((images * n,), cfg.image_token_id),
                     torch.randint(3, vocab - 1, (SUFFIX,), generator=g)])[None]
    size = cfg.vision_config.image_size
    pixels = torch.randn(images, 3, size, size, generator=g)
    return {"input_ids": ids.to(device), "attention_mask": torch.ones_like(ids).to(device),
            "pixel_values": pixels.to(device=device, dtype=dtype)}


# ---------------------------------------------------------------------------------------------------------------
# instrumentation
# ---------------------------------------------------------------------------------------------------------------


class Probe:
    """Exclusive wall time per stage of one forward: module hooks and function wrappers push/pop named frames; time
    spent in a nested frame is charged to that frame, not its parent. Modules run inside ``signals``/``select``
    (e.g. the projector called to build a signal) are charged to the signal/selection."""

    OPAQUE = ("signals", "select")

    def __init__(self, sync: Callable[[], None], clock: Callable[[], float]) -> None:
        self.sync = sync
        self.clock = clock
        self.stack: list[list[Any] | None] = []
        self.handles: list[Any] = []
        self.reset()

    def reset(self) -> None:
        self.stack.clear()
        self.times: dict[str, float] = defaultdict(float)  # exclusive seconds per stage
        self.inclusive: dict[str, float] = defaultdict(float)
        self.top = 0.0  # seconds in outermost frames: the prefill, wherever generate() runs its parts
        self.calls: dict[str, int] = defaultdict(int)

    def enter(self, name: str) -> None:
        if any(f is not None and f[0] in self.OPAQUE for f in self.stack):
            self.stack.append(None)
            return
        self.sync()
        self.calls[name] += 1
        self.stack.append([name, self.clock(), 0.0])

    def exit(self) -> None:
        frame = self.stack.pop() if self.stack else None
        if frame is None:
            return
        self.sync()
        elapsed = self.clock() - frame[1]
        self.times[frame[0]] += elapsed - frame[2]
        self.inclusive[frame[0]] += elapsed
        parent = next((f for f in reversed(self.stack) if f is not None), None)
        if parent is not None:
            parent[2] += elapsed
        elif not self.stack:
            self.top += elapsed

    def wrap(self, name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def timed(*args: Any, **kwargs: Any) -> Any:
            self.enter(name)
            try:
                return fn(*args, **kwargs)
            finally:
                self.exit()

        return timed

    def hook(self, module: torch.nn.Module, name: str) -> None:
        self.handles.append(module.register_forward_pre_hook(lambda *_: self.enter(name)))
        self.handles.append(module.register_forward_hook(lambda *_: self.exit()))

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles.clear()


# ---------------------------------------------------------------------------------------------------------------
# measurement
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class Result:
    method: str
    keep: str
    visual: int
    seq: int
    prefill: list[float]
    ttft: list[float]
    kv_bytes: int
    kv_expected: int
    stages: dict[str, list[float]] = field(default_factory=dict)
    flops: float = 0.0
    llm_flops: float = 0.0
    lengths: list[int] | None = None  # per decoder layer, for llm-stage methods

    @property
    def seq_label(self) -> str:
        """The prefill length (``first->last`` layer for llm-stage pruning)."""
        if self.lengths and self.lengths[-1] != self.lengths[0]:
            return f"{self.lengths[0]}->{self.lengths[-1]}"
        return str(self.seq)

    def stage(self, stage: str) -> float:
        """``stage``'s time in the median prefill (the lower median for an even count), so a row's stages add up
        to its prefill time."""
        order = sorted(range(len(self.prefill)), key=self.prefill.__getitem__)
        values = self.stages.get(stage)
        return values[order[(len(order) - 1) // 2]] if values else 0.0

    @property
    def prefill_ms(self) -> float:
        return sorted(self.prefill)[(len(self.prefill) - 1) // 2]

    @property
    def ttft_ms(self) -> float:
        return statistics.median(self.ttft) if self.ttft else float("nan")


def cache_bytes(cache: Any) -> int:
    return sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values))


def measure(model: LlavaForConditionalGeneration, inputs: dict[str, torch.Tensor], method: str | None,
            keep: int | float | None, args: argparse.Namespace, probe: Probe) -> Result:
    """``args.repeats`` calls of ``generate(max_new_tokens=1)`` on one configuration (``method=None``: unpatched).

    Each call gives the TTFT (the whole call) and the prefill: with one new token ``generate`` runs exactly one forward
    (over the prompt, ``use_cache=True``, ``logits_to_keep=1``); the unpatched model's images are encoded by
    ``generate`` just before it (``get_image_features``), a patched model's inside it. The prefill is the time in the
    hooked stages (tower, projector, forward), so both count the same work; plus the stage split and, from the last
    call, the KV cache."""
    handle = vtoken.apply(model, method, keep=keep) if method else None
    try:
        if handle is not None:  # time the adapter's signal collection (an instance attribute, dropped with it)
            adapter = handle.adapter
            adapter.collect_signals = probe.wrap("signals", adapter.collect_signals)
            if adapter.llm is not None:  # llm-stage pruning: attention rows on the side + the method, per pruning
                adapter.llm.prune = probe.wrap("select", adapter.llm.prune)
        prefill, ttft, stages, out = [], [], defaultdict(list), None
        for r in range(args.warmup + args.repeats):
            out = None
            probe.reset()
            probe.sync()
            t0 = probe.clock()
            out = model.generate(**inputs, max_new_tokens=1, do_sample=False, return_dict_in_generate=True)
            probe.sync()
            total = (probe.clock() - t0) * 1e3
            if r < args.warmup:
                continue
            if probe.calls["forward"] != 1:
                raise RuntimeError(f"generate ran {probe.calls['forward']} forwards, expected 1 (the prefill)")
            ttft.append(total)
            prefill.append(probe.top * 1e3)
            for k in STAGES:
                stages[k].append(probe.times.get(k, 0.0) * 1e3)
            stages["other"].append(probe.times.get("forward", 0.0) * 1e3)
        assert out is not None
        cache = out.past_key_values
        seq = cache.get_seq_length()
        kv = cache_bytes(cache)
        del out, cache
        n_visual = int((inputs["input_ids"] == model.config.image_token_id).sum())
        visual = int(handle.last.mask.sum()) if handle is not None else n_visual
        llm_info = handle.last.extras.get("llm") if handle is not None else None
        lengths = list(llm_info["lengths"]) if llm_info else None  # tokens each decoder layer processed
    finally:
        if handle is not None:
            handle.remove()
    label = "all" if keep == 1.0 else ("-" if keep is None else str(keep))
    res = Result(method or "unpatched", label, visual, seq, prefill, ttft, kv,
                 cost.kv_cache_bytes(model.config, lengths or seq, 1, args.torch_dtype), dict(stages))
    res.lengths = lengths
    info = vtoken.get_method(method) if method else None
    n_images = inputs["pixel_values"].shape[0]
    # the projector sees the kept tokens when the method runs in the vision space, every token otherwise
    projected = visual if info is not None and info.space == "vision" else n_visual
    llm = cost.llm_prefill_flops(model.config, lengths or seq, 1, logits=1, detail=True)
    res.llm_flops = llm["total"] - llm["lm_head"]
    res.flops = cost.vit_flops(model.config, n_images) + cost.projector_flops(model.config, projected) + llm["total"]
    return res


# ---------------------------------------------------------------------------------------------------------------
# reporting
# ---------------------------------------------------------------------------------------------------------------


def table(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "|".join("---:" if i > 1 else "---" for i in range(len(header)))
            + "|"] + ["| " + " | ".join(r) + " |" for r in rows]


def report(scale: str, results: list[Result], base: Result, base_runs: tuple[float, float]) -> list[str]:
    main, split = [], []
    base_ms, base_llm = base.prefill_ms, base.stage("llm")
    for r in results:
        sel = r.stage("signals") + r.stage("select")
        ideal = base.flops / r.flops
        measured = base_ms / r.prefill_ms
        patched = r.method != "unpatched"
        kv_note = "" if r.kv_bytes == r.kv_expected else f" (expected {r.kv_expected / 2**20:.2f})"
        main.append([r.method, r.keep, str(r.visual), r.seq_label, f"{r.prefill_ms:.0f}", f"{r.ttft_ms:.0f}",
                     f"{r.kv_bytes / 2**20:.2f}{kv_note}", f"{sel:.1f}" if patched else "-",
                     f"{100 * sel / r.prefill_ms:.2f}%" if patched else "-", f"{ideal:.2f}", f"{measured:.2f}",
                     f"{measured / ideal:.2f}"])
        llm_ms = r.stage("llm")
        bound = base_ms / (base_ms - base_llm * (1 - r.llm_flops / base.llm_flops))
        split.append([r.method, r.keep] + [f"{r.stage(s):.1f}" for s in (*STAGES, "other")]
                     + [f"{r.prefill_ms:.0f}", f"{base_llm / llm_ms:.2f}" if llm_ms else "-",
                        f"{base.llm_flops / r.llm_flops:.2f}", f"{bound:.2f}", f"{measured / bound:.2f}"])
    lines = [f"### {scale}: prefill, TTFT, KV cache, selection overhead and speedup", ""]
    lines += table(["method", "keep", "visual", "seq", "prefill ms", "TTFT ms", "KV MiB", "select ms", "select %",
                    "ideal x", "measured x", "meas/ideal"], main)
    lines += ["", f"Unpatched prefill medians: {base_runs[0]:.0f} ms before the methods, {base_runs[1]:.0f} ms after "
              "(pooled in the unpatched row).", "",
              f"### {scale}: prefill breakdown (exclusive ms per stage in the median prefill)", ""]
    lines += table(["method", "keep", "vision", "projector", "signals", "select", "LLM", "lm_head", "other", "total",
                    "LLM meas x", "LLM ideal x", "time bound x", "meas/bound"], split)
    return lines


# ---------------------------------------------------------------------------------------------------------------
# main
# ---------------------------------------------------------------------------------------------------------------


def keep_value(text: str) -> float | int:
    """A ``--keeps`` entry read by vtoken's one keep grammar (:func:`vtoken.bench.run.parse_keep`: a count, a ratio
    or a percentage); ``all`` is keep 1.0, which still runs the adapter."""
    keep = parse_keep(text)
    return 1.0 if keep is None else keep


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--methods", nargs="+", default=DEFAULT_METHODS, help="method names (unsupported ones are skipped)")
    p.add_argument("--keeps", nargs="+", default=["all", "192", "128", "64"],
                   help="tokens kept per image (a count, ratio or percentage), or 'all'")
    p.add_argument("--repeats", type=int, default=3, help="timed generate calls per configuration (median)")
    p.add_argument("--warmup", type=int, default=0, help="untimed calls per configuration (one global warm-up of "
                   "the unpatched model always runs)")
    p.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                   help="wall time, or the process's CPU time (with --threads 1 on a shared machine: the time spent "
                   "computing, without the time spent waiting for a core)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default=None,
                   help="weights/activations (default fp32 on CPU, bf16 on CUDA)")
    p.add_argument("--scale", choices=["llava", "next", "both"], default="llava")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--lm", choices=["qwen2-0.5b", "llama-0.4b"], default="qwen2-0.5b")
    p.add_argument("--vision-layers", type=int, default=6)
    p.add_argument("--vision-width", type=int, default=768)
    p.add_argument("--quick", action="store_true", help="tiny model (4-layer tower, 4-layer LM) for a smoke run")
    p.add_argument("--markdown", help="also write the tables as Markdown to this path")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    args.dtype = args.dtype or ("fp32" if args.device == "cpu" else "bf16")
    args.torch_dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    cuda = args.device.startswith("cuda")

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize()

    t_start = time.perf_counter()
    model = build_model(args)
    adapter_cls = find_adapter(model)
    methods, skipped = [], []
    for name in args.methods:
        why = adapter_cls.unsupported(vtoken.get_method(name))
        (skipped.append(f"{name}: {why}") if why else methods.append(name))
    keeps = [keep_value(k) for k in args.keeps]
    cfg = model.config
    lm_params = sum(p.numel() for p in {p.data_ptr(): p for m in (model.model.language_model, model.lm_head)
                                         for p in m.parameters()}.values())
    vit_params = sum(p.numel() for p in model.model.vision_tower.parameters())
    v = cost.vision_dims(cfg)
    t = cost.text_dims(cfg)
    header = [
        f"vtoken prefill benchmark: {args.device} ({platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} CPUs), torch {torch.__version__}, {torch.get_num_threads()} threads, {args.dtype}, "
        f"{args.clock} clock, median of {args.repeats} repeats.",
        f"Vision: CLIP {v.layers} layers x {v.hidden} wide, {v.patches} patches (+CLS) per image, "
        f"{vit_params / 1e6:.0f}M params, {cost.vit_flops(cfg) / 1e9:.1f} GFLOPs per image. "
        f"LM: {'tiny' if args.quick else args.lm}, {t.layers} layers x {t.hidden}, {t.heads} heads / {t.kv_heads} KV, "
        f"MLP {t.intermediate}, vocab {t.vocab}: {lm_params / 1e6:.0f}M params "
        f"(analytic {cost.llm_param_count(cfg) / 1e6:.0f}M), "
        f"{cost.llm_prefill_flops(cfg, 1, logits=0) / 1e6:.0f} MFLOPs per token.",
        f"Prompt: {PREFIX} + visual + {SUFFIX} text tokens, batch 1. Load average at start: "
        f"{' '.join(f'{x:.2f}' for x in os.getloadavg())}. Command: {' '.join(['python', *sys.argv])}",
    ]
    if skipped:
        header.append("Skipped: " + "; ".join(skipped))
    print("\n".join(header), flush=True)
    probe = Probe(sync, time.process_time if args.clock == "cpu" else time.perf_counter)
    inner = model.model
    for module, name in ((model, "forward"), (inner.vision_tower, "vision"), (inner.multi_modal_projector, "projector"),
                         (inner.language_model, "llm"), (model.lm_head, "lm_head")):
        probe.hook(module, name)
    original_reduce = pipeline_module.reduce
    pipeline_module.reduce = probe.wrap("select", original_reduce)  # the pipeline's call into vtoken.reduce
    lines, errors = list(header), []
    try:
        with torch.inference_mode():
            for scale in (["llava", "next"] if args.scale == "both" else [args.scale]):
                inputs = make_inputs(model, SCALES[scale], args.device, args.torch_dtype)
                model.generate(**inputs, max_new_tokens=1, do_sample=False)  # warm-up
                first = measure(model, inputs, None, None, args, probe)
                print(f"[{scale}] unpatched prefill {first.prefill_ms:.0f} ms, seq {first.seq}", flush=True)
                results = []
                for method in methods:
                    for keep in keeps:
                        try:
                            r = measure(model, inputs, method, keep, args, probe)
                        except Exception as err:  # report a failing configuration, keep measuring the others
                            errors.append(f"[{scale}] {method} keep={keep}: {type(err).__name__}: {err}")
                            print(errors[-1], flush=True)
                            continue
                        print(f"[{scale}] {method} keep={r.keep}: prefill {r.prefill_ms:.0f} ms, visual {r.visual}, "
                              f"select {r.stage('signals') + r.stage('select'):.1f} ms", flush=True)
                        results.append(r)
                last = measure(model, inputs, None, None, args, probe)
                base = Result("unpatched", "-", first.visual, first.seq, first.prefill + last.prefill,
                              first.ttft + last.ttft, first.kv_bytes, first.kv_expected,
                              {k: first.stages[k] + last.stages[k] for k in first.stages}, first.flops,
                              first.llm_flops)
                lines += ["", *report(scale, [base, *results], base, (first.prefill_ms, last.prefill_ms))]
    finally:
        pipeline_module.reduce = original_reduce
        probe.remove()
    if errors:
        lines += ["", "Errors:", *[f"- {e}" for e in errors]]
    lines += ["", f"Load average at end: {' '.join(f'{x:.2f}' for x in os.getloadavg())}; "
              f"wall time {time.perf_counter() - t_start:.0f} s."]
    text = "\n".join(lines)
    print("\n" + text)
    if args.markdown:
        Path(args.markdown).parent.mkdir(parents=True, exist_ok=True)
        Path(args.markdown).write_text(text + "\n")


if __name__ == "__main__":
    main()
