"""Standard training: cross-entropy on clean examples, no adversary. The baseline every seed paper reports."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from kit.defenses.base import Defense, register_defense


@register_defense
class Standard(Defense):
    r"""Plain empirical risk minimisation, :math:`\min_\theta \mathbb{E}\,\ell_{CE}(f_\theta(x), y)`."""

    name = "standard"
    description = "cross-entropy on clean examples (no defense)"

    def loss(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        ce = F.cross_entropy(model(x), y)
        return ce, {"ce": ce.item()}
