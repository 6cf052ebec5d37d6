"""Pavia University hyperspectral scene (ROSIS, 103 bands, 610 x 340 pixels, nine land-cover classes) for
per-pixel classification (AllSpark, Section III-C "HSI", Section IV-B, Table V).

On-disk layout (as distributed by the GIC group of the University of the Basque Country)::

    <root>/PaviaU.mat       variable ``paviaU``    H x W x C numeric cube (uint16 digital numbers)
    <root>/PaviaU_gt.mat    variable ``paviaU_gt`` H x W uint8 label map, 0 = unlabelled, 1..K classes

Both MATLAB v5 files (``scipy.io.loadmat``) and v7.3 files (HDF5, read with ``h5py``; MATLAB stores
arrays column-major there, so the axes come back reversed and are transposed back) are read. When the
default variable name is absent, the single array of the right rank whose name does not start with ``__``
is used, so re-saved copies with other variable names still load; ``cube_key``/``gt_key`` name it
explicitly.

Items are single pixels (the paper treats all bands of one pixel as one sample): ``spectrum`` float32
[C], ``label`` int64 (``gt - 1``; -1 for unlabelled pixels of the ``scene`` split), ``coords`` int64
[row, col] and ``index`` int64 (position in the split).

Splits:
- paper split (default): per class, ``round(train_ratio * n)`` labelled pixels (round half up, at least 1
  and at most ``n - 1``) are drawn for training with ``numpy.random.default_rng(split_seed)``, the other
  pixels are the test split (4:6 in the paper). Of each class's training pixels,
  ``round(val_ratio * n_train)`` (at least 1 where the class keeps a training pixel) are held out as
  ``val`` for model selection; ``train`` is the rest.
- user split: ``split_file`` is a .mat holding two label maps of the scene's size (``split_keys``,
  default ``("TR", "TE")``; 0 = not in that part); ``val`` is carved from its training part the same way.
- ``scene``: every pixel of the scene, row-major, labelled or not -- what the classification map is
  drawn from.

Per-band mean and standard deviation are fitted on the ``train`` pixels only (after removing ``val``) and
applied to every split, so no statistic of validation or test pixels leaks into training. ``info()`` carries
them as ``preprocessing: {band_mean, band_std}``; a checkpoint stores them in ``data_info.json``.

Refused with ``DatasetFormatError`` naming the file: a missing or unreadable .mat file, no variable of the
expected name and rank (or several candidates), a cube that is not 3-D real numeric or holds NaN/inf (no
imputation), another band count than ``bands``, a ground truth of another size than the cube or with
negative or fractional labels, a class with fewer than 2 labelled pixels, and split maps that overlap, differ
in size from the scene or leave a class without training pixel.
"""
from __future__ import annotations

import logging
import os
import tempfile
from functools import lru_cache
from pathlib import Path
from typing import Any, ClassVar, Sequence

import numpy as np
import torch

from allspark.config import ConfigError
from allspark.data.base import DatasetFormatError, ModalityDataset
from allspark.registry import DATASETS

logger = logging.getLogger(__name__)

__all__ = ["PaviaUniversity", "PAVIA_CLASS_NAMES", "read_mat_array", "paper_split"]

CUBE_FILE = "PaviaU.mat"
GT_FILE = "PaviaU_gt.mat"
CUBE_KEY = "paviaU"
GT_KEY = "paviaU_gt"
PAVIA_CLASS_NAMES = (
    "Asphalt", "Meadows", "Gravel", "Trees", "Painted metal sheets", "Bare Soil", "Bitumen",
    "Self-Blocking Bricks", "Shadows",
)
LAYOUT = (
    f"expected layout: <root>/{CUBE_FILE} holding variable {CUBE_KEY!r} (H x W x bands numeric cube) and "
    f"<root>/{GT_FILE} holding variable {GT_KEY!r} (H x W integer label map, 0 = unlabelled, 1..K classes)"
)


# -- reading .mat files ------------------------------------------------------------------------------

def _load_v5(path: Path) -> dict[str, Any]:
    import scipy.io

    try:
        return scipy.io.loadmat(str(path))
    except NotImplementedError as exc:  # scipy's answer to a v7.3 file it did not recognise as HDF5
        raise DatasetFormatError(f"{path}: cannot read this MATLAB file: {exc}") from exc
    except Exception as exc:  # scipy raises ValueError/TypeError/OSError for truncated or foreign files
        raise DatasetFormatError(
            f"{path}: not a readable MATLAB .mat file (corrupt or truncated?): {type(exc).__name__}: {exc}"
        ) from exc


