"""Trajectory baseline: constant velocity (the last observed step repeated), the first method a reviewer of a
pedestrian-forecasting model asks for; it needs no fitting."""
from __future__ import annotations

from typing import Any

import numpy as np

from allspark.baselines import Baseline, split_arrays
from allspark.registry import BASELINES

__all__ = ["ConstantVelocityBaseline"]


@BASELINES.register("constant_velocity")
class ConstantVelocityBaseline(Baseline):
    def __init__(self, info: dict[str, Any], obs_key: str = "obs") -> None:
        super().__init__(info)
        self.obs_key = obs_key

    def fit(self, train_set, model=None) -> None:
        """Nothing to fit: the forecast depends on the observed track alone."""

    def predict(self, dataset, model=None) -> dict[str, np.ndarray]:
        from allspark.evaluation.regression import constant_velocity

        data = split_arrays(dataset, [self.obs_key, self.target_key])
        return {"pred": constant_velocity(data[self.obs_key], data[self.target_key].shape[1])}
