"""InternVL (``InternVLForConditionalGeneration``): an InternViT tower with a CLS token, pixel-shuffle (space-to-depth)
downsampling and an MLP projector; dynamic high-resolution tiling gives several views per image.

Also the machinery shared with the other pixel-shuffle, multi-view families (Idefics3 / SmolVLM):

* **Reduction unit.** The tokens the language model sees: one per ``s x s`` block of tower patches
  (``s = 1 / downsample_ratio``, 2 for every released InternVL). Vision-space methods run on the shuffled features
  (``[V, (g/s)^2, C * s^2]``, the projector's input), LLM-space methods on the projected tokens.
* **Patch signals -> shuffled grid.** Attention signals are computed on the tower's ``g x g`` patch grid (CLS row /
  column handled as for LLaVA) and every per-patch value (``cls_attn``, ``cls_attn_layers``, ``attn_logits``,
  ``attn_received_layers``, ``keys``) is averaged over the ``s x s`` block of patches a shuffled token holds
  (:func:`block_mean`); ``attn`` is averaged over both the query and the key blocks. Signal layers follow each
  method's ``signal_spec``, except that VisionZip's and HiPrune's ``-2`` (LLaVA's select layer) becomes the family's
  feature layer (the last one by default for both families).
* **Views.** An image is a run of views (InternVL: its tiles then the thumbnail; Idefics3: its tiles then the global
  view), each encoded separately by the tower. Methods run per view (each view has its own grid and CLS signals);
  ``keep`` stays per image and is split over the image's ``V`` views: a ratio applies to every view unchanged; an
  ``int`` count ``k`` gives every view ``k // V`` tokens and one more to the first ``k % V`` views in prompt order
  (so an image keeps exactly ``k`` with an exact method; views whose share is 0, when ``k < V``, are dropped whole).
  In a composition every step splits its own ``keep`` the same way.
* **Indices.** :attr:`Handle.last` has one row per image: indices into the image's views concatenated in prompt
  order, view ``v`` owning ``[v * n, (v + 1) * n)``. When some image of the batch has several views,
  ``last.extras["views"]`` is the per-view reduction, ``last.extras["steps"]`` each method's per-view reduction and
  ``extras["view_image"]`` / ``extras["view_position"]`` place the view rows (with single-view images only, ``last``
  is the plain pipeline result, as for LLaVA).

InternVL specifics: a prompt holds ``<img>`` + ``<IMG_CONTEXT>`` x (tokens per view x views) + ``</img>`` per image,
so each maximal run of image placeholders in a sample is one image, its views its consecutive ``n``-token chunks;
``pixel_values`` ``[views, 3, H, W]`` lists the views in the same order. q/k are read after the optional q/k norm.
The tile grid (rows x cols) is not recoverable from the inputs, so crop-aware methods (``hired``'s budget split,
``globalcom2``) get no ``crop_ids`` and run in their single-view form on every view.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any, ClassVar

import torch
from torch import Tensor

from ..core import Reduction
from ..methods import MethodInfo
from ..ops.attention import split_heads
from .base import ClsTowerAdapter, Images
from .capture import QKLayer
from .pipeline import run_steps

# ---------------------------------------------------------------------------------------------------------------
# pixel-shuffle grids
# ---------------------------------------------------------------------------------------------------------------


def block_mean(x: Tensor, side: int, scale: int, dim: int = 1) -> Tensor:
    """Average the ``scale x scale`` blocks of a raster ``side x side`` token axis.

    ``x`` has ``side ** 2`` entries at ``dim`` (row-major patches); the result has ``(side // scale) ** 2`` entries
    there, block ``(i, j)`` (patch rows ``i*s .. i*s+s-1``, cols ``j*s .. j*s+s-1``) at ``i * (side // scale) + j``:
    the layout of the pixel shuffle of InternVL and Idefics3.
    """
    g = side // scale
    x = x.movedim(dim, -1)
    lead = x.shape[:-1]
    out = x.reshape(*lead, g, scale, g, scale).mean(dim=(-3, -1)).reshape(*lead, g * g)
    return out.movedim(-1, dim)


def _bias(key_mask: Tensor | None, like: Tensor) -> Tensor | None:
    if key_mask is None:
        return None
    return torch.zeros(key_mask.shape, dtype=like.dtype, device=like.device).masked_fill(~key_mask, float("-inf"))


def attention_maps(q: Tensor, k: Tensor, layer: QKLayer, key_mask: Tensor | None = None,
                   reduce: str = "received") -> Tensor:
    """Attention of a tower layer recomputed from hooked q/k ``[B, T, E]`` in float32, one head at a time.

    ``key_mask [B, T]`` (True = real token) masks padded keys as the model does and drops padded query rows.
    ``reduce="received"``: ``[B, T]`` the attention each token receives, softmax probabilities averaged over heads
    and over the real query rows. ``reduce="full"``: ``[B, T, T]`` the head-mean probabilities of every row.
    """
    qh, kh = split_heads(q.float(), layer.num_heads), split_heads(k.float(), layer.num_heads)
    scale = layer.scale if layer.scale is not None else qh.shape[-1] ** -0.5
    bias = _bias(key_mask, qh)
    b, h, t, _ = qh.shape
    out = torch.zeros((b, t) if reduce == "received" else (b, t, t), dtype=qh.dtype, device=qh.device)
    rows = None if key_mask is None else key_mask.to(qh.dtype)
    for i in range(h):
        logits = (qh[:, i] @ kh[:, i].transpose(-1, -2)) * scale
        if bias is not None:
            logits = logits + bias[:, None, :]
        att = logits.softmax(-1)
        if reduce == "full":
            out += att
        elif rows is None:
            out += att.mean(1)
        else:
            out += (att * rows[:, :, None]).sum(1) / rows.sum(1, keepdim=True).clamp(min=1)
    return out / h


# ---------------------------------------------------------------------------------------------------------------
# views: keep split, grouping, folding
# ---------------------------------------------------------------------------------------------------------------


def split_keep(keep: Any, views: Tensor, position: Tensor) -> Tensor | None:
    """Per-view counts ``[R]`` of an ``int`` per-image ``keep`` over ``views [R]`` views (``position [R]``: index of
    the view in its image): ``k // V``, plus one for the first ``k % V`` views in prompt order (so an image keeps
    exactly ``k``; with ``k < V`` the last views get 0 and are dropped whole). ``None`` for a ratio (applied to every
    view)."""
    if isinstance(keep, Tensor) and keep.numel() == 1:
        keep = keep.item()
    if isinstance(keep, bool) or not isinstance(keep, int):
        return None
    return keep // views + (position < keep % views).long()


def _empty(rows: int, like: Reduction) -> Reduction:
    """A reduction that keeps nothing of ``rows`` rows (views whose share of ``keep`` is 0)."""
    dev = like.indices.device
    return Reduction(like.tokens.new_zeros(rows, 0, like.tokens.shape[-1]),
                     torch.zeros(rows, 0, dtype=torch.long, device=dev),
                     torch.zeros(rows, 0, dtype=torch.bool, device=dev))


def stack_reductions(parts: list[tuple[Tensor, Reduction | None]], total: int) -> Reduction:
    """Reductions of disjoint row subsets ``(rows [r], Reduction)`` -> one ``Reduction`` of ``total`` rows (padded to
    the widest; ``assign``/``sizes`` filled in for parts without them; ``extras["steps"]`` stacked step by step). A part
    given as ``None`` keeps nothing of its rows."""
    ref = next(r for _, r in parts if r is not None)
    parts = [(rows, r if r is not None else _empty(len(rows), ref)) for rows, r in parts]
    k = max(r.indices.shape[1] for _, r in parts)
    dev, dt = ref.tokens.device, ref.tokens.dtype
    tokens = torch.zeros(total, k, ref.tokens.shape[-1], dtype=dt, device=dev)
    indices = torch.full((total, k), -1, dtype=torch.long, device=dev)
    mask = torch.zeros(total, k, dtype=torch.bool, device=dev)
    merged = any(r.assign is not None for _, r in parts)
    sized = any(r.sizes is not None for _, r in parts)
    width = max((r.assign.shape[1] if r.assign is not None else int(r.indices.max()) + 1 if r.indices.numel() else 0)
                for _, r in parts)
    assign = torch.full((total, width), -1, dtype=torch.long, device=dev) if merged else None
    sizes = torch.zeros(total, k, dtype=torch.float32, device=dev) if sized else None
    for rows, r in parts:
        kk = r.indices.shape[1]
        tokens[rows, :kk] = r.tokens
        indices[rows, :kk] = r.indices
        mask[rows, :kk] = r.mask
        if assign is not None:
            if r.assign is not None:
                assign[rows, : r.assign.shape[1]] = r.assign
            else:  # pure pruning: input i went to the output slot holding index i
                slot = torch.full((len(rows), width), -1, dtype=torch.long, device=dev)
                src = torch.arange(kk, device=dev).expand(len(rows), kk)
                row_ix = torch.arange(len(rows), device=dev)[:, None].expand(len(rows), kk)
                slot[row_ix[r.mask], r.indices[r.mask]] = src[r.mask]
                assign[rows] = slot
        if sizes is not None:
            sizes[rows, :kk] = r.sizes.float() if r.sizes is not None else r.mask.float()
    extras: dict[str, Any] = {}
    steps = [p.extras.get("steps") for _, p in parts]
    depth = max((len(s) for s in steps if s is not None), default=0)
    if depth and all(s is None or len(s) == depth for s in steps):
        extras["steps"] = [stack_reductions([(rows, s[i] if s is not None else None)
                                             for (rows, _), s in zip(parts, steps, strict=True)], total)
                           for i in range(depth)]
    return Reduction(tokens, indices, mask, assign, sizes, extras)


def fold_views(red: Reduction, image: Tensor, position: Tensor, n_images: int, n: int) -> Reduction:
    """Per-view reduction ``[R, K]`` (indices into each view's ``n`` tokens) -> one row per image ``[I, K']``.

    ``image [R]`` (non-decreasing) and ``position [R]`` place each view; an image's outputs are its views' outputs in
    view order, view ``v``'s index ``i`` becoming ``v * n + i``. ``assign`` (``[I, V_max * n]``) and ``sizes`` follow.
    """
    r, k = red.indices.shape
    dev = red.indices.device
    counts = red.mask.sum(1)
    per_image = torch.zeros(n_images, dtype=torch.long, device=dev).index_add_(0, image, counts)
    image_start = per_image.cumsum(0) - per_image
    start = (counts.cumsum(0) - counts) - image_start[image]  # first output slot of each view within its image
    width = int(per_image.max())
    slot = start[:, None] + torch.arange(k, device=dev)[None, :]
    rows = image[:, None].expand(r, k)
    m = red.mask
    tokens = red.tokens.new_zeros(n_images, width, red.tokens.shape[-1])
    tokens[rows[m], slot[m]] = red.tokens[m]
    indices = torch.full((n_images, width), -1, dtype=torch.long, device=dev)
    indices[rows[m], slot[m]] = (position[:, None] * n + red.indices)[m]
    mask = torch.zeros(n_images, width, dtype=torch.bool, device=dev)
    mask[rows[m], slot[m]] = True
    sizes = None
    if red.sizes is not None:
        sizes = torch.zeros(n_images, width, dtype=red.sizes.dtype, device=dev)
        sizes[rows[m], slot[m]] = red.sizes[m]
    assign = None
    if red.assign is not None:
        a = red.assign[:, :n]
        n_views = int(position.max()) + 1
        assign = torch.full((n_images, n_views * n), -1, dtype=torch.long, device=dev)
        cols = position[:, None] * n + torch.arange(a.shape[1], device=dev)[None, :]
        assign[image[:, None].expand_as(a), cols] = torch.where(a >= 0, a + start[:, None], -1)
    extras = {"steps": red.extras.get("steps", []), "views": red, "view_image": image, "view_position": position}
    return Reduction(tokens, indices, mask, assign, sizes, extras)


def group_views(views: Images, image: Tensor) -> Images:
    """Per-view :class:`Images` (``R`` rows of ``n`` tokens) and ``image [R]`` (non-decreasing image index of each view)
    -> :class:`Images` with one row per image (its views concatenated, padded), holding the views in ``extra``.
    Returns ``views`` itself when every image has a single view."""
    r, n = views.columns.shape
    n_images = int(image.max()) + 1 if r else 0
    if n_images == r:
        return views
    dev = views.columns.device
    per_image = torch.bincount(image, minlength=n_images)
    first = per_image.cumsum(0) - per_image
    position = torch.arange(r, device=dev) - first[image]
    v_max = int(per_image.max())
    tokens = views.tokens.new_zeros(n_images, v_max, n, views.tokens.shape[-1])
    tokens[image, position] = views.tokens
    columns = torch.full((n_images, v_max, n), -1, dtype=torch.long, device=dev)
    columns[image, position] = views.columns
    sample = views.sample[first]
    mask = (torch.arange(v_max, device=dev)[None, :] < per_image[:, None])[:, :, None].expand(-1, -1, n)
    extra = {"views": views, "view_image": image, "view_position": position, "view_count": per_image[image]}
    return Images(tokens.reshape(n_images, v_max * n, -1), columns.reshape(n_images, -1), sample, None,
                  views.project, views.space, mask.reshape(n_images, -1), extra)


#: methods whose ``signal_spec`` names LLaVA's feature (select) layer as ``-2``; read as the family's feature layer
SELECT_LAYER_METHODS = frozenset({"visionzip", "hiprune"})


class MultiViewAdapter(ClsTowerAdapter):
    """Families whose images may have several views (tiles), each encoded by the tower on its own: signals are computed
    per view, methods run per view with the per-image ``keep`` split over the views (:func:`split_keep`), and the
    result is folded back to one row per image (:func:`fold_views`)."""

    def spec_layers(self, info: MethodInfo, name: str) -> list[int]:
        """As :meth:`ClsTowerAdapter.spec_layers`; VisionZip's and HiPrune's ``-2`` (LLaVA's select layer, whose output
        the projector reads) is this family's feature layer (:attr:`default_layer`), as their Qwen2.5-VL ports do."""
        layers = super().spec_layers(info, name)
        if info.name in SELECT_LAYER_METHODS:
            layers = [self.default_layer if layer == -2 else layer for layer in layers]
        return layers

    def collect_signals(self, images: Images, kw: dict[str, Any]) -> dict[str, Any]:
        return super().collect_signals(images.extra.get("views", images), kw)

    def reduce_images(self, images: Images, signals: dict[str, Any]) -> Reduction:
        views = images.extra.get("views")
        if views is None:
            return super().reduce_images(images, signals)
        image, position, count = images.extra["view_image"], images.extra["view_position"], images.extra["view_count"]
        r, n = views.columns.shape
        shares = [split_keep(step.keep, count, position) for step in self.steps]
        table = torch.stack([s if s is not None else torch.full_like(count, -1) for s in shares], dim=1)
        keys, group = torch.unique(table, dim=0, return_inverse=True)
        parts: list[tuple[Tensor, Reduction | None]] = []
        for g in range(keys.shape[0]):  # one run per distinct split (a handful: views per image x remainder)
            rows = (group == g).nonzero()[:, 0]
            if bool((keys[g] == 0).any()):
                parts.append((rows, None))
                continue
            steps = [step if share is None else replace(step, keep=int(keys[g, i]))
                     for i, (step, share) in enumerate(zip(self.steps, shares, strict=True))]
            sig = {k: v[rows] if isinstance(v, Tensor) and v.dim() > 0 and v.shape[0] == r else v
                   for k, v in signals.items()}
            mask = None if views.mask is None else views.mask[rows]
            parts.append((rows, run_steps(steps, views.tokens[rows], sig, views.project, views.space, mask=mask)))
        red = parts[0][1] if len(parts) == 1 and parts[0][1] is not None else stack_reductions(parts, r)
        return fold_views(red, image, position, images.columns.shape[0], n)


def placeholder_views(mask: Tensor, n: int, family: str) -> tuple[Tensor, Tensor, Tensor]:
    """Split the placeholder positions ``mask [B, L]`` into views of ``n`` tokens (row-major, the order in which the
    model scatters features): ``columns [R, n]``, ``sample [R]`` and ``run_start [R]`` (True where a view opens a
    maximal run of placeholders)."""
    total = int(mask.sum())
    if total % n:
        raise ValueError(f"{family} adapter: the prompt has {total} image tokens, not a multiple of {n} per view")
    rows, cols = mask.nonzero(as_tuple=True)
    rows, cols = rows.reshape(-1, n), cols.reshape(-1, n)
    if not bool((rows == rows[:, :1]).all()):
        raise ValueError(f"{family} adapter: a sample's image tokens are not a multiple of {n} tokens per view")
    first = cols[:, 0]
    prev = torch.where(first > 0, mask[rows[:, 0], (first - 1).clamp(min=0)], torch.zeros_like(first, dtype=torch.bool))
    return cols, rows[:, 0], ~prev


# ---------------------------------------------------------------------------------------------------------------
# InternVL
# ---------------------------------------------------------------------------------------------------------------


class InternVLAdapter(MultiViewAdapter):
    """InternVL: signals on the InternViT patch grid (CLS at 0) averaged over each pixel-shuffle block."""

    family = "internvl"
    model_classes = ("InternVLForConditionalGeneration",)

    #: signals computed per patch and averaged over each shuffled block, with the token dim
    BLOCK_SIGNALS: ClassVar[dict[str, int]] = {"cls_attn": 1, "attn_logits": 1, "cls_attn_layers": 2,
                                               "attn_received_layers": 2, "keys": 1}

    @property
    def inner(self) -> Any:
        return self.model.model

    def tower_layers(self) -> Any:
        return self.inner.vision_tower.encoder.layer

    def qk_layers(self) -> list[QKLayer]:
        if not hasattr(self, "_qk"):
            # q/k as the attention uses them: after the (optional) RMS q/k norm, an Identity otherwise
            self._qk = [QKLayer(num_heads=a.num_heads, q=a.q_norm, k=a.k_norm, scale=a.scale)
                        for a in (layer.attention for layer in self.tower_layers())]
        return self._qk

    def feature_layer(self, kw: dict[str, Any]) -> int:
        v = kw.get("vision_feature_layer")
        layer = self.model.config.vision_feature_layer if v is None else v
        if not isinstance(layer, int):
            raise ValueError(f"internvl adapter: vision_feature_layer must be an int, got {layer!r}")
        return layer

    @property
    def default_layer(self) -> int:  # type: ignore[override]
        n = len(self.tower_layers())
        return (self.model.config.vision_feature_layer % (n + 1)) - 1

    def scale(self) -> int:
        ratio = float(self.model.config.downsample_ratio)
        s = round(1 / ratio)
        if abs(s * ratio - 1) > 1e-6:
            raise ValueError(f"internvl adapter: downsample_ratio {ratio} is not 1 / integer")
        return s

    def side(self, pixels: Tensor) -> int:
        patch = self.model.config.vision_config.patch_size
        patch = patch[0] if isinstance(patch, (tuple, list)) else patch
        return pixels.shape[-2] // patch

    def image_token_mask(self, input_ids: Tensor) -> Tensor:
        return input_ids == self.model.config.image_token_id

    def encode(self, kw: dict[str, Any]) -> Images:
        strategy = kw.get("vision_feature_select_strategy") or self.model.config.vision_feature_select_strategy
        if strategy != "default":
            raise ValueError(f"internvl adapter: vision_feature_select_strategy={strategy!r} is not supported; vtoken "
                             "supports 'default' (patch tokens only)")
        layer = self.feature_layer(kw)
        pixels = kw["pixel_values"].to(dtype=self.inner.dtype)
        assert self.capture is not None
        self.capture.store.clear()
        self.capture.active = True
        try:
            out = self.inner.vision_tower(pixel_values=pixels, output_hidden_states=True, return_dict=True)
        finally:
            self.capture.active = False
        feats = out.last_hidden_state if layer == -1 else out.hidden_states[layer]
        feats = feats[:, 1:]
        r, side = feats.shape[0], self.side(pixels)
        feats = feats.reshape(r, side, side, -1)
        feats = self.inner.pixel_shuffle(feats, scale_factor=self.model.config.downsample_ratio)
        tokens = feats.reshape(r, -1, feats.shape[-1])
        g = side // self.scale()
        mask = self.image_token_mask(kw["input_ids"])
        columns, sample, run_start = placeholder_views(mask, g * g, self.family)
        if columns.shape[0] != r:
            raise ValueError(f"internvl adapter: the prompt has {columns.shape[0]} views of {g * g} image tokens but "
                             f"pixel_values has {r}")
        views = Images(tokens, columns, sample, (g, g), self.inner.multi_modal_projector, space="vision",
                       extra={"side": side})
        return group_views(views, run_start.long().cumsum(0) - 1)

    def signal(self, name: str, info: MethodInfo, images: Images, kw: dict[str, Any]) -> Any:
        side, s = images.extra["side"], self.scale()
        if name in ("attn", "attn_received_layers"):
            assert self.capture is not None
            if name == "attn":
                att = attention_maps(*self.capture.qk(self.spec_layers(info, name)[0]), reduce="full")
                return block_mean(block_mean(att[:, 1:, 1:], side, s, 1), side, s, 2)
            rec = [attention_maps(*self.capture.qk(i))[:, 1:] for i in self.spec_layers(info, name)]
            return block_mean(torch.stack(rec, dim=1), side, s, 2)
        value = super().signal(name, info, images, kw)
        if name in self.BLOCK_SIGNALS and isinstance(value, Tensor):
            value = block_mean(value, side, s, self.BLOCK_SIGNALS[name])
        return value
