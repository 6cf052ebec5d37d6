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
