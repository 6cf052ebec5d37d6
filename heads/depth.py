"""Multi-view depth head for oblique photography (AllSpark Section III-D: "based on the 3D reconstruction
architecture of Ada-MVS").

A coarse-to-fine plane-sweep stereo network in the style of CasMVSNet / Ada-MVS, conditioned on the LLM:

1. **Features.** A small 2-D CNN (shared by all views) gives feature maps at 1/4, 1/2 and full resolution
   (a top-down pathway adds the coarser maps to the finer ones, as in an FPN).
2. **Plane sweep.** For each stage, depth hypotheses ``d_k`` for every reference pixel (stage 1: ``planes``
   values spread uniformly over the reference camera's [dmin, dmax]; later stages: a narrower band
   centred on the previous stage's upsampled depth). Each source view's features are warped into the
   reference view at every hypothesis with the differentiable homography of the two projection matrices
   (``x_src ~ P_src P_ref^-1 [u d, v d, d, 1]``, then ``grid_sample``).
3. **Cost volume.** Group-wise correlation of the reference features with each warped source
   ([B, G, D, h, w] per source) plus, with ``photometric`` (default), one channel of minus the mean absolute
   difference of the standardised colours (the source image is warped with its features; the classical
   plane-sweep cue, which gives the network a usable cost from the first step while its features learn).
   Occlusion and views that do not overlap are handled as Ada-MVS does, by adaptive aggregation: a small
   3-D convolution predicts a per-pixel, per-hypothesis weight for each source from its own cost volume,
   and the sources are averaged with those weights (and with zero weight where the warped point falls
   outside the source image or behind its camera).
4. **LLM conditioning.** The LLM output (pooled hidden state of the last prompt token, LayerNorm) is mapped
   to a FiLM scale and shift of the aggregated cost volume's channels in each stage (initialised to
   the identity), so the language model's reading of the five views modulates the matching costs.
5. **Regularisation and soft-argmin.** A 3-D CNN turns the cost volume into one score per hypothesis;
   softmax over the hypotheses gives a probability volume and the depth is its expectation (soft-argmin).
   The confidence is the probability mass of the four hypotheses around the expectation (as MVSNet).

Loss, per stage and weighted by ``stage_weights``: smooth-L1 (metres) between the stage's depth and the
ground truth at the stage's resolution over valid pixels (truth > 0), plus ``plane_loss`` x cross-entropy of
the hypothesis scores against the hypothesis nearest the truth. Predictions: ``pred`` (depth) [B, H, W] at
full resolution and ``confidence`` [B, H, W].
"""
from __future__ import annotations

from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from allspark.registry import HEADS
from allspark.types import LLMOutput, Output, check_tensor, pooled_size

__all__ = ["MultiViewDepthHead", "homography_warp", "depth_hypotheses"]


def _conv2d(cin: int, cout: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.GroupNorm(1, cout), nn.ReLU(inplace=True))


def _conv3d(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv3d(cin, cout, 3, 1, 1, bias=False), nn.GroupNorm(1, cout), nn.ReLU(inplace=True))


