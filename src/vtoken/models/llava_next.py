"""LLaVA-NeXT (``LlavaNextForConditionalGeneration``): a CLIP tower with a CLS token, an MLP projector and AnyRes
packing.

How the model lays out one image (``g = image_size // patch_size`` tokens a side, ``n = g * g`` per view; see
``pack_image_features`` / ``get_image_features`` in transformers' ``modeling_llava_next.py``):

* **Views.** The tower encodes every view on its own: view 0 is the base (thumbnail: the whole image resized), views
  ``1 .. rows * cols`` the crops of the best grid pinpoint, row-major (``pixel_values [images, views, 3, H, W]``,
  zero-padded; ``image_sizes [images, 2]`` as ``(H, W)`` gives each image's views).
* **Packing** (after the projector): the base view's ``n`` tokens, then the crops stitched into a
  ``(rows g) x (cols g)`` canvas, unpadded to the image's aspect ratio (``unpad_image``: whole rows or columns cut at
  both ends) and written row by row, each row followed by one ``image_newline`` token.

vtoken's choices:

* **Where methods run: per view, before packing**, on the view's ``g x g`` CLIP grid (``grid = (g, g)`` for the first
  method of a pipeline), with that view's own CLS signals (recomputed on the side from hooked q/k of every view, so the
  model keeps SDPA). Canvas tokens cut by unpadding are masked out (never kept). Vision-space methods see the CLIP
  features, LLM-space methods the projected ones; a token kept unchanged is always spliced with the model's own
  projected value, so ``keep`` = all is bit-exact.
* **``keep`` stays per image** (all views): it is resolved against the image's valid tokens (newlines not counted)
  and split over the views in proportion to their valid tokens (:func:`vtoken.ops.crops.apportion`: largest
  remainder, ties to the earlier view, base first), so an image keeps exactly ``min(keep, valid)`` tokens for an
  exact method; a view whose share is 0 (``keep`` < views) keeps nothing. In a composition every step splits its own
  ``keep`` over what the previous step left.
* **Crop-aware methods** (those taking ``crop_ids``: ``hired``, ``globalcom2``) run once per image on all its views
  and split ``keep`` themselves. They get the image in :mod:`vtoken.ops.crops`' any-resolution layout (the base view,
  then the whole padded crop canvas in raster order, ``crop_ids`` 0 / ``1 + r * cols + c``, unpadded-away tokens
  masked) with the original per-view signals; their result is mapped back to the view-major indices below.
* **Newlines** are not reduction units: an ``image_newline`` stays iff a token of its (unpadded) canvas row stays;
  rows with nothing kept lose their newline. Newlines do not count toward ``keep``; ``handle.last.extras["newlines"]``
  holds the kept ones per image.
* **Splice**: every kept token goes to its own placeholder column (base view token ``s`` -> the image's ``s``-th
  placeholder; canvas token ``(y, x)`` of the unpadded canvas -> ``n + y * (w + 1) + x``) with its original position
  id; the removed columns leave the sequence.
* **Indices**: :attr:`Handle.last` has one row per image, view ``v``'s token ``s = row * g + col`` at ``v * n + s``
  (view-major, as the tower's output); ``extras["steps"]`` holds each method's reduction in the same index space.
* **Signals**: those of LLaVA per view, plus ``crop_ids`` (the view index, for crop-aware methods). ``text`` /
  ``text_mask`` are the prompt's (one row per image).

``vision_feature_select_strategy`` must be ``"default"`` (``"full"`` keeps the CLS token as a visual token).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from transformers.models.llava_next.modeling_llava_next import (
    get_anyres_image_grid_shape,
    image_size_to_num_patches,
    unpad_image,
)

from ..api import reduce, run_method
from ..core import Reduction, gather_rows, resolve_keep, signals_where
from ..methods import MethodInfo
from ..ops.crops import apportion
from .base import ClsTowerAdapter, Images
from .llava import LlavaAdapter
from .pipeline import TOKEN_DIM, Step, fold_rows, run_steps

#: per-view tower signals that this adapter lays out per image (the catalogue's attention signals)
VIEW_SIGNALS = signals_where(attention=True)


def crop_aware(info: MethodInfo) -> bool:
    """Methods that take ``crop_ids`` see a whole image (all views) at once."""
    return "crop_ids" in (*info.signals, *info.optional_signals)


def reduce_counts(info: MethodInfo, tokens: Tensor, counts: Tensor, mask: Tensor | None, signals: dict[str, Any],
                  knobs: dict[str, Any]) -> Reduction:
    """:func:`vtoken.reduce` with per-row counts ``[R]`` (already resolved, ``>= 1``) instead of one ``keep``."""
    return run_method(info, tokens, counts, mask=mask, signals=signals, knobs=knobs)


class LlavaNextAdapter(LlavaAdapter):
    family = "llava_next"
    model_classes = ("LlavaNextForConditionalGeneration",)
    provides = ClsTowerAdapter.provides | frozenset({"crop_ids"})

    # ---- encoding -----------------------------------------------------------------------------------------------
    def encode(self, kw: dict[str, Any]) -> Images:
        cfg = self.model.config
        sizes = kw.get("image_sizes")
        if sizes is None:
            raise ValueError("llava_next adapter: image_sizes is required with pixel_values (the processor returns it)")
        strategy = self.select_strategy(kw)
        if strategy != "default":
            raise ValueError(f"llava_next adapter: vision_feature_select_strategy={strategy!r} keeps the CLS token as "
                             "a visual token; vtoken supports 'default' (patch tokens only)")
        sizes = torch.as_tensor(sizes).reshape(-1, 2)
        image_px = cfg.vision_config.image_size
        g = image_px // cfg.vision_config.patch_size
        n = g * g
        views = [image_size_to_num_patches(s.tolist(), cfg.image_grid_pinpoints, image_px) for s in sizes]
        pixel_values = kw["pixel_values"]
        if pixel_values.dim() == 5:
            pixel_values = torch.cat([pv[:v] for pv, v in zip(pixel_values, views, strict=True)], dim=0)
        elif pixel_values.dim() != 4:
            raise ValueError(f"llava_next adapter: pixel_values must be 4-D or 5-D, got {tuple(pixel_values.shape)}")
        if pixel_values.shape[0] != sum(views):
            raise ValueError(f"llava_next adapter: {pixel_values.shape[0]} views for images needing {sum(views)}")
        feats = self.tower_features(pixel_values, self.feature_layer(kw))
        projected = self.inner.multi_modal_projector(feats)  # [V, n, D]: the model's own values, same call
        dev = feats.device

        # per image: view-major layout, placeholder offsets, newline rows, any-resolution (canvas) order
        n_img = len(views)
        width = max(views) * n
        flat = torch.full((n_img, width), -1, dtype=torch.long, device=dev)       # global view * n + slot
        offset = torch.full((n_img, width), -1, dtype=torch.long, device=dev)     # placeholder offset in the block
        row = torch.full((n_img, width), -1, dtype=torch.long, device=dev)        # unpadded canvas row
        canvas = torch.full((n_img, width), -1, dtype=torch.long, device=dev)     # any-res order -> view-major
        lengths, newline_offsets = [], []
        first_view = 0
        for i, (size, v) in enumerate(zip(sizes, views, strict=True)):
            rows_c, cols_c = get_anyres_image_grid_shape(size.tolist(), cfg.image_grid_pinpoints, image_px)
            if rows_c * cols_c != v - 1:
                raise ValueError(f"llava_next adapter: image {i} has {v} views but a {rows_c} x {cols_c} crop grid")
            wc = cols_c * g
            grid = torch.arange(rows_c * g * wc, device=dev).reshape(1, rows_c * g, wc)
            kept = unpad_image(grid, size.tolist())[0]                            # [h, w] canvas positions
            h, w = kept.shape
            cy, cx = kept // wc, kept % wc
            vm = (1 + (cy // g) * cols_c + cx // g) * n + (cy % g) * g + cx % g  # view-major index
            ys = torch.arange(h, device=dev)[:, None].expand(h, w)
            xs = torch.arange(w, device=dev)[None, :].expand(h, w)
            base = torch.arange(n, device=dev)
            flat[i, : v * n] = first_view * n + torch.arange(v * n, device=dev)
            offset[i, base] = base
            offset[i, vm.reshape(-1)] = (n + ys * (w + 1) + xs).reshape(-1)
            row[i, vm.reshape(-1)] = ys.reshape(-1)
            all_c = torch.arange(rows_c * g * wc, device=dev)
            acy, acx = all_c // wc, all_c % wc
            canvas[i, :n] = base
            canvas[i, n : v * n] = (1 + (acy // g) * cols_c + acx // g) * n + (acy % g) * g + acx % g
            lengths.append(n + h * (w + 1))
            newline_offsets.append(n + torch.arange(h, device=dev) * (w + 1) + w)
            first_view += v

        input_ids = kw["input_ids"]
        is_image = self.image_token_mask(input_ids)
        total = int(is_image.sum())
        if total != sum(lengths):
            raise ValueError(f"llava_next adapter: the prompt has {total} image tokens but the images need "
                             f"{sum(lengths)} ({lengths})")
        rows_b, cols_b = is_image.nonzero(as_tuple=True)  # row-major: image i owns the i-th block of placeholders
        start = torch.tensor([0, *lengths], device=dev).cumsum(0)
        sample = rows_b[start[:-1]]
        if not bool((rows_b[start[1:] - 1] == sample).all()):
            raise ValueError("llava_next adapter: an image's placeholder tokens span two samples")
        valid = offset >= 0
        columns = torch.where(valid, cols_b[(start[:-1, None] + offset.clamp(min=0)).clamp(max=total - 1)], -1)
        n_rows = max(int(o.numel()) for o in newline_offsets)
        newline_cols = torch.full((n_img, n_rows), -1, dtype=torch.long, device=dev)
        for i, o in enumerate(newline_offsets):
            newline_cols[i, : o.numel()] = cols_b[start[i] + o]
        view = torch.where(flat >= 0, torch.arange(width, device=dev)[None, :] // n, -1)
        src = flat.clamp(min=0)
        tokens = feats.reshape(-1, feats.shape[-1])[src] * valid[..., None]
        llm = projected.reshape(-1, projected.shape[-1])[src] * valid[..., None]
        extra = {"flat": flat, "view": view, "row": row, "canvas": canvas, "newline_cols": newline_cols,
                 "llm": llm, "side": g}
        return Images(tokens, columns, sample, (g, g), self.project, space="vision", mask=valid, extra=extra)

    def project(self, x: Tensor) -> Tensor:
        return self.inner.multi_modal_projector(x)

    # ---- signals ------------------------------------------------------------------------------------------------
    def signal(self, name: str, info: MethodInfo, images: Images, kw: dict[str, Any]) -> Any:
        if name == "crop_ids":
            return images.extra["view"]
        if name in VIEW_SIGNALS:
            return self._layout(super().signal(name, info, images, kw), name, images)
        if name == "vision_features":
            clip_joint = self.signal_spec(info, name).space == "clip_joint"
            return images.extra["llm"] if clip_joint else images.tokens
        return super().signal(name, info, images, kw)

    @staticmethod
    def _layout(value: Tensor, name: str, images: Images) -> Tensor:
        """A per-view tower signal ``[V, n, ...]`` (``[V, L, n]`` for layer stacks, ``[V, n, n]`` for ``attn``) -> the
        images' view-major layout ``[I, N, ...]`` (zeros on padding; ``attn`` block-diagonal over the views)."""
        flat, valid = images.extra["flat"], images.mask
        src = flat.clamp(min=0)
        if name == "attn":
            n = value.shape[1]
            view, slot = src // n, src % n
            out = value[view[:, :, None], slot[:, :, None], slot[:, None, :]]
            same = (view[:, :, None] == view[:, None, :]) & valid[:, :, None] & valid[:, None, :]
            return out * same
        if TOKEN_DIM.get(name) == 2:
            v = value.transpose(1, 2)
            out = v.reshape(-1, *v.shape[2:])[src] * valid[..., None]
            return out.transpose(1, 2)
        out = value.reshape(-1, *value.shape[2:])[src]
        return out * valid.reshape(*valid.shape, *([1] * (out.dim() - 2)))

    # ---- reduction ----------------------------------------------------------------------------------------------
    def reduce_images(self, images: Images, signals: dict[str, Any]) -> Reduction:
        """Run the steps (per view, or per image for crop-aware methods) -> one row per image, view-major indices. A
        token still equal to its source CLIP feature at projection takes the model's own projected value."""
        def run(step: Step, x: Tensor, valid: Tensor, index: Tensor, sig: dict[str, Any]) -> Reduction:
            if crop_aware(step.info):
                return self._run_image(step, x, valid, index, signals, sig, images)
            return self._run_views(step, x, valid, index, sig, images, first=step is self.steps[0])

        llm = images.extra["llm"]
        return run_steps(self.steps, images.tokens, signals, self.project, "vision", mask=images.mask,
                         exact=lambda index, valid: gather_rows(llm, index, valid), run=run)

    def _run_views(self, step: Step, x: Tensor, valid: Tensor, index: Tensor, sig: dict[str, Any], images: Images,
                   first: bool) -> Reduction:
        """One method on every view of every image (rows = views), ``keep`` split per image over the views."""
        i, m = valid.shape
        dev = valid.device
        n = images.extra["side"] ** 2
        view = torch.where(valid, images.extra["view"].gather(1, index.clamp(min=0)), -1)
        v_max = int(images.extra["view"].amax()) + 1
        per_view = torch.zeros(i, v_max + 1, dtype=torch.long, device=dev)
        per_view.scatter_add_(1, torch.where(view >= 0, view, v_max), torch.ones_like(view))
        per_view = per_view[:, :v_max]
        keep = resolve_keep(step.keep, valid.sum(1)).to(dev)
        share = apportion(keep, per_view, per_view)
        # valid slots in ascending order hold the views one after the other (indices ascend, the layout is view-major)
        packed = torch.sort((~valid).to(torch.int8), dim=1, stable=True).indices
        start = per_view.cumsum(1) - per_view
        ri, rv = (share > 0).nonzero(as_tuple=True)
        width = int(per_view[ri, rv].max())
        ar = torch.arange(width, device=dev)[None, :]
        inside = ar < per_view[ri, rv][:, None]
        src = torch.where(inside, packed[ri[:, None], (start[ri, rv][:, None] + ar).clamp(max=m - 1)], -1)
        rows = ri[:, None].expand_as(src)
        xv = x[rows, src.clamp(min=0)] * inside[..., None]
        vsig: dict[str, Any] = {}
        for name in (*step.info.signals, *step.info.optional_signals):
            value = sig.get(name)
            if name == "grid":
                value = (images.extra["side"],) * 2 if first and width == n else None
            elif name == "attn" and isinstance(value, Tensor):
                value = value[rows[:, :, None], src.clamp(min=0)[:, :, None], src.clamp(min=0)[:, None, :]]
            elif isinstance(value, Tensor) and TOKEN_DIM.get(name) == 1:
                value = value[rows, src.clamp(min=0)]
            elif isinstance(value, Tensor) and TOKEN_DIM.get(name) == 2:
                value = value.transpose(1, 2)[rows, src.clamp(min=0)].transpose(1, 2)
            elif isinstance(value, Tensor) and value.dim() > 0 and value.shape[0] == i:
                value = value[ri]
            if value is not None:
                vsig[name] = value
        mask = None if bool(inside.all()) else inside
        red = reduce_counts(step.info, xv, share[ri, rv], mask, vsig, step.kwargs)
        return fold_rows(red, ri, src, i, m, {"views": red, "view_image": ri, "view_position": rv})

    def _run_image(self, step: Step, x: Tensor, valid: Tensor, index: Tensor, signals: dict[str, Any],
                   sig: dict[str, Any], images: Images) -> Reduction:
        """A crop-aware method on whole images in the any-resolution layout; result in the current slots."""
        i, m = valid.shape
        dev = valid.device
        n_all = images.columns.shape[1]
        canvas = images.extra["canvas"]
        # current slot of every view-major token (-1: dropped or padding), then the any-resolution order
        slot_of = torch.full((i, n_all + 1), -1, dtype=torch.long, device=dev)
        slots = torch.arange(m, device=dev).expand(i, m)
        slot_of.scatter_(1, torch.where(valid, index, n_all), torch.where(valid, slots, -1))
        slot_of = slot_of[:, :n_all]
        cur = torch.where(canvas >= 0, slot_of.gather(1, canvas.clamp(min=0)), -1)  # [I, N]: any-res -> slot
        mask = cur >= 0
        xc = x[torch.arange(i, device=dev)[:, None], cur.clamp(min=0)] * mask[..., None]
        csig: dict[str, Any] = {}
        for name in (*step.info.signals, *step.info.optional_signals):
            if name == "crop_ids":
                csig[name] = torch.where(canvas >= 0, images.extra["view"].gather(1, canvas.clamp(min=0)), -1)
                continue
            value = signals.get(name) if name in TOKEN_DIM and name != "sizes" else sig.get(name)
            if name == "sizes" and isinstance(value, Tensor):
                value = torch.where(mask, value.gather(1, cur.clamp(min=0)), 0)
            elif isinstance(value, Tensor) and TOKEN_DIM.get(name) == 1:
                value = gather_rows(value, canvas, canvas >= 0)
            elif isinstance(value, Tensor) and TOKEN_DIM.get(name) == 2:
                value = gather_rows(value.transpose(1, 2), canvas, canvas >= 0).transpose(1, 2)
            elif name in ("grid", "attn"):
                value = None
            if value is not None:
                csig[name] = value
        red = reduce(xc, step.keep, step.info.name, mask=None if bool(mask.all()) else mask, **csig, **step.kwargs)
        # any-resolution indices -> current slots, ascending
        got = torch.where(red.mask, cur.gather(1, red.indices.clamp(min=0)), -1)
        key = torch.where(got >= 0, got, m + torch.arange(got.shape[1], device=dev))
        order = key.argsort(1)
        new_idx = got.gather(1, order)
        new_mask = red.mask.gather(1, order)
        tokens = gather_rows(red.tokens, order, new_mask)
        sizes = None if red.sizes is None else red.sizes.gather(1, order)
        assign = None
        if red.assign is not None:
            ar = torch.arange(order.shape[1], device=dev).expand_as(order)
            inverse = torch.empty_like(order).scatter_(1, order, ar)
            a = torch.where(red.assign >= 0, inverse.gather(1, red.assign.clamp(min=0)), -1)
            assign = torch.full((i, m + 1), -1, dtype=torch.long, device=dev)
            assign.scatter_(1, torch.where(mask, cur, m), torch.where(mask, a, -1))
            assign = assign[:, :m]
        return Reduction(tokens, new_idx, new_mask, assign, sizes, {**red.extras, "crop_layout": red})

    # ---- splice -------------------------------------------------------------------------------------------------
    def place_images(self, kw: dict[str, Any], input_ids: Tensor, embeds: Tensor, keep: Tensor) -> None:
        images, red = self.reduce_prefill(kw)
        keep &= ~self.image_token_mask(input_ids)
        rows = images.sample[:, None].expand_as(red.indices)[red.mask]
        cols = images.columns.gather(1, red.indices.clamp(min=0))[red.mask]
        keep[rows, cols] = True
        embeds[rows, cols] = red.tokens[red.mask].to(embeds.dtype)
        # newlines: kept iff a token of their canvas row is kept
        nl_cols = images.extra["newline_cols"]
        n_img, n_rows = nl_cols.shape
        tok_row = torch.where(red.mask, images.extra["row"].gather(1, red.indices.clamp(min=0)), -1)
        has = torch.zeros(n_img, n_rows + 1, dtype=torch.bool, device=keep.device)
        has.scatter_(1, torch.where(tok_row >= 0, tok_row, n_rows), True)
        nl_keep = has[:, :n_rows] & (nl_cols >= 0)
        nl_rows = images.sample[:, None].expand_as(nl_cols)[nl_keep]
        keep[nl_rows, nl_cols[nl_keep]] = True
        embeds[nl_rows, nl_cols[nl_keep]] = self.inner.image_newline.to(embeds.dtype)
        red.extras["newlines"] = nl_keep.sum(1)
        assert self.handle is not None
        self.handle.last = red
