"""Frank-Wolfe Wasserstein attack: its oracles against scipy's LP solver, its outputs against POT's exact distance,
and its strength on the digits model."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn as nn
from scipy import sparse
from scipy.optimize import linprog

import models
from kit.attacks.frank_wolfe import (
    FrankWolfeWasserstein,
    capacity_lmo,
    identity_plan,
    return_excess,
    wasserstein_lmo,
)
from kit.data import load_dataset
from kit.errors import UserError
from kit.ot.local import (
    exact_local_wasserstein,
    local_cost,
    neighbours,
    plan_cost,
    source_marginal,
    target_marginal,
    valid_offsets,
)


def _lp(score, src, cost, eps, k, cap=None):
    """The oracle's LP with scipy (HiGHS): max <score, S> over local plans with S1 = src, <S, C> <= eps and, given a
    cap, target marginal <= cap. One example, one channel; returns the optimal value."""
    _, _, kk, h, w = score.shape
    vm = valid_offsets(h, w, k).numpy().reshape(kk, -1)
    var = np.argwhere(vm)  # (offset, source pixel) of every variable
    nv = len(var)
    a_eq = sparse.csr_matrix((np.ones(nv), (var[:, 1], np.arange(nv))), shape=(h * w, nv))
    rows = [sparse.csr_matrix(cost.double().numpy()[var[:, 0]][None])]
    bounds = [eps]
    if cap is not None:
        di, dj = var[:, 0] // k - k // 2, var[:, 0] % k - k // 2
        tgt = (var[:, 1] // w + di) * w + var[:, 1] % w + dj
        rows.append(sparse.csr_matrix((np.ones(nv), (tgt, np.arange(nv))), shape=(h * w, nv)))
        bounds += [cap] * (h * w)
    res = linprog(-score.double().numpy().reshape(kk, -1)[vm], A_ub=sparse.vstack(rows), b_ub=bounds, A_eq=a_eq,
                  b_eq=src.double().numpy().reshape(-1), bounds=(0, None), method="highs")
    assert res.status == 0
    return -res.fun


def _random_case(seed, h, w, k, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    x = (1.3 * torch.rand(1, 1, h, w, generator=g, dtype=dtype) - 0.3).clamp(0, 1)
    x[0, 0, 0, 0] = 1.0  # a saturated pixel: the cap binds
    mass = x.sum()
    grad = torch.randn(1, 1, h, w, generator=g, dtype=dtype)
    return x / mass, 1 / mass, neighbours(grad / grad.abs().max(), k)


def _check_feasible(plan, src, cost, eps, k, cap=None, tol=1e-9):
    h, w = src.shape[-2:]
    assert torch.isfinite(plan).all() and (plan >= 0).all()
    assert (plan[:, :, ~valid_offsets(h, w, k)] == 0).all()
    assert torch.allclose(source_marginal(plan), src, atol=tol, rtol=0)
    assert (plan_cost(plan, cost) <= eps * (1 + tol) + tol).all()
    if cap is not None:
        assert (target_marginal(plan) <= cap * (1 + tol) + tol).all()


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_plain_oracle_against_the_lp(seed):
    k = 3
    src, _, score = _random_case(seed, 3, 3, k)
    cost = local_cost(k, 2).double()
    for eps in (0.05, 0.3):
        lp = _lp(score, src, cost, eps, k)
        e = torch.tensor([eps], dtype=torch.float64)
        exact = wasserstein_lmo(score, src, cost, e, 0.0)
        _check_feasible(exact.plan, src, cost, e, k)
        assert math.isclose((exact.plan * score).sum().item(), lp, abs_tol=1e-9)  # gamma = 0: the LP itself
        gaps = []
        for gamma in (1e-1, 1e-2, 1e-3):
            res = wasserstein_lmo(score, src, cost, e, gamma)
            assert res.converged.all()
            _check_feasible(res.plan, src, cost, e, k)
            gap = lp - (res.plan * score).sum().item()
            # entropy costs at most gamma log(k*k) per unit of mass; the bisection's own bound is tol * eps * R
            assert -1e-9 <= gap <= gamma * math.log(k * k) + 1e-4 * eps * 2
            gaps.append(gap)
        assert gaps[0] >= gaps[1] - 1e-9 >= gaps[2] - 2e-9 and gaps[2] < 1e-3


def test_plain_oracle_slack_budget_and_float32_extremes():
    k = 3
    src, _, score = _random_case(3, 3, 3, k)
    cost = local_cost(k, 2).double()
    res = wasserstein_lmo(score, src, cost, torch.tensor([100.0], dtype=torch.float64), 0.0)
    assert res.psi.item() == 0  # the budget does not bind: every pixel takes its best offset
    best = score.masked_fill(~valid_offsets(3, 3, k), -math.inf).amax(2)
    assert math.isclose((res.plan * score).sum().item(), (best * src).sum().item(), rel_tol=1e-12)
    for gamma in (1e-5, 1e-3):  # regularisation 1 / gamma up to 1e5 in float32: finite and feasible
        r32 = wasserstein_lmo(score.float(), src.float(), cost.float(), torch.tensor([0.1]), gamma)
        _check_feasible(r32.plan.double(), src, cost, torch.tensor([0.1], dtype=torch.float64), k, tol=1e-6)
        c32 = capacity_lmo(score.float(), src.float(), torch.tensor(1.0 / 3), cost.float(), torch.tensor([0.1]),
                           gamma, max_iter=20)
        _check_feasible(c32.plan.double(), src, cost, torch.tensor([0.1], dtype=torch.float64), k, cap=1.0 / 3,
                        tol=1e-6)


@pytest.mark.parametrize("seed", [0, 4])
def test_capacity_oracle_against_the_capped_lp(seed):
    k = 3
    src, cap, score = _random_case(seed, 4, 4, k)
    cost = local_cost(k, 2).double()
    eps = torch.tensor([0.3], dtype=torch.float64)
    lp_capped = _lp(score, src, cost, 0.3, k, cap=float(cap))
    lp_free = _lp(score, src, cost, 0.3, k)
    stay = (identity_plan(src, k) * score).sum().item()
    assert lp_capped < lp_free - 1e-3  # the cap binds in this case
    res = capacity_lmo(score, src, cap, cost, eps, 3e-2, max_iter=250, tol=1e-6)
    _check_feasible(res.plan, src, cost, eps, k, cap=float(cap))
    value = (res.plan * score).sum().item()
    assert value <= lp_capped + 1e-9  # no feasible plan beats the LP
    assert lp_capped - value < 0.02 * (lp_capped - stay)  # and the oracle gets close to it (entropy included)
    # the uncapped oracle's plan overflows the cap that the capacity-aware one respects
    free = wasserstein_lmo(score, src, cost, eps, 1e-2)
    assert target_marginal(free.plan).max() > cap * 1.01
    # a few warm-started sweeps are still feasible (the final repair is exact)
    quick = capacity_lmo(score, src, cap, cost, eps, 1e-3, psi=res.psi, beta=res.beta, max_iter=2)
    _check_feasible(quick.plan, src, cost, eps, k, cap=float(cap))


def test_return_excess_keeps_the_source_and_lowers_the_cost():
    k, h, w = 5, 6, 6
    g = torch.Generator().manual_seed(0)
    src = torch.rand(3, 2, h, w, generator=g, dtype=torch.float64)
    cap = src.amax((1, 2, 3), keepdim=True) * 1.05  # m <= u everywhere
    shares = torch.rand(3, 2, k * k, h, w, generator=g, dtype=torch.float64) ** 4 * valid_offsets(h, w, k)
    plan = src.unsqueeze(2) * shares / shares.sum(2, keepdim=True)
    cost = local_cost(k).double()
    assert (target_marginal(plan) > cap).any()
    for rounds in (50, 0):  # 0: straight to the exact fallback (a mix with the identity plan)
        fixed, _, fallback = return_excess(plan, src, cap, max_rounds=rounds)
        assert (target_marginal(fixed) <= cap * (1 + 1e-6)).all()
        assert torch.allclose(source_marginal(fixed), src, atol=1e-12)
        assert (fixed[:, :, ~valid_offsets(h, w, k)] == 0).all() and (fixed >= 0).all()
        assert (plan_cost(fixed, cost) <= plan_cost(plan, cost) + 1e-12).all()
        if rounds == 0:
            assert fallback.all()


def _tiny_model(channels, size, seed=0):
    torch.manual_seed(seed)
    return models.create("cnn-small", num_classes=10, input_shape=(channels, size, size)).eval()


class _Linear2(nn.Module):
    """Two classes, logits (0, <w, x> + b): a model that moving mass along the weights' gradient flips quickly."""

    def __init__(self, w: torch.Tensor, b: float):
        super().__init__()
        self.w = nn.Parameter(w.clone())
        self.b = nn.Parameter(torch.tensor(b))

    def forward(self, x):
        s = (x * self.w).flatten(1).sum(1) + self.b
        return torch.stack([torch.zeros_like(s), s], 1)


