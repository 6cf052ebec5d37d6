"""Classification protocols: top-1 / OA, AA, kappa, per-class accuracy, confusion matrix, scene maps."""
from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from allspark.config import ConfigError
from allspark.evaluation import Evaluator, collect_predictions, savefig
from allspark.metrics.classification import classification_metrics
from allspark.registry import EVALUATORS

__all__ = ["plot_confusion_matrix", "ClassificationEvaluator", "PixelClassificationEvaluator"]

logger = logging.getLogger(__name__)


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
    savefig(fig, path)


@EVALUATORS.register("classification")
class ClassificationEvaluator(Evaluator):
    """Top-1 / OA, AA, kappa, per-class accuracy and a confusion matrix."""

    pred_keys = ("pred",)
    batch_keys = ("label", "index")

    def __init__(self, info: dict[str, Any], label_key: str = "label", generate_answers: bool = False,
                 answer_batch_size: int = 16, answer_examples: int = 8) -> None:
        super().__init__(info)
        self.batch_keys = (label_key, "index")
        self.label_key = label_key
        if "num_classes" not in info:
            raise ValueError("classification evaluation needs 'num_classes' in the dataset info")
        if not isinstance(answer_batch_size, int) or answer_batch_size < 1:
            raise ConfigError(f"eval.args.answer_batch_size must be a whole number >= 1, got {answer_batch_size!r}")
        #: also generate each test sample's answer (greedy, the evaluation prompt) and score it as text
        self.generate_answers = bool(generate_answers)
        self.answer_batch_size = answer_batch_size
        self.answer_examples = int(answer_examples)

    def model_metrics(self, model, dataset, accelerator=None) -> dict[str, Any]:
        """With ``generate_answers`` (a model with the ``verbalizer`` head): every sample's answer generated
        greedily after the evaluation prompt (``AllSpark.ask``, up to the longest candidate's tokens + 2), mapped
        back to a class by the head (:meth:`~heads.verbalizer.VerbalizerHead.match_answers`). ``answer_accuracy``:
        the share whose answer is exactly the true class's answer after normalisation; ``answer_prefix_accuracy``:
        whose answer begins with it; ``answer_unmatched``: the share that names no candidate exactly;
        ``answer_examples``: (label, true answer, generated) of the first sample of each class, up to
        ``answer_examples`` of them."""
        if not self.generate_answers:
            return {}
        head = getattr(model, "head", None)
        if not hasattr(head, "match_answers"):
            raise ConfigError("eval.args.generate_answers scores generated answers against the class names, which "
                              f"needs model.head.type=verbalizer; this model's head is {type(head).__name__}")
        was_training = model.training
        model.eval()
        t0 = time.perf_counter()
        exact, prefix, labels, examples = [], [], [], []
        truths = head.answer_texts()
        try:
            device = model.prompt_ids.device
            for s in range(0, len(dataset), self.answer_batch_size):
                items = [dataset[i] for i in range(s, min(s + self.answer_batch_size, len(dataset)))]
                batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v
                         for k, v in dataset.collate(items).items()}
                texts = model.ask(batch, model.prompts[0], max_new_tokens=head.max_answer_tokens + 2)
                exact += head.match_answers(texts)
                prefix += head.match_answers(texts, "prefix")
                rows = batch[self.label_key].tolist()
                labels += rows
                seen = {e["label"] for e in examples}
                for y, t in zip(rows, texts):  # the first answer of each class, up to answer_examples
                    if y not in seen and len(examples) < self.answer_examples:
                        seen.add(y)
                        examples.append({"label": y, "true": truths[y] if 0 <= y < len(truths) else str(y),
                                         "generated": t})
        finally:
            model.train(was_training)
        y, e, p = np.asarray(labels), np.asarray(exact), np.asarray(prefix)
        n = max(len(y), 1)
        return {"answer_accuracy": float((e == y).sum() / n), "answer_prefix_accuracy": float((p == y).sum() / n),
                "answer_unmatched": float((e < 0).sum() / n), "answer_samples": int(len(y)),
                "answer_seconds_per_sample": (time.perf_counter() - t0) / n, "answer_examples": examples}

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
    (every pixel predicted, from the reader's ``scene`` split) beside the ground truth.

    :meth:`predict_scene` predicts that map in tiles of ``scene_tile_rows`` rows of the scene (the model's
    memory stays that of one batch, the gathered values that of one tile) with a progress bar over all
    pixels (rate and estimated time left) and returns the pixels per second (``scene_pixels_per_second``)."""

    extra_splits = ("scene",)

    def __init__(self, info: dict[str, Any], label_key: str = "label", scene_map: bool = True,
                 scene_tile_rows: int = 32, **answers: Any) -> None:
        super().__init__(info, label_key, **answers)
        self.batch_keys = (label_key, "index", "coords")
        self.extra_splits = ("scene",) if scene_map else ()
        if scene_tile_rows < 1:
            raise ValueError(f"pixel_classification: scene_tile_rows must be >= 1, got {scene_tile_rows}")
        self.scene_tile_rows = int(scene_tile_rows)

    def predict_extra(self, name, model, dataset, accelerator, batch_size, num_workers=0, **loading):
        if name == "scene":  # the whole scene, tiled, with progress and pixels per second
            return self.predict_scene(model, dataset, accelerator, batch_size, num_workers=num_workers, **loading)
        return super().predict_extra(name, model, dataset, accelerator, batch_size, num_workers, **loading)

    def predict_scene(self, model, dataset, accelerator, batch_size: int, *, num_workers: int | str = 0,
                      inference_mode: bool = True, pin_memory: bool | str = "auto", persistent_workers: Any = None,
                      ) -> tuple[dict[str, np.ndarray], dict[str, float]]:
        """Every pixel of ``dataset`` (a reader's ``scene`` split: the H x W pixels in row-major order)
        through ``model`` (prepared by ``accelerator``), one tile of ``scene_tile_rows`` rows at a time.
        ``num_workers``, ``pin_memory``: the DataLoader settings of ``data.*`` (a loader per tile, so its workers
        are never kept: ``persistent_workers`` is accepted and ignored).

        Returns the gathered values (``pred`` and the batch keys, as :func:`collect_predictions` gives them, in
        scene order) and ``{scene_pixels, scene_seconds, scene_pixels_per_second, scene_tiles}``.
        ``inference_mode``: run under ``torch.inference_mode`` (the scene map comes after training)."""
        from torch.utils.data import DataLoader, Subset
        from tqdm.auto import tqdm

        from allspark.data import resolve_loader_options

        loading = resolve_loader_options(num_workers, pin_memory, False, accelerator.device)

        h, w = int(self.info["height"]), int(self.info["width"])
        if len(dataset) != h * w:
            raise ValueError(f"pixel_classification: the scene split has {len(dataset)} pixels, the scene is "
                             f"{h} x {w} = {h * w}; predict_scene needs every pixel in row-major order")
        rows = self.scene_tile_rows
        keys = (*self.pred_keys, *self.batch_keys)
        parts: dict[str, list[np.ndarray]] = {k: [] for k in keys}
        bar = tqdm(total=h * w, desc="scene map", unit="px", disable=not accelerator.is_local_main_process)
        start = time.perf_counter()
        try:
            for r0 in range(0, h, rows):
                # a Subset (not a sampler over the whole scene): accelerate sizes the last batch's padding, which
                # gather_for_metrics drops, from the loader's dataset length
                tile_set = Subset(dataset, range(r0 * w, min(r0 + rows, h) * w))
                loader = accelerator.prepare(DataLoader(tile_set, batch_size=batch_size, collate_fn=dataset.collate,
                                                        **loading))
                tile = collect_predictions(model, loader, accelerator, self.pred_keys, self.batch_keys,
                                           f"scene rows {r0}-{min(r0 + rows, h) - 1}",
                                           inference_mode=inference_mode, progress=bar)
                order = np.argsort(tile["index"], kind="stable")  # processes' shards back in scene order
                for k in keys:
                    parts[k].append(tile[k][order])
        finally:
            bar.close()
        seconds = time.perf_counter() - start
        gathered = {k: np.concatenate(v) for k, v in parts.items()}
        stats = {"scene_pixels": h * w, "scene_seconds": seconds, "scene_pixels_per_second": h * w / max(seconds, 1e-9),
                 "scene_tiles": -(-h // rows)}
        logger.info("scene map: %d pixels (%d x %d) in %.1f s, %.1f pixels/s, %d tiles of %d rows", h * w, h, w,
                    seconds, stats["scene_pixels_per_second"], stats["scene_tiles"], rows)
        return gathered, stats

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
        savefig(fig, path)
