"""Traffic forecasting on sensor networks in the DCRNN distribution layout (METR-LA; PEMS-BAY and other
networks in the same layout work unchanged): 12 steps in, 12 steps out (AllSpark, III-C "Graph").

On-disk layout (DCRNN):
- ``metr-la.h5``: a pandas HDFStore (key ``df``) with a DatetimeIndex (one row per sampling instant) and one
  column per sensor id; a reading of 0 means "no reading" (missing);
- ``adj_mx.pkl`` (in the root or in ``sensor_graph/``): a pickle of ``(sensor_ids, sensor_id_to_ind,
  adj_mx)``, written by Python 2 (read with ``encoding="latin1"``).
``h5_file`` / ``adj_file`` name the files; by default the only ``*.h5`` of the root and the only
``adj*.pkl`` of the root or ``sensor_graph/``. The number of sensors and the sampling interval are read
from the files (so 5-minute METR-LA, PEMS-BAY and hourly counters all work).

Pickle can run code on load, so ``adj_mx.pkl`` is read with a restricted unpickler that only rebuilds
builtin containers and numpy arrays / dtypes / scalars and refuses everything else.

Accepted beyond the official files (which are complete, evenly spaced and without NaN):
- gaps in time: the sampling interval is inferred as the most common positive difference between
  consecutive timestamps, and a row missing from that regular grid is added with every reading 0 (missing,
  exactly as METR-LA marks a reading it did not get, so the masked loss and metrics skip it); the number
  of added rows is logged. Refused, with the file and the offending row named: timestamps that repeat or
  go backwards, a timestamp off the grid (not ``first + k * interval``), an interval that does not divide
  a day, and a grid on which the added rows would outnumber the rows of the file (a stray timestamp far
  away rather than a gap);
- NaN or infinite readings (as other exports write a missing value or an overflow): read as 0 (missing,
  the reader's one convention for "no reading"), so they never count as observed; the count is logged.

Refused, naming the file: a sensor id that occurs twice among the columns of the ``.h5`` or in the id list
of the adjacency pickle (the duplicates are listed), sensor ids that differ between the two files, an
adjacency that is not ``N x N``, or holds NaN/inf, and columns that are not numeric.

Split: samples (windows) in time order, 0.7 / 0.1 / 0.2 train / val / test (DCRNN, STAEformer).
Standardisation: mean and std of the observed (non-zero) readings of the training part of the series.
Inputs: standardised readings, with missing ones set to 0 (the training mean), plus the time-of-day index
(interval steps since midnight) and day-of-week of each input step. Targets are raw readings, with
``target_mask`` False where a reading is missing (masked loss and metrics).
"""
from __future__ import annotations

import io
import logging
import pickle
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import torch

from allspark.data.base import DatasetFormatError, ModalityDataset
from allspark.io import atomic_file
from allspark.registry import DATASETS

logger = logging.getLogger(__name__)

__all__ = ["TrafficSensorNetwork", "load_adjacency", "read_sensor_h5", "write_sensor_h5", "SafeUnpickler",
           "regular_grid"]


class SafeUnpickler(pickle.Unpickler):
    """Unpickler that only rebuilds numpy arrays, dtypes and scalars (plus builtin containers)."""

    ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
        ("numpy", "ndarray"), ("numpy", "dtype"),
        ("builtins", "set"), ("builtins", "frozenset"), ("__builtin__", "set"), ("__builtin__", "frozenset"),
        ("_codecs", "encode"), ("copy_reg", "_reconstructor"), ("copyreg", "_reconstructor"),
        ("builtins", "object"), ("__builtin__", "object"),
    }

    def find_class(self, module: str, name: str):
        if (module, name) in self.ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}: only numpy arrays and builtin "
                                     "containers are allowed in an adjacency pickle")


