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

import kit.attacks.frank_wolfe as fw
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


# --- the target-side capacity oracle (issue 20) against the oracle it replaced -------------------------------------


def reference_capacity_lmo(score, source, capacity, cost, eps, gamma=3e-2, *, valid=None, psi=None, beta=None,
                            max_iter=10, tol=1e-2):
    """``capacity_lmo`` as it was before the target-side fast path (commit 3f028c6), verbatim but for the docstring:
    the plan (N, C, k*k, H, W) computed in every sweep. The reference of the tests below and of bench/frank_wolfe.py's
    'before' figures."""
    n, c, kk, h, w = score.shape
    k = int(round(math.sqrt(kk)))
    if not (gamma > 0 and math.isfinite(gamma)):
        raise UserError(f"the capacity-aware oracle needs a finite entropic temperature gamma > 0, got {gamma!r}")
    if valid is None:
        valid = valid_offsets(h, w, k, device=score.device)
    dev, dt = score.device, score.dtype
    cvec = cost.to(device=dev, dtype=dt)
    cg = (cvec / gamma).view(1, 1, kk, 1, 1)
    cap = capacity.expand(n, c, h, w).to(dt)
    invalid = ~valid.view(1, 1, kk, h, w)
    scaled = score.masked_fill(invalid, float("-inf")) / gamma
    floor = torch.full((1, 1, kk, h, w), fw._LOG_FLOOR, device=dev, dtype=dt).masked_fill(invalid, float("-inf"))
    m = source.unsqueeze(2)
    mult = torch.zeros(n, device=dev, dtype=dt) if psi is None else psi.to(dt).clone()
    prices = torch.zeros(n, c, h, w, device=dev, dtype=dt) if beta is None else beta.to(dt).clone()
    log_cap = torch.log(cap)
    max_drop = 60.0 * gamma / float(cvec.max().clamp_min(1.0))
    tiny = torch.finfo(dt).tiny
    converged = torch.zeros(n, dtype=torch.bool, device=dev)

    def rows() -> torch.Tensor:
        z = scaled - neighbours(prices / gamma, k) - mult.view(-1, 1, 1, 1, 1) * cg
        z = torch.maximum(z - z.amax(2, keepdim=True), floor)
        return m * torch.softmax(z, dim=2)

    iters = 0
    for iters in range(1, max_iter + 1):  # noqa: B007
        plan = rows()
        delta = fw._cost_step(plan.sum((1, 3, 4)), cvec, eps, mult, gamma, max_drop)
        mult = mult + delta
        plan = plan * torch.exp(-delta.view(-1, 1, 1, 1, 1) * cg)
        z = target_marginal(plan)
        prices = (prices + gamma * (torch.log(z.clamp_min(tiny)) - log_cap)).clamp_min(0)
        excess = ((z - cap) / cap).flatten(1).amax(1)
        row_err = (plan.sum(2) - source).abs().flatten(1).sum(1)
        converged = (excess <= tol) & (row_err <= tol)
        if converged.all():
            break
    plan = rows()
    plan, _, _ = return_excess(plan, source, cap)
    spent = plan_cost(plan, cvec)
    lam = torch.where(spent > eps, eps / spent.clamp_min(tiny), torch.ones_like(spent)).view(-1, 1, 1, 1, 1)
    plan = lam * plan + (1 - lam) * identity_plan(source, k)
    return fw.CapacityOracleResult(plan, mult, prices, iters, converged)


def _reference_oracle(score, source, capacity, cost, *args, **kwargs):
    """The reference behind the attack's call, which now passes the target-side score (N, C, H, W)."""
    if score.dim() == 4:
        score = neighbours(score, int(round(math.sqrt(cost.numel()))))
    return reference_capacity_lmo(score, source, capacity, cost, *args, **kwargs)


