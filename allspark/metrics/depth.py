"""Depth-map metrics for oblique multi-view stereo (AllSpark Section IV-B, WHU-OMVS): PAG6 / PAG10, the
share of valid pixels whose depth error is within 0.6 m / 1.0 m, and MAE (metres) over valid pixels.

Valid pixels are those with a finite, positive ground-truth depth (and ``valid`` when a mask is given):
WHU-OMVS marks pixels without ground truth with 0 or a negative value.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from allspark.registry import METRICS

__all__ = ["depth_metrics"]


@METRICS.register("depth")
def depth_metrics(pred: np.ndarray, target: np.ndarray, valid: np.ndarray | None = None,
                  thresholds: dict[str, float] | None = None) -> dict[str, Any]:
    """``pred`` and ``target`` depth maps of equal shape (any batch layout) -> PAG6, PAG10, MAE."""
    pred, target = np.asarray(pred, np.float64), np.asarray(target, np.float64)
    if pred.shape != target.shape:
        raise ValueError(f"depth prediction {list(pred.shape)} and truth {list(target.shape)} differ in shape")
    mask = np.isfinite(target) & (target > 0)
    if valid is not None:
        mask &= np.asarray(valid, bool)
    if not mask.any():
        raise ValueError("no valid ground-truth pixel to score")
    if not np.isfinite(pred[mask]).all():
        raise ValueError("the depth prediction has NaN or infinite values at valid pixels")
    err = np.abs(pred[mask] - target[mask])
    out = {name: float((err <= t).mean()) for name, t in (thresholds or {"PAG6": 0.6, "PAG10": 1.0}).items()}
    out["MAE"] = float(err.mean())
    out["num_pixels"] = int(mask.sum())
    return out
