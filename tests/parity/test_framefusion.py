"""Parity of ``framefusion`` with the official FrameFusion (``FrameFusion.prepare`` + ``FrameFusion.forward`` driven
with the official decoder-layer call pattern, fixture ``framefusion``).

Adapter (what the language model does around the method, not FrameFusion itself): the prompt ``[text, visual
tokens, text]`` as one sequence; every call hands the step (``vtoken.reduce(..., "framefusion")`` one call at a
time: ``llm_state`` is ``CASCADE_START`` at the first call, then the previous call's ``extras["state"]``) the visual
tokens (``patch_type != -1``) in sequence order with ``llm_frame_slots = patch_type`` and the budget ``cost`` (with
``keep=1.0``); the kept (merged) visual tokens replace the visual span, text stays. Calls follow the official
pattern: call 0 is layer 0 before its attention; before every later call ``layer_drift[k]`` (the stand-in
transformer) is added to every token; ``llm_attn`` is the heads' mean of ``prune_attention``'s last query row (its
visual columns) at a call that finds the sample done merging and not yet pruned, absent otherwise. The run stops
after the call that leaves the sample done. Position ids / rotary tables are gathered at the kept tokens' original
columns; ``kept_positions`` / ``merge_group`` follow the reduction's ``indices`` / ``assign``.
"""

from __future__ import annotations

import pytest
import torch

import vtoken
from tests.parity.fixtures import Case, assert_close, assert_exact, cases
from vtoken.methods.framefusion import PHASE, PRUNING, THRESHOLD_MERGE, TOPK_MERGE
from vtoken.methods.registry import CASCADE_START

PARAMS = {"cost", "similarity_lower_bound", "ratio_lower_bound", "patch_num", "image_token_start_index",
          "image_token_length", "original_length", "start_index_form", "position_embedding_form"}
#: layout bookkeeping (checked against the inputs where it says something about them)
BOOKKEEPING = {"num_frames", "grid_h", "grid_w", "newline", "text_before", "text_after", "model_layout"}
INPUTS = {"hidden_states", "patch_type", "layer_drift", "prune_attention", "position_ids", "cos", "sin"}
OUTPUTS = {"hidden_states", "kept_positions", "merge_group", "position_ids", "cos", "sin", "patch_type",
           "sparsity_list", "call_layer", "call_stage", "call_action", "call_length", "call_budget",
           "call_above_ratio", "first_similarity", "first_token_index_by_patch", "prune_keep_index"}
EXACT = {"kept_positions", "merge_group", "prune_keep_index", "first_token_index_by_patch", "patch_type",
         "position_ids", "call_layer", "call_stage", "call_action", "call_length", "sparsity_list",
         "call_above_ratio", "cos", "sin"}
#: (atol, rtol) of the float outputs, from the manifest's comparison rules
CLOSE = {"hidden_states": (1e-5, 1e-5), "first_similarity": (1e-6, 1e-5), "call_budget": (0.0, 1e-12)}
#: official call_action codes: 0 threshold merge, 1 top-k merge, 2 prune (vtoken's extras["action"] uses the same)
ACTIONS = {THRESHOLD_MERGE: 0, TOPK_MERGE: 1, 2: 2}


def gather_positions(form: str, ins: dict[str, torch.Tensor], cols: torch.Tensor) -> dict[str, torch.Tensor]:
    """The position embeddings the official handler gathers: a 2-D tensor along dim 1, ``[cos, sin]`` along the
    sequence axis (dim 1 of 3-D tables, dim 2 of 4-D M-RoPE tables)."""
    if form == "position_ids":
        return {"position_ids": ins["position_ids"][:, cols]}
    if form in ("cos_sin", "cos_sin_mrope"):
        out = {}
        for name in ("cos", "sin"):
            t = ins[name]
            want = 3 if form == "cos_sin" else 4
            assert t.dim() == want, f"{name}: form {form!r} has {want}-D tables, got {tuple(t.shape)}"
            out[name] = t.index_select(t.dim() - 2, cols)
        return out
    pytest.fail(f"position_embedding_form {form!r} is not mapped by this adapter")


