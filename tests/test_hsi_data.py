"""Pavia University reader and its demo generator: format, splits, scaling, errors, learnability."""
from __future__ import annotations

import math
import os
import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest
import scipy.io
import scipy.optimize
import torch

from allspark.data.base import DatasetFormatError
from allspark.data.pavia import PAVIA_CLASS_NAMES, PaviaUniversity, _load_scene
from allspark.registry import DATASETS

SPLITS = ("train", "val", "test")


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("pavia")
    PaviaUniversity.write_demo(root, seed=0)
    return root


def _raw(root: Path) -> tuple[np.ndarray, np.ndarray]:
    return scipy.io.loadmat(root / "PaviaU.mat")["paviaU"], scipy.io.loadmat(root / "PaviaU_gt.mat")["paviaU_gt"]


def _copy(demo: Path, dst: Path) -> Path:
    dst.mkdir(parents=True, exist_ok=True)
    for name in ("PaviaU.mat", "PaviaU_gt.mat"):
        shutil.copy(demo / name, dst / name)
    return dst


def _flat(ds: PaviaUniversity) -> set[int]:
    h, w = ds.info()["height"], ds.info()["width"]
    return set((ds.coords[:, 0] * w + ds.coords[:, 1]).tolist())


def _half_up(x: float) -> int:
    return int(math.floor(x + 0.5))


# -- demo format and round trip --------------------------------------------------------------------

def test_demo_files_are_in_the_official_format(demo):
    cube, gt = _raw(demo)
    assert cube.shape == (40, 40, 103) and cube.dtype == np.uint16
    assert gt.shape == (40, 40) and gt.dtype == np.uint8
    assert set(np.unique(gt)) == set(range(10))  # 0 unlabelled + 9 classes
    counts = np.bincount(gt.ravel(), minlength=10)[1:]
    assert counts.min() >= 20, counts
    assert 0.15 < (gt == 0).mean() < 0.6
    assert not [p for p in os.listdir(demo) if p.endswith(".tmp")]  # atomic write leaves no temp files


def test_demo_is_deterministic_per_seed(demo, tmp_path):
    PaviaUniversity.write_demo(tmp_path / "same", seed=0)
    PaviaUniversity.write_demo(tmp_path / "other", seed=1)
    cube, gt = _raw(demo)
    cube_same, gt_same = _raw(tmp_path / "same")
    cube_other, _ = _raw(tmp_path / "other")
    assert np.array_equal(cube, cube_same) and np.array_equal(gt, gt_same)
    assert not np.array_equal(cube, cube_other)


def test_items_shapes_dtypes_and_info(demo):
    assert DATASETS.get("pavia_university") is PaviaUniversity
    ds = PaviaUniversity(demo, "train", bands=103)
    item = ds[0]
    assert item["spectrum"].shape == (103,) and item["spectrum"].dtype == torch.float32
    assert item["label"].dtype == torch.int64 and 0 <= int(item["label"]) < 9
    assert item["coords"].shape == (2,) and item["coords"].dtype == torch.int64
    assert item["index"].dtype == torch.int64 and int(item["index"]) == 0
    info = ds.info()
    assert info["num_bands"] == 103 and info["num_classes"] == 9
    assert info["class_names"] == list(PAVIA_CLASS_NAMES)
    assert (info["height"], info["width"]) == (40, 40)
    assert info["split_sizes"]["scene"] == 1600
    assert info["split_sizes"]["train"] == len(ds)
    batch = ds.collate([ds[i] for i in range(4)])
    assert batch["spectrum"].shape == (4, 103)
    # label is gt - 1 at the item's coordinates
    _, gt = _raw(demo)
    r, c = item["coords"].tolist()
    assert int(item["label"]) == int(gt[r, c]) - 1


def test_paper_split_sizes_per_class_are_exact(demo):
    _, gt = _raw(demo)
    sets = {s: PaviaUniversity(demo, s) for s in SPLITS}
    for k in range(1, 10):
        n = int((gt == k).sum())
        n_pool = _half_up(0.4 * n)  # round half up, per class
        n_val = max(1, _half_up(0.1 * n_pool))
        got = {s: int((ds.labels == k - 1).sum()) for s, ds in sets.items()}
        assert got == {"train": n_pool - n_val, "val": n_val, "test": n - n_pool}, (k, n, got)


