"""Parity of ``evs`` with vLLM's EVS (``vllm/multimodal/video_prune/evs.py``, fixture ``evs``).

Adapter: ``video_embeds [T * rows * cols, D]`` is one clip, ``video_grid = (T, H // m, W // m)`` (the manifest's
``video_size_thw`` is the grid before the spatial merge ``m``); the pruning rate ``q`` becomes the count vLLM keeps,
``max(rows * cols, int(T * rows * cols * (1 - q)))`` (:func:`vtoken.methods.evs.retained_count`, checked against the
fixture's ``retained_count``), passed as ``keep``. Compared exactly: ``retention_mask``, ``kept_index``,
``retained_count``; ``dissimilarity`` with the manifest's tolerance.

M-RoPE. ``media_mrope_positions`` channels 0-2 are the video's ORIGINAL ``(t, h, w)`` ids relative to the media
start (``t = int(frame * tokens_per_second * video_second_per_grid)``, row, column), as Qwen2.5-VL's rope index
numbers them, and channel 3 is the grid width; ``kept_mrope_positions`` are those rows at vtoken's kept indices.
vtoken keeps exactly these ids for kept tokens (the model adapter gathers the unpruned prompt's positions), so both
are compared exactly. vLLM's prompt-level rewrite (``positions_call*``) differs from vtoken's layout in one place:
the text after a media item resumes at ``base + grid_w`` (vLLM) instead of ``base + max id + 1`` (the unpruned
prompt's numbering, which vtoken keeps). The test builds vtoken's layout for the pruned prompt and checks that the
official positions equal it plus, after each media item, that item's shift ``grid_w - (max id + 1)`` (0 where the
grid width is the widest axis); every call's positions are compared on the tokens its chunk computes, and the last
call's delta exactly.
"""

from __future__ import annotations

import pytest
import torch

import vtoken
from tests.parity.fixtures import Case, assert_close, assert_exact, cases
from vtoken.methods.evs import retained_count, temporal_dissimilarity

PARAMS = {"video_size_thw", "spatial_merge_size", "q", "tokens_per_second", "video_second_per_grid",
          "vision_start_token_id", "image_token_id", "video_token_id", "recompute_calls", "prompt_media"}
MEDIA_KEYS = {"kind", "first_placeholder_index", "num_tokens", "image_grid_thw"}


def grid_ids(thw: list[int], m: int, t_step: float) -> tuple[torch.Tensor, int]:
    """``[T * rows * cols, 3]`` original (t, h, w) ids of a media grid (before the merge ``m``) and its width."""
    t, rows, cols = int(thw[0]), int(thw[1]) // m, int(thw[2]) // m
    frame = torch.arange(t).repeat_interleave(rows * cols)
    row = torch.arange(rows).repeat_interleave(cols).repeat(t)
    col = torch.arange(cols).repeat(t * rows)
    return torch.stack([(frame * t_step).long(), row, col], 1), cols


def prompt_layouts(ids: torch.Tensor, start_positions: torch.Tensor, items: list[dict]) -> tuple[torch.Tensor, ...]:
    """vtoken's M-RoPE layout of the pruned prompt ``[3, N]`` and vLLM's shift from it ``[N]``.

    ``items``: per media item (in prompt order) ``start`` (first placeholder), ``kept [n, 3]`` (the ids its kept
    tokens keep), ``max_id`` (the largest id of its unpruned grid) and ``width`` (grid width). Positions up to the
    first vision-start token come from ``start_positions``; text then counts on by one; a media item's tokens are
    ``ids + base`` with ``base`` = the vision-start token's position + 1; the text after it resumes at ``base +
    max_id + 1`` (vtoken) while vLLM resumes at ``base + width``.
    """
    n = ids.numel()
    pos = torch.zeros(3, n, dtype=torch.long)
    shift = torch.zeros(n, dtype=torch.long)
    first = items[0]["start"] - 1
    pos[:, :first + 1] = start_positions[:, :first + 1]
    cursor, nxt, acc = first + 1, int(start_positions[:, first].max()) + 1, 0
    for item in items:
        s, kept = item["start"], item["kept"]
        for j in range(cursor, s):  # text between media items, vision-start token included
            pos[:, j], shift[j] = nxt, acc
            nxt += 1
        base = int(pos[0, s - 1]) + 1
        pos[:, s:s + kept.shape[0]] = kept.T + base
        shift[s:s + kept.shape[0]] = acc
        nxt = base + item["max_id"] + 1
        acc += item["width"] - (item["max_id"] + 1)
        cursor = s + kept.shape[0]
    for j in range(cursor, n):
        pos[:, j], shift[j] = nxt, acc
        nxt += 1
    return pos, shift


