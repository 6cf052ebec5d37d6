"""Bad input to every dataset reader gives one clear user error: the table of bad-input cases.

Each row of ``CASES`` writes a small valid dataset under a temporary folder with a ``good_*`` builder, breaks
one thing in it, builds the reader the way :func:`allspark.data.build_dataset` does (and reads an item, for
the errors a reader can only find when it decodes a file), and checks that

(a) the exception is one the command line reports as a one-line user error with exit status 2
    (:func:`allspark.cli.is_user_error`), and
(b) the message names the file (or folder) and says what was expected or found (two patterns per case).

``test_good_data_loads`` builds every unbroken dataset, so each error comes from the one thing a case broke.
``scripts/error_table.py`` runs the same table and writes ``docs/errors.md`` from it.
"""
from __future__ import annotations

import gzip
import json
import os
import pickle
import re
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable

import numpy as np
import pytest

from allspark.cli import _one_line, is_user_error
from allspark.data import build_dataset

Args = dict[str, Any]


# -- tiny file writers ------------------------------------------------------------------------------------------

def _png(path: Path, shape=(8, 8, 3), seed: int = 0, fmt: str = "PNG") -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    arr = np.random.default_rng(seed).integers(0, 255, shape, dtype=np.uint8)
    Image.fromarray(arr).save(path, format=fmt)


def _text(path: Path, text: str | bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text, encoding="utf-8")


def _garbage(path: Path) -> None:
    _text(path, b"\x00\x01 this is not an image or video \xff\xfe")


def _tif(path: Path, array: np.ndarray) -> None:
    import tifffile

    path.parent.mkdir(parents=True, exist_ok=True)
    tifffile.imwrite(str(path), array, photometric="minisblack",
                     planarconfig="contig" if array.ndim == 3 else None)


def _mat(path: Path, **arrays: np.ndarray) -> None:
    import scipy.io

    path.parent.mkdir(parents=True, exist_ok=True)
    scipy.io.savemat(str(path), arrays)


# -- rgb: NWPU-RESISC45 (folder per class) ---------------------------------------------------------------------

def good_rgb(root: Path) -> Args:
    for k, cls in enumerate(("alpha", "beta")):
        for j in range(4):
            _png(root / cls / f"img_{j}.png", seed=10 * k + j)
    return {"image_size": 8, "train_ratio": 0.5, "val_ratio": 0.0}


def _rgb_corrupt(root: Path) -> Args:
    args = good_rgb(root)
    for p in (root / "alpha").glob("*.png"):
        _garbage(p)
    return args


def _rgb_one_image(root: Path) -> Args:
    args = good_rgb(root)
    for j in range(1, 4):
        (root / "beta" / f"img_{j}.png").unlink()
    return args


def _rgb_empty_class(root: Path) -> Args:
    args = good_rgb(root)
    _text(root / "gamma" / "readme.txt", "no images here")
    return args


def _rgb_empty_root(root: Path) -> Args:
    return {"image_size": 8}


# -- msi: EuroSAT (13-band GeoTIFFs) ---------------------------------------------------------------------------

def good_msi(root: Path, size: int = 8, bands: int = 13, dtype=np.uint16, broken: str | None = None) -> Args:
    rng = np.random.default_rng(0)
    for cls in ("A", "B"):
        for j in range(1, 4):
            s, b = (size, bands) if cls == "B" else (8, 13)
            arr = rng.integers(500, 3000, (s, s, b)).astype(dtype if cls == "B" else np.uint16)
            if cls == "B" and broken == "nan":
                arr[2, 3, 4] = np.nan
            _tif(root / cls / f"{cls}_{j}.tif", arr)
    return {"image_size": 8, "train_ratio": 0.5, "val_ratio": 0.0}


def _msi_corrupt(root: Path) -> Args:
    args = good_msi(root)
    for p in (root / "B").glob("*.tif"):
        _text(p, b"II*\x00garbage")
    return args


# -- hsi: Pavia University (.mat) ------------------------------------------------------------------------------

def _pavia_arrays() -> tuple[np.ndarray, np.ndarray]:
    cube = np.random.default_rng(0).uniform(100, 2000, (6, 6, 4)).astype(np.float32)
    gt = np.zeros((6, 6), np.uint8)
    gt[:2, :] = 1
    gt[4:, :] = 2
    return cube, gt


def good_hsi(root: Path, cube: np.ndarray | None = None, gt: np.ndarray | None = None) -> Args:
    c, g = _pavia_arrays()
    _mat(root / "PaviaU.mat", paviaU=c if cube is None else cube)
    _mat(root / "PaviaU_gt.mat", paviaU_gt=g if gt is None else gt)
    return {"train_ratio": 0.5, "val_ratio": 0.0}


def _hsi_nan(root: Path) -> Args:
    cube, _ = _pavia_arrays()
    cube[1, 2, 3] = np.nan
    cube[4, 4, 0] = np.inf
    return good_hsi(root, cube=cube)


def _hsi_gt_shape(root: Path) -> Args:
    return good_hsi(root, gt=_pavia_arrays()[1][:5])


def _hsi_fractional(root: Path) -> Args:
    gt = _pavia_arrays()[1].astype(np.float64)
    gt[0, 0] = 1.5
    return good_hsi(root, gt=gt)


def _hsi_single_pixel_class(root: Path) -> Args:
    gt = _pavia_arrays()[1]
    gt[3, 3] = 3
    return good_hsi(root, gt=gt)


def _hsi_ambiguous_variable(root: Path) -> Args:
    args = good_hsi(root)
    cube, _ = _pavia_arrays()
    _mat(root / "PaviaU.mat", radiance=cube, reflectance=cube)
    return args


def _hsi_missing_gt(root: Path) -> Args:
    args = good_hsi(root)
    (root / "PaviaU_gt.mat").unlink()
    return args


def _hsi_corrupt(root: Path) -> Args:
    args = good_hsi(root)
    _text(root / "PaviaU.mat", b"MATLAB 5.0 MAT-file, truncated" + b"\x00" * 40)
    return args


# -- sar: MSTAR (chips under depression-angle folders) ---------------------------------------------------------

def good_sar(root: Path) -> Args:
    for angle in ("17_DEG", "15_DEG"):
        for k, t in enumerate(("T1", "T2")):
            for j in range(3):
                _png(root / angle / t / f"c{j}.png", shape=(8, 8), seed=100 * k + j)
    return {"crop_size": 4, "val_ratio": 0.0}


def _sar_test_targets(root: Path) -> Args:
    args = good_sar(root)
    for p in (root / "15_DEG" / "T2").iterdir():
        p.unlink()
    (root / "15_DEG" / "T2").rmdir()
    return args


def _sar_corrupt(root: Path) -> Args:
    args = good_sar(root)
    for p in (root / "17_DEG" / "T1").glob("*.png"):
        _garbage(p)
    return args


def _sar_no_test_dir(root: Path) -> Args:
    args = good_sar(root)
    import shutil

    shutil.rmtree(root / "15_DEG")
    return args


# -- table: PRSA (station CSVs) ---------------------------------------------------------------------------------

PRSA_FILE = "PRSA_Data_Aotizhongxin_20130301-20170228.csv"


