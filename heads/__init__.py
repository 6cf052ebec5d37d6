"""Task heads, each registered in ``allspark.registry.HEADS``.

A head is built as ``Head(hidden_size=D, info=<dataset info>, **args)`` and called as
``head(llm_output, batch) -> Output(loss, predictions)``.
"""
from heads.classification import ClassificationHead
from heads.regression import RegressionHead

__all__ = ["ClassificationHead", "RegressionHead"]
