"""Multi-view depth protocol for oblique photography (AllSpark Section IV-B, WHU-OMVS, Eq. 7): PAG6, PAG10
(share of valid pixels within 0.6 m / 1.0 m of the truth) and MAE in metres, over the valid ground-truth
pixels of every reference view of the split.

Two constant predictions are scored on the same pixels (``baseline/...``), so metrics.json shows what the
model adds: ``range_mid`` predicts the middle of each reference camera's [dmin, dmax] everywhere (what a
model knows before it sees the images), ``image_median`` the median of each image's own true depths
(the best constant per image, an upper bound for any constant prediction; it uses the truth).
"""
from __future__ import annotations

from typing import Any

import numpy as np

from allspark.evaluation import Evaluator, savefig
from allspark.metrics.depth import depth_metrics
from allspark.registry import EVALUATORS

__all__ = ["MultiViewDepthEvaluator"]


@EVALUATORS.register("mvs_depth")
class MultiViewDepthEvaluator(Evaluator):
    pred_keys = ("pred", "confidence")
    batch_keys = ("depth", "depth_range", "index")

    def __init__(self, info: dict[str, Any], num_plot: int = 4) -> None:
        super().__init__(info)
        self.num_plot = num_plot

    def compute(self, gathered: dict[str, np.ndarray]) -> dict[str, Any]:
        pred, truth = gathered["pred"].astype(np.float64), gathered["depth"]
        metrics: dict[str, Any] = dict(depth_metrics(pred, truth))
        valid = np.isfinite(truth) & (truth > 0)
        mid = gathered["depth_range"].mean(axis=1)[:, None, None] * np.ones_like(truth)
        med = np.stack([np.full(t.shape, np.median(t[v]) if v.any() else 0.0) for t, v in zip(truth, valid)])
        for name, base in (("range_mid", mid), ("image_median", med)):
            scores = depth_metrics(base, truth)
            metrics.update({f"baseline/{name}/{k}": v for k, v in scores.items() if k != "num_pixels"})
        metrics["num_views"] = int(truth.shape[0])
        return metrics

    def figures(self, gathered, metrics, extra, out_dir):
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        pred, truth, conf = gathered["pred"], gathered["depth"], gathered["confidence"]
        n = min(self.num_plot, len(pred))
        fig, axes = plt.subplots(n, 4, figsize=(12, 2.4 * n), squeeze=False)
        for row in range(n):
            valid = truth[row] > 0
            lo, hi = np.percentile(truth[row][valid], [1, 99]) if valid.any() else (pred[row].min(), pred[row].max())
            err = np.where(valid, np.abs(pred[row] - truth[row]), np.nan)
            panels = [(np.where(valid, truth[row], np.nan), "truth (m)", "viridis"),
                      (pred[row], "prediction (m)", "viridis"), (err, "|error| (m)", "magma"),
                      (conf[row], "confidence", "gray")]
            for ax, (data, title, cmap) in zip(axes[row], panels):
                vmin, vmax = {"|error| (m)": (0.0, 2.0), "confidence": (0.0, 1.0)}.get(title, (lo, hi))
                im = ax.imshow(data, cmap=cmap, vmin=vmin, vmax=vmax)
                fig.colorbar(im, ax=ax, fraction=0.046)
                ax.set_title(title, fontsize=9)
                ax.axis("off")
        fig.suptitle(f"PAG6 {metrics['PAG6']:.3f}  PAG10 {metrics['PAG10']:.3f}  MAE {metrics['MAE']:.2f} m")
        savefig(fig, out_dir / "depth_vs_truth.png")
        figs = [("Depth vs truth (test split, reference views)", "depth_vs_truth.png")]

        valid = truth > 0
        err = np.abs(pred - truth)[valid]
        fig, ax = plt.subplots(figsize=(5, 3.5))
        ax.hist(np.clip(err, 0, 5), bins=50, color="tab:blue")
        for t, name in ((0.6, "PAG6"), (1.0, "PAG10")):
            ax.axvline(t, color="k", ls="--", lw=1)
            ax.text(t, ax.get_ylim()[1] * 0.9, f" {name}", fontsize=8)
        ax.set_xlabel("absolute depth error (m, clipped at 5)")
        ax.set_ylabel("pixels")
        savefig(fig, out_dir / "error_histogram.png")
        figs.append(("Depth error distribution", "error_histogram.png"))
        return figs
