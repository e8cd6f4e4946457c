"""Tiny random-weight Qwen2-VL / Qwen2.5-VL models built from configs (no hub), and prompts with images of different
sizes for them."""

from __future__ import annotations

import torch
from transformers import (
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2VLConfig,
    Qwen2VLForConditionalGeneration,
)

from tests.models.tiny import TEXT, VOCAB, build, left_pad, stack_samples, text_tokens, unpadded_ids

IMAGE_TOKEN, VIDEO_TOKEN, VISION_START, VISION_END = 250, 251, 252, 253
PATCH, TEMPORAL = 2, 2
PIXELS = 3 * TEMPORAL * PATCH * PATCH  # one row of pixel_values

#: the text config as a dict (the Qwen configs build it themselves), with M-RoPE sections
QWEN_TEXT = dict(vocab_size=VOCAB, **TEXT, bos_token_id=None, eos_token_id=None,
                 rope_parameters={"rope_type": "default", "mrope_section": [2, 2, 2], "rope_theta": 10000.0})
TOKENS = dict(image_token_id=IMAGE_TOKEN, video_token_id=VIDEO_TOKEN, vision_start_token_id=VISION_START,
              vision_end_token_id=VISION_END)


def _finish(model_cls, cfg, attn: str):
    model = build(model_cls, cfg, attn)
    model.generation_config.eos_token_id = None
    model.generation_config.bos_token_id = None
    return model


def tiny_qwen2_vl(attn: str = "sdpa", seed: int = 0, lm_layers: int = 2) -> Qwen2VLForConditionalGeneration:
    """Qwen2-VL: 3 vision blocks (width 32, 4 heads, 2 x 2 pixel patches, 2 x 2 merge), Qwen2 LM (2 layers), fp32."""
    torch.manual_seed(seed)
    vision = dict(depth=3, embed_dim=32, hidden_size=48, num_heads=4, mlp_ratio=2, patch_size=PATCH,
                  spatial_merge_size=2, temporal_patch_size=TEMPORAL, in_channels=3)
    cfg = Qwen2VLConfig(text_config={**QWEN_TEXT, "num_hidden_layers": lm_layers}, vision_config=vision, **TOKENS)
    return _finish(Qwen2VLForConditionalGeneration, cfg, attn)


def tiny_qwen2_5_vl(attn: str = "sdpa", seed: int = 0, lm_layers: int = 2) -> Qwen2_5_VLForConditionalGeneration:
    """Qwen2.5-VL: 3 vision blocks (width 32, 4 heads), attention in windows of 8 px (2 x 2 merged tokens) in block 1,
    full attention in blocks 0 and 2 (as the last block of the released models), Qwen2 LM (2 layers), fp32."""
    torch.manual_seed(seed)
    vision = dict(depth=3, hidden_size=32, out_hidden_size=48, intermediate_size=64, num_heads=4, patch_size=PATCH,
                  spatial_merge_size=2, temporal_patch_size=TEMPORAL, in_channels=3, window_size=8,
                  fullatt_block_indexes=[0, 2])
    cfg = Qwen2_5_VLConfig(text_config={**QWEN_TEXT, "num_hidden_layers": lm_layers}, vision_config=vision, **TOKENS)
    return _finish(Qwen2_5_VLForConditionalGeneration, cfg, attn)


TINY = {"qwen2_vl": tiny_qwen2_vl, "qwen2_5_vl": tiny_qwen2_5_vl}


