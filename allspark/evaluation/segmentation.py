"""Semantic-segmentation protocol over whole tiles (ISPRS Vaihingen, Globe230k).

The readers cut every tile into windows (``allspark/data/segmentation_tiles.py``); the model predicts each
window; this protocol stitches the windows' *owned* parts back into whole tiles (``allspark/data/tiling.py``)
and scores every labelled pixel of every tile once: ``OA``, per-class ``IoU`` and ``F1``, ``mIoU`` / ``mF1``
over ``mean_classes`` (Vaihingen: the five foreground classes, clutter/background left out, as the ISPRS
benchmark's mean F1), ``mIoU_all`` / ``mF1_all`` over every class, kappa and the confusion matrix
(:func:`allspark.metrics.segmentation.segmentation_metrics`). Baselines go through the same stitching.

The report shows the confusion matrix and, for the first ``num_plot`` tiles of the split, the ground truth, the
stitched prediction and the wrongly predicted pixels, in the dataset's label colours.

:func:`predict_tile` is tiled inference for one tile given as arrays (new data, or a tile to compare with a
whole-tile forward): windows through the model, owned parts stitched.
"""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch

from allspark.data.tiling import sliding_window, stitch
from allspark.evaluation import Evaluator, savefig
from allspark.evaluation.classification import plot_confusion_matrix
from allspark.metrics.segmentation import segmentation_metrics
from allspark.registry import EVALUATORS

__all__ = ["SegmentationEvaluator", "predict_tile", "stitched_maps"]


def stitched_maps(gathered: dict[str, np.ndarray], key: str) -> dict[int, np.ndarray]:
    """``gathered[key]`` (per window [n, p, p]) stitched into whole tiles by their owned boxes."""
    return stitch(gathered[key], gathered["tile"], gathered["window"], gathered["owned"], fill=-1)


def predict_tile(model, inputs: dict[str, torch.Tensor], *, patch: int | None = None, stride: int | None = None,
                 batch_size: int = 16, output: str = "pred") -> torch.Tensor:
    """Tiled inference over one tile: ``inputs`` {batch key: standardised [C, H, W]} cut into ``patch`` windows
    every ``stride`` pixels (defaults: the training patch of ``model.info`` and non-overlapping windows), each
    window through ``model.predict``, the owned parts of its ``output`` (``pred`` [H, W], or ``logits`` [K, H, W]
    with the head's ``output_logits``) stitched."""
    patch = int(patch if patch is not None else model.info["patch"])
    stride = int(stride if stride is not None else patch)
    device = next(model.parameters()).device

    def run(batch: dict[str, torch.Tensor]) -> torch.Tensor:
        out = model.predict({k: v.to(device) for k, v in batch.items()})
        if output not in out:
            raise ValueError(f"predict_tile: the model's predictions have {sorted(out)}, not {output!r} "
                             "(logits need model.head.args.output_logits: true)")
        return out[output].cpu()

    return sliding_window(run, inputs, patch, stride, batch_size)


@EVALUATORS.register("segmentation")
class SegmentationEvaluator(Evaluator):
    pred_keys = ("pred",)
    batch_keys = ("label", "tile", "window", "owned", "index")

    def __init__(self, info: dict[str, Any], mean_classes: Sequence[str] | None = None, label_key: str = "label",
                 num_plot: int = 4) -> None:
        super().__init__(info)
        if "num_classes" not in info:
            raise ValueError("segmentation evaluation needs 'num_classes' in the dataset info")
        names = [str(n) for n in info.get("class_names") or range(int(info["num_classes"]))]
        if mean_classes is not None:
            from allspark.config import ConfigError

            unknown = [n for n in mean_classes if n not in names]
            if unknown:
                raise ConfigError(f"eval.args.mean_classes: {unknown} are not class names of the dataset; its "
                                  f"classes are {names}")
        self.names, self.mean_classes = names, (list(mean_classes) if mean_classes is not None else None)
        self.label_key = label_key
        self.batch_keys = (label_key, "tile", "window", "owned", "index")
        self.num_plot = int(num_plot)

    def _pixels(self, gathered: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray, int]:
        preds, truths = stitched_maps(gathered, "pred"), stitched_maps(gathered, self.label_key)
        for t, p in preds.items():
            if (p < 0).any():
                raise RuntimeError(f"segmentation: {int((p < 0).sum())} pixels of tile {t} are owned by no window; "
                                   "the split's windows do not cover its tiles")
        order = sorted(preds)
        return (np.concatenate([preds[t].ravel() for t in order]),
                np.concatenate([truths[t].ravel() for t in order]), len(order))

    def compute(self, gathered: dict[str, np.ndarray]) -> dict[str, Any]:
        pred, truth, tiles = self._pixels(gathered)
        metrics = segmentation_metrics(pred, truth, int(self.info["num_classes"]), self.names, self.mean_classes,
                                       ignore_index=int(self.info.get("ignore_index", -1)))
        metrics["num_tiles"] = tiles
        return metrics

    def _colours(self) -> np.ndarray:
        k = int(self.info["num_classes"])
        if self.info.get("palette"):
            return np.asarray(self.info["palette"], np.float64) / 255.0
        import matplotlib.pyplot as plt

        return plt.get_cmap("tab10" if k <= 10 else "tab20")(np.arange(k) % 20)[:, :3]

    def figures(self, gathered, metrics, extra, out_dir):
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        plot_confusion_matrix(np.array(metrics["confusion_matrix"]), self.names, out_dir / "confusion_matrix.png")
        figs = [("Confusion matrix (pixels of the split)", "confusion_matrix.png")]
        preds, truths = stitched_maps(gathered, "pred"), stitched_maps(gathered, self.label_key)
        tiles = sorted(preds)[: self.num_plot]
        if not tiles:
            return figs
        colours = self._colours()
        fig, axes = plt.subplots(len(tiles), 3, figsize=(10, 3.4 * len(tiles)), squeeze=False)
        for row, t in zip(axes, tiles):
            truth, pred = truths[t].astype(np.int64), preds[t].astype(np.int64)
            unlabelled = truth < 0
            shown_truth = colours[truth.clip(0)]
            shown_truth[unlabelled] = 0.0
            wrong = (pred != truth) & ~unlabelled
            errors = np.ones(truth.shape + (3,))
            errors[wrong] = (0.85, 0.1, 0.1)
            errors[unlabelled] = 0.6
            acc = 1.0 - wrong.sum() / max(int((~unlabelled).sum()), 1)
            for ax, img, title in ((row[0], shown_truth, f"tile {t}: ground truth"),
                                   (row[1], colours[pred], "prediction (stitched windows)"),
                                   (row[2], errors, f"errors (red), pixel accuracy {acc:.3f}")):
                ax.imshow(img, interpolation="nearest")
                ax.set_title(title, fontsize=9)
                ax.set_xticks([])  # no ticks, but the frame: white (impervious surfaces) stays visible
                ax.set_yticks([])
        handles = [plt.Rectangle((0, 0), 1, 1, facecolor=colours[i], edgecolor="k", lw=0.5)
                   for i in range(len(self.names))]
        fig.legend(handles, self.names, loc="lower center", ncol=min(len(self.names), 5), fontsize=8)
        fig.suptitle("  ".join(f"{k} {metrics[k]:.3f}" for k in ("OA", "mIoU", "mF1")
                               if isinstance(metrics.get(k), float)))
        savefig(fig, out_dir / "prediction_maps.png")
        figs.append((f"Prediction maps of the first {len(tiles)} tiles (truth, prediction, errors)",
                     "prediction_maps.png"))
        return figs
