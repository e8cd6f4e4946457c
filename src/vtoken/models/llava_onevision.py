"""LLaVA-OneVision (``LlavaOnevisionForConditionalGeneration``), images: a SigLIP tower (no CLS token), an MLP
projector and AnyRes-max packing.

How the model lays out one image (``g = image_size // patch_size`` tokens a side, ``n = g * g`` per view):

* **Views.** The tower encodes every view of an image on its own: view 0 is the base (whole image resized), views
  ``1 .. nh * nw`` the crops of the best grid pinpoint in row-major order. An image of a multi-image sample
  (``batch_num_images > 1``) has only the base view.
* **Packing** (after the projector). Base view: its ``n`` tokens (single-view image: then one ``image_newline``).
  Crops: stitched into an ``nh*g x nw*g`` canvas, unpadded to the image's aspect ratio (``unpad_image``), bilinearly
  downscaled when it exceeds ``anyres_max_M`` views (``vision_aspect_ratio``) by more than 1.1x, then written row by
  row, each row followed by one ``image_newline`` token.

vtoken's choices (the reduction unit is one view, as in the official per-crop VisionZip / LLaVA-NeXT ports):

* **Where methods run: per view, before packing**, on the view's ``g x g`` grid (``grid = (g, g)``); each view has
  its own tower signals. A view token whose packed cell was cut by unpadding is masked out. A downscaled canvas
  cell sits on the view token with the largest bilinear weight in it (ties: the upper-left one); the tokens no cell
  sits on are masked out. Vision-space methods see, for such a cell, the tower features resized the same way (the
  model resizes the projected tokens), with that view token's signals; a token kept unchanged is always spliced with
  the model's own packed value (:func:`~vtoken.models.pipeline.run_steps`'s ``exact``), so LLM-space methods and
  ``keep`` = all see exactly the model's tokens.
* **``keep`` stays per image**: an ``int`` ``k`` is split over the image's views in proportion to their valid tokens
  (:func:`~vtoken.models.views.split_proportional`: largest remainder, ties to the earlier view, base first), so the
  image keeps exactly ``min(k, valid)`` tokens; a view whose share is 0 (``k`` < views) keeps nothing. A ratio
  applies to every view unchanged (at least 1 per view). In a composition, an ``int`` step is split in proportion to
  the previous step's (planned) shares.
* **Newlines** are not reduction units: an ``image_newline`` stays iff a token of its canvas row stays (rows with
  nothing kept lose their newline); a single-view image keeps its one newline. Newlines do not count toward
  ``keep``; ``handle.last.extras["newlines"]`` has the kept ones per image.
* **Indices**: :attr:`Handle.last` has one row per image, view ``v``'s slot ``s = row * g + col`` at ``v * n + s``
  (``extras["views"]``: the per-view reduction, ``extras["view_image"]`` / ``extras["view_position"]`` its rows).
  Kept tokens keep their placeholder column and its position id; a merged token takes its representative's.
* **Signals** (recomputed on the side from hooked SigLIP q/k, the model keeps SDPA): ``keys``, ``attn``,
  ``attn_received_layers`` (per view, every query row; no CLS to drop), ``vision_features`` (pre-projector
  features; the projected tokens for ``space="clip_joint"``), ``text``, ``text_mask``, ``grid``, ``positions``,
  ``crop_ids`` (the view index).
* **No CLS token.** ``visionzip`` gets ``cls_attn`` = the attention each token receives in the same layer, softmax
  probabilities averaged over heads and over all query rows: the substitute documented for CLS-free towers
  ("we use the average attention each visual token receives from all other tokens ... also adopted in other works,
  such as VisionZip", Theia-4869/VisPruner#1), which VisionZip's own Qwen2.5-VL code uses (a per-token ``attn_mean``
  over the query rows, JIA-Lab-research/VisionZip#31; a sum over queries ranks the same). ``hiprune`` uses
  ``attn_received_layers`` as on any tower. ``hired``, ``vtc_cls``, ``prumerge``, ``prumerge_plus`` (and ``evit``,
  ``globalcom2``) are unsupported: they rank by the [CLS] query and their official code documents no CLS-free
  substitute. ``lavit_dynamic`` gets no ``cls_attn`` (its ``"distinct"`` score is used).

``vision_feature_select_strategy`` must be ``"full"`` (``"default"`` would drop a SigLIP patch). The model ignores a
``vision_aspect_ratio`` argument and packs with ``config.vision_aspect_ratio``; so does this adapter.

Videos (``pixel_values_videos [V, F, C, H, W]``) are clips of ``F`` frames of ``ceil(g / 2)^2`` tokens (the model's
2 x 2 bilinear pooling after the projector; 196 a frame on the released models) followed by one ``image_newline``,
which always stays. Images and videos mix in one batch; tower signals of each frame are pooled like its features.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor
from transformers.models.llava_onevision.modeling_llava_onevision import (
    get_anyres_image_grid_shape,
    image_size_to_num_patches,
    unpad_image,
)

from ..core import Reduction, resolve_keep
from ..methods import MethodInfo
from .base import Adapter, ClsTowerAdapter, Images
from .capture import QKLayer, attention_maps, mean_keys
from .llava import clip_qk_layers
from .video import POOLED, pool_frame_signal
from .views import fold_views, reduce_views, split_proportional


def dominant_taps(n_in: int, n_out: int) -> Tensor:
    """``[n_out]`` long: for each output of a 1-D bilinear resize ``n_in -> n_out`` (``align_corners=False``, as
    ``F.interpolate(size=...)``), the input index with the larger weight (ties: the lower index)."""
    src = ((torch.arange(n_out, dtype=torch.float64) + 0.5) * (n_in / n_out) - 0.5).clamp(min=0)
    low = src.floor()
    return torch.where(src - low > 0.5, low + 1, low).long().clamp(max=n_in - 1)


def image_layout(g: int, views: int, image_size: Tensor, pinpoints: list, side: int, aspect: str) -> \
        tuple[Tensor, Tensor, bool]:
    """The packed sequence of one image, position by position (mirrors ``pack_image_features``).

    Returns ``slots [P]`` (view slot ``v * g^2 + row * g + col`` of each packed token, ``-1`` for an
    ``image_newline``), ``lines [P]`` (canvas row of each token / newline, ``-1`` for the base view of a multi-view
    image; a single-view image is one row) and whether the crop canvas is downscaled.
    """
    n = g * g
    if views == 1:
        slots = torch.arange(n + 1)
        slots[n] = -1
        return slots, torch.zeros(n + 1, dtype=torch.long), False
    nh, nw = get_anyres_image_grid_shape(image_size, pinpoints, side)
    if nh * nw + 1 != views:
        raise ValueError(f"llava_onevision adapter: image of size {image_size.tolist()} has {views} views, its crop "
                         f"grid {nh} x {nw} needs {nh * nw + 1}")
    r = torch.arange(nh * g)[:, None]
    c = torch.arange(nw * g)[None, :]
    canvas = (1 + (r // g) * nw + c // g) * n + (r % g) * g + c % g  # [nh*g, nw*g] slot of each canvas cell
    canvas = unpad_image(canvas[None], image_size)[0]
    h, w = canvas.shape
    ratio = math.sqrt(h * w / (int(aspect.strip("anyres_max_")) * g**2))  # noqa: B005 (the model's own parsing)
    down = ratio > 1.1
    if down:
        canvas = canvas[dominant_taps(h, int(h // ratio))][:, dominant_taps(w, int(w // ratio))]
        h, w = canvas.shape
    rows = torch.cat([canvas, torch.full((h, 1), -1, dtype=torch.long)], dim=1).reshape(-1)
    slots = torch.cat([torch.arange(n), rows])
    lines = torch.cat([torch.full((n,), -1, dtype=torch.long), torch.arange(h).repeat_interleave(w + 1)])
    return slots, lines, down


class LlavaOnevisionAdapter(ClsTowerAdapter):
    family = "llava_onevision"
    model_classes = ("LlavaOnevisionForConditionalGeneration",)
    provides = frozenset({"cls_attn", "attn", "attn_received_layers", "keys", "vision_features", "text",
                          "text_mask", "grid", "positions", "sizes", "crop_ids", "video_grid", "frame_ids",
                          "frame_features"})
    has_cls = False  # SigLIP
    options = ("reuse_videos",)

    # ---- model parts ------------------------------------------------------------------------------------------
    @property
    def inner(self) -> Any:
        return self.model.model

    def tower_layers(self) -> Any:
        tower = self.inner.vision_tower
        return getattr(tower, "vision_model", tower).encoder.layers

    def qk_layers(self) -> list[QKLayer]:
        if not hasattr(self, "_qk"):
            self._qk = clip_qk_layers(self.tower_layers())
        return self._qk

    @property
    def default_layer(self) -> int:  # type: ignore[override]
        layer = self.model.config.vision_feature_layer
        layer = layer if isinstance(layer, int) else layer[-1]
        return (layer % (len(self.tower_layers()) + 1)) - 1  # hidden_states[l] is the output of layer l - 1

    def image_token_mask(self, input_ids: Tensor) -> Tensor:
        return input_ids == self.model.config.image_token_id

    def side(self) -> int:
        cfg = self.model.config.vision_config
        return cfg.image_size // cfg.patch_size

    # ---- encoding ---------------------------------------------------------------------------------------------
    def feature_choice(self, kw: dict[str, Any]) -> tuple[str, int | list[int]]:
        """The call's (or config's) ``vision_feature_select_strategy`` (must be ``"full"``) and feature layer."""
        cfg = self.model.config
        strategy = kw.get("vision_feature_select_strategy") or cfg.vision_feature_select_strategy
        if strategy != "full":
            raise ValueError(f"llava_onevision adapter: vision_feature_select_strategy={strategy!r} would drop a patch "
                             "token of the CLS-free SigLIP tower; vtoken supports 'full'")
        layer = kw.get("vision_feature_layer")
        return strategy, cfg.vision_feature_layer if layer is None else layer

    def encode(self, kw: dict[str, Any]) -> Images:
        """Per-view :class:`Images` (``V`` rows of ``g^2`` slots) with the packing in ``extra``."""
        image_sizes = kw.get("image_sizes")
        if image_sizes is None:
            raise ValueError("llava_onevision adapter: image_sizes is required with pixel_values")
        strategy, layer = self.feature_choice(kw)
        bni = kw.get("batch_num_images")
        assert self.capture is not None
        with self.capture.recording():
            out = self.inner.get_image_features(pixel_values=kw["pixel_values"], image_sizes=image_sizes,
                                                vision_feature_layer=layer, vision_feature_select_strategy=strategy,
                                                batch_num_images=bni, return_dict=True)
        hs = out.hidden_states
        feats = hs[layer] if isinstance(layer, int) else torch.cat([hs[i] for i in layer], dim=-1)  # [V, n, C]
        packed = list(out.pooler_output)  # per image [P_i, D], newlines included
        return self.layout(kw["input_ids"], image_sizes, bni, feats, packed)

    def layout(self, input_ids: Tensor, image_sizes: Tensor, bni: Tensor | None, feats: Tensor,
               packed: list[Tensor]) -> Images:
        cfg = self.model.config
        g, side, aspect = self.side(), cfg.vision_config.image_size, cfg.vision_aspect_ratio
        n, dev = g * g, feats.device
        patching = [True] * len(image_sizes) if bni is None else [int(k) == 1 for k in bni for _ in range(int(k))]
        views = [image_size_to_num_patches(s, cfg.image_grid_pinpoints, side) if p else 1
                 for s, p in zip(image_sizes, patching, strict=True)]
        if sum(views) != feats.shape[0] or len(views) != len(packed):
            raise ValueError(f"llava_onevision adapter: {len(views)} image(s) with {sum(views)} views, the tower "
                             f"encoded {feats.shape[0]}")
        placeholder = self.image_token_mask(input_ids)
        rows, cols = placeholder.nonzero(as_tuple=True)  # row-major: the order the model scatters features in
        lengths = [p.shape[0] for p in packed]
        if rows.numel() != sum(lengths):
            raise ValueError(f"llava_onevision adapter: the prompt has {rows.numel()} image tokens, the images "
                             f"pack into {sum(lengths)}")
        r_views = feats.shape[0]
        columns = torch.full((r_views, n), -1, dtype=torch.long, device=dev)
        line = torch.full((r_views, n), -1, dtype=torch.long, device=dev)
        exact = packed[0].new_zeros(r_views, n, packed[0].shape[-1])
        tokens = feats.clone()
        image_of, position, sample = [], [], []
        nl_rows, nl_cols, nl_line, nl_image, nl_value = [], [], [], [], []
        start, vstart, n_lines = 0, 0, 0
        for i, (v, p) in enumerate(zip(views, packed, strict=True)):
            slots, lines, down = image_layout(g, v, image_sizes[i].cpu(), cfg.image_grid_pinpoints, side, aspect)
            if slots.numel() != p.shape[0]:
                raise RuntimeError(f"llava_onevision adapter: layout of image {i} has {slots.numel()} tokens, the "
                                   f"model packed {p.shape[0]}")
            slots, lines = slots.to(dev), lines.to(dev)
            r, c = rows[start : start + p.shape[0]], cols[start : start + p.shape[0]]
            if bool((r != r[0]).any()):
                raise ValueError(f"llava_onevision adapter: the image tokens of image {i} span several samples")
            cell = slots >= 0
            vrow, s = vstart + slots[cell] // n, slots[cell] % n
            columns[vrow, s] = c[cell]
            exact[vrow, s] = p[cell]
            line[vrow, s] = torch.where(lines[cell] >= 0, lines[cell] + n_lines, -1)
            if down:  # the resized canvas in vision space: the tower features packed the model's way, no newlines
                vis = self.inner.pack_image_features([feats[vstart : vstart + v]], image_sizes[i : i + 1],
                                                     image_newline=None, vision_aspect_ratio=aspect)[0][0]
                tokens[vrow, s] = vis.to(tokens.dtype)
            nl_rows.append(r[~cell])
            nl_cols.append(c[~cell])
            nl_line.append(lines[~cell] + n_lines)
            nl_image.append(torch.full_like(r[~cell], i))
            nl_value.append(p[~cell])
            n_lines += int(lines.max()) + 1
            image_of += [i] * v
            position += list(range(v))
            sample += [int(r[0])] * v
            start, vstart = start + p.shape[0], vstart + v
        valid = columns >= 0
        extra = {"exact": exact, "line": line, "n_lines": n_lines, "visual": placeholder,
                 "newlines": (torch.cat(nl_rows), torch.cat(nl_cols), torch.cat(nl_line)),
                 "newline_image": torch.cat(nl_image), "newline_value": torch.cat(nl_value),
                 "view_image": torch.tensor(image_of, device=dev), "view_position": torch.tensor(position, device=dev),
                 "n_images": len(views)}
        return Images(tokens, columns, torch.tensor(sample, device=dev), (g, g), self.inner.multi_modal_projector,
                      space="vision", mask=None if bool(valid.all()) else valid, extra=extra)

    # ---- signals ----------------------------------------------------------------------------------------------
    def received_attention(self, layers: list[int], images: Images) -> Tensor:
        assert self.capture is not None
        return torch.stack([attention_maps(*self.capture.qk(i)) for i in layers], dim=1)  # mean over heads, queries

    def signal(self, name: str, info: MethodInfo, images: Images, kw: dict[str, Any]) -> Any:
        cap = self.capture
        assert cap is not None
        if name == "attn_received_layers":
            return self.received_attention(self.spec_layers(info, name), images)
        if name == "attn":
            return attention_maps(*cap.qk(self.spec_layers(info, name)[0]), reduce="full")
        if name == "keys":
            _, k, layer = cap.qk(self.spec_layers(info, name)[0])
            return mean_keys(k, layer)
        if name == "vision_features":
            clip_joint = self.signal_spec(info, name).space == "clip_joint"
            return images.extra["exact"] if clip_joint else images.tokens
        if name == "positions":
            return images.columns
        if name == "crop_ids":
            return images.extra["view_position"][:, None].expand_as(images.columns)
        return Adapter.signal(self, name, info, images, kw)

    # ---- videos -----------------------------------------------------------------------------------------------
    def video_key(self) -> str | None:
        return "pixel_values_videos"

    def video_token_mask(self, input_ids: Tensor) -> Tensor:
        return input_ids == self.model.config.video_token_id

    def encode_videos(self, kw: dict[str, Any]) -> Images:
        """Videos as the model lays them out: every frame through the tower and the projector, 2 x 2 bilinear pooling
        (``ceil(g / 2)`` tokens a side), the frames one after another, then ONE ``image_newline`` (kept, not a clip
        token: ``extra["fixed"]``)."""
        strategy, layer = self.feature_choice(kw)
        pixels = kw["pixel_values_videos"]
        v, f = pixels.shape[:2]
        assert self.capture is not None
        with self.capture.recording():
            out = self.inner.get_video_features(pixel_values_videos=pixels, vision_feature_layer=layer,
                                                vision_feature_select_strategy=strategy, return_dict=True)
        packed = out.pooler_output  # [V, F * P + 1, D]: the pooled frames, then the newline
        hs = out.hidden_states
        feats = hs[layer] if isinstance(layer, int) else torch.cat([hs[i] for i in layer], dim=-1)  # [V * F, n, C]
        ids = kw["input_ids"]
        rows, cols = self.video_token_mask(ids).nonzero(as_tuple=True)
        if rows.numel() != packed.shape[0] * packed.shape[1]:
            raise ValueError(f"llava_onevision adapter: the prompt has {rows.numel()} video tokens, the {v} video(s) "
                             f"of {f} frames pack into {packed.shape[0] * packed.shape[1]}")
        rows, cols = rows.reshape(v, -1), cols.reshape(v, -1)
        if bool((rows != rows[:, :1]).any()):
            raise ValueError("llava_onevision adapter: the tokens of one video span several samples")
        side = math.ceil(self.side() / 2)
        grids = torch.tensor([[f, side, side]] * v, device=packed.device)
        extra = {"video_grids": grids, "fixed": (rows[:, -1], cols[:, -1], packed[:, -1]), "frames": (v, f),
                 "frame_features": feats.mean(1).reshape(v, f, -1)}
        return Images(packed[:, :-1], cols[:, :-1], rows[:, 0], None, lambda x: x, space="projected", extra=extra)

    def pooled(self, x: Tensor, clips: Images) -> Tensor:
        """Per-patch values of every frame ``[V * F, n, ...]`` -> per clip token ``[V, F * P, ...]``, resized as the
        model resizes the features (its ``apply_pooling``: bilinear to ``ceil(g / 2)`` a side)."""
        v, _f = clips.extra["frames"]
        flat = x.reshape(x.shape[0], x.shape[1], -1).float()
        out = self.inner.apply_pooling(flat)
        return out.reshape(v, -1, *x.shape[2:])

    def video_signal(self, name: str, info: MethodInfo, clips: Images, kw: dict[str, Any]) -> Any:
        """Tower signals of each frame pooled like its features (:meth:`pooled`): ``cls_attn`` (the declared
        CLS-free fallback: attention received), ``attn_received_layers``, ``keys``; ``frame_features`` is the mean of
        each frame's tower features (the HF tower has no attention-pooling head); ``vision_features`` the tokens."""
        if name in POOLED:
            value = self.signal(name, info, clips, kw)  # per frame, from the recorded q/k (CLS: the fallback or None)
            return None if value is None else pool_frame_signal(name, value, lambda x: self.pooled(x, clips))
        if name == "vision_features":
            return clips.tokens
        if name == "frame_features":
            return clips.extra["frame_features"]
        if name == "positions":
            return clips.columns
        return super().video_signal(name, info, clips, kw)

    # ---- reduction and splice ---------------------------------------------------------------------------------
    def view_shares(self, images: Images) -> list[Tensor | None]:
        """Per step, the per-view counts ``[V]`` of an ``int`` ``keep`` (``None`` for a ratio, applied per view)."""
        image = images.extra["view_image"]
        prev = images.mask.sum(1) if images.mask is not None else torch.full_like(image, images.columns.shape[1])
        shares: list[Tensor | None] = []
        for step in self.steps:
            if isinstance(step.keep, int) and not isinstance(step.keep, bool):
                share = split_proportional(step.keep, prev, image, images.extra["n_images"])
                shares.append(share)
                prev = share
            else:
                shares.append(None)
                prev = torch.where(prev > 0, resolve_keep(step.keep, prev).to(prev.device), 0)
        return shares

    def reduce_images(self, images: Images, signals: dict[str, Any]) -> Reduction:
        """Run the methods per view (see the module docstring) -> one row per image, ``extras["views"]`` per view."""
        red = reduce_views(self.steps, self.view_shares(images), images, signals, exact=images.extra["exact"])
        return fold_views(red, images.extra["view_image"], images.extra["view_position"], images.extra["n_images"],
                          images.columns.shape[1])

    def images_per_sample(self, images: Images, batch: int) -> Tensor:
        if "view_image" not in images.extra:  # a video-only prefill: its clips
            return super().images_per_sample(images, batch)
        first = torch.ones_like(images.sample, dtype=torch.bool)
        first[1:] = images.extra["view_image"][1:] != images.extra["view_image"][:-1]
        return torch.bincount(images.sample[first], minlength=batch)

    def last_columns(self, red: Reduction, images: Images) -> tuple[Tensor, Tensor] | None:
        """Image slot ``v * n + i`` of a folded reduction is token ``i`` of the image's view ``v`` (clips, one row
        each, as the base adapter has them)."""
        ex = images.extra
        if "view_image" not in ex:
            return super().last_columns(red, images)
        n = images.columns.shape[1]
        image, position = ex["view_image"], ex["view_position"]
        table = torch.full((ex["n_images"], int(position.max()) + 1), -1, dtype=torch.long, device=image.device)
        table[image, position] = torch.arange(image.numel(), device=image.device)
        idx = red.indices.clamp(min=0)
        row = table.gather(1, (idx // n).clamp(max=table.shape[1] - 1))
        cols = images.columns[row.clamp(min=0), idx % n]
        return images.sample[table[:, 0]], torch.where(red.mask & (row >= 0), cols, -1)

    def place_images(self, kw: dict[str, Any], input_ids: Tensor, embeds: Tensor, keep: Tensor) -> None:
        images, red = self.reduce_prefill(kw)
        assert self.handle is not None
        views = red.extras["views"]
        keep &= ~images.extra["visual"]
        m = views.mask
        idx = views.indices.clamp(min=0)
        rows = images.sample[:, None].expand_as(idx)[m]
        cols = images.columns.gather(1, idx)[m]
        keep[rows, cols] = True
        embeds[rows, cols] = views.tokens[m].to(embeds.dtype)
        # a newline stays iff a token of its canvas row stays
        kept_lines = images.extra["line"].gather(1, idx)[m]
        line_on = torch.zeros(images.extra["n_lines"] + 1, dtype=torch.bool, device=input_ids.device)
        line_on[torch.where(kept_lines >= 0, kept_lines, images.extra["n_lines"])] = True
        nl_rows, nl_cols, nl_line = images.extra["newlines"]
        on = line_on[nl_line]
        keep[nl_rows[on], nl_cols[on]] = True
        embeds[nl_rows, nl_cols] = images.extra["newline_value"].to(embeds.dtype)  # the model's packed image_newline
        nl_image = images.extra["newline_image"][on]
        red.extras["newlines"] = torch.zeros(images.extra["n_images"], dtype=torch.long,
                                             device=input_ids.device).index_add_(0, nl_image, torch.ones_like(nl_image))
        self.handle.last = red

