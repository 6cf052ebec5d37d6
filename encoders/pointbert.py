"""Point-cloud encoder after Point-BERT (AllSpark Section III-C, "PointClouds").

``f(m) = Enc_12(Conv1d(Group(m)))``:
1. **Group**: farthest-point sampling picks ``G`` centres, each takes its ``N`` nearest points
   (``encoders.point_ops``, batched pure torch), expressed relative to the centre -> ``[B, G, N, C]``.
2. **Mini-PointNet** (Conv1d with kernel 1, shared over points): per-point features, a max-pooled group
   feature concatenated back to every point, a second Conv1d stage and a max over the group ->
   one ``d``-wide token per group.
3. **Transformer**: a learnable class token, a position MLP on the centre coordinates added before every
   block (as Point-BERT does, so geometry reaches all depths), ``depth`` pre-norm blocks, final LayerNorm.
The tokens handed to the bridge are ``[cls | G group tokens]``; none is padding.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from allspark.registry import ENCODERS
from allspark.sizing import from_data
from allspark.types import Tokens, check_tensor
from encoders.point_ops import group_points

__all__ = ["MiniPointNet", "PointBERTEncoder"]


class MiniPointNet(nn.Module):
    """Group of points ``[M, K, C]`` -> one feature ``[M, out_dim]`` (Point-BERT's group encoder)."""

    def __init__(self, in_channels: int, out_dim: int, bn_momentum: float = 0.1) -> None:
        super().__init__()
        self.first = nn.Sequential(
            nn.Conv1d(in_channels, 128, 1), nn.BatchNorm1d(128, momentum=bn_momentum), nn.ReLU(inplace=True),
            nn.Conv1d(128, 256, 1),
        )
        self.second = nn.Sequential(
            nn.Conv1d(512, 512, 1), nn.BatchNorm1d(512, momentum=bn_momentum), nn.ReLU(inplace=True),
            nn.Conv1d(512, out_dim, 1),
        )

    def forward(self, groups: torch.Tensor) -> torch.Tensor:
        m, k, _ = groups.shape
        x = self.first(groups.transpose(1, 2))  # [M, 256, K]
        pooled = x.max(dim=2, keepdim=True).values
        x = torch.cat([pooled.expand(-1, -1, k), x], dim=1)  # [M, 512, K]
        return self.second(x).max(dim=2).values


@ENCODERS.register("pointbert")
class PointBERTEncoder(nn.Module):
    """``batch[key]`` ``[B, P, C]`` (xyz first, optional extra columns such as normals) -> ``[B, 1+G, dim]``.

    ``num_points`` and ``in_channels`` default to the dataset's (info ``num_points``, ``point_channels``).

    Paper sizes (Point-BERT on ModelNet40): 1024 points, ``G=64`` groups of ``N=32``, width 384,
    12 blocks, 6 heads.

    ``bn_momentum``: of the mini-PointNet's BatchNorm running statistics (PyTorch's 0.1 by default). In a
    short run at a high learning rate the weights move faster than a 0.1 running average follows, and the
    eval-mode statistics no longer match the features (the demo then predicts one class at test time
    while training-mode accuracy is fine); the demo config uses 0.5.
    """

    def __init__(
        self,
        num_points: int | None = None,
        in_channels: int | None = None,
        num_groups: int = 64,
        group_size: int = 32,
        dim: int = 384,
        depth: int = 12,
        heads: int = 6,
        mlp_ratio: float = 4.0,
        dropout: float = 0.0,
        group_dim: int | None = None,
        bn_momentum: float = 0.1,
        key: str = "points",
        info: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        # unset: the dataset's points per shape and columns per point (info ``num_points``, ``point_channels``)
        num_points = from_data("pointbert", "num_points", num_points, info, "num_points",
                               found="gives {} points per shape")
        in_channels = from_data("pointbert", "in_channels", in_channels, info, "point_channels",
                                found="gives {} columns per point")
        if in_channels < 3:
            raise ValueError(f"pointbert: in_channels must be >= 3 (xyz first), got {in_channels}")
        if not 0 < num_groups <= num_points or not 0 < group_size <= num_points:
            raise ValueError(f"pointbert: need 0 < num_groups ({num_groups}) and group_size ({group_size}) "
                             f"<= num_points ({num_points})")
        if dim % heads:
            raise ValueError(f"pointbert: dim {dim} is not divisible by heads {heads}")
        self.num_points, self.in_channels = num_points, in_channels
        self.num_groups, self.group_size = num_groups, group_size
        self.key = key
        self.input_keys = (key,)
        self.out_dim = dim
        group_dim = group_dim or dim
        if not 0 < bn_momentum <= 1:
            raise ValueError(f"pointbert: bn_momentum must be in (0, 1], got {bn_momentum}")
        self.group_encoder = MiniPointNet(in_channels, group_dim, bn_momentum)
        self.reduce = nn.Linear(group_dim, dim) if group_dim != dim else nn.Identity()
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.cls_pos = nn.Parameter(torch.randn(1, 1, dim) * 0.02)
        self.pos_embed = nn.Sequential(nn.Linear(3, 128), nn.GELU(), nn.Linear(128, dim))
        self.blocks = nn.ModuleList(
            nn.TransformerEncoderLayer(dim, heads, int(dim * mlp_ratio), dropout, activation="gelu",
                                       batch_first=True, norm_first=True)
            for _ in range(depth)
        )
        self.norm = nn.LayerNorm(dim)

    def forward(self, batch: dict[str, Any]) -> Tokens:
        points = check_tensor(batch, self.key, shape=("B", self.num_points, self.in_channels))
        b = points.shape[0]
        groups, centres = group_points(points.float(), self.num_groups, self.group_size)
        feats = self.group_encoder(groups.reshape(b * self.num_groups, self.group_size, self.in_channels))
        x = self.reduce(feats.reshape(b, self.num_groups, -1))
        x = torch.cat([self.cls_token.expand(b, -1, -1), x], dim=1)
        pos = torch.cat([self.cls_pos.expand(b, -1, -1), self.pos_embed(centres)], dim=1)
        for block in self.blocks:
            x = block(x + pos)
        return Tokens.dense(self.norm(x))
