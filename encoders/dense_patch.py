"""Patch encoder for dense (per-pixel) tasks: a small convolutional pyramid over one co-registered raster, whose
feature maps a dense head decodes at full resolution, and tokens of its coarsest map for the bridge.

``batch[key]`` ``[B, C, H, W]`` (a patch of one raster: an orthophoto, a DSM, NDVI, SAR ...) goes through
``len(widths)`` stages of two 3x3 convolutions (the first stage at full resolution, each later one starting with
a stride-2 convolution), so level ``l`` is a ``[B, widths[l], H / 2^l, W / 2^l]`` map. Normalisation is a
per-pixel LayerNorm over the channels (no statistic over the image or the batch), so the maps are local: a
pixel's features depend only on the pixels around it, which is what lets tiled inference equal whole-tile
inference (``allspark/data/tiling.py``). The coarsest map is cut into ``token_stride x token_stride`` cells
(a strided convolution to ``dim``), a learned position embedding is added (resampled bilinearly for another input
size) and a pre-LayerNorm transformer of ``depth`` layers mixes the cells: those are the tokens for the bridge
(``[B, (H / token_stride) (W / token_stride), dim]``, all real).

The maps are put into the batch as ``batch["dense_features"][key]`` (the list of levels, finest first): the model
calls its encoders and then its head on the same batch dict (as ``image_pyramid`` does for retrieval). The
encoder also records its levels' widths in the model's dataset-info dict (``info["feature_maps"][key]``), which
the model hands to every encoder and then to the head, so the head is sized by its encoders without the config
repeating their widths.
"""
from __future__ import annotations

from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from allspark.registry import ENCODERS
from allspark.sizing import from_data
from allspark.types import Tokens, check_tensor

__all__ = ["DensePatchEncoder", "LayerNorm2d", "FEATURES_KEY", "FEATURE_WIDTHS_KEY"]

#: the batch key under which dense encoders leave their feature maps ({raster key: [level 0, level 1, ...]})
FEATURES_KEY = "dense_features"
#: the info key under which they record their levels' widths ({raster key: [w0, w1, ...]})
FEATURE_WIDTHS_KEY = "feature_maps"


class LayerNorm2d(nn.Module):
    """LayerNorm over the channels of every pixel of a [B, C, H, W] map (as ConvNeXt): a local normalisation."""

    def __init__(self, channels: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x.permute(0, 2, 3, 1), x.shape[1:2], self.weight, self.bias, self.eps).permute(0, 3, 1, 2)


def conv_block(cin: int, cout: int, stride: int = 1) -> nn.Sequential:
    """3x3 convolution (``stride``), LayerNorm2d, GELU, 3x3 convolution, LayerNorm2d, GELU."""
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1), LayerNorm2d(cout), nn.GELU(),
                         nn.Conv2d(cout, cout, 3, 1, 1), LayerNorm2d(cout), nn.GELU())


@ENCODERS.register("dense_patch")
class DensePatchEncoder(nn.Module):
    """``batch[key]`` [B, in_channels, H, W] -> Tokens [B, (H/t)(W/t), dim] and feature maps (module docstring).

    ``in_channels`` and ``patch`` (the training patch size, which sizes the position embedding) default to the
    dataset's (info ``channels[key]``, ``patch``)."""

    def __init__(self, key: str, in_channels: int | None = None, patch: int | None = None,
                 widths: Sequence[int] = (16, 32, 64), token_stride: int = 8, dim: int = 64, depth: int = 1,
                 heads: int = 4, mlp_ratio: float = 2.0, info: dict[str, Any] | None = None) -> None:
        super().__init__()
        owner = f"dense_patch[{key}]"
        rasters = (info or {}).get("raster_keys")
        if rasters is not None and key not in rasters:
            from allspark.config import ConfigError

            raise ConfigError(f"{owner}: the dataset gives the rasters {list(rasters)} (data.args.modalities for "
                              f"Globe230k), not {key!r}; list one encoder per raster in model.encoders")
        in_channels = from_data(owner, "in_channels", in_channels, info, ("channels", key),
                                found=f"has {{}} channels in its {key!r} raster")
        patch = from_data(owner, "patch", patch, info, "patch", found="cuts {0} x {0} patches (data.args.patch)")
        widths = [int(w) for w in widths]
        if not widths or any(w < 1 for w in widths):
            raise ValueError(f"{owner}: widths must be a non-empty list of channel counts >= 1, got {widths}")
        coarsest = 2 ** (len(widths) - 1)
        if token_stride < coarsest or token_stride % coarsest:
            raise ValueError(f"{owner}: token_stride ({token_stride}) must be a multiple of the coarsest level's "
                             f"stride {coarsest} (2^(len(widths) - 1))")
        if patch % token_stride:
            raise ValueError(f"{owner}: the patch ({patch} pixels, data.args.patch) must be a multiple of "
                             f"token_stride ({token_stride})")
        if dim % heads:
            raise ValueError(f"{owner}: dim ({dim}) must be divisible by heads ({heads})")
        self.key, self.input_keys = key, (key,)
        self.in_channels, self.patch, self.widths = in_channels, patch, widths
        self.token_stride, self.out_dim = token_stride, dim
        self.stages = nn.ModuleList(
            conv_block(in_channels if i == 0 else widths[i - 1], w, 1 if i == 0 else 2) for i, w in enumerate(widths))
        cell = token_stride // coarsest
        self.to_tokens = nn.Conv2d(widths[-1], dim, cell, cell)
        side = patch // token_stride
        self.position_embedding = nn.Parameter(torch.zeros(1, dim, side, side))
        nn.init.trunc_normal_(self.position_embedding, std=0.02)
        if depth > 0:
            layer = nn.TransformerEncoderLayer(dim, heads, int(dim * mlp_ratio), 0.0, activation="gelu",
                                               batch_first=True, norm_first=True)
            self.transformer = nn.TransformerEncoder(layer, depth, enable_nested_tensor=False)
        else:
            self.transformer = nn.Identity()
        self.norm = nn.LayerNorm(dim)
        if info is not None:  # the head sizes its decoder from this (see the module docstring)
            info.setdefault(FEATURE_WIDTHS_KEY, {})[key] = list(widths)

    def feature_maps(self, x: torch.Tensor) -> list[torch.Tensor]:
        maps = []
        for stage in self.stages:
            x = stage(x)
            maps.append(x)
        return maps

    def forward(self, batch: dict[str, Any]) -> Tokens:
        x = check_tensor(batch, self.key, shape=("B", self.in_channels, None, None))
        h, w = x.shape[-2:]
        if h % self.token_stride or w % self.token_stride:
            raise ValueError(f"batch[{self.key!r}]: height and width must be multiples of token_stride "
                             f"{self.token_stride}, got {h} x {w}")
        maps = self.feature_maps(x.to(self.to_tokens.weight.dtype))
        batch.setdefault(FEATURES_KEY, {})[self.key] = maps
        cells = self.to_tokens(maps[-1])
        pos = self.position_embedding
        if pos.shape[-2:] != cells.shape[-2:]:  # another input size than the training patch (whole tiles)
            pos = F.interpolate(pos, size=cells.shape[-2:], mode="bilinear", align_corners=False)
        tokens = (cells + pos).flatten(2).transpose(1, 2)
        return Tokens.dense(self.norm(self.transformer(tokens)))

    def extra_repr(self) -> str:
        return (f"key={self.key!r}, in_channels={self.in_channels}, widths={self.widths}, "
                f"token_stride={self.token_stride}")