def good_table(root: Path, mutate: Callable[[Any], None] | None = None) -> Args:
    import pandas as pd

    from allspark.data.prsa import CONTINUOUS, WIND_DIRECTIONS

    n = 30
    rng = np.random.default_rng(0)
    df = pd.DataFrame({"No": np.arange(1, n + 1), "year": 2013, "month": 3, "day": 1 + np.arange(n) // 24,
                       "hour": np.arange(n) % 24})
    df["PM2.5"] = rng.uniform(10, 200, n).round(1)
    df["PM10"] = (df["PM2.5"] * 1.3).round(1)
    for c in CONTINUOUS:
        df[c] = rng.uniform(1, 50, n).round(1)
    df["wd"] = np.array(WIND_DIRECTIONS, dtype=object)[rng.integers(0, 16, n)]
    df["station"] = "Aotizhongxin"
    df = df[["No", "year", "month", "day", "hour", "PM2.5", "PM10", "SO2", "NO2", "CO", "O3", "TEMP", "PRES",
             "DEWP", "RAIN", "wd", "WSPM", "station"]].astype(object)
    if mutate is not None:
        mutate(df)
    root.mkdir(parents=True, exist_ok=True)
    df.to_csv(root / PRSA_FILE, index=False, na_rep="NA")
    return {}


def _table(mutate: Callable[[Any], None]) -> Callable[[Path], Args]:
    return lambda root: good_table(root, mutate)


def _set(col: str, row: int, value: Any) -> Callable[[Any], None]:
    def mutate(df) -> None:
        df.loc[row, col] = value

    return mutate


# -- trajectory: ETH-UCY (Social-GAN layout) --------------------------------------------------------------------

TRAJ_FILE = "crowds_zara01_train.txt"


def _traj_lines() -> list[str]:
    return [f"{10 * t:.1f}\t{ped:.1f}\t{0.5 * t + ped:.2f}\t{0.1 * t:.2f}" for t in range(24) for ped in (1, 2)]


def good_trajectory(root: Path, lines: list[str | bytes] | None = None) -> Args:
    lines = _traj_lines() if lines is None else lines
    data = b"\n".join(x if isinstance(x, bytes) else x.encode() for x in lines) + b"\n"
    _text(root / "eth" / "train" / TRAJ_FILE, data)
    return {"test_scene": "eth"}


def _traj(edit: Callable[[list], None]) -> Callable[[Path], Args]:
    def build(root: Path) -> Args:
        lines: list = _traj_lines()
        edit(lines)
        return good_trajectory(root, lines)

    return build


def _line(n: int, value: str | bytes) -> Callable[[list], None]:
    def edit(lines: list) -> None:
        lines[n - 1] = value

    return edit


# -- graph: METR-LA (DCRNN layout) -------------------------------------------------------------------------------

def good_graph(root: Path, columns=("7", "8", "9"), adj_ids=("7", "8", "9"), adj: np.ndarray | None = None,
               times: np.ndarray | None = None) -> Args:
    from allspark.data.metr_la import write_sensor_h5

    steps = 60
    if times is None:
        times = np.datetime64("2012-03-05T00:00:00") + np.arange(steps) * np.timedelta64(300, "s")
    values = np.random.default_rng(0).uniform(20, 70, (steps, len(columns))).astype(np.float32)
    root.mkdir(parents=True, exist_ok=True)
    if len(set(columns)) == len(columns):
        write_sensor_h5(root / "metr-la.h5", times, list(columns), values)
    else:  # pandas' fixed format refuses duplicate columns; its table format stores them
        import pandas as pd

        pd.DataFrame(values, index=pd.DatetimeIndex(times), columns=list(columns)).to_hdf(
            root / "metr-la.h5", key="df", format="table")
    adj = np.eye(len(adj_ids), dtype=np.float32) if adj is None else adj
    _text(root / "sensor_graph" / "adj_mx.pkl",
          pickle.dumps((list(adj_ids), {s: i for i, s in enumerate(adj_ids)}, adj), protocol=2))
    return {"input_len": 4, "output_len": 4}


class _Exploit:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def _graph_unsafe_pickle(root: Path) -> Args:
    args = good_graph(root)
    _text(root / "sensor_graph" / "adj_mx.pkl", pickle.dumps((["7", "8", "9"], {}, _Exploit()), protocol=2))
    return args


def _graph_repeated_time(root: Path) -> Args:
    times = np.datetime64("2012-03-05T00:00:00") + np.arange(60) * np.timedelta64(300, "s")
    times[10] = times[9]
    return good_graph(root, times=times)


def _graph_adj_nan(root: Path) -> Args:
    adj = np.eye(3, dtype=np.float32)
    adj[0, 1] = np.nan
    return good_graph(root, adj=adj)


def _graph_not_h5(root: Path) -> Args:
    args = good_graph(root)
    _text(root / "metr-la.h5", "timestamp,7,8,9\n2012-03-05 00:00,60,61,62\n")
    return args


# -- video: UCF101 (official lists) ------------------------------------------------------------------------------

UCF_TRAIN = ["A/v_A_g01_c01.avi 1", "B/v_B_g02_c01.avi 2", "A/v_A_g03_c01.avi 1"]


def good_video(root: Path, train: list[str] | None = None, class_ind: str = "1 A\n2 B\n",
               real: bool = True) -> Args:
    from allspark.data.ucf101 import _write_avi

    lists = root / "ucfTrainTestlist"
    _text(lists / "classInd.txt", class_ind)
    _text(lists / "trainlist01.txt", "\n".join(UCF_TRAIN if train is None else train) + "\n")
    _text(lists / "testlist01.txt", "B/v_B_g04_c01.avi\n")
    frames = np.random.default_rng(0).integers(0, 255, (8, 16, 16, 3), dtype=np.uint8)
    for rel in ("A/v_A_g01_c01.avi", "B/v_B_g02_c01.avi", "A/v_A_g03_c01.avi", "B/v_B_g04_c01.avi"):
        path = root / "UCF-101" / rel
        if real:
            _write_avi(path, frames)
        else:  # the error comes before any video is opened
            _text(path, b"not decoded")
    return {"num_frames": 4, "frame_stride": 1, "image_size": 16, "val_ratio": 0.0}


def _video_list(train: list[str]) -> Callable[[Path], Args]:
    return lambda root: good_video(root, train=train, real=False)


def _video_corrupt(root: Path) -> Args:
    args = good_video(root)
    _garbage(root / "UCF-101" / "A" / "v_A_g01_c01.avi")
    return args


def _video_missing(root: Path) -> Args:
    args = good_video(root, real=False)
    (root / "UCF-101" / "B" / "v_B_g02_c01.avi").unlink()
    return args


def _video_non_utf8(root: Path) -> Args:
    args = good_video(root, real=False)
    _text(root / "ucfTrainTestlist" / "trainlist01.txt", b"A/v_A_g01_c01.avi 1\nB/v_\xe9_g02_c01.avi 2\n")
    return args


# -- pointcloud: ModelNet40 (resampled layout) -------------------------------------------------------------------

def _points(n: int = 8, cols: int = 6, seed: int = 0) -> list[str]:
    rows = np.random.default_rng(seed).uniform(-1, 1, (n, cols))
    return [",".join(f"{v:.4f}" for v in r) for r in rows]


