"""SAR: the MSTAR SOC reader (17-degree train / 15-degree test folders, centre crops, errors), the
three-layer CNN encoder, and a tiny end-to-end training run."""
import json

import numpy as np
import pytest
import torch
from PIL import Image

from allspark.data.base import DatasetFormatError
from allspark.data.mstar import MSTARSOC
from encoders.sar_cnn import SARConvEncoder



@pytest.fixture()
def demo(tmp_path):
    root = tmp_path / "MSTAR"
    MSTARSOC.write_demo(root, seed=0, per_class=5, test_per_class=3, size=40)
    return root


def test_reader_angles_split_and_centre_crop(demo):
    train, val, test = (MSTARSOC(demo, s, crop_size=32, val_ratio=0.2) for s in ("train", "val", "test"))
    assert train.class_names == sorted(MSTARSOC.DEMO_TARGETS)
    assert (len(train), len(val), len(test)) == (20, 5, 15)
    assert all("15_DEG" in str(p) for p, _ in test.samples)
    assert all("17_DEG" in str(p) for p, _ in train.samples + val.samples)
    assert not {p for p, _ in train.samples} & {p for p, _ in val.samples}
    # a chip with a known pattern: the crop is the centre 32x32 of the 40x40 chip, standardised
    chip = np.zeros((40, 40), np.uint8)
    chip[4:36, 4:36] = 100
    chip[20, 20] = 250
    path = demo / "15_DEG" / "T72" / "known.png"
    Image.fromarray(chip).save(path)
    test.samples = [(path, 0)]
    x = test[0]["image"]
    assert x.shape == (1, 32, 32)
    assert x[0, 16, 16] == x.max() and torch.isclose(x.mean(), torch.tensor(0.0), atol=1e-5)


def test_reader_errors(demo, tmp_path):
    with pytest.raises(DatasetFormatError, match=r"17_DEG is missing or not a folder; expected layout: <root>/17_DEG/<TARGET>"):
        MSTARSOC(tmp_path, "train")
    (demo / "15_DEG" / "T72").rename(demo / "15_DEG" / "T80")
    with pytest.raises(DatasetFormatError, match=r"targets of .*15_DEG .* differ"):
        MSTARSOC(demo, "test")
    bad = demo / "17_DEG" / "BMP2" / "BMP2_17_DEG_000.jpeg"
    bad.write_bytes(b"\xff\xd8 truncated")
    ds = MSTARSOC(demo, "train", crop_size=32, val_ratio=0)
    ds.samples = [(bad, 1)]
    with pytest.raises(DatasetFormatError, match=r"cannot decode image .*BMP2_17_DEG_000\.jpeg"):
        ds[0]
    ds = MSTARSOC(demo, "train", crop_size=88)
    with pytest.raises(DatasetFormatError, match=r"is 40 x 40, smaller than the 88 x 88 crop"):
        ds[0]


def test_encoder_tokens_and_checks():
    enc = SARConvEncoder(image_size=88, in_chans=1)
    out = enc({"image": torch.randn(2, 1, 88, 88)})
    assert out.tokens.shape == (2, 121, 128) and enc.out_dim == 128
    convs = [m for m in enc.features if isinstance(m, torch.nn.Conv2d)]
    assert len(convs) == 3
    with pytest.raises(ValueError, match=r"batch\['image'\]: expected shape \[B, 1, 88, 88\], got \[2, 1, 64, 64\]"):
        enc({"image": torch.randn(2, 1, 64, 64)})
    with pytest.raises(ValueError, match="multiple of 8"):
        SARConvEncoder(image_size=90, in_chans=1)


def test_tiny_training_run_beats_chance(tmp_path):
    from allspark.config import load_config
    from allspark.training import train

    cfg = load_config("sar", overrides=[
        "model.llm.name=tiny", "model.llm.dtype=float32",
        "model.bridge={num_queries: 4, depth: 1, heads: 2, ff_mult: 2}",
        "train.epochs=6", "train.lr=3e-3",
    ])
    metrics = train(cfg, tmp_path / "run")
    saved = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert saved["top1"] == pytest.approx(metrics["top1"]) and saved["num_samples"] == 100
    assert saved["top1"] > 0.4  # chance is 0.2
