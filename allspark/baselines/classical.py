"""Classical estimators (scikit-learn) on the task's input arrays, flattened.

The features of a sample are its batch fields ``inputs`` (e.g. ``spectrum`` for HSI pixels, ``image`` for image
tiles, ``num`` and ``cat`` for table rows), each flattened and concatenated. Image-like fields (rank >= 3 per
sample: channels x height x width, or frames) can be average-pooled to ``pool`` x ``pool`` over their last two
axes first (``pool: 8`` turns a 3 x 256 x 256 tile into 192 numbers): the usual "logistic regression on
pixels" baseline, kept to a size a linear model can fit. Non-finite feature values become 0 (histogram
gradient boosting keeps NaN, which it handles natively). Classification or regression follows the task's
evaluator (a label field means classification; otherwise the target field is regressed, all outputs at once).
Rows whose label is negative (unlabelled) are left out of the fit. ``max_train_samples`` fits on a seeded
random subset of the training split (for kernel methods on large scenes).
"""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch

from allspark.baselines import Baseline, split_arrays
from allspark.registry import BASELINES

__all__ = ["FlatFeatureBaseline", "flat_features"]


def flat_features(arrays: dict[str, np.ndarray], inputs: Sequence[str], pool: int | None = None,
                  keep_nan: bool = False) -> np.ndarray:
    """[n, features]: the ``inputs`` fields flattened per sample (image-like ones pooled first) and concatenated."""
    cols = []
    for key in inputs:
        x = np.asarray(arrays[key])
        if x.dtype == object:
            raise ValueError(f"baseline input {key!r} holds strings; use a text baseline (tfidf_logistic)")
        x = x.astype(np.float32)
        if pool and x.ndim >= 4:
            t = torch.from_numpy(x)
            lead = t.shape[:-2]
            t = torch.nn.functional.adaptive_avg_pool2d(t.reshape(-1, 1, *t.shape[-2:]), pool)
            x = t.reshape(*lead, pool, pool).numpy()
        cols.append(x.reshape(len(x), -1))
    out = np.concatenate(cols, axis=1)
    if not keep_nan:
        out = np.nan_to_num(out, nan=0.0, posinf=0.0, neginf=0.0)
    return out


class FlatFeatureBaseline(Baseline):
    """A scikit-learn estimator on flattened input fields (see the module docstring)."""

    #: name used in messages; subclasses set ``_make(classification, n_outputs)``
    keep_nan = False

    def __init__(self, info: dict[str, Any], inputs: Sequence[str] | str | None = None, pool: int | None = None,
                 max_train_samples: int | None = None, seed: int = 0, **estimator_args: Any) -> None:
        super().__init__(info)
        if not inputs:
            raise ValueError(f"{type(self).__name__} needs 'inputs': the batch fields to use as features "
                             "(e.g. [spectrum] or [image])")
        self.inputs = [inputs] if isinstance(inputs, str) else list(inputs)
        self.pool = int(pool) if pool else None
        self.max_train_samples = int(max_train_samples) if max_train_samples else None
        self.seed = int(seed)
        self.estimator_args = estimator_args
        self.model = None
        self._target_shape: tuple[int, ...] = ()
        self._make(True, 1)  # fail at construction on an argument the estimator does not take

    def _make(self, classification: bool, n_outputs: int):  # pragma: no cover - interface
        raise NotImplementedError

    def _features(self, dataset) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        keys = list(dict.fromkeys([*self.inputs, self.target_key]))
        arrays = split_arrays(dataset, keys)
        return flat_features(arrays, self.inputs, self.pool, self.keep_nan), arrays

    def fit(self, train_set, model=None) -> None:
        x, arrays = self._features(train_set)
        y = arrays[self.target_key]
        classification = self.label_key is not None
        if classification:
            keep = y >= 0
            x, y = x[keep], y[keep].astype(np.int64)
        else:
            self._target_shape = y.shape[1:]
            y = y.reshape(len(y), -1).astype(np.float64)
            keep = np.isfinite(y).all(axis=1)
            x, y = x[keep], y[keep]
            if y.shape[1] == 1:
                y = y[:, 0]
        if len(x) == 0:
            raise ValueError(f"baseline {type(self).__name__}: the training split has no labelled sample")
        if self.max_train_samples and len(x) > self.max_train_samples:
            pick = np.random.default_rng(self.seed).choice(len(x), self.max_train_samples, replace=False)
            x, y = x[np.sort(pick)], y[np.sort(pick)]
        self.model = self._make(classification, 1 if y.ndim == 1 else y.shape[1])
        self.model.fit(x, y)

    def predict(self, dataset, model=None) -> dict[str, np.ndarray]:
        x, _ = self._features(dataset)
        pred = self.model.predict(x)
        if self.label_key is not None:
            return {"pred": pred.astype(np.int64)}
        return {"pred": np.asarray(pred, dtype=np.float32).reshape(len(x), *self._target_shape)}


