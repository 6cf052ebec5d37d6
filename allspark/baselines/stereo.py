"""Multi-view depth baseline: classical plane-sweep stereo (Collins, 1996) with a windowed photo-consistency cost.

For each reference pixel, ``planes`` fronto-parallel depth hypotheses span the view's depth range; every source
view is warped into the reference view at each hypothesis (the same homography as the learned head,
:func:`heads.depth.homography_warp`), the cost is the windowed (``window`` x ``window`` box) mean absolute
difference of the colours, averaged over the source views that see the point, and the depth is the hypothesis of
least cost (winner takes all) refined by a parabola through its neighbours' costs. Nothing is learned, so
``fit`` reads nothing: the training split is not needed. Scored by the task's own ``mvs_depth`` evaluator.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from allspark.baselines import Baseline
from allspark.registry import BASELINES

__all__ = ["PlaneSweepBaseline", "plane_sweep_depth"]


def plane_sweep_depth(views: torch.Tensor, projs: torch.Tensor, depth_range: torch.Tensor, planes: int = 64,
                      window: int = 5) -> torch.Tensor:
    """``views`` [B, V, 3, H, W] (view 0 the reference), ``projs`` [B, V, 4, 4] pixel projection matrices,
    ``depth_range`` [B, 2] -> depth [B, H, W] of least windowed SAD over the uniform hypotheses."""
    from heads.depth import depth_hypotheses, homography_warp

    b, v, _, h, w = views.shape
    views = views.float()
    interval = (depth_range[:, 1] - depth_range[:, 0]).float() / max(planes - 1, 1)
    hyps = depth_hypotheses(None, depth_range.float(), planes, interval, (h, w))  # [B, D, H, W]
    ref = views[:, 0]
    cost = views.new_zeros(b, planes, h, w)
    seen = views.new_zeros(b, planes, h, w)
    for s in range(1, v):
        warped, inside = homography_warp(views[:, s], projs[:, s].float(), projs[:, 0].float(), hyps)
        sad = (warped - ref[:, :, None]).abs().mean(1)  # [B, D, H, W]
        inside = inside.float()
        # windowed: box-filter the per-pixel cost (and the visibility, to average over seen pixels only)
        sad = F.avg_pool2d(sad * inside, window, 1, window // 2, count_include_pad=False)
        vis = F.avg_pool2d(inside, window, 1, window // 2, count_include_pad=False)
        cost = cost + sad
        seen = seen + vis
    cost = torch.where(seen > 1e-6, cost / seen.clamp(min=1e-6), torch.full_like(cost, float("inf")))
    best = cost.argmin(dim=1)  # [B, H, W]
    # sub-plane refinement: the vertex of the parabola through the costs at best - 1, best, best + 1
    lo, hi = (best - 1).clamp(min=0), (best + 1).clamp(max=planes - 1)
    c0, c1, c2 = (cost.gather(1, i[:, None])[:, 0] for i in (lo, best, hi))
    denom = c0 - 2 * c1 + c2
    ok = (lo < best) & (best < hi) & torch.isfinite(denom) & (denom > 1e-12)
    offset = torch.where(ok, 0.5 * (c0 - c2) / torch.where(ok, denom, torch.ones_like(denom)), torch.zeros_like(c1))
    index = best.float() + offset.clamp(-0.5, 0.5)
    return depth_range[:, 0, None, None].float() + index * interval[:, None, None]


@BASELINES.register("plane_sweep")
class PlaneSweepBaseline(Baseline):
    """Plane-sweep stereo, windowed SAD, winner takes all (see the module docstring)."""

    def __init__(self, info: dict[str, Any], planes: int = 64, window: int = 5, batch_size: int = 4) -> None:
        super().__init__(info)
        if planes < 2 or window < 1 or window % 2 == 0:
            raise ValueError(f"plane_sweep: planes must be >= 2 and window a positive odd number, got {planes}, {window}")
        self.planes, self.window, self.batch_size = int(planes), int(window), int(batch_size)

    def fit(self, train_set, model=None) -> None:
        """Nothing to fit: the method has no learned parameter."""

    @torch.no_grad()
    def predict(self, dataset, model=None) -> dict[str, np.ndarray]:
        preds = []
        for start in range(0, len(dataset), self.batch_size):
            batch = dataset.collate([dataset[i] for i in range(start, min(start + self.batch_size, len(dataset)))])
            depth = plane_sweep_depth(batch["views"], batch["proj"], batch["depth_range"], self.planes, self.window)
            preds.append(depth.numpy())
        pred = np.concatenate(preds)
        return {"pred": pred, "confidence": np.ones_like(pred)}