@pytest.mark.parametrize("oracle", ["capacity", "plain"])
def test_outputs_are_images_of_the_same_mass_within_the_true_radius(oracle):
    n, c, s = 6, 2, 8
    g = torch.Generator().manual_seed(1)
    x = (1.4 * torch.rand(n, c, s, s, generator=g) - 0.4).clamp(0, 1)
    x[:, :, 2:4, 2:5] = 1.0  # saturated pixels: the bound 1 matters
    w = torch.randn(c, s, s, generator=g)
    scores = (x * w).flatten(1).sum(1)
    model = _Linear2(w, float(-scores.min()) + 0.5).eval()
    y = torch.ones(n, dtype=torch.long)  # every example starts in class 1, with a margin >= 0.5
    eps = torch.tensor([0.02, 0.05, 0.1, 0.2, 0.4, 0.8])
    res = FrankWolfeWasserstein(model, steps=5, oracle=oracle, early_stop=False)(x, y, eps=eps)
    assert res.success.sum() >= 3
    for img in (res.x_adv, res.x_last):
        assert img.min() >= 0 and img.max() <= 1
        assert torch.allclose(img.sum((2, 3)), x.sum((2, 3)), rtol=1e-5, atol=0)  # per channel
    # the reported radius is the cost of a plan: it bounds the exact distance (unit-mass scale) and stays in the ball
    exact = (exact_local_wasserstein(x, res.x_adv, 5) / x.sum((1, 2, 3)).double()).float()
    assert (res.norm >= exact * (1 - 1e-4) - 1e-6).all()
    assert (res.norm <= eps * (1 + 1e-3)).all()
    assert (res.norm[~res.success] == 0).all() and torch.equal(res.x_adv[~res.success], x[~res.success])
    assert (model(res.x_adv[res.success]).argmax(1) != y[res.success]).all()


