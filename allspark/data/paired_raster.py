"""Shared machinery of the paired-raster fusion readers (Berlin HSI+SAR, Houston 2018 HSI+LiDAR).

A scene is two rasters of the same ground extent -- possibly on grids of different resolution -- plus a
training and a test label map on the *label grid* (0 = unlabelled, 1..K classes).

Co-registration: each raster keeps its native grid; label pixel ``(r, c)`` of an ``H_L x W_L`` label grid
is mapped to pixel ``(floor((r + 0.5) H_m / H_L), floor((c + 0.5) W_m / W_L))`` of an ``H_m x W_m`` raster
(pixel-centre nearest neighbour, the two grids covering the same extent). Resampling an image up to the
finest grid would cost memory for nothing: the patches are cut from each raster at its own resolution.

Items are pixels of the label grid: for each raster a ``patch x patch`` neighbourhood (``[C, p, p]``,
reflect-padded at the border) under the raster's batch key, ``label`` (class - 1; -1 for unlabelled
pixels of the ``scene`` split), ``coords`` [row, col] on the label grid and ``index``.

Splits: ``train`` = the training map minus a validation part (``round(val_ratio * n)`` per class, at least
1 where the class has 2 or more training pixels, drawn with ``split_seed``); ``val``; ``test`` = the test
map; ``scene`` = every pixel of the label grid, row-major.

Unlabelled pixels (``unlabelled_ratio`` > 0): the ``train`` split also holds ``round(unlabelled_ratio x
n_train)`` pixels drawn (with ``split_seed``) from those labelled in *neither* map, with ``label`` -1. The
classification loss ignores them; a correlation objective (``model.alignment``) needs no label and learns
from them too -- the semi-supervised use of maximal correlation on paired modalities. Test pixels are never
used this way. ``labelled_share`` s (optional) makes every training batch hold ``round(s x batch_size)``
labelled pixels (:class:`LabelledShareSampler`); by default batches are plain shuffles of the split.
Per-band mean and standard deviation of each raster are fitted on the raster pixels under the ``train`` labels only and applied everywhere
(``info()["preprocessing"]``: ``{raster key: {band_mean, band_std}}``, stored in a checkpoint's ``data_info.json``).

The files are read once per process, not once per split: the rasters and label maps :meth:`read_scene` returns
are cached (read-only arrays) under the reader class, the root, the reading arguments and the size and
modification time of every file in ``scene_files``, and the normalised, padded rasters are shared by the splits
built with the same fitting pixels. A rewritten file is read again.
"""
from __future__ import annotations

import hashlib
from collections import OrderedDict
from pathlib import Path
from typing import Any, ClassVar, Sequence

import numpy as np
import torch

from allspark.config import ConfigError
from allspark.data.base import DatasetFormatError, ModalityDataset

__all__ = ["PairedRasterScene", "LabelledShareSampler", "map_to_grid", "carve_validation", "smooth_fields"]


