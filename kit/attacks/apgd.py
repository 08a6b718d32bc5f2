"""Auto-PGD (Croce & Hein, ICML 2020): step-size-free projected gradient ascent, with the CE or the DLR loss."""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn as nn

from kit.attacks.base import LOSSES, Attack, AttackResult, Norm, as_norm, expand_as_batch, lp_norm, project
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
        for name, v in (("steps", steps), ("restarts", restarts)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise UserError(f"{name} must be an integer >= 1, got {v!r}")
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

    def _direction(self, grad: torch.Tensor) -> torch.Tensor:
        if self.norm is Norm.LINF:
            return grad.sign()
        return grad / expand_as_batch(grad.flatten(1).norm(dim=1).clamp_min(1e-12), grad)

    def _run(self, x: torch.Tensor, y: torch.Tensor, eps: torch.Tensor, init: torch.Tensor | None) -> AttackResult:
        n = x.shape[0]
        loss_fn = LOSSES[self.loss]
        fwd = torch.zeros(n, dtype=torch.long, device=x.device)
        bwd = torch.zeros_like(fwd)
        x_adv, x_last = x.clone(), x.clone()
        best_loss = torch.full((n,), -math.inf, device=x.device, dtype=x.dtype)  # f_max over restarts
        with torch.no_grad():
            logits = self.model(x)
        fwd += 1
        if self.loss == "dlr" and logits.shape[1] < 3:
            raise UserError(f"the DLR loss needs at least 3 classes, the model has {logits.shape[1]}")
        success = self._fooled(logits, y, x)
        gen = torch.Generator(device=x.device).manual_seed(self.seed)
        n_iter = self.steps - 1  # gradient steps per restart; the iterates are x^(0) .. x^(n_iter)
        checks = apgd_checkpoints(n_iter)

        for restart in range(self.restarts):
            idx = (~success & (eps > 0)).nonzero().squeeze(1)
            if idx.numel() == 0:
                break
            x0, y0, e0 = x[idx], y[idx], eps[idx]
            if restart == 0 and init is not None:
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
                fooled = self._fooled(logits, y0, xa)
                if fooled.any():
                    hit = idx[fooled]
                    x_adv[hit] = xa.detach()[fooled]
                    success[hit] = True
                keep = ~fooled
                if not keep.any():
                    break
                loss = loss_fn(logits, y0)
                f = loss.detach()[keep]
                idx, x0, y0, e0, xk, x_prev = idx[keep], x0[keep], y0[keep], e0[keep], xk[keep].detach(), x_prev[keep]
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
