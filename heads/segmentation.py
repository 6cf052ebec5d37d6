"""Dense segmentation head: a light U-Net decoder over the encoders' feature maps at full resolution, modulated by
the language model's output.

The LLM path carries the sample through the bridge's ``N`` tokens, which are far too few to hold a class per pixel;
spatial detail therefore bypasses it: the dense encoders (``encoders/dense_patch.py``) leave their feature
pyramids in the batch (``batch["dense_features"][key]``: level ``l`` at stride ``2^l``), and this head decodes them.

1. **Fusion per level.** The maps of every encoder at level ``l`` are concatenated and projected (1x1
   convolution) to ``width`` channels.
2. **Decoder.** From the coarsest level up: a block of two 3x3 convolutions (per-pixel LayerNorm, GELU); then
   bilinear upsampling by 2, concatenation with the next finer level's fused map, another block; ... down to full
   resolution; a 1x1 convolution gives the class scores of every pixel.
3. **Conditioning on the LLM** (``conditioning``):

   - ``film`` (default): the LLM's pooled output (``pooling``, e.g. the last bridge token's state, LayerNorm)
     is mapped to a FiLM scale and shift of the decoder's channels at every level, ``y (1 + gamma) + beta``,
     initialised to the identity (zero weights), so the decoder starts as plain fusion and learns how much to
     take from the LLM;
   - ``cross_attention``: the coarsest level's pixels attend (multi-head, scaled dot product) over the LLM's
     hidden states at the bridge-token positions, and the result is added to them through an output projection
     initialised at zero;
   - ``none``: the ablation with the LLM path removed: the same encoders and decoder, and no LLM. The head then
     declares ``uses_llm = False``, so the model (``AllSpark.forward``) runs the encoders only and never the bridge
     or the language model, in training, evaluation and prediction (the head gets ``None`` for the LLM's output);
     the adapters and the bridge, which nothing trains then, are held (kept in the checkpoint, not optimised).

Loss: pixel-wise cross-entropy over the labelled pixels (``label`` -1 = no label), optionally class-weighted.
Predictions: ``pred`` ``[B, H, W]`` (int16 class indices: a 16-bit map halves what evaluation gathers for large
tiles) and, with ``output_logits``, ``logits`` ``[B, K, H, W]``.
"""
from __future__ import annotations

from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from allspark.registry import HEADS
from allspark.sizing import from_data
from allspark.types import LLMOutput, Output, pooled_size
from encoders.dense_patch import FEATURE_WIDTHS_KEY, FEATURES_KEY, LayerNorm2d, conv_block

__all__ = ["SegmentationHead", "CONDITIONING"]

CONDITIONING = ("film", "cross_attention", "none")


