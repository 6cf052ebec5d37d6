"""Semantic segmentation of paired modalities (ISPRS Vaihingen, Globe230k): the windows and their stitching, the
readers on small files written in the official layouts (colour-coded labels decoded exactly, bad input refused
with one clear error), the metrics on hand-computed masks, tiled inference equal to whole-tile inference, the
LLM's conditioning of the decoder, the per-pixel baseline, and a tiny-LLM train + evaluate on each demo."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch

from allspark.data.base import DatasetFormatError
from allspark.data.tiling import owned_spans, stitch, tile_windows, window_offsets
from allspark.data.vaihingen import VAIHINGEN_CLASSES, VAIHINGEN_PALETTE, ISPRSVaihingen
from allspark.metrics.segmentation import segmentation_metrics
from tests.conftest import tiny_overrides

PALETTE = np.asarray(VAIHINGEN_PALETTE, np.uint8)


# -- windows and stitching ---------------------------------------------------------------------------------------

def test_windows_by_hand():
    assert window_offsets(10, 4, 3) == [0, 3, 6]
    assert window_offsets(8, 4, 4) == [0, 4]
    assert window_offsets(9, 4, 4) == [0, 4, 5]  # the last window ends at the border
    # boundaries in the middle of each overlap: (0 + 4 + 3) // 2 = 3, (3 + 4 + 6) // 2 = 6
    assert owned_spans([0, 3, 6], 4, 10) == [(0, 3), (0, 3), (0, 4)]
    assert owned_spans([0, 4, 5], 4, 9) == [(0, 4), (0, 2), (1, 4)]
    with pytest.raises(ValueError, match="smaller than the patch"):
        window_offsets(3, 4, 2)
    with pytest.raises(ValueError, match="uncovered"):
        window_offsets(10, 4, 5)


@pytest.mark.parametrize("h, w, patch, stride", [(10, 13, 4, 3), (16, 16, 8, 8), (9, 20, 9, 2), (33, 17, 16, 5)])
def test_owned_boxes_partition_the_tile_and_stitch_back(h, w, patch, stride):
    windows = tile_windows(h, w, patch, stride)
    count = np.zeros((h, w), int)
    for y, x, (r0, r1, c0, c1) in windows:
        assert 0 <= r0 < r1 <= patch and 0 <= c0 < c1 <= patch
        count[y + r0:y + r1, x + c0:x + c1] += 1
    assert (count == 1).all()  # every pixel owned by exactly one window
    tile = np.arange(h * w).reshape(h, w)
    values = np.stack([tile[y:y + patch, x:x + patch] for y, x, _ in windows])
    back = stitch(values, np.zeros(len(windows)), np.array([[y, x] for y, x, _ in windows]),
                  np.array([own for _, _, own in windows]))
    assert list(back) == [0] and np.array_equal(back[0], tile)


# -- Vaihingen reader on files in the contest layout -------------------------------------------------------------

def _write_area(root: Path, area: int, classes: np.ndarray, *, top=None, dsm=None, label=None) -> None:
    h, w = classes.shape
    rng = np.random.default_rng(area)
    if top is None:
        top = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    if dsm is None:
        dsm = (250 + 10 * rng.random((h, w))).astype(np.float32)
    if label is None:
        label = PALETTE[classes]
    for rel, array in ((f"top/top_mosaic_09cm_area{area}.tif", top), (f"dsm/dsm_09cm_matching_area{area}.tif", dsm),
                       (f"gts_for_participants/top_mosaic_09cm_area{area}.tif", label)):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        tifffile.imwrite(root / rel, array, photometric="rgb" if array.ndim == 3 else "minisblack")


def _classes(h: int, w: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 6, (h, w))


SMALL = {"train_areas": [1, 3], "val_areas": [3], "test_areas": [2]}


def test_vaihingen_reader_decodes_colours_exactly_and_standardises_with_training_tiles(tmp_path):
    classes = {1: _classes(12, 10, 1), 2: _classes(9, 11, 2), 3: _classes(8, 8, 3)}
    for area, c in classes.items():
        _write_area(tmp_path, area, c)
    # every colour of the palette, each at a known place, decodes to its class
    assert VAIHINGEN_CLASSES[1] == "building" and tuple(PALETTE[1]) == (0, 0, 255)
    train = ISPRSVaihingen(tmp_path, "train", patch=8, stride=4, **SMALL)
    assert train.tile_ids == [1] and len(train) == len(tile_windows(12, 10, 8, 4))
    np.testing.assert_array_equal(train.labels[0], classes[1])
    top1 = tifffile.imread(tmp_path / "top/top_mosaic_09cm_area1.tif").astype(np.float64)
    dsm1 = tifffile.imread(tmp_path / "dsm/dsm_09cm_matching_area1.tif").astype(np.float64)
    info = train.info()
    assert info["channels"] == {"top": 3, "dsm": 1} and info["num_classes"] == 6 and info["patch"] == 8
    np.testing.assert_allclose(info["preprocessing"]["top"]["band_mean"], top1.reshape(-1, 3).mean(0), rtol=1e-9)
    np.testing.assert_allclose(info["preprocessing"]["dsm"]["band_std"], [dsm1.std()], rtol=1e-6)
    train.augment = False
    item = train[len(train) - 1]  # the last window ends at the corner: offsets (4, 2)
    assert item["window"].tolist() == [4, 2] and item["label"].dtype == torch.int16
    np.testing.assert_array_equal(item["label"].numpy(), classes[1][4:12, 2:10])
    expected = (top1[4:12, 2:10] - top1.reshape(-1, 3).mean(0)) / top1.reshape(-1, 3).std(0)
    np.testing.assert_allclose(item["top"].numpy().transpose(1, 2, 0), expected, atol=1e-5)
    # val and test are standardised with the training tile's statistics
    test = ISPRSVaihingen(tmp_path, "test", patch=8, **SMALL)
    assert test.info()["preprocessing"] == info["preprocessing"]
    np.testing.assert_array_equal(test.labels[0], classes[2])
    assert ISPRSVaihingen(tmp_path, "val", patch=8, **SMALL).tile_ids == [3]


def test_vaihingen_training_windows_are_augmented_alike(tmp_path):
    for area in (1, 2, 3):
        _write_area(tmp_path, area, _classes(8, 8, area))
    train = ISPRSVaihingen(tmp_path, "train", patch=8, **SMALL)
    plain = ISPRSVaihingen(tmp_path, "train", patch=8, augment=False, **SMALL)[0]
    torch.manual_seed(0)
    seen = set()
    for _ in range(12):
        item = train[0]
        # the label moves with the image: find the same transform of the plain window
        def moved(v, f, k):
            return torch.rot90(v.flip(-1) if f else v, k, (-2, -1))

        match = [(f, k) for f in (0, 1) for k in range(4)
                 if torch.equal(moved(plain["label"], f, k), item["label"])
                 and all(torch.allclose(moved(plain[key], f, k), item[key]) for key in ("top", "dsm"))]
        assert match
        seen.add(match[0])
    assert len(seen) > 2


def test_vaihingen_out_of_palette_colour_is_one_clear_error(tmp_path):
    classes = _classes(10, 12, 0)
    label = PALETTE[classes].copy()
    label[5, 7] = (254, 255, 255)  # almost impervious-surface white
    label[8, 1] = (10, 20, 30)
    for area in (2, 3):
        _write_area(tmp_path, area, _classes(10, 12, area))
    _write_area(tmp_path, 1, classes, label=label)
    with pytest.raises(DatasetFormatError) as err:
        ISPRSVaihingen(tmp_path, "train", patch=8, **SMALL)
    message = str(err.value)
    assert "gts_for_participants/top_mosaic_09cm_area1.tif" in message
    assert "row 5, column 7" in message and "(254, 255, 255)" in message and "2 pixel(s)" in message


def test_vaihingen_dsm_size_differing_from_its_orthophoto_is_one_clear_error(tmp_path):
    for area in (1, 3):
        _write_area(tmp_path, area, _classes(10, 12, area))
    _write_area(tmp_path, 2, _classes(10, 12, 2), dsm=np.zeros((10, 11), np.float32))
    with pytest.raises(DatasetFormatError) as err:
        ISPRSVaihingen(tmp_path, "test", patch=8, **SMALL)
    message = str(err.value)
    assert "dsm_09cm_matching_area2.tif" in message and "10 x 11" in message and "10 x 12" in message


def test_vaihingen_other_bad_input_is_refused_naming_the_file(tmp_path):
    for area in (1, 2, 3):
        _write_area(tmp_path, area, _classes(10, 12, area))
    (tmp_path / "dsm/dsm_09cm_matching_area3.tif").unlink()
    with pytest.raises(DatasetFormatError, match=r"area 3: dsm/dsm_09cm_matching_area3.tif missing .*expected layout"):
        ISPRSVaihingen(tmp_path, "val", patch=8, **SMALL)
    _write_area(tmp_path, 3, _classes(10, 12, 3), top=np.zeros((10, 12, 3), np.uint16))
    with pytest.raises(DatasetFormatError, match=r"top_mosaic_09cm_area3.tif: expected a 3-band 8-bit orthophoto"):
        ISPRSVaihingen(tmp_path, "val", patch=8, **SMALL)
    dsm = np.zeros((10, 12), np.float32)
    dsm[2, 3] = np.nan
    _write_area(tmp_path, 3, _classes(10, 12, 3), dsm=dsm)
    with pytest.raises(DatasetFormatError, match="1 DSM value"):
        ISPRSVaihingen(tmp_path, "val", patch=8, **SMALL)
    with pytest.raises(DatasetFormatError, match="10 x 12 pixels, smaller than the 16 x 16 patch"):
        ISPRSVaihingen(tmp_path, "test", patch=16, **SMALL)
    from allspark.config import ConfigError

    with pytest.raises(ConfigError, match="in both train_areas and test_areas"):
        ISPRSVaihingen(tmp_path, "test", patch=8, train_areas=[1, 2], test_areas=[2])
    with pytest.raises(ConfigError, match="stride"):
        ISPRSVaihingen(tmp_path, "test", patch=8, stride=9, **SMALL)


# -- metrics -----------------------------------------------------------------------------------------------------

def test_segmentation_metrics_by_hand():
    names = ["a", "b", "c", "d"]
    truth = np.array([[0, 0, 1, 1], [0, 2, 2, 1], [-1, -1, 2, 2]])
    pred = np.array([[0, 1, 1, 1], [0, 2, 0, 1], [3, 3, 2, 1]])
    m = segmentation_metrics(pred, truth, 4, names, mean_classes=["a", "b", "c"])
    # 10 labelled pixels, 7 right
    assert m["num_pixels"] == 10 and m["OA"] == pytest.approx(0.7)
    # a: tp 2, fp 1, fn 1 -> IoU 2/4, F1 4/6; b: tp 3, fp 2, fn 0 -> 3/5, 6/8; c: tp 2, fp 0, fn 2 -> 2/4, 4/6
    assert m["IoU"]["a"] == pytest.approx(0.5) and m["F1"]["a"] == pytest.approx(2 / 3)
    assert m["IoU"]["b"] == pytest.approx(0.6) and m["F1"]["b"] == pytest.approx(0.75)
    assert m["IoU"]["c"] == pytest.approx(0.5) and m["F1"]["c"] == pytest.approx(2 / 3)
    assert m["IoU"]["d"] is None and m["F1"]["d"] is None  # never true, never predicted on a labelled pixel
    assert m["mIoU"] == pytest.approx((0.5 + 0.6 + 0.5) / 3) and m["mF1"] == pytest.approx((2 / 3 + 0.75 + 2 / 3) / 3)
    assert m["mIoU_all"] == pytest.approx(m["mIoU"])  # d has no IoU: left out of the mean over all classes
    assert m["support"] == {"a": 3, "b": 3, "c": 4, "d": 0}
    # a class predicted on labelled pixels but absent from the truth scores 0 and counts in the means
    m2 = segmentation_metrics(np.array([3, 0]), np.array([0, 0]), 4, names)
    assert m2["IoU"]["d"] == 0.0 and m2["IoU"]["a"] == 0.5 and m2["mIoU"] == pytest.approx(0.25)
    with pytest.raises(ValueError, match="not class names"):
        segmentation_metrics(pred, truth, 4, names, mean_classes=["e"])


def test_evaluator_stitches_overlapping_windows_and_counts_every_pixel_once(tmp_path):
    from allspark.baselines import split_arrays
    from allspark.evaluation.segmentation import SegmentationEvaluator

    classes = {1: _classes(12, 10, 1), 2: _classes(16, 13, 2), 3: _classes(8, 8, 3)}
    for area, c in classes.items():
        _write_area(tmp_path, area, c)
    test = ISPRSVaihingen(tmp_path, "test", patch=8, stride=3, **SMALL)
    assert len(test) > (16 // 8) * (13 // 8)  # overlapping windows
    evaluator = SegmentationEvaluator(test.info(), mean_classes=list(VAIHINGEN_CLASSES[:5]))
    gathered = split_arrays(test, evaluator.batch_keys)
    perfect = evaluator.compute({**gathered, "pred": gathered["label"]})
    assert perfect["OA"] == 1.0 and perfect["num_pixels"] == 16 * 13 and perfect["num_tiles"] == 1
    # a prediction that is right on the owned part of each window only: still every pixel right
    owned_only = gathered["label"].copy()
    for i, (r0, r1, c0, c1) in enumerate(gathered["owned"]):
        keep = np.zeros(owned_only.shape[1:], bool)
        keep[r0:r1, c0:c1] = True
        owned_only[i][~keep] = (owned_only[i][~keep] + 1) % 6
    assert evaluator.compute({**gathered, "pred": owned_only})["OA"] == 1.0
    shifted = (gathered["label"] + 1) % 6
    assert evaluator.compute({**gathered, "pred": shifted})["OA"] == 0.0


# -- the model: tiled inference, conditioning --------------------------------------------------------------------

def _demo_model(overrides=(), split="test"):
    from allspark.config import load_config
    from allspark.data import build_dataset
    from allspark.model import AllSpark

    cfg = load_config("vaihingen", overrides=tiny_overrides(**{"model.llm.dtype": "float32"}) + list(overrides))
    train = build_dataset(cfg, "train")
    torch.manual_seed(0)
    model = AllSpark(cfg, train.info())
    return model, build_dataset(cfg, split), cfg


LOCAL = ["model.encoders.0.args={key: top, widths: [8, 8], token_stride: 8, dim: 16, depth: 1, heads: 2}",
         "model.encoders.1.args={key: dsm, widths: [4, 4], token_stride: 8, dim: 16, depth: 1, heads: 2}",
         "model.head.args={width: 8, conditioning: none, output_logits: true}"]


def test_tiled_inference_equals_whole_tile_inference():
    """A model whose prediction at a pixel depends only on the pixels near it (no LLM conditioning, local
    convolutions and normalisation: here within 16 pixels) gives on windows that overlap by twice that, stitched,
    exactly what it gives on the whole tile in one forward."""
    from allspark.evaluation.segmentation import predict_tile

    model, _, _ = _demo_model(LOCAL)
    model.eval()
    g = torch.Generator().manual_seed(0)
    inputs = {"top": torch.randn(3, 96, 96, generator=g), "dsm": torch.randn(1, 96, 96, generator=g)}
    whole = model.predict({k: v[None] for k, v in inputs.items()})["logits"][0]
    tiled = predict_tile(model, inputs, patch=48, stride=16, output="logits")  # 4 x 4 windows, margins of 16
    assert tiled.shape == whole.shape == (6, 96, 96)
    torch.testing.assert_close(tiled, whole, atol=1e-4, rtol=1e-4)
    pred = predict_tile(model, inputs, patch=48, stride=16)
    assert pred.dtype == torch.int16 and torch.equal(pred.long(), whole.argmax(0))
    # the same model on abutting windows (no overlap) differs at their seams: the comparison above can fail
    seams = predict_tile(model, inputs, patch=48, stride=48, output="logits")
    assert (seams - whole).abs().max() > 1e-2


def test_decoder_conditioning_reads_the_llm_output_and_none_ignores_it():
    from heads.segmentation import SegmentationHead
    from allspark.types import LLMOutput

    torch.manual_seed(0)
    maps = {"top": [torch.randn(2, 8, 16, 16), torch.randn(2, 8, 8, 8)], "dsm": [torch.randn(2, 4, 16, 16),
                                                                               torch.randn(2, 4, 8, 8)]}
    info = {"num_classes": 6, "feature_maps": {"top": [8, 8], "dsm": [4, 4]}}

    def llm_out(seed):
        g = torch.Generator().manual_seed(seed)
        return LLMOutput(torch.randn(2, 5, 16, generator=g), torch.ones(2, 5, dtype=torch.bool), torch.full((2,), 4), 5)

    for mode in ("film", "cross_attention", "none"):
        head = SegmentationHead(16, conditioning=mode, width=8, output_logits=True, heads=2, info=info)
        batch = {"dense_features": maps, "label": torch.randint(0, 6, (2, 16, 16), dtype=torch.int16)}
        first = head(llm_out(1), batch)
        assert first.predictions["logits"].shape == (2, 6, 16, 16) and first.loss.ndim == 0
        # zero-initialised: the LLM changes nothing until the head has learned to use it
        torch.testing.assert_close(head(llm_out(2), batch).predictions["logits"], first.predictions["logits"])
        for p in head.parameters():  # as after training
            torch.nn.init.normal_(p, std=0.3)
        a, b = head(llm_out(1), batch).predictions["logits"], head(llm_out(2), batch).predictions["logits"]
        assert (not torch.allclose(a, b)) == (mode != "none"), mode
    with pytest.raises(ValueError, match="dense_features"):
        head(llm_out(1), {"label": batch["label"]})
    with pytest.raises(ValueError, match=r"expected shape \[2, 16, 16\]"):
        head(llm_out(1), {"dense_features": maps, "label": torch.zeros(2, 8, 8, dtype=torch.int16)})
    with pytest.raises(ValueError, match="dense encoders"):
        SegmentationHead(16, info={"num_classes": 6})


def test_alignment_objective_between_the_paired_encoders_enters_the_loss():
    model, train, _ = _demo_model(["model.alignment.objective=soft_hgr", "model.alignment.weight=0.5"], "train")
    model.train()
    batch = train.collate([train[i] for i in range(8)])
    out = model(batch)
    assert torch.isfinite(out.extras["alignment"]) and torch.isfinite(out.loss)
    assert out.loss.item() == pytest.approx(out.extras["task_loss"].item() - 0.5 * out.extras["alignment"].item(),
                                            rel=1e-5)
    out.loss.backward()
    for i in (0, 1):
        grads = [p.grad for n, p in model.named_parameters() if n.startswith(f"alignment_proj.{i}.")]
        assert grads and all(g is not None and g.abs().sum() > 0 for g in grads)


# -- the per-pixel baseline --------------------------------------------------------------------------------------

def test_pixel_baseline_fits_on_the_training_tiles_only(tmp_path):
    from allspark.baselines.pixel import PixelClassifierBaseline
    from allspark.evaluation.segmentation import SegmentationEvaluator

    # the class is readable from a pixel's infrared value alone, with one rule in the training and validation
    # tiles and another in the test tile: a classifier fitted on training pixels only gets the test tile wrong
    for area, flip in ((1, False), (3, False), (2, True)):
        c = _classes(16, 16, area)
        top = np.zeros((16, 16, 3), np.uint8)
        top[..., 0] = (40 * (5 - c) if flip else 40 * c).astype(np.uint8)
        _write_area(tmp_path, area, c, top=top, dsm=np.zeros((16, 16), np.float32))
    train = ISPRSVaihingen(tmp_path, "train", patch=8, **SMALL)
    val = ISPRSVaihingen(tmp_path, "val", patch=8, **SMALL)
    test = ISPRSVaihingen(tmp_path, "test", patch=8, **SMALL)
    evaluator = SegmentationEvaluator(train.info())
    for estimator in ("random_forest", "logistic_regression"):
        baseline = PixelClassifierBaseline(train.info(), estimator=estimator, max_train_pixels=200)
        baseline.evaluator = evaluator
        baseline.fit(train)
        assert baseline.score(val)["OA"] == 1.0, estimator
        flipped = baseline.score(test)
        assert flipped["OA"] < 0.4, estimator  # 0, 5 and 2, 3 swap; nothing of the test tile was seen
    with pytest.raises(ValueError, match="not rasters"):
        PixelClassifierBaseline(train.info(), inputs=["ndvi"])


# -- end to end on the demo --------------------------------------------------------------------------------------

def test_every_demo_tile_is_written_in_the_contest_layout():
    from allspark.data import demo_root

    root = demo_root("vaihingen")
    areas = sorted(int(p.stem.split("area")[1]) for p in (root / "top").glob("top_mosaic_09cm_area*.tif"))
    assert areas == sorted((1, 3, 5, 7, 11, 13, 15, 17, 21, 23, 26, 28, 30, 32, 34, 37, 2, 4, 6, 8, 10, 12, 14, 16,
                            20, 22, 24, 27, 29, 31, 33, 35, 38))
    top = tifffile.imread(root / "top/top_mosaic_09cm_area5.tif")
    dsm = tifffile.imread(root / "dsm/dsm_09cm_matching_area5.tif")
    gts = tifffile.imread(root / "gts_for_participants/top_mosaic_09cm_area5.tif")
    assert top.dtype == np.uint8 and top.ndim == 3 and top.shape[2] == 3
    assert dsm.dtype == np.float32 and dsm.shape == top.shape[:2] and gts.shape == top.shape
    colours = {tuple(c) for c in gts.reshape(-1, 3).tolist()}
    assert colours <= {tuple(c) for c in VAIHINGEN_PALETTE} and len(colours) >= 4


@pytest.mark.slow
def test_tiny_vaihingen_run_beats_the_per_pixel_baseline_and_reports_maps(tmp_path):
    from allspark.evaluate_run import evaluate_checkpoint
    from allspark.config import load_config
    from allspark.training import train

    cfg = load_config("vaihingen", overrides=tiny_overrides(**{
        "model.llm.dtype": "float32", "train.log_with": "none", "train.epochs": 8, "train.lr": 6e-3,
        "data.args.train_stride": 32, "eval.baselines.0.args.n_estimators": 20}))
    metrics = train(cfg, tmp_path / "run")
    evaluated = evaluate_checkpoint(tmp_path / "run", modality="vaihingen", output_dir=tmp_path / "eval")
    for m in (metrics, evaluated):
        rf = m["baselines"]["random_forest_pixels"]
        assert set(m["baselines"]) == {"random_forest_pixels", "logistic_pixels"}
        # the synthetic scenes confuse roofs with roads and trees with grass pixel by pixel: context separates them
        assert m["OA"] > rf["OA"] + 0.05 and m["mIoU"] > rf["mIoU"] + 0.02, (m["OA"], m["mIoU"], rf)
        assert m["num_tiles"] == 17 and set(m["IoU"]) == set(VAIHINGEN_CLASSES)
    majority = max(evaluated["support"].values()) / evaluated["num_pixels"]
    assert evaluated["OA"] > majority + 0.3
    assert evaluated["mIoU"] == pytest.approx(metrics["mIoU"], abs=1e-6)  # evaluate.py == train's test pass
    assert json.loads((tmp_path / "eval" / "metrics.json").read_text())["main_metric"] == "mIoU"
    report = (tmp_path / "eval" / "report.md").read_text()
    assert "prediction_maps.png" in report and "random_forest_pixels" in report
    assert (tmp_path / "eval" / "prediction_maps.png").stat().st_size > 10_000


# -- Globe230k ---------------------------------------------------------------------------------------------------

def _write_globe_tile(root: Path, tile: str, classes: np.ndarray, *, sar=None, label=None, rgb_ext=".png") -> None:
    from PIL import Image

    h, w = classes.shape
    rng = np.random.default_rng(abs(hash(tile)) % 2 ** 32)
    for d in ("rgb", "ndvi", "dem", "sar", "label"):
        (root / d).mkdir(parents=True, exist_ok=True)
    Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(root / "rgb" / f"{tile}{rgb_ext}")
    tifffile.imwrite(root / "ndvi" / f"{tile}.tif", rng.uniform(-1, 1, (h, w)).astype(np.float32))
    tifffile.imwrite(root / "dem" / f"{tile}.tif", rng.uniform(0, 900, (h, w)).astype(np.float32))
    tifffile.imwrite(root / "sar" / f"{tile}.tif",
                     rng.normal(-15, 3, (h, w, 2)).astype(np.float32) if sar is None else sar, photometric="minisblack",
                     planarconfig="contig")
    Image.fromarray((classes + 1).astype(np.uint8) if label is None else label).save(root / "label" / f"{tile}.png")


def _globe_root(root: Path) -> Path:
    splits = {"train": ["data_1", "data_2"], "val": ["data_3"], "test": ["data_4"]}
    for split, ids in splits.items():
        (root / f"{split}.txt").write_text("\n".join(ids) + "\n")
        for t in ids:
            _write_globe_tile(root, t, np.random.default_rng(int(t[5:])).integers(-1, 10, (12, 16)))
    return root


def test_globe230k_reader_reads_the_layout_and_any_subset_of_modalities(tmp_path):
    from PIL import Image

    from allspark.data.globe230k import GLOBE230K_CLASSES, Globe230k

    root = _globe_root(tmp_path)
    train = Globe230k(root, "train", patch=8, stride=8, augment=False)
    assert train.tile_ids == ["data_1", "data_2"] and train.raster_keys == ("rgb", "ndvi", "dem", "sar")
    info = train.info()
    assert info["channels"] == {"rgb": 3, "ndvi": 1, "dem": 1, "sar": 2}
    assert info["class_names"] == list(GLOBE230K_CLASSES)
    values = np.asarray(Image.open(root / "label" / "data_1.png")).astype(np.int64)
    np.testing.assert_array_equal(train.labels[0], values - 1)  # 0 (no label) -> -1, 1..10 -> 0..9
    assert (train.labels[0] == -1).any()
    sar = tifffile.imread(root / "sar" / "data_2.tif").astype(np.float64)
    sar1 = tifffile.imread(root / "sar" / "data_1.tif").astype(np.float64)
    both = np.concatenate([sar1.reshape(-1, 2), sar.reshape(-1, 2)])
    np.testing.assert_allclose(info["preprocessing"]["sar"]["band_mean"], both.mean(0), rtol=1e-6)
    item = train[len(train) - 1]  # tile data_2, last window at (4, 8)
    assert item["tile"].item() == 1 and item["window"].tolist() == [4, 8]
    np.testing.assert_allclose(item["sar"].numpy().transpose(1, 2, 0), (sar[4:12, 8:16] - both.mean(0)) / both.std(0),
                               atol=1e-4)
    subset = Globe230k(root, "test", patch=8, modalities=["sar", "rgb"])
    assert subset.raster_keys == ("sar", "rgb") and set(subset[0]) >= {"sar", "rgb"} and "ndvi" not in subset[0]
    assert subset.info()["preprocessing"]["rgb"] == info["preprocessing"]["rgb"]  # fitted on the training tiles
    from allspark.config import ConfigError

    with pytest.raises(ConfigError, match="modalities"):
        Globe230k(root, "test", patch=8, modalities=["rgb", "lidar"])


def test_globe230k_bad_input_is_one_clear_error_naming_the_file(tmp_path):
    from allspark.data.globe230k import Globe230k

    root = _globe_root(tmp_path)
    label = np.ones((12, 16), np.uint8)
    label[3, 9] = 11
    _write_globe_tile(root, "data_4", np.zeros((12, 16), int), label=label)
    with pytest.raises(DatasetFormatError, match=r"label/data_4.png: pixel \(row 3, column 9\) has class value 11"):
        Globe230k(root, "test", patch=8)
    _write_globe_tile(root, "data_4", np.zeros((12, 16), int), sar=np.zeros((12, 15, 2), np.float32))
    with pytest.raises(DatasetFormatError, match=r"sar/data_4.tif: the sar layer is 12 x 15 pixels but .*12 x 16"):
        Globe230k(root, "test", patch=8)
    _write_globe_tile(root, "data_4", np.zeros((12, 16), int), sar=np.zeros((12, 16, 3), np.float32))
    with pytest.raises(DatasetFormatError, match=r"sar/data_4.tif: the sar layer must have 2 band"):
        Globe230k(root, "test", patch=8)
    _write_globe_tile(root, "data_4", np.zeros((12, 16), int), label=np.zeros((12, 16, 3), np.uint8))
    with pytest.raises(DatasetFormatError, match="single-channel label image"):
        Globe230k(root, "test", patch=8)
    (root / "dem" / "data_3.tif").unlink()
    with pytest.raises(DatasetFormatError, match=r"tile data_3: no dem file .*tried data_3.tif"):
        Globe230k(root, "val", patch=8)
    assert Globe230k(root, "val", patch=8, modalities=["rgb"]).tile_ids == ["data_3"]  # the DEM is not read then
    (root / "test.txt").unlink()
    with pytest.raises(DatasetFormatError, match="test.txt is missing"):
        Globe230k(root, "test", patch=8)
    (root / "val.txt").write_text("../../etc/passwd\n")
    with pytest.raises(DatasetFormatError, match="leaves the data folder"):
        Globe230k(root, "val", patch=8)


@pytest.mark.slow
def test_tiny_globe230k_run_beats_the_per_pixel_baseline(tmp_path):
    from allspark.config import load_config
    from allspark.training import train

    cfg = load_config("globe230k", overrides=tiny_overrides(**{
        "model.llm.dtype": "float32", "train.log_with": "none", "train.epochs": 5, "train.lr": 6e-3,
        "eval.baselines.0.args.n_estimators": 20}))
    m = train(cfg, tmp_path / "run")
    best = max(m["baselines"].values(), key=lambda b: b["mIoU"])
    # single pixels are noisy in every modality; the regions are not: context wins
    assert m["OA"] > best["OA"] + 0.05 and m["mIoU"] > best["mIoU"] + 0.05, (m["OA"], m["mIoU"], best)
    assert m["num_tiles"] == 20 and len(m["IoU"]) == 10


# -- the LLM path removed (conditioning: none) --------------------------------------------------------------------

def test_without_conditioning_the_llm_path_is_not_run(monkeypatch):
    """``conditioning: none`` removes the LLM path: training (with an HGR term between the encoders), evaluation and
    prediction run the encoders and the decoder only -- the bridge and the language model are never called -- the
    prediction is what the decoder gives on the encoders' maps alone, and the adapters and the bridge are held
    (kept in the checkpoint, not trained). With FiLM the LLM runs as before."""
    from allspark.types import LLMOutput

    model, train, _ = _demo_model(["model.head.args={width: 8, conditioning: none, output_logits: true}",
                                   "model.alignment.objective=soft_hgr"], "train")
    assert not model.uses_llm
    held = sorted(model._held)
    state = model.trainable_state_dict()
    assert any("lora" in n for n in held) and any(n.startswith("bridge.") for n in held)
    assert all(n.startswith(("llm.", "bridge.")) and not model.get_parameter(n).requires_grad for n in held)
    assert set(held) <= set(state)  # the checkpoint's layout does not change

    def refuse(*args, **kwargs):
        raise AssertionError("the LLM path ran")

    monkeypatch.setattr(model.language_model, "run", refuse)
    monkeypatch.setattr(model.llm, "forward", refuse)
    monkeypatch.setattr(model.bridge, "forward", refuse)
    batch = train.collate([train[i] for i in range(8)])
    model.train()
    out = model(dict(batch))
    assert torch.isfinite(out.loss) and "alignment" in out.extras
    out.loss.backward()
    for prefix in ("encoders.0.", "encoders.1.", "head."):
        grads = [p.grad for n, p in model.named_parameters() if n.startswith(prefix) and p.requires_grad]
        assert grads and any(g is not None and g.abs().sum() > 0 for g in grads), prefix
    pred = model.predict(dict(batch))
    alone = dict(batch)
    model.eval()
    with torch.no_grad():
        model.encode_tokens(alone)  # the dense encoders leave their feature maps in the batch
        garbage = LLMOutput(torch.randn(8, 4, model.hidden_size), torch.ones(8, 4, dtype=torch.bool),
                            torch.full((8,), 3), 4)
        decoder = model.head(garbage, alone).predictions
    torch.testing.assert_close(pred["logits"], decoder["logits"])
    assert torch.equal(pred["pred"], decoder["pred"])

    film, _, _ = _demo_model(["model.head.args={width: 8, conditioning: film}"], "train")
    assert film.uses_llm and all(p.requires_grad for n, p in film.named_parameters() if "lora" in n)
    calls = []
    run = film.language_model.run
    monkeypatch.setattr(film.language_model, "run", lambda *a, **k: calls.append(1) or run(*a, **k))
    film.predict(train.collate([train[i] for i in range(2)]))
    assert calls


@pytest.mark.parametrize("modality", ["vaihingen", pytest.param("globe230k", marks=pytest.mark.slow)])
def test_hgr_between_the_paired_encoders_trains_every_encoder(modality):
    """``model.alignment.objective=soft_hgr`` on the segmentation configs: the term is in the loss, and on its own
    (``task_weight=0``) its gradient reaches every encoder."""
    from allspark.config import load_config
    from allspark.data import build_dataset
    from allspark.model import AllSpark

    cfg = load_config(modality, overrides=tiny_overrides(**{
        "model.llm.dtype": "float32", "model.alignment.objective": "soft_hgr", "model.alignment.task_weight": 0}))
    train = build_dataset(cfg, "train")
    torch.manual_seed(0)
    model = AllSpark(cfg, train.info())
    model.train()
    out = model(train.collate([train[i] for i in range(8)]))
    assert torch.isfinite(out.extras["alignment"]) and out.loss.item() == pytest.approx(
        -cfg.model.alignment.weight * out.extras["alignment"].item(), rel=1e-5)
    out.loss.backward()
    for i in range(len(cfg.model.encoders)):
        grads = [p.grad for n, p in model.named_parameters() if n.startswith(f"encoders.{i}.")]
        assert any(g is not None and g.abs().sum() > 0 for g in grads), i


# -- allspark predict on tiles ------------------------------------------------------------------------------------

SHORT = {"model.llm.dtype": "float32", "train.log_with": "none", "train.epochs": 1, "train.max_steps": 2,
         "train.test_at_end": "false", "eval.baselines": "[]"}
GEOKEYS = (1, 1, 0, 4, 1024, 0, 1, 1, 1025, 0, 1, 1, 3072, 0, 1, 32632, 3076, 0, 1, 9001)
GEOTAGS = [(33550, "d", 3, (0.09, 0.09, 0.0), True), (33922, "d", 6, (0.0, 0.0, 0.0, 497000.0, 5420000.0, 0.0), True),
           (34735, "H", len(GEOKEYS), GEOKEYS, True)]


@pytest.mark.parametrize("modality", ["vaihingen", "globe230k"])
def test_predict_writes_the_label_maps_evaluate_scores(modality, tmp_path, capsys):
    """``allspark predict`` on the demo's test tiles (their rasters only, copied into a folder of the reader's
    layout) writes one label map per tile in the dataset's coding, whose pixels give exactly evaluate.py's
    confusion matrix; a georeferenced tile also gets a class GeoTIFF with its georeferencing. A tile with other
    bands or a DSM off its orthophoto's grid is one clear error naming the file (exit 2) and no output."""
    import shutil

    from PIL import Image

    from allspark.cli import predict_main, run_cli
    from allspark.config import load_config
    from allspark.data import build_dataset
    from allspark.errors import UserError
    from allspark.evaluate_run import evaluate_checkpoint
    from allspark.predict import predict
    from allspark.training import train

    cfg = load_config(modality, overrides=tiny_overrides(**SHORT))
    torch.manual_seed(0)
    train(cfg, tmp_path / "run")
    metrics = evaluate_checkpoint(tmp_path / "run", modality=modality, output_dir=tmp_path / "eval")
    test = build_dataset(cfg, "test")
    inputs = tmp_path / "tiles"
    for t in test.tile_ids:
        for key, f in zip(test.raster_keys, test.tile_files(t)):
            (inputs / f.parent.name).mkdir(parents=True, exist_ok=True)
            if modality == "vaihingen" and key == "top" and t == test.tile_ids[0]:  # a georeferenced orthophoto
                tifffile.imwrite(inputs / "top" / f.name, tifffile.imread(f), photometric="rgb", extratags=GEOTAGS)
            else:
                shutil.copy(f, inputs / f.parent.name / f.name)
    written = predict(tmp_path / "run", [inputs], tmp_path / "maps")
    names = [test.tile_name(t) for t in test.tile_ids]
    assert sorted(written) == sorted(["predictions", *(f"{n}.png" for n in names)]
                                     + ([f"{names[0]}.tif"] if modality == "vaihingen" else []))
    preds = []
    for n, truth in zip(names, test.tile_labels()):
        image = np.asarray(Image.open(written[f"{n}.png"]))
        if modality == "vaihingen":
            from allspark.data.segmentation_tiles import decode_palette

            classes = decode_palette(image, VAIHINGEN_PALETTE, written[f"{n}.png"])  # the contest's colours
        else:
            assert image.dtype == np.uint8 and image.ndim == 2 and image.min() >= 1
            classes = image.astype(np.int64) - 1  # the release's values 1..10
        assert classes.shape == truth.shape
        preds.append(classes)
    pred, truth = np.concatenate([p.ravel() for p in preds]), np.concatenate([t.ravel() for t in test.tile_labels()])
    again = segmentation_metrics(pred, truth, len(test.class_names), test.class_names,
                                 cfg.eval.args.get("mean_classes"), ignore_index=-1)
    assert again["confusion_matrix"] == metrics["confusion_matrix"], "evaluate.py's predictions, pixel for pixel"
    assert again["OA"] == pytest.approx(metrics["OA"]) and len(np.unique(pred)) > 1
    table = json.loads(written["predictions"].read_text())
    assert [r["tile"] for r in table["predictions"]] == names
    assert sum(v for k, v in table["predictions"][0].items() if k.startswith("pixels_")) == preds[0].size
    if modality == "vaihingen":
        with tifffile.TiffFile(written[f"{names[0]}.tif"]) as tf:
            assert np.array_equal(tf.asarray(), preds[0])
            tags = {t.code: t.value for t in tf.pages[0].tags.values()}
        for code, _, _, value, _ in GEOTAGS:
            assert tags[code] == value, code
        assert "geotiff" not in table["predictions"][1]

    # bad input: one clear line naming the file, exit 2, nothing written
    first = test.tile_ids[0]
    files = dict(zip(test.raster_keys, test.tile_files(first)))
    key = test.raster_keys[1]
    bad = inputs / files[key].parent.name / files[key].name
    raster = tifffile.imread(bad)
    tifffile.imwrite(bad, np.ascontiguousarray(raster[:-3]))  # off the first raster's grid
    with pytest.raises(UserError, match=rf"{bad.name}: the .* is {raster.shape[0] - 3} x {raster.shape[1]} pixels"):
        predict(tmp_path / "run", [inputs], tmp_path / "bad")
    key = test.raster_keys[0]
    top = inputs / files[key].parent.name / files[key].name
    if modality == "vaihingen":
        shutil.copy(files["dsm"], bad)
        tifffile.imwrite(top, np.zeros(raster.shape[:2] + (4,), np.uint8), photometric="minisblack",
                         planarconfig="contig")
        expected = f"{top.name}: expected a 3-band 8-bit orthophoto"
    else:
        shutil.copy(files[test.raster_keys[1]], bad)
        first_ndvi = inputs / "ndvi" / files["ndvi"].name
        tifffile.imwrite(first_ndvi, np.zeros(raster.shape[:2] + (2,), np.float32), photometric="minisblack",
                         planarconfig="contig")
        expected = f"{first_ndvi.name}: the ndvi layer must have 1 band"
    with pytest.raises(SystemExit) as exit_:
        run_cli(lambda: predict_main(["--checkpoint", str(tmp_path / "run"), "--input", str(inputs),
                                      "--out", str(tmp_path / "bad")]))
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert exit_.value.code == 2 and last.startswith("error: ") and expected in last, last
    assert not (tmp_path / "bad").exists() or not any((tmp_path / "bad").iterdir())