def load_adjacency(path: Path) -> tuple[list[str], np.ndarray]:
    """``adj_mx.pkl`` -> (sensor ids as strings, adjacency [N, N] float)."""
    try:
        with open(path, "rb") as f:
            obj = SafeUnpickler(io.BytesIO(f.read()), encoding="latin1").load()
    except OSError:
        raise
    except Exception as exc:  # a truncated or foreign pickle raises UnpicklingError, EOFError, KeyError ...
        raise DatasetFormatError(f"graph: cannot read adjacency pickle {path}: {type(exc).__name__}: {exc}") from exc
    if not (isinstance(obj, (tuple, list)) and len(obj) == 3):
        raise DatasetFormatError(f"graph: {path} must hold (sensor_ids, sensor_id_to_ind, adj_mx), "
                                 f"got {type(obj).__name__}")
    ids, _, adj = obj
    if not isinstance(ids, (list, tuple, np.ndarray)):
        raise DatasetFormatError(f"graph: {path}: sensor_ids must be a list, got {type(ids).__name__}")
    ids = [i.decode() if isinstance(i, bytes) else str(i) for i in ids]
    _refuse_duplicates(path, ids, "sensor id list")
    try:
        adj = np.asarray(adj, dtype=np.float64)
    except (ValueError, TypeError) as exc:
        raise DatasetFormatError(f"graph: {path}: adj_mx must be a numeric N x N matrix: {exc}") from None
    if adj.shape != (len(ids), len(ids)):
        raise DatasetFormatError(f"graph: {path}: adjacency is {list(adj.shape)} but there are {len(ids)} sensor ids")
    if not np.isfinite(adj).all():
        raise DatasetFormatError(f"graph: {path}: {int((~np.isfinite(adj)).sum())} adjacency weight(s) are NaN "
                                 "or infinite; expected finite weights (0 = no edge)")
    return ids, adj


def read_sensor_h5(path: Path):
    """The HDFStore as (timestamps [T] datetime64[ns], sensor ids [N] str, values [T, N] float32)."""
    import h5py
    import pandas as pd

    if not h5py.is_hdf5(str(path)):
        raise DatasetFormatError(f"graph: {path} is not an HDF5 file; expected a pandas HDFStore (DataFrame.to_hdf, "
                                 "key 'df') of readings indexed by time, one column per sensor")
    try:
        with pd.HDFStore(path, mode="r") as store:
            keys = store.keys()
            if not keys:
                raise DatasetFormatError(f"graph: {path} holds no table")
            df = store["df"] if "/df" in keys else store[keys[0]]
    except DatasetFormatError:
        raise
    except Exception as exc:
        raise DatasetFormatError(f"graph: cannot read {path} as a pandas HDFStore: {exc}") from exc
    if not isinstance(df.index, pd.DatetimeIndex):
        raise DatasetFormatError(f"graph: {path}: rows must be indexed by time (DatetimeIndex), "
                                 f"got {type(df.index).__name__}")
    columns = [str(c) for c in df.columns]
    _refuse_duplicates(path, columns, "columns")
    try:
        values = df.to_numpy(np.float32)
    except (ValueError, TypeError):
        bad = [str(c) for c in df.columns if not pd.api.types.is_numeric_dtype(df[c])]
        raise DatasetFormatError(f"graph: {path}: readings must be numbers; column(s) {bad[:5]} are "
                                 f"{sorted({str(df[c].dtype) for c in bad})}") from None
    return df.index.values, columns, values


def _refuse_duplicates(path: Path, ids: list[str], where: str) -> None:
    seen, dup = set(), []
    for i in ids:
        if i in seen and i not in dup:
            dup.append(i)
        seen.add(i)
    if dup:
        raise DatasetFormatError(f"graph: {path}: sensor id(s) {dup[:10]} occur more than once in the {where}; "
                                 f"expected {len(ids)} distinct sensor ids, found {len(seen)}")


