"""Sinkhorn Adversarial Training (SAT; Bouniot, Audigier & Loesch; seed ``000_e2e3710bc929b9d7.txt``)."""

from __future__ import annotations

import warnings
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from kit.defenses.base import register_defense
from kit.defenses.madry import Madry
from kit.errors import UserError
from kit.ot.sinkhorn import DivergenceValue, SinkhornConvergenceWarning, sinkhorn_divergence


@register_defense
class SAT(Madry):
    r"""SAT: cross-entropy on the adversarial batch plus the Sinkhorn divergence between clean and adversarial logits.

    .. math::

        \mathcal{L}_{SAT_\sigma} = \ell_{CE}(f(\hat X), Y) + w\, S_\sigma\big(f(X), f(\hat X)\big),
        \qquad S_\sigma(\alpha, \beta) = W_\sigma(\alpha, \beta) - \tfrac12 W_\sigma(\alpha, \alpha)
            - \tfrac12 W_\sigma(\beta, \beta)

    (the paper's Eq. 1, with ``weight`` w = 1), the two batches of B logits taken as uniform point clouds in
    :math:`\mathbb{R}^{K}`, squared Euclidean ground cost, :math:`\sigma = 1`, 50 Sinkhorn iterations (§V), the three
    solves batched (:func:`kit.ot.sinkhorn.sinkhorn_divergence`). :math:`\hat X` comes from 7 steps of L∞ PGD on the
    current model (the paper's adversary; :class:`~kit.defenses.madry.Madry`'s parameters apply).

    ``value`` chooses the OT value that is debiased:

    - ``"entropic"`` (default): the paper's definition, :math:`W_\sigma = \langle P, C\rangle + \sigma\,KL(P\|a\otimes b)`,
      gradient by the envelope theorem at the final iterate.
    - ``"transport"``: the authors' released variant, the transport cost :math:`\langle P, C\rangle` of each entropic
      plan, debiased, not clipped at 0, gradient through the 50 unrolled iterations.

    With 50 iterations the solves need not converge; that is the paper's budget, so the per-batch non-convergence
    warning is silenced here and the fraction of converged solves is logged as ``sinkhorn_converged`` instead (raise
    ``sinkhorn_iters`` to converge).

    Parameters
    ----------
    sigma : float
        Entropic regularisation σ.
    sinkhorn_iters : int
        Sinkhorn iterations per solve.
    value : {"entropic", "transport"}
    weight : float
        Weight of the divergence term (1 in the paper).
    (and the PGD parameters of :class:`~kit.defenses.madry.Madry`)
    """

    name = "sat"
    description = "adversarial CE + Sinkhorn divergence between clean and adversarial logits (SAT)"
    defaults: dict[str, Any] = {**Madry.defaults, "sigma": 1.0, "sinkhorn_iters": 50, "value": "entropic",
                                "weight": 1.0}

    def setup(self, model: nn.Module) -> None:
        try:
            DivergenceValue(self.params["value"])
        except ValueError:
            known = ", ".join(v.value for v in DivergenceValue)
            raise UserError(f"sat: unknown value {self.params['value']!r}; known: {known}") from None
        super().setup(model)

    def divergence(self, clean: torch.Tensor, adv: torch.Tensor) -> tuple[torch.Tensor, bool]:
        """:math:`S_\\sigma` between two (B, K) logit batches, and whether all three solves converged."""
        p = self.params
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", SinkhornConvergenceWarning)
            res = sinkhorn_divergence(clean, adv, reg=float(p["sigma"]), value=p["value"],
                                      max_iter=int(p["sinkhorn_iters"]))
        return res.divergence, bool(res.converged)

    def loss(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        x_adv = self.adversarial(model, x, y)
        logits = model(torch.cat([x, x_adv]))
        clean, adv = logits[: len(x)], logits[len(x):]
        ce = F.cross_entropy(adv, y)
        div, converged = self.divergence(clean, adv)
        loss = ce + float(self.params["weight"]) * div
        return loss, {"adv_ce": ce.item(), "sinkhorn_div": div.item(), "sinkhorn_converged": float(converged)}
