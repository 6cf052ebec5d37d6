"""WHU-OMVS oblique multi-view stereo: the reader of the official layout (cameras, projection matrices,
EXR depth maps, masks, view pairs), its errors, and the geometric consistency of the synthetic demo."""
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from allspark.data.base import DatasetFormatError
from allspark.data.whu_omvs import WHUOMVS, projection_matrix, read_camera, read_exr_depth, write_camera


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    root = tmp_path_factory.mktemp("whu") / "WHU_OMVS"
    WHUOMVS.write_demo(root, seed=3, train_scenes=2, test_scenes=1, targets="single")
    return root


@pytest.fixture()
def copy(demo, tmp_path):
    root = tmp_path / "copy"
    shutil.copytree(demo, root)
    return root


def _raw(ds, i, j):
    scene, names, _ = ds.samples[i]
    return np.asarray(Image.open(scene / "images" / f"{names[j]}.png").convert("RGB")).astype(np.float32)


def test_reads_demo_shapes_ranges_and_info(demo):
    train, val, test = (WHUOMVS(demo, s) for s in ("train", "val", "test"))
    assert (len(train), len(val), len(test)) == (5, 5, 5)
    assert {s[0].name for s in val.samples} == {"block_train_01"}
    assert train.info() == {"num_views": 5, "image_size": [48, 64]}
    item = test[0]
    assert item["views"].shape == (5, 3, 48, 64) and item["views"].dtype == torch.float32
    assert item["proj"].shape == (5, 4, 4) and item["proj"].dtype == torch.float32
    assert item["depth"].shape == (48, 64) and item["depth"].dtype == torch.float32
    assert item["index"].dtype == torch.int64 and int(item["index"]) == 0
    # each view standardised per channel
    assert torch.allclose(item["views"].mean(dim=(2, 3)), torch.zeros(5, 3), atol=1e-4)
    dmin, dmax = item["depth_range"].tolist()
    valid = item["depth"] > 0
    assert valid.float().mean() > 0.7
    assert item["depth"][valid].min() >= dmin and item["depth"][valid].max() <= dmax
    assert item["depth"][valid].std() > 1.0
    batch = WHUOMVS.collate([test[0], test[1]])
    assert batch["views"].shape == (2, 5, 3, 48, 64)
    three = WHUOMVS(demo, "test", num_views=3)
    assert three[0]["views"].shape == (3, 3, 48, 64)


def test_reprojection_matches_colours(demo):
    """Warp the reference pixels at their ground-truth depth into each source view: the colours agree for
    non-occluded pixels, far better than at a random shift."""
    ds = WHUOMVS(demo, "test")
    for i in (0, 2):
        item = ds[i]
        P = item["proj"].double().numpy()
        d = item["depth"].double().numpy()
        h, w = d.shape
        vv, uu = np.mgrid[0:h, 0:w].astype(np.float64)
        v = d > 0
        X = np.linalg.inv(P[0]) @ np.stack([uu[v] * d[v], vv[v] * d[v], d[v], np.ones(v.sum())])
        ref = _raw(ds, i, 0)[v]
        scene, names, _ = ds.samples[i]
        good, control, fractions = [], [], []
        rng = np.random.default_rng(0)
        for j in range(1, 5):
            x = P[j] @ X
            z = x[2]
            ui, wi = np.rint(x[0] / z).astype(int), np.rint(x[1] / z).astype(int)
            ok = (ui >= 0) & (ui < w) & (wi >= 0) & (wi < h)
            src_depth = read_exr_depth(scene / "depths" / f"{names[j]}.exr")
            vis = ok.copy()
            vis[ok] = np.abs(src_depth[wi[ok], ui[ok]] - z[ok]) < 0.5
            assert vis.sum() > 100  # the views overlap
            fractions.append(vis.mean())
            src = _raw(ds, i, j)
            good.append(np.abs(src[wi[vis], ui[vis]] - ref[vis]).mean(1))
            shift = rng.integers(3, 8, (2, vis.sum())) * rng.choice([-1, 1], (2, vis.sum()))
            uc, wc = np.clip(ui[vis] + shift[0], 0, w - 1), np.clip(wi[vis] + shift[1], 0, h - 1)
            control.append(np.abs(src[wc, uc] - ref[vis]).mean(1))
        assert np.mean(fractions) > 0.25
        good, control = np.concatenate(good), np.concatenate(control)
        assert np.median(good) < 8 and np.median(control) > 3 * np.median(good)