@pytest.fixture(scope="module")
def digits(digits_model):
    from kit.checkpoint import load_twin

    model = load_twin(digits_model[0])
    model = model[0] if isinstance(model, tuple) else model
    test = load_dataset("digits:16", "test").subset(48)
    return model.eval(), test.x, test.y


def test_attack_fools_the_digits_model_deterministically(digits):
    model, x, y = digits
    eps = 0.2  # unit-mass scale: a fifth of the ink moved by one pixel (digits:16 images hold ~78 units of ink)
    attack = FrankWolfeWasserstein(model, eps=eps, steps=20)
    res = attack(x, y)
    clean = model(x).argmax(1) == y
    assert res.robust_accuracy <= 0.05
    assert (model(res.x_adv[res.success]).argmax(1) != y[res.success]).all()
    assert (res.norm <= eps * (1 + 1e-3)).all() and (res.norm[res.success & clean] > 0).all()
    assert res.x_adv.min() >= 0 and res.x_adv.max() <= 1
    assert torch.allclose(res.x_adv.sum((1, 2, 3)), x.sum((1, 2, 3)), rtol=1e-5)
    # bookkeeping: misclassified clean costs one forward and no backward; nothing exceeds the budget
    assert (res.forwards[~clean] == 1).all() and (res.backwards[~clean] == 0).all()
    assert res.forwards.max() <= 1 + 20 and res.backwards.max() <= 20
    again = attack(x, y)
    assert torch.equal(again.x_adv, res.x_adv) and torch.equal(again.norm, res.norm)


def test_attack_is_stronger_than_quick_baselines(digits):
    model, x, y = digits
    x, y = x[:16], y[:16]
    eps = 0.1  # where the digits model still resists a weak attack
    full = FrankWolfeWasserstein(model, eps=eps, steps=8)(x, y)
    one_step = FrankWolfeWasserstein(model, eps=eps, steps=1)(x, y)
    plain = FrankWolfeWasserstein(model, eps=eps, steps=8, oracle="plain")(x, y)
    # the 8-step run passes through the 1-step run's iterate (deterministic), so it fools a superset
    assert (full.success | ~one_step.success).all()
    # the oracle that ignores the pixel bound wastes its budget on mass that return_excess sends back
    assert full.success.sum() > plain.success.sum()


@pytest.mark.slow
def test_at_least_as_strong_as_projected_sinkhorn_pgd(digits):
    """The paper's claim, against the kit's projected-Sinkhorn attack when it exists (Wong et al. 2019); slow because
    of that attack's projections."""
    wasserstein = pytest.importorskip("kit.attacks.wasserstein")
    model, x, y = digits
    x, y = x[:8], y[:8]
    fw = FrankWolfeWasserstein(model, eps=0.1, steps=8)(x, y)
    pgd = wasserstein.WassersteinPGD(model, eps=0.1, steps=5)(x, y)
    assert fw.success.sum() >= pgd.success.sum()


