"""Lambert W against scipy, and the projected Sinkhorn projection against POT's exact OT and a QP solved by scipy."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch

from kit.errors import UserError
from kit.ot.lambertw import lambertw, lambertw_exp, log_lambertw_exp
from kit.ot.local import (
    exact_local_wasserstein,
    local_cost,
    plan_cost,
    source_marginal,
    target_marginal,
    valid_offsets,
)
from kit.ot.projection import (
    ProjectionConvergenceWarning,
    ProjectionDuals,
    dual_objective,
    primal_objective,
    project_wasserstein,
)

special = pytest.importorskip("scipy.special")
optimize = pytest.importorskip("scipy.optimize")


@pytest.fixture(autouse=True)
def _one_thread():
    """Small tensors and many tiny ops: one thread is faster (and steadier on a shared machine)."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


# Most tests check properties that hold at any regularisation: a smaller one converges in fewer iterations.
FAST = {"reg": 100.0}


def _unit(t: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    return t.double() / m.double().view(-1, 1, 1, 1)


# ---------------------------------------------------------------- Lambert W


def test_lambertw_matches_scipy_in_float64_over_the_whole_range():
    x = np.concatenate([np.logspace(-300, 300, 6001), np.linspace(-1 / math.e + 1e-12, -1e-300, 2001)])
    ours = lambertw(torch.tensor(x, dtype=torch.float64)).numpy()
    ref = special.lambertw(x).real
    np.testing.assert_allclose(ours, ref, rtol=1e-10, atol=1e-11)  # atol: the branch point has infinite slope
    pos = x > 0
    np.testing.assert_allclose(ours[pos], ref[pos], rtol=1e-13)


def test_lambertw_matches_scipy_in_float32():
    x = np.logspace(-37, 38, 3001).astype(np.float32)
    ours = lambertw(torch.tensor(x)).double().numpy()
    ref = special.lambertw(x.astype(np.float64)).real
    np.testing.assert_allclose(ours, ref, rtol=2e-6)
    xn = np.linspace(-0.36, -1e-6, 501).astype(np.float32)
    np.testing.assert_allclose(lambertw(torch.tensor(xn)).double().numpy(),
                               special.lambertw(xn.astype(np.float64)).real, rtol=1e-5, atol=1e-6)


def test_lambertw_exp_takes_log_arguments_far_beyond_overflow():
    # where exp(L) is representable: scipy on exp(L)
    L = np.linspace(-700, 700, 4001)
    ref = special.lambertw(np.exp(L)).real
    ours = lambertw_exp(torch.tensor(L, dtype=torch.float64)).numpy()
    np.testing.assert_allclose(ours, ref, rtol=1e-12)
    # beyond: the defining identity W + log W = L, and the asymptote W = L - log L + log L / L + O((log L / L)^2)
    big = torch.tensor([1e3, 1e4, 1e5, 1e8, 1e300], dtype=torch.float64)
    w = lambertw_exp(big)
    torch.testing.assert_close(w + torch.log(w), big, rtol=1e-15, atol=0)
    lg = torch.log(big)
    assert ((w - (big - lg + lg / big)).abs() <= 2 * (lg / big) ** 2 + 1e-15 * big).all()
    torch.testing.assert_close(log_lambertw_exp(big), torch.log(w), rtol=1e-15, atol=0)
    # float32 up to 1e5: finite and equal to the float64 result to float32 precision, without overflow
    L32 = torch.linspace(-1e5, 1e5, 20001)
    w32 = lambertw_exp(L32)
    assert torch.isfinite(w32).all()
    ok = w32 > 1e-30
    torch.testing.assert_close(w32[ok].double(), lambertw_exp(L32.double())[ok], rtol=2e-6, atol=0)
    y32 = log_lambertw_exp(L32)
    assert torch.isfinite(y32).all()
    torch.testing.assert_close(y32.double(), log_lambertw_exp(L32.double()), rtol=1e-6, atol=1e-6)


def test_lambertw_special_values():
    out = lambertw(torch.tensor([0.0, -0.0, float("inf"), -1 / math.e, -0.5, float("nan"), math.e],
                                dtype=torch.float64))
    assert out[0] == 0 and out[1] == 0 and out[2] == float("inf")
    assert math.isclose(out[3].item(), -1.0, abs_tol=1e-7)
    assert math.isnan(out[4].item()) and math.isnan(out[5].item())
    assert math.isclose(out[6].item(), 1.0, rel_tol=1e-15)
    assert lambertw_exp(torch.tensor([float("-inf")])).item() == 0.0
    assert log_lambertw_exp(torch.tensor([float("-inf")])).item() == float("-inf")


# ---------------------------------------------------------------- projection: feasibility, mass, marginals


def _images(n, c, h, seed, low=0.0):
    g = torch.Generator().manual_seed(seed)
    x = low + (1 - low) * torch.rand(n, c, h, h, generator=g)
    w = torch.rand(n, c, h, h, generator=g)
    return x, w, g


@pytest.mark.parametrize("channels", [1, 2, 3])
def test_projection_is_feasible_mass_preserving_and_its_plan_has_the_right_marginals(channels):
    x, w, g = _images(4, channels, 8, seed=channels)
    x[0, :, :3] = 0.0  # empty pixels
    x[1] = (x[1] > 0.5).float()  # saturated pixels (at the cap 1)
    w[2] = x[2] + 0.05 * torch.randn(x[2].shape, generator=g)  # a small perturbation, partly outside [0, 1]
    eps = torch.tensor([0.05, 0.2, 0.1, 0.4])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ProjectionConvergenceWarning)
        r = project_wasserstein(w, x, eps, return_plan=True, max_iter=200, **FAST)
    m = r.mass
    assert torch.isfinite(r.z).all() and r.z.min() >= 0 and r.z.max() <= 1
    # mass per channel conserved
    torch.testing.assert_close(r.z.sum((2, 3)), x.sum((2, 3)), rtol=1e-5, atol=0)
    # the plan goes from x to z, stays inside the image, and its cost is the reported cost
    assert (r.plan >= 0).all()
    assert (r.plan[:, :, ~valid_offsets(8, 8, 5)] == 0).all()
    torch.testing.assert_close(source_marginal(r.plan) * m.view(-1, 1, 1, 1), x, rtol=0, atol=1e-5)
    torch.testing.assert_close(target_marginal(r.plan) * m.view(-1, 1, 1, 1), r.z, rtol=0, atol=1e-5)
    torch.testing.assert_close(plan_cost(r.plan, local_cost(5)), r.cost)
    # within the ball: reported cost <= eps (1 + 1e-3), and the exact distance (POT) <= the reported cost
    assert (r.cost <= eps * (1 + 1e-3)).all()
    exact = exact_local_wasserstein(_unit(x, m), _unit(r.z, m))
    assert (exact <= r.cost.double() * (1 + 1e-5) + 1e-7).all(), (exact, r.cost)


