"""Parity of ``holitom`` (outer-LLM stage) and ``holitom_llm`` (inner-LLM merge) with the official HoliTom
(``LlavaMetaForCausalLM_holitom.prepare_inputs_labels_for_multimodal`` and ``Qwen2Model_holitom.forward``, fixture
``holitom``).

Adapter (what a LLaVA-OneVision / LLaVA-Video model does around the method, not HoliTom itself):

* the model's 2 x 2 pooling (``get_2dPool``): each frame's 27 x 27 features, and the vision attention as a
  1-channel map, are pooled by ``mm_spatial_pool_mode`` (bilinear to 14 x 14, or average to 13 x 13): the tokens
  ``[1, F * P, D]`` frame-major with ``video_grid = (F, g, g)``, the attention as ``attn_received_layers [1, 1, F *
  P]`` (compared with ``pooled_attn``);
* the budget: ``keep = official_keep(tokens, grid, RETAIN_RATIO)`` (the official count) with ``retain_ratio =
  RETAIN_RATIO``; the same ``keep`` without ``retain_ratio`` (vtoken's budget rule) must give the same result;
* the newlines (``image_newline``): ``one_token`` -> the tokens in the method's ``order`` extra, then one newline;
  ``grid`` -> the tokens in source order with a newline after every non-empty row of every frame (merged static
  tokens sit in their window's first frame);
* the inner stage (cases with ``HOLITOM_k``): the sequence ``[text before <image>, video_tokens, text after]``, the
  visual span (newlines included) merged by ``holitom_llm`` with ``llm_attn`` = the heads' mean of the last
  attention row and ``keep = llm_keep_count(L, HOLITOM_r)``; identity decoder layers, so the hidden states entering
  layer ``HOLITOM_k`` are the sequence itself. ``noise_seed`` is accepted and unused (vtoken breaks density ties
  deterministically; the manifest checks that the outputs do not depend on the seed).
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import vtoken
from tests.parity.fixtures import Case, assert_close, assert_exact, cases, check_keys
from vtoken.methods.holitom import holitom_llm_merge, llm_keep_count, official_keep

REQUIRED = {"RETAIN_RATIO", "T", "mm_newline_position", "mm_spatial_pool_mode", "noise_seed"}
OPTIONAL = {"BETA", "K", "MAX_WINDOW_SIZE", "NO_BETA", "HOLITOM_k", "HOLITOM_r", "n_llm_layers"}
INPUTS = {"image_features", "vision_attn", "text_embeds", "image_newline", "input_ids"}
INNER_INPUTS = {"llm_last_token_attn"}
OUTPUTS = {"video_tokens", "selected_frames", "feature_sim", "pooled_attn", "llm_hidden_states", "llm_keep_indices"}
#: (atol, rtol) of the float outputs, from the manifest's comparison rules
CLOSE = {"video_tokens": (2e-5, 1e-5), "llm_hidden_states": (2e-5, 1e-5), "feature_sim": (5e-6, 1e-5),
         "pooled_attn": (1e-7, 1e-5)}
IMAGE_TOKEN_INDEX = -200


def pool_2d(x: torch.Tensor, mode: str) -> torch.Tensor:
    """LLaVA's ``get_2dPool`` with stride 2: ``[F, g * g, C]`` -> ``[F, P, C]`` (bilinear to ``ceil(g / 2)`` per side,
    ``align_corners=False``, or 2 x 2 average pooling), row-major."""
    f, n, c = x.shape
    g = math.isqrt(n)
    assert g * g == n, f"{n} patches are not a square grid"
    y = x.reshape(f, g, g, c).permute(0, 3, 1, 2)
    if mode == "bilinear":
        y = F.interpolate(y, size=[math.ceil(g / 2)] * 2, mode="bilinear", align_corners=False)
    elif mode == "average":
        y = F.avg_pool2d(y, 2)
    else:
        pytest.fail(f"mm_spatial_pool_mode {mode!r} is not mapped by this adapter (bilinear or average)")
    return y.permute(0, 2, 3, 1).reshape(f, -1, c)


def with_newlines(red: vtoken.Reduction, newline: torch.Tensor, layout: str, p: int, g: int) -> torch.Tensor:
    """The video block the model inserts: ``one_token`` (official order, one newline at the end) or ``grid``."""
    k = int(red.mask[0].sum())
    idx, tok = red.indices[0, :k], red.tokens[0, :k]
    if layout == "one_token":
        slot = torch.searchsorted(idx, red.extras["order"][0, :k])
        return torch.cat([tok[slot], newline[None]])
    if layout != "grid":
        pytest.fail(f"mm_newline_position {layout!r} is not mapped by this adapter (one_token or grid)")
    row = (idx // p) * g + (idx % p) // g
    last = torch.ones(k, dtype=torch.bool)
    last[:-1] = row[1:] != row[:-1]
    # token i goes to slot i + (newlines before it); a newline follows each row's last token
    before = torch.cat([torch.zeros(1, dtype=torch.long), last.long().cumsum(0)[:-1]])
    out = newline.expand(k + int(last.sum()), -1).clone()
    out[torch.arange(k) + before] = tok
    return out


def check_params(case: Case, p: dict, ins: dict, exp: dict) -> bool:
    check_keys(case, p, REQUIRED, OPTIONAL, outputs=exp, compared=OUTPUTS)
    inner = "HOLITOM_k" in p and "HOLITOM_r" in p
    want = INPUTS | (INNER_INPUTS if inner else set())
    if set(ins) != want:
        pytest.fail(f"{case}: inputs {sorted(ins)} are not the ones this adapter maps ({sorted(want)})")
    if inner != ({"llm_hidden_states", "llm_keep_indices"} <= set(exp)):
        pytest.fail(f"{case}: the inner-stage outputs and HOLITOM_k / HOLITOM_r must come together")
    return inner


@pytest.mark.parametrize("case", cases("holitom"))
def test_holitom_parity(case: Case) -> None:
    ins, exp, p = case.load()
    inner = check_params(case, p, ins, exp)

    feats = pool_2d(ins["image_features"], p["mm_spatial_pool_mode"])
    attn = pool_2d(ins["vision_attn"][..., None], p["mm_spatial_pool_mode"])[..., 0]
    assert_close(attn, exp["pooled_attn"], "pooled_attn", *CLOSE["pooled_attn"])
    frames, tokens_per_frame, d = feats.shape
    g = math.isqrt(tokens_per_frame)
    tokens, grid = feats.reshape(1, frames * tokens_per_frame, d), (frames, g, g)
    signals = {"video_grid": grid, "attn_received_layers": attn.reshape(1, 1, -1)}
    no_beta = p.get("NO_BETA") not in (None, 0, "0")
    knobs = {"threshold": float(p["T"]), "beta": float(p.get("BETA", 0.6)), "knn": int(p.get("K", 7)),
             "max_window_size": int(p.get("MAX_WINDOW_SIZE", 1024)), "no_beta": no_beta}
    ratio = float(p["RETAIN_RATIO"])
    keep = int(official_keep(tokens, grid, ratio, threshold=knobs["threshold"],
                             max_window_size=knobs["max_window_size"])[0])

    red = vtoken.reduce(tokens, keep, "holitom", retain_ratio=ratio, **signals, **knobs)
    extras = red.extras
    if keep >= tokens.shape[1]:  # nothing removed: vtoken.reduce returns the identity; diagnostics from the method
        extras = vtoken.get_method("holitom").fn(tokens, torch.tensor([keep]), retain_ratio=ratio, **signals,
                                                 **knobs).extras
    else:  # vtoken's own budget rule (the largest ratio that fits keep) lands on the same allocation
        own = vtoken.reduce(tokens, keep, "holitom", **signals, **knobs)
        assert torch.equal(own.indices, red.indices) and torch.equal(own.tokens, red.tokens)
        assert torch.equal(own.extras["order"], extras["order"])
    assert int(red.mask.sum()) == keep

    n_win = int((extras["windows"][0, :, 0] >= 0).sum())
    assert_exact(extras["windows"][0, :n_win], exp["selected_frames"], "selected_frames")
    assert_close(extras["feature_sim"][0], exp["feature_sim"], "feature_sim", *CLOSE["feature_sim"])
    video = with_newlines(red, ins["image_newline"], p["mm_newline_position"], tokens_per_frame, g)
    assert_close(video, exp["video_tokens"], "video_tokens", *CLOSE["video_tokens"])
    if not inner:
        return

    k_layer, depth, r = int(p["HOLITOM_k"]), int(p.get("n_llm_layers", 28)), float(p["HOLITOM_r"])
    info = vtoken.get_method("holitom_llm")
    assert info.schedule is not None
    assert info.schedule.plan_layers(depth, {"layer": k_layer, "ref_depth": depth}) == [k_layer]
    ids = ins["input_ids"][0]
    posi = int(torch.nonzero(ids == IMAGE_TOKEN_INDEX)[0, 0])
    text = ins["text_embeds"]
    seq = torch.cat([text[ids[:posi]], video, text[ids[posi + 1:]]])[None]
    last_row = ins["llm_last_token_attn"]
    assert last_row.shape[-1] == seq.shape[1], "the attention row must span the outer stage's sequence"
    length = video.shape[0]
    hidden, keep_indices = holitom_llm_merge(seq, last_row[None], posi, length, r)
    assert_exact(keep_indices[0], exp["llm_keep_indices"], "llm_keep_indices")
    assert_close(hidden, exp["llm_hidden_states"], "llm_hidden_states", *CLOSE["llm_hidden_states"])

    # the registered llm-stage step on the visual span gives the same rows
    llm_attn = last_row.mean(0)[None, posi:posi + length]
    step = vtoken.reduce(seq[:, posi:posi + length], llm_keep_count(length, r), "holitom_llm", llm_attn=llm_attn)
    assert torch.equal(step.indices[0] + posi, keep_indices[0, posi:posi + step.tokens.shape[1]])
    assert torch.equal(step.tokens, hidden[:, posi:posi + step.tokens.shape[1]])
