"""Graph modality: the DCRNN-layout reader (h5 + restricted adjacency pickle), masked metrics on hand
cases, the STAEformer encoder with a torch-geometric graph layer."""
import pickle

import numpy as np
import pytest
import torch

from allspark.data.base import DatasetFormatError
from allspark.data.metr_la import TrafficSensorNetwork, load_adjacency, write_sensor_h5
from allspark.evaluation.regression import TrafficForecastEvaluator
from allspark.metrics.regression import masked_regression_metrics


def _write_network(root, n=3, steps=60, freq_s=3600, ids=None, adj_ids=None, sub="sensor_graph"):
    ids = ids or [str(400000 + i) for i in range(n)]
    times = np.datetime64("2017-01-02T00:00:00") + np.arange(steps) * np.timedelta64(freq_s, "s")
    values = (50 + np.arange(steps)[:, None] + np.arange(n)[None, :]).astype(np.float32)
    values[5, 1] = 0.0  # a missing reading
    write_sensor_h5(root / "counts.h5", times, ids, values)
    adj = np.eye(n, dtype=np.float32) + np.eye(n, k=1, dtype=np.float32) * 0.5
    adj_ids = adj_ids or ids
    (root / sub).mkdir(parents=True, exist_ok=True)
    with open(root / sub / "adj_mx.pkl", "wb") as f:
        pickle.dump((adj_ids, {s: i for i, s in enumerate(adj_ids)}, adj), f, protocol=2)
    return values


def test_reader_infers_sensors_and_interval_hourly(tmp_path):
    values = _write_network(tmp_path, n=3, steps=60, freq_s=3600)
    parts = {s: TrafficSensorNetwork(tmp_path, s) for s in ("train", "val", "test")}
    n_samples = 60 - 24 + 1
    assert [len(parts[s]) for s in ("train", "val", "test")] == [26, 4, 7] and sum(map(len, parts.values())) == n_samples
    info = parts["train"].info()
    assert info["num_nodes"] == 3 and info["interval_s"] == 3600 and info["steps_per_day"] == 24
    assert info["target_shape"] == [12, 3]
    train_vals = values[: 26 + 11]
    assert info["target_mean"] == pytest.approx(train_vals[train_vals != 0].mean(), rel=1e-5)
    item = parts["train"][0]
    assert item["x"].shape == (12, 3, 1) and item["tod"].tolist() == list(range(12))
    assert item["dow"][0] == 0  # 2017-01-02 was a Monday
    assert item["x"][5, 1, 0] == 0.0  # missing input -> the training mean
    test_item = parts["test"][0]
    start = 26 + 4
    assert torch.equal(test_item["target"], torch.from_numpy(values[start + 12:start + 24]))
    assert info["edge_index"] == [[0, 0, 1, 1, 2], [0, 1, 1, 2, 2]]
    # the missing reading is forward-filled for the last-value baseline
    assert parts["train"][0]["last_value"].tolist() == values[11].tolist()


def test_reader_rejects_adjacency_with_other_sensor_ids(tmp_path):
    _write_network(tmp_path, ids=["1", "2", "3"], adj_ids=["1", "2", "9"])
    with pytest.raises(DatasetFormatError, match=r"do not match.*only in the adjacency \['9'\].*only in the h5 \['3'\]"):
        TrafficSensorNetwork(tmp_path, "train")


def test_adjacency_in_other_order_is_reordered(tmp_path):
    _write_network(tmp_path, ids=["1", "2", "3"], adj_ids=["3", "2", "1"], sub=".")
    ds = TrafficSensorNetwork(tmp_path, "train")
    assert ds.sensor_ids == ["1", "2", "3"]


