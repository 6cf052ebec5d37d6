"""Table modality: PRSA reader (real layout, bad input), regression metrics, TabFormer encoder, a short
end-to-end train on the tiny LLM."""
import math

import numpy as np
import pytest
import torch

from allspark.data.base import DatasetFormatError
from allspark.data.prsa import PRSA_COLUMNS, PRSAAirQuality
from allspark.metrics.regression import regression_metrics

HEADER = ",".join(PRSA_COLUMNS)


def _write_station(path, rows):
    path.write_text(HEADER + "\n" + "\n".join(rows) + "\n")


def _rows(station, n, missing_pm=(), missing_co=()):
    out = []
    for i in range(n):
        pm = "NA" if i in missing_pm else f"{10 + i}"
        co = "NA" if i in missing_co else f"{300 + 10 * i}"
        out.append(f"{i + 1},2013,3,{1 + i // 24},{i % 24},{pm},{20 + i},3,20,{co},50,5.5,1020.1,-10.0,0.0,"
                   f"{'NNW' if i % 2 else 'NA'},2.1,{station}")
    return out


def test_reader_real_layout_and_missing_value_policy(tmp_path):
    sub = tmp_path / "PRSA_Data_20130301-20170228"  # the folder of the official zip
    sub.mkdir()
    _write_station(sub / "PRSA_Data_Dongsi_20130301-20170228.csv", _rows("Dongsi", 30, missing_pm={0, 1}, missing_co={5}))
    _write_station(sub / "PRSA_Data_Tiantan_20130301-20170228.csv", _rows("Tiantan", 30))
    parts = {s: PRSAAirQuality(tmp_path, s, train_ratio=0.4, val_ratio=0.25) for s in ("train", "val", "test")}
    sizes = {s: len(d) for s, d in parts.items()}
    assert sum(sizes.values()) == 58  # two rows without PM2.5 dropped
    assert sizes["train"] + sizes["val"] == round(0.4 * 58)
    info = parts["train"].info()
    assert info["stations"] == ["Dongsi", "Tiantan"]
    assert info["cat_cardinalities"][0] == 3 and info["cat_cardinalities"][-1] == 17
    all_num_mask = torch.cat([d.num_mask for d in parts.values()])
    assert (~all_num_mask).sum() == 1  # the one missing CO is kept as missing, not imputed
    co = info["num_columns"].index("CO")
    for d in parts.values():
        assert (d.num[~d.num_mask] == 0).all()
        assert torch.isfinite(d.num).all()
    wd_missing = torch.cat([d.cat[:, -1] for d in parts.values()]) == 0
    assert wd_missing.sum() == 29  # even rows have NA wind direction -> category 0 (minus the 1 dropped row)
    train = parts["train"]
    assert info["target_mean"] == pytest.approx(train.target.double().mean().item(), rel=1e-5)
    item = train[0]
    assert item["cat"].dtype == torch.long and item["num"].shape == (9,) and item["target"].shape == (1,)
    assert co == 2


def test_reader_rejects_csv_missing_a_column(tmp_path):
    bad = tmp_path / "PRSA_Data_Dongsi_20130301-20170228.csv"
    header = ",".join(c for c in PRSA_COLUMNS if c != "DEWP")
    bad.write_text(header + "\n" + "1,2013,3,1,0,10,20,3,20,300,50,5.5,1020.1,0.0,N,2.1,Dongsi\n")
    with pytest.raises(DatasetFormatError, match=r"PRSA_Data_Dongsi.*lacks column\(s\) \['DEWP'\]"):
        PRSAAirQuality(tmp_path, "train")


def test_reader_accepts_hours_missing_from_a_file(tmp_path):
    rows = _rows("Dongsi", 30)
    del rows[20], rows[10:13]  # four hours absent: 26 rows, each a sample of its own
    _write_station(tmp_path / "PRSA_Data_Dongsi_20130301-20170228.csv", rows)
    parts = [PRSAAirQuality(tmp_path, s) for s in ("train", "val", "test")]
    assert sum(len(d) for d in parts) == 26
    hours = sorted(h - 1 for d in parts for h in d.cat[:, 4].tolist())  # category = hour + 1
    assert hours == sorted([*(set(range(24)) - {10, 11, 12, 20}), 0, 1, 2, 3, 4, 5])


