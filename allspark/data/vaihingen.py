"""ISPRS 2D Semantic Labelling Contest, Vaihingen: true orthophotos (IRRG) and DSMs at 9 cm, six classes,
for semantic segmentation of paired modalities (orthophoto + surface model).

On-disk layout (the contest's release, the folders as unpacked)::

    <root>/top/top_mosaic_09cm_area<N>.tif                    true orthophoto, H x W x 3 uint8 (near-infrared,
                                                              red, green)
    <root>/dsm/dsm_09cm_matching_area<N>.tif                  digital surface model, H x W float32 (metres),
                                                              on the orthophoto's grid
    <root>/gts_for_participants/top_mosaic_09cm_area<N>.tif   colour-coded labels, H x W x 3 uint8

Label colours (exact; any other colour is an error naming the file and the pixel): impervious surfaces
(255, 255, 255), building (0, 0, 255), low vegetation (0, 255, 255), tree (0, 255, 0), car (255, 255, 0),
clutter/background (255, 0, 0) -> classes 0..5 in that order. The contest released the labels of the test
areas later (``ISPRS_semantic_labeling_Vaihingen_ground_truth_COMPLETE``, same file names and colours): put them
in ``gts_for_participants/`` beside the training ones, or name their folder with ``data.args.label_dir``.

Split (the usual one): training areas 1, 3, 5, 7, 11, 13, 15, 17, 21, 23, 26, 28, 30, 32, 34, 37 and test areas
2, 4, 6, 8, 10, 12, 14, 16, 20, 22, 24, 27, 29, 31, 33, 35, 38 (``data.args.train_areas`` / ``test_areas``);
``val_areas`` (default: the last training area, 37) are held out of training for model selection.

Refused, naming the file: a missing file (with the expected layout), an unreadable TIFF, an orthophoto that is not
3-band uint8, a DSM that is not single-band or holds NaN/inf, a DSM or label image whose size differs from its
orthophoto's, and a label colour outside the palette. Batch keys: ``top`` [3, p, p] and ``dsm`` [1, p, p]
(standardised with the training tiles' band statistics), ``label`` [p, p] (see
:mod:`allspark.data.segmentation_tiles` for patches, windows and their stitching).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar, Sequence

import numpy as np

from allspark.config import ConfigError
from allspark.data.base import DatasetFormatError
from allspark.data.segmentation_tiles import TiledSegmentation, decode_palette, read_tiff, write_tiff
from allspark.registry import DATASETS

__all__ = ["ISPRSVaihingen", "VAIHINGEN_CLASSES", "VAIHINGEN_PALETTE", "VAIHINGEN_TRAIN_AREAS",
           "VAIHINGEN_TEST_AREAS"]

VAIHINGEN_CLASSES = ("impervious surfaces", "building", "low vegetation", "tree", "car", "clutter/background")
VAIHINGEN_PALETTE = ((255, 255, 255), (0, 0, 255), (0, 255, 255), (0, 255, 0), (255, 255, 0), (255, 0, 0))
VAIHINGEN_TRAIN_AREAS = (1, 3, 5, 7, 11, 13, 15, 17, 21, 23, 26, 28, 30, 32, 34, 37)
VAIHINGEN_TEST_AREAS = (2, 4, 6, 8, 10, 12, 14, 16, 20, 22, 24, 27, 29, 31, 33, 35, 38)

TOP = "top/top_mosaic_09cm_area{}.tif"
DSM = "dsm/dsm_09cm_matching_area{}.tif"
LABEL_DIR = "gts_for_participants"
LABEL = "top_mosaic_09cm_area{}.tif"
LAYOUT = (f"expected layout: <root>/{TOP.format('<N>')} (IRRG orthophoto, H x W x 3 uint8), "
          f"<root>/{DSM.format('<N>')} (DSM, H x W float32) and <root>/{LABEL_DIR}/{LABEL.format('<N>')} "
          "(colour-coded labels, H x W x 3 uint8)")


def _areas(value: Any, name: str) -> list[int]:
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence) or not all(
            isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in value):
        raise ConfigError(f"Vaihingen: data.args.{name} must be a list of area numbers (whole numbers >= 1), "
                          f"got {value!r}")
    if len(set(value)) != len(value):
        raise ConfigError(f"Vaihingen: data.args.{name} lists an area twice: {list(value)}")
    return [int(v) for v in value]


@DATASETS.register("vaihingen")
class ISPRSVaihingen(TiledSegmentation):
    raster_keys: ClassVar[tuple[str, ...]] = ("top", "dsm")
    class_names = VAIHINGEN_CLASSES
    palette = VAIHINGEN_PALETTE
    dataset_name = "Vaihingen"

    def configure(self, train_areas: Sequence[int] = VAIHINGEN_TRAIN_AREAS,
                  test_areas: Sequence[int] = VAIHINGEN_TEST_AREAS, val_areas: Sequence[int] | None = None,
                  label_dir: str = LABEL_DIR) -> None:
        train, test = _areas(train_areas, "train_areas"), _areas(test_areas, "test_areas")
        val = [train[-1]] if val_areas is None else _areas(val_areas, "val_areas")
        if set(train) & set(test):
            raise ConfigError(f"Vaihingen: areas {sorted(set(train) & set(test))} are in both train_areas and "
                              "test_areas")
        if not set(val) <= set(train) or len(val) >= len(train):
            raise ConfigError(f"Vaihingen: val_areas {val} must be some (not all) of the train_areas {train}")
        if not isinstance(label_dir, str) or not label_dir:
            raise ConfigError(f"Vaihingen: data.args.label_dir must name a folder under the root, got {label_dir!r}")
        self.areas = {"train": [a for a in train if a not in val], "val": val, "test": test}
        self.label_dir = label_dir

    def split_tiles(self, split: str) -> list[int]:
        return list(self.areas[split])

    def tile_files(self, area: int) -> list[Path]:
        return [self.root / TOP.format(area), self.root / DSM.format(area),
                self.root / self.label_dir / LABEL.format(area)]

    def read_tile(self, area: int) -> tuple[dict[str, np.ndarray], np.ndarray]:
        top_path, dsm_path, label_path = self.tile_files(area)
        missing = [str(p.relative_to(self.root)) for p in (top_path, dsm_path, label_path) if not p.is_file()]
        if missing:
            raise DatasetFormatError(f"Vaihingen area {area}: {', '.join(missing)} missing under {str(self.root)!r}; "
                                     f"{LAYOUT}")
        rasters = self.read_rasters(area)
        top = rasters["top"]
        image = read_tiff(label_path, "label image")
        if image.shape[:2] != top.shape[:2]:
            raise DatasetFormatError(f"{label_path}: the label image is {image.shape[0]} x {image.shape[1]} pixels "
                                     f"but its orthophoto {top_path} is {top.shape[0]} x {top.shape[1]}")
        label = decode_palette(image, VAIHINGEN_PALETTE, label_path)
        return rasters, label

    # -- prediction (allspark predict: tiles without labels) -------------------------------------------
    def find_tiles(self) -> list[int]:
        """The areas whose orthophoto is under ``<root>/top/`` (``top_mosaic_09cm_area<N>.tif``), by number."""
        folder = self.root / Path(TOP).parent
        prefix, suffix = Path(TOP).name.split("{}")
        found = []
        for f in sorted(folder.glob(f"{prefix}*{suffix}")) if folder.is_dir() else []:
            number = f.name[len(prefix):len(f.name) - len(suffix)]
            if number.isdigit():
                found.append(int(number))
        if not found:
            raise DatasetFormatError(f"{self.root}: no orthophoto {TOP.format('<N>')} found; {LAYOUT} (the labels "
                                     "are not needed to predict)")
        return sorted(found)

    def tile_name(self, area: int) -> str:
        """The name of area ``area``'s label image (``top_mosaic_09cm_area<N>``), without its suffix."""
        return Path(LABEL.format(area)).stem

    def encode_labels(self, label: np.ndarray) -> np.ndarray:
        """Class indices ``H x W`` -> the contest's colour-coded label image ``H x W x 3`` uint8."""
        return np.asarray(VAIHINGEN_PALETTE, np.uint8)[np.asarray(label, np.int64)]

    def read_rasters(self, area: int) -> dict[str, np.ndarray]:
        """The orthophoto and the DSM of ``area`` (checked: bands, dtypes, one grid), without the label."""
        top_path, dsm_path, _ = self.tile_files(area)
        missing = [str(p.relative_to(self.root)) for p in (top_path, dsm_path) if not p.is_file()]
        if missing:
            raise DatasetFormatError(f"Vaihingen area {area}: {', '.join(missing)} missing under {str(self.root)!r}; "
                                     f"{LAYOUT}")
        top = read_tiff(top_path, "orthophoto")
        if top.ndim != 3 or top.shape[2] != 3 or top.dtype != np.uint8:
            raise DatasetFormatError(f"{top_path}: expected a 3-band 8-bit orthophoto (H x W x 3 uint8: IR, R, G), "
                                     f"got shape {list(top.shape)} {top.dtype}")
        dsm = read_tiff(dsm_path, "DSM")
        if dsm.ndim == 3 and dsm.shape[2] == 1:
            dsm = dsm[..., 0]
        if dsm.ndim != 2 or not np.issubdtype(dsm.dtype, np.number):
            raise DatasetFormatError(f"{dsm_path}: expected a single-band DSM (H x W heights), got shape "
                                     f"{list(dsm.shape)} {dsm.dtype}")
        if dsm.shape != top.shape[:2]:
            raise DatasetFormatError(f"{dsm_path}: the DSM is {dsm.shape[0]} x {dsm.shape[1]} pixels but its "
                                     f"orthophoto {top_path} is {top.shape[0]} x {top.shape[1]}; expected the same "
                                     "grid")
        dsm = dsm.astype(np.float32)
        bad = int((~np.isfinite(dsm)).sum())
        if bad:
            raise DatasetFormatError(f"{dsm_path}: {bad} DSM value(s) are NaN or infinite")
        return {"top": top, "dsm": dsm[..., None]}

    # -- demo ------------------------------------------------------------------------------------------
    @classmethod
    def write_demo(cls, root, seed: int = 0, sizes: Sequence[int] = (64, 80, 96)) -> None:
        """Every area of the usual split (33 tiles) as small synthetic scenes in the contest layout, each
        ``h x w`` with ``h, w`` drawn from ``sizes``. A scene: low vegetation with roads (impervious), rectangular
        buildings, round trees, cars on the roads and a few clutter blobs. Made so that context matters: roofs
        have the colours of the roads (both grey, some roofs red), trees those of the grass (both bright in the
        infrared), so a pixel's colour alone confuses them; the DSM tells them apart, but only relative to the
        ground around them: each tile's terrain has its own height (a tilted, gently undulating surface, a few
        metres up or down from tile to tile), so a height on its own does not say roof or road."""
        rng = np.random.default_rng(seed)
        root = Path(root)
        for area in sorted(VAIHINGEN_TRAIN_AREAS + VAIHINGEN_TEST_AREAS):
            h, w = (int(v) for v in rng.choice(sizes, 2))
            classes, height = _demo_scene(rng, h, w)
            write_tiff(root / TOP.format(area), _demo_irrg(rng, classes, h, w), rgb=True)
            write_tiff(root / DSM.format(area), height.astype(np.float32))
            write_tiff(root / LABEL_DIR / LABEL.format(area),
                       np.asarray(VAIHINGEN_PALETTE, np.uint8)[classes], rgb=True)