def test_budget_use_where_the_constraint_is_active():
    """With the default regularisation the exact cost of the output is >= 0.9 of eps where the radius binds (the
    published code: 0.16-0.35): dense images far apart, and a small L-inf step (4/255) at half the distance it needs
    (about 0.02 here)."""
    for channels in (1, 3):
        x, w, g = _images(2, channels, 8, seed=10 + channels, low=0.1)
        step = x + 4 / 255 * torch.sign(torch.randn(x.shape, generator=g))
        xx, target, eps = torch.cat([x, x]), torch.cat([w, step]), torch.tensor([0.1, 0.1, 0.01, 0.01])
        r = project_wasserstein(target, xx, eps)
        assert r.converged.all()
        exact = exact_local_wasserstein(_unit(xx, r.mass), _unit(r.z, r.mass))
        use = exact / eps
        assert (use >= 0.9).all() and (use <= 1 + 1e-3).all(), (channels, use)


def test_input_inside_the_ball_comes_back_unchanged():
    x, w, _ = _images(3, 2, 8, seed=3, low=0.1)
    inner = project_wasserstein(w, x, 0.05, **FAST)  # a point of the ball of radius 0.05 ...
    r = project_wasserstein(inner.z, x, 0.1, **FAST)  # ... is strictly inside the ball of radius 0.1
    assert (r.z - inner.z).abs().max() <= 1e-3
    assert (r.cost <= 0.1 * (1 + 1e-3)).all()
    exact = exact_local_wasserstein(_unit(x, r.mass), _unit(r.z, r.mass))
    assert (exact <= r.cost.double() * (1 + 1e-5) + 1e-7).all()
    # x itself, exactly
    same = project_wasserstein(x, x, torch.tensor([0.0, 0.1, 1.0]))
    assert torch.equal(same.z, x) and (same.cost == 0).all() and same.converged.all()
    # without the check, the entropic projection alone moves the point (the bias the check removes)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ProjectionConvergenceWarning)
        biased = project_wasserstein(inner.z, x, 0.1, check_inside=False, **FAST)
    assert (biased.z - inner.z).abs().max() > 1e-3