def _saturated_batch(n, c, s, seed, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    x = (1.3 * torch.rand(n, c, s, s, generator=g, dtype=dtype) - 0.3).clamp(0, 1)
    x[:, :, 2:4, 2:5] = 1.0  # saturated pixels: the capacity binds
    grad = torch.randn(n, c, s, s, generator=g, dtype=dtype)
    mass = x.sum((1, 2, 3)).view(-1, 1, 1, 1)
    return x / mass, 1 / mass, grad / grad.flatten(1).abs().amax(1).view(-1, 1, 1, 1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_window_sums_are_the_plans_sums(dtype):
    g = torch.Generator().manual_seed(0)
    k, n, c, h, w = 5, 3, 2, 7, 6
    img = torch.rand(n, c, h, w, generator=g, dtype=dtype)
    other = torch.rand(n, c, h, w, generator=g, dtype=dtype)
    kern = torch.rand(n, k * k, generator=g, dtype=dtype)
    plan = neighbours(img, k) * kern.view(n, 1, k * k, 1, 1)  # plan[o, i] = kern[o] img[i + d(o)]
    tol = {"rtol": 1e-5, "atol": 1e-6} if dtype == torch.float32 else {"rtol": 1e-12, "atol": 1e-12}
    torch.testing.assert_close(fw._window_sum(img, kern, k), plan.sum(2), **tol)
    spread = other.unsqueeze(2) * kern.view(n, 1, k * k, 1, 1) * valid_offsets(h, w, k)  # plan[o, i] = kern[o] b[i]
    torch.testing.assert_close(fw._window_spread(other, kern, k), target_marginal(spread), **tol)
    torch.testing.assert_close(fw._window_corr(other, img, k), (other.unsqueeze(2) * neighbours(img, k)).sum((1, 3, 4)),
                               **tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize(("gamma", "path"), [(3e-2, "float32"), (1e-2, "float64"), (1e-3, "plan")])
def test_target_score_oracle_matches_the_reference(dtype, gamma, path, monkeypatch):
    """Same plans and duals as the reference on the plan-shaped score, warm-started over calls, on each path: float32
    sums (the attack's default gamma), float64 sums (a spread of score / gamma beyond float32's) and the materialised
    plan (beyond float64's: bit for bit the reference)."""
    used = []
    window_corr = fw._window_corr
    monkeypatch.setattr(fw, "_window_corr", lambda a, b, k: (used.append(a.dtype), window_corr(a, b, k))[1])
    src, cap, t = _saturated_batch(4, 2, 10, seed=3, dtype=dtype)
    cost = local_cost(5).to(dtype)
    eps = torch.tensor([0.02, 0.1, 0.3, 1.0], dtype=dtype)
    ref_duals, new_duals = {}, {}
    for _ in range(3):
        ref = reference_capacity_lmo(neighbours(t, 5), src, cap, cost, eps, gamma, max_iter=15, **ref_duals)
        new = capacity_lmo(t, src, cap, cost, eps, gamma, max_iter=15, **new_duals)
        _check_feasible(new.plan.double(), src.double(), cost.double(), eps.double(), 5, cap=cap.double(),
                        tol=1e-5 if dtype == torch.float32 else 1e-12)
        if path == "plan":
            assert torch.equal(new.plan, ref.plan) and torch.equal(new.psi, ref.psi) and torch.equal(new.beta, ref.beta)
        else:
            rel = 3e-5 if dtype == torch.float32 else 1e-11
            scale = float(ref.plan.abs().max())
            assert float((new.plan - ref.plan).abs().max()) <= rel * scale
            torch.testing.assert_close(new.psi, ref.psi, rtol=rel, atol=rel * float(ref.psi.abs().max()))
            torch.testing.assert_close(new.beta, ref.beta, rtol=rel, atol=rel * gamma)
        assert new.iterations == ref.iterations and torch.equal(new.converged, ref.converged)
        ref_duals, new_duals = {"psi": ref.psi, "beta": ref.beta}, {"psi": new.psi, "beta": new.beta}
        t = t.roll(1, 3)  # the next step's gradient
    if path == "plan":
        assert not used
    else:  # (the float64 case may do some sweeps in float32, where the prices leave the spread small enough)
        assert (torch.float32 if path == "float32" and dtype == torch.float32 else torch.float64) in used
    with pytest.raises(UserError, match="shape"):
        capacity_lmo(t[:, :1], src, cap, cost, eps)


def test_factored_return_excess_is_return_excess():
    k = 5
    src, cap, t = _saturated_batch(3, 2, 9, seed=5, dtype=torch.float64)
    cap = cap.expand_as(src)
    g = torch.Generator().manual_seed(1)
    e = torch.exp(t / 0.05)
    f = torch.rand(3, k * k, generator=g, dtype=torch.float64)
    f[:, k * k // 2] = 1
    q = src / fw._window_sum(e, f, k)
    plan = neighbours(e, k) * f.view(3, 1, k * k, 1, 1) * q.unsqueeze(2)
    assert (target_marginal(plan) > cap * 1.01).any()  # over-full pixels to repair
    for rounds in (50, 1, 0):
        ref, _, _ = return_excess(plan, src, cap, max_rounds=rounds)
        new = fw._factored_return_excess(e, f, q, src, cap, k, torch.float64, max_rounds=rounds)
        torch.testing.assert_close(new, ref, rtol=1e-10, atol=1e-14)


def _with_oracle(monkeypatch, oracle):
    monkeypatch.setattr(fw, "capacity_lmo", oracle)


def test_attack_iterates_match_the_reference_oracle_in_float64(monkeypatch, one_thread):
    """The whole attack, in float64 (where rounding cannot be amplified into a different iterate), with the new
    oracle and with the reference: the same iterates, radii and successes."""
    model = _tiny_model(2, 10).double()
    g = torch.Generator().manual_seed(2)
    x = (1.3 * torch.rand(6, 2, 10, 10, generator=g, dtype=torch.float64) - 0.3).clamp(0, 1)
    x[:, :, 3:5, 3:6] = 1.0
    with torch.no_grad():
        y = model(x).argmax(1)
    new_lmo = fw.capacity_lmo
    for kw in ({"early_stop": False}, {"early_stop": False, "random_start": True, "seed": 3}, {}):
        attack = FrankWolfeWasserstein(model, eps=0.3, steps=6, **kw)
        new = attack(x, y)
        _with_oracle(monkeypatch, _reference_oracle)
        ref = attack(x, y)
        _with_oracle(monkeypatch, new_lmo)
        torch.testing.assert_close(new.x_last, ref.x_last, rtol=0, atol=1e-10)
        torch.testing.assert_close(new.x_adv, ref.x_adv, rtol=0, atol=1e-10)
        torch.testing.assert_close(new.norm, ref.norm, rtol=1e-10, atol=1e-14)
        assert torch.equal(new.success, ref.success) and torch.equal(new.backwards, ref.backwards)


def test_attack_success_and_eps_star_unchanged_on_the_digits_model(digits, monkeypatch, one_thread):
    """float32 on the digits model: the same successes and radii at fixed radii, the same eps* of the minimum-epsilon
    search, as with the reference oracle. (The search's tolerance is no fraction of its rung width 0.1: a fooled
    example spends its whole budget, so with tol 0.05 the refinement test ``hi - lo > tol`` compares 0.15 - 0.1 with
    0.05, and a rounding of the last bit, either way, decides whether it refines.)"""
    from kit.attacks import min_eps_search

    model, x, y = digits
    x, y = x[:16], y[:16]
    new_lmo = fw.capacity_lmo
    runs = {}
    for name, oracle in (("new", new_lmo), ("ref", _reference_oracle)):
        _with_oracle(monkeypatch, oracle)
        runs[name] = ([FrankWolfeWasserstein(model, eps=0.1, steps=8)(x, y)],
                      min_eps_search(FrankWolfeWasserstein(model, steps=8), x[:8], y[:8], 0.3, rungs=3, tol=0.03))
    _with_oracle(monkeypatch, new_lmo)
    for new, ref in zip(runs["new"][0], runs["ref"][0], strict=True):
        assert torch.equal(new.success, ref.success) and new.success.any()
        torch.testing.assert_close(new.norm, ref.norm, rtol=1e-4, atol=1e-7)
        torch.testing.assert_close(new.x_adv, ref.x_adv, rtol=0, atol=1e-4)
    new_s, ref_s = runs["new"][1].eps_star, runs["ref"][1].eps_star
    assert torch.equal(torch.isfinite(new_s), torch.isfinite(ref_s)) and torch.isfinite(new_s).any()
    torch.testing.assert_close(new_s, ref_s, rtol=1e-4, atol=1e-7)
