"""Linear regression head with a parameter-free "unscale" (the inverse of the data standardisation).

The linear layer predicts standardised targets; the loss is taken there (so every output dimension
weighs alike), and predictions are mapped back to data units by ``y = z * std + mean`` with the
dataset's statistics held as buffers (saved with the checkpoint, never trained).
"""
from __future__ import annotations

import math
import numbers
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from allspark.registry import HEADS
from allspark.sizing import as_int_list, from_data
from allspark.types import LLMOutput, Output, pooled_size


@HEADS.register("regression")
class RegressionHead(nn.Module):
    """Pooled hidden state -> ``out_shape`` targets.

    ``target_mean`` / ``target_std`` come from the dataset info (keys of the same names) unless given;
    they broadcast against ``out_shape``, which defaults to the info's ``target_shape``. When the batch holds ``<target_key>_mask`` (True = observed),
    only observed targets enter the loss (for example the zero readings of traffic sensors).
    """

    def __init__(
        self,
        hidden_size: int,
        out_shape: int | Sequence[int] | None = None,
        *,
        info: dict[str, Any] | None = None,
        target_mean: float | list | None = None,
        target_std: float | list | None = None,
        pooling: str = "last",
        target_key: str = "target",
        loss: str = "mse",
    ) -> None:
        super().__init__()
        info = info or {}
        # unset: the reader's target shape (info ``target_shape``, e.g. [horizon, number of sensors]); set:
        # checked against it. A bare number is a shape of one dimension.
        shape = from_data("regression head", "out_shape", out_shape, info, "target_shape", where="model.head.args",
                          found="gives targets of shape {}",
                          convert=lambda v: as_int_list([v] if isinstance(v, numbers.Real) else v))
        self.out_shape = tuple(shape)
        if not self.out_shape or min(self.out_shape) < 1:
            raise ValueError(f"regression head: out_shape must list sizes >= 1, got {list(self.out_shape)}")
        mean = target_mean if target_mean is not None else info.get("target_mean", 0.0)
        std = target_std if target_std is not None else info.get("target_std", 1.0)
        mean_t = torch.as_tensor(mean, dtype=torch.float32)
        std_t = torch.as_tensor(std, dtype=torch.float32)
        if not torch.isfinite(std_t).all() or (std_t <= 0).any():
            raise ValueError(f"regression head: target_std must be finite and positive, got {std}")
        torch.broadcast_shapes(mean_t.shape, self.out_shape)
        torch.broadcast_shapes(std_t.shape, self.out_shape)
        self.register_buffer("target_mean", mean_t)
        self.register_buffer("target_std", std_t)
        if loss not in ("mse", "l1", "huber"):
            raise ValueError(f"regression head: loss must be 'mse', 'l1' or 'huber', got {loss!r}")
        self.loss_name = loss
        self.pooling = pooling
        self.target_key = target_key
        size = pooled_size(pooling, hidden_size)
        self.norm = nn.LayerNorm(size)
        self.linear = nn.Linear(size, math.prod(self.out_shape))

    def unscale(self, z: torch.Tensor) -> torch.Tensor:
        return z * self.target_std + self.target_mean

    def scale(self, y: torch.Tensor) -> torch.Tensor:
        return (y - self.target_mean) / self.target_std

    def forward(self, llm_out: LLMOutput, batch: dict[str, Any]) -> Output:
        pooled = self.norm(llm_out.pool(self.pooling).float())
        z = self.linear(pooled).view(-1, *self.out_shape)
        loss = None
        target = batch.get(self.target_key)
        if target is not None:
            if target.shape[1:] != self.out_shape:
                raise ValueError(
                    f"batch[{self.target_key!r}]: expected shape [*, {', '.join(map(str, self.out_shape))}],"
                    f" got {list(target.shape)}"
                )
            err = z - self.scale(target.float())
            fn = {"mse": lambda e: e.square(), "l1": lambda e: e.abs(),
                  "huber": lambda e: F.huber_loss(e, torch.zeros_like(e), reduction="none")}[self.loss_name]
            per = fn(err)
            mask = batch.get(f"{self.target_key}_mask")
            if mask is not None:
                mask = mask.to(per.dtype)
                loss = (per * mask).sum() / mask.sum().clamp_min(1.0)
            else:
                loss = per.mean()
        return Output(loss, {"pred": self.unscale(z)})
