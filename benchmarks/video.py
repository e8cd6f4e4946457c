"""Prefill cost of ``vtoken.apply`` on videos: random-weight video VLMs at real token budgets (built from configs).

Scales (batch 1; 5 text tokens, the clip, 35 text tokens):
  * ``--scale onevision``: LLaVA-OneVision-shaped: 32 frames of 384 px through a SigLIP-shaped tower (27 x 27 patches,
    ``--vision-width``/``--vision-layers``, narrow by default so a CPU can run it: the tower's work is the same in
    every row), the 2-layer projector, the model's 2 x 2 bilinear pooling: 32 x 196 = 6,272 visual tokens (+ the
    clip's newline) on the Qwen2-0.5B-shaped LM (hidden 896, 14 heads / 2 KV heads, MLP 4864, vocab 151,936).
  * ``--scale qwen2_5_vl``: Qwen2.5-VL-shaped: 32 frames of 448 px, temporal patches of 2, 14 px patches, the 2 x 2
    merger: 16 x 256 = 4,096 visual tokens with M-RoPE, the same LM shapes (Qwen2.5-VL's own 0.5B-class LM does not
    exist; Qwen2-0.5B's shapes keep the two scales comparable).
``--lm-layers`` shortens the LM for a quick CPU run (FLOP ratios are per layer, so the ideal speedup is unchanged).
A method may compose steps with ``+``, a step's own budget after ``@`` (``dycoke+dycoke_kv@30%``: DyCoke in full,
its decode stage keeping 30% of the visual tokens at every step; the grid's keep applies to the other steps).

Per method and clip budget (``--keeps``, default 25% and 10% of the clip; ``all`` = keep 1.0), medians of
``--repeats`` runs:
  * prefill: one forward over the prompt (``use_cache=True``, ``logits_to_keep=1``), vision encoding included;
  * TTFT: ``generate(max_new_tokens=1)``;
  * select: time inside the adapter's video reduction (signals + the method), in ms and as a share of the patched
    prefill (goal <= 2%);
  * KV: bytes of the key/value cache after the prefill;
  * ideal speedup: (tower + projector + LM prefill FLOPs, full) / (the same, reduced) from ``vtoken.bench.cost``;
    measured = unpatched prefill / patched prefill; goal at 10%: measured / ideal >= 0.9.
  * with ``--decode N``: decode ms per token (median time between consecutive tokens of ``generate``, ``N + 1``
    tokens: ``N`` decoding steps after the prefill's) and the KV
    cache the attention reads after those steps (``store`` MiB: what a decode-stage method holds beside it).

    python benchmarks/video.py --quick                                   # tiny shapes, a smoke run in seconds
    python benchmarks/video.py --scale onevision --lm-layers 4 --repeats 2 --markdown out/video.md
    python benchmarks/video.py --scale qwen2_5_vl --methods evs vidcom2 --keeps 25% 10%
    python benchmarks/video.py --lm-layers 4 --decode 16 --methods dycoke dycoke+dycoke_kv@30% dycoke_kv@30%
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import (
    LlavaOnevisionConfig,
    LlavaOnevisionForConditionalGeneration,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2Config,
    SiglipVisionConfig,
    StoppingCriteria,
)

import vtoken
from vtoken.bench import cost
from vtoken.bench.run import parse_keep

DEFAULT_METHODS = ["frame_stride", "temporal_pool", "uniform", "divprune", "evs", "vidcom2", "dycoke", "sttm",
                   "fastvid", "holitom"]
PREFIX, SUFFIX, FRAMES = 5, 35, 32
LM = dict(hidden_size=896, intermediate_size=4864, num_attention_heads=14, num_key_value_heads=2, vocab_size=151936,
          tie_word_embeddings=True, rope_theta=1e6, max_position_embeddings=32768)
TINY_LM = dict(hidden_size=128, intermediate_size=256, num_attention_heads=4, num_key_value_heads=2, vocab_size=1000,
               max_position_embeddings=32768)


@dataclass
class Result:
    method: str
    keep: str
    visual: int
    seq: int
    prefill: list[float]
    ttft: list[float]
    select: list[float]
    kv_bytes: int
    flops: float
    decode: list[float]
    kv_end: int
    store: int

    @property
    def prefill_ms(self) -> float:
        return statistics.median(self.prefill)

    @property
    def ttft_ms(self) -> float:
        return statistics.median(self.ttft)

    @property
    def decode_ms(self) -> float:
        return statistics.median(self.decode) if self.decode else 0.0

    @property
    def select_ms(self) -> float:
        return statistics.median(self.select) if self.select else 0.0


# ---- models and inputs --------------------------------------------------------------------------------------------


def build(args: argparse.Namespace) -> tuple[torch.nn.Module, dict[str, torch.Tensor], Callable[[int], float]]:
    """The model, one prompt with one clip, and the tower + projector FLOPs as a function of the kept tokens."""
    torch.manual_seed(0)
    lm = dict(TINY_LM if args.quick else LM, num_hidden_layers=2 if args.quick else args.lm_layers)
    text = Qwen2Config(pad_token_id=0, bos_token_id=1, eos_token_id=2, **lm)
    vocab = text.vocab_size
    frames = 4 if args.quick else FRAMES
    g = torch.Generator().manual_seed(1)
    if args.scale == "onevision":
        px = 56 if args.quick else 384
        vision = SiglipVisionConfig(hidden_size=args.vision_width, intermediate_size=4 * args.vision_width,
                                    num_hidden_layers=args.vision_layers, num_attention_heads=args.vision_width // 64,
                                    image_size=px, patch_size=14, vision_use_head=False)
        cfg = LlavaOnevisionConfig(vision_config=vision, text_config=text, image_token_index=vocab - 2,
                                   video_token_index=vocab - 1, vision_feature_layer=-1,
                                   vision_feature_select_strategy="full", tie_word_embeddings=True)
        side = -(-(px // 14) // 2)
        n_visual = frames * side * side + 1  # + the clip's newline
        ids = torch.cat([torch.randint(3, vocab - 2, (PREFIX,), generator=g), torch.full((n_visual,), vocab - 1),
                         torch.randint(3, vocab - 2, (SUFFIX,), generator=g)])[None]
        inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids),
                  "pixel_values_videos": torch.randn(1, frames, 3, px, px, generator=g)}
        model_cls: Any = LlavaOnevisionForConditionalGeneration

        def tower(_kept: int) -> float:
            return cost.vit_flops(cfg, frames) + cost.projector_flops(cfg, frames * (px // 14) ** 2)
    else:
        px = 56 if args.quick else 448
        grid = px // 14
        vision = dict(depth=args.vision_layers, hidden_size=args.vision_width, out_hidden_size=text.hidden_size,
                      intermediate_size=4 * args.vision_width, num_heads=args.vision_width // 64, patch_size=14,
                      spatial_merge_size=2, temporal_patch_size=2, window_size=112, fullatt_block_indexes=[
                          args.vision_layers - 1])
        half = text.hidden_size // text.num_attention_heads // 2  # rotary pairs: t, h, w sections as Qwen2.5-VL's
        section = [half // 4, 3 * half // 8, half - half // 4 - 3 * half // 8]  # [16, 24, 24] of 64 pairs
        text_dict = {**text.to_dict(), "rope_parameters": {"rope_type": "default", "mrope_section": section,
                                                           "rope_theta": 1e6}}
        cfg = Qwen2_5_VLConfig(text_config=text_dict, vision_config=vision, image_token_id=vocab - 4,
                               video_token_id=vocab - 3, vision_start_token_id=vocab - 2, vision_end_token_id=vocab - 1)
        t = frames // 2
        n_visual = t * (grid // 2) ** 2
        ids = torch.cat([torch.randint(3, vocab - 4, (PREFIX,), generator=g), torch.tensor([vocab - 2]),
                         torch.full((n_visual,), vocab - 3), torch.tensor([vocab - 1]),
                         torch.randint(3, vocab - 4, (SUFFIX,), generator=g)])[None]
        inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids),
                  "mm_token_type_ids": 2 * (ids == vocab - 3).int(),
                  "pixel_values_videos": torch.randn(t * grid * grid, 3 * 2 * 14 * 14, generator=g),
                  "video_grid_thw": torch.tensor([[t, grid, grid]]), "second_per_grid_ts": torch.tensor([1.0])}
        model_cls = Qwen2_5_VLForConditionalGeneration
        patches, w = t * grid * grid, args.vision_width

        def tower(_kept: int) -> float:  # ViT blocks over all patches (attention within windows/frames) + merger
            per = 2 * patches * (4 * w * w + 2 * w * 4 * w) + 4 * patches * (grid * grid) * w
            return args.vision_layers * per + 2 * (patches // 4) * (4 * w * 4 * w + 4 * w * text.hidden_size)
    for c in (cfg, cfg.vision_config, cfg.text_config):
        c._attn_implementation = "sdpa"
    model = model_cls(cfg).eval().to(dtype=args.torch_dtype)
    model.generation_config.pad_token_id = 0
    model.generation_config.eos_token_id = None
    inputs = {k: v.to(args.torch_dtype) if v.is_floating_point() else v for k, v in inputs.items()}
    return model, inputs, tower


# ---- measurement ------------------------------------------------------------------------------------------------


def steps_of(method: str) -> list[Any]:
    """``a+b@30%`` -> ``["a", vtoken.method("b", keep=0.3)]`` (see the module docstring)."""
    out: list[Any] = []
    for part in method.split("+"):
        name, _, own = part.partition("@")
        out.append(vtoken.method(name, keep=parse_keep(own)) if own else name)
    return out


class Clock(StoppingCriteria):
    """Stops nothing; records when each generated token is ready."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        self.times.append(time.perf_counter())
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)


