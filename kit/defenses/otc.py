"""The OT-Classifier (Li, Min, Yu, Hsieh, Lee & Kruus 2019; seed ``003_394ffb667ba2a1e9.txt``), with and without
Madry adversarial training."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.func import functional_call

from kit.defenses.base import Defense, register_defense
from kit.defenses.madry import Madry
from kit.errors import UserError


@register_defense
class OTC(Defense):
    r"""OT-Classifier: a classifier on a low-dimensional latent pushed towards :math:`\mathcal{N}(0, I)` by a WGAN critic.

    Objective (the paper's Eq. 2 with the 1-Wasserstein divergence in its Kantorovich-Rubinstein dual):

    .. math::

        \min_{Q, C} \frac{1}{n}\sum_i \ell_{CE}(C(Q(x_i)), y_i)
            + \lambda \max_{\|D\|_L \le 1} \Big(\frac{1}{n}\sum_i D(z_i) - D(Q(x_i))\Big),
        \qquad z_i \sim \mathcal{N}(0, I).

    Algorithm 1 of the paper, per batch: (line 7) one Adam step of the critic :math:`D` ascending
    :math:`\frac{\lambda}{n}\sum_i D(z_i) - D(\tilde z_i)` on detached codes, its weights then clipped to
    ``[-clip, clip]`` (the WGAN Lipschitz device the paper cites); (lines 8-9) the encoder and classifier descend the
    cross-entropy and the encoder ascends :math:`\frac{\lambda}{n}\sum_i D(Q(x_i))`. The paper takes lines 8 and 9 as two
    separate 1-step Adam updates; here they are one step of the trainer's optimiser on their sum (the same gradient
    field, one optimiser state), with the critic frozen in that step (its parameters get no gradient). Use
    ``--optimizer adam`` to follow the paper's optimiser. The paper does not give λ; the default 1 balances the two
    terms on digits/MNIST. The critic is a submodule of the ``otc`` model (so ``--resume`` restores it) but not part of
    its forward pass, so exports contain only encoder + classifier.

    Parameters
    ----------
    lam : float
        λ, weight of the latent Wasserstein term.
    critic_lr : float
        Adam learning rate of the critic.
    clip : float
        Weight clipping of the critic (0.01, as WGAN).
    critic_steps : int
        Critic updates per batch (1 in Algorithm 1).
    """

    name = "otc"
    description = "OT-Classifier: CE on a latent matched to N(0, I) by a WGAN critic (Li et al. 2019)"
    defaults: dict[str, Any] = {"lam": 1.0, "critic_lr": 1e-3, "clip": 0.01, "critic_steps": 1}

    def setup(self, model: nn.Module) -> None:
        critic = getattr(model, "critic", None)
        if not isinstance(critic, nn.Module) or not hasattr(model, "features"):
            raise UserError(f"defense {self.name!r} needs a model with a latent critic: use --arch otc")
        self.critic = critic
        self.critic_opt = torch.optim.Adam(critic.parameters(), lr=float(self.params["critic_lr"]))
        self.clip_critic()

    def clip_critic(self) -> None:
        """Clip every critic weight to ``[-clip, clip]``."""
        c = float(self.params["clip"])
        with torch.no_grad():
            for p in self.critic.parameters():
                p.clamp_(-c, c)

    def critic_gap(self, codes: torch.Tensor) -> torch.Tensor:
        r"""The critic's estimate :math:`\frac{1}{n}\sum_i D(z_i) - D(\tilde z_i)` with fresh prior samples."""
        prior = torch.randn_like(codes)
        return self.critic(prior).mean() - self.critic(codes).mean()

    def critic_step(self, codes: torch.Tensor) -> float:
        """Algorithm 1, line 7: ascend the critic gap on detached codes, then clip. Returns the last gap."""
        params = list(self.critic.parameters())
        gap = torch.zeros(())
        for _ in range(int(self.params["critic_steps"])):
            gap = self.critic_gap(codes.detach())
            grads = torch.autograd.grad(-float(self.params["lam"]) * gap, params)
            for p, g in zip(params, grads):
                p.grad = g
            self.critic_opt.step()
            for p in params:
                p.grad = None  # the trainer's optimiser must not move the critic
            self.clip_critic()
        return gap.item()

    def frozen_critic(self, codes: torch.Tensor) -> torch.Tensor:
        """D(codes) with the critic's parameters detached: gradients reach the encoder only."""
        detached = {k: v.detach() for k, v in self.critic.named_parameters()}
        return functional_call(self.critic, detached, (codes,))

    def batch(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The images the classifier trains on (the clean batch here; adversarial in ``otc-adv``)."""
        return x

    def loss(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        codes = model.features(self.batch(model, x, y))
        gap = self.critic_step(codes)
        ce = F.cross_entropy(model.logits_from_features(codes), y)
        fool = -self.frozen_critic(codes).mean()
        return ce + float(self.params["lam"]) * fool, {"ce": ce.item(), "critic_gap": gap}

    def state_dict(self) -> dict[str, Any]:
        return {"critic_opt": self.critic_opt.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if "critic_opt" in state:
            self.critic_opt.load_state_dict(state["critic_opt"])


@register_defense
class OTCAdv(OTC):
    """OT-Classifier with Madry adversarial training ("OT-CLA+Adv" of the paper, §4): the PGD batch replaces the clean
    one throughout, so the critic matches the codes of adversarial inputs to the prior and the classifier learns them.
    Takes the PGD parameters of :class:`~kit.defenses.madry.Madry` as well (``eps`` 0.3 for MNIST in the paper)."""

    name = "otc-adv"
    description = "OT-Classifier + Madry PGD adversarial training (Li et al. 2019, OT-CLA+Adv)"
    defaults = {**OTC.defaults, **Madry.defaults}

    def setup(self, model: nn.Module) -> None:
        super().setup(model)
        self.madry = Madry(**{k: self.params[k] for k in Madry.defaults})
        self.madry.setup(model)

    def batch(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.madry.adversarial(model, x, y)
