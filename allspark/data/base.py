"""The contract every dataset reader follows.

A reader is a ``torch.utils.data.Dataset`` registered in ``DATASETS``. It is built as
``Reader(root, split, **args)`` where ``root`` is the dataset folder in its official layout and ``split``
is one of ``reader.splits``. Items are dicts of tensors (and ``index``, the item's position, so that
predictions gathered across processes can be checked for duplicates). ``Reader.write_demo(root, seed)``
writes a small learnable dataset in the same on-disk layout, so the demo goes through the real reader.

Readers expose what the model needs to know about the data through ``info()`` -- class names,
channel counts, target scalers -- as a plain dict; configs refer to it as ``${data.info.KEY}``.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

from torch.utils.data import Dataset

from allspark.errors import UserError

__all__ = ["ModalityDataset", "DatasetFormatError"]


class DatasetFormatError(UserError, ValueError):
    """A file is missing, unreadable or not in the layout the reader expects."""


class ModalityDataset(Dataset):
    splits: ClassVar[tuple[str, ...]] = ("train", "val", "test")
    #: bump when the demo generator changes, so cached demo data is rewritten
    demo_version: ClassVar[int] = 1

    def __init__(self, root: str | Path, split: str) -> None:
        if split not in self.splits:
            from allspark.config import ConfigError  # e.g. evaluate.py --split: a user error (exit 2)

            raise ConfigError(f"{type(self).__name__}: unknown split {split!r}; expected one of {self.splits}")
        self.root = Path(root)
        if not self.root.is_dir():
            raise DatasetFormatError(f"{type(self).__name__}: data root {str(self.root)!r} is not a folder")
        self.split = split

    def info(self) -> dict[str, Any]:
        """Facts about the data the model is built from (class names, channel counts, scalers)."""
        return {}

    @classmethod
    def write_demo(cls, root: str | Path, seed: int = 0) -> None:  # pragma: no cover - interface
        raise NotImplementedError(f"{cls.__name__} has no demo generator")

    def train_sampler(self, batch_size: int, seed: int):
        """A sampler for the training loader when the task needs structured batches (e.g. P identities x K
        images for re-identification); ``None`` gives the default shuffled order. A returned sampler must
        have ``set_epoch(epoch)`` and depend only on (seed, epoch), so a resumed run sees the same order."""
        return None

    @staticmethod
    def collate(items: list[dict[str, Any]]) -> dict[str, Any]:
        from torch.utils.data import default_collate

        return default_collate(items)