@pytest.mark.parametrize("case", cases("evs"))
def test_evs_parity(case: Case) -> None:
    ins, exp, p = case.load()
    unknown = sorted(set(p) - PARAMS)
    if unknown:
        pytest.fail(f"{case}: unmapped parameters {unknown}")
    t, h, w = (int(v) for v in p["video_size_thw"])
    m = int(p["spatial_merge_size"])
    if h % m or w % m:
        pytest.fail(f"{case}: spatial_merge_size {m} does not divide the grid {(h, w)}")
    grid = (t, h // m, w // m)
    tpf = grid[1] * grid[2]
    emb = ins["video_embeds"]
    n = emb.shape[0]
    assert n == t * tpf, f"video_embeds has {n} rows for the grid {grid}"

    keep = retained_count(tpf, t, float(p["q"]))
    assert_exact(torch.tensor([keep]), exp["retained_count"], "retained_count (q -> keep)")
    red = vtoken.reduce(emb[None], keep, "evs", video_grid=grid)
    kept = red.indices[0][red.mask[0]]
    assert_exact(red.counts, exp["retained_count"], "retained_count")
    assert_exact(kept, exp["kept_index"], "kept_index")
    retention = torch.zeros(n, dtype=torch.bool)
    retention[kept] = True
    assert_exact(retention, exp["retention_mask"], "retention_mask")
    if keep < n:  # the method ran (keep = every token is the identity, without extras)
        dissimilarity = red.extras["dissimilarity"][0]
        assert_exact(red.extras["frame_counts"][0], retention.reshape(t, tpf).sum(-1), "frame_counts")
    else:
        dissimilarity = temporal_dissimilarity(emb[None], grid)[0]
    assert_close(dissimilarity, exp["dissimilarity"], "dissimilarity", atol=1e-6, rtol=1e-5)
    assert bool((exp["dissimilarity"][0] == 255).all()), "frame 0 is exactly 255"

    # M-RoPE of the media: original grid ids, and the kept tokens keep them
    t_step = float(p["tokens_per_second"]) * float(p["video_second_per_grid"])
    video_ids, video_width = grid_ids([t, h, w], m, t_step)
    width_col = torch.full((n, 1), video_width, dtype=torch.long)
    assert_exact(torch.cat([video_ids, width_col], 1), exp["media_mrope_positions"], "media_mrope_positions")
    assert_exact(torch.cat([video_ids[kept], width_col[kept]], 1), exp["kept_mrope_positions"],
                 "kept_mrope_positions (original ids at vtoken's kept indices)")

    # the prompt: each media item's placeholders, its kept ids and its unpruned grid
    ids = ins["input_ids"]
    vs, img, vid = int(p["vision_start_token_id"]), int(p["image_token_id"]), int(p["video_token_id"])
    items = []
    for k, media in enumerate(p["prompt_media"]):
        stray = sorted(set(media) - MEDIA_KEYS)
        if stray:
            pytest.fail(f"{case}: prompt_media[{k}] has unmapped keys {stray}")
        s, count = int(media["first_placeholder_index"]), int(media["num_tokens"])
        if media["kind"] == "video":
            if any(i["kind"] == "video" for i in items):
                pytest.fail(f"{case}: more than one video in the prompt, the fixture has one video_embeds")
            own, width, token = video_ids[kept], video_width, vid
            max_id = int(video_ids.max())
        elif media["kind"] == "image":
            full, width = grid_ids(media["image_grid_thw"], m, 1.0)  # vLLM's image path: tps = spg = 1
            own, token, max_id = full, img, int(full.max())
        else:
            pytest.fail(f"{case}: prompt_media[{k}] has an unmapped kind {media['kind']!r}")
        assert own.shape[0] == count, f"prompt_media[{k}]: {count} placeholders for {own.shape[0]} kept tokens"
        assert int(ids[s - 1]) == vs and bool((ids[s:s + count] == token).all()), f"prompt_media[{k}] placeholders"
        items.append({"kind": media["kind"], "start": s, "kept": own, "max_id": max_id, "width": width})
    media_mask = (ids == img) | (ids == vid)
    assert int(media_mask.sum()) == sum(i["kept"].shape[0] for i in items), "every placeholder is a listed item"

    # the per-call media positions are each item's kept ids (+ width), split at the chunk boundaries
    calls = p["recompute_calls"]
    for c, call in enumerate(calls):
        stray = sorted(set(call) - {"num_computed_tokens", "multimodal_positions"})
        if stray:
            pytest.fail(f"{case}: recompute_calls[{c}] has unmapped keys {stray}")
    parts = [ins[name] for call in calls for name in call["multimodal_positions"]]
    joined = torch.cat(parts, 1) if parts else torch.zeros(4, 0, dtype=torch.long)
    want = torch.cat([torch.cat([i["kept"], torch.full((i["kept"].shape[0], 1), i["width"])], 1) for i in items]).T
    assert_exact(joined, want, "mm_pos inputs (kept ids of every item, in prompt order)")

    vtoken_pos, shift = prompt_layouts(ids, ins["mrope_positions"], items)
    official = vtoken_pos + shift  # vLLM's layout: vtoken's, shifted after each media item
    ends = [int(c["num_computed_tokens"]) for c in calls[1:]] + [ids.numel()]
    for c, end in enumerate(ends):
        got = exp[f"positions_call{c}"]
        assert_exact(got[:, :end], official[:, :end], f"positions_call{c} on the tokens its chunk computes")
        assert_exact(exp[f"delta_call{c}"], torch.tensor([int(got.max()) + 1 - ids.numel()]), f"delta_call{c}")
    assert_exact(exp[f"delta_call{len(calls) - 1}"], torch.tensor([int(official.max()) + 1 - ids.numel()]),
                 "final delta")
    # where vtoken and vLLM agree: everything up to the end of the first media item whose width is not its
    # widest axis (shift 0), and every media token's position relative to its item's vision-start token
    first_diff = int((shift != 0).nonzero()[0, 0]) if bool((shift != 0).any()) else ids.numel()
    assert_exact(exp[f"positions_call{len(calls) - 1}"][:, :first_diff], vtoken_pos[:, :first_diff],
                 "positions before vLLM's first text shift")
