"""Projected Sinkhorn on sparse images (issue 20): many exact zeros and saturated pixels, as real digits have.

Feasibility against POT's exact OT (``ot.emd2`` with the kit's local ground cost), the projection itself against
independent exact solves of the projection problem on tiny instances (SLSQP, as in ``tests/test_projection.py``),
Anderson acceleration against the plain iteration, the box repair, and real MNIST digits where the data is present.
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from kit.errors import UserError
from kit.ot.local import (
    exact_local_wasserstein,
    local_cost,
    plan_cost,
    source_marginal,
    target_marginal,
    valid_offsets,
)
from kit.ot.projection import ProjectionConvergenceWarning, _cap_columns, _Geometry, project_wasserstein
from tests.test_projection import _entropic_projection, _exact_projection

pytest.importorskip("scipy.optimize")
ot = pytest.importorskip("ot")

FAST = {"reg": 100.0}
MNIST = Path(__file__).resolve().parents[2] / "shared" / "data" / "mnist-10k"
pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py: small ops, steadier




def _sparse(n: int, c: int, h: int, seed: int, empty: float = 0.6, saturated: float = 0.15) -> tuple[torch.Tensor,
                                                                                                      torch.Generator]:
    """Images with about ``empty`` exact zeros and ``saturated`` pixels exactly at 1, the rest uniform, on 8-bit
    levels (like real digits: an empty background, saturated strokes)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.round(torch.rand(n, c, h, h, generator=g) * 255) / 255
    u = torch.rand(n, c, h, h, generator=g)
    x = torch.where(u < empty, torch.zeros_like(x), torch.where(u > 1 - saturated, torch.ones_like(x), x))
    x[:, :, 0, 0] = 1.0  # never an empty image
    return x, g


