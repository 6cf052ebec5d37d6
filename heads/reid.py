"""Re-identification head: an identity classifier for training and an L2-normalised embedding for retrieval
(the paper formalises re-identification as classification with a single linear layer)."""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from allspark.config import ConfigError
from allspark.registry import HEADS
from allspark.sizing import from_data
from allspark.types import LLMOutput, Output, pooled_size

__all__ = ["ReIDHead", "cross_modal_infonce"]


@HEADS.register("reid")
class ReIDHead(nn.Module):
    """Pooled LLM state -> neck -> embedding (normalised, for ranking) and identity logits.

    ``neck``: ``batchnorm`` (default; the BNNeck of Luo et al.'s re-id bag of tricks: per-dimension batch
    standardisation without shift, which removes the component every sample shares -- on SmolLM2 the prompt
    dominates the last-token state, between-sample variation is ~9% of it) or ``layernorm``.
    ``cross_modal_weight`` > 0 adds a cross-modal InfoNCE term (see ``cross_modal_infonce``), meant for batches
    of several identities with single images of both modalities (``data.args.pairing: single`` with
    ``data.args.images_per_identity``); a training batch of visible-infrared pairs (``pairing: paired``, a
    ``paired_key`` entry) has no single-modality sample to contrast and is refused with a ``ConfigError``.
    ``pooling``: see :meth:`LLMOutput.pool`; ``last+bridge`` (the infrared config's choice) concatenates the
    last-token state with the mean bridge token entering the language model, a skip path around it: on the
    demo, identity features that transfer to unseen people do not survive the frozen SmolLM2 (test rank1 at
    chance with ``last`` alone, see the README), the skip path carries them.
    ``num_classes`` (training identities) is taken from the dataset info when given there.
    """

    def __init__(self, hidden_size: int, num_classes: int | None = None, pooling: str = "last",
                 neck: str = "batchnorm", bn_momentum: float = 0.1, cross_modal_weight: float = 0.0,
                 temperature: float = 0.1, label_key: str = "label", paired_key: str = "image_ir",
                 info: dict[str, Any] | None = None) -> None:
        super().__init__()
        num_classes = from_data("reid head", "num_classes", num_classes, info, "num_classes",
                                where="model.head.args", found="has {} training identities")
        if num_classes < 2:
            raise ValueError(f"reid head: needs num_classes >= 2 training identities, got {num_classes}")
        self.pooling, self.label_key, self.paired_key = pooling, label_key, paired_key
        size = pooled_size(pooling, hidden_size)
        if neck == "batchnorm":
            self.neck = nn.BatchNorm1d(size, momentum=bn_momentum)
            self.neck.bias.requires_grad_(False)  # BNNeck: no shift, as Luo et al.
        elif neck == "layernorm":
            self.neck = nn.LayerNorm(size)
        else:
            raise ValueError(f"reid head: neck must be 'batchnorm' or 'layernorm', got {neck!r}")
        self.classifier = nn.Linear(size, num_classes, bias=False)
        self.cross_modal_weight, self.temperature = float(cross_modal_weight), float(temperature)

    def forward(self, llm_out: LLMOutput, batch: dict[str, Any]) -> Output:
        pooled = llm_out.pool(self.pooling).float()
        if self.training and pooled.shape[0] == 1 and isinstance(self.neck, nn.BatchNorm1d):
            # a last training batch of one sample has no batch statistics: use the running ones
            feat = F.batch_norm(pooled, self.neck.running_mean, self.neck.running_var, self.neck.weight,
                                self.neck.bias, False, 0.0, self.neck.eps)
        else:
            feat = self.neck(pooled)
        logits = self.classifier(feat)
        loss = None
        labels = batch.get(self.label_key)
        if labels is not None and self.training:
            valid = labels >= 0
            loss = F.cross_entropy(logits[valid], labels[valid]) if valid.any() else logits.sum() * 0.0
            if self.cross_modal_weight and self.paired_key in batch:
                raise ConfigError(
                    f"reid head: model.head.args.cross_modal_weight={self.cross_modal_weight} contrasts single visible "
                    f"and infrared images within a batch (data.args.pairing: single with images_per_identity), but "
                    f"this training batch holds visible-infrared pairs (batch[{self.paired_key!r}], data.args.pairing: "
                    "paired), fused into one embedding each. Set cross_modal_weight: 0 or data.args.pairing: single")
            if self.cross_modal_weight and "modality" in batch:
                loss = loss + self.cross_modal_weight * cross_modal_infonce(
                    F.normalize(feat, dim=-1), labels, batch["modality"], self.temperature)
        return Output(loss, {"embedding": F.normalize(feat, dim=-1), "logits": logits})


def cross_modal_infonce(emb: torch.Tensor, labels: torch.Tensor, modality: torch.Tensor,
                        temperature: float) -> torch.Tensor:
    """Each labelled sample against the batch's samples of the *other* modality: minus the log of the softmax
    mass (cosine / temperature) on those with its identity, averaged over the anchors that have one (zero
    when none has)."""
    sim = emb @ emb.T / temperature
    labelled = labels >= 0
    candidates = (modality[:, None] != modality[None, :]) & labelled[:, None] & labelled[None, :]
    positives = candidates & (labels[:, None] == labels[None, :])
    anchors = positives.any(1)
    if not anchors.any():
        return sim.sum() * 0.0
    logits = sim.masked_fill(~candidates, float("-inf"))[anchors]
    log_all = torch.logsumexp(logits, dim=1)
    log_pos = torch.logsumexp(logits.masked_fill(~positives[anchors], float("-inf")), dim=1)
    return (log_all - log_pos).mean()
