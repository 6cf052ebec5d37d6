"""Classical forecasters for the sensor graph (``traffic_forecast`` protocol), scored on the same test windows
and with the same masked metrics as the model; ``eval.baselines`` of ``configs/graph.yaml`` names them.

Both read the whole series from a sensor-series reader (:class:`allspark.data.metr_la.TrafficSensorNetwork`:
``values``, ``mask``, ``filled``, ``tod``, ``window_index()``) and never a row after a window's forecast
origin (its last input row), so the val/test rows they see are only the inputs a model sees too.

- ``seasonal_naive``: the reading one period before each target step (``period`` steps, default one day =
  ``steps_per_day`` of the time grid; ``7 * steps_per_day`` is the weekly variant). For a step ``h`` beyond
  the period the lag is the smallest multiple of the period that reaches back to the inputs (``period *
  ceil(h / period)``), as in the usual seasonal-naive forecast. Where that reading is missing or lies before
  the first row of the series, the forecast falls back to the last observed value (the item's
  ``last_value``, which the evaluator's ``baseline/`` metrics also use). Nothing is fitted.
- ``linear_autoregressive``: one ridge regression, shared by all sensors, from a sensor's last ``input_len``
  readings (a missing reading replaced by the last observed one before it, as ``filled`` holds; plus, with
  ``time_of_day_harmonics: K``, sin/cos of K harmonics of the origin's time of day) to its next
  ``output_len`` readings. Readings are standardised with the training mean/std of the reader info; the
  intercept is not penalised. One least-squares problem per horizon, each over the (training window,
  sensor) pairs whose target at that horizon is observed: missing targets are left out of the fit.
  ``alpha: 0`` is ordinary least squares (minimum-norm when the lags are collinear).
"""
from __future__ import annotations

import logging
from typing import Any

import numpy as np

from allspark.baselines import Baseline
from allspark.registry import BASELINES

logger = logging.getLogger(__name__)

__all__ = ["SeasonalNaive", "LinearAutoregressive", "seasonal_lags"]

_SERIES_FIELDS = ("values", "mask", "filled", "tod", "window_index", "input_len", "output_len", "steps_per_day")


def _series(dataset, who: str) -> dict[str, Any]:
    """The series a sensor-series reader exposes, as numpy arrays, with the window rows of its items."""
    missing = [a for a in _SERIES_FIELDS if not hasattr(dataset, a)]
    if missing:
        raise TypeError(f"{who}: expected a sensor-series reader (allspark.data.metr_la.TrafficSensorNetwork) "
                        f"exposing {list(_SERIES_FIELDS)}; {type(dataset).__name__} lacks {missing}")
    inputs, targets = dataset.window_index()
    return {"values": np.asarray(dataset.values, dtype=np.float64), "mask": np.asarray(dataset.mask, dtype=bool),
            "filled": np.asarray(dataset.filled, dtype=np.float64), "tod": np.asarray(dataset.tod, dtype=np.int64),
            "inputs": np.asarray(inputs, dtype=np.int64), "targets": np.asarray(targets, dtype=np.int64),
            "steps_per_day": int(dataset.steps_per_day)}