def _scaled(estimator):
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    return make_pipeline(StandardScaler(), estimator)


@BASELINES.register("logistic_regression")
class LogisticRegressionBaseline(FlatFeatureBaseline):
    """Standardised features -> L2 logistic regression (classification) or ridge regression (regression)."""

    def _make(self, classification, n_outputs):
        from sklearn.linear_model import LogisticRegression, Ridge

        args = {"C": 1.0, "max_iter": 1000, **self.estimator_args}
        if classification:
            return _scaled(LogisticRegression(**args))
        return _scaled(Ridge(alpha=1.0 / args["C"]))


@BASELINES.register("ridge")
class RidgeBaseline(FlatFeatureBaseline):
    """Standardised features -> ridge regression (RidgeClassifier for a classification task)."""

    def _make(self, classification, n_outputs):
        from sklearn.linear_model import Ridge, RidgeClassifier

        return _scaled((RidgeClassifier if classification else Ridge)(**{"alpha": 1.0, **self.estimator_args}))


@BASELINES.register("svm")
class SVMBaseline(FlatFeatureBaseline):
    """Standardised features -> RBF support vector machine (SVC / SVR; one SVR per output)."""

    def _make(self, classification, n_outputs):
        from sklearn.multioutput import MultiOutputRegressor
        from sklearn.svm import SVC, SVR

        args = {"C": 10.0, "gamma": "scale", **self.estimator_args}
        if classification:
            return _scaled(SVC(**args))
        svr = SVR(**args)
        return _scaled(svr if n_outputs == 1 else MultiOutputRegressor(svr))


@BASELINES.register("random_forest")
class RandomForestBaseline(FlatFeatureBaseline):
    """Random forest (classifier or multi-output regressor), 200 trees by default, seeded."""

    def _make(self, classification, n_outputs):
        from sklearn.ensemble import RandomForestClassifier, RandomForestRegressor

        args = {"n_estimators": 200, "random_state": self.seed, "n_jobs": 1, **self.estimator_args}
        return (RandomForestClassifier if classification else RandomForestRegressor)(**args)


@BASELINES.register("gradient_boosting")
class GradientBoostingBaseline(FlatFeatureBaseline):
    """Histogram gradient-boosted trees (scikit-learn's LightGBM-style booster; NaN handled natively)."""

    keep_nan = True

    def _make(self, classification, n_outputs):
        from sklearn.ensemble import HistGradientBoostingClassifier, HistGradientBoostingRegressor
        from sklearn.multioutput import MultiOutputRegressor

        args = {"random_state": self.seed, **self.estimator_args}
        if classification:
            return HistGradientBoostingClassifier(**args)
        reg = HistGradientBoostingRegressor(**args)
        return reg if n_outputs == 1 else MultiOutputRegressor(reg)


@BASELINES.register("knn")
class KNNBaseline(FlatFeatureBaseline):
    """Standardised features -> k nearest neighbours (k = 5 by default)."""

    def _make(self, classification, n_outputs):
        from sklearn.neighbors import KNeighborsClassifier, KNeighborsRegressor

        args = {"n_neighbors": 5, **self.estimator_args}
        return _scaled((KNeighborsClassifier if classification else KNeighborsRegressor)(**args))


