"""Auto-PGD (Croce & Hein, ICML 2020): step-size-free projected gradient ascent, with the CE or the DLR loss, and its
targeted variant APGD-T (one run per target class, the targeted DLR loss), all on one loop."""

from __future__ import annotations

import itertools
import math
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from kit.attacks.base import (
    LOSSES,
    Attack,
    AttackResult,
    Norm,
    as_norm,
    expand_as_batch,
    lp_norm,
    project,
    require_counts,
)
from kit.attacks.pgd import random_in_ball
from kit.errors import UserError

MOMENTUM = 0.75
"""The paper's momentum weight alpha (fixed, not a parameter in the paper)."""


def apgd_checkpoints(n_iter: int) -> list[int]:
    r"""The iterations at which APGD may halve its step: :math:`w_j = \lceil p_j N_\mathrm{iter} \rceil`.

    :math:`p_0 = 0`, :math:`p_1 = 0.22`, :math:`p_{j+1} = p_j + \max(p_j - p_{j-1} - 0.03, 0.06)`, kept while
    :math:`p_j \le 1`; duplicates (short runs) are dropped. ``apgd_checkpoints(100)`` is
    ``[0, 22, 41, 57, 70, 80, 87, 93, 99]``; the leading 0 is :math:`w_0`.
    """
    ps = [0.0, 0.22]
    while True:
        nxt = ps[-1] + max(ps[-1] - ps[-2] - 0.03, 0.06)
        if round(nxt, 9) > 1:
            break
        ps.append(nxt)
    out: list[int] = []
    for p in ps:
        w = math.ceil(round(p * n_iter, 9))  # round first: 0.22 * 100 is 22.000000000000004 in floating point
        if not out or w > out[-1]:
            out.append(w)
    return out


