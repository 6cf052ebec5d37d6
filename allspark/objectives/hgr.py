r"""Soft-HGR maximal correlation (Wang et al., AAAI 2019) and its two fast cosine variants, UniFast- and OptFast-HGR.

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
``F^ = rows of F / max(||row||, eps)`` (and likewise ``G^``), the one B x B product ``S = F^ G^^T`` holds
``S_ab = cos(f_a, g_b)``. The Soft-HGR Gram form reads ``(B-1) tr(C_fg) = sum_a <f~_a, g~_a>`` (the
diagonal of ``F~ G~^T``) and ``(B-1)^2 tr(C_ff C_gg) = sum_ab <f~_a, g~_b>^2`` (all of it, diagonal
included); the fast variants

1. use cosines in place of the inner products (bounded in [-1, 1], so the score needs no scale control),
2. drop the diagonal self-terms ``<f_a, g_a>^2`` from the penalty (they fight the first term: Soft-HGR
   rewards ``<f_a, g_a>`` linearly and penalises it quadratically; only the cross-sample terms are
   decorrelation),
3. average each part over its number of terms::

    UniFast(F, G) = 1/B sum_a S_aa - 1/2 * 1/(B(B-1)) sum_{a != b} S_ab^2,   F, G centred then row-normalised
    OptFast(F, G) = the same expression,                                     F, G row-normalised only

Both equal 1 - 0 = 1 at best (paired rows identical, different samples orthogonal) and are bounded below by
-1 - 1/2. UniFast normalises twice (batch centring, then unit rows), OptFast once.

*Computation* (both variants, one ``torch.autograd.Function`` with a hand-written backward; no B x B x d
intermediate anywhere). The penalty is never masked: ``sum_{a != b} S_ab^2 = ||S||_F^2 - sum_a S_aa^2``
(the diagonal removed arithmetically), and ``||S||_F^2`` has two exactly equal forms:

- Gram (sample space): ``S = F^ G^^T`` (one [B, d] x [d, B] product) and ``||S||_F^2 = <vec S, vec S>``,
  ``S_aa`` its diagonal;
- covariance (feature space): ``||S||_F^2 = ||F^ G^^T||_F^2 = <F^^T F^, G^^T G^>`` from two d x d Gram
  matrices, ``S_aa = <f^_a, g^_a>`` row by row.

The gradient is ``d/d f^_a = (1/B + c S_aa) g^_a - c (S G^)_a`` with ``c = 1/(B(B-1))`` and
``S G^ = F^ (G^^T G^)`` (likewise for ``G^``): one product per input with the saved ``S`` or the saved
d x d matrix, then the row-normalisation and centring adjoints (O(B d)). With ``k`` (0-2) inputs needing a
gradient, forward + backward costs ``(1 + k) B^2 d`` multiply-adds in the Gram form and ``(2 + k) B d^2`` in
the covariance form; ``form="auto"`` takes the smaller (training, k = 2: Gram when ``3 B < 4 d``; scoring
under ``torch.no_grad``: Gram when ``B < 2 d``). So the time is ``O(B d min(B, d))`` at matmul speed:
``benchmarks/correlation.py`` times both against one [B, d] x [d, B] product. The score is computed in at
least float32 with autocast off (the subtraction of the diagonal cancels; bfloat16 inputs are upcast, their
gradients returned in bfloat16). The backward is not itself differentiable (no double backward).

*Against the source* (ICLR 2026 submission "UniFast-HGR: Scalable and Efficient Maximal Correlation for
Multimodal Models", OpenReview PiB9VXYFZE; we have its abstract, not its code). It describes UniFast-HGR as
(i) cosine similarity in place of covariance, (ii) the diagonal elements removed against self-correlation
bias, (iii) l2 normalisation as the variance constraint, at ``O(m^2 K)`` (``m`` samples, ``K`` features:
the B x B x d sample-space product, as here), and OptFast-HGR as "simplifying normalization steps" for
"dot-product-level efficiency". Points (i)-(iii) match the definitions above. Where ours go beyond or may
differ from that wording:

- UniFast centres each feature over the batch before the l2 normalisation (inherited from Soft-HGR's
  centred covariances); the abstract names only the l2 normalisation.
- OptFast here is UniFast without the centring (one normalisation step instead of two). It keeps the
  decorrelation penalty, so it costs the same order as UniFast, not that of a dot product; the abstract does
  not say which normalisation step is simplified.
- The diagonal is removed from the penalty only; the paired cosines ``S_aa`` stay as the reward (the
  abstract does not say). The 1/B and 1/(B(B-1)) averages and the 1/2 weight are our choices.
- Cost: the source states ``O(m^2 K)``; the same value is also computed here in ``O(m K^2)`` when that is
  smaller. The source's speed claim is against covariance inversion (``O(K^3)``); in this package Soft-HGR
  never inverts (its trace forms are also ``O(B d min(B, d))``) and only Deep CCA does (Cholesky and
  ``eigvalsh`` of d x d matrices), so the fast variants' advantage is over Deep CCA, while against Soft-HGR
  they are of the same order (the benchmark's table shows which is fastest where).
"""
from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable

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