def run_official_pattern(ins: dict[str, torch.Tensor], params: dict) -> dict[str, torch.Tensor]:
    """Replay the official call pattern with the vtoken step; returns the outputs the manifest lists."""
    h = ins["hidden_states"].clone()
    assert h.shape[0] == 1, "FrameFusion runs one sample"
    patch_type = ins["patch_type"][0]
    length = h.shape[1]
    vis = patch_type >= 0
    start, span = params["image_token_start_index"], params["image_token_length"]
    assert params["original_length"] == length and int(vis.sum()) == span
    assert bool(vis[start:start + span].all()), "the visual tokens are one span"
    assert int(patch_type.max()) + 1 == params["patch_num"]
    assert params["start_index_form"] in ("0d", "1d")  # how prepare() received the start index: no effect here
    cols = torch.arange(length)        # original column of every current token
    slots = patch_type.clone()         # the module's patch_type
    group = torch.arange(length)       # current index of every original token, -1 once pruned
    drift = ins["layer_drift"]
    knobs = {k: params[k] for k in ("cost", "similarity_lower_bound", "ratio_lower_bound")}
    state = torch.full((1, 1), CASCADE_START)  # a stepwise run, as the language-model driver makes it
    calls: dict[str, list] = {k: [] for k in ("layer", "stage", "action", "length", "budget", "above")}
    out: dict[str, torch.Tensor] = {}
    for call in range(64):
        if call:
            h = h + drift[call - 1]
        signals = {"llm_frame_slots": slots[vis][None], "llm_state": state}
        if int(state[0, PHASE]) == PRUNING:  # official: attention only while pruning is pending
            attn = ins["prune_attention"]
            assert attn.shape[-1] == h.shape[1], "prune_attention covers the sequence at the pruning call"
            signals["llm_attn"] = attn[0, :, -1].mean(0)[vis][None]
        red = vtoken.reduce(h[:, vis], 1.0, "framefusion", **knobs, **signals)
        ex = red.extras
        action = int(ex["action"][0])
        keep_vis = red.indices[0][red.mask[0]]
        vis_pos = vis.nonzero()[:, 0]
        keep_seq = ~vis
        keep_seq[vis_pos[keep_vis]] = True
        new_index = keep_seq.long().cumsum(0) - 1                    # new index of every kept current token
        # where each current token goes: text and kept tokens to their new index, merged ones to their destination
        where = torch.where(keep_seq, new_index, -1)
        assign = red.assign[0]
        where[vis_pos] = torch.where(assign >= 0, new_index[vis_pos[keep_vis]][assign.clamp(min=0)], -1)
        group = torch.where(group >= 0, where[group.clamp(min=0)], -1)
        new_h = h[:, keep_seq].clone()
        new_h[0, vis[keep_seq]] = red.tokens[0][red.mask[0]]
        if call == 0:
            n_slot = int((slots >= 0).sum())
            out["first_similarity"] = ex["similarity"][:, :n_slot]
            out["first_token_index_by_patch"] = vis_pos[ex["patch_order"][:, :n_slot]]
        if action == 2:
            out["prune_keep_index"] = keep_seq.nonzero()[:, 0]
        h, cols, vis = new_h, cols[keep_seq], vis[keep_seq]
        if action in (THRESHOLD_MERGE, TOPK_MERGE):  # only merging updates the module's patch_type
            slots = slots[keep_seq]
            out["patch_type"] = slots[None]
        state = ex["state"]
        calls["layer"].append(0 if call == 0 else call - 1)
        calls["stage"].append(0 if call == 0 else 1)
        assert action in ACTIONS, f"call {call} did nothing (action {action})"
        calls["action"].append(ACTIONS[action])
        calls["length"].append(h.shape[1])
        calls["budget"].append(float(ex["budget"][0]))
        calls["above"].append(float(ex["above_ratio"][0]))
        if bool(ex["done"][0]):
            break
        if action == 2:
            pytest.fail("a prune call must leave the sample done")
    else:
        pytest.fail("FrameFusion did not finish in 64 calls")
    m = int(state[0, 3])
    pairs = state[0, 4:].reshape(-1, 2)[:m]
    out["sparsity_list"] = pairs[:, 0].double() / pairs[:, 1].double()
    out["hidden_states"] = h
    out["kept_positions"] = cols
    out["merge_group"] = group
    out.update(gather_positions(params["position_embedding_form"], ins, cols))
    out["call_layer"] = torch.tensor(calls["layer"])
    out["call_stage"] = torch.tensor(calls["stage"])
    out["call_action"] = torch.tensor(calls["action"])
    out["call_length"] = torch.tensor(calls["length"])
    out["call_budget"] = torch.tensor(calls["budget"], dtype=torch.float64)
    out["call_above_ratio"] = torch.tensor(calls["above"], dtype=torch.float64)
    return out


@pytest.mark.parametrize("case", cases("framefusion"))
def test_framefusion_matches_official(case: Case) -> None:
    ins, outs, params = case.load()
    unknown = set(params) - PARAMS - BOOKKEEPING
    assert not unknown, f"unmapped params {sorted(unknown)}"
    assert PARAMS <= set(params), f"missing params {sorted(PARAMS - set(params))}"
    assert not set(ins) - INPUTS, f"unknown inputs {sorted(set(ins) - INPUTS)}"
    assert not set(outs) - OUTPUTS, f"unknown outputs {sorted(set(outs) - OUTPUTS)}"
    got = run_official_pattern(ins, params)
    for name, expected in outs.items():
        assert name in got, f"{case}: output {name!r} was not produced (a prune output without a prune call?)"
        if name in EXACT:
            assert_exact(got[name], expected, f"{case}: {name}")
        else:
            atol, rtol = CLOSE[name]
            assert_close(got[name], expected, f"{case}: {name}", atol=atol, rtol=rtol)
    assert ("prune_keep_index" in got) == ("prune_keep_index" in outs), f"{case}: prune call mismatch"
