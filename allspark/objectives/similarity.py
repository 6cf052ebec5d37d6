"""Plain similarity baselines: mean cosine similarity and mean inner product of paired rows.

    cosine(F, G) = 1/B sum_a <f_a, g_a> / (||f_a|| ||g_a||)
    dot(F, G)    = 1/B sum_a <f_a, g_a>

Neither controls the scale or the redundancy of the features (``dot`` is unbounded and ``cosine`` is
maximised by collapsing every sample to one direction); they are the baselines the correlation
objectives are compared with.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from allspark.objectives.base import CorrelationObjective, check_pair
from allspark.registry import OBJECTIVES

__all__ = ["CosineSimilarity", "DotProduct"]


@OBJECTIVES.register("cosine")
class CosineSimilarity(CorrelationObjective):
    name = "cosine"

    def __init__(self, eps: float = 1e-8) -> None:
        super().__init__()
        self.eps = eps

    def pair(self, f: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        check_pair(f, g, self.name, min_batch=1)
        return F.cosine_similarity(f, g, dim=1, eps=self.eps).mean()


@OBJECTIVES.register("dot")
class DotProduct(CorrelationObjective):
    name = "dot"

    def pair(self, f: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        check_pair(f, g, self.name, min_batch=1)
        return (f * g).sum(dim=1).mean()
