"""Per-pixel-patch encoder for co-registered rasters (HSI, SAR, LiDAR intensity, ...).

Input ``batch[key]``: a ``[B, C, p, p]`` neighbourhood of the pixel to classify. Every pixel of the patch
becomes one token: its ``C``-vector (all bands / channels of that pixel, the spectral idea of
``encoders/hsi.py`` applied per pixel) is projected by ``W in R^{C x d}``, a learnable position embedding
says where in the patch the pixel sits (the centre is the pixel being classified), and a pre-LayerNorm
transformer mixes the ``p^2`` tokens; a final LayerNorm. All tokens are real, so the mask is all True.
One class serves every raster modality: the config names the batch key and the channel count.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from allspark.registry import ENCODERS
from allspark.sizing import from_data
from allspark.types import Tokens, check_tensor

__all__ = ["RasterPatchEncoder"]


@ENCODERS.register("raster_patch")
class RasterPatchEncoder(nn.Module):
    """``batch[key]`` [B, in_channels, patch, patch] -> ``Tokens`` [B, patch^2, dim].

    ``in_channels`` and ``patch`` default to the dataset's (info ``channels[key]``, ``patch``)."""

    def __init__(self, key: str, in_channels: int | None = None, patch: int | None = None, dim: int = 64,
                 depth: int = 2, heads: int = 4, mlp_ratio: float = 2.0, dropout: float = 0.0,
                 info: dict[str, Any] | None = None) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"raster_patch[{key}]: dim ({dim}) must be divisible by heads ({heads})")
        # unset: the channel count of the dataset's ``key`` raster (info ``channels[key]``) and the patch size
        # it cuts (info ``patch``, set by data.args.patch); set: checked against them
        owner = f"raster_patch[{key}]"
        in_channels = from_data(owner, "in_channels", in_channels, info, ("channels", key),
                                found=f"has {{}} channels in its {key!r} raster")
        patch = from_data(owner, "patch", patch, info, "patch", found="cuts {0} x {0} patches (data.args.patch)")
        if in_channels < 1 or patch < 1:
            raise ValueError(f"raster_patch[{key}]: in_channels and patch must be >= 1, got {in_channels}, {patch}")
        self.key = key
        self.input_keys = (key,)
        self.in_channels = in_channels
        self.patch = patch
        self.out_dim = dim
        self.pixel_projection = nn.Linear(in_channels, dim)
        self.position_embedding = nn.Parameter(torch.zeros(1, patch * patch, dim))
        nn.init.trunc_normal_(self.position_embedding, std=0.02)
        if depth > 0:
            layer = nn.TransformerEncoderLayer(dim, heads, int(dim * mlp_ratio), dropout, activation="gelu",
                                               batch_first=True, norm_first=True)
            self.transformer = nn.TransformerEncoder(layer, depth, enable_nested_tensor=False)
        else:
            self.transformer = nn.Identity()
        self.norm = nn.LayerNorm(dim)

    def forward(self, batch: dict[str, Any]) -> Tokens:
        x = check_tensor(batch, self.key, shape=("B", self.in_channels, self.patch, self.patch))
        x = x.to(self.pixel_projection.weight.dtype).flatten(2).transpose(1, 2)  # [B, p^2, C]
        tokens = self.pixel_projection(x) + self.position_embedding
        return Tokens.dense(self.norm(self.transformer(tokens)))

    def extra_repr(self) -> str:
        return f"key={self.key!r}, in_channels={self.in_channels}, patch={self.patch}"
