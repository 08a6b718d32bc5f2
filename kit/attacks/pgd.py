"""Projected gradient descent (Madry et al., 2018) in L-infinity and L2, and FGSM as its one-step case."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from kit.attacks.base import Attack, AttackResult, Norm, lp_norm
from kit.errors import UserError


def margin_loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    r"""Per-example margin :math:`\max_{j \ne y} z_j - z_y` (positive exactly when misclassified)."""
    true = logits.gather(1, y[:, None]).squeeze(1)
    other = logits.masked_fill(F.one_hot(y, logits.shape[1]).bool(), float("-inf")).amax(1)
    return other - true


LOSSES = {
    "ce": lambda logits, y: F.cross_entropy(logits, y, reduction="none"),
    "margin": margin_loss,
}


def project(delta: torch.Tensor, eps: float, norm: Norm) -> torch.Tensor:
    """Project perturbations (N, ...) onto the ``norm`` ball of radius ``eps``."""
    if norm is Norm.LINF:
        return delta.clamp(-eps, eps)
    n = delta.flatten(1).norm(dim=1).clamp_min(1e-12)
    return delta * (eps / n).clamp(max=1.0).view(-1, *([1] * (delta.dim() - 1)))


def steepest_step(grad: torch.Tensor, alpha: float, norm: Norm) -> torch.Tensor:
    """The steepest-ascent step of length ``alpha`` in ``norm`` for gradient ``grad``."""
    if norm is Norm.LINF:
        return alpha * grad.sign()
    n = grad.flatten(1).norm(dim=1).clamp_min(1e-12)
    return alpha * grad / n.view(-1, *([1] * (grad.dim() - 1)))


def random_in_ball(shape: torch.Size, eps: float, norm: Norm, like: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Uniform random start: uniform in the L-inf box, or uniform in the L2 ball."""
    u = torch.rand(shape, generator=gen, device=like.device, dtype=like.dtype)
    if norm is Norm.LINF:
        return (2 * u - 1) * eps
    g = torch.randn(shape, generator=gen, device=like.device, dtype=like.dtype)
    g = g / g.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, *([1] * (len(shape) - 1)))
    d = shape[1:].numel()
    r = torch.rand(shape[0], generator=gen, device=like.device, dtype=like.dtype) ** (1.0 / d)
    return g * (eps * r).view(-1, *([1] * (len(shape) - 1)))


class PGD(Attack):
    r"""Untargeted projected gradient ascent on a loss, keeping the first adversarial found for each example.

    Maximises :math:`\ell(f(x + \delta), y)` over :math:`\|\delta\| \le \varepsilon`, :math:`x + \delta \in [0, 1]`,
    by steepest ascent in the threat norm followed by projection (Madry et al., "Towards deep learning models resistant
    to adversarial attacks", ICLR 2018). An example leaves the batch as soon as it is misclassified, so fooled points
    stop costing forward and backward passes.

    Parameters
    ----------
    model : nn.Module
        Returns logits for pixels in [0, 1].
    eps : float
        Radius of the threat ball (in [0, 1] pixel units, e.g. 8/255).
    norm : {"linf", "l2"}
    steps : int
        Gradient steps per restart.
    step_size : float, optional
        Step length; default ``2.5 * eps / steps``.
    random_start : bool
        Start from a uniform random point of the ball.
    restarts : int
        Independent random restarts for examples still robust.
    loss : {"ce", "margin"}
    seed : int
        Seeds the random starts (on the inputs' device), so results are deterministic.
    """

    def __init__(
        self,
        model: nn.Module,
        eps: float,
        norm: Norm | str = Norm.LINF,
        steps: int = 10,
        step_size: float | None = None,
        random_start: bool = True,
        restarts: int = 1,
        loss: str = "ce",
        seed: int = 0,
    ) -> None:
        super().__init__(model, eps)
        try:
            self.norm = Norm(norm)
        except ValueError:
            raise UserError(f"unknown norm {norm!r}; known: {', '.join(n.value for n in Norm)}") from None
        if steps < 1 or restarts < 1:
            raise UserError("steps and restarts must be at least 1")
        if loss not in LOSSES:
            raise UserError(f"unknown loss {loss!r}; known: {', '.join(LOSSES)}")
        self.steps, self.restarts, self.loss, self.seed = int(steps), int(restarts), loss, int(seed)
        self.random_start = bool(random_start)
        self.step_size = float(step_size) if step_size is not None else 2.5 * self.eps / self.steps

    def _params(self) -> dict[str, Any]:
        return {
            **super()._params(),
            "norm": self.norm.value,
            "steps": self.steps,
            "step_size": self.step_size,
            "random_start": self.random_start,
            "restarts": self.restarts,
            "loss": self.loss,
        }

    def _run(self, x: torch.Tensor, y: torch.Tensor) -> AttackResult:
        n = x.shape[0]
        loss_fn = LOSSES[self.loss]
        fwd = torch.zeros(n, dtype=torch.long, device=x.device)
        bwd = torch.zeros_like(fwd)
        x_adv = x.clone()
        with torch.no_grad():
            success = self.model(x).argmax(1) != y
        fwd += 1
        gen = torch.Generator(device=x.device).manual_seed(self.seed)

        for _ in range(self.restarts):
            idx = (~success).nonzero().squeeze(1)
            if idx.numel() == 0 or self.eps == 0:
                break
            x0, y0 = x[idx], y[idx]
            delta = random_in_ball(x0.shape, self.eps, self.norm, x0, gen) if self.random_start else torch.zeros_like(x0)
            for step in range(self.steps + 1):
                xa = (x0 + delta).clamp(0, 1).requires_grad_(step < self.steps)
                with torch.set_grad_enabled(step < self.steps):
                    logits = self.model(xa)
                fwd[idx] += 1
                fooled = logits.argmax(1) != y0
                if fooled.any():
                    hit = idx[fooled]
                    x_adv[hit] = xa.detach()[fooled]
                    success[hit] = True
                if step == self.steps:
                    break
                keep = ~fooled
                if not keep.any():
                    break
                grad = torch.autograd.grad(loss_fn(logits, y0)[keep].sum(), xa)[0][keep]
                idx, x0, y0, delta = idx[keep], x0[keep], y0[keep], delta[keep]
                bwd[idx] += 1
                delta = project(delta + steepest_step(grad, self.step_size, self.norm), self.eps, self.norm)
                delta = (x0 + delta).clamp(0, 1) - x0
        return AttackResult(x_adv, success, lp_norm(x_adv - x, self.norm), fwd, bwd)


class FGSM(PGD):
    """Fast gradient sign method (Goodfellow et al., 2015): one step of size ``eps``, no random start."""

    def __init__(self, model: nn.Module, eps: float, norm: Norm | str = Norm.LINF, loss: str = "ce") -> None:
        super().__init__(model, eps, norm=norm, steps=1, step_size=eps, random_start=False, loss=loss)
