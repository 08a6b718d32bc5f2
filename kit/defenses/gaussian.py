"""Gaussian noise augmentation (Cohen, Rosenfeld & Kolter, ICML 2019): the base classifier of randomised smoothing."""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from kit.defenses.base import Defense, register_defense
from kit.errors import UserError


def check_sigma(defense: str, value: Any) -> float:
    """``value`` as a finite float > 0 (a noise level), else a one-line :class:`UserError` naming ``defense``."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise UserError(f"defense {defense!r}: sigma must be a finite number > 0, got {value!r}")
    return float(value)


@register_defense
class Gaussian(Defense):
    r"""Training under Gaussian noise, the base classifier of randomised smoothing (Cohen, Rosenfeld & Kolter,
    "Certified Adversarial Robustness via Randomized Smoothing", ICML 2019, §4 "Training the base classifier"):

    .. math::

        \min_\theta\ \mathbb{E}_{(x, y)}\, \mathbb{E}_{\delta \sim \mathcal{N}(0, \sigma^2 I)}\,
            \ell_{CE}(f_\theta(x + \delta), y),

    one noise draw per example and batch, in pixel space (the kit's models normalise inside, as the authors' noise
    comes before their normalisation layer), not clipped to [0, 1]. The smoothed classifier
    :math:`g(x) = \arg\max_c P(f(x + \delta) = c)` is then certified at the same σ. The paper trains and certifies at
    σ ∈ {0.12, 0.25, 0.50, 1.00} on CIFAR-10 and {0.25, 0.50, 1.00} on ImageNet; the default is 0.25.

    The noise comes from torch's global generator, which the trainer seeds per epoch from ``(seed, epoch)``: runs
    are reproducible and ``--resume`` is exact.

    Parameters
    ----------
    sigma : float
        Standard deviation of the noise, in the [0, 1] pixel scale (> 0).
    """

    name = "gaussian"
    description = "cross-entropy on x + N(0, sigma^2 I), randomised smoothing's base classifier (Cohen et al. 2019)"
    defaults: dict[str, Any] = {"sigma": 0.25}

    def __init__(self, **params: Any) -> None:
        super().__init__(**params)
        self.sigma = check_sigma(self.name, self.params["sigma"])

    def loss(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        ce = F.cross_entropy(model(x + self.sigma * torch.randn_like(x)), y)
        return ce, {"noisy_ce": ce.item()}
