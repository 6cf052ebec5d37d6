"""Correlation objectives: the two Soft-HGR forms, the CCA-SVD identity, Deep CCA against known canonical
correlations and cca-zoo, and finite gradients on degenerate inputs."""
from __future__ import annotations

import pytest
import torch

from allspark.objectives import build_objective
from allspark.objectives.hgr import OptFastHGR, SoftHGR, UniFastHGR, soft_hgr_covariance, soft_hgr_gram
from allspark.objectives.cca import DeepCCA, SoftCCA
from allspark.registry import OBJECTIVES

ALL = ["soft_hgr", "unifast_hgr", "optfast_hgr", "deep_cca", "soft_cca", "cosine", "dot"]


def _pair(b=64, d=16, seed=0, noise=0.5, dtype=torch.float64):
    g0 = torch.Generator().manual_seed(seed)
    f = torch.randn(b, d, generator=g0, dtype=dtype)
    g = f @ torch.randn(d, d, generator=g0, dtype=dtype) + noise * torch.randn(b, d, generator=g0, dtype=dtype)
    return f, g


def test_all_registered():
    assert set(ALL) <= set(OBJECTIVES.list())


@pytest.mark.parametrize("b,d", [(8, 64), (64, 16), (33, 33), (2, 5)])
def test_soft_hgr_forms_agree(b, d):
    f, g = _pair(b, d)
    cov, gram = soft_hgr_covariance(f, g), soft_hgr_gram(f, g)
    torch.testing.assert_close(cov, gram, rtol=1e-10, atol=1e-10)
    assert SoftHGR().chosen_form(b, d) == ("gram" if b < 2 * d else "covariance")
    torch.testing.assert_close(SoftHGR()(f, g), cov)


@pytest.mark.parametrize("cls", [UniFastHGR, OptFastHGR])
@pytest.mark.parametrize("b,d", [(8, 64), (64, 16), (33, 33)])
def test_fast_hgr_forms_agree(cls, b, d):
    f, g = _pair(b, d)
    torch.testing.assert_close(cls(form="gram")(f, g), cls(form="covariance")(f, g), rtol=1e-10, atol=1e-10)


def _fast_hgr_reference(f, g, centred, eps=1e-8):
    """The definition term by term: cosines of (centred) rows, explicit loops over a == b and a != b."""
    if centred:
        f, g = f - f.mean(0), g - g.mean(0)
    fh = f / f.norm(dim=1, keepdim=True).clamp_min(eps)
    gh = g / g.norm(dim=1, keepdim=True).clamp_min(eps)
    b = f.shape[0]
    paired = sum(torch.dot(fh[a], gh[a]) for a in range(b)) / b
    cross = sum(torch.dot(fh[a], gh[c]) ** 2 for a in range(b) for c in range(b) if a != c) / (b * (b - 1))
    return paired - 0.5 * cross


@pytest.mark.parametrize("cls,centred", [(UniFastHGR, True), (OptFastHGR, False)])
@pytest.mark.parametrize("form", ["gram", "covariance"])
@pytest.mark.parametrize("b,d", [(2, 5), (7, 3), (12, 12), (9, 20)])
def test_fast_hgr_matches_reference_value_and_gradient(cls, centred, form, b, d):
    f, g = _pair(b, d, seed=b + d)
    fr, gr = f.clone().requires_grad_(True), g.clone().requires_grad_(True)
    fo, go = f.clone().requires_grad_(True), g.clone().requires_grad_(True)
    ref = _fast_hgr_reference(fr, gr, centred)
    ours = cls(form=form)(fo, go)
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-12)
    (ref * 0.7).backward()  # an incoming gradient other than 1
    (ours * 0.7).backward()
    torch.testing.assert_close(fo.grad, fr.grad, rtol=0, atol=1e-12)
    torch.testing.assert_close(go.grad, gr.grad, rtol=0, atol=1e-12)


@pytest.mark.parametrize("cls", [UniFastHGR, OptFastHGR])
@pytest.mark.parametrize("form", ["gram", "covariance"])
def test_fast_hgr_gradcheck(cls, form):
    f, g = _pair(6, 4, seed=3)
    f.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda x, y: cls(form=form)(x, y), (f, g.clone().requires_grad_(True)))
    # Only one input needing a gradient (the other view frozen).
    assert torch.autograd.gradcheck(lambda x: cls(form=form)(x, g), (f,))
    assert torch.autograd.gradcheck(lambda y: cls(form=form)(f.detach(), y), (g.clone().requires_grad_(True),))


