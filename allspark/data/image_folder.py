"""Folder-per-class image sets: shared scanning, decoding and stratified splitting, and the NWPU-RESISC45
reader (AllSpark Section III-C "RGB", Section IV-B).

NWPU-RESISC45 on-disk layout (as distributed; any folder-per-class image set works the same way)::

    <root>/<class name>/<anything>.jpg      one folder per class, 256 x 256 RGB JPEGs (700 per class)

Class names are the sorted folder names (so the label of a class does not depend on the file system's
listing order); image sizes are taken from the files and resized to ``image_size``. Hidden folders and
files with other extensions are ignored. Refused, naming the folder: a missing root, a root without class
folders, a class folder without images, a class with fewer than 2 images (it cannot be split), and another
number of class folders than ``num_classes``. An image that cannot be decoded raises ``DatasetFormatError``
naming the file when its item is read (the files are not opened when the reader is built).

Split (the paper trains on 20 %): per class, ``round(train_ratio * n)`` images (at least 1, at most
``n - 1``) are drawn with ``numpy.random.default_rng(split_seed)`` for training, the rest is ``test``;
``round(val_ratio * n_train)`` of each class's training images are held out as ``val`` for model
selection. Sorting file names before drawing makes a seed fix the split on every machine.

Items: ``image`` float32 [3, S, S] normalised with ``mean``/``std`` (defaults 0.5/0.5: the statistics
the EfficientNet-Lite weights were trained with), ``label`` int64, ``index`` int64.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, ClassVar, Sequence

import numpy as np
import torch

from allspark.config import ConfigError
from allspark.data.base import DatasetFormatError, ModalityDataset
from allspark.registry import DATASETS

logger = logging.getLogger(__name__)

__all__ = ["IMAGE_EXTENSIONS", "scan_class_folders", "stratified_split", "read_image", "NWPURESISC45"]

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff")


def scan_class_folders(root: Path, extensions: Sequence[str], layout: str, what: str = "image"
                       ) -> tuple[list[str], list[tuple[Path, int]]]:
    """Sorted class names (sub-folder names of ``root``) and ``(file, label)`` pairs, sorted by path.

    Raises ``DatasetFormatError`` naming ``root`` and ``layout`` when the folder is missing, holds no
    class folder, or a class folder holds no file with one of ``extensions``.
    """
    if not root.is_dir():
        raise DatasetFormatError(f"{root} is missing or not a folder; {layout}")
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise DatasetFormatError(f"{root} holds no class folder; {layout}")
    exts = tuple(e.lower() for e in extensions)
    samples: list[tuple[Path, int]] = []
    for label, name in enumerate(classes):
        files = sorted(p for p in (root / name).iterdir()
                       if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in exts)
        if not files:
            raise DatasetFormatError(
                f"class folder {root / name} holds no {what} file ({', '.join(exts)}); {layout}")
        samples.extend((f, label) for f in files)
    return classes, samples


def _round_half_up(x: float) -> int:
    return int(np.floor(x + 0.5))


def stratified_split(labels: Sequence[int], train_ratio: float, val_ratio: float, seed: int,
                     class_names: Sequence[str] | None = None) -> dict[str, np.ndarray]:
    """Per-class random ``train``/``val``/``test`` index arrays (each sorted).

    Per class of ``n`` items: ``round(train_ratio * n)`` clipped to ``[1, n - 1]`` are the training pool
    (``train_ratio = 1`` keeps every item for training and leaves ``test`` empty -- for sets whose test
    part lives elsewhere); of the pool ``round(val_ratio * n_pool)`` (>= 1 when ``val_ratio > 0`` and the
    pool has 2 or more) become ``val``. The val draw uses its own generator stream so the train/test
    split does not depend on ``val_ratio``. ``class_names`` (e.g. the class folders) name a class that is
    too small to split in the error.
    """
    labels = np.asarray(labels)
    rng, rng_val = np.random.default_rng(seed), np.random.default_rng([seed, 1])
    parts: dict[str, list[np.ndarray]] = {"train": [], "val": [], "test": []}
    for k in np.unique(labels):
        idx = np.flatnonzero(labels == k)
        n = len(idx)
        if train_ratio >= 1:
            n_pool = n
        else:
            if n < 2:
                name = repr(class_names[int(k)]) if class_names is not None else str(int(k))
                raise DatasetFormatError(f"class {name} has {n} item(s); expected at least 2 to split it into "
                                         "train and test")
            n_pool = min(max(_round_half_up(train_ratio * n), 1), n - 1)
        perm = rng.permutation(idx)
        pool, test = perm[:n_pool], perm[n_pool:]
        n_val = 0
        if val_ratio > 0 and n_pool >= 2:
            n_val = min(max(_round_half_up(val_ratio * n_pool), 1), n_pool - 1)
        pool = rng_val.permutation(pool)
        parts["val"].append(pool[:n_val])
        parts["train"].append(pool[n_val:])
        parts["test"].append(test)
    return {k: np.sort(np.concatenate(v)).astype(np.int64) for k, v in parts.items()}


def read_image(path: Path, mode: str = "RGB") -> np.ndarray:
    """Decode one image file with Pillow into a uint8 array ([H, W, 3] for RGB, [H, W] for L);
    a file that cannot be decoded raises ``DatasetFormatError`` naming it."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            img.load()
            return np.asarray(img.convert(mode))
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:
        raise DatasetFormatError(f"cannot decode image {path}: {type(exc).__name__}: {exc}") from exc