def good_pointcloud(root: Path, train: str = "box_0001\nbox_0002\nball_0001\nball_0002\n",
                    names: str = "box\nball\n") -> Args:
    _text(root / "modelnet40_shape_names.txt", names)
    _text(root / "modelnet40_train.txt", train)
    _text(root / "modelnet40_test.txt", "box_0003\nball_0003\n")
    for k, cls in enumerate(("box", "ball")):
        for j in range(1, 4):
            _text(root / cls / f"{cls}_{j:04d}.txt", "\n".join(_points(seed=10 * k + j)) + "\n")
    return {"num_points": 8, "val_ratio": 0.0, "augment": False}


def _pc_edit(edit: Callable[[list[str]], None]) -> Callable[[Path], Args]:
    def build(root: Path) -> Args:
        args = good_pointcloud(root)
        rows = _points()
        edit(rows)
        _text(root / "box" / "box_0001.txt", "\n".join(rows) + "\n")
        return args

    return build


def _pc_missing(root: Path) -> Args:
    args = good_pointcloud(root)
    (root / "ball" / "ball_0002.txt").unlink()
    return args


# -- infrared: SYSU-MM01 -------------------------------------------------------------------------------------------

def good_infrared(root: Path, train_ids: str = "1,2\n") -> Args:
    for cam in range(1, 7):
        for pid in (1, 2):
            for n in (1, 2):
                _png(root / f"cam{cam}" / f"{pid:04d}" / f"{n:04d}.jpg", shape=(8, 4, 3), seed=cam * 10 + pid,
                     fmt="JPEG")
    _text(root / "exp" / "train_id.txt", train_ids)
    _text(root / "exp" / "val_id.txt", "2\n")
    _text(root / "exp" / "test_id.txt", "1\n")
    return {"image_size": [8, 4]}


def _ir_ids(text: str) -> Callable[[Path], Args]:
    return lambda root: good_infrared(root, text)


def _ir_no_cam6(root: Path) -> Args:
    args = good_infrared(root)
    import shutil

    shutil.rmtree(root / "cam6")
    return args


def _ir_corrupt(root: Path) -> Args:
    args = good_infrared(root)
    _garbage(root / "cam1" / "0001" / "0001.jpg")
    return args


# -- oblique: WHU-OMVS -------------------------------------------------------------------------------------------

def good_oblique(root: Path, index: str = "scene_a\n", names: tuple[str, str] = ("1/v0", "1/v1"),
                 pairs: str = "2\n0\n1 1 100.0\n1\n1 0 100.0\n") -> Args:
    from allspark.data.whu_omvs import _atomic_exr, write_camera

    scene = root / "train" / "scene_a"
    k = np.array([[10.0, 0, 2], [0, 10.0, 2], [0, 0, 1]])
    for j, name in enumerate(("1/v0", "1/v1")):
        twc = np.eye(4)
        twc[:3, 3] = (j, 0.0, 20.0)
        _png(scene / "images" / f"{name}.png", shape=(4, 4, 3), seed=j)
        _png(scene / "masks" / f"{name}.png", shape=(4, 4), seed=j)
        _text(scene / "cams" / f"{name}.txt", write_camera(twc, k, 1.0, 40.0))
        (scene / "depths" / name).parent.mkdir(parents=True, exist_ok=True)
        _atomic_exr(scene / "depths" / f"{name}.exr", np.full((4, 4), 20.0, np.float32))
    _text(scene / "info" / "image_path.txt",
          "2\n" + "".join(f"{j} {n} images/{n}.png\n" for j, n in enumerate(names)))
    _text(scene / "info" / "viewpair.txt", pairs)
    _text(root / "train" / "index.txt", index)
    return {"num_views": 2}


def _obl_index(index: str) -> Callable[[Path], Args]:
    return lambda root: good_oblique(root, index=index)


def _obl_bad_camera(root: Path) -> Args:
    args = good_oblique(root)
    _text(root / "train" / "scene_a" / "cams" / "1" / "v1.txt", "extrinsic Twc\n1 0 0 0\n0 1 0 0\n")
    return args


# -- text: IMDB (aclImdb) ---------------------------------------------------------------------------------------

def good_text(root: Path) -> Args:
    for name, rating in (("neg", 2), ("pos", 9)):
        for j in range(3):
            _text(root / "aclImdb" / "train" / name / f"{j}_{rating}.txt", f"A {name} review number {j}.")
    return {"val_ratio": 0.0}


def _text_review(data: bytes) -> Callable[[Path], Args]:
    def build(root: Path) -> Args:
        args = good_text(root)
        _text(root / "aclImdb" / "train" / "neg" / "0_2.txt", data)
        return args

    return build


def _text_no_neg(root: Path) -> Args:
    args = good_text(root)
    import shutil

    shutil.rmtree(root / "aclImdb" / "train" / "neg")
    return args


def _text_empty_pos(root: Path) -> Args:
    args = good_text(root)
    for p in (root / "aclImdb" / "train" / "pos").iterdir():
        p.unlink()
    return args


# -- code: CodeSearchNet (jsonl.gz) -------------------------------------------------------------------------------

CSN_FILE = "python_train_0.jsonl.gz"


def _csn_lines() -> list[str | bytes]:
    return [json.dumps({"code": f"def f{j}(x):\n    return x + {j}\n", "docstring": f"Add {j} to x.",
                        "language": "python"}) for j in range(3)]


def good_code(root: Path, lines: list[str | bytes] | None = None, raw: bytes | None = None) -> Args:
    path = root / "python" / "final" / "jsonl" / "train" / CSN_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    if raw is not None:
        path.write_bytes(raw)
        return {}
    lines = _csn_lines() if lines is None else lines
    with gzip.open(path, "wb") as f:
        f.write(b"\n".join(x if isinstance(x, bytes) else x.encode() for x in lines) + b"\n")
    return {}


def _code(edit: Callable[[list], None]) -> Callable[[Path], Args]:
    def build(root: Path) -> Args:
        lines = _csn_lines()
        edit(lines)
        return good_code(root, lines)

    return build


# -- hsi+lidar: Houston 2018 (GeoTIFFs) ----------------------------------------------------------------------------

def _maps(shape=(16, 16)) -> tuple[np.ndarray, np.ndarray]:
    train = np.zeros(shape, np.uint8)
    test = np.zeros(shape, np.uint8)
    train[0, :4], train[8, :4] = 1, 2
    test[1, :4], test[9, :4] = 1, 2
    return train, test


def good_hsi_lidar(root: Path, lidar: dict[int, np.ndarray] | None = None, hsi_bands: int = 4,
                   train: np.ndarray | None = None) -> Args:
    from allspark.data.houston2018 import HSI_FILE, LIDAR_FILES, TEST_FILE, TRAIN_FILE

    rng = np.random.default_rng(0)
    _tif(root / HSI_FILE, rng.integers(100, 3000, (8, 8, hsi_bands)).astype(np.uint16))
    for i, f in enumerate(LIDAR_FILES):
        band = rng.uniform(5, 60, (16, 16)).astype(np.float32)
        _tif(root / f, (lidar or {}).get(i, band))
    tr, te = _maps()
    _tif(root / TRAIN_FILE, tr if train is None else train)
    _tif(root / TEST_FILE, te)
    return {"patch": 3, "val_ratio": 0.0}


