"""The symmetric contrastive loss of CISEN (LuoJiaHOG paper Eq. 25) with in-batch negatives from every process.

``gather_with_grad`` concatenates a tensor's rows from every process of a ``torch.distributed`` group
(started by ``accelerate``); the local rows keep their autograd graph (the other processes' rows are
constants here; their own process back-propagates into them), so each process's loss is the CLIP loss of
its local rows against the global batch. Processes may hold different numbers of rows (the last batch):
sizes are exchanged first and rows padded for the collective, then trimmed. With one process (or no
initialised group) it returns its input unchanged.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["gather_with_grad", "symmetric_info_nce"]


def _dist_world() -> tuple[int, int]:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size(), dist.get_rank()
    return 1, 0


def gather_with_grad(x: torch.Tensor) -> tuple[torch.Tensor, int]:
    """``x`` [b, ...] -> (rows of all processes in rank order [sum b, ...], offset of the local rows)."""
    world, rank = _dist_world()
    if world == 1:
        return x, 0
    import torch.distributed as dist

    n = torch.tensor([x.shape[0]], device=x.device)
    sizes = [torch.zeros_like(n) for _ in range(world)]
    dist.all_gather(sizes, n)
    sizes = [int(s.item()) for s in sizes]
    width = max(sizes)
    padded = torch.zeros((width, *x.shape[1:]), dtype=x.dtype, device=x.device)
    padded[: x.shape[0]] = x.detach()
    parts = [torch.zeros_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded)
    rows = [p[:s] for p, s in zip(parts, sizes)]
    rows[rank] = x  # the local rows carry the gradient
    return torch.cat(rows), sum(sizes[:rank])


def symmetric_info_nce(image: torch.Tensor, text: torch.Tensor, logit_scale: torch.Tensor,
                       *, gather: bool = True) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Eq. 25: ``L = L_I->T + L_I<-T`` over L2-normalised ``image``/``text`` [b, E] (row i of each is a pair).

    ``logit_scale`` is ``1 / tau`` (a tensor: learnable). Each process scores its local rows against the
    gathered rows of every process (in-batch negatives across processes). Returns the loss and its two
    terms (detached) for logging.
    """
    if image.shape != text.shape or image.dim() != 2:
        raise ValueError(f"symmetric_info_nce: image and text must both be [b, E], got {list(image.shape)} "
                         f"and {list(text.shape)}")
    all_image, offset = gather_with_grad(image) if gather else (image, 0)
    all_text, _ = gather_with_grad(text) if gather else (text, 0)
    target = torch.arange(image.shape[0], device=image.device) + offset
    i2t = F.cross_entropy(logit_scale * image @ all_text.T, target)
    t2i = F.cross_entropy(logit_scale * text @ all_image.T, target)
    return i2t + t2i, {"loss_i2t": i2t.detach(), "loss_t2i": t2i.detach()}
