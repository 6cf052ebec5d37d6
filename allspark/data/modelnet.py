"""ModelNet40 point clouds in the resampled layout used by PointNet++ / Point-BERT (AllSpark IV-B).

Layout under ``root`` (the folder ``modelnet40_normal_resampled``)::

    modelnet40_shape_names.txt      one class name per line; the line number is the label
    modelnet40_train.txt            one shape name per line, e.g. ``airplane_0001``
    modelnet40_test.txt
    <class>/<class>_NNNN.txt        rows ``x,y,z,nx,ny,nz`` (10,000 resampled points in the release)

The class of ``night_stand_0001`` is everything before the last underscore. Each item takes the first
``num_points`` rows (the release is already a uniform resampling, which is how PointNet++ and Point-BERT
read it), centres the cloud on its centroid and scales it into the unit sphere. ModelNet40 has no
validation split: ``val`` is carved from the official training list, ``val_ratio`` of each class chosen
by a seeded permutation (``split_seed``), so model selection never sees the test list.

Refused with ``DatasetFormatError`` naming the file: a missing or non-UTF-8 list file, a class listed twice,
a shape whose class is not in the shape-name list or whose path leaves the root, listed shapes missing on
disk, an empty split; and, when an item is read, a point file with another column count than 6, rows that
do not parse, fewer than ``num_points`` rows, or NaN/inf values (row named). Extra rows beyond
``num_points`` are not read (the release's uniform resampling, as PointNet++ reads it).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch

from allspark.config import ConfigError
from allspark.data.base import DatasetFormatError, ModalityDataset, path_inside, read_utf8_text
from allspark.registry import DATASETS

__all__ = ["ModelNet40"]

SHAPE_NAMES = "modelnet40_shape_names.txt"
SPLIT_FILES = {"train": "modelnet40_train.txt", "test": "modelnet40_test.txt"}
COLUMNS = 6  # x, y, z, nx, ny, nz

LAYOUT = (
    "expected layout: <root>/modelnet40_shape_names.txt, modelnet40_train.txt, modelnet40_test.txt and "
    "<root>/<class>/<class>_NNNN.txt with comma-separated rows x,y,z,nx,ny,nz"
)


def _read_lines(path: Path) -> list[str]:
    if not path.is_file():
        raise DatasetFormatError(f"ModelNet40: {path} is missing; {LAYOUT}")
    return [line.strip() for line in read_utf8_text(path, "ModelNet40").splitlines() if line.strip()]


def normalize_to_unit_sphere(xyz: np.ndarray) -> np.ndarray:
    """Centre on the centroid and divide by the largest distance to it (Point-BERT's ``pc_normalize``)."""
    xyz = xyz - xyz.mean(axis=0, keepdims=True)
    radius = float(np.sqrt((xyz**2).sum(axis=1)).max())
    return xyz / radius if radius > 0 else xyz


def read_point_file(path: Path, num_points: int) -> np.ndarray:
    """The first ``num_points`` rows of a ModelNet point file as float32 ``[num_points, 6]``.

    Raises ``DatasetFormatError`` naming the file for unreadable text, a wrong column count, too few rows
    or non-finite values.
    """
    try:
        data = np.loadtxt(path, delimiter=",", dtype=np.float32, max_rows=num_points, ndmin=2)
    except FileNotFoundError:
        raise DatasetFormatError(f"ModelNet40: point file {path} is missing; {LAYOUT}") from None
    except ValueError as exc:  # ragged rows or text that is not a number
        raise DatasetFormatError(f"ModelNet40: cannot parse {path}: expected {COLUMNS} comma-separated "
                                 f"numbers per row (x,y,z,nx,ny,nz): {exc}") from None
    if data.shape[1] != COLUMNS:
        raise DatasetFormatError(f"ModelNet40: {path} has {data.shape[1]} columns per row; expected {COLUMNS} "
                                 "(x,y,z,nx,ny,nz)")
    if data.shape[0] < num_points:
        raise DatasetFormatError(f"ModelNet40: {path} has {data.shape[0]} points; expected at least {num_points}")
    if not np.isfinite(data).all():
        rows = np.unique(np.nonzero(~np.isfinite(data))[0])
        raise DatasetFormatError(f"ModelNet40: {path} has NaN or infinite values in {len(rows)} row(s), "
                                 f"first at row {int(rows[0]) + 1}")
    return data


@DATASETS.register("modelnet40")
class ModelNet40(ModalityDataset):
    """Items: ``points`` float32 ``[num_points, 3]`` (``[.., 6]`` with normals), ``label``, ``index``."""

    demo_version: ClassVar[int] = 2

    def __init__(
        self,
        root: str | Path,
        split: str,
        num_points: int = 1024,
        use_normals: bool = False,
        val_ratio: float = 0.1,
        split_seed: int = 0,
        augment: bool = True,
    ) -> None:
        super().__init__(root, split)
        if num_points < 1:
            raise ConfigError(f"ModelNet40: num_points must be positive, got {num_points}")
        if not 0 <= val_ratio < 1:
            raise ConfigError(f"ModelNet40: val_ratio must be in [0, 1), got {val_ratio}")
        self.num_points = num_points
        self.use_normals = use_normals
        # Point-BERT's scale-and-translate augmentation, on training items only.
        self.augment = augment and split == "train"
        self.class_names = _read_lines(self.root / SHAPE_NAMES)
        if len(set(self.class_names)) != len(self.class_names):
            raise DatasetFormatError(f"ModelNet40: {self.root / SHAPE_NAMES} lists a class twice")
        label_of = {name: i for i, name in enumerate(self.class_names)}
        split_file = self.root / SPLIT_FILES["test" if split == "test" else "train"]
        names = _read_lines(split_file)
        samples = []
        for name in names:
            cls = name.rsplit("_", 1)[0]
            if cls not in label_of:
                raise DatasetFormatError(f"ModelNet40: shape {name!r} in {split_file} has class {cls!r}, "
                                         f"which is not in {SHAPE_NAMES}")
            path = path_inside(self.root, f"{cls}/{name}.txt", f"ModelNet40: {split_file}", "shape")
            samples.append((path, label_of[cls]))
        missing = [str(p) for p, _ in samples if not p.is_file()]
        if missing:
            raise DatasetFormatError(
                f"ModelNet40: {len(missing)} shape(s) listed in {SPLIT_FILES.get(split, SPLIT_FILES['train'])} "
                f"are missing on disk, e.g. {missing[:3]}; {LAYOUT}"
            )
        if split != "test":
            samples = self._carve(samples, split, val_ratio, split_seed)
        if not samples:
            raise DatasetFormatError(f"ModelNet40: the {split} split of {self.root} is empty")
        self.samples = samples

    @staticmethod
    def _carve(samples, split, val_ratio, seed):
        """Per class, a seeded permutation of the training shapes; the first ``val_ratio`` share is val."""
        rng = np.random.default_rng(seed)
        by_class: dict[int, list[int]] = {}
        for i, (_, label) in enumerate(samples):
            by_class.setdefault(label, []).append(i)
        val = set()
        for label in sorted(by_class):
            idx = by_class[label]
            n_val = int(round(val_ratio * len(idx)))
            if val_ratio > 0 and len(idx) > 1:
                n_val = max(n_val, 1)
            val.update(idx[j] for j in rng.permutation(len(idx))[:n_val])
        keep = (lambda i: i in val) if split == "val" else (lambda i: i not in val)
        return [s for i, s in enumerate(samples) if keep(i)]

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> dict[str, Any]:
        path, label = self.samples[index]
        data = read_point_file(path, self.num_points)
        xyz = normalize_to_unit_sphere(data[:, :3].astype(np.float64))
        normals = data[:, 3:6].astype(np.float64)
        if self.augment:
            # torch's generator, so the training seed (and accelerate's RNG sync) governs it
            scale = torch.empty(3, dtype=torch.float64).uniform_(2 / 3, 3 / 2).numpy()
            shift = torch.empty(3, dtype=torch.float64).uniform_(-0.2, 0.2).numpy()
            xyz = xyz * scale + shift
            # Normals of a scaled surface transform with the inverse scale.
            normals = normals / scale
            normals /= np.maximum(np.linalg.norm(normals, axis=1, keepdims=True), 1e-12)
        points = np.concatenate([xyz, normals], axis=1) if self.use_normals else xyz
        return {
            "points": torch.from_numpy(points.astype(np.float32)),
            "label": torch.tensor(label, dtype=torch.long),
            "index": torch.tensor(index, dtype=torch.long),
        }

    def info(self) -> dict[str, Any]:
        return {
            "num_classes": len(self.class_names),
            "class_names": list(self.class_names),
            "num_points": self.num_points,
            "point_channels": 6 if self.use_normals else 3,
        }

    # -- demo ----------------------------------------------------------------------------------------
    @classmethod
    def write_demo(cls, root: str | Path, seed: int = 0, *, train_per_class: int = 28, test_per_class: int = 8,
                   points_per_shape: int = 1100) -> None:
        """Five procedurally sampled solids (sphere, cube, cylinder, cone, torus) with outward normals,
        random anisotropic scale (0.75-1.25 per axis), a random turn about the vertical axis (the
        release's models are upright) and position noise, written
        in the release's layout and naming. The classes differ only in shape."""
        root = Path(root)
        rng = np.random.default_rng(seed)
        classes = list(_SOLIDS)
        _atomic_text(root / SHAPE_NAMES, "\n".join(classes) + "\n")
        lists: dict[str, list[str]] = {"train": [], "test": []}
        for cls_name in classes:
            (root / cls_name).mkdir(parents=True, exist_ok=True)
            for i in range(train_per_class + test_per_class):
                name = f"{cls_name}_{i + 1:04d}"
                lists["train" if i < train_per_class else "test"].append(name)
                xyz, nrm = _SOLIDS[cls_name](rng, points_per_shape)
                xyz, nrm = _random_pose(rng, xyz, nrm)
                rows = np.concatenate([xyz, nrm], axis=1)
                text = "\n".join(",".join(f"{v:.6f}" for v in row) for row in rows) + "\n"
                _atomic_text(root / cls_name / f"{name}.txt", text)
        for split, file in SPLIT_FILES.items():
            _atomic_text(root / file, "\n".join(lists[split]) + "\n")


def _atomic_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _unit(v: np.ndarray) -> np.ndarray:
    return v / np.maximum(np.linalg.norm(v, axis=1, keepdims=True), 1e-12)


def _sphere(rng, n):
    p = _unit(rng.normal(size=(n, 3)))
    return p, p.copy()


def _cube(rng, n):
    axis = rng.integers(0, 3, n)
    sign = rng.choice([-1.0, 1.0], n)
    p = rng.uniform(-1, 1, (n, 3))
    p[np.arange(n), axis] = sign
    nrm = np.zeros((n, 3))
    nrm[np.arange(n), axis] = sign
    return p, nrm


def _cylinder(rng, n):
    # Radius 1, height 2: side area 4*pi, each cap pi -> 2/3 of the points on the side.
    side = rng.random(n) < 2 / 3
    theta = rng.uniform(0, 2 * np.pi, n)
    r = np.where(side, 1.0, np.sqrt(rng.random(n)))
    z = np.where(side, rng.uniform(-1, 1, n), rng.choice([-1.0, 1.0], n))
    p = np.stack([r * np.cos(theta), r * np.sin(theta), z], axis=1)
    nrm = np.where(side[:, None], np.stack([np.cos(theta), np.sin(theta), np.zeros(n)], 1),
                   np.stack([np.zeros(n), np.zeros(n), np.sign(z)], 1))
    return p, nrm


def _cone(rng, n):
    # Base radius 1 at z=-1, apex at z=1: lateral area pi*sqrt(5), base pi.
    lateral = rng.random(n) < np.sqrt(5) / (np.sqrt(5) + 1)
    theta = rng.uniform(0, 2 * np.pi, n)
    t = np.sqrt(rng.random(n))  # area-uniform along the slant: radius fraction
    r = np.where(lateral, t, np.sqrt(rng.random(n)))
    z = np.where(lateral, 1 - 2 * t, -1.0)
    p = np.stack([r * np.cos(theta), r * np.sin(theta), z], axis=1)
    side_n = _unit(np.stack([2 * np.cos(theta), 2 * np.sin(theta), np.ones(n)], 1))
    nrm = np.where(lateral[:, None], side_n, np.stack([np.zeros(n), np.zeros(n), -np.ones(n)], 1))
    return p, nrm


def _torus(rng, n, major=0.8, minor=0.3):
    u = rng.uniform(0, 2 * np.pi, 4 * n)
    v = rng.uniform(0, 2 * np.pi, 4 * n)
    keep = rng.random(4 * n) < (major + minor * np.cos(v)) / (major + minor)  # area-uniform rejection
    u, v = u[keep][:n], v[keep][:n]
    p = np.stack([(major + minor * np.cos(v)) * np.cos(u), (major + minor * np.cos(v)) * np.sin(u),
                  minor * np.sin(v)], axis=1)
    nrm = np.stack([np.cos(v) * np.cos(u), np.cos(v) * np.sin(u), np.sin(v)], axis=1)
    return p, nrm


_SOLIDS = {"sphere": _sphere, "cube": _cube, "cylinder": _cylinder, "cone": _cone, "torus": _torus}


def _random_pose(rng, xyz, nrm):
    # Upright like ModelNet's aligned models: a random turn about the vertical (z) axis only.
    a = rng.uniform(0, 2 * np.pi)
    rot = np.array([[np.cos(a), -np.sin(a), 0.0], [np.sin(a), np.cos(a), 0.0], [0.0, 0.0, 1.0]])
    linear = rot @ np.diag(rng.uniform(0.75, 1.25, 3))
    xyz = xyz @ linear.T + rng.normal(scale=0.01, size=xyz.shape)
    nrm = _unit(nrm @ np.linalg.inv(linear))  # normals transform with the inverse transpose
    return xyz, nrm
