"""Adversarial attacks on a thin common base (:mod:`kit.attacks.base`)."""

from kit.attacks.base import Attack, AttackResult, Norm, lp_norm
from kit.attacks.pgd import FGSM, PGD

__all__ = ["FGSM", "PGD", "Attack", "AttackResult", "Norm", "lp_norm"]