def test_random_start_is_seeded(digits):
    model, x, y = digits
    x, y = x[:4], y[:4]

    def run(seed):
        attack = FrankWolfeWasserstein(model, eps=0.05, steps=1, random_start=True, seed=seed, early_stop=False,
                                       lmo_max_iter=2)
        return attack(x, y).x_last

    a, b, c = run(1), run(1), run(2)
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_unconverged_multiplier_search_warns():
    k = 3
    src, _, score = _random_case(0, 3, 3, k)
    cost = local_cost(k, 2).double()
    with pytest.warns(RuntimeWarning, match="max_iter=3"):
        res = wasserstein_lmo(score, src, cost, torch.tensor([0.1], dtype=torch.float64), 1e-3, max_iter=3)
    _check_feasible(res.plan, src, cost, torch.tensor([0.1], dtype=torch.float64), k)  # still feasible
    model = _tiny_model(1, 8)
    x = torch.rand(2, 1, 8, 8)
    with pytest.warns(RuntimeWarning, match="lmo_max_iter=3"):
        FrankWolfeWasserstein(model, eps=0.5, steps=1, oracle="plain", lmo_max_iter=3)(x, model(x).argmax(1))


def test_zero_radius_returns_the_input():
    model = _tiny_model(1, 8)
    x = torch.rand(4, 1, 8, 8)
    y = torch.tensor([0, 1, 2, 3])
    res = FrankWolfeWasserstein(model, eps=0.0)(x, y)
    assert torch.equal(res.x_adv, x) and (res.norm == 0).all() and (res.backwards == 0).all()
    assert torch.equal(res.success, model(x).argmax(1) != y)


class _SqrtModel(nn.Module):
    """Finite logits whose gradient is infinite at black pixels."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.ones(1))

    def forward(self, x):
        s = (x.flatten(1).sqrt() * self.w).sum(1)
        return torch.stack([s, -s], 1)


def test_bad_input_is_a_user_error():
    model = _tiny_model(1, 8)
    x, y = torch.rand(2, 1, 8, 8), torch.tensor([0, 1])
    with pytest.raises(UserError):
        FrankWolfeWasserstein(model, eps=-0.1)
    with pytest.raises(UserError):
        FrankWolfeWasserstein(model, eps=0.1)(x, y, eps=torch.tensor([0.1, -0.1]))
    with pytest.raises(UserError, match="odd"):
        FrankWolfeWasserstein(model, eps=0.1, kernel_size=4)
    with pytest.raises(UserError, match=r"\[0, 1\]"):
        FrankWolfeWasserstein(model, eps=0.1)(x + 0.5, y)
    with pytest.raises(UserError, match=r"\[0, 1\]"):
        FrankWolfeWasserstein(model, eps=0.1)(x - 0.5, y)  # negative mass
    for bad in ({"gamma": -1.0}, {"oracle": "lp"}, {"loss": "hinge"}, {"steps": 0}, {"oracle": "capacity", "gamma": 0},
                {"norm": "linf"}, {"p": 0.5}):
        with pytest.raises(UserError):
            FrankWolfeWasserstein(model, eps=0.1, **bad)
    xs = torch.rand(2, 1, 8, 8)
    xs[:, :, 0, 0] = 0.0
    with pytest.raises(UserError, match="non-finite"):
        FrankWolfeWasserstein(_SqrtModel(), eps=0.1, steps=2)(xs, torch.tensor([0, 0]))


def test_minimum_epsilon_search_takes_the_plan_cost_as_the_radius(digits_model):
    from kit.attacks import min_eps_search
    from kit.checkpoint import load_twin

    model = load_twin(digits_model[0])[0]
    data = load_dataset("digits:16", "test").subset(8)
    res = min_eps_search(FrankWolfeWasserstein(model, steps=5), data.x, data.y, 0.3, rungs=2, tol=0.05)
    fooled = torch.isfinite(res.eps_star)
    assert fooled.float().mean() > 0.9 and (res.eps_star[fooled] <= 0.3 * (1 + 1e-3)).all()
    with torch.no_grad():
        assert (model(res.x_adv[fooled]).argmax(1) != data.y[fooled]).all()
    # the recorded radius bounds the exact distance of the adversarial kept (unit-mass scale; 2 examples: the LP is big)
    idx = fooled.nonzero().squeeze(1)[:2]
    mass = data.x[idx].sum((1, 2, 3)).view(-1, 1, 1, 1)
    exact = exact_local_wasserstein(data.x[idx] / mass, res.x_adv[idx] / mass, 5, 2)
    assert (exact <= res.eps_star[idx].cpu() + 1e-4).all()
