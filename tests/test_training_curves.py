"""``evaluate.py``'s report of a checkpoint in a run folder ends with the run's training curves: the training loss
and the validation metric per optimizer step, from ``log.jsonl``, the best validation point marked."""
from __future__ import annotations

import json
import shutil

import pytest
import torch

from allspark.config import load_config
from allspark.evaluation.curves import plot_training_curves, read_log, training_curves
from tests.helpers import TINY_HSI


def test_a_run_folder_report_shows_its_training_curves(tmp_path):
    from allspark.evaluate_run import evaluate_checkpoint
    from allspark.training import train

    cfg = load_config("hsi", overrides=[*TINY_HSI, "model.llm.dtype=float32", "train.log_every_steps=2",
                                        "eval.baselines=[]", "train.log_with=none"])
    torch.manual_seed(0)
    train(cfg, tmp_path / "run")
    records = read_log(tmp_path / "run" / "log.jsonl")
    curves = training_curves(records, "OA", True)
    assert len(curves["loss"]) >= 4 and len(curves["val"]) == 2, "two epochs: two validations"
    assert [s for s, _ in curves["loss"]] == sorted(s for s, _ in curves["loss"])
    best_epoch = json.loads((tmp_path / "run" / "metrics.json").read_text())["val/OA"]
    assert curves["best"][1] == pytest.approx(best_epoch), "the point training kept as best/"

    evaluate_checkpoint(tmp_path / "run", output_dir=tmp_path / "eval")
    report = (tmp_path / "eval" / "report.md").read_text()
    assert "## Training curves (log.jsonl: training loss and validation OA per optimizer step)" in report
    assert report.rstrip().endswith("(training_curves.png)")
    assert (tmp_path / "eval" / "training_curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "training_curves.png" in (tmp_path / "run" / "best" / "README.md").read_text(), "in the model card too"

    # a checkpoint outside a run folder has no log: no curves
    shutil.copytree(tmp_path / "run" / "best", tmp_path / "alone")
    evaluate_checkpoint(tmp_path / "alone", output_dir=tmp_path / "eval-alone")
    assert "Training curves" not in (tmp_path / "eval-alone" / "report.md").read_text()
    assert not (tmp_path / "eval-alone" / "training_curves.png").exists()


def test_curves_of_a_log(tmp_path):
    log = tmp_path / "log.jsonl"
    log.write_text("\n".join([
        json.dumps({"step": 1, "epoch": 0.5, "loss": 2.0, "lr": 1e-3}),
        json.dumps({"step": 2, "epoch": 1.0, "loss": 1.5, "lr": 1e-3}),
        json.dumps({"epoch": 1.0, "step": 2, "val/RMSE": 3.0, "best": True}),
        json.dumps({"step": 4, "epoch": 2.0, "loss": 1.0, "lr": 1e-3}),
        json.dumps({"epoch": 2.0, "step": 4, "val/RMSE": 2.5, "best": True}),
        json.dumps({"epoch": 3.0, "step": 6, "val/RMSE": 2.5, "best": False}),
        json.dumps({"test/RMSE": 2.7}),
        '{"step": 7, "loss": 0.',  # a torn last line (a killed run)
    ]))
    records = read_log(log)
    assert len(records) == 7
    curves = training_curves(records, "RMSE", greater_is_better=False)
    assert curves["loss"] == [(1, 2.0), (2, 1.5), (4, 1.0)]
    assert curves["val"] == [(2, 3.0), (4, 2.5), (6, 2.5)] and curves["best"] == (4, 2.5), "lower is better; first"
    assert training_curves(records, "RMSE", greater_is_better=True)["best"] == (2, 3.0)
    assert plot_training_curves(records, "RMSE", False, tmp_path / "c.png").startswith("Training curves")
    assert (tmp_path / "c.png").stat().st_size > 1000
    assert plot_training_curves([{"test/RMSE": 2.7}], "RMSE", False, tmp_path / "none.png") is None
    assert not (tmp_path / "none.png").exists()
