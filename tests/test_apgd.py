"""APGD (Croce & Hein, 2020) against closed forms on linear classifiers, an interior-optimum model that needs the step
halving, and a trained digits model."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from kit.attacks.apgd import APGD, apgd_checkpoints
from kit.attacks.base import lp_norm
from kit.attacks.pgd import PGD
from kit.data import load_dataset
from kit.errors import UserError


class Linear2(nn.Module):
    """Two-class linear model: logits (0, w.x + b). The smallest perturbation flipping class 1 has a closed form."""

    def __init__(self, w: torch.Tensor, b: float):
        super().__init__()
        self.w = nn.Parameter(w.flatten().clone())
        self.b = nn.Parameter(torch.tensor(b))

    def forward(self, x):
        s = x.flatten(1) @ self.w + self.b
        return torch.stack([torch.zeros_like(s), s], 1)


class Linear3(Linear2):
    """Three-class linear model: logits (0, s, s - 10). Class 2 never wins, so the 1-vs-0 boundary is the only one."""

    def forward(self, x):
        s = x.flatten(1) @ self.w + self.b
        return torch.stack([torch.zeros_like(s), s, s - 10], 1)


class Bowl(nn.Module):
    """Two-class model fooled only inside the small L2 ball of radius ``r`` around ``c``: logits
    (r^2 - ||x - c||^2, 0). The loss is maximised at the interior point ``c``, so a fixed step of 2 eps oscillates
    around it; only a shrinking step gets there."""

    def __init__(self, c: torch.Tensor, r: float):
        super().__init__()
        self.register_buffer("c", c.clone())
        self.r = r

    def forward(self, x):
        d2 = (x - self.c).flatten(1).pow(2).sum(1)
        return torch.stack([self.r**2 - d2, torch.zeros_like(d2)], 1)


def _linear_case(cls=Linear2):
    g = torch.Generator().manual_seed(0)
    w = torch.randn(1, 4, 4, generator=g)
    x = 0.4 + 0.2 * torch.rand(6, 1, 4, 4, generator=g)  # interior: the [0, 1] box does not bind
    model = cls(w, 0.0)
    with torch.no_grad():
        model.b.copy_(-(x.flatten(1) @ model.w).min() + 0.05)  # every example has margin > 0: class 1
        margin = x.flatten(1) @ model.w + model.b
    y = torch.ones(6, dtype=torch.long)
    return model, x, y, margin, w.flatten()


def _eps_star(margin, w, norm):
    # the exact smallest flipping perturbation: margin / ||w||_1 (L-inf), margin / ||w||_2 (L2)
    return margin / (w.abs().sum() if norm == "linf" else w.norm())


def test_checkpoints_are_the_papers():
    # p_j = 0, 0.22, 0.41, 0.57, 0.70, 0.80, 0.87, 0.93, 0.99 (Croce & Hein 2020, Sec. 3.2), times N_iter = 100
    assert apgd_checkpoints(100) == [0, 22, 41, 57, 70, 80, 87, 93, 99]
    assert apgd_checkpoints(200) == [0, 44, 82, 114, 140, 160, 174, 186, 198]
    assert apgd_checkpoints(0) == [0]


@pytest.mark.parametrize("norm", ["linf", "l2"])
@pytest.mark.parametrize("loss", ["ce", "dlr"])
def test_apgd_brackets_the_closed_form_minimum(norm, loss):
    model, x, y, margin, w = _linear_case(Linear2 if loss == "ce" else Linear3)
    eps_star = _eps_star(margin, w, norm)
    assert (eps_star < 0.35).all() and (margin < 10).all()  # the box does not bind; class 2 stays out of the way
    for i in range(len(x)):
        xi, yi = x[i : i + 1], y[i : i + 1]
        above = APGD(model, eps=float(eps_star[i]) * 1.02, norm=norm, loss=loss, steps=30)(xi, yi)
        below = APGD(model, eps=float(eps_star[i]) * 0.98, norm=norm, loss=loss, steps=30)(xi, yi)
        assert above.success.item() and not below.success.item()
        assert above.norm.item() <= eps_star[i].item() * 1.02 + 1e-6
        assert model(above.x_adv).argmax(1).item() == 0
        assert torch.equal(below.x_adv, xi)  # nothing found: the clean input comes back
        assert below.forwards.item() == 1 + 30 and below.backwards.item() == 29
        # x_last: the adversarial where one was found, else the best point, which nearly closes the margin:
        # the optimum at 0.98 eps* leaves 2% of it
        assert torch.equal(above.x_last, above.x_adv)
        assert lp_norm(below.x_last - xi, norm).item() <= eps_star[i].item() * 0.98 + 1e-6
        left = model(below.x_last)[0, 1] - model(below.x_last)[0, 0]
        assert 0.02 * margin[i] - 1e-5 <= left <= 0.03 * margin[i]


@pytest.mark.parametrize(("norm", "eps"), [("linf", 0.1), ("l2", 0.3)])
def test_step_halving_reaches_an_interior_optimum(norm, eps):
    g = torch.Generator().manual_seed(1)
    x = 0.4 + 0.2 * torch.rand(6, 1, 4, 4, generator=g)
    u = torch.rand(6, 1, 4, 4, generator=g) * 2 - 1
    offset = 0.5 * eps * (u if norm == "linf" else u / u.flatten(1).norm(dim=1).view(-1, 1, 1, 1))
    y = torch.ones(1, dtype=torch.long)
    for i in range(len(x)):  # one at a time: the model holds one centre
        xi = x[i : i + 1]
        model = Bowl(xi + offset[i : i + 1], r=0.01)  # fooled only in a ball of radius 0.01 well inside the threat ball
        assert model(xi).argmax(1).item() == 1
        res = APGD(model, eps=eps, norm=norm, steps=100)(xi, y)
        assert res.success.item()
        assert (res.x_adv - model.c).norm().item() < 0.01
        assert lp_norm(res.x_adv - xi, norm).item() <= eps + 1e-6
        # the same budget with a fixed step of 2 eps (APGD's initial step, never halved) gets nowhere
        fixed = PGD(model, eps=eps, norm=norm, steps=100, rel_step=2.0)(xi, y)
        assert not fixed.success.item()


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_per_example_epsilon_in_one_batch(norm):
    model, x, y, margin, w = _linear_case()
    eps_star = _eps_star(margin, w, norm)
    factor = torch.tensor([1.02, 0.98] * 3)
    res = APGD(model, norm=norm, steps=30)(x, y, eps=eps_star * factor)
    assert res.success.tolist() == [True, False] * 3
    assert (res.norm <= eps_star * factor + 1e-6).all()


def test_warm_start_is_projected_and_used():
    model, x, y, margin, w = _linear_case()
    eps_star = margin / w.abs().sum()
    corner = x - 0.5 * w.sign().view(1, 1, 4, 4)  # far outside the ball: must be projected to the optimal corner
    res = APGD(model, steps=1)(x, y, eps=eps_star * 1.01, init=corner.clamp(0, 1))
    assert res.success.all()
    assert (res.forwards == 2).all() and (res.backwards == 0).all()  # clean check + the projected start: no gradient


def test_zero_epsilon_is_only_the_clean_check(digits_model):
    _, result = digits_model
    test = load_dataset("digits:16", "test").subset(64)
    clean_wrong = result.model.eval()(test.x).argmax(1) != test.y
    eps = torch.zeros(64)
    eps[::2] = 0.3
    res = APGD(result.model, steps=10)(test.x, test.y, eps=eps)
    zero = eps == 0
    assert torch.equal(res.success[zero], clean_wrong[zero])
    assert torch.equal(res.x_adv[zero], test.x[zero])
    assert (res.forwards[zero] == 1).all() and (res.backwards[zero] == 0).all()


def test_apgd_on_trained_digits_model(digits_model):
    path, result = digits_model
    model = result.model.eval()
    test = load_dataset("digits:16", "test").subset(200)
    x, y = test.x, test.y
    clean = model(x).argmax(1) == y
    for loss in ("ce", "dlr"):
        strong = APGD(model, eps=0.3, loss=loss, steps=100)(x, y)
        assert strong.robust_accuracy < 0.05  # standard training: no robustness at eps 0.3
        # re-verify: inside the ball, inside [0, 1], misclassified
        assert (lp_norm(strong.x_adv - x, "linf") <= 0.3 + 1e-6).all()
        assert strong.x_adv.min() >= 0 and strong.x_adv.max() <= 1
        assert (model(strong.x_adv[strong.success]).argmax(1) != y[strong.success]).all()
        # cost: misclassified-clean examples cost the clean forward only; per attacked example and restart, one
        # forward more than backwards (the last iterate, or the one found adversarial, needs no gradient)
        assert (strong.forwards[~clean] == 1).all() and (strong.backwards[~clean] == 0).all()
        assert torch.equal(strong.forwards[clean], strong.backwards[clean] + 2)
        assert strong.forwards.max() <= 1 + 100
        assert strong.backwards.float().mean() < 10  # fooled points stop costing work: far below the budget of 99
    # at a small radius APGD is at least about as strong as PGD with the same number of forward passes
    pgd = PGD(model, eps=0.05, steps=20)(x, y)
    apgd = APGD(model, eps=0.05, steps=20)(x, y)
    assert apgd.robust_accuracy <= pgd.robust_accuracy + 0.02
    assert apgd.robust_accuracy > 0.3  # and eps 0.05 is not a free win: the check above has teeth
    assert apgd.forwards.max() <= 1 + 20 and apgd.backwards.max() <= 19
    assert (model(apgd.x_adv[apgd.success]).argmax(1) != y[apgd.success]).all()
    assert (lp_norm(apgd.x_adv - x, "linf") <= 0.05 + 1e-6).all()


def test_apgd_is_deterministic_and_restores_mode(digits_model):
    _, result = digits_model
    model = result.model.train()
    test = load_dataset("digits:16", "test").subset(64)
    a = APGD(model, eps=0.5, norm="l2", steps=10, seed=7)(test.x, test.y)
    b = APGD(model, eps=0.5, norm="l2", steps=10, seed=7)(test.x, test.y)
    assert model.training
    assert torch.equal(a.x_adv, b.x_adv) and torch.equal(a.success, b.success)
    assert torch.equal(a.forwards, b.forwards) and torch.equal(a.backwards, b.backwards)
    r = repr(APGD(model, eps=0.1, loss="dlr", steps=50, restarts=3, rho=0.5))
    for part in ("APGD(", "eps=0.1", "norm='linf'", "loss='dlr'", "steps=50", "restarts=3", "rho=0.5"):
        assert part in r


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"loss": "hinge"}, "loss"),
        ({"steps": 0}, "steps"),
        ({"restarts": 0}, "restarts"),
        ({"rho": 0.0}, "rho"),
        ({"rho": 1.0}, "rho"),
        ({"rho": 1.5}, "rho"),
        ({"norm": "l1"}, "norm"),
        ({"eps": -0.1}, "epsilon"),
    ],
)
def test_bad_parameters_are_user_errors(kwargs, match):
    with pytest.raises(UserError, match=match):
        APGD(Linear2(torch.ones(16), 0.0), **kwargs)


def test_dlr_needs_three_classes():
    model, x, y, _, _ = _linear_case()
    with pytest.raises(UserError, match="3 classes"):
        APGD(model, eps=0.1, loss="dlr")(x, y)
