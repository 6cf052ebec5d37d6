"""MSI: the EuroSAT 13-band GeoTIFF reader (layout, band count, band-first files, undecodable files, train-only
statistics), the multispectral ViT (13-channel patch embedding, RGB weights adapted as timm does), and a
tiny end-to-end training run."""
import json

import numpy as np
import pytest
import tifffile
import torch

from allspark.data.base import DatasetFormatError
from allspark.data.eurosat import EuroSATMS
from encoders.multispectral_vit import MultispectralViT



@pytest.fixture()
def demo(tmp_path):
    root = tmp_path / "EuroSAT_MS"
    EuroSATMS.write_demo(root, seed=0, per_class=10, size=16)
    return root


def test_demo_files_are_eurosat_geotiffs(demo):
    arr = tifffile.imread(demo / "Forest" / "Forest_1.tif")
    assert arr.shape == (16, 16, 13) and arr.dtype == np.uint16


def test_reader_split_items_and_train_only_statistics(demo):
    kw = dict(image_size=16, train_ratio=0.9, val_ratio=0.2)
    train, val, test = (EuroSATMS(demo, s, **kw) for s in ("train", "val", "test"))
    assert train.class_names == sorted(EuroSATMS.DEMO_CLASSES)
    assert (len(train), len(val), len(test)) == (35, 10, 5)  # per class: 9 pool (7 + 2), 1 test
    item = test[0]
    assert item["image"].shape == (13, 16, 16) and item["image"].dtype == torch.float32
    stack = torch.stack([train[i]["image"] for i in range(len(train))])
    assert stack.mean(dim=(0, 2, 3)).abs().max() < 1e-3  # standardised with the train statistics
    # changing a test file does not move the statistics
    before = train.band_mean.copy()
    path = test.samples[0][0]
    tifffile.imwrite(path, np.full((16, 16, 13), 60000, np.uint16), photometric="minisblack")
    assert np.array_equal(EuroSATMS(demo, "train", **kw).band_mean, before)


def test_band_first_files_are_accepted(demo):
    path = demo / "Forest" / "Forest_1.tif"
    arr = tifffile.imread(path)
    tifffile.imwrite(path, np.ascontiguousarray(arr.transpose(2, 0, 1)), photometric="minisblack")
    ds = EuroSATMS(demo, "train", image_size=16)
    ds.samples = [(path, 0)]
    assert ds[0]["image"].shape == (13, 16, 16)
    assert torch.allclose(ds[0]["image"], (torch.from_numpy(arr.transpose(2, 0, 1) / 1e4).float()
                                           - torch.from_numpy(ds.band_mean)) / torch.from_numpy(ds.band_std),
                          atol=1e-4)


def test_wrong_band_count_and_broken_files_give_clear_errors(demo, tmp_path):
    path = demo / "River" / "River_3.tif"
    tifffile.imwrite(path, np.zeros((16, 16, 12), np.uint16), photometric="minisblack")
    with pytest.raises(DatasetFormatError, match=r"River_3\.tif: expected a 13-band image .* got shape \[16, 16, 12\]"):
        EuroSATMS(demo, "train", image_size=16, stats_files=10_000)
    path.write_bytes(b"II*\x00garbage")
    with pytest.raises(DatasetFormatError, match=r"cannot decode TIFF .*River_3\.tif"):
        EuroSATMS(demo, "train", image_size=16, stats_files=10_000)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DatasetFormatError, match=r"holds no class folder; expected layout: <root>/<ClassName>"):
        EuroSATMS(empty, "train", image_size=16)


def test_multispectral_vit_tokens_and_checks():
    enc = MultispectralViT(in_chans=13, image_size=32, patch_size=8, dim=32, depth=1, heads=4)
    out = enc({"image": torch.randn(2, 13, 32, 32)})
    assert out.tokens.shape == (2, 1 + 16, 32) and enc.out_dim == 32
    assert enc.vit.patch_embed.proj.weight.shape[1] == 13
    with pytest.raises(ValueError, match=r"batch\['image'\]: expected shape \[B, 13, 32, 32\], got \[2, 12, 32, 32\]"):
        enc({"image": torch.randn(2, 12, 32, 32)})
    with pytest.raises(ValueError, match="in_chans=13 but the dataset has 12 bands"):
        MultispectralViT(in_chans=13, image_size=32, dim=32, depth=1, heads=4, info={"num_bands": 12})


def test_rgb_weights_are_adapted_to_13_bands(tmp_path):
    """timm's adapt_input_conv: the RGB kernel tiled over 13 channels, scaled by 3/13; the position
    embedding resampled to the new grid; every other tensor copied."""
    from timm.models.vision_transformer import VisionTransformer

    rgb = VisionTransformer(img_size=64, patch_size=8, in_chans=3, num_classes=10, embed_dim=32, depth=1, num_heads=4)
    torch.save(rgb.state_dict(), tmp_path / "rgb.pth")
    enc = MultispectralViT(in_chans=13, image_size=32, patch_size=8, dim=32, depth=1, heads=4,
                           pretrained=str(tmp_path / "rgb.pth"))
    w_rgb, w = rgb.patch_embed.proj.weight, enc.vit.patch_embed.proj.weight
    expected = w_rgb.repeat(1, 5, 1, 1)[:, :13] * (3 / 13)
    assert torch.allclose(w, expected)
    assert torch.equal(enc.vit.blocks[0].attn.qkv.weight, rgb.blocks[0].attn.qkv.weight)
    assert enc.vit.pos_embed.shape == (1, 17, 32)


def test_tiny_training_run_beats_chance(tmp_path):
    from allspark.config import load_config
    from allspark.training import train

    cfg = load_config("msi", overrides=[
        "model.llm.name=tiny", "model.llm.dtype=float32",
        "model.bridge={num_queries: 4, depth: 1, heads: 2, ff_mult: 2}",
        "data.batch_size=20", "train.epochs=3", "train.lr=3e-3",
    ])
    metrics = train(cfg, tmp_path / "run")
    saved = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert saved["top1"] == pytest.approx(metrics["top1"]) and saved["num_samples"] == 80
    assert saved["top1"] > 0.4  # chance is 0.2
