"""Dataset readers (one per official format, each with a demo generator) and data loading helpers."""
from __future__ import annotations


import logging
import os
from pathlib import Path
from typing import Any, Iterator

import torch
from torch.utils.data import DataLoader, Sampler

from allspark.data.base import DatasetFormatError, ModalityDataset
from allspark.registry import DATASETS

logger = logging.getLogger(__name__)

__all__ = [
    "DatasetFormatError",
    "ModalityDataset",
    "EpochSampler",
    "cache_dir",
    "demo_root",
    "resolve_data_root",
    "build_dataset",
    "build_loader",
    "loader_options",
    "resolve_loader_options",
    "usable_cores",
    "import_readers",
]


def import_readers() -> None:
    """Import every reader module of this package (each registers itself in ``DATASETS``)."""
    from allspark.plugins import import_submodules

    import_submodules("allspark.data")


def cache_dir() -> Path:
    """Where allspark keeps derived files (demo datasets, dequantised LLM weights): ``$ALLSPARK_CACHE``
    or ``~/.cache/allspark``."""
    return Path(os.environ.get("ALLSPARK_CACHE", Path.home() / ".cache" / "allspark")).expanduser()


def demo_key(reader: Any) -> str:
    """What a cached demo dataset is keyed by: the reader's ``demo_version`` and a hash of the source code of its
    demo generator: ``write_demo``, the module that defines it (whose helpers and constants it uses) and the
    reader's own module (its class attributes). An edited generator so writes a fresh folder instead of reusing
    data made by the old code; any edit of those modules does too (a rewrite costs seconds, stale data a wrong
    result)."""
    import hashlib
    import inspect

    version = getattr(reader, "demo_version", 1)
    parts = [f"v{version}"]
    write_demo = getattr(reader, "write_demo")
    sources = [write_demo, inspect.getmodule(write_demo), inspect.getmodule(reader)]
    for obj in dict.fromkeys(o for o in sources if o is not None):
        try:
            parts.append(inspect.getsource(obj))
        except (OSError, TypeError):  # no source (a compiled or interactive definition): the version alone
            parts.append(f"<no source of {obj!r}>")
    return f"v{version}-{hashlib.sha256(chr(0).join(parts).encode()).hexdigest()[:12]}"


def demo_root(dataset: str, seed: int = 0) -> Path:
    """Folder of the demo dataset of reader ``dataset``; written on first use, in the reader's format, under
    ``cache_dir()/demo/<dataset>-v<demo_version>-<hash of the generator's source>-seed<seed>``."""
    from allspark.io import atomic_dir, file_lock

    import_readers()
    reader = DATASETS.get(dataset)
    root = cache_dir() / "demo" / f"{dataset}-{demo_key(reader)}-seed{seed}"
    if not root.is_dir():
        # one writer per demo across processes (two runs, or test workers, sharing the cache): the others wait
        # for it and then read its folder, which is never replaced once written
        with file_lock(root.with_name(f".{root.name}.lock")):
            if not root.is_dir():
                logger.info("writing the %s demo dataset to %s", dataset, root)
                with atomic_dir(root) as tmp:
                    reader.write_demo(tmp, seed=seed)
    return root


def resolve_data_root(cfg: Any) -> Path:
    """The data folder named by ``cfg.data.root``; ``demo`` gives the reader's demo dataset."""
    if cfg.data.root == "demo":
        return demo_root(cfg.data.dataset, cfg.data.demo_seed)
    root = Path(cfg.data.root).expanduser()
    if not root.is_dir():
        raise DatasetFormatError(f"data root {str(root)!r} does not exist or is not a folder")
    return root


def build_dataset(cfg: Any, split: str, root: Path | None = None) -> ModalityDataset:
    import_readers()
    reader = DATASETS.get(cfg.data.dataset)
    return reader(root if root is not None else resolve_data_root(cfg), split, **cfg.data.args)


