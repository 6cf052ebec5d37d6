"""Shared machinery of the semantic-segmentation readers (ISPRS Vaihingen, Globe230k): co-registered raster
tiles with a dense label map, cut into square patches.

A subclass names its splits' tiles (:meth:`TiledSegmentation.split_tiles`) and reads one tile
(:meth:`TiledSegmentation.read_tile`: one ``H x W x C`` array per batch key, all on one grid, and the label map,
``H x W`` class indices ``0 .. K-1`` with ``-1`` where a pixel has no label). This module does the rest:

- **Patches.** Every tile of the split is covered by ``patch x patch`` windows every ``stride`` pixels (the
  training split every ``train_stride``), the last window of a row or column moved back to end at the tile's
  border (:mod:`allspark.data.tiling`): every pixel is covered, nothing is padded or resized. A tile smaller than
  the patch is refused, naming it.
- **Items.** Per window: each raster under its batch key as float32 ``[C, p, p]`` (standardised), ``label``
  int16 ``[p, p]`` (``-1`` = no label), ``tile`` (the tile's position in the split's list), ``window``
  ``[y0, x0]``, ``owned`` ``[r0, r1, c0, c1]`` (the part of the window whose predictions count, see
  :mod:`allspark.data.tiling`) and ``index``. The segmentation evaluator stitches the owned parts of the windows
  back into whole tiles, so every pixel of a tile is scored once, whatever the stride.
- **Augmentation** (training split, ``augment: true``): a random flip and a random multiple of 90 degrees per item,
  applied alike to every raster and the label (torch's RNG, so runs are repeatable under the run's seed).
- **Standardisation.** Per band of each raster: mean and standard deviation over every pixel of the training
  split's tiles (``info()["preprocessing"]``, kept in a checkpoint's ``data_info.json``); the validation and test
  splits are standardised with them. Computed once per process (cached under the reader, the root, the tiles,
  the reading arguments and the files' sizes and modification times).

Tiles are held in memory in their file dtype (e.g. uint8 orthophotos) and standardised per window when read.
"""
from __future__ import annotations

import copy
import logging
from pathlib import Path
from typing import Any, ClassVar, Iterator, Sequence

import numpy as np
import torch

from allspark.config import ConfigError
from allspark.data.base import DatasetFormatError, ModalityDataset
from allspark.data.tiling import tile_windows

logger = logging.getLogger(__name__)

__all__ = ["TiledSegmentation", "read_tiff", "decode_palette", "write_tiff"]

#: training-split statistics per (reader, root, tiles, args, file stamps), shared by the splits of one run
_STATS: dict[tuple, dict[str, dict[str, list[float]]]] = {}


def read_tiff(path: Path, what: str) -> np.ndarray:
    """A (multi-band) TIFF as ``H x W`` or ``H x W x bands`` (band-sequential files are moved to band-last, by the
    series' axes). A missing or unreadable file is a :class:`DatasetFormatError` naming it."""
    import tifffile

    if not path.is_file():
        raise DatasetFormatError(f"{path}: the {what} is missing")
    try:
        with tifffile.TiffFile(path) as tif:
            series = tif.series[0]
            data, axes = series.asarray(), series.axes
    except Exception as exc:  # tifffile raises TiffFileError, ValueError, struct.error ... on bad files
        raise DatasetFormatError(f"{path}: the {what} is not a readable TIFF: {type(exc).__name__}: {exc}") from exc
    if data.size == 0:
        raise DatasetFormatError(f"{path}: the {what} holds no image data")
    if data.ndim == 3 and axes[0] not in "YX":  # bands x H x W
        data = np.moveaxis(data, 0, -1)
    return data


def write_tiff(path: Path, array: np.ndarray, rgb: bool = False) -> None:
    """Write ``array`` (``H x W`` or ``H x W x C``, band-interleaved) as a TIFF (the demo generators)."""
    import tifffile

    path.parent.mkdir(parents=True, exist_ok=True)
    tifffile.imwrite(str(path), array, photometric="rgb" if rgb else "minisblack",
                     planarconfig="contig" if array.ndim == 3 else None)


