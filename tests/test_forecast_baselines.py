"""Graph forecast baselines (allspark/baselines/forecast.py): seasonal naive on a hand-computed series (with its
fallback to the last observed value), the linear autoregressive model recovering a linear recurrence, both
fitted on the training split only and never reading a row after a window's forecast origin."""
import pickle

import numpy as np
import pytest

from allspark.baselines import build_baselines
from allspark.baselines.forecast import LinearAutoregressive, SeasonalNaive, seasonal_lags
from allspark.data.metr_la import TrafficSensorNetwork, write_sensor_h5
from allspark.evaluation.regression import TrafficForecastEvaluator


def _write(root, values, freq_s=3600):
    root.mkdir(parents=True, exist_ok=True)
    ids = [str(i + 1) for i in range(values.shape[1])]
    times = np.datetime64("2017-01-02T00:00:00") + np.arange(len(values)) * np.timedelta64(freq_s, "s")
    write_sensor_h5(root / "series.h5", times, ids, values.astype(np.float32))
    with open(root / "adj_mx.pkl", "wb") as f:
        pickle.dump((ids, {s: i for i, s in enumerate(ids)}, np.eye(len(ids), dtype=np.float32)), f, protocol=2)
    return root


def _splits(root, **args):
    return {s: TrafficSensorNetwork(root, s, **args) for s in ("train", "val", "test")}


def _tiny(tmp_path):
    """20 hourly rows, 2 sensors, reading = 10 * (row + 1) + sensor; row 1 of sensor 1 missing."""
    values = 10.0 * (np.arange(20)[:, None] + 1) + np.arange(2)[None, :]
    values[1, 1] = 0.0
    return values, _splits(_write(tmp_path / "tiny", values), input_len=2, output_len=4)


def test_seasonal_lags_never_reach_past_the_origin():
    assert seasonal_lags(4, 3).tolist() == [3, 3, 3, 6]
    assert seasonal_lags(12, 288).tolist() == [288] * 12
    assert seasonal_lags(5, 2).tolist() == [2, 2, 4, 4, 6]


def test_seasonal_naive_hand_computed_with_fallback(tmp_path):
    _, parts = _tiny(tmp_path)
    train, test = parts["train"], parts["test"]
    assert [len(parts[s]) for s in ("train", "val", "test")] == [10, 2, 3]  # 15 windows
    b = SeasonalNaive(train.info(), period=3)
    b.fit(train)
    pred = b.predict(train)["pred"]
    assert pred.shape == (10, 4, 2)
    # item 0: inputs rows 0, 1 (origin 1), targets rows 2..5, lags 3, 3, 3, 6 -> rows -1, 0, 1, -1.
    # Row -1 is before the series: the last observed value, 20 for sensor 0 and 11 for sensor 1 (row 1 of
    # sensor 1 is missing, so the reading of row 0). Row 1 of sensor 1 is missing: the last value too.
    assert pred[0].tolist() == [[20, 11], [10, 11], [20, 11], [20, 11]]
    # item 5: inputs rows 5, 6, targets rows 7..10 -> rows 4, 5, 6, 4
    assert pred[5].tolist() == [[50, 51], [60, 61], [70, 71], [50, 51]]
    # test windows start at rows 12, 13, 14: every forecast is 30 too low at steps 1-3 (3 rows back) and
    # 60 at step 4 (6 rows back), for both sensors
    b.evaluator = TrafficForecastEvaluator(train.info(), horizons=[1, 4])
    m = b.score(test)
    assert m["MAE"] == pytest.approx((30 + 30 + 30 + 60) / 4)
    assert m["horizon_1"]["MAE"] == pytest.approx(30) and m["horizon_4"]["MAE"] == pytest.approx(60)
    assert m["RMSE"] == pytest.approx(np.sqrt((3 * 30 ** 2 + 60 ** 2) / 4))
    assert b.fallback_fraction == 0.0


def test_seasonal_naive_default_period_is_one_day(tmp_path):
    _, parts = _tiny(tmp_path)
    train, test = parts["train"], parts["test"]
    b = SeasonalNaive(train.info())
    assert b.period == 24  # hourly grid
    b.fit(train)
    # 20 rows, a day is 24: every lagged row is before the series -> the last observed value everywhere
    pred = b.predict(test)["pred"]
    last = np.stack([test[i]["last_value"].numpy() for i in range(len(test))])
    assert np.array_equal(pred, np.broadcast_to(last[:, None, :], pred.shape)) and b.fallback_fraction == 1.0
    with pytest.raises(ValueError, match="'period' must be a positive whole number of time steps, got 0"):
        SeasonalNaive(train.info(), period=0)
    with pytest.raises(ValueError, match="no 'period' given and the dataset info has no 'steps_per_day'"):
        SeasonalNaive({})
    with pytest.raises(TypeError, match="expected a sensor-series reader .* list lacks"):
        b.predict([1, 2, 3])


