"""The small typed values that pass between the stages of the one data path."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

__all__ = ["Tokens", "LMPrefix", "LLMOutput", "Output", "check_tensor", "pooled_size"]


@dataclass
class Tokens:
    """What an encoder returns: ``tokens[B, n, d]`` and ``mask[B, n]`` (True = a real token)."""

    tokens: torch.Tensor
    mask: torch.Tensor

    def __post_init__(self) -> None:
        if self.tokens.dim() != 3:
            raise ValueError(f"Tokens.tokens must be [B, n, d], got shape {tuple(self.tokens.shape)}")
        if self.mask.shape != self.tokens.shape[:2]:
            raise ValueError(
                f"Tokens.mask must be [B, n] = {tuple(self.tokens.shape[:2])}, got {tuple(self.mask.shape)}"
            )
        if self.mask.dtype != torch.bool:
            raise ValueError(f"Tokens.mask must be bool, got {self.mask.dtype}")

    def mean(self) -> torch.Tensor:
        """Mean over the real (mask) positions -> [B, d] (zeros for a row with none)."""
        mask = self.mask.unsqueeze(-1).to(self.tokens.dtype)
        return (self.tokens * mask).sum(1) / mask.sum(1).clamp_min(1.0)

    @classmethod
    def dense(cls, tokens: torch.Tensor) -> "Tokens":
        """Tokens with no padding."""
        return cls(tokens, torch.ones(tokens.shape[:2], dtype=torch.bool, device=tokens.device))


@dataclass
class LMPrefix:
    """The sequence the language model ran, as a prefix that a head continues with tokens of its own (the
    verbalizer's class names): what a decoder call on ``[prefix | new tokens]`` needs.

    ``embeds`` [B, L, D] are the ``inputs_embeds`` of the whole sequence (prompt and bridge tokens, pads included),
    ``attention_mask`` [B, L] (bool) and ``position_ids`` [B, L] as the decoder ran them; ``last_index[b]`` is the
    index in ``embeds`` of row ``b``'s last real token (whose hidden state predicts the first new token) and
    ``next_position[b]`` the position id of the first new token. ``cache`` is the decoder's key/value cache over
    those L positions (a ``transformers`` cache), or None where none could be kept (gradient checkpointing in
    training re-runs the layers without one): a continuation then runs a full forward over ``[embeds | new]``.
    """

    embeds: torch.Tensor
    attention_mask: torch.Tensor
    position_ids: torch.Tensor
    last_index: torch.Tensor
    next_position: torch.Tensor
    cache: Any | None = None


@dataclass
class LLMOutput:
    """The language model's last hidden states over ``[modality tokens | prompt tokens | pad]``
    (``model.sequence: modality_first``, the paper's order) or ``[prompt tokens | pad | modality tokens]``
    (``prompt_first``).

    ``last_index[b]`` is the position of the last real token of row ``b`` (the last prompt token, or with
    ``prompt_first`` the last bridge token); ``num_modality_tokens`` is the number of bridge tokens, which occupy
    positions ``modality_start .. modality_start + num_modality_tokens - 1`` of every row (``modality_start`` is 0
    for ``modality_first``, the padded prompt width for ``prompt_first``, and 0 again for the cached evaluation
    forward of ``prompt_first``, whose ``hidden`` holds the bridge positions only: the prompt's states come from
    the cache); ``modality_input`` the bridge tokens ``s_i`` as they entered the language model ([B, N, D]; None
    when the task has none).
    """

    hidden: torch.Tensor
    attention_mask: torch.Tensor
    last_index: torch.Tensor
    num_modality_tokens: int
    modality_input: torch.Tensor | None = field(default=None, kw_only=True)
    modality_start: int = field(default=0, kw_only=True)
    #: the sequence as a prefix to continue (its key/value cache): set only for a head that declares
    #: ``needs_prefix_cache = True`` (see :class:`LMPrefix`)
    prefix: LMPrefix | None = field(default=None, kw_only=True)

    def pool(self, mode: str = "last") -> torch.Tensor:
        """``last``: hidden state of the last real token (``last_index``); ``mean``: mean of the hidden states
        over the modality tokens; ``bridge``: mean of the bridge tokens *entering* the language model (a skip path
        around it). ``a+b`` concatenates several along the feature axis (size: see :func:`pooled_size`)."""
        if "+" in mode:
            return torch.cat([self.pool(m) for m in mode.split("+")], dim=-1)
        if mode == "last":
            rows = torch.arange(self.hidden.shape[0], device=self.hidden.device)
            return self.hidden[rows, self.last_index]
        if mode in ("mean", "bridge"):
            if self.num_modality_tokens == 0:
                raise ValueError(f"{mode!r} pooling needs modality tokens; this task has none (use 'last')")
            if mode == "mean":
                start = self.modality_start
                return self.hidden[:, start: start + self.num_modality_tokens].mean(dim=1)
            if self.modality_input is None:
                raise ValueError("'bridge' pooling needs LLMOutput.modality_input (the bridge tokens)")
            return self.modality_input.mean(dim=1).to(self.hidden.dtype)
        raise ValueError(f"unknown pooling {mode!r}; expected 'last', 'mean', 'bridge' or a '+' combination")


def pooled_size(mode: str, hidden_size: int) -> int:
    """Feature size of :meth:`LLMOutput.pool` with ``mode`` (checked) for a model of ``hidden_size``."""
    parts = mode.split("+")
    bad = [m for m in parts if m not in ("last", "mean", "bridge")]
    if bad or len(set(parts)) != len(parts):
        raise ValueError(f"unknown pooling {mode!r}; expected 'last', 'mean', 'bridge' or a '+' combination of "
                         "distinct ones")
    return hidden_size * len(parts)


@dataclass
class Output:
    """What a head returns. ``predictions`` holds tensors with the batch as first dimension."""

    loss: torch.Tensor | None
    predictions: dict[str, torch.Tensor] = field(default_factory=dict)
    extras: dict[str, Any] = field(default_factory=dict)


def check_tensor(
    batch: dict[str, Any],
    key: str,
    *,
    shape: tuple[int | str | None, ...],
    floating: bool = True,
    finite: bool = True,
) -> torch.Tensor:
    """Validate ``batch[key]`` and return it.

    ``shape`` lists the expected sizes; ``None`` or a string (a name such as ``"B"``) accepts any size.
    Raises ``ValueError`` naming the key, the expected and the actual shape (or dtype, or the bad values).
    """
    if key not in batch:
        raise ValueError(f"batch is missing key {key!r}; it has {sorted(batch)}")
    x = batch[key]
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"batch[{key!r}] must be a torch.Tensor, got {type(x).__name__}")
    want = "[" + ", ".join("*" if s is None else str(s) for s in shape) + "]"
    if x.dim() != len(shape) or any(
        isinstance(s, int) and s != actual for s, actual in zip(shape, x.shape)
    ):
        raise ValueError(f"batch[{key!r}]: expected shape {want}, got {list(x.shape)}")
    if floating and not x.is_floating_point():
        raise ValueError(f"batch[{key!r}]: expected a floating-point tensor, got {x.dtype}")
    if finite and x.is_floating_point() and not torch.isfinite(x).all():
        bad = (~torch.isfinite(x)).sum().item()
        raise ValueError(f"batch[{key!r}]: {bad} value(s) are NaN or infinite")
    return x
