"""InternVL (``InternVLForConditionalGeneration``): an InternViT tower with a CLS token, pixel-shuffle (space-to-depth)
downsampling and an MLP projector; dynamic high-resolution tiling gives several views per image.

The rules shared with the other pixel-shuffle, multi-view family (Idefics3 / SmolVLM; the code is in
:mod:`vtoken.models.views`, :class:`~vtoken.models.views.MultiViewAdapter`):

* **Reduction unit.** The tokens the language model sees: one per ``s x s`` block of tower patches
  (``s = 1 / downsample_ratio``, 2 for every released InternVL). Vision-space methods run on the shuffled features
  (``[V, (g/s)^2, C * s^2]``, the projector's input), LLM-space methods on the projected tokens.
* **Patch signals -> shuffled grid.** Attention signals are computed on the tower's ``g x g`` patch grid (CLS row /
  column handled as for LLaVA) and every per-patch value (``cls_attn``, ``cls_attn_layers``, ``attn_logits``,
  ``attn_received_layers``, ``keys``) is averaged over the ``s x s`` block of patches a shuffled token holds
  (:func:`~vtoken.models.views.block_mean`); ``attn`` is averaged over both the query and the key blocks. Signal
  layers follow each method's ``signal_spec``; in a spec marked ``feature_layer`` the ``-2`` (LLaVA's select layer)
  is the family's feature layer (the last one by default for both families).
* **Views.** An image is a run of views (InternVL: its tiles then the thumbnail; Idefics3: its tiles then the global
  view), each encoded separately by the tower. Methods run per view (each view has its own grid and CLS signals);
  ``keep`` stays per image and is split over the image's ``V`` views (:func:`~vtoken.models.views.split_even`): a
  ratio applies to every view unchanged; an ``int`` count ``k`` gives every view ``k // V`` tokens and one more to
  the first ``k % V`` views in prompt order (so an image keeps exactly ``k`` with an exact method; views whose share
  is 0, when ``k < V``, are dropped whole). In a composition every step splits its own ``keep`` the same way.
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

from typing import Any, ClassVar

import torch
from torch import Tensor

from ..core import CATALOGUE, signals_where
from ..methods import MethodInfo
from .base import Images
from .capture import QKLayer, attention_maps
from .views import MultiViewAdapter, block_mean, group_views, placeholder_views


class InternVLAdapter(MultiViewAdapter):
    """InternVL: signals on the InternViT patch grid (CLS at 0) averaged over each pixel-shuffle block."""

    family = "internvl"
    model_classes = ("InternVLForConditionalGeneration",)

    #: signals computed per patch and averaged over each shuffled block, with the token dim (the catalogue's
    #: attention signals with one token axis; ``attn`` is averaged on both)
    BLOCK_SIGNALS: ClassVar[dict[str, int]] = {name: CATALOGUE[name].token_axis for name in
                                               signals_where(attention=True) if CATALOGUE[name].token_axis}

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
        with self.capture.recording():
            out = self.inner.vision_tower(pixel_values=pixels, output_hidden_states=True, return_dict=True)
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
