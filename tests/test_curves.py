"""AUAC: the exact form against a hand-computed value, brute-force integration and a fine trapezoid."""

from __future__ import annotations

import math

import numpy as np
import pytest

from evaluators.curves import accuracy_at, auac, auac_bootstrap_ci, auac_trapezoid, curve_record


def test_hand_computed_value():
    # misclassified clean, fooled at 0.1 and 0.2, never fooled: (0 + 0.1 + 0.2 + 0.4) / 4 / 0.4
    eps_star = [0.0, 0.1, 0.2, math.inf]
    assert auac(eps_star, 0.4) == pytest.approx(0.4375)
    assert accuracy_at(eps_star, 0.0) == 0.75  # clean accuracy
    assert accuracy_at(eps_star, 0.1) == 0.5  # an example at eps* = eps is fooled
    assert accuracy_at(eps_star, 0.15) == 0.5
    assert accuracy_at(eps_star, 1.0) == 0.25


def test_a_fully_robust_curve_is_exactly_one():
    """Every radius at eps_max: the area is 1, not 1 + rounding (mean(min(eps*, eps_max)) / eps_max of three radii
    of 0.1 is 1.0000000000000002 in float64, which a report's schema refuses). The same for certified radii."""
    from kit.smoothing import certified_auac

    assert np.minimum(np.full(3, 0.1), 0.1).mean() / 0.1 > 1.0  # the rounding the old formula hit
    for n, r in ((3, 0.1), (7, 0.3), (1000, 0.7), (5, 2.0 / 3.0)):
        assert auac(np.full(n, r), r) == 1.0
        assert auac(np.full(n, math.inf), r) == 1.0
        assert certified_auac(np.full(n, r), np.ones(n, bool), r) == 1.0
        assert 0.0 <= auac(np.linspace(0, 2 * r, n), r) <= 1.0


def test_exact_matches_brute_force_and_fine_trapezoid():
    rng = np.random.default_rng(0)
    eps_star = np.where(rng.random(500) < 0.2, np.inf, rng.exponential(0.1, 500))
    eps_star[:30] = 0.0
    eps_max = 0.3
    exact = auac(eps_star, eps_max)
    # brute force: midpoint rule on 4,000 points of the indicator integral, by direct broadcasting
    e = (np.arange(4000) + 0.5) * eps_max / 4000
    brute = (eps_star[None, :] > e[:, None]).mean()
    assert exact == pytest.approx(brute, abs=1e-3)
    fine = np.linspace(0, eps_max, 20_001)
    assert auac_trapezoid(fine, accuracy_at(eps_star, fine)) == pytest.approx(exact, abs=1e-4)
    coarse = np.linspace(0, eps_max, 5)
    assert abs(auac_trapezoid(coarse, accuracy_at(eps_star, coarse)) - exact) > 1e-4  # the grid form is biased


def test_bootstrap_interval_covers_and_shrinks():
    rng = np.random.default_rng(1)
    small = rng.uniform(0, 0.5, 50)
    big = rng.uniform(0, 0.5, 5000)
    lo_s, hi_s = auac_bootstrap_ci(small, 0.4)
    lo_b, hi_b = auac_bootstrap_ci(big, 0.4)
    assert lo_s <= auac(small, 0.4) <= hi_s and lo_b <= auac(big, 0.4) <= hi_b
    assert (hi_b - lo_b) < (hi_s - lo_s) / 5  # width ~ 1/sqrt(n): 100x the examples, ~10x narrower


def test_curve_record_shapes_and_nulls():
    rec = curve_record([0.0, 0.05, math.inf, 0.5], eps_max=0.3, points=7)
    assert rec["eps_star"] == [0.0, 0.05, None, None]  # beyond eps_max counts as never fooled
    assert len(rec["eps_grid"]) == len(rec["accuracy"]) == 7 and rec["eps_grid"][0] == 0
    assert rec["accuracy"][0] == 0.75 and rec["accuracy"][-1] == 0.5
    assert all(a >= b for a, b in zip(rec["accuracy"], rec["accuracy"][1:]))


def test_bad_input():
    with pytest.raises(ValueError):
        auac([-0.1], 0.3)
    with pytest.raises(ValueError):
        auac([0.1], 0.0)
    with pytest.raises(ValueError):
        auac_trapezoid([0.1, 0.2], [1, 1])
