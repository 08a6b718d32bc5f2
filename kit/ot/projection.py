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
runs the β, α and ψ steps in that order):

1. :math:`\alpha_i = \log \hat x_i - \log\sum_j e^{\beta_j - \psi C_{ij} - 1}` (Sinkhorn's row update; "log 0" where
   :math:`\hat x_i = 0`);
2. with :math:`\log s_j = \log\sum_i e^{\alpha_i - \psi C_{ij} - 1}` and :math:`L_j = \log\lambda + \lambda\hat w_j +
   \log s_j`, the paper's Lambert-W step :math:`\beta_j = \lambda\hat w_j - W(e^{L_j})` is evaluated as
   :math:`\beta_j = \log W(e^{L_j}) - \log\lambda - \log s_j` (the same number, by :math:`W + \log W = L`, without the
   cancellation of two numbers of size :math:`\lambda\hat w_j` and without forming :math:`e^{L_j}`). Then
   :math:`z_j = e^{\beta_j}s_j = W(e^{L_j})/\lambda`. **Box (deviation from the paper, which clamps after the
   projection and so loses mass and breaks the radius):** :math:`z_j = e^{\beta_j}s_j` increases with
   :math:`\beta_j` while :math:`\hat w_j - \beta_j/\lambda` decreases, so the box-constrained maximiser is the
   Lambert-W solution unless it puts :math:`z_j` above :math:`u_j`, in which case :math:`\beta_j = \log(u_j/s_j)`:
   :math:`\log z_j = \min(\log W(e^{L_j}), \log \lambda u_j) - \log\lambda`. :math:`y = \log W(e^{L})` comes from
   two Halley steps on :math:`e^y + y - L` started at the previous iteration's :math:`y` (:func:`_log_w`; Newton
   steps for the few pixels that moved further, gathered, and :func:`~kit.ot.lambertw.log_lambertw_exp` from scratch
   after a change of λ), exact to a few ulps like the cold solver and a third of its work;
3. :math:`\psi`: the paper takes one Newton step on :math:`\partial g/\partial\psi` with a halving line search keeping
   :math:`\psi \ge 0`. **Deviation:** we maximise :math:`g` over :math:`\psi \ge 0` exactly. With
   :math:`A_o = \sum_{c,i} e^{\alpha_i + \beta_{i+o} - 1}` (one number per offset), :math:`g(\psi) = -\psi\varepsilon -
   \sum_o A_o e^{-\psi C_o} + \text{const}`, so the maximiser is :math:`\psi = 0` if the plan's cost at
   :math:`\psi = 0` is within :math:`\varepsilon`, else the root of :math:`\log\sum_o C_o A_o e^{-\psi C_o} = \log
   \varepsilon` (convex and decreasing in :math:`\psi`), found by safeguarded Newton steps clamped at
   :math:`\psi \ge 0` on (N, k*k) numbers only. This is still block coordinate ascent and makes each iteration a little
   more effective than a single Newton step.

