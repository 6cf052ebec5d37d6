"""The statistics a reader fits on the training split live in the checkpoint (``data_info.json``'s
``preprocessing``), so ``allspark predict`` runs when the training data is gone.

For the three readers that fit statistics (hsi: Pavia's per-band mean/std; msi: EuroSAT's; table: the PRSA feature
scaling and first year) a tiny checkpoint is trained on a copy of the demo data; its predictions on new input are
taken, the copy is deleted, and the same input gives the same predictions. A checkpoint written before the
statistics were stored (``preprocessing`` stripped) still predicts from the training data while it exists and
says what to do once it is gone."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from allspark.config import Config, apply_overrides, from_dict, load_config, to_dict
from allspark.errors import UserError
from tests.helpers import TINY_HSI

TINY = ["model.llm.name=tiny", "model.llm.dtype=float32", "model.bridge={num_queries: 4, depth: 1, heads: 2, ff_mult: 2}"]
SHORT = ["train.epochs=1", "train.max_steps=2", "train.test_at_end=false", "eval.baselines=[]"]
OVERRIDES = {
    "hsi": [*TINY_HSI, "model.llm.dtype=float32", *SHORT],
    "msi": [*TINY, *SHORT],
    "table": [*TINY, *SHORT, "model.encoders.0.args={dim: 16, depth: 1, heads: 2, dropout: 0.0}"],
}
#: what each reader stores, and the reader attribute it comes from
STORED = {"hsi": {"band_mean": "band_mean", "band_std": "band_std"},
          "msi": {"band_mean": "band_mean", "band_std": "band_std"},
          "table": {"first_year": "first_year", "num_mean": "num_mean", "num_std": "num_std"}}


def _inputs(modality: str, data: Path, folder: Path) -> list[Path]:
    """New input, outside the training data folder: the scene cube, some tiles, station rows without the target."""
    folder.mkdir()
    if modality == "hsi":
        shutil.copy(data / "PaviaU.mat", folder / "scene.mat")
        return [folder / "scene.mat"]
    if modality == "msi":
        for tile in sorted(data.rglob("*.tif"))[::17][:8]:
            shutil.copy(tile, folder / f"{tile.parent.name}_{tile.name}")
        return [folder]
    from allspark.data.prsa import find_station_files

    rows = pd.read_csv(find_station_files(data)[1], nrows=150).drop(columns=["PM2.5", "PM10", "No"])
    rows.to_csv(folder / "rows.csv", index=False, na_rep="NA")
    return [folder / "rows.csv"]


def _predictions(written: dict[str, Path]) -> object:
    if "map" in written:
        import tifffile

        return tifffile.imread(written["map"])
    return json.loads(written["predictions"].read_text())["predictions"]


def _same(a, b) -> bool:
    return np.array_equal(a, b) if isinstance(a, np.ndarray) else a == b


@pytest.mark.parametrize("modality", ["hsi", "msi", "table"])
def test_predict_needs_no_training_data(modality, tmp_path):
    from allspark.data import build_dataset, demo_root
    from allspark.predict import predict
    from allspark.training import train

    cfg = load_config(modality, overrides=OVERRIDES[modality])
    data = tmp_path / "training-data"
    shutil.copytree(demo_root(cfg.data.dataset, cfg.data.demo_seed), data)
    # the demo config (its demo block applied), reading the copy
    cfg = from_dict(Config, apply_overrides(to_dict(cfg), {"data.root": str(data)}))
    torch.manual_seed(0)
    train(cfg, tmp_path / "run")
    ckpt = tmp_path / "run" / "best"

    info = json.loads((ckpt / "data_info.json").read_text())
    reader = build_dataset(cfg, "train")
    for key, attr in STORED[modality].items():  # the reader's fitted values, exactly, in the checkpoint
        value = np.asarray(getattr(reader, attr))
        assert np.array_equal(np.asarray(info["preprocessing"][key], value.dtype), value.reshape(-1)
                              if value.ndim > 1 else value), key

    out = tmp_path / "out"
    inputs = _inputs(modality, data, tmp_path / "input")
    suffix = {"hsi": "maps", "msi": "tiles.json", "table": "rows.json"}[modality]
    before = _predictions(predict(tmp_path / "run", inputs, out / f"before-{suffix}", device="cpu"))

    # a checkpoint of an older version: no stored statistics, they come from the training data while it is there
    old = tmp_path / "old"
    shutil.copytree(ckpt, old)
    stripped = {k: v for k, v in info.items() if k != "preprocessing"}
    (old / "data_info.json").write_text(json.dumps(stripped))
    assert _same(_predictions(predict(old, inputs, out / f"old-{suffix}", device="cpu")), before)

    shutil.rmtree(data)  # the training data is gone
    after = _predictions(predict(tmp_path / "run", inputs, out / f"after-{suffix}", device="cpu"))
    assert _same(after, before), "the same predictions without the training data"
    if isinstance(before, np.ndarray):
        assert len(np.unique(before)) > 1
    else:
        assert len({json.dumps(r.get("pred", r.get("pred_PM2.5"))) for r in before}) > 1
    with pytest.raises(UserError, match="Pass --data-root with the training data folder"):
        predict(old, inputs, out / f"gone-{suffix}", device="cpu")


def test_stored_statistics_of_the_wrong_size_are_one_clear_error(tmp_path):
    """A hand-edited data_info.json whose statistics do not fit the bands is refused, naming the key and file."""
    import scipy.io

    from allspark.data import build_dataset
    from allspark.model import AllSpark
    from allspark.predict import predict

    cfg = load_config("hsi", overrides=OVERRIDES["hsi"])
    train_set = build_dataset(cfg, "train")
    info = train_set.info()
    info["preprocessing"]["band_std"] = info["preprocessing"]["band_std"][:50]
    torch.manual_seed(0)
    AllSpark(cfg, info).save_pretrained(tmp_path / "ckpt")
    scene = tmp_path / "scene.mat"
    scipy.io.savemat(scene, {"paviaU": np.ones((4, 5, 103), np.uint16)})
    with pytest.raises(UserError, match=r"preprocessing.band_std must be 103 finite numbers, found shape \[50\]"):
        predict(tmp_path / "ckpt", [scene], tmp_path / "map", device="cpu")
    assert not (tmp_path / "map").exists()
