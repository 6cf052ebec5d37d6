"""Spectral transformer for hyperspectral pixels (AllSpark III-C "HSI": f(m) = Enc_12(W * m^T)).

The paper treats all bands of one pixel as one sample, ``m in R^{1 x 1 x C}``, and lifts it with a
linear projection ``W in R^{1 x d}`` applied to the transposed spectrum: every band *value* becomes one
``d``-dimensional token (``C`` tokens), and a 12-layer standard transformer encoder mixes them.

- ``bands_per_token = 1`` is the paper's tokenisation: token ``i`` is ``x_i * w + b``.
- ``bands_per_token = k > 1`` groups ``k`` adjacent bands into one token through a linear map over the
  ``k`` values (``ceil(C / k)`` tokens, attention cost down by ``k^2``) -- a cheaper option for demos and
  CPUs. When ``C`` is not a multiple of ``k`` the spectrum is zero-padded at the long-wavelength end so
  that no band is dropped; the last token then sees fewer real bands, and its position embedding lets the
  model learn that.
- A learnable position embedding per token says which wavelength a token comes from: attention is
  permutation-invariant, but the order of bands (the shape of the spectrum) is the signal.
- Pre-LayerNorm ``nn.TransformerEncoder`` (``batch_first``, so PyTorch's SDPA kernels are used) and a
  final LayerNorm; all tokens are real, so the mask is all True.
"""
from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from allspark.registry import ENCODERS
from allspark.sizing import from_data
from allspark.types import Tokens, check_tensor

__all__ = ["SpectralTransformer"]


@ENCODERS.register("hsi_spectral")
class SpectralTransformer(nn.Module):
    """``batch["spectrum"]`` [B, in_bands] float -> ``Tokens`` [B, ceil(in_bands / bands_per_token), dim].

    ``in_bands`` defaults to the dataset's band count (info ``num_bands``)."""

    input_keys = ("spectrum",)

    def __init__(
        self,
        in_bands: int | None = None,
        dim: int = 128,
        depth: int = 12,
        heads: int = 4,
        mlp_ratio: float = 4.0,
        dropout: float = 0.0,
        bands_per_token: int = 1,
        info: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"hsi_spectral: dim ({dim}) must be divisible by heads ({heads})")
        # ``in_bands`` unset: the dataset's band count (info ``num_bands``, passed by the model builder); set:
        # checked against it, so a config written for another sensor fails before any batch is drawn.
        in_bands = from_data("hsi_spectral", "in_bands", in_bands, info, "num_bands", found="has {} bands")
        if in_bands < 1 or bands_per_token < 1:
            raise ValueError(f"hsi_spectral: in_bands and bands_per_token must be >= 1, got {in_bands}, "
                             f"{bands_per_token}")
        self.in_bands = in_bands
        self.bands_per_token = bands_per_token
        self.num_tokens = math.ceil(in_bands / bands_per_token)
        self.pad = self.num_tokens * bands_per_token - in_bands
        self.out_dim = dim
        # W in R^{k x d}: with k = 1 exactly the paper's W in R^{1 x d}, shared by all bands.
        self.value_projection = nn.Linear(bands_per_token, dim)
        self.position_embedding = nn.Parameter(torch.zeros(1, self.num_tokens, dim))
        nn.init.trunc_normal_(self.position_embedding, std=0.02)
        layer = nn.TransformerEncoderLayer(
            dim, heads, int(dim * mlp_ratio), dropout, activation="gelu", batch_first=True, norm_first=True
        )
        # Nested tensors only help with padding masks, and norm_first disables them anyway.
        self.transformer = nn.TransformerEncoder(layer, depth, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(dim)

    def forward(self, batch: dict[str, Any]) -> Tokens:
        x = check_tensor(batch, "spectrum", shape=("B", self.in_bands))
        x = x.to(self.value_projection.weight.dtype)
        if self.pad:
            x = F.pad(x, (0, self.pad))
        groups = x.reshape(x.shape[0], self.num_tokens, self.bands_per_token)
        tokens = self.value_projection(groups) + self.position_embedding
        tokens = self.norm(self.transformer(tokens))
        return Tokens.dense(tokens)

    def extra_repr(self) -> str:
        return (f"in_bands={self.in_bands}, bands_per_token={self.bands_per_token}, "
                f"num_tokens={self.num_tokens}, pad={self.pad}")
