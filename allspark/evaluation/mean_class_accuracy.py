"""Classification scored as in the point-cloud literature: overall ``top1`` beside ``mAcc``, the mean
class accuracy (mean of the per-class recalls, the quantity remote-sensing papers call AA). Kept as its
own protocol so the names in ``metrics.json`` follow the point-cloud papers without changing ``hsi``'s."""
from __future__ import annotations

from allspark.evaluation.classification import ClassificationEvaluator
from allspark.registry import EVALUATORS

__all__ = ["MeanClassAccuracyEvaluator"]


@EVALUATORS.register("classification_macc")
class MeanClassAccuracyEvaluator(ClassificationEvaluator):
    """``top1``, ``mAcc``, per-class accuracy and the confusion matrix (plus OA/AA/kappa)."""

    def compute(self, gathered):
        metrics = super().compute(gathered)
        return {"top1": metrics["top1"], "mAcc": metrics["AA"], **metrics}
