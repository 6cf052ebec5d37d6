"""Table encoder after TabFormer (AllSpark III-C "Table": f(m) = Enc_1(Emb(m))).

Each field of a row becomes one token:
- a discrete column goes through its own ``nn.Embedding`` (index 0 is that column's "missing" entry);
- a continuous column goes through its own value projection ``x * w_c + b_c`` (a per-column linear map of
  the standardised value), chosen over TabFormer's quantile bins because it keeps the order and scale of
  the values and needs no bin edges fitted to the data; a missing value is replaced by a learned
  per-column "missing" vector instead of being imputed;
- a learned field embedding says which column a token is; then one transformer encoder layer mixes the
  fields. The field tokens go to the bridge.
"""
from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import nn

from allspark.registry import ENCODERS
from allspark.sizing import as_int_list, from_data
from allspark.types import Tokens, check_tensor


@ENCODERS.register("tabformer")
class TabularFieldEncoder(nn.Module):
    input_keys = ("cat", "num", "num_mask")

    def __init__(self, info: dict[str, Any] | None = None, *, cat_cardinalities: Sequence[int] | None = None,
                 num_features: int | None = None, dim: int = 64, depth: int = 1, heads: int = 4,
                 ff_mult: int = 2, dropout: float = 0.1) -> None:
        super().__init__()
        info = info or {}
        # unset: the dataset's columns (info ``cat_cardinalities``, ``num_columns``); a kind of column neither
        # the config nor the info names is absent; set: checked against the info
        cards = [] if cat_cardinalities is None and "cat_cardinalities" not in info else from_data(
            "tabformer", "cat_cardinalities", cat_cardinalities, info, "cat_cardinalities",
            found="has discrete columns of cardinalities {}", convert=as_int_list)
        # the info lists the continuous columns by name; their count sizes the encoder
        counted = {"num_columns": len(info["num_columns"])} if info.get("num_columns") is not None else {}
        n_num = 0 if num_features is None and not counted else from_data(
            "tabformer", "num_features", num_features, counted, "num_columns", found="has {} continuous columns")
        if not cards and not n_num:
            raise ValueError("tabformer: no columns; give cat_cardinalities/num_features or a dataset info "
                             "with 'cat_cardinalities' and 'num_columns'")
        self.cat_cardinalities = cards
        self.num_features = n_num
        self.out_dim = dim
        self.cat_embeddings = nn.ModuleList(nn.Embedding(c, dim) for c in cards)
        self.num_weight = nn.Parameter(torch.randn(n_num, dim) * 0.02)
        self.num_bias = nn.Parameter(torch.zeros(n_num, dim))
        self.num_missing = nn.Parameter(torch.randn(n_num, dim) * 0.02)
        self.field_embedding = nn.Parameter(torch.randn(len(cards) + n_num, dim) * 0.02)
        layer = nn.TransformerEncoderLayer(dim, heads, dim * ff_mult, dropout, batch_first=True, norm_first=True)
        self.transformer = nn.TransformerEncoder(layer, depth, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(dim)

    def forward(self, batch: dict[str, Any]) -> Tokens:
        fields = []
        if self.cat_cardinalities:
            cat = check_tensor(batch, "cat", shape=("B", len(self.cat_cardinalities)), floating=False)
            if cat.is_floating_point():
                raise ValueError(f"batch['cat']: expected integer category indices, got {cat.dtype}")
            too_big = cat >= torch.tensor(self.cat_cardinalities, device=cat.device)
            if (cat < 0).any() or too_big.any():
                raise ValueError(f"batch['cat']: indices must lie in [0, cardinality) per column "
                                 f"{self.cat_cardinalities}")
            fields.append(torch.stack([emb(cat[:, j]) for j, emb in enumerate(self.cat_embeddings)], dim=1))
        if self.num_features:
            num = check_tensor(batch, "num", shape=("B", self.num_features))
            mask = batch.get("num_mask")
            if mask is None:
                mask = torch.ones_like(num, dtype=torch.bool)
            elif mask.shape != num.shape or mask.dtype != torch.bool:
                raise ValueError(f"batch['num_mask']: expected bool of shape {list(num.shape)}, "
                                 f"got {mask.dtype} {list(mask.shape)}")
            values = num[..., None] * self.num_weight + self.num_bias
            fields.append(torch.where(mask[..., None], values, self.num_missing.expand_as(values)))
        x = torch.cat(fields, dim=1) + self.field_embedding
        return Tokens.dense(self.norm(self.transformer(x)))
