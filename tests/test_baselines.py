"""Classical baselines beside the model: exact values on hand-built cases, fitted on the training split only,
clear errors for bad configs, and the baselines in metrics.json / report.md of real runs."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch.utils.data import default_collate

from allspark.baselines import best_baseline, build_baselines, run_baselines, split_arrays
from allspark.baselines.classical import point_shape_features
from allspark.baselines.text import code_words
from allspark.config import ConfigError, load_config
from allspark.evaluation import build_evaluator
from allspark.evaluation.classification import ClassificationEvaluator
from allspark.evaluation.regression import TrajectoryEvaluator, constant_velocity
from tests.helpers import TINY_HSI, run_inprocess


class ListSet:
    """The reader interface a baseline uses: len, items of tensors (or strings), collate."""

    def __init__(self, items: list[dict], split: str = "train") -> None:
        self.items, self.split = items, split

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict:
        return self.items[i]

    @staticmethod
    def collate(items):
        return default_collate(items)


def _points(xs, labels, split):
    return ListSet([{"x": torch.tensor([float(x)]), "label": torch.tensor(int(y)), "index": torch.tensor(i)}
                    for i, (x, y) in enumerate(zip(xs, labels))], split)


def _classification(baselines):
    cfg = load_config("hsi", overrides=[f"eval.baselines={baselines}", "eval.protocol=classification"])
    evaluator = ClassificationEvaluator({"num_classes": 2})
    return cfg, evaluator


def test_one_nearest_neighbour_on_a_hand_built_case():
    # train: 0 -> class 0, 10 -> class 1; test 1 -> 0 (right), 9 -> 1 (right), 6 -> 1 (true label 0: wrong)
    cfg, evaluator = _classification("[{type: knn, args: {inputs: [x], n_neighbors: 1}}]")
    baselines = build_baselines(cfg, {"num_classes": 2}, evaluator)
    train, test = _points([0, 10], [0, 1], "train"), _points([1, 9, 6], [0, 1, 0], "test")
    out = run_baselines(baselines, train, test)
    assert out["knn"]["top1"] == pytest.approx(2 / 3)
    assert out["knn"]["per_class"] == {"0": 0.5, "1": 1.0} and out["knn"]["AA"] == pytest.approx(0.75)
    assert out["knn"]["probe"] is False and out["knn"]["seconds"] >= 0


def test_baselines_are_fitted_on_the_training_split_only():
    cfg, evaluator = _classification("[{type: logistic_regression, args: {inputs: [x]}}]")
    (name, baseline), = build_baselines(cfg, {"num_classes": 2}, evaluator)
    train = _points([0, 1, 2, 8, 9, 10], [0, 0, 0, 1, 1, 1], "train")
    test = _points([3, 7], [0, 1], "test")
    baseline.fit(train)
    coef = baseline.model[-1].coef_.copy()
    first = baseline.predict(test)["pred"]
    flipped = _points([3, 7], [1, 0], "test")  # other test labels: the fitted model must not move
    assert baseline.score(flipped)["top1"] == 0.0 and baseline.score(test)["top1"] == 1.0
    np.testing.assert_array_equal(baseline.model[-1].coef_, coef)
    np.testing.assert_array_equal(baseline.predict(flipped)["pred"], first)
    baseline.fit(_points([0, 1, 2, 8, 9, 10], [1, 1, 1, 0, 0, 0], "train"))  # other training labels do
    np.testing.assert_array_equal(baseline.predict(test)["pred"], 1 - first)


def test_unlabelled_training_rows_are_left_out():
    cfg, evaluator = _classification("[{type: knn, args: {inputs: [x], n_neighbors: 1}}]")
    (_, baseline), = build_baselines(cfg, {"num_classes": 2}, evaluator)
    baseline.fit(_points([0, 5, 10], [0, -1, 1], "train"))  # 5 is unlabelled: it must not become a class
    assert baseline.predict(_points([4.9], [0], "test"))["pred"].tolist() == [0]


def test_constant_velocity_baseline_matches_the_evaluators_own():
    cfg = load_config("trajectory", overrides=["eval.baselines=[{type: constant_velocity}, {type: ridge, args: {inputs: [obs], alpha: 1.0e-6}}]"])
    evaluator = TrajectoryEvaluator({})
    rng = np.random.default_rng(0)
    items = []
    for i in range(40):
        start, v = rng.normal(size=2), rng.normal(size=2)
        track = start + np.arange(20)[:, None] * v  # straight lines: constant velocity is exact
        items.append({"obs": torch.tensor(track[:8], dtype=torch.float32),
                      "target": torch.tensor(track[8:], dtype=torch.float32), "index": torch.tensor(i)})
    train, test = ListSet(items[:30]), ListSet(items[30:], "test")
    out = run_baselines(build_baselines(cfg, {}, evaluator), train, test)
    assert out["constant_velocity"]["ADE"] == pytest.approx(0.0, abs=1e-5)
    assert out["ridge"]["ADE"] < 1e-3  # a linear map of the observed track represents the extrapolation
    obs = split_arrays(test, ["obs"])["obs"]
    np.testing.assert_allclose(constant_velocity(obs, 12)[:, -1], obs[:, -1] + 12 * (obs[:, -1] - obs[:, -2]),
                               rtol=1e-5)


def test_tfidf_ranking_mrr_on_a_hand_built_pool():
    cfg = load_config("code")
    evaluator = build_evaluator(cfg, {})
    (_, baseline), = build_baselines(cfg, {}, evaluator)
    code = ["def read_file(path): return open(path).read()", "def add_numbers(a, b): return a + b",
            "def sortList(items): return sorted(items)"]
    docs = ["Read a file and return its text.", "Add two numbers.", "Return the items sorted."]
    mk = lambda c, d, s: ListSet([{"input_text": x, "target_text": y, "index": torch.tensor(i)}
                                  for i, (x, y) in enumerate(zip(c, d))], s)
    baseline.fit(mk(code, docs, "train"))
    # each code shares a distinctive word with its docstring only (file / numbers / sorted): every rank is 1
    assert baseline.score(mk(code, docs, "test"))["mrr"] == 1.0
    # with the docstrings shifted by one, no code finds its (new) true docstring first
    shifted = baseline.score(mk(code, docs[1:] + docs[:1], "test"))
    assert shifted["mrr"] < 0.6
    assert code_words("parseHTTPHeader_v2(x)") == "parse httpheader v2 x"


def test_point_shape_features_ignore_point_order_and_scale():
    rng = np.random.default_rng(0)
    cloud = rng.normal(size=(1, 256, 3)) * [3.0, 1.0, 0.5]
    perm = cloud[:, rng.permutation(256)]
    a, b = point_shape_features(cloud), point_shape_features(perm)
    c = point_shape_features(cloud * 7.0 + 2.0)
    np.testing.assert_allclose(a[:, 32:], b[:, 32:], atol=1e-12)  # covariance part: exactly order-free
    np.testing.assert_allclose(a, c, atol=1e-9)  # centred and scaled to the unit ball
    assert a[0, :32].sum() == pytest.approx(1.0)


def test_best_baseline_is_direction_aware_and_skips_probes():
    results = {"a": {"MAE": 2.0, "probe": False}, "b": {"MAE": 1.5, "probe": False}, "p": {"MAE": 0.1, "probe": True}}
    assert best_baseline(results, "MAE", greater_is_better=False) == ("b", 1.5)
    assert best_baseline(results, "MAE", greater_is_better=True) == ("a", 2.0)
    assert best_baseline(results, "MAE", False, include_probes=True) == ("p", 0.1)
    assert best_baseline(results, "top1", True) is None


@pytest.mark.parametrize("spec, message", [
    ("[{type: no_such_baseline}]", "no_such_baseline"),
    ("[{type: svm, args: {inputs: [spectrum], no_such_arg: 1}}]", "no_such_arg"),
    ("[{type: svm}]", "needs 'inputs'"),
    ("[{name: x}]", "must be {type: NAME"),
    ("[{type: svm, args: {inputs: [spectrum]}}, {type: svm, args: {inputs: [spectrum]}}]", "two baselines are named 'svm'"),
])
def test_bad_baseline_config_is_one_clear_error(spec, message):
    cfg = load_config("hsi", overrides=[f"eval.baselines={spec}"])
    with pytest.raises((ConfigError, KeyError)) as err:
        build_baselines(cfg, {"num_classes": 9}, build_evaluator(cfg, {"num_classes": 9, "height": 1, "width": 1}))
    assert message in str(err.value)


def test_unknown_baseline_from_the_command_line_exits_2_before_training(tmp_path):
    proc = run_inprocess(["train.py", "--modality", "hsi", "--output-dir", str(tmp_path / "run"), *TINY_HSI,
                          "eval.baselines=[{type: svn, args: {inputs: [spectrum]}}]"])
    assert proc.returncode == 2, proc.stderr[-2000:]
    err = proc.stderr.strip().splitlines()[-1]
    assert err.startswith("error:") and "svn" in err and "svm" in err
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_hsi_run_and_evaluation_report_baselines_beside_the_model(tmp_path):
    out = tmp_path / "run"
    proc = run_inprocess(["train.py", "--modality", "hsi", "--output-dir", str(out), *TINY_HSI, "train.epochs=1"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["main_metric"] == "OA" and metrics["greater_is_better"] is True
    assert set(metrics["baselines"]) == {"svm", "random_forest", "encoder_probe"}
    assert metrics["baselines"]["encoder_probe"]["probe"] is True
    # on the demo scene a spectral SVM is far above chance (1/9): the baseline is a real classifier
    assert metrics["baselines"]["svm"]["OA"] > 0.3
    assert metrics["best_baseline"]["name"] in ("svm", "random_forest")
    proc = run_inprocess(["evaluate.py", "--modality", "hsi", "--checkpoint", str(out)])
    assert proc.returncode == 0, proc.stderr[-3000:]
    ev = json.loads((out / "eval" / "metrics.json").read_text())
    # the same fit on the same split: the same figures in training's metrics.json and evaluate.py's
    assert ev["baselines"]["svm"]["OA"] == pytest.approx(metrics["baselines"]["svm"]["OA"])
    report = (out / "eval" / "report.md").read_text()
    assert "## Baselines" in report and "| svm |" in report and "| **model** |" in report


def test_pixel_embedding_is_unit_norm_and_fitted_on_training_images():
    from allspark.baselines.classical import PixelEmbeddingBaseline

    rng = np.random.default_rng(0)
    mk = lambda n, s: ListSet([{"image": torch.tensor(rng.normal(size=(3, 16, 8)), dtype=torch.float32),
                                "index": torch.tensor(i)} for i in range(n)], s)
    train, test = mk(20, "train"), mk(5, "test")
    base = PixelEmbeddingBaseline({}, pool=4, components=8)
    base.fit(train)
    emb = base.predict(test)["embedding"]
    assert emb.shape == (5, 8)
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, rtol=1e-5)
    mean = base.model[0].mean_.copy()  # the scaler saw the training images only
    base.predict(mk(5, "test"))
    np.testing.assert_array_equal(base.model[0].mean_, mean)
    grey = split_arrays(train, ["image"])["image"].mean(axis=1, keepdims=True)
    np.testing.assert_allclose(mean, torch.nn.functional.adaptive_avg_pool2d(torch.from_numpy(grey), 4)
                               .reshape(20, -1).mean(0).numpy(), rtol=1e-5, atol=1e-6)