def _read_hdf5(path: Path, key: str, rank: int, what: str, strict_key: bool) -> np.ndarray:
    """A v7.3 .mat file: HDF5 with arrays stored column-major, i.e. with the axes reversed."""
    import h5py

    try:
        with h5py.File(path, "r") as f:
            # '#refs#' and '#subsystem#' are MATLAB's bookkeeping groups, not variables.
            ranks = {k: len(f[k].shape) for k in f.keys()
                     if not k.startswith("#") and isinstance(f[k], h5py.Dataset)}
            data = f[_choose_key(path, key, ranks, rank, what, strict_key)][()]
    except DatasetFormatError:
        raise
    except Exception as exc:
        raise DatasetFormatError(
            f"{path}: cannot read this MATLAB v7.3 (HDF5) file: {type(exc).__name__}: {exc}"
        ) from exc
    return np.ascontiguousarray(np.transpose(data))


def _choose_key(path: Path, key: str, ranks: dict[str, int], rank: int, what: str, strict_key: bool) -> str:
    """``key`` if present; else (unless ``strict_key``) the one array of rank ``rank`` -- a copy re-saved
    under another variable name still loads, but an ambiguous file is refused rather than guessed."""
    if key in ranks:
        return key
    candidates = [k for k, r in ranks.items() if r == rank]
    if len(candidates) == 1 and not strict_key:
        return candidates[0]
    listing = ", ".join(f"{k!r} ({r}-D)" for k, r in ranks.items()) or "no arrays"
    hint = "" if strict_key else f" and not exactly one {rank}-D array to fall back on"
    raise DatasetFormatError(
        f"{path}: no variable {key!r} ({what}, {rank}-D){hint}; the file holds {listing}. "
        "Name the variable with the reader's key argument"
        + (f". {LAYOUT}" if path.name in (CUBE_FILE, GT_FILE) else "")
    )


def read_mat_array(path: Path, key: str, rank: int, what: str, *, strict_key: bool = False) -> np.ndarray:
    """One array from a MATLAB .mat file (v5 through scipy, v7.3/HDF5 through h5py).

    ``key`` is the expected variable name; unless ``strict_key`` is set, a file without it is still read
    when it holds exactly one array of rank ``rank``.
    """
    import h5py

    if not path.is_file():
        raise DatasetFormatError(f"{path} is missing; {LAYOUT}")
    if h5py.is_hdf5(str(path)):
        return _read_hdf5(path, key, rank, what, strict_key)
    arrays = {k: v for k, v in _load_v5(path).items() if not k.startswith("__") and isinstance(v, np.ndarray)}
    return arrays[_choose_key(path, key, {k: v.ndim for k, v in arrays.items()}, rank, what, strict_key)]


def _stamp(path: Path) -> tuple[str, int, int]:
    if not path.is_file():
        raise DatasetFormatError(f"{path} is missing; {LAYOUT}")
    st = path.stat()
    return str(path.resolve()), st.st_mtime_ns, st.st_size


@lru_cache(maxsize=2)
def _load_scene(cube_path: str, gt_path: str, stamps: tuple, cube_key: str, gt_key: str,
                strict_keys: tuple[bool, bool]) -> tuple[np.ndarray, np.ndarray]:
    """Cube (float32 H x W x C) and ground truth (int64 H x W), validated.

    Cached on (paths, mtimes, sizes, keys): the train/val/test/scene readers are built separately and the
    real cube is ~85 MB as float32, so it is read once per process and re-read only if a file changes.
    """
    cube_file, gt_file = Path(cube_path), Path(gt_path)
    cube = read_mat_array(cube_file, cube_key, 3, "the hyperspectral cube", strict_key=strict_keys[0])
    if cube.ndim != 3:
        raise DatasetFormatError(
            f"{cube_file}: the cube must be 3-D (H x W x bands), got shape {list(cube.shape)}; {LAYOUT}"
        )
    if not (np.issubdtype(cube.dtype, np.number) and not np.issubdtype(cube.dtype, np.complexfloating)):
        raise DatasetFormatError(f"{cube_file}: the cube must be real numeric, got dtype {cube.dtype}")
    cube = cube.astype(np.float32, copy=False)
    bad = int((~np.isfinite(cube)).sum())
    if bad:
        raise DatasetFormatError(
            f"{cube_file}: {bad} value(s) of the cube are NaN or infinite; the reader does not impute -- "
            "fix or mask them in the file"
        )
    gt = read_mat_array(gt_file, gt_key, 2, "the ground-truth label map", strict_key=strict_keys[1])
    if gt.ndim != 2:
        raise DatasetFormatError(f"{gt_file}: the ground truth must be 2-D (H x W), got shape {list(gt.shape)}")
    if gt.shape != cube.shape[:2]:
        raise DatasetFormatError(
            f"{gt_file}: ground truth is {gt.shape[0]} x {gt.shape[1]} but the cube in {cube_file} is "
            f"{cube.shape[0]} x {cube.shape[1]} (x {cube.shape[2]} bands); they must cover the same pixels"
        )
    gt = _as_label_map(gt, gt_file, "ground truth")
    if gt.max(initial=0) < 1:
        raise DatasetFormatError(f"{gt_file}: the ground truth has no labelled pixel (all 0)")
    logger.info("Pavia University: read a %d x %d x %d cube from %s (%d labelled pixels, %d classes)",
                *cube.shape, cube_file, int((gt > 0).sum()), int(gt.max()))
    # Shared by every reader of this process through the cache: make accidental in-place edits fail.
    cube.flags.writeable = False
    gt.flags.writeable = False
    return cube, gt


