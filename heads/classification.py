"""Linear classification head (the paper's single linear layer for classification-like tasks)."""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from allspark.registry import HEADS
from allspark.types import LLMOutput, Output, pooled_size


@HEADS.register("classification")
class ClassificationHead(nn.Module):
    """Pooled hidden state -> class logits; cross-entropy against ``batch[label_key]``.

    Labels equal to ``ignore_index`` (the readers use -1 for unlabelled samples) carry no loss. ``pooling``: see
    :meth:`LLMOutput.pool` (e.g. ``last+bridge`` adds the bridge tokens entering the LLM as a skip path).
    """

    def __init__(
        self,
        hidden_size: int,
        num_classes: int,
        *,
        info: dict[str, Any] | None = None,
        pooling: str = "last",
        label_key: str = "label",
        label_smoothing: float = 0.0,
        ignore_index: int = -1,
    ) -> None:
        super().__init__()
        if info and "num_classes" in info and info["num_classes"] != num_classes:
            raise ValueError(
                f"classification head: the config says num_classes={num_classes} but the dataset has "
                f"{info['num_classes']} classes"
            )
        self.pooling = pooling
        self.label_key = label_key
        self.label_smoothing = label_smoothing
        self.ignore_index = ignore_index
        size = pooled_size(pooling, hidden_size)
        self.norm = nn.LayerNorm(size)
        self.linear = nn.Linear(size, num_classes)

    def forward(self, llm_out: LLMOutput, batch: dict[str, Any]) -> Output:
        pooled = self.norm(llm_out.pool(self.pooling).float())
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
