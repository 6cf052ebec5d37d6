"""Houston 2018 HSI + LiDAR scene (2018 IEEE GRSS Data Fusion Contest: CASI hyperspectral, 48 bands at
1 m; Optech Titan multispectral LiDAR intensity at 1550/1064/532 nm, 0.5 m; 20 urban classes) for
paired-modality pixel classification.

On-disk layout (the contest's GeoTIFF release; the hyperspectral cube ships as a PCIDSK ``.pix`` file --
export it once to GeoTIFF, e.g. ``gdal_translate 20170218_UH_CASI_S4_NAD83.pix
20170218_UH_CASI_S4_NAD83.tif``)::

    <root>/FullHSIDataset/20170218_UH_CASI_S4_NAD83.tif            H_h x W_h x 48 (601 x 2384, 1 m)
    <root>/Lidar GeoTiff Rasters/Intensity_C1/UH17_GI1F051.tif      H_l x W_l (1202 x 4768, 0.5 m), 1550 nm
    <root>/Lidar GeoTiff Rasters/Intensity_C2/UH17_GI2F051.tif      1064 nm
    <root>/Lidar GeoTiff Rasters/Intensity_C3/UH17_GI3F051.tif      532 nm
    <root>/TrainingGT/2018_IEEE_GRSS_DFC_GT_TR.tif                  H_l x W_l training labels, 0 = none, 1..20
    <root>/TestingGT/Test_Labels.tif                                test labels on the same grid (crop the
                                                                    released test map to the training extent)

GeoTIFFs are read with ``tifffile`` (band-sequential files come back as bands x H x W and are transposed;
the series axes say which). LiDAR nodata (a finite |value| > 1e30, the float32 fill of the rasters) becomes 0.
A NaN or infinite LiDAR value is not that fill: it is refused, naming the file and the count, unless the
config says ``lidar_nan_as_nodata: true`` (then NaN/inf are read as nodata, 0, too). Refused as well, naming
the file: a missing file, an unreadable TIFF, an HSI cube with NaN/inf or another band count than
``hsi_bands``, a LiDAR raster that is not single-band, LiDAR rasters of different sizes, and label maps that
are not 2-D non-negative integers.
The label grid is the ground truth's; the 1 m HSI is co-registered to it by pixel-centre nearest
neighbour (:mod:`allspark.data.paired_raster`). Batch keys: ``hsi`` [48, p, p], ``lidar`` [3, p, p].
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import ClassVar

import numpy as np

from allspark.data.base import DatasetFormatError
from allspark.data.paired_raster import (PairedRasterScene, check_raster, demo_hsi, demo_layout,
                                         demo_signatures, gaussian_spectra, label_map, near_signatures,
                                         smooth_fields)
from allspark.registry import DATASETS

__all__ = ["Houston2018HSILiDAR", "HOUSTON2018_CLASS_NAMES", "read_geotiff"]

HOUSTON2018_CLASS_NAMES = (
    "Healthy grass", "Stressed grass", "Artificial turf", "Evergreen trees", "Deciduous trees", "Bare earth",
    "Water", "Residential buildings", "Non-residential buildings", "Roads", "Sidewalks", "Crosswalks",
    "Major thoroughfares", "Highways", "Railways", "Paved parking lots", "Unpaved parking lots", "Cars",
    "Trains", "Stadium seats",
)
HSI_FILE = "FullHSIDataset/20170218_UH_CASI_S4_NAD83.tif"
LIDAR_FILES = tuple(f"Lidar GeoTiff Rasters/Intensity_C{i}/UH17_GI{i}F051.tif" for i in (1, 2, 3))
TRAIN_FILE = "TrainingGT/2018_IEEE_GRSS_DFC_GT_TR.tif"
TEST_FILE = "TestingGT/Test_Labels.tif"
LAYOUT = (f"expected layout: <root>/{HSI_FILE} (H x W x 48 HSI GeoTIFF), the three LiDAR intensity GeoTIFFs "
          f"{', '.join(LIDAR_FILES)}, <root>/{TRAIN_FILE} and <root>/{TEST_FILE} (label maps on the LiDAR grid, "
          "0 = unlabelled, 1..20)")


def read_geotiff(path: Path) -> np.ndarray:
    """A (multi-band) GeoTIFF as H x W (x bands)."""
    import tifffile

    try:
        with tifffile.TiffFile(path) as tif:
            series = tif.series[0]
            data, axes = series.asarray(), series.axes
    except Exception as exc:
        raise DatasetFormatError(f"{path}: not a readable TIFF: {type(exc).__name__}: {exc}") from exc
    if data.ndim == 3 and axes[0] not in "YX":  # band-sequential: bands x H x W
        data = np.moveaxis(data, 0, -1)
    return data


@DATASETS.register("houston2018")
class Houston2018HSILiDAR(PairedRasterScene):
    raster_keys: ClassVar[tuple[str, ...]] = ("hsi", "lidar")
    default_class_names = HOUSTON2018_CLASS_NAMES
    dataset_name = "Houston 2018"
    demo_version: ClassVar[int] = 6

    label_files = (TRAIN_FILE, TEST_FILE)
    scene_files = (HSI_FILE, *LIDAR_FILES, TRAIN_FILE, TEST_FILE)

    def read_scene(self, root: Path, hsi_bands: int | None = None, lidar_nan_as_nodata: bool = False):
        files = [HSI_FILE, *LIDAR_FILES, TRAIN_FILE, TEST_FILE]
        missing = [f for f in files if not (root / f).is_file()]
        if missing:
            raise DatasetFormatError(f"Houston 2018: {', '.join(missing)} missing under {str(root)!r}; {LAYOUT}")
        hsi = check_raster(read_geotiff(root / HSI_FILE), root / HSI_FILE, "HSI cube", hsi_bands)
        bands = []
        for f in LIDAR_FILES:
            band = read_geotiff(root / f).astype(np.float32)
            if band.ndim != 2:
                raise DatasetFormatError(f"{root / f}: a LiDAR intensity raster must be single-band, got shape "
                                         f"{list(band.shape)}")
            nonfinite = ~np.isfinite(band)
            if nonfinite.any() and not lidar_nan_as_nodata:
                raise DatasetFormatError(
                    f"{root / f}: expected finite LiDAR intensities (nodata written as the float32 fill, |value| > "
                    f"1e30), found {int(nonfinite.sum())} NaN or infinite value(s); set "
                    "data.args.lidar_nan_as_nodata: true to read them as nodata (0)")
            with np.errstate(invalid="ignore"):
                band[nonfinite | (np.abs(band) > 1e30)] = 0.0
            bands.append(band)
        if len({b.shape for b in bands}) != 1:
            raise DatasetFormatError(f"Houston 2018: the LiDAR rasters {', '.join(LIDAR_FILES)} differ in size: "
                                     f"{[list(b.shape) for b in bands]}; expected one grid")
        lidar = check_raster(np.stack(bands, -1), root / LIDAR_FILES[0], "LiDAR raster")
        train = label_map(read_geotiff(root / TRAIN_FILE), root / TRAIN_FILE, "training map")
        test = label_map(read_geotiff(root / TEST_FILE), root / TEST_FILE, "test map")
        return [hsi, lidar], train, test

    @classmethod
    def write_demo(cls, root, seed: int = 0, height: int = 80, width: int = 80, bands: int = 48,
                   train_per_class: int = 6, separation: float = 0.85, nuisance: float = 0.6,
                   hsi_noise: float = 0.05, lidar_noise: float = 2.0, gain: float = 0.15,
                   scale: float = 4.0) -> None:
        """A small co-registered scene in the contest layout, made for semi-supervised fusion: labels and
        LiDAR ``height x width``, the HSI on a grid twice as coarse (as 1 m vs 0.5 m); twenty classes in 8x8
        blocks. HSI: per-class spectra where classes 1, 3, ..., 9 sit close to 0, 2, ..., 8 (``separation``
        of the way from their partner's spectrum to their own), mixed with smoothly varying clutter (share
        ``nuisance``), a smooth illumination factor and noise (see ``demo_hsi``); LiDAR: three per-class
        intensities where classes 11, ..., 19 sit close to 10, ..., 18, times a smooth range/incidence gain
        exp(``gain`` x field), plus Gaussian noise. Each modality alone confuses some classes, the pair
        separates them, and the two nuisances are independent, so what the modalities share is the class.
        ``train_per_class`` training pixels per class; half of the rest is test, the other half labelled in
        neither map (the unlabelled pixels)."""
        import tifffile

        if height % 16 or width % 16:
            raise ValueError("Houston 2018 demo: height and width must be multiples of 16 (8x8 blocks, 2x grid)")
        rng = np.random.default_rng(seed)
        k = len(HOUSTON2018_CLASS_NAMES)
        spec_group, lidar_group = demo_signatures(k, 5, 5)
        classes, train, test = demo_layout(rng, height, width, k, block=8, train_per_class=train_per_class,
                                             test_fraction=0.5)
        spectra = near_signatures(spec_group, gaussian_spectra(rng, k, bands, peaks=2, width=0.07), separation)
        signatures = near_signatures(lidar_group, rng.uniform(5.0, 60.0, (k, 3)), separation)
        hsi = demo_hsi(rng, spectra[classes[::2, ::2] - 1], nuisance, hsi_noise, scale / 2)
        field = np.exp(gain * smooth_fields(rng, 1, height, width, scale))
        lidar = signatures[classes - 1] * field + rng.normal(0, lidar_noise, (height, width, 3))
        root = Path(root)
        outputs = {HSI_FILE: np.clip(hsi * 10000, 0, 65535).astype(np.uint16), TRAIN_FILE: train, TEST_FILE: test}
        for i, f in enumerate(LIDAR_FILES):
            outputs[f] = lidar[..., i].astype(np.float32)
        for rel, array in outputs.items():
            path = root / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
            os.close(fd)
            try:
                tifffile.imwrite(tmp, array, photometric="minisblack",
                                 planarconfig="contig" if array.ndim == 3 else None)
                os.replace(tmp, path)
            finally:
                if os.path.exists(tmp):
                    os.unlink(tmp)