def cache_bytes(cache: Any) -> int:
    return sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values))


def measure(model: torch.nn.Module, inputs: dict[str, torch.Tensor], method: str | None, keep: Any,
            args: argparse.Namespace, tower: Callable[[int], float]) -> Result:
    handle = vtoken.apply(model, steps_of(method), keep=keep) if method else None
    select: list[float] = []
    try:
        if handle is not None:
            inner = handle.adapter.reduce_videos

            def timed(*a: Any, **k: Any) -> Any:
                t0 = time.perf_counter()
                try:
                    return inner(*a, **k)
                finally:
                    select.append((time.perf_counter() - t0) * 1e3)

            handle.adapter.reduce_videos = timed
        prefill, ttft = [], []
        with torch.no_grad():
            for r in range(args.warmup + args.repeats):
                t0 = time.perf_counter()
                out = model(**inputs, use_cache=True, logits_to_keep=1)
                t1 = time.perf_counter()
                model.generate(**inputs, max_new_tokens=1, do_sample=False)
                t2 = time.perf_counter()
                if r >= args.warmup:
                    prefill.append((t1 - t0) * 1e3)
                    ttft.append((t2 - t1) * 1e3)
        cache = out.past_key_values
        seq = cache.get_seq_length()
        kv = cache_bytes(cache)
        n_video = int((inputs["input_ids"] == model.config.video_token_id).sum())
        visual = int(handle.video.mask.sum()) if handle is not None and handle.video is not None else n_video
        decode, kv_end, store = [], kv, 0
        if args.decode:
            n = args.decode
            with torch.no_grad():
                for r in range(args.warmup + args.repeats):
                    clock = Clock()
                    gen = model.generate(**inputs, max_new_tokens=n + 1, min_new_tokens=n + 1, do_sample=False,
                                         return_dict_in_generate=True, stopping_criteria=[clock])
                    if r >= args.warmup:  # the steps after the first token (the prefill's)
                        decode += [(b - a) * 1e3 for a, b in zip(clock.times, clock.times[1:], strict=False)]
            kv_end = cache_bytes(gen.past_key_values)
            kvs = handle.adapter.llm.kv if handle is not None and handle.adapter.llm is not None else None
            if kvs is not None:
                store = sum(t.numel() * t.element_size() for pair in kvs.store.values() for t in pair)
    finally:
        if handle is not None:
            handle.remove()
    select = select[2 * args.warmup::2][:args.repeats]  # each run: the forward's reduction, then generate's
    flops = tower(visual) + cost.llm_prefill_flops(model.config, seq, 1, logits=1)
    label = "-" if method is None else "all" if keep == 1.0 else f"{keep:.0%}" if isinstance(keep, float) else str(keep)
    return Result(method or "unpatched", label, visual, seq, prefill, ttft, select, kv, flops, decode, kv_end, store)


