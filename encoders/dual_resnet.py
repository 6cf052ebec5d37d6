"""Visible-infrared encoder (AllSpark Section III-C "Infrared"): two independently parameterised ResNets.

The paper modifies DDAG by dropping its shared ResNet-50 layers and using two separate ResNet-50 networks,
``f(m) = Enc_ResNet(I_r) (+) Enc_ResNet(I_i)``. Each image of a batch goes through the stream of its own
modality (``batch["modality"]``: 0 visible, 1 infrared); the cells of the final feature map become tokens
``[B, h*w, C]`` plus a learned embedding of the modality, so the bridge sees which stream produced them.
When a sample carries both a visible and an infrared image (``image`` and ``image_ir`` keys), the two
token sets are concatenated, which is the paper's formula; the re-identification data path feeds one image
per sample, so each sample uses one stream.

Backbones are timm ResNets (``arch``, ``resnet50`` by default) without their pooling and classifier,
randomly initialised offline; ``weights`` may name a local state-dict file (``.safetensors`` or ``.pth``)
loaded into both streams before they train apart. ``output_stride`` 16 (default) is the re-identification
"last stride 1" of DDAG / AGW / Luo et al.'s bag of tricks (the last stage keeps the resolution, with
dilation): a 288 x 144 image gives 18 x 9 tokens instead of 9 x 5; 32 is the plain ResNet.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from allspark.registry import ENCODERS
from allspark.sizing import as_int_pair, from_data
from allspark.types import Tokens, check_tensor

__all__ = ["DualResNetEncoder"]


def _resnet(arch: str, weights: str | None, output_stride: int) -> nn.Module:
    import timm

    net = timm.create_model(arch, pretrained=False, num_classes=0, global_pool="", output_stride=output_stride)
    if weights:
        from encoders.image_backbone import read_state_dict

        path = Path(weights).expanduser()
        state = read_state_dict(path, "dual_resnet:")
        missing, _ = net.load_state_dict({k: v for k, v in state.items() if not k.startswith("fc.")}, strict=False)
        if missing:
            raise ValueError(f"dual_resnet: {path} lacks {len(missing)} tensors of {arch}, e.g. {missing[:3]}")
    return net


@ENCODERS.register("dual_resnet")
class DualResNetEncoder(nn.Module):
    def __init__(self, arch: str = "resnet50", weights: str | None = None,
                 image_size: tuple[int, int] | list[int] | None = None, output_stride: int = 16, key: str = "image",
                 info: dict[str, Any] | None = None) -> None:
        super().__init__()
        # unset: the dataset's image size (info ``image_size``, H x W); set: checked against it
        self.image_size = from_data("dual_resnet", "image_size", image_size, info, "image_size", convert=as_int_pair)
        if output_stride not in (8, 16, 32):
            raise ValueError(f"dual_resnet: output_stride must be 8, 16 or 32, got {output_stride}")
        self.visible = _resnet(arch, weights, output_stride)
        self.infrared = _resnet(arch, weights, output_stride)
        self.out_dim = int(self.visible.num_features)
        self.modality_embed = nn.Parameter(torch.zeros(2, self.out_dim))
        nn.init.normal_(self.modality_embed, std=0.02)
        self.key = key
        self.input_keys = (key, "modality")

    def _stream(self, images: torch.Tensor, modality: torch.Tensor) -> torch.Tensor:
        """Each image through its own modality's ResNet -> tokens [B, h*w, C]."""
        out = None
        for m, net in ((0, self.visible), (1, self.infrared)):
            sel = modality == m
            if not sel.any():
                continue
            feats = net(images[sel]).flatten(2).transpose(1, 2) + self.modality_embed[m]
            if out is None:
                out = feats.new_zeros(images.shape[0], *feats.shape[1:])
            out[sel] = feats
        return out

    def forward(self, batch: dict[str, Any]) -> Tokens:
        images = check_tensor(batch, self.key, shape=("B", 3, *self.image_size))
        modality = batch.get("modality")
        if not isinstance(modality, torch.Tensor) or modality.shape != images.shape[:1]:
            raise ValueError(f"dual_resnet: batch['modality'] must be a [B] tensor of 0 (visible) / 1 (infrared) "
                             f"for the {images.shape[0]} images")
        if not ((modality == 0) | (modality == 1)).all():
            raise ValueError(f"dual_resnet: batch['modality'] must hold 0 or 1, got {modality.unique().tolist()}")
        tokens = self._stream(images.float(), modality)
        if "image_ir" in batch:  # a visible and an infrared image per sample: concatenate both streams' tokens
            ir = check_tensor(batch, "image_ir", shape=("B", 3, *self.image_size))
            tokens = torch.cat([tokens, self._stream(ir.float(), torch.ones_like(modality))], dim=1)
        return Tokens.dense(tokens)
