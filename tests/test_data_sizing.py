"""What the dataset knows sizes the model unless the config sets it (allspark/sizing.py): a real folder-per-class
set of 10 classes and a hyperspectral cube of 64 bands build with the shipped configs as they are; a config value
that disagrees with the data, or a size neither the config nor the data gives, is one clear error."""
import numpy as np
import pytest
import torch
from PIL import Image

from allspark.config import load_config
from allspark.data import build_dataset
from allspark.model import AllSpark
from allspark.registry import ENCODERS, HEADS
from allspark.sizing import from_data

CLASSES = ["airport", "beach", "bridge", "desert", "forest", "harbor", "lake", "meadow", "port", "river"]


@pytest.fixture(scope="module")
def scenes(tmp_path_factory):
    """Ten class folders in the NWPU-RESISC45 layout (<root>/<class>/<image>.jpg), 5 JPEGs each."""
    root = tmp_path_factory.mktemp("scenes")
    rng = np.random.default_rng(0)
    for k, name in enumerate(CLASSES):
        (root / name).mkdir()
        colour = rng.uniform(0, 255, 3)
        for i in range(5):
            pixels = np.clip(colour + rng.normal(0, 20, (40, 40, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(root / name / f"{name}_{i:03d}.jpg")
    return root


def _rgb(root, *overrides):
    # the shipped RGB config; only the language model and the image size are shrunk for the test
    return load_config("rgb", data_root=str(root), overrides=["model.llm.name=tiny", "data.args.image_size=64",
                                                                *overrides])


def test_rgb_config_trains_on_a_ten_class_folder_set(scenes, tmp_path):
    cfg = _rgb(scenes)
    assert "num_classes" not in cfg.model.head.args and "image_size" not in cfg.model.encoders[0].args
    train = build_dataset(cfg, "train")
    assert train.info()["num_classes"] == 10
    torch.manual_seed(0)
    model = AllSpark(cfg, train.info())
    assert model.head.linear.out_features == 10
    enc = model.encoders[0]
    assert (enc.image_size, enc.in_chans) == (64, 3)  # from data.args.image_size and the reader's channels
    batch = train.collate([train[i] for i in range(len(train))])
    model.train()
    out = model(batch)
    assert out.predictions["logits"].shape == (len(train), 10)
    assert torch.isfinite(out.loss)
    out.loss.backward()
    assert model.head.linear.weight.grad is not None
    # the checkpoint keeps the data info, so the model rebuilds with 10 classes from a config that never says so
    model.save_pretrained(tmp_path / "ckpt")
    again = AllSpark.from_pretrained(tmp_path / "ckpt").eval()
    model.eval()
    with torch.no_grad():
        assert torch.allclose(again(batch).predictions["logits"], model(batch).predictions["logits"], atol=1e-5)


def test_rgb_config_value_disagreeing_with_the_folders_is_an_error(scenes):
    cfg = _rgb(scenes, "model.head.args.num_classes=45")
    train = build_dataset(cfg, "train")
    with pytest.raises(ValueError, match="the config says num_classes=45 but the dataset has 10 classes"):
        AllSpark(cfg, train.info())
    # an explicit value that agrees keeps working as before
    assert AllSpark(_rgb(scenes, "model.head.args.num_classes=10"), train.info()).head.linear.out_features == 10
    cfg = _rgb(scenes, "model.encoders.0.args.image_size=96")
    with pytest.raises(ValueError, match="the config says image_size=96 but the dataset gives 64"):
        AllSpark(cfg, train.info())


@pytest.fixture(scope="module")
def cube64(tmp_path_factory):
    from allspark.data.pavia import PaviaUniversity

    root = tmp_path_factory.mktemp("pavia64")
    PaviaUniversity.write_demo(root, seed=0, height=24, width=24, bands=64)
    return root


def test_hsi_config_builds_for_a_cube_of_64_bands(cube64):
    cfg = load_config("hsi", data_root=str(cube64), overrides=["model.llm.name=tiny"])
    assert "in_bands" not in cfg.model.encoders[0].args and "bands" not in cfg.data.args
    train = build_dataset(cfg, "train")
    assert train.info()["num_bands"] == 64
    torch.manual_seed(0)
    model = AllSpark(cfg, train.info())
    assert model.encoders[0].in_bands == 64 and model.encoders[0].num_tokens == 64
    assert model.head.linear.out_features == train.info()["num_classes"] == 9
    batch = train.collate([train[i] for i in range(4)])
    assert batch["spectrum"].shape == (4, 64)
    out = model(batch)
    assert out.predictions["logits"].shape == (4, 9) and torch.isfinite(out.loss)


def test_hsi_config_in_bands_disagreeing_with_the_cube_is_an_error(cube64):
    cfg = load_config("hsi", data_root=str(cube64),
                      overrides=["model.llm.name=tiny", "model.encoders.0.args.in_bands=103"])
    train = build_dataset(cfg, "train")
    with pytest.raises(ValueError, match="hsi_spectral: the config says in_bands=103 but the dataset has 64 bands"):
        AllSpark(cfg, train.info())


# -- the rule, component by component ---------------------------------------------------------------------
import encoders  # noqa: E402,F401  (registers the built-in encoders and heads)
import heads  # noqa: E402,F401

#: (registry, spec without the data-known argument, info that sizes it, attribute, expected value)
FROM_INFO = [
    (ENCODERS, {"type": "hsi_spectral", "dim": 8, "depth": 1, "heads": 2}, {"num_bands": 20}, "in_bands", 20),
    (ENCODERS, {"type": "multispectral_vit", "patch_size": 8, "dim": 8, "depth": 1, "heads": 2},
     {"num_bands": 5, "image_size": 16}, "in_chans", 5),
    (ENCODERS, {"type": "sar_cnn", "channels": [4, 4, 4]}, {"channels": 2, "image_size": 16}, "in_chans", 2),
    (ENCODERS, {"type": "raster_patch", "key": "lidar", "dim": 8, "depth": 0, "heads": 2},
     {"channels": {"lidar": 3, "hsi": 48}, "patch": 5}, "in_channels", 3),
    (ENCODERS, {"type": "pointbert", "num_groups": 4, "group_size": 4, "dim": 8, "depth": 1, "heads": 2},
     {"num_points": 32, "point_channels": 6}, "in_channels", 6),
    (ENCODERS, {"type": "tubevit", "dim": 12, "depth": 1, "heads": 2,
                "tubes": [{"kernel": [2, 4, 4], "stride": [2, 4, 4]}]},
     {"num_frames": 4, "image_size": 8, "channels": 1}, "in_channels", 1),
    (ENCODERS, {"type": "multiview_vit", "patch_size": 8, "dim": 8, "depth": 1, "heads": 2},
     {"num_views": 3, "image_size": [16, 32]}, "image_size", (16, 32)),
    (ENCODERS, {"type": "tutr", "dim": 8, "heads": 2}, {"obs_len": 6}, "obs_len", 6),
    (ENCODERS, {"type": "staeformer", "dim": 8, "graph_layers": 0, "input_embedding_dim": 4,
                "tod_embedding_dim": 4, "dow_embedding_dim": 4, "adaptive_embedding_dim": 4},
     {"num_nodes": 7, "input_len": 3, "steps_per_day": 24}, "num_nodes", 7),
    (ENCODERS, {"type": "tabformer", "dim": 8, "heads": 2}, {"cat_cardinalities": [3, 4], "num_columns": ["a"]},
     "cat_cardinalities", [3, 4]),
    (HEADS, {"type": "classification", "hidden_size": 8}, {"num_classes": 10}, None, 10),
    (HEADS, {"type": "reid", "hidden_size": 8}, {"num_classes": 6}, None, 6),
    (HEADS, {"type": "regression", "hidden_size": 8}, {"target_shape": [12, 7]}, "out_shape", (12, 7)),
]


@pytest.mark.parametrize("registry, spec, info, attr, want", FROM_INFO, ids=[s["type"] for _, s, *_ in FROM_INFO])
def test_each_component_takes_its_size_from_the_info(registry, spec, info, attr, want):
    built = registry.build(spec, optional={"info": info})
    if attr is None:  # classification-like heads: the width of the last layer
        layer = built.linear if hasattr(built, "linear") else built.classifier
        assert layer.out_features == want
    else:
        assert getattr(built, attr) == want


MISSING = [
    (ENCODERS, {"type": "hsi_spectral", "dim": 8, "depth": 1, "heads": 2}, "in_bands", "'num_bands'"),
    (ENCODERS, {"type": "frozen_image_backbone", "weights": "none"}, "image_size", "'image_size'"),
    (ENCODERS, {"type": "raster_patch", "key": "sar", "patch": 5}, "in_channels", "'channels'['sar']"),
    (ENCODERS, {"type": "dual_resnet", "arch": "resnet18"}, "image_size", "'image_size'"),
    (ENCODERS, {"type": "staeformer", "graph_layers": 0}, "num_nodes", "'num_nodes'"),
    (HEADS, {"type": "classification", "hidden_size": 8}, "num_classes", "'num_classes'"),
    (HEADS, {"type": "regression", "hidden_size": 8}, "out_shape", "'target_shape'"),
]


@pytest.mark.parametrize("registry, spec, arg, key", MISSING, ids=[s["type"] for _, s, *_ in MISSING])
def test_a_size_neither_config_nor_data_gives_names_both(registry, spec, arg, key):
    with pytest.raises(ValueError) as err:
        registry.build(spec, optional={"info": {"class_names": ["a", "b"]}})
    message = str(err.value)
    where = "model.head.args" if registry is HEADS else "model.encoders.*.args"
    assert f"{arg} is not set and the dataset info has no {key}" in message
    assert f"set {where}.{arg}" in message and "class_names" in message  # what the reader does give


MISMATCH = [
    (ENCODERS, {"type": "raster_patch", "key": "hsi", "in_channels": 48, "patch": 5},
     {"channels": {"hsi": 50}}, "the config says in_channels=48 but the dataset has 50 channels in its 'hsi' raster"),
    (ENCODERS, {"type": "raster_patch", "key": "hsi", "in_channels": 48, "patch": 7},
     {"channels": {"hsi": 48}, "patch": 5}, "the config says patch=7 but the dataset cuts 5 x 5 patches"),
    (ENCODERS, {"type": "sar_cnn", "in_chans": 1}, {"channels": 3, "image_size": 16},
     "the config says in_chans=1 but the dataset has 3 channels"),
    (ENCODERS, {"type": "dual_resnet", "arch": "resnet18", "image_size": [64, 32]}, {"image_size": [288, 144]},
     r"the config says image_size=\[64, 32\] but the dataset gives \[288, 144\]"),
    (ENCODERS, {"type": "multiview_vit", "num_views": 5, "image_size": [16, 32], "patch_size": 8},
     {"num_views": 3}, "the config says num_views=5 but the dataset gives 3 views per sample"),
    (ENCODERS, {"type": "staeformer", "num_nodes": 207, "graph_layers": 0},
     {"num_nodes": 325, "input_len": 12, "steps_per_day": 288},
     "the config says num_nodes=207 but the dataset has 325 sensors"),
    (ENCODERS, {"type": "tutr", "obs_len": 8}, {"obs_len": 6},
     "the config says obs_len=8 but the dataset observes 6 steps"),
    (ENCODERS, {"type": "tabformer", "cat_cardinalities": [3, 5]}, {"cat_cardinalities": [3, 4], "num_columns": []},
     r"the config says cat_cardinalities=\[3, 5\] but the dataset has discrete columns of cardinalities \[3, 4\]"),
    (ENCODERS, {"type": "tabformer", "num_features": 3}, {"cat_cardinalities": [], "num_columns": ["a", "b"]},
     "the config says num_features=3 but the dataset has 2 continuous columns"),
    (HEADS, {"type": "reid", "hidden_size": 8, "num_classes": 5}, {"num_classes": 4},
     "the config says num_classes=5 but the dataset has 4 training identities"),
    (HEADS, {"type": "regression", "hidden_size": 8, "out_shape": [12, 2]}, {"target_shape": [12, 207]},
     r"the config says out_shape=\[12, 2\] but the dataset gives targets of shape \[12, 207\]"),
]


@pytest.mark.parametrize("registry, spec, info, message", MISMATCH, ids=[s["type"] for _, s, *_ in MISMATCH])
def test_an_explicit_value_disagreeing_with_the_data_is_an_error(registry, spec, info, message):
    with pytest.raises(ValueError, match=message):
        registry.build(spec, optional={"info": info})


def test_explicit_values_work_without_any_info():
    enc = ENCODERS.build({"type": "hsi_spectral", "in_bands": 30, "dim": 8, "depth": 1, "heads": 2},
                         optional={"info": {}})
    assert enc.in_bands == 30
    assert HEADS.build({"type": "regression", "hidden_size": 8, "out_shape": 3}).out_shape == (3,)
    assert HEADS.build({"type": "classification", "hidden_size": 8, "num_classes": 4}).linear.out_features == 4


def test_from_data_rejects_values_that_are_not_sizes():
    with pytest.raises(ValueError, match=r"hsi_spectral: model.encoders.\*.args.in_bands: expected a whole number, "
                                         r"got 'many'"):
        from_data("hsi_spectral", "in_bands", "many", {"num_bands": 103}, "num_bands")
    with pytest.raises(ValueError, match=r"the dataset info gives 'num_bands'=2.5, which cannot size in_bands"):
        from_data("hsi_spectral", "in_bands", None, {"num_bands": 2.5}, "num_bands")
    assert from_data("x", "in_bands", None, {"num_bands": np.int64(7)}, "num_bands") == 7