def test_splits_are_disjoint_and_cover_every_labelled_pixel(demo):
    _, gt = _raw(demo)
    parts = {s: _flat(PaviaUniversity(demo, s)) for s in SPLITS}
    assert not parts["train"] & parts["val"]
    assert not parts["train"] & parts["test"]
    assert not parts["val"] & parts["test"]
    assert parts["train"] | parts["val"] | parts["test"] == set(np.flatnonzero(gt.ravel() > 0).tolist())


def test_split_is_deterministic_and_depends_on_the_seed(demo):
    a = PaviaUniversity(demo, "train", split_seed=0)
    b = PaviaUniversity(demo, "train", split_seed=0)
    c = PaviaUniversity(demo, "train", split_seed=1)
    assert torch.equal(a.coords, b.coords) and torch.equal(a.spectra, b.spectra)
    assert _flat(a) != _flat(c)


def test_scene_split_holds_every_pixel(demo):
    _, gt = _raw(demo)
    scene = PaviaUniversity(demo, "scene")
    assert len(scene) == 1600
    assert torch.equal(scene.coords[41], torch.tensor([1, 1]))  # row-major
    assert torch.equal(scene.labels.reshape(40, 40), torch.from_numpy(gt.astype(np.int64)) - 1)
    assert int((scene.labels == -1).sum()) == int((gt == 0).sum())


def test_normalisation_uses_training_pixels_only(demo):
    cube, _ = _raw(demo)
    train, test = PaviaUniversity(demo, "train"), PaviaUniversity(demo, "test")
    x = train.spectra.double()
    assert torch.allclose(x.mean(0), torch.zeros(103, dtype=torch.float64), atol=1e-4)
    assert torch.allclose(x.std(0, unbiased=False), torch.ones(103, dtype=torch.float64), atol=1e-4)
    raw_train = cube[train.coords[:, 0].numpy(), train.coords[:, 1].numpy()].astype(np.float64)
    np.testing.assert_allclose(train.band_mean, raw_train.mean(0))
    y = test.spectra.double()
    assert y.mean(0).abs().max() > 1e-3  # test pixels are scaled with train statistics, not their own
    assert np.array_equal(test.band_mean, train.band_mean)


def test_files_are_read_once_per_process(demo):
    PaviaUniversity(demo, "train")
    hits = _load_scene.cache_info().hits
    PaviaUniversity(demo, "test")
    assert _load_scene.cache_info().hits == hits + 1


# -- other layouts ---------------------------------------------------------------------------------

def test_user_split_file(demo, tmp_path):
    root = _copy(demo, tmp_path / "d")
    _, gt = _raw(demo)
    rng = np.random.default_rng(3)
    to_train = (gt > 0) & (rng.random(gt.shape) < 0.5)
    tr = np.where(to_train, gt, 0).astype(np.uint8)
    te = np.where((gt > 0) & ~to_train, gt, 0).astype(np.uint8)
    scipy.io.savemat(root / "split.mat", {"TR": tr, "TE": te})
    parts = {s: PaviaUniversity(root, s, split_file="split.mat") for s in SPLITS}
    assert _flat(parts["test"]) == set(np.flatnonzero(te.ravel()).tolist())
    assert _flat(parts["train"]) | _flat(parts["val"]) == set(np.flatnonzero(tr.ravel()).tolist())
    assert not _flat(parts["train"]) & _flat(parts["val"])
    assert len(parts["val"]) >= 9  # at least one per class
    assert parts["train"].info()["num_classes"] == 9
    # other variable names
    scipy.io.savemat(root / "split2.mat", {"train_map": tr, "test_map": te})
    ds = PaviaUniversity(root, "test", split_file=root / "split2.mat", split_keys=("train_map", "test_map"))
    assert len(ds) == int((te > 0).sum())
    with pytest.raises(DatasetFormatError, match="no variable 'TR'"):
        PaviaUniversity(root, "test", split_file="split2.mat")
    with pytest.raises(DatasetFormatError, match="split_file .*nope.mat.* is missing"):
        PaviaUniversity(root, "test", split_file="nope.mat")
    scipy.io.savemat(root / "bad.mat", {"TR": tr, "TE": tr})
    with pytest.raises(DatasetFormatError, match="labelled in both"):
        PaviaUniversity(root, "test", split_file="bad.mat")
    scipy.io.savemat(root / "small.mat", {"TR": tr[:20], "TE": te[:20]})
    with pytest.raises(DatasetFormatError, match="scene's size"):
        PaviaUniversity(root, "test", split_file="small.mat")


