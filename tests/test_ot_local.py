"""Local transport plans: offsets, marginals and costs against brute-force loops and POT's exact solver."""

from __future__ import annotations

import math

import pytest
import torch

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


def _random_plan(n, c, h, w, k, gen):
    plan = torch.rand(n, c, k * k, h, w, generator=gen, dtype=torch.float64)
    return plan * valid_offsets(h, w, k)


def test_cost_is_the_p_norm_of_the_displacement():
    c2, c1 = local_cost(5, 2), local_cost(5, 1)
    # offset o = 0 is (-2, -2); o = 12 the centre; o = 13 is (0, +1)
    assert c2[12] == 0 and c2[13] == 1 and math.isclose(c2[0].item(), math.sqrt(8), rel_tol=1e-6)
    assert c1[0] == 4 and c1[7] == 1  # o = 7 is (-1, 0)
    for o in range(25):
        di, dj = o // 5 - 2, o % 5 - 2
        assert math.isclose(c1[o].item(), abs(di) + abs(dj))
        assert math.isclose(c2[o].item(), math.hypot(di, dj), rel_tol=1e-6)


@pytest.mark.parametrize("k", [0, 2, 4, -1, 3.0, True])
def test_even_or_bad_kernel_sizes_are_user_errors(k):
    with pytest.raises(UserError, match="odd"):
        local_cost(k)


def test_neighbours_and_target_marginal_match_loops():
    gen = torch.Generator().manual_seed(0)
    n, c, h, w, k = 2, 3, 5, 6, 3
    v = torch.rand(n, c, h, w, generator=gen, dtype=torch.float64)
    nb = neighbours(v, k)
    plan = _random_plan(n, c, h, w, k, gen)
    z = target_marginal(plan)
    z_ref = torch.zeros_like(v)
    for o in range(k * k):
        di, dj = o // k - k // 2, o % k - k // 2
        for i in range(h):
            for j in range(w):
                inside = 0 <= i + di < h and 0 <= j + dj < w
                assert bool(valid_offsets(h, w, k)[o, i, j]) == inside
                expect = v[:, :, i + di, j + dj] if inside else torch.zeros(n, c, dtype=v.dtype)
                torch.testing.assert_close(nb[:, :, o, i, j], expect)
                if inside:
                    z_ref[:, :, i + di, j + dj] += plan[:, :, o, i, j]
    torch.testing.assert_close(z, z_ref)
    # mass is conserved: what leaves equals what arrives
    torch.testing.assert_close(source_marginal(plan).sum((1, 2, 3)), z.sum((1, 2, 3)))


def test_plan_cost_bounds_the_exact_wasserstein_distance():
    gen = torch.Generator().manual_seed(1)
    n, c, h, w, k = 2, 2, 4, 4, 3
    plan = _random_plan(n, c, h, w, k, gen) * 0.1
    # a near-identity plan: most mass stays, some moves
    plan[:, :, (k * k) // 2] += torch.rand(n, c, h, w, generator=gen, dtype=torch.float64)
    x, z = source_marginal(plan), target_marginal(plan)
    cost = local_cost(k, 2, dtype=torch.float64)
    exact = exact_local_wasserstein(x, z, k, 2)
    assert (exact <= plan_cost(plan, cost) + 1e-9).all()
    assert (exact > 0).all()


def test_exact_distance_of_a_one_pixel_shift():
    # all the mass of one pixel moves one step right and one step down: cost sqrt(2) under p = 2, 2 under p = 1
    x = torch.zeros(1, 1, 4, 4, dtype=torch.float64)
    z = torch.zeros_like(x)
    x[0, 0, 1, 1] = 0.5
    z[0, 0, 2, 2] = 0.5
    assert math.isclose(exact_local_wasserstein(x, z, 3, 2).item(), 0.5 * math.sqrt(2), rel_tol=1e-9)
    assert math.isclose(exact_local_wasserstein(x, z, 3, 1).item(), 1.0, rel_tol=1e-9)
    with pytest.raises(UserError, match="masses differ"):
        exact_local_wasserstein(x, z * 2, 3, 2)
