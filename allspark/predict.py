"""``allspark predict``: a trained checkpoint on unlabelled input in its modality's own form.

A *predictor* per dataset reader turns the user's files into the items the model was trained on, with the
reader's own preprocessing (and, where the reader fits statistics on the training split, the statistics of
that split, never statistics of the input), runs the model in batches through accelerate (as ``evaluate.py``
does: the same :func:`allspark.evaluation.collect_predictions`, and for a hyperspectral scene the same tiled
:meth:`PixelClassificationEvaluator.predict_scene`) and writes the predictions atomically:

============================  ==============================================  =====================================
reader (config)               input                                           output
============================  ==============================================  =====================================
``nwpu_resisc45`` (rgb)       image files, or folders of them (recursive)     one row per file: class and top-k
``eurosat_ms`` (msi)          13-band GeoTIFF tiles, or folders of them       probabilities (CSV or JSON)
``mstar_soc`` (sar)           SAR chip images, or folders of them
``modelnet40`` (pointcloud)   point files (``x,y,z,nx,ny,nz`` rows)
``ucf101`` (video)            video files (.avi, .mp4, ...)
``imdb`` (text)               UTF-8 ``.txt`` files, or folders of them        one row per file: label and top-k
``pavia_university`` (hsi)    one scene: a ``.mat`` cube or a GeoTIFF cube    class-map GeoTIFF (the input's
                                                                              georeferencing kept), PNG preview,
                                                                              a legend with pixel counts
``prsa`` (table)              PRSA station CSVs (the target column may be     one row per CSV row: the predicted
                              absent; if present it is ignored)               target
``eth_ucy`` (trajectory)      ``frame ped_id x y`` text files                 one row per pedestrian and observed
                                                                              window: the future positions
``metr_la`` (graph)           one sensor-readings ``.h5`` (HDFStore)          one forecast per input window: the
                                                                              next readings of every sensor
``vaihingen``, ``globe230k``  folders of tiles in the reader's layout         one label map per tile (PNG in the
(segmentation)                (``top/`` + ``dsm/``; ``rgb/``, ``ndvi/`` ...)  dataset's coding; a GeoTIFF too for
                                                                              georeferenced tiles) and a table of
                                                                              the tiles
============================  ==============================================  =====================================

What comes from where:

- the model, its config and ``data_info.json`` (class names, band count, scene size) come from the checkpoint
  (a run folder, whose ``best/`` is used, or a ``save_pretrained`` folder: :func:`resolve_checkpoint`);
- the preprocessing is the reader's: the reader's own ``__getitem__`` on a copy of the reader whose file list is
  the input (image readers), its decoding functions (``read_review``, ``read_station_csv``, ``read_mat_array``);
- statistics the reader fits on the training split (the per-band mean/std of Pavia and EuroSAT, the PRSA
  feature scaling, station list and first year, the graph reader's mean/std) are in the checkpoint's
  ``data_info.json`` (the reader's ``info()``, ``preprocessing`` and the keys beside it, written by training), so
  prediction needs no training data. A checkpoint written before ``preprocessing`` was stored takes them from the
  training reader, rebuilt from the checkpoint config's ``data.root`` (``demo`` rebuilds the demo set) or
  ``--data-root``, whose ``info()`` must equal the checkpoint's ``data_info.json`` (so they are the statistics the
  model was trained with). They are never fitted on the input.
- batch size: the config's ``data.eval_batch_size`` unless given; precision: the config's
  ``train.mixed_precision`` (``auto`` by default) unless given, resolved as in training and evaluation.

Errors the user causes (a missing input, a checkpoint folder without weights, an input whose bands, size or
columns differ from what the checkpoint was trained on) raise :class:`allspark.errors.UserError` naming the file
and the expected and found values; every output is staged beside its target and renamed into place only once all
of them are written, so a failed run leaves no output, whole or partial.
"""
from __future__ import annotations

import contextlib
import copy
import csv
import dataclasses
import inspect
import io
import json
import logging
from pathlib import Path
from typing import Any, ClassVar, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from allspark.config import ConfigError, config_from_yaml_text
from allspark.errors import UserError, UserFileNotFoundError
from allspark.io import atomic_file

logger = logging.getLogger(__name__)

__all__ = ["predict", "PREDICTORS", "Predictor", "read_scene_cube", "GEO_TAGS", "FORMATS"]

FORMATS = ("csv", "json")
#: the TIFF tags that hold a GeoTIFF's georeferencing (copied from an input scene to its class map)
GEO_TAGS = {
    33550: "ModelPixelScaleTag",
    33922: "ModelTiepointTag",
    34264: "ModelTransformationTag",
    34735: "GeoKeyDirectoryTag",
    34736: "GeoDoubleParamsTag",
    34737: "GeoAsciiParamsTag",
}
TIFF_SUFFIXES = (".tif", ".tiff")


def _f32(x: Any) -> float:
    """A float32 value as the shortest decimal that reads back to the same float32 (9 significant digits)."""
    return float(f"{float(x):.9g}")


def _default_collate(items):
    from torch.utils.data import default_collate

    return default_collate(items)


# -- the predictors -------------------------------------------------------------------------------------------------



def _one_file(inputs, expected: str):
    """The single input file of a predictor that reads one file (a scene, a sensor series); else one clear error."""
    if len(inputs) != 1 or inputs[0].is_dir():
        raise ConfigError(f"--input: {expected}; got {', '.join(map(str, inputs))}")
    return inputs[0]