def _unit(t: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    return t.double() / m.double().view(-1, 1, 1, 1)


def _emd2(x: torch.Tensor, z: torch.Tensor) -> float:
    """POT's exact OT cost (``ot.emd2``) between one-channel images of equal mass, unit mass, with the kit's local
    ground cost (Euclidean pixel distance, 5 x 5 window: moves further out priced out), built here independently of
    :func:`kit.ot.local.exact_local_wasserstein`."""
    h, w = x.shape[-2:]
    ii, jj = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
    pos = np.stack([ii.ravel(), jj.ravel()], 1).astype(np.float64)
    d = np.abs(pos[:, None] - pos[None])
    cost = np.sqrt((d ** 2).sum(-1))
    cost[(d > 2).any(-1)] = 1e6
    a, b = x.double().reshape(-1).numpy(), z.double().reshape(-1).numpy()
    return float(ot.emd2(a / a.sum(), b / b.sum(), cost, numItermax=1_000_000))


# ---------------------------------------------------------------- feasibility, exactly


@pytest.mark.parametrize("channels", [1, 3])
def test_sparse_images_project_into_the_ball_with_exact_costs(channels):
    """On images with 60 % exact zeros and saturated pixels, for near and far targets: the output keeps every channel's
    mass, stays in [0, 1], is the target marginal of a plan from x that moves no mass out of empty pixels, and its
    exact distance (POT) is within the reported cost, itself within the radius."""
    x, g = _sparse(4, channels, 10, seed=20 + channels)
    step = x + 0.1 * torch.sign(torch.randn(x.shape, generator=g))  # a PGD step, outside [0, 1] on both sides
    far = torch.roll(x, 1, 0)  # another sparse image
    shifted = torch.roll(x, 1, -1)  # the same strokes one pixel over
    xx = torch.cat([x, x, x])
    target = torch.cat([step, far, shifted])
    eps = torch.tensor([0.05, 0.1, 0.2, 0.1] * 3)
    r = project_wasserstein(target, xx, eps, return_plan=True)
    assert r.converged.all()
    m = r.mass
    assert torch.isfinite(r.z).all() and r.z.min() >= 0 and r.z.max() <= 1
    torch.testing.assert_close(r.z.sum((2, 3)), xx.sum((2, 3)), rtol=1e-5, atol=0)
    assert (r.plan >= 0).all()
    assert (r.plan[:, :, ~valid_offsets(10, 10, 5)] == 0).all()
    assert (r.plan.sum(2)[xx == 0] == 0).all()  # empty pixels send nothing
    torch.testing.assert_close(source_marginal(r.plan) * m.view(-1, 1, 1, 1), xx, rtol=0, atol=1e-5)
    torch.testing.assert_close(target_marginal(r.plan) * m.view(-1, 1, 1, 1), r.z, rtol=0, atol=1e-5)
    torch.testing.assert_close(plan_cost(r.plan, local_cost(5)), r.cost)
    assert (r.cost <= eps * (1 + 1e-3)).all()
    # the plan's own marginals (float64): POT's optimum is within the plan's cost, to the LP's rounding. Its own
    # source, not x: the rows match x to float32 rounding (1e-9 per pixel, asserted above), and an LP between x and
    # the plan's target must route that difference through moves outside the window, priced prohibitively (POT's
    # result then exceeded the plan's cost by 2e-6 on one example, rising with the prohibitive price)
    x64, z64 = source_marginal(r.plan.double()), target_marginal(r.plan.double())
    exact = exact_local_wasserstein(x64, z64)
    assert (exact <= r.cost.double() * (1 + 1e-5) + 1e-7).all(), (exact, r.cost)
    # the returned float32 image: within the radius to 1e-4 (its ~1e-9 rounding per pixel is priced by the LP at the
    # prohibitive cost of leaving the window, 1e3 times the window's)
    exact32 = exact_local_wasserstein(_unit(xx, m), _unit(r.z, m))
    assert (exact32 <= eps.double() * (1 + 1e-4)).all(), (exact32, eps)
    if channels == 1:  # and with ot.emd2 called directly on the full cost matrix
        for i in range(xx.shape[0]):
            assert _emd2(x64[i, 0], z64[i, 0]) <= r.cost[i].item() * (1 + 1e-5) + 1e-7
    # where the radius binds (far targets), the default regularisation spends it
    assert (exact[4:8] / eps[4:8] >= 0.9).all(), exact[4:8] / eps[4:8]


# ---------------------------------------------------------------- the projection itself, against exact solves


def _sparse_tiny(seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = np.round(rng.uniform(0.2, 1.0, (3, 3)) * 255) / 255
    x[rng.permutation(9)[:4].reshape(-1) // 3, rng.permutation(9)[:4].reshape(-1) % 3] = 0.0  # empty pixels
    x[1, 1] = 1.0  # a saturated one
    w = rng.uniform(0.0, 1.0, (3, 3))
    return x, w


def test_sparse_projection_approaches_the_exact_euclidean_projection():
    """3 x 3 with empty and saturated pixels, 3 x 3 plans: as reg grows the output approaches the exact Euclidean
    projection (SLSQP on the plan entries), and being feasible it is never closer to w than the exact one."""
    x, w = _sparse_tiny(1)
    assert (x == 0).sum() >= 3
    for eps in (0.05, 0.2):
        z_ref = _exact_projection(x, w, eps)
        errors = []
        for reg in (10.0, 100.0, 1000.0):
            r = project_wasserstein(torch.tensor(w)[None, None], torch.tensor(x)[None, None], eps, kernel_size=3,
                                    reg=reg, max_iter=4000)
            assert r.converged.all()
            z = r.z[0, 0].numpy()
            errors.append(float(np.abs(z - z_ref).max()))
            assert 0.5 * np.sum((z - w) ** 2) >= 0.5 * np.sum((z_ref - w) ** 2) - 1e-9
            assert exact_local_wasserstein(torch.tensor(x)[None, None] / x.sum(), r.z.double() / x.sum(),
                                           kernel_size=3).item() <= eps * (1 + 1e-5) + 1e-7
        assert errors[-1] < errors[0] / 3 and errors[-1] < 1e-2, errors


@pytest.mark.parametrize("anderson", [5, 0])
def test_sparse_certified_bound_holds_against_an_independent_entropic_solve(anderson):
    """The certificate (z_error_bound, with the psi refit) bounds the RMS distance to the exact solution of the
    regularised problem, computed by SLSQP, on sparse 3 x 3 instances; with and without Anderson acceleration."""
    reg = 20.0
    for seed, eps in ((2, 0.05), (3, 0.02)):
        x, w = _sparse_tiny(seed)
        m = x.sum()
        z_ref = _entropic_projection(x, w, eps, reg * m) * m
        xt, wt = torch.tensor(x)[None, None], torch.tensor(w)[None, None]
        for ztol in (2e-3, 2e-4):
            r = project_wasserstein(wt, xt, eps, kernel_size=3, reg=reg, ztol=ztol, check_inside=False,
                                    anderson=anderson)
            assert r.converged.all()
            bound = r.z_error_bound.item()
            rms = float(np.sqrt(np.mean((r.z[0, 0].numpy() - z_ref) ** 2)))
            assert rms <= bound * (1 + 1e-6) + 1e-7, (seed, ztol, rms, bound)
            assert bound <= ztol, (seed, ztol, bound)


# ---------------------------------------------------------------- Anderson acceleration, the box repair


def test_anderson_reaches_the_plain_iterations_point_in_fewer_iterations():
    x, g = _sparse(6, 1, 10, seed=5)
    w = torch.cat([x[:3] + 0.1 * torch.sign(torch.randn(x[:3].shape, generator=g)), torch.roll(x[3:], 1, 0)])
    fast = project_wasserstein(w, x, 0.1, **FAST)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ProjectionConvergenceWarning)
        plain = project_wasserstein(w, x, 0.1, anderson=0, max_iter=5000, **FAST)
    assert fast.converged.all() and plain.converged.all()
    assert fast.iterations.sum() < plain.iterations.sum()
    # both certified within 2e-3 RMS of the same point
    rms = ((fast.z - plain.z) ** 2).mean((1, 2, 3)).sqrt()
    assert (rms <= 4e-3).all(), rms


def test_box_repair_keeps_the_rows_caps_the_columns_and_never_adds_cost():
    """A random plan of exact rows that overfills saturated pixels: after the repair every column is within its cap,
    the rows and the stay-or-move structure are intact, and the cost did not grow."""
    g = torch.Generator().manual_seed(7)
    x, _ = _sparse(3, 2, 8, seed=7, empty=0.3, saturated=0.5)
    m = x.sum((1, 2, 3)).view(-1, 1, 1, 1)
    xh, u = x / m, (1.0 / m).expand_as(x)
    geo = _Geometry(2, 8, 8, 5, 2, x.device, x.dtype)
    plan = torch.rand(3, 5, 5, 2, 8, 8, generator=g) * geo.valid6
    plan = (plan * (xh / plan.sum((1, 2)).clamp_min(1e-30))[:, None, None]).contiguous()
    z0 = geo.colsum(plan)
    assert (z0 > u * (1 + 1e-3)).any()  # the test is not vacuous
    cost0 = plan.sum((3, 4, 5)).reshape(3, 25) @ geo.cost
    z = _cap_columns(geo, plan, u, xh)
    assert (plan >= 0).all()
    assert (z <= u * (1 + 1e-5)).all()
    torch.testing.assert_close(z, geo.colsum(plan), rtol=0, atol=1e-7)
    torch.testing.assert_close(plan.sum((1, 2)), xh, rtol=0, atol=1e-7)
    assert (plan.sum((3, 4, 5)).reshape(3, 25) @ geo.cost <= cost0 * (1 + 1e-6)).all()


def test_over_relaxation_and_anderson_do_not_combine():
    x, _ = _sparse(1, 1, 6, seed=0)
    with pytest.raises(UserError, match="anderson"):
        project_wasserstein(x, x, 0.1, relax=1.5)
    for bad in (-1, 2.5, True):
        with pytest.raises(UserError, match="anderson"):
            project_wasserstein(x, x, 0.1, anderson=bad)
    r = project_wasserstein(torch.roll(x, 1, -1), x, 0.1, relax=1.5, anderson=0, **FAST)  # the previous default
    assert r.converged.all() and (r.cost <= 0.1 * (1 + 1e-3)).all()


def test_sparse_batch_independence():
    """An example's answer does not depend on the rest of the batch (the Anderson history, the box repair and the
    certificate are all per example)."""
    x, g = _sparse(4, 1, 10, seed=9)
    w = x + 0.1 * torch.sign(torch.randn(x.shape, generator=g))
    r = project_wasserstein(w, x, 0.1, **FAST)
    for i in range(4):
        alone = project_wasserstein(w[i:i + 1], x[i:i + 1], 0.1, **FAST)
        assert abs(alone.iterations.item() - r.iterations[i].item()) <= 1
        torch.testing.assert_close(alone.z[0], r.z[i], rtol=0, atol=1e-4)


# ---------------------------------------------------------------- real digits (skipped without the data)


@pytest.mark.skipif(not MNIST.is_dir(), reason=f"no MNIST-10k at {MNIST}")
def test_real_digits_are_projected_feasibly_and_spend_the_budget():
    """Four MNIST-10k test digits (80 % empty pixels): a PGD step (0.1 L-inf) and another digit as targets at eps 0.1,
    with the defaults: converged, exactly within the radius (POT), and at least 0.9 of it used (the radius binds)."""
    from kit.data.idx import load

    x = load("mnist", MNIST, "test")[0][:4].float()
    assert (x == 0).float().mean() > 0.5
    g = torch.Generator().manual_seed(0)
    target = torch.cat([x + 0.1 * torch.sign(torch.randn(x.shape, generator=g)), torch.roll(x, 1, 0)])
    xx = torch.cat([x, x])
    r = project_wasserstein(target, xx, 0.1, return_plan=True)
    assert r.converged.all() and (r.z_error_bound <= 2e-3).all()
    assert (r.cost <= 0.1 * (1 + 1e-3)).all()
    z64 = target_marginal(r.plan.double())
    exact = torch.tensor([_emd2(xx[i, 0], z64[i, 0]) for i in range(8)], dtype=torch.float64)
    assert (exact <= r.cost.double() * (1 + 1e-5) + 1e-7).all(), (exact, r.cost)
    assert (exact / 0.1 >= 0.9).all(), exact / 0.1
    exact32 = exact_local_wasserstein(_unit(xx, r.mass), _unit(r.z, r.mass))
    assert (exact32 <= 0.1 * (1 + 1e-4)).all(), exact32
    assert math.isfinite(float(r.dual.sum()))
