r"""Projected Sinkhorn: approximate Euclidean projection onto a Wasserstein ball of images with local transport plans.

Wong, Schmidt & Kolter, "Wasserstein adversarial examples via projected Sinkhorn iterations", ICML 2019 (seed
``002_7913be17f57a5a98.txt``): Equation (6), Lemma 1 (the dual), Lemma 2 (primal recovery), Algorithm 2 and §4.3
(local k x k plans, one cost per channel, no transport across channels).

**Problem.** Each example is divided by its mass :math:`m = \sum_{c,h,w} x` (the *unit-mass scale*:
:math:`\hat x = x/m`, :math:`\hat w = w/m`, pixel cap :math:`u = 1/m`). With the local plan :math:`\Pi` of
:mod:`kit.ot.local` (shape (N, C, k*k, H, W)) and the offset costs :math:`C` (:func:`~kit.ot.local.local_cost`),

.. math::

    \min_{z,\ \Pi \ge 0}\ \frac{\lambda}{2}\|\hat w - z\|_2^2 + \sum \Pi \log \Pi
    \quad \text{s.t.}\quad \Pi \mathbf 1 = \hat x,\ \ \Pi^\top \mathbf 1 = z,\ \ \langle \Pi, C\rangle \le \varepsilon,
    \ \ z \le u ,

which is the paper's Equation (6) multiplied by :math:`\lambda` plus the box :math:`z \le u` (images stay in [0, 1];
:math:`z \ge 0` holds for any plan). Its dual (Lemma 1, with the box) is

.. math::

    g(\alpha, \beta, \psi) = -\psi\varepsilon + \alpha^\top \hat x + \sum_j h_j(\beta_j)
        - \sum_{ij} e^{\alpha_i + \beta_j - \psi C_{ij} - 1},
    \qquad h_j(\beta) = \min_{0 \le z \le u_j} \tfrac{\lambda}{2}(\hat w_j - z)^2 + \beta z ,

:math:`h_j(\beta) = \beta\hat w_j - \beta^2/(2\lambda)` while :math:`0 \le \hat w_j - \beta/\lambda \le u_j`
(the paper's term), :math:`\tfrac{\lambda}{2}(\hat w_j - u_j)^2 + \beta u_j` above the cap and
:math:`\tfrac{\lambda}{2}\hat w_j^2` below 0. The primal solution is
:math:`\Pi_{ij} = e^{\alpha_i + \beta_j - \psi C_{ij} - 1}`, :math:`z = \Pi^\top\mathbf 1` (Lemma 2).

**Iteration** (block coordinate ascent on :math:`g`, all in the log domain; after one initial α step each iteration
runs the β, α and ψ steps in that order, the α step and the per-offset masses of step 3 sharing one pass of
exponentials over the k*k shifted views of the image; exponentials below the smallest normal number are floored, a
relative 1e-35 in float32, because subnormal results are an order of magnitude slower on CPUs):

1. :math:`\alpha_i = \log \hat x_i - \log\sum_j e^{\beta_j - \psi C_{ij} - 1}` (Sinkhorn's row update; ``-inf`` where
   :math:`\hat x_i = 0`);
2. with :math:`\log s_j = \log\sum_i e^{\alpha_i - \psi C_{ij} - 1}` and :math:`L_j = \log\lambda + \lambda\hat w_j +
   \log s_j`, the paper's Lambert-W step :math:`\beta_j = \lambda\hat w_j - W(e^{L_j})` is evaluated as
   :math:`\beta_j = \log W(e^{L_j}) - \log\lambda - \log s_j` (the same number, by :math:`W + \log W = L`, without the
   cancellation of two numbers of size :math:`\lambda\hat w_j` and without forming :math:`e^{L_j}`:
   :func:`~kit.ot.lambertw.log_lambertw_exp`). Then :math:`z_j = e^{\beta_j}s_j = W(e^{L_j})/\lambda`. **Box
   (deviation from the paper, which clamps after the projection and so loses mass and breaks the radius):**
   :math:`z_j = e^{\beta_j}s_j` increases with :math:`\beta_j` while :math:`\hat w_j - \beta_j/\lambda` decreases, so
   the box-constrained maximiser is the Lambert-W solution unless it puts :math:`z_j` above :math:`u_j`, in which case
   :math:`\beta_j = \log(u_j/s_j)`: :math:`\log z_j = \min(\log W(e^{L_j}), \log \lambda u_j) - \log\lambda`;
3. :math:`\psi`: the paper takes one Newton step on :math:`\partial g/\partial\psi` with a halving line search keeping
   :math:`\psi \ge 0`. **Deviation:** we maximise :math:`g` over :math:`\psi \ge 0` exactly. With
   :math:`A_o = \sum_{c,i} e^{\alpha_i + \beta_{i+o} - 1}` (one number per offset), :math:`g(\psi) = -\psi\varepsilon -
   \sum_o A_o e^{-\psi C_o} + \text{const}`, so the maximiser is :math:`\psi = 0` if the plan's cost at
   :math:`\psi = 0` is within :math:`\varepsilon`, else the root of :math:`\log\sum_o C_o A_o e^{-\psi C_o} = \log
   \varepsilon` (convex and decreasing in :math:`\psi`), found by safeguarded Newton steps clamped at
   :math:`\psi \ge 0` on (N, k*k) numbers only. This is still block coordinate ascent and makes each iteration a little
   more effective than a single Newton step.

**Over-relaxation (deviation, ``relax``).** Sinkhorn on local kernels is slow at the large λ we want (below), so the α
and β updates are over-relaxed, :math:`\alpha \leftarrow \alpha + \omega(\alpha^{new} - \alpha)` and the same for
β, with ω = 1.6 by default (Thibault, Chizat, Dossal & Papadakis 2017, "Overrelaxed Sinkhorn-Knopp algorithm"): it
roughly halves the iterations on our tests. Safeguard: an example whose dual objective ever decreases continues with
ω = 1 (plain block ascent, monotone). ``relax=1`` is the paper's iteration.

Convergence is judged per example on the dual: an example has converged when, in an iteration of its final
regularisation stage, its dual objective rose by at most ``tol * max(1, |g|)`` and the β step moved its row sums by at
most ``marginal_tol`` (L1, unit mass). Converged examples leave the active batch, so they stop costing work.
``max_iter`` is a hard bound.

**Regularisation.** The entropic projection is biased: its plan spreads mass (the entropy term), spends budget on
moving mass back and forth, and its output differs from the input even inside the ball. The bias shrinks as
:math:`\lambda` grows. With ``reg_scale="mass"`` (the default) :math:`\lambda = \text{reg}\cdot m` per example: in
original pixels the problem is :math:`\frac{\lambda}{2m}\|w - z\|^2 + \sum P\log P` for the plan :math:`P = m\Pi`, so
this keeps the trade-off the same for images of any size and brightness (the paper's fixed :math:`\lambda = 1000` on
MNIST, :math:`m \approx 100`, is ``reg`` about 10; 3000 on CIFAR-10, :math:`m \approx 1500`, about 2).
``reg_scale="absolute"`` uses :math:`\lambda = \text{reg}` as in the paper. The default ``reg=500`` is chosen for
*budget use* (exact distance of the output / eps where the radius binds, POT's exact solver): >= 0.96 on dense random
images far apart and on a small L-inf step (4/255) projected at about half the distance it needs, where the paper's
setting (λ = 1000 absolute on 28x28, about ``reg=2.5``) gives 0.2-0.7: its plan spends the budget moving mass back and
forth. ``reg=100`` gives about 1.0 and 0.65 on those two, ``reg=1000`` about 1.0 and 0.997 at twice the iterations of
500 (figures in ``bench/ot_projection.py``). Large :math:`\lambda` makes Sinkhorn slow,
so a cold start anneals :math:`\lambda` (epsilon scaling): it starts at ``reg_start`` (same scale) and multiplies by
``reg_factor`` whenever the stage's marginal error is ``<= stage_tol`` or the stage used its share of
``max_iter``, rescaling :math:`\beta, \psi` (which grow like :math:`\lambda`). A warm start (``warm=``, the duals of a
previous call) starts at the final :math:`\lambda` directly.

**Already inside** (``check_inside``). Where ``w`` has the channel masses of ``x`` and lies in [0, 1] it may be in
the ball already, and then the answer is ``w`` itself, which the entropic problem misses by its bias. Those examples
first run the same iteration with the exact column update :math:`\beta_j = \log \hat w_j - \log s_j` (a Sinkhorn with a
budget, over-relaxed, at most 200 iterations); if the resulting feasible plan lands within ``inside_atol`` of ``w``
in every pixel, it is returned (so its target, ``w`` to that tolerance, with a cost ``<= eps``), otherwise the example
is projected.

**Output (feasible by construction).** From the final duals the plan is rebuilt with exact row sums
:math:`\Pi\mathbf 1 = \hat x` (the α step; the stay-in-place entry of each row takes what the moves leave, which
also absorbs rounding). Then, **deviation** (the paper returns :math:`\hat w - \beta/\lambda` and its iterates are only
approximately feasible): (a) *box repair* — where a column exceeds its cap, the excess is taken proportionally from
the mass moved *into* that pixel and left at its source pixel instead (rows stay exact, the cost only decreases; a few
passes settle the rare chains of neighbouring saturated pixels); (b) *budget repair* — if the cost still exceeds
:math:`\varepsilon` (the iteration can end slightly infeasible), the plan is mixed with the identity plan,
:math:`\Pi \leftarrow (1-\theta)\Pi + \theta\,\mathrm{diag}(\hat x)` with :math:`1 - \theta = \varepsilon /
\langle\Pi, C\rangle`, which keeps the rows and the box (:math:`\hat x \le u`). The returned image is exactly
:math:`m\,\Pi^\top\mathbf 1` (clamped to [0, 1] only against rounding, at the ulp level), so its mass is that of
``x`` and the reported cost :math:`\langle\Pi, C\rangle` (unit-mass scale) is a true upper bound of its exact distance.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from kit.errors import UserError
from kit.ot.lambertw import log_lambertw_exp
from kit.ot.local import check_kernel_size, local_cost, neighbours, plan_cost, target_marginal

__all__ = ["ProjectionConvergenceWarning", "ProjectionDuals", "ProjectionResult", "dual_objective",
           "primal_objective", "project_wasserstein"]

_NEG = float("-inf")


class ProjectionConvergenceWarning(RuntimeWarning):
    """Projected Sinkhorn stopped at ``max_iter`` before its dual objective settled for some example."""


@dataclass
class ProjectionDuals:
    r"""Dual variables of the unit-mass problem, for a warm start (all detached).

    Attributes
    ----------
    alpha, beta : (N, C, H, W) tensors
        Row and column log-scalings (``alpha`` is ``-inf`` where the source pixel is empty).
    psi : (N,) tensor
        Multiplier of the budget constraint (in units of :math:`\lambda`).
    lam : (N,) tensor
        The regularisation :math:`\lambda` these duals belong to.
    """

    alpha: torch.Tensor
    beta: torch.Tensor
    psi: torch.Tensor
    lam: torch.Tensor

    def select(self, idx: torch.Tensor) -> ProjectionDuals:
        """The duals of the examples ``idx`` (a subset of the batch, e.g. those still attacked)."""
        return ProjectionDuals(self.alpha[idx], self.beta[idx], self.psi[idx], self.lam[idx])


@dataclass
class ProjectionResult:
    """What :func:`project_wasserstein` returns, one entry per example.

    Attributes
    ----------
    z : (N, C, H, W) tensor
        The projected image, original scale, in [0, 1], with the mass of ``x`` in every channel.
    cost : (N,) tensor
        :math:`\\langle \\Pi, C\\rangle` of the returned plan in the unit-mass scale: an upper bound of the exact
        distance between ``x`` and ``z`` and at most ``eps * (1 + 1e-3)`` (in practice ``eps`` to rounding).
    iterations : (N,) int64 tensor
        Iterations run (all regularisation stages together).
    converged : (N,) bool tensor
        The dual settled (relative rise ``<= tol``) before ``max_iter``.
    dual : (N,) tensor
        The last dual objective :math:`g` (λ-scaled, unit-mass problem).
    marginal_error : (N,) tensor
        L1 error of the last iterate's row sums before its row update (unit mass; 0 for examples solved without
        iterating). The returned plan's rows are exact whatever it is.
    duals : ProjectionDuals
        For a warm start of the next call.
    mass : (N,) tensor
        :math:`m`, the mass of each example of ``x``.
    plan : (N, C, k*k, H, W) tensor or None
        With ``return_plan=True``: the plan in the unit-mass scale; ``source_marginal(plan) * m == x`` and
        ``target_marginal(plan) * m == z`` (to rounding).
    """

    z: torch.Tensor
    cost: torch.Tensor
    iterations: torch.Tensor
    converged: torch.Tensor
    dual: torch.Tensor
    marginal_error: torch.Tensor
    duals: ProjectionDuals
    mass: torch.Tensor
    plan: torch.Tensor | None = None


class _Geometry:
    """Offsets of a k x k window and their costs; shifted views of ``-inf``-padded images (no mass outside)."""

    def __init__(self, h: int, w: int, k: int, p: float, device: torch.device, dtype: torch.dtype) -> None:
        self.k, self.kk, self.centre = k, k * k, (k * k) // 2
        self.cost = local_cost(k, p, device=device, dtype=dtype)  # (kk,)
        self.cost5 = self.cost.view(1, 1, -1, 1, 1)
        self.log_cost = torch.log(self.cost)  # -inf at the centre
        self.offsets = [(o // k, o % k) for o in range(k * k)]  # top-left corner of each shifted view

    def pad(self, v: torch.Tensor) -> torch.Tensor:
        """(n, c, H, W) -> (n, c, H + 2r, W + 2r) padded with ``-inf`` (no mass outside the image)."""
        r = self.k // 2
        return F.pad(v, (r, r, r, r), value=_NEG)

    def shifted(self, vp: torch.Tensor, o: int) -> torch.Tensor:
        """View of ``v[i + d(o)]`` for every pixel i, from the padded ``vp`` (``-inf`` where it leaves the image)."""
        a, b = self.offsets[o]
        return vp[:, :, a:a + vp.shape[2] - self.k + 1, b:b + vp.shape[3] - self.k + 1]

    def nb(self, vp: torch.Tensor) -> torch.Tensor:
        """Masked neighbours from the padded ``vp``: (n, c, kk, H, W), ``-inf`` where the offset leaves the image."""
        return torch.stack([self.shifted(vp, o) for o in range(self.kk)], 2)

    def lse_window(self, vp: torch.Tensor, psi: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor], torch.Tensor]:
        r""":math:`\log\sum_o e^{v_{i + d(o)} - \psi C_o}` for every pixel i: (n, c, H, W).

        A log-domain "convolution" over the window, in two passes over the k*k shifted views (exact maximum
        :math:`m_i`, then the shifted sum) without stacking an (n, c, k*k, H, W) tensor. Because the cost and the
        validity of an offset are symmetric, the sum over the sources j of a target i is this same sum. Returns
        (lse, terms, m) with the list of :math:`e^{v_{i+d(o)} - \psi C_o - m_i}` per offset.
        """
        pc = psi.view(-1, 1, 1, 1) * self.cost  # (n, 1, 1, kk)
        shifted = [self.shifted(vp, o) - pc[..., o:o + 1] for o in range(self.kk)]
        m = shifted[0]
        for t in shifted[1:]:
            m = torch.maximum(m, t)
        m0 = m
        m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
        # Terms below e^floor of the largest are raised to e^floor (a relative 1e-35 in float32, 1e-304 in float64):
        # harmless, and exp then never produces subnormal numbers, which are ~40x slower on CPUs.
        floor = _exp_floor(m.dtype)
        terms = [torch.sub(t, m).clamp_(min=floor).exp_() for t in shifted]
        acc = terms[0].clone()
        for t in terms[1:]:
            acc += t
        # where no offset holds any mass (every term was -inf, now e^floor) the sum is -inf
        lse = torch.where(torch.isfinite(m0), m + torch.log(acc), m0)
        return lse, terms, m


def _exp_floor(dtype: torch.dtype) -> float:
    """The most negative argument whose exponential is still a normal number of ``dtype`` (with a margin)."""
    return math.log(torch.finfo(dtype).tiny) + 8.0


def _h_beta(beta: torch.Tensor, wh: torch.Tensor, u: torch.Tensor, lam: torch.Tensor) -> torch.Tensor:
    """:math:`\\sum_j h_j(\\beta_j)` per example (the box-constrained conjugate term of the dual)."""
    zt = wh - beta / lam
    inside = beta * wh - beta * beta / (2 * lam)
    above = lam / 2 * (wh - u) ** 2 + beta * u
    below = lam / 2 * wh * wh
    return torch.where(zt > u, above, torch.where(zt < 0, below, inside)).sum((1, 2, 3))


def _lam5(lam: torch.Tensor) -> torch.Tensor:
    return lam.view(-1, 1, 1, 1)


def _alpha_step(geo: _Geometry, bp: torch.Tensor, psi: torch.Tensor, logx: torch.Tensor, xpos: torch.Tensor,
                xh: torch.Tensor, alpha_prev: torch.Tensor | None = None, omega: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    r"""Row update from the padded beta ``bp``, and the per-offset masses for the ψ step, from the same exponentials.

    Returns (alpha, log_a, r): :math:`r_i = \log\sum_o e^{\beta_{i+o} - \psi C_o - 1}`, the row update
    :math:`\alpha_i = \log\hat x_i - r_i` (over-relaxed from ``alpha_prev`` by ``omega`` per example when given), and
    :math:`\log A_o = \log\sum_{c,i} e^{\alpha_i + \beta_{i+o} - 1}` (n, kk) for that alpha. Without relaxation the
    plan has exact rows, :math:`\Pi_{i,o} = \hat x_i\, t_{i,o} / \sum_{o'} t_{i,o'}` with the terms
    :math:`t_{i,o}` of :meth:`_Geometry.lse_window`, so :math:`A_o = e^{\psi C_o}\sum_i \Pi_{i,o}` needs no further
    exponentials; relaxation rescales row i by :math:`e^{\alpha_i - \alpha^{new}_i}`.
    """
    lse, terms, m = geo.lse_window(bp, psi)
    alpha = torch.where(xpos, logx - (lse - 1.0), _NEG)
    acc = torch.exp(lse - m)  # sum_o t_io, in [1, kk] wherever the window holds any mass
    weight = torch.where(acc > 0, xh / acc.clamp_min(1.0), torch.zeros_like(xh))
    if omega is not None and alpha_prev is not None:
        relaxed = torch.where(xpos, alpha_prev + omega.view(-1, 1, 1, 1) * (alpha - alpha_prev), alpha)
        weight = weight * torch.where(xpos, torch.exp(relaxed - alpha), torch.zeros_like(xh))
        alpha = relaxed
    moved = torch.stack([(t * weight).flatten(1).sum(1) for t in terms], 1)  # (n, kk): mass per offset
    log_a = torch.log(moved) + psi[:, None] * geo.cost
    return alpha, log_a, lse - 1.0


def _row_error(alpha_old: torch.Tensor, r: torch.Tensor, xh: torch.Tensor, xpos: torch.Tensor) -> torch.Tensor:
    """L1 error of the rows of the plan (alpha_old, beta, psi) before the row update, per example (unit mass)."""
    return torch.where(xpos, (torch.exp(alpha_old + r) - xh).abs(), torch.zeros_like(xh)).sum((1, 2, 3))


def _beta_step(geo: _Geometry, alpha: torch.Tensor, psi: torch.Tensor, wh: torch.Tensor, u: torch.Tensor,
               lam: torch.Tensor) -> torch.Tensor:
    """Box-constrained Lambert-W column update (see the module docstring)."""
    log_s = geo.lse_window(geo.pad(alpha), psi)[0] - 1.0
    lam4 = _lam5(lam)
    log_lam = torch.log(lam4)
    reached = torch.isfinite(log_s)
    log_s0 = torch.where(reached, log_s, torch.zeros_like(log_s))
    y = log_lambertw_exp(log_lam + lam4 * wh + log_s0)
    log_z = torch.minimum(y, torch.log(lam4 * u)) - log_lam
    # a pixel no source mass can reach gets z = 0; any beta >= lam * w is then optimal
    return torch.where(reached, log_z - log_s0, lam4 * wh)


def _log_offset_mass(geo: _Geometry, alpha: torch.Tensor, bp: torch.Tensor) -> torch.Tensor:
    """:math:`\\log A_o = \\log\\sum_{c,i} e^{\\alpha_i + \\beta_{i+o} - 1}` per example and offset: (n, kk)."""
    return torch.stack([torch.logsumexp((alpha + geo.shifted(bp, o)).flatten(1), 1) for o in range(geo.kk)], 1) - 1.0


def _psi_step(geo: _Geometry, log_a: torch.Tensor, psi: torch.Tensor, eps: torch.Tensor, max_newton: int = 50
              ) -> torch.Tensor:
    """Exact maximisation of g over psi >= 0 given alpha, beta (safeguarded Newton on log cost(psi) = log eps)."""
    lc0 = torch.logsumexp(log_a + geo.log_cost, 1)  # log cost at psi = 0
    log_eps = torch.log(eps)
    active = lc0 > log_eps
    p = torch.where(active, psi, torch.zeros_like(psi))
    rtol = 64 * torch.finfo(psi.dtype).eps
    for _ in range(max_newton):
        lw = log_a + geo.log_cost - p[:, None] * geo.cost  # (n, kk)
        lc = torch.logsumexp(lw, 1)
        mean_c = (torch.softmax(lw, 1) * geo.cost).sum(1)  # -d log cost / d psi
        step = (lc - log_eps) / mean_c.clamp_min(torch.finfo(psi.dtype).tiny)
        p_new = torch.where(active & torch.isfinite(step), (p + step).clamp_min(0.0), p)
        active = active & ((p_new - p).abs() > rtol * (1.0 + p))  # settled examples stop (batch independence)
        p = p_new
        if not bool(active.any()):
            break
    return p


def _dual(geo: _Geometry, alpha, beta, psi, log_a, xh, wh, u, lam, eps) -> torch.Tensor:
    """g(alpha, beta, psi) per example, from the per-offset masses log_a of (alpha, beta)."""
    ax = torch.where(xh > 0, alpha * xh, torch.zeros_like(xh)).sum((1, 2, 3))
    total = torch.exp(torch.logsumexp(log_a - psi[:, None] * geo.cost, 1))
    return -psi * eps + ax + _h_beta(beta, wh, u, _lam5(lam)) - total


def _check_inputs(x: torch.Tensor, w: torch.Tensor, eps) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    if not isinstance(x, torch.Tensor) or x.dim() != 4 or not x.is_floating_point():
        raise UserError(f"x must be a floating (N, C, H, W) tensor, got {getattr(x, 'shape', type(x))}")
    if not isinstance(w, torch.Tensor) or w.shape != x.shape:
        raise UserError(f"w must have the shape of x {tuple(x.shape)}, got {tuple(getattr(w, 'shape', ()))}")
    if not torch.isfinite(x).all():
        raise UserError("x contains NaN or infinite values")
    if x.numel() and (x.min() < 0 or x.max() > 1):
        raise UserError(f"x must lie in [0, 1] (mass cannot be negative), got [{x.min().item():.4g}, "
                        f"{x.max().item():.4g}]")
    w = w.detach().to(device=x.device, dtype=x.dtype)
    if not torch.isfinite(w).all():
        raise UserError("w contains NaN or infinite values")
    n = x.shape[0]
    if isinstance(eps, torch.Tensor):
        if eps.shape not in ((n,), ()):
            raise UserError(f"eps must be a number or a ({n},) tensor, got shape {tuple(eps.shape)}")
        e = eps.detach().to(device=x.device, dtype=x.dtype).expand(n).clone()
    else:
        if isinstance(eps, bool) or not isinstance(eps, (int, float)):
            raise UserError(f"eps must be a number or a tensor, got {eps!r}")
        e = torch.full((n,), float(eps), device=x.device, dtype=x.dtype)
    if torch.isnan(e).any() or (e < 0).any() or torch.isinf(e).any():
        raise UserError("eps must be finite and >= 0")
    return x.detach(), w, e


def _rows_exact_plan(geo: _Geometry, bp: torch.Tensor, psi: torch.Tensor, xh: torch.Tensor, logx: torch.Tensor,
                     xpos: torch.Tensor) -> torch.Tensor:
    """The plan of the duals after an alpha step, with row sums exactly ``xh``: the stay-in-place entry of each row
    takes what the moves leave (which also absorbs rounding)."""
    cen = geo.centre
    t = geo.nb(bp) - psi.view(-1, 1, 1, 1, 1) * geo.cost5 - 1.0
    alpha = torch.where(xpos, logx - torch.logsumexp(t, 2), _NEG)
    plan = torch.exp(alpha.unsqueeze(2) + t)
    plan[:, :, cen] = 0.0
    off = plan.sum(2)
    tiny = torch.finfo(xh.dtype).tiny
    plan = plan * torch.where(off > xh, xh / off.clamp_min(tiny), torch.ones_like(xh)).unsqueeze(2)
    plan[:, :, cen] = (xh - plan.sum(2)).clamp_min(0.0)
    return plan


def _cap_columns(geo: _Geometry, plan: torch.Tensor, cap: torch.Tensor, passes: int = 50) -> torch.Tensor:
    """Box repair: where a column exceeds ``cap``, take the excess proportionally from the mass moved *into* that
    pixel and leave it at its source pixel instead. Rows are unchanged, the cost can only decrease. Returns the plan;
    a column may still exceed its cap after ``passes`` passes (the caller checks)."""
    cen = geo.centre
    tiny = torch.finfo(plan.dtype).tiny
    slack = 4 * torch.finfo(plan.dtype).eps
    for _ in range(passes):
        z = target_marginal(plan)
        excess = z - cap
        over = excess > slack * cap
        if not bool(over.any()):
            break
        inflow = z - plan[:, :, cen]
        keep = torch.where(over, (1.0 - excess / inflow.clamp_min(tiny)).clamp(0.0, 1.0), torch.ones_like(z))
        moved = plan * (1.0 - neighbours(keep, geo.k))
        moved[:, :, cen] = 0.0
        plan = plan - moved
        plan[:, :, cen] += moved.sum(2)
    return plan


def _finalise(geo: _Geometry, bp: torch.Tensor, psi: torch.Tensor, xh: torch.Tensor, u: torch.Tensor,
              eps: torch.Tensor, logx: torch.Tensor, xpos: torch.Tensor) -> torch.Tensor:
    """Feasible plan (n, c, kk, H, W) from final duals: exact rows, box repair, budget repair (module docstring)."""
    plan = _cap_columns(geo, _rows_exact_plan(geo, bp, psi, xh, logx, xpos), u)
    cost = plan_cost(plan, geo.cost)
    shrink = torch.where(cost > eps, eps / cost.clamp_min(torch.finfo(xh.dtype).tiny), torch.ones_like(cost))
    if bool((shrink < 1).any()):  # mix with the identity plan: rows and box kept, cost scaled to eps
        plan = plan * shrink.view(-1, 1, 1, 1, 1)
        plan[:, :, geo.centre] = 0.0
        plan[:, :, geo.centre] = (xh - plan.sum(2)).clamp_min(0.0)
    return plan


def _certify_inside(geo: _Geometry, xh: torch.Tensor, wh: torch.Tensor, u: torch.Tensor, m4: torch.Tensor,
                    eps: torch.Tensor, logx: torch.Tensor, xpos: torch.Tensor, max_iter: int, atol: float,
                    omega: float = 1.8, check_every: int = 25) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    r"""Try to show that ``wh`` (with the channel masses of ``xh``) lies in the ball, i.e. find a plan from ``xh`` to
    (within ``atol`` in original pixels of) ``wh`` with cost at most ``eps``.

    The projection's iteration with the β step replaced by the exact column update :math:`\beta_j = \log\hat w_j -
    \log s_j` (no quadratic term, hence no λ and no entropic pull away from ``w``): block coordinate ascent for the
    most entropic plan between the two images within the budget (ψ grows without bound when there is none),
    over-relaxed (:math:`\alpha \leftarrow \alpha + \omega(\alpha^{new} - \alpha)`, the same for β, ω = 1.8;
    Thibault et al. 2017, "Overrelaxed Sinkhorn-Knopp"), which cuts the iterations several-fold here. Nothing is
    trusted from the iteration itself: every ``check_every`` iterations and at the end the plan is made feasible
    exactly like a projection's (:func:`_finalise`: exact rows, box, budget), and an example is certified when that
    plan's target is within ``atol`` of ``w`` everywhere. Returns (certified (n,) bool, plan, iterations (n,)).
    """
    dt = xh.dtype
    n = xh.shape[0]
    log_w = torch.log(wh.clamp_min(torch.finfo(dt).tiny))
    psi = torch.zeros(n, device=xh.device, dtype=dt)
    bp = geo.pad(torch.zeros_like(xh))
    iters = torch.zeros(n, dtype=torch.long, device=xh.device)
    alpha = _alpha_step(geo, bp, psi, logx, xpos, xh)[0]
    beta = None

    def check() -> tuple[torch.Tensor, torch.Tensor]:
        ok = torch.isfinite(psi) & torch.isfinite(alpha).logical_or(~xpos).flatten(1).all(1)
        safe = torch.where(ok, psi, torch.zeros_like(psi))
        plan = _finalise(geo, torch.where(ok.view(-1, 1, 1, 1), bp, geo.pad(torch.zeros_like(xh))), safe, xh, u, eps,
                         logx, xpos)
        dev = ((target_marginal(plan) - wh) * m4).abs().amax((1, 2, 3))
        return ok & (dev <= atol), plan

    for it in range(1, max_iter + 1):
        log_s = geo.lse_window(geo.pad(alpha), psi)[0] - 1.0
        beta_new = log_w - torch.where(torch.isfinite(log_s), log_s, torch.zeros_like(log_s))
        beta = beta_new if beta is None else beta + omega * (beta_new - beta)
        bp = geo.pad(beta)
        alpha_new, log_a, _ = _alpha_step(geo, bp, psi, logx, xpos, xh)
        alpha = torch.where(xpos, alpha + omega * (alpha_new - alpha), alpha_new)
        psi = _psi_step(geo, log_a, psi, eps)
        iters += 1
        if not bool(torch.isfinite(psi).all()):
            break
        if it % check_every == 0 and bool(check()[0].all()):
            break
    certified, plan = check()
    return certified, plan, iters


@torch.no_grad()
def project_wasserstein(
    w: torch.Tensor,
    x: torch.Tensor,
    eps: float | torch.Tensor,
    *,
    kernel_size: int = 5,
    p: float = 2,
    reg: float = 500.0,
    reg_scale: str = "mass",
    reg_start: float | None = 1.0,
    reg_factor: float = 4.0,
    max_iter: int = 2000,
    tol: float = 1e-5,
    marginal_tol: float = 1e-3,
    stage_tol: float = 1e-2,
    relax: float = 1.6,
    warm: ProjectionDuals | None = None,
    check_inside: bool = True,
    inside_atol: float = 1e-3,
    return_plan: bool = False,
) -> ProjectionResult:
    r"""Project ``w`` onto the Wasserstein ball of radius ``eps`` around ``x`` (projected Sinkhorn, see the module).

    Parameters
    ----------
    w : (N, C, H, W) tensor
        The point to project (any finite values, e.g. ``x`` plus a gradient step).
    x : (N, C, H, W) tensor in [0, 1]
        Centres of the balls.
    eps : float or (N,) tensor
        Radii in the unit-mass scale (cost of moving all the mass one pixel = 1), >= 0.
    kernel_size : int
        Odd window size k of the local plans (paper: 5).
    p : float
        The cost of an offset is its p-norm (paper: 2).
    reg : float
        Entropic regularisation; :math:`\lambda = \text{reg}\cdot m` (``reg_scale="mass"``) or :math:`\lambda =
        \text{reg}` (``"absolute"``, the paper's convention). Larger is closer to the exact projection and slower.
    reg_start, reg_factor : float
        Cold starts anneal :math:`\lambda` from ``reg_start`` (same scale as ``reg``) by ``reg_factor`` per stage;
        ``reg_start=None`` runs at ``reg`` from the start.
    max_iter : int
        Hard bound on the iterations of every example (all stages).
    tol, marginal_tol : float
        Convergence: in one iteration the dual objective rose by at most ``tol * max(1, |g|)`` and the β step moved
        the row sums by at most ``marginal_tol`` (L1, unit mass). The second guard matters at large λ, where the
        dual is flat and rises slowly long before the plan is right.
    stage_tol : float
        An intermediate annealing stage ends when its marginal error is ``<= stage_tol``.
    relax : float
        Over-relaxation ω of the α and β updates, in [1, 2) (1 = the paper's plain block ascent; see the module).
    warm : ProjectionDuals, optional
        Duals of a previous call on the same batch (``result.duals``): starts from them at the final
        :math:`\lambda`, without annealing.
    check_inside : bool
        First try to show that ``w`` is already in the ball (:func:`_certify_inside`; only where ``w`` lies in [0, 1]
        with the channel masses of ``x``; at most 200 iterations). Such examples come back as ``w`` to within
        ``inside_atol`` per pixel, with a plan of cost ``<= eps``; the others are projected. (The entropic projection
        itself would move such a point by a few 1/λ: the pull of the entropy term.)
    inside_atol : float
        Largest change per pixel (original scale) that still counts as "returned unchanged".
    return_plan : bool
        Also return the (N, C, k*k, H, W) plan (unit-mass scale).

    Returns
    -------
    ProjectionResult
    """
    x, w, eps_v = _check_inputs(x, w, eps)
    k = check_kernel_size(kernel_size)
    if reg_scale not in ("mass", "absolute"):
        raise UserError(f"reg_scale must be 'mass' or 'absolute', got {reg_scale!r}")
    if isinstance(relax, bool) or not isinstance(relax, (int, float)) or not 1.0 <= relax < 2.0:
        raise UserError(f"relax must be a number in [1, 2), got {relax!r}")
    for name, v, low in (("reg", reg, 0.0), ("reg_factor", reg_factor, 1.0), ("tol", tol, 0.0),
                         ("reg_start", 1.0 if reg_start is None else reg_start, 0.0)):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= low:
            raise UserError(f"{name} must be a finite number > {low:g}, got {v!r}")
    if isinstance(max_iter, bool) or not isinstance(max_iter, int) or max_iter < 1:
        raise UserError(f"max_iter must be an integer >= 1, got {max_iter!r}")

    orig_dtype = x.dtype
    if x.dtype in (torch.float16, torch.bfloat16):  # too coarse for the log domain: compute in float32
        x, w, eps_v = x.float(), w.float(), eps_v.float()
    dt, dev = x.dtype, x.device
    n, c, h, wd = x.shape
    geo = _Geometry(h, wd, k, p, dev, dt)

    mass = x.sum((1, 2, 3))
    m4 = mass.clamp_min(torch.finfo(dt).tiny).view(-1, 1, 1, 1)
    xh_all, wh_all, u_all = x / m4, w / m4, (1.0 / m4).expand_as(x)
    scale = mass if reg_scale == "mass" else torch.ones_like(mass)
    lam_final = (reg * scale).clamp_min(torch.finfo(dt).tiny)

    # outputs
    alpha_out = torch.full_like(x, _NEG)
    beta_out = torch.zeros_like(x)
    psi_out = torch.zeros(n, device=dev, dtype=dt)
    iters = torch.zeros(n, dtype=torch.long, device=dev)
    converged = torch.zeros(n, dtype=torch.bool, device=dev)
    dual_out = torch.full((n,), float("nan"), device=dev, dtype=dt)
    err_out = torch.zeros(n, device=dev, dtype=dt)
    lam_out = lam_final.clone()
    plan_out = torch.zeros(n, c, geo.kk, h, wd, device=dev, dtype=dt)

    # trivial examples: empty image, zero radius, or w == x: the answer is x with the identity plan
    trivial = (mass <= 0) | (eps_v <= 0) | (w == x).flatten(1).all(1)
    inside = torch.zeros_like(trivial)
    converged |= trivial
    plan_out[:, :, geo.centre] = torch.where(trivial.view(-1, 1, 1, 1), xh_all, torch.zeros_like(xh_all))

    if warm is not None:
        if (warm.beta.shape != x.shape or warm.psi.shape != (n,) or warm.lam.shape != (n,)):
            raise UserError(f"warm duals must come from a batch of shape {tuple(x.shape)}")
        ratio = (lam_final / warm.lam.to(device=dev, dtype=dt).clamp_min(torch.finfo(dt).tiny))
        beta0 = warm.beta.to(device=dev, dtype=dt) * _lam5(ratio)
        psi0 = warm.psi.to(device=dev, dtype=dt) * ratio
        lam0 = lam_final.clone()
        if not (torch.isfinite(beta0).all() and torch.isfinite(psi0).all()):
            raise UserError("warm duals contain NaN or infinite values")
    else:
        beta0 = torch.zeros_like(x)
        psi0 = torch.ones(n, device=dev, dtype=dt)
        lam0 = lam_final.clone() if reg_start is None else torch.minimum(lam_final, reg_start * scale)
    # each intermediate stage may use at most its share of half the iteration budget (per example)
    n_stages = 1 + torch.ceil(torch.log(lam_final / lam0).clamp_min(0.0) / math.log(reg_factor) - 1e-9)
    stage_cap_all = (max_iter // (2 * n_stages)).clamp_min(10).long()

    # already inside the ball? (only possible when w carries x's mass in every channel and lies in [0, 1])
    if check_inside:
        cm_x, cm_w = x.sum((2, 3)), w.sum((2, 3))
        same_mass = ((cm_x - cm_w).abs() <= 1e-6 * mass.clamp_min(1.0)[:, None]).all(1)
        cand = (~trivial & same_mass & (w >= 0).flatten(1).all(1) & (w <= 1).flatten(1).all(1)).nonzero().squeeze(1)
        if cand.numel():
            xc = xh_all[cand]
            xpos_c = xc > 0
            logx_c = torch.where(xpos_c, torch.log(xc.clamp_min(torch.finfo(dt).tiny)), _NEG)
            ok, plan_c, it_c = _certify_inside(geo, xc, wh_all[cand], u_all[cand], m4[cand], eps_v[cand], logx_c,
                                               xpos_c, min(max_iter, 200), inside_atol)
            iters[cand] += it_c
            hit = cand[ok]
            plan_out[hit] = plan_c[ok]
            converged[hit] = True
            trivial = trivial.clone()
            trivial[hit] = True
            inside = torch.zeros_like(trivial)
            inside[hit] = True

    idx = (~trivial).nonzero().squeeze(1)
    xh, wh, u, eps_a = xh_all[idx], wh_all[idx], u_all[idx], eps_v[idx]
    lam, lam_f = lam0[idx].clone(), lam_final[idx]
    xpos = xh > 0
    logx = torch.where(xpos, torch.log(xh.clamp_min(torch.finfo(dt).tiny)), _NEG)
    beta, psi = beta0[idx].clone(), psi0[idx].clone()
    bp = geo.pad(beta)
    alpha = _alpha_step(geo, bp, psi, logx, xpos, xh)[0] if idx.numel() else torch.full_like(xh, _NEG)
    g_prev = torch.full((idx.numel(),), float("nan"), device=dev, dtype=dt)
    g = g_prev.clone()
    err = g_prev.clone()
    stage_it = torch.zeros(idx.numel(), dtype=torch.long, device=dev)
    stage_cap = stage_cap_all
    relaxed = relax != 1.0
    omega_n = torch.full((idx.numel(),), float(relax), device=dev, dtype=dt)

    def retire(sel: torch.Tensor, ok: torch.Tensor) -> None:
        """Finalise the examples ``sel`` (a bool mask over the active batch) into the outputs."""
        out = idx[sel]
        plan = _finalise(geo, bp[sel], psi[sel], xh[sel], u[sel], eps_a[sel], logx[sel], xpos[sel])
        plan_out[out] = plan
        alpha_out[out], beta_out[out], psi_out[out] = alpha[sel], beta[sel], psi[sel]
        lam_out[out] = lam[sel]  # the stage it reached (below lam_final when max_iter cut the annealing short)
        converged[out] = ok[sel]
        dual_out[out] = g[sel]
        err_out[out] = err[sel]

    while idx.numel():
        beta_new = _beta_step(geo, alpha, psi, wh, u, lam)
        beta = beta + omega_n.view(-1, 1, 1, 1) * (beta_new - beta) if relaxed else beta_new
        bp = geo.pad(beta)
        alpha_old = alpha
        alpha, log_a, r = _alpha_step(geo, bp, psi, logx, xpos, xh, alpha_old, omega_n if relaxed else None)
        err = _row_error(alpha_old, r, xh, xpos)
        psi = _psi_step(geo, log_a, psi, eps_a)
        g = _dual(geo, alpha, beta, psi, log_a, xh, wh, u, lam, eps_a)
        iters[idx] += 1
        stage_it += 1
        rise = (g - g_prev).abs() / g.abs().clamp_min(1.0)
        settled = torch.isfinite(rise) & torch.isfinite(g)
        final = lam >= lam_f
        done = final & settled & (rise <= tol) & (err <= marginal_tol)
        advance = ~final & ((err <= stage_tol) | (stage_it >= stage_cap[idx]))
        out_of_budget = iters[idx] >= max_iter
        # over-relaxation safeguard: an example whose dual went down continues with plain block ascent
        omega_n = torch.where(g < g_prev - 1e-6 * g.abs(), torch.ones_like(omega_n), omega_n)
        g_prev = g
        leave = done | out_of_budget
        if bool(leave.any()):
            retire(leave, done)
            keep = ~leave
            idx = idx[keep]
            xh, wh, u, eps_a, lam, lam_f = xh[keep], wh[keep], u[keep], eps_a[keep], lam[keep], lam_f[keep]
            xpos, logx, beta, psi, alpha, bp = xpos[keep], logx[keep], beta[keep], psi[keep], alpha[keep], bp[keep]
            g_prev, g, err, stage_it, advance = g_prev[keep], g[keep], err[keep], stage_it[keep], advance[keep]
            omega_n = omega_n[keep]
        if bool(advance.any()):
            new_lam = torch.where(advance, torch.minimum(lam * reg_factor, lam_f), lam)
            ratio = new_lam / lam
            beta = beta * _lam5(ratio)
            psi = psi * ratio
            lam = new_lam
            bp = geo.pad(beta)
            alpha = torch.where(advance.view(-1, 1, 1, 1), _alpha_step(geo, bp, psi, logx, xpos, xh)[0], alpha)
            g_prev = torch.where(advance, torch.full_like(g_prev, float("nan")), g_prev)
            stage_it = torch.where(advance, torch.zeros_like(stage_it), stage_it)

    bad = ~converged
    if bool(bad.any()):
        warnings.warn(f"projected Sinkhorn did not converge for {int(bad.sum())} of {n} example(s) within "
                      f"max_iter={max_iter} iterations (tol={tol:g}); the outputs are feasible but further from the "
                      f"projection: raise `max_iter` (or `tol`, or lower `reg`)", ProjectionConvergenceWarning,
                      stacklevel=2)

    z = (target_marginal(plan_out) * m4).clamp(0.0, 1.0)
    z = torch.where((trivial & ~inside).view(-1, 1, 1, 1), x, z)
    cost = plan_cost(plan_out, geo.cost)
    duals = ProjectionDuals(alpha_out, beta_out, psi_out, lam_out)
    return ProjectionResult(z=z.to(orig_dtype), cost=cost.to(orig_dtype), iterations=iters, converged=converged,
                            dual=dual_out, marginal_error=err_out, duals=duals, mass=mass,
                            plan=plan_out if return_plan else None)


def dual_objective(x: torch.Tensor, w: torch.Tensor, eps: float | torch.Tensor, duals: ProjectionDuals, *,
                   kernel_size: int = 5, p: float = 2) -> torch.Tensor:
    r"""The dual objective :math:`g(\alpha, \beta, \psi)` of the unit-mass problem (module docstring), per example.

    ``x``, ``w`` are in the original scale (N, C, H, W); ``duals.lam`` is :math:`\lambda` per example. For tests and
    diagnostics: by weak duality it is at most :func:`primal_objective` of any feasible plan.
    """
    x, w, e = _check_inputs(x, w, eps)
    geo = _Geometry(x.shape[2], x.shape[3], check_kernel_size(kernel_size), p, x.device, x.dtype)
    m4 = x.sum((1, 2, 3)).view(-1, 1, 1, 1)
    xh, wh = x / m4, w / m4
    u = (1.0 / m4).expand_as(x)
    log_a = _log_offset_mass(geo, duals.alpha, geo.pad(duals.beta))
    return _dual(geo, duals.alpha, duals.beta, duals.psi, log_a, xh, wh, u, duals.lam, e)


def primal_objective(x: torch.Tensor, w: torch.Tensor, plan: torch.Tensor, lam: torch.Tensor) -> torch.Tensor:
    r"""The primal objective :math:`\frac{\lambda}{2}\|\hat w - z\|^2 + \sum\Pi\log\Pi` with :math:`z = \Pi^\top\mathbf
    1`, for a unit-mass plan (N, C, k*k, H, W) and ``x``, ``w`` in the original scale. Feasibility (rows, cap, budget)
    is not checked here."""
    m4 = x.sum((1, 2, 3)).view(-1, 1, 1, 1)
    z = target_marginal(plan)
    ent = torch.where(plan > 0, plan * torch.log(plan.clamp_min(torch.finfo(plan.dtype).tiny)),
                      torch.zeros_like(plan)).sum((1, 2, 3, 4))
    return lam / 2 * ((w / m4 - z) ** 2).sum((1, 2, 3)) + ent