def _lidar_nan(root: Path) -> Args:
    band = np.random.default_rng(1).uniform(5, 60, (16, 16)).astype(np.float32)
    band[3, 3] = band[5, 7] = np.nan
    return good_hsi_lidar(root, lidar={1: band})


def _lidar_sizes(root: Path) -> Args:
    return good_hsi_lidar(root, lidar={2: np.ones((16, 12), np.float32)})


def _houston_missing_train(root: Path) -> Args:
    from allspark.data.houston2018 import TRAIN_FILE

    args = good_hsi_lidar(root)
    (root / TRAIN_FILE).unlink()
    return args


def _houston_overlap(root: Path) -> Args:
    tr, _ = _maps()
    tr[1, 0] = 1  # a test pixel
    return good_hsi_lidar(root, train=tr)


# -- hsi+sar: Berlin (.mat) --------------------------------------------------------------------------------------

def good_hsi_sar(root: Path, sar: np.ndarray | None = None, train: np.ndarray | None = None,
                 test: np.ndarray | None = None) -> Args:
    rng = np.random.default_rng(0)
    tr, te = _maps()
    _mat(root / "data_HS_LR.mat", data_HS_LR=rng.uniform(0, 1, (8, 8, 5)).astype(np.float32))
    _mat(root / "data_SAR_HR.mat", data_SAR_HR=rng.uniform(0, 1, (16, 16, 2)) if sar is None else sar)
    _mat(root / "TrainImage.mat", TrainImage=tr if train is None else train)
    _mat(root / "TestImage.mat", TestImage=te if test is None else test)
    return {"patch": 3, "val_ratio": 0.0}


def _berlin_sar_nan(root: Path) -> Args:
    sar = np.random.default_rng(0).uniform(0, 1, (16, 16, 2))
    sar[2, 2, 1] = np.nan
    return good_hsi_sar(root, sar=sar)


def _berlin_negative(root: Path) -> Args:
    tr = _maps()[0].astype(np.int16)
    tr[15, 15] = -1
    return good_hsi_sar(root, train=tr)


def _berlin_test_only_class(root: Path) -> Args:
    te = _maps()[1]
    te[12, 12] = 3
    return good_hsi_sar(root, test=te)


# -- rgb-text: RSICD captions and LuoJiaHOG lines --------------------------------------------------------------------

def _rsicd_entries() -> list[dict[str, Any]]:
    return [{"filename": f, "split": s, "sentences": [{"raw": f"an aerial view number {j}."}]}
            for j, (f, s) in enumerate((("a.png", "train"), ("b.png", "val"), ("c.png", "test")))]


def good_retrieval(root: Path, edit: Callable[[list], None] | None = None, raw: bytes | None = None) -> Args:
    for j, f in enumerate(("a.png", "b.png", "c.png")):
        _png(root / "images" / f, seed=j)
    entries = _rsicd_entries()
    if edit is not None:
        edit(entries)
    _text(root / "dataset_rsicd.json", raw if raw is not None else json.dumps({"images": entries}))
    return {"image_size": 8}


def _rsicd(edit: Callable[[list], None]) -> Callable[[Path], Args]:
    return lambda root: good_retrieval(root, edit)


def _entry(key: str, value: Any, k: int = 0) -> Callable[[list], None]:
    def edit(entries: list) -> None:
        entries[k][key] = value

    return edit


def _rsicd_corrupt(root: Path) -> Args:
    args = good_retrieval(root)
    _garbage(root / "images" / "a.png")
    return args


def _lj_rows() -> list[str]:
    return [json.dumps({"image": f, "caption": f"a scene {j}", "second_level": ["water"], "third_level": ["river"],
                        "split": s}) for j, (f, s) in enumerate((("a.png", "train"), ("b.png", "val"),
                                                                  ("c.png", "test")))]


def good_luojiahog(root: Path, edit: Callable[[list], None] | None = None) -> Args:
    for j, f in enumerate(("a.png", "b.png", "c.png")):
        _png(root / "images" / f, seed=j)
    rows = _lj_rows()
    if edit is not None:
        edit(rows)
    _text(root / "annotations.jsonl", "\n".join(rows) + "\n")
    return {"image_size": 8}


def _lj(edit: Callable[[list], None]) -> Callable[[Path], Args]:
    return lambda root: good_luojiahog(root, edit)


def _lj_row(n: int, **fields: Any) -> Callable[[list], None]:
    def edit(rows: list) -> None:
        row = json.loads(rows[n - 1])
        for k, v in fields.items():
            if v is None:
                row.pop(k)
            else:
                row[k] = v
        rows[n - 1] = json.dumps(row)

    return edit


# -- the table -------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Case:
    """One bad input: ``build`` writes it under the data root and returns ``data.args``; the message must
    match ``file`` (the file or folder it names) and ``expect`` (what was expected / found), both regexes."""

    id: str
    modality: str
    dataset: str
    description: str
    build: Callable[[Path], Args]
    file: str
    expect: str
    split: str = "train"
    item: int | None = None  # read this item: an error found when a file is decoded


