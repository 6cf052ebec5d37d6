"""Image-text retrieval protocol (``retrieval``): the embeddings of the whole split are gathered once, then
ranked in chunks (allspark/metrics/retrieval.py). R@1/5/10 and mR always; MAP/WMAP/NDCG/ACG@n on the label
level ``label_level`` when the reader gives multi-labels (``info["label_names_<level>"]``). The report shows
a few image->text and text->image queries with their top results."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np

from allspark.evaluation import Evaluator, savefig
from allspark.metrics.retrieval import rank_topk, retrieval_metrics
from allspark.registry import EVALUATORS

__all__ = ["RetrievalEvaluator"]


def _decode(raw: np.ndarray) -> str:
    return bytes(np.asarray(raw, np.uint8)).rstrip(b"\0").decode("utf-8", errors="replace")


@EVALUATORS.register("retrieval")
class RetrievalEvaluator(Evaluator):
    pred_keys = ("image_emb", "text_emb", "text_mask")

    def __init__(self, info: dict[str, Any], label_level: str | None = "third", ks: Sequence[int] = (1, 5, 10),
                 ns: Sequence[int] = (5, 10, 20, 50, 100), chunk_size: int = 1024, num_examples: int = 3,
                 figures: bool = True) -> None:
        super().__init__(info)
        self.label_key = None
        if label_level is not None and f"label_names_{label_level}" in info:
            self.label_key = f"labels_{label_level}"
        elif label_level is not None and any(k.startswith("label_names_") for k in info):
            have = [k.removeprefix("label_names_") for k in info if k.startswith("label_names_")]
            raise ValueError(f"retrieval: label_level={label_level!r} but the data has the levels {have}")
        self.label_level = label_level if self.label_key else None
        self.ks, self.ns, self.chunk_size = tuple(ks), tuple(ns), int(chunk_size)
        self.num_examples = int(num_examples)
        self.want_figures = figures
        keys = ["index"] + ([self.label_key] if self.label_key else [])
        if figures:
            keys += ["thumbnail", "caption_bytes"]
        self.batch_keys = tuple(keys)

    @staticmethod
    def _texts(gathered: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        mask = gathered["text_mask"].astype(bool)
        owner, slot = np.nonzero(mask)
        return gathered["text_emb"][owner, slot], owner, slot

    def compute(self, gathered):
        texts, owner, _ = self._texts(gathered)
        labels = gathered[self.label_key] if self.label_key else None
        metrics = retrieval_metrics(gathered["image_emb"], texts, owner, labels, self.ks,
                                    self.ns if labels is not None else (5,), self.chunk_size)
        if self.label_level:
            metrics["label_level"] = self.label_level
        return metrics

    def figures(self, gathered, metrics, extra, out_dir: Path):
        if not self.want_figures or "thumbnail" not in gathered:
            return []
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        texts, owner, slot = self._texts(gathered)
        images = gathered["image_emb"]
        thumbs = gathered["thumbnail"].astype(np.uint8).transpose(0, 2, 3, 1)
        caption = lambda t: _decode(gathered["caption_bytes"][owner[t], slot[t]])  # noqa: E731
        rng = np.random.default_rng(0)
        top = 5
        figs = []
        queries = rng.choice(len(images), size=min(self.num_examples, len(images)), replace=False)
        i2t = rank_topk(images[queries], texts, top, self.chunk_size)
        fig, axes = plt.subplots(len(queries), 2, figsize=(11, 2.4 * len(queries)),
                                 gridspec_kw={"width_ratios": [1, 4]}, squeeze=False)
        for row, (q, ranked) in enumerate(zip(queries, i2t)):
            axes[row, 0].imshow(thumbs[q])
            axes[row, 0].set_title(f"query image #{q}", fontsize=8)
            lines = [f"{r + 1}. {'[match] ' if owner[t] == q else ''}{caption(t)}" for r, t in enumerate(ranked)]
            axes[row, 1].text(0, 0.5, "\n".join(lines), fontsize=8, va="center", wrap=True)
            for ax in axes[row]:
                ax.axis("off")
        fig.suptitle("Image -> text: top-5 captions")
        savefig(fig, out_dir / "retrieval_i2t.png")
        figs.append(("Image-to-text queries and their top-5 captions ([match] = a caption of the query image)",
                     "retrieval_i2t.png"))
        tq = rng.choice(len(texts), size=min(self.num_examples, len(texts)), replace=False)
        t2i = rank_topk(texts[tq], images, top, self.chunk_size)
        fig, axes = plt.subplots(len(tq), top, figsize=(2 * top, 2.6 * len(tq)), squeeze=False)
        for row, (t, ranked) in enumerate(zip(tq, t2i)):
            for col, img in enumerate(ranked):
                ax = axes[row, col]
                ax.imshow(thumbs[img])
                ax.axis("off")
                if img == owner[t]:
                    for side in ax.spines.values():
                        side.set_visible(True)
                    ax.set_title("match", fontsize=8, color="green")
            axes[row, 0].text(0, -0.25, f"query: {caption(t)}", transform=axes[row, 0].transAxes, fontsize=8,
                              va="top")
        fig.suptitle("Text -> image: top-5 images")
        fig.tight_layout()
        savefig(fig, out_dir / "retrieval_t2i.png")
        figs.append(("Text-to-image queries and their top-5 images (the query caption under each row)",
                     "retrieval_t2i.png"))
        return figs