def decode_palette(image: np.ndarray, palette: Sequence[Sequence[int]], path: Path) -> np.ndarray:
    """A colour-coded label image ``H x W x 3`` (uint8) -> class indices ``H x W`` (int64): class ``k`` is the
    pixels of colour ``palette[k]``, exactly. A pixel of any other colour is a :class:`DatasetFormatError` naming
    the file, the first such pixel (row, column), its colour, how many pixels are off-palette and the palette."""
    if image.ndim != 3 or image.shape[2] not in (3, 4):
        raise DatasetFormatError(f"{path}: expected a colour-coded label image (H x W x 3, RGB), got shape "
                                 f"{list(image.shape)}")
    if image.dtype != np.uint8:
        raise DatasetFormatError(f"{path}: expected an 8-bit RGB label image, got {image.dtype}")
    rgb = image[..., :3].astype(np.int64)
    code = (rgb[..., 0] << 16) | (rgb[..., 1] << 8) | rgb[..., 2]
    colours = np.array([(r << 16) | (g << 8) | b for r, g, b in palette], dtype=np.int64)
    order = np.argsort(colours)
    pos = np.searchsorted(colours[order], code).clip(0, len(colours) - 1)
    hit = colours[order][pos] == code
    if not hit.all():
        bad = np.argwhere(~hit)
        r, c = (int(v) for v in bad[0])
        shown = ", ".join(str(tuple(int(v) for v in p)) for p in palette)
        raise DatasetFormatError(
            f"{path}: pixel (row {r}, column {c}) has colour {tuple(int(v) for v in rgb[r, c])}, which is not in the "
            f"label palette ({shown}); {len(bad)} pixel(s) of this image are off-palette")
    return order[pos].astype(np.int64)


def _stamps(files: Sequence[Path]) -> tuple:
    out = []
    for f in files:
        try:
            st = f.stat()
            out.append((str(f), st.st_size, st.st_mtime_ns))
        except OSError:
            out.append((str(f), None, None))
    return tuple(out)


