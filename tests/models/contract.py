"""The adapter contract (design.md invariants 1-3, generation, the KV cache, attention kernels, errors) as checks that
every family's tests run on its own tiny model, inputs and methods. Each ``check_*`` makes the assertions itself."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import pytest
import torch
from torch import Tensor, nn

import vtoken
from vtoken.core import Reduction
from vtoken.methods import LM_STAGES

#: signals that make a method's selection depend on the tower's attention (checked under sdpa and eager)
ATTENTION_SIGNALS = frozenset({"cls_attn", "cls_attn_layers", "attn", "attn_logits", "attn_received_layers", "keys"})

Inputs = dict[str, Tensor]


VIDEO_SIGNALS = frozenset({"video_grid", "frame_features"})


def supported(adapter: Any, video: bool = False) -> list[str]:
    """Every method the adapter class can run before the language model on images (``llm``-stage methods have their
    own checks in ``tests/models/test_llm_stage.py``); with ``video``, the methods that need a video's frame layout
    (:data:`VIDEO_SIGNALS`) instead."""
    return [m.name for m in vtoken.methods() if adapter.unsupported(m) is None and m.stage not in LM_STAGES
            and bool(VIDEO_SIGNALS & set(m.signals)) == video]


def attention_methods(adapter: Any, signals: frozenset[str] = ATTENTION_SIGNALS) -> list[str]:
    """The supported methods that need one of ``signals``."""
    return [m.name for m in vtoken.methods() if adapter.unsupported(m) is None and signals & set(m.signals)]


def pre_llm_methods(video: bool = False) -> set[str]:
    """Methods a VLM family is expected to run: the pre-LLM and video stages, less layout methods, and less the
    methods that need a video's frame layout (``VIDEO_SIGNALS``) unless the family takes videos (``video``)."""
    return {m.name for m in vtoken.methods() if m.stage in ("pre_llm", "video") and m.kind != "layout"
            and (video or not VIDEO_SIGNALS & set(m.signals))}


@torch.no_grad()
def logits(model: nn.Module, inputs: Inputs) -> Tensor:
    return model(**inputs).logits


def kept_rows(indices: Tensor) -> list[list[int]]:
    """The valid (non-padding) indices of each row."""
    return [[i for i in row if i >= 0] for row in indices.tolist()]


def hook_counts(model: nn.Module) -> dict[str, int]:
    """Forward and forward-pre hooks on every submodule, by name."""
    return {name: len(m._forward_hooks) + len(m._forward_pre_hooks) for name, m in model.named_modules()}


def assert_unpatched(model: nn.Module, hooks: dict[str, int]) -> None:
    """No patched ``forward`` on the instance and the hooks of before."""
    assert "forward" not in model.__dict__
    assert hook_counts(model) == hooks


def check_keep_all(model: nn.Module, inputs: Inputs, method: str, check_last: Callable[[Reduction], None],
                   reference: tuple[Tensor, Tensor] | None = None, max_new_tokens: int = 4) -> None:
    """keep=1.0: logits and ``generate`` identical (``torch.equal``) to the unpatched model's ``reference`` (computed
    when not given); ``check_last`` asserts the family's full-indices layout on ``handle.last`` after each."""
    gen = {"max_new_tokens": max_new_tokens, "do_sample": False}
    ref, gen_ref = reference if reference is not None else (logits(model, inputs), model.generate(**inputs, **gen))
    with vtoken.apply(model, method, keep=1.0) as handle:
        assert torch.equal(logits(model, inputs), ref)
        check_last(handle.last)
        assert torch.equal(model.generate(**inputs, **gen), gen_ref)
        check_last(handle.last)


def check_remove(model: nn.Module, inputs: Inputs, method: str, keep: int | float,
                 reference: Tensor | None = None) -> None:
    """A reducing handle shortens the sequence; ``remove()`` restores bit-exact logits, drops every hook and the
    patched ``forward``, and is idempotent."""
    ref = logits(model, inputs) if reference is None else reference
    hooks = hook_counts(model)
    handle = vtoken.apply(model, method, keep=keep)
    assert sum(hook_counts(model).values()) > sum(hooks.values())
    assert logits(model, inputs).shape[1] < ref.shape[1]
    handle.remove()
    assert_unpatched(model, hooks)
    assert torch.equal(logits(model, inputs), ref)
    handle.remove()  # idempotent


