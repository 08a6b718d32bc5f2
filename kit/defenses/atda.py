"""ATDA: adversarial training with domain adaptation (Song, He, Wang & Hopcroft, ICLR 2019)."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from kit.defenses.base import register_defense
from kit.defenses.mixed import Mixed


def mmd_l1(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    r"""Linear-kernel MMD with the L1 norm, :math:`\frac{1}{k}\|\bar a - \bar b\|_1`, for (B, k) logit batches."""
    return (a.mean(0) - b.mean(0)).abs().sum() / a.shape[1]


def coral_l1(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    r"""CORAL with the L1 norm, :math:`\frac{1}{k^2}\|\mathrm{Cov}(a) - \mathrm{Cov}(b)\|_1`, for (B, k) batches.

    Covariances are the unbiased sample covariances (``torch.cov``); a batch of one has none and gives 0.
    """
    if a.shape[0] < 2:
        return a.new_zeros(())
    return (torch.cov(a.T) - torch.cov(b.T)).abs().sum() / a.shape[1] ** 2


@register_defense
class ATDA(Mixed):
    r"""Mixed adversarial training plus the unsupervised domain-adaptation losses of Song et al. on the logits.

    .. math::

        \mathcal{L} = (1 - w)\,\ell_{CE}(f(x), y) + w\,\ell_{CE}(f(x'), y)
            + \lambda \big(\mathrm{CORAL}(f(x), f(x')) + \mathrm{MMD}(f(x), f(x'))\big)

    with the L1 forms of CORAL (:func:`coral_l1`) and MMD (:func:`mmd_l1`) of Song et al. §3.2 and their
    :math:`\lambda = 1/3`. As in the SAT paper's comparison (seed ``000_e2e3710bc929b9d7.txt``, §V), the supervised
    domain-adaptation term is left out ("it does not lead to significant improvement according to their ablative
    study"), and the adversary is the L∞ PGD of the other baselines rather than the original FGSM.

    Parameters
    ----------
    lam : float
        Weight of the domain-adaptation terms.
    (and those of :class:`~kit.defenses.mixed.Mixed`)
    """

    name = "atda"
    description = "Mixed + MMD and CORAL between clean and adversarial logits (Song et al. 2019)"
    defaults = {**Mixed.defaults, "lam": 1 / 3}

    def loss(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        clean, adv = self.mixed_logits(model, x, y)
        w, lam = float(self.params["adv_weight"]), float(self.params["lam"])
        ce_clean, ce_adv = F.cross_entropy(clean, y), F.cross_entropy(adv, y)
        mmd, coral = mmd_l1(clean, adv), coral_l1(clean, adv)
        loss = (1 - w) * ce_clean + w * ce_adv + lam * (coral + mmd)
        return loss, {"clean_ce": ce_clean.item(), "adv_ce": ce_adv.item(), "mmd": mmd.item(), "coral": coral.item()}
