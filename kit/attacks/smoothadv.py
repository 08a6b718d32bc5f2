"""SmoothAdv (Salman et al., NeurIPS 2019): PGD on the soft smoothed classifier, estimated by Monte Carlo."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, cast

import torch
import torch.nn as nn
import torch.nn.functional as F

from kit.attacks.base import Attack, AttackResult, Norm, as_norm, lp_norm, project, require_counts
from kit.attacks.pgd import random_in_ball, steepest_step
from kit.errors import UserError


def soft_smoothed_log_probs(model: nn.Module, x: torch.Tensor, noise: torch.Tensor, sigma: float) -> torch.Tensor:
    r"""Log-probabilities of the Monte Carlo soft smoothed classifier, :math:`\log \frac1m \sum_{i=1}^m
    \mathrm{softmax}(f(x + \sigma z_i))`, for ``x`` (N, C, H, W) and standard normal draws ``noise`` (m, N, C, H, W).

    One forward pass over the m·N noisy points (not clipped to [0, 1], as Cohen et al. and Salman et al.); the average
    is taken in log space (``logsumexp`` of log-softmaxes), so it is finite and differentiable where a softmax
    underflows. Returns (N, K); its argmax is the soft smoothed classifier's prediction.
    """
    m, n = noise.shape[0], noise.shape[1]
    logits = model((x.unsqueeze(0) + sigma * noise).flatten(0, 1))
    logp = F.log_softmax(logits, dim=1).view(m, n, -1)
    return torch.logsumexp(logp, dim=0) - math.log(m)


@dataclass
class SmoothAdvResult(AttackResult):
    r""":class:`~kit.attacks.base.AttackResult` plus the Monte Carlo loss of the soft smoothed classifier.

    Attributes
    ----------
    loss_start : (N,) tensor
        :math:`-\log \hat G(x_0)_y` at each example's starting point with the draws of its first evaluation in the
        loop (NaN for an example that never entered it: radius 0 with a random start or a warm start, or fooled at
        the clean check with ``early_stop``).
    loss_last : (N,) tensor
        The same loss at each example's last evaluated iterate, with the draws of that evaluation.
    """

    loss_start: torch.Tensor | None = None
    loss_last: torch.Tensor | None = None


class SmoothAdv(Attack):
    r"""SmoothAdv-PGD: projected gradient ascent on the loss of the soft smoothed classifier (Salman, Li, Razenshteyn,
    Zhang, Zhang, Bubeck & Yang, "Provably Robust Deep Learning via Adversarially Trained Smoothed Classifiers",
    NeurIPS 2019, §3 and Pseudocode 1).

    The soft smoothed classifier of a base classifier :math:`f` is
    :math:`G(x) = \mathbb{E}_{\delta \sim \mathcal{N}(0, \sigma^2 I)}\,\mathrm{softmax}(f(x + \delta))`. The attack
    maximises, over :math:`\|x' - x\| \le \varepsilon` and :math:`x' \in [0, 1]`, its Monte Carlo estimate

    .. math::

        J(x') = -\log\Big(\frac{1}{m} \sum_{i=1}^{m} \mathrm{softmax}\big(f(x' + \sigma z_i)\big)_y\Big),
        \qquad z_i \sim \mathcal{N}(0, I),

    the paper's objective (S): the log of the *average* probability, not the average of the log (which would be plain
    PGD on the noisy base classifier). The same m draws serve the forward pass and the gradient of one step. Each
    step is the steepest-ascent step of length ``rel_step · eps`` in the norm (L2: along the normalised gradient, the
    paper's; L-inf: along its sign, for completeness), then the projection on the ball, then the clip to [0, 1].

    Noise draws come from a generator seeded with ``seed`` on the inputs' device, in this order: the random start (if
    any), the clean check (only when the start is not ``x`` itself: a random or warm start), then one (m, N, C, H, W)
    standard normal tensor per evaluation in the loop (``fresh_noise=True``, the default: fresh draws every step, so
    the iterates follow the gradient of G rather than of one fixed estimate) or one tensor drawn once and reused at
    every step (``fresh_noise=False``: the authors' code, which draws the noise once per batch for training and for
    its test-time attack). A call may pass its own standard normal ``noise`` (m, N, C, H, W), used at every step: the
    ``smoothadv`` defense trains on the same draws it attacked with (Pseudocode 1).

    Success (without a :attr:`judge`) is the Monte Carlo soft classifier's verdict at the candidate with the draws of
    that evaluation: its argmax differs from ``y``. Not the base classifier's argmax: a registry attack judged and
    re-verified by the base model (``otkit evaluate``) would disagree with it, so this class is not in
    :mod:`kit.attacks.registry`. With a judge (the audit's engine, e.g. an engine's smoothed prediction) the judge
    decides on the candidate ``x'`` itself, without noise.

    Deviations from the authors' code (``code/attacks.py`` of ``Hadisalman/smoothing-adversarial``): the projection
    is the kit's (onto the ball, then into [0, 1]; they clip then rescale onto the ball; both stay feasible), a zero
    gradient gives a zero step (they take a random direction), and the log of the average is computed with
    ``logsumexp`` (they clamp the average at 1e-20 before the log).

    Parameters
    ----------
    model : nn.Module
        The base classifier f; returns logits for pixels in [0, 1].
    eps : float
        Default radius (a call may pass a per-example tensor).
    norm : {"l2", "linf"}
        L2 is the paper's (randomised smoothing certifies L2 radii).
    sigma : float
        Standard deviation of the smoothing noise (> 0).
    m : int
        Noise samples per evaluation (the paper: m_train ∈ {1, 2, 4, 8} in training, m_test = 32 in its empirical
        attack with T = 20).
    steps : int
        Gradient steps T.
    rel_step : float, optional
        Step length as a fraction of eps; default ``2 / steps`` (the paper's step 2ε/T).
    random_start : bool
        Start from a uniform random point of the ball (the authors start at x: False).
    fresh_noise : bool
        Fresh draws at every step (True) or one set of draws for the whole attack (False, the authors' code).
    seed : int
        Seeds the random start and the noise draws.
    early_stop : bool
        Drop an example once it is fooled (evaluation). False runs every step on every example (misclassified ones
        included) and returns the final iterates in ``x_last`` (training).
    """

    def __init__(
        self,
        model: nn.Module,
        eps: float = 0.0,
        norm: Norm | str = Norm.L2,
        sigma: float = 0.25,
        m: int = 32,
        steps: int = 20,
        rel_step: float | None = None,
        random_start: bool = False,
        fresh_noise: bool = True,
        seed: int = 0,
        early_stop: bool = True,
    ) -> None:
        self.norm = as_norm(norm)
        super().__init__(model, eps)
        if isinstance(sigma, bool) or not isinstance(sigma, (int, float)) or not math.isfinite(sigma) or sigma <= 0:
            raise UserError(f"sigma must be a finite number > 0, got {sigma!r}")
        require_counts(m=m, steps=steps)
        self.sigma, self.m, self.steps, self.seed = float(sigma), int(m), int(steps), int(seed)
        self.rel_step = float(rel_step) if rel_step is not None else 2.0 / self.steps
        if not (math.isfinite(self.rel_step) and self.rel_step > 0):
            raise UserError(f"rel_step must be a finite number > 0, got {rel_step!r}")
        self.random_start, self.fresh_noise, self.early_stop = bool(random_start), bool(fresh_noise), bool(early_stop)
        self._noise: torch.Tensor | None = None

    def _params(self) -> dict[str, Any]:
        return {**super()._params(), "sigma": self.sigma, "m": self.m, "steps": self.steps, "rel_step": self.rel_step,
                "random_start": self.random_start, "fresh_noise": self.fresh_noise}

    def __call__(
        self,
        x: torch.Tensor,
        y: torch.Tensor,
        *,
        eps: float | torch.Tensor | None = None,
        init: torch.Tensor | None = None,
        noise: torch.Tensor | None = None,
    ) -> SmoothAdvResult:
        """:meth:`Attack.__call__`, plus ``noise``: standard normal draws (m, N, C, H, W) to use at every step instead
        of the attack's own (scaled by ``sigma`` here)."""
        if noise is not None:
            shape = (self.m, *tuple(x.shape)) if isinstance(x, torch.Tensor) else None
            if not isinstance(noise, torch.Tensor) or tuple(noise.shape) != shape or not noise.is_floating_point():
                raise UserError(f"noise must be a float tensor of shape {shape} (m, *inputs' shape), got "
                                f"{tuple(getattr(noise, 'shape', ()))}")
            if not torch.isfinite(noise).all():
                raise UserError("noise contains NaN or infinite values")
            noise = noise.detach().to(device=x.device, dtype=x.dtype)
        self._noise = noise
        try:
            res = super().__call__(x, y, eps=eps, init=init)
        finally:
            self._noise = None
        return cast(SmoothAdvResult, res)

    def _run(self, x: torch.Tensor, y: torch.Tensor, eps: torch.Tensor, init: torch.Tensor | None) -> SmoothAdvResult:
        n, m = x.shape[0], self.m
        fwd = torch.zeros(n, dtype=torch.long, device=x.device)
        bwd = torch.zeros_like(fwd)
        x_adv, x_last = x.clone(), x.clone()
        success = torch.zeros(n, dtype=torch.bool, device=x.device)
        loss_start = torch.full((n,), math.nan, device=x.device, dtype=x.dtype)
        loss_last = loss_start.clone()
        gen = torch.Generator(device=x.device).manual_seed(self.seed)
        fixed = self._noise

        def draw() -> torch.Tensor:
            nonlocal fixed
            if fixed is not None:
                return fixed
            z = torch.randn((m, *x.shape), generator=gen, device=x.device, dtype=x.dtype)
            if not self.fresh_noise:
                fixed = z
            return z

        if init is not None:
            delta = project(init - x, eps, self.norm)
        elif self.random_start:
            delta = random_in_ball(x, eps, self.norm, gen)
        else:
            delta = torch.zeros_like(x)
        delta = (x + delta).clamp(0, 1) - x
        at_x = init is None and not self.random_start  # then the first evaluation in the loop is the clean check
        if not at_x:
            with torch.no_grad():
                success = self._fooled(soft_smoothed_log_probs(self.model, x, draw(), self.sigma), y, x,
                                       rows=torch.arange(n, device=x.device))
            fwd += m
        todo = (eps > 0) | at_x
        if self.early_stop:
            todo &= ~success
        idx = todo.nonzero().squeeze(1)
        if idx.numel() == 0:
            return SmoothAdvResult(x_adv, success, lp_norm(x_adv - x, self.norm), fwd, bwd, x_last, loss_start,
                                   loss_last)
        x0, y0, e0, delta = x[idx], y[idx], eps[idx], delta[idx]
        for step in range(self.steps + 1):
            last = step == self.steps
            z = draw()[:, idx]
            xa = (x0 + delta).requires_grad_(not last)
            with torch.set_grad_enabled(not last):
                logp = soft_smoothed_log_probs(self.model, xa, z, self.sigma)
                loss = -logp.gather(1, y0[:, None]).squeeze(1)
            fwd[idx] += m
            if step == 0:
                loss_start[idx] = loss.detach()
            loss_last[idx] = loss.detach()
            x_last[idx] = xa.detach()
            fooled = self._fooled(logp.detach(), y0, xa, rows=idx)
            new = fooled & ~success[idx]  # the first adversarial found is kept
            if new.any():
                x_adv[idx[new]] = xa.detach()[new]
                success[idx[new]] = True
            keep = (~fooled if self.early_stop else torch.ones_like(fooled)) & (e0 > 0)
            if last or not keep.any():
                break
            grad = torch.autograd.grad(loss[keep].sum(), xa)[0][keep]
            idx, x0, y0, e0, delta = idx[keep], x0[keep], y0[keep], e0[keep], delta[keep]
            bwd[idx] += m
            delta = project(delta + steepest_step(grad, self.rel_step * e0, self.norm), e0, self.norm)
            delta = (x0 + delta).clamp(0, 1) - x0
        if self.early_stop:
            x_last[success] = x_adv[success]
        return SmoothAdvResult(x_adv, success, lp_norm(x_adv - x, self.norm), fwd, bwd, x_last, loss_start, loss_last)