def regular_grid(path: Path, timestamps, values: np.ndarray) -> tuple[np.ndarray, np.ndarray, int, int]:
    """Put the rows of ``path`` on their regular time grid.

    ``timestamps`` [T] datetime64, ``values`` [T, N] -> (grid timestamps [T'] datetime64[ns], values [T', N]
    with the rows absent from the file set to 0 (missing), the interval in seconds, the number of rows
    added). The interval is the most common positive difference between consecutive timestamps (the
    smallest of the most common ones on a tie). Raises :class:`DatasetFormatError`, naming the file and the
    row, for timestamps that repeat, go backwards or lie off the grid, for an interval that is not a whole
    number of seconds dividing a day, and when the added rows would outnumber the rows of the file.
    """
    ns = np.asarray(timestamps).astype("datetime64[ns]")
    t = ns.astype(np.int64)
    if len(t) < 2:
        raise DatasetFormatError(f"graph: {path}: expected at least 2 time steps, found {len(t)}")
    deltas = np.diff(t)
    if (deltas <= 0).any():
        k = int(np.argmax(deltas <= 0))
        what = "repeats" if deltas[k] == 0 else "goes back in time"
        raise DatasetFormatError(f"graph: {path}: timestamps must be strictly increasing, but row {k + 1} "
                                 f"({ns[k + 1]}) {what} after row {k} ({ns[k]})")
    steps, counts = np.unique(deltas, return_counts=True)
    step = int(steps[np.argmax(counts)])  # np.unique sorts, argmax takes the first (smallest) on a tie
    if step % 10**9 or (86400 * 10**9) % step:
        raise DatasetFormatError(f"graph: {path}: the sampling interval (the most common spacing of the rows) "
                                 f"is {step / 1e9:g} s; expected a whole number of seconds that divides a day")
    off = (t - t[0]) % step != 0
    if off.any():
        k = int(np.argmax(off))
        raise DatasetFormatError(
            f"graph: {path}: row {k} ({ns[k]}) is off the regular time grid: expected every timestamp to be "
            f"{ns[0]} plus a multiple of the sampling interval {step // 10**9} s (the most common spacing), "
            f"found {(t[k] - t[0]) / 1e9:g} s after the first row"
        )
    length = int((t[-1] - t[0]) // step) + 1
    added = length - len(t)
    if added > len(t):
        import pandas as pd

        k = int(np.argmax(deltas))
        raise DatasetFormatError(
            f"graph: {path}: filling the gaps of the {step // 10**9}-s time grid would add {added} empty rows "
            f"to {len(t)} rows of readings; the largest gap is {pd.Timedelta(int(deltas[k]), 'ns')} between "
            f"row {k} ({ns[k]}) and row {k + 1} ({ns[k + 1]}); expected a series with occasional gaps"
        )
    grid = ns[0] + np.arange(length) * np.timedelta64(step, "ns")
    if added:
        full = np.zeros((length, values.shape[1]), dtype=values.dtype)
        full[(t - t[0]) // step] = values
        values = full
    return grid, values, step // 10**9, added


@lru_cache(maxsize=2)
def _load_series(path: str, stamp: tuple) -> tuple[np.ndarray, list[str], np.ndarray, int, int, int]:
    """The readings on their regular grid (cached: the three splits read the same file; ``stamp`` keys
    the file's size and modification time). The arrays are read-only."""
    times, columns, values = read_sensor_h5(Path(path))
    nan = ~np.isfinite(values)
    if nan.any():
        n_inf = int(np.isinf(values).sum())
        values = np.where(nan, np.float32(0), values)
        if int(nan.sum()) > n_inf:
            logger.info("graph: %s: %d NaN reading(s) read as 0 (missing)", path, int(nan.sum()) - n_inf)
        if n_inf:
            logger.info("graph: %s: %d infinite reading(s) read as 0 (missing)", path, n_inf)
    times, values, interval, added = regular_grid(Path(path), times, values)
    if added:
        logger.info("graph: %s: %d row(s) missing from the %d-s time grid (%d rows in the file, %d on the grid) "
                    "filled with readings 0 (missing)", path, added, interval, len(times) - added, len(times))
    times.flags.writeable = False
    values.flags.writeable = False
    return times, columns, values, interval, added, int(nan.sum())


def write_sensor_h5(path: Path, timestamps, sensor_ids, values) -> None:
    import pandas as pd

    df = pd.DataFrame(values, index=pd.DatetimeIndex(timestamps), columns=sensor_ids)
    with atomic_file(path) as tmp:
        df.to_hdf(tmp, key="df")


def _find_one(root: Path, name: str | None, patterns: list[tuple[Path, str]], what: str) -> Path:
    if name is not None:
        for folder in {p[0] for p in patterns}:
            if (folder / name).is_file():
                return folder / name
        raise DatasetFormatError(f"graph: {what} file {name!r} not found in {sorted(str(p[0]) for p in patterns)}")
    for folder, pattern in patterns:
        found = sorted(folder.glob(pattern))
        if len(found) == 1:
            return found[0]
        if len(found) > 1:
            raise DatasetFormatError(f"graph: several {what} files in {folder} ({[f.name for f in found]}); "
                                     f"name one with data.args")
    raise DatasetFormatError(f"graph: no {what} file under {root}; expected the DCRNN layout "
                             "(metr-la.h5 and adj_mx.pkl or sensor_graph/adj_mx.pkl)")


@DATASETS.register("metr_la")
class TrafficSensorNetwork(ModalityDataset):
    """Items: ``x`` [T_in, N, 1] standardised, ``tod`` [T_in] / ``dow`` [T_in] long, ``target`` [T_out, N]
    raw, ``target_mask`` [T_out, N] bool, ``last_value`` [N] (the last observed reading, for the baseline).

    Public attributes (the whole series, the same in every split, for baselines that look further back
    than a window; item ``i`` covers rows ``window_index()[0][i]`` in and ``window_index()[1][i]`` out):
    ``values`` [T, N] float32 raw readings on the regular grid (0 = missing), ``mask`` [T, N] bool (True =
    observed), ``filled`` [T, N] the last observed reading at or before each row (the training mean before
    the first one; ``last_value`` of an item is ``filled`` at its last input row), ``times`` [T]
    datetime64[ns], ``tod`` / ``dow`` [T], ``starts`` (the first input row of each item of this split),
    ``input_len``, ``output_len``, ``steps_per_day``, ``interval`` (seconds), ``num_added_rows`` (rows the
    file lacked and the grid got, all missing).
    """

    demo_version = 1

    def __init__(self, root, split: str, h5_file: str | None = None, adj_file: str | None = None,
                 input_len: int = 12, output_len: int = 12, train_ratio: float = 0.7, val_ratio: float = 0.1) -> None:
        super().__init__(root, split)
        h5 = _find_one(self.root, h5_file, [(self.root, "*.h5")], "sensor readings (.h5)")
        adj_path = _find_one(self.root, adj_file, [(self.root, "adj*.pkl"), (self.root / "sensor_graph", "adj*.pkl")],
                             "adjacency (.pkl)")
        stat = h5.stat()
        times, columns, values, interval, added, _ = _load_series(str(h5), (stat.st_size, stat.st_mtime_ns))
        ids, adj = load_adjacency(adj_path)
        if set(ids) != set(columns) or len(ids) != len(columns):
            only_adj = sorted(set(ids) - set(columns))[:5]
            only_h5 = sorted(set(columns) - set(ids))[:5]
            raise DatasetFormatError(
                f"graph: sensor ids of {adj_path.name} ({len(ids)}) do not match the columns of {h5.name} "
                f"({len(columns)}): only in the adjacency {only_adj}, only in the h5 {only_h5}"
            )
        order = [ids.index(c) for c in columns]  # adjacency rows in h5 column order
        adj = adj[np.ix_(order, order)]
        if len(times) < input_len + output_len + 10:
            raise DatasetFormatError(f"graph: {h5} has {len(times)} time steps; too few for "
                                     f"{input_len}+{output_len}-step windows")
        steps_per_day = 86400 // interval
        ts = times.astype("datetime64[s]").astype(np.int64)
        tod = (ts % 86400) // interval
        dow = ((ts // 86400) + 3) % 7  # 1970-01-01 was a Thursday; 0 = Monday

        n_samples = len(times) - input_len - output_len + 1
        n_train, n_val = int(round(train_ratio * n_samples)), int(round(val_ratio * n_samples))
        starts = {"train": range(0, n_train), "val": range(n_train, n_train + n_val),
                  "test": range(n_train + n_val, n_samples)}[split]
        train_part = values[: n_train + input_len - 1]
        observed = train_part[train_part != 0]
        self.mean = float(observed.mean()) if observed.size else 0.0
        self.std = float(observed.std()) if observed.size > 1 and observed.std() > 0 else 1.0
        mask = values != 0
        self.values = torch.from_numpy(np.array(values, dtype=np.float32))
        self.scaled = torch.from_numpy(np.where(mask, (values - self.mean) / self.std, 0.0).astype(np.float32))
        self.mask = torch.from_numpy(mask)
        self.tod = torch.from_numpy(tod.astype(np.int64))
        self.dow = torch.from_numpy(dow.astype(np.int64))
        # last observed reading before each window end (forward fill; training mean before any reading)
        filled = values.copy()
        filled[0][filled[0] == 0] = self.mean
        for t in range(1, len(filled)):
            gap = filled[t] == 0
            filled[t][gap] = filled[t - 1][gap]
        self.filled = torch.from_numpy(filled)
        self.times = times
        self.num_added_rows = added
        self.starts = list(starts)
        self.input_len, self.output_len = input_len, output_len
        self.sensor_ids = columns
        self.steps_per_day, self.interval = int(steps_per_day), interval
        from torch_geometric.utils import dense_to_sparse

        self.edge_index, self.edge_weight = dense_to_sparse(torch.from_numpy(adj.astype(np.float32)))

    def __len__(self) -> int:
        return len(self.starts)

    def __getitem__(self, i: int) -> dict[str, Any]:
        s = self.starts[i]
        e = s + self.input_len
        return {
            "x": self.scaled[s:e, :, None],
            "tod": self.tod[s:e],
            "dow": self.dow[s:e],
            "target": self.values[e:e + self.output_len],
            "target_mask": self.mask[e:e + self.output_len],
            "last_value": self.filled[e - 1],
            "index": torch.tensor(i),
        }

    def window_index(self) -> tuple[np.ndarray, np.ndarray]:
        """Rows of the series in each item, in item order: (input rows [n, input_len], target rows
        [n, output_len]) as int64 arrays."""
        starts = np.asarray(self.starts, dtype=np.int64)[:, None]
        return (starts + np.arange(self.input_len),
                starts + self.input_len + np.arange(self.output_len))

    def info(self) -> dict[str, Any]:
        return {
            "num_nodes": len(self.sensor_ids),
            "sensor_ids": self.sensor_ids,
            "input_len": self.input_len,
            "output_len": self.output_len,
            "target_shape": [self.output_len, len(self.sensor_ids)],
            "steps_per_day": self.steps_per_day,
            "interval_s": self.interval,
            "edge_index": self.edge_index.tolist(),
            "edge_weight": self.edge_weight.tolist(),
            "target_mean": self.mean,
            "target_std": self.std,
        }

    @classmethod
    def write_demo(cls, root, seed: int = 0) -> None:
        """Twenty sensors on a road (a chain with Gaussian-kernel weights, as DCRNN builds adj_mx), five-
        minute speeds for eight days written as ``metr-la.h5`` + ``sensor_graph/adj_mx.pkl``.

        Speed = free flow minus a rush-hour dip (morning and evening on weekdays, sensor-specific depth and
        a delay that travels along the road) plus a persistent AR(1) disturbance shared by neighbours and an independent reading error;
        about 3% of the readings are 0 (missing). A model that learns the daily profile beats the last
        observed value at longer horizons.
        """
        root = Path(root)
        rng = np.random.default_rng(seed)
        n, steps = 20, 8 * 288
        ids = [str(700000 + 17 * i) for i in range(n)]
        times = np.datetime64("2012-03-05T00:00:00") + np.arange(steps) * np.timedelta64(300, "s")
        hours = (np.arange(steps) % 288) / 12.0
        weekday = ((np.arange(steps) // 288) % 7) < 5
        depth = rng.uniform(15, 30, n)
        delay = np.linspace(0, 1.0, n)
        dip = (np.exp(-0.5 * ((hours[:, None] - 8.0 - delay) / 0.8) ** 2)
               + 0.8 * np.exp(-0.5 * ((hours[:, None] - 17.5 - delay) / 1.0) ** 2))
        speed = 65 - depth * dip * np.where(weekday, 1.0, 0.3)[:, None]
        noise = np.zeros((steps, n))
        for t in range(1, steps):
            noise[t] = 0.9 * noise[t - 1] + rng.normal(0, 1.8, n)
        noise = (noise + np.roll(noise, 1, axis=1) + np.roll(noise, -1, axis=1)) / 3
        # loop detectors are noisy: an independent reading error on top of the traffic state
        values = np.clip(speed + 2 * noise + rng.normal(0, 3.0, (steps, n)), 3, 80).astype(np.float32)
        values[rng.random(values.shape) < 0.03] = 0.0
        write_sensor_h5(root / "metr-la.h5", times, ids, values)
        pos = np.arange(n, dtype=np.float64)
        dist = np.abs(pos[:, None] - pos[None, :])
        adj = np.exp(-(dist / 1.5) ** 2)
        adj[adj < 0.1] = 0.0
        with atomic_file(root / "sensor_graph" / "adj_mx.pkl") as tmp:
            with open(tmp, "wb") as f:
                pickle.dump((ids, {s: i for i, s in enumerate(ids)}, adj.astype(np.float32)), f, protocol=2)
