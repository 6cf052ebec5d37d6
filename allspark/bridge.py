"""The Modal2Language bridge (AllSpark eq. 4; the Lynx resampler).

``N`` learnable queries of the language model's width ``D`` attend to the modality tokens through
``depth`` layers of [cross-attention, feed-forward], each pre-LayerNorm with a residual, then a final
LayerNorm. Keys and values come from the modality tokens only (Lynx; unlike Flamingo's resampler the
queries are not appended to the keys), so the bridge output is a function of the modality alone.
Several encoders feed one bridge: their token sets are brought to a common width, tagged with a learned
modality embedding, and concatenated; the padding mask travels with them.

The bridge is two parts: the input side (:class:`BridgeInputs`: per encoder a projection to the bridge's token
width, identity where the widths agree, and the modality embeddings), which belongs to a task's encoders, and the
resampler (the queries, layers and final norm, :meth:`ModalBridge.resample`), which several tasks can share
(``model.bridge.shared`` of a joint config): each task then enters the one :class:`ModalBridge` through its own
:class:`SharedBridgeEntry`.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from allspark.types import Tokens

__all__ = ["CrossAttention", "BridgeLayer", "BridgeInputs", "ModalBridge", "SharedBridgeEntry"]


class CrossAttention(nn.Module):
    """Multi-head attention of queries [B, N, D] over tokens [B, n, d] with a key padding mask."""

    def __init__(self, query_dim: int, token_dim: int, heads: int, dim_head: int, dropout: float = 0.0):
        super().__init__()
        inner = heads * dim_head
        self.heads = heads
        self.dropout = dropout
        self.to_q = nn.Linear(query_dim, inner, bias=False)
        self.to_kv = nn.Linear(token_dim, 2 * inner, bias=False)
        self.to_out = nn.Linear(inner, query_dim, bias=False)

    def forward(self, queries: torch.Tensor, tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        b, n_q, _ = queries.shape
        q = self.to_q(queries).view(b, n_q, self.heads, -1).transpose(1, 2)
        k, v = self.to_kv(tokens).view(b, tokens.shape[1], 2, self.heads, -1).permute(2, 0, 3, 1, 4)
        # mask [B, n] (True = real token) -> boolean attention mask [B, 1, 1, n] (True = may attend)
        attn_mask = mask[:, None, None, :]
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=attn_mask, dropout_p=self.dropout if self.training else 0.0
        )
        return self.to_out(out.transpose(1, 2).reshape(b, n_q, -1))


class BridgeLayer(nn.Module):
    def __init__(self, dim: int, token_dim: int, heads: int, dim_head: int, ff_mult: int, dropout: float):
        super().__init__()
        self.norm_q = nn.LayerNorm(dim)
        self.norm_tokens = nn.LayerNorm(token_dim)
        self.attn = CrossAttention(dim, token_dim, heads, dim_head, dropout)
        self.norm_ff = nn.LayerNorm(dim)
        self.ff = nn.Sequential(
            nn.Linear(dim, ff_mult * dim), nn.GELU(), nn.Dropout(dropout), nn.Linear(ff_mult * dim, dim)
        )

    def forward(self, x: torch.Tensor, tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm_q(x), self.norm_tokens(tokens), mask)
        return x + self.ff(self.norm_ff(x))


class BridgeInputs(nn.Module):
    """The input side of a bridge: each encoder's tokens projected to the bridge's token width ``width`` (an
    identity where an encoder already has it) and, with several encoders, tagged with a learned modality
    embedding; :meth:`merge` concatenates them, masks included."""

    def __init__(self, token_dims: list[int], width: int) -> None:
        super().__init__()
        bad = [d for d in token_dims if not (isinstance(d, int) and d >= 1)]
        if bad or not isinstance(width, int) or width < 1:
            raise ValueError(f"bridge: token widths must be positive ints, got encoder widths {token_dims} and "
                             f"bridge width {width!r}")
        self.token_dim = width
        self.input_proj = nn.ModuleList(nn.Identity() if d == width else nn.Linear(d, width) for d in token_dims)
        self.modality_embed = nn.Parameter(torch.zeros(len(token_dims), width)) if len(token_dims) > 1 else None
        if self.modality_embed is not None:
            nn.init.normal_(self.modality_embed, std=0.02)

    def merge(self, token_sets: list[Tokens]) -> Tokens:
        """Concatenate the encoders' token sets (projected, with their modality embedding)."""
        if len(token_sets) != len(self.input_proj):
            raise ValueError(f"bridge expects {len(self.input_proj)} token set(s), got {len(token_sets)}")
        tokens, masks = [], []
        for i, (proj, ts) in enumerate(zip(self.input_proj, token_sets)):
            t = proj(ts.tokens)
            if self.modality_embed is not None:
                t = t + self.modality_embed[i]
            tokens.append(t)
            masks.append(ts.mask)
        return Tokens(torch.cat(tokens, dim=1), torch.cat(masks, dim=1))


