"""``allspark predict``: a checkpoint on unlabelled input gives exactly the predictions ``evaluate.py`` computes
for the same inputs, for every supported family (image folders: rgb, msi, sar; a hyperspectral scene; a table
CSV; text files), keeps a GeoTIFF scene's georeferencing, and refuses bad input with one clear line (exit 2)
and no output.

Each family trains a tiny checkpoint (tiny random LLM, 2 optimizer steps) on its demo data once per module.
``evaluate_checkpoint`` runs on it with its prediction gathering observed (the arrays it computes its metrics
from); ``predict`` then gets the same test inputs without their labels (files copied into a flat folder, the
table without its target column, the scene as a GeoTIFF without ground truth). The inputs keep the test split's
order and the batch size stays the config's ``data.eval_batch_size``, so every batch is the one evaluation ran
and the predictions (and probabilities) are compared exactly.

The command-line tests run ``python -m allspark predict|ask`` in this process (``tests.helpers.run_inprocess``: the
same entry function under ``run_cli``), saving a subprocess's imports each; ``test_cli_predicts_an_image_folder``
starts the real ``python -m allspark predict`` as a subprocess."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from allspark.config import load_config
from allspark.errors import UserError
from tests.helpers import TINY_HSI, run, run_inprocess

#: the tiny model of the image, table and text families; 2 steps, no test pass and no baselines at the end
TINY = ["model.llm.name=tiny", "model.llm.dtype=float32", "model.bridge={num_queries: 4, depth: 1, heads: 2, ff_mult: 2}"]
SHORT = ["train.epochs=1", "train.max_steps=2", "train.test_at_end=false", "eval.baselines=[]"]
OVERRIDES = {
    "rgb": [*TINY, *SHORT, "data.args.image_size=64", "model.encoders.0.args.image_size=64"],
    "msi": [*TINY, *SHORT],
    "sar": [*TINY, *SHORT],
    "hsi": [*TINY_HSI, "model.llm.dtype=float32", *SHORT, "eval.args.scene_map=true"],
    "table": [*TINY, *SHORT, "model.encoders.0.args={dim: 16, depth: 1, heads: 2, dropout: 0.0}"],
    "text": ["model.llm.name=tiny", "model.llm.dtype=float32", *SHORT, "eval.args.compare_untrained=false"],
    "pointcloud": [*TINY, *SHORT,
                   "model.encoders.0.args={num_points: 1024, num_groups: 16, group_size: 8, dim: 16, depth: 1, heads: 2}"],
    "video": [*TINY, *SHORT],
    "trajectory": [*TINY, *SHORT, "model.encoders.0.args={dim: 16, depth: 1, heads: 2, ff_mult: 2, dropout: 0.0}"],
    "graph": [*TINY, *SHORT],
}
#: a projected CRS (UTM 32N), 1.3 m pixels, a known origin: what the class map must carry over
GEOKEYS = (1, 1, 0, 4, 1024, 0, 1, 1, 1025, 0, 1, 1, 3072, 0, 1, 32632, 3076, 0, 1, 9001)
GEOTAGS = [(33550, "d", 3, (1.3, 1.3, 0.0), True),
           (33922, "d", 6, (0.0, 0.0, 0.0, 500000.0, 5000000.0, 0.0), True),
           (34735, "H", len(GEOKEYS), GEOKEYS, True),
           (34737, "s", 0, "WGS 84 / UTM zone 32N|", True)]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """Run folders of tiny 2-step trainings, one per family, trained when first asked for."""
    from allspark.training import train

    base = tmp_path_factory.mktemp("predict-runs")
    made: dict[str, Path] = {}

    def get(modality: str) -> Path:
        if modality not in made:
            torch.manual_seed(0)
            train(load_config(modality, overrides=OVERRIDES[modality]), base / modality)
            made[modality] = base / modality
        return made[modality]

    return get


def _evaluate(run_dir: Path, modality: str, out: Path, extra_keys=()) -> tuple[dict, dict, dict | None]:
    """``evaluate_checkpoint`` on ``run_dir``'s test split, observed: its metrics, the test split's gathered
    predictions (with ``extra_keys`` of the model's outputs gathered beside them) and, for a pixel protocol, the
    gathered scene map."""
    import allspark.evaluate_run as er
    from allspark.evaluation.classification import PixelClassificationEvaluator

    seen: dict[str, dict] = {}
    collect, scene = er.collect_predictions, PixelClassificationEvaluator.predict_scene

    def observed_collect(model, loader, accelerator, pred_keys, batch_keys, desc="eval", **kw):
        seen[desc] = collect(model, loader, accelerator, (*pred_keys, *extra_keys), batch_keys, desc, **kw)
        return seen[desc]

    def observed_scene(self, *args, **kw):
        gathered, stats = scene(self, *args, **kw)
        seen["scene"] = gathered
        return gathered, stats

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(er, "collect_predictions", observed_collect)
        mp.setattr(PixelClassificationEvaluator, "predict_scene", observed_scene)
        metrics = er.evaluate_checkpoint(run_dir, modality=modality, output_dir=out)
    return metrics, seen["test"], seen.get("scene")


def _softmax(scores: np.ndarray) -> np.ndarray:
    return torch.softmax(torch.from_numpy(np.asarray(scores, np.float32)), dim=-1).numpy()


def _test_set(run_dir: Path):
    from allspark.config import config_from_yaml_text
    from allspark.data import build_dataset

    cfg = config_from_yaml_text((run_dir / "best" / "config.yaml").read_text())
    return cfg, build_dataset(cfg, "test")


def _check_classification_rows(rows: list[dict], names: list[str], gathered: dict, scores: np.ndarray,
                               class_names: list[str]) -> None:
    by_file = {Path(r["file"]).name: r for r in rows}
    assert sorted(by_file) == sorted(names), "one row per input file"
    pred = np.array([by_file[n]["pred"] for n in names])
    assert np.array_equal(pred, gathered["pred"]), "the classes evaluate.py predicted"
    probs = _softmax(scores)
    for i, n in enumerate(names):
        r = by_file[n]
        assert r["class_name"] == class_names[r["pred"]]
        top = [t["index"] for t in r["top_k"]]
        assert top[0] == r["pred"] and len(top) == min(5, len(class_names))
        assert np.array_equal(np.float32([t["prob"] for t in r["top_k"]]), probs[i, top]), "the same probabilities"
        assert all(a["prob"] >= b["prob"] for a, b in zip(r["top_k"], r["top_k"][1:]))
    assert np.ptp(probs[:, 0]) > 0, "the inputs get different probabilities (a test that can fail)"


# -- image folders ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("modality", ["rgb", "msi", "sar", "pointcloud", "video"])
def test_file_folder_predictions_equal_evaluate(modality, checkpoints, tmp_path):
    """Images (rgb), GeoTIFF tiles (msi), SAR chips (sar), point files (pointcloud), videos (video): a class and
    the top-k probabilities per file."""
    from allspark.data import resolve_data_root
    from allspark.predict import predict

    run_dir = checkpoints(modality)
    metrics, gathered, _ = _evaluate(run_dir, modality, tmp_path / "eval", extra_keys=("logits",))
    cfg, test = _test_set(run_dir)
    class_names = json.loads((run_dir / "best" / "data_info.json").read_text())["class_names"]
    if modality == "sar":  # the test angle's folder as it is: searched recursively, its folder names unused
        folder = resolve_data_root(cfg) / cfg.data.args["test_dir"]
        names = [f.name for f, _ in test.samples]
    else:  # the test files in one flat folder: no label anywhere, the test split's order kept
        folder = tmp_path / "inputs"
        folder.mkdir()
        names = []
        for i, (f, _) in enumerate(test.samples):
            names.append(f"{i:04d}_{f.name}")
            shutil.copy(f, folder / names[-1])
    fmt = {"msi": "csv", "video": "csv"}.get(modality, "json")
    written = predict(run_dir, [folder], tmp_path / "out", fmt=fmt)
    assert list(written) == ["predictions"] and written["predictions"] == tmp_path / "out" / f"predictions.{fmt}"
    if fmt == "json":
        doc = json.loads(written["predictions"].read_text())
        assert doc["class_names"] == class_names and doc["num_predictions"] == len(names)
        rows = doc["predictions"]
    else:  # CSV: the top-k spread over columns
        df = pd.read_csv(written["predictions"])
        assert list(df.columns[:4]) == ["file", "pred", "class_name", "prob"]
        rows = [{"file": r["file"], "pred": int(r["pred"]), "class_name": r["class_name"], "prob": r["prob"],
                 "top_k": [{"index": int(r[f"top{j}_index"]), "class_name": r[f"top{j}_class"],
                            "prob": r[f"top{j}_prob"]} for j in range(1, min(5, len(class_names)) + 1)]}
                for _, r in df.iterrows()]
    _check_classification_rows(rows, names, gathered, gathered["logits"], class_names)
    labels = np.array([label for _, label in test.samples])
    pred = np.array([{Path(r["file"]).name: r["pred"] for r in rows}[n] for n in names])
    assert float((pred == labels).mean()) == pytest.approx(metrics["top1"]), "evaluate.py's top1 from these rows"


# -- a hyperspectral scene ------------------------------------------------------------------------------------------


def test_hsi_scene_class_map_equals_evaluate_and_keeps_georeferencing(checkpoints, tmp_path):
    import scipy.io
    import tifffile

    from allspark.data import resolve_data_root
    from allspark.predict import predict

    run_dir = checkpoints("hsi")
    _, gathered, scene = _evaluate(run_dir, "hsi", tmp_path / "eval")
    cfg, _ = _test_set(run_dir)
    root = resolve_data_root(cfg)
    cube = scipy.io.loadmat(root / "PaviaU.mat")["paviaU"]  # 40 x 40 x 103 uint16, no ground truth with it
    tif = tmp_path / "scene.tif"
    tifffile.imwrite(tif, cube, photometric="minisblack", planarconfig="contig", extratags=GEOTAGS)

    written = predict(run_dir, [tif], tmp_path / "out")
    assert written == {"map": tmp_path / "out" / "classmap.tif", "preview": tmp_path / "out" / "classmap.png",
                       "legend": tmp_path / "out" / "classmap.json"}
    with tifffile.TiffFile(written["map"]) as tf:
        classes = tf.asarray()
        tags = {t.code: t.value for t in tf.pages[0].tags.values()}
        geo = tf.geotiff_metadata
    assert classes.shape == cube.shape[:2] and classes.dtype == np.uint8
    for code, _, _, value, _ in GEOTAGS:  # transform and CRS carried over unchanged
        assert tags[code] == value, code
    assert geo["ProjectedCSTypeGeoKey"] == 32632 and geo["ModelPixelScale"] == [1.3, 1.3, 0.0]
    assert geo["ModelTiepoint"] == [0.0, 0.0, 0.0, 500000.0, 5000000.0, 0.0]

    expected = np.full(classes.shape, -1)
    expected[scene["coords"][:, 0], scene["coords"][:, 1]] = scene["pred"]
    assert np.array_equal(classes, expected), "evaluate.py's scene map, pixel for pixel"
    rows, cols = gathered["coords"][:, 0], gathered["coords"][:, 1]
    assert np.array_equal(classes[rows, cols], gathered["pred"]), "evaluate.py's test-split predictions"
    assert len(np.unique(classes)) > 1

    legend = json.loads(written["legend"].read_text())
    assert sum(c["pixels"] for c in legend["predictions"]) == classes.size
    assert [c["class_name"] for c in legend["predictions"]] == legend["class_names"]
    assert legend["georeferenced"] == sorted(["ModelPixelScaleTag", "ModelTiepointTag", "GeoKeyDirectoryTag",
                                              "GeoAsciiParamsTag"])
    assert written["preview"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # The normalisation is the training split's, not the input's: a band-first crop of the scene (whose own
    # statistics differ) gets the same classes as those pixels got in the whole scene. The .mat cube of the
    # demo (no georeferencing) gives the same map.
    crop = tmp_path / "crop.tiff"
    tifffile.imwrite(crop, np.ascontiguousarray(cube[:13].transpose(2, 0, 1)), photometric="minisblack",
                     planarconfig="separate")
    part = predict(run_dir, [crop], tmp_path / "crop_map.tif", fmt="csv")
    assert part["legend"] == tmp_path / "crop_map.csv"
    assert np.array_equal(tifffile.imread(part["map"]), classes[:13])
    whole = predict(run_dir, [root / "PaviaU.mat"], tmp_path / "mat")
    with tifffile.TiffFile(whole["map"]) as tf:
        assert np.array_equal(tf.asarray(), classes) and 33550 not in tf.pages[0].tags


# -- a table CSV -----------------------------------------------------------------------------------------------------


def test_table_csv_without_target_equals_evaluate(checkpoints, tmp_path):
    from allspark.data import build_dataset, resolve_data_root
    from allspark.data.prsa import find_station_files, read_station_csv
    from allspark.predict import predict

    run_dir = checkpoints("table")
    metrics, gathered, _ = _evaluate(run_dir, "table", tmp_path / "eval")
    cfg, test = _test_set(run_dir)
    ref = build_dataset(cfg, "train")
    raw = pd.concat([read_station_csv(f) for f in find_station_files(resolve_data_root(cfg))], ignore_index=True)
    cat = test.cat.numpy()  # the test rows' keys: station, year, month, day, hour, in the test split's order
    keys = pd.DataFrame({"station": [ref.stations[c - 1] for c in cat[:, 0]], "year": cat[:, 1] + ref.first_year - 1,
                         "month": cat[:, 2], "day": cat[:, 3], "hour": cat[:, 4] - 1})
    rows = keys.merge(raw, on=["station", "year", "month", "day", "hour"], how="left", validate="one_to_one")
    assert np.allclose(rows["PM2.5"].to_numpy(np.float32), test.target.numpy()[:, 0])
    table = tmp_path / "rows.csv"
    rows.drop(columns=["PM2.5", "PM10", "No"]).to_csv(table, index=False, na_rep="NA")

    written = predict(run_dir, [table], tmp_path / "pred.json")
    doc = json.loads(written["predictions"].read_text())
    got = doc["predictions"]
    assert len(got) == len(test)
    assert [(r["station"], r["year"], r["month"], r["day"], r["hour"]) for r in got[:3]] == \
        [tuple(v.item() if hasattr(v, "item") else v for v in k) for k in keys.head(3).itertuples(index=False)]
    assert [r["line"] for r in got[:3]] == [2, 3, 4] and got[0]["file"] == str(table)
    pred = np.float32([r["pred_PM2.5"] for r in got])
    assert np.array_equal(pred, gathered["pred"][:, 0]), "evaluate.py's predictions, exactly"
    assert np.ptp(pred) > 0
    rmse = float(np.sqrt(np.mean((pred.astype(np.float64) - test.target.numpy()[:, 0]) ** 2)))
    assert rmse == pytest.approx(metrics["RMSE"], rel=1e-4)

    # The target column present is ignored; the CSV output has one line per row. (The first batch of rows only:
    # the same batch as the first of evaluation.)
    first = cfg.data.eval_batch_size
    rows.head(first).to_csv(tmp_path / "with_target.csv", index=False, na_rep="NA")
    with_target = predict(run_dir, [tmp_path / "with_target.csv"], tmp_path / "pred.csv")
    df = pd.read_csv(with_target["predictions"])
    assert list(df.columns) == ["file", "line", "station", "year", "month", "day", "hour", "pred_PM2.5"]
    assert np.array_equal(df["pred_PM2.5"].to_numpy(np.float32), pred[:first])


# -- text files ------------------------------------------------------------------------------------------------------


def test_text_files_equal_evaluate(checkpoints, tmp_path):
    from allspark.predict import predict

    run_dir = checkpoints("text")
    metrics, gathered, _ = _evaluate(run_dir, "text", tmp_path / "eval")
    _, test = _test_set(run_dir)
    folder = tmp_path / "reviews"
    folder.mkdir()
    names = []
    for i, (f, _) in enumerate(test.samples):
        names.append(f"{i:04d}_{f.name}")
        shutil.copy(f, folder / names[-1])
    written = predict(run_dir, [folder], tmp_path / "labels.json")
    rows = json.loads(written["predictions"].read_text())["predictions"]
    _check_classification_rows(rows, names, gathered, gathered["choice_loglik"], ["negative", "positive"])
    assert [r["truncated"] for r in rows] == gathered["truncated"].astype(bool).tolist()
    labels = np.array([label for _, label in test.samples])
    assert float((np.array([r["pred"] for r in rows]) == labels).mean()) == pytest.approx(metrics["top1"])


# -- trajectories and sensor series ---------------------------------------------------------------------------------


def test_trajectory_files_future_positions_equal_evaluate(checkpoints, tmp_path):
    """The test recordings as they are: every observed window of every pedestrian gets a forecast; those that
    evaluate.py scores (the windows with a known future) are its predictions exactly."""
    from allspark.data import resolve_data_root
    from allspark.data.eth_ucy import extract_windows, read_trajectory_file
    from allspark.predict import predict

    run_dir = checkpoints("trajectory")
    metrics, gathered, _ = _evaluate(run_dir, "trajectory", tmp_path / "eval")
    cfg, test = _test_set(run_dir)
    folder = resolve_data_root(cfg) / cfg.data.args["test_scene"] / "test"
    keys, origins = [], []  # evaluate's samples: (file, last observed frame, pedestrian) in the test split's order
    for f in sorted(folder.glob("*.txt")):
        found: list = []
        tracks, _, _ = extract_windows(read_trajectory_file(f), 8, 12, 8, f, found)
        keys += [(str(f), frame, ped) for frame, ped in found]
        origins += [t[7] for t in tracks]
    assert len(keys) == len(test)

    # The recordings without their last 12 frames: what is left has no future for its last windows, and still
    # every window evaluate.py scores.
    cut = tmp_path / "observed"
    cut.mkdir()
    for f in sorted(folder.glob("*.txt")):
        data = read_trajectory_file(f)
        last = np.unique(data[:, 0])[-12]
        (cut / f.name).write_text("".join(f"{r[0]:.1f}\t{r[1]:.1f}\t{r[2]}\t{r[3]}\n" for r in data if r[0] < last))
    written = predict(run_dir, [folder, cut], tmp_path / "future.json")
    rows = json.loads(written["predictions"].read_text())["predictions"]
    by_key = {(r["file"], r["frame"], r["ped"]): r for r in rows}
    assert len(by_key) == len(rows) > len(test)
    offsets = np.float32([by_key[k]["offsets"] for k in keys])
    assert np.array_equal(offsets, gathered["pred"]), "evaluate.py's predicted offsets, exactly"
    future = np.array([[by_key[k][f"x{j}"], by_key[k][f"y{j}"]] for k in keys for j in range(1, 13)]).reshape(-1, 12, 2)
    assert np.allclose(future, gathered["pred"] + np.asarray(origins)[:, None], atol=1e-5), "absolute positions"
    ade = float(np.linalg.norm(offsets - gathered["target"], axis=-1).mean())
    assert ade == pytest.approx(metrics["ADE"], rel=1e-5)
    # the cut recordings' windows that evaluate also scores give the same forecasts
    cut_keys = [(str(cut / Path(f).name), fr, p) for f, fr, p in keys if (str(cut / Path(f).name), fr, p) in by_key]
    assert cut_keys and all(by_key[c]["offsets"] == by_key[(str(folder / Path(c[0]).name), c[1], c[2])]["offsets"]
                            for c in cut_keys)
    csv_out = predict(run_dir, [cut], tmp_path / "future.csv")
    df = pd.read_csv(csv_out["predictions"])
    assert list(df.columns[:6]) == ["file", "ped", "frame", "frame_step", "x", "y"]
    assert list(df.columns[-2:]) == ["x12", "y12"] and (df["frame_step"] == 10).all()


def test_sensor_series_forecasts_equal_evaluate(checkpoints, tmp_path):
    from allspark.data.metr_la import write_sensor_h5
    from allspark.predict import predict

    run_dir = checkpoints("graph")
    _, gathered, _ = _evaluate(run_dir, "graph", tmp_path / "eval")
    _, test = _test_set(run_dir)
    start = test.starts[0]  # the series from the first test window on, sensor columns in another order
    ids = list(reversed(test.sensor_ids))
    series = tmp_path / "tail.h5"
    write_sensor_h5(series, test.times[start:], ids, test.values.numpy()[start:, ::-1])
    written = predict(run_dir, [series], tmp_path / "forecast.json")
    doc = json.loads(written["predictions"].read_text())
    assert doc["sensor_ids"] == test.sensor_ids
    rows = doc["predictions"]
    assert len(rows) == len(test) + 12, "a forecast for every window, the last ones past the file's end"
    forecast = np.float32([r["forecast"] for r in rows[: len(test)]])
    assert np.array_equal(forecast, gathered["pred"]), "evaluate.py's forecasts, exactly"
    end = test.times[start + 11]
    assert rows[0]["window_end"] == str(end.astype("datetime64[s]"))
    assert rows[0]["times"][0] == str((end + np.timedelta64(300, "s")).astype("datetime64[s]"))
    short = tmp_path / "short.h5"  # 17 rows: 6 windows, in CSV one line per window and step
    write_sensor_h5(short, test.times[start:start + 17], test.sensor_ids, test.values.numpy()[start:start + 17])
    csv_out = predict(run_dir, [short], tmp_path / "forecast.csv", batch_size=4)
    df = pd.read_csv(csv_out["predictions"], dtype={"window_end": str, "time": str})
    assert list(df.columns) == ["window_end", "time", "step", *test.sensor_ids] and len(df) == 12 * 6
    assert df["step"].tolist() == list(range(1, 13)) * 6 and df["window_end"].iloc[0] == rows[0]["window_end"]
    assert np.allclose(df[test.sensor_ids].to_numpy(np.float32)[:12], forecast[0], rtol=1e-6)


# -- the command line and bad input ----------------------------------------------------------------------------------


def _fails(result, *fragments) -> str:
    assert result.returncode == 2, (result.returncode, result.stderr[-3000:])
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and "Traceback" not in result.stderr, result.stderr[-3000:]
    for fragment in fragments:
        assert fragment in last, last
    return last


def _no_output(path: Path) -> None:
    """Nothing at ``path``, or an empty folder (the staging files gone)."""
    assert not path.exists() or (path.is_dir() and not any(path.iterdir())), list(path.rglob("*"))


@pytest.mark.slow
def test_cli_predicts_an_image_folder(checkpoints, tmp_path):
    run_dir = checkpoints("rgb")
    _, test = _test_set(run_dir)
    folder = tmp_path / "images"
    folder.mkdir()
    for f, _ in test.samples[:3]:
        shutil.copy(f, folder / f.name)
    (folder / "notes.txt").write_text("not an image\n")
    result = run(["-m", "allspark", "predict", "--checkpoint", str(run_dir), "--input", str(folder),
                  "--out", str(tmp_path / "pred.csv"), "--batch-size", "2", "--top-k", "2", "--device", "cpu"])
    assert result.returncode == 0, result.stderr[-3000:]
    assert str(tmp_path / "pred.csv") in result.stdout
    df = pd.read_csv(tmp_path / "pred.csv")
    assert list(df.columns) == ["file", "pred", "class_name", "prob", "top1_index", "top1_class", "top1_prob",
                                "top2_index", "top2_class", "top2_prob"]
    assert [Path(f).name for f in df["file"]] == sorted(f.name for f, _ in test.samples[:3])
    assert (df["pred"] == df["top1_index"]).all() and (df["top1_prob"] >= df["top2_prob"]).all()


def test_cli_refuses_a_missing_input_and_a_checkpoint_without_weights(checkpoints, tmp_path):
    run_dir = checkpoints("rgb")
    _fails(run_inprocess(["-m", "allspark", "predict", "--checkpoint", str(run_dir),
                          "--input", str(tmp_path / "nowhere"), "--out", str(tmp_path / "out")]),
           "input", str(tmp_path / "nowhere"), "does not exist")
    _no_output(tmp_path / "out")

    broken = tmp_path / "run"  # a run folder whose best/ lost its weights
    shutil.copytree(run_dir / "best", broken / "best")
    (broken / "best" / "model.safetensors").unlink()
    (tmp_path / "images").mkdir()
    _fails(run_inprocess(["-m", "allspark", "predict", "--checkpoint", str(broken), "--input", str(tmp_path / "images"),
                          "--out", str(tmp_path / "out")]), "model.safetensors is missing", str(broken / "best"))
    _no_output(tmp_path / "out")


def test_cli_refuses_a_scene_of_other_bands_and_a_table_without_a_column(checkpoints, tmp_path):
    import tifffile

    hsi = checkpoints("hsi")
    scene = tmp_path / "scene_50_bands.tif"
    tifffile.imwrite(scene, np.ones((8, 8, 50), np.uint16), photometric="minisblack", planarconfig="contig")
    _fails(run_inprocess(["-m", "allspark", "predict", "--checkpoint", str(hsi), "--input", str(scene),
                          "--out", str(tmp_path / "map")]), str(scene), "8 x 8 x 50", "trained on 103 bands")
    _no_output(tmp_path / "map")

    table = checkpoints("table")
    from allspark.data import resolve_data_root
    from allspark.data.prsa import find_station_files

    cfg, _ = _test_set(table)
    rows = pd.read_csv(find_station_files(resolve_data_root(cfg))[0], nrows=20).drop(columns=["TEMP"])
    rows.to_csv(tmp_path / "no_temp.csv", index=False)
    _fails(run_inprocess(["-m", "allspark", "predict", "--checkpoint", str(table),
                          "--input", str(tmp_path / "no_temp.csv"), "--out", str(tmp_path / "pred.csv")]),
           str(tmp_path / "no_temp.csv"), "lacks column(s) ['TEMP']")
    _no_output(tmp_path / "pred.csv")


def test_cli_a_bad_tile_among_good_ones_leaves_no_output(checkpoints, tmp_path):
    """The error comes while the model runs (the tile is read in its batch): still one line, and no file."""
    import tifffile

    run_dir = checkpoints("msi")
    _, test = _test_set(run_dir)
    folder = tmp_path / "tiles"
    folder.mkdir()
    for f, _ in test.samples[:2]:
        shutil.copy(f, folder / f.name)
    bad = folder / "zz_six_bands.tif"
    tifffile.imwrite(bad, np.ones((32, 32, 6), np.uint16), photometric="minisblack", planarconfig="contig")
    out = tmp_path / "out"
    _fails(run_inprocess(["-m", "allspark", "predict", "--checkpoint", str(run_dir), "--input", str(folder),
                          "--out", str(out), "--format", "json"]), str(bad), "13-band", "[32, 32, 6]")
    _no_output(out)


def test_predict_refuses_bad_arguments_before_building_the_model(checkpoints, tmp_path):
    from allspark.config import ConfigError
    from allspark.predict import predict

    run_dir = checkpoints("rgb")
    (tmp_path / "in").mkdir()
    image = tmp_path / "in" / "a.png"
    from PIL import Image

    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(image)
    cases = [
        (dict(out=tmp_path / "p.json", fmt="csv"), "--format csv but --out"),
        (dict(out=tmp_path / "p.csv", batch_size=0), "--batch-size must be >= 1"),
        (dict(out=tmp_path / "p.csv", top_k=0), "--top-k must be >= 1"),
        (dict(out=tmp_path / "p.csv", modality="hsi"), "trained on 'rgb'"),
        (dict(out=tmp_path / "p.csv", device="tpu"), "--device must be"),
    ]
    for kwargs, message in cases:
        with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
            predict(run_dir, [image], **kwargs)
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="holds no image file"):
        predict(run_dir, [tmp_path / "empty"], tmp_path / "p.csv")
    with pytest.raises(UserError, match="a .mat file or a GeoTIFF"):
        predict(checkpoints("hsi"), [image], tmp_path / "map")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty", "in"], "nothing written"


def test_cli_ask_answers_every_image_as_the_python_api_does(checkpoints, tmp_path):
    """``python -m allspark ask``: one line per input, ``name: answer``, equal to ``AllSpark.ask`` on the same
    images (greedy); a scene checkpoint and a missing input are one error line each."""
    from allspark.model import AllSpark
    from allspark.predict import ask

    run_dir = checkpoints("rgb")
    _, test = _test_set(run_dir)
    files = [f for f, _ in test.samples[:2]]
    result = run_inprocess(["-m", "allspark", "ask", "--checkpoint", str(run_dir), "--input", str(files[0]),
                            "--input", str(files[1]), "What covers most of this scene?", "--max-new-tokens", "4"])
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.strip().splitlines()
    rows = ask(run_dir, files, "What covers most of this scene?", max_new_tokens=4)
    assert lines == [f"{r['input']}: {r['answer']}" for r in rows] and len(rows) == 2
    model = AllSpark.from_pretrained(run_dir / "best")
    batch = test.collate([test[i] for i in range(2)])
    assert [r["answer"] for r in rows] == model.ask(batch, "What covers most of this scene?", max_new_tokens=4)
    _fails(run_inprocess(["-m", "allspark", "ask", "--checkpoint", str(checkpoints("hsi")),
                          "--input", str(files[0]), "q"]),
           "pixel by pixel", "allspark predict")
    _fails(run_inprocess(["-m", "allspark", "ask", "--checkpoint", str(run_dir),
                          "--input", str(tmp_path / "none.jpg"), "q"]),
           "does not exist")


def test_cli_sar_reads_npy_chips_and_refuses_one_of_another_channel_count(checkpoints, tmp_path):
    """SAR chips as .npy arrays are found and predicted like the JPEGs they hold; a two-channel chip given to the
    one-channel checkpoint is one error naming the chip and the checkpoint's channel count, and no output."""
    from PIL import Image

    run_dir = checkpoints("sar")
    _, test = _test_set(run_dir)
    folder = tmp_path / "chips"
    folder.mkdir()
    src = test.samples[0][0]
    np.save(folder / "a.npy", np.asarray(Image.open(src).convert("L"), np.float32))
    out = tmp_path / "pred.csv"
    result = run_inprocess(["-m", "allspark", "predict", "--checkpoint", str(run_dir), "--input", str(folder),
                            "--out", str(out), "--device", "cpu"])
    assert result.returncode == 0, result.stderr[-3000:]
    assert [Path(f).name for f in pd.read_csv(out)["file"]] == ["a.npy"]
    bad = folder / "b.npy"
    chip = np.asarray(Image.open(src).convert("L"), np.float32)
    np.save(bad, np.stack([chip, chip]))
    out2 = tmp_path / "pred2.csv"
    _fails(run_inprocess(["-m", "allspark", "predict", "--checkpoint", str(run_dir), "--input", str(folder),
                          "--out", str(out2), "--device", "cpu"]), str(bad), "2 channel(s)", "1 (as the checkpoint's")
    _no_output(out2)
