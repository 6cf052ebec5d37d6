"""One task's run: its data root, datasets, data info, model, evaluator (with baselines) and loaders, built in one
order by :func:`build_run` for training (``allspark.training.train``), evaluation (``allspark.evaluate_run``), the
joint trainer and evaluator (``allspark.multitask``, once per task) and the untrained-model reference
(``allspark.retrieval.baseline``).

The order is part of the contract, since the model's initial weights draw from the global RNG: the data root
(resolved on the main process first: a demo dataset is written once), the datasets of the requested splits, the
data info (the training split's unless given), the model, the evaluator and baselines (a bad protocol or baseline
fails here, before any training), then the loaders. A joint run builds one model over several tasks, so it calls
the steps one by one (:meth:`Run.load_data`, then its model, then :meth:`Run.build_evaluator` and
:meth:`Run.build_loaders` per task).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from torch import nn
from torch.utils.data import DataLoader

from allspark.baselines import build_baselines
from allspark.config import Config
from allspark.data import EpochSampler, build_dataset, build_loader, loader_options, resolve_data_root
from allspark.evaluation import build_evaluator

__all__ = ["SPLITS", "Run", "build_run"]

#: the splits a training run reads
SPLITS = ("train", "val", "test")


@dataclass
class Run:
    """What one task's run is made of (see the module docstring for the order :func:`build_run` fills it in)."""

    cfg: Config
    root: Path
    #: split name -> dataset, for the splits asked for
    datasets: dict[str, Any]
    #: the data info the model and evaluator are built on (classes, bands, fitted normalisation, ...)
    info: dict[str, Any]
    model: nn.Module | None = None
    evaluator: Any = None
    #: the constructed (unfitted) baselines of ``eval.baselines``: ``[(name, baseline)]``
    baselines: list = field(default_factory=list)
    #: split name -> loader (see :meth:`build_loaders`)
    loaders: dict[str, DataLoader] = field(default_factory=dict)

    @classmethod
    def load_data(cls, cfg: Config, splits: Sequence[str] = SPLITS, *, accelerator=None,
                  info: dict[str, Any] | None = None) -> "Run":
        """Step 1: the data root (on the main process first when an ``accelerator`` is given), the datasets of
        ``splits`` and the data info (``info``, else the training split's ``info()``)."""
        with accelerator.main_process_first() if accelerator is not None else contextlib.nullcontext():
            root = resolve_data_root(cfg)
        datasets = {split: build_dataset(cfg, split, root) for split in splits}
        if info is None:
            info = datasets["train"].info()
        return cls(cfg=cfg, root=root, datasets=datasets, info=info)

    def dataset(self, split: str):
        """The dataset of ``split``: one of the run's, or read now from the run's root (not kept)."""
        return self.datasets[split] if split in self.datasets else build_dataset(self.cfg, split, self.root)

    def build_evaluator(self) -> None:
        """Step 3: the evaluator of ``eval.protocol`` and the baselines of ``eval.baselines`` on the run's info."""
        self.evaluator = build_evaluator(self.cfg, self.info)
        self.baselines = build_baselines(self.cfg, self.info, self.evaluator)

    def build_loaders(self, device=None, *, training: bool = True) -> None:
        """Step 4: a loader per dataset with the ``data`` section's worker settings for ``device``. ``training``:
        the training split shuffled in ``data.batch_size`` batches (its reader's sampler, else
        :class:`EpochSampler`); every other split (and with ``training=False`` every split) in order, in
        ``data.eval_batch_size`` batches."""
        loading = loader_options(self.cfg.data, device)  # data.num_workers, pin_memory, persistent_workers
        for split, dataset in self.datasets.items():
            if training and split == "train":
                sampler = dataset.train_sampler(self.cfg.data.batch_size, self.cfg.seed)
                if sampler is None:
                    sampler = EpochSampler(len(dataset), seed=self.cfg.seed)
                self.loaders[split] = build_loader(dataset, self.cfg.data.batch_size, sampler=sampler, **loading)
            else:
                self.loaders[split] = build_loader(dataset, self.cfg.data.eval_batch_size, **loading)


def build_run(cfg: Config, *, splits: Sequence[str] = SPLITS, accelerator=None, info: dict[str, Any] | None = None,
              model: nn.Module | Callable[[Run], nn.Module] | None = None, loaders: str | None = "train") -> Run:
    """The run of ``cfg`` over ``splits``: data (:meth:`Run.load_data`), then the model (``model``: a built one,
    e.g. loaded from a checkpoint; or a function of the run so far that builds it, e.g. ``lambda run:
    AllSpark(run.cfg, run.info)``; or None), then the evaluator and baselines, then a loader per split for
    ``accelerator``'s device (``loaders``: ``"train"`` the training split shuffled, ``"eval"`` every split in
    order, None no loaders)."""
    if loaders not in ("train", "eval", None):
        raise ValueError(f"build_run: loaders must be 'train', 'eval' or None, got {loaders!r}")
    run = Run.load_data(cfg, splits, accelerator=accelerator, info=info)
    run.model = model(run) if callable(model) and not isinstance(model, nn.Module) else model
    run.build_evaluator()
    if loaders is not None:
        run.build_loaders(accelerator.device if accelerator is not None else None, training=loaders == "train")
    return run
