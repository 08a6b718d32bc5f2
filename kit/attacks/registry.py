"""Attacks by CLI name: the closed vocabulary ``otkit evaluate --attack`` and ``otkit audit --attack`` accept.

Each entry fixes an attack class, its norm and the budget it runs with inside the minimum-epsilon search (fixed-budget
attacks) or once, capped at eps_max (minimum-norm attacks). Modules are imported only when an attack is built.

Importing this module imports no torch: the names (:func:`list_attacks`, :func:`expand`, :data:`PRESETS`) come from a
plain table, and the :class:`AttackSpec` objects (:data:`ATTACKS`, :func:`get_attack`), whose norm is a
:class:`kit.attacks.base.Norm`, are built from it on first use. ``otkit audit --help`` lists the names only.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, NamedTuple

from kit.errors import UserError

if TYPE_CHECKING:
    import torch.nn as nn

    from kit.attacks.base import Attack, Norm


@dataclass(frozen=True)
class AttackSpec:
    """One registered attack configuration."""

    name: str
    module: str
    cls: str
    norm: Norm
    description: str
    kwargs: dict[str, Any] = field(default_factory=dict)
    gradient_free: bool = False

    def build(self, model: nn.Module, seed: int = 0, **overrides: Any) -> Attack:
        """Instantiate the attack on ``model`` with the registered budget (``overrides`` win)."""
        cls = getattr(importlib.import_module(self.module), self.cls)
        return cls(model, norm=self.norm.value, seed=seed, **{**self.kwargs, **overrides})

    def config(self) -> dict[str, Any]:
        """JSON-able description recorded in curves.json and reports."""
        return {"class": self.cls, "norm": self.norm.value, **self.kwargs}

    def parameters(self) -> dict[str, Any]:
        """The parameters a user may set (``NAME@EPS:key=value``): the attack class's keyword arguments, with their
        values in this spec (or the class's defaults); the model, the norm, the seed and the radius are not."""
        import inspect

        cls = getattr(importlib.import_module(self.module), self.cls)
        out = {}
        for name, p in inspect.signature(cls.__init__).parameters.items():
            if name in _FIXED or p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
                continue
            out[name] = self.kwargs.get(name, None if p.default is inspect.Parameter.empty else p.default)
        return out

    def with_params(self, params: dict[str, str]) -> AttackSpec:
        """This spec with ``params`` (text values from the command line or a run file) set, each checked against the
        attack's own parameters and the type of its current value.

        Raises
        ------
        UserError
            An unknown parameter (the known ones listed) or a value of the wrong type.
        """
        known = self.parameters()
        out = dict(self.kwargs)
        for key, text in params.items():
            if key not in known:
                raise UserError(f"{self.name} has no parameter {key!r}; it takes {', '.join(sorted(known))}")
            out[key] = _typed(text, known[key], f"{self.name}:{key}")
        return dataclasses.replace(self, kwargs=out)


#: constructor arguments that the kit sets itself, never the user
_FIXED = frozenset({"self", "model", "norm", "seed", "eps", "replica"})


def _typed(text: str, like: Any, where: str) -> Any:
    """``text`` as the type of ``like`` (bool, int, float or text; anything for a ``None`` default)."""
    t = text.strip()
    try:
        if isinstance(like, bool):
            if t.lower() not in ("true", "false", "1", "0", "yes", "no"):
                raise ValueError
            return t.lower() in ("true", "1", "yes")
        if isinstance(like, int):
            return int(t)
        if isinstance(like, float):
            v = float(t)
            if not math.isfinite(v):
                raise ValueError
            return v
    except ValueError:
        raise UserError(f"{where} must be {type(like).__name__}, got {text!r}") from None
    if like is None:
        for cast in (int, float):
            try:
                return cast(t)
            except ValueError:
                pass
    return t


class _Entry(NamedTuple):
    """One row of the table :data:`ATTACKS` is built from: an :class:`AttackSpec` with its norm as text."""

    name: str
    module: str
    cls: str
    norm: str
    description: str
    kwargs: dict[str, Any] = {}  # never modified: copied into the spec
    gradient_free: bool = False


_ENTRIES = (
    _Entry("pgd-linf", "kit.attacks.pgd", "PGD", "linf", "PGD, 10 steps per rung, CE loss (Madry et al. 2018)",
           {"steps": 10}),
    _Entry("pgd-l2", "kit.attacks.pgd", "PGD", "l2", "PGD in L2, 10 steps per rung, CE loss", {"steps": 10}),
    _Entry("apgd-ce", "kit.attacks.apgd", "APGD", "linf", "APGD-CE, 20 steps per rung (Croce & Hein 2020)",
           {"loss": "ce", "steps": 20}),
    _Entry("apgd-dlr", "kit.attacks.apgd", "APGD", "linf", "APGD-DLR, 20 steps per rung (Croce & Hein 2020)",
           {"loss": "dlr", "steps": 20}),
    _Entry("apgd-ce-l2", "kit.attacks.apgd", "APGD", "l2", "APGD-CE in L2, 20 steps per rung",
           {"loss": "ce", "steps": 20}),
    _Entry("apgd-dlr-l2", "kit.attacks.apgd", "APGD", "l2", "APGD-DLR in L2, 20 steps per rung",
           {"loss": "dlr", "steps": 20}),
    _Entry("apgd-t", "kit.attacks.apgd", "APGDT", "linf",
           "APGD-T, 9 targets x 20 steps per rung, targeted DLR loss (Croce & Hein 2020, AutoAttack)",
           {"loss": "dlr", "steps": 20, "n_targets": 9}),
    _Entry("apgd-t-l2", "kit.attacks.apgd", "APGDT", "l2", "APGD-T in L2, 9 targets x 20 steps per rung",
           {"loss": "dlr", "steps": 20, "n_targets": 9}),
    _Entry("fmn-linf", "kit.attacks.fmn", "FMN", "linf", "Fast Minimum-Norm, 100 steps (Pintor et al. 2021)",
           {"steps": 100}),
    _Entry("fmn-l2", "kit.attacks.fmn", "FMN", "l2", "Fast Minimum-Norm in L2, 100 steps", {"steps": 100}),
    _Entry("fab-t", "kit.attacks.fab", "FABT", "linf",
           "FAB-T, 9 targets x 100 steps + 10 bisections (Croce & Hein 2020, AutoAttack)",
           {"steps": 100, "n_targets": 9, "final_search": 10}),
    _Entry("fab-t-l2", "kit.attacks.fab", "FABT", "l2", "FAB-T in L2, 9 targets x 100 steps + 10 bisections",
           {"steps": 100, "n_targets": 9, "final_search": 10}),
    _Entry("tr-linf", "kit.attacks.trust_region", "TrustRegion", "linf",
           "Trust-Region attack, 100 steps (Yao et al. 2019; the SAT paper's evaluation)", {"steps": 100}),
    _Entry("tr-l2", "kit.attacks.trust_region", "TrustRegion", "l2", "Trust-Region attack in L2, 100 steps",
           {"steps": 100}),
    _Entry("square-linf", "kit.attacks.square", "Square", "linf",
           "Square attack, 300 queries per rung, forward passes only (Andriushchenko et al. 2020)",
           {"queries": 300}, gradient_free=True),
    _Entry("square-l2", "kit.attacks.square", "Square", "l2", "Square attack in L2, 300 queries per rung",
           {"queries": 300}, gradient_free=True),
    # Wasserstein radii are in the unit-mass scale of kit.ot (each image divided by its total mass), 5x5 local plans.
    _Entry("wasserstein-pgd", "kit.attacks.wasserstein", "WassersteinPGD", "wasserstein",
           "projected-Sinkhorn PGD, 20 steps per rung (Wong et al. 2019)", {"steps": 20}),
    _Entry("unbalanced-sinkhorn", "kit.attacks.unbalanced", "UnbalancedSinkhornAttack", "wasserstein",
           "unbalanced (KL-relaxed) Sinkhorn attack, 20 steps per rung", {"steps": 20}),
    _Entry("fw-wasserstein", "kit.attacks.frank_wolfe", "FrankWolfeWasserstein", "wasserstein",
           "Frank-Wolfe Wasserstein attack, 20 steps per rung (Wu, Wang & Yu 2020)", {"steps": 20}),
)


#: names that stand for several attacks run together, their worst case reported per threat model: AutoAttack's
#: standard ensemble (Croce & Hein, ICML 2020). Members are ``NAME`` or ``NAME:key=value,...`` (the parameters of
#: ``--attack NAME@EPS:key=value``). Budgets are per rung of the minimum-epsilon search, whose ladder warm-starts each
#: rung from the last: Square gets 1000 queries per rung, with which the search left as many examples robust at fixed
#: radii as AutoAttack's Square with 5000 queries at that radius (docs/BENCHMARKS.md, bench/square_budget.py).
PRESETS: dict[str, tuple[str, ...]] = {
    "autoattack": ("apgd-ce", "apgd-t", "fab-t", "square-linf:queries=1000"),
    "autoattack-l2": ("apgd-ce-l2", "apgd-t-l2", "fab-t-l2", "square-l2:queries=1000"),
}


@functools.cache
def _attacks() -> dict[str, AttackSpec]:
    """:data:`ATTACKS`, built on first use (the norms are :class:`kit.attacks.base.Norm`, which imports torch)."""
    from kit.attacks.base import Norm

    return {e.name: AttackSpec(e.name, e.module, e.cls, Norm(e.norm), e.description, dict(e.kwargs),
                               e.gradient_free) for e in _ENTRIES}


def __getattr__(name: str) -> Any:
    # ATTACKS: dict[str, AttackSpec], every registered attack by name (PEP 562: built when first asked for)
    if name == "ATTACKS":
        return _attacks()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


if TYPE_CHECKING:
    #: every registered attack by name
    ATTACKS: dict[str, AttackSpec]


def list_attacks() -> list[str]:
    """Registered attack names, then the presets (:data:`PRESETS`); imports no attack (and no torch)."""
    return [*(e.name for e in _ENTRIES), *PRESETS]


def expand(name: str) -> tuple[str, ...]:
    """The attack names a name stands for: a preset's members (without their parameters), else the name itself."""
    return tuple(m.partition(":")[0] for m in PRESETS.get(name, (name,)))


def get_attack(name: str) -> AttackSpec:
    """The spec registered under ``name``; an unknown name is a :class:`UserError` listing the known ones."""
    try:
        return _attacks()[name]
    except KeyError:
        if name in PRESETS:
            raise UserError(f"{name} is a preset of several attacks ({', '.join(expand(name))}), not one "
                            "attack") from None
        raise UserError(f"unknown attack {name!r}; known: {', '.join(list_attacks())}") from None
