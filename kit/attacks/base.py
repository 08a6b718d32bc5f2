"""The thin base every attack stands on.

The base owns what all attacks share: input validation (shape, range [0, 1], finite values, epsilon >= 0, labels),
device and dtype (taken from the inputs; the model must live on the same device), switching the model to eval mode and
restoring its mode afterwards, cost accounting, and ``__repr__``. A subclass writes only :meth:`Attack._run`.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass
from enum import Enum
from typing import Any, ClassVar

import torch
import torch.nn as nn

from kit.errors import UserError


class Norm(str, Enum):
    """Threat-model norms."""

    LINF = "linf"
    L2 = "l2"


def lp_norm(delta: torch.Tensor, norm: Norm | str) -> torch.Tensor:
    """Per-example norm of a batch of perturbations (N, ...) -> (N,)."""
    flat = delta.flatten(1)
    return flat.abs().amax(1) if Norm(norm) is Norm.LINF else flat.norm(dim=1)


@dataclass
class AttackResult:
    """What an attack returns, one entry per example.

    Attributes
    ----------
    x_adv : (N, C, H, W) tensor
        The best adversarial found for each example (the clean input where none was found).
    success : (N,) bool tensor
        ``True`` where ``x_adv`` is misclassified (includes examples misclassified clean, with ``x_adv = x``).
    norm : (N,) tensor
        Size of ``x_adv - x`` in the attack's norm.
    forwards, backwards : (N,) int64 tensors
        Forward and backward passes spent on each example (AttackBench-style cost accounting).
    """

    x_adv: torch.Tensor
    success: torch.Tensor
    norm: torch.Tensor
    forwards: torch.Tensor
    backwards: torch.Tensor

    @property
    def robust_accuracy(self) -> float:
        """Fraction of examples the attack did not fool."""
        return 1.0 - self.success.float().mean().item()


class Attack(ABC):
    """Base class. Subclasses set ``norm`` and implement ``_run(x, y) -> AttackResult``."""

    norm: ClassVar[Norm]

    def __init__(self, model: nn.Module, eps: float) -> None:
        if not isinstance(eps, (int, float)) or not math.isfinite(eps) or eps < 0:
            raise UserError(f"epsilon must be a finite number >= 0, got {eps!r}")
        self.model = model
        self.eps = float(eps)

    def _params(self) -> dict[str, Any]:
        """Parameters shown by ``__repr__`` (subclasses extend)."""
        return {"eps": self.eps}

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self._params().items())
        return f"{type(self).__name__}({args})"

    def _validate(self, x: torch.Tensor, y: torch.Tensor) -> None:
        if not isinstance(x, torch.Tensor) or x.dim() != 4:
            raise UserError(f"inputs must be a (N, C, H, W) tensor, got shape {tuple(getattr(x, 'shape', ()))}")
        if not x.is_floating_point():
            raise UserError(f"inputs must be floating point in [0, 1], got {x.dtype}")
        if not torch.isfinite(x).all():
            raise UserError("inputs contain NaN or infinite values")
        if x.numel() and (x.min() < 0 or x.max() > 1):
            raise UserError(f"inputs must lie in [0, 1], got [{x.min().item():.4g}, {x.max().item():.4g}]")
        if not isinstance(y, torch.Tensor) or y.shape != (x.shape[0],) or y.is_floating_point():
            raise UserError(f"labels must be an integer tensor of shape ({x.shape[0]},)")
        p = next(iter(self.model.parameters()), None)
        if p is not None and p.device != x.device:
            raise UserError(f"model is on {p.device} but inputs are on {x.device}")

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> AttackResult:
        self._validate(x, y)
        was_training = self.model.training
        self.model.eval()
        try:
            with torch.enable_grad():
                return self._run(x.detach(), y.to(x.device))
        finally:
            self.model.train(was_training)

    @abstractmethod
    def _run(self, x: torch.Tensor, y: torch.Tensor) -> AttackResult:
        """The algorithm: ``x`` is detached and validated, the model is in eval mode, gradients are enabled."""