def _as_label_map(labels: np.ndarray, path: Path, what: str) -> np.ndarray:
    """Integer labels >= 0 as int64 (float maps are accepted when integral, as MATLAB often saves double)."""
    if not np.issubdtype(labels.dtype, np.number):
        raise DatasetFormatError(f"{path}: the {what} must be numeric, got dtype {labels.dtype}")
    if np.issubdtype(labels.dtype, np.floating):
        if not np.isfinite(labels).all() or (labels != np.round(labels)).any():
            raise DatasetFormatError(f"{path}: the {what} must hold integer class labels, found fractional/NaN values")
    out = labels.astype(np.int64)
    if (out < 0).any():
        raise DatasetFormatError(f"{path}: the {what} has negative labels; expected 0 (unlabelled) or 1..K")
    return out


# -- splitting ---------------------------------------------------------------------------------------

def _round_half_up(x: float) -> int:
    return int(np.floor(x + 0.5))


def _class_pixels(labels: np.ndarray, k: int) -> np.ndarray:
    """Flat (row-major) indices of the pixels of class ``k``, sorted, so a seed fixes the split."""
    return np.flatnonzero(labels.ravel() == k)


def paper_split(gt: np.ndarray, num_classes: int, train_ratio: float, seed: int,
                source: str = "ground truth") -> tuple[np.ndarray, np.ndarray]:
    """Per-class random train/test split of the labelled pixels (flat indices, each sorted).

    Per class with ``n`` pixels, ``round_half_up(train_ratio * n)`` go to training, clipped to
    ``[1, n - 1]`` so both parts see every class; a class with fewer than 2 pixels cannot be split.
    """
    rng = np.random.default_rng(seed)
    train, test = [], []
    for k in range(1, num_classes + 1):
        pix = _class_pixels(gt, k)
        n = len(pix)
        if n < 2:
            raise DatasetFormatError(
                f"Pavia University: class {k} has {n} labelled pixel(s) in the {source}; at least 2 are needed "
                "to give it both a training and a test pixel"
            )
        n_train = min(max(_round_half_up(train_ratio * n), 1), n - 1)
        perm = rng.permutation(pix)
        train.append(perm[:n_train])
        test.append(perm[n_train:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(test))


def _carve_val(train: np.ndarray, flat_labels: np.ndarray, num_classes: int, val_ratio: float,
               seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Hold out ``round_half_up(val_ratio * n_train)`` (>= 1 where the class keeps a training pixel) of
    each class's training pixels as validation. A separate generator stream keeps the train/test split
    independent of ``val_ratio``."""
    rng = np.random.default_rng([seed, 1])
    keep, val = [], []
    for k in range(1, num_classes + 1):
        pix = train[flat_labels[train] == k]
        n = len(pix)
        n_val = 0
        if val_ratio > 0 and n >= 2:
            n_val = min(max(_round_half_up(val_ratio * n), 1), n - 1)
        perm = rng.permutation(pix)
        val.append(perm[:n_val])
        keep.append(perm[n_val:])
    return np.sort(np.concatenate(keep)), np.sort(np.concatenate(val))


# -- the reader --------------------------------------------------------------------------------------

@DATASETS.register("pavia_university")
class PaviaUniversity(ModalityDataset):
    """Pixels of the Pavia University scene; see the module docstring for layout, splits and scaling."""

    splits: ClassVar[tuple[str, ...]] = ("train", "val", "test", "scene")
    demo_version: ClassVar[int] = 1

    def __init__(
        self,
        root: str | Path,
        split: str,
        *,
        bands: int | None = None,
        train_ratio: float = 0.4,
        val_ratio: float = 0.1,
        split_seed: int = 0,
        split_file: str | Path | None = None,
        split_keys: Sequence[str] = ("TR", "TE"),
        class_names: Sequence[str] | None = None,
        cube_key: str | None = None,
        gt_key: str | None = None,
    ) -> None:
        super().__init__(root, split)
        if not 0 < train_ratio < 1:
            raise ConfigError(f"Pavia University: train_ratio must be in (0, 1), got {train_ratio}")
        if not 0 <= val_ratio < 1:
            raise ConfigError(f"Pavia University: val_ratio must be in [0, 1), got {val_ratio}")
        cube_path, gt_path = self.root / CUBE_FILE, self.root / GT_FILE
        missing = [p.name for p in (cube_path, gt_path) if not p.is_file()]
        if missing:
            raise DatasetFormatError(
                f"Pavia University: {', '.join(missing)} missing under {str(self.root)!r}; {LAYOUT}"
            )
        stamps = (_stamp(cube_path), _stamp(gt_path))
        cube, gt = _load_scene(str(cube_path), str(gt_path), stamps, cube_key or CUBE_KEY, gt_key or GT_KEY,
                               (cube_key is not None, gt_key is not None))
        height, width, num_bands = cube.shape
        if bands is not None and num_bands != bands:
            raise DatasetFormatError(
                f"Pavia University: {cube_path} has {num_bands} bands; the config expects {bands} "
                "(data.args.bands)"
            )
        flat_gt = gt.ravel()
        num_classes = int(flat_gt.max())

        if split_file is None:
            pool, test = paper_split(gt, num_classes, train_ratio, split_seed, f"ground truth {gt_path}")
            labels_of = flat_gt
        else:
            pool, test, labels_of, num_classes = self._user_split(split_file, split_keys, gt, num_classes)
        train, val = _carve_val(pool, labels_of, num_classes, val_ratio, split_seed)

        if class_names is None:
            class_names = PAVIA_CLASS_NAMES if num_classes == len(PAVIA_CLASS_NAMES) else [
                f"class_{k}" for k in range(1, num_classes + 1)]
        if len(class_names) != num_classes:
            raise ConfigError(
                f"Pavia University: {len(class_names)} class_names given but the labels have {num_classes} classes"
            )

        pixels = cube.reshape(-1, num_bands)
        train_pixels = pixels[train].astype(np.float64)
        self.band_mean = train_pixels.mean(axis=0)
        std = train_pixels.std(axis=0)
        # A constant band carries no information; dividing by 1 keeps it at 0 instead of inf.
        self.band_std = np.where(std > 1e-12 * np.maximum(np.abs(self.band_mean), 1.0), std, 1.0)

        parts = {"train": train, "val": val, "test": test, "scene": np.arange(height * width)}
        idx = parts[self.split]
        spectra = (pixels[idx].astype(np.float64) - self.band_mean) / self.band_std
        labels = labels_of[idx] - 1  # 0 (unlabelled) becomes -1; only the scene split has those
        self.spectra = torch.from_numpy(spectra.astype(np.float32))
        self.labels = torch.from_numpy(labels.astype(np.int64))
        self.coords = torch.from_numpy(np.stack(np.unravel_index(idx, (height, width)), axis=1).astype(np.int64))
        self.flat_indices = idx
        self._info = {
            "num_bands": int(num_bands),
            "num_classes": int(num_classes),
            "class_names": [str(c) for c in class_names],
            "height": int(height),
            "width": int(width),
            "split_sizes": {name: int(len(v)) for name, v in parts.items()},
            # the statistics fitted on the training split, stored in the checkpoint (data_info.json), so a
            # trained model normalises new scenes without the training data (allspark predict)
            "preprocessing": {"band_mean": self.band_mean.tolist(), "band_std": self.band_std.tolist()},
        }

    def _user_split(self, split_file: str | Path, keys: Sequence[str], gt: np.ndarray,
                    num_classes: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
        """Training pool and test pixels from two label maps in ``split_file``.

        Returns (pool, test, flat labels, K). Labels come from the split maps themselves (they are the
        user's ground truth for those pixels); the scene split still reports the labels of the gt file.
        """
        path = Path(split_file).expanduser()
        if not path.is_absolute() and not path.is_file():
            path = self.root / path
        if len(keys) != 2:
            raise ConfigError(f"Pavia University: split_keys must name two variables (train, test), got {keys!r}")
        if not path.is_file():
            raise DatasetFormatError(
                f"Pavia University: split_file {str(path)!r} is missing; expected a .mat file holding two "
                f"label maps of the scene's size ({keys[0]!r} = training pixels, {keys[1]!r} = test pixels, "
                "0 = not in that part)"
            )
        maps = []
        for key in keys:
            m = read_mat_array(path, key, 2, f"the {key} label map", strict_key=True)
            if m.shape != gt.shape:
                raise DatasetFormatError(
                    f"{path}: split map {key!r} is {list(m.shape)} but the scene is {list(gt.shape)}; "
                    "the train and test maps must have the scene's size"
                )
            maps.append(_as_label_map(m, path, f"split map {key!r}").ravel())
        tr, te = maps
        both = int(((tr > 0) & (te > 0)).sum())
        if both:
            raise DatasetFormatError(f"{path}: {both} pixel(s) are labelled in both {keys[0]!r} and {keys[1]!r}")
        k = max(num_classes, int(tr.max()), int(te.max()))
        empty = [c for c in range(1, k + 1) if not (tr == c).any()]
        if empty:
            raise DatasetFormatError(
                f"{path}: class(es) {empty} have no pixel in the training map {keys[0]!r}; "
                "every class needs at least one training pixel"
            )
        labels = np.where(tr > 0, tr, np.where(te > 0, te, gt.ravel()))
        return np.flatnonzero(tr), np.flatnonzero(te), labels, k

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return {"spectrum": self.spectra[i], "label": self.labels[i], "coords": self.coords[i],
                "index": torch.tensor(i, dtype=torch.int64)}

    def info(self) -> dict[str, Any]:
        import copy

        return copy.deepcopy(self._info)

    # -- demo ----------------------------------------------------------------------------------------
    @classmethod
    def write_demo(cls, root: str | Path, seed: int = 0, height: int = 40, width: int = 40,
                   bands: int = 103) -> None:
        """Write a small synthetic scene as ``PaviaU.mat`` (uint16 cube) and ``PaviaU_gt.mat`` (uint8).

        Recipe (learnable from the spectrum alone, yet not linearly trivial):
        - nine smooth endmember spectra over the ROSIS range (430-860 nm): broad Gaussian bumps plus a
          red-edge step for the two vegetation classes; deliberately close pairs (Asphalt/Bitumen,
          Gravel/Self-Blocking Bricks, Meadows/Trees) differ only by small shifts;
        - a jittered-grid Voronoi partition, each class owning several regions; each region perturbs its
          class's endmember slightly (within-class spectral variability);
        - every pixel is a linear mixture: its region's material with abundance U(0.55, 0.9), the rest
          split between the nearest other region's material and a random material;
        - per-pixel illumination scaling U(0.75, 1.25) and additive Gaussian noise;
        - region borders and a random 15% of the pixels are left unlabelled (0).
        Both files are written to temporary names first and then renamed, so a crash leaves no
        half-written file.
        """
        import scipy.io

        root = Path(root)
        root.mkdir(parents=True, exist_ok=True)
        cube, gt = _demo_scene(np.random.default_rng(seed), height, width, bands)
        temps: list[tuple[str, Path]] = []
        try:
            for name, key, value in ((CUBE_FILE, CUBE_KEY, cube), (GT_FILE, GT_KEY, gt)):
                fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp", dir=root)
                os.close(fd)
                temps.append((tmp, root / name))
                scipy.io.savemat(tmp, {key: value}, appendmat=False, do_compression=True)
            for tmp, final in temps:
                os.replace(tmp, final)
        finally:
            for tmp, _ in temps:
                if os.path.exists(tmp):
                    os.unlink(tmp)


def _demo_endmembers(rng: np.random.Generator, bands: int) -> np.ndarray:
    """Nine smooth reflectance spectra in [0.02, 0.8] (rows in PAVIA_CLASS_NAMES order)."""
    wl = np.linspace(430.0, 860.0, bands)

    def bumps(base: float, peaks: Sequence[tuple[float, float, float]]) -> np.ndarray:
        s = np.full(bands, base)
        for centre, width, height in peaks:
            s = s + height * np.exp(-0.5 * ((wl - centre) / width) ** 2)
        return s

    red_edge = 1.0 / (1.0 + np.exp(-(wl - 715.0) / 12.0))
    spectra = np.stack([
        bumps(0.10, [(600, 150, 0.04)]) + 0.00008 * (wl - 430),                  # Asphalt
        bumps(0.06, [(550, 35, 0.08)]) + 0.42 * red_edge,                         # Meadows
        bumps(0.22, [(650, 120, 0.10), (480, 40, 0.03)]),                         # Gravel
        bumps(0.04, [(555, 30, 0.05)]) + 0.33 * red_edge,                         # Trees
        bumps(0.30, [(500, 60, 0.25), (800, 80, -0.12)]),                         # Painted metal sheets
        bumps(0.15, [(700, 160, 0.18)]) + 0.0002 * (wl - 430),                    # Bare Soil
        bumps(0.09, [(620, 150, 0.035)]) + 0.00005 * (wl - 430),                  # Bitumen
        bumps(0.22, [(665, 120, 0.09), (490, 45, 0.035)]),                        # Self-Blocking Bricks
        bumps(0.03, [(470, 50, 0.02)]),                                           # Shadows
    ])
    # A little fixed random texture per material, smoothed over neighbouring bands.
    texture = rng.normal(0, 0.006, spectra.shape)
    kernel = np.ones(7) / 7
    texture = np.stack([np.convolve(t, kernel, mode="same") for t in texture])
    return np.clip(spectra + texture, 0.02, 0.8)


def _demo_scene(rng: np.random.Generator, height: int, width: int, bands: int) -> tuple[np.ndarray, np.ndarray]:
    """The demo cube (H x W x bands uint16) and label map (H x W uint8); see ``write_demo``."""
    num_classes = len(PAVIA_CLASS_NAMES)
    endmembers = _demo_endmembers(rng, bands)
    # Jittered grid of region seeds: regions of similar size, so every class gets enough pixels.
    cell = 7.0
    gy, gx = int(np.ceil(height / cell)), int(np.ceil(width / cell))
    seeds = np.stack(np.meshgrid(np.arange(gy), np.arange(gx), indexing="ij"), -1).reshape(-1, 2).astype(float)
    seeds = (seeds + rng.uniform(0.15, 0.85, seeds.shape)) * cell
    n_regions = len(seeds)
    region_class = np.resize(rng.permutation(num_classes), n_regions)
    region_class = rng.permutation(np.concatenate([np.arange(num_classes), region_class[: n_regions - num_classes]]))
    # Within-class variability: each region's material is its class endmember, scaled and tilted a bit.
    wl01 = np.linspace(-1, 1, bands)
    region_spec = endmembers[region_class] * rng.uniform(0.93, 1.07, (n_regions, 1)) \
        * (1 + rng.normal(0, 0.04, (n_regions, 1)) * wl01)

    rows, cols = np.mgrid[0:height, 0:width]
    pts = np.stack([rows.ravel(), cols.ravel()], 1).astype(float)
    d = ((pts[:, None, :] - seeds[None]) ** 2).sum(-1)
    order = np.argsort(d, axis=1)
    region, neighbour = order[:, 0], order[:, 1]
    n = height * width
    own = rng.uniform(0.55, 0.9, n)
    share = rng.uniform(0.3, 1.0, n)
    other = rng.integers(0, n_regions, n)
    mix = (own[:, None] * region_spec[region]
           + ((1 - own) * share)[:, None] * region_spec[neighbour]
           + ((1 - own) * (1 - share))[:, None] * region_spec[other])
    illumination = rng.uniform(0.75, 1.25, (n, 1))
    reflectance = mix * illumination + rng.normal(0, 0.012, (n, bands))
    # ROSIS-like digital numbers: reflectance x 10^4, stored as uint16.
    cube = np.clip(np.round(reflectance * 10000.0), 0, 65535).astype(np.uint16).reshape(height, width, bands)

    region_map = region.reshape(height, width)
    border = np.zeros((height, width), bool)
    border[1:, :] |= region_map[1:, :] != region_map[:-1, :]
    border[:-1, :] |= region_map[:-1, :] != region_map[1:, :]
    border[:, 1:] |= region_map[:, 1:] != region_map[:, :-1]
    border[:, :-1] |= region_map[:, :-1] != region_map[:, 1:]
    gt = (region_class[region_map] + 1).astype(np.uint8)
    gt[border | (rng.random((height, width)) < 0.15)] = 0
    return cube, gt
