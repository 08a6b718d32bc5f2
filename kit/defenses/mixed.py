"""Mixed adversarial training: clean and PGD examples in one batch (Goodfellow et al. 2015; Kurakin et al. 2017)."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from kit.defenses.base import register_defense
from kit.defenses.madry import Madry


@register_defense
class Mixed(Madry):
    r"""Cross-entropy on a batch made of the clean examples and their PGD adversarials.

    :math:`\mathcal{L} = (1 - w)\,\ell_{CE}(f(x), y) + w\,\ell_{CE}(f(x'), y)` with :math:`x'` from ``steps`` of
    L∞ PGD (as :class:`~kit.defenses.madry.Madry`). The SAT paper (seed ``000_e2e3710bc929b9d7.txt``, §V) compares
    against it as "a mixed batch of adversarial examples and original images"; with ``adv_weight`` = 0.5 (the default)
    the loss is exactly the mean cross-entropy over the concatenated 2B batch. Clean and adversarial halves go through
    the model in one forward pass, so batch-norm statistics see the mixed batch.

    Parameters
    ----------
    adv_weight : float
        Weight ``w`` of the adversarial half, in [0, 1].
    (and the PGD parameters of :class:`~kit.defenses.madry.Madry`)
    """

    name = "mixed"
    description = "clean and PGD examples in one batch (Goodfellow et al. 2015)"
    defaults = {**Madry.defaults, "adv_weight": 0.5}

    def mixed_logits(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Clean and adversarial logits from one forward pass over the concatenated batch."""
        x_adv = self.adversarial(model, x, y)
        logits = model(torch.cat([x, x_adv]))
        return logits[: len(x)], logits[len(x):]

    def loss(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        clean, adv = self.mixed_logits(model, x, y)
        w = float(self.params["adv_weight"])
        ce_clean, ce_adv = F.cross_entropy(clean, y), F.cross_entropy(adv, y)
        return (1 - w) * ce_clean + w * ce_adv, {"clean_ce": ce_clean.item(), "adv_ce": ce_adv.item()}
