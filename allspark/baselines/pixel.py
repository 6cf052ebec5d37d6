"""Per-pixel classifier baseline for semantic segmentation: each pixel classified from its own band values.

The features of a pixel are the standardised values of every band of the ``inputs`` rasters at that pixel (for
Vaihingen: IR, R, G and the DSM height), nothing of its neighbours: the classical pixel-wise classification that a
segmentation model's use of context and shape is measured against. The classifier (a random forest or a
logistic regression on standardised features, scikit-learn) is fitted on up to ``max_train_pixels`` labelled
pixels of the **training split's tiles**, drawn at random (``seed``) in proportion to each tile's labelled pixels.
It then predicts every pixel of each tile of the evaluated split once; the windows' predictions are cut from those
tile maps, so the segmentation protocol stitches and scores them exactly as it does the model's.

Works with the tiled segmentation readers (:class:`allspark.data.segmentation_tiles.TiledSegmentation`).
"""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from allspark.baselines import Baseline
from allspark.registry import BASELINES

__all__ = ["PixelClassifierBaseline"]

ESTIMATORS = ("random_forest", "logistic_regression")


@BASELINES.register("pixel_classifier")
class PixelClassifierBaseline(Baseline):
    def __init__(self, info: dict[str, Any], inputs: Sequence[str] | None = None, estimator: str = "random_forest",
                 max_train_pixels: int = 20000, predict_chunk: int = 262144, seed: int = 0,
                 **estimator_args: Any) -> None:
        super().__init__(info)
        keys = list(info.get("raster_keys") or []) if inputs is None else [inputs] if isinstance(inputs, str) \
            else list(inputs)
        if not keys:
            raise ValueError("pixel_classifier needs 'inputs': the raster batch keys whose bands are the features")
        unknown = [k for k in keys if k not in (info.get("channels") or {})]
        if unknown:
            raise ValueError(f"pixel_classifier: inputs {unknown} are not rasters of the dataset; it has "
                             f"{sorted(info.get('channels') or {})}")
        if estimator not in ESTIMATORS:
            raise ValueError(f"pixel_classifier: estimator must be one of {list(ESTIMATORS)}, got {estimator!r}")
        if int(max_train_pixels) < 1 or int(predict_chunk) < 1:
            raise ValueError("pixel_classifier: max_train_pixels and predict_chunk must be >= 1")
        self.inputs, self.estimator = keys, estimator
        self.max_train_pixels, self.predict_chunk, self.seed = int(max_train_pixels), int(predict_chunk), int(seed)
        self.estimator_args = dict(estimator_args)
        self.model = None
        self._make()  # an argument the estimator does not take fails at construction

    def _make(self):
        if self.estimator == "random_forest":
            from sklearn.ensemble import RandomForestClassifier

            return RandomForestClassifier(**{"n_estimators": 50, "min_samples_leaf": 2, "random_state": self.seed,
                                             "n_jobs": 1, **self.estimator_args})
        from sklearn.linear_model import LogisticRegression
        from sklearn.pipeline import make_pipeline
        from sklearn.preprocessing import StandardScaler

        return make_pipeline(StandardScaler(), LogisticRegression(**{"C": 1.0, "max_iter": 1000,
                                                                     **self.estimator_args}))

    @staticmethod
    def _check(dataset) -> None:
        if not (hasattr(dataset, "normalised") and hasattr(dataset, "tile_labels") and hasattr(dataset, "windows")):
            raise ValueError(f"pixel_classifier works on the tiled segmentation readers; {type(dataset).__name__} "
                             "is not one")

    def _features(self, dataset, tile: int) -> np.ndarray:
        """[H * W, bands] of one tile."""
        parts = [dataset.normalised(tile, k) for k in self.inputs]  # each [C, H, W]
        x = np.concatenate(parts, axis=0)
        return x.reshape(x.shape[0], -1).T

    def fit(self, train_set, model=None) -> None:
        self._check(train_set)
        labels = train_set.tile_labels()
        counts = np.array([int((lab >= 0).sum()) for lab in labels])
        if counts.sum() == 0:
            raise ValueError("pixel_classifier: the training split has no labelled pixel")
        rng = np.random.default_rng(self.seed)
        share = min(1.0, self.max_train_pixels / counts.sum())
        xs, ys = [], []
        for t, lab in enumerate(labels):
            flat = lab.ravel()
            idx = np.flatnonzero(flat >= 0)
            take = min(len(idx), int(np.ceil(share * len(idx))))
            if take == 0:
                continue
            pick = np.sort(rng.choice(idx, take, replace=False))
            xs.append(self._features(train_set, t)[pick])
            ys.append(flat[pick].astype(np.int64))
        x, y = np.concatenate(xs), np.concatenate(ys)
        self.model = self._make().fit(x, y)

    def predict(self, dataset, model=None) -> dict[str, np.ndarray]:
        self._check(dataset)
        maps = []
        for t, lab in enumerate(dataset.tile_labels()):
            x = self._features(dataset, t)
            out = np.concatenate([self.model.predict(x[s:s + self.predict_chunk])
                                  for s in range(0, len(x), self.predict_chunk)])
            maps.append(out.reshape(lab.shape).astype(np.int16))
        p = dataset.patch
        return {"pred": np.stack([maps[t][y:y + p, x:x + p] for t, y, x, _ in dataset.windows])}