def _demo_scene(rng: np.random.Generator, h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
    """Class map (0..5) and DSM (metres) of one synthetic tile."""
    from scipy.ndimage import gaussian_filter

    classes = np.full((h, w), 2, np.int64)  # low vegetation
    yy, xx = np.mgrid[0:h, 0:w]
    roads = np.zeros((h, w), bool)
    for axis in (0, 1):
        for _ in range(rng.integers(1, 3)):
            centre, half = rng.integers(8, (h if axis == 0 else w) - 8), rng.integers(2, 5)
            roads |= np.abs((yy if axis == 0 else xx) - centre) <= half
    classes[roads] = 0
    rise = np.zeros((h, w))
    for _ in range(int(h * w / 400)):  # attempts at buildings off the roads
        bh, bw = rng.integers(10, 26, 2)
        y0, x0 = rng.integers(0, max(h - bh, 1)), rng.integers(0, max(w - bw, 1))
        box = (slice(y0, y0 + bh), slice(x0, x0 + bw))
        if roads[box].mean() < 0.1 and (classes[box] == 1).mean() < 0.3:
            classes[box] = np.where(roads[box], classes[box], 1)
            rise[box] = np.where(roads[box], rise[box], rng.uniform(5.0, 10.0))
    for _ in range(int(h * w / 300)):  # trees on the grass
        r = rng.uniform(3.0, 6.5)
        cy, cx = rng.uniform(0, h), rng.uniform(0, w)
        disc = ((yy - cy) ** 2 + (xx - cx) ** 2 <= r * r) & (classes == 2)
        classes[disc] = 3
        rise[disc] = np.maximum(rise[disc], rng.uniform(4.0, 9.0) * np.sqrt(
            np.clip(1 - ((yy[disc] - cy) ** 2 + (xx[disc] - cx) ** 2) / (r * r), 0, 1)) + 1.5)
    road_pix = np.argwhere(classes == 0)
    for _ in range(rng.integers(4, 10) if len(road_pix) else 0):  # cars on the roads
        cy, cx = road_pix[rng.integers(len(road_pix))]
        ch, cw = (3, 5) if rng.random() < 0.5 else (5, 3)
        box = (slice(cy, cy + ch), slice(cx, cx + cw))
        on_road = classes[box] == 0
        classes[box] = np.where(on_road, 4, classes[box])
        rise[box] = np.where(on_road, 1.4, rise[box])
    for _ in range(rng.integers(0, 3)):  # clutter
        r = rng.uniform(1.5, 3.0)
        cy, cx = rng.uniform(0, h), rng.uniform(0, w)
        blob = ((yy - cy) ** 2 + (xx - cx) ** 2 <= r * r) & (classes != 1)
        classes[blob] = 5
        rise[blob] = np.where(blob, rng.uniform(0.3, 2.0), rise)[blob]
    tilt = rng.normal(0, 0.04, 2)
    terrain = (rng.uniform(255.0, 265.0) + tilt[0] * yy + tilt[1] * xx
               + 1.5 * gaussian_filter(rng.standard_normal((h, w)), 12, mode="reflect") * 12)
    return classes, terrain + rise + rng.normal(0, 0.15, (h, w))


def _demo_irrg(rng: np.random.Generator, classes: np.ndarray, h: int, w: int) -> np.ndarray:
    """IRRG orthophoto (uint8) of a class map: per class a base colour with noise, per tile a brightness gain."""
    from scipy.ndimage import gaussian_filter

    base = np.array([[125, 118, 115],   # impervious: grey
                     [125, 118, 115],   # building: grey roofs (some red, below)
                     [190, 110, 100],   # low vegetation: bright infrared
                     [175, 95, 85],     # tree: a little darker, textured
                     [60, 60, 200],     # car: vivid, any colour (drawn per car below)
                     [140, 130, 90]], np.float64)  # clutter
    img = base[classes].copy()
    red_roofs = gaussian_filter(rng.standard_normal((h, w)), 8) > 0.05
    roof = (classes == 1) & red_roofs
    img[roof] = [150, 160, 95]
    tree = classes == 3
    img[tree] += rng.normal(0, 22, (int(tree.sum()), 1))  # leaf texture
    car = classes == 4
    img[car] = rng.uniform(40, 230, 3)
    img *= rng.uniform(0.85, 1.15)
    img += rng.normal(0, 9, img.shape)
    return np.clip(img, 0, 255).astype(np.uint8)
