"""Globe230k (Shi et al., Journal of Remote Sensing 2023): 512 x 512 tiles at 1 m, ten first-level land-cover
classes, dense labels; RGB with co-registered NDVI, DEM and dual-polarised SAR (VV, VH) layers, for semantic
segmentation of any subset of these modalities.

The release (Zenodo 10.5281/zenodo.8429199: ``image_patch.zip`` of RGB ``.jpg`` tiles, their annotations and the
7:1:2 split lists of tile ids; the NDVI, DEM and VV/VH layers separately) does not fix one folder tree for the
modalities together, so this reader reads a plain one -- unpack the parts into it (or point ``data.args.folders``
at other folder names)::

    <root>/train.txt, <root>/val.txt, <root>/test.txt   the split lists: one tile id per line (e.g. data_3)
    <root>/rgb/<id>.jpg      RGB, H x W x 3 uint8 (.jpg as released; .png or .tif accepted)
    <root>/ndvi/<id>.tif     NDVI, H x W, one float band
    <root>/dem/<id>.tif      DEM, H x W, one band (metres)
    <root>/sar/<id>.tif      SAR, H x W x 2 (VV, VH backscatter; band-first files accepted)
    <root>/label/<id>.png    class values (single channel): 1 cropland, 2 forest, 3 grass, 4 shrubland, 5 wetland,
                             6 water, 7 tundra, 8 impervious surface, 9 bareland, 10 ice/snow; 0 = no label
                             (ignored); .tif accepted

``data.args.modalities`` picks any non-empty subset of ``[rgb, ndvi, dem, sar]`` (the batch keys; only those
folders are read). Refused, naming the file: a split list or tile file that is missing (with the names tried), an
unreadable image, an RGB that is not 3-band 8-bit, a layer with the wrong band count or NaN/inf values, a layer or
label whose size differs from the tile's RGB (or first modality), a colour label image where class values are
expected, and a label value outside 0..10 (with the pixel's position).
Batch keys: the chosen modalities (``rgb`` [3, p, p], ``ndvi`` [1, p, p], ``dem`` [1, p, p], ``sar`` [2, p, p],
standardised per band with the training tiles' statistics) and ``label`` [p, p] (class - 1; -1 = no label).
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from allspark.config import ConfigError
from allspark.data.base import DatasetFormatError, path_inside, read_utf8_text
from allspark.data.segmentation_tiles import TiledSegmentation, read_tiff, write_tiff
from allspark.registry import DATASETS

__all__ = ["Globe230k", "GLOBE230K_CLASSES", "GLOBE230K_MODALITIES"]

GLOBE230K_CLASSES = ("cropland", "forest", "grass", "shrubland", "wetland", "water", "tundra", "impervious surface",
                     "bareland", "ice/snow")
#: batch key -> band count
GLOBE230K_MODALITIES = {"rgb": 3, "ndvi": 1, "dem": 1, "sar": 2}
EXTENSIONS = {"rgb": (".jpg", ".jpeg", ".png", ".tif", ".tiff"), "ndvi": (".tif", ".tiff"),
              "dem": (".tif", ".tiff"), "sar": (".tif", ".tiff"), "label": (".png", ".tif", ".tiff")}
LAYOUT = ("expected layout: <root>/{train,val,test}.txt (tile ids), <root>/rgb/<id>.jpg, <root>/ndvi/<id>.tif, "
          "<root>/dem/<id>.tif, <root>/sar/<id>.tif (VV, VH) and <root>/label/<id>.png (class values 1..10, "
          "0 = no label)")


def _read_image(path: Path, what: str) -> np.ndarray:
    """A JPEG / PNG (Pillow) or TIFF (tifffile) as an array."""
    if path.suffix.lower() in (".tif", ".tiff"):
        return read_tiff(path, what)
    from PIL import Image

    try:
        with Image.open(path) as img:
            if img.mode == "P":  # a palette PNG of class values: the indices are the values
                return np.asarray(img)
            return np.asarray(img.convert("RGB") if img.mode in ("RGBA", "CMYK", "YCbCr") else img)
    except Exception as exc:  # PIL raises UnidentifiedImageError, OSError ... on bad files
        raise DatasetFormatError(f"{path}: the {what} is not a readable image: {type(exc).__name__}: {exc}") from exc


@DATASETS.register("globe230k")
class Globe230k(TiledSegmentation):
    class_names = GLOBE230K_CLASSES
    dataset_name = "Globe230k"

    def configure(self, modalities: Sequence[str] = ("rgb", "ndvi", "dem", "sar"),
                  folders: dict[str, str] | None = None) -> None:
        if isinstance(modalities, str) or not isinstance(modalities, Sequence) or not modalities:
            raise ConfigError(f"Globe230k: data.args.modalities must be a non-empty list of "
                              f"{list(GLOBE230K_MODALITIES)}, got {modalities!r}")
        unknown = [m for m in modalities if m not in GLOBE230K_MODALITIES]
        if unknown or len(set(modalities)) != len(modalities):
            raise ConfigError(f"Globe230k: data.args.modalities {list(modalities)}: each must be one of "
                              f"{list(GLOBE230K_MODALITIES)}, once")
        self.raster_keys = tuple(modalities)
        self.folders = {k: k for k in (*GLOBE230K_MODALITIES, "label")}
        extra = set(folders or {}) - set(self.folders)
        if extra:
            raise ConfigError(f"Globe230k: data.args.folders names {sorted(extra)}; it maps "
                              f"{sorted(self.folders)} to folder names")
        self.folders.update(folders or {})
        self._ids: dict[str, list[str]] = {}

    def split_tiles(self, split: str) -> list[str]:
        if split not in self._ids:
            path = self.root / f"{split}.txt"
            if not path.is_file():
                raise DatasetFormatError(f"Globe230k: the split list {path} is missing; {LAYOUT}")
            ids = []
            for n, line in enumerate(read_utf8_text(path, "Globe230k").splitlines(), 1):
                entry = line.strip()
                if not entry:
                    continue
                stem = Path(entry).stem if Path(entry).suffix.lower() in (".jpg", ".png", ".tif") else entry
                path_inside(self.root / self.folders["label"], stem, f"{path}, line {n}", "tile id")
                ids.append(stem)
            if len(set(ids)) != len(ids):
                raise DatasetFormatError(f"Globe230k: {path} lists a tile id twice")
            self._ids[split] = ids
        return list(self._ids[split])

    def _file(self, kind: str, tile: str) -> Path:
        folder = self.root / self.folders[kind]
        for ext in EXTENSIONS[kind]:
            if (folder / f"{tile}{ext}").is_file():
                return folder / f"{tile}{ext}"
        tried = ", ".join(f"{tile}{e}" for e in EXTENSIONS[kind])
        raise DatasetFormatError(f"Globe230k tile {tile}: no {kind} file in {folder} (tried {tried}); {LAYOUT}")

    def tile_files(self, tile: str) -> list[Path]:
        files = []
        for kind in (*self.raster_keys, "label"):
            try:
                files.append(self._file(kind, tile))
            except DatasetFormatError:  # the cache key of a missing file: read_tile names it
                files.append(self.root / self.folders[kind] / f"{tile}{EXTENSIONS[kind][0]}")
        return files

    def read_tile(self, tile: str) -> tuple[dict[str, np.ndarray], np.ndarray]:
        rasters = self.read_rasters(tile)
        grid = (rasters[self.raster_keys[0]].shape[:2], self._file(self.raster_keys[0], tile))
        path = self._file("label", tile)
        label = _read_image(path, "label image")
        if label.ndim == 3 and label.shape[2] == 1:
            label = label[..., 0]
        if label.ndim != 2:
            raise DatasetFormatError(f"{path}: expected a single-channel label image of class values (0..10), got "
                                     f"shape {list(label.shape)} (a colour image?)")
        if label.shape != grid[0]:
            raise DatasetFormatError(f"{path}: the label image is {label.shape[0]} x {label.shape[1]} pixels but "
                                     f"{grid[1]} is {grid[0][0]} x {grid[0][1]}")
        if not np.issubdtype(label.dtype, np.integer):
            raise DatasetFormatError(f"{path}: expected integer class values, got {label.dtype}")
        k = len(GLOBE230K_CLASSES)
        bad = (label < 0) | (label > k)
        if bad.any():
            r, c = (int(v) for v in np.argwhere(bad)[0])
            raise DatasetFormatError(f"{path}: pixel (row {r}, column {c}) has class value {int(label[r, c])}; "
                                     f"expected 0 (no label) or 1..{k}; {int(bad.sum())} pixel(s) are out of range")
        return rasters, label.astype(np.int64) - 1

    def read_rasters(self, tile: str) -> dict[str, np.ndarray]:
        """The chosen modalities' layers of ``tile`` (checked: bands, dtypes, values, one grid), without the label."""
        rasters: dict[str, np.ndarray] = {}
        grid: tuple[tuple[int, int], Path] | None = None
        for key in self.raster_keys:
            path = self._file(key, tile)
            array = _read_image(path, f"{key} layer")
            bands = GLOBE230K_MODALITIES[key]
            if array.ndim == 2:
                array = array[..., None]
            if array.ndim != 3 or array.shape[2] != bands:
                raise DatasetFormatError(f"{path}: the {key} layer must have {bands} band(s) (H x W"
                                         f"{' x ' + str(bands) if bands > 1 else ''}), got shape {list(array.shape)}")
            if key == "rgb":
                if array.dtype != np.uint8:
                    raise DatasetFormatError(f"{path}: expected an 8-bit RGB image, got {array.dtype}")
            else:
                if not np.issubdtype(array.dtype, np.number):
                    raise DatasetFormatError(f"{path}: the {key} layer must be numeric, got {array.dtype}")
                array = array.astype(np.float32)
                bad = int((~np.isfinite(array)).sum())
                if bad:
                    raise DatasetFormatError(f"{path}: {bad} value(s) of the {key} layer are NaN or infinite")
            if grid is None:
                grid = (array.shape[:2], path)
            elif array.shape[:2] != grid[0]:
                raise DatasetFormatError(f"{path}: the {key} layer is {array.shape[0]} x {array.shape[1]} pixels but "
                                         f"{grid[1]} is {grid[0][0]} x {grid[0][1]}; expected one grid per tile")
            rasters[key] = array
        return rasters

    def find_tiles(self) -> list[str]:
        """The tile ids with a file in the first modality's folder (``<root>/rgb/<id>.jpg`` ...), sorted by name
        (numbers within names in numeric order: data_2 before data_10)."""
        import re

        key = self.raster_keys[0]
        folder = self.root / self.folders[key]
        stems = {f.stem for f in folder.iterdir() if f.is_file() and f.suffix.lower() in EXTENSIONS[key]
                 and not f.name.startswith(".")} if folder.is_dir() else set()
        if not stems:
            raise DatasetFormatError(f"Globe230k: no {key} tile ({', '.join(EXTENSIONS[key])}) in {folder}; "
                                     f"{LAYOUT} (the labels and split lists are not needed to predict)")
        natural = lambda s: [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", s)]  # noqa: E731
        return sorted(stems, key=natural)

    def tile_name(self, tile: str) -> str:
        return str(tile)

    def encode_labels(self, label: np.ndarray) -> np.ndarray:
        """Class indices ``H x W`` (-1 = none) -> the release's label values (uint8: 1..10, 0 = no label)."""
        return (np.asarray(label, np.int64) + 1).clip(0).astype(np.uint8)

    # -- demo ------------------------------------------------------------------------------------------
    @classmethod
    def write_demo(cls, root, seed: int = 0, size: int = 64, counts: dict[str, int] | None = None) -> None:
        """Small synthetic tiles (``size`` x ``size``, not 512: CPU-sized) in the layout above: 60 train, 10
        val and 20 test tiles, each a mosaic of 3-6 land-cover regions (Voronoi cells) with a few unlabelled
        pixels. Single pixels are noisy (sensor noise, SAR speckle); a region's signal lies in its neighbourhood. Per
        class a signature in every modality, with pairs confused in some modalities and apart in
        others: cropland / grass / shrubland share colours (NDVI and field stripes separate them), tundra /
        bareland share colours and NDVI (the DEM separates them: tundra lies high), wetland / water differ
        mostly in the SAR, ice/snow / impervious surface are both bright (NDVI, DEM and SAR separate them)."""
        from PIL import Image
        from scipy.ndimage import gaussian_filter

        rng = np.random.default_rng(seed)
        root = Path(root)
        counts = counts or {"train": 60, "val": 10, "test": 20}
        #                 rgb                ndvi  dem (m)  VV    VH (dB)
        sig = np.array([[120, 140, 80, 0.55, 0, -10, -16],    # cropland (striped fields)
                        [40, 80, 40, 0.80, 0, -8, -12],       # forest
                        [115, 145, 85, 0.40, 0, -11, -18],    # grass
                        [120, 135, 90, 0.25, 0, -10, -17],    # shrubland
                        [70, 95, 85, 0.30, 0, -14, -22],      # wetland
                        [55, 85, 100, 0.10, 0, -22, -28],     # water
                        [150, 140, 120, 0.12, 2500, -12, -20],  # tundra
                        [190, 190, 195, 0.02, 0, -4, -13],    # impervious surface
                        [155, 140, 120, 0.10, 0, -12, -20],   # bareland
                        [235, 240, 245, -0.05, 3000, -16, -26]], np.float64)  # ice/snow
        yy, xx = np.mgrid[0:size, 0:size]
        tile_no = 0
        for split, n in counts.items():
            ids = []
            for _ in range(n):
                tile_no += 1
                tile = f"data_{tile_no}"
                ids.append(tile)
                k = int(rng.integers(3, 7))
                centres = rng.uniform(0, size, (k, 2))
                cells = np.argmin((yy[..., None] - centres[:, 0]) ** 2 + (xx[..., None] - centres[:, 1]) ** 2, axis=-1)
                classes = rng.choice(len(GLOBE230K_CLASSES), k, replace=k > len(GLOBE230K_CLASSES))[cells]
                s = sig[classes]
                noise = lambda scale: rng.normal(0, scale, (size, size))  # noqa: E731
                stripes = (np.sin((xx * np.cos(rng.uniform(0, np.pi)) + yy) * 0.9) > 0) * (classes == 0)
                rgb = s[..., :3] * rng.uniform(0.85, 1.15) + rng.normal(0, 30, (size, size, 3))
                rgb[stripes] *= 0.8
                ndvi = s[..., 3] + 0.2 * noise(1) - 0.2 * stripes
                dem = (rng.uniform(0, 600) + 40 * gaussian_filter(rng.standard_normal((size, size)), 10) * 10
                       + s[..., 4] + noise(5))
                sar = s[..., 5:7] + rng.normal(0, 4.0, (size, size, 2))  # speckle
                label = (classes + 1).astype(np.uint8)
                label[rng.random((size, size)) < 0.02] = 0  # a few pixels without a label
                (root / "rgb").mkdir(parents=True, exist_ok=True)
                Image.fromarray(np.clip(rgb, 0, 255).astype(np.uint8)).save(root / "rgb" / f"{tile}.jpg", quality=92)
                write_tiff(root / "ndvi" / f"{tile}.tif", np.clip(ndvi, -1, 1).astype(np.float32))
                write_tiff(root / "dem" / f"{tile}.tif", dem.astype(np.float32))
                write_tiff(root / "sar" / f"{tile}.tif", sar.astype(np.float32))
                (root / "label").mkdir(parents=True, exist_ok=True)
                Image.fromarray(label).save(root / "label" / f"{tile}.png")
            (root / f"{split}.txt").write_text("\n".join(ids) + "\n")