def _unit_rows(x: torch.Tensor, centred: bool, eps: float):
    """``x`` (batch-centred if ``centred``) with unit rows, as ``F.normalize(x, dim=1, eps=eps)``.

    Returns ``(x^, den, keep)``: ``den = max(||row||, eps)`` ([B, 1]) and ``keep = ||row|| >= eps`` (where the
    norm's gradient flows; ``clamp_min`` passes it there and nowhere else)."""
    if centred:
        x = x - x.mean(dim=0, keepdim=True)
    norm = torch.linalg.vector_norm(x, dim=1, keepdim=True)
    den = norm.clamp_min(eps)
    return (x.div_(den) if centred else x / den), den, norm >= eps


def _unit_rows_backward(grad: torch.Tensor, xh: torch.Tensor, den: torch.Tensor, keep: torch.Tensor,
                        centred: bool) -> torch.Tensor:
    """Gradient through :func:`_unit_rows` (in place on ``grad``, a fresh tensor): ``(G - keep x^ <G, x^>_row)
    / den``, then minus its batch mean if centred (centring is its own adjoint)."""
    radial = torch.linalg.vecdot(grad, xh, dim=1).unsqueeze(1).masked_fill_(~keep, 0.0)
    grad = grad.addcmul_(xh, radial, value=-1.0).div_(den)
    if centred:
        grad = grad.sub_(grad.mean(dim=0, keepdim=True))
    return grad


