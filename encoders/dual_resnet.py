"""Visible-infrared encoder (AllSpark Section III-C "Infrared"): two independently parameterised ResNets.

The paper modifies DDAG by dropping its shared ResNet-50 layers and using two separate ResNet-50 networks,
``f(m) = Enc_ResNet(I_r) (+) Enc_ResNet(I_i)``. The cells of each stream's final feature map become tokens
``[B, h*w, C]`` plus a learned embedding of the stream's modality, so the bridge sees which stream produced them.

Two input forms (the SYSU-MM01 reader's ``data.args.pairing``):

- **paired** (the paper's, the default for training): ``batch["image"]`` holds visible images
  (``batch["modality"]`` all 0) and ``batch["image_ir"]`` the infrared image of the same identity. Each goes
  through its own stream and the two token sets are *concatenated* along the token axis, ``[B, 2*h*w, C]``,
  before the bridge. ``(+)`` is read as concatenation because the paper defines it so: eq. (5) uses ``(+)`` for
  "the concatenation operation of text tokens and modality tokens in the sequence", and the oblique-photography
  encoder, ``Enc(V_1) (+) ... (+) Enc(V_n)``, is described as extracting each view's features "and concatenate
  them". (A sum would also need the two maps to align cell by cell, which two unregistered photographs from
  different cameras do not.)
- **single**: one image per sample, either modality; each image goes through the stream of its own modality
  (``batch["modality"]``: 0 visible, 1 infrared). This is what evaluation feeds in both forms: the SYSU-MM01
  all-search protocol ranks infrared queries against visible gallery images one image at a time, so every
  image is embedded by the stream of its modality alone.

``stream_dropout`` p (paired batches, training only): each sample keeps both streams with probability 1 - p and
otherwise only one of them (each with p / 2), the other's tokens masked out (the bridge honours the mask). A
model trained on concatenated pairs alone never sees the single-stream input that evaluation gives it; with the
dropout it learns identities from both the fused pair and from either image alone. Measured on the demo (tiny
random LLM, 3 seeds, the README's infrared paragraph): without it rank1 0.10 / 0.12 (1 / 3 epochs), with the
config's 0.67 (about a third each: both streams, visible only, infrared only) 0.18 / 0.23.

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

from allspark.config import ConfigError
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
                 infrared_key: str = "image_ir", stream_dropout: float = 0.0,
                 info: dict[str, Any] | None = None) -> None:
        super().__init__()
        if not 0.0 <= float(stream_dropout) <= 1.0:
            raise ConfigError(f"dual_resnet: model.encoders.*.args.stream_dropout must lie in [0, 1] (the share of "
                              f"training pairs shown with one stream only), got {stream_dropout}")
        self.stream_dropout = float(stream_dropout)
        # unset: the dataset's image size (info ``image_size``, H x W); set: checked against it
        self.image_size = from_data("dual_resnet", "image_size", image_size, info, "image_size", convert=as_int_pair)
        if output_stride not in (8, 16, 32):
            raise ValueError(f"dual_resnet: output_stride must be 8, 16 or 32, got {output_stride}")
        self.visible = _resnet(arch, weights, output_stride)
        self.infrared = _resnet(arch, weights, output_stride)
        self.out_dim = int(self.visible.num_features)
        self.modality_embed = nn.Parameter(torch.zeros(2, self.out_dim))
        nn.init.normal_(self.modality_embed, std=0.02)
        self.key, self.infrared_key = key, infrared_key
        self.input_keys = (key, "modality")  # and ``infrared_key`` in paired batches

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
        if self.infrared_key not in batch:  # single: each image through its own modality's stream
            return Tokens.dense(self._stream(images.float(), modality))
        # paired: a visible and an infrared image per sample, both streams' token sets concatenated (the paper's (+))
        if not (modality == 0).all():
            raise ValueError(f"dual_resnet: a paired batch (with batch[{self.infrared_key!r}]) holds the visible images "
                             f"in batch[{self.key!r}], so batch['modality'] must be all 0, got "
                             f"{modality.tolist()}")
        ir = check_tensor(batch, self.infrared_key, shape=(images.shape[0], 3, *self.image_size))
        vis_tokens = self.visible(images.float()).flatten(2).transpose(1, 2) + self.modality_embed[0]
        ir_tokens = self.infrared(ir.float()).flatten(2).transpose(1, 2) + self.modality_embed[1]
        tokens = torch.cat([vis_tokens, ir_tokens], dim=1)
        mask = torch.ones(tokens.shape[:2], dtype=torch.bool, device=tokens.device)
        if self.training and self.stream_dropout > 0:
            # per sample: u < p/2 drops the visible stream, p/2 <= u < p the infrared one (global torch RNG: seeded
            # by the run, restored on resume)
            u = torch.rand(tokens.shape[0], device=tokens.device)
            n = vis_tokens.shape[1]
            mask[:, :n] &= ~(u < self.stream_dropout / 2)[:, None]
            mask[:, n:] &= ~((u >= self.stream_dropout / 2) & (u < self.stream_dropout))[:, None]
        return Tokens(tokens, mask)