class ModalBridge(BridgeInputs):
    """Map one or several token sets to ``num_queries`` tokens of the language model's width.

    Args:
        token_dims: output width of each encoder, in the order their tokens are concatenated (empty for a
            bridge that tasks share, each entering it through a :class:`SharedBridgeEntry`).
        dim: the language model's hidden size ``D``.
        width: the token width the layers attend over (default: the widest encoder's; required when
            ``token_dims`` is empty). Narrower encoders are projected up to it.
    """

    def __init__(
        self,
        token_dims: list[int],
        dim: int,
        *,
        width: int | None = None,
        num_queries: int = 32,
        depth: int = 3,
        heads: int = 8,
        dim_head: int | None = None,
        ff_mult: int = 4,
        dropout: float = 0.0,
        output_scale: float = 1.0,
    ) -> None:
        if not token_dims and width is None:
            raise ValueError("ModalBridge needs at least one encoder's tokens (or, for a shared bridge, its width)")
        if dim_head is None:
            if dim % heads:
                raise ValueError(f"bridge: dim {dim} is not divisible by heads {heads}; set bridge.dim_head")
            dim_head = dim // heads
        token_dim = max(token_dims) if width is None else width
        super().__init__(list(token_dims), token_dim)
        self.queries = nn.Parameter(torch.randn(num_queries, dim) * dim**-0.5)
        self.layers = nn.ModuleList(
            BridgeLayer(dim, token_dim, heads, dim_head, ff_mult, dropout) for _ in range(depth)
        )
        self.norm = nn.LayerNorm(dim)
        # The final LayerNorm's gain starts at ``output_scale`` (1 in Lynx). ``model.bridge.output_scale:
        # embedding`` passes the RMS of the language model's token embeddings, so bridge tokens enter the
        # LLM on the scale of its word embeddings (a unit-variance output is ~7x SmolLM2's embeddings).
        nn.init.constant_(self.norm.weight, output_scale)

    @property
    def num_queries(self) -> int:
        return self.queries.shape[0]

    def resample(self, merged: Tokens) -> torch.Tensor:
        """Merged tokens [B, n, width] (their mask honoured) -> bridge tokens [B, N, D]."""
        if merged.tokens.shape[-1] != self.token_dim:
            raise ValueError(f"bridge: expected tokens of width {self.token_dim}, got {merged.tokens.shape[-1]}")
        if not merged.mask.any(dim=1).all():
            raise ValueError("bridge: a sample has no real modality token (its mask is all False)")
        x = self.queries.unsqueeze(0).expand(merged.tokens.shape[0], -1, -1)
        for layer in self.layers:
            x = layer(x, merged.tokens, merged.mask)
        return self.norm(x)

    def forward(self, token_sets: list[Tokens]) -> torch.Tensor:
        return self.resample(self.merge(token_sets))


class SharedBridgeEntry(BridgeInputs):
    """One task's way into a :class:`ModalBridge` that several tasks share: its own input side (projections of
    its encoders' widths to the shared bridge's width, and its modality embeddings), then the shared queries
    and layers. The shared bridge is reached, not registered: its owner (the multi-task model) registers and
    saves it once, and this module's parameters are the task's alone."""

    def __init__(self, token_dims: list[int], shared: ModalBridge) -> None:
        if not token_dims:
            raise ValueError("SharedBridgeEntry needs at least one encoder's tokens")
        super().__init__(list(token_dims), shared.token_dim)
        self.__dict__["shared"] = shared  # outside _modules: not a parameter of the task

    @property
    def num_queries(self) -> int:
        return self.shared.num_queries

    def forward(self, token_sets: list[Tokens]) -> torch.Tensor:
        return self.shared.resample(self.merge(token_sets))
