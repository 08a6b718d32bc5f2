"""TRADES (Zhang et al., ICML 2019): clean cross-entropy plus a KL robustness regulariser."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from kit.attacks.base import as_norm, project
from kit.attacks.pgd import steepest_step
from kit.defenses.base import Defense, register_defense


def kl_div_logits(clean: torch.Tensor, adv: torch.Tensor, reduction: str = "batchmean") -> torch.Tensor:
    r""":math:`\mathrm{KL}(\mathrm{softmax}(z) \,\|\, \mathrm{softmax}(z'))` from logits, in log-softmax form
    (finite on confident logits)."""
    return F.kl_div(F.log_softmax(adv, 1), F.log_softmax(clean, 1), reduction=reduction, log_target=True)


def kl_adversary(
    model: nn.Module,
    x: torch.Tensor,
    eps: float,
    steps: int = 10,
    rel_step: float = 0.007 / (8 / 255),
    norm: str = "linf",
    init_std: float = 1e-3,
) -> torch.Tensor:
    r"""TRADES' inner maximisation, :math:`\max_{\|x' - x\| \le \varepsilon} \mathrm{KL}(f(x) \| f(x'))`.

    Steepest ascent from :math:`x + 0.001\,\mathcal{N}(0, I)` (Zhang et al.'s start), projected on the ball and on
    [0, 1]; every step on every example; the final iterate is returned (detached). The model runs in eval mode, as in
    the authors' code, and its mode is restored. Randomness comes from torch's global generator (seeded per epoch by
    the trainer).
    """
    norm_e = as_norm(norm)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            target = model(x)
        e = torch.full((len(x),), float(eps), device=x.device, dtype=x.dtype)
        delta = project(init_std * torch.randn_like(x), e, norm_e)
        delta = (x + delta).clamp(0, 1) - x
        for _ in range(steps):
            xa = (x + delta).requires_grad_(True)
            with torch.enable_grad():
                grad = torch.autograd.grad(kl_div_logits(target, model(xa), reduction="sum"), xa)[0]
            delta = project(delta + steepest_step(grad, rel_step * e, norm_e), e, norm_e)
            delta = (x + delta).clamp(0, 1) - x
    finally:
        model.train(was_training)
    return (x + delta).detach()


@register_defense
class TRADES(Defense):
    r"""TRADES: :math:`\ell_{CE}(f(x), y) + \beta\, \mathrm{KL}(f(x) \,\|\, f(x'))`, :math:`x'` from :func:`kl_adversary`.

    Zhang, Yu, Jiao, Xing, El Ghaoui & Jordan, "Theoretically principled trade-off between robustness and accuracy",
    ICML 2019: β = 6, 10 steps of size 0.007 at ε = 8/255 (``rel_step`` keeps that ratio at other radii). The KL is
    averaged over the batch (``batchmean``), as in the authors' code. GOT (seed ``001_8d6446876c3a9ab7.txt``) builds
    GOT-TRADES on it.

    Parameters
    ----------
    eps, steps, rel_step, norm : the adversary's radius, steps, step as a fraction of eps, and norm.
    beta : float
        Weight of the robustness regulariser.
    """

    name = "trades"
    description = "clean CE + beta * KL(clean || adversarial) (Zhang et al. 2019)"
    defaults = {"eps": 8 / 255, "steps": 10, "rel_step": 0.007 / (8 / 255), "norm": "linf", "beta": 6.0}

    def adversarial(self, model: nn.Module, x: torch.Tensor) -> torch.Tensor:
        p = self.params
        return kl_adversary(model, x, p["eps"], int(p["steps"]), float(p["rel_step"]), p["norm"])

    def loss(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        x_adv = self.adversarial(model, x)
        clean, adv = model(x), model(x_adv)
        ce, kl = F.cross_entropy(clean, y), kl_div_logits(clean, adv)
        return ce + float(self.params["beta"]) * kl, {"ce": ce.item(), "kl": kl.item()}