def _write_v73(path: Path, name: str, array: np.ndarray, matlab_class: str) -> None:
    """A MATLAB v7.3 file as MATLAB writes it: HDF5 with a 512-byte text header, arrays column-major."""
    with h5py.File(path, "w", userblock_size=512) as f:
        ds = f.create_dataset(name, data=np.ascontiguousarray(array.T))
        ds.attrs["MATLAB_class"] = np.bytes_(matlab_class)
    header = b"MATLAB 7.3 MAT-file, Platform: GLNXA64, Created on: Mon Jan  1 00:00:00 2024 HDF5 schema 1.00 ."
    with open(path, "r+b") as f:
        f.write(header.ljust(116) + b"\x00" * 8 + b"\x00\x02IM")


def test_matlab_v73_hdf5_files(demo, tmp_path):
    cube, gt = _raw(demo)
    root = tmp_path / "v73"
    root.mkdir()
    _write_v73(root / "PaviaU.mat", "paviaU", cube, "uint16")
    _write_v73(root / "PaviaU_gt.mat", "paviaU_gt", gt, "uint8")
    assert h5py.is_hdf5(root / "PaviaU.mat")
    a, b = PaviaUniversity(root, "scene"), PaviaUniversity(demo, "scene")
    assert torch.equal(a.spectra, b.spectra) and torch.equal(a.labels, b.labels)


def test_renamed_variables_fall_back_to_the_single_array(demo, tmp_path):
    cube, gt = _raw(demo)
    root = tmp_path / "renamed"
    root.mkdir()
    scipy.io.savemat(root / "PaviaU.mat", {"data": cube})
    scipy.io.savemat(root / "PaviaU_gt.mat", {"labels": gt})
    assert len(PaviaUniversity(root, "scene")) == 1600
    assert len(PaviaUniversity(root, "scene", cube_key="data", gt_key="labels")) == 1600
    with pytest.raises(DatasetFormatError, match="no variable 'cube'"):
        PaviaUniversity(root, "scene", cube_key="cube")


def test_other_class_count_gets_generic_names(demo, tmp_path):
    root = _copy(demo, tmp_path / "k")
    _, gt = _raw(demo)
    scipy.io.savemat(root / "PaviaU_gt.mat", {"paviaU_gt": np.where(gt > 7, 0, gt).astype(np.uint8)})
    info = PaviaUniversity(root, "train").info()
    assert info["num_classes"] == 7
    assert info["class_names"] == [f"class_{k}" for k in range(1, 8)]
    names = list("abcdefg")
    assert PaviaUniversity(root, "train", class_names=names).info()["class_names"] == names


# -- errors ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("missing", ["PaviaU.mat", "PaviaU_gt.mat"])
def test_missing_file_names_the_layout(demo, tmp_path, missing):
    root = _copy(demo, tmp_path / "m")
    (root / missing).unlink()
    with pytest.raises(DatasetFormatError, match=missing.replace(".", r"\.")) as e:
        PaviaUniversity(root, "train")
    assert "expected layout" in str(e.value) and "paviaU" in str(e.value)


