"""Training the bundled micro models: the micro ViT classifier (encoder-stage methods) and the micro LLaVA (the
default model of ``vtoken bench``), seeded and resumable bit-exact on CPU.

- :mod:`~vtoken.training.micro_llava`: the micro LLaVA's config, word-level tokenizer, processor and loader.
- :mod:`~vtoken.training.train_vit`: the micro ViT's config and trainer (``python -m vtoken.training.train_vit``).
- :mod:`~vtoken.training.train_llava`: the micro LLaVA's two-stage trainer (``python -m vtoken.training.train_llava``).
- :mod:`~vtoken.training.train_micro`: ``vtoken train-micro``, both with the recipes of the shipped weights.
- :mod:`~vtoken.training.common`: the helpers both trainers share, exported here: :data:`CHECKPOINT` and
  :data:`METRICS` (file names in a run folder), :func:`pick_device` (CUDA when present), :func:`rng_state` /
  :func:`set_rng_state`, :func:`check_resume` (a checkpoint's run arguments must match) and :func:`save_atomic`.

Imports point one way: the trainers use the bench's task data (:mod:`vtoken.bench.fashion`), its answering path
(:mod:`vtoken.bench.vqa`) and :mod:`vtoken.bench.common` (bundled model folders, progress bar); nothing in
``vtoken.bench`` imports ``vtoken.training``.
"""

from .common import CHECKPOINT, METRICS, check_resume, pick_device, rng_state, save_atomic, set_rng_state

__all__ = ["CHECKPOINT", "METRICS", "check_resume", "pick_device", "rng_state", "save_atomic", "set_rng_state"]
