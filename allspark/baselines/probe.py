"""Probes of the trained model without its language model: what the LLM path adds.

``encoder_probe`` reads the trained encoders' tokens (each encoder's masked mean token, concatenated); with
``features: bridge`` it reads the mean of the bridge tokens that enter the LLM instead. A linear read-out
(standardised features -> logistic regression for a classification task, ridge regression otherwise) is
fitted on the training split and scored on the evaluated split with the task's evaluator. If the probe scores
at or above the model, the frozen LLM and the head add nothing the encoder did not already know on this data.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import torch

from allspark.baselines import Baseline, split_arrays
from allspark.registry import BASELINES

__all__ = ["EncoderProbe"]


@BASELINES.register("encoder_probe")
class EncoderProbe(Baseline):
    needs_model = True

    def __init__(self, info: dict[str, Any], features: str = "encoders", C: float = 1.0, batch_size: int = 256,
                 max_train_samples: int | None = None, seed: int = 0) -> None:
        super().__init__(info)
        if features not in ("encoders", "bridge"):
            raise ValueError(f"encoder_probe: features must be 'encoders' or 'bridge', got {features!r}")
        self.features, self.C, self.batch_size = features, float(C), int(batch_size)
        self.max_train_samples, self.seed = max_train_samples, int(seed)
        self.model = None
        self._target_shape: tuple[int, ...] = ()

    @torch.no_grad()
    def _embed(self, dataset, model) -> np.ndarray:
        if not len(model.encoders):
            raise ValueError("encoder_probe: the model has no modality encoder (a text task reads token ids)")
        was_training = model.training
        model.eval()
        device = next(p for p in model.parameters()).device
        rows = []
        try:
            for start in range(0, len(dataset), self.batch_size):
                batch = dataset.collate([dataset[i] for i in range(start, min(start + self.batch_size, len(dataset)))])
                batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
                token_sets = model.encode_tokens(batch)
                if self.features == "bridge":
                    feats = model.encode(batch, token_sets).float().mean(dim=1)
                else:
                    feats = torch.cat([ts.mean().float() for ts in token_sets], dim=-1)
                rows.append(feats.cpu().numpy())
        finally:
            model.train(was_training)
        return np.concatenate(rows).astype(np.float64)

    def fit(self, train_set, model=None) -> None:
        from sklearn.linear_model import LogisticRegression, Ridge
        from sklearn.pipeline import make_pipeline
        from sklearn.preprocessing import StandardScaler

        x = self._embed(train_set, model)
        y = split_arrays(train_set, [self.target_key])[self.target_key]
        if self.label_key is not None:
            keep = y >= 0
            x, y = x[keep], y[keep].astype(np.int64)
            est = LogisticRegression(C=self.C, max_iter=2000)
        else:
            self._target_shape = y.shape[1:]
            y = y.reshape(len(y), -1).astype(np.float64)
            keep = np.isfinite(y).all(axis=1)
            x, y = x[keep], y[keep]
            est = Ridge(alpha=1.0 / self.C)
        if self.max_train_samples and len(x) > int(self.max_train_samples):
            pick = np.sort(np.random.default_rng(self.seed).choice(len(x), int(self.max_train_samples), replace=False))
            x, y = x[pick], y[pick]
        self.model = make_pipeline(StandardScaler(), est).fit(x, y)

    def predict(self, dataset, model=None) -> dict[str, np.ndarray]:
        pred = self.model.predict(self._embed(dataset, model))
        if self.label_key is not None:
            return {"pred": pred.astype(np.int64)}
        return {"pred": np.asarray(pred, dtype=np.float32).reshape(len(pred), *self._target_shape)}
