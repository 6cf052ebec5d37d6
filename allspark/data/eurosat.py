"""EuroSAT multispectral (Sentinel-2, 13 bands, 64 x 64 pixels, 10 land-use classes) for scene
classification (AllSpark Section III-C "MSI", Section IV-B).

On-disk layout (``EuroSAT_MS`` / ``EuroSATallBands`` as distributed)::

    <root>/<ClassName>/<ClassName>_<n>.tif    one folder per class; each GeoTIFF is H x W x 13 uint16
                                              (B01..B12 with B8A), as written by the dataset's authors

Files stored band-first (13 x H x W) are accepted too, and float TIFFs as well as integer ones. Every
file must have exactly ``bands`` bands (13 by default) and be ``image_size`` x ``image_size`` pixels
(64 for EuroSAT): a file with another band count or size raises ``DatasetFormatError`` naming it, the
expected and the actual shape -- tiles are not resized unless the config asks for it with ``resize: true``
(bilinear, to ``image_size``). Refused too, naming the file: a file tifffile cannot decode, non-numeric
pixels and NaN or infinite values in a float TIFF. Files are read with ``tifffile``; the training files used
for the statistics are read when the reader is built, the others when their item is read.

Split (paper: random 9:1): per class, ``train_ratio`` of the files (default 0.9) form the training pool,
the rest is ``test``; ``val_ratio`` of the pool is held out as ``val`` (see
:func:`allspark.data.image_folder.stratified_split`).

Scaling: digital numbers are divided by 10 000 (Sentinel-2 L1C reflectance scale) and standardised per
band with the mean/std of up to ``stats_files`` evenly spaced *training* files, so nothing of val/test
leaks into the statistics (``info()["preprocessing"]``: ``band_mean``, ``band_std``, stored in a checkpoint's
``data_info.json``). Items: ``image`` float32 [13, S, S], ``label`` int64, ``index`` int64.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch

from allspark.config import ConfigError
from allspark.data.base import DatasetFormatError, ModalityDataset
from allspark.data.image_folder import scan_class_folders, stratified_split
from allspark.registry import DATASETS

logger = logging.getLogger(__name__)

__all__ = ["EuroSATMS", "read_multiband_tiff"]

LAYOUT = ("expected layout: <root>/<ClassName>/<ClassName>_<n>.tif -- one folder per class of "
          "H x W x bands GeoTIFFs (EuroSAT_MS: 10 folders of 64x64x13 uint16)")


def read_multiband_tiff(path: Path, bands: int) -> np.ndarray:
    """A multiband TIFF as float32 [bands, H, W]; the band axis may be first or last in the file."""
    import tifffile

    try:
        arr = tifffile.imread(str(path))
    except Exception as exc:  # tifffile raises TiffFileError, ValueError, struct.error ... on bad files
        raise DatasetFormatError(f"cannot decode TIFF {path}: {type(exc).__name__}: {exc}") from exc
    if arr.size == 0:  # tifffile returns an empty array for a header with no readable image
        raise DatasetFormatError(f"cannot decode TIFF {path}: no image data")
    if arr.ndim == 3 and arr.shape[-1] == bands:
        arr = arr.transpose(2, 0, 1)
    elif not (arr.ndim == 3 and arr.shape[0] == bands):
        raise DatasetFormatError(
            f"{path}: expected a {bands}-band image (H x W x {bands} or {bands} x H x W), got shape "
            f"{list(arr.shape)} (data.args.bands = {bands})")
    if not np.issubdtype(arr.dtype, np.number) or np.issubdtype(arr.dtype, np.complexfloating):
        raise DatasetFormatError(f"{path}: expected real numeric pixels, got dtype {arr.dtype}")
    arr = arr.astype(np.float32)
    bad = int((~np.isfinite(arr)).sum())
    if bad:
        raise DatasetFormatError(f"{path}: expected finite pixel values, found {bad} NaN or infinite value(s)")
    return arr


@DATASETS.register("eurosat_ms")
class EuroSATMS(ModalityDataset):
    """13-band EuroSAT tiles in one folder per class; see the module docstring."""

    splits: ClassVar[tuple[str, ...]] = ("train", "val", "test")
    demo_version: ClassVar[int] = 1

    def __init__(self, root: str | Path, split: str, *, bands: int = 13, image_size: int = 64,
                 train_ratio: float = 0.9, val_ratio: float = 0.1, split_seed: int = 0,
                 scale: float = 10000.0, stats_files: int = 512, resize: bool = False) -> None:
        super().__init__(root, split)
        if not 0 < train_ratio < 1:
            raise ConfigError(f"EuroSAT: data.args.train_ratio must be in (0, 1), got {train_ratio}")
        self.resize = bool(resize)
        self.class_names, samples = scan_class_folders(self.root, (".tif", ".tiff"), LAYOUT, "GeoTIFF")
        parts = stratified_split([s[1] for s in samples], train_ratio, val_ratio, split_seed,
                                 [str(self.root / c) for c in self.class_names])
        self.samples = [samples[i] for i in parts[split]]
        self.bands, self.image_size, self.scale = int(bands), int(image_size), float(scale)
        train = [samples[i][0] for i in parts["train"]]
        pick = np.unique(np.linspace(0, len(train) - 1, min(stats_files, len(train))).round().astype(int))
        stack = np.stack([self._read(train[i]) for i in pick])  # [n, bands, S, S]
        self.band_mean = stack.mean(axis=(0, 2, 3)).astype(np.float32)[:, None, None]
        self.band_std = (stack.std(axis=(0, 2, 3)) + 1e-6).astype(np.float32)[:, None, None]

    def _read(self, path: Path) -> np.ndarray:
        arr = read_multiband_tiff(path, self.bands) / self.scale
        if arr.shape[1:] != (self.image_size, self.image_size):
            if not self.resize:
                raise DatasetFormatError(
                    f"{path}: expected a tile of {self.image_size} x {self.image_size} pixels (data.args.image_size), "
                    f"found {arr.shape[1]} x {arr.shape[2]}; set data.args.image_size to the tiles' size, or "
                    "data.args.resize: true to resize every tile")
            arr = torch.nn.functional.interpolate(torch.from_numpy(arr)[None], size=self.image_size,
                                                  mode="bilinear", align_corners=False)[0].numpy()
        return arr

    def info(self) -> dict[str, Any]:
        return {"num_classes": len(self.class_names), "class_names": list(self.class_names),
                "num_bands": self.bands, "image_size": self.image_size,
                # fitted on training tiles: stored in the checkpoint, so predict needs no training data
                "preprocessing": {"band_mean": self.band_mean[:, 0, 0].tolist(),
                                  "band_std": self.band_std[:, 0, 0].tolist()}}

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> dict[str, Any]:
        path, label = self.samples[i]
        x = (self._read(path) - self.band_mean) / self.band_std
        return {"image": torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)),
                "label": torch.tensor(label, dtype=torch.int64), "index": torch.tensor(i, dtype=torch.int64)}

    DEMO_CLASSES = ("AnnualCrop", "Forest", "Industrial", "River", "SeaLake")

    @classmethod
    def write_demo(cls, root: str | Path, seed: int = 0, per_class: int = 40, size: int = 32,
                   bands: int = 13) -> None:
        """Five classes of 13-band uint16 GeoTIFF tiles (H x W x 13, EuroSAT's band-last layout).

        Each class has its own smooth reflectance spectrum over the 13 Sentinel-2 bands (vegetation's
        red edge, water's NIR drop, bright flat built-up ...); pairs are made close (AnnualCrop/Forest,
        River/SeaLake) and told apart by spatial structure (stripes vs blobs, a band vs full cover) as
        well as spectrum. Per-tile illumination, per-pixel mixing with a background and noise keep it
        from being solvable from one pixel's value.
        """
        import tifffile

        rng = np.random.default_rng(seed)
        root = Path(root)
        wl = np.array([443, 490, 560, 665, 705, 740, 783, 842, 945, 1375, 1610, 2190, 865], float)[:bands]
        edge = 1 / (1 + np.exp(-(wl - 710) / 15))
        swir = np.clip((wl - 1500) / 700, 0, 1)
        spectra = {
            "AnnualCrop": 0.06 + 0.30 * edge + 0.05 * swir,
            "Forest": 0.04 + 0.26 * edge + 0.02 * swir,
            "Industrial": 0.18 + 0.04 * wl / 2000 + 0.06 * swir,
            "River": 0.07 - 0.05 * edge + 0.01 * swir,
            "SeaLake": 0.06 - 0.05 * edge,
        }
        spectra["River"] = np.clip(spectra["River"], 0.01, None)
        spectra["SeaLake"] = np.clip(spectra["SeaLake"], 0.01, None)
        background = 0.1 + 0.15 * edge
        yy, xx = np.mgrid[0:size, 0:size] / size
        for name in cls.DEMO_CLASSES:
            (root / name).mkdir(parents=True, exist_ok=True)
            for j in range(per_class):
                theta = rng.uniform(0, np.pi)
                u = np.cos(theta) * xx + np.sin(theta) * yy
                if name == "AnnualCrop":
                    cover = ((u * rng.uniform(4, 7) + rng.uniform()) % 1 < 0.6).astype(float)
                elif name == "Forest":
                    cover = np.clip(0.7 + 0.3 * np.sin(xx * rng.uniform(15, 25)) * np.sin(yy * rng.uniform(15, 25)), 0, 1)
                elif name == "Industrial":
                    cover = ((xx * 6 + rng.uniform()) % 1 < 0.7) * ((yy * 6 + rng.uniform()) % 1 < 0.7) * 1.0
                elif name == "River":
                    cover = (np.abs(u - rng.uniform(0.3, 0.7)) < rng.uniform(0.08, 0.15)).astype(float)
                else:
                    cover = np.ones((size, size))
                cover = np.clip(cover * rng.uniform(0.8, 1.0), 0, 1)[..., None]
                refl = cover * spectra[name] + (1 - cover) * background
                refl = refl * rng.uniform(0.85, 1.15) + rng.normal(0, 0.008, (size, size, bands))
                tile = np.clip(refl * 10000, 0, 65535).astype(np.uint16)
                path = root / name / f"{name}_{j + 1}.tif"
                tmp = path.with_name(f".{path.name}.tmp")
                tifffile.imwrite(str(tmp), tile, photometric="minisblack", planarconfig="contig")
                os.replace(tmp, path)
