"""Projected gradient descent (Madry et al., 2018) in L-infinity and L2, and FGSM as its one-step case."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from kit.attacks.base import LOSSES, Attack, AttackResult, Norm, as_norm, expand_as_batch, lp_norm, project
from kit.errors import UserError


def steepest_step(grad: torch.Tensor, alpha: torch.Tensor, norm: Norm) -> torch.Tensor:
    """The steepest-ascent step of per-example length ``alpha`` (N,) in ``norm`` for gradient ``grad``."""
    a = expand_as_batch(alpha, grad)
    if norm is Norm.LINF:
        return a * grad.sign()
    return a * grad / expand_as_batch(grad.flatten(1).norm(dim=1).clamp_min(1e-12), grad)


def random_in_ball(like: torch.Tensor, eps: torch.Tensor, norm: Norm, gen: torch.Generator) -> torch.Tensor:
    """Uniform random points of the balls of radii ``eps`` (N,): uniform in the L-inf box, or uniform in the L2 ball."""
    shape = like.shape
    u = torch.rand(shape, generator=gen, device=like.device, dtype=like.dtype)
    if norm is Norm.LINF:
        return u.mul_(2).sub_(1).mul_(expand_as_batch(eps, like))
    g = torch.randn(shape, generator=gen, device=like.device, dtype=like.dtype)
    g = g / expand_as_batch(g.flatten(1).norm(dim=1).clamp_min(1e-12), like)
    r = torch.rand(shape[0], generator=gen, device=like.device, dtype=like.dtype) ** (1.0 / shape[1:].numel())
    return g * expand_as_batch(eps * r, like)


def _rows(idx: torch.Tensor, n: int) -> torch.Tensor | slice:
    """Rows ``idx`` of a batch of ``n`` as an index: every row is a slice (a plain copy, no gather or scatter)."""
    return slice(None) if idx.numel() == n else idx


def _count(fwd: torch.Tensor, bwd: torch.Tensor, idx: torch.Tensor, forward: int, backward: int) -> None:
    """Add passes to the per-example counters of rows ``idx`` (once per change of the batch, not every step)."""
    rows = _rows(idx, fwd.numel())
    if forward:
        fwd[rows] += forward
    if backward:
        bwd[rows] += backward


class PGD(Attack):
    r"""Projected gradient ascent on a loss, keeping the first adversarial found for each example.

    Maximises :math:`\ell(f(x + \delta), y)` over :math:`\|\delta\| \le \varepsilon`, :math:`x + \delta \in [0, 1]`,
    by steepest ascent in the threat norm followed by projection (Madry et al., "Towards deep learning models resistant
    to adversarial attacks", ICLR 2018). An example leaves the batch as soon as it is fooled, so fooled points stop
    costing forward and backward passes.

    Parameters
    ----------
    model : nn.Module
        Returns logits for pixels in [0, 1].
    eps : float
        Default radius (in [0, 1] pixel units, e.g. 8/255); a call may pass a per-example tensor instead.
    norm : {"linf", "l2"}
    steps : int
        Gradient steps per restart.
    rel_step : float, optional
        Step length as a fraction of epsilon; default ``2.5 / steps`` (Madry et al.).
    random_start : bool
        Start from a uniform random point of the ball (restarts after the first always do).
    restarts : int
        Independent restarts for the examples still robust.
    loss : {"ce", "margin", "dlr"}
    targeted : bool
        Then ``y`` holds target classes: the loss is minimised and success means predicting ``y``.
    seed : int
        Seeds the random starts (on the inputs' device), so results are deterministic.
    early_stop : bool
        Drop an example from the batch once it is fooled (evaluation). ``False`` runs every step on every example it
        attacks and returns the final iterates in ``x_last`` (adversarial training maximises the loss, as Madry et
        al.).
    attack_all : bool
        Without early stopping, also attack the examples the model misclassifies clean, as Madry et al.'s training
        does (their ``x_adv`` stays the clean input, already adversarial). ``False`` (the default) leaves them out:
        their ``x_last`` is the clean input. Ignored with early stopping, which drops them anyway.
    """

    def __init__(
        self,
        model: nn.Module,
        eps: float = 0.0,
        norm: Norm | str = Norm.LINF,
        steps: int = 10,
        rel_step: float | None = None,
        random_start: bool = True,
        restarts: int = 1,
        loss: str = "ce",
        targeted: bool = False,
        seed: int = 0,
        early_stop: bool = True,
        attack_all: bool = False,
    ) -> None:
        self.norm = as_norm(norm)
        super().__init__(model, eps)
        if steps < 1 or restarts < 1:
            raise UserError("steps and restarts must be at least 1")
        if loss not in LOSSES:
            raise UserError(f"unknown loss {loss!r}; known: {', '.join(LOSSES)}")
        self.steps, self.restarts, self.loss, self.seed = int(steps), int(restarts), loss, int(seed)
        self.random_start, self.targeted, self.early_stop = bool(random_start), bool(targeted), bool(early_stop)
        self.attack_all = bool(attack_all)
        self.rel_step = float(rel_step) if rel_step is not None else 2.5 / self.steps
        if self.rel_step <= 0:
            raise UserError(f"rel_step must be positive, got {rel_step}")

    def _params(self) -> dict[str, Any]:
        return {**super()._params(), "steps": self.steps, "rel_step": self.rel_step,
                "random_start": self.random_start, "restarts": self.restarts, "loss": self.loss,
                "targeted": self.targeted, **({"attack_all": True} if self.attack_all else {})}

    def _run(self, x: torch.Tensor, y: torch.Tensor, eps: torch.Tensor, init: torch.Tensor | None) -> AttackResult:
        n = x.shape[0]
        fwd = torch.zeros(n, dtype=torch.long, device=x.device)
        bwd = torch.zeros_like(fwd)
        x_adv = x.clone()
        x_last = x.clone()
        _, success, clean_passes = self._clean_check(x, y)
        if clean_passes:
            fwd += clean_passes
        gen = torch.Generator(device=x.device).manual_seed(self.seed)

        for restart in range(self.restarts):
            # attack_all without early stopping (Madry et al.'s training): the first run also ascends from the examples
            # misclassified clean; their x_adv stays the clean input, already adversarial
            todo = eps > 0 if restart == 0 and self.attack_all and not self.early_stop else ~success & (eps > 0)
            idx = todo.nonzero().squeeze(1)
            if idx.numel() == 0:
                break
            # every example attacked (the common case): the batch itself, not copies of it
            x0, y0, e0 = (x, y, eps) if idx.numel() == n else (x[idx], y[idx], eps[idx])
            if restart == 0 and init is not None:
                delta = project(init[idx] - x0, e0, self.norm)
            elif restart == 0 and not self.random_start:
                delta = torch.zeros_like(x0)
            else:
                delta = random_in_ball(x0, e0, self.norm, gen)
            delta = delta.add_(x0).clamp_(0, 1).sub_(x0)
            shared = self._shared(e0)
            if not self.early_stop:  # every row stays to the last step: its first adversarial is kept in place
                first_adv, done = (x_adv, success) if idx.numel() == n else (x_adv[idx], success[idx])
            nf = nb = 0  # forward and backward passes of the rows idx not yet added to fwd and bwd
            for step in range(self.steps + 1):
                last = step == self.steps
                xa = (x0 + delta).requires_grad_(not last)
                with torch.set_grad_enabled(not last):
                    logits = self.model(xa)
                nf += 1
                fooled = self._fooled(logits, y0, xa, rows=idx)
                if self.early_stop:  # a fooled example is a first adversarial, and leaves the batch
                    n_fooled = int(fooled.sum())
                    if n_fooled:
                        hit = idx[fooled]
                        x_adv[hit] = xa.detach()[fooled]
                        success[hit] = True
                    if last or n_fooled == fooled.numel():
                        _count(fwd, bwd, idx, nf, nb)
                        x_last[_rows(idx, n)] = xa.detach()
                        break
                else:  # every example stays; keep the first adversarial of each
                    new = (fooled > done).nonzero().squeeze(1)  # fooled now, and not before
                    if new.numel():
                        first_adv.index_copy_(0, new, xa.detach().index_select(0, new))
                        done |= fooled
                    if last:
                        _count(fwd, bwd, idx, nf, nb)
                        if first_adv is not x_adv:
                            x_adv[idx], success[idx] = first_adv, done
                        x_last[_rows(idx, n)] = xa.detach()
                        break
                if not self.early_stop or n_fooled == 0:  # no copies while every example stays
                    grad = torch.autograd.grad(self._loss_sum(logits, y0), xa)[0]
                else:
                    keep = ~fooled
                    grad = torch.autograd.grad(self._loss_sum(logits[keep], y0[keep]), xa)[0][keep]
                    _count(fwd, bwd, idx, nf, nb)
                    nf = nb = 0
                    idx, x0, y0, e0, delta = idx[keep], x0[keep], y0[keep], e0[keep], delta[keep]
                nb += 1
                step_delta = self._step(grad, delta, x0, e0, shared)
                if self.early_stop:
                    # An iterate that did not move is a fixed point: every later step would give it again, with the
                    # verdict just given. It leaves the batch now, sparing its remaining forward and backward passes.
                    moved = (step_delta != delta).flatten(1).any(1)
                    if not bool(moved.all()):
                        _count(fwd, bwd, idx, nf, nb)
                        nf = nb = 0
                        x_last[idx[~moved]] = (x0 + delta)[~moved]
                        idx, x0, y0, e0, step_delta = idx[moved], x0[moved], y0[moved], e0[moved], step_delta[moved]
                        if idx.numel() == 0:
                            break
                delta = step_delta
        if self.early_stop:
            x_last[success] = x_adv[success]
        return AttackResult(x_adv, success, lp_norm(x_adv - x, self.norm), fwd, bwd, x_last)

    def _shared(self, e0: torch.Tensor) -> tuple[float, float] | None:
        """The radius and step length of every row as Python floats when the rows share one radius (rows leaving the
        batch keep it shared), else None. The step length is the value the per-row product gives in the inputs'
        dtype."""
        if not bool((e0 == e0[0]).all()):
            return None
        return float(e0[0]), float(self.rel_step * e0[:1])

    def _loss_sum(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The attack's loss summed over the rows: the gradient of each row's own loss (the rows do not interact).
        Cross-entropy is summed inside the kernel: one operation fewer per step, the same gradient bit for bit."""
        if self.loss == "ce":
            return F.cross_entropy(logits, y, reduction="sum")
        return LOSSES[self.loss](logits, y).sum()

    def _step(self, grad: torch.Tensor, delta: torch.Tensor, x0: torch.Tensor, e0: torch.Tensor,
              shared: tuple[float, float] | None) -> torch.Tensor:
        """The next perturbation: a steepest step from ``delta``, projected onto the ball, then into [0, 1] (through
        the image, so that ``x0 + delta`` is a valid image). In place after the first operation (autograd's
        gradient may be an expanded view, so it is not written to): the same values as out-of-place operations, bit
        for bit, with one new tensor per step (the step's sign times its length is exact, so fusing the product into
        the sum rounds once, as the sum alone did). ``shared``: :meth:`_shared`."""
        sign = -1.0 if self.targeted else 1.0
        if self.norm is Norm.LINF:
            sd = grad.sign()
            if shared is not None:  # one radius for all: a scalar step and a scalar clamp, the fastest
                radius, alpha = shared
                sd = torch.add(delta, sd, alpha=sign * alpha, out=sd).clamp_(-radius, radius)
            else:  # per-example radii: minimum then maximum (clamp with broadcast bounds is several times slower)
                sd = torch.addcmul(delta, sd, expand_as_batch(self.rel_step * e0, grad), value=sign, out=sd)
                e = expand_as_batch(e0, grad)
                sd = torch.maximum(torch.minimum(sd, e, out=sd), -e, out=sd)
        else:
            sd = steepest_step(grad, self.rel_step * e0, self.norm)
            sd = project(delta - sd if self.targeted else delta + sd, e0, self.norm)
        return sd.add_(x0).clamp_(0, 1).sub_(x0)


class FGSM(PGD):
    """Fast gradient sign method (Goodfellow et al., 2015): one step of length epsilon, no random start."""

    def __init__(self, model: nn.Module, eps: float = 0.0, norm: Norm | str = Norm.LINF, loss: str = "ce") -> None:
        super().__init__(model, eps, norm=norm, steps=1, rel_step=1.0, random_start=False, loss=loss)
