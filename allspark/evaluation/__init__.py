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
from allspark.registry import EVALUATORS

logger = logging.getLogger(__name__)

__all__ = [
    "Evaluator",
    "savefig",
    "collect_predictions",
    "build_evaluator",
    "write_metrics",
    "baseline_table",
]


def collect_predictions(model, loader, accelerator, pred_keys, batch_keys, desc: str = "eval", *,
                        inference_mode: bool = False, progress=None) -> dict[str, np.ndarray]:
    """Run ``model`` over ``loader`` and gather ``pred_keys`` of its output and ``batch_keys`` of the
    batch from every process, without the padding duplicates; returns numpy arrays on every process.

    No gradient is recorded (``torch.no_grad``); ``inference_mode=True`` runs under ``torch.inference_mode``
    instead, for callers whose model is not trained afterwards (a module that keeps a tensor made during the
    pass, such as the graph encoder's batched-graph cache, would hand an inference tensor to a later training
    step). The progress bar counts samples (rate and estimated time left); ``progress``: an outer tqdm bar to
    advance instead (e.g. the scene map's, over all tiles). The throughput is logged."""
    import time

    from tqdm.auto import tqdm

    model.eval()
    parts: dict[str, list[torch.Tensor]] = {k: [] for k in (*pred_keys, *batch_keys)}
    dataset = getattr(loader, "dataset", None)
    total = len(dataset) if dataset is not None and hasattr(dataset, "__len__") else None
    own = progress is None
    bar = tqdm(total=total, desc=desc, unit="sample", disable=not accelerator.is_local_main_process,
               leave=False) if own else progress
    count, start = 0, time.perf_counter()
    try:
        with torch.inference_mode() if inference_mode else torch.no_grad():
            for batch in loader:
                out = model(batch)
                values = {k: out.predictions[k] for k in pred_keys}
                values.update({k: batch[k] for k in batch_keys})
                values = accelerator.gather_for_metrics({k: v.contiguous() for k, v in values.items()})
                rows = 0
                for k, v in values.items():
                    parts[k].append(v.detach().float().cpu() if v.is_floating_point() else v.detach().cpu())
                    rows = len(v)
                count += rows
                bar.update(rows)
    finally:
        if own:
            bar.close()
    seconds = time.perf_counter() - start
    logger.info("%s: %d samples in %.1f s (%.1f samples/s)", desc, count, seconds, count / max(seconds, 1e-9))
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

    @property
    def main_metric(self) -> tuple[str, bool] | None:
        """(name, greater is better) of the metric a reader compares first; None: the run's
        ``train.metric_for_best`` / ``train.greater_is_better``."""
        return None

    def compute_baseline(self, gathered: dict[str, np.ndarray]) -> dict[str, Any]:
        """Metrics of a classical baseline's predictions (``allspark.baselines``): ``compute`` unless the
        protocol's model outputs hold more than a baseline predicts."""
        return self.compute(gathered)

    def predict_extra(self, name: str, model, dataset, accelerator, batch_size: int, num_workers: int | str = 0,
                      **loading: Any) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        """Predictions for the report's extra split ``name`` (one of ``extra_splits``) and any metrics about
        them (e.g. a scene map's pixels per second); by default the split's loader through the model.
        ``num_workers``, ``loading``: the DataLoader worker settings (:func:`allspark.data.build_loader`)."""
        from allspark.data import build_loader

        loader = accelerator.prepare(build_loader(dataset, batch_size, num_workers=num_workers, **loading))
        return collect_predictions(model, loader, accelerator, self.pred_keys, self.batch_keys, name), {}

    def model_metrics(self, model, dataset, accelerator=None) -> dict[str, Any]:
        """Metrics that need the model itself beyond its per-batch predictions (ranking candidates across
        a split, generation); ``evaluate.py`` adds them to ``compute``'s. None by default."""
        return {}

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
        lines += baseline_table(metrics)
        for caption, name in figs:
            lines += ["", f"## {caption}", "", f"![{caption}]({name})"]
        path = out_dir / "report.md"
        atomic_write_text(path, "\n".join(lines) + "\n")
        return path


def baseline_table(metrics: dict[str, Any], max_columns: int = 6) -> list[str]:
    """Markdown lines: the model beside each baseline of ``metrics["baselines"]`` on the scalar metrics they
    share (the main metric first)."""
    baselines = metrics.get("baselines") or {}
    if not baselines:
        return []
    main = metrics.get("main_metric")
    shared = [k for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)
              and any(isinstance(b.get(k), (int, float)) for b in baselines.values())]
    shared = [k for k in shared if k not in ("seconds", "num_samples", "num_processes")]
    if main in shared:
        shared.remove(main)
        shared.insert(0, main)
    cols = shared[:max_columns]
    fmt = lambda v: "-" if not isinstance(v, (int, float)) else (f"{v:.4f}" if isinstance(v, float) else str(v))
    lines = ["", "## Baselines (fitted on the training split, scored on this split)", "",
             "| method | " + " | ".join(cols) + " | seconds |", "| --- |" + " --- |" * (len(cols) + 1),
             "| **model** | " + " | ".join(fmt(metrics.get(k)) for k in cols) + " | |"]
    for name, b in baselines.items():
        label = f"{name} (probe of the trained model)" if b.get("probe") else name
        lines.append(f"| {label} | " + " | ".join(fmt(b.get(k)) for k in cols) + f" | {fmt(b.get('seconds'))} |")
    return lines


def savefig(fig, path: Path) -> None:
    """Save a matplotlib figure as PNG atomically and close it."""
    import matplotlib.pyplot as plt

    with atomic_file(path) as tmp:
        fig.savefig(tmp, dpi=120, bbox_inches="tight", format="png")
    plt.close(fig)


def build_evaluator(cfg, info: dict[str, Any]) -> Evaluator:
    from allspark.plugins import import_submodules

    import_submodules("allspark.evaluation")
    return EVALUATORS.build({"type": cfg.eval.protocol, **cfg.eval.args}, info=info)


def write_metrics(path: Path, metrics: dict[str, Any]) -> None:
    atomic_write_text(path, json.dumps(metrics, indent=2, default=float) + "\n")