class APGD(Attack):
    r"""Auto-PGD: projected gradient ascent with momentum and a step size that adapts itself per example.

    Maximises :math:`f(x') = \ell(\mathrm{model}(x'), y)` over :math:`\|x' - x\| \le \varepsilon`,
    :math:`x' \in [0, 1]^d`, following Algorithm 1 of Croce & Hein, "Reliable evaluation of adversarial robustness
    with an ensemble of diverse parameter-free attacks", ICML 2020 (APGD-CE with ``loss="ce"``, APGD-DLR with
    ``loss="dlr"``). With :math:`P` the projection onto the feasible set and :math:`\eta^{(0)} = 2\varepsilon`:

    .. math::

        x^{(1)} = P(x^{(0)} + \eta \nabla f(x^{(0)})), \quad
        z^{(k+1)} = P(x^{(k)} + \eta \nabla f(x^{(k)})), \quad
        x^{(k+1)} = P(x^{(k)} + \alpha (z^{(k+1)} - x^{(k)}) + (1 - \alpha)(x^{(k)} - x^{(k-1)})),

    with :math:`\alpha = 0.75`, the step taken along :math:`\operatorname{sign}\nabla` in L-inf and along
    :math:`\nabla / \|\nabla\|_2` in L2. At each checkpoint :math:`w_j` (see :func:`apgd_checkpoints`) the step of an
    example is halved, and its iterate reset to the best point so far :math:`x_\max` (with its stored gradient), when

    1. fewer than :math:`\rho (w_j - w_{j-1})` of the steps since :math:`w_{j-1}` increased :math:`f`, or
    2. the step was not halved at :math:`w_{j-1}` and :math:`f_\max` has not grown since :math:`w_{j-1}`.

    All of this state is per example. An example leaves the batch as soon as an iterate is misclassified (that
    iterate is returned), so fooled points stop costing forward and backward passes. In L2, :math:`P` is the projection
    onto the ball followed by clipping to :math:`[0, 1]` (not the exact projection onto their intersection).
    Subclasses change only which runs are made and what they maximise (:meth:`_runs`, :meth:`_objective`; see
    :class:`APGDT`); the loop is this one.
    ``x_last`` holds, for each example still robust, its :math:`x_\max` (the paper's output) from the restart that
    reached the highest loss, and the adversarial for the others: a warm start for a larger epsilon.

    Cost: one clean forward for every example; then, per restart, ``steps`` forwards for each example still robust
    (the iterates :math:`x^{(0)}, \ldots, x^{(N)}` with :math:`N = \text{steps} - 1`) and a backward for each of them
    but the last, whose gradient would never be used. So an example costs at most ``1 + steps * restarts`` forwards.

    Parameters
    ----------
    model : nn.Module
        Returns logits (N, K) for pixels (N, C, H, W) in [0, 1]. ``loss="dlr"`` needs K >= 3.
    eps : float
        Default radius (in [0, 1] pixel units); a call may pass a per-example (N,) tensor instead. Examples with
        radius 0 only get the clean check.
    norm : {"linf", "l2"}
    loss : {"ce", "dlr", "margin"}
        The objective :math:`\ell`: cross-entropy (APGD-CE), the Difference of Logits Ratio (APGD-DLR), or the
        Carlini-Wagner margin.
    steps : int
        Iterates evaluated per restart (forward passes); the paper's :math:`N_\mathrm{iter}` is ``steps - 1``
        gradient steps, which sets the checkpoints.
    restarts : int
        Independent runs from random points of the ball, for the examples still robust. The first run starts from
        ``init`` (projected into the ball) when a call gives one.
    rho : float
        Condition 1's threshold on the fraction of successful steps, in (0, 1); the paper uses 0.75.
    seed : int
        Seeds the random starts (on the inputs' device), so results are deterministic.
    """

    def __init__(
        self,
        model: nn.Module,
        eps: float = 0.0,
        norm: Norm | str = Norm.LINF,
        loss: str = "ce",
        steps: int = 100,
        restarts: int = 1,
        rho: float = 0.75,
        seed: int = 0,
    ) -> None:
        self.norm = as_norm(norm)
        super().__init__(model, eps)
        if loss not in LOSSES:
            raise UserError(f"unknown loss {loss!r}; known: {', '.join(LOSSES)}")
        require_counts(steps=steps, restarts=restarts)
        if isinstance(rho, bool) or not isinstance(rho, (int, float)) or not 0 < rho < 1:
            raise UserError(f"rho must lie in (0, 1), got {rho!r}")
        self.loss, self.steps, self.restarts = loss, int(steps), int(restarts)
        self.rho, self.seed = float(rho), int(seed)

    def _params(self) -> dict[str, Any]:
        return {**super()._params(), "loss": self.loss, "steps": self.steps, "restarts": self.restarts,
                "rho": self.rho, "seed": self.seed}

    def _to_set(self, x0: torch.Tensor, xa: torch.Tensor, e0: torch.Tensor) -> torch.Tensor:
        """P: project ``xa`` into the ball around ``x0``, then clip to [0, 1]."""
        return (x0 + project(xa - x0, e0, self.norm)).clamp(0, 1)

    def _check_logits(self, logits: torch.Tensor) -> None:
        """Refuse a model whose number of classes the loss cannot handle (a :class:`UserError`)."""
        if self.loss == "dlr" and logits.shape[1] < 3:
            raise UserError(f"the DLR loss needs at least 3 classes, the model has {logits.shape[1]}")

    def _runs(self, logits: torch.Tensor, y: torch.Tensor) -> list[torch.Tensor | None]:
        """The runs, in order, from the clean logits: per run, the target class of each example (N,), or ``None`` for
        the untargeted loss. APGD: one untargeted run per restart."""
        return [None] * self.restarts

    def _objective(self, logits: torch.Tensor, y: torch.Tensor, target: torch.Tensor | None) -> torch.Tensor:
        """Per-example loss to maximise, with ``target`` the run's target classes (``None`` for APGD)."""
        return LOSSES[self.loss](logits, y)

    def _direction(self, grad: torch.Tensor) -> torch.Tensor:
        if self.norm is Norm.LINF:
            return grad.sign()
        return grad / expand_as_batch(grad.flatten(1).norm(dim=1).clamp_min(1e-12), grad)

    def _run(self, x: torch.Tensor, y: torch.Tensor, eps: torch.Tensor, init: torch.Tensor | None) -> AttackResult:
        n = x.shape[0]
        fwd = torch.zeros(n, dtype=torch.long, device=x.device)
        bwd = torch.zeros_like(fwd)
        x_adv, x_last = x.clone(), x.clone()
        best_loss = torch.full((n,), -math.inf, device=x.device, dtype=x.dtype)  # f_max over restarts
        logits, success, clean_passes = self._clean_check(x, y)
        fwd += clean_passes
        self._check_logits(logits)
        gen = torch.Generator(device=x.device).manual_seed(self.seed)
        n_iter = self.steps - 1  # gradient steps per restart; the iterates are x^(0) .. x^(n_iter)
        checks = apgd_checkpoints(n_iter)

        for run, target in enumerate(self._runs(logits, y)):
            idx = (~success & (eps > 0)).nonzero().squeeze(1)
            if idx.numel() == 0:
                break
            x0, y0, e0 = x[idx], y[idx], eps[idx]
            t0 = None if target is None else target[idx]
            if run == 0 and init is not None:
                start = x0 + project(init[idx] - x0, e0, self.norm)
            else:
                start = x0 + random_in_ball(x0, e0, self.norm, gen)
            xk = start.clamp(0, 1)
            # Per-example state; every tensor here is filtered together when examples leave the batch.
            m = idx.numel()
            x_prev = xk  # x^(k-1)
            eta = 2 * e0  # step size
            f_prev = torch.zeros(m, device=x.device, dtype=x.dtype)  # f(x^(k))
            f_max = torch.full_like(f_prev, -math.inf)  # best loss so far ...
            x_max, g_max = xk.clone(), torch.zeros_like(xk)  # ... where it was reached, and the gradient there
            f_max_check = f_max.clone()  # f_max at the last checkpoint
            n_inc = torch.zeros(m, dtype=torch.long, device=x.device)  # increases since last checkpoint
            halved = torch.zeros(m, dtype=torch.bool, device=x.device)  # step halved at last checkpoint
            last_check = 0

            for t in range(n_iter + 1):
                last = t == n_iter
                xa = xk.detach().requires_grad_(not last)
                with torch.set_grad_enabled(not last):
                    logits = self.model(xa)
                fwd[idx] += 1
                fooled = self._fooled(logits, y0, xa, rows=idx)
                if fooled.any():
                    hit = idx[fooled]
                    x_adv[hit] = xa.detach()[fooled]
                    success[hit] = True
                keep = ~fooled
                if not keep.any():
                    break
                loss = self._objective(logits, y0, t0)
                f = loss.detach()[keep]
                idx, x0, y0, e0, xk, x_prev = idx[keep], x0[keep], y0[keep], e0[keep], xk[keep].detach(), x_prev[keep]
                t0 = None if t0 is None else t0[keep]
                eta, n_inc, halved, f_prev, f_max, f_max_check = (
                    eta[keep], n_inc[keep], halved[keep], f_prev[keep], f_max[keep], f_max_check[keep])
                x_max, g_max = x_max[keep], g_max[keep]
                better = f > f_max
                f_max = torch.where(better, f, f_max)
                x_max[better] = xk[better]
                if last:  # no gradient needed here: hand back the best point of the run if it beats earlier restarts
                    top = f_max > best_loss[idx]
                    best_loss[idx[top]], x_last[idx[top]] = f_max[top], x_max[top]
                    break
                grad = torch.autograd.grad(loss[keep].sum(), xa)[0][keep]
                bwd[idx] += 1
                g_max[better] = grad[better]
                if t == 0:
                    f_max_check = f.clone()  # f_max at w_0 = 0 is f(x^(0))
                else:
                    n_inc += (f > f_prev).long()
                f_prev = f

                if t in checks and t > 0:
                    cond1 = n_inc.double() < self.rho * (t - last_check)
                    cond2 = ~halved & (f_max <= f_max_check)
                    halve = cond1 | cond2
                    if halve.any():
                        eta = torch.where(halve, eta / 2, eta)
                        xk, grad = xk.clone(), grad.clone()
                        xk[halve], grad[halve] = x_max[halve], g_max[halve]
                        f_prev = torch.where(halve, f_max, f_prev)
                    halved, f_max_check, last_check = halve, f_max.clone(), t
                    n_inc = torch.zeros_like(n_inc)

                with torch.no_grad():
                    z = self._to_set(x0, xk + expand_as_batch(eta, xk) * self._direction(grad), e0)
                    if t == 0:
                        x_new = z
                    else:
                        x_new = self._to_set(x0, xk + MOMENTUM * (z - xk) + (1 - MOMENTUM) * (xk - x_prev), e0)
                x_prev, xk = xk, x_new
        x_last[success] = x_adv[success]
        return AttackResult(x_adv, success, lp_norm(x_adv - x, self.norm), fwd, bwd, x_last)


