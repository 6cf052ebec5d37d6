"""Classification metrics: overall accuracy (OA / top1), average accuracy (AA), Cohen's kappa,
per-class accuracy and the confusion matrix, computed with torchmetrics."""
from __future__ import annotations

from typing import Any, Sequence

import torch
from torchmetrics.functional.classification import (
    multiclass_accuracy,
    multiclass_cohen_kappa,
    multiclass_confusion_matrix,
)

from allspark.registry import METRICS


@METRICS.register("classification")
def classification_metrics(
    pred: torch.Tensor,
    target: torch.Tensor,
    num_classes: int,
    class_names: Sequence[str] | None = None,
    ignore_index: int = -1,
) -> dict[str, Any]:
    """``pred`` and ``target`` are class indices [n]; targets equal to ``ignore_index`` are skipped.

    AA is the mean of the per-class recalls over classes present in ``target`` (a class with no test
    sample has no accuracy and is reported as null).
    """
    pred = torch.as_tensor(pred).long().flatten()
    target = torch.as_tensor(target).long().flatten()
    if pred.shape != target.shape:
        raise ValueError(f"pred and target differ in length: {pred.numel()} vs {target.numel()}")
    keep = target != ignore_index
    pred, target = pred[keep], target[keep]
    if target.numel() == 0:
        raise ValueError("no labelled samples to score")
    if (target < 0).any() or (target >= num_classes).any() or (pred < 0).any() or (pred >= num_classes).any():
        raise ValueError(f"class indices must lie in [0, {num_classes})")
    names = list(class_names) if class_names is not None else [str(i) for i in range(num_classes)]
    if len(names) != num_classes:
        raise ValueError(f"{len(names)} class names for {num_classes} classes")
    cm = multiclass_confusion_matrix(pred, target, num_classes)
    support = cm.sum(dim=1)
    per_class = multiclass_accuracy(pred, target, num_classes, average=None)
    present = support > 0
    oa = multiclass_accuracy(pred, target, num_classes, average="micro").item()
    return {
        "OA": oa,
        "top1": oa,
        "AA": per_class[present].mean().item(),
        "kappa": multiclass_cohen_kappa(pred, target, num_classes).item(),
        "per_class": {n: (a.item() if s else None) for n, a, s in zip(names, per_class, present)},
        "support": {n: int(s) for n, s in zip(names, support)},
        "confusion_matrix": cm.tolist(),
        "num_samples": int(target.numel()),
    }
