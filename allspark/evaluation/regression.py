"""Regression protocols for the structured modalities. Each also scores the obvious baseline on the same
split (``baseline/<metric>``), so metrics.json shows what the model adds:

- ``tabular_regression`` (table): RMSE, MAE, R2; baseline = the training mean of the target.
- ``trajectory`` (trajectory): ADE, FDE of the single prediction (and best-of-K when the head returns
  ``samples`` [B, K, T, 2], reported as ``best_of_K/ADE``...); baseline = constant velocity.
- ``traffic_forecast`` (graph): masked MAE, RMSE, MAPE (zero readings are missing) over all horizons
  and at chosen horizons (``horizon_3`` ...); baseline = the last observed value.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np

from allspark.evaluation import Evaluator, savefig
from allspark.metrics.regression import displacement_errors, masked_regression_metrics, regression_metrics
from allspark.registry import EVALUATORS

__all__ = ["TabularRegressionEvaluator", "TrajectoryEvaluator", "TrafficForecastEvaluator",
           "constant_velocity"]


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


@EVALUATORS.register("tabular_regression")
class TabularRegressionEvaluator(Evaluator):
    pred_keys = ("pred",)

    def __init__(self, info: dict[str, Any], target_key: str = "target") -> None:
        super().__init__(info)
        if "target_mean" not in info:
            raise ValueError("tabular_regression needs 'target_mean' (the training mean) in the dataset info")
        self.target_key = target_key
        self.batch_keys = (target_key, "index")

    def compute(self, gathered):
        pred, target = gathered["pred"], gathered[self.target_key]
        metrics: dict[str, Any] = dict(regression_metrics(pred, target))
        baseline = regression_metrics(np.full_like(target, float(self.info["target_mean"])), target)
        metrics.update({f"baseline/{k}": v for k, v in baseline.items()})
        metrics["num_samples"] = int(target.shape[0])
        return metrics

    def figures(self, gathered, metrics, extra, out_dir):
        plt = _plt()
        pred, target = gathered["pred"].ravel(), gathered[self.target_key].ravel()
        name = self.info.get("target_name", "target")
        fig, ax = plt.subplots(figsize=(5, 5))
        ax.scatter(target, pred, s=4, alpha=0.4)
        lo, hi = float(min(target.min(), pred.min())), float(max(target.max(), pred.max()))
        ax.plot([lo, hi], [lo, hi], "k--", lw=1, label="y = x")
        ax.axhline(float(self.info["target_mean"]), color="tab:red", lw=1, label="training mean (baseline)")
        ax.set_xlabel(f"observed {name}")
        ax.set_ylabel(f"predicted {name}")
        ax.set_title(f"RMSE {metrics['RMSE']:.2f}, R2 {metrics['R2']:.3f}")
        ax.legend(loc="upper left", fontsize=8)
        savefig(fig, out_dir / "predicted_vs_observed.png")
        return [("Predicted vs observed (test split)", "predicted_vs_observed.png")]


def constant_velocity(obs: np.ndarray, horizon: int) -> np.ndarray:
    """Extrapolate the last observed step: ``obs`` [n, T_obs, 2] -> [n, horizon, 2]."""
    velocity = obs[:, -1] - obs[:, -2]
    steps = np.arange(1, horizon + 1, dtype=obs.dtype)[None, :, None]
    return obs[:, -1:, :] + steps * velocity[:, None, :]


@EVALUATORS.register("trajectory")
class TrajectoryEvaluator(Evaluator):
    def __init__(self, info: dict[str, Any], target_key: str = "target", obs_key: str = "obs",
                 samples_key: str = "samples", num_plot: int = 6) -> None:
        super().__init__(info)
        self.target_key, self.obs_key, self.samples_key = target_key, obs_key, samples_key
        self.batch_keys = (target_key, obs_key, "index")
        self.num_plot = num_plot

    def compute(self, gathered):
        target, obs = gathered[self.target_key], gathered[self.obs_key]
        metrics: dict[str, Any] = dict(displacement_errors(gathered["pred"], target))
        samples = gathered.get(self.samples_key)
        if samples is not None and samples.ndim == 4 and samples.shape[1] > 1:
            k = samples.shape[1]
            best = displacement_errors(samples, target)
            metrics.update({f"best_of_{k}/ADE": best["ADE"], f"best_of_{k}/FDE": best["FDE"]})
        base = displacement_errors(constant_velocity(obs, target.shape[1]), target)
        metrics.update({"baseline/ADE": base["ADE"], "baseline/FDE": base["FDE"]})
        return metrics

    def figures(self, gathered, metrics, extra, out_dir):
        plt = _plt()
        obs, target, pred = gathered[self.obs_key], gathered[self.target_key], gathered["pred"]
        n = min(self.num_plot, len(obs))
        # the tracks with the largest movement are the informative ones to look at
        order = np.argsort(-np.linalg.norm(target[:, -1] - obs[:, -1], axis=-1))[:n]
        cv = constant_velocity(obs, target.shape[1])
        cols = min(3, max(n, 1))
        rows = max(1, int(np.ceil(n / cols)))
        fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 4 * rows), squeeze=False)
        for ax, i in zip(axes.ravel(), order):
            last = obs[i, -1:]
            ax.plot(*obs[i].T, "o-", color="k", ms=3, label="observed")
            ax.plot(*np.concatenate([last, target[i]]).T, "o-", color="tab:green", ms=3, label="true future")
            ax.plot(*np.concatenate([last, pred[i]]).T, "x--", color="tab:red", ms=4, label="predicted")
            ax.plot(*np.concatenate([last, cv[i]]).T, ":", color="tab:gray", label="constant velocity")
            ax.set_aspect("equal", adjustable="datalim")
            ax.set_title(f"track {int(gathered['index'][i])}", fontsize=9)
        for ax in axes.ravel()[n:]:
            ax.axis("off")
        axes.ravel()[0].legend(fontsize=7)
        fig.suptitle(f"ADE {metrics['ADE']:.3f} / FDE {metrics['FDE']:.3f} (constant velocity "
                     f"{metrics['baseline/ADE']:.3f} / {metrics['baseline/FDE']:.3f})")
        savefig(fig, out_dir / "trajectories.png")
        return [("Observed (black), true (green) and predicted (red) tracks, test split", "trajectories.png")]


@EVALUATORS.register("traffic_forecast")
class TrafficForecastEvaluator(Evaluator):
    def __init__(self, info: dict[str, Any], horizons: Sequence[int] = (3, 6, 12), target_key: str = "target",
                 last_key: str = "last_value", num_plot: int = 4) -> None:
        super().__init__(info)
        self.horizons = [int(h) for h in horizons]
        self.target_key, self.last_key = target_key, last_key
        self.batch_keys = (target_key, f"{target_key}_mask", last_key, "index")
        self.num_plot = num_plot

    def _suite(self, pred, target, mask) -> dict[str, Any]:
        out: dict[str, Any] = {}
        overall = masked_regression_metrics(pred, target, mask)
        out.update({k: overall[k] for k in ("MAE", "RMSE", "MAPE")})
        for h in self.horizons:
            if h > target.shape[1]:
                raise ValueError(f"traffic_forecast: horizon {h} beyond the {target.shape[1]} predicted steps")
            m = masked_regression_metrics(pred[:, h - 1], target[:, h - 1], mask[:, h - 1])
            out[f"horizon_{h}"] = {k: m[k] for k in ("MAE", "RMSE", "MAPE")}
        return out

    def compute(self, gathered):
        target, mask = gathered[self.target_key], gathered[f"{self.target_key}_mask"].astype(bool)
        metrics = self._suite(gathered["pred"], target, mask)
        last = np.broadcast_to(gathered[self.last_key][:, None, :], target.shape)
        base = self._suite(last, target, mask)
        metrics.update({f"baseline/{k}": v for k, v in base.items()})
        metrics["num_samples"] = int(target.shape[0])
        return metrics

    def figures(self, gathered, metrics, extra, out_dir):
        plt = _plt()
        target, pred = gathered[self.target_key], gathered["pred"]
        mask = gathered[f"{self.target_key}_mask"].astype(bool)
        order = np.argsort(gathered["index"])
        n_nodes = target.shape[2]
        sensors = np.linspace(0, n_nodes - 1, min(self.num_plot, n_nodes)).astype(int)
        names = self.info.get("sensor_ids") or [str(i) for i in range(n_nodes)]
        # consecutive windows: the first predicted step of each window traces the series,
        # and the horizon-12 forecast issued 12 steps earlier is what the model said an hour ahead
        h = target.shape[1]
        fig, axes = plt.subplots(len(sensors), 1, figsize=(10, 2.2 * len(sensors)), squeeze=False)
        for ax, s in zip(axes[:, 0], sensors):
            truth = np.where(mask[order, 0, s], target[order, 0, s], np.nan)
            ax.plot(truth, color="k", lw=1, label="truth")
            ax.plot(pred[order, 0, s], color="tab:blue", lw=1, label="forecast, 1 step ahead")
            ax.plot(np.arange(h - 1, len(order) + h - 1), pred[order, h - 1, s], color="tab:red", lw=1,
                    alpha=0.8, label=f"forecast, {h} steps ahead")
            ax.set_ylabel(f"sensor {names[s]}", fontsize=8)
        axes[0, 0].legend(fontsize=7, ncol=3)
        axes[-1, 0].set_xlabel("test window (time step)")
        savefig(fig, out_dir / "forecast_vs_truth.png")
        return [("Forecast vs truth for a few sensors (test split; gaps are missing readings)",
                 "forecast_vs_truth.png")]