def point_shape_features(points: np.ndarray, bins: int = 32, pairs: int = 2048, seed: int = 0) -> np.ndarray:
    """Order-free shape descriptors of point sets [n, P, 3] -> [n, bins + 6]: the D2 shape distribution
    (histogram of distances between random point pairs, over [0, 2] for a cloud in the unit ball) and the sorted
    eigenvalues and axis spreads of the centred cloud's covariance (Osada et al.'s shape distributions)."""
    rng = np.random.default_rng(seed)
    pts = np.asarray(points, dtype=np.float64)
    n, p, _ = pts.shape
    i, j = rng.integers(0, p, size=(2, pairs))
    centred = pts - pts.mean(axis=1, keepdims=True)
    scale = np.linalg.norm(centred, axis=-1).max(axis=1)[:, None, None]
    centred = centred / np.maximum(scale, 1e-12)
    d = np.linalg.norm(centred[:, i] - centred[:, j], axis=-1)
    hist = np.stack([np.histogram(row, bins=bins, range=(0.0, 2.0))[0] for row in d]) / pairs
    cov = np.einsum("npi,npj->nij", centred, centred) / p
    eig = np.sort(np.linalg.eigvalsh(cov), axis=1)[:, ::-1]
    return np.concatenate([hist, eig, np.abs(centred).mean(axis=1)], axis=1)


@BASELINES.register("point_knn")
class PointKNNBaseline(Baseline):
    """k nearest neighbours on order-free shape features of the point clouds (:func:`point_shape_features`)."""

    def __init__(self, info: dict[str, Any], input_key: str = "points", n_neighbors: int = 5, bins: int = 32) -> None:
        super().__init__(info)
        self.input_key, self.n_neighbors, self.bins = input_key, int(n_neighbors), int(bins)
        self.model = None

    def _xy(self, dataset):
        data = split_arrays(dataset, [self.input_key, self.target_key])
        return point_shape_features(data[self.input_key], self.bins), data[self.target_key]

    def fit(self, train_set, model=None) -> None:
        from sklearn.neighbors import KNeighborsClassifier

        x, y = self._xy(train_set)
        keep = y >= 0
        self.model = _scaled(KNeighborsClassifier(n_neighbors=self.n_neighbors)).fit(x[keep], y[keep])

    def predict(self, dataset, model=None) -> dict[str, np.ndarray]:
        return {"pred": self.model.predict(self._xy(dataset)[0]).astype(np.int64)}


@BASELINES.register("pixel_embedding")
class PixelEmbeddingBaseline(Baseline):
    """Retrieval baseline for re-identification: each image's average-pooled pixels (grey levels with
    ``grey: true``, the classical way to compare visible with near-infrared images), standardised and
    PCA-whitened on the training split, L2-normalised; the protocol ranks the gallery by cosine distance."""

    def __init__(self, info: dict[str, Any], input_key: str = "image", pool: int = 8, grey: bool = True,
                 components: int = 64) -> None:
        super().__init__(info)
        self.input_key, self.pool, self.grey, self.components = input_key, int(pool), bool(grey), int(components)
        self.model = None

    def _raw(self, dataset) -> np.ndarray:
        x = split_arrays(dataset, [self.input_key])[self.input_key].astype(np.float32)
        if self.grey and x.ndim == 4:
            x = x.mean(axis=1, keepdims=True)
        return flat_features({"x": x}, ["x"], self.pool)

    def fit(self, train_set, model=None) -> None:
        from sklearn.decomposition import PCA

        x = self._raw(train_set)
        self.model = _scaled(PCA(n_components=min(self.components, *x.shape), whiten=True, random_state=0)).fit(x)

    def predict(self, dataset, model=None) -> dict[str, np.ndarray]:
        z = self.model.transform(self._raw(dataset))
        return {"embedding": (z / np.maximum(np.linalg.norm(z, axis=1, keepdims=True), 1e-12)).astype(np.float32)}