class EpochSampler(Sampler[int]):
    """A permutation that depends only on (seed, epoch), so a resumed run sees the same order.

    Every process draws the same permutation; accelerate then shards it into per-process batches.
    """

    def __init__(self, length: int, seed: int, shuffle: bool = True) -> None:
        self.length = length
        self.seed = seed
        self.shuffle = shuffle
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        if not self.shuffle:
            return iter(range(self.length))
        g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        return iter(torch.randperm(self.length, generator=g).tolist())

    def __len__(self) -> int:
        return self.length


def usable_cores() -> int:
    """The CPU cores this process may run on (its affinity mask where the OS has one)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def _setting(value: Any, name: str) -> bool | str:
    if value == "auto" or isinstance(value, bool):
        return value
    from allspark.config import ConfigError

    raise ConfigError(f"data.{name} must be auto, true or false, got {value!r}")


def resolve_loader_options(num_workers: int | str = "auto", pin_memory: bool | str = "auto",
                           persistent_workers: bool | str = "auto",
                           device: torch.device | str | None = None) -> dict[str, Any]:
    """``data.num_workers``, ``data.pin_memory`` and ``data.persistent_workers`` (see :class:`DataConfig`) as the
    DataLoader arguments for a run on ``device`` (default: a CUDA GPU when this machine has one).

    ``num_workers: auto``: 0 without a CUDA device; with one, ``min(4, cores / local processes - 1)`` (the cores of
    this process's affinity mask, shared by the ``LOCAL_WORLD_SIZE`` processes a launcher starts on this machine).
    ``pin_memory: auto``: on for a CUDA device. ``persistent_workers: auto``: on when there are workers (never
    without: torch refuses it). A bad value is a :class:`ConfigError` naming the key."""
    from allspark.config import ConfigError

    on_cuda = torch.device(device).type == "cuda" if device is not None else torch.cuda.is_available()
    if num_workers == "auto":
        local = max(1, int(os.environ.get("LOCAL_WORLD_SIZE") or 1))
        workers = max(0, min(4, usable_cores() // local - 1)) if on_cuda else 0
    elif isinstance(num_workers, int) and not isinstance(num_workers, bool) and num_workers >= 0:
        workers = num_workers
    else:
        raise ConfigError(f"data.num_workers must be auto or a whole number >= 0, got {num_workers!r}")
    pin, persistent = _setting(pin_memory, "pin_memory"), _setting(persistent_workers, "persistent_workers")
    return {"num_workers": workers, "pin_memory": on_cuda if pin == "auto" else bool(pin),
            "persistent_workers": workers > 0 and (persistent == "auto" or bool(persistent))}


def loader_options(data: Any, device: torch.device | str | None = None) -> dict[str, Any]:
    """The DataLoader arguments a config's ``data`` section sets (resolved: :func:`resolve_loader_options`)."""
    return resolve_loader_options(data.num_workers, data.pin_memory, data.persistent_workers, device)


def build_loader(dataset: ModalityDataset, batch_size: int, *, num_workers: int | str = 0,
                 sampler: Sampler | None = None, pin_memory: bool | str = "auto",
                 persistent_workers: bool | str = "auto", device: torch.device | str | None = None) -> DataLoader:
    """The loader of ``dataset`` in order (or ``sampler``'s), batched with the reader's ``collate``. The worker
    settings are those of ``data.*`` (``auto`` resolved for ``device``; see :func:`resolve_loader_options`); pass
    ``**loader_options(cfg.data)``."""
    options = resolve_loader_options(num_workers, pin_memory, persistent_workers, device)
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        collate_fn=dataset.collate,
        drop_last=False,
        # Creating a loader iterator draws a seed (the workers' seeds derive from it); with its own generator it
        # does not consume the global RNG, which a resumed run restores from the checkpoint and must see unchanged.
        generator=torch.Generator().manual_seed(0),
        **options,
    )
