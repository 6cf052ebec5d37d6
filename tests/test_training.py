"""Training through accelerate on the tiny random LLM: outputs, exact resume, and evaluation reports."""
import json

import pytest
import torch
from safetensors.torch import load_file

from allspark.config import load_config
from allspark.evaluate_run import evaluate_checkpoint
from allspark.training import find_latest_checkpoint, train
from tests.helpers import TINY_HSI



def test_train_writes_run_folder_and_evaluate_writes_report(tmp_path):
    cfg = load_config("hsi", overrides=[*TINY_HSI, "eval.args.scene_map=true"])
    metrics = train(cfg, tmp_path / "run")
    run = tmp_path / "run"
    assert (run / "config.yaml").is_file()
    assert (run / "best" / "model.safetensors").is_file()
    saved = json.loads((run / "metrics.json").read_text())
    assert saved["OA"] == pytest.approx(metrics["OA"])
    for key in ("OA", "AA", "kappa", "per_class", "confusion_matrix"):
        assert key in saved
    records = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert any("val/OA" in r for r in records) and any("loss" in r for r in records)
    assert find_latest_checkpoint(run) is not None

    report = evaluate_checkpoint(run, modality="hsi", output_dir=tmp_path / "eval")
    out = tmp_path / "eval"
    assert (out / "report.md").is_file() and (out / "confusion_matrix.png").is_file()
    assert (out / "classification_map.png").is_file()
    assert report["OA"] == pytest.approx(saved["OA"])  # same weights, same test split
    assert "classification_map.png" in (out / "report.md").read_text()


class _Crash(RuntimeError):
    pass


def test_resume_mid_epoch_matches_uninterrupted_run(tmp_path):
    overrides = TINY_HSI + ["train.save_every_steps=2", "train.keep_checkpoints=10",
                            "model.llm.adapter.dropout=0.1", "data.batch_size=16",
                            "eval.baselines=[]"]  # the test metrics are compared; the baselines add nothing here
    cfg = load_config("hsi", overrides=overrides)
    train(cfg, tmp_path / "full")

    def crash_at_5(state):
        if state.global_step == 5:
            raise _Crash("simulated kill")

    with pytest.raises(_Crash):
        train(cfg, tmp_path / "cut", step_callback=crash_at_5)
    latest = find_latest_checkpoint(tmp_path / "cut")
    assert latest.name == "step-4"  # the last periodic checkpoint before the kill
    state = json.loads((latest / "trainer_state.json").read_text())
    assert state["epoch"] == 0 and state["batches_in_epoch"] > 0, "the cut must fall mid-epoch"
    train(cfg, tmp_path / "cut", resume=True)

    final_full = find_latest_checkpoint(tmp_path / "full")
    final_cut = find_latest_checkpoint(tmp_path / "cut")
    assert final_full.name == final_cut.name
    a = load_file(str(final_full / "model.safetensors"))
    b = load_file(str(final_cut / "model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-6, rtol=0), k
    full_metrics = json.loads((tmp_path / "full" / "metrics.json").read_text())
    cut_metrics = json.loads((tmp_path / "cut" / "metrics.json").read_text())
    assert full_metrics["OA"] == pytest.approx(cut_metrics["OA"])
