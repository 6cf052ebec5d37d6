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

import os
from pathlib import Path
from typing import Any, ClassVar

from torch.utils.data import Dataset

from allspark.errors import UserError

__all__ = ["ModalityDataset", "DatasetFormatError", "read_utf8_text", "path_inside"]


class DatasetFormatError(UserError, ValueError):
    """A file is missing, unreadable or not in the layout the reader expects."""


def read_utf8_text(path: Path, reader: str) -> str:
    """The text of ``path`` decoded as UTF-8. A missing file and one that is not UTF-8 raise
    :class:`DatasetFormatError` naming the file (and the line of the first byte that does not decode)."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise DatasetFormatError(f"{reader}: {path} is missing") from None
    except IsADirectoryError:
        raise DatasetFormatError(f"{reader}: {path} is a folder; expected a text file") from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise DatasetFormatError(f"{reader}: {path}, line {line}: expected UTF-8 text, found byte "
                                 f"0x{data[exc.start]:02x} that is not UTF-8 ({exc.reason})") from None


def path_inside(folder: Path, entry: Any, where: str | Path, what: str) -> Path:
    """``folder / entry`` for a relative path ``entry`` read from an index file (a list or caption file);
    ``where`` names that file (and line or item) in the error. The entry must be a relative path that stays
    inside ``folder`` once ``.`` and ``..`` are resolved; an absolute path, one that climbs out
    (``../../etc/passwd``) or a non-string raises :class:`DatasetFormatError` naming ``where`` and the entry.
    The check is on the path as written: links inside ``folder`` are followed (a data folder may link to
    another disk)."""
    if not isinstance(entry, str) or not entry or "\x00" in entry:
        raise DatasetFormatError(f"{where}: {what} {entry!r} is not a file path; expected a relative path "
                                 f"inside {folder}")
    norm = os.path.normpath(entry)
    if os.path.isabs(entry) or Path(entry).anchor or norm == ".." or norm.startswith(".." + os.sep):
        raise DatasetFormatError(f"{where}: {what} {entry!r} leaves the data folder; expected a relative path "
                                 f"inside {folder}, found "
                                 + ("an absolute path" if os.path.isabs(entry) or Path(entry).anchor
                                    else "one that climbs out with '..'"))
    return folder / norm


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
