"""Classical baselines scored beside the model in every evaluation.

A task names its baselines in its config (``eval.baselines``: ``[{type: svm, args: {...}}, ...]``, types from the
``BASELINES`` registry). Each is fitted on the **training split only** and scored on the evaluated split with the
task's own evaluator, so its numbers and the model's are computed by the same code on the same samples.
``metrics.json`` holds them under ``baselines.<name>`` and ``report.md`` puts them in a table beside the model.

Contract of a baseline (a class registered with ``@BASELINES.register("name")``)::

    baseline = Cls(info, **args)          # info: the training split's reader info()
    baseline.fit(train_set, model=None)   # the reader's training split; ``model`` only when needs_model
    baseline.predict(dataset, model=None) # -> {pred_key: array}, row i = item i of ``dataset``

Before ``fit`` the framework binds the task's evaluator (``baseline.evaluator``), so a baseline can read which
batch field holds the label or target. A baseline that needs a metric the evaluator computes with the model
(ranking, generation) overrides ``score`` instead of ``predict``. ``needs_model = True`` marks the probes of the
trained model (its encoders' features with a linear read-out and no LLM): they say what the LLM path adds.
"""
from __future__ import annotations

import logging
import time
from typing import Any, Sequence

import numpy as np
import torch

from allspark.registry import BASELINES

logger = logging.getLogger(__name__)

__all__ = ["Baseline", "split_arrays", "build_baselines", "run_baselines", "best_baseline", "main_metric",
           "baseline_metrics", "BASELINES"]


class Baseline:
    """Base class: a classical method fitted on the training split, scored with the task's evaluator."""

    #: True for probes that read the trained model's representations
    needs_model: bool = False

    def __init__(self, info: dict[str, Any]) -> None:
        self.info = dict(info)
        self.evaluator = None

    def fit(self, train_set, model=None) -> None:  # pragma: no cover - interface
        raise NotImplementedError

    def predict(self, dataset, model=None) -> dict[str, np.ndarray]:  # pragma: no cover - interface
        raise NotImplementedError

    def score(self, dataset, model=None) -> dict[str, Any]:
        """Metrics on ``dataset``: the evaluator's own computation on this baseline's predictions."""
        gathered = split_arrays(dataset, self.evaluator.batch_keys)
        pred = self.predict(dataset, model)
        n = len(dataset)
        for key, value in pred.items():
            if len(value) != n:
                raise RuntimeError(f"baseline {type(self).__name__}: {key!r} has {len(value)} rows for {n} items")
        gathered.update(pred)
        return self.evaluator.compute_baseline(gathered)

    # helpers for subclasses
    @property
    def label_key(self) -> str | None:
        """The batch field of the class label, when the task is a classification (else None)."""
        return getattr(self.evaluator, "label_key", None)

    @property
    def target_key(self) -> str:
        key = self.label_key or getattr(self.evaluator, "target_key", None)
        if key is None:
            raise ValueError(f"baseline {type(self).__name__}: the {type(self.evaluator).__name__} protocol names "
                             "no label or target field")
        return key


def split_arrays(dataset, keys: Sequence[str], batch_size: int = 256) -> dict[str, np.ndarray]:
    """The batch fields ``keys`` of every item of ``dataset``, in item order, as numpy arrays (strings as an
    object array), built through the reader's own ``collate``."""
    parts: dict[str, list] = {k: [] for k in keys}
    for start in range(0, len(dataset), batch_size):
        batch = dataset.collate([dataset[i] for i in range(start, min(start + batch_size, len(dataset)))])
        for k in keys:
            if k not in batch:
                raise KeyError(f"{type(dataset).__name__} batches have no field {k!r}; they have {sorted(batch)}")
            v = batch[k]
            if isinstance(v, torch.Tensor):
                parts[k].append(v.detach().float().numpy() if v.is_floating_point() else v.detach().numpy())
            else:
                parts[k].append(np.array(list(v), dtype=object))
    return {k: np.concatenate(v) if v else np.zeros(0) for k, v in parts.items()}


