"""Linear classification head (the paper's single linear layer for classification-like tasks)."""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from allspark.config import ConfigError
from allspark.registry import HEADS
from allspark.sizing import from_data
from allspark.types import LLMOutput, Output, pooled_size


@HEADS.register("classification")
class ClassificationHead(nn.Module):
    """Pooled hidden state -> class logits; cross-entropy against ``batch[label_key]``.

    ``num_classes`` defaults to the dataset's (info ``num_classes``). Labels equal to ``ignore_index`` (the readers
    use -1 for unlabelled samples) carry no loss. ``pooling``: see :meth:`LLMOutput.pool` (e.g. ``last+bridge``
    adds the bridge tokens entering the LLM as a skip path). ``norm``: ``layer`` (LayerNorm of the pooled state) or
    ``batch`` (BatchNorm1d: each feature standardised over the batch, running statistics in evaluation; for the
    nearly constant pooled states of a frozen LLM, see the comment in ``__init__``).
    """

    def __init__(
        self,
        hidden_size: int,
        num_classes: int | None = None,
        *,
        info: dict[str, Any] | None = None,
        pooling: str = "last",
        norm: str = "layer",
        label_key: str = "label",
        label_smoothing: float = 0.0,
        ignore_index: int = -1,
    ) -> None:
        super().__init__()
        # unset: the dataset's class count (info ``num_classes``); set: checked against it
        num_classes = from_data("classification head", "num_classes", num_classes, info, "num_classes",
                                where="model.head.args", found="has {} classes")
        if num_classes < 2:
            raise ValueError(f"classification head: needs num_classes >= 2, got {num_classes}")
        self.pooling = pooling
        self.label_key = label_key
        self.label_smoothing = label_smoothing
        self.ignore_index = ignore_index
        size = pooled_size(pooling, hidden_size)
        if norm not in ("layer", "batch"):
            raise ConfigError(f"classification head: norm must be 'layer' or 'batch', got {norm!r}")
        # ``batch``: the pooled states of a frozen LLM share one large component and differ by ~1 % between
        # samples; LayerNorm keeps that, a batch norm standardises each feature over the batch (running
        # statistics in evaluation), as a linear probe's feature scaling does
        self.norm = nn.LayerNorm(size) if norm == "layer" else nn.BatchNorm1d(size)
        self.linear = nn.Linear(size, num_classes)

    def forward(self, llm_out: LLMOutput, batch: dict[str, Any]) -> Output:
        pooled = llm_out.pool(self.pooling).float()
        if isinstance(self.norm, nn.BatchNorm1d) and self.training and pooled.shape[0] == 1:
            # no batch statistics from one sample: normalise with the running ones
            pooled = F.batch_norm(pooled, self.norm.running_mean, self.norm.running_var, self.norm.weight,
                                  self.norm.bias, False, 0.0, self.norm.eps)
        else:
            pooled = self.norm(pooled)
        logits = self.linear(pooled)
        loss = None
        labels = batch.get(self.label_key)
        if labels is not None:
            if (labels != self.ignore_index).any():
                loss = F.cross_entropy(
                    logits, labels, ignore_index=self.ignore_index, label_smoothing=self.label_smoothing
                )
            else:
                # Every row unlabelled (e.g. the unlabelled pixels of a fusion scene): the mean over no
                # labelled row is taken as 0, kept in the graph so that every process runs a backward.
                loss = logits.sum() * 0.0
        return Output(loss, {"logits": logits, "pred": logits.argmax(dim=-1)})