def _sinusoids(steps=200):
    t = np.arange(steps)[:, None]
    omega = 2 * np.pi / 10
    return 50 + np.array([10.0, 20.0, 30.0]) * np.sin(omega * t + np.array([0.0, 1.0, 2.0])), omega


def test_linear_autoregressive_recovers_a_linear_recurrence(tmp_path):
    # x_t = 50 + A sin(w t + phi) satisfies x_t = 2 cos(w) x_{t-1} - x_{t-2} + 100 (1 - cos w) for every
    # sensor, so one shared linear model of the last two readings forecasts every horizon exactly
    values, omega = _sinusoids()
    parts = _splits(_write(tmp_path / "sin", values), input_len=2, output_len=3)
    train, test = parts["train"], parts["test"]
    b = LinearAutoregressive(train.info(), alpha=0.0)
    b.fit(train)
    assert b.coef_.shape == (3, 3)  # per horizon: lag t-2, lag t-1, intercept
    assert b.coef_[0, :2] == pytest.approx([-1.0, 2 * np.cos(omega)], abs=1e-4)
    b.evaluator = TrafficForecastEvaluator(train.info(), horizons=[1, 3])
    m = b.score(test)
    assert m["MAE"] < 1e-3 and m["horizon_3"]["MAE"] < 1e-3
    assert m["baseline/MAE"] > 5  # the last value is far off
    with_tod = LinearAutoregressive(train.info(), alpha=0.0, time_of_day_harmonics=2)
    with_tod.fit(train)
    assert with_tod.coef_.shape == (3, 2 + 4 + 1)
    with_tod.evaluator = b.evaluator
    assert with_tod.score(test)["MAE"] < 1e-3


def test_linear_autoregressive_leaves_missing_targets_out(tmp_path):
    values, _ = _sinusoids()
    values[[40, 41, 90], 1] = 0.0
    values[60, 2] = 0.0
    parts = _splits(_write(tmp_path / "gaps", values), input_len=2, output_len=3)
    train = parts["train"]
    b = LinearAutoregressive(train.info(), alpha=1.0)
    b.fit(train)
    _, targets = train.window_index()
    observed = train.mask.numpy()[targets]  # [n, 3, N]
    assert b.num_fit_rows_.tolist() == observed.sum(axis=(0, 2)).tolist()
    assert b.num_fit_rows_.tolist() == [len(train) * 3 - 4] * 3  # each missing row is a target at each horizon once


def _noisy(seed=0, steps=200):
    rng = np.random.default_rng(seed)
    daily = 5 * np.sin(2 * np.pi * np.arange(steps) / 24)[:, None]
    values = 60 + np.cumsum(rng.normal(0, 1, (steps, 3)), axis=0) + daily
    values[rng.random(values.shape) < 0.05] = 0.0
    return values


def test_fitted_on_the_training_split_only_and_no_look_ahead(tmp_path):
    args = dict(input_len=2, output_len=3)
    a = _noisy()
    # 196 windows: 137 train, 20 val, 39 test; the training windows read rows 0..140
    b_values = a.copy()
    b_values[150:] = b_values[150:] * 1.3 + 7  # other val/test data
    c_values = a.copy()
    c_values[-3:] = 99.0  # other readings after the last forecast origin (row 196)
    pa = _splits(_write(tmp_path / "a", a), **args)
    pb = _splits(_write(tmp_path / "b", b_values), **args)
    pc = _splits(_write(tmp_path / "c", c_values), **args)
    assert [len(pa[s]) for s in ("train", "val", "test")] == [137, 20, 39]
    assert pa["train"].info()["target_mean"] == pb["train"].info()["target_mean"]
    ar_a, ar_b = (LinearAutoregressive(p["train"].info()) for p in (pa, pb))
    ar_a.fit(pa["train"])
    ar_b.fit(pb["train"])
    assert np.array_equal(ar_a.coef_, ar_b.coef_)
    assert not np.array_equal(ar_a.predict(pa["test"])["pred"], ar_a.predict(pb["test"])["pred"])
    sn = SeasonalNaive(pa["train"].info(), period=24)
    sn.fit(pa["train"])
    for model in (ar_a, sn):
        assert np.array_equal(model.predict(pa["test"])["pred"], model.predict(pc["test"])["pred"])
    assert not np.array_equal(pa["test"][38]["target"].numpy(), pc["test"][38]["target"].numpy())


def test_graph_config_builds_both_baselines(tmp_path):
    from allspark.config import load_config

    cfg = load_config("graph")
    assert cfg.eval.baselines == [{"type": "seasonal_naive"}, {"type": "linear_autoregressive"}]
    parts = _splits(_write(tmp_path / "cfg", _noisy(1)), input_len=2, output_len=3)
    info = parts["train"].info()
    built = build_baselines(cfg, info, TrafficForecastEvaluator(info, horizons=[3]))
    assert [(n, type(b)) for n, b in built] == [("seasonal_naive", SeasonalNaive),
                                               ("linear_autoregressive", LinearAutoregressive)]
    assert built[0][1].period == 24
