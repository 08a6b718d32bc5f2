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


def _perturbed(model: torch.nn.Module, scale: float, seed: int) -> torch.nn.Module:
    """A copy of ``model`` with every weight moved by relative Gaussian noise: an engine that differs a little."""
    import copy

    other = copy.deepcopy(model)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in other.parameters():
            p.add_(scale * p.abs().mean() * torch.randn(p.shape, generator=gen))
    return other.eval()


@pytest.mark.parametrize("name", ["pgd-linf", "pgd-l2", "apgd-ce"])
def test_judged_search_equals_one_search_per_judge(digits_model, name):
    """Each side of the one search sees what a search judged by that side alone finds (PGD and APGD paths depend
    only on start and radius; the sides agree on the clean examples), for less than the two searches (an engine this different shares little of the
    bisection; one that agrees shares everything: the next test)."""
    from kit.attacks.registry import get_attack
    from kit.attacks.search import judged_search

    model = digits_model[1].model.eval()
    other = _perturbed(model, 0.3, seed=1)
    test = load_dataset("digits:16", "test").subset(64)
    with torch.no_grad():  # the examples both sides classify alike clean (random starts are drawn for the others)
        same = (model(test.x).argmax(1) != test.y) == (other(test.x).argmax(1) != test.y)
    x, y = test.x[same], test.y[same]

    def engine(xs, ys):
        with torch.no_grad():
            return other(xs).argmax(1) != ys

    spec = get_attack(name)
    eps_max = 0.3 if spec.norm.value == "linf" else 3.0
    both = judged_search(spec.build(model, seed=3), x, y, eps_max, {"twin": None, "engine": engine}, rungs=4)
    alone_t = min_eps_search(spec.build(model, seed=3), x, y, eps_max, rungs=4)
    attack_e = spec.build(model, seed=3)
    attack_e.judge = engine
    alone_e = min_eps_search(attack_e, x, y, eps_max, rungs=4)
    assert torch.equal(both["twin"].eps_star, alone_t.eps_star)
    assert torch.equal(both["engine"].eps_star, alone_e.eps_star)
    assert torch.equal(both["twin"].x_adv, alone_t.x_adv) and torch.equal(both["engine"].x_adv, alone_e.x_adv)
    assert 0 < (both["twin"].eps_star != both["engine"].eps_star).sum()  # the sides really differ somewhere
    one = both["twin"].backwards.sum().item()
    two = (alone_t.backwards + alone_e.backwards).sum().item()
    assert max(alone_t.backwards.sum().item(), alone_e.backwards.sum().item()) <= one < two, (one, two)


def test_judged_search_with_the_same_judge_twice_costs_one_search(digits_model):
    from kit.attacks.search import judged_search

    model = digits_model[1].model.eval()
    test = load_dataset("digits:16", "test").subset(64)
    both = judged_search(PGD(model, steps=10), test.x, test.y, 0.3, {"a": None, "b": None}, rungs=4)
    alone = min_eps_search(PGD(model, steps=10), test.x, test.y, 0.3, rungs=4)
    for side in ("a", "b"):
        assert torch.equal(both[side].eps_star, alone.eps_star)
    assert torch.equal(both["a"].forwards, alone.forwards) and torch.equal(both["a"].backwards, alone.backwards)


@pytest.mark.parametrize("name", ["pgd-linf", "apgd-ce", "square-linf", "wasserstein-pgd"])
def test_the_search_checks_clean_once(digits_model, name):
    """One clean check (a forward without gradient on the clean inputs) per example per search, not one per attack
    run (about 20 runs per example)."""
    from kit.attacks.registry import get_attack

    model = digits_model[1].model.eval()
    test = load_dataset("digits:16", "test").subset(32)
    x, y = test.x, test.y

    class Counting(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.inner, self.clean_rows = model, 0

        def forward(self, xs):
            if not xs.requires_grad:  # a check; a gradient step from the clean point itself is work, not a check
                self.clean_rows += int((xs[:, None] == x[None]).flatten(2).all(2).any(1).sum())
            return self.inner(xs)

    counting = Counting().eval()
    eps_max = 0.02 if name == "wasserstein-pgd" else 0.3
    res = min_eps_search(get_attack(name).build(counting, seed=0, **({"queries": 20} if "square" in name else {})),
                         x, y, eps_max, rungs=4)
    assert torch.isfinite(res.eps_star).any()  # the search did run attacks
    assert counting.clean_rows == len(x)


def test_pgd_drops_an_iterate_that_no_longer_moves():
    """A zero gradient leaves the iterate where it is: the attack stops spending passes on it, and returns what all
    its steps would have returned."""

    class Blind(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.b = torch.nn.Parameter(torch.tensor([1.0, 0.0]))

        def forward(self, x):
            return self.b + 0 * x.flatten(1).sum(1, keepdim=True)

    x = torch.rand(4, 1, 3, 3, generator=torch.Generator().manual_seed(0))
    y = torch.zeros(4, dtype=torch.long)
    early = PGD(Blind(), eps=0.1, steps=10, random_start=False)(x, y)
    full = PGD(Blind(), eps=0.1, steps=10, random_start=False, early_stop=False)(x, y)
    assert not early.success.any() and torch.equal(early.x_last, full.x_last)
    assert early.forwards.tolist() == [2] * 4 and early.backwards.tolist() == [1] * 4
    assert full.forwards.tolist() == [12] * 4


def test_known_radii_stop_the_search_where_it_can_no_longer_beat_them(digits_model):
    """An example leaves the search once it resisted at a radius at least as large as the one already known to fool
    it: below ``known`` every eps* is what the full search finds (PGD's path for an example does not depend on the
    others once its first rung's random start is drawn), above it only a prefix of that search's work was done."""
    model = digits_model[1].model.eval()
    test = load_dataset("digits:16", "test").subset(96)
    full = min_eps_search(PGD(model, steps=10, seed=5), test.x, test.y, 0.3, rungs=4)
    gen = torch.Generator().manual_seed(0)
    finite = torch.where(torch.isfinite(full.eps_star), full.eps_star, torch.full_like(full.eps_star, 0.3))
    known = finite * (0.5 + torch.rand(len(finite), generator=gen, dtype=torch.float64))  # below and above eps*
    known[::7] = math.inf  # nothing known: the whole search
    part = min_eps_search(PGD(model, steps=10, seed=5), test.x, test.y, 0.3, rungs=4, known=known)
    below = full.eps_star < known
    assert 0 < below.sum() < len(below)
    assert torch.equal(part.eps_star[below], full.eps_star[below])
    assert torch.equal(part.x_adv[below], full.x_adv[below])
    assert (part.eps_star[~below] >= full.eps_star[~below]).all()  # a prefix of the same search: never smaller
    assert (part.backwards <= full.backwards).all() and part.backwards.sum() < full.backwards.sum()
