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
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import ClassVar

import numpy as np

from allspark.data.base import DatasetFormatError
from allspark.data.paired_raster import (PairedRasterScene, check_raster, demo_layout, demo_signatures,
                                         label_map)
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
    demo_version: ClassVar[int] = 4

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
    def write_demo(cls, root, seed: int = 0, height: int = 48, width: int = 48, bands: int = 244,
                   sar_channels: int = 4, train_per_class: int = 20) -> None:
        """A small co-registered scene in the release's layout: label grid and SAR ``height x width``, the
        HSI on a grid twice as coarse. Eight classes in square blocks. HSI: six spectra, classes 0/1 and 2/3
        sharing one each (HSI alone confuses them); SAR: six backscatter signatures, classes 4/5 and 6/7
        sharing one each; only the pair separates all eight. HSI: endmember x illumination U(0.8, 1.2) +
        Gaussian noise; SAR: signature x Gamma(4, 1/4) speckle (4-look intensity). ``train_per_class``
        training pixels per class; half of the rest of the class is test, the other half labelled in
        neither map (unlabelled pixels, as in the release)."""
        import scipy.io

        rng = np.random.default_rng(seed)
        k = len(BERLIN_CLASS_NAMES)
        spec_group, sar_group = demo_signatures(k, 2, 2)
        classes, train, test = demo_layout(rng, height, width, k, block=6, train_per_class=train_per_class,
                                             test_fraction=0.5)
        wl = np.linspace(0, 1, bands)
        centres = rng.uniform(0.1, 0.9, (spec_group.max() + 1, 3))
        spectra = np.stack([0.2 + sum(0.25 * np.exp(-0.5 * ((wl - c) / 0.08) ** 2) for c in cs) for cs in centres])
        backscatter = np.array([[0.05, 0.01, 0.02, 0.01], [0.3, 0.08, 0.1, 0.05], [0.05, 0.2, 0.02, 0.15],
                                [0.4, 0.4, 0.3, 0.3], [0.15, 0.3, 0.25, 0.02], [0.02, 0.05, 0.3, 0.35]])
        backscatter = backscatter[: sar_group.max() + 1, :sar_channels]
        hh, hw = height // 2, width // 2
        coarse = classes[::2, ::2][:hh, :hw] - 1  # blocks are even-sized: each coarse pixel has one class
        hsi = spectra[spec_group[coarse]] * rng.uniform(0.8, 1.2, (hh, hw, 1)) + rng.normal(0, 0.02, (hh, hw, bands))
        sar = backscatter[sar_group[classes - 1]] * rng.gamma(4.0, 0.25, (height, width, sar_channels))
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
