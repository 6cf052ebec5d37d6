"""Correlation objectives between paired features (registered in ``OBJECTIVES``).

Every objective is an ``nn.Module`` with one interface (see :class:`CorrelationObjective`):
``objective(f, g)`` or ``objective(f, g, h, ...)`` returns a *correlation score* (a scalar, higher = more
correlated; for more than two views the sum over all pairs ``i < j``), and ``objective.loss(...)`` is its
negative, what an optimiser minimises. Importing this package registers every built-in objective.
"""
from __future__ import annotations

from allspark.objectives.base import CorrelationObjective, build_objective, pairwise_sum
from allspark.plugins import import_submodules

__all__ = ["CorrelationObjective", "build_objective", "pairwise_sum"]

import_submodules("allspark.objectives")