@pytest.mark.parametrize("reg_scale", ["mass", "absolute"])
def test_no_nan_or_inf_in_float32_up_to_reg_1e5(reg_scale):
    x, w, _ = _images(2, 3, 8, seed=5)
    x[0, 0] = 0.0
    for reg in (1e-2, 1e3, 1e5):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ProjectionConvergenceWarning)
            r = project_wasserstein(w * 3 - 1, x, 0.3, reg=reg, reg_scale=reg_scale, max_iter=60, return_plan=True)
        for t in (r.z, r.cost, r.plan, r.duals.beta, r.duals.psi, r.dual):
            assert torch.isfinite(t).all(), reg
        assert r.z.dtype == torch.float32
        assert (r.cost <= 0.3 * (1 + 1e-3)).all() and r.z.min() >= 0 and r.z.max() <= 1
        torch.testing.assert_close(r.z.sum((1, 2, 3)), x.sum((1, 2, 3)), rtol=1e-5, atol=0)


def test_float64_follows_the_inputs_and_agrees_with_float32():
    x, w, _ = _images(2, 1, 8, seed=6, low=0.1)
    r64 = project_wasserstein(w.double(), x.double(), 0.1, **FAST)
    r32 = project_wasserstein(w, x, 0.1, **FAST)
    assert r64.z.dtype == torch.float64 and r64.cost.dtype == torch.float64
    assert (r64.z.float() - r32.z).abs().max() < 1e-3


# ---------------------------------------------------------------- the dual objective


