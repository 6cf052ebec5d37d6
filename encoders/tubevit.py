"""Video encoder after TubeViT (AllSpark Section III-C "Video": ``f(m) = Enc_6(Sparse(m))``).

**Sparse tubes.** Instead of tiling the clip densely, TubeViT samples it with a few 3-D convolutions of
different kernel shapes (long-thin tubes see motion, flat wide ones see appearance), each with its own
stride and start offset, so the tubes overlap little and the token count stays small. Every tube shape is
one ``Conv3d(C, dim, kernel, stride)`` applied to the clip cropped at its offset; its outputs are
flattened to tokens and the token sets of all shapes are concatenated.

**Position.** Tokens of different tube shapes do not sit on one grid, so each token gets a fixed (not
learned) 3-D sine-cosine embedding of the *centre* of its tube in (frame, row, column) units of the
input clip: a third of the width per axis.

**Encoder.** ``depth`` pre-norm transformer blocks (6 in the paper) and a final LayerNorm; all tokens go
to the bridge (none is padding).

Default tubes are TubeViT's for 32 x 224 x 224 clips: 8x8x8 with stride (16,32,32); 16x4x4 with stride
(6,32,32) from offset (4,8,8); 4x12x12 with stride (16,32,32) from offset (0,16,16); 1x16x16 with stride
(32,16,16). Smaller clips pass their own ``tubes`` list.
"""
from __future__ import annotations

import math
from typing import Any, Sequence

import torch
from torch import nn

from allspark.registry import ENCODERS
from allspark.sizing import from_data
from allspark.types import Tokens, check_tensor

__all__ = ["TubeSpec", "SparseTubeTokenizer", "TubeViTEncoder", "sincos_3d", "TUBEVIT_TUBES"]

TUBEVIT_TUBES = [
    {"kernel": [8, 8, 8], "stride": [16, 32, 32], "offset": [0, 0, 0]},
    {"kernel": [16, 4, 4], "stride": [6, 32, 32], "offset": [4, 8, 8]},
    {"kernel": [4, 12, 12], "stride": [16, 32, 32], "offset": [0, 16, 16]},
    {"kernel": [1, 16, 16], "stride": [32, 16, 16], "offset": [0, 0, 0]},
]


class TubeSpec:
    """One tube shape: kernel, stride and offset as (frames, rows, columns)."""

    def __init__(self, kernel: Sequence[int], stride: Sequence[int], offset: Sequence[int] = (0, 0, 0)) -> None:
        self.kernel, self.stride, self.offset = (tuple(int(v) for v in x) for x in (kernel, stride, offset))
        for name, value in (("kernel", self.kernel), ("stride", self.stride), ("offset", self.offset)):
            if len(value) != 3:
                raise ValueError(f"tube {name} must have 3 values (t, h, w), got {list(value)}")
        if min(self.kernel) < 1 or min(self.stride) < 1 or min(self.offset) < 0:
            raise ValueError(f"tube kernel/stride must be >= 1 and offset >= 0, got {self}")

    def grid(self, clip: Sequence[int]) -> tuple[int, int, int]:
        """Number of tubes along (t, h, w) for a clip of size ``clip`` = (T, H, W)."""
        sizes = []
        for axis, (size, k, s, o) in enumerate(zip(clip, self.kernel, self.stride, self.offset)):
            if size - o < k:
                raise ValueError(f"tube {self} does not fit the clip {list(clip)}: axis {'thw'[axis]} has "
                                 f"{size} - offset {o} < kernel {k}")
            sizes.append((size - o - k) // s + 1)
        return tuple(sizes)

    def centres(self, clip: Sequence[int]) -> torch.Tensor:
        """Centres ``[n, 3]`` of this shape's tubes in input (frame, row, column) coordinates."""
        axes = [o + s * torch.arange(n, dtype=torch.float64) + (k - 1) / 2
                for n, k, s, o in zip(self.grid(clip), self.kernel, self.stride, self.offset)]
        return torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1).reshape(-1, 3)

    def __repr__(self) -> str:
        return f"TubeSpec(kernel={list(self.kernel)}, stride={list(self.stride)}, offset={list(self.offset)})"


