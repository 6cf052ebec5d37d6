"""ViT over all multispectral bands (AllSpark III-C "MSI"): the patch embedding takes the 13 Sentinel-2
bands at once (timm ``in_chans``), the patch tokens plus the class token go to the bridge.

Pretrained RGB weights (a local timm state-dict file given as ``pretrained``) are adapted the way timm
does it (``timm.models.adapt_input_conv``: the RGB kernel is tiled over the new channels and rescaled by
``3 / in_chans`` so activations keep their scale); the rest of the ViT loads unchanged, with the position
embedding resampled to the grid of ``image_size`` / ``patch_size``. Without ``pretrained`` the ViT is
trained from scratch (its parameters are trainable in both cases).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from allspark.registry import ENCODERS
from allspark.sizing import from_data
from allspark.types import Tokens, check_tensor

__all__ = ["MultispectralViT"]


@ENCODERS.register("multispectral_vit")
class MultispectralViT(nn.Module):
    """``batch["image"]`` [B, in_chans, S, S] -> ``Tokens`` [B, 1 + (S / patch)^2, dim].

    ``in_chans`` and ``image_size`` default to the dataset's (info ``num_bands``, ``image_size``)."""

    input_keys = ("image",)

    def __init__(self, in_chans: int | None = None, image_size: int | None = None, patch_size: int = 8, dim: int = 384,
                 depth: int = 12, heads: int = 6, mlp_ratio: float = 4.0, drop_path: float = 0.0,
                 pretrained: str | None = None, image_key: str = "image",
                 info: dict[str, Any] | None = None) -> None:
        super().__init__()
        from timm.models.vision_transformer import VisionTransformer

        # unset: the dataset's band count (info ``num_bands``) and tile size; set: checked against them
        in_chans = from_data("multispectral_vit", "in_chans", in_chans, info, "num_bands", found="has {} bands")
        image_size = from_data("multispectral_vit", "image_size", image_size, info, "image_size")
        if image_size % patch_size:
            raise ValueError(f"multispectral_vit: image_size {image_size} is not a multiple of patch_size {patch_size}")
        self.vit = VisionTransformer(img_size=image_size, patch_size=patch_size, in_chans=in_chans,
                                     num_classes=0, embed_dim=dim, depth=depth, num_heads=heads,
                                     mlp_ratio=mlp_ratio, drop_path_rate=drop_path)
        if pretrained:
            self._load_rgb_weights(Path(pretrained).expanduser(), in_chans)
        self.in_chans, self.image_size, self.image_key = in_chans, image_size, image_key
        self.input_keys = (image_key,)
        self.out_dim = dim

    def _load_rgb_weights(self, path: Path, in_chans: int) -> None:
        from timm.layers import resample_abs_pos_embed
        from timm.models import adapt_input_conv

        from encoders.image_backbone import read_state_dict

        state = read_state_dict(path, "multispectral_vit: pretrained")
        state = {k: v for k, v in state.items() if not k.startswith("head.")}
        key = "patch_embed.proj.weight"
        if key in state and state[key].shape[1] != in_chans:
            state[key] = adapt_input_conv(in_chans, state[key])
        if "pos_embed" in state and state["pos_embed"].shape != self.vit.pos_embed.shape:
            state["pos_embed"] = resample_abs_pos_embed(
                state["pos_embed"], list(self.vit.patch_embed.grid_size), num_prefix_tokens=1)
        missing, unexpected = self.vit.load_state_dict(state, strict=False)
        if missing:
            raise ValueError(f"multispectral_vit: {path} lacks {len(missing)} tensors, e.g. {missing[:5]}")

    def forward(self, batch: dict[str, Any]) -> Tokens:
        x = check_tensor(batch, self.image_key, shape=("B", self.in_chans, self.image_size, self.image_size))
        return Tokens.dense(self.vit.forward_features(x.to(self.vit.pos_embed.dtype)))