def test_adjacency_pickle_refuses_code(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    path = tmp_path / "adj_mx.pkl"
    path.write_bytes(pickle.dumps((["1"], {"1": 0}, Evil())))
    with pytest.raises(DatasetFormatError, match="refusing to load builtins.print"):
        load_adjacency(path)


def test_masked_metrics_hand_computed_with_missing_values():
    pred = np.array([[10.0, 20.0], [30.0, 40.0]])
    target = np.array([[8.0, 0.0], [20.0, 50.0]])  # the 0 is a missing reading
    m = masked_regression_metrics(pred, target)
    assert m["num_observed"] == 3
    assert m["MAE"] == pytest.approx((2 + 10 + 10) / 3)
    assert m["RMSE"] == pytest.approx(np.sqrt((4 + 100 + 100) / 3))
    assert m["MAPE"] == pytest.approx(100 * (2 / 8 + 10 / 20 + 10 / 50) / 3)
    m2 = masked_regression_metrics(pred, target, mask=np.array([[True, True], [False, True]]))
    assert m2["num_observed"] == 2 and m2["MAE"] == pytest.approx(6.0)
    assert np.isnan(masked_regression_metrics(pred, np.zeros_like(target))["MAE"])


def test_evaluator_horizons_and_last_value_baseline():
    target = np.full((2, 12, 1), 10.0)
    target[:, 2] = 20.0
    target[0, 5] = 0.0  # missing
    mask = target != 0
    pred = target.copy()
    pred[:, 11] += 1.0
    last = np.full((2, 1), 10.0)
    m = TrafficForecastEvaluator({}).compute({"pred": pred, "target": target, "target_mask": mask,
                                               "last_value": last, "index": np.arange(2)})
    assert m["horizon_12"]["MAE"] == pytest.approx(1.0) and m["horizon_3"]["MAE"] == 0
    assert m["MAE"] == pytest.approx(2 / 23)
    assert m["baseline/horizon_3"]["MAE"] == pytest.approx(10.0) and m["baseline/horizon_6"]["MAE"] == 0


def test_encoder_shapes_graph_and_validation():
    from encoders.graph import SpatioTemporalEmbeddingEncoder

    info = {"num_nodes": 4, "input_len": 12, "steps_per_day": 24, "edge_index": [[0, 1, 2], [1, 2, 3]],
            "edge_weight": [1.0, 0.5, 0.5]}
    enc = SpatioTemporalEmbeddingEncoder(info, dim=16, dropout=0.0)
    batch = {"x": torch.randn(3, 12, 4, 1), "tod": torch.arange(12).repeat(3, 1), "dow": torch.zeros(3, 12, dtype=torch.long)}
    out = enc(batch)
    assert out.tokens.shape == (3, 4, 16)
    out.tokens.sum().backward()
    assert enc.graph_layers[0].lin.weight.grad is not None
    with pytest.raises(ValueError, match=r"batch\['x'\]: expected shape \[B, 12, 4, 1\]"):
        enc(dict(batch, x=torch.randn(3, 12, 5, 1)))
    with pytest.raises(ValueError, match=r"batch\['tod'\]: expected integer indices in \[0, 24\)"):
        enc(dict(batch, tod=torch.full((3, 12), 30)))


def _write_times(root, times, values, ids=("1", "2", "3")):
    write_sensor_h5(root / "counts.h5", times, list(ids), values)
    adj = np.eye(len(ids), dtype=np.float32)
    with open(root / "adj_mx.pkl", "wb") as f:
        pickle.dump((list(ids), {s: i for i, s in enumerate(ids)}, adj), f, protocol=2)


def test_reader_puts_rows_with_gaps_on_the_regular_grid(tmp_path, caplog):
    steps = 60
    times = np.datetime64("2017-01-02T00:00:00") + np.arange(steps) * np.timedelta64(3600, "s")
    values = (50 + np.arange(steps)[:, None] + np.arange(3)[None, :]).astype(np.float32)
    keep = np.setdiff1d(np.arange(steps), [10, 11, 30])  # three hours absent from the file
    _write_times(tmp_path, times[keep], values[keep])
    with caplog.at_level("INFO", logger="allspark.data.metr_la"):
        ds = TrafficSensorNetwork(tmp_path, "train")
    assert [r.getMessage() for r in caplog.records if "time grid" in r.getMessage()] == [
        f"graph: {tmp_path / 'counts.h5'}: 3 row(s) missing from the 3600-s time grid (57 rows in the file, "
        "60 on the grid) filled with readings 0 (missing)"]
    assert ds.num_added_rows == 3 and ds.interval == 3600 and len(ds.times) == 60
    assert np.array_equal(ds.times, times.astype("datetime64[ns]"))
    expected = values.copy()
    expected[[10, 11, 30]] = 0.0
    assert torch.equal(ds.values, torch.from_numpy(expected))
    assert ds.mask[[10, 11, 30]].sum() == 0 and ds.mask.sum() == 57 * 3
    assert ds.tod[12] == 12  # time of day follows the grid, not the row number of the file
    assert len(ds) == 26  # the same windows as the complete file (60 - 24 + 1 = 37 -> 26 train)
    assert ds[0]["target_mask"].all()  # targets rows 12..23
    item = ds[7]  # targets rows 19..30: the last one was filled in -> 0, masked
    assert item["target"][11].eq(0).all() and not item["target_mask"][11].any() and item["target_mask"][:11].all()
    item = ds[19]  # inputs rows 19..30, targets 31..42; row 30 (the last input) missing -> forward fill
    assert item["x"][11].eq(0).all() and item["last_value"].tolist() == values[29].tolist()
    item = ds[2]  # targets rows 14..25; inputs rows 2..13 contain the missing rows 10 and 11
    assert item["x"][8].eq(0).all() and item["x"][9].eq(0).all() and item["target_mask"].all()
    test = TrafficSensorNetwork(tmp_path, "test")
    assert len(test) == 7 and test.num_added_rows == 3


def test_reader_reads_nan_readings_as_missing(tmp_path, caplog):
    times = np.datetime64("2017-01-02T00:00:00") + np.arange(40) * np.timedelta64(300, "s")
    values = np.full((40, 3), 60.0, dtype=np.float32)
    values[3, 0] = values[7, 2] = np.nan
    _write_times(tmp_path, times, values)
    with caplog.at_level("INFO", logger="allspark.data.metr_la"):
        ds = TrafficSensorNetwork(tmp_path, "train")
    assert any("2 NaN reading(s) read as 0 (missing)" in r.getMessage() for r in caplog.records)
    assert ds.values[3, 0] == 0 and ds.values[7, 2] == 0 and ds.mask.sum() == 118
    assert ds.info()["target_mean"] == 60.0 and ds.num_added_rows == 0


@pytest.mark.parametrize("case, message", [
    ("off_grid", r"counts\.h5: row 20 \(2017-01-02T20:30:00\.000000000\) is off the regular time grid: expected every "
                 r"timestamp to be 2017-01-02T00:00:00\.000000000 plus a multiple of the sampling interval 3600 s"),
    ("duplicate", r"counts\.h5: timestamps must be strictly increasing, but row 21 \(2017-01-02T20:00:00\.000000000\) "
                  r"repeats after row 20"),
    ("backwards", r"counts\.h5: timestamps must be strictly increasing, but row 21 .* goes back in time after row 20"),
    ("far_stamp", r"counts\.h5: filling the gaps of the 3600-s time grid would add 8745 empty rows to 40 rows of "
                  r"readings; the largest gap is 364 days 10:00:00 between row 38"),
    ("interval", r"counts\.h5: the sampling interval .* is 2\.5 s; expected a whole number of seconds that divides "
                 r"a day"),
])
def test_reader_refuses_timestamps_off_one_regular_grid(tmp_path, case, message):
    hours = np.arange(40, dtype=np.int64) * 3600
    if case == "off_grid":
        hours[20] += 1800
    elif case == "duplicate":
        hours[21] = hours[20]
    elif case == "backwards":
        hours[21] = hours[19] - 60
    elif case == "far_stamp":
        hours[-1] = 366 * 86400  # a year away: a bad stamp, not a gap
    elif case == "interval":
        hours = np.arange(40, dtype=np.int64) * 2500  # a 2.5-s spacing, in milliseconds
    unit = "ms" if case == "interval" else "s"
    times = np.datetime64("2017-01-02T00:00:00") + hours.astype(f"timedelta64[{unit}]")
    _write_times(tmp_path, times, np.full((40, 3), 60.0, dtype=np.float32))
    with pytest.raises(DatasetFormatError, match=message):
        TrafficSensorNetwork(tmp_path, "train")
