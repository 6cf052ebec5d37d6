"""Auxiliary losses: terms beside the task head's loss, built from the config and summed by the model.

An :class:`AuxiliaryLoss` reads what the model exposes before the language model runs (the batch, each encoder's
token set, the model's parts: encoders, bridge, hidden size) and returns a :class:`LossTerm`: the term to minimise
(unweighted) and the scalars to log. :func:`build_auxiliary_losses` builds the configured ones into an
:class:`AuxiliaryLosses`, which the model holds; in training its ``forward`` is::

    token_sets = encode_tokens(batch)
    terms      = auxiliary.terms(model, batch, token_sets)           # each loss, on the encoders' tokens
    out        = head(run_llm(batch, token_sets))   unless task_weight == 0 (an auxiliary-only stage)
    return auxiliary.combine(out, terms)            # task_weight * task loss + sum(weight * term)

Evaluation skips the terms. An auxiliary loss's own modules (projections, objectives) are registered on the model
under the names it declares (:meth:`AuxiliaryLoss.parts`), so checkpoints keep stable names (``alignment_proj.*``)
and ``train.train_only`` patterns can name them.

Built-in: ``alignment`` (``model.alignment``), the correlation objective between the modalities' pooled features
(:class:`AlignmentLoss`). New losses register in :data:`AUXILIARY_LOSSES` (entry-point group
``allspark.auxiliary_losses``) and are added to :func:`build_auxiliary_losses`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Protocol, Sequence

import torch
from torch import nn

from allspark.config import AlignmentConfig, ConfigError, ModelConfig
from allspark.registry import Registry
from allspark.types import Output, Tokens

__all__ = ["AUXILIARY_LOSSES", "AuxiliaryLoss", "AuxiliaryLosses", "AlignmentLoss", "LossTerm", "ModelParts",
           "build_auxiliary_losses"]

#: registered auxiliary-loss classes, built with ``(cfg=<its config block>, parts=ModelParts)``
AUXILIARY_LOSSES: Registry[type] = Registry("auxiliary_losses")


class ModelParts(Protocol):
    """What an auxiliary loss may read of the model (the model itself is passed; ``bridge`` is read at call time,
    as a multi-task model may replace it after construction)."""

    encoders: nn.ModuleList
    bridge: Callable[[list[Tokens]], torch.Tensor] | None
    hidden_size: int


@dataclass
class LossTerm:
    """One auxiliary loss on one batch.

    ``loss``: the term to minimise (unweighted), or None where the batch gives none (a correlation needs two
    samples); then ``zero`` is a zero in the graph of what the term did compute, which an auxiliary-only step
    backpropagates. ``logs``: detached scalars, added to ``Output.extras`` (and so logged as ``train/<name>``)."""

    loss: torch.Tensor | None
    logs: dict[str, torch.Tensor] = field(default_factory=dict)
    zero: torch.Tensor | None = None


class AuxiliaryLoss:
    """Base class. Not a module itself: :meth:`parts` are the modules the model registers (and saves), under the
    names given there; the loss keeps references to them."""

    #: the config's name for it
    name: str = "auxiliary"
    #: the term's weight in the training loss
    weight: float = 1.0
    #: whether the term runs the bridge (which then trains even where the head reads nothing of the LLM)
    uses_bridge: bool = False

    def parts(self) -> dict[str, nn.Module]:
        """The modules to register on the model, by name (the checkpoint prefix of their weights)."""
        return {}

    def __call__(self, parts: ModelParts, batch: dict[str, Any], token_sets: list[Tokens]) -> LossTerm:
        raise NotImplementedError


@AUXILIARY_LOSSES.register("alignment")
class AlignmentLoss(AuxiliaryLoss):
    """``model.alignment``: a correlation objective (``allspark.objectives``) between the modalities' features.

    Per modality, the masked mean of its encoder's tokens (``level: encoders``), or the mean bridge token of a
    bridge pass that sees that modality alone (``level: bridge``: the objective then also trains the bridge),
    projected by a per-modality linear layer to ``dim``; the objective scores every pair. The term is ``-score``
    (minimising it maximises the correlation) and ``alignment`` (the score) is logged. Registers ``alignment``
    (the objective) and ``alignment_proj`` (the projections) on the model."""

    name = "alignment"

    def __init__(self, cfg: AlignmentConfig, parts: ModelParts) -> None:
        if len(parts.encoders) < 2:
            raise ConfigError(
                f"model.alignment.objective={cfg.objective!r} needs at least two encoders to correlate; "
                f"this config has {len(parts.encoders)}"
            )
        if cfg.dim < 1:
            raise ConfigError(f"model.alignment.dim must be >= 1, got {cfg.dim}")
        if cfg.level not in ("encoders", "bridge"):
            raise ConfigError(f"model.alignment.level must be 'encoders' or 'bridge', got {cfg.level!r}")
        from allspark.objectives import build_objective

        self.weight = cfg.weight
        self.level = cfg.level
        self.objective = build_objective({"type": cfg.objective, **cfg.args})
        widths = [e.out_dim if cfg.level == "encoders" else parts.hidden_size for e in parts.encoders]
        self.proj = nn.ModuleList(nn.Linear(w, cfg.dim) for w in widths)

    @property
    def uses_bridge(self) -> bool:
        """Whether the term runs (and so trains) the bridge: ``level: bridge``."""
        return self.level == "bridge"

    def parts(self) -> dict[str, nn.Module]:
        return {"alignment": self.objective, "alignment_proj": self.proj}

    @staticmethod
    def _only(token_sets: list[Tokens], i: int) -> list[Tokens]:
        """The token sets with every set but the ``i``-th masked out (a bridge pass that sees one modality)."""
        return [ts if j == i else Tokens(ts.tokens, torch.zeros_like(ts.mask)) for j, ts in enumerate(token_sets)]

    def features(self, parts: ModelParts, token_sets: list[Tokens]) -> list[torch.Tensor]:
        """Per modality, projected to ``dim`` -> [B, dim] (see the class docstring)."""
        if self.level == "bridge":
            return [proj(parts.bridge(self._only(token_sets, i)).mean(dim=1).float())
                    for i, proj in enumerate(self.proj)]
        return [proj(tokens.mean().float()) for tokens, proj in zip(token_sets, self.proj)]

    def score(self, features: Sequence[torch.Tensor]) -> torch.Tensor | None:
        """The objective's correlation score over all pairs (None for a batch of one sample, where no
        (co)variance can be estimated)."""
        if features[0].shape[0] < 2:
            return None
        return self.objective(*features)

    def __call__(self, parts: ModelParts, batch: dict[str, Any], token_sets: list[Tokens]) -> LossTerm:
        features = self.features(parts, token_sets)
        score = self.score(features)
        if score is None:  # nothing to correlate: a zero kept in the graph for an alignment-only step
            return LossTerm(None, zero=torch.cat(features, dim=-1).sum() * 0.0)
        return LossTerm(-score, {"alignment": score.detach()})


class AuxiliaryLosses:
    """The model's auxiliary losses (by name) and the weight of the task head's loss beside them."""

    def __init__(self, losses: dict[str, AuxiliaryLoss], task_weight: float = 1.0) -> None:
        self.losses = dict(losses)
        self.task_weight = float(task_weight)

    def __bool__(self) -> bool:
        return bool(self.losses)

    def __getitem__(self, name: str) -> AuxiliaryLoss:
        return self.losses[name]

    def __contains__(self, name: object) -> bool:
        return name in self.losses

    def parts(self) -> dict[str, nn.Module]:
        """Every loss's modules, by the name the model registers them under."""
        out: dict[str, nn.Module] = {}
        for loss in self.losses.values():
            for name, module in loss.parts().items():
                if name in out:
                    raise ConfigError(f"auxiliary losses: two losses register a module named {name!r}")
                out[name] = module
        return out

    def terms(self, parts: ModelParts, batch: dict[str, Any], token_sets: list[Tokens]) -> dict[str, LossTerm]:
        return {name: loss(parts, batch, token_sets) for name, loss in self.losses.items()}

    def combine(self, out: Output | None, terms: dict[str, LossTerm]) -> Output:
        """The training output: ``task_weight * head loss + sum(weight * term)`` with the terms' logs (and the head's
        loss as ``task_loss``) in ``extras``. ``out`` None: an auxiliary-only step (no head ran). A batch on which no
        term has a value trains on the head's loss as it is."""
        scored = [(self.losses[n].weight, t.loss) for n, t in terms.items() if t.loss is not None]
        logs = {k: v for t in terms.values() for k, v in t.logs.items()}
        extra = _weighted_sum(scored) if scored else None
        if out is None:
            if extra is None:
                zeros = [t.zero for t in terms.values() if t.zero is not None]
                return Output(_sum(zeros))
            return Output(extra, extras=logs)
        out.extras.update(logs)
        if extra is not None and out.loss is not None:
            out.extras["task_loss"] = out.loss.detach()
            out.loss = self.task_weight * out.loss + extra
        return out