def test_fast_hgr_hand_computed_values():
    # Rows e1, e2, (1, 1) paired with themselves. OptFast: unit rows e1, e2, (1, 1)/sqrt 2, so S_aa = 1 and the
    # off-diagonal cosines are 0, 1/sqrt 2, 1/sqrt 2 (twice each): 1 - 1/2 * 2 * (0 + 1/2 + 1/2) / 6 = 5/6.
    # UniFast: centred rows (1, -2)/3, (-2, 1)/3, (1, 1)/3; cosines -4/5, -1/sqrt 10, -1/sqrt 10:
    # 1 - 1/2 * 2 * (16/25 + 1/10 + 1/10) / 6 = 0.86.
    x = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]], dtype=torch.float64)
    for form in ("gram", "covariance"):
        torch.testing.assert_close(OptFastHGR(form=form)(x, x), torch.tensor(5 / 6, dtype=torch.float64),
                                   rtol=0, atol=1e-15)
        torch.testing.assert_close(UniFastHGR(form=form)(x, x), torch.tensor(0.86, dtype=torch.float64),
                                   rtol=0, atol=1e-15)


@pytest.mark.parametrize("cls", [UniFastHGR, OptFastHGR])
@pytest.mark.parametrize("form", ["gram", "covariance"])
def test_fast_hgr_computes_in_float32_under_autocast_and_for_bfloat16(cls, form):
    f, g = _pair(40, 24, dtype=torch.float32)
    plain = cls(form=form)(f, g)
    fa, ga = f.clone().requires_grad_(True), g.clone().requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        inside = cls(form=form)(fa, ga)
    inside.backward()  # the backward runs outside autocast: it must meet float32 saved tensors
    assert inside.dtype == torch.float32 and fa.grad.dtype == torch.float32
    torch.testing.assert_close(inside, plain, rtol=0, atol=0)
    fb, gb = f.to(torch.bfloat16).requires_grad_(True), g.to(torch.bfloat16).requires_grad_(True)
    score = cls(form=form)(fb, gb)
    score.backward()
    torch.testing.assert_close(score, cls(form=form)(fb.detach().float(), gb.detach().float()), rtol=0, atol=0)
    assert fb.grad.dtype == torch.bfloat16 and gb.grad.dtype == torch.bfloat16


def test_fast_hgr_auto_form_counts_multiply_adds():
    # Gram (1 + k) B^2 d against covariance (2 + k) B d^2, k = inputs needing a gradient.
    obj = UniFastHGR()
    assert obj.chosen_form(100, 80, 2) == "gram"  # 300 < 320
    assert obj.chosen_form(150, 100, 2) == "covariance"  # 450 > 400
    assert obj.chosen_form(150, 100, 0) == "gram"  # 150 < 200
    assert obj.chosen_form(200, 100, 0) == "covariance"  # 200 = 200
    assert UniFastHGR(form="gram").chosen_form(4096, 8) == "gram"
    f, g = _pair(150, 100)
    with torch.no_grad():
        scored = obj(f, g)  # Gram form (no gradient needed)
    trained = obj(f.clone().requires_grad_(True), g.clone().requires_grad_(True))  # covariance form
    torch.testing.assert_close(trained.detach(), scored, rtol=0, atol=1e-12)
    with pytest.raises(ValueError, match="form"):
        UniFastHGR(form="fast")


def test_soft_hgr_is_minus_half_cca_svd_objective():
    f, g = _pair(50, 6, seed=1)
    fc, gc = f - f.mean(0), g - g.mean(0)
    n = f.shape[0] - 1
    c_fg, c_ff, c_gg = fc.T @ gc / n, fc.T @ fc / n, gc.T @ gc / n
    cca_svd = -2 * torch.trace(c_fg) + torch.trace(c_ff @ c_gg)
    for form in ("covariance", "gram"):
        torch.testing.assert_close(SoftHGR(form=form)(f, g), -0.5 * cca_svd)


def test_soft_hgr_prefers_correlated_pairs():
    f, _ = _pair(256, 8)
    torch.manual_seed(3)
    unrelated = torch.randn_like(f)
    for name in ("soft_hgr", "unifast_hgr", "optfast_hgr", "deep_cca", "soft_cca", "cosine"):
        obj = build_objective(name)
        assert obj(f, f + 0.1 * unrelated) > obj(f, unrelated), name


def _constructed(n, rhos, seed=0, dim_extra=2):
    """Views with canonical correlations ``rhos`` (then mixed by random invertible maps)."""
    g0 = torch.Generator().manual_seed(seed)
    k = len(rhos)
    z = torch.randn(n, k, generator=g0, dtype=torch.float64)
    rho = torch.tensor(rhos, dtype=torch.float64)
    y = rho * z + torch.sqrt(1 - rho**2) * torch.randn(n, k, generator=g0, dtype=torch.float64)
    x = torch.cat([z, torch.randn(n, dim_extra, generator=g0, dtype=torch.float64)], 1)
    y = torch.cat([y, torch.randn(n, dim_extra, generator=g0, dtype=torch.float64)], 1)
    a = torch.randn(k + dim_extra, k + dim_extra, generator=g0, dtype=torch.float64)
    b = torch.randn(k + dim_extra, k + dim_extra, generator=g0, dtype=torch.float64)
    return x @ a, y @ b


