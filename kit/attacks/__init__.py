"""Adversarial attacks on a thin common base (:mod:`kit.attacks.base`), and the minimum-epsilon search.

The names below are imported on first use (PEP 562): importing :mod:`kit.attacks` or :mod:`kit.attacks.registry`
imports no attack module and no torch, so the command line's ``--help`` stays fast.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from kit.runtime import lazy_exports

if TYPE_CHECKING:
    from kit.attacks.apgd import APGD, APGDT
    from kit.attacks.base import Attack, AttackResult, Norm, lp_norm
    from kit.attacks.fab import FABT
    from kit.attacks.fmn import FMN
    from kit.attacks.pgd import FGSM, PGD
    from kit.attacks.search import SearchResult, min_eps_search
    from kit.attacks.square import Square
    from kit.attacks.trust_region import TrustRegion

__all__ = ["APGD", "APGDT", "FABT", "FGSM", "FMN", "PGD", "Attack", "AttackResult", "Norm", "SearchResult", "Square",
           "TrustRegion", "lp_norm", "min_eps_search"]

#: where each public name lives
_WHERE = {
    "APGD": "kit.attacks.apgd", "APGDT": "kit.attacks.apgd",
    "Attack": "kit.attacks.base", "AttackResult": "kit.attacks.base", "Norm": "kit.attacks.base",
    "lp_norm": "kit.attacks.base",
    "FABT": "kit.attacks.fab",
    "FMN": "kit.attacks.fmn",
    "FGSM": "kit.attacks.pgd", "PGD": "kit.attacks.pgd",
    "SearchResult": "kit.attacks.search", "min_eps_search": "kit.attacks.search",
    "Square": "kit.attacks.square",
    "TrustRegion": "kit.attacks.trust_region",
}


__getattr__, __dir__ = lazy_exports(__name__, _WHERE)