**Cost of an iteration.** The two log-sum-exps over the k*k window are the work: each is five vectorised passes over
one (n, k, k, C, H, W + 2r) buffer that is reused for the whole call (:meth:`_Geometry.lse`: the shifted values, read
without copies from a strided view of the padded image in which each offset's window is one contiguous run, their
maximum over the window, then in place the shift, the exponential (``exp2``, in base 2) and the sum; exponentials are
floored at a relative 1e-35 in float32, because ``exp`` of ``-inf`` and subnormal results take paths an order of
magnitude slower on CPUs). The α step's exponentials also give the plan of exact rows, :math:`\Pi_{i,o} = \hat x_i
t_{o,i}/\sum_{o'} t_{o',i}`, so the per-offset masses of step 3 are one batched matrix-vector product (an in-place
product and a sum over the pixels: ``torch.bmm`` with one column runs as a batched gemv, seven times slower on CPUs).
"log 0" (empty source pixels, outside the image) is the finite ``_NEG_BIG`` inside the iteration, so the per-pixel
arithmetic needs no masks: on CPUs ``torch.where``, comparisons and ``isfinite`` cost ten times an addition.
Everything per example: an example's iterates do not depend on the rest of the batch.

**Anderson acceleration (deviation, ``anderson``, the default).** Sinkhorn on local kernels is slow at the large λ we
want (below): on real images (digits: 80 % of the pixels empty, the strokes saturated at 1) plain block ascent needs
300-1200 iterations per example on average at the default λ (up to 1800). One iteration is a fixed-point map
:math:`T` of the state :math:`s = (\alpha, \psi)` (β is a function of it), and type-II Anderson acceleration (Walker &
Ni 2011; :class:`_Anderson`) replaces
:math:`T(s_k)` by the combination of the last ``anderson`` + 1 images whose residuals :math:`T(s) - s` cancel best
(least squares, per example). Empty pixels carry no state (their α is "log 0" whatever happens): the state is α on
the pixels with mass only, weighted by :math:`\sqrt{\hat x_i}`, and ψ weighted by :math:`\sqrt{\varepsilon}` (the
curvature of the dual in each coordinate; unweighted, the few pixels with almost no mass and ψ dominate the least
squares and it costs 10 % more iterations). Safeguards: a dual decrease or a non-finite dual restarts the history
(the latter also undoes the step), and so does a residual that has not improved for ``anderson`` steps; an example
with fewer than two pairs in its history takes the plain step. Measured on MNIST, Fashion-MNIST and 3x32x32 images
(the targets of ``bench/ot_projection.py``, 16 images each, the defaults otherwise): 2.7x fewer iterations (1.9x less
time) than the over-relaxation below, 8x fewer (5.8x less time) than plain block ascent.

**Over-relaxation** (``relax`` > 1 with ``anderson=0``; the previous default, ω = 1.8): :math:`\alpha \leftarrow
\alpha + \omega(\alpha^{new} - \alpha)` and the same for β (Thibault, Chizat, Dossal & Papadakis 2017, "Overrelaxed
Sinkhorn-Knopp algorithm"); an iteration whose dual decreases halves ω - 1 for that example, and every iteration
without a decrease lets it grow back by 0.01 up to ``relax``; a non-finite dual undoes the step and continues with
ω = 1; the first annealing stage of a cold start runs with ω = 1. The two do not combine (the over-relaxed iteration
carries β in its state). ``anderson=0, relax=1`` is the paper's iteration.

**Convergence** is judged per example in its final regularisation stage. With ``ztol`` (the default, 2e-3): when the
row error (the L1 change the β step made to the row sums, unit mass) is below ``10 * marginal_tol`` and the dual
objective rose by at most 1e-4 (relative) in the last iteration, the output plan is built (below) and its primal
objective :math:`P` evaluated; the **duality gap** :math:`P - g` bounds the distance of the output to the exact
solution :math:`z^\star` of the regularised problem: the objective is λ-strongly convex in :math:`z`, so
:math:`\tfrac{\lambda}{2}\|z - z^\star\|^2 \le P - P^\star \le P - g`, i.e. a root-mean-square error per pixel (original
scale) of at most :math:`m\sqrt{2(P - g)/\lambda}/\sqrt{CHW}` (``z_error_bound``, reported for every output). The
example has converged when that bound is ``<= ztol``, or when the gap is down to rounding (100 ulps of :math:`P`:
small λ in float32 cannot certify a small ``ztol``) and the row error is ``<= marginal_tol``. The next check is
scheduled where the geometric decay of the bound between the last two checks predicts success (2 to 20 iterations
later). **ψ refit (deviation):** where the budget binds, the rounded plan (exact rows, box repair) usually leaves a
little of it unused, and that unused budget enters the gap priced by ψ, first order: on real images ψ reaches
300-400 and this term was hundreds of times the rest, so the bound stayed 10-40 times above the true error and some
examples never certified. When that term is what stands between a check and success, the output plan is rebuilt at
the ψ' that spends the budget exactly (:func:`_finalise`), which also makes the output closer to ``w``. With
``ztol=None``, the row error ``<= marginal_tol`` and the dual rise ``<= tol`` decide, as the paper's iterate tolerance
would. Converged examples leave the active batch, so they stop costing work. ``max_iter`` is a hard bound.

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
so a cold start anneals :math:`\lambda` (epsilon scaling): it starts at :math:`\lambda_0 = \text{reg\_start}\cdot m`
(per unit mass whatever ``reg_scale``, and never above the final λ: the paper's λ = 1000 on digits starts there
directly) and multiplies by ``reg_factor`` whenever the stage's marginal error is ``<= stage_tol`` or the stage used
its share of ``max_iter``. The default 64, x4 (stages 64, 256, 500 per unit mass) took 15 % fewer iterations on real
images than the previous 1, x4 (six stages); starting higher helps the near targets and hurts the far ones.
**How the duals follow (deviation):** :math:`\beta_j = \lambda(\hat w_j - z_j)` grows like
:math:`\lambda` at a fixed output, but :math:`\psi` does so only where the plan is nearly a linear program's (a far,
dense target: ψ went from 4 to 310 while λ grew 500-fold) and hardly at all where the entropy dominates (a small
step: 6 to 10); scaling ψ with λ there overshoots it 15-fold, and the next stages spent hundreds of iterations
bringing it back. So at each advance both candidates, (β, ψ) kept and (β, ψ) scaled by the λ ratio, get one α and one
exact ψ step, and the one with the higher dual objective at the new λ is kept, per example. A warm start
(``warm=``, the duals of a previous call) starts at the final :math:`\lambda` directly.

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
the mass moved *into* that pixel and left at its source pixel instead (rows stay exact, the cost only decreases);
only those entries change, so each pass gathers them by index instead of sweeping the plan, and the chains that
saturated strokes form (a returned share overfills its source, which is saturated too) take up to 30 passes, after
which the rest is removed at once by mixing with the identity plan (:func:`_cap_columns`); then the ψ refit above;
(b) *budget repair* — if the cost still exceeds
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
from kit.ot.local import check_kernel_size, local_cost, target_marginal, valid_offsets
from kit.ot.precision import full_precision

__all__ = ["ProjectionConvergenceWarning", "ProjectionDuals", "ProjectionResult", "dual_objective",
           "primal_objective", "project_wasserstein"]

_NEG = float("-inf")
# Stands for log 0 inside the iteration: empty source pixels (alpha) and the padding outside the image. Finite, so
# that the hot loop needs no masks (comparisons, ``torch.where`` and ``isfinite`` are an order of magnitude slower
# than arithmetic on CPUs): e^(_NEG_BIG + anything of the problem's size) is clamped to the exp floor like e^-inf.
_NEG_BIG = -1e30
_LOG2E, _LN2 = 1.0 / math.log(2.0), math.log(2.0)
# A cold start anneals lambda; at each advance the new (beta, psi) is the old one scaled by ratio**p for the p of this
# tuple whose dual objective (after one alpha and one psi step) is the highest, per example (module docstring).
_ADVANCE_POWERS = (0.0, 1.0)
# The duality-gap certificate (ztol) is evaluated once the row error is below _CERT_GATE * marginal_tol (before that
# the gap cannot be small enough), then again where the bound's decay predicts success, 2 to 4 * _CERT_EVERY
# iterations later (_CERT_EVERY when there is no decay to go by).
_CERT_EVERY = 5
_CERT_GATE = 10.0
# ... and once the dual objective rose by at most this much (relative) in the last iteration: the gap cannot be small
# while it still climbs fast (a loose gate: the certificate, not the rise, decides)
_CERT_RISE = 1e-4
# psi refit of the output plan (_finalise): at most this many Newton steps, until the cost is within this of eps
_REFIT_STEPS = 3
_REFIT_TOL = 1e-4
# Box repair (_cap_columns): passes of returning the excess to the sources, then one mix with the identity plan
_CAP_PASSES = 30
# A duality gap below this many ulps of the primal is rounding: then the row error decides instead (module docstring).
_GAP_ROUNDING = 100.0
# Over-relaxation safeguard: a dual decrease halves omega - 1; every iteration without one regrows it by this much.
_OMEGA_REGROW = 0.01
# Anderson acceleration: ridge of its normal equations, relative to their trace (float32 differences); a dual decrease
# larger than _AA_DEC * |g| restarts the history, and so does a residual that has not dropped below _AA_IMPROVE times
# its best for _AA_STALE * memory steps
_AA_RIDGE = 1e-8
_AA_DEC = 1e-6
_AA_IMPROVE = 0.99
_AA_STALE = 1


class ProjectionConvergenceWarning(RuntimeWarning):
    """Projected Sinkhorn stopped at ``max_iter`` before some example converged (see ``ProjectionResult.converged``)."""


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
        Before ``max_iter``, in the final stage, the certificate ``z_error_bound <= ztol`` held (or, where the
        duality gap is down to rounding, the row error was ``<= marginal_tol``); with ``ztol=None``, the dual settled
        (relative rise ``<= tol``) and the row error was ``<= marginal_tol`` (module docstring).
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
    z_error_bound : (N,) tensor or None
        Certified bound on the root-mean-square distance per pixel (original [0, 1] scale) between ``z`` and the
        exact solution of the regularised problem at the λ the example ended with: :math:`m\\sqrt{2\\,(P - g)/
        \\lambda}/\\sqrt{CHW}` from the duality gap of the returned plan (module docstring). NaN for examples
        returned without iterating (``w`` already in the ball, ``x`` itself, ``eps = 0``).
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
    z_error_bound: torch.Tensor | None = None


def _exp_floor(dtype: torch.dtype) -> float:
    """The most negative argument whose exponential is still a normal number of ``dtype`` (with a margin)."""
    return math.log(torch.finfo(dtype).tiny) + 8.0


class _Geometry:
    r"""The k x k window of every pixel as strided views of padded images, the offset costs, and a work buffer.

    Window tensors have the layout (n, k, k, C, H, W): entry ``[n, a, b, c, i, j]`` belongs to pixel (i, j) and
    offset :math:`o = a k + b`, i.e. the displacement :math:`(a - r, b - r)`, :math:`r = \lfloor k/2 \rfloor` (the
    offset order of :mod:`kit.ot.local`). :meth:`public` turns a plan into the kit's (n, C, k*k, H, W) layout.
    Putting the offsets outside the pixels makes every pass over the window one vectorised operation over the
    whole batch and lets :func:`torch.bmm` contract the pixels.

    The hot path (:meth:`lse`) works on *extended rows*: the image padded to width :math:`W_p = W + 2r` and flattened,
    so that the window of offset (a, b) is one contiguous run of :math:`H W_p` values starting at :math:`a W_p + b`
    (the 2r extra values per row are computed and ignored). Every pass then runs over long contiguous rows; on the
    (n, k, k, C, H, W) view the innermost run is one image row, and a pass costs several times more.
    """

    def __init__(self, c: int, h: int, w: int, k: int, p: float, device: torch.device, dtype: torch.dtype) -> None:
        self.c, self.h, self.w = c, h, w
        self.k, self.kk, self.r = k, k * k, k // 2
        self.centre = self.kk // 2
        self.cost = local_cost(k, p, device=device, dtype=dtype)  # (kk,)
        self.log_cost = torch.log(self.cost)  # -inf at the centre
        self.valid6 = valid_offsets(h, w, k, device=device).to(dtype).view(1, k, k, 1, h, w)
        self.wp = w + 2 * self.r  # extended rows (class docstring)
        self.ext = h * self.wp
        self.cost5 = self.cost.view(1, k, k, 1, 1)
        self.floor = _exp_floor(dtype)
        # lse works in base 2 (exp2 runs 2-3x faster than exp on CPUs): the costs and the floor in units of log 2
        self.cost5_2 = self.cost5 * _LOG2E
        self.floor2 = self.floor * _LOG2E
        self._buf: torch.Tensor | None = None

    def pad(self, v: torch.Tensor, value: float = _NEG_BIG) -> torch.Tensor:
        """(n, C, H, W) -> (n, C, H + 2r, W + 2r); "log 0" (``_NEG_BIG``) by default: no mass outside the image."""
        r = self.r
        return F.pad(v, (r, r, r, r), value=value)

    def window(self, vp: torch.Tensor) -> torch.Tensor:
        """``v[i + d(o)]`` for every pixel i and offset o, from the padded ``vp``: an (n, k, k, C, H, W) view."""
        return vp.unfold(2, self.k, 1).unfold(3, self.k, 1).permute(0, 4, 5, 1, 2, 3)

    def workspace(self, n: int, like: torch.Tensor) -> torch.Tensor:
        """An (n, k, k, C, H * W_p) scratch tensor (extended rows), reused between calls (fresh pages cost more than
        the arithmetic)."""
        buf = self._buf
        if buf is None or buf.shape[0] < n:
            buf = self._buf = torch.empty(n, self.k, self.k, self.c, self.ext, device=like.device, dtype=like.dtype)
        return buf[:n]

    def hw(self, v: torch.Tensor) -> torch.Tensor:
        """Extended rows (n, C, H * W_p) -> the image (n, C, H, W), contiguous."""
        return v.view(v.shape[0], self.c, self.h, self.wp)[..., :self.w].contiguous()

    def extend(self, v: torch.Tensor) -> torch.Tensor:
        """The image (n, C, H, W) -> extended rows (n, C * H * W_p), zero on the extra values."""
        return F.pad(v, (0, 2 * self.r)).view(v.shape[0], self.c * self.ext)

    def lse(self, v: torch.Tensor, psi: torch.Tensor, out: torch.Tensor | None = None
            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        r""":math:`\log\sum_o e^{v_{i + d(o)} - \psi C_o}` for every pixel i, (n, C, H, W).

        Five passes over the window: the shifted values, their maximum :math:`m_i` over the offsets, and in place
        :math:`t_{o,i} = e^{\max(v_{i+d(o)} - \psi C_o - m_i,\ f)}` with the floor :math:`f` of :func:`_exp_floor` (a
        relative 1e-35 in float32: harmless, and exp then never takes the slow paths of ``-inf`` or of subnormal
        results, an order of magnitude slower on CPUs), then their sum. The passes work in base 2 (``v`` and the costs
        times :math:`\log_2 e`, then ``exp2``): on CPUs ``exp2`` runs 2.7 times faster than ``exp`` (8 against 22 µs on
        25,088 float32 values, one thread), at the same rounding error of the result (measured against float64). Because
        the cost and the validity of an offset are symmetric, the sum over the sources j of a target i is this same sum.
        ``v`` must be finite (log 0 is ``_NEG_BIG``; a window without mass gives about ``_NEG_BIG``). Returns (lse, t,
        acc): ``lse`` and :math:`acc_i = \sum_o t_{o,i} \ge 1` as (n, C, H, W) images, ``t`` as (n, k, k, C, H * W_p)
        extended rows (class docstring) in the workspace, or in ``out``.
        """
        n, k, r, c = v.shape[0], self.k, self.r, self.c
        # base 2 (docstring); one more row: the last window run ends 2r - 1 past the padded image
        vp = F.pad(v, (r, r, r, r + 1), value=_NEG_BIG).mul_(_LOG2E)
        hp = self.h + 2 * r + 1
        win = vp.as_strided((n, k, k, c, self.ext), (c * hp * self.wp, self.wp, 1, hp * self.wp, 1),
                            vp.storage_offset())
        t = self.workspace(n, v) if out is None else out
        torch.sub(win, psi.view(-1, 1, 1, 1, 1) * self.cost5_2, out=t)
        m = t.amax((1, 2))
        t.sub_(m[:, None, None]).clamp_(min=self.floor2).exp2_()
        acc = t.sum((1, 2))
        return self.hw(torch.log(acc).add_(m, alpha=_LN2)), t, self.hw(acc)

    def colsum(self, plan: torch.Tensor) -> torch.Tensor:
        """Target marginal of a window-layout plan: :math:`z_j = \\sum_o \\Pi_{j - d(o), o}`, (n, C, H, W).

        In two rounds of k shifted additions, along the rows and then along the columns (2k operations instead of
        k*k: at the small batches of the certificate's checks their count is the cost)."""
        n, k, r, h, w = plan.shape[0], self.k, self.r, self.h, self.w
        rows = plan.new_zeros(n, k, self.c, h, w + 2 * r)  # rows[a, i, j + r] = sum_b plan[a, b, i, j - (b - r)]
        for b in range(k):
            rows[..., b:b + w] += plan[:, :, b]
        zp = plan.new_zeros(n, self.c, h + 2 * r, w + 2 * r)
        for a in range(k):
            zp[:, :, a:a + h] += rows[:, a]
        return zp[:, :, r:r + h, r:r + w]

    def public(self, plan: torch.Tensor) -> torch.Tensor:
        """(n, k, k, C, H, W) -> the kit's (n, C, k*k, H, W) plan layout (a copy)."""
        return plan.permute(0, 3, 1, 2, 4, 5).reshape(plan.shape[0], self.c, self.kk, self.h, self.w)


def _h_beta(beta: torch.Tensor, wh: torch.Tensor, u: torch.Tensor, lam: torch.Tensor) -> torch.Tensor:
    r""":math:`\sum_j h_j(\beta_j)` per example (the box-constrained conjugate term of the dual), in float64:
    :math:`h_j(\beta) = \frac{\lambda}{2}(\hat w_j - \tilde z_j)^2 + \beta\tilde z_j` at its minimiser
    :math:`\tilde z_j = \min(\max(\hat w_j - \beta/\lambda, 0), u_j)` (the three cases of the module docstring)."""
    zt = (wh - beta / lam).clamp_min(0.0).minimum(u)
    d = wh - zt
    return (lam / 2 * d * d + beta * zt).sum((1, 2, 3), dtype=torch.float64)


def _lam5(lam: torch.Tensor) -> torch.Tensor:
    return lam.view(-1, 1, 1, 1)


class _Anderson:
    r"""Anderson acceleration (type II, Walker & Ni 2011) of the iteration's fixed-point map, per example.

    The state is :math:`s = (\alpha_{\hat x > 0}, \psi)` (the row duals of the pixels with mass and the budget
    multiplier: β is a function of it, the β step's input) and one iteration maps it to :math:`T(s)`. With the
    differences :math:`\Delta s_i, \Delta f_i` of the last ``mem + 1`` pairs :math:`(s_i, f_i = T(s_i) - s_i)`, the
    next state is :math:`T(s_k) - \sum_i \gamma_i(\Delta s_i + \Delta f_i)` with :math:`\gamma = \arg\min\|f_k -
    \sum_i \gamma_i \Delta f_i\|` (normal equations with a ridge of ``_AA_RIDGE`` times their trace). The differences
    sit in a ring of ``mem`` slots written at one position for the whole batch, with their Gram matrix (float64)
    updated one row per step, so a step costs a few passes over (n, mem, dim) numbers of the working dtype. Per example
    (no batch effects); an example with fewer than two pairs since its last :meth:`reset` takes the plain step
    :math:`T(s_k)`, and one whose residual stopped improving is restarted (:meth:`step`).
    """

    def __init__(self, n: int, dim: int, mem: int, device: torch.device, dtype: torch.dtype = torch.float32
                 ) -> None:
        self.mem, self.ptr = mem, 0
        f32 = dict(device=device, dtype=dtype)
        self.d_g = torch.zeros(n, mem, dim, **f32)  # differences of T(s) = s + f
        self.d_f = torch.zeros(n, mem, dim, **f32)
        self.gram = torch.zeros(n, mem, mem, device=device, dtype=torch.float64)
        self.s_last = torch.zeros(n, dim, **f32)
        self.f_last = torch.zeros(n, dim, **f32)
        self.count = torch.zeros(n, dtype=torch.long, device=device)  # pairs recorded since the last reset
        self.f_best = torch.full((n,), float("inf"), device=device, dtype=torch.float64)  # smallest |f| since then
        self.stale = torch.zeros(n, dtype=torch.long, device=device)  # steps since |f| last improved on it

    def reset(self, sel: torch.Tensor) -> None:
        """Forget the history of the examples ``sel`` (a bool mask): their next step is plain."""
        self.count = torch.where(sel, torch.zeros_like(self.count), self.count)
        self.f_best = torch.where(sel, torch.full_like(self.f_best, float("inf")), self.f_best)
        self.stale = torch.where(sel, torch.zeros_like(self.stale), self.stale)

    def keep(self, keep: torch.Tensor) -> None:
        self.d_g, self.d_f, self.gram = self.d_g[keep], self.d_f[keep], self.gram[keep]
        self.s_last, self.f_last, self.count = self.s_last[keep], self.f_last[keep], self.count[keep]
        self.f_best, self.stale = self.f_best[keep], self.stale[keep]

    def step(self, s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Record the pair (s, T(s) = t), both (n, dim), and return the next state (n, dim)."""
        mem, p = self.mem, self.ptr
        f = t - s
        # a history that stopped reducing the residual |f| for _AA_STALE * mem steps is dropped (restarted Anderson)
        f_norm = f.double().pow(2).sum(1)
        better = f_norm < _AA_IMPROVE * self.f_best
        self.f_best = torch.where(better, f_norm, self.f_best)
        self.stale = torch.where(better, torch.zeros_like(self.stale), self.stale + 1)
        stuck = self.stale >= _AA_STALE * mem
        if bool(stuck.any()):
            self.count = torch.where(stuck, torch.zeros_like(self.count), self.count)
            self.f_best = torch.where(stuck, f_norm, self.f_best)
            self.stale = torch.where(stuck, torch.zeros_like(self.stale), self.stale)
        has_prev = (self.count >= 1).to(s.dtype)[:, None]
        d_s, d_f = (s - self.s_last) * has_prev, (f - self.f_last) * has_prev
        self.s_last, self.f_last = s, f
        self.count = (self.count + 1).clamp_max(mem + 1)
        self.ptr = (p + 1) % mem
        self.d_g[:, p], self.d_f[:, p] = d_s + d_f, d_f
        row = (self.d_f * d_f.unsqueeze(1)).sum(2, dtype=torch.float64)  # (n, mem): new difference vs every slot
        self.gram[:, p, :], self.gram[:, :, p] = row, row
        # slot j holds a valid difference if it was written within the last count - 1 steps
        age = (p - torch.arange(mem, device=s.device)) % mem
        valid = (age[None] < (self.count - 1)[:, None]).double()  # (n, mem)
        a = self.gram * (valid[:, :, None] * valid[:, None, :])
        scale = a.diagonal(dim1=1, dim2=2).sum(1).clamp_min(1e-300)
        a = a + torch.diag_embed(_AA_RIDGE * scale[:, None] * valid + (1.0 - valid))  # invalid slots: gamma = 0
        b = (self.d_f * f.unsqueeze(1)).sum(2, dtype=torch.float64) * valid
        gamma = torch.linalg.solve(a, b)  # (n, mem)
        mixed = t - torch.bmm(gamma.unsqueeze(1).to(self.d_g.dtype), self.d_g).squeeze(1)  # a sum over dim 1 is slow
        ok = (self.count >= 2) & torch.isfinite(mixed.sum(1))
        return torch.where(ok[:, None], mixed, t)


def _log_w(log_x: torch.Tensor, y0: torch.Tensor | None, steps: int = 2) -> torch.Tensor:
    r""":math:`y = \log W(e^{L})` by Halley's iteration on :math:`e^y + y - L` from the previous iteration's values.

    Between two iterations of the projection :math:`L` changes little, so ``steps`` Halley steps (cubic convergence;
    :math:`f(y) = e^y + y - L` is convex and increasing; :math:`y \leftarrow y - 2ff'/(2f'^2 - ff'')`) from ``y0``
    reach float precision almost everywhere (in place, on a copy of ``y0``); if some element's last step is still
    above 8 ulp, those take up to 8 Newton steps more, each frozen once its step is below that. Elements without a
    finite ``y0``, or still moving after that (a start far above the root, where Newton advances by about 1 per
    step), are recomputed by :func:`~kit.ot.lambertw.log_lambertw_exp` (Halley from an initial guess, exact to
    rounding). Every element's result depends only on its own values (no batch effects).
    """
    if y0 is None:
        return log_lambertw_exp(log_x)
    y = y0.clone(memory_format=torch.contiguous_format)
    floor = _exp_floor(y.dtype)
    tol = 8 * torch.finfo(y.dtype).eps
    step = y
    for _ in range(steps):
        ey = y.clamp_min(floor).exp_()
        f = ey.add(y).sub_(log_x)
        fp = ey.add(1.0)
        step = f.mul(fp).div_(fp.mul_(fp).sub_(f.mul(ey).mul_(0.5)))  # f f' / (f'^2 - f f'' / 2)
        y.sub_(step)
    # |step| <= tol (1 + |y|) everywhere (NaN fails): done, the usual case, in one reduction
    if bool((step.abs() - tol * y.abs()).amax() <= tol):
        return y
    # a few elements moved further: those (gathered: usually a handful) take more Newton steps, each frozen
    # (multiplied by 0) once its step is below tol; elements without a finite value go to the full solver
    flat_y, flat_l = y.view(-1), log_x.reshape(-1)
    sel = ((step.abs() > tol * (1.0 + y.abs())) | ~torch.isfinite(y)).view(-1).nonzero().squeeze(1)
    ys, ls = flat_y[sel], flat_l[sel]
    live = torch.isfinite(ys).to(y.dtype)
    ys = torch.where(live > 0, ys, torch.zeros_like(ys))
    for _ in range(8):
        if not bool(live.max() > 0):
            break
        ey = torch.exp(ys.clamp_min(floor))
        st = (ey + ys - ls) / (ey + 1.0) * live
        ys = ys - st
        live = live * (st.abs() > tol * (1.0 + ys.abs())).to(y.dtype)
    bad = (live > 0) | ~torch.isfinite(ys) | ~torch.isfinite(flat_y[sel])
    if bool(bad.any()):  # the full solver where Newton did not settle (or had no finite start)
        ys = torch.where(bad, log_lambertw_exp(ls), ys)
    flat_y[sel] = ys
    return y


def _alpha_step(geo: _Geometry, beta: torch.Tensor, psi: torch.Tensor, logx: torch.Tensor, xh: torch.Tensor,
                alpha_prev: torch.Tensor | None = None, omega: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    r"""Row update and the per-offset masses for the ψ step, from one :meth:`_Geometry.lse` pass.

    ``logx`` is :math:`\log\hat x` with ``_NEG_BIG`` for empty pixels; their alphas stay about ``_NEG_BIG``, so no
    mask is needed.

    Returns (alpha, log_a, err): the row update :math:`\alpha_i = \log\hat x_i - r_i` with
    :math:`r_i = \log\sum_o e^{\beta_{i+o} - \psi C_o - 1}` (over-relaxed from ``alpha_prev`` by ``omega`` per
    example when given), :math:`\log A_o = \log\sum_{c,i} e^{\alpha_i + \beta_{i+o} - 1}` (n, kk) for that alpha, and
    (with ``alpha_prev``) the L1 error of the rows of ``alpha_prev`` per example. The plan of exact rows is
    :math:`\Pi_{i,o} = \hat x_i\, t_{o,i} / acc_i` with the terms of :meth:`_Geometry.lse`, so
    :math:`A_o = e^{\psi C_o}\sum_i \Pi_{i,o}` is one batched matrix-vector product, without further exponentials;
    relaxation rescales row i by :math:`e^{\alpha_i - \alpha^{new}_i}`.
    """
    lse, terms, acc = geo.lse(beta, psi)
    r = lse - 1.0
    alpha = logx - r  # log 0 stays about _NEG_BIG
    weight = xh / acc  # the plan of exact rows is terms * weight
    err = None
    if alpha_prev is not None:
        err = (torch.exp((alpha_prev + r).clamp_min(geo.floor)) - xh).abs().sum((1, 2, 3))
        if omega is not None:
            relaxed = alpha_prev + _lam5(omega) * (alpha - alpha_prev)
            weight = weight * torch.exp(relaxed - alpha)
            alpha = relaxed
    n = xh.shape[0]
    # a batched matrix-vector product, as an in-place product and a sum over the pixels: on CPUs torch.bmm with one
    # column runs as a batched gemv several times slower than this (1.6 vs 0.23 ms at 32x1x28x28)
    flat = terms.view(n, geo.kk, geo.c * geo.ext)
    moved = flat.mul_(geo.extend(weight).unsqueeze(1)).sum(2)
    log_a = torch.log(moved) + psi[:, None] * geo.cost
    return alpha, log_a, err


def _beta_step(geo: _Geometry, alpha: torch.Tensor, psi: torch.Tensor, wh: torch.Tensor, u: torch.Tensor,
               lam: torch.Tensor, reach: torch.Tensor, y_prev: torch.Tensor | None
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """Box-constrained Lambert-W column update (module docstring); returns (beta, log W) for the next warm start.

    ``reach`` is 1.0 where some source pixel with mass lies in the window, else 0.0: a pixel no source mass can reach
    gets z = 0, and any beta >= lam * w is then optimal (we take lam * w). Its log s is about ``_NEG_BIG``, which
    keeps every intermediate finite."""
    log_s = geo.lse(alpha, psi)[0] - 1.0
    lam4 = _lam5(lam)
    log_lam = torch.log(lam4)
    y = _log_w(log_lam + lam4 * wh + log_s, y_prev)
    log_z = torch.minimum(y, torch.log(lam4 * u)) - log_lam
    return reach * (log_z - log_s) + (1.0 - reach) * (lam4 * wh), y


def _log_offset_mass(geo: _Geometry, alpha: torch.Tensor, beta: torch.Tensor) -> torch.Tensor:
    """:math:`\\log A_o = \\log\\sum_{c,i} e^{\\alpha_i + \\beta_{i+o} - 1}` per example and offset: (n, kk)."""
    n = alpha.shape[0]
    t = geo.window(geo.pad(beta)) + alpha[:, None, None]
    return torch.logsumexp(t.reshape(n, geo.kk, -1), 2) - 1.0


def _psi_step(geo: _Geometry, log_a: torch.Tensor, psi: torch.Tensor, eps: torch.Tensor, max_newton: int = 50
              ) -> torch.Tensor:
    """Exact maximisation of g over psi >= 0 given alpha, beta (safeguarded Newton on log cost(psi) = log eps)."""
    lw0 = log_a + geo.log_cost  # log of the cost carried by each offset at psi = 0, (n, kk)
    log_eps = torch.log(eps)
    active = torch.logsumexp(lw0, 1) > log_eps
    p = torch.where(active, psi, torch.zeros_like(psi))
    rtol = 64 * torch.finfo(psi.dtype).eps
    for _ in range(max_newton):
        lw = lw0 - p[:, None] * geo.cost
        mx = lw.amax(1, keepdim=True)
        e = torch.exp(lw - mx)
        s0 = e.sum(1)
        lc = mx.squeeze(1) + torch.log(s0)  # log cost(psi)
        step = (lc - log_eps) * s0 / (e @ geo.cost)  # Newton on log cost; -d log cost / d psi = E[C]
        p_new = torch.where(active & torch.isfinite(step), (p + step).clamp_min(0.0), p)
        active = active & ((p_new - p).abs() > rtol * (1.0 + p))  # settled examples stop (batch independence)
        p = p_new
        if not bool(active.any()):
            break
    return p


def _dual(geo: _Geometry, alpha, beta, psi, log_a, xh, wh, u, lam, eps) -> torch.Tensor:
    """g(alpha, beta, psi) per example (float64), from the per-offset masses log_a of (alpha, beta)."""
    ax = (alpha * xh).sum((1, 2, 3), dtype=torch.float64)  # alpha is finite (log 0 = _NEG_BIG) where xh = 0
    total = torch.exp(torch.logsumexp(log_a - psi[:, None] * geo.cost, 1)).double()
    return -psi.double() * eps.double() + ax + _h_beta(beta, wh, u, _lam5(lam)) - total


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


def _cap_columns(geo: _Geometry, plan: torch.Tensor, cap: torch.Tensor, xh: torch.Tensor, passes: int | None = None
                 ) -> torch.Tensor:
    r"""Box repair of a window-layout plan (contiguous), in place: where a column exceeds ``cap``, take the excess
    proportionally from the mass moved *into* that pixel and leave it at its source pixel instead. Rows are
    unchanged, the cost can only decrease. Returns the columns :math:`z = \Pi^\top\mathbf 1`, all within ``cap``.

    Only the entries moving mass into a column over its cap change, so a pass gathers those (k*k - 1 per such column,
    a few hundred columns per batch at most) by their flat indices and updates the plan, the stay-in-place entries of
    their sources and the columns in place (a pass over the whole plan cost ten times more). A returned share raises
    its source's own column, which may then exceed the cap in turn (saturated pixels of real images form such
    chains), hence the passes; after ``passes`` of them, what is left over is removed at once by mixing every move
    with staying in place, :math:`\Pi \leftarrow (1 - \theta)\Pi + \theta\,\mathrm{diag}(\hat x)` with the smallest
    θ per example that brings every column within its cap (possible because :math:`\hat x \le` cap): rows kept,
    cost scaled by :math:`1 - \theta`."""
    k, r, c, h, w = geo.k, geo.r, geo.c, geo.h, geo.w
    centre = plan[:, r, r]
    tiny = torch.finfo(plan.dtype).tiny
    slack = 4 * torch.finfo(plan.dtype).eps
    z = geo.colsum(plan).contiguous()
    flat, zf, capf = plan.view(-1), z.view(-1), cap.reshape(-1)
    hw, chw = h * w, c * h * w
    # the non-centre offsets (a, b) and their displacements; the source of target (i, j) is (i - di, j - dj)
    offs = [(a, b) for a in range(k) for b in range(k) if (a, b) != (r, r)]
    da = torch.tensor([a - r for a, _ in offs], device=plan.device)
    db = torch.tensor([b - r for _, b in offs], device=plan.device)
    o_lin = torch.tensor([a * k + b for a, b in offs], device=plan.device)
    centre_o = r * k + r
    for _ in range(_CAP_PASSES if passes is None else passes):
        over = (z - cap) > slack * cap
        tgt = over.view(-1).nonzero().squeeze(1)  # flat (example, channel, row, col) indices of the columns over
        if tgt.numel() == 0:
            return z
        ex, rem = tgt // chw, tgt % chw
        ch, pix = rem // hw, rem % hw
        yi, xj = pix // w, pix % w
        sy, sx = yi[:, None] - da[None], xj[:, None] - db[None]  # (M, kk - 1) sources
        inside = ((sy >= 0) & (sy < h) & (sx >= 0) & (sx < w)).to(plan.dtype)
        syc, sxc = sy.clamp(0, h - 1), sx.clamp(0, w - 1)
        base = (ex[:, None] * (k * k) + o_lin[None]) * chw + ch[:, None] * hw  # plan index without the pixel
        ent = base + syc * w + sxc
        centre_ent = (ex[:, None] * (k * k) + centre_o) * chw + ch[:, None] * hw + syc * w + sxc
        zt = zf[tgt]
        stay = flat[(ex * (k * k) + centre_o) * chw + rem]
        share = ((zt - capf[tgt]) / (zt - stay).clamp_min(tiny)).clamp(0.0, 1.0)  # of the inflow
        moved = flat[ent] * share[:, None] * inside
        flat.index_add_(0, ent.reshape(-1), -moved.reshape(-1))  # (outside the image: clamped, moved is 0)
        flat.index_add_(0, centre_ent.reshape(-1), moved.reshape(-1))  # the sources keep it
        zf.index_add_(0, (ex[:, None] * chw + ch[:, None] * hw + syc * w + sxc).reshape(-1), moved.reshape(-1))
        zf.index_add_(0, tgt, -moved.sum(1))
    excess = z - cap
    if bool((excess > slack * cap).any()):
        # z(theta) = (1 - theta) z + theta xh <= cap  <=>  theta >= (z - cap) / (z - xh) on every column over its cap
        need = torch.where(excess > 0, excess / (z - xh).clamp_min(tiny), torch.zeros_like(z))
        theta = need.amax((1, 2, 3)).clamp(0.0, 1.0) * (1.0 + 4 * slack)
        keep = (1.0 - theta).clamp_min(0.0)
        stay = centre.clone()
        plan.mul_(keep.view(-1, 1, 1, 1, 1, 1))
        centre.copy_((xh - plan.sum((1, 2))).clamp_min(0.0))
        z = keep.view(-1, 1, 1, 1) * (z - stay) + centre
    return z


def _rows_plan(geo: _Geometry, beta: torch.Tensor, psi: torch.Tensor, xh: torch.Tensor, u: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    r"""The plan of exact rows of (β, ψ), box-repaired: (plan (n, k, k, C, H, W), its columns, its cost).

    The rows: :math:`\Pi_{i,o} = \hat x_i t_{o,i}/acc_i` (the α step's plan), zero at offsets that leave the
    image, and the stay-in-place entry of each row takes what the moves leave (which also absorbs rounding)."""
    n, r = beta.shape[0], geo.r
    tiny = torch.finfo(xh.dtype).tiny
    _, terms, acc = geo.lse(beta, psi)
    plan = terms.view(n, geo.k, geo.k, geo.c, geo.h, geo.wp)[..., :geo.w].contiguous()
    plan.mul_((xh / acc)[:, None, None]).mul_(geo.valid6)
    centre = plan[:, r, r]
    centre.zero_()
    off = plan.sum((1, 2))
    plan.mul_(torch.where(off > xh, xh / off.clamp_min(tiny), torch.ones_like(xh))[:, None, None])
    centre.copy_((xh - plan.sum((1, 2))).clamp_min(0.0))
    z = _cap_columns(geo, plan, u, xh)
    return plan, z, plan.sum((3, 4, 5)).reshape(n, geo.kk) @ geo.cost


def _finalise(geo: _Geometry, beta: torch.Tensor, psi: torch.Tensor, xh: torch.Tensor, u: torch.Tensor,
              eps: torch.Tensor, refit: bool = True) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    r"""Feasible plan (n, k, k, C, H, W) from final duals, its cost and its columns: exact rows (:func:`_rows_plan`),
    box repair, ψ refit, budget repair.

    **ψ refit** (``refit``): where the budget binds (ψ > 0) but the rounded plan leaves part of it unused (renormalising
    the rows and the box repair both move its cost off ε; the box repair only ever lowers it), the plan is rebuilt
    at the ψ' where its cost is ε, by Newton steps on cost(ψ') with :math:`d\,\mathrm{cost}/d\psi = -\sum_i \hat x_i
    \mathrm{Var}_i(C)` (the variance of the offset cost in row i). Unused budget is both a worse output and, priced
    by ψ, a first-order term of the duality gap (``ψ (ε - cost)``, hundreds of times the rest on real images whose
    saturated pixels make the box bind); cost(ψ') is convex and decreasing, so Newton from the unused side lands at
    or just above ε, and the budget repair below takes the rest.
    """
    n, r = beta.shape[0], geo.r
    tiny = torch.finfo(xh.dtype).tiny
    plan, z, cost = _rows_plan(geo, beta, psi, xh, u)
    if refit:
        p = psi
        c5, c25 = geo.cost5.view(1, geo.k, geo.k, 1, 1, 1), (geo.cost5 ** 2).view(1, geo.k, geo.k, 1, 1, 1)
        for _ in range(_REFIT_STEPS):
            short = (p > 0) & (cost < eps * (1.0 - _REFIT_TOL))
            if not bool(short.any()):
                break
            sel = short.nonzero().squeeze(1)
            ps = plan[sel]
            m1, m2 = (ps * c5).sum((1, 2)), (ps * c25).sum((1, 2))
            var = (m2 - m1 * m1 / xh[sel].clamp_min(tiny)).sum((1, 2, 3)).clamp_min(tiny)
            p_new = (p[sel] - (eps[sel] - cost[sel]) / var).clamp_min(0.0)
            plan_s, z_s, cost_s = _rows_plan(geo, beta[sel], p_new, xh[sel], u[sel])
            plan[sel], z[sel], cost[sel] = plan_s, z_s, cost_s
            p = p.clone()
            p[sel] = p_new
    centre = plan[:, r, r]
    shrink = torch.where(cost > eps, eps / cost.clamp_min(tiny), torch.ones_like(cost))
    if bool((shrink < 1).any()):  # mix with the identity plan: rows and box kept, cost scaled to eps
        plan.mul_(shrink.view(-1, 1, 1, 1, 1, 1))
        centre.zero_()
        centre.copy_((xh - plan.sum((1, 2))).clamp_min(0.0))
        cost = plan.sum((3, 4, 5)).reshape(n, geo.kk) @ geo.cost
    # the columns afresh from the plan (the repairs updated them incrementally: rounding would drift)
    return plan, cost, geo.colsum(plan)


def _primal(geo: _Geometry, plan: torch.Tensor, z: torch.Tensor, wh: torch.Tensor, lam: torch.Tensor
            ) -> torch.Tensor:
    r""":math:`\frac{\lambda}{2}\|\hat w - z\|^2 + \sum\Pi\log\Pi` (float64) of a window-layout plan with columns
    ``z``."""
    quad = ((wh - z) ** 2).sum((1, 2, 3), dtype=torch.float64) * lam.double() / 2
    return quad + torch.special.xlogy(plan, plan).sum((1, 2, 3, 4, 5), dtype=torch.float64)


def _z_bound(primal: torch.Tensor, dual: torch.Tensor, lam: torch.Tensor, mass: torch.Tensor, npix: int
             ) -> torch.Tensor:
    r"""RMS distance bound per pixel (original scale) from the gap: :math:`m\sqrt{2(P - g)/\lambda}/\sqrt{npix}`."""
    gap = (primal - dual).clamp_min(0.0)
    return mass.double() * torch.sqrt(2.0 * gap / lam.double()) / math.sqrt(npix)


def _certified(primal: torch.Tensor, dual: torch.Tensor, bound: torch.Tensor, rows_ok: torch.Tensor, ztol: float,
               dtype: torch.dtype) -> torch.Tensor:
    """The stopping test of the certificate: the bound is within ``ztol``; or the duality gap is down to rounding
    (:data:`_GAP_ROUNDING` ulps of the primal: small lambda in float32 cannot certify a small ztol) and the rows are
    right (``rows_ok``)."""
    at_rounding = (primal - dual) <= _GAP_ROUNDING * torch.finfo(dtype).eps * primal.abs().clamp_min(1.0)
    return (bound <= ztol) | (at_rounding & rows_ok)


def _certify_inside(geo: _Geometry, xh: torch.Tensor, wh: torch.Tensor, u: torch.Tensor, m4: torch.Tensor,
                    eps: torch.Tensor, logx: torch.Tensor, reach: torch.Tensor, max_iter: int, atol: float,
                    omega: float = 1.8, check_every: int = 25
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    r"""Try to show that ``wh`` (with the channel masses of ``xh``) lies in the ball, i.e. find a plan from ``xh`` to
    (within ``atol`` in original pixels of) ``wh`` with cost at most ``eps``.

    The projection's iteration with the β step replaced by the exact column update :math:`\beta_j = \log\hat w_j -
    \log s_j` (no quadratic term, hence no λ and no entropic pull away from ``w``): block coordinate ascent for the
    most entropic plan between the two images within the budget (ψ grows without bound when there is none),
    over-relaxed (:math:`\alpha \leftarrow \alpha + \omega(\alpha^{new} - \alpha)`, the same for β, ω = 1.8;
    Thibault et al. 2017, "Overrelaxed Sinkhorn-Knopp"), which cuts the iterations several-fold here. Nothing is
    trusted from the iteration itself: every ``check_every`` iterations and at the end the plan is made feasible
    exactly like a projection's (:func:`_finalise`: exact rows, box, budget), and an example is certified when that
    plan's target is within ``atol`` of ``w`` everywhere. Returns (certified (n,) bool, plan (window layout), its
    cost, its columns, iterations (n,)).
    """
    dt = xh.dtype
    n = xh.shape[0]
    log_w = torch.log(wh.clamp_min(torch.finfo(dt).tiny))
    psi = torch.zeros(n, device=xh.device, dtype=dt)
    beta = torch.zeros_like(xh)
    iters = torch.zeros(n, dtype=torch.long, device=xh.device)
    alpha = _alpha_step(geo, beta, psi, logx, xh)[0]
    first = True

    def check() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        ok = torch.isfinite(psi) & torch.isfinite(alpha).flatten(1).all(1) & torch.isfinite(beta).flatten(1).all(1)
        safe_psi = torch.where(ok, psi, torch.zeros_like(psi))
        safe_beta = torch.where(ok.view(-1, 1, 1, 1), beta, torch.zeros_like(beta))
        plan, cost, z = _finalise(geo, safe_beta, safe_psi, xh, u, eps, refit=False)
        dev = ((z - wh) * m4).abs().amax((1, 2, 3))
        return ok & (dev <= atol), plan, cost, z

    for it in range(1, max_iter + 1):
        log_s = geo.lse(alpha, psi)[0] - 1.0
        beta_new = reach * (log_w - log_s)  # 0 where no source mass reaches (log s about _NEG_BIG there)
        beta = beta_new if first else beta + omega * (beta_new - beta)
        first = False
        alpha_new, log_a, _ = _alpha_step(geo, beta, psi, logx, xh)
        alpha = alpha + omega * (alpha_new - alpha)
        psi = _psi_step(geo, log_a, psi, eps)
        iters += 1
        if not bool(torch.isfinite(psi).all()):
            break
        if it % check_every == 0 and bool(check()[0].all()):
            break
    certified, plan, cost, z = check()
    return certified, plan, cost, z, iters


@full_precision
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
    reg_start: float | None = 64.0,
    reg_factor: float = 4.0,
    max_iter: int = 2000,
    tol: float = 1e-5,
    marginal_tol: float = 1e-3,
    ztol: float | None = 2e-3,
    stage_tol: float = 1e-2,
    relax: float = 1.0,
    anderson: int = 5,
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
        The cost of an offset is its p-norm, :math:`C_o = \|d(o)\|_p`: 2 is the Euclidean pixel distance of the paper's
        text (§5, the 1-Wasserstein distance). Not the ``p`` of Wong et al.'s code (``projected_sinkhorn.
        wasserstein_cost(X, p)``), whose cost is :math:`(d_i^2 + d_j^2)^{p/2}`: its ``p=2``, the default of its attack
        scripts, is the *squared* Euclidean distance, and its ``p=1`` is this ``p=2``.
    reg : float
        Entropic regularisation; :math:`\lambda = \text{reg}\cdot m` (``reg_scale="mass"``) or :math:`\lambda =
        \text{reg}` (``"absolute"``, the paper's convention). Larger is closer to the exact projection and slower.
    reg_start, reg_factor : float
        Cold starts anneal :math:`\lambda` from :math:`\text{reg\_start}\cdot m` (per unit mass, whatever
        ``reg_scale``; the final λ if that is smaller) by ``reg_factor`` per stage; ``reg_start=None`` runs at ``reg``
        from the start.
    max_iter : int
        Hard bound on the iterations of every example (all stages).
    tol, marginal_tol, ztol : float
        Convergence, judged in the final stage (module docstring): the duality gap certifies that the output is
        within ``ztol`` of the exact solution of the regularised problem (root-mean-square per pixel, original [0, 1]
        scale; checked once the row error, the L1 change of the row sums made by the β step in unit mass, is below
        ``10 * marginal_tol``). Where the gap is down to rounding, a row error ``<= marginal_tol`` suffices.
        ``ztol=None`` turns the certificate off: then the dual objective must have risen by at most
        ``tol * max(1, |g|)`` in the last iteration and the row error be ``<= marginal_tol`` (a guard that matters at
        large λ, where the dual is flat and rises slowly long before the plan is right).
    stage_tol : float
        An intermediate annealing stage ends when its marginal error is ``<= stage_tol``.
    relax : float
        Over-relaxation ω of the α and β updates, in [1, 2) (1 = the paper's plain block ascent; see the module);
        only with ``anderson=0``.
    anderson : int
        Memory of the Anderson acceleration of the iteration (module docstring); 0 turns it off.
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
                         ("reg_start", 1.0 if reg_start is None else reg_start, 0.0),
                         ("ztol", 1.0 if ztol is None else ztol, 0.0)):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= low:
            raise UserError(f"{name} must be a finite number > {low:g}, got {v!r}")
    if isinstance(max_iter, bool) or not isinstance(max_iter, int) or max_iter < 1:
        raise UserError(f"max_iter must be an integer >= 1, got {max_iter!r}")
    if isinstance(anderson, bool) or not isinstance(anderson, int) or anderson < 0:
        raise UserError(f"anderson must be an integer >= 0, got {anderson!r}")
    if anderson > 0 and relax != 1.0:
        raise UserError("relax > 1 (over-relaxation) and anderson > 0 (Anderson acceleration) do not combine: the "
                        "over-relaxed iteration carries beta in its state, which Anderson does not extrapolate; "
                        "pass anderson=0 to over-relax")

    orig_dtype = x.dtype
    if x.dtype in (torch.float16, torch.bfloat16):  # too coarse for the log domain: compute in float32
        x, w, eps_v = x.float(), w.float(), eps_v.float()
    dt, dev = x.dtype, x.device
    n, c, h, wd = x.shape
    npix = c * h * wd
    geo = _Geometry(c, h, wd, k, p, dev, dt)

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
    bound_out = torch.full((n,), float("nan"), device=dev, dtype=dt)
    lam_out = lam_final.clone()
    z_out = x.clone()
    cost_out = torch.zeros(n, device=dev, dtype=dt)
    plan_out = None
    if return_plan:
        plan_out = torch.zeros(n, c, geo.kk, h, wd, device=dev, dtype=dt)

    def store(out: torch.Tensor, plan: torch.Tensor, cost: torch.Tensor, z: torch.Tensor) -> None:
        """Outputs of the examples ``out`` from their feasible window-layout plans and columns."""
        z_out[out] = (z * m4[out]).clamp(0.0, 1.0)
        cost_out[out] = cost
        if plan_out is not None:
            plan_out[out] = geo.public(plan)

    # 1.0 where some pixel with mass lies in the window (a column the plan can reach), else 0.0
    reach_all = geo.window(geo.pad((x > 0).to(dt), 0.0)).amax((1, 2))

    # trivial examples: empty image, zero radius, or w == x: the answer is x with the identity plan
    trivial = (mass <= 0) | (eps_v <= 0) | (w == x).flatten(1).all(1)
    converged |= trivial
    if plan_out is not None:
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
        psi0 = torch.ones(n, device=dev, dtype=dt)
        # the first stage: reg_start per unit mass whatever reg_scale (never above the final lambda)
        lam0 = lam_final.clone() if reg_start is None else torch.minimum(lam_final, reg_start * m4.view(-1))
        beta0 = torch.zeros_like(x)
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
            logx_c = torch.where(xpos_c, torch.log(xc.clamp_min(torch.finfo(dt).tiny)), _NEG_BIG)
            ok, plan_c, cost_c, zc, it_c = _certify_inside(geo, xc, wh_all[cand], u_all[cand], m4[cand], eps_v[cand],
                                                       logx_c, reach_all[cand], min(max_iter, 200), inside_atol)
            iters[cand] += it_c
            hit = cand[ok]
            store(hit, plan_c[ok], cost_c[ok], zc[ok])
            converged[hit] = True
            trivial = trivial.clone()
            trivial[hit] = True

    idx = (~trivial).nonzero().squeeze(1)
    xh, wh, u, eps_a = xh_all[idx], wh_all[idx], u_all[idx], eps_v[idx]
    lam, lam_f, mass_a = lam0[idx].clone(), lam_final[idx], mass[idx]
    xpos = xh > 0
    logx = torch.where(xpos, torch.log(xh.clamp_min(torch.finfo(dt).tiny)), _NEG_BIG)
    reach = reach_all[idx]
    beta, psi = beta0[idx].clone(), psi0[idx].clone()
    alpha = _alpha_step(geo, beta, psi, logx, xh)[0]
    g_prev = torch.full((idx.numel(),), float("nan"), device=dev, dtype=torch.float64)
    g = g_prev.clone()
    err = g_prev.to(dt)
    stage_it = torch.zeros(idx.numel(), dtype=torch.long, device=dev)
    relaxed = relax != 1.0
    omega_n = torch.full((idx.numel(),), float(relax), device=dev, dtype=dt)
    first_stage = (lam < lam_f) & torch.full_like(lam, warm is None, dtype=torch.bool)
    y_lw: torch.Tensor | None = None  # log W of the last beta step (warm start of the next one)
    aa = sup_idx = sup_w = None
    if anderson > 0:
        # Anderson's state: alpha on the pixels with mass (padded per example with pixels without: weight 0) and psi
        flat_pos = xpos.flatten(1)
        n_sup = flat_pos.sum(1)
        width = max(int(n_sup.max()), 1) if idx.numel() else 1
        sup_idx = torch.argsort((~flat_pos).to(torch.int8), dim=1, stable=True)[:, :width]  # pixels with mass first
        # Anderson's metric (the dual's curvature): alpha_i weighted by sqrt(xh_i), psi by sqrt(eps); 0 on the padding
        sup_w = torch.where(torch.arange(width, device=dev)[None] < n_sup[:, None],
                            xh.flatten(1).gather(1, sup_idx).clamp_min(torch.finfo(dt).tiny).sqrt(),
                            torch.zeros((), device=dev, dtype=dt))
        aa = _Anderson(idx.numel(), width + 1, anderson, dev, dt)
    certify = ztol is not None
    # certificate schedule per example: next stage iteration to check at, last bound and when it was computed
    cert_next = torch.zeros(idx.numel(), dtype=torch.long, device=dev)
    cert_last = torch.full((idx.numel(),), float("nan"), device=dev, dtype=torch.float64)
    cert_last_it = torch.zeros(idx.numel(), dtype=torch.long, device=dev)

    def retire(sel: torch.Tensor, ok: torch.Tensor, ready: tuple[torch.Tensor, ...] | None = None) -> None:
        """Write the examples ``sel`` (a bool mask over the active batch) into the outputs; ``ready`` holds their
        (plan, cost, z, bound) when the certificate already computed them."""
        out = idx[sel]
        if ready is None:
            plan, cost, z = _finalise(geo, beta[sel], psi[sel], xh[sel], u[sel], eps_a[sel])
            bound = _z_bound(_primal(geo, plan, z, wh[sel], lam[sel]), g[sel], lam[sel], mass_a[sel], npix)
        else:
            plan, cost, z, bound = ready
        store(out, plan, cost, z)
        bound_out[out] = bound.to(dt)
        alpha_out[out] = torch.where(xpos[sel], alpha[sel], _NEG)
        beta_out[out], psi_out[out] = beta[sel], psi[sel]
        lam_out[out] = lam[sel]  # the stage it reached (below lam_final when max_iter cut the annealing short)
        converged[out] = ok[sel]
        dual_out[out] = g[sel].to(dt)
        err_out[out] = err[sel]

    while idx.numel():
        keep_state = (alpha, beta, psi)
        # the first stage of a cold start runs plain block ascent: far from the solution over-relaxation oscillates
        om = torch.where(first_stage, torch.ones_like(omega_n), omega_n) if relaxed else None
        beta_new, y_lw = _beta_step(geo, alpha, psi, wh, u, lam, reach, y_lw)
        beta = beta + _lam5(om) * (beta_new - beta) if relaxed else beta_new
        alpha, log_a, err = _alpha_step(geo, beta, psi, logx, xh, alpha, om)
        psi = _psi_step(geo, log_a, psi, eps_a)
        g = _dual(geo, alpha, beta, psi, log_a, xh, wh, u, lam, eps_a)
        bad = ~torch.isfinite(g)
        if bool(bad.any()):  # an over-relaxed step blew up: undo it and continue with plain block ascent
            b4 = bad.view(-1, 1, 1, 1)
            alpha = torch.where(b4, keep_state[0], alpha)
            beta = torch.where(b4, keep_state[1], beta)
            psi = torch.where(bad, keep_state[2], psi)
            y_lw = torch.where(b4, torch.full_like(y_lw, float("nan")), y_lw)
            omega_n = torch.where(bad, torch.ones_like(omega_n), omega_n)
            g = torch.where(bad, g_prev, g)
            err = torch.where(bad, torch.full_like(err, float("inf")), err)
        if aa is not None:
            # Anderson: the next state mixes the recent ones; a dual decrease (or a blow-up) restarts the history
            aa.reset(bad | (g < g_prev - _AA_DEC * g.abs()))
            psi_w = eps_a.sqrt()[:, None]
            s_in = torch.cat([keep_state[0].flatten(1).gather(1, sup_idx) * sup_w, psi_w * keep_state[2][:, None]], 1)
            s_out = torch.cat([alpha.flatten(1).gather(1, sup_idx) * sup_w, psi_w * psi[:, None]], 1)
            mixed = aa.step(s_in, s_out)
            new_alpha = mixed[:, :-1] / sup_w.clamp_min(torch.finfo(dt).tiny)  # (the padding is overwritten below)
            alpha_next = torch.where(xpos, alpha.flatten(1).scatter(1, sup_idx, new_alpha).view_as(alpha), alpha)
            psi_next = (mixed[:, -1] / psi_w.squeeze(1)).clamp_min(0.0)
        else:
            alpha_next, psi_next = alpha, psi
        iters[idx] += 1
        stage_it += 1
        rise = (g - g_prev).abs() / g.abs().clamp_min(1.0)
        settled = torch.isfinite(rise) & (rise <= tol)
        final = lam >= lam_f
        # without the certificate: the row error; with it, the certificate below decides
        done = final & settled & (err <= marginal_tol) if not certify else torch.zeros_like(settled)
        advance = ~final & ((err <= stage_tol) | (stage_it >= stage_cap_all[idx]))
        out_of_budget = iters[idx] >= max_iter
        if relaxed:  # safeguard: a dual decrease halves omega - 1, a rise lets it grow back slowly
            dec = g < g_prev - 1e-6 * g.abs()
            omega_n = torch.where(dec, 1.0 + (omega_n - 1.0) * 0.5, (omega_n + _OMEGA_REGROW).clamp_max(relax))
        g_prev = g
        if certify:
            cand = final & (err <= _CERT_GATE * marginal_tol) & (stage_it >= cert_next) & (rise <= _CERT_RISE)
            if bool(cand.any()):
                bc, pc, xc, uc, ec = beta[cand], psi[cand], xh[cand], u[cand], eps_a[cand]
                lc, mc = lam[cand], mass_a[cand]
                gc, wc, rows_ok = g[cand], wh[cand], err[cand] <= marginal_tol
                plan_c, cost_c, z_c = _finalise(geo, bc, pc, xc, uc, ec, refit=False)
                primal_c = _primal(geo, plan_c, z_c, wc, lc)
                b_c = _z_bound(primal_c, gc, lc, mc, npix)
                ok_c = _certified(primal_c, gc, b_c, rows_ok, ztol, dt)
                # the psi refit (in _finalise) removes the unused-budget term psi (eps - cost) of the gap: run it where
                # that term is what stands between this check and success
                slack = (pc * (ec - cost_c)).clamp_min(0.0).double()
                hope = _certified(primal_c - slack, gc, _z_bound(primal_c - slack, gc, lc, mc, npix), rows_ok, ztol, dt)
                try_refit = ~ok_c & hope & (slack > 0)
                if bool(try_refit.any()):
                    sel = try_refit.nonzero().squeeze(1)
                    plan_r, cost_r, z_r = _finalise(geo, bc[sel], pc[sel], xc[sel], uc[sel], ec[sel])
                    primal_r = _primal(geo, plan_r, z_r, wc[sel], lc[sel])
                    b_r = _z_bound(primal_r, gc[sel], lc[sel], mc[sel], npix)
                    better = b_r < b_c[sel]
                    if bool(better.any()):
                        upd = sel[better]
                        plan_c[upd], cost_c[upd], z_c[upd] = plan_r[better], cost_r[better], z_r[better]
                        primal_c[upd], b_c[upd] = primal_r[better], b_r[better]
                        ok_c[upd] = _certified(primal_c[upd], gc[upd], b_c[upd], rows_ok[upd], ztol, dt)
                # next check: when the geometric decay of the bound since the last check predicts success
                prev, gap_it = cert_last[cand], (stage_it[cand] - cert_last_it[cand]).double()
                rate = torch.where(prev > b_c, (b_c / prev).log() / gap_it, torch.zeros_like(b_c))
                wait = torch.where(rate < 0, (math.log(ztol) - b_c.log()) / rate, torch.full_like(b_c, _CERT_EVERY))
                cert_next[cand] = stage_it[cand] + wait.nan_to_num(_CERT_EVERY).clamp(2, 4 * _CERT_EVERY).long()
                cert_last[cand], cert_last_it[cand] = b_c, stage_it[cand]
                if bool(ok_c.any()):
                    hit = cand.clone()
                    hit[cand] = ok_c
                    retire(hit, hit, (plan_c[ok_c], cost_c[ok_c], z_c[ok_c], b_c[ok_c]))
                    done = done & ~hit
                    out_of_budget = out_of_budget & ~hit
                    gone = hit
                else:
                    gone = torch.zeros_like(done)
            else:
                gone = torch.zeros_like(done)
        else:
            gone = torch.zeros_like(done)
        leave = done | out_of_budget
        if bool(leave.any()):
            retire(leave, done)
        leave = leave | gone
        if bool(leave.any()):
            keep = ~leave
            idx = idx[keep]
            xh, wh, u, eps_a, lam, lam_f = xh[keep], wh[keep], u[keep], eps_a[keep], lam[keep], lam_f[keep]
            xpos, logx, beta, psi, alpha, mass_a = xpos[keep], logx[keep], beta[keep], psi[keep], alpha[keep], \
                mass_a[keep]
            reach = reach[keep]
            g_prev, g, err, stage_it, advance = g_prev[keep], g[keep], err[keep], stage_it[keep], advance[keep]
            omega_n, y_lw, first_stage = omega_n[keep], y_lw[keep], first_stage[keep]
            cert_next, cert_last, cert_last_it = cert_next[keep], cert_last[keep], cert_last_it[keep]
            alpha_next, psi_next = alpha_next[keep], psi_next[keep]
            if aa is not None:
                aa.keep(keep)
                sup_idx, sup_w = sup_idx[keep], sup_w[keep]
        alpha, psi = alpha_next, psi_next
        if bool(advance.any()):
            # next stage: lambda *= reg_factor; beta and psi scaled by ratio**p with the best p (module docstring)
            sub = advance.nonzero().squeeze(1)
            new_lam = torch.minimum(lam[sub] * reg_factor, lam_f[sub])
            ratio = new_lam / lam[sub]
            xs, ws, us, es, lxs = xh[sub], wh[sub], u[sub], eps_a[sub], logx[sub]
            best: list[torch.Tensor] = []
            cands = [(beta[sub] * _lam5(ratio ** pw), psi[sub] * ratio ** pw) for pw in _ADVANCE_POWERS]
            for b_c, p0 in cands:
                a_c, la_c, _ = _alpha_step(geo, b_c, p0, lxs, xs)
                p_c = _psi_step(geo, la_c, p0, es)
                g_c = _dual(geo, a_c, b_c, p_c, la_c, xs, ws, us, new_lam, es)
                if not best:
                    best = [g_c, a_c, b_c, p_c]
                else:
                    better = g_c > best[0]
                    b4 = better.view(-1, 1, 1, 1)
                    best = [torch.where(better, g_c, best[0]), torch.where(b4, a_c, best[1]),
                            torch.where(b4, b_c, best[2]), torch.where(better, p_c, best[3])]
            alpha[sub], beta[sub], psi[sub] = best[1], best[2], best[3]
            lam[sub] = new_lam
            g_prev[sub] = float("nan")
            stage_it[sub] = 0
            y_lw[sub] = float("nan")
            first_stage[sub] = False
            if aa is not None:
                aa.reset(advance)

    bad = ~converged
    if bool(bad.any()):
        warnings.warn(f"projected Sinkhorn did not converge for {int(bad.sum())} of {n} example(s) within "
                      f"max_iter={max_iter} iterations (tol={tol:g}, ztol={ztol}); the outputs are feasible but "
                      f"further from the projection: raise `max_iter` (or `ztol`, `tol`, or lower `reg`)",
                      ProjectionConvergenceWarning,
                      stacklevel=4)  # the caller, past torch.no_grad's and full_precision's wrappers

    duals = ProjectionDuals(alpha_out, beta_out, psi_out, lam_out)
    return ProjectionResult(z=z_out.to(orig_dtype), cost=cost_out.to(orig_dtype), iterations=iters,
                            converged=converged, dual=dual_out, marginal_error=err_out, duals=duals, mass=mass,
                            plan=plan_out, z_error_bound=bound_out)


def dual_objective(x: torch.Tensor, w: torch.Tensor, eps: float | torch.Tensor, duals: ProjectionDuals, *,
                   kernel_size: int = 5, p: float = 2) -> torch.Tensor:
    r"""The dual objective :math:`g(\alpha, \beta, \psi)` of the unit-mass problem (module docstring), per example.

    ``x``, ``w`` are in the original scale (N, C, H, W); ``duals.lam`` is :math:`\lambda` per example. For tests and
    diagnostics: by weak duality it is at most :func:`primal_objective` of any feasible plan.
    """
    x, w, e = _check_inputs(x, w, eps)
    geo = _Geometry(x.shape[1], x.shape[2], x.shape[3], check_kernel_size(kernel_size), p, x.device, x.dtype)
    m4 = x.sum((1, 2, 3)).view(-1, 1, 1, 1)
    xh, wh = x / m4, w / m4
    u = (1.0 / m4).expand_as(x)
    alpha = torch.where(x > 0, duals.alpha, _NEG_BIG)  # -inf (empty pixels) -> the finite log 0 of the iteration
    log_a = _log_offset_mass(geo, alpha, duals.beta)
    return _dual(geo, alpha, duals.beta, duals.psi, log_a, xh, wh, u, duals.lam, e).to(x.dtype)


def primal_objective(x: torch.Tensor, w: torch.Tensor, plan: torch.Tensor, lam: torch.Tensor) -> torch.Tensor:
    r"""The primal objective :math:`\frac{\lambda}{2}\|\hat w - z\|^2 + \sum\Pi\log\Pi` with :math:`z = \Pi^\top\mathbf
    1`, for a unit-mass plan (N, C, k*k, H, W) and ``x``, ``w`` in the original scale. Feasibility (rows, cap, budget)
    is not checked here."""
    m4 = x.sum((1, 2, 3)).view(-1, 1, 1, 1)
    z = target_marginal(plan)
    ent = torch.where(plan > 0, plan * torch.log(plan.clamp_min(torch.finfo(plan.dtype).tiny)),
                      torch.zeros_like(plan)).sum((1, 2, 3, 4))
    return lam / 2 * ((w / m4 - z) ** 2).sum((1, 2, 3)) + ent