C = Case
CASES: list[Case] = [
    # rgb
    C("rgb-corrupt-image", "rgb", "nwpu_resisc45", "an image file that is not an image (found when its item is read)",
      _rgb_corrupt, r"alpha/img_\d\.png", r"cannot decode image", item=0),
    C("rgb-class-too-small", "rgb", "nwpu_resisc45", "a class folder with a single image (cannot be split)",
      _rgb_one_image, r"nwpu_resisc45/beta", r"has 1 item\(s\); expected at least 2"),
    C("rgb-class-without-images", "rgb", "nwpu_resisc45", "a class folder holding no image file",
      _rgb_empty_class, r"nwpu_resisc45/gamma", r"holds no image file"),
    C("rgb-num-classes", "rgb", "nwpu_resisc45", "fewer class folders than data.args.num_classes",
      lambda r: {**good_rgb(r), "num_classes": 45}, r"nwpu_resisc45", r"has 2 class folders; the config expects 45"),
    C("rgb-no-class-folder", "rgb", "nwpu_resisc45", "a data root without class folders",
      _rgb_empty_root, r"nwpu_resisc45", r"holds no class folder; expected layout"),
    # msi
    C("msi-wrong-size", "msi", "eurosat_ms", "12 x 12 tiles where data.args.image_size is 8 (not resized)",
      lambda r: good_msi(r, size=12), r"B/B_\d\.tif", r"expected a tile of 8 x 8 pixels .*found 12 x 12"),
    C("msi-wrong-bands", "msi", "eurosat_ms", "tiles with 12 bands instead of 13",
      lambda r: good_msi(r, bands=12), r"B/B_\d\.tif", r"expected a 13-band image .*got shape \[8, 8, 12\]"),
    C("msi-nan", "msi", "eurosat_ms", "a float32 tile with a NaN pixel value",
      lambda r: good_msi(r, dtype=np.float32, broken="nan"), r"B/B_\d\.tif",
      r"expected finite pixel values, found 1 NaN or infinite"),
    C("msi-corrupt-tiff", "msi", "eurosat_ms", "a .tif that is not a TIFF", _msi_corrupt, r"B/B_\d\.tif",
      r"cannot decode TIFF"),
    # hsi
    C("hsi-missing-gt", "hsi", "pavia_university", "the ground-truth file is missing", _hsi_missing_gt,
      r"PaviaU_gt\.mat", r"missing under .*expected layout"),
    C("hsi-nan-cube", "hsi", "pavia_university", "NaN and inf in the hyperspectral cube", _hsi_nan,
      r"PaviaU\.mat", r"2 value\(s\) of the cube are NaN or infinite"),
    C("hsi-gt-shape", "hsi", "pavia_university", "a ground truth of another size than the cube", _hsi_gt_shape,
      r"PaviaU_gt\.mat", r"ground truth is 5 x 6 but the cube .* is 6 x 6"),
    C("hsi-fractional-labels", "hsi", "pavia_university", "a fractional class label in the ground truth",
      _hsi_fractional, r"PaviaU_gt\.mat", r"must hold integer class labels"),
    C("hsi-class-one-pixel", "hsi", "pavia_university", "a class with a single labelled pixel",
      _hsi_single_pixel_class, r"PaviaU_gt\.mat", r"class 3 has 1 labelled pixel\(s\)"),
    C("hsi-ambiguous-variable", "hsi", "pavia_university", "the cube file holds two 3-D arrays, none named paviaU",
      _hsi_ambiguous_variable, r"PaviaU\.mat", r"no variable 'paviaU' .*holds 'radiance' \(3-D\), 'reflectance'"),
    C("hsi-corrupt-mat", "hsi", "pavia_university", "a truncated .mat file", _hsi_corrupt, r"PaviaU\.mat",
      r"not a readable MATLAB \.mat file"),
    C("hsi-band-count", "hsi", "pavia_university", "4 bands where data.args.bands is 103",
      lambda r: {**good_hsi(r), "bands": 103}, r"PaviaU\.mat", r"has 4 bands; the config expects 103"),
    # sar
    C("sar-test-targets", "sar", "mstar_soc", "the 15-degree folder lacks a target of the 17-degree one",
      _sar_test_targets, r"15_DEG", r"differ from those of .*17_DEG", split="test"),
    C("sar-chip-too-small", "sar", "mstar_soc", "8 x 8 chips with a 16 x 16 crop (chips are never resized)",
      lambda r: {**good_sar(r), "crop_size": 16}, r"c\d\.png", r"is 8 x 8, smaller than the 16 x 16 crop", item=0),
    C("sar-corrupt-chip", "sar", "mstar_soc", "a chip that is not an image (found when its item is read)",
      _sar_corrupt, r"T1/c\d\.png", r"cannot decode image", item=0),
    C("sar-no-test-angle", "sar", "mstar_soc", "the 15-degree folder is missing", _sar_no_test_dir, r"15_DEG",
      r"is missing or not a folder; expected layout", split="test"),
    # table
    C("table-nan-hour", "table", "prsa", "NA in the hour column", _table(_set("hour", 5, np.nan)),
      re.escape(PRSA_FILE), r"line 7: column 'hour' must be a whole number in \[0, 23\], found NA"),
    C("table-inf-year", "table", "prsa", "inf in the year column", _table(_set("year", 3, np.inf)),
      re.escape(PRSA_FILE), r"line 5: column 'year' must be a whole number, found inf"),
    C("table-inf-feature", "table", "prsa", "inf in a pollutant column (CO)", _table(_set("CO", 4, np.inf)),
      re.escape(PRSA_FILE), r"line 6: column 'CO' must be a finite number or NA \(missing\), found inf"),
    C("table-inf-target", "table", "prsa", "-inf in the target PM2.5", _table(_set("PM2.5", 0, -np.inf)),
      re.escape(PRSA_FILE), r"line 2: column 'PM2.5' must be a finite number or NA \(missing\), found -inf"),
    C("table-missing-column", "table", "prsa", "a station file without the wd column",
      _table(lambda df: df.drop(columns="wd", inplace=True)), re.escape(PRSA_FILE), r"lacks column\(s\) \['wd'\]"),
    C("table-text-in-number", "table", "prsa", "text in a numeric column (TEMP)", _table(_set("TEMP", 2, "warm")),
      re.escape(PRSA_FILE), r"line 4: column 'TEMP' must be numeric \(or NA\), found 'warm'"),
    C("table-unknown-wind", "table", "prsa", "a wind direction that is not a compass point",
      _table(_set("wd", 6, "XYZ")), re.escape(PRSA_FILE), r"line 8: column 'wd' must be one of .*found 'XYZ'"),
    C("table-month-range", "table", "prsa", "month 13", _table(_set("month", 0, 13)), re.escape(PRSA_FILE),
      r"line 2: column 'month' must be a whole number in \[1, 12\], found 13"),
    C("table-missing-station", "table", "prsa", "NA in the station column", _table(_set("station", 9, np.nan)),
      re.escape(PRSA_FILE), r"line 11: column 'station' must name the station, found NA"),
    C("table-no-station-file", "table", "prsa", "a folder without station CSVs",
      lambda r: {}, r"PRSA_Data_\*_20130301-20170228\.csv", r"no file matching"),
    # trajectory
    C("traj-non-utf8", "trajectory", "eth_ucy", "a line that is not UTF-8 text",
      _traj(_line(3, b"20.0\t1.0\t\xff1.5\t0.2")), re.escape(TRAJ_FILE) + ":3", r"expected UTF-8 text .*byte 0xff"),
    C("traj-three-fields", "trajectory", "eth_ucy", "a line with 3 fields", _traj(_line(2, "0.0\t2.0\t1.5")),
      re.escape(TRAJ_FILE) + ":2", r"expected 4 fields 'frame ped_id x y', got 3"),
    C("traj-text-field", "trajectory", "eth_ucy", "a field that is not a number",
      _traj(_line(4, "10.0\t2.0\tleft\t0.1")), re.escape(TRAJ_FILE) + ":4", r"expected numbers 'frame ped_id x y'"),
    C("traj-nan", "trajectory", "eth_ucy", "a NaN coordinate", _traj(_line(5, "20.0\t1.0\tnan\t0.2")),
      re.escape(TRAJ_FILE) + ":5", r"expected finite numbers .*found a NaN or infinite value"),
    C("traj-no-observation", "trajectory", "eth_ucy", "a trajectory file with blank lines only",
      lambda r: good_trajectory(r, ["", "  "]), re.escape(TRAJ_FILE), r"holds no observations"),
    C("traj-missing-scene", "trajectory", "eth_ucy", "data.args.test_scene names a scene folder that is absent",
      lambda r: {**good_trajectory(r), "test_scene": "hotel"}, r"hotel/train",
      r"is missing; expected the Social-GAN layout"),
    # graph
    C("graph-duplicate-h5-ids", "graph", "metr_la", "a sensor id twice among the columns of the .h5",
      lambda r: good_graph(r, columns=("7", "7", "9")), r"metr-la\.h5",
      r"sensor id\(s\) \['7'\] occur more than once in the columns"),
    C("graph-duplicate-adj-ids", "graph", "metr_la", "a sensor id twice in the adjacency pickle",
      lambda r: good_graph(r, adj_ids=("7", "9", "9")), r"adj_mx\.pkl",
      r"sensor id\(s\) \['9'\] occur more than once in the sensor id list"),
    C("graph-id-mismatch", "graph", "metr_la", "the adjacency lists other sensors than the .h5",
      lambda r: good_graph(r, adj_ids=("7", "8", "10")), r"adj_mx\.pkl.*metr-la\.h5",
      r"only in the adjacency \['10'\], only in the h5 \['9'\]"),
    C("graph-unsafe-pickle", "graph", "metr_la", "an adjacency pickle that would run a shell command",
      _graph_unsafe_pickle, r"adj_mx\.pkl", r"refusing to load .*system"),
    C("graph-repeated-time", "graph", "metr_la", "a timestamp that repeats", _graph_repeated_time, r"metr-la\.h5",
      r"timestamps must be strictly increasing, but row 10 .* repeats"),
    C("graph-adjacency-shape", "graph", "metr_la", "a 2 x 2 adjacency for 3 sensor ids",
      lambda r: good_graph(r, adj=np.eye(2, dtype=np.float32)), r"adj_mx\.pkl",
      r"adjacency is \[2, 2\] but there are 3 sensor ids"),
    C("graph-adjacency-nan", "graph", "metr_la", "a NaN adjacency weight", _graph_adj_nan, r"adj_mx\.pkl",
      r"1 adjacency weight\(s\) are NaN or infinite"),
    C("graph-not-hdf5", "graph", "metr_la", "a CSV saved as metr-la.h5", _graph_not_h5, r"metr-la\.h5",
      r"is not an HDF5 file; expected a pandas HDFStore"),
    # video
    C("video-label-not-integer", "video", "ucf101", "a non-integer label in the training list",
      _video_list(["A/v_A_g01_c01.avi 1", "B/v_B_g02_c01.avi two"]), r"trainlist01\.txt line 2",
      r"expected an integer label .*found 'two'"),
    C("video-path-escape", "video", "ucf101", "a list entry that climbs out of UCF-101/ with ..",
      _video_list(["A/../../../secret/v_A_g01_c01.avi 1"]), r"trainlist01\.txt line 1",
      r"video 'A/\.\./\.\./\.\./secret/v_A_g01_c01\.avi' leaves the data folder"),
    C("video-absolute-path", "video", "ucf101", "an absolute path in the training list",
      _video_list(["/etc/v_A_g01_c01.avi 1"]), r"trainlist01\.txt line 1", r"leaves the data folder.*absolute path"),
    C("video-extra-field", "video", "ucf101", "a list line with three fields",
      _video_list(["A/v_A_g01_c01.avi 1 extra"]), r"trainlist01\.txt line 1", r"found 3 fields"),
    C("video-class-index-gap", "video", "ucf101", "classInd.txt numbers its classes 1 and 3",
      lambda r: good_video(r, class_ind="1 A\n3 B\n", real=False), r"classInd\.txt",
      r"must number its classes 1\.\.2 without gaps"),
    C("video-list-not-utf8", "video", "ucf101", "a list file that is not UTF-8", _video_non_utf8,
      r"trainlist01\.txt, line 2", r"expected UTF-8 text, found byte 0xe9"),
    C("video-missing-video", "video", "ucf101", "a listed video missing on disk", _video_missing,
      r"trainlist01\.txt", r"1 video\(s\) listed in .* are missing on disk"),
    C("video-corrupt", "video", "ucf101", "an .avi that is not a video (found when its item is read)",
      _video_corrupt, r"v_A_g01_c01\.avi", r"cannot decode video", item=0),
    C("video-too-short", "video", "ucf101", "8-frame videos for 16-frame clips (found when the item is read)",
      lambda r: {**good_video(r), "num_frames": 16}, r"v_A_g01_c01\.avi",
      r"has 8 decodable frame\(s\); a clip needs 16", item=0),
    # pointcloud
    C("pc-ragged-row", "pointcloud", "modelnet40", "a row with 5 values in a point file (read with its item)",
      _pc_edit(lambda rows: rows.__setitem__(2, "0.1,0.2,0.3,0.4,0.5")), r"box_0001\.txt",
      r"cannot parse .*expected 6 comma-separated numbers", item=0),
    C("pc-five-columns", "pointcloud", "modelnet40", "a point file with 5 columns (read with its item)",
      _pc_edit(lambda rows: rows.__setitem__(slice(None), [",".join(r.split(",")[:5]) for r in rows])),
      r"box_0001\.txt", r"has 5 columns per row; expected 6", item=0),
    C("pc-too-few-points", "pointcloud", "modelnet40", "8 points where data.args.num_points is 16",
      lambda r: {**good_pointcloud(r), "num_points": 16}, r"box_0001\.txt", r"has 8 points; expected at least 16",
      item=0),
    C("pc-nan", "pointcloud", "modelnet40", "a NaN coordinate in a point file (read with its item)",
      _pc_edit(lambda rows: rows.__setitem__(2, "nan,0.2,0.3,0,0,1")), r"box_0001\.txt",
      r"NaN or infinite values in 1 row\(s\), first at row 3", item=0),
    C("pc-unknown-class", "pointcloud", "modelnet40", "a listed shape whose class is not in the shape names",
      lambda r: good_pointcloud(r, train="box_0001\nchair_0001\n"), r"modelnet40_train\.txt",
      r"shape 'chair_0001' .* has class 'chair', which is not in modelnet40_shape_names\.txt"),
    C("pc-missing-shape", "pointcloud", "modelnet40", "a listed shape missing on disk", _pc_missing,
      r"ball_0002\.txt", r"1 shape\(s\) listed in modelnet40_train\.txt are missing on disk"),
    C("pc-duplicate-class", "pointcloud", "modelnet40", "a class listed twice in the shape names",
      lambda r: good_pointcloud(r, names="box\nball\nbox\n"), r"modelnet40_shape_names\.txt",
      r"lists a class twice"),
    # infrared
    C("ir-bad-id", "infrared", "sysu_mm01", "a split list with a token that is not an identity number",
      _ir_ids("1,two\n"), r"train_id\.txt, line 1", r"expected comma-separated identity numbers, found 'two'"),
    C("ir-identity-without-images", "infrared", "sysu_mm01", "an identity of the list with no image",
      _ir_ids("1,2,9\n"), r"train_id\.txt", r"identity 9 of train_id\.txt has no image"),
    C("ir-empty-list", "infrared", "sysu_mm01", "an empty split list", _ir_ids("\n"), r"train_id\.txt",
      r"lists no identity"),
    C("ir-missing-camera", "infrared", "sysu_mm01", "the cam6 folder is missing", _ir_no_cam6, r"sysu_mm01",
      r"camera folder\(s\) \['cam6'\] missing"),
    C("ir-corrupt-image", "infrared", "sysu_mm01", "a JPEG that is not an image (found when its item is read)",
      _ir_corrupt, r"cam1/0001/0001\.jpg", r"cannot decode image", item=0),
    # oblique
    C("obl-scene-escape", "oblique", "whu_omvs", "index.txt names a scene outside the split folder",
      _obl_index("../../etc\n"), r"train/index\.txt", r"scene folder '\.\./\.\./etc' leaves the data folder"),
    C("obl-absolute-scene", "oblique", "whu_omvs", "index.txt names an absolute path", _obl_index("/etc\n"),
      r"train/index\.txt", r"scene folder '/etc' leaves the data folder.*absolute path"),
    C("obl-duplicate-scene", "oblique", "whu_omvs", "index.txt lists a scene twice",
      _obl_index("scene_a scene_a\n"), r"train/index\.txt", r"names scene\(s\) \['scene_a'\] more than once"),
    C("obl-missing-scene", "oblique", "whu_omvs", "index.txt lists a scene folder that is absent",
      _obl_index("scene_b\nscene_a\n"), r"train/scene_b", r"\(listed in index\.txt\) is missing"),
    C("obl-image-name-escape", "oblique", "whu_omvs", "image_path.txt names a view outside the scene",
      lambda r: good_oblique(r, names=("1/v0", "../../../outside")), r"info/image_path\.txt \(view 1\)",
      r"image name '\.\./\.\./\.\./outside' leaves the data folder"),
    C("obl-unknown-view", "oblique", "whu_omvs", "viewpair.txt refers to a view image_path.txt does not list",
      lambda r: good_oblique(r, pairs="1\n0\n1 7 100.0\n"), r"info/viewpair\.txt",
      r"view index 7 .* is not listed in .*image_path\.txt"),
    C("obl-malformed-camera", "oblique", "whu_omvs", "a camera file with 10 tokens", _obl_bad_camera,
      r"cams/1/v1\.txt", r"malformed camera file .*: 10 tokens, need 30"),
    # text
    C("text-non-utf8", "text", "imdb", "a review that is not UTF-8 (found when its item is read)",
      _text_review(b"caf\xe9 review"), r"neg/0_2\.txt", r"is not UTF-8 text", item=0),
    C("text-empty-review", "text", "imdb", "an empty review (found when its item is read)",
      _text_review(b"  \n"), r"neg/0_2\.txt", r"is empty", item=0),
    C("text-missing-neg", "text", "imdb", "the train/neg folder is missing", _text_no_neg, r"train/neg",
      r"is missing or not a folder; expected layout"),
    C("text-no-reviews", "text", "imdb", "a train/pos folder without reviews", _text_empty_pos, r"train/pos",
      r"no \.txt reviews in"),
    # code
    C("code-bad-json", "code", "codesearchnet", "a line that is not JSON", _code(_line(2, "{'code': broken")),
      re.escape(CSN_FILE) + ", line 2", r"not a JSON record"),
    C("code-missing-docstring", "code", "codesearchnet", "a record without a docstring",
      _code(_line(3, json.dumps({"code": "def g(): pass", "language": "python"}))), re.escape(CSN_FILE) + ", line 3",
      r"record lacks a string 'docstring' \(it has \['code', 'language'\]\)"),
    C("code-json-array", "code", "codesearchnet", "a line holding a JSON array", _code(_line(1, "[1, 2]")),
      re.escape(CSN_FILE) + ", line 1", r"expected a JSON object, got list"),
    C("code-wrong-language", "code", "codesearchnet", "a java record in the python files",
      _code(_line(1, json.dumps({"code": "int f() {}", "docstring": "Java.", "language": "java"}))),
      re.escape(CSN_FILE) + ", record 1", r"language 'java', expected 'python'"),
    C("code-not-gzip", "code", "codesearchnet", "a .jsonl.gz that is not gzip-compressed",
      lambda r: good_code(r, raw=b'{"code": "x", "docstring": "y"}\n'), re.escape(CSN_FILE),
      r"cannot read .* as gzip-compressed UTF-8 JSON lines"),
    C("code-non-utf8", "code", "codesearchnet", "a record that is not UTF-8",
      _code(_line(2, b'{"code": "x = \xff", "docstring": "y"}')), re.escape(CSN_FILE) + ", line 2",
      r"expected gzip-compressed UTF-8 JSON lines, found byte 0xff that is not UTF-8"),
    # hsi+lidar
    C("lidar-nan", "hsi+lidar", "houston2018", "NaN in a LiDAR intensity raster (not silently 0)", _lidar_nan,
      r"Intensity_C2/UH17_GI2F051\.tif", r"expected finite LiDAR intensities .*found 2 NaN or infinite value\(s\)"),
    C("lidar-sizes", "hsi+lidar", "houston2018", "LiDAR rasters of different sizes", _lidar_sizes,
      r"UH17_GI1F051\.tif.*UH17_GI3F051\.tif", r"differ in size: \[\[16, 16\], \[16, 16\], \[16, 12\]\]"),
    C("houston-missing-train-map", "hsi+lidar", "houston2018", "the training map is missing",
      _houston_missing_train, r"TrainingGT/2018_IEEE_GRSS_DFC_GT_TR\.tif", r"missing under .*expected layout"),
    C("houston-hsi-bands", "hsi+lidar", "houston2018", "an HSI cube with 4 bands where hsi_bands is 48",
      lambda r: {**good_hsi_lidar(r), "hsi_bands": 48}, r"20170218_UH_CASI_S4_NAD83\.tif",
      r"the HSI cube has 4 bands; the config expects 48"),
    C("houston-maps-overlap", "hsi+lidar", "houston2018", "a pixel labelled in both the training and the test map",
      _houston_overlap, r"2018_IEEE_GRSS_DFC_GT_TR\.tif.*Test_Labels\.tif",
      r"1 pixel\(s\) are labelled in both .*expected disjoint maps"),
    # hsi+sar
    C("berlin-sar-nan", "hsi+sar", "berlin", "NaN in the SAR raster", _berlin_sar_nan, r"data_SAR_HR\.mat",
      r"1 value\(s\) of the SAR raster are NaN or infinite"),
    C("berlin-map-sizes", "hsi+sar", "berlin", "a test map one row shorter than the training map",
      lambda r: good_hsi_sar(r, test=_maps()[1][:15]), r"TrainImage\.mat.*TestImage\.mat",
      r"is \[16, 16\] but the test map .* is \[15, 16\]"),
    C("berlin-negative-label", "hsi+sar", "berlin", "a negative label in the training map", _berlin_negative,
      r"TrainImage\.mat", r"the training map has negative labels"),
    C("berlin-class-without-training", "hsi+sar", "berlin", "a class that only the test map has",
      _berlin_test_only_class, r"TrainImage\.mat", r"class\(es\) \[3\] have no pixel in the training map"),
    # rgb-text (retrieval)
    C("captions-path-escape", "rgb-text", "rsicd_captions", "a caption entry naming ../../etc/passwd",
      _rsicd(_entry("filename", "../../etc/passwd")), r"dataset_rsicd\.json: images\[0\]",
      r"image name '\.\./\.\./etc/passwd' leaves the data folder"),
    C("captions-absolute-path", "rgb-text", "rsicd_captions", "a caption entry naming an absolute path",
      _rsicd(_entry("filename", "/etc/passwd", k=1)), r"dataset_rsicd\.json: images\[1\]",
      r"leaves the data folder.*absolute path"),
    C("captions-missing-image", "rgb-text", "rsicd_captions", "a caption entry naming an image that is absent",
      _rsicd(_entry("filename", "zzz.png")), r"dataset_rsicd\.json", r"names image 'zzz\.png', but .* does not exist"),
    C("captions-unknown-split", "rgb-text", "rsicd_captions", "a split name that is not train/val/test/restval",
      _rsicd(_entry("split", "training")), r"dataset_rsicd\.json: images\[0\]",
      r"has split 'training'; expected one of"),
    C("captions-no-caption", "rgb-text", "rsicd_captions", "an image whose sentences are all empty",
      _rsicd(_entry("sentences", [{"raw": "  "}])), r"dataset_rsicd\.json", r"image 'a\.png' has no caption"),
    C("captions-bad-json", "rgb-text", "rsicd_captions", "a caption file that is not JSON",
      lambda r: good_retrieval(r, raw=b'{"images": ['), r"dataset_rsicd\.json", r"is not valid JSON"),
    C("captions-not-utf8", "rgb-text", "rsicd_captions", "a caption file that is not UTF-8",
      lambda r: good_retrieval(r, raw=b'{"images": []}\n\xff'), r"dataset_rsicd\.json, line 2",
      r"expected UTF-8 text"),
    C("captions-corrupt-image", "rgb-text", "rsicd_captions", "an image that cannot be decoded (read with its item)",
      _rsicd_corrupt, r"images/a\.png", r"cannot decode image", item=0),
    C("luojiahog-path-escape", "rgb-text", "luojiahog", "an annotation line naming ../secret.png",
      _lj(_lj_row(1, image="../secret.png")), r"annotations\.jsonl line 1",
      r"image name '\.\./secret\.png' leaves the data folder"),
    C("luojiahog-not-json", "rgb-text", "luojiahog", "an annotation line that is not JSON",
      _lj(_line(2, "{image: b.png}")), r"annotations\.jsonl line 2", r"is not JSON"),
    C("luojiahog-labels-not-list", "rgb-text", "luojiahog", "second_level given as a string",
      _lj(_lj_row(3, second_level="water")), r"annotations\.jsonl line 3",
      r"'second_level' must be a list of label names, found str"),
    C("luojiahog-mixed-split", "rgb-text", "luojiahog", "some lines name their split, others do not",
      _lj(_lj_row(2, split=None)), r"annotations\.jsonl", r"either every line names its split or none does"),
]

