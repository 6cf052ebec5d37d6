"""The interface shared by the correlation objectives."""
from __future__ import annotations

from itertools import combinations
from typing import Any, Callable, Sequence

import torch
from torch import nn

__all__ = ["CorrelationObjective", "build_objective", "pairwise_sum", "check_pair", "centre"]


def check_pair(f: torch.Tensor, g: torch.Tensor, name: str, *, same_dim: bool = True, min_batch: int = 2) -> None:
    """Validate paired features ``f``, ``g`` of shape [B, d] (clear ``ValueError`` otherwise)."""
    for label, x in (("f", f), ("g", g)):
        if not isinstance(x, torch.Tensor) or x.dim() != 2:
            shape = list(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"{name}: {label} must be a [B, d] tensor, got {shape}")
        if not x.is_floating_point():
            raise ValueError(f"{name}: {label} must be floating point, got {x.dtype}")
    if f.shape[0] != g.shape[0]:
        raise ValueError(f"{name}: f and g must pair the same samples, got batch sizes {f.shape[0]} and {g.shape[0]}")
    if same_dim and f.shape[1] != g.shape[1]:
        raise ValueError(f"{name}: f and g must have the same width, got {f.shape[1]} and {g.shape[1]}")
    if f.shape[0] < min_batch:
        raise ValueError(f"{name}: needs a batch of at least {min_batch} samples to estimate (co)variances, "
                         f"got {f.shape[0]}")


def centre(x: torch.Tensor) -> torch.Tensor:
    """Batch-centred features ``x - mean_b x``."""
    return x - x.mean(dim=0, keepdim=True)


def pairwise_sum(features: Sequence[torch.Tensor], pair: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """``sum_{i<j} pair(features[i], features[j])``."""
    if len(features) < 2:
        raise ValueError(f"a correlation objective needs at least two views, got {len(features)}")
    return torch.stack([pair(a, b) for a, b in combinations(features, 2)]).sum()


class CorrelationObjective(nn.Module):
    """Base class: subclasses implement :meth:`pair` (the score of two views, higher = more correlated).

    ``forward(*features)`` is the sum of :meth:`pair` over all pairs of views; :meth:`loss` its negative.
    """

    name: str = "objective"

    def pair(self, f: torch.Tensor, g: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def forward(self, *features: torch.Tensor) -> torch.Tensor:
        if len(features) == 1 and isinstance(features[0], (list, tuple)):
            features = tuple(features[0])
        return pairwise_sum(features, self.pair)

    def loss(self, *features: torch.Tensor) -> torch.Tensor:
        return -self(*features)


def build_objective(spec: str | dict[str, Any]) -> CorrelationObjective:
    """Build a registered objective from a name or ``{"type": name, **args}``."""
    from allspark.registry import OBJECTIVES

    import allspark.objectives  # noqa: F401  (registers the built-ins)

    return OBJECTIVES.build(spec)
