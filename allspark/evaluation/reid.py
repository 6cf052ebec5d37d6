"""SYSU-MM01 all-search single-shot protocol (the dataset's official evaluation).

Queries: every infrared image (cameras 3 and 6) of the split's identities. Gallery, per trial: one image
drawn at random for every identity and every visible camera (1, 2, 4, 5) that has one; 10 trials with seeds
0..9, and the metrics are averaged over them. Matches of the same identity from the "same place" are
removed as in the official code: camera 3 shares its location with camera 2 (``same_camera_groups={3: 2}``).
Distance: 1 - cosine similarity of the normalised embeddings. Metrics CMC ``rank1``, ``rank10``,
``rank20`` and ``mAP`` (see :mod:`allspark.metrics.reid`), with their standard deviation over trials.

Every query and gallery embedding is that of one image, whatever the training form: with the default
``data.args.pairing: paired`` the model trains on visible-infrared pairs (both streams' tokens concatenated), and
here each image goes through the stream of its own modality alone (the evaluated split's items are single images;
see :mod:`allspark.data.sysu_mm01`).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from allspark.data.sysu_mm01 import INFRARED_CAMS, VISIBLE_CAMS
from allspark.evaluation import Evaluator, savefig
from allspark.metrics.reid import reid_metrics
from allspark.registry import EVALUATORS

__all__ = ["SYSUAllSearch", "sample_gallery"]


def sample_gallery(pids: np.ndarray, cams: np.ndarray, seed: int) -> np.ndarray:
    """Indices of one random visible image per (identity, visible camera) pair, drawn with ``seed``."""
    rng = np.random.default_rng(seed)
    chosen = []
    for pid in np.unique(pids):
        for cam in VISIBLE_CAMS:
            idx = np.flatnonzero((pids == pid) & (cams == cam))
            if len(idx):
                chosen.append(int(rng.choice(idx)))
    return np.array(sorted(chosen), dtype=np.int64)


@EVALUATORS.register("sysu_all_search")
class SYSUAllSearch(Evaluator):
    pred_keys = ("embedding",)
    batch_keys = ("pid", "cam", "index")

    def __init__(self, info: dict[str, Any], trials: int = 10, ranks: tuple[int, ...] = (1, 10, 20)) -> None:
        super().__init__(info)
        if trials < 1:
            raise ValueError(f"sysu_all_search: trials must be >= 1, got {trials}")
        self.trials, self.ranks = trials, tuple(ranks)

    def _split(self, gathered):
        emb, pids, cams = gathered["embedding"], gathered["pid"].astype(int), gathered["cam"].astype(int)
        query = np.flatnonzero(np.isin(cams, INFRARED_CAMS))
        if not len(query):
            raise ValueError("sysu_all_search: the split has no infrared (cam3/cam6) image to query with")
        return emb, pids, cams, query

    def compute(self, gathered):
        emb, pids, cams, query = self._split(gathered)
        runs = []
        for trial in range(self.trials):
            gallery = sample_gallery(pids, cams, trial)
            dist = 1.0 - emb[query] @ emb[gallery].T
            runs.append(reid_metrics(dist, pids[query], pids[gallery], cams[query], cams[gallery], self.ranks,
                                     same_camera_groups={3: 2}))
        out: dict[str, Any] = {}
        for key in [f"rank{k}" for k in self.ranks] + ["mAP"]:
            values = [r[key] for r in runs]
            out[key] = float(np.mean(values))
            out[f"{key}_std"] = float(np.std(values))
        out.update(trials=self.trials, num_queries=int(len(query)), gallery_size=int(len(sample_gallery(pids, cams, 0))),
                   num_identities=int(len(np.unique(pids))), chance_rank1=float(1 / len(np.unique(pids))))
        return out

    def figures(self, gathered, metrics, extra, out_dir: Path):
        import matplotlib.pyplot as plt

        emb, pids, cams, query = self._split(gathered)
        gallery = sample_gallery(pids, cams, 0)
        dist = 1.0 - emb[query] @ emb[gallery].T
        max_rank = min(20, len(gallery))
        cmc = np.zeros(max_rank)
        for i, q in enumerate(query):
            order = np.argsort(dist[i], kind="stable")
            keep = ~((pids[gallery][order] == pids[q]) & (np.where(cams[gallery][order] == 2, 3, cams[gallery][order])
                                                          == cams[q]))
            hits = (pids[gallery][order] == pids[q])[keep][:max_rank]
            if hits.any():
                cmc[int(np.argmax(hits)):] += 1
        fig, ax = plt.subplots(figsize=(5, 3.5))
        ax.plot(np.arange(1, max_rank + 1), cmc / len(query), marker="o")
        ax.set(xlabel="rank", ylabel="matching rate", title="CMC, all-search, trial 0", ylim=(0, 1.02))
        ax.grid(alpha=0.3)
        savefig(fig, out_dir / "cmc.png")
        return [("CMC curve (test split, trial 0)", "cmc.png")]
