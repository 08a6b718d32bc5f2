"""Adversarial attacks on a thin common base (:mod:`kit.attacks.base`), and the minimum-epsilon search."""

from kit.attacks.apgd import APGD, APGDT
from kit.attacks.base import Attack, AttackResult, Norm, lp_norm
from kit.attacks.fab import FABT
from kit.attacks.fmn import FMN
from kit.attacks.pgd import FGSM, PGD
from kit.attacks.search import SearchResult, min_eps_search
from kit.attacks.square import Square
from kit.attacks.trust_region import TrustRegion

__all__ = ["APGD", "APGDT", "FABT", "FGSM", "FMN", "PGD", "Attack", "AttackResult", "Norm", "SearchResult", "Square", "TrustRegion",
           "lp_norm", "min_eps_search"]