class Predictor:
    """Turns one reader's unlabelled input into batches and the model's outputs into predictions.

    ``load`` validates the input (before the model is built, where that is possible) and returns a dataset
    whose items are what the reader gives, without labels; ``run`` predicts; ``write`` stages the outputs."""

    #: the reader names (``data.dataset``) this predictor serves
    datasets: ClassVar[tuple[str, ...]] = ()
    #: ``rows``: a CSV/JSON table of predictions; ``scene``: a class map (GeoTIFF + PNG) and a legend; ``tiles``: a
    #: label map per input tile and a table of the tiles
    kind: ClassVar[str] = "rows"
    #: what the input is, for messages and ``--help``
    input_help: ClassVar[str] = ""
    pred_keys: ClassVar[tuple[str, ...]] = ("pred",)

    def __init__(self, cfg, info: dict[str, Any], checkpoint: Path, *, data_root: str | None = None,
                 top_k: int = 5) -> None:
        self.cfg, self.info, self.checkpoint = cfg, info, checkpoint
        self.data_root, self.top_k = data_root, top_k
        self._reference = None

    # -- helpers shared by the predictors
    def reader_class(self):
        from allspark.data import import_readers
        from allspark.registry import DATASETS

        import_readers()
        return DATASETS.get(self.cfg.data.dataset)

    def reader_args(self) -> dict[str, Any]:
        """The reader's constructor arguments: the config's ``data.args`` over the reader's defaults."""
        cls = self.reader_class()
        sig = inspect.signature(cls.__init__)
        try:
            bound = sig.bind(None, "<root>", "test", **dict(self.cfg.data.args))
        except TypeError as exc:
            raise ConfigError(f"{self.checkpoint}/config.yaml: data.args do not fit the {self.cfg.data.dataset} "
                              f"reader: {exc}") from None
        bound.apply_defaults()
        return dict(bound.arguments)

    def training_reader(self):
        """The reader of the training split the checkpoint was trained on, for the statistics it fitted there
        (its ``info()`` must equal the checkpoint's ``data_info.json``)."""
        if self._reference is not None:
            return self._reference
        from allspark.config import Config, apply_overrides, from_dict, to_dict
        from allspark.data import build_dataset, resolve_data_root

        cfg = self.cfg
        if self.data_root is not None:
            cfg = from_dict(Config, apply_overrides(to_dict(cfg), {"data.root": self.data_root}))
        why = (f"predict takes the normalisation the {cfg.data.dataset} reader fitted on the training split (it is "
               f"not in {self.checkpoint}/data_info.json) from the training data")
        try:
            root = resolve_data_root(cfg)
            reader = build_dataset(cfg, "train", root)
        except UserError as exc:
            raise type(exc)(f"{why}, which cannot be read: {exc}. Pass --data-root with the training data folder") \
                from None
        except (FileNotFoundError, NotADirectoryError, PermissionError) as exc:
            raise UserFileNotFoundError(f"{why}, which cannot be read: {exc}. Pass --data-root with the training "
                                        "data folder") from None
        found = json.loads(json.dumps(reader.info(), default=float))
        expected = json.loads(json.dumps(self.info, default=float))
        if "preprocessing" not in expected:  # a checkpoint from before the statistics were stored in it
            found.pop("preprocessing", None)
        differ = [k for k in sorted(set(found) | set(expected)) if found.get(k) != expected.get(k)]
        if differ:
            k = differ[0]
            raise UserError(
                f"{why}: the data at {root} is not the checkpoint's training data: {self.checkpoint}/data_info.json "
                f"has {k} = {expected.get(k)!r}, the data gives {found.get(k)!r}"
                + (f" ({len(differ)} keys differ: {differ})" if len(differ) > 1 else "")
                + ". Pass --data-root with the data the checkpoint was trained on")
        logger.info("normalisation of the training split from %s (%s reader)", root, cfg.data.dataset)
        self._reference = reader
        return reader

    def fitted(self, keys: Sequence[str]) -> dict[str, Any]:
        """The statistics the reader fitted on the training split (``keys`` of its ``preprocessing``): from the
        checkpoint's ``data_info.json``; for a checkpoint written before they were stored there, from the
        training reader (which needs the training data: :meth:`training_reader`)."""
        stored = self.info.get("preprocessing")
        source = f"{self.checkpoint}/data_info.json"
        if stored is None:
            logger.warning("%s has no 'preprocessing' (a checkpoint from an older allspark): the statistics "
                           "fitted on the training split are taken from the training data", source)
            stored, source = self.training_reader().info()["preprocessing"], "the training data"
        missing = [k for k in keys if k not in stored] if isinstance(stored, dict) else list(keys)
        if missing:
            raise UserError(f"{source}: 'preprocessing' lacks {missing}; expected the keys {list(keys)} "
                            f"the {self.cfg.data.dataset} reader fits on the training split")
        return stored

    def fitted_vector(self, stats: dict[str, Any], key: str, size: int, dtype=np.float64) -> np.ndarray:
        """``stats[key]`` as a vector of ``size`` finite numbers, else one clear error naming the checkpoint."""
        value = np.asarray(stats[key], dtype=np.float64)
        if value.shape != (size,) or not np.isfinite(value).all():
            raise UserError(f"{self.checkpoint}/data_info.json: preprocessing.{key} must be {size} finite numbers, "
                            f"found shape {list(value.shape)}")
        return value.astype(dtype)

    #: the names a ``--labels`` file put in place of the trained ones (``predict(labels=...)``), else None
    label_set: list[str] | None = None

    @property
    def class_names(self) -> list[str]:
        if self.label_set is not None:
            return list(self.label_set)
        k = int(self.info.get("num_classes") or 0)
        names = self.info.get("class_names") or []
        return [str(n) for n in names] if len(names) == k else [str(i) for i in range(k)]

    # -- the interface
    def load(self, inputs: list[Path]) -> Dataset:
        raise NotImplementedError

    def run(self, model, dataset: Dataset, accelerator, batch_size: int, loading: dict[str, Any] | None = None
            ) -> dict[str, np.ndarray]:
        """The model's outputs (``pred_keys``) and ``index`` for every item, in item order. ``loading``: the
        DataLoader worker settings (:func:`allspark.data.loader_options`; default: none)."""
        from allspark.data import build_loader
        from allspark.evaluation import collect_predictions

        loader = accelerator.prepare(build_loader(dataset, batch_size, **(loading or {})))
        got = collect_predictions(model, loader, accelerator, self.pred_keys, ("index",), "predict",
                                  inference_mode=True)
        order = np.argsort(got["index"], kind="stable")  # the processes' shards back in input order
        return {k: v[order] for k, v in got.items()}

    def rows(self, dataset, gathered: dict[str, np.ndarray]) -> list[dict[str, Any]]:
        raise NotImplementedError

    def input_outputs(self, out: Path) -> dict[str, Path]:
        """Outputs named after the input (known once :meth:`load` has read it), beside :meth:`outputs`' ones;
        none by default."""
        return {}

    def outputs(self, out: Path, fmt: str | None) -> dict[str, Path]:
        """The files ``write`` makes: ``{"predictions": out}`` (a file) or ``out/predictions.<fmt>``."""
        fmt = _format_for(out, fmt, FORMATS)
        path = out if out.suffix.lower() in (".csv", ".json") and not out.is_dir() else out / f"predictions.{fmt}"
        return {"predictions": path}

    def write(self, staged: dict[str, Path], targets: dict[str, Path], fmt: str, result: dict[str, Any],
              meta: dict[str, Any]) -> None:
        write_rows(staged["predictions"], fmt, result["rows"], meta)


def _format_for(out: Path, fmt: str | None, suffixes: Sequence[str]) -> str:
    """``--format``, or the one the ``--out`` file's suffix names; csv by default."""
    suffix = out.suffix.lower().lstrip(".")
    named = suffix if suffix in suffixes and not out.is_dir() else None
    if fmt is not None and named is not None and fmt != named:
        raise ConfigError(f"--format {fmt} but --out {out} ends in .{named}; give one or make them agree")
    return fmt or named or "csv"


class _Unlabelled(Dataset):
    """A reader whose file list is the input, its items without the placeholder label (-1)."""

    def __init__(self, reader, names: list[str], drop: Sequence[str] = ("label",)) -> None:
        self.reader, self.names, self.drop = reader, names, tuple(drop)
        self.collate = reader.collate

    def __len__(self) -> int:
        return len(self.reader)

    def __getitem__(self, i: int) -> dict[str, Any]:
        item = dict(self.reader[i])
        for k in self.drop:
            item.pop(k, None)
        return item


def list_input_files(inputs: Sequence[Path], extensions: Sequence[str], what: str) -> list[Path]:
    """The input files: each file as given, each folder's files with one of ``extensions`` (recursively, hidden
    files and folders skipped, sorted by their path inside the folder)."""
    exts = tuple(e.lower() for e in extensions)
    files: list[Path] = []
    for p in inputs:
        if p.is_dir():
            found = sorted((f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in exts
                            and not any(part.startswith(".") for part in f.relative_to(p).parts)),
                           key=lambda f: f.relative_to(p).as_posix())
            if not found:
                raise UserFileNotFoundError(f"input folder {p} holds no {what} file ({', '.join(exts)})")
            files.extend(found)
        elif p.is_file():
            files.append(p)
        else:
            raise UserFileNotFoundError(f"input {p} does not exist")
    return files


#: the files a folder is searched for, per reader of one file per sample
VIDEO_EXTENSIONS = (".avi", ".mp4", ".mkv", ".mov", ".webm")


