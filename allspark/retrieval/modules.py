"""CISEN's progressive cross-modal feature fusion (LuoJiaHOG paper Section 4.2): V2TMap and HFE."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["V2TMap", "HFE"]


class V2TMap(nn.Module):
    """Visual-to-text feature mapping, Eq. 18-19: ``o_v = alpha * F_adp(o_v5) + (1 - alpha) * o_v5``.

    ``F_adp`` is the two-layer bottleneck adapter of CLIP-Adapter (linear, ReLU, linear, ReLU) with
    width ``dim // reduction``; ``alpha`` is the residual ratio (the paper's best: 0.9).
    """

    def __init__(self, dim: int, alpha: float = 0.9, reduction: int = 4) -> None:
        super().__init__()
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"V2TMap: the residual ratio alpha must be in [0, 1], got {alpha}")
        if reduction < 1 or dim // reduction < 1:
            raise ValueError(f"V2TMap: reduction={reduction} leaves no bottleneck width for dim={dim}")
        self.alpha = float(alpha)
        hidden = dim // reduction
        self.adapter = nn.Sequential(nn.Linear(dim, hidden, bias=False), nn.ReLU(inplace=True),
                                     nn.Linear(hidden, dim, bias=False), nn.ReLU(inplace=True))

    def forward(self, o_v5: torch.Tensor) -> torch.Tensor:
        return self.alpha * self.adapter(o_v5) + (1.0 - self.alpha) * o_v5


def _conv3x3(c_in: int, c_out: int) -> nn.Conv2d:
    return nn.Conv2d(c_in, c_out, 3, padding=1)


class HFE(nn.Module):
    """Hierarchical feature enhancement, Eq. 20-24.

    Inputs: ``maps`` = (o_v2, o_v3, o_v4), the backbone's feature maps at strides 8, 16 and 32 (any
    channel counts, given as ``in_channels``), and ``o_tc`` [B, text_dim], the text-like image feature
    from V2TMap. With ``F_proj`` a 1x1 convolution (a linear layer for the vector ``o_tc``), ``sigma`` ReLU:

    - Eq. 20: ``o_m4 = C3x3(Up2(sigma(F_proj(o_v4)) * sigma(F_proj(o_tc))))``          (stride 16)
    - Eq. 21: ``o_m3 = C3x3(concat(sigma(F_proj(o_v3)), sigma(F_proj(o_m4))))``
    - Eq. 22: ``o_m2 = C3x3(concat(sigma(F_proj(AvgPool2(o_v2))), sigma(F_proj(o_m3))))``
    - Eq. 23: ``o_m = F1x1(concat(o_m2, o_m3, o_m4))``; ``o_e' = flatten(F3x3(concat(o_m, o_spatial)))``,
      ``o_spatial`` the normalised (x, y) coordinates of each position (2 channels)
    - Eq. 24: ``o_e = MHSA([o_cls; o_e'] + E_pos)[0]`` (attention pooling; ``E_pos`` is learned on a
      ``pos_grid`` x ``pos_grid`` grid and resized bilinearly to the feature grid)

    ``o_e`` is projected to ``out_dim``. The module's output is ``o_tc + out(o_e)`` with ``out``
    zero-initialised (``residual=True``, the default): stage 2 starts exactly from the stage-1 embedding
    and learns the enhancement on top of it. ``residual=False`` returns ``out(o_e)`` alone, as the paper
    writes it.
    """

    def __init__(self, in_channels: tuple[int, int, int] | list[int], text_dim: int, dim: int = 128,
                 heads: int = 4, out_dim: int | None = None, residual: bool = True, pos_grid: int = 8) -> None:
        super().__init__()
        if len(in_channels) != 3:
            raise ValueError(f"HFE needs the channel counts of three levels (strides 8, 16, 32), got {in_channels}")
        if dim % heads:
            raise ValueError(f"HFE: dim={dim} must be divisible by heads={heads}")
        c2, c3, c4 = (int(c) for c in in_channels)
        self.in_channels = (c2, c3, c4)
        out_dim = out_dim or text_dim
        self.residual = residual
        if residual and out_dim != text_dim:
            raise ValueError(f"HFE: residual output needs out_dim == text_dim, got {out_dim} and {text_dim}")
        self.proj_v4 = nn.Conv2d(c4, dim, 1)
        self.proj_tc = nn.Linear(text_dim, dim)
        self.conv_m4 = _conv3x3(dim, dim)
        self.proj_v3 = nn.Conv2d(c3, dim, 1)
        self.proj_m4 = nn.Conv2d(dim, dim, 1)
        self.conv_m3 = _conv3x3(2 * dim, dim)
        self.proj_v2 = nn.Conv2d(c2, dim, 1)
        self.proj_m3 = nn.Conv2d(dim, dim, 1)
        self.conv_m2 = _conv3x3(2 * dim, dim)
        self.fuse1 = nn.Conv2d(3 * dim, dim, 1)
        self.fuse3 = _conv3x3(dim + 2, dim)
        self.cls = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos = nn.Parameter(torch.randn(1, dim, pos_grid, pos_grid) * 0.02)
        self.pos_cls = nn.Parameter(torch.zeros(1, 1, dim))
        self.norm = nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.out = nn.Linear(dim, out_dim)
        if residual:
            nn.init.zeros_(self.out.weight)
            nn.init.zeros_(self.out.bias)

    def forward(self, maps: list[torch.Tensor], o_tc: torch.Tensor) -> torch.Tensor:
        if len(maps) != 3:
            raise ValueError(f"HFE expects three feature maps (strides 8, 16, 32), got {len(maps)}")
        o_v2, o_v3, o_v4 = (m.float() for m in maps)
        for m, c, name in zip((o_v2, o_v3, o_v4), self.in_channels, ("o_v2", "o_v3", "o_v4")):
            if m.dim() != 4 or m.shape[1] != c:
                raise ValueError(f"HFE: {name} must be [B, {c}, h, w], got {list(m.shape)}")
        h, w = o_v3.shape[-2:]
        if (2 * o_v4.shape[-2], 2 * o_v4.shape[-1]) != (h, w):
            raise ValueError(f"HFE: o_v4 {list(o_v4.shape[-2:])} must be half of o_v3 {[h, w]}")
        if tuple(o_v2.shape[-2:]) != (2 * h, 2 * w):
            raise ValueError(f"HFE: o_v2 {list(o_v2.shape[-2:])} must be twice o_v3 {[h, w]}")
        tc = F.relu(self.proj_tc(o_tc.float()))[:, :, None, None]
        o_m4 = self.conv_m4(F.interpolate(F.relu(self.proj_v4(o_v4)) * tc, size=(h, w), mode="nearest"))  # Eq. 20
        o_m3 = self.conv_m3(torch.cat([F.relu(self.proj_v3(o_v3)), F.relu(self.proj_m4(o_m4))], 1))  # Eq. 21
        o_v2p = F.avg_pool2d(o_v2, 2, 2)
        o_m2 = self.conv_m2(torch.cat([F.relu(self.proj_v2(o_v2p)), F.relu(self.proj_m3(o_m3))], 1))  # Eq. 22
        o_m = self.fuse1(torch.cat([o_m2, o_m3, o_m4], 1))  # Eq. 23
        ys = torch.linspace(-1, 1, h, device=o_m.device)
        xs = torch.linspace(-1, 1, w, device=o_m.device)
        spatial = torch.stack(torch.meshgrid(ys, xs, indexing="ij")).expand(o_m.shape[0], -1, -1, -1)
        o_e = self.fuse3(torch.cat([o_m, spatial], 1)).flatten(2).transpose(1, 2)  # [B, N, dim]
        pos = F.interpolate(self.pos, size=(h, w), mode="bilinear", align_corners=False).flatten(2).transpose(1, 2)
        z = torch.cat([self.cls.expand(o_e.shape[0], -1, -1) + self.pos_cls, o_e + pos], 1)  # Eq. 24
        z = self.norm(z)
        pooled = self.attn(z, z, z, need_weights=False)[0][:, 0]
        out = self.out(pooled)
        return o_tc + out if self.residual else out
