r"""Targeted Fast Adaptive Boundary attack, FAB-T (Croce & Hein, "Minimally distorted adversarial examples with a fast
adaptive boundary attack", ICML 2020), in L-infinity and L2, as AutoAttack's standard version runs it.

FAB looks for the smallest perturbation that fools the model by repeatedly projecting onto the linearised decision
boundary. In the targeted version the boundary is the one between the true class :math:`y` and one target :math:`t`,
:math:`F = z_t - z_y`; its linearisation at the iterate :math:`x_k` is the hyperplane

.. math::

    \pi_k = \{z : F(x_k) + \langle \nabla F(x_k), z - x_k \rangle = 0\}.

The core operation, :func:`project_onto_hyperplane`, is the exact projection of a point onto :math:`\pi_k` within the
box :math:`[0, 1]^d` in the threat norm. Each step (Algorithm 1 of the paper) projects both the iterate and the
original point, moves towards a convex combination of the two projections extrapolated by :math:`\eta`, and, once the
iterate is adversarial, records it and steps back towards the original point by the factor :math:`\beta`.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn as nn

from kit.attacks.apgd import top_targets
from kit.attacks.base import Attack, AttackResult, Norm, as_norm, expand_as_batch, lp_norm, project, require_counts
from kit.errors import UserError


def project_onto_hyperplane(t: torch.Tensor, w: torch.Tensor, b: torch.Tensor, norm: Norm | str) -> torch.Tensor:
    r"""The smallest step from each point onto its hyperplane within the box :math:`[0, 1]^d`, in L-inf or L2.

    For rows ``t`` (N, d) in :math:`[0, 1]^d`, normals ``w`` (N, d) and offsets ``b`` (N,), returns ``delta`` (N, d)
    solving

    .. math::

        \min_\delta \|\delta\|_p \quad \text{s.t.} \quad \langle w, t + \delta \rangle = b,
        \quad t + \delta \in [0, 1]^d, \qquad p \in \{\infty, 2\}.

    Solution (exact, no iterative solver). Let :math:`c = \langle w, t \rangle - b` and :math:`s = \operatorname{sign}
    c` (1 at 0). Every coordinate moves against :math:`s w_i`, by
    :math:`m_i(\lambda) = \min(\lambda \kappa_i, r_i)`, where :math:`r_i` is its room to the box (:math:`t_i` when
    moving down, :math:`1 - t_i` when moving up), :math:`\kappa_i = 1` in L-inf and :math:`\kappa_i = |w_i|` in L2,
    and :math:`\lambda \ge 0` is the smallest value with

    .. math::

        h(\lambda) = \sum_i |w_i| \min(\lambda \kappa_i, r_i) = |c|.

    :math:`h` is piecewise linear and nondecreasing with breakpoints :math:`r_i / \kappa_i`: sorting them locates the
    piece and :math:`\lambda` follows in closed form (O(d log d) per row). In L-inf :math:`\lambda` is the optimal
    value of the linear program (the step returned moves every coordinate as far as :math:`\lambda` allows, one of the
    optimal steps, the one AutoAttack's ``projection_linf`` returns); in L2, :math:`\delta_i = \operatorname{clip}(-\mu
    w_i, -t_i, 1 - t_i)` with :math:`\mu = s \lambda` satisfies the KKT conditions of the (strictly convex) quadratic
    program, so it is its unique solution.

    Where the hyperplane misses the box (:math:`h(\infty) = \sum_i |w_i| r_i < |c|`), every coordinate with
    :math:`w_i \ne 0` moves all the way to its bound: the box point closest to the hyperplane in value of
    :math:`\langle w, z \rangle`, as in AutoAttack's projections. Coordinates with :math:`w_i = 0` never move.
    """
    norm = as_norm(norm)
    c = (w * t).sum(1) - b
    ws = torch.where(c[:, None] >= 0, w, -w)  # now <ws, t + delta> must fall by |c| >= 0
    c = c.abs()
    aw = ws.abs()
    room = torch.where(ws > 0, t, 1 - t).clamp_min(0)
    kappa = torch.ones_like(aw) if norm is Norm.LINF else aw
    moving = kappa > 0
    breaks = torch.where(moving, room / torch.where(moving, kappa, 1), math.inf)
    breaks, order = breaks.sort(1)
    sat = (aw * room).gather(1, order)  # decrease of <ws, z> by coordinate i once it reaches its bound
    slope = (aw * kappa).gather(1, order)  # d/d lambda of that decrease before it does
    done = sat.cumsum(1)  # decrease from the coordinates saturated at breakpoint j (sorted order, j included)
    left = slope.flip(1).cumsum(1).flip(1)  # slope of the coordinates at breakpoint j and after (j included)
    after = torch.cat([left[:, 1:], torch.zeros_like(left[:, :1])], 1)
    h = torch.where(after > 0, done + breaks * after, done)  # h at each breakpoint (inf * 0 avoided)
    h = h.cummax(1).values  # nondecreasing in exact arithmetic; keep it so against rounding for the search
    j = torch.searchsorted(h.contiguous(), c[:, None].contiguous()).squeeze(1)  # first breakpoint with h >= |c|
    feasible = j < t.shape[1]
    jj = j.clamp(max=t.shape[1] - 1)[:, None]
    done_before = torch.where(jj > 0, done.gather(1, (jj - 1).clamp_min(0)), torch.zeros_like(c[:, None])).squeeze(1)
    slope_here = left.gather(1, jj).squeeze(1)
    lam = torch.where(slope_here > 0, (c - done_before) / slope_here.clamp_min(1e-30), torch.zeros_like(c))
    lam = torch.minimum(lam.clamp_min(0), breaks.gather(1, jj).squeeze(1))
    step = torch.where(feasible[:, None], torch.minimum(lam[:, None] * kappa, room), room)
    return -torch.sign(ws) * step


class FABT(Attack):
    r"""FAB-T: the targeted Fast Adaptive Boundary attack against each of the top classes, minimum-norm, L-inf or L2.

    The third attack of AutoAttack's standard version (Croce & Hein, ICML 2020; the attack itself from Croce & Hein,
    "Minimally distorted adversarial examples with a fast adaptive boundary attack", ICML 2020). For each example
    correctly classified, the targets are the ``n_targets`` classes :math:`t \ne y` with the highest clean logits
    (9, or :math:`K - 1` with fewer classes, as AutoAttack's FAB-T; see :func:`kit.attacks.apgd.top_targets`), and for
    each target in turn one run of ``steps`` iterations starts from :math:`x_0 = x` and, with :math:`F = z_t - z_y`,
    :math:`P(u)` the projection of :math:`u` onto the linearised boundary :math:`\pi_k` of :math:`F` at :math:`x_k`
    within :math:`[0, 1]^d` (:func:`project_onto_hyperplane`), :math:`\delta_k = P(x_k) - x_k` and
    :math:`\delta_0 = P(x) - x`:

    .. math::

        \alpha_k = \min\left(\frac{\|\delta_k\|}{\|\delta_k\| + \|\delta_0\|}, \alpha_{\max}\right), \qquad
        x_{k+1} = \operatorname{clip}_{[0, 1]}\big((1 - \alpha_k)(x_k + \eta \delta_k)
        + \alpha_k (x + \eta \delta_0)\big),

    (norms floored at :math:`10^{-8}`), and when :math:`x_{k+1}` is misclassified it is recorded (if smaller than the
    best so far) and pulled back, :math:`x_{k+1} \leftarrow x + \beta (x_{k+1} - x)`. Success is untargeted, as in
    AutoAttack: an iterate counts when the prediction differs from ``y``, whatever class it is; ``targeted`` stays
    ``False`` (``y`` holds the true labels; a judge decides on them).

    A minimum-norm attack, like :class:`~kit.attacks.fmn.FMN`: ``eps`` (constructor or call, float or per-example
    tensor) is only a cap; ``x_adv`` is the smallest adversarial over all targets and restarts, ``success`` means
    "fooled within the cap" and ``norm`` is the size of ``x_adv - x`` (0 where nothing was found within the cap, since
    ``x_adv = x`` there). Unlike AutoAttack, which attacks at one radius and so drops an example after the first target
    that fools it within that radius, every target is run for every attacked example, since a later target may give a
    smaller perturbation.

    Defaults are the paper's and AutoAttack's FAB-T: ``alpha_max = 0.1``, ``eta = 1.05``, ``beta = 0.9``, 100
    iterations, 1 restart, 9 targets. With ``restarts > 1``, each target's further restarts start from a random point
    at distance :math:`\min(u, \varepsilon) / 2` from ``x`` (the paper's choice; :math:`u` the smallest adversarial
    norm found so far, :math:`\varepsilon` the cap; uniform direction on the L2 sphere, or a uniform cube point scaled
    onto the L-inf sphere, as AutoAttack), clipped to the box; examples for which both are infinite skip them. A warm
    start ``init`` (projected into the cap ball) replaces ``x`` as the first run's starting point (it is checked, and
    recorded if adversarial).

    One addition, off by default: ``final_search`` bisection steps after the runs. FAB's overshoot :math:`\eta` keeps
    the adversarial iterates just past the boundary (on a linear model the best one settles 0.5 % above the minimum
    whatever the number of iterations); a bisection between ``x`` and the smallest adversarial removes most of that
    (10 steps: 0.03 % on a linear model). The original FAB code has an optional final search of this kind (three steps
    of a linear-approximation search along the segment, off by default; AutoAttack has none).

    Cost: one clean forward for every example, whose logits also give the targets. Misclassified-clean examples
    (``norm`` 0) and examples with a zero cap stop there. For the others, each run costs one forward at its start,
    then per iteration one backward (the gradient of :math:`F` at :math:`x_k`), one forward at :math:`x_{k+1}` (the
    check, whose graph is kept for the next gradient) and one more forward at the pulled-back point after each
    adversarial iterate but the last. So an example costs ``1 + n_targets * restarts * (1 + steps + A)`` forwards,
    ``A`` its adversarial iterates (most iterates once the boundary is crossed), and ``n_targets * restarts * steps``
    backwards (AutoAttack's standard version: 900 backwards, about 1000 to 1800 forwards); the final search adds
    ``final_search`` forwards for each example with an adversarial.

    Parameters
    ----------
    model : nn.Module
        Returns logits (N, K), K >= 2, for pixels in [0, 1].
    eps : float
        Default cap on the perturbation size (``inf``: no cap).
    norm : {"linf", "l2"}
    steps : int
        Iterations per run (the paper's :math:`N_\mathrm{iter}`).
    n_targets : int
        How many of the top non-true classes are targeted (AutoAttack: 9); capped at :math:`K - 1`.
    restarts : int
        Runs per target (AutoAttack's FAB-T: 1).
    alpha_max : float in [0, 1]
        Largest weight of the step from the original point.
    eta : float >= 1
        Extrapolation (overshoot) of the projection step.
    beta : float in (0, 1)
        Backward step towards the original point after an adversarial iterate.
    final_search : int
        Bisection steps after the runs (0: none, as AutoAttack), between ``x`` and the smallest adversarial: in L-inf
        the perturbation is clipped at a shrinking radius (as FMN's warm start), in L2 it is scaled along the segment.
        Only adversarials verified by the model (or the judge) are kept. Where the box binds, the L2 segment is not the
        optimal path (it also shrinks the coordinates held at a bound), and a little of the overshoot remains.
    seed : int
        Seeds the random starts of restarts after the first (on the inputs' device); with one restart the attack is
        deterministic and draws no random numbers.
    """

    minimum_norm = True

    def __init__(
        self,
        model: nn.Module,
        eps: float = math.inf,
        norm: Norm | str = Norm.LINF,
        steps: int = 100,
        n_targets: int = 9,
        restarts: int = 1,
        alpha_max: float = 0.1,
        eta: float = 1.05,
        beta: float = 0.9,
        final_search: int = 0,
        seed: int = 0,
    ) -> None:
        self.norm = as_norm(norm)
        super().__init__(model, eps)
        require_counts(steps=steps, n_targets=n_targets, restarts=restarts)
        require_counts(0, final_search=final_search)
        for name, v, ok, text in (("alpha_max", alpha_max, lambda a: 0 <= a <= 1, "lie in [0, 1]"),
                                  ("eta", eta, lambda a: a >= 1, "be a finite number >= 1"),
                                  ("beta", beta, lambda a: 0 < a < 1, "lie in (0, 1)")):
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or not ok(v):
                raise UserError(f"{name} must {text}, got {v!r}")
        self.steps, self.n_targets, self.restarts, self.seed = steps, n_targets, restarts, int(seed)
        self.alpha_max, self.eta, self.beta = float(alpha_max), float(eta), float(beta)
        self.final_search = final_search

    def _params(self) -> dict[str, Any]:
        return {**super()._params(), "steps": self.steps, "n_targets": self.n_targets, "restarts": self.restarts,
                "alpha_max": self.alpha_max, "eta": self.eta, "beta": self.beta, "final_search": self.final_search}

    def _random_start(self, x0: torch.Tensor, radius: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        """A point at distance ``radius`` (N,) from each ``x0`` in the threat norm, clipped to [0, 1]."""
        if self.norm is Norm.LINF:
            u = 2 * torch.rand(x0.shape, generator=gen, device=x0.device, dtype=x0.dtype) - 1
        else:
            u = torch.randn(x0.shape, generator=gen, device=x0.device, dtype=x0.dtype)
        u = u / expand_as_batch(lp_norm(u, self.norm).clamp_min(1e-12), u)
        return (x0 + expand_as_batch(radius, x0) * u).clamp(0, 1)

    def _descend(
        self, x0: torch.Tensor, y0: torch.Tensor, t0: torch.Tensor, start: torch.Tensor, check_start: bool
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """One FAB run towards targets ``t0`` from ``start``: (smallest adversarial norm per row, that iterate,
        forwards, backwards). ``check_start``: whether the start may already be adversarial (it is not ``x0``)."""
        m, dev = x0.shape[0], x0.device
        fwd = torch.zeros(m, dtype=torch.long, device=dev)
        bwd = torch.zeros_like(fwd)
        best = torch.full((m,), math.inf, dtype=x0.dtype, device=dev)
        best_x = x0.clone()
        all_rows = torch.arange(m, device=dev)

        def record(xc: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
            adv = self._fooled(logits, y0, xc)
            d = lp_norm(xc.detach() - x0, self.norm)
            better = adv & (d < best)
            best[better], best_x[better] = d[better], xc.detach()[better]
            return adv

        xk = start.detach().clone()
        xa = xk.clone().requires_grad_(True)
        logits = self.model(xa)
        fwd += 1
        if check_start:
            record(xa, logits)
        # the forwards at x_k whose graphs give the next gradient: (input, logits, its rows, rows whose gradient to use)
        parts = [(xa, logits, all_rows, torch.ones(m, dtype=torch.bool, device=dev))]
        flat0 = x0.flatten(1)
        for it in range(self.steps):
            objective = 0.0
            dfs = []
            for _, lg, rows, use in parts:
                df = lg.gather(1, t0[rows, None]).squeeze(1) - lg.gather(1, y0[rows, None]).squeeze(1)  # F = z_t - z_y
                objective = objective + df[use].sum()
                dfs.append(df.detach())
            grads = torch.autograd.grad(objective, [p[0] for p in parts], allow_unused=True)
            bwd += 1
            df_k = torch.empty(m, dtype=x0.dtype, device=dev)
            g = torch.zeros_like(x0)
            for (_, _, rows, use), df, gp in zip(parts, dfs, grads):
                df_k[rows[use]] = df[use].to(x0.dtype)
                if gp is not None:
                    g[rows[use]] = gp[use]
            with torch.no_grad():
                w = g.flatten(1)
                xf = xk.flatten(1)
                b = (w * xf).sum(1) - df_k  # pi_k: <w, z> = b
                d = project_onto_hyperplane(torch.cat([xf, flat0]), torch.cat([w, w]), torch.cat([b, b]), self.norm)
                d_k, d_0 = d[:m], d[m:]
                a_k = lp_norm(d_k, self.norm).clamp_min(1e-8)
                a_0 = lp_norm(d_0, self.norm).clamp_min(1e-8)
                alpha = (a_k / (a_k + a_0)).clamp(0, self.alpha_max)[:, None]
                x_new = ((1 - alpha) * (xf + self.eta * d_k) + alpha * (flat0 + self.eta * d_0)).clamp(0, 1)
                x_new = x_new.view_as(x0)
            last = it == self.steps - 1
            xa = x_new.requires_grad_(not last)
            with torch.set_grad_enabled(not last):
                logits = self.model(xa)
            fwd += 1
            adv = record(xa, logits)
            if last:
                break
            xk = x_new.detach().clone()
            parts = [(xa, logits, all_rows, ~adv)]
            if adv.any():  # pull the adversarial iterates back towards x; their next gradient is taken there
                rows = adv.nonzero().squeeze(1)
                xb = (x0[rows] + self.beta * (xk[rows] - x0[rows])).requires_grad_(True)
                parts.append((xb, self.model(xb), rows, torch.ones(rows.numel(), dtype=torch.bool, device=dev)))
                fwd[rows] += 1
                xk[rows] = xb.detach()
        return best, best_x, fwd, bwd

    def _bisect(self, x0: torch.Tensor, y0: torch.Tensor, x_adv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``final_search`` bisection steps on a shrink factor s in [0, 1] of the perturbation ``x_adv - x0`` (its
        L-inf radius, or its length along the segment in L2): the smallest adversarial verified (``x_adv`` itself
        where none smaller is), and its norm."""
        delta = x_adv - x0
        x_out = x_adv.clone()
        size = lp_norm(delta, self.norm)
        lo = torch.zeros(x0.shape[0], dtype=x0.dtype, device=x0.device)
        hi = torch.ones_like(lo)
        for _ in range(self.final_search):
            mid = (lo + hi) / 2
            if self.norm is Norm.LINF:  # shrink the L-inf radius: clip the perturbation at mid * its size
                xm = (x0 + project(delta, mid * size, Norm.LINF)).clamp(0, 1)
            else:  # slide along the segment from x0
                xm = (x0 + expand_as_batch(mid, delta) * delta).clamp(0, 1)
            with torch.no_grad():
                adv = self._fooled(self.model(xm), y0, xm)
            x_out[adv] = xm[adv]
            lo, hi = torch.where(adv, lo, mid), torch.where(adv, mid, hi)
        return x_out, lp_norm(x_out - x0, self.norm)

    def _run(self, x: torch.Tensor, y: torch.Tensor, eps: torch.Tensor, init: torch.Tensor | None) -> AttackResult:
        n, dev = x.shape[0], x.device
        fwd = torch.zeros(n, dtype=torch.long, device=dev)
        bwd = torch.zeros_like(fwd)
        x_adv = x.clone()
        with torch.no_grad():
            logits = self.model(x)
        fwd += 1
        if logits.shape[1] < 2:
            raise UserError(f"a targeted attack needs at least 2 classes, the model has {logits.shape[1]}")
        success = self._fooled(logits, y, x)  # misclassified clean: norm 0
        idx = (~success & (eps > 0)).nonzero().squeeze(1)
        if idx.numel() == 0:
            return AttackResult(x_adv, success, lp_norm(x_adv - x, self.norm), fwd, bwd)
        x0, y0, cap = x[idx], y[idx], eps[idx]
        targets = top_targets(logits[idx], y0, min(self.n_targets, logits.shape[1] - 1))
        best = torch.full_like(cap, math.inf)
        best_x = x0.clone()
        gen = torch.Generator(device=dev).manual_seed(self.seed)
        for k in range(targets.shape[1]):
            for restart in range(self.restarts):
                rows = torch.arange(idx.numel(), device=dev)
                if restart > 0:  # random start at min(u, cap) / 2; none possible where both are infinite
                    radius = torch.minimum(best, cap) / 2
                    rows = torch.isfinite(radius).nonzero().squeeze(1)
                    if rows.numel() == 0:
                        continue
                    start = self._random_start(x0[rows], radius[rows], gen)
                elif k == 0 and init is not None:
                    start = (x0 + project(init[idx] - x0, cap, self.norm)).clamp(0, 1)  # an infinite cap: no change
                else:
                    start = x0
                found, found_x, f, b = self._descend(x0[rows], y0[rows], targets[rows, k], start,
                                                     check_start=start is not x0)
                fwd[idx[rows]] += f
                bwd[idx[rows]] += b
                better = found < best[rows]
                best[rows[better]] = found[better]
                best_x[rows[better]] = found_x[better]
        found = torch.isfinite(best)
        if self.final_search and found.any():
            rows = found.nonzero().squeeze(1)
            best_x[rows], best[rows] = self._bisect(x0[rows], y0[rows], best_x[rows])
            fwd[idx[rows]] += self.final_search
        ok = best <= cap  # the cap: an adversarial larger than it is no success
        x_adv[idx[ok]] = best_x[ok]
        success[idx[ok]] = True
        return AttackResult(x_adv, success, lp_norm(x_adv - x, self.norm), fwd, bwd)
