"""Multi-view ViT for oblique photography (AllSpark Section III-C "Oblique Photography").

The paper encodes each of the n views with the same standard ViT and concatenates the tokens:
``f(m) = Enc(V_1) (+) Enc(V_2) (+) ... (+) Enc(V_n)``. Here one timm ``VisionTransformer`` (shared weights)
runs on every view of ``batch["views"]`` [B, V, 3, H, W]; each view's tokens (class token + patches) get a
learned view embedding (the reference view is view 0, so the bridge can tell it from the sources) and the V
token sets are concatenated into ``[B, V * (1 + H/p * W/p), dim]``.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from allspark.registry import ENCODERS
from allspark.sizing import as_int_pair, from_data
from allspark.types import Tokens, check_tensor

__all__ = ["MultiViewViT"]


@ENCODERS.register("multiview_vit")
class MultiViewViT(nn.Module):
    def __init__(self, num_views: int | None = None, image_size: tuple[int, int] | list[int] | None = None,
                 patch_size: int = 16, dim: int = 384, depth: int = 12, heads: int = 6, mlp_ratio: float = 4.0,
                 key: str = "views", info: dict[str, Any] | None = None) -> None:
        super().__init__()
        from timm.models.vision_transformer import VisionTransformer

        # unset: the dataset's view count and image size (info ``num_views``, ``image_size``); set: checked
        self.image_size = from_data("multiview_vit", "image_size", image_size, info, "image_size",
                                    convert=as_int_pair)
        num_views = from_data("multiview_vit", "num_views", num_views, info, "num_views",
                              found="gives {} views per sample")
        if self.image_size[0] % patch_size or self.image_size[1] % patch_size:
            raise ValueError(f"multiview_vit: image_size {list(self.image_size)} is not a multiple of "
                             f"patch_size {patch_size}")
        self.vit = VisionTransformer(img_size=self.image_size, patch_size=patch_size, in_chans=3, num_classes=0,
                                     embed_dim=dim, depth=depth, num_heads=heads, mlp_ratio=mlp_ratio)
        self.view_embed = nn.Parameter(torch.zeros(num_views, 1, dim))
        nn.init.normal_(self.view_embed, std=0.02)
        self.num_views, self.key, self.out_dim = int(num_views), key, dim
        self.input_keys = (key,)

    def forward(self, batch: dict[str, Any]) -> Tokens:
        views = check_tensor(batch, self.key, shape=("B", self.num_views, 3, *self.image_size))
        b = views.shape[0]
        tokens = self.vit.forward_features(views.flatten(0, 1).to(self.vit.pos_embed.dtype))  # [B*V, n, dim]
        tokens = tokens.unflatten(0, (b, self.num_views)) + self.view_embed
        return Tokens.dense(tokens.flatten(1, 2))