def qwen_inputs(grids: list[tuple[int, int]], lengths: list[tuple[int, int]], seed: int = 0,
                images_per_sample: list[int] | None = None) -> dict[str, torch.Tensor]:
    """Left-padded inputs: sample ``b`` holds ``images_per_sample[b]`` images (default 1) between ``(prefix, suffix)``
    random text tokens, each image ``<start><image> x (h * w / 4)<end>`` for its patch grid ``(h, w)`` in ``grids``
    (in order). Returns ``input_ids``, ``attention_mask``, ``mm_token_type_ids``, ``pixel_values [P, 24]`` and
    ``image_grid_thw [I, 3]``."""
    g = torch.Generator().manual_seed(seed)
    per = images_per_sample or [1] * len(lengths)
    rows, it = [], iter(grids)
    for (p, s), count in zip(lengths, per, strict=True):
        parts = [text_tokens(p, g)]
        for _ in range(count):
            h, w = next(it)
            parts += [torch.tensor([VISION_START]), torch.full((h * w // 4,), IMAGE_TOKEN), torch.tensor([VISION_END])]
        parts.append(text_tokens(s, g))
        rows.append(torch.cat(parts))
    ids, mask = left_pad(rows)
    thw = torch.tensor([[1, h, w] for h, w in grids])
    pixels = torch.randn(int(thw.prod(-1).sum()), PIXELS, generator=g)
    return {"input_ids": ids, "attention_mask": mask, "mm_token_type_ids": (ids == IMAGE_TOKEN).int(),
            "pixel_values": pixels, "image_grid_thw": thw}


def sample_inputs(inputs: dict[str, torch.Tensor], b: int) -> dict[str, torch.Tensor]:
    """Sample ``b`` of :func:`qwen_inputs` alone, without padding (its images, pixels and grids only)."""
    ids, thw = inputs["input_ids"], inputs["image_grid_thw"]
    per_sample = [int(n) for n in ((ids == VISION_START).sum(1))]
    first = sum(per_sample[:b])
    grids = thw[first:first + per_sample[b]]
    patches = thw.prod(-1)
    start = int(patches[:first].sum())
    pixels = inputs["pixel_values"][start:start + int(grids.prod(-1).sum())]
    one = unpadded_ids(inputs, b)
    return {"input_ids": one, "mm_token_type_ids": (one == IMAGE_TOKEN).int(), "pixel_values": pixels,
            "image_grid_thw": grids}


Inputs = dict[str, torch.Tensor]
#: a media item of :func:`qwen_media_inputs`: ``("image", (h, w))`` or ``("video", (t, h, w))`` in patches
Media = tuple[str, tuple[int, ...]]


def qwen_media_inputs(samples: list[list[Media]], lengths: list[tuple[int, int]], seed: int = 0,
                      seconds: list[float] | None = None, timestamps: bool = False) -> tuple[Inputs, list[Inputs]]:
    """Left-padded inputs of samples holding images and videos, and each sample alone (unpadded, its own pixels).

    Sample ``b`` is ``prefix`` text, its media in order (each ``<start><pad> x (t * h * w / 4)<end>``, ``<image>`` or
    ``<video>`` pads) and ``suffix`` text (``lengths[b]``). Videos have ``t`` temporal patches of ``h x w`` patches;
    ``seconds`` (per video, in order) become ``second_per_grid_ts`` (Qwen2.5-VL's M-RoPE time scale). With
    ``timestamps`` (Qwen3-VL's layout) every frame is its own block after a 2-token timestamp text."""
    g = torch.Generator().manual_seed(seed)
    alone, secs = [], iter(seconds or [])
    for media, (p, s) in zip(samples, lengths, strict=True):
        parts = [text_tokens(p, g)]
        pix: dict[str, list[torch.Tensor]] = {"image": [], "video": []}
        thw: dict[str, list[list[int]]] = {"image": [], "video": []}
        sec: list[float] = []
        for kind, size in media:
            t, h, w = (1, *size) if kind == "image" else size
            pad = IMAGE_TOKEN if kind == "image" else VIDEO_TOKEN
            for _ in range(t if timestamps and kind == "video" else 1):
                n = h * w // 4 if timestamps and kind == "video" else t * h * w // 4
                parts += [text_tokens(2, g)] if timestamps and kind == "video" else []
                parts += [torch.tensor([VISION_START]), torch.full((n,), pad), torch.tensor([VISION_END])]
            pix[kind].append(torch.randn(t * h * w, PIXELS, generator=g))
            thw[kind].append([t, h, w])
            if kind == "video" and seconds is not None:
                sec.append(next(secs))
        parts.append(text_tokens(s, g))
        ids = torch.cat(parts)[None]
        one = {"input_ids": ids, "mm_token_type_ids": (ids == IMAGE_TOKEN).int() + 2 * (ids == VIDEO_TOKEN).int()}
        if pix["image"]:
            one["pixel_values"], one["image_grid_thw"] = torch.cat(pix["image"]), torch.tensor(thw["image"])
        if pix["video"]:
            one["pixel_values_videos"], one["video_grid_thw"] = torch.cat(pix["video"]), torch.tensor(thw["video"])
            if seconds is not None:
                one["second_per_grid_ts"] = torch.tensor(sec)
        alone.append(one)
    batch = stack_samples(alone, ("pixel_values", "image_grid_thw", "pixel_values_videos", "video_grid_thw",
                                  "second_per_grid_ts"))
    ids = batch["input_ids"]
    batch["mm_token_type_ids"] = (ids == IMAGE_TOKEN).int() + 2 * (ids == VIDEO_TOKEN).int()
    return batch, alone
