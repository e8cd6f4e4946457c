"""Idefics3 and SmolVLM (``Idefics3ForConditionalGeneration``, ``SmolVLMForConditionalGeneration``; the same vision
path): a SigLIP tower without a CLS token, a pixel-shuffle connector (``scale_factor`` ``s``) and a linear projection;
large images are split into tiles plus a downscaled global view.

The prompt of an image is ``<fake_token_around_image><row_i_col_j><image> x n`` per tile (rows ended by ``\\n``),
then ``<fake_token_around_image><global-img><image> x n<fake_token_around_image>`` for the global view (only the
latter for an unsplit image). Only the ``<image>`` placeholders are visual tokens; the structural tokens (fake tokens,
row/col and global tags, newlines) are text and always kept. Views are the ``n``-token runs in order; an image ends
with its global view, recognised by the token before it: the tag before the last view of every sample (a prompt in
another format, where those tags differ between samples, makes every view its own image). ``pixel_values``
``[B, max_views, 3, H, W]`` lists each sample's views with all-zero padding views (dropped, as the model does);
``pixel_attention_mask`` marks padded pixels, whose patches are masked as keys inside the tower and here too.

Reduction unit, signals on the shuffled grid, ``keep`` split over views, indices: see :mod:`vtoken.models.internvl`
(the shared code is in :mod:`vtoken.models.views`).

No CLS token. Signals the tower provides: ``attn_received_layers`` (attention each patch receives, averaged over heads
and all real query rows), ``attn``, ``keys`` (head-mean keys), ``vision_features`` and the usual text/grid/positions.
CLS-attention methods are unsupported with a reason, except **VisionZip**, which runs with the substitute documented
for CLS-free towers ("the average attention each visual token receives from all other tokens ... also adopted in
other works, such as VisionZip", Theia-4869/VisPruner#1; VisionZip's own Qwen2.5-VL code does the same):
``cls_attn`` := the attention each token receives at the feature layer, softmax probabilities averaged over heads and
over all (real) query rows, then over the pixel-shuffle block. ``lavit_dynamic`` gets no ``cls_attn``
and falls back to its ``"distinct"`` score.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ..methods import MethodInfo
from .base import Images
from .capture import QKLayer, attention_maps, mean_keys
from .llava import clip_qk_layers
from .views import MultiViewAdapter, block_mean, group_views, placeholder_views


class Idefics3Adapter(MultiViewAdapter):
    """Idefics3 / SmolVLM: SigLIP signals on the patch grid averaged over each pixel-shuffle block."""

    family = "idefics3"
    model_classes = ("Idefics3ForConditionalGeneration", "SmolVLMForConditionalGeneration")
    provides = frozenset({"cls_attn", "attn", "attn_received_layers", "keys", "vision_features", "text", "text_mask",
                          "grid", "positions", "sizes"})
    has_cls = False  # SigLIP
    default_layer = -1  # the connector reads the last layer (after post_layernorm)

    @property
    def inner(self) -> Any:
        return self.model.model

    def qk_layers(self) -> list[QKLayer]:
        if not hasattr(self, "_qk"):
            self._qk = clip_qk_layers(self.inner.vision_model.encoder.layers)
        return self._qk

    def image_token_mask(self, input_ids: Tensor) -> Tensor:
        return input_ids == self.model.config.image_token_id

    def encode(self, kw: dict[str, Any]) -> Images:
        pixels = kw["pixel_values"]
        b, m = pixels.shape[:2]
        pixels = pixels.to(dtype=self.inner.dtype).view(b * m, *pixels.shape[2:])
        real = (pixels == 0.0).sum(dim=(-1, -2, -3)) != pixels.shape[1:].numel()  # all-zero views are padding
        pixels = pixels[real].contiguous()
        pixel_mask = kw.get("pixel_attention_mask")
        if pixel_mask is None:
            pixel_mask = torch.ones((pixels.shape[0], *pixels.shape[2:]), dtype=torch.bool, device=pixels.device)
        else:
            pixel_mask = pixel_mask.view(b * m, *pixel_mask.shape[2:])[real].contiguous()
        p = self.model.config.vision_config.patch_size
        patch_mask = pixel_mask.unfold(1, p, p).unfold(2, p, p).sum(dim=(-1, -2)) > 0
        assert self.capture is not None
        with self.capture.recording():
            out = self.inner.vision_model(pixel_values=pixels, patch_attention_mask=patch_mask, return_dict=True)
        connector = self.inner.connector
        s = int(connector.scale_factor)
        tokens = connector.pixel_shuffle(out.last_hidden_state, s)
        r, side = tokens.shape[0], patch_mask.shape[1]
        g = side // s
        input_ids = kw["input_ids"]
        columns, sample, _ = placeholder_views(self.image_token_mask(input_ids), g * g, self.family)
        if columns.shape[0] != r:
            raise ValueError(f"{self.family} adapter: the prompt has {columns.shape[0]} views of {g * g} image tokens "
                             f"but pixel_values has {r} (non-padding) views")
        views = Images(tokens, columns, sample, (g, g), connector.modality_projection, space="vision",
                       extra={"side": side, "patch_mask": patch_mask.reshape(r, -1)})
        return group_views(views, self.view_images(input_ids, columns, sample))

    @staticmethod
    def view_images(input_ids: Tensor, columns: Tensor, sample: Tensor) -> Tensor:
        """``[R]`` image index of each view: an image closes with a view led by the global-view tag (the token before
        the last view of each sample); every view is an image of its own when samples disagree on that tag."""
        first = columns[:, 0]
        lead = torch.where(first > 0, input_ids[sample, (first - 1).clamp(min=0)], -1)
        last = torch.ones_like(sample, dtype=torch.bool)
        last[:-1] = sample[1:] != sample[:-1]
        tags = lead[last].unique()
        closes = lead == tags[0] if tags.numel() == 1 else torch.ones_like(last)
        closes |= last
        return closes.long().cumsum(0) - closes.long()

    def splice(self, kw: dict[str, Any], input_ids: Tensor, embeds: Tensor, keep: Tensor) -> dict[str, Any]:
        kw = {k: v for k, v in kw.items() if k != "pixel_attention_mask"}
        return super().splice(kw, input_ids, embeds, keep)

    def received_attention(self, layers: list[int], images: Images) -> Tensor:
        side, s = images.extra["side"], int(self.inner.connector.scale_factor)
        patch_mask = images.extra["patch_mask"]
        key_mask = None if bool(patch_mask.all()) else patch_mask
        assert self.capture is not None
        rec = [attention_maps(*self.capture.qk(i), key_mask=key_mask) for i in layers]
        return block_mean(torch.stack(rec, dim=1), side, s, 2)

    def signal(self, name: str, info: MethodInfo, images: Images, kw: dict[str, Any]) -> Any:
        side, s = images.extra["side"], int(self.inner.connector.scale_factor)
        patch_mask = images.extra["patch_mask"]
        key_mask = None if bool(patch_mask.all()) else patch_mask
        cap = self.capture
        assert cap is not None
        if name == "attn_received_layers":
            return self.received_attention(self.spec_layers(info, name), images)
        if name == "attn":
            att = attention_maps(*cap.qk(self.spec_layers(info, name)[0]), key_mask=key_mask, reduce="full")
            return block_mean(block_mean(att, side, s, 1), side, s, 2)
        if name == "keys":
            _, k, layer = cap.qk(self.spec_layers(info, name)[0])
            return block_mean(mean_keys(k, layer), side, s, 1)
        return super().signal(name, info, images, kw)
