"""Semantic-segmentation metrics over labelled pixels, computed with torchmetrics: overall accuracy (``OA``),
per-class IoU and F1, their means (``mIoU``, ``mF1``) over a chosen set of classes (the ISPRS benchmarks average
F1 over the five foreground classes of Vaihingen, leaving clutter/background out), the means over every class
(``mIoU_all``, ``mF1_all``), Cohen's kappa and the confusion matrix.

A class with no pixel in the truth and none in the prediction has no IoU or F1 (``None``) and is left out of the
means (as mmsegmentation's ``nanmean``); a class predicted but absent from the truth scores 0.
"""
from __future__ import annotations

from typing import Any, Sequence

import torch
from torchmetrics.functional.classification import (
    multiclass_accuracy,
    multiclass_cohen_kappa,
    multiclass_confusion_matrix,
    multiclass_f1_score,
    multiclass_jaccard_index,
)

from allspark.registry import METRICS

__all__ = ["segmentation_metrics"]


def _mean(values: dict[str, float | None], names: Sequence[str]) -> float | None:
    kept = [values[n] for n in names if values[n] is not None]
    return float(sum(kept) / len(kept)) if kept else None


@METRICS.register("segmentation")
def segmentation_metrics(pred: Any, target: Any, num_classes: int, class_names: Sequence[str] | None = None,
                         mean_classes: Sequence[str] | None = None, ignore_index: int = -1) -> dict[str, Any]:
    """``pred`` and ``target``: class indices of the same pixels (any shape, flattened); target pixels equal to
    ``ignore_index`` are skipped. ``mean_classes``: the class names ``mIoU`` and ``mF1`` average over (default:
    every class)."""
    pred = torch.as_tensor(pred).long().flatten()
    target = torch.as_tensor(target).long().flatten()
    if pred.shape != target.shape:
        raise ValueError(f"pred and target differ in size: {pred.numel()} vs {target.numel()} pixels")
    keep = target != ignore_index
    pred, target = pred[keep], target[keep]
    if target.numel() == 0:
        raise ValueError("no labelled pixel to score")
    if (target < 0).any() or (target >= num_classes).any() or (pred < 0).any() or (pred >= num_classes).any():
        raise ValueError(f"class indices must lie in [0, {num_classes})")
    names = [str(n) for n in class_names] if class_names is not None else [str(i) for i in range(num_classes)]
    if len(names) != num_classes:
        raise ValueError(f"{len(names)} class names for {num_classes} classes")
    chosen = list(names) if mean_classes is None else [str(n) for n in mean_classes]
    unknown = [n for n in chosen if n not in names]
    if unknown:
        raise ValueError(f"mean_classes {unknown} are not class names; the classes are {names}")
    cm = multiclass_confusion_matrix(pred, target, num_classes)  # rows: truth, columns: prediction
    tp = cm.diag()
    union = cm.sum(0) + cm.sum(1) - tp
    defined = union > 0
    iou = multiclass_jaccard_index(pred, target, num_classes, average=None)
    f1 = multiclass_f1_score(pred, target, num_classes, average=None)
    per_iou = {n: (float(v) if d else None) for n, v, d in zip(names, iou, defined)}
    per_f1 = {n: (float(v) if d else None) for n, v, d in zip(names, f1, defined)}
    oa = float(multiclass_accuracy(pred, target, num_classes, average="micro"))
    return {
        "OA": oa,
        "mIoU": _mean(per_iou, chosen),
        "mF1": _mean(per_f1, chosen),
        "mIoU_all": _mean(per_iou, names),
        "mF1_all": _mean(per_f1, names),
        "kappa": float(multiclass_cohen_kappa(pred, target, num_classes)),
        "IoU": per_iou,
        "F1": per_f1,
        "support": {n: int(s) for n, s in zip(names, cm.sum(1))},
        "confusion_matrix": cm.tolist(),
        "num_pixels": int(target.numel()),
    }