def map_to_grid(rows: np.ndarray, cols: np.ndarray, label_shape: tuple[int, int],
                raster_shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """Label-grid pixels -> the pixel of a raster covering the same extent (pixel-centre nearest)."""
    hl, wl = label_shape
    hm, wm = raster_shape
    r = np.minimum(((rows + 0.5) * hm / hl).astype(np.int64), hm - 1)
    c = np.minimum(((cols + 0.5) * wm / wl).astype(np.int64), wm - 1)
    return r, c


def carve_validation(train_idx: np.ndarray, labels: np.ndarray, val_ratio: float,
                     seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng([seed, 1])
    keep, val = [], []
    for k in np.unique(labels[train_idx]):
        pix = train_idx[labels[train_idx] == k]
        n_val = 0
        if val_ratio > 0 and len(pix) >= 2:
            n_val = min(max(int(np.floor(val_ratio * len(pix) + 0.5)), 1), len(pix) - 1)
        perm = rng.permutation(pix)
        val.append(perm[:n_val])
        keep.append(perm[n_val:])
    return np.sort(np.concatenate(keep)), np.sort(np.concatenate(val))


class LabelledShareSampler(torch.utils.data.Sampler):
    """Training indices in chunks of ``batch_size``, each with ``round(share x batch_size)`` labelled pixels
    (drawn in shuffled passes over the labelled set, as often as needed) and unlabelled pixels for the rest
    (one shuffled pass over them per epoch; the last chunk is filled from a second pass). So every batch
    carries a steady classification signal however many unlabelled pixels there are -- the labelled /
    unlabelled batch ratio of semi-supervised training (e.g. FixMatch). The order depends only on
    (seed, epoch)."""

    def __init__(self, labels: torch.Tensor, batch_size: int, share: float, seed: int) -> None:
        if not 0 < share < 1:
            raise ConfigError(f"labelled_share must be in (0, 1), got {share}")
        self.labelled = torch.nonzero(labels >= 0).flatten().numpy()
        self.unlabelled = torch.nonzero(labels < 0).flatten().numpy()
        self.n_lab = min(max(1, int(round(share * batch_size))), batch_size - 1)
        if not len(self.labelled) or not len(self.unlabelled):
            raise ConfigError("labelled_share needs both labelled and unlabelled training pixels "
                              "(set data.args.unlabelled_ratio > 0)")
        self.batch_size, self.seed, self.epoch = batch_size, seed, 0
        self.batches = int(np.ceil(len(self.unlabelled) / (batch_size - self.n_lab)))

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.batches * self.batch_size

    def __iter__(self):
        rng = np.random.default_rng([self.seed, self.epoch])

        def stream(pool: np.ndarray, n: int) -> np.ndarray:
            passes = int(np.ceil(n / len(pool)))
            return np.concatenate([rng.permutation(pool) for _ in range(passes)])[:n]

        n_un = self.batch_size - self.n_lab
        lab = stream(self.labelled, self.batches * self.n_lab).reshape(self.batches, self.n_lab)
        unl = stream(self.unlabelled, self.batches * n_un).reshape(self.batches, n_un)
        return iter(np.concatenate([lab, unl], 1).reshape(-1).tolist())


#: scenes read by this process: key -> {"read": (rasters, train map, test map), "normalised": {...}}; the two most
#: recent are kept (the splits of one run share one entry)
_SCENES: OrderedDict[tuple, dict[str, Any]] = OrderedDict()
_SCENES_KEPT = 2


def _stamps(root: Path, files: Sequence[str]) -> tuple:
    """(name, size, mtime) of each of ``files`` under ``root`` (missing: None), the cache key of a scene."""
    out = []
    for name in files:
        try:
            st = (root / name).stat()
            out.append((name, st.st_size, st.st_mtime_ns))
        except OSError:
            out.append((name, None, None))
    return tuple(out)


def _read_only(array: np.ndarray) -> np.ndarray:
    array.setflags(write=False)  # shared by every split: nothing may change it in place
    return array


class PairedRasterScene(ModalityDataset):
    """Base reader: subclasses implement :meth:`read_scene` and name their rasters' batch keys."""

    splits: ClassVar[tuple[str, ...]] = ("train", "val", "test", "scene")
    #: batch keys of the rasters, in the order read_scene returns them
    raster_keys: ClassVar[tuple[str, ...]] = ()
    default_class_names: ClassVar[tuple[str, ...]] = ()
    dataset_name: ClassVar[str] = "paired raster scene"
    #: the training and the test label map, relative to the root (named in the errors about the maps)
    label_files: ClassVar[tuple[str, str]] = ("training map", "test map")
    #: every file :meth:`read_scene` reads, relative to the root: their sizes and times key the read cache
    #: (empty: every file under the root)
    scene_files: ClassVar[tuple[str, ...]] = ()

    def _scene(self, read_args: dict[str, Any]) -> dict[str, Any]:
        """The cache entry of this root's scene, reading the files only when no split has read them yet."""
        key = (type(self), str(self.root.resolve()), tuple(sorted((k, repr(v)) for k, v in read_args.items())),
               _stamps(self.root, self.scene_files or sorted(
                   str(p.relative_to(self.root)) for p in self.root.rglob("*") if p.is_file())))
        entry = _SCENES.get(key)
        if entry is None:
            rasters, train_map, test_map = self.read_scene(self.root, **read_args)
            entry = {"read": ([_read_only(np.asarray(r)) for r in rasters], _read_only(np.asarray(train_map)),
                              _read_only(np.asarray(test_map))), "normalised": {}}
            _SCENES[key] = entry
            while len(_SCENES) > _SCENES_KEPT:
                _SCENES.popitem(last=False)
        _SCENES.move_to_end(key)
        return entry

    def __init__(self, root, split: str, *, patch: int = 7, val_ratio: float = 0.1, split_seed: int = 0,
                 class_names: Sequence[str] | None = None, unlabelled_ratio: float = 0.0,
                 labelled_share: float | None = None, **read_args: Any) -> None:
        super().__init__(root, split)
        if patch < 1 or patch % 2 == 0:
            raise ConfigError(f"{self.dataset_name}: patch must be an odd size >= 1, got {patch}")
        if not 0 <= val_ratio < 1:
            raise ConfigError(f"{self.dataset_name}: val_ratio must be in [0, 1), got {val_ratio}")
        if not unlabelled_ratio >= 0:
            raise ConfigError(f"{self.dataset_name}: unlabelled_ratio must be >= 0, got {unlabelled_ratio}")
        scene = self._scene(read_args)
        rasters, train_map, test_map = scene["read"]
        if len(rasters) != len(self.raster_keys):
            raise RuntimeError(f"{type(self).__name__}.read_scene returned {len(rasters)} rasters for keys "
                               f"{self.raster_keys}")
        tr_file, te_file = (self.root / f for f in self.label_files)
        if train_map.shape != test_map.shape:
            raise DatasetFormatError(
                f"{self.dataset_name}: the training map {tr_file} is {list(train_map.shape)} but the test map "
                f"{te_file} is {list(test_map.shape)}; both must be on the label grid")
        overlap = int(((train_map > 0) & (test_map > 0)).sum())
        if overlap:
            raise DatasetFormatError(f"{self.dataset_name}: {overlap} pixel(s) are labelled in both the "
                                     f"training map {tr_file} and the test map {te_file}; expected disjoint maps")
        height, width = train_map.shape
        num_classes = int(max(train_map.max(), test_map.max()))
        if num_classes < 1:
            raise DatasetFormatError(f"{self.dataset_name}: the label maps {tr_file} and {te_file} hold no "
                                     "labelled pixel")
        empty = [k for k in range(1, num_classes + 1) if not (train_map == k).any()]
        if empty:
            raise DatasetFormatError(f"{self.dataset_name}: class(es) {empty} have no pixel in the training map "
                                     f"{tr_file}; expected every class 1..{num_classes} to have one")
        names = list(class_names) if class_names is not None else (
            list(self.default_class_names) if len(self.default_class_names) == num_classes
            else [f"class_{k}" for k in range(1, num_classes + 1)])
        if len(names) != num_classes:
            raise ConfigError(f"{self.dataset_name}: {len(names)} class_names for {num_classes} classes")

        flat_train, flat_test = train_map.ravel(), test_map.ravel()
        pool = np.flatnonzero(flat_train)
        train, val = carve_validation(pool, flat_train, val_ratio, split_seed)
        unlabelled = np.empty(0, dtype=np.int64)
        if unlabelled_ratio > 0:
            free = np.flatnonzero((flat_train == 0) & (flat_test == 0))
            want = int(round(unlabelled_ratio * len(train)))
            if want > len(free):
                raise DatasetFormatError(
                    f"{self.dataset_name}: unlabelled_ratio={unlabelled_ratio} asks for {want} unlabelled pixels "
                    f"but only {len(free)} pixels are labelled in neither map")
            unlabelled = np.sort(np.random.default_rng([split_seed, 2]).choice(free, want, replace=False))
        parts = {"train": np.concatenate([train, unlabelled]), "val": val, "test": np.flatnonzero(flat_test),
                 "scene": np.arange(height * width)}
        idx = parts[split]
        labels = np.where(flat_train > 0, flat_train, flat_test)
        rows, cols = np.unravel_index(idx, (height, width))
        t_rows, t_cols = np.unravel_index(train, (height, width))

        self.patch, self.labelled_share = patch, labelled_share
        if labelled_share is not None and not 0 < labelled_share < 1:
            raise ConfigError(f"{self.dataset_name}: labelled_share must be in (0, 1), got {labelled_share}")
        half = patch // 2
        self.images: list[torch.Tensor] = []
        self.centres: list[torch.Tensor] = []
        channels, stats = {}, {}
        # the splits of one scene fit on the same training pixels: they share the normalised, padded rasters
        fit_key = (patch, hashlib.sha256(np.ascontiguousarray(train).tobytes()).hexdigest())
        shared = scene["normalised"].get(fit_key)
        if shared is None:
            shared = scene["normalised"][fit_key] = []
            while len(scene["normalised"]) > _SCENES_KEPT:  # other fits of the scene (seeds, patch sizes)
                scene["normalised"].pop(next(iter(scene["normalised"])))
            for raster in rasters:
                raster = raster.astype(np.float32, copy=False)
                hm, wm, _ = raster.shape
                tr, tc = map_to_grid(t_rows, t_cols, (height, width), (hm, wm))
                fit = raster[tr, tc].astype(np.float64)
                mean, std = fit.mean(0), fit.std(0)
                std = np.where(std > 1e-12 * np.maximum(np.abs(mean), 1.0), std, 1.0)
                normed = ((raster - mean) / std).astype(np.float32)
                padded = np.pad(normed, ((half, half), (half, half), (0, 0)), mode="reflect" if min(hm, wm) > half
                                else "edge")
                shared.append((torch.from_numpy(np.ascontiguousarray(padded.transpose(2, 0, 1))), mean, std))
        for key, raster, (image, mean, std) in zip(self.raster_keys, rasters, shared):
            hm, wm, c = raster.shape
            self.images.append(image)
            r, cc = map_to_grid(rows, cols, (height, width), (hm, wm))
            self.centres.append(torch.from_numpy(np.stack([r, cc], 1)))
            channels[key] = int(c)
            stats[key] = {"band_mean": mean.tolist(), "band_std": std.tolist()}
        self.labels = torch.from_numpy((labels[idx] - 1).astype(np.int64))
        self.coords = torch.from_numpy(np.stack([rows, cols], 1).astype(np.int64))
        self._info = {
            "num_classes": num_classes, "class_names": [str(n) for n in names], "height": int(height),
            "width": int(width), "channels": channels, "patch": patch,
            "raster_shapes": {k: list(r.shape) for k, r in zip(self.raster_keys, rasters)},
            "split_sizes": {k: int(len(v)) for k, v in parts.items()}, "unlabelled_train": int(len(unlabelled)),
            "preprocessing": stats,
        }

    def read_scene(self, root, **kwargs) -> tuple[list[np.ndarray], np.ndarray, np.ndarray]:  # pragma: no cover
        """Rasters (each H_m x W_m x C_m), training map and test map (label grid, int64)."""
        raise NotImplementedError

    def __len__(self) -> int:
        return len(self.labels)

    def train_sampler(self, batch_size: int, seed: int):
        """With ``labelled_share`` set and unlabelled pixels in the split: :class:`LabelledShareSampler`."""
        if self.labelled_share is None or self.split != "train" or not (self.labels < 0).any():
            return None
        return LabelledShareSampler(self.labels, batch_size, self.labelled_share, seed)

    def __getitem__(self, i: int) -> dict[str, Any]:
        item: dict[str, Any] = {}
        p = self.patch
        for key, image, centres in zip(self.raster_keys, self.images, self.centres):
            r, c = int(centres[i, 0]), int(centres[i, 1])
            item[key] = image[:, r:r + p, c:c + p]  # padded by p // 2: the window is centred on (r, c)
        item.update(label=self.labels[i], coords=self.coords[i], index=torch.tensor(i, dtype=torch.int64))
        return item

    def info(self) -> dict[str, Any]:
        import copy

        return copy.deepcopy(self._info)


def label_map(array: np.ndarray, path, what: str) -> np.ndarray:
    """An integer label map (float maps accepted when integral), 0 = unlabelled."""
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.ndim != 2:
        raise DatasetFormatError(f"{path}: the {what} must be 2-D (H x W), got shape {list(array.shape)}")
    if np.issubdtype(array.dtype, np.floating):
        if not np.isfinite(array).all() or (array != np.round(array)).any():
            raise DatasetFormatError(f"{path}: the {what} must hold integer class labels")
    out = array.astype(np.int64)
    if (out < 0).any():
        raise DatasetFormatError(f"{path}: the {what} has negative labels; expected 0 (unlabelled) or 1..K")
    return out


def check_raster(array: np.ndarray, path, what: str, bands: int | None = None) -> np.ndarray:
    if array.ndim == 2:
        array = array[..., None]
    if array.ndim != 3:
        raise DatasetFormatError(f"{path}: the {what} must be H x W x bands, got shape {list(array.shape)}")
    if not np.issubdtype(array.dtype, np.number) or np.issubdtype(array.dtype, np.complexfloating):
        raise DatasetFormatError(f"{path}: the {what} must be real numeric, got {array.dtype}")
    if bands is not None and array.shape[2] != bands:
        raise DatasetFormatError(f"{path}: the {what} has {array.shape[2]} bands; the config expects {bands}")
    bad = int((~np.isfinite(array.astype(np.float32))).sum())
    if bad:
        raise DatasetFormatError(f"{path}: {bad} value(s) of the {what} are NaN or infinite")
    return array


def demo_signatures(num_classes: int, confused_a: int, confused_b: int) -> tuple[np.ndarray, np.ndarray]:
    """Signature groups per class for the two modalities. Modality A puts the first ``confused_a`` class pairs
    ((0, 1), (2, 3), ...) in one group each, modality B the last ``confused_b`` pairs; every other class is a
    group of its own in both, so no pair is grouped in both modalities."""
    if 2 * (confused_a + confused_b) > num_classes:
        raise ValueError("demo signatures: the confused pairs of the two modalities must not overlap")

    def merge(pairs: list[int]) -> np.ndarray:
        ids = np.arange(num_classes)
        for p in pairs:
            ids[2 * p + 1] = ids[2 * p]
        return np.unique(ids, return_inverse=True)[1].reshape(-1)

    a = merge(list(range(confused_a)))
    b = merge(list(range(num_classes // 2 - confused_b, num_classes // 2)))
    if len(set(zip(a.tolist(), b.tolist()))) != num_classes:
        raise ValueError("demo signatures are not unique per class")
    return a, b


def near_signatures(group: np.ndarray, own: np.ndarray, separation: float) -> np.ndarray:
    """Per-class signatures [K, ...]: ``own[c]``, except that a class grouped with an earlier class ``c0``
    gets ``own[c0] + separation * (own[c] - own[c0])`` -- identical to it at 0, fully its own at 1."""
    out = own.astype(np.float64).copy()
    for c in range(len(group)):
        first = int(np.flatnonzero(group == group[c])[0])
        if first != c:
            out[c] = own[first] + separation * (own[c] - own[first])
    return out


def gaussian_spectra(rng: np.random.Generator, n: int, bands: int, peaks: int = 3, width: float = 0.08,
                     base: float = 0.2, height: float = 0.25) -> np.ndarray:
    """``n`` random smooth reflectance spectra [n, bands]: a floor plus ``peaks`` Gaussian absorption-free
    bumps at random wavelengths."""
    wl = np.linspace(0, 1, bands)
    centres = rng.uniform(0.1, 0.9, (n, peaks))
    return base + height * np.exp(-0.5 * ((wl[None, None] - centres[..., None]) / width) ** 2).sum(1)


def demo_hsi(rng: np.random.Generator, class_spectra: np.ndarray, nuisance: float, noise: float,
             scale: float, clutter: int = 3) -> np.ndarray:
    """A hyperspectral cube [h, w, bands] from per-pixel class spectra [h, w, bands]: each pixel is a linear
    mixture of its class spectrum (share ``1 - nuisance``) and ``clutter`` random background endmembers
    whose abundances vary smoothly over the scene (spatial scale ``scale`` pixels), times a smooth
    illumination factor, plus Gaussian sensor noise of standard deviation ``noise``. The clutter and the
    illumination are independent of the class and of any other modality."""
    h, w, bands = class_spectra.shape
    fields = smooth_fields(rng, clutter + 1, h, w, scale)
    weights = np.exp(fields[..., :clutter])
    weights /= weights.sum(-1, keepdims=True)
    mix = (1 - nuisance) * class_spectra + nuisance * weights @ gaussian_spectra(rng, clutter, bands)
    return mix * np.exp(0.15 * fields[..., clutter:]) + rng.normal(0, noise, (h, w, bands))


def demo_layout(rng: np.random.Generator, height: int, width: int, num_classes: int, block: int,
                train_per_class: int, test_fraction: float = 1.0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Class map of square blocks (each class owning several), and train/test maps (0 = unlabelled).
    ``test_fraction`` of each class's pixels outside the training map are test pixels; the rest are
    labelled in neither map (as in the real scenes)."""
    gy, gx = int(np.ceil(height / block)), int(np.ceil(width / block))
    cells = np.resize(np.arange(num_classes), gy * gx)
    cells = rng.permutation(cells).reshape(gy, gx)
    classes = np.kron(cells, np.ones((block, block), dtype=np.int64))[:height, :width] + 1
    train = np.zeros((height, width), np.uint8)
    test = np.zeros((height, width), np.uint8)
    flat = classes.ravel()
    for k in range(1, num_classes + 1):
        pix = rng.permutation(np.flatnonzero(flat == k))
        n_tr = min(train_per_class, len(pix) // 2)
        n_te = int(round(test_fraction * (len(pix) - n_tr)))
        train.ravel()[pix[:n_tr]] = k
        test.ravel()[pix[n_tr:n_tr + n_te]] = k
    return classes, train, test


def smooth_fields(rng: np.random.Generator, n: int, height: int, width: int, scale: float) -> np.ndarray:
    """``n`` independent spatially smooth random fields [height, width, n], each standardised to zero mean and
    unit variance: white noise blurred with a Gaussian of ``scale`` pixels (wrapping at the borders)."""
    from scipy.ndimage import gaussian_filter

    noise = rng.standard_normal((height, width, n))
    field = gaussian_filter(noise, sigma=(scale, scale, 0), mode="wrap")
    return (field - field.mean((0, 1))) / field.std((0, 1))
