"""The unbalanced (KL-relaxed) Sinkhorn projection and attack (seed 004) against POT, scipy and brute force."""

from __future__ import annotations

import math
import warnings

import numpy as np
import ot
import pytest
import torch
from scipy.optimize import brentq, minimize
from scipy.special import xlogy

from kit.attacks.unbalanced import SEED_PARAMS, UnbalancedSinkhornAttack
from kit.checkpoint import load_twin
from kit.data import load_dataset
from kit.errors import UserError
from kit.ot.local import exact_local_wasserstein, plan_cost, source_marginal, target_marginal
from kit.ot.unbalanced import (
    PixelCost,
    UnbalancedConvergenceWarning,
    _waterfill,
    unbalanced_projection,
    unbalanced_sinkhorn,
)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """These small problems run fastest on one thread; two threads thrash on a loaded 2-core machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _pot_plan(a, b, cost, eta, tau, **kw):
    """POT's unbalanced Sinkhorn with the seed's parameters: reg = eta, reg_m = tau, entropy reference 1 1^T."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # POT warns that reg_type="entropy" overwrites c
        return ot.unbalanced.sinkhorn_knopp_unbalanced(
            a, b, cost, reg=eta, reg_m=tau, reg_type="entropy", **{"numItermax": 5_000, "stopThr": 1e-14, **kw}
        )


def _local_to_dense(plan, k):
    """(N, C, k*k, H, W) local plan -> (N, C, HW, HW) with [i, j] the mass from flat pixel i to flat pixel j."""
    n, c, _, h, w = plan.shape
    dense = plan.new_zeros(n, c, h * w, h * w)
    for o in range(k * k):
        di, dj = o // k - k // 2, o % k - k // 2
        for i in range(h):
            for j in range(w):
                if 0 <= i + di < h and 0 <= j + dj < w:
                    dense[:, :, i * w + j, (i + di) * w + (j + dj)] = plan[:, :, o, i, j]
    return dense


