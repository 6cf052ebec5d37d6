r"""Soft-HGR maximal correlation (Wang et al., AAAI 2019) and two fast B x B variants.

Notation: ``F``, ``G`` are [B, d] feature matrices of paired samples; ``F~ = F - 1 mean(F)`` the
batch-centred ones; ``C_fg = F~^T G~ / (B-1)``, ``C_ff``, ``C_gg`` the (unbiased) batch covariances.

**Soft-HGR** (the score, maximised)::

    S(F, G) = E[f^T g] - 1/2 tr(cov f cov g)
            = tr(C_fg) - 1/2 tr(C_ff C_gg)
            = -1/2 * ( -2 tr(C_fg) + tr(C_ff C_gg) )       (the CCA-SVD objective, Wang et al. eq. 8)

computed in one of two exactly equal forms:

- covariance form, O(B d^2): ``tr(C_ff C_gg) = sum_ij (C_ff)_ij (C_gg)_ij`` (both symmetric, so the trace of
  the product is an element-wise sum; no d x d x d product);
- Gram form, O(B^2 d): ``tr(C_ff C_gg) = tr(F~^T F~ G~^T G~)/(B-1)^2 = ||F~ G~^T||_F^2 / (B-1)^2`` and
  ``tr(C_fg) = tr(F~ G~^T)/(B-1)`` from the same B x B matrix.

``form="auto"`` counts multiply-adds: the covariance form needs two B d^2 products, the Gram form one
B^2 d product, so the Gram form is used when ``B < 2 d``.

**UniFast-HGR** and **OptFast-HGR** (our definitions: the source names these variants but its code is not
public). Both replace the covariances by cosine similarities between *samples*: with row-normalised
``F^ = rows of F / ||row||`` (and likewise ``G^``), the one B x B product ``S = F^ G^^T`` holds
``S_ab = cos(f_a, g_b)``. The Soft-HGR Gram form reads ``(B-1) tr(C_fg) = sum_a <f~_a, g~_a>`` (the
diagonal of ``F~ G~^T``) and ``(B-1)^2 tr(C_ff C_gg) = sum_ab <f~_a, g~_b>^2`` (all of it, diagonal
included); the fast variants

1. use cosines in place of the inner products (bounded in [-1, 1], so the score needs no scale control),
2. drop the diagonal self-terms ``<f_a, g_a>^2`` from the penalty (they fight the first term: Soft-HGR
   rewards ``<f_a, g_a>`` linearly and penalises it quadratically; only the cross-sample terms are
   decorrelation),
3. average each part over its number of terms::

    UniFast(F, G) = 1/B sum_a S_aa - 1/2 * 1/(B(B-1)) sum_{a != b} S_ab^2,   F, G centred then row-normalised
    OptFast(F, G) = 1/B sum_a S_aa - 1/2 * (||S||_F^2 - sum_a S_aa^2) / (B(B-1)),   F, G row-normalised only

UniFast normalises twice (batch centring, then unit rows) and masks the diagonal of the one B x B
product, O(B^2 d). OptFast skips the centring (one normalisation step) and removes the diagonal by
subtraction, which lets it pick the cheaper of two equal forms like Soft-HGR: ``sum_a S_aa =
sum(F^ * G^)`` needs no product, and ``||S||_F^2 = ||F^ G^^T||_F^2 = sum_ij (F^^T F^)_ij (G^^T G^)_ij``, so
for ``B >= 2 d`` it uses the two d x d Gram matrices (O(B d^2)) instead of the B x B one. Both equal 1 - 0 = 1 at best (paired
rows identical, different samples orthogonal) and are bounded below by -1 - 1/2.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from allspark.objectives.base import CorrelationObjective, centre, check_pair
from allspark.registry import OBJECTIVES

__all__ = ["SoftHGR", "UniFastHGR", "OptFastHGR", "soft_hgr_covariance", "soft_hgr_gram"]


def soft_hgr_covariance(f: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """Soft-HGR score in the O(B d^2) covariance form (inputs [B, d], centred here)."""
    fc, gc = centre(f), centre(g)
    n = f.shape[0] - 1
    trace_fg = (fc * gc).sum() / n
    cov_f = fc.T @ fc / n
    cov_g = gc.T @ gc / n
    return trace_fg - 0.5 * (cov_f * cov_g).sum()


def soft_hgr_gram(f: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """Soft-HGR score in the O(B^2 d) Gram form (inputs [B, d], centred here)."""
    fc, gc = centre(f), centre(g)
    n = f.shape[0] - 1
    gram = fc @ gc.T  # [B, B], gram[a, b] = <f~_a, g~_b>
    return torch.diagonal(gram).sum() / n - 0.5 * gram.square().sum() / (n * n)


@OBJECTIVES.register("soft_hgr")
class SoftHGR(CorrelationObjective):
    """Soft-HGR: ``tr(C_fg) - 1/2 tr(C_ff C_gg)`` on batch-centred features (see the module docstring).

    Args:
        form: ``auto`` (Gram form when ``B < 2 d``), ``covariance`` or ``gram``.
    """

    name = "soft_hgr"

    def __init__(self, form: str = "auto") -> None:
        super().__init__()
        if form not in ("auto", "covariance", "gram"):
            raise ValueError(f"soft_hgr: form must be 'auto', 'covariance' or 'gram', got {form!r}")
        self.form = form

    def chosen_form(self, batch: int, dim: int) -> str:
        if self.form != "auto":
            return self.form
        return "gram" if batch < 2 * dim else "covariance"

    def pair(self, f: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        check_pair(f, g, self.name)
        if self.chosen_form(*f.shape) == "gram":
            return soft_hgr_gram(f, g)
        return soft_hgr_covariance(f, g)


def _fast_hgr(fh: torch.Tensor, gh: torch.Tensor, mask_diagonal: bool) -> torch.Tensor:
    b = fh.shape[0]
    sim = fh @ gh.T  # [B, B] cosine similarities
    diag = torch.diagonal(sim)
    if mask_diagonal:
        eye = torch.eye(b, dtype=torch.bool, device=sim.device)
        off_sq = sim.masked_fill(eye, 0.0).square().sum()
    else:
        off_sq = sim.square().sum() - diag.square().sum()
    return diag.mean() - 0.5 * off_sq / (b * (b - 1))


@OBJECTIVES.register("unifast_hgr")
class UniFastHGR(CorrelationObjective):
    """UniFast-HGR: centred, row-normalised features; ``mean_a S_aa - 1/2 mean_{a!=b} S_ab^2`` with
    ``S = F^ G^^T`` (see the module docstring for the derivation from Soft-HGR)."""

    name = "unifast_hgr"

    def __init__(self, eps: float = 1e-8) -> None:
        super().__init__()
        self.eps = eps

    def pair(self, f: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        check_pair(f, g, self.name)
        fh = F.normalize(centre(f), dim=1, eps=self.eps)
        gh = F.normalize(centre(g), dim=1, eps=self.eps)
        return _fast_hgr(fh, gh, mask_diagonal=True)


@OBJECTIVES.register("optfast_hgr")
class OptFastHGR(CorrelationObjective):
    """OptFast-HGR: row-normalised (not centred) features; ``mean_a S_aa - 1/2 (||S||_F^2 - sum_a S_aa^2)
    / (B(B-1))`` (see the module docstring)."""

    name = "optfast_hgr"

    def __init__(self, eps: float = 1e-8, form: str = "auto") -> None:
        super().__init__()
        if form not in ("auto", "covariance", "gram"):
            raise ValueError(f"optfast_hgr: form must be 'auto', 'covariance' or 'gram', got {form!r}")
        self.eps = eps
        self.form = form

    def pair(self, f: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        check_pair(f, g, self.name)
        fh = F.normalize(f, dim=1, eps=self.eps)
        gh = F.normalize(g, dim=1, eps=self.eps)
        b, d = f.shape
        form = self.form if self.form != "auto" else ("gram" if b < 2 * d else "covariance")
        if form == "gram":
            return _fast_hgr(fh, gh, mask_diagonal=False)
        diag = (fh * gh).sum(dim=1)
        frob = ((fh.T @ fh) * (gh.T @ gh)).sum()
        return diag.mean() - 0.5 * (frob - diag.square().sum()) / (b * (b - 1))