def check_batch(model: nn.Module, inputs: Inputs, method: str, keep: int | float, samples: Sequence[Inputs],
                image_sample: Sequence[int] | None = None) -> Reduction:
    """The batch equals each sample alone: last-token logits (atol 2e-5) and every image's kept indices.

    ``samples[b]`` is sample ``b`` alone (no padding); ``image_sample[i]`` the sample of image ``i`` (row ``i`` of
    ``handle.last``; default: one image per sample). Returns the batch's ``handle.last``."""
    sample_of = list(image_sample) if image_sample is not None else list(range(len(samples)))
    with vtoken.apply(model, method, keep=keep) as handle:
        batch = logits(model, inputs)[:, -1]
        last = handle.last
        rows = kept_rows(last.indices)
        for b, one in enumerate(samples):
            alone = logits(model, one)[:, -1]
            mine = [row for row, s in zip(rows, sample_of, strict=True) if s == b]
            got = handle.last.indices
            # one image: its whole row (no padding); several: the valid indices of each
            assert (got.tolist() if len(mine) == 1 else kept_rows(got)) == mine
            torch.testing.assert_close(alone[0], batch[b], atol=2e-5, rtol=1e-4)
    return last


def check_cache(model: nn.Module, inputs: Inputs, method: str, keep: int | float,
                image_sample: Sequence[int] | None = None, max_new_tokens: int = 4) -> None:
    """After ``generate``, the cache holds the longest compacted prefill (text, padding and kept visual tokens, the
    kept ``extras["newlines"]`` included) + the generated tokens - 1; the output has all the generated tokens."""
    with vtoken.apply(model, method, keep=keep) as handle:
        out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, return_dict_in_generate=True)
        kept = handle.last.mask.sum(1) + handle.last.extras.get("newlines", 0)
    ids = inputs["input_ids"]
    sample_of = torch.tensor(image_sample) if image_sample is not None else torch.arange(ids.shape[0])
    per_sample = torch.zeros(ids.shape[0], dtype=torch.long).index_add_(0, sample_of, kept)
    text = (ids != model.config.image_token_id).sum(1)  # padding columns stay (they are masked)
    prefill = int((text + per_sample).max())
    assert out.past_key_values.get_seq_length() == prefill + max_new_tokens - 1
    assert out.sequences.shape[1] == ids.shape[1] + max_new_tokens


@torch.no_grad()
def embed_images(model: nn.Module, input_ids: Tensor, features: Any) -> Tensor:
    """The model's input embeddings ``[B, L, D]`` with ``features`` (per image ``[n_i, D]``, or ``[I, n, D]``) at the
    image placeholders in row-major order."""
    embeds = model.get_input_embeddings()(input_ids)
    embeds[input_ids == model.config.image_token_id] = torch.cat(list(features)).to(embeds.dtype)
    return embeds


def kept_columns(image: Tensor, kept: Sequence[Sequence[int]], tokens: Sequence[int]) -> Tensor:
    """``[B, L]`` bool: the text columns and the placeholders of the kept tokens. Image ``i`` owns the next
    ``tokens[i]`` placeholders of ``image [B, L]`` in row-major order; ``kept[i]`` indexes them."""
    keep = ~image
    rows, cols = image.nonzero(as_tuple=True)
    start = 0
    for idx, n in zip(kept, tokens, strict=True):
        sel = torch.tensor(list(idx), dtype=torch.long)
        keep[rows[start : start + n][sel], cols[start : start + n][sel]] = True
        start += n
    return keep


@torch.no_grad()
def check_hand_built(model: nn.Module, got: Tensor, embeds: Tensor, keep: Tensor, attention_mask: Tensor,
                     position_ids: Callable[[int, Tensor], Tensor] | None = None) -> list[Tensor]:
    """Per sample ``b``: the model on only the ``keep [B, L]`` (and unmasked) columns of ``embeds``, with their original
    position ids (the column, or ``position_ids(b, columns)``), gives ``got``'s last logits (atol 2e-5). Returns the
    columns of each sample."""
    out = []
    for b in range(keep.shape[0]):
        real = keep[b] & attention_mask[b].bool()
        pos = torch.arange(keep.shape[1])[real][None] if position_ids is None else position_ids(b, real)
        ref = model(inputs_embeds=embeds[b : b + 1, real], position_ids=pos,
                    attention_mask=torch.ones(1, int(real.sum()), dtype=torch.long)).logits
        torch.testing.assert_close(got[b, -int(real.sum()):], ref[0], atol=2e-5, rtol=1e-4)
        out.append(real)
    return out