def build_baselines(cfg, info: dict[str, Any], evaluator) -> list[tuple[str, Baseline]]:
    """The baselines ``cfg.eval.baselines`` names, constructed (not fitted); an unknown type or a bad argument
    fails here, before any training."""
    from allspark.config import ConfigError
    from allspark.plugins import import_submodules
    from allspark.registry import RegistryError

    import_submodules("allspark.baselines")
    built: list[tuple[str, Baseline]] = []
    for i, spec in enumerate(cfg.eval.baselines):
        where = f"eval.baselines.{i}"
        if not isinstance(spec, dict) or "type" not in spec or set(spec) - {"type", "name", "args"}:
            raise ConfigError(f"{where} must be {{type: NAME, name: LABEL (optional), args: {{...}}}}, got {spec!r}")
        name = str(spec.get("name") or spec["type"])
        if any(name == n for n, _ in built):
            raise ConfigError(f"{where}: two baselines are named {name!r}; give one a 'name'")
        args = dict(spec.get("args") or {})
        if spec["type"] not in BASELINES:
            try:
                BASELINES.get(spec["type"])
            except RegistryError as exc:  # its message lists what is available and the closest names
                raise ConfigError(f"{where}.type: {exc}") from None
        try:
            baseline = BASELINES.build({"type": spec["type"], **args}, optional={"info": info})
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"{where} ({spec['type']}): {exc}") from exc  # ALLSPARK_DEBUG=1 shows the origin
        baseline.evaluator = evaluator
        built.append((name, baseline))
    return built


def _scalars(metrics: dict[str, Any]) -> dict[str, Any]:
    """Scalar metrics, and one level of named scalars (per class, per horizon); arrays are dropped."""
    out: dict[str, Any] = {}
    for k, v in metrics.items():
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            out[k] = v
        elif isinstance(v, dict) and v and all(isinstance(x, (int, float, type(None))) for x in v.values()):
            out[k] = v
    return out


def run_baselines(baselines: list[tuple[str, Baseline]], train_set, eval_set, model=None) -> dict[str, dict]:
    """Fit each baseline on ``train_set`` and score it on ``eval_set``; ``{name: metrics}`` (with ``seconds``)."""
    results: dict[str, dict] = {}
    for name, baseline in baselines:
        if baseline.needs_model and model is None:
            continue
        t0 = time.perf_counter()
        use = model if baseline.needs_model else None
        baseline.fit(train_set, use)
        metrics = _scalars(baseline.score(eval_set, use))
        metrics["seconds"] = round(time.perf_counter() - t0, 2)
        metrics["probe"] = bool(baseline.needs_model)  # a read-out of the trained model, not a classical method
        logger.info("baseline %s: %s", name, {k: v for k, v in metrics.items() if isinstance(v, float)})
        results[name] = metrics
    return results


def main_metric(cfg, evaluator) -> tuple[str, bool]:
    """(name, greater is better) of the task's headline metric: the protocol's own choice, else the run's
    model-selection metric."""
    return evaluator.main_metric or (cfg.train.metric_for_best, cfg.train.greater_is_better)


def baseline_metrics(cfg, evaluator, baselines, train_set, eval_set, model=None) -> dict[str, Any]:
    """What evaluation adds to ``metrics.json``: the headline metric's name and direction and every baseline's
    metrics (``baselines``), with the best classical one (``best_baseline``: name and value)."""
    name, greater = main_metric(cfg, evaluator)
    results = run_baselines(baselines, train_set, eval_set, model)
    out: dict[str, Any] = {"main_metric": name, "greater_is_better": greater}
    if results:
        out["baselines"] = results
        best = best_baseline(results, name, greater)
        if best is not None:
            out["best_baseline"] = {"name": best[0], name: best[1]}
    return out


def best_baseline(results: dict[str, dict], metric: str, greater_is_better: bool,
                  include_probes: bool = False) -> tuple[str, float] | None:
    """The best classical baseline on ``metric`` (direction-aware); probes of the model are left out unless
    asked for. None when no baseline reports ``metric``."""
    scored = [(n, float(m[metric])) for n, m in results.items()
              if isinstance(m.get(metric), (int, float)) and (include_probes or not m.get("probe"))]
    if not scored:
        return None
    return max(scored, key=lambda x: x[1]) if greater_is_better else min(scored, key=lambda x: x[1])
