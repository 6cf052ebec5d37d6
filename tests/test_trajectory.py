"""Trajectory modality: ETH-UCY reader (Social-GAN layout, malformed line), ADE/FDE, constant velocity,
the TUTR encoder and a short end-to-end train on the tiny LLM."""
import math

import numpy as np
import pytest
import torch

from allspark.data.base import DatasetFormatError
from allspark.data.eth_ucy import ETHUCYTrajectories
from allspark.evaluation.regression import TrajectoryEvaluator, constant_velocity
from allspark.metrics.regression import displacement_errors


def _write_scene(path, peds, frames=range(0, 200, 10), gap_after=None):
    lines = []
    for k, f in enumerate(frames):
        if gap_after is not None and k > gap_after:
            f += 10  # one missing frame
        for p in peds:
            lines.append(f"{float(f)}\t{float(p)}\t{0.1 * k + p:.2f}\t{0.2 * k:.2f}")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")


def test_reader_social_gan_layout_windows_and_neighbours(tmp_path):
    _write_scene(tmp_path / "eth" / "test" / "biwi_eth.txt", peds=[1, 2, 3], frames=range(0, 210, 10))  # 21 frames
    _write_scene(tmp_path / "eth" / "train" / "crowds_zara01_train.txt", peds=[1, 2])
    _write_scene(tmp_path / "eth" / "val" / "crowds_zara01_val.txt", peds=[1])
    test = ETHUCYTrajectories(tmp_path, "test")
    assert len(test) == 2 * 3  # two 20-frame windows, three pedestrians each
    item = test[0]
    assert item["obs"].shape == (8, 2) and item["target"].shape == (12, 2)
    assert torch.allclose(item["obs"][-1], torch.zeros(2))  # relative to the last observed position
    assert torch.allclose(item["target"][0], torch.tensor([0.1, 0.2]), atol=1e-5)
    assert item["neighbours_mask"].sum() == 2 and item["neighbours"].shape == (8, 8, 2)
    # nearest neighbour first: pedestrians are 1 m apart along x
    assert torch.allclose(item["neighbours"][0, -1].abs(), torch.tensor([1.0, 0.0]), atol=1e-5)
    assert not test.augment and ETHUCYTrajectories(tmp_path, "train").augment


def test_reader_skips_windows_across_a_recording_gap(tmp_path):
    _write_scene(tmp_path / "eth" / "test" / "a.txt", peds=[1], frames=range(0, 250, 10), gap_after=12)
    # 25 frames with a gap after the 13th: only windows entirely on one side are kept -> none of 20 frames
    with pytest.raises(DatasetFormatError, match="consecutive"):
        ETHUCYTrajectories(tmp_path, "test")


def test_reader_rejects_malformed_line(tmp_path):
    path = tmp_path / "eth" / "test" / "biwi_eth.txt"
    _write_scene(path, peds=[1])
    path.write_text(path.read_text() + "200.0\t1.0\t3.5\n")
    with pytest.raises(DatasetFormatError, match=r"biwi_eth.txt:21: expected 4 fields"):
        ETHUCYTrajectories(tmp_path, "test")
    path.write_text("0.0\t1.0\tabc\t2.0\n")
    with pytest.raises(DatasetFormatError, match=r"biwi_eth.txt:1: expected numbers"):
        ETHUCYTrajectories(tmp_path, "test")


def test_reader_names_the_expected_layout(tmp_path):
    (tmp_path / "hotel").mkdir()
    with pytest.raises(DatasetFormatError, match=r"<scene>/\{train,val,test\}"):
        ETHUCYTrajectories(tmp_path, "test", test_scene="eth")


def test_displacement_errors_hand_computed():
    target = np.zeros((2, 3, 2))
    pred = np.zeros((2, 3, 2))
    pred[0, :, 0] = [3.0, 0.0, 4.0]  # distances 3, 0, 4
    pred[1, :, 1] = [1.0, 1.0, 1.0]  # distances 1, 1, 1
    m = displacement_errors(pred, target)
    assert m["ADE"] == pytest.approx(((7 / 3) + 1) / 2)
    assert m["FDE"] == pytest.approx((4 + 1) / 2)
    # best of K: track 0 has a perfect second sample; ADE and FDE take the minimum over samples
    samples = np.stack([pred, np.zeros_like(pred)], axis=1)
    samples[1, 1] = 5.0
    best = displacement_errors(samples, target)
    assert best["ADE"] == pytest.approx((0 + 1) / 2)
    assert best["FDE"] == pytest.approx((0 + 1) / 2)


def test_constant_velocity_and_evaluator_baseline():
    obs = np.stack([np.stack([np.arange(8.0), np.zeros(8)], -1)])  # 1 m per step along x
    cv = constant_velocity(obs, 12)
    assert np.allclose(cv[0, :, 0], np.arange(8.0, 20.0))
    target = cv.copy()
    target[0, -1, 1] = 2.0
    m = TrajectoryEvaluator({}).compute({"pred": target, "target": target, "obs": obs, "index": np.arange(1)})
    assert m["ADE"] == 0 and m["baseline/FDE"] == pytest.approx(2.0) and m["baseline/ADE"] == pytest.approx(2 / 12)


def test_encoder_masks_padded_neighbours():
    from encoders.trajectory import TrajectoryEncoder

    enc = TrajectoryEncoder(obs_len=8, dim=16, heads=2, dropout=0.0).eval()
    batch = {"obs": torch.randn(2, 8, 2), "neighbours": torch.randn(2, 3, 8, 2),
             "neighbours_mask": torch.tensor([[True, False, False], [True, True, True]])}
    out = enc(batch)
    assert out.tokens.shape == (2, 4, 16) and out.mask.tolist()[0] == [True, True, False, False]
    changed = dict(batch, neighbours=batch["neighbours"].clone())
    changed["neighbours"][0, 1:] = 100.0  # padding content must not matter
    assert torch.allclose(enc(changed).tokens[0], out.tokens[0], atol=1e-5)
    with pytest.raises(ValueError, match=r"batch\['obs'\]: expected shape \[B, 8, 2\]"):
        enc(dict(batch, obs=torch.randn(2, 7, 2)))


def test_tiny_end_to_end_train_beats_constant_velocity(tmp_path, _fresh_accelerate_state):
    from allspark.config import load_config
    from allspark.training import train

    cfg = load_config("trajectory", overrides=[
        "model.llm.name=tiny", "model.encoders.0.args={dim: 32, depth: 2, heads: 2, dropout: 0.0}",
        "model.bridge={num_queries: 4, depth: 1, heads: 2, ff_mult: 2}", "data.batch_size=32",
        "train.epochs=3", "train.lr=3e-3", "train.warmup_epochs=0.2"])
    metrics = train(cfg, tmp_path / "run")
    assert math.isfinite(metrics["ADE"])
    assert metrics["ADE"] < metrics["baseline/ADE"]