class FeaturePyramid(nn.Module):
    """Image [N, 3, H, W] -> features at strides 4, 2, 1 (channels ``4c``, ``2c``, ``c``)."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.s1 = nn.Sequential(_conv2d(3, c), _conv2d(c, c))
        self.s2 = nn.Sequential(_conv2d(c, 2 * c, 2), _conv2d(2 * c, 2 * c))
        self.s4 = nn.Sequential(_conv2d(2 * c, 4 * c, 2), _conv2d(4 * c, 4 * c))
        self.lat2 = nn.Conv2d(2 * c, 4 * c, 1)
        self.lat1 = nn.Conv2d(c, 4 * c, 1)
        self.out4 = nn.Conv2d(4 * c, 4 * c, 1)
        self.out2 = nn.Conv2d(4 * c, 2 * c, 3, padding=1)
        self.out1 = nn.Conv2d(4 * c, c, 3, padding=1)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        f1 = self.s1(x)
        f2 = self.s2(f1)
        f4 = self.s4(f2)
        t2 = self.lat2(f2) + F.interpolate(f4, size=f2.shape[-2:], mode="bilinear", align_corners=False)
        t1 = self.lat1(f1) + F.interpolate(t2, size=f1.shape[-2:], mode="bilinear", align_corners=False)
        return [self.out4(f4), self.out2(t2), self.out1(t1)]


def homography_warp(src: torch.Tensor, src_proj: torch.Tensor, ref_proj: torch.Tensor,
                    depth: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Warp source features into the reference view at per-pixel depth hypotheses.

    ``src`` [B, C, h, w]; ``src_proj``/``ref_proj`` [B, 4, 4] projection matrices in pixels of this
    resolution; ``depth`` [B, D, h, w]. Returns (warped [B, C, D, h, w], valid [B, D, h, w]) where
    ``valid`` marks points in front of the source camera and inside its image.
    """
    b, c, h, w = src.shape
    d = depth.shape[1]
    proj = (src_proj.double() @ torch.linalg.inv(ref_proj.double())).float()
    rot, trans = proj[:, :3, :3], proj[:, :3, 3:4]
    ys, xs = torch.meshgrid(torch.arange(h, device=src.device, dtype=torch.float32),
                            torch.arange(w, device=src.device, dtype=torch.float32), indexing="ij")
    pix = torch.stack([xs.reshape(-1), ys.reshape(-1), torch.ones(h * w, device=src.device)])  # [3, hw]
    rays = rot @ pix  # [B, 3, hw]
    pts = rays[:, :, None, :] * depth.reshape(b, 1, d, h * w) + trans[:, :, :, None]  # [B, 3, D, hw]
    z = pts[:, 2]
    in_front = z > 1e-6
    z = torch.where(in_front, z, torch.ones_like(z))
    u, v = pts[:, 0] / z, pts[:, 1] / z
    inside = in_front & (u >= 0) & (u <= w - 1) & (v >= 0) & (v <= h - 1)
    grid = torch.stack([2 * u / max(w - 1, 1) - 1, 2 * v / max(h - 1, 1) - 1], dim=-1)  # [B, D, hw, 2]
    grid = torch.where(in_front[..., None], grid, torch.full_like(grid, -2.0))
    warped = F.grid_sample(src, grid, mode="bilinear", padding_mode="zeros", align_corners=True)
    return warped.reshape(b, c, d, h, w), inside.reshape(b, d, h, w)


def depth_hypotheses(center: torch.Tensor | None, depth_range: torch.Tensor, planes: int, interval: torch.Tensor,
                     size: tuple[int, int]) -> torch.Tensor:
    """[B, planes, h, w] hypotheses: uniform over [dmin, dmax] when ``center`` is None, else ``planes``
    values spaced by ``interval`` [B] around ``center`` [B, h, w], shifted to stay inside the range."""
    b = depth_range.shape[0]
    dmin, dmax = depth_range[:, 0].float(), depth_range[:, 1].float()
    steps = torch.arange(planes, device=depth_range.device, dtype=torch.float32)
    if center is None:
        values = dmin[:, None] + (dmax - dmin)[:, None] * steps / max(planes - 1, 1)  # [B, D]
        return values[:, :, None, None].expand(b, planes, *size)
    half = interval[:, None, None] * (planes - 1) / 2
    # the band [low, low + 2 half] is shifted to stay inside [dmin, dmax] (clipped at dmin if wider)
    low = torch.minimum(center - half, dmax[:, None, None] - 2 * half).clamp(min=dmin[:, None, None])
    return low[:, None] + steps[None, :, None, None] * interval[:, None, None, None]


class CostRegularizer(nn.Module):
    """3-D CNN over [B, G, D, h, w] -> per-hypothesis score [B, D, h, w]."""

    def __init__(self, groups: int, channels: int, layers: int) -> None:
        super().__init__()
        blocks = [_conv3d(groups, channels)] + [_conv3d(channels, channels) for _ in range(layers - 1)]
        self.body = nn.Sequential(*blocks)
        self.score = nn.Conv3d(channels, 1, 3, 1, 1)

    def forward(self, cost: torch.Tensor) -> torch.Tensor:
        return self.score(self.body(cost)).squeeze(1)


