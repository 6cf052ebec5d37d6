"""MSTAR SOC: ten ground targets in X-band SAR chips, trained at 17 degrees depression and tested at 15
degrees (AllSpark Section III-C "SAR", Section IV-B; the setting of AConvNets, Chen et al. 2016).

On-disk layout -- the widely used image release of the MSTAR public targets (chips converted from the
raw MSTAR files to 8-bit magnitude images, one folder per target under one folder per depression
angle)::

    <root>/17_DEG/<TARGET>/<chip>.jpeg     training chips (2S1, BMP2, BRDM_2, BTR60, BTR70, D7, T62,
    <root>/15_DEG/<TARGET>/<chip>.jpeg     T72, ZIL131, ZSU_23_4), typically 128 x 128 grey images

Folder names are configurable (``train_dir``/``test_dir``; e.g. ``train/17_DEG`` when a copy nests them)
and any of .jpeg/.jpg/.png/.bmp/.tif works. Class names are the sorted target folders of the training
angle; the test angle must hold the same targets, else a ``DatasetFormatError`` lists the difference.

Split: ``test`` = every chip of the 15-degree folder; ``val`` = ``val_ratio`` of each target's
17-degree chips (seeded), ``train`` = the rest, so the test angle is never seen during model selection.
Preprocessing as in AConvNets: the centre ``crop_size`` x ``crop_size`` (88) crop of each chip (for
training, a random crop within ``train_jitter`` pixels of the centre -- AConvNets' crop augmentation);
magnitudes scaled to [0, 1], then standardised per chip (zero mean, unit std). Items: ``image`` float32 [1, crop, crop], ``label`` int64, ``index``.

Refused with ``DatasetFormatError`` naming the folder or file: a missing angle folder, one without target
folders or a target folder without chips, test targets that differ from the training ones, another number
of targets than ``num_classes``; when an item is read, a chip that cannot be decoded or is smaller than the
crop (chips are cropped, never resized).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch

from allspark.data.base import DatasetFormatError, ModalityDataset
from allspark.data.image_folder import IMAGE_EXTENSIONS, read_image, scan_class_folders, stratified_split
from allspark.registry import DATASETS

__all__ = ["MSTARSOC"]


@DATASETS.register("mstar_soc")
class MSTARSOC(ModalityDataset):
    """SAR target chips under depression-angle folders; see the module docstring."""

    splits: ClassVar[tuple[str, ...]] = ("train", "val", "test")
    demo_version: ClassVar[int] = 1

    def __init__(self, root: str | Path, split: str, *, train_dir: str = "17_DEG", test_dir: str = "15_DEG",
                 crop_size: int = 88, train_jitter: int = 0, val_ratio: float = 0.1, split_seed: int = 0,
                 num_classes: int | None = None) -> None:
        super().__init__(root, split)
        layout = (f"expected layout: <root>/{train_dir}/<TARGET>/<chip>.jpeg (training angle) and "
                  f"<root>/{test_dir}/<TARGET>/<chip>.jpeg (test angle), one folder per target")
        self.class_names, train_samples = scan_class_folders(self.root / train_dir, IMAGE_EXTENSIONS, layout, "chip")
        if num_classes is not None and num_classes != len(self.class_names):
            raise DatasetFormatError(f"MSTAR: {self.root / train_dir} has {len(self.class_names)} target folders; "
                                     f"the config expects {num_classes} (data.args.num_classes)")
        if split == "test":
            test_names, samples = scan_class_folders(self.root / test_dir, IMAGE_EXTENSIONS, layout, "chip")
            if test_names != self.class_names:
                raise DatasetFormatError(
                    f"MSTAR: the targets of {self.root / test_dir} {test_names} differ from those of "
                    f"{self.root / train_dir} {self.class_names}; {layout}")
            self.samples = samples
        else:
            parts = stratified_split([s[1] for s in train_samples], 1.0, val_ratio, split_seed)
            self.samples = [train_samples[i] for i in parts[split]]
        self.crop_size = int(crop_size)
        self.jitter = int(train_jitter) if split == "train" else 0

    def info(self) -> dict[str, Any]:
        return {"num_classes": len(self.class_names), "class_names": list(self.class_names),
                "image_size": self.crop_size, "channels": 1}

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> dict[str, Any]:
        path, label = self.samples[i]
        chip = read_image(path, "L")
        h, w = chip.shape
        c = self.crop_size
        if h < c or w < c:
            raise DatasetFormatError(f"MSTAR: chip {path} is {h} x {w}, smaller than the {c} x {c} crop "
                                     "(data.args.crop_size)")
        top, left = (h - c) // 2, (w - c) // 2
        if self.jitter:
            # torch's generator: seeded by the run (and per loader worker), restored on resume
            dy, dx = (int(x) for x in torch.randint(-self.jitter, self.jitter + 1, (2,)))
            top = int(np.clip(top + dy, 0, h - c))
            left = int(np.clip(left + dx, 0, w - c))
        x = chip[top:top + c, left:left + c].astype(np.float32)[None] / 255.0
        # Per-chip standardisation: chips differ in overall gain between collections and depression
        # angles, and unit-scale inputs let BatchNorm's running statistics settle within a short run.
        x = (x - x.mean()) / (x.std() + 1e-6)
        return {"image": torch.from_numpy(x), "label": torch.tensor(label, dtype=torch.int64),
                "index": torch.tensor(i, dtype=torch.int64)}

    DEMO_TARGETS = ("2S1", "BMP2", "BRDM_2", "BTR70", "T72")

    @classmethod
    def write_demo(cls, root: str | Path, seed: int = 0, per_class: int = 30, test_per_class: int = 20,
                   size: int = 64) -> None:
        """Five targets as JPEG chips under ``17_DEG`` and ``15_DEG``: each target is a constellation of
        bright point scatterers (its own fixed layout of 4-6 points, rotated to a random aspect angle)
        on a dim rectangular body, over Rayleigh-distributed speckle clutter. The 15-degree chips
        squeeze the layout slightly along one image axis (another depression angle), as the real test set differs
        from the training one."""
        from PIL import Image

        rng = np.random.default_rng(seed)
        root = Path(root)
        # Distinct hull sizes (half-width, half-length) and scatterer counts per target, as real targets
        # differ in size and in the number of strong corner reflectors.
        hulls = [(0.10, 0.22), (0.16, 0.36), (0.09, 0.40), (0.20, 0.20), (0.13, 0.30)]
        body = {t: hulls[i % len(hulls)] for i, t in enumerate(cls.DEMO_TARGETS)}
        layouts = {t: rng.uniform(-1, 1, (3 + i, 2)) * (body[t][0] * 2, body[t][1] * 2)
                   for i, t in enumerate(cls.DEMO_TARGETS)}
        yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
        for angle_dir, n, squeeze in (("17_DEG", per_class, 1.0), ("15_DEG", test_per_class, 0.93)):
            for t in cls.DEMO_TARGETS:
                (root / angle_dir / t).mkdir(parents=True, exist_ok=True)
                for j in range(n):
                    az = rng.uniform(-0.35, 0.35) + np.pi * rng.integers(0, 2)  # aspect: +-20 deg, either heading
                    rot = np.array([[np.cos(az), -np.sin(az)], [np.sin(az), np.cos(az)]])
                    scale = size * 0.3
                    cy, cx = size / 2 + rng.normal(0, 1.0, 2)
                    u = ((yy - cy) * np.cos(az) + (xx - cx) * np.sin(az)) / scale
                    v = (-(yy - cy) * np.sin(az) + (xx - cx) * np.cos(az)) / scale
                    bh, bw = body[t]
                    img = 0.35 * ((np.abs(u) < bh * 2) & (np.abs(v) < bw * 2))
                    for p in layouts[t] @ rot.T:
                        py, px = cy + p[0] * scale * squeeze, cx + p[1] * scale
                        img = img + rng.uniform(0.7, 1.0) * np.exp(-((yy - py) ** 2 + (xx - px) ** 2) / 2.0)
                    speckle = rng.rayleigh(0.12, (size, size))
                    chip = np.clip((img + speckle) * 200, 0, 255).astype(np.uint8)
                    path = root / angle_dir / t / f"{t}_{angle_dir}_{j:03d}.jpeg"
                    tmp = path.with_name(f".{path.name}.tmp")
                    Image.fromarray(chip).save(tmp, format="JPEG", quality=95)
                    os.replace(tmp, path)
