"""Three-layer convolutional encoder for SAR chips (AllSpark III-C "SAR": a three-layer CNN).

Each layer is conv -> BatchNorm -> ReLU -> 2x2 max-pool (an 88 x 88 chip gives an 11 x 11 map), so the
receptive field of a token covers a target's scatterer group; the map's cells become tokens, each plus a
learned position embedding (the bridge's cross-attention is order-blind, and where a scatterer lies on
the target matters).

Input channels: the paper's SAR chips have one or two bands (polarisations; Section III-C, ``R^{H x W x 2}``).
``in_chans`` is the data's (the MSTAR reader's ``info()["channels"]``: 1 for the JPEG release, 2 for
two-channel ``.npy`` / TIFF chips); a batch with another channel count -- data of another form than the
checkpoint or config was built for -- is a ``DatasetFormatError`` that names the batch's first chip file
(``batch["path"]``, which the reader gives) and where the model's count came from.

``bn_momentum`` (PyTorch default 0.1) is raised for short runs such as the demo: the running statistics
otherwise lag behind the fast-changing early weights and evaluation sees mis-scaled features (measured on
the demo after 36 steps: eval-mode test accuracy 0.20 with 0.1, 0.76-0.88 with 0.3, against 0.95 in
train mode).

"""
from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import nn

from allspark.data.base import DatasetFormatError
from allspark.registry import ENCODERS
from allspark.sizing import from_data
from allspark.types import Tokens, check_tensor

__all__ = ["SARConvEncoder"]


@ENCODERS.register("sar_cnn")
class SARConvEncoder(nn.Module):
    """``batch["image"]`` [B, in_chans, S, S] -> ``Tokens`` [B, (S / 8)^2, channels[-1]].

    ``in_chans`` and ``image_size`` default to the dataset's (info ``channels``, ``image_size``)."""

    def __init__(self, in_chans: int | None = None, image_size: int | None = None, channels: Sequence[int] = (32, 64, 128),
                 kernel_sizes: Sequence[int] = (5, 5, 3), bn_momentum: float = 0.1, image_key: str = "image",
                 info: dict[str, Any] | None = None) -> None:
        super().__init__()
        if len(channels) != 3 or len(kernel_sizes) != 3:
            raise ValueError(f"sar_cnn: three layers, got channels={list(channels)}, kernel_sizes={list(kernel_sizes)}")
        # unset: the dataset's chip size and channel count (info ``image_size``, ``channels``); set: checked
        image_size = from_data("sar_cnn", "image_size", image_size, info, "image_size")
        in_chans = from_data("sar_cnn", "in_chans", in_chans, info, "channels", found="has {} channels")
        if image_size % 8:
            raise ValueError(f"sar_cnn: image_size {image_size} must be a multiple of 8 (three 2x2 pools)")
        layers, c_in = [], in_chans
        for c_out, k in zip(channels, kernel_sizes):
            layers += [nn.Conv2d(c_in, c_out, k, padding=k // 2, bias=False), nn.BatchNorm2d(c_out, momentum=bn_momentum),
                       nn.ReLU(inplace=True), nn.MaxPool2d(2)]
            c_in = c_out
        self.features = nn.Sequential(*layers)
        grid = image_size // 8
        self.position_embedding = nn.Parameter(torch.zeros(1, grid * grid, c_in))
        nn.init.trunc_normal_(self.position_embedding, std=0.02)
        self.norm = nn.LayerNorm(c_in)
        self.in_chans, self.image_size, self.image_key = in_chans, image_size, image_key
        self.input_keys = (image_key,)
        self.out_dim = int(c_in)

    def forward(self, batch: dict[str, Any]) -> Tokens:
        x = batch.get(self.image_key)
        if isinstance(x, torch.Tensor) and x.dim() == 4 and x.shape[1] != self.in_chans:
            paths = batch.get("path")
            chip = f"chip {paths[0]}" if isinstance(paths, (list, tuple)) and paths else "the batch's chips"
            raise DatasetFormatError(
                f"sar_cnn: {chip} has {x.shape[1]} channel(s), the model was built for {self.in_chans} "
                f"(model.encoders.*.args.in_chans: the channel count of the data it was trained on, data_info.json "
                f"'channels' of a checkpoint); train a model on data of this form, or use chips of "
                f"{self.in_chans} channel(s)")
        x = check_tensor(batch, self.image_key, shape=("B", self.in_chans, self.image_size, self.image_size))
        fmap = self.features(x.to(self.position_embedding.dtype))
        tokens = fmap.flatten(2).transpose(1, 2) + self.position_embedding
        return Tokens.dense(self.norm(tokens))