@HEADS.register("mvs_depth")
class MultiViewDepthHead(nn.Module):
    """See the module docstring. ``stages``: (planes, stride) per stage, coarse to fine, strides from
    {4, 2, 1}; ``interval_ratio``: the hypothesis spacing of each later stage as a share of the previous."""

    def __init__(self, hidden_size: int, *, stages: Sequence[Sequence[int]] = ((48, 4), (16, 2), (8, 1)),
                 interval_ratio: Sequence[float] = (0.25, 0.5), feature_channels: int = 8, groups: int = 8,
                 reg_channels: int = 8, reg_layers: int = 3, stage_weights: Sequence[float] = (0.5, 1.0, 2.0),
                 plane_loss: float = 1.0, photometric: bool = True, pooling: str = "last", condition: bool = True,
                 info: dict[str, Any] | None = None) -> None:
        super().__init__()
        self.stages = [(int(p), int(s)) for p, s in stages]
        if not self.stages or any(s not in (1, 2, 4) for _, s in self.stages):
            raise ValueError(f"mvs_depth: stages must be (planes, stride) pairs with stride in 1, 2, 4; got {stages}")
        if len(interval_ratio) != len(self.stages) - 1 or len(stage_weights) != len(self.stages):
            raise ValueError(f"mvs_depth: {len(self.stages)} stages need {len(self.stages) - 1} interval_ratio "
                             f"and {len(self.stages)} stage_weights values")
        self.interval_ratio = [float(r) for r in interval_ratio]
        self.stage_weights = [float(w) for w in stage_weights]
        self.features = FeaturePyramid(feature_channels)
        level_channels = {4: 4 * feature_channels, 2: 2 * feature_channels, 1: feature_channels}
        for _, s in self.stages:
            if level_channels[s] % groups:
                raise ValueError(f"mvs_depth: {level_channels[s]} feature channels at stride {s} are not divisible "
                                 f"by groups={groups}")
        self.groups, self.pooling, self.condition = groups, pooling, condition
        self.plane_loss = float(plane_loss)
        self.photometric = bool(photometric)
        cost_channels = groups + int(self.photometric)
        self.visibility = nn.ModuleList(nn.Sequential(_conv3d(cost_channels, 4), nn.Conv3d(4, 1, 1))
                                        for _ in self.stages)
        self.regularizers = nn.ModuleList(CostRegularizer(cost_channels, reg_channels, reg_layers) for _ in self.stages)
        size = pooled_size(pooling, hidden_size)
        self.neck = nn.LayerNorm(size)
        self.film = nn.Linear(size, 2 * cost_channels * len(self.stages))
        nn.init.zeros_(self.film.weight)
        nn.init.zeros_(self.film.bias)
        self.num_views = int(info["num_views"]) if info and "num_views" in info else None

    def _stage(self, i: int, ref: torch.Tensor, srcs: list[torch.Tensor], projs: torch.Tensor, stride: int,
               hyps: torch.Tensor, film: torch.Tensor, images: torch.Tensor | None) -> tuple[torch.Tensor, ...]:
        b, c, h, w = ref.shape
        g = self.groups
        k = g + int(images is not None)
        scale = torch.tensor([1.0 / stride, 1.0 / stride, 1.0, 1.0], device=projs.device)
        projs = projs * scale[None, None, :, None]  # rows u and v of every projection matrix
        ref_g = ref.reshape(b, g, c // g, 1, h, w)
        total = ref.new_zeros(b, k, hyps.shape[1], h, w)
        weight_sum = ref.new_zeros(b, 1, hyps.shape[1], h, w)
        for v, src in enumerate(srcs, start=1):
            if images is not None:  # warp the source image together with its features
                src = torch.cat([src, images[:, v]], dim=1)
            warped, inside = homography_warp(src, projs[:, v], projs[:, 0], hyps)
            corr = (warped[:, :c].reshape(b, g, c // g, *warped.shape[2:]) * ref_g).mean(2)  # [B, G, D, h, w]
            if images is not None:  # photometric cost: minus the mean absolute colour difference
                sad = (warped[:, c:] - images[:, 0, :, None]).abs().mean(1, keepdim=True)
                corr = torch.cat([corr, -sad], dim=1)
            weight = torch.sigmoid(self.visibility[i](corr)) * inside[:, None].to(corr.dtype)
            total = total + weight * corr
            weight_sum = weight_sum + weight
        cost = total / (weight_sum + 1e-5)
        gamma, beta = film[:, :k], film[:, k:]
        cost = cost * (1 + gamma[:, :, None, None, None]) + beta[:, :, None, None, None]
        logits = self.regularizers[i](cost)  # [B, D, h, w]
        prob = torch.softmax(logits, dim=1)
        depth = (prob * hyps).sum(1)
        # confidence: probability mass of the 4 hypotheses around the expectation (MVSNet): window[k] sums
        # prob[k-1 .. k+2]
        d = hyps.shape[1]
        index = (prob * torch.arange(d, device=prob.device, dtype=prob.dtype)[None, :, None, None]).sum(1)
        window = F.avg_pool3d(F.pad(prob[:, None], (0, 0, 0, 0, 1, 2)), (4, 1, 1), stride=1)[:, 0] * 4
        conf = window.gather(1, index.round().long().clamp(0, d - 1)[:, None])[:, 0]
        return depth, conf, logits

    def _stage_loss(self, pred: torch.Tensor, logits: torch.Tensor, hyps: torch.Tensor,
                    truth: torch.Tensor) -> torch.Tensor:
        """Smooth-L1 of the soft-argmin depth (metres) plus, with ``plane_loss`` > 0, cross-entropy of the
        hypothesis scores against the plane nearest the truth (where the truth lies inside the stage's
        hypothesis band): the classification term gives every hypothesis a gradient from the start,
        when the regressed expectation alone barely moves (as in UniMVSNet / TransMVSNet)."""
        valid = truth > 0
        if not valid.any():
            return 0.0 * pred.sum()
        loss = F.smooth_l1_loss(pred[valid], truth[valid])
        if self.plane_loss > 0:
            step = (hyps[:, 1:2] - hyps[:, 0:1]).clamp(min=1e-6)  # [B, 1, h, w]
            index = ((truth[:, None] - hyps[:, 0:1]) / step).round()[:, 0]
            inside = valid & (index >= 0) & (index <= hyps.shape[1] - 1)
            if inside.any():
                ce = F.cross_entropy(logits.permute(0, 2, 3, 1)[inside], index[inside].long())
                loss = loss + self.plane_loss * ce
        return loss

    def forward(self, llm_out: LLMOutput, batch: dict[str, Any]) -> Output:
        views = check_tensor(batch, "views", shape=("B", self.num_views, 3, None, None))
        b, n, _, hh, ww = views.shape
        projs = check_tensor(batch, "proj", shape=(b, n, 4, 4)).float()
        depth_range = check_tensor(batch, "depth_range", shape=(b, 2)).float()
        if n < 2:
            raise ValueError(f"mvs_depth: needs a reference and at least one source view, got {n} view(s)")
        feats = self.features(views.flatten(0, 1).float())  # per stride 4, 2, 1: [B*V, C, h, w]
        by_stride = {4: feats[0], 2: feats[1], 1: feats[2]}
        if self.condition:
            film = self.film(self.neck(llm_out.pool(self.pooling).float()))
        else:
            film = views.new_zeros(b, self.film.out_features)
        film = film.reshape(b, len(self.stages), -1)

        depth = conf = None
        interval = (depth_range[:, 1] - depth_range[:, 0]) / max(self.stages[0][0] - 1, 1)
        per_stage = []
        for i, (planes, stride) in enumerate(self.stages):
            f = by_stride[stride].unflatten(0, (b, n))
            h, w = f.shape[-2:]
            if depth is None:
                hyps = depth_hypotheses(None, depth_range, planes, interval, (h, w))
            else:
                interval = interval * self.interval_ratio[i - 1]
                center = F.interpolate(depth[:, None], size=(h, w), mode="bilinear", align_corners=False)[:, 0]
                hyps = depth_hypotheses(center.detach(), depth_range, planes, interval, (h, w))
            images = None
            if self.photometric:  # the standardised views sampled at this stage's pixel centres (u = stride * i)
                images = views.flatten(0, 1).float()
                if stride > 1:
                    images = F.avg_pool2d(images, 3, 1, 1, count_include_pad=False)[..., ::stride, ::stride]
                images = images.unflatten(0, (b, n))
            depth, conf, logits = self._stage(i, f[:, 0], [f[:, v] for v in range(1, n)], projs, stride, hyps,
                                              film[:, i], images)
            per_stage.append((depth, logits, hyps))
        if depth.shape[-2:] != (hh, ww):
            depth = F.interpolate(depth[:, None], size=(hh, ww), mode="bilinear", align_corners=False)[:, 0]
            conf = F.interpolate(conf[:, None], size=(hh, ww), mode="bilinear", align_corners=False)[:, 0]

        loss = None
        truth = batch.get("depth")
        if truth is not None:
            truth = check_tensor(batch, "depth", shape=(b, hh, ww)).float()
            loss = depth.new_zeros(())
            for weight, (pred, logits, hyps) in zip(self.stage_weights, per_stage):
                t = truth if pred.shape[-2:] == truth.shape[-2:] else F.interpolate(
                    truth[:, None], size=pred.shape[-2:], mode="nearest")[:, 0]
                loss = loss + weight * self._stage_loss(pred, logits, hyps, t)
        return Output(loss, {"pred": depth, "confidence": conf})