class ImageClassificationPredictor(Predictor):
    """Files of one sample each (images, SAR chips, multispectral tiles, point clouds, videos) -> one row per
    file: the predicted class and the top-k class probabilities."""

    datasets = ("nwpu_resisc45", "eurosat_ms", "mstar_soc", "modelnet40", "ucf101")
    input_help = "image files (rgb, sar), GeoTIFF tiles (msi), point files (pointcloud) or videos (video), or " \
                 "folders of them (searched recursively)"
    pred_keys = ("pred", "logits")

    def extensions(self) -> tuple[str, ...]:
        from allspark.data.image_folder import IMAGE_EXTENSIONS
        from allspark.data.mstar import CHIP_EXTENSIONS

        return {"eurosat_ms": TIFF_SUFFIXES, "modelnet40": (".txt",), "ucf101": VIDEO_EXTENSIONS,
                "mstar_soc": CHIP_EXTENSIONS}.get(self.cfg.data.dataset, IMAGE_EXTENSIONS)

    def reader_for(self, files: list[Path]):
        """A reader whose samples are ``files`` (label -1): its ``__getitem__`` is the training preprocessing."""
        cls, name = self.reader_class(), self.cfg.data.dataset
        samples = [(f, -1) for f in files]
        args = self.reader_args()
        reader = cls.__new__(cls)  # no data folder: only what __getitem__ reads, set as __init__ sets it
        reader.samples = samples
        if name == "eurosat_ms":  # the per-band statistics of the training tiles, from the checkpoint
            stats = self.fitted(("band_mean", "band_std"))
            reader.bands, reader.image_size = int(self.info["num_bands"]), int(self.info["image_size"])
            reader.scale, reader.resize = float(args["scale"]), bool(args["resize"])
            for key in ("band_mean", "band_std"):
                setattr(reader, key, self.fitted_vector(stats, key, reader.bands, np.float32)[:, None, None])
        elif name == "nwpu_resisc45":
            reader.image_size = int(args["image_size"])
            reader.mean = np.asarray(args["mean"], np.float32)[:, None, None]
            reader.std = np.asarray(args["std"], np.float32)[:, None, None]
        elif name == "mstar_soc":  # centre crop, no training jitter, per-chip standardisation
            reader.crop_size = int(args["crop_size"])
            reader.jitter = 0
            if self.info.get("channels") is not None:  # a chip of another channel count: one error naming it
                reader.channels = int(self.info["channels"])
                reader._channels_from = f"the checkpoint's {self.checkpoint}/data_info.json says"
        elif name == "modelnet40":  # the first num_points rows, into the unit sphere, no augmentation
            reader.num_points, reader.use_normals = int(args["num_points"]), bool(args["use_normals"])
            reader.augment = False
        else:  # ucf101: the centred clip of evaluation
            reader.split = "test"
            reader.num_frames, reader.frame_stride = int(args["num_frames"]), int(args["frame_stride"])
            reader.image_size = int(args["image_size"])
            reader.mean = torch.tensor(args["mean"], dtype=torch.float32).view(3, 1, 1, 1)
            reader.std = torch.tensor(args["std"], dtype=torch.float32).view(3, 1, 1, 1)
        return reader

    def load(self, inputs):
        what = {"eurosat_ms": "GeoTIFF", "modelnet40": "point", "ucf101": "video"}.get(self.cfg.data.dataset, "image")
        files = list_input_files(inputs, self.extensions(), what)
        return _Unlabelled(self.reader_for(files), [str(f) for f in files])

    def rows(self, dataset, gathered):
        return classification_rows(dataset.names, gathered["pred"], gathered["logits"], self.class_names, self.top_k)


class TextClassificationPredictor(Predictor):
    """UTF-8 text files -> one row per file: the label whose word the model finds likeliest (the language-model
    head's scoring of the label words), the top-k label probabilities (a softmax over those log-likelihoods) and
    whether the text was cut to the token budget."""

    datasets = ("imdb",)
    input_help = "UTF-8 .txt files, or folders of them (searched recursively)"
    pred_keys = ("pred", "choice_loglik", "truncated")

    def load(self, inputs):
        from allspark.data.imdb import read_review

        files = list_input_files(inputs, (".txt",), "text")
        return _Texts(files, read_review)

    def rows(self, dataset, gathered):
        rows = classification_rows(dataset.names, gathered["pred"], gathered["choice_loglik"], self.class_names,
                                   self.top_k)
        for row, cut in zip(rows, gathered["truncated"]):
            row["truncated"] = bool(cut)
        return rows


class _Texts(Dataset):
    def __init__(self, files: list[Path], read) -> None:
        self.files, self.read = files, read
        self.names = [str(f) for f in files]

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return {"input_text": self.read(self.files[i]), "index": torch.tensor(i, dtype=torch.int64)}

    collate = staticmethod(_default_collate)


def classification_rows(names: Sequence[str], pred: np.ndarray, scores: np.ndarray, class_names: Sequence[str],
                        top_k: int) -> list[dict[str, Any]]:
    """Rows ``{file, pred, class_name, prob, top_k: [{index, class_name, prob}]}``; ``scores``: logits (or
    log-likelihoods) per class, turned into probabilities by a softmax."""
    scores = torch.from_numpy(np.asarray(scores, np.float32))
    probs = torch.softmax(scores, dim=-1).numpy()
    k = min(top_k, probs.shape[1])
    order = np.argsort(-scores.numpy(), axis=1, kind="stable")[:, :k]  # ties: the lower index, as argmax
    rows = []
    for i, name in enumerate(names):
        p = int(pred[i])
        rows.append({"file": name, "pred": p, "class_name": class_names[p], "prob": _f32(probs[i, p]),
                     "top_k": [{"index": int(j), "class_name": class_names[j], "prob": _f32(probs[i, j])}
                               for j in order[i]]})
    return rows


class TablePredictor(Predictor):
    """PRSA-style CSV files -> one row per CSV row: the predicted target (PM2.5), with the row's file, line,
    station and time. The target column may be absent; when present it is ignored."""

    datasets = ("prsa",)
    input_help = "PRSA station CSV files (the target column may be absent), or folders of them"

    def load(self, inputs):
        from allspark.data.prsa import FEATURE_COLUMNS, read_station_csv

        files = list_input_files(inputs, (".csv",), "CSV")
        frames = [(f, read_station_csv(f, FEATURE_COLUMNS)) for f in files]
        if not sum(len(df) for _, df in frames):
            raise UserError(f"no rows to predict in {', '.join(str(f) for f in files)}")
        stats = self.fitted(("first_year", "num_mean", "num_std"))
        size = len(self.info["num_columns"])
        ref = _TableEncoding(stations=[str(s) for s in self.info["stations"]],
                             cardinalities=[int(c) for c in self.info["cat_cardinalities"]],
                             first_year=int(stats["first_year"]),
                             num_mean=self.fitted_vector(stats, "num_mean", size),
                             num_std=self.fitted_vector(stats, "num_std", size), collate=self.reader_class().collate)
        return _TableRows(frames, ref)

    def rows(self, dataset, gathered):
        name = f"pred_{self.info.get('target_name', 'target')}"
        pred = gathered["pred"].reshape(len(gathered["pred"]), -1)
        rows = []
        for meta, value in zip(dataset.meta, pred):
            rows.append({**meta, name: _f32(value[0]) if len(value) == 1 else [_f32(v) for v in value]})
        return rows


@dataclasses.dataclass
class _TableEncoding:
    """What the PRSA reader fitted on the training split (the station list, the embedding tables' sizes, the first
    year, the feature scaling), as the checkpoint's ``data_info.json`` holds it."""

    stations: list[str]
    cardinalities: list[int]
    first_year: int
    num_mean: np.ndarray
    num_std: np.ndarray
    collate: Any