def test_deep_cca_recovers_known_canonical_correlations():
    rhos = [0.9, 0.6, 0.3]
    x, y = _constructed(40000, rhos)
    est = DeepCCA(reg=1e-8).canonical_correlations(x, y)
    torch.testing.assert_close(est[:3], torch.tensor(rhos, dtype=torch.float64), atol=0.02, rtol=0)
    assert est[3:].max() < 0.05
    top2 = DeepCCA(top_k=2, reg=1e-8)(x, y)
    torch.testing.assert_close(top2, est[:2].sum(), atol=1e-9, rtol=0)
    sq = DeepCCA(top_k=2, reg=1e-8, squared=True)(x, y)
    torch.testing.assert_close(sq, (est[:2] ** 2).sum(), atol=1e-9, rtol=0)


def test_deep_cca_matches_cca_zoo():
    objectives = pytest.importorskip("cca_zoo.deep.objectives")
    for (b, df, dg), reg in [((200, 8, 8), 1e-3), ((64, 5, 7), 1e-2), ((500, 16, 16), 1e-6)]:
        g0 = torch.Generator().manual_seed(b)
        f = torch.randn(b, df, generator=g0, dtype=torch.float64)
        g = f[:, :1] * torch.ones(1, dg, dtype=torch.float64) + torch.randn(b, dg, generator=g0, dtype=torch.float64)
        ours = DeepCCA(reg=reg, squared=True)(f, g)
        ref = objectives.CCALoss(reg_covar=reg)([f, g])
        torch.testing.assert_close(ours, -ref, rtol=1e-8, atol=1e-10)


def _degenerate_inputs():
    torch.manual_seed(0)
    x = torch.randn(32, 8, dtype=torch.float64)
    low_rank = torch.randn(32, 2, dtype=torch.float64) @ torch.randn(2, 8, dtype=torch.float64)
    return {
        "identical": (x, x.clone()),
        "constant": (torch.full((32, 8), 3.0, dtype=torch.float64), torch.ones(32, 8, dtype=torch.float64)),
        "zero": (torch.zeros(32, 8, dtype=torch.float64), x.clone()),
        "rank_deficient": (low_rank, low_rank + 0.01 * x),
    }


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("case", ["identical", "constant", "zero", "rank_deficient"])
def test_gradients_finite_on_degenerate_inputs(name, case):
    f, g = _degenerate_inputs()[case]
    f = f.clone().requires_grad_(True)
    g = g.clone().requires_grad_(True)
    obj = build_objective(name)
    obj.train()
    loss = obj.loss(f, g)
    assert torch.isfinite(loss), (name, case, loss)
    loss.backward()
    assert torch.isfinite(f.grad).all() and torch.isfinite(g.grad).all(), (name, case)


def test_deep_cca_without_ridge_refuses_singular_batch():
    f, g = _degenerate_inputs()["rank_deficient"]
    with pytest.raises(ValueError, match="singular.*reg > 0"):
        DeepCCA(reg=0.0)(f, g)


def test_bad_inputs_raise_clear_errors():
    obj = build_objective("soft_hgr")
    with pytest.raises(ValueError, match="same width"):
        obj(torch.randn(8, 4), torch.randn(8, 5))
    with pytest.raises(ValueError, match="batch sizes"):
        obj(torch.randn(8, 4), torch.randn(7, 4))
    with pytest.raises(ValueError, match=r"\[B, d\]"):
        obj(torch.randn(8, 4, 2), torch.randn(8, 4, 2))
    with pytest.raises(ValueError, match="at least 2"):
        obj(torch.randn(1, 4), torch.randn(1, 4))
    with pytest.raises(ValueError, match="two views"):
        obj(torch.randn(8, 4))
    with pytest.raises(ValueError, match="form"):
        SoftHGR(form="fast")


def test_more_than_two_views_sum_over_pairs():
    torch.manual_seed(0)
    a, b, c = (torch.randn(16, 4) for _ in range(3))
    for name in ("soft_hgr", "unifast_hgr", "deep_cca", "cosine"):
        obj = build_objective(name)
        torch.testing.assert_close(obj(a, b, c), obj(a, b) + obj(a, c) + obj(b, c))


def test_fast_hgr_bounds_and_optimum():
    torch.manual_seed(0)
    q, _ = torch.linalg.qr(torch.randn(16, 16))  # orthonormal rows: different samples orthogonal
    for name in ("unifast_hgr", "optfast_hgr"):
        obj = build_objective(name)
        assert -1.5 <= float(obj(torch.randn(16, 8), torch.randn(16, 8))) <= 1.0
    # OptFast (no centring) reaches its optimum 1 on orthonormal, identical pairs.
    torch.testing.assert_close(build_objective("optfast_hgr")(q, q), torch.tensor(1.0), atol=1e-5, rtol=0)


def test_soft_cca_running_covariance_only_in_training():
    f, g = _pair(32, 6, dtype=torch.float32)
    obj = SoftCCA()
    obj.eval()
    obj(f, g)
    assert obj._running == {}
    obj.train()
    obj(f, g)
    assert set(obj._running) == {0, 1}
    # A perfectly correlated, decorrelated pair scores better than an unrelated one.
    unrelated = torch.randn(f.shape, generator=torch.Generator().manual_seed(5))
    assert SoftCCA()(f, f) > SoftCCA()(f, unrelated)
