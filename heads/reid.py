"""Re-identification head: an identity classifier for training and an L2-normalised embedding for retrieval
(the paper formalises re-identification as classification with a single linear layer)."""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from allspark.registry import HEADS
from allspark.types import LLMOutput, Output

__all__ = ["ReIDHead"]


@HEADS.register("reid")
class ReIDHead(nn.Module):
    """Pooled LLM state -> LayerNorm neck (no running statistics to lag behind a short run) -> embedding (normalised, for ranking) and identity logits.

    ``num_classes`` (training identities) is taken from the dataset info when given there.
    """

    def __init__(self, hidden_size: int, num_classes: int | None = None, pooling: str = "last",
                 neck: str = "batchnorm", bn_momentum: float = 0.1, label_key: str = "label",
                 info: dict[str, Any] | None = None) -> None:
        super().__init__()
        if info and "num_classes" in info:
            if num_classes is not None and num_classes != info["num_classes"]:
                raise ValueError(f"reid head: num_classes={num_classes} but the dataset has {info['num_classes']} "
                                 "training identities")
            num_classes = info["num_classes"]
        if not num_classes or num_classes < 2:
            raise ValueError(f"reid head: needs num_classes >= 2 training identities, got {num_classes}")
        self.pooling, self.label_key = pooling, label_key
        if neck == "batchnorm":
            self.neck = nn.BatchNorm1d(hidden_size, momentum=bn_momentum)
            self.neck.bias.requires_grad_(False)  # BNNeck: no shift, as Luo et al.
        elif neck == "layernorm":
            self.neck = nn.LayerNorm(hidden_size)
        else:
            raise ValueError(f"reid head: neck must be 'batchnorm' or 'layernorm', got {neck!r}")
        self.classifier = nn.Linear(hidden_size, num_classes, bias=False)

    def forward(self, llm_out: LLMOutput, batch: dict[str, Any]) -> Output:
        pooled = llm_out.pool(self.pooling).float()
        feat = self.neck(pooled)
        logits = self.classifier(feat)
        loss = None
        labels = batch.get(self.label_key)
        if labels is not None and self.training:
            valid = labels >= 0
            loss = F.cross_entropy(logits[valid], labels[valid]) if valid.any() else logits.sum() * 0.0
        return Output(loss, {"embedding": F.normalize(feat, dim=-1), "logits": logits})