class _TableRows(Dataset):
    """The rows of PRSA-style frames as the reader's features (``cat``, ``num``, ``num_mask``), encoded with the
    training reader's station list, first year and feature scaling (the formulas of ``PRSAAirQuality``)."""

    def __init__(self, frames, ref) -> None:
        from allspark.data.prsa import CONTINUOUS, WIND_DIRECTIONS

        station_index = {s: i + 1 for i, s in enumerate(ref.stations)}
        wd_index = {w: i + 1 for i, w in enumerate(WIND_DIRECTIONS)}
        cards = np.asarray(ref.cardinalities)
        cats, nums, self.meta = [], [], []
        for path, df in frames:
            station = df["station"].astype(str).to_numpy()
            year, month, day, hour = (df[c].to_numpy(np.int64) for c in ("year", "month", "day", "hour"))
            wd = df["wd"].astype(object).where(df["wd"].notna(), None).to_numpy()
            cat = np.stack([
                np.array([station_index.get(s, 0) for s in station], dtype=np.int64),
                year - ref.first_year + 1,
                month,
                day,
                hour + 1,
                np.array([0 if w is None else wd_index[str(w)] for w in wd], dtype=np.int64),
            ], axis=1).reshape(len(df), 6)
            unseen_station = sorted(set(station) - set(ref.stations))
            if unseen_station:
                logger.warning("%s: station(s) %s were not in the training data; their rows use the 'unknown' "
                               "station embedding", path, unseen_station)
            bad_year = (cat[:, 1] < 1) | (cat[:, 1] >= cards[1])
            if bad_year.any():
                logger.warning("%s: %d row(s) of years the training data did not cover (%s); they use the "
                               "'unknown' year embedding", path, int(bad_year.sum()), sorted(set(year[bad_year])))
                cat[bad_year, 1] = 0
            cats.append(cat)
            nums.append(df[list(CONTINUOUS)].to_numpy(np.float64))
            self.meta += [{"file": str(path), "line": k + 2, "station": str(s), "year": int(y), "month": int(m),
                           "day": int(d), "hour": int(h)}
                          for k, (s, y, m, d, h) in enumerate(zip(station, year, month, day, hour))]
        num = np.concatenate(nums)
        observed = ~np.isnan(num)
        scaled = np.where(observed, (num - ref.num_mean) / ref.num_std, 0.0)
        self.cat = torch.from_numpy(np.concatenate(cats).astype(np.int64))
        self.num = torch.from_numpy(scaled.astype(np.float32))
        self.num_mask = torch.from_numpy(observed)
        self.collate = ref.collate

    def __len__(self) -> int:
        return len(self.cat)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return {"cat": self.cat[i], "num": self.num[i], "num_mask": self.num_mask[i], "index": torch.tensor(i)}


class TrajectoryPredictor(Predictor):
    """Trajectory text files (``frame ped_id x y`` lines, as ETH-UCY) -> one row per observed window: every
    pedestrian present in ``obs_len`` consecutive, evenly spaced frames of a file gets the ``pred_len`` future
    positions the model predicts after that window (absolute coordinates, and the offsets from the last observed
    position the model outputs). The windows, neighbours and relative coordinates are the reader's
    (:func:`allspark.data.eth_ucy.extract_windows`), without the future part: nothing of the future is read."""

    datasets = ("eth_ucy",)
    input_help = "trajectory .txt files ('frame ped_id x y' lines), or folders of them"

    def load(self, inputs):
        from allspark.data.eth_ucy import extract_windows, read_trajectory_file

        args = self.reader_args()
        obs_len, k = int(self.info.get("obs_len", args["obs_len"])), int(self.info.get("max_neighbours",
                                                                                       args["max_neighbours"]))
        files = list_input_files(inputs, (".txt",), "trajectory")
        tracks, neigh, counts, self.meta = [], [], [], []
        for f in files:
            data = read_trajectory_file(f)
            keys: list = []
            t, n, c = extract_windows(data, obs_len, 0, k, f, keys)
            frames = np.unique(data[:, 0])
            step = _number(np.median(np.diff(frames))) if len(frames) > 1 else 0  # the reader's frame step
            tracks += t
            neigh += n
            counts += c
            self.meta += [{"file": str(f), "ped": _number(ped), "frame": _number(frame), "frame_step": step}
                          for frame, ped in keys]
        if not tracks:
            raise UserError(f"no pedestrian is present in {obs_len} consecutive frames (the observed window the "
                            f"checkpoint was trained on) in {', '.join(str(f) for f in files)}")
        tracks = np.stack(tracks)
        origin = tracks[:, obs_len - 1: obs_len]  # as ETHUCYTrajectories: relative to the last observed position
        self.origin = origin[:, 0]
        obs = torch.from_numpy((tracks - origin).astype(np.float32))
        neighbours = torch.from_numpy((np.stack(neigh) - origin[:, None]).astype(np.float32))
        mask = torch.arange(k)[None, :] < torch.tensor(counts)[:, None]
        neighbours[~mask] = 0.0
        return _Tensors({"obs": obs, "neighbours": neighbours, "neighbours_mask": mask})

    def rows(self, dataset, gathered):
        pred = gathered["pred"].astype(np.float32)  # [n, pred_len, 2], offsets from the last observed position
        rows = []
        for meta, origin, offsets in zip(self.meta, self.origin, pred):
            future = offsets.astype(np.float64) + origin
            row = {**meta, "x": float(origin[0]), "y": float(origin[1])}
            for j, (x, y) in enumerate(future, start=1):
                row[f"x{j}"], row[f"y{j}"] = round(float(x), 6), round(float(y), 6)
            row["offsets"] = [[_f32(a), _f32(b)] for a, b in offsets]
            rows.append(row)
        return rows

    def write(self, staged, targets, fmt, result, meta):
        rows = result["rows"]
        if fmt == "csv":  # the absolute positions only; JSON also gives the offsets the model output
            rows = [{k: v for k, v in r.items() if k != "offsets"} for r in rows]
        write_rows(staged["predictions"], fmt, rows, meta)