GOOD: dict[str, tuple[str, Callable[[Path], Args]]] = {
    "rgb": ("nwpu_resisc45", good_rgb), "msi": ("eurosat_ms", good_msi), "hsi": ("pavia_university", good_hsi),
    "sar": ("mstar_soc", good_sar), "table": ("prsa", good_table), "trajectory": ("eth_ucy", good_trajectory),
    "graph": ("metr_la", good_graph), "video": ("ucf101", good_video), "pointcloud": ("modelnet40", good_pointcloud),
    "infrared": ("sysu_mm01", good_infrared), "oblique": ("whu_omvs", good_oblique), "text": ("imdb", good_text),
    "code": ("codesearchnet", good_code), "hsi+lidar": ("houston2018", good_hsi_lidar),
    "hsi+sar": ("berlin", good_hsi_sar), "rgb-text": ("rsicd_captions", good_retrieval),
    "rgb-text-multilabel": ("luojiahog", good_luojiahog),
}


def build(dataset: str, root: Path, args: Args, split: str = "train"):
    """The reader as :func:`allspark.data.build_dataset` builds it from ``data.dataset`` and ``data.args``."""
    cfg = SimpleNamespace(data=SimpleNamespace(dataset=dataset, args=args))
    return build_dataset(cfg, split, root)


