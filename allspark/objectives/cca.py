r"""Canonical correlation objectives: Deep CCA (Andrew et al., ICML 2013) and Soft CCA (Chang et al., 2018).

Notation as in :mod:`allspark.objectives.hgr`: ``F~``, ``G~`` batch-centred [B, d_f], [B, d_g] features,
``C_ff = F~^T F~/(B-1) + r_f I``, ``C_gg = G~^T G~/(B-1) + r_g I`` (ridge-regularised) and
``C_fg = F~^T G~/(B-1)``.

**Deep CCA.** The canonical correlations ``rho_1 >= rho_2 >= ...`` are the singular values of
``T = C_ff^{-1/2} C_fg C_gg^{-1/2}``. Any whitening ``W_f`` with ``W_f^T W_f = C_ff^{-1}`` gives the same
singular values; we whiten with the Cholesky factors ``C_ff = L_f L_f^T`` (``T' = L_f^{-1} C_fg L_g^{-T}``,
two triangular solves: differentiable everywhere, unlike the eigenvector gradient of an inverse square
root, which is infinite when eigenvalues repeat, e.g. for constant features), then take the
eigendecomposition of the symmetric ``M = T'^T T'`` (``torch.linalg.eigvalsh``; its eigenvalue gradient
``V diag(dL) V^T`` stays finite at repeated eigenvalues). Everything runs in float64; the result is cast
back to the input dtype. The score is::

    DCCA(F, G)          = sum_{i <= k} rho_i                       (Andrew et al.; k = top_k, default all)
    DCCA(F, G; squared) = sum_{i <= k} rho_i^2 = ||T||_F^2 for k = all  (= -cca_zoo CCALoss)

with ``rho_i = sqrt(max(lambda_i(M), eps))``. ``reg = 0`` with a rank-deficient batch has no Cholesky
factor: that raises a ``ValueError`` asking for ``reg > 0``.

**Soft CCA** (Chang, Xiang & Hospedales, "Scalable and effective deep CCA via soft decorrelation", CVPR
2018). Each view is batch-normalised without affine parameters, ``f^ = (f - mean_b f)/sqrt(var_b f + eps)``;
the loss is the distance between the normalised views plus a soft decorrelation penalty (SDL) on a
running covariance of each view::

    L_dist   = 1/(B d) ||F^ - G^||_F^2                     (= 2 - 2 * mean per-dimension correlation)
    C_acc   <- alpha * C_acc(previous, no gradient) + F^^T F^ / (B-1);   c <- alpha * c + 1
    SDL(F)   = 1/(d(d-1)) sum_{i != j} |C_acc / c|_ij
    SoftCCA  = -( sum_pairs L_dist + lambda * sum_views SDL )   (the score; higher = more correlated)

The running covariances are updated in training mode only and are not saved in checkpoints (a training
statistic, like an optimiser's moments; a resumed run restarts them).
"""
from __future__ import annotations

from itertools import combinations

import torch

from allspark.objectives.base import CorrelationObjective, centre, check_pair
from allspark.registry import OBJECTIVES

__all__ = ["DeepCCA", "SoftCCA"]


def _cholesky(cov: torch.Tensor, view: str, reg: float) -> torch.Tensor:
    factor, info = torch.linalg.cholesky_ex(cov)
    if int(info.max()) > 0:
        raise ValueError(
            f"deep_cca: the covariance of view {view} is singular (rank-deficient or constant features) and "
            f"reg={reg} does not make it positive definite; use reg > 0 (e.g. 1e-3)"
        )
    return factor