def top_targets(logits: torch.Tensor, y: torch.Tensor, k: int) -> torch.Tensor:
    """The ``k`` classes other than ``y`` with the highest logits, best first: (N, k) (AutoAttack's target choice).

    AutoAttack takes ranks 2 to ``k + 1`` of the clean logits, which are these classes for every correctly classified
    example (the only ones attacked); ``y`` is masked out here so that an example the model gets wrong but a judge
    calls correct never has its own label as a target.
    """
    if not 1 <= k < logits.shape[1]:
        raise ValueError(f"k must lie in [1, {logits.shape[1] - 1}], got {k}")
    return logits.detach().masked_fill(F.one_hot(y, logits.shape[1]).bool(), float("-inf")).topk(k, dim=1).indices


def targeted_dlr_loss(logits: torch.Tensor, y: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    r"""Targeted Difference of Logits Ratio (Croce & Hein, ICML 2020), to be maximised.

    :math:`\mathrm{DLR}_t(z, y) = -\dfrac{z_y - z_t}{z_{\pi_1} - \frac{1}{2}(z_{\pi_3} + z_{\pi_4}) + 10^{-12}}`,
    with :math:`\pi` the logits sorted in decreasing order (AutoAttack's ``dlr_loss_targeted``). Positive exactly when
    the target outscores the true class; invariant to shifting and scaling the logits. Needs at least 4 classes.
    """
    srt = logits.sort(dim=1, descending=True).values
    diff = logits.gather(1, y[:, None]).squeeze(1) - logits.gather(1, target[:, None]).squeeze(1)
    return -diff / (srt[:, 0] - (srt[:, 2] + srt[:, 3]) / 2 + 1e-12)


def targeted_ce_loss(logits: torch.Tensor, y: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    r"""Negative cross-entropy towards the target, :math:`-\mathrm{CE}(z, t) = \log p_t`, to be maximised (``y`` unused;
    AutoAttack's ``ce_loss_targeted``)."""
    return -F.cross_entropy(logits, target, reduction="none")


TARGETED_LOSSES = {"dlr": targeted_dlr_loss, "ce": targeted_ce_loss}


class APGDT(APGD):
    r"""APGD-T: targeted Auto-PGD against each of the top classes in turn, an untargeted attack overall.

    The second attack of AutoAttack's standard version (Croce & Hein, "Reliable evaluation of adversarial robustness
    with an ensemble of diverse parameter-free attacks", ICML 2020). For each example, the targets are the
    ``n_targets`` classes :math:`t \ne y` with the highest clean logits (9, or :math:`K - 1` with fewer classes; see
    :func:`top_targets`), and for each target in turn, best first, full :class:`APGD` runs (``restarts`` of them)
    maximise

    .. math::

        \mathrm{DLR}_t(x') = -\frac{z_y(x') - z_t(x')}{z_{\pi_1}(x') - \frac{1}{2}\left(z_{\pi_3}(x') + z_{\pi_4}(x')
        \right) + 10^{-12}}
        \quad \text{over } \|x' - x\| \le \varepsilon,\ x' \in [0, 1]^d,

    (:func:`targeted_dlr_loss`; ``loss="ce"`` maximises :math:`\log p_t` instead) with the step size, momentum and
    checkpoints of APGD. Success is untargeted, as in AutoAttack: an example counts as fooled, and leaves the batch,
    as soon as any iterate of any run is misclassified (``prediction != y``), so later targets only attack the
    examples still robust. Hence ``targeted`` stays ``False``: ``y`` holds the true labels, and a judge decides
    success on them as for every untargeted attack.

    Runs go target by target, each target's restarts together; each run starts from a random point of the ball except
    the very first, which starts from ``init`` when a call gives one (the warm start of the minimum-epsilon search).
    ``x_last`` holds, for each example still robust, the best point of the run that reached the highest loss.

    Cost: one clean forward for every example; then, per target and restart, ``steps`` forwards and ``steps - 1``
    backwards for each example still robust. An example never fooled costs ``1 + steps * restarts * n_targets``
    forwards (AutoAttack's standard version: 100 steps, 1 restart, 9 targets: 901).

    Parameters
    ----------
    model : nn.Module
        Returns logits (N, K) for pixels in [0, 1]; K >= 4 for ``loss="dlr"`` (the loss reads :math:`z_{\pi_4}`),
        K >= 2 for ``loss="ce"``.
    eps, norm, steps, rho, seed
        As for :class:`APGD`.
    loss : {"dlr", "ce"}
        The targeted DLR loss (APGD-T) or the targeted cross-entropy.
    restarts : int
        Runs per target (AutoAttack: 1).
    n_targets : int
        How many of the top non-true classes are targeted (AutoAttack: 9); capped at :math:`K - 1`.
    """

    def __init__(
        self,
        model: nn.Module,
        eps: float = 0.0,
        norm: Norm | str = Norm.LINF,
        loss: str = "dlr",
        steps: int = 100,
        restarts: int = 1,
        n_targets: int = 9,
        rho: float = 0.75,
        seed: int = 0,
    ) -> None:
        if loss not in TARGETED_LOSSES:
            raise UserError(f"unknown targeted loss {loss!r}; known: {', '.join(TARGETED_LOSSES)}")
        require_counts(n_targets=n_targets)
        super().__init__(model, eps, norm=norm, loss=loss, steps=steps, restarts=restarts, rho=rho, seed=seed)
        self.n_targets = n_targets

    def _params(self) -> dict[str, Any]:
        return {**super()._params(), "n_targets": self.n_targets}

    def _check_logits(self, logits: torch.Tensor) -> None:
        k = logits.shape[1]
        if self.loss == "dlr" and k < 4:
            raise UserError(f"the targeted DLR loss needs at least 4 classes, the model has {k}")
        if k < 2:
            raise UserError(f"a targeted attack needs at least 2 classes, the model has {k}")

    def _runs(self, logits: torch.Tensor, y: torch.Tensor) -> list[torch.Tensor | None]:
        targets = top_targets(logits, y, min(self.n_targets, logits.shape[1] - 1))
        return [targets[:, i] for i, _ in itertools.product(range(targets.shape[1]), range(self.restarts))]

    def _objective(self, logits: torch.Tensor, y: torch.Tensor, target: torch.Tensor | None) -> torch.Tensor:
        return TARGETED_LOSSES[self.loss](logits, y, target)
