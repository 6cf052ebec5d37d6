"""Task metrics. Each metric suite is a function registered in ``METRICS`` that maps gathered
predictions and targets (whole split, every process's share) to a JSON-ready dict whose keys follow
the papers' names (``OA``, ``AA``, ``kappa``, ``top1``, ...)."""
from allspark.metrics.classification import classification_metrics

__all__ = ["classification_metrics"]
