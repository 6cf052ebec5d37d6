"""Task heads, each registered in ``allspark.registry.HEADS``.

A head is built as ``Head(hidden_size=D, info=<dataset info>, **args)`` and called as
``head(llm_output, batch) -> Output(loss, predictions)``. Every module of this package is imported
with it, so adding a head is adding a file.
"""
from allspark.plugins import import_submodules

import_submodules(__name__)
