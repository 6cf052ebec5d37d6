"""MSTAR SOC: ten ground targets in X-band SAR chips, trained at 17 degrees depression and tested at 15
degrees (AllSpark Section III-C "SAR", Section IV-B; the setting of AConvNets, Chen et al. 2016).

On-disk layout -- the widely used image release of the MSTAR public targets (chips converted from the
raw MSTAR files to 8-bit magnitude images, one folder per target under one folder per depression
angle)::

    <root>/17_DEG/<TARGET>/<chip>.jpeg     training chips (2S1, BMP2, BRDM_2, BTR60, BTR70, D7, T62,
    <root>/15_DEG/<TARGET>/<chip>.jpeg     T72, ZIL131, ZSU_23_4), typically 128 x 128 grey images

Folder names are configurable (``train_dir``/``test_dir``; e.g. ``train/17_DEG`` when a copy nests them).
Class names are the sorted target folders of the training angle; the test angle must hold the same targets,
else a ``DatasetFormatError`` lists the difference.

Chip files and channels. The AllSpark paper's SAR input is "a two-band or single-band image" (Section III-C: the
polarisation modes), ``m_SAR in R^{H x W x 2}``; the image release above has one band. The reader takes both:

- ``.jpeg .jpg .png .bmp``: one channel, the 8-bit magnitude image (decoded as grey, as before);
- ``.npy``: a real-valued array ``[H, W]`` (one channel) or ``[C, H, W]``, channels first, ``C <= 4`` -- e.g.
  ``[2, H, W]`` holding two polarisations (HH, HV) or magnitude and phase of the complex MSTAR data (store a
  complex chip as such two real channels);
- ``.tif .tiff``: a grey TIFF (one channel), a multi-page TIFF (one page per channel) or a multi-band GeoTIFF
  (bands interleaved or planar), read with ``tifffile``; an RGB or palette TIFF is decoded as grey like the JPEGs.

The channel count is the data's: the first chip of the training angle gives it (``info()["channels"]``, which
sizes the encoder's ``in_chans``), and every chip read must have it; ``channels`` (``data.args.channels``), when
set, must equal it. A chip of another channel count is a ``DatasetFormatError`` naming the file. Items carry
``path`` (the chip file) so that a model built for another channel count (a checkpoint trained on other data,
``model.encoders.*.args.in_chans``) names the chip it cannot take (``encoders/sar_cnn.py``).

Split: ``test`` = every chip of the 15-degree folder; ``val`` = ``val_ratio`` of each target's
17-degree chips (seeded), ``train`` = the rest, so the test angle is never seen during model selection.
Preprocessing as in AConvNets: the centre ``crop_size`` x ``crop_size`` (88) crop of each chip (for
training, a random crop within ``train_jitter`` pixels of the centre -- AConvNets' crop augmentation);
8-bit magnitudes scaled to [0, 1], then each channel standardised per chip (zero mean, unit std). Items:
``image`` float32 [C, crop, crop], ``label`` int64, ``index``, ``path`` (str).

Refused with ``DatasetFormatError`` naming the folder or file: a missing angle folder, one without target
folders or a target folder without chips, test targets that differ from the training ones, another number
of targets than ``num_classes``, a first chip whose channel count is not ``channels``; when an item is read, a
chip that cannot be decoded, is smaller than the crop (chips are cropped, never resized), has another channel count
than the dataset's, or (``.npy``, TIFF) holds non-real, NaN or infinite values.
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

__all__ = ["MSTARSOC", "CHIP_EXTENSIONS", "read_chip"]

#: the chip files the reader takes (see the module docstring); .tif/.tiff are read with tifffile
CHIP_EXTENSIONS = tuple(dict.fromkeys((*IMAGE_EXTENSIONS, ".npy")))
#: at most this many channels per chip (1 or 2 in the paper; 4 for a full-polarimetric HH, HV, VH, VV chip)
MAX_CHANNELS = 4
CHIP_FORMS = ("8-bit grey images (.jpeg/.jpg/.png/.bmp), .npy arrays [H, W] or [C, H, W] (channels first), "
              "grey, multi-page or multi-band TIFFs")


def _tiff_chip(path: Path) -> np.ndarray:
    import tifffile

    try:
        with tifffile.TiffFile(path) as tif:
            photometric = tif.pages[0].photometric
            if photometric in (tifffile.PHOTOMETRIC.RGB, tifffile.PHOTOMETRIC.PALETTE, tifffile.PHOTOMETRIC.YCBCR):
                return read_image(path, "L").astype(np.float32)[None] / 255.0  # a colour picture of a grey chip
            series = tif.series[0]
            data, axes = series.asarray(), series.axes
    except DatasetFormatError:
        raise
    except Exception as exc:  # tifffile raises TiffFileError, ValueError, struct.error ... on bad files
        raise DatasetFormatError(f"cannot decode TIFF chip {path}: {type(exc).__name__}: {exc}") from exc
    if data.ndim == 3 and axes[0] in "YX":  # band-interleaved (H, W, C) -> channels first
        data = np.moveaxis(data, -1, 0)
    return data


def read_chip(path: Path) -> np.ndarray:
    """One chip file as float32 ``[C, H, W]`` (8-bit images scaled to [0, 1], other files as stored); see the
    module docstring for the forms. A file that cannot be read, another shape, more than ``MAX_CHANNELS``
    channels, non-real or non-finite values raise :class:`DatasetFormatError` naming the file."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix == ".npy":
        try:
            data = np.load(path, allow_pickle=False)
        except Exception as exc:  # ValueError (pickled objects, bad header), OSError, EOFError ...
            raise DatasetFormatError(f"cannot read .npy chip {path}: {type(exc).__name__}: {exc}") from exc
    elif suffix in (".tif", ".tiff"):
        data = _tiff_chip(path)
    else:
        return read_image(path, "L").astype(np.float32)[None] / 255.0
    if data.ndim == 2:
        data = data[None]
    if data.ndim != 3 or not 1 <= data.shape[0] <= MAX_CHANNELS:
        raise DatasetFormatError(f"MSTAR: chip {path} has shape {list(data.shape)}; expected [H, W] or [C, H, W] with "
                                 f"C <= {MAX_CHANNELS} channels first (e.g. [2, H, W]: two polarisations, or "
                                 f"magnitude and phase)")
    if not np.issubdtype(data.dtype, np.number) or np.issubdtype(data.dtype, np.complexfloating):
        raise DatasetFormatError(f"MSTAR: chip {path} holds {data.dtype} values; expected real numbers (store a "
                                 "complex chip as two real channels, e.g. magnitude and phase)")
    data = data.astype(np.float32)
    if not np.isfinite(data).all():
        raise DatasetFormatError(f"MSTAR: chip {path} holds {int((~np.isfinite(data)).sum())} NaN or infinite "
                                 "value(s)")
    return data


