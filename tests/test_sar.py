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


# -- two-channel chips (the paper's two SAR bands) -----------------------------------------------------------------

def _two_channel_root(root, per_class=3, size=12, write=None):
    """17_DEG / 15_DEG with two targets of ``write(path, array [2, size, size])`` chips (default .npy)."""
    rng = np.random.default_rng(0)
    for angle in ("17_DEG", "15_DEG"):
        for t in ("T1", "T2"):
            (root / angle / t).mkdir(parents=True, exist_ok=True)
            for j in range(per_class):
                chip = rng.uniform(0, 1, (2, size, size)).astype(np.float32)
                chip[1] *= 50.0  # a second channel at another level: standardised per channel
                (write or (lambda p, a: np.save(p.with_suffix(".npy"), a)))(root / angle / t / f"c{j}", chip)
    return root


def test_reader_two_channel_npy_and_tiff_chips(tmp_path):
    import tifffile

    root = _two_channel_root(tmp_path / "npy")
    train = MSTARSOC(root, "train", crop_size=8, val_ratio=0)
    assert train.info()["channels"] == 2 and len(train) == 6
    item = train[0]
    x = item["image"]
    assert x.shape == (2, 8, 8) and x.dtype == torch.float32 and item["path"].endswith("c0.npy")
    # the centre 8 x 8 crop of the stored chip, each channel standardised on its own
    raw = np.load(train.samples[0][0])[:, 2:10, 2:10]
    want = (raw - raw.mean(axis=(1, 2), keepdims=True)) / (raw.std(axis=(1, 2), keepdims=True) + 1e-6)
    assert np.allclose(x.numpy(), want, atol=1e-5)
    assert torch.allclose(x.mean(dim=(1, 2)), torch.zeros(2), atol=1e-5)
    assert torch.allclose(x.std(dim=(1, 2), unbiased=False), torch.ones(2), atol=1e-4)

    # the same chips as multi-page TIFFs (one page per channel) and as band-interleaved 2-band TIFFs
    pages = _two_channel_root(tmp_path / "pages", write=lambda p, a: tifffile.imwrite(p.with_suffix(".tif"), a))
    bands = _two_channel_root(tmp_path / "bands", write=lambda p, a: tifffile.imwrite(
        p.with_suffix(".tiff"), np.moveaxis(a, 0, -1), photometric="minisblack", planarconfig="contig"))
    for other in (pages, bands):
        ds = MSTARSOC(other, "train", crop_size=8, val_ratio=0)
        assert ds.info()["channels"] == 2
        assert torch.allclose(ds[0]["image"], x, atol=1e-5)  # same numbers, whatever the file form

    # the one-channel JPEG release keeps reading as before
    one = tmp_path / "jpeg"
    MSTARSOC.write_demo(one, per_class=2, test_per_class=1, size=16, two_channel=False)
    assert MSTARSOC(one, "train", crop_size=8, val_ratio=0).info()["channels"] == 1
    assert not (one / "two_channel").exists()


def test_reader_channel_errors_name_the_file(tmp_path):
    root = _two_channel_root(tmp_path / "npy")
    with pytest.raises(DatasetFormatError, match=r"chip .*17_DEG/T1/c0\.npy .* has 2 channel\(s\); the config "
                                                 r"expects 1 \(data\.args\.channels"):
        MSTARSOC(root, "train", crop_size=8, channels=1)
    assert MSTARSOC(root, "train", crop_size=8, channels=2).info()["channels"] == 2
    # a one-channel chip among two-channel ones: named when its item is read
    odd = root / "15_DEG" / "T2" / "c1.npy"
    np.save(odd, np.zeros((12, 12), np.float32))
    test = MSTARSOC(root, "test", crop_size=8)
    bad = next(i for i, (p, _) in enumerate(test.samples) if p == odd)
    with pytest.raises(DatasetFormatError, match=r"chip .*15_DEG/T2/c1\.npy has 1 channel\(s\); the dataset's chips "
                                                 r"have 2"):
        test[bad]
    for array, message in ((np.zeros((12, 12, 2), np.float32), r"has shape \[12, 12, 2\]; expected \[H, W\] or "
                                                               r"\[C, H, W\] with C <= 4 channels first"),
                           (np.zeros((2, 12, 12), np.complex64), r"complex64 values; expected real numbers"),
                           (np.full((2, 12, 12), np.nan, np.float32), r"288 NaN or infinite")):
        np.save(odd, array)
        with pytest.raises(DatasetFormatError, match=r"c1\.npy.*" + message):
            test[bad]
    odd.write_bytes(b"\x93NUMPY garbage")
    with pytest.raises(DatasetFormatError, match=r"cannot read \.npy chip .*c1\.npy"):
        test[bad]


def _tiny_sar(*extra):
    return ["model.llm.name=tiny", "model.llm.dtype=float32",
            "model.bridge={num_queries: 4, depth: 1, heads: 2, ff_mult: 2}", *extra]


def test_model_trains_one_step_on_the_two_channel_demo():
    from allspark.config import load_config
    from allspark.data import build_dataset
    from allspark.model import AllSpark

    cfg = load_config("sar", overrides=_tiny_sar(), recipe="two_channel_demo")
    data = build_dataset(cfg, "train")
    assert data.info()["channels"] == 2 and data.samples[0][0].suffix == ".npy"
    model = AllSpark.from_config(cfg, data.info())
    enc = model.encoders[0]
    conv = enc.features[0]
    assert enc.in_chans == 2 and conv.weight.shape[1] == 2  # sized from the data
    batch = data.collate([data[i] for i in range(8)])
    assert batch["image"].shape == (8, 2, 48, 48)
    before = conv.weight.detach().clone()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    model.train()
    loss = model(batch).loss
    loss.backward()
    # both input channels (HH and HV) feed the encoder
    assert all(conv.weight.grad[:, c].abs().sum() > 0 for c in range(2))
    opt.step()
    assert torch.isfinite(loss) and not torch.equal(before, conv.weight)


def test_checkpoint_channel_mismatch_names_the_chip(tmp_path):
    """A model trained on one-channel chips, evaluated on two-channel ones (and a config that asks for another
    channel count than the data has): one clear error."""
    from allspark.config import ConfigError, load_config
    from allspark.data import build_dataset
    from allspark.evaluate_run import evaluate_checkpoint
    from allspark.model import AllSpark

    root = tmp_path / "MSTAR"
    MSTARSOC.write_demo(root, per_class=3, test_per_class=2, size=40)
    cfg = load_config("sar", overrides=_tiny_sar(f"data.root={root}", "data.args.crop_size=32",
                                                 "data.args.val_ratio=0", "eval.baselines=[]"))
    model = AllSpark.from_config(cfg, build_dataset(cfg, "train").info())
    model.save_pretrained(tmp_path / "ckpt")
    with pytest.raises(DatasetFormatError, match=r"sar_cnn: chip .*two_channel/15_DEG/.*\.npy has 2 channel\(s\), "
                                                 r"the model was built for 1 .*data_info\.json"):
        evaluate_checkpoint(tmp_path / "ckpt", data_root=str(root / "two_channel"), output_dir=tmp_path / "eval")
    with pytest.raises(ConfigError, match=r"sar_cnn: the config says in_chans=2 but the dataset has 1 channels"):
        AllSpark.from_config(load_config("sar", overrides=_tiny_sar(
            f"data.root={root}", "data.args.crop_size=32", "model.encoders.0.args.in_chans=2")),
            build_dataset(cfg, "train").info())