class _CrossAttention(nn.Module):
    """Pixels of a [B, C, h, w] map attend over context tokens [B, N, D]; the output projection starts at zero."""

    def __init__(self, channels: int, context: int, heads: int) -> None:
        super().__init__()
        if channels % heads:
            raise ValueError(f"segmentation: width ({channels}) must be divisible by heads ({heads})")
        self.heads = heads
        self.norm_q, self.norm_kv = nn.LayerNorm(channels), nn.LayerNorm(context)
        self.q = nn.Linear(channels, channels)
        self.kv = nn.Linear(context, 2 * channels)
        self.out = nn.Linear(channels, channels)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        q = self.q(self.norm_q(x.flatten(2).transpose(1, 2)))  # [B, hw, C]
        k, v = self.kv(self.norm_kv(context)).chunk(2, dim=-1)

        def split(t: torch.Tensor) -> torch.Tensor:
            return t.unflatten(-1, (self.heads, c // self.heads)).transpose(1, 2)

        att = F.scaled_dot_product_attention(split(q), split(k), split(v))  # [B, heads, hw, C / heads]
        out = self.out(att.transpose(1, 2).flatten(2))
        return x + out.transpose(1, 2).reshape(b, c, h, w)


@HEADS.register("segmentation")
class SegmentationHead(nn.Module):
    """See the module docstring. ``num_classes`` comes from the data; ``feature_channels`` (``{raster key: [widths
    per level]}``) from what the dense encoders record in the dataset info, unless given."""

    def __init__(self, hidden_size: int, *, num_classes: int | None = None, width: int = 32, conditioning: str = "film",
                 pooling: str = "last", heads: int = 4, class_weights: Sequence[float] | None = None,
                 label_key: str = "label", ignore_index: int = -1, output_logits: bool = False,
                 feature_channels: dict[str, Sequence[int]] | None = None, info: dict[str, Any] | None = None) -> None:
        super().__init__()
        self.num_classes = from_data("segmentation", "num_classes", num_classes, info, "num_classes",
                                     where="model.head.args", found="has {} classes")
        if conditioning not in CONDITIONING:
            raise ValueError(f"segmentation: conditioning must be one of {list(CONDITIONING)}, got {conditioning!r}")
        channels = feature_channels if feature_channels is not None else (info or {}).get(FEATURE_WIDTHS_KEY)
        if not channels:
            raise ValueError("segmentation: the head decodes the feature maps of dense encoders (type dense_patch), "
                             "which record their widths in the dataset info; this model has none (set "
                             "model.head.args.feature_channels: {raster key: [widths per level]} for other encoders)")
        self.keys = list(channels)
        levels = {len(v) for v in channels.values()}
        if len(levels) != 1:
            raise ValueError(f"segmentation: every encoder must give the same number of levels, got {dict(channels)}")
        self.levels = levels.pop()
        self.conditioning, self.pooling, self.label_key = conditioning, pooling, label_key
        #: read by AllSpark.forward: without conditioning the bridge and the LLM are not run at all
        self.uses_llm = conditioning != "none"
        self.ignore_index, self.output_logits = int(ignore_index), bool(output_logits)
        self.fuse = nn.ModuleList(nn.Conv2d(sum(int(channels[k][l]) for k in self.keys), width, 1)
                                  for l in range(self.levels))
        self.blocks = nn.ModuleList(conv_block(width if l == self.levels - 1 else 2 * width, width)
                                    for l in range(self.levels))
        self.classifier = nn.Sequential(LayerNorm2d(width), nn.Conv2d(width, self.num_classes, 1))
        if conditioning == "film":
            size = pooled_size(pooling, hidden_size)
            self.neck = nn.LayerNorm(size)
            self.film = nn.Linear(size, 2 * width * self.levels)
            nn.init.zeros_(self.film.weight)
            nn.init.zeros_(self.film.bias)
        elif conditioning == "cross_attention":
            self.attend = _CrossAttention(width, hidden_size, heads)
        if class_weights is not None:
            weights = torch.tensor([float(w) for w in class_weights])
            if weights.numel() != self.num_classes or (weights < 0).any():
                raise ValueError(f"segmentation: class_weights must be {self.num_classes} non-negative numbers, "
                                 f"got {list(class_weights)}")
            self.register_buffer("class_weights", weights)
        else:
            self.class_weights = None
        self.width = width

    def _maps(self, batch: dict[str, Any]) -> list[torch.Tensor]:
        found = batch.get(FEATURES_KEY)
        if not isinstance(found, dict) or set(self.keys) - set(found):
            have = sorted(found) if isinstance(found, dict) else []
            raise ValueError(f"segmentation: batch[{FEATURES_KEY!r}] must hold the feature maps of the encoders "
                             f"{self.keys} (put there by dense_patch encoders), it has {have}")
        fused = []
        for l in range(self.levels):
            parts = [found[k][l] for k in self.keys]
            if len({p.shape[-2:] for p in parts}) != 1:
                raise ValueError(f"segmentation: the encoders' level-{l} maps differ in size: "
                                 f"{[list(p.shape) for p in parts]}; the rasters must share one grid")
            fused.append(self.fuse[l](torch.cat(parts, dim=1)))
        return fused

    def forward(self, llm_out: LLMOutput | None, batch: dict[str, Any]) -> Output:
        """``llm_out``: the LLM's output, or None with ``conditioning: none`` (the model does not run the LLM)."""
        maps = self._maps(batch)
        b = maps[0].shape[0]
        film = None
        if self.conditioning != "none" and llm_out is None:
            raise ValueError(f"segmentation: conditioning={self.conditioning} reads the LLM's output, got None")
        if self.conditioning == "film":
            film = self.film(self.neck(llm_out.pool(self.pooling).float())).reshape(b, self.levels, 2, self.width)
        y = None
        for l in reversed(range(self.levels)):
            if y is None:
                y = self.blocks[l](maps[l])
            else:
                y = F.interpolate(y, size=maps[l].shape[-2:], mode="bilinear", align_corners=False)
                y = self.blocks[l](torch.cat([y, maps[l]], dim=1))
            if film is not None:
                y = y * (1 + film[:, l, 0, :, None, None]) + film[:, l, 1, :, None, None]
            if l == self.levels - 1 and self.conditioning == "cross_attention":
                start = llm_out.modality_start
                context = llm_out.hidden[:, start:start + llm_out.num_modality_tokens].float()
                if context.shape[1] == 0:
                    raise ValueError("segmentation: conditioning=cross_attention needs the bridge tokens' hidden "
                                     "states; this task has none")
                y = self.attend(y, context)
        logits = self.classifier(y).float()  # [B, K, H, W]
        loss = None
        label = batch.get(self.label_key)
        if label is not None:
            if not isinstance(label, torch.Tensor) or tuple(label.shape) != (b, *logits.shape[-2:]):
                shape = list(label.shape) if isinstance(label, torch.Tensor) else type(label).__name__
                raise ValueError(f"batch[{self.label_key!r}]: expected shape [{b}, {logits.shape[-2]}, "
                                 f"{logits.shape[-1]}] (a class per pixel), got {shape}")
            target = label.long()
            if (target == self.ignore_index).all():  # nothing labelled: a zero loss kept in the graph
                loss = logits.sum() * 0.0
            else:
                weight = None if self.class_weights is None else self.class_weights.float()
                loss = F.cross_entropy(logits, target, weight=weight, ignore_index=self.ignore_index)
        predictions = {"pred": logits.argmax(1).to(torch.int16)}
        if self.output_logits:
            predictions["logits"] = logits
        return Output(loss, predictions)