def resize_uint8(array: np.ndarray, size: int | tuple[int, int]) -> np.ndarray:
    """Bilinear resize of a uint8 image to ``size`` (square when an int) with Pillow."""
    from PIL import Image

    h, w = (size, size) if isinstance(size, int) else size
    if array.shape[:2] == (h, w):
        return array
    return np.asarray(Image.fromarray(array).resize((w, h), Image.BILINEAR))


@DATASETS.register("nwpu_resisc45")
class NWPURESISC45(ModalityDataset):
    """Scene images in one folder per class; see the module docstring for layout, split and items."""

    splits: ClassVar[tuple[str, ...]] = ("train", "val", "test")
    demo_version: ClassVar[int] = 1
    LAYOUT = ("expected layout: <root>/<class name>/<image>.jpg -- one folder per class "
              "(NWPU-RESISC45: 45 folders of 256x256 JPEGs)")

    def __init__(self, root: str | Path, split: str, *, image_size: int = 224, train_ratio: float = 0.2,
                 val_ratio: float = 0.1, split_seed: int = 0, mean: Sequence[float] = (0.5, 0.5, 0.5),
                 std: Sequence[float] = (0.5, 0.5, 0.5), num_classes: int | None = None,
                 extensions: Sequence[str] = IMAGE_EXTENSIONS) -> None:
        super().__init__(root, split)
        if not 0 < train_ratio < 1:
            raise ConfigError(f"NWPU-RESISC45: train_ratio must be in (0, 1), got {train_ratio}")
        self.class_names, samples = scan_class_folders(self.root, extensions, self.LAYOUT)
        if num_classes is not None and num_classes != len(self.class_names):
            raise DatasetFormatError(
                f"NWPU-RESISC45: {self.root} has {len(self.class_names)} class folders; the config expects "
                f"{num_classes} (data.args.num_classes)")
        idx = stratified_split([s[1] for s in samples], train_ratio, val_ratio, split_seed,
                               [str(self.root / c) for c in self.class_names])[split]
        self.samples = [samples[i] for i in idx]
        self.image_size = int(image_size)
        self.mean = np.asarray(mean, np.float32)[:, None, None]
        self.std = np.asarray(std, np.float32)[:, None, None]

    def info(self) -> dict[str, Any]:
        return {"num_classes": len(self.class_names), "class_names": list(self.class_names),
                "image_size": self.image_size, "channels": 3}

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> dict[str, Any]:
        path, label = self.samples[i]
        img = resize_uint8(read_image(path, "RGB"), self.image_size)
        x = (img.transpose(2, 0, 1).astype(np.float32) / 255.0 - self.mean) / self.std
        return {"image": torch.from_numpy(x), "label": torch.tensor(label, dtype=torch.int64),
                "index": torch.tensor(i, dtype=torch.int64)}

    DEMO_CLASSES = ("farmland", "forest", "harbor", "river", "runway")

    @classmethod
    def write_demo(cls, root: str | Path, seed: int = 0, per_class: int = 40, size: int = 64) -> None:
        """Five synthetic "scene" classes as JPEG folders, learnable from texture and colour:
        farmland = coloured parallel stripes, forest = green blobs, harbor = grey blocks on blue,
        river = a meandering blue band on green/brown, runway = a grey strip with white dashes; every
        image has a random orientation/offset, brightness jitter and noise, so no single pixel tells the
        class."""
        from PIL import Image

        rng = np.random.default_rng(seed)
        root = Path(root)
        yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
        for name in cls.DEMO_CLASSES:
            (root / name).mkdir(parents=True, exist_ok=True)
            for j in range(per_class):
                theta = rng.uniform(0, np.pi)
                u = np.cos(theta) * xx + np.sin(theta) * yy
                v = -np.sin(theta) * xx + np.cos(theta) * yy
                img = np.zeros((size, size, 3), np.float32)
                if name == "farmland":
                    freq = rng.uniform(5, 9)
                    band = (np.floor(u * freq + rng.uniform()) % 3).astype(int)
                    palette = np.array([[0.55, 0.45, 0.2], [0.45, 0.6, 0.25], [0.7, 0.65, 0.35]])
                    img = palette[band]
                elif name == "forest":
                    img[:] = (0.1, 0.3, 0.1)
                    for _ in range(25):
                        cy, cx, r = rng.uniform(0, 1), rng.uniform(0, 1), rng.uniform(0.04, 0.1)
                        img[(yy - cy) ** 2 + (xx - cx) ** 2 < r * r] = (0.15, rng.uniform(0.4, 0.55), 0.15)
                elif name == "harbor":
                    img[:] = (0.1, 0.25, 0.5)
                    for _ in range(8):
                        cy, cx = rng.uniform(0, 0.9), rng.uniform(0, 0.9)
                        h, w = rng.uniform(0.05, 0.2), rng.uniform(0.05, 0.2)
                        g = rng.uniform(0.5, 0.8)
                        img[(yy > cy) & (yy < cy + h) & (xx > cx) & (xx < cx + w)] = (g, g, g)
                elif name == "river":
                    img[:] = (0.35, 0.4, 0.2)
                    centre = 0.5 + 0.15 * np.sin(2 * np.pi * (v * rng.uniform(1, 2) + rng.uniform()))
                    img[np.abs(u - centre) < rng.uniform(0.06, 0.12)] = (0.1, 0.2, 0.45)
                else:  # runway
                    img[:] = (0.45, 0.5, 0.3)
                    strip = np.abs(u - rng.uniform(0.35, 0.65)) < 0.12
                    img[strip] = (0.35, 0.35, 0.35)
                    dashes = strip & (np.abs(u - u[strip].mean()) < 0.015) & ((v * 10) % 1 < 0.5)
                    img[dashes] = (0.95, 0.95, 0.95)
                img = img * rng.uniform(0.8, 1.2) + rng.normal(0, 0.04, img.shape)
                arr = np.clip(img * 255, 0, 255).astype(np.uint8)
                path = root / name / f"{name}_{j + 1:03d}.jpg"
                tmp = path.with_name(f".{path.name}.tmp")
                Image.fromarray(arr).save(tmp, format="JPEG", quality=92)
                os.replace(tmp, path)