class TiledSegmentation(ModalityDataset):
    """Base reader (see the module docstring). Subclasses set ``raster_keys``, ``class_names``,
    ``dataset_name`` (and optionally ``palette``, RGB colours per class for the figures) and implement
    :meth:`split_tiles`, :meth:`read_tile` and :meth:`tile_files`."""

    splits: ClassVar[tuple[str, ...]] = ("train", "val", "test")
    raster_keys: ClassVar[tuple[str, ...]] = ()
    class_names: ClassVar[tuple[str, ...]] = ()
    palette: ClassVar[tuple[tuple[int, int, int], ...] | None] = None
    dataset_name: ClassVar[str] = "segmentation tiles"

    def __init__(self, root, split: str, *, patch: int = 256, stride: int | None = None,
                 train_stride: int | None = None, augment: bool = True, **reader_args: Any) -> None:
        super().__init__(root, split)
        self.reader_args = dict(reader_args)
        self.configure(**self.reader_args)  # subclass arguments (tile lists, modalities ...), checked there
        if not isinstance(patch, int) or patch < 1:
            raise ConfigError(f"{self.dataset_name}: data.args.patch must be a whole number >= 1, got {patch!r}")
        stride = patch if stride is None else stride
        train_stride = stride if train_stride is None else train_stride
        for name, value in (("stride", stride), ("train_stride", train_stride)):
            if not isinstance(value, int) or not 1 <= value <= patch:
                raise ConfigError(f"{self.dataset_name}: data.args.{name} must be a whole number in [1, patch={patch}] "
                                  f"(windows further apart than a patch would leave pixels out), got {value!r}")
        self.patch, self.stride = patch, (train_stride if split == "train" else stride)
        self.augment = bool(augment) and split == "train"
        self.tile_ids = list(self.split_tiles(split))
        if not self.tile_ids:
            raise DatasetFormatError(f"{self.dataset_name}: the {split} split of {self.root} has no tile")
        self.rasters: list[dict[str, np.ndarray]] = []
        self.labels: list[np.ndarray] = []
        windows = []
        channels: dict[str, int] | None = None
        for t, tile_id in enumerate(self.tile_ids):
            rasters, label = self._checked_tile(tile_id)
            shape = {k: int(v.shape[2]) for k, v in rasters.items()}
            if channels is None:
                channels = shape
            elif shape != channels:
                raise DatasetFormatError(f"{self.dataset_name}: tile {tile_id} has bands {shape}, tile "
                                         f"{self.tile_ids[0]} has {channels}; expected the same in every tile")
            h, w = label.shape
            if h < patch or w < patch:
                raise DatasetFormatError(
                    f"{self.dataset_name}: tile {tile_id} ({self._tile_name(tile_id)}) is {h} x {w} pixels, smaller "
                    f"than the {patch} x {patch} patch (data.args.patch); tiles are not padded or resized")
            self.rasters.append(rasters)
            self.labels.append(label)
            windows += [(t, y, x, own) for y, x, own in tile_windows(h, w, patch, self.stride)]
        self.channels = channels or {}
        self.windows = windows
        self.stats = self._statistics()
        self._mean = {k: np.asarray(v["band_mean"], np.float32) for k, v in self.stats.items()}
        self._std = {k: np.asarray(v["band_std"], np.float32) for k, v in self.stats.items()}

    # -- subclass hooks --------------------------------------------------------------------------------
    def configure(self, **reader_args: Any) -> None:
        """Take the reader's own ``data.args`` (tile lists, modalities ...); an unknown one is a ConfigError."""
        if reader_args:
            raise ConfigError(f"{self.dataset_name}: unknown data.args {sorted(reader_args)}")

    def split_tiles(self, split: str) -> list[Any]:  # pragma: no cover - interface
        raise NotImplementedError

    def read_tile(self, tile_id: Any) -> tuple[dict[str, np.ndarray], np.ndarray]:  # pragma: no cover - interface
        """({batch key: H x W x C array}, label map H x W int64 with -1 = no label), all on one grid, checked."""
        raise NotImplementedError

    def tile_files(self, tile_id: Any) -> list[Path]:  # pragma: no cover - interface
        raise NotImplementedError

    # -- prediction hooks (``allspark predict``: tiles without labels, no split lists) ----------------------
    def read_rasters(self, tile_id: Any) -> dict[str, np.ndarray]:  # pragma: no cover - interface
        """The tile's rasters only ({batch key: H x W x C}, checked, one grid), as :meth:`read_tile` gives them."""
        raise NotImplementedError

    def find_tiles(self) -> list[Any]:  # pragma: no cover - interface
        """The ids of the tiles whose rasters are under :attr:`root` (no split list or label needed)."""
        raise NotImplementedError

    def tile_name(self, tile_id: Any) -> str:
        """A file name (no suffix) for the tile's predicted label map: the name of its label file."""
        return str(tile_id)

    def encode_labels(self, label: np.ndarray) -> np.ndarray:
        """Class indices ``H x W`` (-1 = no label) -> the label image as the dataset stores it (default: the
        indices, uint8 or uint16)."""
        label = np.asarray(label)
        return label.astype(np.uint8 if len(self.class_names) <= 255 else np.uint16)

    @classmethod
    def for_prediction(cls, root: str | Path, stats: dict[str, dict[str, Sequence[float]]],
                       channels: dict[str, int], *, patch: int, stride: int, source: str = "the checkpoint",
                       **reader_args: Any) -> "TiledSegmentation":
        """The tiles found under ``root`` (:meth:`find_tiles`) as a split to predict: their rasters read and
        checked as for training (:meth:`read_rasters`), each band standardised with the training split's
        statistics ``stats`` (never the input's), cut into the windows of evaluation (``patch``, ``stride``); the
        ``label`` of every item is -1. ``channels`` (the bands per batch key the model was trained on) and the
        tile size (at least a patch) are checked, naming the file; ``source`` says where they come from."""
        self = cls.__new__(cls)
        ModalityDataset.__init__(self, root, "test")  # the evaluation windows, no augmentation
        self.reader_args = dict(reader_args)
        self.configure(**self.reader_args)
        self.patch, self.stride, self.augment = int(patch), int(stride), False
        self.tile_ids = list(self.find_tiles())
        self.rasters, self.labels, self.windows = [], [], []
        for t, tile_id in enumerate(self.tile_ids):
            rasters = {k: (v[..., None] if v.ndim == 2 else v) for k, v in self.read_rasters(tile_id).items()}
            files = dict(zip(self.raster_keys, self.tile_files(tile_id)))
            for key in self.raster_keys:
                found, expected = int(rasters[key].shape[2]), int(channels[key])
                if found != expected:
                    raise DatasetFormatError(f"{files[key]}: the {key} raster has {found} band(s); {source} was "
                                             f"trained on {expected}")
            h, w = next(iter(rasters.values())).shape[:2]
            if h < self.patch or w < self.patch:
                raise DatasetFormatError(
                    f"{files[self.raster_keys[0]]}: the tile is {h} x {w} pixels, smaller than the {self.patch} x "
                    f"{self.patch} window {source} predicts (data.args.patch); tiles are not padded or resized")
            self.rasters.append(rasters)
            self.labels.append(np.full((h, w), -1, np.int16))
            self.windows += [(t, y, x, own) for y, x, own in tile_windows(h, w, self.patch, self.stride)]
        self.channels = {k: int(channels[k]) for k in self.raster_keys}
        self.stats = {k: {"band_mean": list(stats[k]["band_mean"]), "band_std": list(stats[k]["band_std"])}
                      for k in self.raster_keys}
        self._mean = {k: np.asarray(v["band_mean"], np.float32) for k, v in self.stats.items()}
        self._std = {k: np.asarray(v["band_std"], np.float32) for k, v in self.stats.items()}
        return self

    def _tile_name(self, tile_id: Any) -> str:
        files = self.tile_files(tile_id)
        return str(files[0]) if files else str(tile_id)

    # -- reading ---------------------------------------------------------------------------------------
    def _checked_tile(self, tile_id: Any) -> tuple[dict[str, np.ndarray], np.ndarray]:
        rasters, label = self.read_tile(tile_id)
        if set(rasters) != set(self.raster_keys):
            raise RuntimeError(f"{type(self).__name__}.read_tile returned {sorted(rasters)}, expected "
                               f"{list(self.raster_keys)}")
        out = {}
        for key in self.raster_keys:
            r = rasters[key]
            out[key] = r[..., None] if r.ndim == 2 else r
        label = np.asarray(label)
        k = len(self.class_names)
        if label.ndim != 2 or label.min() < -1 or label.max() >= k:
            raise RuntimeError(f"{type(self).__name__}.read_tile: labels must be H x W in -1 .. {k - 1}")
        return out, label.astype(np.int16)

    def _statistics(self) -> dict[str, dict[str, list[float]]]:
        """Per-band mean / std of every raster over the training split's tiles (cached per process)."""
        train_ids = self.tile_ids if self.split == "train" else list(self.split_tiles("train"))
        files = [f for t in train_ids for f in self.tile_files(t)]
        key = (type(self), str(self.root.resolve()), tuple(map(str, train_ids)),
               tuple(sorted((k, repr(v)) for k, v in self.reader_args.items())), _stamps(files))
        if key in _STATS:
            return copy.deepcopy(_STATS[key])
        sums = {k: None for k in self.raster_keys}
        squares = {k: None for k in self.raster_keys}
        count = 0

        def tiles() -> Iterator[dict[str, np.ndarray]]:
            if self.split == "train":
                yield from self.rasters
            else:
                for t in train_ids:
                    yield self._checked_tile(t)[0]

        for rasters in tiles():
            for k, r in rasters.items():
                flat = r.reshape(-1, r.shape[2]).astype(np.float64)
                s, q = flat.sum(0), (flat ** 2).sum(0)
                sums[k] = s if sums[k] is None else sums[k] + s
                squares[k] = q if squares[k] is None else squares[k] + q
            count += next(iter(rasters.values())).shape[0] * next(iter(rasters.values())).shape[1]
        if not count:
            raise DatasetFormatError(f"{self.dataset_name}: the training split of {self.root} has no tile to fit the "
                                     "band statistics on")
        stats = {}
        for k in self.raster_keys:
            mean = sums[k] / count
            std = np.sqrt(np.maximum(squares[k] / count - mean ** 2, 0.0))
            std = np.where(std > 1e-6 * np.maximum(np.abs(mean), 1.0), std, 1.0)
            stats[k] = {"band_mean": mean.tolist(), "band_std": std.tolist()}
        _STATS[key] = stats
        return copy.deepcopy(stats)

    # -- dataset ---------------------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.windows)

    def normalised(self, tile: int, key: str) -> np.ndarray:
        """The standardised raster ``key`` of the split's ``tile``-th tile, float32 ``[C, H, W]``."""
        r = self.rasters[tile][key]
        return ((r.astype(np.float32) - self._mean[key]) / self._std[key]).transpose(2, 0, 1)

    def __getitem__(self, i: int) -> dict[str, Any]:
        t, y, x, own = self.windows[i]
        p = self.patch
        item: dict[str, Any] = {}
        for key in self.raster_keys:
            window = self.rasters[t][key][y:y + p, x:x + p].astype(np.float32)
            item[key] = torch.from_numpy(((window - self._mean[key]) / self._std[key]).transpose(2, 0, 1).copy())
        item["label"] = torch.from_numpy(self.labels[t][y:y + p, x:x + p].copy())
        if self.augment:
            flip, turns = torch.randint(2, ()).item(), torch.randint(4, ()).item()
            for key in (*self.raster_keys, "label"):
                v = item[key]
                if flip:
                    v = v.flip(-1)
                item[key] = torch.rot90(v, turns, dims=(-2, -1)).contiguous()
        item.update(tile=torch.tensor(t, dtype=torch.int64), window=torch.tensor([y, x], dtype=torch.int64),
                    owned=torch.tensor(own, dtype=torch.int64), index=torch.tensor(i, dtype=torch.int64))
        return item

    def tile_labels(self) -> list[np.ndarray]:
        """The label map of every tile of the split (int16, -1 = no label), in split order."""
        return list(self.labels)

    def info(self) -> dict[str, Any]:
        counts = np.zeros(len(self.class_names), np.int64)
        for label in self.labels:
            valid = label[label >= 0]
            counts += np.bincount(valid.astype(np.int64), minlength=len(self.class_names))
        info = {
            "num_classes": len(self.class_names), "class_names": list(self.class_names),
            "channels": dict(self.channels), "patch": self.patch, "stride": self.stride, "ignore_index": -1,
            "raster_keys": list(self.raster_keys), "preprocessing": copy.deepcopy(self.stats),
            "split_sizes": {"tiles": len(self.tile_ids), "windows": len(self.windows)},
            "class_pixels": {n: int(c) for n, c in zip(self.class_names, counts)},
        }
        if self.palette is not None:
            info["palette"] = [list(c) for c in self.palette]
        return info
