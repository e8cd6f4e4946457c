"""LLaVA (``LlavaForConditionalGeneration``): a CLIP-like tower with a CLS token, a layer's patch features, an MLP
projector, one placeholder token per visual token."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from .base import ClsTowerAdapter, Images
from .capture import QKLayer


def clip_qk_layers(encoder_layers: Any) -> list[QKLayer]:
    """q/k sources of CLIP/SigLIP-style encoder layers (``layer.self_attn.{q,k}_proj``)."""
    out = []
    for layer in encoder_layers:
        attn = layer.self_attn
        out.append(QKLayer(num_heads=attn.num_heads, q=attn.q_proj, k=attn.k_proj, scale=getattr(attn, "scale", None)))
    return out


class LlavaAdapter(ClsTowerAdapter):
    family = "llava"
    model_classes = ("LlavaForConditionalGeneration",)

    @property
    def inner(self) -> Any:
        return self.model.model

    def tower_layers(self) -> Any:
        tower = self.inner.vision_tower
        vm = getattr(tower, "vision_model", tower)
        return vm.encoder.layers

    def qk_layers(self) -> list[QKLayer]:
        if not hasattr(self, "_qk"):
            self._qk = clip_qk_layers(self.tower_layers())
        return self._qk

    def feature_layer(self, kw: dict[str, Any]) -> int | list[int]:
        v = kw.get("vision_feature_layer")
        return self.model.config.vision_feature_layer if v is None else v

    def select_strategy(self, kw: dict[str, Any]) -> str:
        v = kw.get("vision_feature_select_strategy")
        return self.model.config.vision_feature_select_strategy if v is None else v

    @property
    def default_layer(self) -> int:  # type: ignore[override]
        layer = self.model.config.vision_feature_layer
        layer = layer if isinstance(layer, int) else layer[-1]
        # hidden_states[l] is the output of encoder layer l - 1 (hidden_states[0] are the embeddings)
        n = len(self.tower_layers())
        return (layer % (n + 1)) - 1

    def image_token_mask(self, input_ids: Tensor) -> Tensor:
        return input_ids == self.model.config.image_token_id

    def grid(self) -> tuple[int, int]:
        cfg = self.model.config.vision_config
        g = cfg.image_size // cfg.patch_size
        return g, g

    def tower_features(self, pixel_values: Tensor, layer: int | list[int]) -> Tensor:
        """Patch features ``[V, N, C]`` (CLS dropped) of the feature layer (a list: concatenated over channels) of the
        images or views ``pixel_values [V, 3, H, W]``, recording the signal layers' q/k."""
        assert self.capture is not None
        with self.capture.recording():
            out = self.inner.vision_tower(pixel_values, output_hidden_states=True, return_dict=True)
        if isinstance(layer, int):
            return out.hidden_states[layer][:, 1:]
        return torch.cat([out.hidden_states[i][:, 1:] for i in layer], dim=-1)

    def encode(self, kw: dict[str, Any]) -> Images:
        if kw.get("image_sizes") is not None:
            raise ValueError("llava adapter: image_sizes (variable-resolution Pixtral-style inputs) is not supported")
        strategy = self.select_strategy(kw)
        if strategy != "default":
            raise ValueError(f"llava adapter: vision_feature_select_strategy={strategy!r} keeps the CLS token as a "
                             "visual token; vtoken supports 'default' (patch tokens only)")
        feats = self.tower_features(kw["pixel_values"], self.feature_layer(kw))
        input_ids = kw["input_ids"]
        mask = self.image_token_mask(input_ids)
        n_img, n_tok = feats.shape[:2]
        if int(mask.sum()) != n_img * n_tok:
            raise ValueError(f"llava adapter: the prompt has {int(mask.sum())} image tokens but {n_img} image(s) give "
                             f"{n_img * n_tok} features")
        rows, cols = mask.nonzero(as_tuple=True)  # row-major: image i owns the i-th block of n_tok placeholders
        columns = cols.reshape(n_img, n_tok)
        sample = rows.reshape(n_img, n_tok)[:, 0]
        return Images(feats, columns, sample, self.grid(), self.inner.multi_modal_projector, space="vision")
