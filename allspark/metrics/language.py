"""Metrics of the language tasks: MRR by the CodeBERT protocol and corpus BLEU-4 (torchmetrics)."""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from allspark.registry import METRICS

__all__ = ["ranks_of_true", "mrr", "bleu4", "code_documentation_metrics"]


def ranks_of_true(scores: np.ndarray) -> np.ndarray:
    """1-based rank of each query's true candidate (the diagonal of ``scores[query, candidate]``, higher =
    better) among all candidates of its row. Ties count against the true one: every other candidate scoring
    at least as high ranks before it (the CodeBERT / CodeSearchNet evaluation)."""
    scores = np.asarray(scores, dtype=np.float64)
    if scores.ndim != 2 or scores.shape[0] != scores.shape[1]:
        raise ValueError(f"scores must be a square [N queries, N candidates] matrix, got shape {list(scores.shape)}")
    if not np.isfinite(scores).all():
        raise ValueError("scores hold NaN or infinite values")
    true = np.diag(scores)[:, None]
    others = ~np.eye(len(scores), dtype=bool)
    return 1 + ((scores >= true) & others).sum(axis=1)


def mrr(ranks: Sequence[int] | np.ndarray) -> float:
    ranks = np.asarray(ranks, dtype=np.float64)
    if ranks.size == 0:
        raise ValueError("MRR of no queries")
    return float(np.mean(1.0 / ranks))


def bleu4(hypotheses: Sequence[str], references: Sequence[str], smooth: bool = False) -> float:
    """Corpus BLEU-4 (uniform weights, brevity penalty) of whitespace-tokenised strings, one reference each,
    computed by ``torchmetrics``' ``BLEUScore``; ``smooth`` adds one to every n-gram count (Lin & Och)."""
    from torchmetrics.text import BLEUScore

    if len(hypotheses) != len(references):
        raise ValueError(f"{len(hypotheses)} hypotheses for {len(references)} references")
    if not hypotheses:
        raise ValueError("BLEU of no sentences")
    metric = BLEUScore(n_gram=4, smooth=smooth)
    return float(metric(list(hypotheses), [[r] for r in references]))


@METRICS.register("code_documentation")
def code_documentation_metrics(ranks: Sequence[int], hypotheses: Sequence[str] | None = None,
                               references: Sequence[str] | None = None) -> dict[str, Any]:
    """MRR (and rank statistics) of the true docstrings, plus BLEU-4 of generations when given."""
    ranks = np.asarray(ranks)
    out: dict[str, Any] = {"mrr": mrr(ranks), "recall@1": float(np.mean(ranks == 1)),
                           "mean_rank": float(ranks.mean())}
    if hypotheses is not None and references is not None:
        out["bleu4"] = bleu4(hypotheses, references)
        out["bleu4_smoothed"] = bleu4(hypotheses, references, smooth=True)
    return out
