"""Oblique photography: the differentiable homography warp on known geometry, the depth hypotheses, the
multi-view ViT, the depth head (shapes, errors, learning on one batch), the evaluation protocol on a
hand-made case, and a tiny end-to-end run on the WHU-OMVS demo layout."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from allspark.evaluation.depth import MultiViewDepthEvaluator
from allspark.types import LLMOutput
from encoders.multiview_vit import MultiViewViT
from heads.depth import MultiViewDepthHead, depth_hypotheses, homography_warp
from tests.helpers import fit_one_batch


def _camera(tx: float, f: float = 10.0, c: tuple[float, float] = (7.5, 5.5)) -> torch.Tensor:
    """Projection matrix of a camera looking along +Z from (tx, 0, 0), identity rotation."""
    k = torch.tensor([[f, 0, c[0]], [0, f, c[1]], [0, 0, 1.0]])
    ext = torch.eye(4)
    ext[0, 3] = -tx
    p = ext.clone()
    p[:3, :4] = k @ ext[:3, :4]
    return p


def test_homography_warp_shifts_by_the_disparity_of_the_plane():
    # two cameras 2 m apart, f = 10 px: a fronto-parallel plane at depth 5 m has disparity f * b / d = 4 px
    ref, src = _camera(0.0), _camera(2.0)
    image = torch.arange(12 * 16, dtype=torch.float32).reshape(1, 1, 12, 16)
    warped, inside = homography_warp(image, src[None], ref[None], torch.full((1, 1, 12, 16), 5.0))
    # reference pixel u sees the point X = (u - cx) d / f; in the source it lands at u - 4
    assert torch.allclose(warped[0, 0, 0, :, 4:], image[0, 0, :, :-4], atol=1e-4)
    assert not inside[0, 0, :, :4].any() and inside[0, 0, :, 4:].all()
    # a point behind the source camera is invalid, never sampled
    behind = homography_warp(image, src[None], ref[None], torch.full((1, 1, 12, 16), -1.0))[1]
    assert not behind.any()


def test_depth_hypotheses_cover_the_range_then_narrow_around_the_estimate():
    rng = torch.tensor([[10.0, 50.0]])
    first = depth_hypotheses(None, rng, 5, torch.tensor([10.0]), (2, 3))
    assert first.shape == (1, 5, 2, 3) and torch.allclose(first[0, :, 0, 0], torch.tensor([10.0, 20, 30, 40, 50]))
    center = torch.tensor([[[30.0, 11.0, 49.0]]]).expand(1, 2, 3)
    fine = depth_hypotheses(center, rng, 4, torch.tensor([1.0]), (2, 3))
    assert torch.allclose(fine[0, :, 0, 0], torch.tensor([28.5, 29.5, 30.5, 31.5]))
    assert fine.min() >= 10.0 and fine.max() <= 50.0  # bands near the ends are shifted inside the range
    assert torch.allclose(fine[0, :, 0, 1], torch.tensor([10.0, 11.0, 12.0, 13.0]))


def test_multiview_vit_concatenates_the_views_tokens():
    enc = MultiViewViT(num_views=3, image_size=(16, 32), patch_size=8, dim=16, depth=1, heads=2).eval()
    views = torch.randn(2, 3, 3, 16, 32)
    tokens = enc({"views": views}).tokens
    assert tokens.shape == (2, 3 * (1 + 2 * 4), 16)
    with torch.no_grad():  # view 1's tokens are the shared ViT on view 1 plus view 1's embedding
        alone = enc.vit.forward_features(views[:, 1]) + enc.view_embed[1]
    assert torch.allclose(tokens[:, 9:18], alone, atol=1e-5)
    with pytest.raises(ValueError, match="views"):
        enc({"views": torch.randn(2, 4, 3, 16, 32)})
    with pytest.raises(ValueError, match="image_size"):
        MultiViewViT(num_views=3, image_size=(16, 32), patch_size=8, info={"image_size": [48, 64]})


def _toy_batch(b: int = 2, h: int = 16, w: int = 24) -> dict:
    """A textured fronto-parallel plane seen by a reference and two translated cameras."""
    torch.manual_seed(0)
    projs = torch.stack([_camera(0.0, c=((w - 1) / 2, (h - 1) / 2)), _camera(1.0, c=((w - 1) / 2, (h - 1) / 2)),
                         _camera(-1.0, c=((w - 1) / 2, (h - 1) / 2))])
    depth = torch.tensor([4.0, 6.0])[:b, None, None].expand(b, h, w).clone()
    texture = torch.randn(b, 3, h, w + 8)
    views = []
    for shift in (0, 1, -1):  # disparity f * shift / d, rounded to whole pixels for this toy
        cols = [texture[i, :, :, 4 + round(10 * shift / float(depth[i, 0, 0])):][:, :, :w] for i in range(b)]
        views.append(torch.stack(cols))
    return {"views": torch.stack(views, 1), "proj": projs.expand(b, 3, 4, 4).clone(), "depth": depth,
            "depth_range": torch.tensor([[2.0, 10.0]]).expand(b, 2).clone()}


def _llm_out(b: int, width: int = 16) -> LLMOutput:
    return LLMOutput(torch.randn(b, 5, width), torch.ones(b, 5, dtype=torch.bool), torch.full((b,), 4), 0)


def test_depth_head_shapes_errors_and_conditioning():
    head = MultiViewDepthHead(16, stages=[[16, 4], [8, 2], [4, 1]], info={"num_views": 3})
    batch = _toy_batch()
    out = head(_llm_out(2), batch)
    assert out.predictions["pred"].shape == (2, 16, 24) and out.predictions["confidence"].shape == (2, 16, 24)
    assert out.loss.ndim == 0 and torch.isfinite(out.loss)
    assert ((out.predictions["pred"] >= 2.0) & (out.predictions["pred"] <= 10.0)).all()
    assert ((out.predictions["confidence"] >= 0) & (out.predictions["confidence"] <= 1.0 + 1e-5)).all()
    # FiLM starts as the identity: the LLM state changes nothing until the head learns to use it
    again = head(_llm_out(2), batch).predictions["pred"]
    assert torch.allclose(again, out.predictions["pred"], atol=1e-5)
    with pytest.raises(ValueError, match="proj"):
        head(_llm_out(2), {**batch, "proj": batch["proj"][:, :2]})
    with pytest.raises(ValueError, match="NaN"):
        head(_llm_out(2), {**batch, "views": batch["views"] * float("nan")})
    with pytest.raises(ValueError, match="stride"):
        MultiViewDepthHead(16, stages=[[8, 3]], interval_ratio=[], stage_weights=[1.0])


def test_depth_head_learns_the_plane_depth():
    torch.manual_seed(0)
    head = MultiViewDepthHead(16, stages=[[16, 4], [8, 2], [4, 1]], info={"num_views": 3})
    batch = _toy_batch()
    llm = _llm_out(2)
    before = (head(llm, batch).predictions["pred"] - batch["depth"]).abs().mean().item()

    class Wrapped(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.head = head

        def forward(self, b):
            return self.head(llm, b)

    # 80 steps: at 40 the loss had fallen to 0.58 of its start with one torch thread (0.42 with two; the summation
    # order differs), on the edge of the bound; at 80, seeds 0-2, one thread: loss 0.34 / 0.15 / 0.18 of its start,
    # depth error 0.04 / 0.02 / 0.02 of its start
    losses = fit_one_batch(Wrapped(), batch, steps=80, lr=1e-2)
    after = (head.eval()(llm, batch).predictions["pred"] - batch["depth"]).abs().mean().item()
    assert losses[-1] < 0.5 * losses[0] and after < 0.5 * before


def test_depth_protocol_by_hand():
    truth = np.zeros((2, 2, 2), np.float32)
    truth[0] = [[10.0, 12.0], [14.0, 0.0]]  # one invalid pixel
    truth[1] = [[20.0, 20.0], [21.0, 23.0]]
    pred = truth + np.array([[[0.5, 0.9], [2.0, 5.0]], [[0.0, -0.7], [0.1, 1.5]]], np.float32)
    gathered = {"pred": pred, "confidence": np.ones_like(pred), "depth": truth,
                "depth_range": np.array([[8.0, 16.0], [18.0, 24.0]], np.float32), "index": np.arange(2)}
    m = MultiViewDepthEvaluator({}).compute(gathered)
    # errors at the 7 valid pixels: 0.5 0.9 2.0 | 0 0.7 0.1 1.5
    assert m["PAG6"] == pytest.approx(3 / 7) and m["PAG10"] == pytest.approx(5 / 7)
    assert m["MAE"] == pytest.approx((0.5 + 0.9 + 2.0 + 0 + 0.7 + 0.1 + 1.5) / 7)
    # range_mid predicts 12 and 21: errors 2 0 2 | 1 1 0 2
    assert m["baseline/range_mid/PAG10"] == pytest.approx(4 / 7)
    assert m["baseline/range_mid/MAE"] == pytest.approx(8 / 7)
    # image medians 12 and 20.5: errors 2 0 2 | .5 .5 .5 2.5
    assert m["baseline/image_median/PAG6"] == pytest.approx(4 / 7)


@pytest.mark.slow
def test_tiny_oblique_run_writes_depth_metrics_and_report(tmp_path):
    from allspark.config import load_config
    from allspark.evaluate_run import evaluate_checkpoint
    from allspark.training import train

    # one epoch (19 steps of 4 references) instead of 2 steps, so the depth can be checked against the constants;
    # without the plane-sweep baseline (about 13 s here, fitted at the end of training and again by the evaluation;
    # tests/test_plane_sweep.py runs it on the demo)
    cfg = load_config("oblique", overrides=["model.llm.name=tiny", "model.llm.dtype=float32", "train.epochs=1",
                                            "model.head.args.stages=[[8, 4], [4, 2], [4, 1]]", "eval.baselines=[]"])
    metrics = train(cfg, tmp_path / "run")
    for key in ("PAG6", "PAG10", "MAE", "baseline/range_mid/PAG6", "baseline/image_median/MAE"):
        assert np.isfinite(metrics[key])
    assert 0.0 <= metrics["PAG6"] <= metrics["PAG10"] <= 1.0 and metrics["num_views"] == 50
    # The model estimates depth: its MAE at most 0.75x that of the constant mid-range depth (what a head with no
    # usable input predicts: uniform hypothesis scores give the middle of the range) and PAG6 at least 1.5x.
    # Measured (seeds 0/1/2): MAE 5.46/6.02/6.49 m against 10.99 (ratios 0.50/0.55/0.59), PAG6 0.089/0.057/0.067
    # against 0.027; broken (train.lr=0): MAE 9.84 (0.90), PAG6 0.028; the old 2-step run: MAE 9.42 (0.86).
    # (The per-image truth median, 5.52 m, and plane-sweep stereo, PAG6 0.61, are out of reach of 19 steps.)
    assert metrics["MAE"] <= 0.75 * metrics["baseline/range_mid/MAE"], metrics["MAE"]
    assert metrics["PAG6"] >= 1.5 * metrics["baseline/range_mid/PAG6"], metrics["PAG6"]
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["MAE"] == metrics["MAE"]
    evaluate_checkpoint(tmp_path / "run", modality="oblique", output_dir=tmp_path / "eval")
    assert (tmp_path / "eval" / "depth_vs_truth.png").stat().st_size > 0
    assert "PAG6" in (tmp_path / "eval" / "report.md").read_text()