@pytest.mark.parametrize("field, value, expected", [
    ("hour", "24", r"line 4: column 'hour' must be a whole number in \[0, 23\], found 24"),
    ("hour", "NA", r"line 4: column 'hour' must be a whole number in \[0, 23\], found NA \(missing\)"),
    ("day", "1.5", r"line 4: column 'day' must be a whole number in \[1, 31\], found 1.5"),
])
def test_reader_rejects_bad_time_fields_naming_the_file(tmp_path, field, value, expected):
    rows = [r.split(",") for r in _rows("Dongsi", 30)]
    rows[2][PRSA_COLUMNS.index(field)] = value
    _write_station(tmp_path / "PRSA_Data_Dongsi_20130301-20170228.csv", [",".join(r) for r in rows])
    with pytest.raises(DatasetFormatError, match=r"PRSA_Data_Dongsi_20130301-20170228\.csv, " + expected):
        PRSAAirQuality(tmp_path, "train")


def test_reader_names_the_missing_files(tmp_path):
    with pytest.raises(DatasetFormatError, match="PRSA_Data_"):
        PRSAAirQuality(tmp_path, "train")


def test_regression_metrics_hand_computed():
    pred, target = np.array([1.0, 2.0, 3.0, 6.0]), np.array([1.0, 3.0, 3.0, 4.0])
    m = regression_metrics(pred, target)
    assert m["MAE"] == pytest.approx(0.75)
    assert m["RMSE"] == pytest.approx(math.sqrt(5 / 4))
    # R2 = 1 - SS_res / SS_tot with mean 2.75: SS_tot = 3.0625 + .0625 + .0625 + 1.5625 = 4.75
    assert m["R2"] == pytest.approx(1 - 5 / 4.75)
    with pytest.raises(ValueError, match="differ"):
        regression_metrics(pred, target[:3])


def test_encoder_validates_and_uses_missing_embedding():
    from encoders.table import TabularFieldEncoder

    enc = TabularFieldEncoder(cat_cardinalities=[3, 5], num_features=2, dim=8, heads=2, dropout=0.0).eval()
    batch = {"cat": torch.tensor([[1, 4]]), "num": torch.tensor([[0.5, 0.0]]), "num_mask": torch.tensor([[True, False]])}
    out = enc(batch)
    assert out.tokens.shape == (1, 4, 8)
    other = dict(batch, num=torch.tensor([[0.5, 123.0]]))  # the value behind a missing mask is ignored
    assert torch.allclose(enc(other).tokens, out.tokens)
    with pytest.raises(ValueError, match=r"batch\['num'\]: expected shape \[B, 2\], got \[1, 3\]"):
        enc(dict(batch, num=torch.zeros(1, 3)))
    with pytest.raises(ValueError, match="cardinality"):
        enc(dict(batch, cat=torch.tensor([[3, 0]])))


def test_tiny_end_to_end_train_beats_training_mean(tmp_path, _fresh_accelerate_state):
    from allspark.config import load_config
    from allspark.evaluate_run import evaluate_checkpoint
    from allspark.training import train

    cfg = load_config("table", overrides=[
        "model.llm.name=tiny", "model.encoders.0.args={dim: 16, depth: 1, heads: 2, dropout: 0.0}",
        "model.bridge={num_queries: 4, depth: 1, heads: 2, ff_mult: 2}", "data.batch_size=32",
        "data.eval_batch_size=512", "train.epochs=1", "train.lr=3e-3", "train.warmup_epochs=0.1"])
    metrics = train(cfg, tmp_path / "run")
    assert metrics["RMSE"] < metrics["baseline/RMSE"]
    assert metrics["R2"] > 0.3
    evaluate_checkpoint(tmp_path / "run", modality="table", output_dir=tmp_path / "eval")
    assert (tmp_path / "eval" / "predicted_vs_observed.png").is_file()