def report(scale: str, results: list[Result], base: Result) -> list[str]:
    header = ["method", "keep", "visual", "seq", "prefill ms", "TTFT ms", "select ms", "select %", "KV MiB",
              "ideal x", "measured x", "meas/ideal"]
    decoding = bool(base.decode)
    if decoding:
        header += ["decode ms/tok", "decode x", "KV end MiB", "store MiB"]
    rows = []
    for r in results:
        ideal = base.flops / r.flops
        meas = base.prefill_ms / r.prefill_ms
        row = [r.method, r.keep, str(r.visual), str(r.seq), f"{r.prefill_ms:.0f}", f"{r.ttft_ms:.0f}",
               f"{r.select_ms:.1f}", f"{100 * r.select_ms / r.prefill_ms:.2f}" if r.select else "-",
               f"{r.kv_bytes / 2**20:.1f}", f"{ideal:.2f}", f"{meas:.2f}", f"{meas / ideal:.2f}"]
        if decoding:
            row += [f"{r.decode_ms:.1f}", f"{base.decode_ms / r.decode_ms:.2f}", f"{r.kv_end / 2**20:.1f}",
                    f"{r.store / 2**20:.1f}"]
        rows.append(row)
    lines = [f"### {scale}: video prefill, TTFT, selection overhead, KV cache and speedup", "",
             "| " + " | ".join(header) + " |", "|" + "|".join("---" if i < 2 else "---:" for i in range(len(header)))
             + "|"]
    return lines + ["| " + " | ".join(r) + " |" for r in rows]


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--scale", choices=["onevision", "qwen2_5_vl", "both"], default="onevision")
    p.add_argument("--methods", nargs="+", default=DEFAULT_METHODS)
    p.add_argument("--keeps", nargs="+", default=["25%", "10%"], help="clip budgets (vtoken's keep grammar)")
    p.add_argument("--lm-layers", type=int, default=24)
    p.add_argument("--vision-layers", type=int, default=4)
    p.add_argument("--vision-width", type=int, default=384)
    p.add_argument("--dtype", choices=["fp32", "bf16"], default="bf16")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--quick", action="store_true", help="tiny shapes, one repeat: a smoke run")
    p.add_argument("--markdown", type=Path)
    p.add_argument("--decode", type=int, default=0, help="also time N decoding steps (decode-stage methods)")
    args = p.parse_args(argv)
    if args.quick:
        args.repeats, args.warmup, args.vision_width, args.vision_layers = 1, 0, 64, 2
    args.torch_dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    if args.threads:
        torch.set_num_threads(args.threads)
    keeps = [parse_keep(k) for k in args.keeps]
    lines: list[str] = [f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.dtype}, LM layers "
                        f"{2 if args.quick else args.lm_layers}", ""]
    errors = []
    for scale in (["onevision", "qwen2_5_vl"] if args.scale == "both" else [args.scale]):
        args.scale = scale
        model, inputs, tower = build(args)
        base = measure(model, inputs, None, None, args, tower)
        print(f"[{scale}] unpatched prefill {base.prefill_ms:.0f} ms, {base.visual} visual tokens", flush=True)
        results = [base]
        for method in args.methods:
            for keep in keeps:
                try:
                    r = measure(model, inputs, method, keep, args, tower)
                except (ValueError, TypeError) as err:
                    errors.append(f"[{scale}] {method} keep={keep}: {err}")
                    continue
                results.append(r)
                print(f"[{scale}] {method} {r.keep}: prefill {r.prefill_ms:.0f} ms, visual {r.visual}, "
                      f"select {r.select_ms:.1f} ms", flush=True)
        lines += [*report(scale, results, base), ""]
        if args.markdown:  # after every scale, so a long run keeps what it measured
            args.markdown.parent.mkdir(parents=True, exist_ok=True)
            args.markdown.write_text("\n".join(lines) + "\n")
    if errors:
        lines += ["Not run:", *[f"- {e}" for e in errors]]
    text = "\n".join(lines)
    print(text)
    if args.markdown:
        args.markdown.parent.mkdir(parents=True, exist_ok=True)
        args.markdown.write_text(text + "\n")


if __name__ == "__main__":
    sys.exit(main())