def _windowed_cost(h, w, k, p=2):
    """Global cost with the moves outside the k x k window priced out (POT then gives them zero mass)."""
    full = PixelCost(h, w, None, p, dtype=torch.float64).cost
    ii = torch.arange(h * w) // w
    jj = torch.arange(h * w) % w
    outside = ((ii[:, None] - ii[None]).abs() > k // 2) | ((jj[:, None] - jj[None]).abs() > k // 2)
    return torch.where(outside, torch.full_like(full, 1e9), full).numpy()


def _digits(res, n, start=0):
    ds = load_dataset(f"digits:{res}", "test")
    return ds.x[start : start + n].clone(), ds.y[start : start + n].clone()


# ------------------------------------------------------------------------------------------------ plan vs POT


@pytest.mark.parametrize("eta, tau", [(0.5, 2.0), (0.1, 0.05), (1.0, 5.0)])
def test_global_plan_matches_pot(eta, tau):
    g = torch.Generator().manual_seed(0)
    a = torch.rand(2, 2, 4, 4, generator=g, dtype=torch.float64)
    b = torch.rand(2, 2, 4, 4, generator=g, dtype=torch.float64) + 0.05
    a[0, 0, 1, 2] = 0.0  # an empty row
    res = unbalanced_sinkhorn(a, b, eta=eta, tau=tau, kernel_size=None, max_iter=20_000, tol=1e-14)
    assert res.converged.all()
    plan = res.plan()
    cost = res.geometry.cost.numpy()
    for i in range(2):
        for c in range(2):
            ref = _pot_plan(a[i, c].flatten().numpy(), b[i, c].flatten().numpy(), cost, eta, tau)
            np.testing.assert_allclose(plan[i, c].numpy(), ref, rtol=1e-6, atol=1e-9 * ref.max())
            # reg_m as the pair (tau, tau) is the same problem
            ref2 = _pot_plan(a[i, c].flatten().numpy(), b[i, c].flatten().numpy(), cost, eta, (tau, tau))
            np.testing.assert_allclose(ref, ref2, rtol=1e-12)
    # the plan is not balanced: its marginals differ from a and b (else the test would not see the relaxation)
    assert (plan.sum(-1).reshape(2, 2, 4, 4) - a).abs().max() > 1e-3


def test_plan_matches_pot_iterate_by_iterate():
    """Same start (u = v = 1) and order (alpha, then beta with the new alpha) as POT: equal after 3 iterations."""
    g = torch.Generator().manual_seed(1)
    a = torch.rand(1, 1, 3, 4, generator=g, dtype=torch.float64)
    b = torch.rand(1, 1, 3, 4, generator=g, dtype=torch.float64)
    res = unbalanced_sinkhorn(a, b, eta=0.3, tau=0.7, kernel_size=None, max_iter=3, tol=0.0, warn=False)
    assert res.n_iter.item() == 3
    ref = _pot_plan(a.flatten().numpy(), b.flatten().numpy(), res.geometry.cost.numpy(), 0.3, 0.7,
                    numItermax=3, stopThr=0.0)
    np.testing.assert_allclose(res.plan()[0, 0].numpy(), ref, rtol=1e-12, atol=1e-15)


def test_local_plan_matches_pot_with_window():
    g = torch.Generator().manual_seed(2)
    a = torch.rand(1, 1, 5, 5, generator=g, dtype=torch.float64)
    b = torch.rand(1, 1, 5, 5, generator=g, dtype=torch.float64)
    res = unbalanced_sinkhorn(a, b, eta=0.2, tau=1.0, kernel_size=3, max_iter=20_000, tol=1e-14)
    dense = _local_to_dense(res.plan(), 3)[0, 0].numpy()
    ref = _pot_plan(a.flatten().numpy(), b.flatten().numpy(), _windowed_cost(5, 5, 3), 0.2, 1.0)
    np.testing.assert_allclose(dense, ref, rtol=1e-6, atol=1e-12)
    # the local plan's transport cost is <B, C>
    torch.testing.assert_close(res.transport_cost(), plan_cost(res.plan(), res.geometry.cost))


# ----------------------------------------------------------------------------------------------- the projection


def _small_problem(h=3, w=3, seed=3):
    g = torch.Generator().manual_seed(seed)
    x = 0.1 + 0.8 * torch.rand(1, 1, h, w, generator=g, dtype=torch.float64)
    x[0, 0, 0, 0] = 0.0  # a black pixel
    wt = (x + 0.3 * torch.randn(1, 1, h, w, generator=g, dtype=torch.float64)).clamp(0, 1)
    wt[0, 0, 1, 1] = 1.0  # pushes z to the cap
    return x, wt


def test_projection_fixed_point_is_pots_plan_and_eq15():
    x, w = _small_problem()
    eta, tau, gamma = 0.5, 1.0, 2.0
    res = unbalanced_projection(x, w, math.inf, gamma=gamma, eta=eta, tau=tau, kernel_size=None, max_iter=20_000,
                                tol=1e-14)
    assert res.converged.all() and not res.eps_stopped.any()
    z = res.z
    # Eq. 15, box constrained, holds at the fixed point; the cap binds somewhere
    torch.testing.assert_close(z, (w + tau / gamma * torch.exp(-res.beta / tau)).clamp(max=1.0), rtol=1e-9, atol=1e-12)
    assert (z >= 1 - 1e-12).any()
    # the plan is POT's unbalanced plan between x and the final z
    ref = _pot_plan(x.flatten().numpy(), z.flatten().numpy(), res.geometry.cost.numpy(), eta, tau)
    np.testing.assert_allclose(res.raw_plan()[0, 0].numpy(), ref, rtol=1e-6, atol=1e-12)


def test_projection_minimises_the_documented_objective():
    r"""The fixed point minimises gamma/2 ||z - w - tau/gamma||^2 + UOT(x, z) over 0 <= z <= 1: scipy's L-BFGS-B on
    POT's unbalanced plan (UOT value from the plan, gradient tau (1 - (P^T 1) / z) by the envelope theorem)."""
    x, w = _small_problem()
    eta, tau, gamma = 0.5, 1.0, 2.0
    cost = PixelCost(3, 3, None, 2, dtype=torch.float64).cost.numpy()
    xs, ws = x.flatten().numpy(), w.flatten().numpy()

    def kl(p, q):
        return float(np.sum(xlogy(p, p) - xlogy(p, q) - p + q))

    def objective(z):
        plan = _pot_plan(xs, z, cost, eta, tau)
        uot = (np.sum(plan * cost) + eta * np.sum(xlogy(plan, plan) - plan)
               + tau * kl(plan.sum(1), xs) + tau * kl(plan.sum(0), z))
        value = 0.5 * gamma * np.sum((z - ws - tau / gamma) ** 2) + uot
        grad = gamma * (z - ws - tau / gamma) + tau * (1 - plan.sum(0) / z)
        return value, grad

    opt = minimize(objective, np.full(9, 0.5), jac=True, method="L-BFGS-B", bounds=[(1e-9, 1.0)] * 9,
                   options={"ftol": 1e-15, "gtol": 1e-11, "maxiter": 2000})
    res = unbalanced_projection(x, w, math.inf, gamma=gamma, eta=eta, tau=tau, kernel_size=None, max_iter=20_000,
                                tol=1e-14)
    np.testing.assert_allclose(res.z.flatten().numpy(), opt.x, atol=2e-5)


def test_eps_check_holds_and_the_output_is_the_plans_marginal():
    x, _ = _digits(8, 6)
    g = torch.Generator().manual_seed(4)
    w = (x + 0.2 * torch.randn(x.shape, generator=g).sign()).clamp(0, 1)
    eps = torch.tensor([0.01, 0.05, 0.1, 0.3, 1.0, 0.0])
    res = unbalanced_projection(x, w, eps, gamma=1000.0, eta=0.1, tau=10.0, max_iter=500)
    assert torch.isfinite(res.x_proj).all()
    assert (res.cost <= eps * (1 + 1e-3)).all()
    assert (res.shrink < 1).any() and res.eps_stopped.any()  # the ball binds for the small radii
    assert res.cost[2:5].min() > 0.009  # and something moved
    assert (res.x_proj >= 0).all() and (res.x_proj <= 1).all()
    torch.testing.assert_close(res.x_proj.sum((1, 2, 3)), x.sum((1, 2, 3)), rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(res.x_proj[5], x[5])  # eps = 0: the identity plan
    # the plan behind it: cost, target marginal (the output), source marginal (mass_change)
    plan = res.normalized_plan()
    m = x.sum((1, 2, 3)).view(-1, 1, 1, 1)
    torch.testing.assert_close(plan_cost(plan, res.geometry.cost), res.cost, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(target_marginal(plan), res.x_proj / m, rtol=1e-4, atol=1e-6)
    mc = (source_marginal(plan) - x / m).abs().sum((1, 2, 3))
    torch.testing.assert_close(mc, res.mass_change, rtol=1e-3, atol=1e-6)


def test_the_box_binds_without_losing_mass():
    """Bright top half, w darkens the bottom: the plan loses mass there, and plain division (the seed's
    normalisation) would push the bright pixels above 1; the capped normalisation keeps them at 1 with the mass."""
    x = torch.full((1, 1, 6, 6), 0.3, dtype=torch.float64)
    x[..., :3, :] = 1.0
    w = x.clone()
    w[..., 3:, :] = 0.0
    res = unbalanced_projection(x, w, math.inf, gamma=100.0, eta=0.1, tau=1.0, max_iter=5000)
    b = target_marginal(res.raw_plan())  # the plan's target marginal before normalisation
    torch.testing.assert_close(b, (res.beta / res.eta + res.geometry.soft_min(res.alpha, res.eta)).exp())
    assert (b * x.sum() / b.sum()).max() > 1.1  # what plain division would give
    assert res.x_proj.max() <= 1.0 and (res.x_proj >= 1 - 1e-12).sum() >= 9
    torch.testing.assert_close(res.x_proj.sum(), x.sum(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(target_marginal(res.normalized_plan()), res.x_proj / x.sum(), rtol=1e-9, atol=1e-12)


def test_waterfill_against_bisection():
    g = torch.Generator().manual_seed(5)
    b = torch.rand(3, 2, 40, generator=g, dtype=torch.float64) ** 4
    b[0, 0, :30] = 0.0
    target = torch.tensor([[5.0, 12.0], [1.0, 25.0], [0.0, 39.0]], dtype=torch.float64)
    sigma, feasible = _waterfill(b, 1.0, target)
    assert feasible.all()
    for i in range(3):
        for c in range(2):
            bb, mm = b[i, c].numpy(), float(target[i, c])
            out = (sigma[i, c] * b[i, c]).numpy()
            assert out.max() <= 1 + 1e-12 and abs(out.sum() - mm) < 1e-9
            if mm > 0:
                s = brentq(lambda s, bb=bb, mm=mm: np.minimum(s * bb, 1.0).sum() - mm, 0, 1e12, xtol=1e-14, rtol=1e-14)
                np.testing.assert_allclose(out, np.minimum(s * bb, 1.0), atol=1e-9)
    # 10 positive entries cannot hold a mass of 11 under the cap 1
    assert not _waterfill(b[:1, :1], 1.0, torch.tensor([[11.0]], dtype=torch.float64))[1].all()


def test_global_and_local_variants_agree_when_the_window_covers_the_image():
    x, w = _small_problem(4, 4, seed=6)
    kw = dict(gamma=2.0, eta=0.3, tau=1.0, max_iter=20_000, tol=1e-13)
    glob = unbalanced_projection(x, w, 0.4, kernel_size=None, **kw)
    loc = unbalanced_projection(x, w, 0.4, kernel_size=7, **kw)  # 7 >= 2 * 4 - 1
    assert glob.n_iter.item() == loc.n_iter.item()
    torch.testing.assert_close(_local_to_dense(loc.raw_plan(), 7), glob.raw_plan(), rtol=1e-9, atol=1e-14)
    torch.testing.assert_close(loc.x_proj, glob.x_proj, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(loc.cost, glob.cost, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(_local_to_dense(loc.normalized_plan(), 7), glob.normalized_plan(), rtol=1e-9,
                               atol=1e-14)


def test_balanced_bound_holds_and_the_plan_cost_alone_does_not():
    """The exact balanced distance (POT's emd2, global cost) between input and output, both at unit mass: under
    ``balanced_bound`` always; above the plan cost with the seed's parameters (the plan is diagonal: mass is
    re-weighted, not moved)."""
    x, _ = _digits(8, 4)
    g = torch.Generator().manual_seed(7)
    w = (x + 0.2 * torch.randn(x.shape, generator=g).sign()).clamp(0, 1)
    m = x.sum((1, 2, 3)).view(-1, 1, 1, 1)
    for params in ({"gamma": 1000.0, "eta": 0.1, "tau": 10.0}, {"gamma": 0.5, "eta": 1e-3, "tau": 1e-2}):
        res = unbalanced_projection(x.double(), w.double(), 0.3, max_iter=2000, **params)
        exact = exact_local_wasserstein(x.double() / m, res.x_proj / m, kernel_size=15)  # 15 >= 2*8-1: global
        assert (exact <= res.balanced_bound + 1e-9).all()
        assert (exact > 1e-3).all()
        if params["eta"] == 1e-3:
            assert (res.cost < 1e-6).all() and (res.mass_change > 1e-3).all()  # cost ~0, the image still changed


@pytest.mark.parametrize("eta, tau, gamma", [(1e5, 1e5, 1e5), (1e-3, 1e5, 1e-3), (1e5, 1e-3, 1e5), (1e-3, 1e-3, 1e5)])
def test_no_nan_or_inf_in_float32_for_extreme_regularisation(eta, tau, gamma):
    x, _ = _digits(8, 3)
    w = (x + 0.3).clamp(0, 1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UnbalancedConvergenceWarning)
        res = unbalanced_projection(x, w, 0.5, gamma=gamma, eta=eta, tau=tau, max_iter=200)
        plain = unbalanced_sinkhorn(x, w, eta=eta, tau=tau, max_iter=200)
    for t in (res.x_proj, res.cost, res.mass_change, res.balanced_bound, res.shrink, res.normalized_plan(),
              plain.plan()):
        assert torch.isfinite(t).all()
    assert (res.x_proj >= 0).all() and (res.x_proj <= 1).all() and (res.cost <= 0.5 * (1 + 1e-3)).all()
    torch.testing.assert_close(res.x_proj.sum((1, 2, 3)), x.sum((1, 2, 3)), rtol=1e-5, atol=1e-4)
    if eta == 1e5:  # well conditioned: float32 agrees with POT in float64
        i = 0
        ref = _pot_plan(x[i].double().flatten().numpy(), w[i].double().flatten().numpy(),
                        _windowed_cost(8, 8, 5), eta, tau)
        dense = _local_to_dense(plain.plan().double(), 5)[i, 0].numpy()
        np.testing.assert_allclose(dense, ref, rtol=1e-4, atol=1e-7 * ref.max())


def test_non_convergence_warns_naming_max_iter():
    x, _ = _digits(8, 2)
    with pytest.warns(UnbalancedConvergenceWarning, match="max_iter"):
        res = unbalanced_projection(x, (x + 0.2).clamp(0, 1), math.inf, max_iter=2)
    assert (res.n_iter == 2).all() and not res.converged.any()
    with pytest.warns(UnbalancedConvergenceWarning, match="max_iter"):
        unbalanced_sinkhorn(x, x + 0.1, max_iter=1)


# ------------------------------------------------------------------------------------------------------ the attack


def test_attack_fools_the_digits_model_with_honest_radii(digits_model):
    model, _ = load_twin(digits_model[0])
    x, y = _digits(16, 24)
    with torch.no_grad():
        ok = model(x).argmax(1) == y
    x, y = x[ok][:12], y[ok][:12]
    eps = 0.5
    res = UnbalancedSinkhornAttack(model, eps=eps)(x, y)
    again = UnbalancedSinkhornAttack(model, eps=eps)(x, y)
    assert torch.equal(res.x_adv, again.x_adv) and torch.equal(res.norm, again.norm)  # deterministic
    assert res.robust_accuracy <= 1 / 12
    with torch.no_grad():
        assert (model(res.x_adv).argmax(1)[res.success] != y[res.success]).all()
    assert (res.x_adv >= 0).all() and (res.x_adv <= 1).all()
    assert (res.norm <= eps * (1 + 1e-3)).all()
    torch.testing.assert_close(res.x_adv.sum((1, 2, 3)), x.sum((1, 2, 3)), rtol=1e-5, atol=1e-4)
    # cost accounting: the clean pass, then one forward per step and one backward per step before the fooling one
    s = res.success
    assert (res.forwards[s] == res.backwards[s] + 2).all() and (res.backwards[s] >= 1).all()
    # honest distance to a balanced transport of the input: exact W1 (global cost) under balanced_bound
    m = x.sum((1, 2, 3)).view(-1, 1, 1, 1)
    sub = slice(0, 3)
    exact = exact_local_wasserstein(x[sub] / m[sub], res.x_adv[sub] / m[sub], kernel_size=31)
    assert (exact <= res.balanced_bound[sub].double() * (1 + 1e-4) + 1e-6).all()
    assert (res.mass_change[s] > 0).all()


def test_attack_per_example_eps_seed_and_warm_start(digits_model):
    model, _ = load_twin(digits_model[0])
    x, y = _digits(16, 4, start=30)
    eps = torch.tensor([0.0, 0.05, 0.5, 0.5])
    atk = UnbalancedSinkhornAttack(model, steps=2, random_start=True, seed=1, early_stop=False, max_iter=60)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        r1, r2 = atk(x, y, eps=eps), atk(x, y, eps=eps)
    # max_iter=60 is short for these parameters: one warning per call, naming the knob
    assert [w.category for w in caught] == [UnbalancedConvergenceWarning] * 2
    assert all("max_iter=60" in str(w.message) for w in caught)
    assert torch.equal(r1.x_last, r2.x_last)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UnbalancedConvergenceWarning)
        r3 = UnbalancedSinkhornAttack(model, steps=2, random_start=True, seed=2, early_stop=False, max_iter=60)(
            x, y, eps=eps)
        warm = UnbalancedSinkhornAttack(model, steps=1, max_iter=60)(x, y, eps=eps, init=r1.x_last)
    assert not torch.equal(r1.x_last, r3.x_last)
    assert torch.equal(r1.x_last[0], x[0]) and r1.forwards[0] == 1  # eps = 0: untouched, one clean pass
    assert (r1.norm <= eps * (1 + 1e-3)).all()
    assert (warm.norm <= eps * (1 + 1e-3)).all() and (warm.x_adv <= 1).all()


def test_seed_parameters_are_recorded():
    assert SEED_PARAMS == {"gamma": 0.5, "eta": 1e-3, "tau": 1e-2, "step_size": 0.02}
    atk = UnbalancedSinkhornAttack(torch.nn.Linear(1, 1), **SEED_PARAMS)
    assert atk.norm.value == "wasserstein" and "eta=0.001" in repr(atk)


class _NaNModel(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(64, 3)

    def forward(self, x):
        return self.lin(x.flatten(1)) * torch.sqrt(x.flatten(1).sum(1, keepdim=True) - 1e6)  # NaN logits/gradients


def test_bad_input_is_a_user_error():
    x, _ = _digits(8, 2)
    with pytest.raises(UserError, match="negative"):
        unbalanced_sinkhorn(x - 0.5, x)
    with pytest.raises(UserError, match=r"\[0, 1\]"):
        unbalanced_projection(x * 2 + 0.1, x, 0.1)
    with pytest.raises(UserError, match="odd"):
        unbalanced_projection(x, x, 0.1, kernel_size=4)
    with pytest.raises(UserError, match="eps"):
        unbalanced_projection(x, x, -0.1)
    with pytest.raises(UserError, match="non-finite|NaN"):
        unbalanced_projection(x, x * float("nan"), 0.1)
    with pytest.raises(UserError, match="gamma"):
        unbalanced_projection(x, x, 0.1, gamma=0.0)
    with pytest.raises(UserError, match="eta"):
        unbalanced_sinkhorn(x, x, eta=float("inf"))
    with pytest.raises(UserError, match="max_iter"):
        unbalanced_projection(x, x, 0.1, max_iter=0)
    with pytest.raises(UserError, match="init"):
        unbalanced_projection(x, x, 0.1, init=(x, x, x))
    model = _NaNModel()
    with pytest.raises(UserError, match="norm"):
        UnbalancedSinkhornAttack(model, norm="linf")
    with pytest.raises(UserError, match="odd"):
        UnbalancedSinkhornAttack(model, kernel_size=2)
    with pytest.raises(UserError, match="epsilon"):
        UnbalancedSinkhornAttack(model, eps=-1.0)
    with pytest.raises(UserError, match=r"\[0, 1\]"):
        UnbalancedSinkhornAttack(model)(x + 1.0, torch.zeros(2, dtype=torch.long))
    with pytest.raises(UserError, match="gradients"):
        UnbalancedSinkhornAttack(model)(x, torch.zeros(2, dtype=torch.long))