def test_dual_objective_gradients_match_finite_differences_and_close_the_gap():
    x, w, _ = _images(2, 1, 6, seed=7, low=0.1)
    x, w = x.double(), w.double()
    eps = torch.tensor([0.05, 0.1], dtype=torch.float64)
    r = project_wasserstein(w, x, eps, return_plan=True, tol=1e-12, marginal_tol=1e-9, max_iter=3000, **FAST)
    assert r.converged.all()
    d = r.duals
    m = r.mass.view(-1, 1, 1, 1)
    # at the optimum: strong duality (the primal of the returned, exactly feasible plan equals the dual)
    primal = primal_objective(x, w, r.plan, d.lam)
    dual = dual_objective(x, w, eps, d)
    torch.testing.assert_close(dual, r.dual, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(primal, dual, rtol=1e-6, atol=1e-6)

    # away from the optimum: analytic gradients against central differences
    g = torch.Generator().manual_seed(0)
    pert = ProjectionDuals(d.alpha + 0.1 * torch.randn(d.alpha.shape, generator=g, dtype=torch.float64),
                           d.beta + 0.3 * torch.randn(d.beta.shape, generator=g, dtype=torch.float64),
                           d.psi - 0.2, d.lam)
    cost = local_cost(5, dtype=torch.float64)
    valid = valid_offsets(6, 6, 5)
    from kit.ot.local import neighbours

    nb = torch.where(valid, neighbours(pert.beta, 5), float("-inf"))
    plan = torch.exp(pert.alpha.unsqueeze(2) + nb - pert.psi.view(-1, 1, 1, 1, 1) * cost.view(1, 1, -1, 1, 1) - 1)
    dpsi = -eps + plan_cost(plan, cost)  # dg/dpsi
    zt = (w / m - pert.beta / d.lam.view(-1, 1, 1, 1)).clamp(min=0).minimum(1 / m)
    dbeta = zt - target_marginal(plan)  # dg/dbeta
    dalpha = x / m - source_marginal(plan)  # dg/dalpha
    h = 1e-6
    for which, grad in (("psi", dpsi), ("beta", dbeta), ("alpha", dalpha)):
        for idx in ([0], [1]) if which == "psi" else ((0, 0, 2, 3), (1, 0, 0, 5), (1, 0, 4, 1)):
            up, down = [ProjectionDuals(pert.alpha.clone(), pert.beta.clone(), pert.psi.clone(), d.lam) for _ in "ud"]
            getattr(up, which)[idx] += h
            getattr(down, which)[idx] -= h
            fd = (dual_objective(x, w, eps, up) - dual_objective(x, w, eps, down)) / (2 * h)
            n = idx[0]
            assert math.isclose(fd[n].item(), grad[idx].item(), rel_tol=1e-5, abs_tol=1e-7), (which, idx)
    # weak duality: any dual point is below the primal of any feasible plan
    assert (dual_objective(x, w, eps, pert) <= primal + 1e-9).all()


# ---------------------------------------------------------------- against the exact Euclidean projection


def _local_pairs(h: int, wd: int, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Every (source pixel, target pixel, cost) of a k x k local plan on an h x wd image, flat pixel indices."""
    cost = local_cost(k, 2, dtype=torch.float64).numpy()
    valid = valid_offsets(h, wd, k).numpy()
    src, dst, cst = [], [], []
    for o in range(k * k):
        di, dj = o // k - k // 2, o % k - k // 2
        for i in range(h):
            for j in range(wd):
                if valid[o, i, j]:
                    src.append(i * wd + j)
                    dst.append((i + di) * wd + j + dj)
                    cst.append(cost[o])
    return np.array(src), np.array(dst), np.array(cst)


def _exact_projection(x: np.ndarray, w: np.ndarray, eps: float, k: int = 3) -> np.ndarray:
    """min 1/2 |w - z|^2 over local plans P from x (original scale), cost(P) <= eps * m, z = P^T 1 <= 1 (SLSQP)."""
    h, wd = x.shape
    m = x.sum()
    src, dst, cst = _local_pairs(h, wd, k)
    npix, npairs = h * wd, len(src)
    rows = np.zeros((npix, npairs))
    rows[src, np.arange(npairs)] = 1
    cols = np.zeros((npix, npairs))
    cols[dst, np.arange(npairs)] = 1
    xf, wf = x.reshape(-1), w.reshape(-1)
    res = optimize.minimize(
        lambda p: 0.5 * np.sum((wf - cols @ p) ** 2), np.where(src == dst, xf[src], 0.0),
        jac=lambda p: -cols.T @ (wf - cols @ p), method="SLSQP", bounds=[(0, None)] * npairs,
        constraints=[dict(type="eq", fun=lambda p: rows @ p - xf, jac=lambda p: rows),
                     dict(type="ineq", fun=lambda p: eps * m - cst @ p, jac=lambda p: -cst[None]),
                     dict(type="ineq", fun=lambda p: 1.0 - cols @ p, jac=lambda p: -cols)],
        options=dict(maxiter=500, ftol=1e-12))
    p = res.x
    # the reference must itself be feasible
    assert np.abs(rows @ p - xf).max() < 1e-8 and cst @ p <= eps * m + 1e-8 and (cols @ p).max() <= 1 + 1e-8
    return (cols @ p).reshape(h, wd)


def test_projection_approaches_the_exact_euclidean_projection_as_reg_grows():
    rng = np.random.default_rng(0)
    x = rng.uniform(0.1, 1.0, (3, 3))
    w = rng.uniform(0.0, 1.0, (3, 3))
    for eps, regs in ((0.05, (10.0, 100.0, 1000.0)), (0.2, (10.0, 100.0))):
        z_ref = _exact_projection(x, w, eps)
        errors = []
        for reg in regs:
            r = project_wasserstein(torch.tensor(w)[None, None], torch.tensor(x)[None, None], eps, kernel_size=3,
                                    reg=reg, max_iter=4000)
            assert r.converged.all()
            errors.append(float(np.abs(r.z[0, 0].numpy() - z_ref).max()))
            # ours is feasible, so it cannot beat the exact projection
            assert 0.5 * np.sum((r.z[0, 0].numpy() - w) ** 2) >= 0.5 * np.sum((z_ref - w) ** 2) - 1e-9
        assert all(b < a / 3 for a, b in zip(errors, errors[1:])), errors
        assert errors[-1] < (5e-3 if len(regs) == 3 else 2e-2), errors


# ---------------------------------------------------------------- iterations, warm starts, bounds, errors


def test_warm_start_converges_faster_to_the_same_point():
    x, w, g = _images(3, 1, 8, seed=8, low=0.1)
    cold = project_wasserstein(w, x, 0.1, **FAST)
    w2 = w + 0.01 * torch.randn(w.shape, generator=g)
    again = project_wasserstein(w2, x, 0.1, **FAST)
    warm = project_wasserstein(w2, x, 0.1, warm=cold.duals, **FAST)
    assert warm.converged.all()
    assert warm.iterations.sum() < again.iterations.sum()
    assert (warm.z - again.z).abs().max() < 5e-3


def test_hard_iteration_bound_warns_and_stays_feasible():
    x, w, _ = _images(2, 1, 8, seed=9)
    with pytest.warns(ProjectionConvergenceWarning, match="max_iter"):
        r = project_wasserstein(w, x, 0.2, max_iter=3, **FAST)
    assert (r.iterations <= 3).all() and not r.converged.any()
    assert (r.cost <= 0.2 * (1 + 1e-3)).all()
    exact = exact_local_wasserstein(_unit(x, r.mass), _unit(r.z, r.mass))
    assert (exact <= r.cost.double() * (1 + 1e-5) + 1e-7).all()


def test_converged_examples_leave_the_batch():
    """An easy example (w close to x) stops early while the others keep iterating, and nobody's answer depends on
    the rest of the batch."""
    x, w, g = _images(3, 1, 8, seed=11, low=0.1)
    w[0] = x[0] + 0.01 * torch.randn(x[0].shape, generator=g)
    r = project_wasserstein(w, x, 0.1, **FAST)
    assert r.converged.all()
    assert r.iterations[0] < 0.6 * r.iterations[1:].min()
    for i in range(3):
        alone = project_wasserstein(w[i:i + 1], x[i:i + 1], 0.1, **FAST)
        # Batched and single-example kernels round differently (last bits), so a stopping test that lands right at its
        # threshold may stop one iteration apart; the answer itself agrees to well within the projection's tolerance.
        assert abs(alone.iterations.item() - r.iterations[i].item()) <= 1
        torch.testing.assert_close(alone.z[0], r.z[i], rtol=0, atol=1e-4)


@pytest.mark.parametrize("bad", [
    dict(x=-0.1), dict(x=1.5), dict(kernel_size=4), dict(eps=-0.1), dict(w=float("nan")), dict(reg=0.0),
    dict(reg_scale="pixels"), dict(max_iter=0), dict(eps=float("inf")), dict(shape=True), dict(ztol=0.0),
    dict(relax=2.0)])
def test_bad_input_is_a_user_error(bad):
    x, w, _ = _images(1, 1, 6, seed=0)
    kwargs = {}
    if "x" in bad:
        x[0, 0, 0, 0] = bad["x"]
    if "w" in bad:
        w[0, 0, 0, 0] = bad["w"]
    if "shape" in bad:
        w = w[:, :, :5]
    for key in ("kernel_size", "reg", "reg_scale", "max_iter", "ztol", "relax"):
        if key in bad:
            kwargs[key] = bad[key]
    with pytest.raises(UserError):
        project_wasserstein(w, x, bad.get("eps", 0.1), **kwargs)


# ---------------------------------------------------------------- the warm-started Lambert W of the beta step


@pytest.mark.parametrize("dtype, rtol", [(torch.float64, 1e-12), (torch.float32, 2e-6)])
def test_warm_started_log_lambert_w_matches_scipy_from_any_start(dtype, rtol):
    from kit.ot.projection import _log_w

    g = torch.Generator().manual_seed(0)
    L = torch.cat([torch.linspace(-60, 60, 4001, dtype=torch.float64), torch.tensor([-1e4, 300.0, 2e5])]).to(dtype)
    inside = L.double().abs() <= 700  # where e^L is a float64: scipy; beyond, the identity y + e^y = L checks it
    exact = np.log(special.lambertw(np.exp(L.double().clamp(-700, 700).numpy())).real)
    y_ref = torch.where(inside, torch.tensor(exact, dtype=torch.float64), log_lambertw_exp(L.double()))
    assert torch.allclose(y_ref[~inside] + torch.exp(y_ref[~inside]), L.double()[~inside], rtol=1e-15)
    starts = {
        "close": y_ref.to(dtype) + (1e-3 * torch.randn(L.shape, generator=g, dtype=torch.float64)).to(dtype),
        "moved": y_ref.to(dtype) + (0.7 * torch.randn(L.shape, generator=g, dtype=torch.float64)).to(dtype),
        "far above": y_ref.to(dtype) + 40.0,  # Newton crawls down by about 1 per step: the full solver takes over
        "none": torch.where(torch.rand(L.shape, generator=g) < 0.3, float("nan"), y_ref).to(dtype),
    }
    for name, y0 in starts.items():
        y = _log_w(L, y0)
        assert y.dtype == dtype and torch.isfinite(y).all(), name
        np.testing.assert_allclose(torch.exp(y).double().numpy(), torch.exp(y_ref).numpy(), rtol=rtol, err_msg=name)
        # each element depends only on its own values: a slice gives the same bits
        assert torch.equal(_log_w(L[1000:1100], y0[1000:1100]), y[1000:1100]), name


# ---------------------------------------------------------------- the duality-gap certificate (ztol)


def _entropic_projection(x: np.ndarray, w: np.ndarray, eps: float, lam: float, k: int = 3) -> np.ndarray:
    """The exact minimiser of the regularised unit-mass problem of kit.ot.projection, by SLSQP on the plan entries:
    min lam/2 |w^ - z|^2 + sum P log P  s.t.  rows = x^, <P, C> <= eps, z = P^T 1 <= 1/m. Returns z (unit mass)."""
    h, wd = x.shape
    m = x.sum()
    xh, wh = x.reshape(-1) / m, w.reshape(-1) / m
    src, dst, cst = _local_pairs(h, wd, k)
    rows = np.zeros((h * wd, len(src)))
    rows[src, np.arange(len(src))] = 1
    cols = np.zeros((h * wd, len(src)))
    cols[dst, np.arange(len(src))] = 1

    def f(p):
        r = wh - cols @ p
        return 0.5 * lam * r @ r + np.sum(p * np.log(p))

    def jac(p):
        return -lam * cols.T @ (wh - cols @ p) + np.log(p) + 1.0

    p0 = xh[src] / np.bincount(src)[src]
    res = optimize.minimize(f, p0, jac=jac, method="SLSQP", bounds=[(1e-14, None)] * len(src),
                            constraints=[dict(type="eq", fun=lambda p: rows @ p - xh, jac=lambda p: rows),
                                         dict(type="ineq", fun=lambda p: eps - cst @ p, jac=lambda p: -cst[None]),
                                         dict(type="ineq", fun=lambda p: 1.0 / m - cols @ p, jac=lambda p: -cols)],
                            options=dict(maxiter=2000, ftol=1e-15))
    p = res.x
    assert np.abs(rows @ p - xh).max() < 1e-9 and cst @ p <= eps + 1e-9, res.message
    return (cols @ p).reshape(h, wd)


@pytest.mark.slow  # two SLSQP solves of the entropic problem: about 10 s
def test_certified_error_bound_holds_against_an_independent_solver():
    """z_error_bound (from the duality gap) bounds the RMS distance to the exact regularised projection, which SLSQP
    computes independently here; with the defaults every example converges with a bound <= ztol, and a tighter ztol
    gives a tighter bound and a closer output."""
    rng = np.random.default_rng(3)
    cases = [(rng.uniform(0.1, 1.0, (3, 3)), rng.uniform(0.0, 1.0, (3, 3)), 0.05),  # far: the radius binds
             (rng.uniform(0.1, 0.9, (3, 3)), None, 0.02)]  # a small L-inf step
    reg = 20.0
    for x, w, eps in cases:
        if w is None:
            w = x + 0.05 * np.sign(rng.standard_normal(x.shape))
        m = x.sum()
        z_ref = _entropic_projection(x, w, eps, reg * m) * m
        xt, wt = torch.tensor(x)[None, None], torch.tensor(w)[None, None]
        for ztol in (2e-3, 2e-4):
            r = project_wasserstein(wt, xt, eps, kernel_size=3, reg=reg, ztol=ztol, check_inside=False)
            assert r.converged.all()
            bound = r.z_error_bound.item()
            rms = float(np.sqrt(np.mean((r.z[0, 0].numpy() - z_ref) ** 2)))
            assert rms <= bound * (1 + 1e-6) + 1e-7, (eps, ztol, rms, bound)
            assert bound <= max(ztol, 2e-3), (eps, ztol, bound)
        assert rms <= 2e-4 + 1e-7
    # in float32 too (the gap is summed in float64)
    r32 = project_wasserstein(wt.float(), xt.float(), eps, kernel_size=3, reg=reg, check_inside=False)
    rms32 = float(np.sqrt(np.mean((r32.z[0, 0].double().numpy() - z_ref) ** 2)))
    assert r32.converged.all() and rms32 <= r32.z_error_bound.item() * (1 + 1e-3) + 1e-6
