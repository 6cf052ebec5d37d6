"""Beijing multi-site air quality (PRSA, UCI id 501): predict PM2.5 from time, station, four pollutants
and six meteorological variables (AllSpark, Section IV-B "Table").

On-disk layout (as distributed): twelve files ``PRSA_Data_<Station>_20130301-20170228.csv``, directly in
the root or in its sub-folder ``PRSA_Data_20130301-20170228/``, each with the columns
``No, year, month, day, hour, PM2.5, PM10, SO2, NO2, CO, O3, TEMP, PRES, DEWP, RAIN, wd, WSPM, station``;
missing values are written ``NA``.

Features (``wd``, the wind direction, is one of the six meteorological variables of the paper):
- discrete: station, year, month, day, hour, wd -> ``cat`` (long indices, 0 = missing/unknown);
- continuous: SO2, NO2, CO, O3, TEMP, PRES, DEWP, RAIN, WSPM -> ``num`` (standardised with train
  statistics) and ``num_mask`` (True = observed). PM10 is not a feature: it is the target's coarser twin.

Missing-value policy (explicit, never silent):
- rows whose target PM2.5 is missing are dropped (nothing to learn or score); the count is logged;
- a missing continuous value is kept as missing: ``num`` holds 0 there and ``num_mask`` False, and the
  encoder replaces it with a learned per-column "missing" embedding (no imputation from other rows);
- a missing wind direction becomes category 0, a learned "missing" embedding.

Accepted beyond the official files (twelve complete hourly series): any number of station files matching
the pattern, and hours absent from a file (gaps in the hourly series, rows in any order). Each row is a
sample of its own -- the features are the row's time, station and measurements, nothing is read from
neighbouring hours -- so a gap needs no filling: an absent hour is simply not a sample (filling it would
only add rows whose PM2.5 is missing, which are dropped anyway). Refused, naming the file and the row: a
missing, infinite or non-integer ``year``/``month``/``day``/``hour``; a month, day or hour out of range; an
infinite value (``inf``, ``-inf``) in a measurement or in PM2.5 -- the files write a missing value ``NA``, so an
infinity is a broken value, neither observed nor silently made missing; a missing ``station``; a wind
direction that is not one of the 16 compass points. Refused naming the file: a missing column and text in a
numeric column.

Split (paper: 40% train, the rest test): a seeded random 40% of the rows is the training pool, of which
``val_ratio`` is held out for model selection; the remaining 60% is the test split. Standardisation
statistics of the features and of the target come from the training split only; ``info()`` carries them (and
the station list and first year) so that a checkpoint's ``data_info.json`` holds everything the encoding needs.
"""
from __future__ import annotations

import logging
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import torch

from allspark.config import ConfigError
from allspark.data.base import DatasetFormatError, ModalityDataset
from allspark.io import atomic_file
from allspark.registry import DATASETS

logger = logging.getLogger(__name__)

__all__ = ["PRSAAirQuality", "PRSA_COLUMNS", "FEATURE_COLUMNS", "CONTINUOUS", "DISCRETE", "WIND_DIRECTIONS"]

PRSA_COLUMNS = ("No", "year", "month", "day", "hour", "PM2.5", "PM10", "SO2", "NO2", "CO", "O3", "TEMP",
                "PRES", "DEWP", "RAIN", "wd", "WSPM", "station")
CONTINUOUS = ("SO2", "NO2", "CO", "O3", "TEMP", "PRES", "DEWP", "RAIN", "WSPM")
DISCRETE = ("station", "year", "month", "day", "hour", "wd")
TARGET = "PM2.5"
#: the 16 compass points used by the ``wd`` column
WIND_DIRECTIONS = ("N", "NNE", "NE", "ENE", "E", "ESE", "SE", "SSE", "S", "SSW", "SW", "WSW", "W", "WNW",
                   "NW", "NNW")
SUBFOLDER = "PRSA_Data_20130301-20170228"
PATTERN = "PRSA_Data_*_20130301-20170228.csv"
DEMO_STATIONS = ("Aotizhongxin", "Changping", "Dingling", "Dongsi")
#: the columns the features are made of (what ``allspark predict`` needs of a file; No, PM2.5 and PM10 may be absent)
FEATURE_COLUMNS = tuple(c for c in PRSA_COLUMNS if c in (*DISCRETE, *CONTINUOUS))