def test_downscale_halves_sizes_and_intrinsics(demo):
    full, half = WHUOMVS(demo, "test"), WHUOMVS(demo, "test", downscale=2)
    assert half.info()["image_size"] == [24, 32]
    a, b = full[1], half[1]
    assert b["views"].shape == (5, 3, 24, 32) and b["depth"].shape == (24, 32)
    scale = torch.diag(torch.tensor([0.5, 0.5, 1.0, 1.0]))
    assert torch.allclose(scale @ a["proj"], b["proj"], rtol=1e-4, atol=1e-3)
    assert torch.equal(b["depth"], a["depth"][::2, ::2])


def test_camera_file_round_trip(tmp_path):
    twc = np.eye(4)
    twc[:3, 3] = (10.0, 20.0, 50.0)  # nadir: camera axes = world axes (X east, Y north, looks down -Z)
    k = np.array([[100.0, 0, 31.5], [0, 100.0, 23.5], [0, 0, 1]])
    path = tmp_path / "cam.txt"
    path.write_text(write_camera(twc, k, 40.0, 60.0))
    twc2, k2, (dmin, dmax, dint) = read_camera(path)
    assert np.allclose(twc2, twc) and np.allclose(k2, k)
    assert (dmin, dmax) == (40.0, 60.0) and dint == pytest.approx(20 / 64)
    P = projection_matrix(twc2, k2)
    x = P @ np.array([12.0, 19.0, 0.0, 1.0])  # 2 m east, 1 m south of the camera, 50 m below it
    assert np.allclose(x[:3] / x[2], [35.5, 25.5, 1.0]) and x[2] == pytest.approx(50.0)
    back = np.linalg.inv(P) @ np.array([35.5 * 50, 25.5 * 50, 50.0, 1.0])
    assert np.allclose(back, [12.0, 19.0, 0.0, 1.0])


def test_missing_index(copy):
    (copy / "train" / "index.txt").unlink()
    with pytest.raises(DatasetFormatError, match="index.txt.*missing"):
        WHUOMVS(copy, "train")


def _sample0(root, split="test"):
    return WHUOMVS(root, split).samples[0]


def test_missing_source_camera(copy):
    scene, names, _ = _sample0(copy)
    (scene / "cams" / f"{names[2]}.txt").unlink()
    with pytest.raises(DatasetFormatError, match="views without camera parameters"):
        WHUOMVS(copy, "test")


@pytest.mark.parametrize("text, pattern", [("extrinsic Twc 1 0 0 0", "tokens, need 30"),
                                           (None, "non-numeric"), ("singular", "singular")])
def test_malformed_camera(copy, text, pattern):
    scene, names, _ = _sample0(copy)
    path = scene / "cams" / f"{names[0]}.txt"
    tokens = path.read_text().split()
    if text is None:
        tokens[5] = "abc"
        text = " ".join(tokens)
    elif text == "singular":
        tokens[2:18] = ["0"] * 16
        text = " ".join(tokens)
    path.write_text(text)
    with pytest.raises(DatasetFormatError, match=pattern):
        WHUOMVS(copy, "test")


def test_missing_depth(copy):
    scene, names, _ = _sample0(copy)
    (scene / "depths" / f"{names[0]}.exr").unlink()
    with pytest.raises(DatasetFormatError, match=r"depth map .*\.exr.*missing"):
        WHUOMVS(copy, "test")


def test_corrupt_png(copy):
    ds = WHUOMVS(copy, "test")
    scene, names, _ = ds.samples[0]
    (scene / "images" / f"{names[1]}.png").write_bytes(b"\x89PNG garbage" * 10)
    with pytest.raises(DatasetFormatError, match="cannot decode image"):
        ds[0]


def test_missing_masks_folder(copy):
    scene = _sample0(copy)[0]
    shutil.rmtree(scene / "masks")
    with pytest.raises(DatasetFormatError, match="masks folder .* is missing"):
        WHUOMVS(copy, "test")
    item = WHUOMVS(copy, "test", require_masks=False)[0]
    assert (item["depth"] > 0).any()


def test_image_size_mismatch(copy):
    ds = WHUOMVS(copy, "test")
    scene, names, _ = ds.samples[0]
    Image.new("RGB", (32, 24)).save(scene / "images" / f"{names[3]}.png")
    with pytest.raises(DatasetFormatError, match="same sample"):
        ds[0]


def test_viewpair_index_not_listed(copy):
    scene = _sample0(copy)[0]
    path = scene / "info" / "viewpair.txt"
    lines = path.read_text().splitlines()
    lines[2] = "4 99 1.0 " + " ".join(lines[2].split()[3:])
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(DatasetFormatError, match="not listed in .*image_path.txt"):
        WHUOMVS(copy, "test")