def seasonal_lags(output_len: int, period: int) -> np.ndarray:
    """[output_len] lag of each target step ``h = 1..output_len``: ``period * ceil(h / period)`` (so the lagged
    row is never after the forecast origin)."""
    h = np.arange(1, output_len + 1)
    return period * ((h - 1) // period + 1)


@BASELINES.register("seasonal_naive")
class SeasonalNaive(Baseline):
    """The reading one period earlier; the last observed value where that one is missing (module docstring)."""

    def __init__(self, info: dict[str, Any], period: int | None = None) -> None:
        super().__init__(info)
        if period is None:
            period = info.get("steps_per_day")
            if not period:
                raise ValueError("seasonal_naive: no 'period' given and the dataset info has no 'steps_per_day'; "
                                 "set args: {period: STEPS}")
        if isinstance(period, bool) or not isinstance(period, (int, np.integer)) or period < 1:
            raise ValueError(f"seasonal_naive: 'period' must be a positive whole number of time steps, got {period!r}")
        self.period = int(period)
        self.fallback_fraction: float | None = None

    def fit(self, train_set, model=None) -> None:
        """Nothing to learn; checks that the training split is a sensor series."""
        _series(train_set, "seasonal_naive")

    def predict(self, dataset, model=None) -> dict[str, np.ndarray]:
        s = _series(dataset, "seasonal_naive")
        targets, origin = s["targets"], s["inputs"][:, -1]
        source = targets - seasonal_lags(targets.shape[1], self.period)[None, :]  # [n, T_out]
        inside = source >= 0
        rows = np.where(inside, source, 0)
        seasonal = s["values"][rows]  # [n, T_out, N]
        ok = inside[..., None] & s["mask"][rows]
        last = s["filled"][origin][:, None, :]  # the item's last_value
        pred = np.where(ok, seasonal, last)
        self.fallback_fraction = float(1.0 - ok.mean()) if ok.size else 0.0
        logger.info("seasonal_naive (period %d steps): %.2f%% of the forecasts fall back to the last observed value",
                    self.period, 100 * self.fallback_fraction)
        return {"pred": pred.astype(np.float32)}


@BASELINES.register("linear_autoregressive")
class LinearAutoregressive(Baseline):
    """A ridge model over a sensor's last readings, shared by the sensors, fitted on the training windows."""

    def __init__(self, info: dict[str, Any], alpha: float = 1.0, time_of_day_harmonics: int = 0,
                 chunk_windows: int = 2048) -> None:
        super().__init__(info)
        if not isinstance(alpha, (int, float)) or isinstance(alpha, bool) or alpha < 0:
            raise ValueError(f"linear_autoregressive: 'alpha' must be a number >= 0, got {alpha!r}")
        if not isinstance(time_of_day_harmonics, int) or time_of_day_harmonics < 0:
            raise ValueError("linear_autoregressive: 'time_of_day_harmonics' must be a whole number >= 0, "
                             f"got {time_of_day_harmonics!r}")
        self.alpha = float(alpha)
        self.harmonics = time_of_day_harmonics
        self.chunk_windows = max(1, int(chunk_windows))
        self.mean = float(info.get("target_mean", 0.0))
        self.std = float(info.get("target_std", 1.0)) or 1.0
        #: [output_len, features + 1]: per horizon, the weights of the lags (oldest first), then of the
        #: time-of-day terms (sin, cos of harmonic 1, ...), then the intercept -- in standardised units
        self.coef_: np.ndarray | None = None
        self.num_fit_rows_: np.ndarray | None = None

    def _features(self, s: dict[str, Any], windows: slice) -> np.ndarray:
        """[windows * N, features + 1]: standardised lags, time-of-day terms and a 1, row = (window, sensor)."""
        inputs = s["inputs"][windows]
        lags = (s["filled"][inputs] - self.mean) / self.std  # [w, L, N]
        n_win, _, n_nodes = lags.shape
        cols = [lags.transpose(0, 2, 1)]  # [w, N, L]
        if self.harmonics:
            phase = 2 * np.pi * s["tod"][inputs[:, -1]] / s["steps_per_day"]  # [w]
            k = np.arange(1, self.harmonics + 1)
            terms = np.concatenate([np.sin(phase[:, None] * k), np.cos(phase[:, None] * k)], axis=1)
            cols.append(np.broadcast_to(terms[:, None, :], (n_win, n_nodes, terms.shape[1])))
        cols.append(np.ones((n_win, n_nodes, 1)))
        return np.concatenate(cols, axis=2).reshape(n_win * n_nodes, -1)

    def fit(self, train_set, model=None) -> None:
        s = _series(train_set, "linear_autoregressive")
        n_win, out_len = s["targets"].shape
        if n_win == 0:
            raise ValueError("linear_autoregressive: the training split has no windows")
        d = s["inputs"].shape[1] + 2 * self.harmonics + 1
        gram = np.zeros((out_len, d, d))
        rhs = np.zeros((out_len, d))
        rows = np.zeros(out_len, dtype=np.int64)
        for lo in range(0, n_win, self.chunk_windows):
            part = slice(lo, min(lo + self.chunk_windows, n_win))
            x = self._features(s, part)
            tgt = s["targets"][part]
            y = ((s["values"][tgt] - self.mean) / self.std).transpose(0, 2, 1).reshape(len(x), out_len)
            m = s["mask"][tgt].transpose(0, 2, 1).reshape(len(x), out_len)
            full = x.T @ x
            rhs += (x.T @ np.where(m, y, 0.0)).T
            for h in range(out_len):
                xm = x[~m[:, h]]  # the rows whose target at horizon h is missing (few): taken out of the Gram
                gram[h] += full - xm.T @ xm
                rows[h] += len(x) - len(xm)
        if (rows == 0).any():
            raise ValueError(f"linear_autoregressive: no observed training target at horizon(s) "
                             f"{(np.flatnonzero(rows == 0) + 1).tolist()}")
        penalty = self.alpha * np.eye(d)
        penalty[-1, -1] = 0.0  # the intercept is not penalised
        self.coef_ = np.stack([np.linalg.lstsq(gram[h] + penalty, rhs[h], rcond=None)[0] for h in range(out_len)])
        self.num_fit_rows_ = rows

    def predict(self, dataset, model=None) -> dict[str, np.ndarray]:
        if self.coef_ is None:
            raise RuntimeError("linear_autoregressive: predict before fit")
        s = _series(dataset, "linear_autoregressive")
        n_win, out_len = s["targets"].shape
        if out_len != len(self.coef_) or s["inputs"].shape[1] + 2 * self.harmonics + 1 != self.coef_.shape[1]:
            fitted_in = self.coef_.shape[1] - 2 * self.harmonics - 1
            raise ValueError(f"linear_autoregressive: fitted for {fitted_in} inputs -> {len(self.coef_)} outputs, "
                             f"the dataset has {s['inputs'].shape[1]} -> {out_len}")
        n_nodes = s["values"].shape[1]
        out = np.empty((n_win, out_len, n_nodes), dtype=np.float32)
        for lo in range(0, n_win, self.chunk_windows):
            part = slice(lo, min(lo + self.chunk_windows, n_win))
            z = self._features(s, part) @ self.coef_.T  # [w * N, T_out]
            w = part.stop - part.start
            out[part] = (z * self.std + self.mean).reshape(w, n_nodes, out_len).transpose(0, 2, 1)
        return {"pred": out}
