"""``plane_sweep``: the classical multi-view depth baseline of the oblique task."""
import numpy as np
import pytest
import torch

from allspark.baselines.stereo import PlaneSweepBaseline, plane_sweep_depth


def _camera(f: float, cx: float, cy: float, tx: float) -> torch.Tensor:
    k = torch.tensor([[f, 0, cx], [0, f, cy], [0, 0, 1.0]])
    p = torch.eye(4)
    p[:3, :3] = k
    p[:3, 3] = k @ torch.tensor([tx, 0.0, 0.0])  # K [I | t]: the source camera shifted along x
    return p


def test_a_textured_fronto_parallel_plane_is_found_at_its_depth():
    """A plane at depth Z seen by a reference camera and two cameras shifted by t along x: a source pixel is the
    reference pixel moved by f t / Z, so the windowed SAD is zero at Z, which is a hypothesis (range 5-20 m,
    64 planes: 5 + 15 k / 63 = 10 at k = 21)."""
    h, w, f, z = 24, 48, 40.0, 10.0
    u, v = np.meshgrid(np.arange(w, dtype=np.float64), np.arange(h, dtype=np.float64))
    texture = lambda x: np.stack([np.sin(0.9 * x + 0.3 * v), np.cos(0.5 * v - 0.7 * x), np.sin(0.4 * x * 0.5 + v)])  # noqa: E731
    views, projs = [], []
    for t in (0.0, 1.0, -1.5):
        views.append(texture(u - f * t / z))  # I_s(u') = T(u' - f t / Z)
        projs.append(_camera(f, w / 2, h / 2, t))
    views = torch.tensor(np.stack(views), dtype=torch.float32)[None]
    projs = torch.stack(projs)[None]
    depth = plane_sweep_depth(views, projs, torch.tensor([[5.0, 20.0]]), planes=64, window=5)
    inner = depth[0, 4:-4, 12:-12]  # away from the borders that a shifted view does not see
    assert torch.allclose(inner, torch.full_like(inner, z), atol=0.05), (inner.min(), inner.max())
    # a wrong camera (the shift's sign flipped) does not find the plane
    flipped = projs.clone()
    flipped[:, 1:, 0, 3] *= -1
    wrong = plane_sweep_depth(views, flipped, torch.tensor([[5.0, 20.0]]), planes=64, window=5)[0, 4:-4, 12:-12]
    assert (wrong - z).abs().mean() > 1.0


def test_demo_plane_sweep_beats_the_constant_depth_baselines():
    from allspark.config import load_config
    from allspark.data import build_dataset
    from allspark.evaluation import build_evaluator

    cfg = load_config("oblique")
    test = build_dataset(cfg, "test")
    base = PlaneSweepBaseline(test.info())
    base.evaluator = build_evaluator(cfg, test.info())
    base.fit(None)  # nothing is learned
    m = base.score(test)
    assert m["PAG6"] > m["baseline/image_median/PAG6"] + 0.3, m
    with pytest.raises(ValueError, match="window a positive odd number"):
        PlaneSweepBaseline({}, window=4)