def find_station_files(root: Path) -> list[Path]:
    for folder in (root, root / SUBFOLDER):
        files = sorted(folder.glob(PATTERN))
        if files:
            return files
    raise DatasetFormatError(
        f"PRSA: no file matching {PATTERN!r} in {str(root)!r} or {str(root / SUBFOLDER)!r}; expected the "
        "twelve station CSVs of the Beijing multi-site air-quality data set"
    )


def read_station_csv(path: Path, columns: tuple[str, ...] = PRSA_COLUMNS):
    """One station file as a pandas DataFrame, with a clear error for a missing column.

    ``columns``: the columns the file must hold (default: every column of a station file). ``allspark predict``
    asks for the feature columns only (:data:`FEATURE_COLUMNS`): its input may lack the target, and a column
    not asked for is not checked."""
    import pandas as pd

    try:
        df = pd.read_csv(path, na_values=["NA", ""], keep_default_na=True)
    except Exception as exc:  # pandas raises several types for unreadable text
        raise DatasetFormatError(f"PRSA: cannot read {path}: {exc}") from exc
    missing = [c for c in columns if c not in df.columns]
    if missing:
        raise DatasetFormatError(
            f"PRSA: {path} lacks column(s) {missing}; expected columns {list(columns)}, "
            f"got {list(df.columns)}"
        )
    for c in (c for c in (*CONTINUOUS, TARGET, "year", "month", "day", "hour") if c in columns):
        if not pd.api.types.is_numeric_dtype(df[c]):
            wrong = pd.to_numeric(df[c], errors="coerce").isna() & df[c].notna()
            k = int(np.argmax(wrong.to_numpy()))
            raise DatasetFormatError(f"PRSA: {path}, line {k + 2}: column {c!r} must be numeric (or NA), "
                                     f"found {df[c].iloc[k]!r}")
    for c, lo, hi in (("year", None, None), ("month", 1, 12), ("day", 1, 31), ("hour", 0, 23)):
        col = df[c].to_numpy(np.float64)
        with np.errstate(invalid="ignore"):
            bad = ~np.isfinite(col) | (col != np.round(col))
            if lo is not None:
                bad |= (col < lo) | (col > hi)
        if bad.any():
            k = int(np.argmax(bad))
            expected = "a whole number" + ("" if lo is None else f" in [{lo}, {hi}]")
            found = "NA (missing)" if np.isnan(col[k]) else f"{col[k]:g}"
            raise DatasetFormatError(f"PRSA: {path}, line {k + 2}: column {c!r} must be {expected}, found {found}")
    for c in (c for c in (*CONTINUOUS, TARGET) if c in columns):
        inf = np.isinf(df[c].to_numpy(np.float64))
        if inf.any():
            k = int(np.argmax(inf))
            raise DatasetFormatError(f"PRSA: {path}, line {k + 2}: column {c!r} must be a finite number or NA "
                                     f"(missing), found {df[c].iloc[k]:g} ({int(inf.sum())} infinite value(s) "
                                     "in the column)")
    if df["station"].isna().any():
        k = int(np.argmax(df["station"].isna().to_numpy()))
        raise DatasetFormatError(f"PRSA: {path}, line {k + 2}: column 'station' must name the station, found NA")
    wd = df["wd"]
    unknown = wd.notna() & ~wd.astype(str).isin(WIND_DIRECTIONS)
    if unknown.any():
        k = int(np.argmax(unknown.to_numpy()))
        raise DatasetFormatError(f"PRSA: {path}, line {k + 2}: column 'wd' must be one of {list(WIND_DIRECTIONS)} "
                                 f"or NA, found {wd.iloc[k]!r}")
    return df


