"""Parity of ``fastvid`` with the FastVID block of the official LLaVA-OneVision ``Qwen2Model.forward`` (fixture
``fastvid``).

Adapter: the fixture's ``inputs_embeds [1, S, D]`` hold text, then ``frame_num`` frames of ``P = video_token_len //
frame_num`` video tokens from ``video_start_idx``, then the rest. The video span is one clip (``video_grid = (F, H,
W)`` with ``H * W = P``), ``cls_attn`` = ``frame_attn_weights`` and ``frame_features`` = ``frame_global_features``;
the official ``retention_ratio`` becomes ``keep = fastvid.official_keep(F, P, ratio)`` and the DySeg / STPrune / DTM
hyper-parameters map to the method's knobs. The kept video rows go back into the sequence between the untouched
text rows (the official ``keep_indices`` are the kept rows' original positions). ``noise_seed`` only seeds the
official density noise (``rand * 1e-6``): the method breaks density ties deterministically, so it is not mapped and
``density_score`` is compared where the manifest marks it stable.
"""

from __future__ import annotations

import math

import pytest
import torch

import vtoken
from tests.parity.fixtures import Case, assert_close, assert_exact, cases, check_keys
from vtoken.methods.fastvid import official_keep

#: official hyper-parameter -> knob of vtoken's fastvid
KNOBS = {"DySeg_c": "segments", "DySeg_tau": "cut_threshold", "STPrune_d": "context_ratio", "DTM_p": "anchor_step",
         "DTM_beta": "merge_beta"}
PARAMS = {*KNOBS, "retention_ratio", "video_start_idx", "video_token_len", "frame_num", "noise_seed"}
INPUTS = {"inputs_embeds", "frame_attn_weights", "frame_global_features"}
OUTPUTS = {"hidden_states", "keep_indices", "cut_indices", "segment_sizes", "frame_context_num_list",
           "salient_indices", "density_score", "density_score_stable"}


def _grid(frames: int, p: int) -> tuple[int, int, int]:
    h = math.isqrt(p)
    while p % h:
        h -= 1
    return frames, h, p // h


@pytest.mark.parametrize("case", cases("fastvid"))
def test_fastvid_parity(case: Case) -> None:
    ins, exp, params = case.load()
    check_keys(case, params, PARAMS, outputs=exp, compared=OUTPUTS, inputs=ins, mapped=INPUTS)

    embeds = ins["inputs_embeds"]
    assert embeds.shape[0] == 1, f"{case}: the official block runs on batch 1"
    s0, length, f = int(params["video_start_idx"]), int(params["video_token_len"]), int(params["frame_num"])
    p = length // f
    n = f * p
    seq = embeds.shape[1]
    tokens = embeds[:, s0:s0 + n]
    grid = _grid(f, p)
    keep = official_keep(f, p, float(params["retention_ratio"]))
    knobs = {KNOBS[k]: params[k] for k in KNOBS}
    kw = {"video_grid": grid, "cls_attn": ins["frame_attn_weights"].reshape(1, n),
          "frame_features": ins["frame_global_features"][None], **knobs}
    if keep >= n:  # vtoken.reduce returns the identity for a budget of every token; the method itself runs here
        info = vtoken.get_method("fastvid")
        red = info.fn(tokens, torch.tensor([keep]), **info.check_knobs(kw))
    else:
        red = vtoken.reduce(tokens, keep, "fastvid", **kw)
    kept = red.indices[0][red.mask[0]]
    x = red.extras

    keep_indices = torch.cat([torch.arange(s0), s0 + kept, torch.arange(s0 + n, seq)])
    hidden = torch.cat([embeds[0, :s0], red.tokens[0][red.mask[0]], embeds[0, s0 + n:]])[None]
    got_exact = {
        "keep_indices": keep_indices,
        "cut_indices": x["cut_indices"][0][x["cut_indices"][0] >= 0],
        "segment_sizes": x["segment_sizes"][0][x["segment_sizes"][0] > 0],
        "frame_context_num_list": x["context_counts"][0],
    }
    for name, value in got_exact.items():
        if name in exp:
            assert_exact(value, exp[name], name)
    if "salient_indices" in exp:  # the order within a row (topk's) does not affect the outputs
        s = exp["salient_indices"].shape[1]
        sal = x["salient_indices"][0][:, :s]
        assert bool((sal >= 0).all()) and bool((x["salient_indices"][0][:, s:] < 0).all())
        assert_exact(sal.sort(-1).values, exp["salient_indices"].sort(-1).values, "salient_indices (rows sorted)")
    if "hidden_states" in exp:
        assert_close(hidden, exp["hidden_states"], "hidden_states", atol=1e-5, rtol=1e-5)
        copied = torch.isin(keep_indices, s0 + (x["salient_indices"][0] + torch.arange(f)[:, None] * p).flatten())
        copied |= (keep_indices < s0) | (keep_indices >= s0 + n)
        assert torch.equal(hidden[0][copied], exp["hidden_states"][0][copied]), "copied rows must be bit-exact"
    if "density_score" in exp:
        want = exp["density_score"]
        stable = exp.get("density_score_stable", torch.ones_like(want, dtype=torch.bool))
        got = x["density_score"][0][:, :want.shape[1]]
        assert tuple(x["density_score"][0].shape) == tuple(want.shape), "density_score shape"
        assert_close(got[stable], want[stable], "density_score (stable entries)", atol=1e-5, rtol=1e-4)
    assert int(red.counts[0]) <= keep
    assert int(x["frame_counts"].sum()) == kept.numel()