def run_case(case: Case, tmp: Path) -> BaseException | None:
    """Write the case's bad data under ``tmp/<dataset>``, build the reader (and read ``case.item``); the
    exception raised, or None."""
    root = tmp / case.dataset
    root.mkdir(parents=True, exist_ok=True)
    args = case.build(root)
    try:
        ds = build(case.dataset, root, args, case.split)
        if case.item is not None:
            ds[case.item]
    except Exception as exc:  # noqa: BLE001 - the test checks what it is
        return exc
    return None


def check_case(case: Case, exc: BaseException | None) -> str:
    """The one-line message the command line prints for ``exc``; raises AssertionError when the case fails."""
    assert exc is not None, f"{case.id}: no error for {case.description}"
    assert is_user_error(exc), f"{case.id}: {type(exc).__name__} is not a user error (exit 1, traceback): {exc}"
    msg = _one_line(exc)
    assert re.search(case.file, msg), f"{case.id}: the message does not name {case.file!r}: {msg}"
    assert re.search(case.expect, msg), f"{case.id}: the message does not say {case.expect!r}: {msg}"
    return msg


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_gives_one_clear_user_error(case: Case, tmp_path: Path) -> None:
    check_case(case, run_case(case, tmp_path))


@pytest.mark.parametrize("modality", sorted(GOOD))
def test_good_data_loads(modality: str, tmp_path: Path) -> None:
    """The unbroken data of each builder loads and gives an item, so each case fails for what it broke."""
    dataset, good = GOOD[modality]
    root = tmp_path / dataset
    args = good(root)
    ds = build(dataset, root, args)
    assert len(ds) > 0
    assert isinstance(ds[0], dict)