def check_positions(model: nn.Module, inputs: Inputs, method: str, keep: int | float, features: Any,
                    tokens: Sequence[int]) -> None:
    """Kept tokens keep their columns and position ids: the reduced logits equal the model on the full embeddings
    (image ``features`` from the model itself, see :func:`embed_images`) at only the text and kept columns, image ``i``
    owning ``tokens[i]`` placeholders (:func:`kept_columns`)."""
    with vtoken.apply(model, method, keep=keep) as handle:
        got = logits(model, inputs)
        kept = kept_rows(handle.last.indices)
    ids = inputs["input_ids"]
    columns = kept_columns(ids == model.config.image_token_id, kept, tokens)
    check_hand_built(model, got, embed_images(model, ids, features), columns, inputs["attention_mask"])


def check_sdpa_eager(build: Callable[[str], nn.Module], inputs: Inputs, method: str, keep: int | float) -> None:
    """``build("sdpa")`` and ``build("eager")`` (the same weights) select identical indices."""
    chosen = []
    for attn in ("sdpa", "eager"):
        m = build(attn)
        assert m.config.vision_config._attn_implementation == attn
        assert m.config.text_config._attn_implementation == attn
        with vtoken.apply(m, method, keep=keep) as handle:
            logits(m, inputs)
            chosen.append(handle.last.indices.clone())
    assert torch.equal(chosen[0], chosen[1])


def check_two_models(a: nn.Module, b: nn.Module, inputs: Inputs, keep: int) -> None:
    """Patching instance ``a`` leaves ``b`` (the same class and weights) untouched; both patched, each reduces with its
    own method and ``keep`` (one image per sample)."""
    ref_b = logits(b, inputs)
    n = inputs["input_ids"].shape[0]
    with vtoken.apply(a, "divprune", keep=keep) as ha:
        assert "forward" not in b.__dict__
        assert torch.equal(logits(b, inputs), ref_b)
        with vtoken.apply(b, "random", keep=4) as hb:
            logits(a, inputs)
            logits(b, inputs)
            assert ha.last.mask.sum(1).tolist() == [keep] * n
            assert hb.last.mask.sum(1).tolist() == [4] * n


def check_labels(model: nn.Module, inputs: Inputs, keep: int | float = 8) -> None:
    """``labels`` are compacted with the sequence: a finite loss."""
    labels = inputs["input_ids"].masked_fill(inputs["attention_mask"] == 0, -100)
    with vtoken.apply(model, "divprune", keep=keep):
        out = model(**inputs, labels=labels)
    assert torch.isfinite(out.loss)


#: an ``apply`` that must fail: ``(exception, match, method, apply keyword arguments)``
Rejected = tuple[type[Exception], str, Any, dict[str, Any]]
#: a call that must fail on a patched model: ``(method, apply keyword arguments, call inputs, exception, match)``
Failing = tuple[str, dict[str, Any], Inputs, type[Exception], str]


def check_errors(model: nn.Module, inputs: Inputs, rejected: Sequence[Rejected], failing: Sequence[Failing] = (),
                 keep: int | float = 8, reference: Tensor | None = None) -> None:
    """Every ``rejected`` apply raises and leaves the model unpatched (no ``forward``, no hooks); so does applying to an
    already patched model and every ``failing`` call; then the logits equal the unpatched ``reference``."""
    ref = logits(model, inputs) if reference is None else reference
    hooks = hook_counts(model)
    for exc, match, method, kw in rejected:
        with pytest.raises(exc, match=match):
            vtoken.apply(model, method, **kw)
    assert_unpatched(model, hooks)
    with vtoken.apply(model, "divprune", keep=keep), pytest.raises(ValueError, match="already"):
        vtoken.apply(model, "random", keep=keep)
    assert_unpatched(model, hooks)
    for method, kw, call, exc, match in failing:
        with vtoken.apply(model, method, **kw), pytest.raises(exc, match=match):
            model(**call)
    assert_unpatched(model, hooks)
    assert torch.equal(logits(model, inputs), ref)


