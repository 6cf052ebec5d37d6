"""Graph (sensor network) encoder after STAEformer (AllSpark III-C "Graph").

STAEformer's embedding layer: an input projection of each reading, a time-of-day embedding, a
day-of-week embedding and an adaptive spatio-temporal embedding (a free parameter per input step and
node) are concatenated per (step, node). Here each node then becomes one token: its T_in embedded steps
are flattened and projected (STAEformer's output projection is likewise per node over the flattened
time axis), and ``graph_layers`` GCN layers (torch-geometric ``GCNConv`` over the sensor graph's edge
index from the dataset info, weighted by the adjacency) mix neighbouring sensors with a residual.
Node tokens -- one per sensor -- go to the bridge.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from allspark.registry import ENCODERS
from allspark.sizing import from_data
from allspark.types import Tokens, check_tensor


@ENCODERS.register("staeformer")
class SpatioTemporalEmbeddingEncoder(nn.Module):
    input_keys = ("x", "tod", "dow")

    def __init__(self, info: dict[str, Any] | None = None, *, num_nodes: int | None = None,
                 input_len: int | None = None, steps_per_day: int | None = None, input_dim: int = 1,
                 input_embedding_dim: int = 24, tod_embedding_dim: int = 24, dow_embedding_dim: int = 24,
                 adaptive_embedding_dim: int = 80, dim: int = 128, graph_layers: int = 1,
                 dropout: float = 0.1) -> None:
        super().__init__()
        info = info or {}
        # unset: the dataset's sensor count, input window and sampling (info ``num_nodes``, ``input_len``,
        # ``steps_per_day``); set: checked against them
        self.num_nodes = from_data("staeformer", "num_nodes", num_nodes, info, "num_nodes", found="has {} sensors")
        self.input_len = from_data("staeformer", "input_len", input_len, info, "input_len",
                                   found="gives {} input steps")
        self.steps_per_day = from_data("staeformer", "steps_per_day", steps_per_day, info, "steps_per_day",
                                       found="records {} steps per day")
        for name, value in (("num_nodes", self.num_nodes), ("input_len", self.input_len),
                            ("steps_per_day", self.steps_per_day)):
            if value < 1:
                raise ValueError(f"staeformer: {name} must be >= 1, got {value}")
        self.input_dim = input_dim
        self.out_dim = dim
        self.input_proj = nn.Linear(input_dim, input_embedding_dim)
        self.tod_embedding = nn.Embedding(self.steps_per_day, tod_embedding_dim) if tod_embedding_dim else None
        self.dow_embedding = nn.Embedding(7, dow_embedding_dim) if dow_embedding_dim else None
        self.adaptive_embedding = nn.Parameter(torch.empty(self.input_len, self.num_nodes, adaptive_embedding_dim))
        nn.init.xavier_uniform_(self.adaptive_embedding)
        model_dim = input_embedding_dim + tod_embedding_dim + dow_embedding_dim + adaptive_embedding_dim
        self.node_proj = nn.Sequential(nn.Linear(self.input_len * model_dim, dim), nn.GELU(), nn.Dropout(dropout),
                                       nn.Linear(dim, dim))
        edge_index = info.get("edge_index")
        if graph_layers and edge_index is None:
            raise ValueError("staeformer: graph_layers > 0 needs 'edge_index' in the dataset info (or graph_layers=0)")
        self.graph_layers = nn.ModuleList()
        if graph_layers:
            from torch_geometric.nn import GCNConv

            ei = torch.as_tensor(edge_index, dtype=torch.long).reshape(2, -1)
            ew = torch.as_tensor(info.get("edge_weight", [1.0] * ei.shape[1]), dtype=torch.float32)
            if ei.numel() and int(ei.max()) >= self.num_nodes:
                raise ValueError(f"staeformer: edge_index refers to node {int(ei.max())} of {self.num_nodes}")
            # buffers, not saved: they are rebuilt from the dataset info with the model
            self.register_buffer("edge_index", ei, persistent=False)
            self.register_buffer("edge_weight", ew, persistent=False)
            self.graph_layers.extend(GCNConv(dim, dim) for _ in range(graph_layers))
            self.graph_norms = nn.ModuleList(nn.LayerNorm(dim) for _ in range(graph_layers))
        self.norm = nn.LayerNorm(dim)

    def _batched_graph(self, b: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The sensor graph repeated ``b`` times as one disjoint graph (torch-geometric's batching)."""
        key = (b, self.edge_index.device)
        if getattr(self, "_graph_cache", (None,))[0] != key:
            from torch_geometric.data import Batch, Data

            graph = Batch.from_data_list([Data(edge_index=self.edge_index, num_nodes=self.num_nodes)] * b)
            self._graph_cache = (key, graph.edge_index, self.edge_weight.repeat(b))
        return self._graph_cache[1], self._graph_cache[2]

    def forward(self, batch: dict[str, Any]) -> Tokens:
        x = check_tensor(batch, "x", shape=("B", self.input_len, self.num_nodes, self.input_dim))
        b = x.shape[0]
        parts = [self.input_proj(x)]
        for key, emb, size in (("tod", self.tod_embedding, self.steps_per_day), ("dow", self.dow_embedding, 7)):
            if emb is None:
                continue
            idx = check_tensor(batch, key, shape=(b, self.input_len), floating=False)
            if idx.is_floating_point() or (idx < 0).any() or (idx >= size).any():
                raise ValueError(f"batch[{key!r}]: expected integer indices in [0, {size}), got {idx.dtype} "
                                 f"in [{idx.min().item()}, {idx.max().item()}]")
            parts.append(emb(idx)[:, :, None, :].expand(-1, -1, self.num_nodes, -1))
        parts.append(self.adaptive_embedding.expand(b, -1, -1, -1))
        h = torch.cat(parts, dim=-1)  # [B, T, N, model_dim]
        h = self.node_proj(h.permute(0, 2, 1, 3).reshape(b, self.num_nodes, -1))  # [B, N, dim]
        if len(self.graph_layers):
            edge_index, weight = self._batched_graph(b)
            flat = h.reshape(b * self.num_nodes, -1)
            for conv, norm in zip(self.graph_layers, self.graph_norms):
                flat = flat + conv(norm(flat), edge_index, weight)
            h = flat.reshape(b, self.num_nodes, -1)
        return Tokens.dense(self.norm(h))