def test_table_covers_every_modality_with_40_distinct_cases() -> None:
    assert len(CASES) >= 40
    assert len({c.id for c in CASES}) == len(CASES)
    assert {c.modality for c in CASES} == {m.split("-multilabel")[0] for m in GOOD}
    assert {c.dataset for c in CASES} == {d for d, _ in GOOD.values()}
    assert all(c.description and "\n" not in c.description for c in CASES)


# -- documented choices that are not errors ----------------------------------------------------------------------

def test_metr_la_reads_nan_and_inf_as_missing(tmp_path: Path) -> None:
    from allspark.data.metr_la import write_sensor_h5

    args = good_graph(tmp_path)
    times = np.datetime64("2012-03-05T00:00:00") + np.arange(60) * np.timedelta64(300, "s")
    values = np.full((60, 3), 50.0, np.float32)
    values[5, 0], values[6, 1], values[7, 2] = np.nan, np.inf, -np.inf
    write_sensor_h5(tmp_path / "metr-la.h5", times, ["7", "8", "9"], values)
    ds = build("metr_la", tmp_path, args)
    assert not ds.mask[5, 0] and not ds.mask[6, 1] and not ds.mask[7, 2]
    assert int((~ds.mask).sum()) == 3 and np.isfinite(ds.values.numpy()).all()


def test_prsa_reads_a_nan_feature_as_missing(tmp_path: Path) -> None:
    good_table(tmp_path, _set("CO", 4, np.nan))
    parts = [build("prsa", tmp_path, {"train_ratio": 0.5, "val_ratio": 0.0}, s) for s in ("train", "test")]
    assert sum(int((~ds.num_mask).sum()) for ds in parts) == 1
    assert all(ds.num.isfinite().all() for ds in parts)


def test_houston_lidar_nan_as_nodata_is_an_explicit_option(tmp_path: Path) -> None:
    args = _lidar_nan(tmp_path)
    ds = build("houston2018", tmp_path, {**args, "lidar_nan_as_nodata": True})
    assert ds.images[1].isfinite().all()


def test_eurosat_resizes_only_when_asked(tmp_path: Path) -> None:
    args = good_msi(tmp_path, size=12)
    ds = build("eurosat_ms", tmp_path, {**args, "resize": True})
    big = next(i for i, (path, _) in enumerate(ds.samples) if path.parent.name == "B")  # a 12 x 12 tile
    assert tuple(ds[big]["image"].shape) == (13, 8, 8)