class _FastHGR(torch.autograd.Function):
    """``mean_a S_aa - 1/2 sum_{a != b} S_ab^2 / (B(B-1))`` with ``S = F^ G^^T`` and a hand-written backward.

    Forward, Gram form: one ``[B, d] x [d, B]`` product ``S``; ``||S||_F^2`` as ``<vec S, vec S>`` (one read of
    ``S``, no ``B x B`` temporary), the diagonal subtracted. Covariance form: ``||S||_F^2 =
    <F^^T F^, G^^T G^>`` from two ``d x d`` Gram matrices. Backward (``c = 1/(B(B-1))``)::

        d score / d F^ = (1/B + c S_aa) g^_a - c (S G^)_a,    S G^ = F^ (G^^T G^)   (likewise for G^)

    with ``S G^`` from the saved ``S`` (Gram form) or the saved ``G^^T G^`` (covariance form): the backward adds
    one ``B x B x d`` (or ``B x d x d``) product per input that needs a gradient and no ``B x B`` pass."""

    @staticmethod
    def forward(ctx, f, g, centred: bool, eps: float, gram: bool):
        # At least float32 and outside autocast: ||S||_F^2 - sum_a S_aa^2 cancels, and the backward (which
        # autocast does not cover) must see the forward's dtypes. Gradients go back in the inputs' dtypes.
        ctx.dtypes = (f.dtype, g.dtype)
        dtype = torch.promote_types(torch.promote_types(f.dtype, g.dtype), torch.float32)
        with torch.autocast(f.device.type, enabled=False):
            return _FastHGR._score(ctx, f.to(dtype), g.to(dtype), centred, eps, gram)

    @staticmethod
    def _score(ctx, f, g, centred: bool, eps: float, gram: bool):
        fh, den_f, keep_f = _unit_rows(f, centred, eps)
        gh, den_g, keep_g = _unit_rows(g, centred, eps)
        b = f.shape[0]
        c = 1.0 / (b * (b - 1))
        if gram:
            s = fh @ gh.T  # [B, B], s[a, b] = cos(f_a, g_b)
            flat = s.reshape(-1)
            total = torch.dot(flat, flat)
            diag = torch.diagonal(s)
            mats = (s,)
        else:
            mf, mg = fh.T @ fh, gh.T @ gh  # [d, d]
            total = torch.dot(mf.reshape(-1), mg.reshape(-1))
            diag = torch.linalg.vecdot(fh, gh, dim=1)
            mats = (mf, mg)
        ctx.save_for_backward(fh, gh, den_f, den_g, keep_f, keep_g, diag, *mats)
        ctx.centred, ctx.gram, ctx.c = centred, gram, c
        return diag.sum() / b - (0.5 * c) * (total - torch.dot(diag, diag))

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        fh, gh, den_f, den_g, keep_f, keep_g, diag, *mats = ctx.saved_tensors
        b, c = fh.shape[0], ctx.c
        weight = (diag * c + 1.0 / b).unsqueeze(1) * grad_out  # [B, 1]
        need_f, need_g = ctx.needs_input_grad[:2]
        grad_f = grad_g = None
        if need_f:
            # (1/B + c S_aa) g^_a - c (S G^)_a, times the incoming gradient
            cross = torch.mm(mats[0], gh) if ctx.gram else torch.mm(fh, mats[1])
            grad_f = _unit_rows_backward(cross.mul_(-c * grad_out).addcmul_(weight, gh), fh, den_f, keep_f,
                                         ctx.centred)
        if need_g:
            cross = torch.mm(mats[0].T, fh) if ctx.gram else torch.mm(gh, mats[0])
            grad_g = _unit_rows_backward(cross.mul_(-c * grad_out).addcmul_(weight, fh), gh, den_g, keep_g,
                                         ctx.centred)
        if grad_f is not None:
            grad_f = grad_f.to(ctx.dtypes[0])
        if grad_g is not None:
            grad_g = grad_g.to(ctx.dtypes[1])
        return grad_f, grad_g, None, None, None


def _fast_form(form: str, b: int, d: int, grads: int) -> str:
    """``form``, or for ``auto`` the form with fewer multiply-adds for forward + backward: Gram ``(1 + k) B^2 d``,
    covariance ``(2 + k) B d^2``, with ``k`` (0-2) the number of inputs that need a gradient."""
    if form != "auto":
        return form
    return "gram" if (1 + grads) * b < (2 + grads) * d else "covariance"


def _grads_needed(f: torch.Tensor, g: torch.Tensor) -> int:
    return int(f.requires_grad) + int(g.requires_grad) if torch.is_grad_enabled() else 0


class _FastHGRObjective(CorrelationObjective):
    centred: bool = False

    def __init__(self, eps: float = 1e-8, form: str = "auto") -> None:
        super().__init__()
        if form not in ("auto", "covariance", "gram"):
            raise ValueError(f"{self.name}: form must be 'auto', 'covariance' or 'gram', got {form!r}")
        self.eps = eps
        self.form = form

    def chosen_form(self, batch: int, dim: int, grads: int = 2) -> str:
        return _fast_form(self.form, batch, dim, grads)

    def pair(self, f: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        check_pair(f, g, self.name)
        gram = self.chosen_form(*f.shape, _grads_needed(f, g)) == "gram"
        return _FastHGR.apply(f, g, self.centred, self.eps, gram)


@OBJECTIVES.register("unifast_hgr")
class UniFastHGR(_FastHGRObjective):
    """UniFast-HGR: centred, row-normalised features; ``mean_a S_aa - 1/2 mean_{a!=b} S_ab^2`` with
    ``S = F^ G^^T`` (see the module docstring for the derivation from Soft-HGR and the two equal forms).

    Args:
        eps: floor of the row norms (as ``F.normalize``).
        form: ``auto`` (fewer multiply-adds, see :func:`_fast_form`), ``covariance`` or ``gram``.
    """

    name = "unifast_hgr"
    centred = True


@OBJECTIVES.register("optfast_hgr")
class OptFastHGR(_FastHGRObjective):
    """OptFast-HGR: row-normalised (not centred) features, otherwise as :class:`UniFastHGR`."""

    name = "optfast_hgr"
    centred = False
