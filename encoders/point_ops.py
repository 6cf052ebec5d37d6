"""Point-cloud neighbourhood operations in batched pure PyTorch.

Point-BERT groups a cloud with farthest-point sampling (FPS) and k-nearest neighbours (kNN), usually from
the compiled ``pointnet2_ops`` / ``torch-cluster`` extensions. None is available here, so these run on
plain tensors: FPS is the classic iterative algorithm vectorised over the batch (``G`` steps, each one
``O(B * N)``), kNN is an exact brute-force distance matrix followed by ``topk``. Both are exact (no
approximation) and run on any device; they carry no gradient (indices only).
"""
from __future__ import annotations

import torch

__all__ = ["farthest_point_sample", "knn", "gather_points", "group_points"]


def _check_cloud(name: str, x: torch.Tensor) -> None:
    if not isinstance(x, torch.Tensor) or x.dim() != 3 or x.shape[-1] != 3:
        shape = list(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"{name}: expected a [B, N, 3] tensor of coordinates, got {shape}")


@torch.no_grad()
def farthest_point_sample(xyz: torch.Tensor, num_samples: int, start_index: int = 0) -> torch.Tensor:
    """Indices ``[B, num_samples]`` of points chosen by farthest-point sampling.

    The first point is ``start_index`` (0, as in the PointNet++ kernel, so the result is deterministic);
    each next point is the one whose distance to the already chosen set is largest (ties: lowest index).
    """
    _check_cloud("farthest_point_sample", xyz)
    b, n, _ = xyz.shape
    if not 0 < num_samples <= n:
        raise ValueError(f"farthest_point_sample: num_samples must be in [1, {n}] for clouds of {n} points, "
                         f"got {num_samples}")
    if not 0 <= start_index < n:
        raise ValueError(f"farthest_point_sample: start_index {start_index} out of range [0, {n})")
    pts = xyz.float()
    rows = torch.arange(b, device=xyz.device)
    chosen = torch.empty(b, num_samples, dtype=torch.long, device=xyz.device)
    # Squared distance of every point to its nearest chosen point so far.
    min_dist = torch.full((b, n), float("inf"), device=xyz.device)
    current = torch.full((b,), start_index, dtype=torch.long, device=xyz.device)
    for i in range(num_samples):
        chosen[:, i] = current
        centre = pts[rows, current].unsqueeze(1)  # [B, 1, 3]
        min_dist = torch.minimum(min_dist, (pts - centre).pow(2).sum(-1))
        current = min_dist.argmax(dim=-1)
    return chosen


@torch.no_grad()
def knn(query: torch.Tensor, reference: torch.Tensor, k: int) -> torch.Tensor:
    """Indices ``[B, M, k]`` into ``reference [B, N, 3]`` of the ``k`` nearest points to each of
    ``query [B, M, 3]``, nearest first. Distances are exact squared differences (not the
    ``|a|^2 + |b|^2 - 2ab`` expansion, whose cancellation can reorder close neighbours)."""
    _check_cloud("knn query", query)
    _check_cloud("knn reference", reference)
    if query.shape[0] != reference.shape[0]:
        raise ValueError(f"knn: batch sizes differ, query {query.shape[0]} vs reference {reference.shape[0]}")
    n = reference.shape[1]
    if not 0 < k <= n:
        raise ValueError(f"knn: k must be in [1, {n}] for reference clouds of {n} points, got {k}")
    dist = (query.float().unsqueeze(2) - reference.float().unsqueeze(1)).pow(2).sum(-1)  # [B, M, N]
    return dist.topk(k, dim=-1, largest=False, sorted=True).indices


def gather_points(points: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``points [B, N, C]`` indexed by ``index [B, ...]`` -> ``[B, ..., C]``."""
    b = points.shape[0]
    flat = index.reshape(b, -1)
    out = torch.gather(points, 1, flat.unsqueeze(-1).expand(-1, -1, points.shape[-1]))
    return out.reshape(*index.shape, points.shape[-1])


def group_points(points: torch.Tensor, num_groups: int, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Point-BERT's grouper: FPS picks ``num_groups`` centres from the xyz columns, each centre takes its
    ``group_size`` nearest points; returns (neighbourhoods ``[B, G, K, C]`` with xyz made relative to
    the centre, centres ``[B, G, 3]``). Extra columns (normals, features) are gathered unchanged."""
    xyz = points[..., :3].contiguous()
    centre_idx = farthest_point_sample(xyz, num_groups)
    centres = gather_points(xyz, centre_idx)
    neighbours = gather_points(points, knn(centres, xyz, group_size))  # [B, G, K, C]
    rel = neighbours[..., :3] - centres.unsqueeze(2)
    return torch.cat([rel, neighbours[..., 3:]], dim=-1), centres
