"""The accuracy/evaluation harness behind ``vtoken bench``, ``vtoken show`` and ``vtoken demo``.

- :mod:`~vtoken.bench.run`: ``vtoken bench``, methods x budgets on a VLM through :func:`vtoken.apply` (accuracy,
  prefill latency, FLOPs, KV-cache bytes; resumable, data parallel under torchrun); :func:`~vtoken.bench.run.parse_keep`
  is the one parser of ``--keep`` budgets.
- :mod:`~vtoken.bench.fashion`: the Fashion collage VQA task (data, the bundled test set, scoring).
- :mod:`~vtoken.bench.vqa`: chat prompts and greedy answers through a model's processor and ``generate``.
- :mod:`~vtoken.bench.report`: the report files (JSON, CSV, Markdown, Pareto plot, overlays).
- :mod:`~vtoken.bench.cost`: analytic FLOPs and KV-cache bytes.
- :mod:`~vtoken.bench.show`: ``vtoken show``; :mod:`~vtoken.bench.demo` and :mod:`~vtoken.bench.images`:
  ``vtoken demo`` on a sample image's pixel patches (signals from :mod:`vtoken.synthetic`).
- :mod:`~vtoken.bench.errors`: one-line errors for bad input; :mod:`~vtoken.bench.common`: the bundled model
  folders and the progress bar, shared with :mod:`vtoken.training` (which trains the micro models; nothing here
  imports it).

Speed and memory scripts (``reduce`` time per method, prefill / TTFT / KV bytes) live in ``benchmarks/`` at the
repository root, not here (``benchmarks/README.md``).
"""