def test_corrupt_file(demo, tmp_path):
    root = _copy(demo, tmp_path / "c")
    (root / "PaviaU.mat").write_bytes(b"not a mat file" * 50)
    with pytest.raises(DatasetFormatError, match=r"PaviaU\.mat.*not a readable MATLAB"):
        PaviaUniversity(root, "train")
    data = (demo / "PaviaU.mat").read_bytes()
    (root / "PaviaU.mat").write_bytes(data[: len(data) // 2])
    with pytest.raises(DatasetFormatError, match=r"PaviaU\.mat"):
        PaviaUniversity(root, "train")


def test_cube_must_be_3d(demo, tmp_path):
    root = _copy(demo, tmp_path / "r")
    scipy.io.savemat(root / "PaviaU.mat", {"paviaU": np.ones((40, 40), np.uint16)})
    with pytest.raises(DatasetFormatError, match=r"must be 3-D.*got shape \[40, 40\]"):
        PaviaUniversity(root, "train")


def test_gt_size_must_match_the_cube(demo, tmp_path):
    root = _copy(demo, tmp_path / "g")
    _, gt = _raw(demo)
    scipy.io.savemat(root / "PaviaU_gt.mat", {"paviaU_gt": gt[:30]})
    with pytest.raises(DatasetFormatError, match=r"30 x 40 but the cube .* is 40 x 40"):
        PaviaUniversity(root, "train")


def test_band_count_must_match_the_config(demo, tmp_path):
    root = _copy(demo, tmp_path / "b")
    cube, _ = _raw(demo)
    scipy.io.savemat(root / "PaviaU.mat", {"paviaU": cube[:, :, :64]})
    with pytest.raises(DatasetFormatError, match=r"has 64 bands; the config expects 103 \(data\.args\.bands\)"):
        PaviaUniversity(root, "train", bands=103)
    assert PaviaUniversity(root, "train", bands=64).info()["num_bands"] == 64


def test_non_finite_cube_values_are_counted(demo, tmp_path):
    root = _copy(demo, tmp_path / "n")
    cube = _raw(demo)[0].astype(np.float32)
    cube[0, 0, :3] = np.nan
    cube[5, 5, 0] = np.inf
    scipy.io.savemat(root / "PaviaU.mat", {"paviaU": cube})
    with pytest.raises(DatasetFormatError, match="4 value"):
        PaviaUniversity(root, "train")


def test_class_with_too_few_pixels(demo, tmp_path):
    root = _copy(demo, tmp_path / "f")
    _, gt = _raw(demo)
    gt = gt.copy()
    rows, cols = np.nonzero(gt == 3)
    gt[rows[1:], cols[1:]] = 0  # class 3 keeps a single pixel
    scipy.io.savemat(root / "PaviaU_gt.mat", {"paviaU_gt": gt})
    with pytest.raises(DatasetFormatError, match="class 3 has 1 labelled pixel"):
        PaviaUniversity(root, "train")


def test_bad_arguments(demo):
    with pytest.raises(ValueError, match="unknown split"):
        PaviaUniversity(demo, "validation")
    with pytest.raises(ValueError, match="train_ratio"):
        PaviaUniversity(demo, "train", train_ratio=1.0)


# -- learnable, not trivially separable -------------------------------------------------------------

def test_demo_is_learnable_but_not_trivial(demo):
    """A linear probe (multinomial logistic regression) on the spectra beats chance (1/9) by far but is
    not perfect: similar materials, mixing, illumination and noise keep the task honest."""
    train, test = PaviaUniversity(demo, "train"), PaviaUniversity(demo, "test")
    acc = _linear_probe_accuracy(train, test)
    assert 0.5 < acc < 0.99, acc


def _linear_probe_accuracy(train: PaviaUniversity, test: PaviaUniversity, l2: float = 1e-3) -> float:
    """Softmax regression fitted with scipy's L-BFGS (numpy only: fast, deterministic, no optimiser set-up)."""
    x, y = train.spectra.double().numpy(), train.labels.numpy()
    n, c = x.shape
    k = int(train.info()["num_classes"])
    onehot = np.eye(k)[y]

    def loss_and_grad(theta: np.ndarray) -> tuple[float, np.ndarray]:
        w, b = theta[: c * k].reshape(c, k), theta[c * k:]
        z = x @ w + b
        z -= z.max(1, keepdims=True)
        p = np.exp(z)
        p /= p.sum(1, keepdims=True)
        loss = -np.log(p[np.arange(n), y] + 1e-12).mean() + l2 * (w**2).sum()
        g = (p - onehot) / n
        return loss, np.concatenate([(x.T @ g + 2 * l2 * w).ravel(), g.sum(0)])

    res = scipy.optimize.minimize(loss_and_grad, np.zeros(c * k + k), jac=True, method="L-BFGS-B",
                                  options={"maxiter": 500})
    w, b = res.x[: c * k].reshape(c, k), res.x[c * k:]
    pred = (test.spectra.double().numpy() @ w + b).argmax(1)
    return float((pred == test.labels.numpy()).mean())
