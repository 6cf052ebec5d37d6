"""Regression metrics for the table, trajectory and graph modalities.

- ``regression``: RMSE, MAE, R2 (torchmetrics), for scalar targets such as PM2.5.
- ``masked_regression``: MAE, RMSE, MAPE over the observed entries only. Traffic sensors write 0 when
  they have no reading, so a 0 target is a missing value, not a speed (the convention of DCRNN and
  STAEformer); these metrics are written by hand because torchmetrics has no masked variant.
- ``displacement``: ADE / FDE of trajectories; with K samples per track the best-of-K values.
"""
from __future__ import annotations

from typing import Any

import torch
from torchmetrics.functional import mean_absolute_error, mean_squared_error, r2_score

from allspark.registry import METRICS

__all__ = ["regression_metrics", "masked_regression_metrics", "displacement_errors"]


def _as_float(x: Any) -> torch.Tensor:
    return torch.as_tensor(x).double()


@METRICS.register("regression")
def regression_metrics(pred: Any, target: Any) -> dict[str, float]:
    """RMSE, MAE and R2 over every element of ``pred`` / ``target`` (same shape)."""
    pred, target = _as_float(pred).flatten(), _as_float(target).flatten()
    if pred.shape != target.shape:
        raise ValueError(f"pred and target differ in size: {pred.numel()} vs {target.numel()}")
    if target.numel() < 2:
        raise ValueError("regression metrics need at least two samples (R2 is undefined for one)")
    return {
        "RMSE": mean_squared_error(pred, target, squared=False).item(),
        "MAE": mean_absolute_error(pred, target).item(),
        "R2": r2_score(pred, target).item(),
    }


@METRICS.register("masked_regression")
def masked_regression_metrics(pred: Any, target: Any, mask: Any | None = None,
                              null_value: float | None = 0.0) -> dict[str, float]:
    """MAE, RMSE and MAPE (in percent) over the entries where ``mask`` is True.

    Without ``mask``, entries whose target equals ``null_value`` (0 for traffic speeds) or is NaN are
    treated as missing. When both are given, an entry counts only if the mask is True and the target is
    not the null value (MAPE is undefined at a zero target).
    """
    pred, target = _as_float(pred), _as_float(target)
    if pred.shape != target.shape:
        raise ValueError(f"pred and target differ in shape: {list(pred.shape)} vs {list(target.shape)}")
    keep = ~torch.isnan(target)
    if null_value is not None:
        keep &= ~torch.isclose(target, torch.tensor(float(null_value), dtype=target.dtype))
    if mask is not None:
        mask = torch.as_tensor(mask).bool()
        if mask.shape != target.shape:
            raise ValueError(f"mask and target differ in shape: {list(mask.shape)} vs {list(target.shape)}")
        keep &= mask
    n = int(keep.sum())
    if n == 0:
        return {"MAE": float("nan"), "RMSE": float("nan"), "MAPE": float("nan"), "num_observed": 0}
    err = (pred - target)[keep]
    return {
        "MAE": err.abs().mean().item(),
        "RMSE": err.square().mean().sqrt().item(),
        "MAPE": (err.abs() / target[keep].abs()).mean().item() * 100.0,
        "num_observed": n,
    }


@METRICS.register("displacement")
def displacement_errors(pred: Any, target: Any) -> dict[str, float]:
    """Average and final displacement error (L2, in the data's units).

    ``pred`` is ``[n, T, 2]`` (one prediction per track) or ``[n, K, T, 2]`` (K samples: for each track
    the sample with the lowest ADE gives its ADE, and the sample with the lowest FDE its FDE -- the
    best-of-K protocol of Social-GAN and TUTR). ``target`` is ``[n, T, 2]``.
    """
    pred, target = _as_float(pred), _as_float(target)
    if target.dim() != 3 or target.shape[-1] != 2:
        raise ValueError(f"target must be [n, T, 2], got {list(target.shape)}")
    if pred.dim() == 3:
        pred = pred[:, None]
    if pred.dim() != 4 or pred.shape[0] != target.shape[0] or pred.shape[2:] != target.shape[1:]:
        raise ValueError(f"pred must be [n, T, 2] or [n, K, T, 2] matching target {list(target.shape)}, "
                         f"got {list(pred.shape)}")
    dist = (pred - target[:, None]).norm(dim=-1)  # [n, K, T]
    ade = dist.mean(dim=-1).min(dim=1).values
    fde = dist[..., -1].min(dim=1).values
    return {"ADE": ade.mean().item(), "FDE": fde.mean().item(), "num_tracks": int(target.shape[0])}
