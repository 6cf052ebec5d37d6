"""Evaluation protocols (registered in ``EVALUATORS``) and the machinery behind ``evaluate.py``.

A protocol says which predictions and batch fields it needs, turns the gathered values of a whole split
into metrics, and writes a report with figures. Predictions are gathered across processes with
``accelerator.gather_for_metrics``, which drops the samples duplicated to even out the last batch.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch

from allspark.io import atomic_file, atomic_write_text
from allspark.metrics.classification import classification_metrics
from allspark.registry import EVALUATORS

logger = logging.getLogger(__name__)

__all__ = [
    "Evaluator",
    "ClassificationEvaluator",
    "PixelClassificationEvaluator",
    "collect_predictions",
    "build_evaluator",
    "write_metrics",
]


@torch.no_grad()
def collect_predictions(model, loader, accelerator, pred_keys, batch_keys, desc: str = "eval") -> dict[str, np.ndarray]:
    """Run ``model`` over ``loader`` and gather ``pred_keys`` of its output and ``batch_keys`` of the
    batch from every process, without the padding duplicates; returns numpy arrays on every process."""
    from tqdm.auto import tqdm

    model.eval()
    parts: dict[str, list[torch.Tensor]] = {k: [] for k in (*pred_keys, *batch_keys)}
    for batch in tqdm(loader, desc=desc, disable=not accelerator.is_local_main_process, leave=False):
        out = model(batch)
        values = {k: out.predictions[k] for k in pred_keys}
        values.update({k: batch[k] for k in batch_keys})
        values = accelerator.gather_for_metrics({k: v.contiguous() for k, v in values.items()})
        for k, v in values.items():
            parts[k].append(v.detach().float().cpu() if v.is_floating_point() else v.detach().cpu())
    out = {k: torch.cat(v).numpy() if v else np.zeros(0) for k, v in parts.items()}
    if "index" in out and len(np.unique(out["index"])) != len(out["index"]):
        raise RuntimeError(f"{desc}: gathered predictions repeat samples ({len(out['index'])} rows, "
                           f"{len(np.unique(out['index']))} distinct); the loader was not prepared by accelerate?")
    return out


class Evaluator:
    """Base protocol. ``splits`` lists extra splits the report needs beyond the scored one."""

    pred_keys: tuple[str, ...] = ("pred",)
    batch_keys: tuple[str, ...] = ("index",)
    extra_splits: tuple[str, ...] = ()

    def __init__(self, info: dict[str, Any]) -> None:
        self.info = info

    def compute(self, gathered: dict[str, np.ndarray]) -> dict[str, Any]:
        raise NotImplementedError

    def figures(self, gathered: dict[str, np.ndarray], metrics: dict[str, Any], extra: dict[str, dict],
                out_dir: Path) -> list[tuple[str, str]]:
        """Write figures into ``out_dir``; return (caption, file name) pairs for the report."""
        return []

    def report(self, gathered: dict[str, np.ndarray], metrics: dict[str, Any], extra: dict[str, dict],
               out_dir: Path, title: str) -> Path:
        out_dir.mkdir(parents=True, exist_ok=True)
        figs = self.figures(gathered, metrics, extra, out_dir)
        lines = [f"# {title}", "", "## Metrics", "", "| metric | value |", "| --- | --- |"]
        for k, v in metrics.items():
            if isinstance(v, (int, float)):
                lines.append(f"| {k} | {v:.4f} |" if isinstance(v, float) else f"| {k} | {v} |")
        for k, v in metrics.items():
            if isinstance(v, dict) and v and all(isinstance(x, (int, float, type(None))) for x in v.values()):
                lines += ["", f"### {k}", "", "| name | value |", "| --- | --- |"]
                lines += [f"| {n} | {'-' if x is None else (f'{x:.4f}' if isinstance(x, float) else x)} |" for n, x in v.items()]
        for caption, name in figs:
            lines += ["", f"## {caption}", "", f"![{caption}]({name})"]
        path = out_dir / "report.md"
        atomic_write_text(path, "\n".join(lines) + "\n")
        return path


def _savefig(fig, path: Path) -> None:
    import matplotlib.pyplot as plt

    with atomic_file(path) as tmp:
        fig.savefig(tmp, dpi=120, bbox_inches="tight", format="png")
    plt.close(fig)


def plot_confusion_matrix(cm: np.ndarray, names: list[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cm = np.asarray(cm, dtype=float)
    norm = cm / np.maximum(cm.sum(axis=1, keepdims=True), 1)
    size = max(4.0, 0.45 * len(names) + 2)
    fig, ax = plt.subplots(figsize=(size, size))
    im = ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(len(names)), names, rotation=60, ha="right", fontsize=8)
    ax.set_yticks(range(len(names)), names, fontsize=8)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    if len(names) <= 20:
        for i in range(len(names)):
            for j in range(len(names)):
                if cm[i, j]:
                    ax.text(j, i, int(cm[i, j]), ha="center", va="center", fontsize=7,
                            color="white" if norm[i, j] > 0.5 else "black")
    fig.colorbar(im, ax=ax, fraction=0.046, label="row-normalised")
    ax.set_title("Confusion matrix")
    _savefig(fig, path)


@EVALUATORS.register("classification")
class ClassificationEvaluator(Evaluator):
    """Top-1 / OA, AA, kappa, per-class accuracy and a confusion matrix."""

    pred_keys = ("pred",)
    batch_keys = ("label", "index")

    def __init__(self, info: dict[str, Any], label_key: str = "label") -> None:
        super().__init__(info)
        self.batch_keys = (label_key, "index")
        self.label_key = label_key
        if "num_classes" not in info:
            raise ValueError("classification evaluation needs 'num_classes' in the dataset info")

    def compute(self, gathered):
        return classification_metrics(
            gathered["pred"], gathered[self.label_key], self.info["num_classes"], self.info.get("class_names")
        )

    def figures(self, gathered, metrics, extra, out_dir):
        names = list(self.info.get("class_names") or range(self.info["num_classes"]))
        plot_confusion_matrix(np.array(metrics["confusion_matrix"]), [str(n) for n in names],
                              out_dir / "confusion_matrix.png")
        return [("Confusion matrix (test split)", "confusion_matrix.png")]


@EVALUATORS.register("pixel_classification")
class PixelClassificationEvaluator(ClassificationEvaluator):
    """Classification of scene pixels (HSI): the classification metrics plus a map of the whole scene
    (every pixel predicted, from the reader's ``scene`` split) beside the ground truth."""

    extra_splits = ("scene",)

    def __init__(self, info: dict[str, Any], label_key: str = "label", scene_map: bool = True) -> None:
        super().__init__(info, label_key)
        self.batch_keys = (label_key, "index", "coords")
        self.extra_splits = ("scene",) if scene_map else ()

    def figures(self, gathered, metrics, extra, out_dir):
        figs = super().figures(gathered, metrics, extra, out_dir)
        if "scene" in extra:
            self.plot_scene_map(extra["scene"], out_dir / "classification_map.png")
            figs.append(("Classification map of the whole scene (left) and ground truth (right)",
                         "classification_map.png"))
        return figs

    def plot_scene_map(self, scene: dict[str, np.ndarray], path: Path) -> None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.colors import ListedColormap

        h, w = int(self.info["height"]), int(self.info["width"])
        k = int(self.info["num_classes"])
        pred_map = np.full((h, w), -1)
        gt_map = np.full((h, w), -1)
        rows, cols = scene["coords"][:, 0], scene["coords"][:, 1]
        pred_map[rows, cols] = scene["pred"]
        gt_map[rows, cols] = scene[self.label_key]
        colors = plt.get_cmap("tab20" if k > 10 else "tab10")(np.arange(k) % 20)
        cmap = ListedColormap(np.vstack([[0, 0, 0, 1], colors]))
        fig, axes = plt.subplots(1, 2, figsize=(10, 5 * h / max(w, 1) + 1))
        for ax, data, title in ((axes[0], pred_map, "prediction (every pixel)"), (axes[1], gt_map, "ground truth")):
            ax.imshow(data + 1, cmap=cmap, vmin=0, vmax=k, interpolation="nearest")
            ax.set_title(title)
            ax.axis("off")
        names = list(self.info.get("class_names") or range(k))
        handles = [plt.Rectangle((0, 0), 1, 1, color=colors[i]) for i in range(k)]
        fig.legend(handles, [str(n) for n in names], loc="lower center", ncol=min(k, 5), fontsize=8)
        _savefig(fig, path)


def build_evaluator(cfg, info: dict[str, Any]) -> Evaluator:
    return EVALUATORS.build({"type": cfg.eval.protocol, **cfg.eval.args}, info=info)


def write_metrics(path: Path, metrics: dict[str, Any]) -> None:
    atomic_write_text(path, json.dumps(metrics, indent=2, default=float) + "\n")
