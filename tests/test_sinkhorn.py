"""kit.ot.sinkhorn against POT (the oracle): values, gradients, potentials, batching, the divergence, errors."""

from __future__ import annotations

import math
import warnings

import ot
import pytest
import torch

from kit.errors import UserError
from kit.ot.sinkhorn import SinkhornConvergenceWarning, sinkhorn, sinkhorn_divergence

F64 = torch.float64
TOL = 1e-6  # the agreement required after convergence (relative and absolute)


pytestmark = pytest.mark.usefixtures("one_thread")


def cloud(n: int, d: int = 3, *, seed: int, shift: float = 0.0, batch: int | None = None) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    shape = (n, d) if batch is None else (batch, n, d)
    return torch.randn(*shape, generator=g, dtype=F64) + shift


def simplex(n: int, *, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    w = torch.rand(n, generator=g, dtype=F64) + 0.2
    return w / w.sum()


def leaf(t: torch.Tensor) -> torch.Tensor:
    return t.detach().clone().requires_grad_(True)


def close(ours: torch.Tensor, ref: torch.Tensor, rtol: float = TOL, atol: float = TOL) -> None:
    torch.testing.assert_close(ours.detach(), ref.detach().to(ours.dtype), rtol=rtol, atol=atol)


def centred(v: torch.Tensor) -> torch.Tensor:
    """Gradients w.r.t. weights on the simplex are defined up to a constant."""
    return v - v.mean()


# --- one solve vs ot.solve_sample / ot.sinkhorn2 ----------------------------------------------------------------------


@pytest.mark.parametrize("cost", ["sqeuclidean", "euclidean"])
def test_entropic_value_and_envelope_gradient_match_pot(cost):
    x, y, a, b = cloud(7, seed=0), cloud(9, seed=1, shift=1.0), simplex(7, seed=2), simplex(9, seed=3)
    xo, yo = leaf(x), leaf(y)
    ours = sinkhorn(xo, yo, a, b, reg=0.5, cost=cost, tol=1e-11, max_iter=5000)
    assert bool(ours.converged) and ours.value.dim() == 0
    gx, gy = torch.autograd.grad(ours.value, (xo, yo))

    xp, yp = leaf(x), leaf(y)  # POT's autodiff through its own (converged) iterations: an independent gradient
    ref = ot.solve_sample(xp, yp, a, b, metric=cost, reg=0.5, reg_type="KL", max_iter=5000, tol=1e-13, grad="autodiff")
    px, py = torch.autograd.grad(ref.value, (xp, yp))

    close(ours.value, ref.value)
    close(ours.transport_cost, ref.value_linear)
    close(gx, px)
    close(gy, py)
    assert ours.f.grad_fn is None and ours.transport_cost.grad_fn is None  # envelope mode: only the value is live


def test_unrolled_transport_cost_and_gradient_match_sinkhorn2():
    x, y, b = cloud(6, seed=4), cloud(8, seed=5, shift=0.5), simplex(8, seed=6)
    a = torch.full((6,), 1 / 6, dtype=F64)
    xo, yo = leaf(x), leaf(y)
    ours = sinkhorn(xo, yo, a, b, reg=0.4, grad="unrolled", tol=1e-11, max_iter=5000)
    gx, gy = torch.autograd.grad(ours.transport_cost, (xo, yo), retain_graph=True)
    vx, vy = torch.autograd.grad(ours.value, (xo, yo))

    xp, yp = leaf(x), leaf(y)
    m = ot.dist(xp, yp)
    ref = ot.sinkhorn2(a, b, m, 0.4, method="sinkhorn_log", numItermax=5000, stopThr=1e-13)  # = <P, C>
    px, py = torch.autograd.grad(ref, (xp, yp))
    close(ours.transport_cost, ref)
    close(gx, px)
    close(gy, py)

    xp, yp = leaf(x), leaf(y)
    ent = ot.solve_sample(xp, yp, a, b, reg=0.4, max_iter=5000, tol=1e-13)
    qx, qy = torch.autograd.grad(ent.value, (xp, yp))
    close(ours.value, ent.value)
    close(vx, qx)
    close(vy, qy)
    assert not torch.allclose(ent.value, ent.value_linear, rtol=1e-3)  # the two values really differ


def test_unrolled_iterates_equal_pot_before_convergence():
    """Seven iterations, far from convergence: the iterates and their autograd gradients are POT's exactly.

    POT updates the column scaling first from u = 0, so it matches our solve of the transposed problem (y, x);
    with uniform weights on x the two initialisations give the same plans."""
    x, y, b = cloud(5, seed=7), cloud(6, seed=8), simplex(6, seed=9)
    a = torch.full((5,), 0.2, dtype=F64)
    xo, yo = leaf(x), leaf(y)
    with pytest.warns(SinkhornConvergenceWarning):
        ours = sinkhorn(yo, xo, b, a, reg=0.3, max_iter=7, tol=0.0, grad="unrolled")
    assert int(ours.n_iter) == 7 and not bool(ours.converged)
    xp, yp = leaf(x), leaf(y)
    m = ot.dist(xp, yp)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        plan = ot.bregman.sinkhorn_log(a, b, m, 0.3, numItermax=7, stopThr=0.0)
    close(ours.plan().T, plan, rtol=1e-12, atol=1e-12)
    g_ours = torch.autograd.grad(ours.transport_cost, (xo, yo))
    g_pot = torch.autograd.grad((plan * m).sum(), (xp, yp))
    for u, v in zip(g_ours, g_pot):
        close(u, v, rtol=1e-10, atol=1e-10)


def test_weight_gradients_are_the_potentials():
    """d OT / d a = f and d OT / d b = g up to a constant: against POT's autodiff and a finite difference."""
    x, y, a, b = cloud(6, seed=10), cloud(7, seed=11), simplex(6, seed=12), simplex(7, seed=13)
    ao, bo = leaf(a), leaf(b)
    ours = sinkhorn(x, y, ao, bo, reg=0.7, tol=1e-12, max_iter=5000)
    ga, gb = torch.autograd.grad(ours.value, (ao, bo))
    close(centred(ga), centred(ours.f))
    close(centred(gb), centred(ours.g))

    ap, bp = leaf(a), leaf(b)
    ref = ot.solve_sample(x, y, ap, bp, reg=0.7, max_iter=5000, tol=1e-13, grad="autodiff")
    pa, pb = torch.autograd.grad(ref.value, (ap, bp))
    close(centred(ga), centred(pa))
    close(centred(gb), centred(pb))

    d = torch.linspace(-1, 1, 6, dtype=F64)  # a mass-preserving direction
    h = 1e-5
    plus = sinkhorn(x, y, a + h * d, b, reg=0.7, tol=1e-12, max_iter=5000).value
    minus = sinkhorn(x, y, a - h * d, b, reg=0.7, tol=1e-12, max_iter=5000).value
    close((plus - minus) / (2 * h), (ga * d).sum(), rtol=1e-6, atol=1e-7)


def test_potentials_plan_and_diagnostics():
    x, y, a, b = cloud(5, seed=14), cloud(8, seed=15), simplex(5, seed=16), simplex(8, seed=17)
    ours = sinkhorn(x, y, a, b, reg=0.6, tol=1e-10, max_iter=5000)
    plan, log = ot.bregman.sinkhorn_log(a, b, ot.dist(x, y), 0.6, numItermax=5000, stopThr=1e-13, log=True)
    close(ours.plan(), plan, rtol=1e-6, atol=1e-9)
    lu, lv = ours.log_scalings()  # u = f/reg + log a, v = g/reg + log b, up to (u + c, v - c)
    shift = (lu - log["log_u"]).mean()
    close(lu - shift, log["log_u"])
    close(lv + shift, log["log_v"])
    # the diagnostics, recomputed from the plan
    p = ours.plan()
    close(p.sum(0), b, rtol=1e-12, atol=1e-12)  # columns exact after the g update
    close(ours.marginal_error, (p.sum(1) - a).abs().sum(), rtol=1e-6, atol=1e-14)
    assert 0 < float(ours.marginal_error) <= 1e-10 and bool(ours.converged)
    # value = <P, C> + reg KL(P || a b), from the plan itself
    kl = (p * (p / (a[:, None] * b[None, :])).log()).sum()
    close(ours.value, (p * ot.dist(x, y)).sum() + 0.6 * kl, rtol=1e-9, atol=1e-9)
    close(ours.value, (a * ours.f).sum() + (b * ours.g).sum(), rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("grad", ["envelope", "unrolled"])
def test_zero_weight_points_and_callable_cost(grad):
    """A zero-weight point changes nothing (vs POT without it), has a finite gradient; a callable cost is used as is."""
    x, y = cloud(6, seed=38), cloud(5, seed=39)
    a = torch.tensor([0.3, 0.0, 0.2, 0.1, 0.25, 0.15], dtype=F64)
    xo = leaf(x)
    ours = sinkhorn(xo, y, a, reg=0.5, grad=grad, tol=1e-11, max_iter=5000)
    (gx,) = torch.autograd.grad(ours.value, xo)
    keep = a > 0
    xp = leaf(x[keep])
    ref = ot.solve_sample(xp, y, a[keep], reg=0.5, max_iter=5000, tol=1e-13)
    (px,) = torch.autograd.grad(ref.value, xp)
    close(ours.value, ref.value)
    close(gx[keep], px)
    assert bool(torch.isfinite(gx).all()) and float(gx[1].abs().max()) == 0.0
    assert float(ours.plan().detach()[1].abs().max()) == 0.0

    def l1(u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return (u[:, :, None] - v[:, None]).abs().sum(-1)

    custom = sinkhorn(x, y, reg=0.5, cost=l1, tol=1e-11, max_iter=5000)
    close(custom.value, ot.solve_sample(x, y, metric="cityblock", reg=0.5, max_iter=5000, tol=1e-13).value)


@pytest.mark.parametrize("grad", ["envelope", "unrolled"])
def test_batched_equals_per_item(grad):
    x = cloud(6, seed=18, batch=3) * 0.5
    y = cloud(7, seed=19, batch=3) * torch.tensor([0.15, 0.3, 0.5], dtype=F64)[:, None, None]  # unequal hardness
    b = torch.stack([simplex(7, seed=20 + i) for i in range(3)])
    xo = leaf(x)
    batched = sinkhorn(xo, y, None, b, reg=0.5, grad=grad, tol=1e-9, max_iter=3000)
    assert batched.value.shape == (3,) and batched.f.shape == (3, 6) and batched.plan().shape == (3, 6, 7)
    assert len(set(batched.n_iter.tolist())) > 1  # each problem stopped on its own
    (gx,) = torch.autograd.grad(batched.value.sum(), xo)
    for i in range(3):
        xi = leaf(x[i])
        one = sinkhorn(xi, y[i], None, b[i], reg=0.5, grad=grad, tol=1e-9, max_iter=3000)
        (gi,) = torch.autograd.grad(one.value, xi)
        close(batched.value[i], one.value, rtol=1e-12, atol=1e-12)
        close(batched.f[i], one.f, rtol=1e-12, atol=1e-12)
        close(gx[i], gi, rtol=1e-12, atol=1e-12)
        assert int(batched.n_iter[i]) == int(one.n_iter)
        ref = ot.solve_sample(x[i], y[i], None, b[i], reg=0.5, max_iter=5000, tol=1e-13).value
        close(batched.value[i], ref)
    shared = sinkhorn(x, y[0], reg=0.5, tol=1e-9)  # a 2-D cloud is shared by the batch
    close(shared.value[1], sinkhorn(x[1], y[0], reg=0.5, tol=1e-9).value, rtol=1e-12, atol=1e-12)


# --- the divergence -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("n,m", [(8, 8), (6, 9)])
@pytest.mark.parametrize("value,pot_field,pot_grad", [("entropic", "value", "envelope"),
                                                      ("transport", "value_linear", "autodiff")])
def test_divergence_matches_pot_debiased(n, m, value, pot_field, pot_grad):
    x, y = cloud(n, seed=21) * 0.7, cloud(m, seed=22, shift=0.8) * 0.7
    xo, yo = leaf(x), leaf(y)
    ours = sinkhorn_divergence(xo, yo, reg=1.0, value=value, max_iter=3000, tol=1e-11)
    assert bool(ours.converged) and ours.n_iter.shape == (3,)
    gx, gy = torch.autograd.grad(ours.divergence, (xo, yo))
    xp, yp = leaf(x), leaf(y)
    ref = ot.solve_sample(xp, yp, reg=1.0, debias=True, max_iter=20000, tol=1e-13, grad=pot_grad)
    px, py = torch.autograd.grad(getattr(ref, pot_field), (xp, yp))
    close(ours.divergence, getattr(ref, pot_field))
    close(gx, px)
    close(gy, py)
    close(ours.divergence, ours.cross - 0.5 * (ours.self_x + ours.self_y), rtol=1e-12, atol=1e-12)
    if n != m:  # padding with zero-weight points changes nothing
        alone = sinkhorn(x, x, reg=1.0, tol=1e-11, max_iter=20000)
        close(ours.self_x, alone.value if value == "entropic" else alone.transport_cost)


def test_divergence_is_zero_on_equal_clouds_and_positive_otherwise():
    x = cloud(10, seed=23, batch=4) * 0.3
    for value in ("entropic", "transport"):
        same = sinkhorn_divergence(x, x.clone(), reg=0.5, value=value, max_iter=2000, tol=1e-10)
        close(same.divergence, torch.zeros(4, dtype=F64), rtol=0, atol=1e-8)
    y = x + 0.1 * cloud(10, seed=24, batch=4)  # near
    y[3] = x[3][torch.randperm(10, generator=torch.Generator().manual_seed(0))]  # the same cloud, permuted
    div = sinkhorn_divergence(x, y, reg=0.5, max_iter=2000, tol=1e-10)
    assert bool(div.converged.all())
    assert bool((div.divergence[:3] > 1e-4).all())
    close(div.divergence[3], torch.zeros((), dtype=F64), rtol=0, atol=1e-8)
    for i in range(3):  # and against POT, item by item
        ref = ot.solve_sample(x[i], y[i], reg=0.5, debias=True, max_iter=20000, tol=1e-13).value
        close(div.divergence[i], ref)
    many = sinkhorn_divergence(cloud(6, seed=25, batch=32) * 0.3, cloud(6, seed=26, batch=32) * 0.6, reg=0.3,
                               max_iter=2000)
    assert bool(many.converged.all()) and float(many.divergence.min()) >= 0


def test_self_terms_converge_fast():
    """The symmetric (averaged) self-problems take a handful of iterations where alternating Sinkhorn crawls."""
    x = cloud(7, seed=0)
    alternating = sinkhorn(x, x, reg=1.0, tol=1e-6, max_iter=5000)
    div = sinkhorn_divergence(x, x + 1, reg=1.0, tol=1e-6, max_iter=5000)
    assert int(div.n_iter[1]) < 30 < int(alternating.n_iter)
    close(div.self_x, alternating.value, rtol=1e-5, atol=1e-5)


# --- float32, small reg ---------------------------------------------------------------------------------------------


def test_float32_small_reg_no_nan_where_the_kernel_underflows():
    g = torch.Generator().manual_seed(27)
    x, y = torch.rand(2, 12, 4, generator=g) * 5, torch.rand(2, 12, 4, generator=g) * 5  # costs ~ 1 to 60
    reg, iters = 1e-3, 300
    c = torch.cdist(x, y) ** 2
    assert float(torch.exp(-c / reg).max()) == 0.0  # every kernel entry underflows in float32
    u = torch.full((12,), 1 / 12)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        naive = ot.sinkhorn(u, u, c[0], reg, method="sinkhorn", numItermax=iters)  # POT's kernel-domain Sinkhorn
        assert not math.isclose(float(naive.sum()), 1.0, rel_tol=1e-2)  # it fails here (NaN or no mass)
        ours = sinkhorn(y, x, reg=reg, max_iter=iters, tol=0.0, grad="unrolled")
        xs = leaf(x)
        div = sinkhorn_divergence(xs, y, reg=reg, max_iter=50)
    assert ours.value.dtype == torch.float32 and ours.f.dtype == torch.float32
    for t in (ours.value, ours.transport_cost, ours.f, ours.g, ours.plan(), div.divergence):
        assert bool(torch.isfinite(t).all())
    (gx,) = torch.autograd.grad(div.divergence.sum(), xs)
    assert bool(torch.isfinite(gx).all())
    for i in range(2):  # the same 300 iterations, in POT's log domain and float64 (see the transposed-problem note)
        ref = ot.bregman.sinkhorn_log(u.double(), u.double(), ot.dist(x[i].double(), y[i].double()), reg,
                                      numItermax=iters, stopThr=0.0, warn=False)
        close(ours.transport_cost[i], (ref * ot.dist(x[i].double(), y[i].double())).sum(), rtol=1e-3, atol=1e-4)


# --- warnings and errors --------------------------------------------------------------------------------------------


def test_non_convergence_warns_and_reports():
    x, y = cloud(8, seed=28, batch=2), cloud(8, seed=29, batch=2) * 3
    with pytest.warns(SinkhornConvergenceWarning, match=r"max_iter=3.*`max_iter` or `reg`"):
        r = sinkhorn(x, y, reg=0.1, max_iter=3)
    assert r.n_iter.tolist() == [3, 3] and not bool(r.converged.any())
    close(r.marginal_error, (r.plan().sum(2) - 1 / 8).abs().sum(1), rtol=1e-9, atol=1e-12)
    assert bool((r.marginal_error > 1e-6).all())
    with pytest.warns(SinkhornConvergenceWarning, match="Sinkhorn divergence"):
        d = sinkhorn_divergence(x, y, reg=0.1, max_iter=3)
    assert not bool(d.converged.any())
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a converged solve is silent
        sinkhorn(x, y / 3, reg=1.0, max_iter=1000)
        # float32 rounding leaves ~1e-6 of marginal error at a few hundred points: its default tol (1e-4) is reachable
        g = torch.Generator().manual_seed(40)
        clean = 3 * torch.randn(256, 10, generator=g)
        d32 = sinkhorn_divergence(clean, clean + 0.5 * torch.randn(256, 10, generator=g), reg=1.0)
    assert bool(d32.converged) and float(d32.marginal_error) <= 1e-4 and int(d32.n_iter.max()) < 50


def _bad(**kw):
    base = dict(x=cloud(4, seed=30), y=cloud(5, seed=31), a=None, b=None, reg=1.0)
    base.update(kw)
    x, y, a, b = base.pop("x"), base.pop("y"), base.pop("a"), base.pop("b")
    return x, y, a, b, base


BAD = {
    "negative weight": _bad(a=torch.tensor([0.5, 0.6, -0.2, 0.1], dtype=F64)),
    "nan weight": _bad(b=torch.tensor([0.2, 0.2, math.nan, 0.2, 0.2], dtype=F64)),
    "inf weight": _bad(a=torch.tensor([math.inf, 0.0, 0.0, 0.0], dtype=F64)),
    "zero mass": _bad(a=torch.zeros(4, dtype=F64)),
    "unequal mass": _bad(a=torch.full((4,), 0.5, dtype=F64)),
    "weight shape": _bad(a=torch.full((5,), 0.2, dtype=F64)),
    "reg zero": _bad(reg=0.0),
    "reg negative": _bad(reg=-1.0),
    "reg nan": _bad(reg=math.nan),
    "reg bool": _bad(reg=True),
    "dims": _bad(y=cloud(5, 2, seed=32)),
    "batch sizes": _bad(x=cloud(4, seed=33, batch=2), y=cloud(5, seed=34, batch=3)),
    "nan point": _bad(x=torch.tensor([[0.0, math.nan, 1.0]] * 4, dtype=F64)),
    "inf point": _bad(y=torch.full((5, 3), math.inf, dtype=F64)),
    "1-D points": _bad(x=torch.zeros(4, dtype=F64)),
    "integer points": _bad(x=torch.zeros(4, 3, dtype=torch.int64)),
    "no points": _bad(x=torch.zeros(0, 3, dtype=F64)),
    "dtype mismatch": _bad(y=cloud(5, seed=35).float()),
    "unknown cost": _bad(cost="cosine"),
    "cost shape": _bad(cost=lambda x, y: torch.zeros(1, 2, 2, dtype=F64)),
    "cost nan": _bad(cost=lambda x, y: torch.full((1, 4, 5), math.nan, dtype=F64)),
    "max_iter": _bad(max_iter=0),
    "tol": _bad(tol=-1.0),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_raises_user_error(case):
    x, y, a, b, kw = BAD[case]
    with pytest.raises(UserError) as e:
        sinkhorn(x, y, a, b, **kw)
    assert "\n" not in str(e.value)
    with pytest.raises(UserError):
        sinkhorn_divergence(x, y, a, b, **kw)


def test_bad_modes_raise_user_error():
    x, y = cloud(4, seed=36), cloud(4, seed=37)
    with pytest.raises(UserError, match="grad"):
        sinkhorn(x, y, grad="implicit")
    with pytest.raises(UserError, match="value"):
        sinkhorn_divergence(x, y, value="sharp")