@DATASETS.register("mstar_soc")
class MSTARSOC(ModalityDataset):
    """SAR target chips under depression-angle folders; see the module docstring."""

    splits: ClassVar[tuple[str, ...]] = ("train", "val", "test")
    demo_version: ClassVar[int] = 1

    def __init__(self, root: str | Path, split: str, *, train_dir: str = "17_DEG", test_dir: str = "15_DEG",
                 crop_size: int = 88, train_jitter: int = 0, val_ratio: float = 0.1, split_seed: int = 0,
                 num_classes: int | None = None, channels: int | None = None) -> None:
        super().__init__(root, split)
        layout = (f"expected layout: <root>/{train_dir}/<TARGET>/<chip>.jpeg (training angle) and "
                  f"<root>/{test_dir}/<TARGET>/<chip>.jpeg (test angle), one folder per target; chips: {CHIP_FORMS}")
        self.class_names, train_samples = scan_class_folders(self.root / train_dir, CHIP_EXTENSIONS, layout, "chip")
        if num_classes is not None and num_classes != len(self.class_names):
            raise DatasetFormatError(f"MSTAR: {self.root / train_dir} has {len(self.class_names)} target folders; "
                                     f"the config expects {num_classes} (data.args.num_classes)")
        if split == "test":
            test_names, samples = scan_class_folders(self.root / test_dir, CHIP_EXTENSIONS, layout, "chip")
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
        # the data's channel count: the first chip of the training angle (every split: the model is sized by it)
        first = train_samples[0][0]
        found = read_chip(first).shape[0]
        if channels is not None and int(channels) != found:
            raise DatasetFormatError(f"MSTAR: chip {first} (the first of {self.root / train_dir}) has {found} "
                                     f"channel(s); the config expects {channels} (data.args.channels; leave it unset "
                                     "to take the count from the data)")
        self.channels, self._channels_from = found, first

    def info(self) -> dict[str, Any]:
        return {"num_classes": len(self.class_names), "class_names": list(self.class_names),
                "image_size": self.crop_size, "channels": self.channels}

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> dict[str, Any]:
        path, label = self.samples[i]
        chip = read_chip(path)
        expected = getattr(self, "channels", None)  # None: a reader built without a data folder (allspark predict)
        if expected is not None and chip.shape[0] != expected:
            raise DatasetFormatError(f"MSTAR: chip {path} has {chip.shape[0]} channel(s); the dataset's chips have "
                                     f"{expected} (as {self._channels_from}, the first chip of the training angle)")
        h, w = chip.shape[1:]
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
        x = chip[:, top:top + c, left:left + c]
        # Per-chip standardisation of each channel: chips differ in overall gain between collections and
        # depression angles (and channels such as two polarisations in level), and unit-scale inputs let
        # BatchNorm's running statistics settle within a short run.
        x = (x - x.mean(axis=(1, 2), keepdims=True)) / (x.std(axis=(1, 2), keepdims=True) + 1e-6)
        return {"image": torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)),
                "label": torch.tensor(label, dtype=torch.int64), "index": torch.tensor(i, dtype=torch.int64),
                "path": str(path)}

    DEMO_TARGETS = ("2S1", "BMP2", "BRDM_2", "BTR70", "T72")

    #: where the demo writes its two-channel chips (``data.args.train_dir`` / ``test_dir``; the sar config's
    #: ``--recipe two_channel_demo``)
    DEMO_TWO_CHANNEL_DIRS = ("two_channel/17_DEG", "two_channel/15_DEG")

    @classmethod
    def write_demo(cls, root: str | Path, seed: int = 0, per_class: int = 30, test_per_class: int = 20,
                   size: int = 64, two_channel: bool = True) -> None:
        """Five targets as JPEG chips under ``17_DEG`` and ``15_DEG``: each target is a constellation of
        bright point scatterers (its own fixed layout of 4-6 points, rotated to a random aspect angle)
        on a dim rectangular body, over Rayleigh-distributed speckle clutter. The 15-degree chips
        squeeze the layout slightly along one image axis (another depression angle), as the real test set differs
        from the training one.

        ``two_channel``: the same scenes also as dual-polarisation chips, ``.npy`` float32 ``[2, H, W]`` under
        ``two_channel/17_DEG`` and ``two_channel/15_DEG`` (:attr:`DEMO_TWO_CHANNEL_DIRS`): channel 0 the
        co-polarised (HH) magnitude of the JPEG chip (before 8-bit quantisation), channel 1 a cross-polarised (HV)
        magnitude -- every scatterer of a target depolarises by its own fixed ratio, the hull weakly, over its own
        independent speckle. Drawn from a second random stream, so the one-channel chips are the same with or
        without them."""
        from PIL import Image

        rng = np.random.default_rng(seed)
        cross = np.random.default_rng([seed, 2])  # the HV channel's draws: the HH chips do not depend on them
        root = Path(root)
        # Distinct hull sizes (half-width, half-length) and scatterer counts per target, as real targets
        # differ in size and in the number of strong corner reflectors.
        hulls = [(0.10, 0.22), (0.16, 0.36), (0.09, 0.40), (0.20, 0.20), (0.13, 0.30)]
        body = {t: hulls[i % len(hulls)] for i, t in enumerate(cls.DEMO_TARGETS)}
        layouts = {t: rng.uniform(-1, 1, (3 + i, 2)) * (body[t][0] * 2, body[t][1] * 2)
                   for i, t in enumerate(cls.DEMO_TARGETS)}
        # per target and scatterer: the share of its return that comes back cross-polarised
        depolarisation = {t: cross.uniform(0.05, 0.9, len(layouts[t])) for t in cls.DEMO_TARGETS}
        yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
        dirs = zip(("17_DEG", "15_DEG"), cls.DEMO_TWO_CHANNEL_DIRS, (per_class, test_per_class), (1.0, 0.93))
        for angle_dir, dual_dir, n, squeeze in dirs:
            for t in cls.DEMO_TARGETS:
                (root / angle_dir / t).mkdir(parents=True, exist_ok=True)
                if two_channel:
                    (root / dual_dir / t).mkdir(parents=True, exist_ok=True)
                for j in range(n):
                    az = rng.uniform(-0.35, 0.35) + np.pi * rng.integers(0, 2)  # aspect: +-20 deg, either heading
                    rot = np.array([[np.cos(az), -np.sin(az)], [np.sin(az), np.cos(az)]])
                    scale = size * 0.3
                    cy, cx = size / 2 + rng.normal(0, 1.0, 2)
                    u = ((yy - cy) * np.cos(az) + (xx - cx) * np.sin(az)) / scale
                    v = (-(yy - cy) * np.sin(az) + (xx - cx) * np.cos(az)) / scale
                    bh, bw = body[t]
                    hull = (np.abs(u) < bh * 2) & (np.abs(v) < bw * 2)
                    img = 0.35 * hull
                    hv = 0.05 * hull
                    for k, p in enumerate(layouts[t] @ rot.T):
                        py, px = cy + p[0] * scale * squeeze, cx + p[1] * scale
                        spot = rng.uniform(0.7, 1.0) * np.exp(-((yy - py) ** 2 + (xx - px) ** 2) / 2.0)
                        img = img + spot
                        hv = hv + depolarisation[t][k] * spot
                    speckle = rng.rayleigh(0.12, (size, size))
                    chip = np.clip((img + speckle) * 200, 0, 255).astype(np.uint8)
                    path = root / angle_dir / t / f"{t}_{angle_dir}_{j:03d}.jpeg"
                    tmp = path.with_name(f".{path.name}.tmp")
                    Image.fromarray(chip).save(tmp, format="JPEG", quality=95)
                    os.replace(tmp, path)
                    if two_channel:
                        dual = np.stack([img + speckle, hv + cross.rayleigh(0.06, (size, size))]).astype(np.float32)
                        path = root / dual_dir / t / f"{t}_{angle_dir}_{j:03d}.npy"
                        tmp = path.with_name(f".{path.name}.tmp")
                        with open(tmp, "wb") as f:
                            np.save(f, dual)
                        os.replace(tmp, path)