def sincos_3d(positions: torch.Tensor, dim: int, temperature: float = 10000.0) -> torch.Tensor:
    """Fixed sine-cosine embedding ``[n, dim]`` of 3-D ``positions [n, 3]``: ``2 * (dim // 6)`` channels
    per axis (sines then cosines over geometric frequencies), zero-padded up to ``dim``."""
    per_axis = 2 * (dim // 6)
    if per_axis == 0:
        raise ValueError(f"sincos_3d: dim must be >= 6, got {dim}")
    half = per_axis // 2
    omega = 1.0 / temperature ** (torch.arange(half, dtype=torch.float64) / half)
    parts = []
    for axis in range(3):
        angle = positions[:, axis : axis + 1].double() * omega[None, :]
        parts += [angle.sin(), angle.cos()]
    emb = torch.cat(parts, dim=1)
    return torch.nn.functional.pad(emb, (0, dim - emb.shape[1])).float()


class SparseTubeTokenizer(nn.Module):
    """Clip ``[B, C, T, H, W]`` -> tokens ``[B, n, dim]`` from every tube shape, plus fixed positions."""

    def __init__(self, in_channels: int, dim: int, clip: Sequence[int], tubes: Sequence[dict[str, Any]]) -> None:
        super().__init__()
        if not tubes:
            raise ValueError("tubevit: at least one tube shape is needed")
        self.specs = [TubeSpec(**t) for t in tubes]
        self.clip = tuple(clip)
        self.convs = nn.ModuleList(nn.Conv3d(in_channels, dim, s.kernel, s.stride) for s in self.specs)
        centres = torch.cat([s.centres(self.clip) for s in self.specs])
        self.register_buffer("position", sincos_3d(centres, dim), persistent=False)
        self.num_tokens = centres.shape[0]

    def forward(self, video: torch.Tensor) -> torch.Tensor:
        tokens = []
        for spec, conv in zip(self.specs, self.convs):
            t0, h0, w0 = spec.offset
            tokens.append(conv(video[:, :, t0:, h0:, w0:]).flatten(2).transpose(1, 2))
        return torch.cat(tokens, dim=1) + self.position


@ENCODERS.register("tubevit")
class TubeViTEncoder(nn.Module):
    """``batch[key]`` ``[B, C, T, H, W]`` (float, normalised) -> ``[B, n_tubes, dim]``.

    ``num_frames``, ``image_size`` and ``in_channels`` default to the dataset's (info ``num_frames``,
    ``image_size``, ``channels``).

    Paper sizes: 6 blocks (AllSpark); width 768 and 12 heads (TubeViT-B) on 32 x 224 x 224 clips.
    """

    def __init__(
        self,
        num_frames: int | None = None,
        image_size: int | None = None,
        in_channels: int | None = None,
        dim: int = 768,
        depth: int = 6,
        heads: int = 12,
        mlp_ratio: float = 4.0,
        dropout: float = 0.0,
        tubes: Sequence[dict[str, Any]] | None = None,
        key: str = "video",
        info: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        # unset: the dataset's clip shape (info ``num_frames``, ``image_size``, ``channels``); set: checked
        num_frames = from_data("tubevit", "num_frames", num_frames, info, "num_frames")
        image_size = from_data("tubevit", "image_size", image_size, info, "image_size")
        in_channels = from_data("tubevit", "in_channels", in_channels, info, "channels")
        if dim % heads:
            raise ValueError(f"tubevit: dim {dim} is not divisible by heads {heads}")
        self.num_frames, self.image_size, self.in_channels = num_frames, image_size, in_channels
        self.key = key
        self.input_keys = (key,)
        self.out_dim = dim
        self.tokenizer = SparseTubeTokenizer(in_channels, dim, (num_frames, image_size, image_size),
                                             tubes if tubes is not None else TUBEVIT_TUBES)
        self.blocks = nn.ModuleList(
            nn.TransformerEncoderLayer(dim, heads, int(dim * mlp_ratio), dropout, activation="gelu",
                                       batch_first=True, norm_first=True)
            for _ in range(depth)
        )
        self.norm = nn.LayerNorm(dim)
        for conv in self.tokenizer.convs:  # ViT-style patch-embedding init (fan-in scaled)
            nn.init.trunc_normal_(conv.weight, std=1 / math.sqrt(conv.weight[0].numel()))
            nn.init.zeros_(conv.bias)

    @property
    def num_tokens(self) -> int:
        return self.tokenizer.num_tokens

    def forward(self, batch: dict[str, Any]) -> Tokens:
        video = check_tensor(batch, self.key,
                             shape=("B", self.in_channels, self.num_frames, self.image_size, self.image_size))
        x = self.tokenizer(video.float())
        for block in self.blocks:
            x = block(x)
        return Tokens.dense(self.norm(x))