def _sum(values: Sequence[torch.Tensor]) -> torch.Tensor:
    total = values[0]
    for v in values[1:]:
        total = total + v
    return total


def _weighted_sum(terms: Sequence[tuple[float, torch.Tensor]]) -> torch.Tensor:
    return _sum([weight * loss for weight, loss in terms])


def build_auxiliary_losses(cfg: ModelConfig, parts: ModelParts) -> AuxiliaryLosses:
    """The auxiliary losses ``cfg`` configures (``model.alignment`` with an ``objective``: :class:`AlignmentLoss`),
    checked, with the task loss's weight (``model.alignment.task_weight``; 0 makes an auxiliary-only stage)."""
    losses: dict[str, AuxiliaryLoss] = {}
    acfg = cfg.alignment
    if acfg.objective:
        losses["alignment"] = AUXILIARY_LOSSES.build({"type": "alignment"}, cfg=acfg, parts=parts)
    if not losses:
        return AuxiliaryLosses({})
    if acfg.task_weight < 0 or (acfg.task_weight == 0 and not any(l.weight > 0 for l in losses.values())):
        raise ConfigError(
            f"model.alignment.task_weight must be >= 0, and an alignment-only stage (task_weight=0) needs "
            f"weight > 0; got task_weight={acfg.task_weight}, weight={acfg.weight}"
        )
    return AuxiliaryLosses(losses, acfg.task_weight)