class GraphForecastPredictor(Predictor):
    """A sensor-readings file (a pandas HDFStore as ``metr-la.h5``: rows indexed by time, one column per sensor,
    0 = no reading) -> one forecast per window of ``input_len`` consecutive rows: the next ``output_len`` readings
    of every sensor. The series is read and put on its time grid by the reader's own code; the inputs are
    standardised with the training mean and std stored in the checkpoint (``target_mean``/``target_std`` of
    ``data_info.json``), and the sensor graph is the checkpoint's. The last window forecasts past the file's end."""

    datasets = ("metr_la",)
    input_help = "one sensor-readings .h5 file (pandas HDFStore, rows by time, one column per sensor)"

    def load(self, inputs):
        from allspark.data.metr_la import _load_series

        path = _one_file(inputs, f"a {self.cfg.modality} checkpoint forecasts one sensor-readings .h5 file")
        st = path.stat()
        times, columns, values, interval, _, _ = _load_series(str(path), (st.st_size, st.st_mtime_ns))
        ids = [str(i) for i in self.info["sensor_ids"]]
        if set(columns) != set(ids) or len(columns) != len(ids):
            raise UserError(
                f"{path}: the readings have {len(columns)} sensor columns; the checkpoint was trained on {len(ids)} "
                f"sensors (only in the file: {sorted(set(columns) - set(ids))[:5]}, missing from it: "
                f"{sorted(set(ids) - set(columns))[:5]})")
        if int(interval) != int(self.info["interval_s"]):
            raise UserError(f"{path}: readings every {interval} s; the checkpoint was trained on readings every "
                            f"{self.info['interval_s']} s")
        self.input_len, self.output_len = int(self.info["input_len"]), int(self.info["output_len"])
        if len(times) < self.input_len:
            raise UserError(f"{path}: {len(times)} time step(s); a forecast needs {self.input_len} (the checkpoint's "
                            "input_len)")
        values = values[:, [columns.index(i) for i in ids]]  # the training column order
        mean, std = float(self.info["target_mean"]), float(self.info["target_std"])
        mask = values != 0
        scaled = torch.from_numpy(np.where(mask, (values - mean) / std, 0.0).astype(np.float32))  # the reader's
        ts = times.astype("datetime64[s]").astype(np.int64)
        tod = torch.from_numpy(((ts % 86400) // interval).astype(np.int64))
        dow = torch.from_numpy((((ts // 86400) + 3) % 7).astype(np.int64))
        n = len(times) - self.input_len + 1
        self.times, self.interval, self.sensor_ids, self.path = times, int(interval), ids, path
        return _Windows(scaled, tod, dow, n, self.input_len)

    def rows(self, dataset, gathered):
        pred = gathered["pred"].reshape(len(gathered["pred"]), self.output_len, len(self.sensor_ids))
        step = np.timedelta64(self.interval, "s")
        rows = []
        for w, forecast in enumerate(pred):
            end = self.times[w + self.input_len - 1]
            rows.append({"window_end": str(end.astype("datetime64[s]")),
                         "times": [str((end + step * (h + 1)).astype("datetime64[s]")) for h in range(self.output_len)],
                         "forecast": [[_f32(v) for v in row] for row in forecast]})
        return rows

    def write(self, staged, targets, fmt, result, meta):
        meta = {**meta, "input": str(self.path), "sensor_ids": self.sensor_ids, "interval_s": self.interval}
        if fmt == "json":
            write_rows(staged["predictions"], fmt, result["rows"], meta)
            return
        flat = []  # CSV: one line per window and horizon step, a column per sensor
        for r in result["rows"]:
            for h, (time, values) in enumerate(zip(r["times"], r["forecast"]), start=1):
                flat.append({"window_end": r["window_end"], "time": time, "step": h,
                             **dict(zip(self.sensor_ids, values))})
        write_rows(staged["predictions"], fmt, flat, meta)


class _Windows(Dataset):
    """Item ``i``: rows ``i .. i + input_len - 1`` of the series, as the graph reader's items (``x`` [T, N, 1],
    ``tod``, ``dow``), sliced when read."""

    def __init__(self, scaled, tod, dow, n: int, input_len: int) -> None:
        self.scaled, self.tod, self.dow, self.n, self.input_len = scaled, tod, dow, n, input_len

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict[str, Any]:
        e = i + self.input_len
        return {"x": self.scaled[i:e, :, None], "tod": self.tod[i:e], "dow": self.dow[i:e], "index": torch.tensor(i)}

    collate = staticmethod(_default_collate)


def _number(x: float) -> int | float:
    return int(x) if float(x).is_integer() else float(x)


class _Tensors(Dataset):
    """Items ``{key: tensor[i]}`` of equally long tensors, plus ``index``."""

    def __init__(self, tensors: dict[str, torch.Tensor]) -> None:
        self.tensors = tensors

    def __len__(self) -> int:
        return len(next(iter(self.tensors.values())))

    def __getitem__(self, i: int) -> dict[str, Any]:
        return {**{k: v[i] for k, v in self.tensors.items()}, "index": torch.tensor(i)}

    collate = staticmethod(_default_collate)


# -- hyperspectral scenes ---------------------------------------------------------------------------------------


def read_scene_cube(path: Path, bands: int, *, cube_key: str | None = None
                    ) -> tuple[np.ndarray, list[tuple[int, int, int, Any]]]:
    """A hyperspectral scene as float32 H x W x ``bands`` and the GeoTIFF georeferencing tags of a TIFF input
    (``(code, datatype, count, value)``; none for a .mat file).

    ``.mat``: the cube variable of the Pavia reader (``paviaU``, or the file's one 3-D array; v5 or v7.3).
    ``.tif``/``.tiff``: read with tifffile, bands last (H x W x bands, one pixel's bands contiguous) or first
    (bands x H x W: separate planes or one page per band). Refused, naming the file: another band count,
    a cube that is not 3-D real numeric, NaN or infinite values."""
    from allspark.data.base import DatasetFormatError

    suffix = path.suffix.lower()
    geo: list[tuple[int, int, int, Any]] = []
    if suffix == ".mat":
        from allspark.data.pavia import CUBE_KEY, read_mat_array

        cube = read_mat_array(path, cube_key or CUBE_KEY, 3, "the hyperspectral cube")
        layout = "H x W x bands"
        if cube.ndim == 3 and cube.shape[-1] != bands:
            raise DatasetFormatError(f"{path}: the cube is {' x '.join(map(str, cube.shape))} ({layout}), "
                                     f"{cube.shape[-1]} bands; the checkpoint was trained on {bands} bands")
    elif suffix in TIFF_SUFFIXES:
        import tifffile

        try:
            with tifffile.TiffFile(str(path)) as tf:
                page = tf.pages[0]
                cube = tf.asarray()
                contig = getattr(page, "planarconfig", None) == tifffile.PLANARCONFIG.CONTIG and len(tf.pages) == 1
                geo = page_geotags(page)
        except Exception as exc:  # tifffile raises TiffFileError, ValueError, struct.error ... on bad files
            raise DatasetFormatError(f"cannot decode TIFF {path}: {type(exc).__name__}: {exc}") from exc
        if cube.ndim == 3:
            last, first = cube.shape[-1] == bands, cube.shape[0] == bands
            if last and (contig or not first):
                pass
            elif first:
                cube = np.moveaxis(cube, 0, -1)
            else:
                raise DatasetFormatError(
                    f"{path}: the cube is {' x '.join(map(str, cube.shape))}, neither H x W x {bands} nor "
                    f"{bands} x H x W; the checkpoint was trained on {bands} bands")
    else:
        raise UserError(f"{path}: a scene must be a .mat file or a GeoTIFF (.tif, .tiff); found {suffix or 'no suffix'}")
    if cube.ndim != 3:
        raise DatasetFormatError(f"{path}: the cube must be 3-D (H x W x bands), got shape {list(cube.shape)}")
    if not (np.issubdtype(cube.dtype, np.number) and not np.issubdtype(cube.dtype, np.complexfloating)):
        raise DatasetFormatError(f"{path}: the cube must be real numeric, got dtype {cube.dtype}")
    cube = np.ascontiguousarray(cube).astype(np.float32, copy=False)  # as the reader holds it
    bad = int((~np.isfinite(cube)).sum())
    if bad:
        raise DatasetFormatError(f"{path}: {bad} value(s) of the cube are NaN or infinite; predict does not impute")
    return cube, geo


class ScenePredictor(Predictor):
    """A hyperspectral scene -> a class map of every pixel (GeoTIFF with the input's georeferencing, PNG
    preview) and a legend with each class's pixel count (JSON or CSV). The pixels go through the scene-map
    tiling of ``evaluate.py`` (:meth:`PixelClassificationEvaluator.predict_scene`), normalised with the
    per-band mean and std the reader fitted on the training split."""

    datasets = ("pavia_university",)
    kind = "scene"
    input_help = "one scene: a .mat cube (as PaviaU.mat) or a GeoTIFF cube (H x W x bands or bands x H x W)"

    def load(self, inputs):
        path = _one_file(inputs, f"a {self.cfg.modality} checkpoint predicts one scene file (a .mat or GeoTIFF cube)")
        bands = int(self.info["num_bands"])
        cube, self.geo = read_scene_cube(path, bands, cube_key=self.reader_args().get("cube_key"))
        self.scene_path = path
        stats = self.fitted(("band_mean", "band_std"))
        mean, std = (self.fitted_vector(stats, k, bands) for k in ("band_mean", "band_std"))
        height, width = cube.shape[:2]
        pixels = cube.reshape(-1, bands)
        spectra = (pixels.astype(np.float64) - mean) / std  # the reader's formula
        cls = self.reader_class()
        reader = cls.__new__(cls)  # the reader's __getitem__ and collate over the input's pixels
        reader.root, reader.split = path.parent, "scene"
        reader.band_mean, reader.band_std = mean, std
        reader.spectra = torch.from_numpy(spectra.astype(np.float32))
        reader.labels = torch.full((height * width,), -1, dtype=torch.int64)
        idx = np.arange(height * width)
        reader.coords = torch.from_numpy(np.stack(np.unravel_index(idx, (height, width)), axis=1).astype(np.int64))
        reader.flat_indices = idx
        reader._info = {**copy.deepcopy(self.info), "height": int(height), "width": int(width)}
        self.height, self.width = int(height), int(width)
        return reader

    def run(self, model, dataset, accelerator, batch_size, loading=None):
        from allspark.evaluation import build_evaluator
        from allspark.evaluation.classification import PixelClassificationEvaluator

        evaluator = build_evaluator(self.cfg, {**self.info, "height": self.height, "width": self.width})
        if not isinstance(evaluator, PixelClassificationEvaluator):
            raise ConfigError(f"{self.checkpoint}/config.yaml: eval.protocol {self.cfg.eval.protocol!r} has no "
                              "scene map; predict needs pixel_classification")
        gathered, stats = evaluator.predict_scene(model, dataset, accelerator, batch_size, **(loading or {}))
        classes = np.full((self.height, self.width), -1, dtype=np.int64)
        classes[gathered["coords"][:, 0], gathered["coords"][:, 1]] = gathered["pred"]
        return {"map": classes, "stats": stats}

    def outputs(self, out, fmt):
        suffix = out.suffix.lower()
        if out.is_dir() or suffix not in (*TIFF_SUFFIXES, ".csv", ".json"):
            base = out / "classmap.tif"
        elif suffix in TIFF_SUFFIXES:
            base = out
        else:
            raise ConfigError(f"--out {out}: a scene's class map is a GeoTIFF; give a .tif file or a folder")
        fmt = fmt or "json"
        return {"map": base, "preview": base.with_suffix(".png"), "legend": base.with_suffix(f".{fmt}")}

    def write(self, staged, targets, fmt, result, meta):
        import tifffile

        classes = result["map"]
        k = len(self.class_names)
        dtype = np.uint8 if k <= 255 else np.uint16
        extratags = [(code, dtype_, count, value, True) for code, dtype_, count, value in self.geo]
        tifffile.imwrite(str(staged["map"]), classes.astype(dtype), photometric="minisblack",
                         description=json.dumps({"allspark": "class map", "class_names": self.class_names}),
                         extratags=extratags, metadata=None)
        counts = np.bincount(classes.ravel(), minlength=k)
        legend = [{"index": i, "class_name": n, "pixels": int(counts[i])} for i, n in enumerate(self.class_names)]
        write_preview(staged["preview"], classes, self.class_names, f"{self.scene_path.name}: predicted classes")
        stats = {key: (float(v) if isinstance(v, float) else v) for key, v in result["stats"].items()}
        write_rows(staged["legend"], fmt, legend, {
            **meta, "input": str(self.scene_path), "height": self.height, "width": self.width,
            "map": str(targets["map"]), "preview": str(targets["preview"]),
            "georeferenced": sorted(GEO_TAGS[c] for c, *_ in self.geo), **stats})


def write_preview(path: Path, classes: np.ndarray, class_names: Sequence[str], title: str) -> None:
    """A PNG of the class map with a legend (the colours of ``evaluate.py``'s classification map)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import ListedColormap

    k = len(class_names)
    colors = plt.get_cmap("tab20" if k > 10 else "tab10")(np.arange(k) % 20)
    h, w = classes.shape
    fig, ax = plt.subplots(figsize=(6, max(2.0, 6 * h / max(w, 1))))
    ax.imshow(classes, cmap=ListedColormap(colors), vmin=-0.5, vmax=k - 0.5, interpolation="nearest")
    ax.set_title(title)
    ax.axis("off")
    handles = [plt.Rectangle((0, 0), 1, 1, color=colors[i]) for i in range(k)]
    ax.legend(handles, [str(n) for n in class_names], loc="center left", bbox_to_anchor=(1.02, 0.5), fontsize=8,
              frameon=False)
    fig.savefig(path, dpi=120, bbox_inches="tight", format="png")
    plt.close(fig)


# -- segmentation tiles ------------------------------------------------------------------------------------------


def page_geotags(page) -> list[tuple[int, int, int, Any]]:
    """A tifffile page's GeoTIFF georeferencing tags as ``(code, dtype, count, value)``, ready for ``extratags``."""
    return [(t.code, int(t.dtype), t.count, t.value) for t in page.tags.values() if t.code in GEO_TAGS]


def read_geotags(path: Path) -> list[tuple[int, int, int, Any]]:
    """The GeoTIFF georeferencing tags of a TIFF file's first page (none for another format)."""
    if path.suffix.lower() not in TIFF_SUFFIXES:
        return []
    import tifffile

    from allspark.data.base import DatasetFormatError

    try:
        with tifffile.TiffFile(str(path)) as tf:
            return page_geotags(tf.pages[0])
    except Exception as exc:  # tifffile raises TiffFileError, ValueError, struct.error ... on bad files
        raise DatasetFormatError(f"cannot decode TIFF {path}: {type(exc).__name__}: {exc}") from exc


class SegmentationPredictor(Predictor):
    """Folders of tiles in a segmentation reader's layout (Vaihingen: ``top/`` and ``dsm/``; Globe230k: ``rgb/``,
    ``ndvi/``, ``dem/``, ``sar/`` as the checkpoint's modalities; no labels or split lists needed) -> one label
    map per tile, ``<tile>.png`` in the dataset's own label coding (Vaihingen: the contest's colours; Globe230k:
    the class values 1..10), a class-index GeoTIFF ``<tile>.tif`` beside it where the tile's first raster is a
    georeferenced TIFF (its georeferencing copied), and ``predictions.<format>`` (default json): one row per tile
    with its files, size and pixels per class. The tiles are read and checked by the reader's own code,
    standardised with the training split's statistics (``data_info.json``), cut into the windows of evaluation
    (``data.args.patch`` / ``stride``) and stitched as evaluation stitches them (owned parts), so the maps are
    evaluate.py's predictions."""

    datasets = ("vaihingen", "globe230k")
    kind = "tiles"
    input_help = ("folders in the reader's layout (vaihingen: top/ and dsm/; globe230k: rgb/, ndvi/, dem/, sar/); "
                  "labels not needed")
    pred_keys = ("pred",)

    def outputs(self, out, fmt):
        if out.exists() and not out.is_dir():
            raise ConfigError(f"--out {out}: a segmentation checkpoint writes one label map per tile; name a folder")
        if out.suffix.lower() in (*TIFF_SUFFIXES, ".png", ".csv", ".json"):
            raise ConfigError(f"--out {out}: a segmentation checkpoint writes one label map per tile into a folder; "
                              "name a folder (without a file suffix)")
        return {"predictions": out / f"predictions.{fmt or 'json'}"}

    def load(self, inputs):
        from allspark.data.base import DatasetFormatError

        args = self.reader_args()
        extra = args.pop("reader_args", {}) or {}
        for name in ("self", "root", "split", "train_stride", "augment"):
            args.pop(name, None)
        patch = int(self.info.get("patch", args.pop("patch")))
        args.pop("patch", None)
        stride = args.pop("stride")
        stride = patch if stride is None else int(stride)
        stats = self.fitted(tuple(self.info["raster_keys"]))
        channels = self.info["channels"]
        source = f"the checkpoint {self.checkpoint}"
        cls = self.reader_class()
        readers, names = [], {}
        for folder in inputs:
            if not folder.is_dir():
                raise ConfigError(f"--input {folder}: a {self.cfg.modality} checkpoint predicts the tiles of folders "
                                  f"in the {self.cfg.data.dataset} layout ({self.input_help}); give the folder")
            reader = cls.for_prediction(folder, stats, channels, patch=patch, stride=stride, source=source,
                                        **{**args, **extra})
            for t in reader.tile_ids:
                name = reader.tile_name(t)
                if name in names:
                    raise DatasetFormatError(f"--input: the tile {name} is in both {names[name]} and {folder}; "
                                             "each tile's map is written under its name")
                names[name] = folder
            readers.append(reader)
        self.readers = readers
        self.tiles = [(r, t, r.tile_name(t), r.tile_files(t)[0]) for r in readers for t in r.tile_ids]
        self.geo = [read_geotags(Path(first)) for *_, first in self.tiles]
        return _Tiles(readers)

    def input_outputs(self, out: Path) -> dict[str, Path]:
        """The files that depend on the input: per tile its PNG (and GeoTIFF where georeferenced)."""
        targets = {}
        for (_, _, name, _), geo in zip(self.tiles, self.geo):
            targets[f"{name}.png"] = out / f"{name}.png"
            if geo:
                targets[f"{name}.tif"] = out / f"{name}.tif"
        return targets

    def run(self, model, dataset, accelerator, batch_size, loading=None):
        from allspark.data import build_loader
        from allspark.evaluation import collect_predictions
        from allspark.evaluation.segmentation import stitched_maps

        loader = accelerator.prepare(build_loader(dataset, batch_size, **(loading or {})))
        got = collect_predictions(model, loader, accelerator, self.pred_keys, ("tile", "window", "owned", "index"),
                                  "predict", inference_mode=True)
        maps = stitched_maps(got, "pred")  # the evaluation's stitching (owned parts of the windows)
        for t, m in maps.items():
            if (m < 0).any():
                raise RuntimeError(f"predict: {int((m < 0).sum())} pixels of tile {self.tiles[t][2]} are owned by no "
                                   "window")
        return {"maps": [maps[t].astype(np.int64) for t in range(len(self.tiles))]}

    def write(self, staged, targets, fmt, result, meta):
        import tifffile
        from PIL import Image

        k = len(self.class_names)
        rows = []
        for (reader, _, name, first), geo, classes in zip(self.tiles, self.geo, result["maps"]):
            Image.fromarray(reader.encode_labels(classes)).save(staged[f"{name}.png"], format="PNG")
            row = {"tile": name, "input": str(first), "height": int(classes.shape[0]), "width": int(classes.shape[1]),
                   "map": str(targets[f"{name}.png"])}
            if geo:
                extratags = [(code, dtype_, count, value, True) for code, dtype_, count, value in geo]
                tifffile.imwrite(str(staged[f"{name}.tif"]), classes.astype(np.uint8 if k <= 255 else np.uint16),
                                 photometric="minisblack", extratags=extratags, metadata=None,
                                 description=json.dumps({"allspark": "class map", "class_names": self.class_names}))
                row["geotiff"] = str(targets[f"{name}.tif"])
            counts = np.bincount(classes.ravel(), minlength=k)
            row.update({f"pixels_{n}": int(c) for n, c in zip(self.class_names, counts)})
            rows.append(row)
        coding = "colours (the dataset's palette)" if self.info.get("palette") else "label values"
        write_rows(staged["predictions"], fmt, rows, {**meta, "num_predictions": len(rows), "png_coding": coding,
                                                      "palette": self.info.get("palette")})


class _Tiles(Dataset):
    """The windows of several prediction readers as one dataset; ``tile`` numbers the tiles across them."""

    def __init__(self, readers) -> None:
        self.readers = readers
        self.starts = np.cumsum([0] + [len(r) for r in readers])
        self.tile_starts = np.cumsum([0] + [len(r.tile_ids) for r in readers])
        self.collate = readers[0].collate

    def __len__(self) -> int:
        return int(self.starts[-1])

    def __getitem__(self, i: int) -> dict[str, Any]:
        r = int(np.searchsorted(self.starts, i, side="right") - 1)
        item = dict(self.readers[r][i - int(self.starts[r])])
        item.pop("label", None)
        item["tile"] = item["tile"] + int(self.tile_starts[r])
        item["index"] = torch.tensor(i, dtype=torch.int64)
        return item


# -- writing ----------------------------------------------------------------------------------------------------


def _flatten(row: dict[str, Any]) -> dict[str, Any]:
    flat = {k: v for k, v in row.items() if k != "top_k"}
    for j, entry in enumerate(row.get("top_k", ()), start=1):
        flat.update({f"top{j}_index": entry["index"], f"top{j}_class": entry["class_name"],
                     f"top{j}_prob": entry["prob"]})
    return flat


def write_rows(path: Path, fmt: str, rows: list[dict[str, Any]], meta: dict[str, Any]) -> None:
    """``rows`` as CSV (one line per row, ``top_k`` spread over ``top<j>_index/_class/_prob`` columns) or JSON
    (``{**meta, "predictions": rows}``) into ``path`` (already a staging file)."""
    if fmt == "json":
        path.write_text(json.dumps({**meta, "predictions": rows}, indent=1) + "\n", encoding="utf-8")
        return
    flat = [_flatten(r) for r in rows]
    columns = list(dict.fromkeys(k for r in flat for k in r))
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    writer.writerows(flat)
    path.write_text(buf.getvalue(), encoding="utf-8")


PREDICTORS: dict[str, type[Predictor]] = {
    name: cls for cls in (ImageClassificationPredictor, TextClassificationPredictor, TablePredictor,
                              TrajectoryPredictor, GraphForecastPredictor, ScenePredictor, SegmentationPredictor)
    for name in cls.datasets
}


def build_predictor(cfg, info, checkpoint: Path, **kwargs) -> Predictor:
    cls = PREDICTORS.get(cfg.data.dataset)
    if cls is None:
        raise UserError(
            f"{checkpoint}: predict does not support this checkpoint's data ({cfg.modality}, reader "
            f"{cfg.data.dataset!r}) yet; it supports the readers {sorted(PREDICTORS)}")
    return cls(cfg, info, checkpoint, **kwargs)


# -- the entry point ----------------------------------------------------------------------------------------------


def _check_device(device: str | None) -> str:
    """``--device``, checked against what this machine has: ``auto``, ``cpu``, ``cuda``, ``cuda:N`` or ``mps``."""
    device = (device or "auto").strip().lower()
    kind, _, index = device.partition(":")
    if kind == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"--device {device}: no CUDA device is available here (use --device cpu or auto)")
        if index and (not index.isdigit() or int(index) >= torch.cuda.device_count()):
            raise ConfigError(f"--device {device}: expected cuda:N with N below the {torch.cuda.device_count()} "
                              "visible CUDA device(s)")
    elif kind == "mps":
        if index or not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
            raise ConfigError(f"--device {device}: MPS is not available here (use --device cpu or auto)")
    elif device not in ("auto", "cpu"):
        raise ConfigError(f"--device must be auto, cpu, cuda, cuda:N or mps; got {device!r}")
    return device


def _accelerator(device: str, mixed_precision: str, llm_dtype: str):
    """An accelerator on ``device`` (checked by :func:`_check_device`); ``auto``: accelerate's choice."""
    from allspark.distributed import make_accelerator

    if device == "cpu":
        return make_accelerator(mixed_precision=mixed_precision, llm_dtype=llm_dtype, cpu=True)
    if device.startswith("cuda:"):
        torch.cuda.set_device(int(device.partition(":")[2]))  # accelerate's single process uses the current one
    return make_accelerator(mixed_precision=mixed_precision, llm_dtype=llm_dtype)


def _open_checkpoint(checkpoint: str | Path) -> tuple[Path, Any, dict[str, Any]]:
    """(the checkpoint folder, its config, its data info), or one clear error when it is not a checkpoint.
    ``checkpoint``: a local folder, or a Hugging Face Hub id ``namespace/name[@revision]`` that no local path has
    (downloaded: :func:`allspark.hub.resolve_pretrained`)."""
    from allspark.evaluate_run import resolve_checkpoint
    from allspark.hub import resolve_pretrained
    from allspark.model import CONFIG_NAME, INFO_NAME, WEIGHTS_NAME

    checkpoint, _ = resolve_pretrained(checkpoint)  # a missing local path: "checkpoint ... does not exist"
    ckpt = resolve_checkpoint(checkpoint)
    for name in (WEIGHTS_NAME, CONFIG_NAME, INFO_NAME):
        if not (ckpt / name).is_file():
            raise UserFileNotFoundError(f"{ckpt} is not an AllSpark checkpoint: {name} is missing "
                                        f"(expected {WEIGHTS_NAME}, {CONFIG_NAME}, {INFO_NAME})")
    return ckpt, config_from_yaml_text((ckpt / CONFIG_NAME).read_text()), json.loads((ckpt / INFO_NAME).read_text())


def _input_paths(inputs: Sequence[str | Path]) -> list[Path]:
    """``--input`` as paths: at least one, each existing."""
    paths = [Path(p).expanduser() for p in inputs]
    if not paths:
        raise ConfigError("--input: give at least one file or folder")
    for p in paths:
        if not p.exists():
            raise UserFileNotFoundError(f"input {p} does not exist")
    return paths


def _check_targets(targets: dict[str, Path], inputs: set[Path]) -> None:
    """No output may replace a folder or an input file."""
    for path in targets.values():
        if path.exists() and path.is_dir():
            raise ConfigError(f"--out: {path} is a folder; it would be replaced by a file")
        if path.resolve() in inputs:
            raise ConfigError(f"--out: {path} is an input; predict does not overwrite its input")


def predict(
    checkpoint: str | Path,
    inputs: Sequence[str | Path],
    out: str | Path,
    *,
    fmt: str | None = None,
    batch_size: int | None = None,
    device: str = "auto",
    mixed_precision: str | None = None,
    top_k: int = 5,
    data_root: str | None = None,
    modality: str | None = None,
    num_workers: int | str | None = None,
    trust_remote_code: bool = False,
    allow_download: bool = False,
    labels: str | Path | None = None,
) -> dict[str, Path]:
    """Predict ``inputs`` with ``checkpoint`` and write the predictions to ``out``; returns the written files
    (role -> path: ``predictions``, or ``map``/``preview``/``legend`` for a scene).

    ``out``: a ``.csv``/``.json`` file (a scene: a ``.tif`` file, the PNG and legend beside it) or a folder
    (``predictions.<fmt>``; a scene: ``classmap.tif``, ``classmap.png``, ``classmap.<fmt>``). ``fmt``: ``csv`` or
    ``json`` (default: the ``out`` suffix's, else csv; a scene's legend: json). ``batch_size``: default the
    config's ``data.eval_batch_size``. ``mixed_precision``: default the config's ``train.mixed_precision``.
    ``data_root``: the training data, for the statistics a reader fits on the training split (see the module
    docstring). ``num_workers``: DataLoader workers (``auto`` or a number; default: the config's
    ``data.num_workers``; ``data.pin_memory`` and ``data.persistent_workers`` apply too). ``trust_remote_code`` /
    ``allow_download``: as for ``evaluate.py``. ``labels``: a text file of
    candidate class names (one per line; two or more, any number) that a verbalizer checkpoint scores instead of
    its trained names, no weight changed; ``pred`` and ``class_name`` then index these names."""
    from allspark.model import AllSpark
    from allspark.precision import run_precision

    ckpt, cfg, info = _open_checkpoint(checkpoint)
    if modality is not None and cfg.modality != modality:
        raise ConfigError(f"--modality {modality!r} but the checkpoint was trained on {cfg.modality!r}")
    paths = _input_paths(inputs)
    if fmt is not None and fmt not in FORMATS:
        raise ConfigError(f"--format must be one of {list(FORMATS)}, got {fmt!r}")
    if batch_size is not None and batch_size < 1:
        raise ConfigError(f"--batch-size must be >= 1, got {batch_size}")
    if top_k < 1:
        raise ConfigError(f"--top-k must be >= 1, got {top_k}")
    device = _check_device(device)
    from allspark.data import resolve_loader_options
    from allspark.llm import check_quantization

    check_quantization(cfg.model.llm, None if device == "auto" else device)  # a quantised LLM needs a CUDA GPU

    workers = cfg.data.num_workers if num_workers is None else num_workers
    resolve_loader_options(workers, cfg.data.pin_memory, cfg.data.persistent_workers)  # a bad value fails now
    predictor = build_predictor(cfg, info, ckpt, data_root=data_root, top_k=top_k)
    out = Path(out).expanduser()
    if out.exists() and not out.is_dir() and out.suffix.lower() not in (".csv", ".json", *TIFF_SUFFIXES):
        raise ConfigError(f"--out {out} is an existing file; name a .csv/.json file or a folder")
    targets = predictor.outputs(out, fmt)
    fmt = targets["predictions" if "predictions" in targets else "legend"].suffix.lstrip(".")
    given = {p.resolve() for p in paths if p.is_file()}
    _check_targets(targets, given)

    dataset = predictor.load(paths)
    more = predictor.input_outputs(out)  # files named after the input (a segmentation map per tile)
    _check_targets(more, {f.resolve() for p in paths if p.is_dir() for f in p.rglob("*") if f.is_file()})
    targets = {**targets, **more}
    logger.info("predicting %d %s with %s", len(dataset),
                {"scene": "pixels", "tiles": "windows"}.get(predictor.kind, "inputs"), ckpt)
    model = AllSpark.from_pretrained(ckpt, trust_remote_code=trust_remote_code, allow_download=allow_download)
    if labels is not None:
        from heads.verbalizer import replace_label_set

        predictor.label_set = replace_label_set(model, labels)
    mp = mixed_precision or cfg.train.mixed_precision
    accelerator = _accelerator(device, mp, cfg.model.llm.dtype)
    precision = run_precision(model._llm, accelerator, mp, cfg.model.llm.dtype)
    logger.info("precision: %s; device %s", precision["reason"], accelerator.device)
    model = accelerator.prepare(model)
    bs = batch_size or cfg.data.eval_batch_size
    loading = resolve_loader_options(workers, cfg.data.pin_memory, cfg.data.persistent_workers, accelerator.device)
    gathered = predictor.run(model, dataset, accelerator, bs, loading)
    if accelerator.is_main_process:
        result = gathered if predictor.kind != "rows" else {"rows": predictor.rows(dataset, gathered)}
        meta = {"checkpoint": str(ckpt), "modality": cfg.modality, "dataset": cfg.data.dataset,
                "class_names": predictor.class_names if "num_classes" in info else None,
                "num_predictions": len(dataset), "batch_size": bs, "precision": precision}
        with contextlib.ExitStack() as stack:  # every file staged first; renamed into place only if all are written
            staged = {role: stack.enter_context(atomic_file(path)) for role, path in targets.items()}
            predictor.write(staged, targets, fmt, result, meta)
        for role, path in targets.items():
            logger.info("wrote %s: %s", role, path)
    accelerator.wait_for_everyone()
    return targets


def ask(checkpoint: str | Path, inputs: Sequence[str | Path], question: str, *, max_new_tokens: int = 32,
        do_sample: bool = False, temperature: float = 1.0, top_p: float = 1.0, seed: int | None = None,
        batch_size: int | None = None, data_root: str | None = None, trust_remote_code: bool = False,
        allow_download: bool = False) -> list[dict[str, Any]]:
    """``allspark ask``: ``question`` answered in words for every input (read as ``predict`` reads it), through
    :meth:`AllSpark.ask`; returns ``[{"input": name, "answer": text}, ...]`` in input order. Greedy unless
    ``do_sample`` (``seed`` makes samples repeatable). Per-pixel scene tasks (hsi and the fused rasters) are
    refused: they have one answer per pixel, which is what ``predict`` writes as a class map."""
    from allspark.data import build_loader, loader_options
    from allspark.model import AllSpark

    if not isinstance(question, str) or not question.strip():
        raise ConfigError("ask: give the question as a non-empty string")
    ckpt, cfg, info = _open_checkpoint(checkpoint)
    paths = _input_paths(inputs)
    predictor = build_predictor(cfg, info, ckpt, data_root=data_root)
    if predictor.kind != "rows":
        raise ConfigError(f"ask answers per input; a {cfg.modality} checkpoint classifies a scene pixel by pixel: "
                          "use `allspark predict` for its class map")
    dataset = predictor.load(paths)
    model = AllSpark.from_pretrained(ckpt, trust_remote_code=trust_remote_code, allow_download=allow_download)
    names = list(getattr(dataset, "names", None) or range(len(dataset)))
    if seed is not None:
        torch.manual_seed(seed)
    answers: list[str] = []
    for batch in build_loader(dataset, batch_size or cfg.data.eval_batch_size,
                              **{**loader_options(cfg.data, "cpu"), "persistent_workers": False}):
        answers += model.ask(batch, question, max_new_tokens=max_new_tokens, do_sample=do_sample,
                             temperature=temperature, top_p=top_p)
    return [{"input": str(n), "answer": a} for n, a in zip(names, answers)]