@lru_cache(maxsize=2)
def _load_table(root: str, stamp: tuple) -> dict[str, np.ndarray]:
    """All station files as arrays (cached: the three splits read the same files)."""
    import pandas as pd

    files = find_station_files(Path(root))
    df = pd.concat([read_station_csv(f) for f in files], ignore_index=True)
    n_all = len(df)
    df = df[df[TARGET].notna()].reset_index(drop=True)
    if n_all != len(df):
        logger.info("PRSA: dropped %d of %d rows whose %s is missing", n_all - len(df), n_all, TARGET)
    return {
        "station": df["station"].astype(str).to_numpy(),
        "year": df["year"].to_numpy(np.int64),
        "month": df["month"].to_numpy(np.int64),
        "day": df["day"].to_numpy(np.int64),
        "hour": df["hour"].to_numpy(np.int64),
        "wd": df["wd"].astype(object).where(df["wd"].notna(), None).to_numpy(),
        "num": df[list(CONTINUOUS)].to_numpy(np.float64),
        "target": df[TARGET].to_numpy(np.float64),
    }


@DATASETS.register("prsa")
class PRSAAirQuality(ModalityDataset):
    """Rows of the PRSA station files -> ``cat`` [6] long, ``num`` [9], ``num_mask`` [9] bool, ``target`` [1]."""

    demo_version = 1

    def __init__(self, root, split: str, train_ratio: float = 0.4, val_ratio: float = 0.1,
                 split_seed: int = 0) -> None:
        super().__init__(root, split)
        if not 0 < train_ratio < 1 or not 0 <= val_ratio < 1:
            raise ConfigError(f"PRSA: data.args.train_ratio must be in (0, 1) and val_ratio in [0, 1), got "
                              f"{train_ratio}, {val_ratio}")
        files = find_station_files(self.root)
        stamp = tuple((f.name, f.stat().st_mtime_ns, f.stat().st_size) for f in files)
        t = _load_table(str(self.root), stamp)
        n = len(t["target"])
        if n < 10:
            raise DatasetFormatError(f"PRSA: only {n} rows with a PM2.5 value under {self.root}")
        perm = np.random.default_rng(split_seed).permutation(n)
        n_pool = int(round(train_ratio * n))
        n_val = int(round(val_ratio * n_pool))
        parts = {"val": perm[:n_val], "train": perm[n_val:n_pool], "test": perm[n_pool:]}
        train_idx = parts["train"]

        self.stations = sorted(set(t["station"]))
        years = sorted(set(t["year"].tolist()))
        self.first_year = years[0]
        station_index = {s: i + 1 for i, s in enumerate(self.stations)}
        wd_index = {w: i + 1 for i, w in enumerate(WIND_DIRECTIONS)}
        cat = np.stack([
            np.array([station_index[s] for s in t["station"]]),
            t["year"] - self.first_year + 1,
            t["month"],
            t["day"],
            t["hour"] + 1,
            np.array([0 if w is None else wd_index[str(w)] for w in t["wd"]]),
        ], axis=1)
        # Sizes of the embedding tables (index 0 = missing/unknown in each).
        self.cardinalities = [len(self.stations) + 1, len(years) + 1, 13, 32, 25, len(WIND_DIRECTIONS) + 1]
        if (cat < 0).any() or (cat >= np.array(self.cardinalities)).any():
            raise DatasetFormatError(f"PRSA: month/day/hour out of range under {self.root}")

        num = t["num"]
        observed = ~np.isnan(num)
        train_num = np.where(observed[train_idx], num[train_idx], np.nan)
        self.num_mean = np.nan_to_num(np.nanmean(train_num, axis=0))
        self.num_std = np.nan_to_num(np.nanstd(train_num, axis=0), nan=1.0)
        self.num_std[self.num_std <= 0] = 1.0
        scaled = np.where(observed, (num - self.num_mean) / self.num_std, 0.0)
        self.target_mean = float(t["target"][train_idx].mean())
        self.target_std = float(t["target"][train_idx].std()) or 1.0

        idx = parts[split]
        self.cat = torch.from_numpy(cat[idx].astype(np.int64))
        self.num = torch.from_numpy(scaled[idx].astype(np.float32))
        self.num_mask = torch.from_numpy(observed[idx])
        self.target = torch.from_numpy(t["target"][idx].astype(np.float32))[:, None]

    def __len__(self) -> int:
        return len(self.target)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return {"cat": self.cat[i], "num": self.num[i], "num_mask": self.num_mask[i], "target": self.target[i],
                "index": torch.tensor(i)}

    def info(self) -> dict[str, Any]:
        return {
            "cat_columns": list(DISCRETE),
            "cat_cardinalities": list(self.cardinalities),
            "num_columns": list(CONTINUOUS),
            "stations": self.stations,
            "target_name": TARGET,
            "target_mean": self.target_mean,
            "target_std": self.target_std,
            # fitted on the training split (with ``stations`` and ``cat_cardinalities`` above): stored in the
            # checkpoint, so predict encodes new rows without the training data
            "preprocessing": {"first_year": int(self.first_year), "num_mean": self.num_mean.tolist(),
                              "num_std": self.num_std.tolist()},
        }

    @classmethod
    def write_demo(cls, root, seed: int = 0) -> None:
        """Four station files of 800 hours each, in the official CSV format (``NA`` for missing values).

        PM2.5 follows the pollutants (CO and NO2 above all), falls with wind speed and rises with humidity
        (dew point), with a station offset and a daily cycle, plus noise -- learnable, and far from the
        training mean. About 3% of the feature values and 2% of the targets are ``NA``.
        """
        import pandas as pd

        root = Path(root)
        rng = np.random.default_rng(seed)
        hours = pd.date_range("2013-03-01", periods=800, freq="h")
        for k, station in enumerate(DEMO_STATIONS):
            n = len(hours)
            hour = hours.hour.to_numpy()
            daily = np.sin(2 * np.pi * (hour - 8) / 24)
            stagnation = np.convolve(rng.normal(size=n + 23), np.ones(24) / 24 ** 0.5, mode="valid")[:n]
            wspm = np.clip(2.0 - 0.6 * stagnation + rng.normal(0, 0.5, n), 0.1, None)
            temp = 12 + 8 * daily + rng.normal(0, 2, n)
            dewp = -2 + 0.6 * temp + 3 * stagnation + rng.normal(0, 2, n)
            pres = 1012 - 0.3 * temp + rng.normal(0, 3, n)
            rain = np.where(rng.random(n) < 0.05, rng.exponential(2, n), 0.0)
            co = np.clip(1000 + 500 * stagnation + 200 * daily + rng.normal(0, 150, n), 100, None)
            no2 = np.clip(45 + 15 * stagnation + 10 * daily + rng.normal(0, 8, n), 2, None)
            so2 = np.clip(12 + 4 * stagnation + rng.normal(0, 3, n), 1, None)
            o3 = np.clip(60 - 10 * stagnation + 30 * daily + rng.normal(0, 10, n), 1, None)
            pm25 = np.clip(20 + 15 * k + 0.06 * co + 0.8 * no2 - 8 * wspm + 1.5 * dewp - 10 * rain
                           + rng.normal(0, 8, n), 3, None)
            pm10 = pm25 * 1.3 + rng.normal(0, 5, n)
            wd = np.array(WIND_DIRECTIONS, dtype=object)[rng.integers(0, 16, n)]
            df = pd.DataFrame({
                "No": np.arange(1, n + 1), "year": hours.year, "month": hours.month, "day": hours.day,
                "hour": hour, "PM2.5": pm25.round(1), "PM10": pm10.round(1), "SO2": so2.round(1),
                "NO2": no2.round(1), "CO": co.round(0), "O3": o3.round(1), "TEMP": temp.round(1),
                "PRES": pres.round(1), "DEWP": dewp.round(1), "RAIN": rain.round(1), "wd": wd,
                "WSPM": wspm.round(1), "station": station,
            })
            for col in (*CONTINUOUS, "wd"):
                df.loc[rng.random(n) < 0.03, col] = np.nan
            df.loc[rng.random(n) < 0.02, "PM2.5"] = np.nan
            path = root / f"PRSA_Data_{station}_20130301-20170228.csv"
            with atomic_file(path) as tmp:
                df.to_csv(tmp, index=False, na_rep="NA")
