"""Trajectory encoder after TUTR (AllSpark III-C "Trajectory": f(m) = Enc_2(W * m), W in R^{d x (l*2)}).

The observed track of the target pedestrian is flattened (``l * 2`` values) and mapped by one linear
layer to a token; each neighbour's observed track (same frame of reference) becomes an extra token
through its own linear layer, as TUTR's social tokens; a learned type embedding separates the two. A
2-layer transformer encoder mixes the tokens; padded neighbours are masked in attention and in the output.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from allspark.registry import ENCODERS
from allspark.sizing import from_data
from allspark.types import Tokens, check_tensor


@ENCODERS.register("tutr")
class TrajectoryEncoder(nn.Module):
    input_keys = ("obs", "neighbours", "neighbours_mask")

    def __init__(self, info: dict[str, Any] | None = None, *, obs_len: int | None = None, dim: int = 128,
                 depth: int = 2, heads: int = 4, ff_mult: int = 2, dropout: float = 0.1,
                 use_neighbours: bool = True, position_scale: float = 1.0) -> None:
        super().__init__()
        # unset: the dataset's observed steps (info ``obs_len``); set: checked against it
        self.obs_len = from_data("tutr", "obs_len", obs_len, info, "obs_len", found="observes {} steps")
        if self.obs_len < 1:
            raise ValueError(f"tutr: obs_len must be >= 1, got {self.obs_len}")
        self.out_dim = dim
        self.use_neighbours = use_neighbours
        #: metres are O(1) already; other units can be brought there without touching the data
        self.position_scale = position_scale
        self.input_keys = ("obs", "neighbours", "neighbours_mask") if use_neighbours else ("obs",)
        self.track_proj = nn.Linear(self.obs_len * 2, dim)
        self.neighbour_proj = nn.Linear(self.obs_len * 2, dim)
        self.type_embedding = nn.Parameter(torch.randn(2, dim) * 0.02)
        layer = nn.TransformerEncoderLayer(dim, heads, dim * ff_mult, dropout, batch_first=True, norm_first=True)
        self.transformer = nn.TransformerEncoder(layer, depth, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(dim)

    def forward(self, batch: dict[str, Any]) -> Tokens:
        obs = check_tensor(batch, "obs", shape=("B", self.obs_len, 2))
        b = obs.shape[0]
        tokens = [self.track_proj(obs.reshape(b, -1) / self.position_scale)[:, None] + self.type_embedding[0]]
        masks = [torch.ones(b, 1, dtype=torch.bool, device=obs.device)]
        if self.use_neighbours:
            nb = check_tensor(batch, "neighbours", shape=(b, None, self.obs_len, 2))
            mask = batch.get("neighbours_mask")
            if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool or mask.shape != nb.shape[:2]:
                got = f"{mask.dtype} {list(mask.shape)}" if isinstance(mask, torch.Tensor) else type(mask).__name__
                raise ValueError(f"batch['neighbours_mask']: expected bool of shape {list(nb.shape[:2])}, got {got}")
            tokens.append(self.neighbour_proj(nb.flatten(2) / self.position_scale) + self.type_embedding[1])
            masks.append(mask)
        x, mask = torch.cat(tokens, dim=1), torch.cat(masks, dim=1)
        x = self.transformer(x, src_key_padding_mask=~mask)
        return Tokens(self.norm(x) * mask[..., None], mask)