@OBJECTIVES.register("deep_cca")
class DeepCCA(CorrelationObjective):
    """Deep CCA: the sum of the top-k canonical correlations (see the module docstring).

    Args:
        top_k: number of canonical correlations summed (None: all ``min(d_f, d_g)``).
        reg: ridge ``r`` added to both within-view covariances (``reg_f``/``reg_g`` override per view).
        squared: sum ``rho_i^2`` instead of ``rho_i``.
        eps: floor of ``rho_i^2`` before the square root (keeps its gradient finite at 0).
    """

    name = "deep_cca"

    def __init__(self, top_k: int | None = None, reg: float = 1e-3, reg_f: float | None = None,
                 reg_g: float | None = None, squared: bool = False, eps: float = 1e-9) -> None:
        super().__init__()
        if top_k is not None and top_k < 1:
            raise ValueError(f"deep_cca: top_k must be >= 1 or None, got {top_k}")
        for label, value in (("reg", reg), ("reg_f", reg_f), ("reg_g", reg_g)):
            if value is not None and value < 0:
                raise ValueError(f"deep_cca: {label} must be >= 0, got {value}")
        self.top_k = top_k
        self.reg_f = reg if reg_f is None else reg_f
        self.reg_g = reg if reg_g is None else reg_g
        self.squared = squared
        self.eps = eps

    def squared_correlations(self, f: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        """All ``rho_i^2`` in descending order (float64)."""
        check_pair(f, g, self.name, same_dim=False)
        fc, gc = centre(f.double()), centre(g.double())
        n = f.shape[0] - 1
        eye_f = torch.eye(f.shape[1], dtype=torch.float64, device=f.device)
        eye_g = torch.eye(g.shape[1], dtype=torch.float64, device=g.device)
        c_ff = fc.T @ fc / n + self.reg_f * eye_f
        c_gg = gc.T @ gc / n + self.reg_g * eye_g
        c_fg = fc.T @ gc / n
        l_f = _cholesky(c_ff, "f", self.reg_f)
        l_g = _cholesky(c_gg, "g", self.reg_g)
        left = torch.linalg.solve_triangular(l_f, c_fg, upper=False)  # L_f^{-1} C_fg
        t = torch.linalg.solve_triangular(l_g, left.T, upper=False).T  # (L_g^{-1} (L_f^{-1} C_fg)^T)^T
        m = t.T @ t if t.shape[1] <= t.shape[0] else t @ t.T  # the smaller Gram: same nonzero eigenvalues
        return torch.linalg.eigvalsh(m).flip(0).clamp_min(0.0)

    def canonical_correlations(self, f: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        """``rho_1 >= rho_2 >= ...`` (float64)."""
        return self.squared_correlations(f, g).clamp_min(self.eps).sqrt()

    def pair(self, f: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        lam = self.squared_correlations(f, g)
        k = lam.shape[0] if self.top_k is None else min(self.top_k, lam.shape[0])
        top = lam[:k]
        score = top.sum() if self.squared else top.clamp_min(self.eps).sqrt().sum()
        return score.to(f.dtype)


@OBJECTIVES.register("soft_cca")
class SoftCCA(CorrelationObjective):
    """Soft CCA: batch-normalised views, distance + soft decorrelation of running covariances.

    Args:
        decorrelation: the weight ``lambda`` of the SDL penalty.
        alpha: decay of the running covariance.
        eps: variance floor of the batch normalisation.
    """

    name = "soft_cca"

    def __init__(self, decorrelation: float = 0.1, alpha: float = 0.9, eps: float = 1e-5) -> None:
        super().__init__()
        if not 0 <= alpha < 1:
            raise ValueError(f"soft_cca: alpha must be in [0, 1), got {alpha}")
        self.decorrelation = decorrelation
        self.alpha = alpha
        self.eps = eps
        self._running: dict[int, tuple[torch.Tensor, float]] = {}

    def reset_running(self) -> None:
        self._running.clear()

    def normalise(self, x: torch.Tensor) -> torch.Tensor:
        mean = x.mean(dim=0, keepdim=True)
        var = x.var(dim=0, unbiased=False, keepdim=True)
        return (x - mean) / torch.sqrt(var + self.eps)

    def sdl(self, xn: torch.Tensor, view: int) -> torch.Tensor:
        b, d = xn.shape
        if d < 2:
            return xn.new_zeros(())
        batch_cov = xn.T @ xn / (b - 1)
        prev = self._running.get(view)
        if prev is not None and prev[0].shape == batch_cov.shape and prev[0].device == batch_cov.device:
            acc = self.alpha * prev[0] + batch_cov
            count = self.alpha * prev[1] + 1.0
        else:
            acc, count = batch_cov, 1.0
        if self.training:
            self._running[view] = (acc.detach(), count)
        cov = acc / count
        off = ~torch.eye(d, dtype=torch.bool, device=xn.device)
        return cov[off].abs().sum() / (d * (d - 1))

    @staticmethod
    def distance(fn: torch.Tensor, gn: torch.Tensor) -> torch.Tensor:
        return (fn - gn).square().mean()

    def forward(self, *features: torch.Tensor) -> torch.Tensor:
        if len(features) == 1 and isinstance(features[0], (list, tuple)):
            features = tuple(features[0])
        if len(features) < 2:
            raise ValueError(f"soft_cca needs at least two views, got {len(features)}")
        for a, b in combinations(features, 2):
            check_pair(a, b, self.name)
        normed = [self.normalise(x) for x in features]
        dist = torch.stack([self.distance(a, b) for a, b in combinations(normed, 2)]).sum()
        sdl = torch.stack([self.sdl(x, i) for i, x in enumerate(normed)]).sum()
        return -(dist + self.decorrelation * sdl)

    def pair(self, f: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        return self(f, g)
