r"""Batched entropic optimal transport between point clouds, in the log domain, and the Sinkhorn divergence of SAT.

Entropic OT between :math:`\alpha = \sum_i a_i \delta_{x_i}` and :math:`\beta = \sum_j b_j \delta_{y_j}` with cost
:math:`C_{ij} = c(x_i, y_j)` and regularisation :math:`\varepsilon` (``reg``):

.. math::

    \mathrm{OT}_\varepsilon(\alpha, \beta) = \min_{P \ge 0,\ P\mathbf{1} = a,\ P^\top\mathbf{1} = b}
        \langle P, C \rangle + \varepsilon\, \mathrm{KL}(P \,\|\, a \otimes b),
    \qquad \mathrm{KL}(P \,\|\, a \otimes b) = \sum_{ij} P_{ij} \log \frac{P_{ij}}{a_i b_j}.

Its dual, over the potentials :math:`f \in \mathbb{R}^n, g \in \mathbb{R}^m`, is

.. math::

    \max_{f, g}\ \langle a, f \rangle + \langle b, g \rangle
        - \varepsilon \big\langle a \otimes b,\ e^{(f \oplus g - C)/\varepsilon} - 1 \big\rangle ,

and the optimal plan is :math:`P_{ij} = a_i b_j \exp((f_i + g_j - C_{ij})/\varepsilon)`. Sinkhorn's algorithm is
block-coordinate ascent on the dual, written here with log-sum-exps so that no kernel :math:`e^{-C/\varepsilon}` is ever
formed (it underflows for small :math:`\varepsilon`; Peyré & Cuturi 2019, *Computational Optimal Transport*, §4.4):

.. math::

    f_i \leftarrow -\varepsilon \log \sum_j b_j\, e^{(g_j - C_{ij})/\varepsilon}, \qquad
    g_j \leftarrow -\varepsilon \log \sum_i a_i\, e^{(f_i - C_{ij})/\varepsilon}.

After the :math:`g` update the column marginals are exact; convergence is judged on the row marginals,
:math:`\mathrm{err} = \| P\mathbf{1} - a \|_1 / \textstyle\sum_i a_i`, for each problem of the batch separately.

**Potentials and POT.** :math:`f, g` are the symmetric ("Kantorovich") potentials, in cost units. POT's log-domain
solver (``ot.bregman.sinkhorn_log``, ``ot.solve``) returns log-scalings :math:`(u, v)` with
:math:`P = \exp(-C/\varepsilon + u \oplus v)`; they relate by :math:`u = f/\varepsilon + \log a`,
:math:`v = g/\varepsilon + \log b` (:meth:`SinkhornResult.log_scalings`). Both pairs are defined up to
:math:`(f + c, g - c)`.

**What the values are.** :attr:`SinkhornResult.value` is the entropic objective
:math:`\langle P, C\rangle + \varepsilon\,\mathrm{KL}(P\,\|\,a\otimes b)`, which equals
:math:`\langle a, f\rangle + \langle b, g\rangle` at convergence; it is ``ot.solve(...).value`` and
``ot.solve_sample(..., reg=reg, reg_type="KL").value``. :attr:`SinkhornResult.transport_cost` is
:math:`\langle P, C\rangle`, which is what ``ot.sinkhorn2`` returns and what ``ot.solve*`` calls ``value_linear``.

**Gradients** (``grad=``):

- ``"envelope"``: the iterations run without autograd; the value is then rebuilt once from the detached optimal
  potentials as the dual objective, so by the envelope (Danskin) theorem
  :math:`\partial\,\mathrm{OT}_\varepsilon / \partial C = P`, :math:`\partial / \partial a = f`,
  :math:`\partial / \partial b = g` (up to a common additive constant, which no mass-preserving change of the weights
  sees). Exact at convergence, memory O(one cost matrix). Only ``value`` carries a gradient; everything else is
  detached. (POT's ``grad="envelope"`` gives the weights :math:`\varepsilon u = f + \varepsilon \log a`, the
  gradient of the entropy-regularised problem rather than the KL one; ours agrees with POT's ``grad="autodiff"`` and
  with finite differences.)
- ``"unrolled"``: autograd records every iteration; every output (``value``, ``transport_cost``, the potentials,
  the plan) is differentiable, exactly, for the number of iterations actually run. Memory grows with the iterations.

**Small reg.** The log domain never underflows (no NaN in float32 at reg = 1e-3 with costs of 1 to 100, where the
kernel :math:`e^{-C/\varepsilon}` is all zeros), but the iterations needed grow quickly as :math:`\varepsilon` shrinks
relative to the costs; an unconverged solve warns and says so in its diagnostics.

Costs: ``"sqeuclidean"`` :math:`\|x - y\|_2^2` (the default metric of ``ot.dist``), ``"euclidean"`` :math:`\|x - y\|_2`
(zero gradient at coinciding points), or any callable ``cost(x, y) -> C`` mapping (B, n, d), (B, m, d) to (B, n, m).

The Sinkhorn divergence (Genevay, Peyré & Cuturi 2018; Feydy et al. 2019) is the debiased

.. math::

    S_\varepsilon(\alpha, \beta) = W_\varepsilon(\alpha, \beta) - \tfrac12 W_\varepsilon(\alpha, \alpha)
        - \tfrac12 W_\varepsilon(\beta, \beta),

the SAT loss between clean and adversarial logits (seed paper ``000_e2e3710bc929b9d7.txt``, Bouniot et al.,
"Optimal transport as a defense against adversarial attacks", ICPR 2020, §III: squared Euclidean cost, 50 Sinkhorn
iterations).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum

import torch

from kit.errors import UserError
from kit.ot.precision import full_precision

CostFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


class SinkhornConvergenceWarning(RuntimeWarning):
    """Sinkhorn stopped at ``max_iter`` with a marginal error above ``tol`` for some problem of the batch."""


class GradMode(str, Enum):
    """How :func:`sinkhorn` differentiates: envelope theorem at convergence, or autograd through the iterations."""

    ENVELOPE = "envelope"
    UNROLLED = "unrolled"


class DivergenceValue(str, Enum):
    """Which OT value :func:`sinkhorn_divergence` debiases."""

    ENTROPIC = "entropic"  # SAT paper: entropic OT value, envelope gradient
    TRANSPORT = "transport"  # released SAT code: <P, C> of each plan, gradient through the iterations


def sqeuclidean_cost(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    r""":math:`C_{ij} = \|x_i - y_j\|_2^2` for x (B, n, d), y (B, m, d) -> (B, n, m), clipped at 0 like ``ot.dist``."""
    sq = x.pow(2).sum(-1)[:, :, None] + y.pow(2).sum(-1)[:, None, :]
    return torch.baddbmm(sq, x, y.transpose(1, 2), alpha=-2.0).clamp_min(0.0)


def euclidean_cost(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    r""":math:`C_{ij} = \|x_i - y_j\|_2` for x (B, n, d), y (B, m, d) -> (B, n, m); exact 0 (zero gradient) at x = y."""
    return torch.cdist(x, y, p=2.0, compute_mode="donot_use_mm_for_euclid_dist")


COSTS: dict[str, CostFn] = {"sqeuclidean": sqeuclidean_cost, "euclidean": euclidean_cost}


@dataclass
class SinkhornResult:
    r"""What :func:`sinkhorn` returns. Shapes are for a batch of B problems; unbatched inputs drop the B axis.

    Attributes
    ----------
    value : (B,) tensor
        Entropic OT value :math:`\langle P, C\rangle + \varepsilon\,\mathrm{KL}(P\,\|\,a\otimes b)`
        (POT's ``ot.solve(...).value``).
    transport_cost : (B,) tensor
        :math:`\langle P, C\rangle` (what ``ot.sinkhorn2`` returns; POT's ``value_linear``). Detached in envelope
        mode.
    f, g : (B, n), (B, m) tensors
        Symmetric dual potentials, in cost units. Detached in envelope mode.
    n_iter : (B,) int64 tensor
        Iterations (one ``f`` and one ``g`` update each) run for each problem before it converged or hit ``max_iter``.
    marginal_error : (B,) tensor
        Final :math:`\|P\mathbf{1} - a\|_1 / \sum_i a_i` (the column marginals are exact).
    converged : (B,) bool tensor
        ``marginal_error <= tol``.
    reg : float
        The regularisation used.
    """

    value: torch.Tensor
    transport_cost: torch.Tensor
    f: torch.Tensor
    g: torch.Tensor
    n_iter: torch.Tensor
    marginal_error: torch.Tensor
    converged: torch.Tensor
    reg: float
    _cost: torch.Tensor = field(repr=False)
    _log_a: torch.Tensor = field(repr=False)
    _log_b: torch.Tensor = field(repr=False)
    _batched: bool = field(default=True, repr=False)

    def _unbatch(self, t: torch.Tensor) -> torch.Tensor:
        return t if self._batched else t[0]

    def log_plan(self) -> torch.Tensor:
        r"""Log of the plan, :math:`\log P_{ij} = (f_i + g_j - C_{ij})/\varepsilon + \log a_i + \log b_j`: (B, n, m).

        Zero-weight points give ``-inf`` rows or columns."""
        f = self.f if self._batched else self.f[None]
        g = self.g if self._batched else self.g[None]
        lp = (f[:, :, None] + g[:, None, :] - self._cost) / self.reg + self._log_a[:, :, None] + self._log_b[:, None, :]
        return self._unbatch(lp)

    def plan(self) -> torch.Tensor:
        """The transport plan :math:`P` (B, n, m); its column sums are ``b``, its row sums ``a`` up to the error."""
        return _exp_ftz(self.log_plan())

    def log_scalings(self) -> tuple[torch.Tensor, torch.Tensor]:
        r"""POT's log-domain scalings :math:`u = f/\varepsilon + \log a`, :math:`v = g/\varepsilon + \log b`
        (``log["log_u"]``, ``log["log_v"]`` of ``ot.bregman.sinkhorn_log``): (B, n), (B, m)."""
        return (self.f / self.reg + self._unbatch(self._log_a), self.g / self.reg + self._unbatch(self._log_b))


@dataclass
class DivergenceResult:
    r"""What :func:`sinkhorn_divergence` returns. Shapes are for a batch of B pairs; unbatched inputs drop the B axis.

    Attributes
    ----------
    divergence : (B,) tensor
        :math:`S(\alpha, \beta) = W(\alpha, \beta) - \frac12 W(\alpha, \alpha) - \frac12 W(\beta, \beta)`.
    cross, self_x, self_y : (B,) tensors
        The three terms :math:`W(\alpha, \beta)`, :math:`W(\alpha, \alpha)`, :math:`W(\beta, \beta)`.
    n_iter : (B, 3) int64 tensor
        Iterations of the three solves, in the order cross, self_x, self_y.
    marginal_error : (B,) tensor
        The largest final marginal error of the three solves.
    converged : (B,) bool tensor
        All three solves converged.
    """

    divergence: torch.Tensor
    cross: torch.Tensor
    self_x: torch.Tensor
    self_y: torch.Tensor
    n_iter: torch.Tensor
    marginal_error: torch.Tensor
    converged: torch.Tensor


# ----------------------------------------------------------------------------------------------------------------------
# validation


def _check_positive(name: str, v: object) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
        raise UserError(f"{name} must be a finite number > 0, got {v!r}")
    return float(v)


#: Default marginal-error tolerance per dtype: float32 sums of a few hundred weights already carry ~1e-6 of rounding.
DEFAULT_TOL = {torch.float64: 1e-6, torch.float32: 1e-4}


def _check_options(reg: object, max_iter: object, tol: object) -> tuple[float, int, float | None]:
    r = _check_positive("reg", reg)
    if isinstance(max_iter, bool) or not isinstance(max_iter, int) or max_iter < 1:
        raise UserError(f"max_iter must be an integer >= 1, got {max_iter!r}")
    if tol is None:
        return r, max_iter, None
    if isinstance(tol, bool) or not isinstance(tol, (int, float)) or not math.isfinite(tol) or tol < 0:
        raise UserError(f"tol must be a finite number >= 0 (or None for the dtype's default), got {tol!r}")
    return r, max_iter, float(tol)


def _resolve_tol(tol: float | None, dtype: torch.dtype) -> float:
    return DEFAULT_TOL.get(dtype, 1e-2) if tol is None else tol


def _as_cost(cost: str | CostFn) -> CostFn:
    if isinstance(cost, str):
        if cost not in COSTS:
            raise UserError(f"unknown cost {cost!r}; known: {', '.join(COSTS)} (or a callable (x, y) -> C)")
        return COSTS[cost]
    if callable(cost):
        return cost
    raise UserError(f"cost must be a name ({', '.join(COSTS)}) or a callable (x, y) -> C, got {type(cost).__name__}")


def _as_grad_mode(grad: GradMode | str) -> GradMode:
    try:
        return GradMode(grad)
    except ValueError:
        raise UserError(f"unknown grad mode {grad!r}; known: {', '.join(g.value for g in GradMode)}") from None


def _points(name: str, p: object) -> tuple[torch.Tensor, bool]:
    """A validated cloud as (B, n, d), and whether it came batched (3-D)."""
    if not isinstance(p, torch.Tensor) or p.dim() not in (2, 3):
        raise UserError(f"{name} must be a (n, d) or (B, n, d) tensor, got shape {tuple(getattr(p, 'shape', ()))}")
    if not p.is_floating_point():
        raise UserError(f"{name} must be floating point, got {p.dtype}")
    if p.shape[-2] == 0:
        raise UserError(f"{name} has no points")
    if not bool(torch.isfinite(p).all()):
        raise UserError(f"{name} contains NaN or infinite values")
    return (p, True) if p.dim() == 3 else (p[None], False)


def _prepare_points(x: object, y: object) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """Validate x, y and return them as (B, n, d), (B, m, d) (a 2-D cloud is shared by the batch) and batchedness."""
    (xb, x_batched), (yb, y_batched) = _points("x", x), _points("y", y)
    if xb.dtype != yb.dtype or xb.device != yb.device:
        raise UserError(f"x and y must share dtype and device, got {xb.dtype} on {xb.device} and {yb.dtype} on "
                        f"{yb.device}")
    if xb.shape[-1] != yb.shape[-1]:
        raise UserError(f"x and y must have the same point dimension, got {xb.shape[-1]} and {yb.shape[-1]}")
    if xb.dtype in (torch.float16, torch.bfloat16):  # too coarse for the cost's cancellation and the log domain
        xb, yb = xb.float(), yb.float()
    if xb.shape[0] != yb.shape[0]:
        if not x_batched:
            xb = xb.expand(yb.shape[0], -1, -1)
        elif not y_batched:
            yb = yb.expand(xb.shape[0], -1, -1)
        else:
            raise UserError(f"x and y must have the same batch size, got {xb.shape[0]} and {yb.shape[0]}")
    return xb, yb, x_batched or y_batched


def _weights(name: str, w: object, batch: int, n: int, like: torch.Tensor) -> torch.Tensor:
    """Validated weights as a (B, n) tensor on ``like``'s device and dtype (uniform when ``w`` is None)."""
    if w is None:
        return torch.full((batch, n), 1.0 / n, device=like.device, dtype=like.dtype)
    if not isinstance(w, torch.Tensor):
        raise UserError(f"weights {name} must be a tensor, got {type(w).__name__}")
    if w.shape not in ((n,), (batch, n)):
        raise UserError(f"weights {name} must have shape ({n},) or ({batch}, {n}), got {tuple(w.shape)}")
    w = w.to(device=like.device, dtype=like.dtype)
    if not bool(torch.isfinite(w).all()):
        raise UserError(f"weights {name} contain NaN or infinite values")
    if bool((w < 0).any()):
        raise UserError(f"weights {name} must be >= 0")
    w = w.expand(batch, n)
    if bool((w.sum(-1) <= 0).any()):
        raise UserError(f"weights {name} must have a positive total mass")
    return w


def _check_masses(a: torch.Tensor, b: torch.Tensor) -> None:
    ma, mb = a.detach().sum(-1), b.detach().sum(-1)
    rtol = math.sqrt(torch.finfo(a.dtype).eps)
    if bool(((ma - mb).abs() > rtol * torch.maximum(ma, mb)).any()):
        k = int(((ma - mb).abs() > rtol * torch.maximum(ma, mb)).nonzero()[0])
        raise UserError(f"weights a and b must have the same total mass (balanced OT), got {ma[k].item():.6g} and "
                        f"{mb[k].item():.6g} in batch element {k}")


def _log_weights(w: torch.Tensor) -> torch.Tensor:
    """log w with -inf (and a zero, not NaN, gradient) where w == 0."""
    tiny = torch.finfo(w.dtype).tiny
    return torch.where(w > 0, w.clamp_min(tiny).log(), torch.full_like(w, -math.inf))


def _cost_matrix(cost_fn: CostFn, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    c = cost_fn(x, y)
    shape = (x.shape[0], x.shape[1], y.shape[1])
    if not isinstance(c, torch.Tensor) or tuple(c.shape) != shape:
        raise UserError(f"cost function must return a {shape} tensor, got shape {tuple(getattr(c, 'shape', ()))}")
    if not bool(torch.isfinite(c.detach()).all()):
        raise UserError("cost matrix contains NaN or infinite values")
    return c.to(dtype=x.dtype)


# ----------------------------------------------------------------------------------------------------------------------
# the solver


@dataclass
class _Solve:
    f: torch.Tensor
    g: torch.Tensor
    n_iter: torch.Tensor
    err: torch.Tensor


# exp() of an argument whose result underflows (subnormal, 0) takes a slow path on CPUs, about 100x slower, and Sinkhorn
# at a small reg is mostly such arguments. Log-sum-exps therefore clamp exponents at a floor whose exp is still a normal
# number, and plans flush entries below it to zero: a relative change of at most n * exp(floor) (1e-35 in float32).
_EXP_FLOOR = {torch.float32: -80.0, torch.float64: -700.0}


def _lse(z: torch.Tensor, dim: int) -> torch.Tensor:
    """``logsumexp(z, dim)`` with exponents floored at ``_EXP_FLOOR`` below the maximum (see above)."""
    floor = _EXP_FLOOR.get(z.dtype)
    if floor is None:
        return torch.logsumexp(z, dim)
    top = z.amax(dim, keepdim=True).detach()  # the shift does not change the value, nor (in exact arithmetic) its grad
    return (z - top).clamp_min(floor).exp().sum(dim).log() + top.squeeze(dim)


def _exp_ftz(t: torch.Tensor) -> torch.Tensor:
    """``exp(t)`` with results below ``exp(floor)`` flushed to exactly 0 (see above)."""
    floor = _EXP_FLOOR.get(t.dtype)
    if floor is None:
        return t.exp()
    return t.clamp_min(floor).exp().masked_fill(t < floor, 0.0)


def _row_lse(g: torch.Tensor, cost_r: torch.Tensor, log_b: torch.Tensor, reg: float) -> torch.Tensor:
    r""":math:`s_i = \log \sum_j e^{(g_j - C_{ij})/\varepsilon + \log b_j}` (B, n), given ``cost_r`` = C / reg."""
    return _lse((g / reg + log_b)[:, None, :] - cost_r, 2)


def _col_lse(f: torch.Tensor, cost_r: torch.Tensor, log_a: torch.Tensor, reg: float) -> torch.Tensor:
    r""":math:`t_j = \log \sum_i e^{(f_i - C_{ij})/\varepsilon + \log a_i}` (B, m), given ``cost_r`` = C / reg."""
    return _lse((f / reg + log_a)[:, :, None] - cost_r, 1)


def _row_error(f: torch.Tensor, s: torch.Tensor, a: torch.Tensor, reg: float) -> torch.Tensor:
    r"""Row-marginal error :math:`\sum_i a_i |e^{f_i/\varepsilon + s_i} - 1| / \sum_i a_i` (the row sum of P is
    :math:`a_i e^{f_i/\varepsilon + s_i}`)."""
    dev = torch.where(a > 0, a * torch.expm1(f / reg + s).abs(), torch.zeros_like(a))  # no 0 * inf for padding
    return dev.sum(-1) / a.sum(-1)


def _iterate(cost: torch.Tensor, a: torch.Tensor, log_a: torch.Tensor, log_b: torch.Tensor, reg: float,
             max_iter: int, tol: float, n_sym: int = 0) -> _Solve:
    r"""Log-domain Sinkhorn on a batch; each problem stops (its potentials freeze) once its row error is <= tol.

    The last ``n_sym`` problems are symmetric (same cloud and weights on both sides, so :math:`C = C^\top`,
    :math:`a = b`): they keep :math:`g = f` and take the averaged symmetric step
    :math:`f \leftarrow \frac12 (f + T(f))` with
    :math:`T(f)_i = -\varepsilon \log \sum_j a_j e^{(f_j - C_{ij})/\varepsilon}` (Feydy et al. 2019, §3.1), which
    converges in a few iterations where the alternating updates of a self-problem crawl. Autograd records the
    iterations when the inputs require it (unrolled mode); the error bookkeeping never does.
    """
    batch, n, m = cost.shape
    cost_r = cost / reg
    k = batch - n_sym  # problems [0, k) alternate, [k, batch) are symmetric
    f = cost.new_zeros(batch, n)
    g = cost.new_zeros(batch, m)
    active = torch.ones(batch, dtype=torch.bool, device=cost.device)
    n_iter = torch.zeros(batch, dtype=torch.int64, device=cost.device)
    # checking "all converged" costs a device sync: every iteration on the CPU, every 10 elsewhere
    check_every = 1 if cost.device.type == "cpu" else 10
    for it in range(max_iter):
        s = _row_lse(g, cost_r, log_b, reg)
        if it > 0:
            with torch.no_grad():
                active = active & ~(_row_error(f, s, a, reg) <= tol)  # NaN counts as not converged
            if it % check_every == 0 and not bool(active.any()):
                break
        f_new = -reg * s
        g_new = -reg * _col_lse(f_new[:k], cost_r[:k], log_a[:k], reg)
        if n_sym:
            f_sym = 0.5 * (f[k:] + f_new[k:])
            f_new = torch.cat([f_new[:k], f_sym])
            g_new = torch.cat([g_new, f_sym])
        f = torch.where(active[:, None], f_new, f)
        g = torch.where(active[:, None], g_new, g)
        n_iter += active
    with torch.no_grad():
        err = _row_error(f, _row_lse(g, cost_r, log_b, reg), a, reg)
    return _Solve(f, g, n_iter, err)


def _warn_not_converged(converged: torch.Tensor, err: torch.Tensor, max_iter: int, tol: float, what: str,
                        stacklevel: int = 4) -> None:  # the caller, past full_precision
    bad = ~converged
    if bool(bad.any()):
        worst = err[bad].max().item()
        warnings.warn(
            f"{what} did not converge for {int(bad.sum())} of {bad.numel()} problem(s) in max_iter={max_iter} "
            f"iterations (marginal error {worst:.3g} > tol={tol:.3g}); raise `max_iter` or `reg`",
            SinkhornConvergenceWarning, stacklevel=stacklevel)


def _solve(cost: torch.Tensor, a: torch.Tensor, b: torch.Tensor, log_a: torch.Tensor, log_b: torch.Tensor,
           reg: float, max_iter: int, tol: float, grad: GradMode,
           n_sym: int = 0) -> tuple[SinkhornResult, torch.Tensor]:
    """Run Sinkhorn on (B, n, m) costs with (B, n), (B, m) weights; returns the batched result and the per-problem
    entropic values (with their gradient, for both modes)."""
    if grad is GradMode.ENVELOPE:
        with torch.no_grad():
            sol = _iterate(cost.detach(), a.detach(), log_a.detach(), log_b.detach(), reg, max_iter, tol, n_sym)
        f, g = sol.f, sol.g
        lp = (f[:, :, None] + g[:, None, :] - cost) / reg + log_a[:, :, None] + log_b[:, None, :]
        plan = _exp_ftz(lp)
        mass = plan.sum((1, 2))
        # The dual objective at the fixed optimal potentials: <a, f> + <b, g> - reg * (sum P - const). Its value is
        # <a, f> + <b, g> (the primal value at convergence); its gradient is P w.r.t. C, f - reg w.r.t. a, g - reg
        # w.r.t. b (Danskin).
        value = (a * f).sum(-1) + (b * g).sum(-1) - reg * (mass - mass.detach())
        with torch.no_grad():
            transport = (plan * cost).sum((1, 2))
        res_cost = cost.detach()
        res_la, res_lb = log_a.detach(), log_b.detach()
    else:
        sol = _iterate(cost, a, log_a, log_b, reg, max_iter, tol, n_sym)
        f, g = sol.f, sol.g
        lp = (f[:, :, None] + g[:, None, :] - cost) / reg + log_a[:, :, None] + log_b[:, None, :]
        plan = _exp_ftz(lp)
        transport = (plan * cost).sum((1, 2))
        # <P, C> + reg * sum P log(P / (a b)) = sum_ij P_ij (f_i + g_j): no log of a zero entry
        value = (plan.sum(2) * f).sum(-1) + (plan.sum(1) * g).sum(-1)
        res_cost, res_la, res_lb = cost, log_a, log_b
    result = SinkhornResult(
        value=value, transport_cost=transport, f=f, g=g, n_iter=sol.n_iter, marginal_error=sol.err,
        converged=sol.err <= tol, reg=reg, _cost=res_cost, _log_a=res_la, _log_b=res_lb)
    return result, value


@full_precision
def sinkhorn(
    x: torch.Tensor,
    y: torch.Tensor,
    a: torch.Tensor | None = None,
    b: torch.Tensor | None = None,
    *,
    reg: float = 1.0,
    cost: str | CostFn = "sqeuclidean",
    max_iter: int = 1000,
    tol: float | None = None,
    grad: GradMode | str = GradMode.ENVELOPE,
) -> SinkhornResult:
    r"""Entropic OT between point clouds, batched, in the log domain.

    Solves, for each problem of the batch,

    .. math::

        \mathrm{OT}_\varepsilon(\alpha, \beta) = \min_{P\mathbf{1} = a,\ P^\top\mathbf{1} = b,\ P \ge 0}
            \langle P, C \rangle + \varepsilon\, \mathrm{KL}(P \,\|\, a \otimes b),\qquad C_{ij} = c(x_i, y_j),

    by log-domain Sinkhorn iterations on the symmetric potentials :math:`(f, g)` (see the module docstring; Cuturi
    2013, "Sinkhorn distances"; Peyré & Cuturi 2019, §4.4).

    Parameters
    ----------
    x : (B, n, d) or (n, d) tensor
        Source points. A 2-D cloud against a 3-D one is shared by the whole batch.
    y : (B, m, d) or (m, d) tensor
        Target points, same dtype and device as ``x``.
    a : (B, n) or (n,) tensor, optional
        Source weights, >= 0 (zero-weight points are allowed); default uniform :math:`1/n`.
    b : (B, m) or (m,) tensor, optional
        Target weights with the same total mass as ``a`` (balanced OT); default uniform :math:`1/m`.
    reg : float
        :math:`\varepsilon > 0`, in cost units.
    cost : {"sqeuclidean", "euclidean"} or callable
        Ground cost; a callable maps x (B, n, d), y (B, m, d) to C (B, n, m) and must be differentiable for gradients.
    max_iter : int
        Hard bound on the iterations (one ``f`` and one ``g`` update each).
    tol : float, optional
        A problem stops when :math:`\|P\mathbf{1} - a\|_1 / \sum a \le` ``tol``; default by dtype
        (:data:`DEFAULT_TOL`: 1e-6 in float64, 1e-4 in float32, whose rounding alone leaves errors of ~1e-6 at a few
        hundred points; 1e-2 otherwise). Problems that end above it trigger a
        :class:`SinkhornConvergenceWarning` naming ``max_iter`` and ``reg``.
    grad : {"envelope", "unrolled"}
        ``"envelope"``: only ``value`` is differentiable, by the envelope theorem at convergence (iterations without
        autograd). ``"unrolled"``: autograd through every iteration; all outputs are differentiable.

    Returns
    -------
    SinkhornResult
        Per-problem values (B,) (or scalars for unbatched inputs), potentials, plan builder, diagnostics. Device and
        dtype follow ``x``; float16 and bfloat16 points are solved in float32, and autocast is off inside
        (:mod:`kit.ot.precision`).

    Raises
    ------
    UserError
        Malformed or non-finite points, weights that are negative, non-finite, of the wrong shape or of unequal mass,
        ``reg <= 0``, a bad ``max_iter``/``tol``/``cost``/``grad``.
    """
    reg, max_iter, tol = _check_options(reg, max_iter, tol)
    cost_fn = _as_cost(cost)
    mode = _as_grad_mode(grad)
    xb, yb, batched = _prepare_points(x, y)
    batch, n, m = xb.shape[0], xb.shape[1], yb.shape[1]
    aw, bw = _weights("a", a, batch, n, xb), _weights("b", b, batch, m, xb)
    _check_masses(aw, bw)
    tol = _resolve_tol(tol, xb.dtype)
    c = _cost_matrix(cost_fn, xb, yb)
    result, _ = _solve(c, aw, bw, _log_weights(aw), _log_weights(bw), reg, max_iter, tol, mode)
    _warn_not_converged(result.converged, result.marginal_error, max_iter, tol, "Sinkhorn")
    if not batched:
        for name in ("value", "transport_cost", "f", "g", "n_iter", "marginal_error", "converged"):
            setattr(result, name, getattr(result, name)[0])
        result._batched = False
    return result


def _pad(p: torch.Tensor, log_w: torch.Tensor, w: torch.Tensor, size: int) -> tuple[torch.Tensor, ...]:
    """Pad a cloud (B, n, d) to ``size`` points with zero-weight points at the origin (log-weight -inf)."""
    extra = size - p.shape[1]
    if extra == 0:
        return p, log_w, w
    batch = p.shape[0]
    return (torch.cat([p, p.new_zeros(batch, extra, p.shape[2])], 1),
            torch.cat([log_w, log_w.new_full((batch, extra), -math.inf)], 1),
            torch.cat([w, w.new_zeros(batch, extra)], 1))


@full_precision
def sinkhorn_divergence(
    x: torch.Tensor,
    y: torch.Tensor,
    a: torch.Tensor | None = None,
    b: torch.Tensor | None = None,
    *,
    reg: float = 1.0,
    cost: str | CostFn = "sqeuclidean",
    value: DivergenceValue | str = DivergenceValue.ENTROPIC,
    max_iter: int = 50,
    tol: float | None = None,
) -> DivergenceResult:
    r"""Debiased Sinkhorn divergence, the SAT loss (seed ``000_e2e3710bc929b9d7.txt``, §III-A, Eq. 1).

    .. math::

        S_\varepsilon(\alpha, \beta) = W_\varepsilon(\alpha, \beta) - \tfrac12 W_\varepsilon(\alpha, \alpha)
            - \tfrac12 W_\varepsilon(\beta, \beta)

    with, by ``value``:

    - ``"entropic"`` (the paper's definition; Genevay et al. 2018, Feydy et al. 2019):
      :math:`W_\varepsilon = \mathrm{OT}_\varepsilon
      = \langle P, C\rangle + \varepsilon\,\mathrm{KL}(P\,\|\,a\otimes b)`, gradient by the envelope theorem.
      At convergence :math:`S_\varepsilon \ge 0`, with equality iff :math:`\alpha = \beta`, for costs whose Gibbs
      kernel :math:`e^{-C/\varepsilon}` is positive definite (squared Euclidean, Euclidean; Feydy et al. 2019, Thm 1).
    - ``"transport"`` (the variant of the released SAT code): :math:`W_\varepsilon = \langle P_\varepsilon, C\rangle`
      of each entropic plan, debiased the same way, **not** clipped at 0 (it can be slightly negative), gradient through
      the unrolled iterations.

    The three problems run as one batch of 3B problems (one tensor, one loop). When ``n != m`` both clouds are padded
    to ``max(n, m)`` points with zero-weight points (log-weight :math:`-\infty`), which carry no mass and change no
    value. The two self-problems keep one potential (:math:`f = g`) and take the averaged symmetric step
    :math:`f \leftarrow \frac12 (f + T(f))` (Feydy et al. 2019), which converges in a few iterations where alternating
    updates on a self-problem can take thousands; the cross problem alternates as in :func:`sinkhorn`. So at a fixed,
    unconverged ``max_iter`` the self terms differ from an alternating solver's (POT's, the released SAT code's); at
    convergence they are the same.

    Parameters
    ----------
    x : (B, n, d) or (n, d) tensor
        E.g. clean logits. Same conventions as :func:`sinkhorn`.
    y : (B, m, d) or (m, d) tensor
        E.g. adversarial logits.
    a, b : (B, n) / (n,) and (B, m) / (m,) tensors, optional
        Weights, default uniform; equal total mass.
    reg : float
        :math:`\varepsilon` (the paper's :math:`\sigma`).
    cost : {"sqeuclidean", "euclidean"} or callable
        Ground cost; the paper uses the squared Euclidean one.
    value : {"entropic", "transport"}
        Which OT value is debiased (above).
    max_iter : int
        Iterations bound; the paper runs 50.
    tol : float, optional
        Marginal-error tolerance, as in :func:`sinkhorn` (default by dtype).

    Returns
    -------
    DivergenceResult
        ``divergence`` (B,) (a scalar for unbatched inputs), differentiable w.r.t. ``x``, ``y`` (and the weights), the
        three terms, and the diagnostics of the three solves. Float32 for float16 or bfloat16 points (SAT's logits
        under ``--amp``), solved with autocast off (:mod:`kit.ot.precision`).
    """
    reg, max_iter, tol = _check_options(reg, max_iter, tol)
    cost_fn = _as_cost(cost)
    try:
        kind = DivergenceValue(value)
    except ValueError:
        raise UserError(f"unknown divergence value {value!r}; known: "
                        f"{', '.join(v.value for v in DivergenceValue)}") from None
    mode = GradMode.ENVELOPE if kind is DivergenceValue.ENTROPIC else GradMode.UNROLLED
    xb, yb, batched = _prepare_points(x, y)
    batch, n, m = xb.shape[0], xb.shape[1], yb.shape[1]
    aw, bw = _weights("a", a, batch, n, xb), _weights("b", b, batch, m, xb)
    _check_masses(aw, bw)
    tol = _resolve_tol(tol, xb.dtype)
    size = max(n, m)
    xp, la, ap = _pad(xb, _log_weights(aw), aw, size)
    yp, lb, bp = _pad(yb, _log_weights(bw), bw, size)
    # the problems (x, y), (x, x), (y, y) stacked along the batch axis
    src, tgt = torch.cat([xp, xp, yp]), torch.cat([yp, xp, yp])
    c = _cost_matrix(cost_fn, src, tgt)
    res, entropic = _solve(c, torch.cat([ap, ap, bp]), torch.cat([bp, ap, bp]), torch.cat([la, la, lb]),
                           torch.cat([lb, la, lb]), reg, max_iter, tol, mode, n_sym=2 * batch)
    w = (entropic if kind is DivergenceValue.ENTROPIC else res.transport_cost).view(3, batch)
    div = w[0] - 0.5 * (w[1] + w[2])
    err = res.marginal_error.view(3, batch).amax(0)
    conv = res.converged.view(3, batch).all(0)
    _warn_not_converged(conv, err, max_iter, tol, "Sinkhorn divergence")
    out = DivergenceResult(divergence=div, cross=w[0], self_x=w[1], self_y=w[2], n_iter=res.n_iter.view(3, batch).T,
                           marginal_error=err, converged=conv)
    if not batched:
        for name in ("divergence", "cross", "self_x", "self_y", "n_iter", "marginal_error", "converged"):
            setattr(out, name, getattr(out, name)[0])
    return out
