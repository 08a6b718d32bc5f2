"""Unbalanced-Sinkhorn adversarial training (Subramanyam, "Sinkhorn adversarial attack and defense"; seed
``004_f6c2e34a4740926f.txt``, §V-A)."""

from __future__ import annotations

import warnings
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from kit.attacks.unbalanced import UnbalancedSinkhornAttack
from kit.defenses.base import Defense, register_defense
from kit.defenses.trades import kl_div_logits
from kit.ot.unbalanced import UnbalancedConvergenceWarning


@register_defense
class UnbalancedAT(Defense):
    r"""Adversarial training on the KL-relaxed Sinkhorn attack with a TRADES-style regulariser.

    .. math::

        \mathcal{L} = \lambda\, \ell_{CE}(f(\tilde x), y) + (1 - \lambda)\, \mathrm{KL}(f(\tilde x) \,\|\, f(x')),
        \qquad \tilde x = \mathrm{clip}_{[0,1]}(x + 0.01\,\mathcal{N}(0, I)),

    with :math:`\lambda = 0.9` and the Gaussian input noise of the seed (§V-A, "following [30]" = TRADES and "[31]" =
    Wong et al. 2020), and :math:`x'` from 20 steps of :class:`~kit.attacks.unbalanced.UnbalancedSinkhornAttack` around
    :math:`\tilde x` (every step on every example, the last iterate; "we set PGD steps to 20 as there are no
    imperceptibility constraints") at the seed's radius ε = 0.2 (unit-mass scale). The attack keeps the kit's defaults
    (γ = 1000, η = 0.1, τ = 10, step 0.1) rather than the seed's γ, η, τ, which move no mass once the output is the
    marginal of a plan (see :mod:`kit.attacks.unbalanced`). The seed trains MNIST with SGD, lr 0.01, momentum 0.9,
    weight decay 5e-4, 40 epochs. The adversary runs in eval mode; its projection's convergence warnings are silenced
    per batch (raise ``max_iter`` to converge).

    Parameters
    ----------
    eps, steps, step_size, max_iter : the adversary's radius, steps, step and projection iteration bound.
    lam : float
        λ, weight of the clean cross-entropy.
    noise : float
        Standard deviation of the Gaussian input noise.
    """

    name = "unbalanced-at"
    description = "KL-relaxed Sinkhorn adversary, 0.9 CE + 0.1 KL(clean || adv) (seed 004)"
    defaults: dict[str, Any] = {"eps": 0.2, "steps": 20, "step_size": 0.1, "max_iter": 300, "lam": 0.9,
                                "noise": 0.01}

    def setup(self, model: nn.Module) -> None:
        p = self.params
        self.adversary = UnbalancedSinkhornAttack(model, eps=float(p["eps"]), steps=int(p["steps"]),
                                                  step_size=float(p["step_size"]), max_iter=int(p["max_iter"]),
                                                  early_stop=False)

    def adversarial(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The final iterates of the adversary on ``x``."""
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UnbalancedConvergenceWarning)
            res = self.adversary(x, y)
        return (res.x_last if res.x_last is not None else res.x_adv).detach()

    def loss(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        p = self.params
        x_noisy = (x + float(p["noise"]) * torch.randn_like(x)).clamp(0, 1)
        x_adv = self.adversarial(x_noisy, y)
        logits = model(torch.cat([x_noisy, x_adv]))
        clean, adv = logits[: len(x)], logits[len(x):]
        ce, kl = F.cross_entropy(clean, y), kl_div_logits(clean, adv)
        lam = float(p["lam"])
        return lam * ce + (1 - lam) * kl, {"ce": ce.item(), "kl": kl.item()}
