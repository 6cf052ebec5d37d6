"""Berlin HSI + SAR scene (simulated EnMAP hyperspectral + Sentinel-1 dual-polarised SAR, eight land-cover
classes from OpenStreetMap; 2820 training and 461851 test pixels) for paired-modality pixel classification.

On-disk layout (the MATLAB distribution of Hong et al.'s multimodal benchmark, as used by the HGR
fusion code)::

    <root>/data_HS_LR.mat   variable ``data_HS_LR``   H_h x W_h x 244 hyperspectral cube (797 x 220 in the
                                                      release: the coarser grid)
    <root>/data_SAR_HR.mat  variable ``data_SAR_HR``  H_s x W_s x C SAR raster (1723 x 476; the VV/VH
                                                      polarimetric channels, 4 in the release)
    <root>/TrainImage.mat   variable ``TrainImage``   H_s x W_s training label map, 0 = unlabelled, 1..8
    <root>/TestImage.mat    variable ``TestImage``    H_s x W_s test label map

MATLAB v5 and v7.3 (HDF5) files are read; a file without the expected variable name is read when it holds
exactly one array of the right rank. The label maps define the label grid; the HSI cube on its coarser
grid is co-registered to it by pixel-centre nearest neighbour (see :mod:`allspark.data.paired_raster`).
Batch keys: ``hsi`` [244, p, p] and ``sar`` [C, p, p] patches around each pixel, ``label``, ``coords``.

Refused with ``DatasetFormatError`` naming the file: a missing or unreadable file, no array of the expected
name or rank, a raster with NaN/inf values or another band count than ``hsi_bands`` / ``sar_channels``,
label maps that are not 2-D non-negative integers, differ in size, overlap, or leave a class without a
training pixel.
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

__all__ = ["BerlinHSISAR", "BERLIN_CLASS_NAMES"]

BERLIN_CLASS_NAMES = ("Forest", "Residential Area", "Industrial Area", "Low Plants", "Soil", "Allotment",
                      "Commercial Area", "Water")
FILES = {"hsi": ("data_HS_LR.mat", "data_HS_LR"), "sar": ("data_SAR_HR.mat", "data_SAR_HR"),
         "train": ("TrainImage.mat", "TrainImage"), "test": ("TestImage.mat", "TestImage")}
LAYOUT = ("expected layout: <root>/data_HS_LR.mat (variable data_HS_LR, H x W x bands HSI), "
          "<root>/data_SAR_HR.mat (data_SAR_HR, H x W x channels SAR), <root>/TrainImage.mat (TrainImage) and "
          "<root>/TestImage.mat (TestImage), label maps on the SAR grid with 0 = unlabelled, 1..K classes")


@DATASETS.register("berlin")
class BerlinHSISAR(PairedRasterScene):
    raster_keys: ClassVar[tuple[str, ...]] = ("hsi", "sar")
    default_class_names = BERLIN_CLASS_NAMES
    dataset_name = "Berlin"
    demo_version: ClassVar[int] = 5
    label_files = (FILES["train"][0], FILES["test"][0])
    scene_files = tuple(name for name, _ in FILES.values())

    def read_scene(self, root: Path, hsi_bands: int | None = None, sar_channels: int | None = None):
        from allspark.data.pavia import read_mat_array

        missing = [name for name, _ in FILES.values() if not (root / name).is_file()]
        if missing:
            raise DatasetFormatError(f"Berlin: {', '.join(missing)} missing under {str(root)!r}; {LAYOUT}")
        hsi = check_raster(read_mat_array(root / FILES["hsi"][0], FILES["hsi"][1], 3, "the HSI cube"),
                           root / FILES["hsi"][0], "HSI cube", hsi_bands)
        sar_path = root / FILES["sar"][0]
        sar_raw = read_mat_array(sar_path, FILES["sar"][1], 3, "the SAR raster")
        sar = check_raster(sar_raw, sar_path, "SAR raster", sar_channels)
        train = label_map(read_mat_array(root / FILES["train"][0], FILES["train"][1], 2, "the training map"),
                          root / FILES["train"][0], "training map")
        test = label_map(read_mat_array(root / FILES["test"][0], FILES["test"][1], 2, "the test map"),
                         root / FILES["test"][0], "test map")
        return [hsi, sar], train, test

    @classmethod
    def write_demo(cls, root, seed: int = 0, height: int = 64, width: int = 64, bands: int = 244,
                   sar_channels: int = 4, train_per_class: int = 6, separation: float = 0.85,
                   nuisance: float = 0.6, hsi_noise: float = 0.05, looks: float = 2.0, slope: float = 0.5,
                   scale: float = 4.0) -> None:
        """A small co-registered scene in the release's layout, made for semi-supervised fusion: label grid
        and SAR ``height x width``, the HSI on a grid twice as coarse; eight classes in 8x8 blocks.

        HSI: per-class spectra where classes 1 and 3 sit close to 0 and 2 (``separation`` of the way from
        their partner's spectrum to their own), mixed with smoothly varying clutter endmembers (share
        ``nuisance``), a smooth illumination factor and noise (see ``demo_hsi``). SAR: per-class
        backscatter where classes 5 and 7 sit close to 4 and 6, times a smooth terrain-slope gain
        exp(``slope`` x field) and ``looks``-look Gamma speckle. So each modality alone confuses some
        classes and the pair separates them; the nuisances are independent between the modalities, so
        what the two share is the class -- what a maximal-correlation objective learns from unlabelled
        pairs. ``train_per_class`` training pixels per class; half of the rest of each class is test, the
        other half labelled in neither map (the unlabelled pixels ``unlabelled_ratio`` draws from)."""
        import scipy.io

        if height % 16 or width % 16:
            raise ValueError("Berlin demo: height and width must be multiples of 16 (8x8 blocks on a 2x grid)")
        rng = np.random.default_rng(seed)
        k = len(BERLIN_CLASS_NAMES)
        spec_group, sar_group = demo_signatures(k, 2, 2)
        classes, train, test = demo_layout(rng, height, width, k, block=8, train_per_class=train_per_class,
                                             test_fraction=0.5)
        spectra = near_signatures(spec_group, gaussian_spectra(rng, k, bands), separation)
        backscatter = near_signatures(sar_group, rng.uniform(0.02, 0.4, (k, sar_channels)), separation)
        coarse = classes[::2, ::2] - 1  # blocks are even-sized: each coarse pixel has one class
        hsi = demo_hsi(rng, spectra[coarse], nuisance, hsi_noise, scale / 2)
        gain = np.exp(slope * smooth_fields(rng, 1, height, width, scale))
        sar = backscatter[classes - 1] * gain * rng.gamma(looks, 1 / looks, (height, width, sar_channels))
        root = Path(root)
        root.mkdir(parents=True, exist_ok=True)
        arrays = {"hsi": hsi.astype(np.float32), "sar": sar.astype(np.float64), "train": train, "test": test}
        for part, (name, key) in FILES.items():
            fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp", dir=root)
            os.close(fd)
            try:
                scipy.io.savemat(tmp, {key: arrays[part]}, appendmat=False, do_compression=True)
                os.replace(tmp, root / name)
            finally:
                if os.path.exists(tmp):
                    os.unlink(tmp)
