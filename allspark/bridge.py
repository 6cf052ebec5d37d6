"""The Modal2Language bridge (AllSpark eq. 4; the Lynx resampler).

``N`` learnable queries of the language model's width ``D`` attend to the modality tokens through
``depth`` layers of [cross-attention, feed-forward], each pre-LayerNorm with a residual, then a final
LayerNorm. Keys and values come from the modality tokens only (Lynx; unlike Flamingo's resampler the
queries are not appended to the keys), so the bridge output is a function of the modality alone.
Several encoders feed one bridge: their token sets are brought to a common width, tagged with a learned
modality embedding, and concatenated; the padding mask travels with them.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from allspark.types import Tokens

__all__ = ["CrossAttention", "BridgeLayer", "ModalBridge"]


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


class ModalBridge(nn.Module):
    """Map one or several token sets to ``num_queries`` tokens of the language model's width.

    Args:
        token_dims: output width of each encoder, in the order their tokens are concatenated.
        dim: the language model's hidden size ``D``.
    """

    def __init__(
        self,
        token_dims: list[int],
        dim: int,
        *,
        num_queries: int = 32,
        depth: int = 3,
        heads: int = 8,
        dim_head: int | None = None,
        ff_mult: int = 4,
        dropout: float = 0.0,
        output_scale: float = 1.0,
    ) -> None:
        super().__init__()
        if not token_dims:
            raise ValueError("ModalBridge needs at least one encoder's tokens")
        if dim_head is None:
            if dim % heads:
                raise ValueError(f"bridge: dim {dim} is not divisible by heads {heads}; set bridge.dim_head")
            dim_head = dim // heads
        token_dim = max(token_dims)
        self.token_dim = token_dim
        # Encoders narrower than the widest are projected up so the token sets can be concatenated.
        self.input_proj = nn.ModuleList(
            nn.Identity() if d == token_dim else nn.Linear(d, token_dim) for d in token_dims
        )
        self.modality_embed = (
            nn.Parameter(torch.zeros(len(token_dims), token_dim)) if len(token_dims) > 1 else None
        )
        if self.modality_embed is not None:
            nn.init.normal_(self.modality_embed, std=0.02)
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

    def forward(self, token_sets: list[Tokens]) -> torch.Tensor:
        merged = self.merge(token_sets)
        if not merged.mask.any(dim=1).all():
            raise ValueError("bridge: a sample has no real modality token (its mask is all False)")
        x = self.queries.unsqueeze(0).expand(merged.tokens.shape[0], -1, -1)
        for layer in self.layers:
            x = layer(x, merged.tokens, merged.mask)
        return self.norm(x)
