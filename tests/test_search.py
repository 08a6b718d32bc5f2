"""Minimum-epsilon search against the closed form of a linear model, and against fixed-epsilon PGD on digits."""

from __future__ import annotations

import math

import pytest
import torch

from evaluators.curves import accuracy_at
from kit.attacks import PGD
from kit.attacks.search import SearchResult, min_eps_search
from kit.data import load_dataset
from kit.errors import UserError
from tests.test_pgd import _linear_case


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_search_finds_the_exact_minimum_within_tolerance(norm):
    model, x, y, margin, w = _linear_case()
    exact = (margin / (w.abs().sum() if norm == "linf" else w.norm())).double()
    eps_max, tol = 0.4, 0.4 / 256
    res = min_eps_search(PGD(model, norm=norm, steps=20), x, y, eps_max=eps_max, tol=tol)
    assert (res.eps_star >= exact - 1e-6).all()  # never below the true minimum: every eps* is a real adversarial
    assert (res.eps_star <= exact + tol + 1e-6).all()  # and within the bisection tolerance of it


def test_clean_errors_are_zero_and_unbroken_are_inf():
    model, x, y, margin, w = _linear_case()
    y = y.clone()
    y[0] = 0  # misclassified clean
    exact = margin / w.abs().sum()
    eps_max = float(exact[1:].min()) * 0.9  # below every other example's minimum
    res = min_eps_search(PGD(model, steps=20), x, y, eps_max=eps_max)
    assert res.eps_star[0] == 0 and torch.equal(res.x_adv[0], x[0])
    assert torch.isinf(res.eps_star[1:]).all() and torch.equal(res.x_adv[1:], x[1:])


def test_combine_takes_the_per_example_minimum():
    a = SearchResult(torch.tensor([0.1, math.inf, 0.3], dtype=torch.float64), torch.zeros(3, 1, 2, 2),
                     torch.ones(3, dtype=torch.long), torch.ones(3, dtype=torch.long))
    b = SearchResult(torch.tensor([0.2, 0.25, 0.05], dtype=torch.float64), torch.ones(3, 1, 2, 2),
                     torch.ones(3, dtype=torch.long), torch.zeros(3, dtype=torch.long))
    c = SearchResult.combine([a, b])
    assert c.eps_star.tolist() == [0.1, 0.25, 0.05]
    assert c.x_adv[:, 0, 0, 0].tolist() == [0.0, 1.0, 1.0]
    assert c.forwards.tolist() == [2, 2, 2] and c.backwards.tolist() == [1, 1, 1]


def test_search_agrees_with_fixed_eps_pgd_and_costs_less(digits_model):
    model = digits_model[1].model
    test = load_dataset("digits:16", "test").subset(150)
    res = min_eps_search(PGD(model, steps=10), test.x, test.y, eps_max=0.3)
    naive_backward = 0
    for eps in (0.05, 0.1, 0.15):
        fixed = PGD(model, eps=eps, steps=20)(test.x, test.y)
        naive_backward += fixed.backwards.sum().item()
        # the search is at least about as strong as fixed PGD-20 at each radius
        assert accuracy_at(res.eps_star, eps) <= fixed.robust_accuracy + 0.02
        # and every example it calls fooled at eps really is fooled by a verified adversarial of norm <= eps
    ok = torch.isfinite(res.eps_star) & (res.eps_star > 0)
    assert (model(res.x_adv[ok]).argmax(1) != test.y[ok]).all()
    assert ((res.x_adv[ok] - test.x[ok]).flatten(1).abs().amax(1).double() <= res.eps_star[ok] + 1e-6).all()
    assert res.backwards.sum().item() < 16 / 3 * naive_backward  # far cheaper than 16 fixed radii


def test_bad_arguments():
    model, x, y, _, _ = _linear_case()
    for kwargs in ({"eps_max": -1.0}, {"eps_max": math.inf}, {"eps_max": 0.3, "rungs": 0}, {"eps_max": 0.3, "tol": 0}):
        with pytest.raises(UserError):
            min_eps_search(PGD(model), x, y, **kwargs)