# ---- padding sides -------------------------------------------------------------------------------------------


def right_padded(inputs: Inputs) -> Inputs:
    """The same prompts with their padding moved to the right (per-token inputs moved along)."""
    mask = inputs["attention_mask"]
    order = torch.sort((mask == 0).to(torch.int8), dim=1, stable=True).indices  # real columns first
    out = dict(inputs)
    for key in ("input_ids", "attention_mask", "mm_token_type_ids"):
        if key in inputs:
            out[key] = inputs[key].gather(1, order)
    return out


def with_positions(inputs: Inputs) -> Inputs:
    """Explicit 1-D ``position_ids``: each sample's real tokens numbered from 0 (padding 0)."""
    return {**inputs, "position_ids": (inputs["attention_mask"].long().cumsum(1) - 1).clamp(min=0)}


def at_last_real(x: Tensor, mask: Tensor, b: int, columns: Tensor) -> Tensor:
    """Row ``b`` of an output ``x [B, L', ...]`` at sample ``b``'s last real prompt column, whichever side its padding
    is on; ``columns [B, L']`` maps output slots to prompt columns (``handle.last.extras["llm"]["columns"]``)."""
    last = int(torch.where(mask[b].bool(), torch.arange(mask.shape[1]), -1).max())
    slot = (columns[b] == last).nonzero()
    assert slot.numel() == 1, f"sample {b}'s last real token was dropped"
    return x[b, int(slot[0, 0])]


def check_padding_sides(model: nn.Module, inputs: Inputs, method: Any, keep: int | float,
                        alone: Callable[[Inputs, int], Inputs], positions: bool = True,
                        max_new_tokens: int = 3) -> None:
    """Invariant 3 for an ``llm``-stage ``method`` on a left-padded batch ``inputs`` and the same prompts right-padded,
    with and without explicit ``position_ids`` (``positions``: the family takes 1-D ones), through ``forward`` (the
    last real token's logits, the kept indices) and ``generate``. ``alone(inputs, b)`` is sample ``b`` alone, without
    padding. transformers itself numbers a right-padded prompt's generated tokens from its padding, so there
    ``generate`` must agree only where the unpatched model's batch agrees with its samples."""
    gen = {"max_new_tokens": max_new_tokens, "do_sample": False, "return_dict_in_generate": True,
           "output_logits": True}
    n = inputs["input_ids"].shape[0]
    variants = [(side, pos) for side in ("left", "right") for pos in ((False, True) if positions else (False,))]
    for side, pos in variants:
        batch_in = right_padded(inputs) if side == "right" else inputs
        batch_in = with_positions(batch_in) if pos else batch_in
        mask = batch_in["attention_mask"]
        where = f"{side} padding, {'explicit' if pos else 'no'} position_ids"
        if side == "right" and not pos:  # what the unpatched model's own generate gets right
            ref = model.generate(**batch_in, **gen).sequences[:, -max_new_tokens:]
            fine = [torch.equal(ref[b], model.generate(**alone(batch_in, b), **gen).sequences[0, -max_new_tokens:])
                    for b in range(n)]
        with vtoken.apply(model, method, keep=keep) as handle:
            out = logits(model, batch_in)
            kept = handle.last.indices.clone()
            cols = handle.last.extras["llm"]["columns"]  # llm-stage methods: prompt column of each output slot
            last_logits = [at_last_real(out, mask, b, cols) for b in range(n)]
            singles = [alone(batch_in, b) for b in range(n)]
            for b in range(n):
                one = logits(model, singles[b])
                torch.testing.assert_close(last_logits[b], one[0, -1], atol=2e-5, rtol=1e-4, msg=where)
                assert kept[b][kept[b] >= 0].tolist() == kept_rows(handle.last.indices)[0], where
            if pos and side == "right":
                continue  # generate extends explicit position ids from the last column, a right pad
            batch = model.generate(**batch_in, **gen)
            for b in range(n):
                if side == "right" and not fine[b]:
                    continue
                one = model.generate(**singles[b], **gen)
                assert torch.equal(batch.sequences[b, -max_new_tokens:], one.sequences[0, -max_new_tokens:]), where
                for step_b, step_1 in zip(batch.logits, one.logits, strict=True):
                    torch.testing.assert_close(step_b[b], step_1[0], atol=2e-5, rtol=1e-4, msg=where)
