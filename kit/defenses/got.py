r"""GOT: adversarial generalisation with optimal transport (seed ``001_8d6446876c3a9ab7.txt``), in its PGD and TRADES
forms, each with the standard (-S) and label-matching (-LM) OT term.

The paper ("Improving robustness with optimal transport based adversarial generalization", ICLR 2022 submission)
adds to an adversarial-training loss the entropic Wasserstein distance between the joint distributions of
(latent, prediction) of the clean and the adversarial batch (§3.2):

.. math::

    \mathcal{W}_\theta\big(Q^h_d, Q^h_a\big), \qquad
    d(u_i, u^a_j) = \lambda\, d_x(z_i, z^a_j) + d_y\big(h(z_i), h(z^a_j)\big),

with :math:`z = g(x)` the penultimate latent (``model.features``), :math:`h` the softmax of the logits computed from
it (``model.logits_from_features``), :math:`d_x` the cosine distance and :math:`d_y` the KL divergence (Table 5, the
paper's best pair). It is computed in the semi-dual form of Genevay et al. (2016) with the Kantorovich potential
:math:`\varphi` a linear layer on the latent (Eq. 5, App. A.3), trained by gradient ascent alternating with the
model's descent.

The functions :func:`got_cost`, :func:`c_transform`, :func:`semi_dual` and :func:`semi_dual_plan` are the OT term on
one batch; they take the potential as a vector of values, so they serve both the linear :math:`\varphi` of the defense
(pass ``phi(z)``) and a free (tabular) potential, whose maximum is the entropic OT value itself.
"""

from __future__ import annotations

import math
from abc import abstractmethod
from typing import Any, ClassVar, Protocol, cast

import torch
import torch.nn as nn
import torch.nn.functional as F

from kit.defenses.base import Defense, register_defense, warmup_factor
from kit.defenses.madry import Madry
from kit.defenses.trades import kl_adversary, kl_div_logits
from kit.errors import UserError


class LatentModel(Protocol):
    """What GOT needs of a model: the penultimate latent and the head on it (the zoo's ``Classifier`` has both)."""

    def features(self, x: torch.Tensor) -> torch.Tensor: ...

    def logits_from_features(self, z: torch.Tensor) -> torch.Tensor: ...


#: Norm floor of the cosine distance: an all-zero latent (possible after a ReLU) is at distance 1 from everything.
COSINE_EPS = 1e-8


def got_cost(
    z: torch.Tensor, logits: torch.Tensor, z_adv: torch.Tensor, logits_adv: torch.Tensor, lam: float = 1.0
) -> torch.Tensor:
    r"""The GOT ground cost between clean and adversarial (latent, prediction) pairs.

    .. math::

        C_{ij} = \lambda\Big(1 - \frac{\langle z_i, z^a_j\rangle}{\|z_i\|\,\|z^a_j\|}\Big)
            + \mathrm{KL}\big(h(z_i) \,\|\, h(z^a_j)\big),
        \qquad \mathrm{KL}(p \,\|\, q) = \sum_k p_k (\log p_k - \log q_k),

    the paper's :math:`d(u, u_a) = \lambda d_x(z, z_a) + d_y(h(z), h(z_a))` (§3.2) with the cosine distance for
    :math:`d_x` and the KL divergence for :math:`d_y` (Table 5), the clean prediction first, as the paper writes
    :math:`d_y(y, y_a)`. The KL is formed from ``log_softmax`` (never the log of a softmax), so confident logits give
    finite costs and gradients; norms are floored at :data:`COSINE_EPS`.

    Parameters
    ----------
    z : (n, d) tensor
        Clean latents :math:`g(x_i)`.
    logits : (n, K) tensor
        Clean logits (:math:`h(z_i)` is their softmax).
    z_adv : (m, d) tensor
        Adversarial latents :math:`g(x^a_j)`.
    logits_adv : (m, K) tensor
        Adversarial logits.
    lam : float
        λ, weight of the latent distance (1 in the paper, App. A.3).

    Returns
    -------
    (n, m) tensor
        :math:`C_{ij}`, differentiable in all four inputs.
    """
    zn = F.normalize(z, dim=1, eps=COSINE_EPS)
    zan = F.normalize(z_adv, dim=1, eps=COSINE_EPS)
    cosine = 1.0 - zn @ zan.T
    logp, logq = F.log_softmax(logits, dim=1), F.log_softmax(logits_adv, dim=1)
    p = logp.exp()
    kl = (p * logp).sum(1, keepdim=True) - p @ logq.T
    return lam * cosine + kl


def label_mask(y: torch.Tensor, y_adv: torch.Tensor) -> torch.Tensor:
    r"""The label-matching filter :math:`I(y^a_j, y_i)` of Eq. 6 as an (n, m) bool tensor: ``y[i] == y_adv[j]``."""
    return y[:, None] == y_adv[None, :]


def _scores(phi: torch.Tensor, cost: torch.Tensor, theta: float, mask: torch.Tensor | None) -> torch.Tensor:
    r""":math:`(\varphi_i - C_{ij})/\theta` (n, m), with :math:`-\infty` on masked-out pairs (cost :math:`+\infty`)."""
    if cost.ndim != 2 or phi.shape != cost.shape[:1]:
        raise ValueError(f"semi-dual: potential of shape {tuple(phi.shape)} does not match a cost {tuple(cost.shape)}")
    if not theta > 0:
        raise ValueError(f"semi-dual: theta must be positive, got {theta}")
    scores = (phi[:, None] - cost) / theta
    if mask is not None:
        if mask.shape != cost.shape:
            raise ValueError(f"semi-dual: mask of shape {tuple(mask.shape)} does not match a cost {tuple(cost.shape)}")
        if not bool(mask.any(0).all()):
            raise ValueError("semi-dual: an adversarial example has no clean example of its label in the batch")
        scores = scores.masked_fill(~mask, float("-inf"))
    return scores


def c_transform(
    phi: torch.Tensor, cost: torch.Tensor, theta: float, mask: torch.Tensor | None = None
) -> torch.Tensor:
    r"""The entropic c-transform (soft-minimum) of a potential on the clean side, for each adversarial point.

    .. math::

        \varphi^{C,\theta}_j = -\theta \log \frac{1}{n} \sum_{i=1}^n I_{ij}\,
            \exp\Big(\frac{\varphi_i - C_{ij}}{\theta}\Big),

    the inner term of the paper's Eq. 5 (:math:`I_{ij} = 1`) and Eq. 6 (:math:`I_{ij} = 1[y_i = y^a_j]`), computed as a
    log-sum-exp (a masked pair enters as :math:`-\infty`, i.e. cost :math:`+\infty`). As :math:`\theta \to 0` it
    tends to :math:`\min_i C_{ij} - \varphi_i`, the hard c-transform.

    Parameters
    ----------
    phi : (n,) tensor
        Potential values :math:`\varphi_i` on the clean points (a linear layer's outputs, or free values).
    cost : (n, m) tensor
    theta : float
        Entropic regularisation θ > 0.
    mask : (n, m) bool tensor, optional
        Pairs allowed to transport (label matching); ``None`` allows all.

    Returns
    -------
    (m,) tensor
    """
    scores = _scores(phi, cost, theta, mask)
    return -theta * (torch.logsumexp(scores, dim=0) - math.log(cost.shape[0]))


def semi_dual(phi: torch.Tensor, cost: torch.Tensor, theta: float, mask: torch.Tensor | None = None) -> torch.Tensor:
    r"""The entropic semi-dual objective of GOT (the paper's Eq. 5, or Eq. 6 with a mask) at potential ``phi``.

    .. math::

        F_\theta(\varphi) = \frac{1}{n}\sum_{i=1}^n \varphi_i + \frac{1}{m}\sum_{j=1}^m \varphi^{C,\theta}_j,
        \qquad \max_{\varphi \in \mathbb{R}^n} F_\theta(\varphi) = \min_{P \in \Gamma(a, b)}
            \langle P, C\rangle + \theta\,\mathrm{KL}(P \,\|\, a \otimes b),

    with uniform weights :math:`a = \mathbf{1}/n` (clean), :math:`b = \mathbf{1}/m` (adversarial) and
    :math:`\varphi^{C,\theta}` from :func:`c_transform` (Genevay, Cuturi, Peyré & Bach 2016, semi-dual; with the KL
    regulariser relative to :math:`a \otimes b` no constant term appears). The potential lives on the clean latents and
    the soft-minimum runs over the clean points for each adversarial one, as in Eq. 5. With a mask (Eq. 6) the
    maximum is the same problem with :math:`C_{ij} = +\infty` off the mask, feasible when every label has as many
    clean as adversarial points (true in GOT: the adversarial batch carries the clean batch's labels).

    Any ``phi`` gives a lower bound of the entropic OT value (weak duality); a free vector maximised to convergence
    gives the value itself (``ot.solve(C, a, b, reg=theta, reg_type="KL").value``); the defense's linear potential
    :math:`\varphi(z) = w^\top z + b` gives the best bound in that family. Shifting ``phi`` by a constant leaves the
    value unchanged. For fixed ``phi``, :math:`\partial F_\theta / \partial C_{ij} = P_{ij}`, the plan of
    :func:`semi_dual_plan` (zero on masked-out pairs).

    Parameters
    ----------
    phi : (n,) tensor
    cost : (n, m) tensor
    theta : float
    mask : (n, m) bool tensor, optional

    Returns
    -------
    scalar tensor
    """
    return phi.mean() + c_transform(phi, cost, theta, mask).mean()


def semi_dual_plan(
    phi: torch.Tensor, cost: torch.Tensor, theta: float, mask: torch.Tensor | None = None
) -> torch.Tensor:
    r"""The transport plan of the semi-dual at ``phi``: :math:`P_{ij} = a_i b_j
    \exp\big((\varphi_i + \varphi^{C,\theta}_j - C_{ij})/\theta\big) = \frac{1}{m}\,\mathrm{softmax}_i
    \big((\varphi_i - C_{ij})/\theta\big)` (n, m).

    Its columns sum to :math:`b_j = 1/m` for any ``phi``; its rows sum to :math:`a_i = 1/n` at the maximiser (the
    gradient of :func:`semi_dual` in ``phi`` is :math:`a - P\mathbf{1}`). Masked-out pairs carry exactly zero mass.
    """
    return torch.softmax(_scores(phi, cost, theta, mask), dim=0) / cost.shape[1]


def _number(params: dict[str, Any], key: str, defense: str, low: float, strict: bool) -> float:
    """``params[key]`` as a finite float above ``low`` (strictly when ``strict``), else a :class:`UserError`."""
    value = params[key]
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or (value <= low if strict else value < low):
        bound = f"> {low:g}" if strict else f">= {low:g}"
        raise UserError(f"defense {defense!r}: {key} must be a finite number {bound}, got {value!r}")
    return float(value)


class GOT(Defense):
    r"""Base of the GOT defenses: the Kantorovich potential, its optimiser, and the OT term (not registered itself).

    Objective, per batch of :math:`B` clean examples :math:`x_i` and their adversarial examples :math:`x^a_i`:

    .. math::

        \mathcal{L} = \mathcal{L}_{\text{task}} + \beta\, F_\theta(\varphi_w), \qquad
        F_\theta(\varphi_w) = \frac{1}{B}\sum_i \varphi_w(z_i)
            - \frac{\theta}{B}\sum_j \log \frac{1}{B}\sum_i I_{ij}
            \exp\Big(\frac{\varphi_w(z_i) - C_{ij}}{\theta}\Big),

    :math:`C` from :func:`got_cost` on :math:`(z_i, f(x_i))` and :math:`(z^a_j, f(x^a_j))`, :math:`\varphi_w(z) =
    w^\top z + b` a linear layer on the penultimate latent (App. A.3), :math:`I_{ij} = 1` (-S, Eq. 5) or
    :math:`1[y_i = y_j]` (-LM, Eq. 6; ``label_matching=True``). :math:`\beta = 10`, :math:`\theta = 0.1`,
    :math:`\lambda = 1` (App. A.3).

    Training alternates (the paper gives no algorithm; this follows its words, "the OT loss ... is then obtained as the
    maximum value through optimising the φ layer", §3.2): per batch, first ``phi_steps`` Adam steps of :math:`\varphi`
    ascending :math:`F_\theta` on the *detached* latents and costs of this batch, then the trainer's step on the model
    descending :math:`\mathcal{L}` with :math:`\varphi` frozen, so the model descends the freshest estimate of the
    maximum. The potential's values enter the model's step as constants: the model's gradient is
    :math:`\beta \sum_{ij} P_{ij} \nabla C_{ij}` with :math:`P` the plan of :func:`semi_dual_plan` (the envelope, or
    Danskin, gradient of :math:`\max_\varphi F_\theta`, exact at a maximising potential), through the latents and both
    predictions. Letting the gradient also run through :math:`\varphi_w(z_i)` (only the weights frozen) is unstable:
    for fixed :math:`w`, moving one clean latent so that its potential rises by :math:`s` raises the mean by
    :math:`s/B` but lowers every soft-minimum by up to :math:`s`, so the model can drive :math:`F_\theta` down without
    bringing the distributions closer; on digits:16 the OT term went from 0.20 to :math:`-7\cdot 10^{18}` within 13
    batches, then NaN.

    A linear potential makes :math:`F_\theta` a lower bound of the entropic OT value (weak duality); that is the
    paper's estimator. The adversarial batch carries the clean labels, so with label matching every adversarial example
    has at least its own clean example to transport to. :math:`\varphi` is created at :meth:`setup` (a probe forward
    of zeros, eval mode, gives the latent size) or, for a model without ``input_shape``, at the first batch; its
    weights and Adam state are in :meth:`state_dict`, so ``--resume`` restores them exactly.

    Parameters
    ----------
    beta : float
        β, weight of the OT term (10, App. A.3). On small models trained from scratch with SGD at the kit's default
        lr 0.05 it collapses the latent (see docs/defenses.md); the paper trains MNIST with Adam at 1e-3.
    lam : float
        λ, weight of the cosine distance in the cost (1).
    theta : float
        θ, entropic regularisation (0.1).
    label_matching : bool
        ``False``: the -S variants (Eq. 5); ``True``: the -LM variants (Eq. 6), only equal-label pairs transport.
    phi_lr : float
        Adam learning rate of the potential (not in the paper; 1e-3 is its Adam rate for MNIST, App. A.3).
    phi_steps : int
        Ascent steps of the potential per batch (1).
    ramp_epochs : int
        A warm-up, not in the paper (0: none): over the first R epochs the adversary's ε and the OT weight β both
        rise linearly, to :math:`\min(1, (e + 1)/R)` of their values in 0-based epoch :math:`e` (set by
        :meth:`start_epoch`, a pure function of the epoch, so a resumed run matches). On MNIST at ε 0.3 with the
        paper's PGD-40, Adam 1e-3 and the C&W CNN, GOT-PGD at β 10 without it stayed near chance and then collapsed
        (held-out clean accuracy 0.82 at epoch 5, 0.12 at epoch 8; docs/RESULTS.md).
    """

    ot_defaults: ClassVar[dict[str, Any]] = {
        "beta": 10.0,
        "lam": 1.0,
        "theta": 0.1,
        "label_matching": False,
        "phi_lr": 1e-3,
        "phi_steps": 1,
        "ramp_epochs": 0,
    }

    phi: nn.Linear | None
    phi_opt: torch.optim.Adam | None

    def setup(self, model: nn.Module) -> None:
        p = self.params
        self.beta = _number(p, "beta", self.name, 0.0, strict=False)
        self.lam = _number(p, "lam", self.name, 0.0, strict=False)
        self.theta = _number(p, "theta", self.name, 0.0, strict=True)
        self.phi_lr = _number(p, "phi_lr", self.name, 0.0, strict=True)
        steps = p["phi_steps"]
        if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
            raise UserError(f"defense {self.name!r}: phi_steps must be an integer >= 1, got {steps!r}")
        if not isinstance(p["label_matching"], bool):
            raise UserError(f"defense {self.name!r}: label_matching must be true or false, got {p['label_matching']!r}")
        self.label_matching = p["label_matching"]
        ramp = p["ramp_epochs"]
        if not isinstance(ramp, int) or isinstance(ramp, bool) or ramp < 0:
            raise UserError(f"defense {self.name!r}: ramp_epochs must be an integer >= 0, got {ramp!r}")
        self.ramp = 1.0  # this epoch's warm-up factor of eps and beta (start_epoch)
        if not (callable(getattr(model, "features", None)) and callable(getattr(model, "logits_from_features", None))):
            raise UserError(
                f"defense {self.name!r}: incompatible architecture {type(model).__name__}: it needs features(x) "
                "(the latent) and logits_from_features(z); use a model of the zoo (e.g. --arch cnn-small)"
            )
        self.phi, self.phi_opt = None, None
        ref = next(model.parameters(), None)
        self.device = ref.device if ref is not None else torch.device("cpu")
        shape = getattr(model, "input_shape", None)
        if shape is not None:
            self._make_phi(self._probe(model, tuple(int(s) for s in shape)))

    def start_epoch(self, epoch: int, epochs: int) -> None:
        """The warm-up factor of 0-based ``epoch``: min(1, (epoch + 1) / ramp_epochs), 1 without a warm-up."""
        self.ramp = warmup_factor(epoch, int(self.params["ramp_epochs"]))

    def eps(self) -> float:
        """This epoch's adversarial radius: ε times the warm-up factor."""
        return float(self.params["eps"]) * self.ramp

    def _probe(self, model: nn.Module, shape: tuple[int, ...]) -> torch.Tensor:
        """Latent of a zero batch of two (eval mode, no gradient, the model's mode restored)."""
        ref = next(model.parameters(), None)
        dtype = ref.dtype if ref is not None and ref.is_floating_point() else torch.float32
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad():
                return self._latent(model, torch.zeros((2, *shape), device=self.device, dtype=dtype))
        finally:
            model.train(was_training)

    def _latent(self, model: nn.Module, x: torch.Tensor) -> torch.Tensor:
        z = cast(LatentModel, model).features(x)
        if not isinstance(z, torch.Tensor) or z.ndim != 2 or z.shape[0] != len(x):
            got = tuple(z.shape) if isinstance(z, torch.Tensor) else type(z).__name__
            raise UserError(
                f"defense {self.name!r}: incompatible architecture {type(model).__name__}: features(x) must return "
                f"a (N, d) latent, got {got}"
            )
        return z

    def _make_phi(self, z: torch.Tensor) -> None:
        """Create the linear potential R^d -> R on ``z``'s device and dtype, and its Adam optimiser."""
        self.phi = nn.Linear(z.shape[1], 1).to(device=z.device, dtype=z.dtype)
        self.phi_opt = torch.optim.Adam(self.phi.parameters(), lr=self.phi_lr)

    def _require_phi(self) -> tuple[nn.Linear, torch.optim.Adam]:
        if self.phi is None or self.phi_opt is None:
            raise RuntimeError("GOT potential used before setup / the first batch")
        return self.phi, self.phi_opt

    def mask(self, y: torch.Tensor) -> torch.Tensor | None:
        """The label-matching filter for a batch (clean and adversarial labels are both ``y``), or ``None`` (-S)."""
        return label_mask(y, y) if self.label_matching else None

    def potential(self, z: torch.Tensor) -> torch.Tensor:
        r""":math:`\varphi_w(z)` (n,) for latents ``z`` (n, d)."""
        return self._require_phi()[0](z).squeeze(-1)

    def phi_step(self, z: torch.Tensor, cost: torch.Tensor, mask: torch.Tensor | None) -> tuple[float, float]:
        r"""``phi_steps`` Adam steps of :math:`\varphi` ascending :math:`F_\theta` on detached ``z`` (n, d) and
        ``cost`` (n, m).

        Returns :math:`F_\theta` before the first and after the last step (floats).
        """
        if self.phi is None:
            self._make_phi(z.detach())
        phi, opt = self._require_phi()
        z, cost = z.detach(), cost.detach()
        params = list(phi.parameters())
        before = 0.0
        for k in range(int(self.params["phi_steps"])):
            value = semi_dual(self.potential(z), cost, self.theta, mask)
            if k == 0:
                before = value.item()
            grads = torch.autograd.grad(-value, params)
            for prm, g in zip(params, grads):
                prm.grad = g
            opt.step()
            for prm in params:
                prm.grad = None
        with torch.no_grad():
            after = semi_dual(self.potential(z), cost, self.theta, mask).item()
        return before, after

    def ot_term(
        self,
        z: torch.Tensor,
        logits: torch.Tensor,
        z_adv: torch.Tensor,
        logits_adv: torch.Tensor,
        y: torch.Tensor,
    ) -> torch.Tensor:
        r"""φ's ascent on this batch, then :math:`F_\theta` at the updated φ, its values held constant:
        differentiable in the model's outputs through the cost only (the envelope gradient, see :class:`GOT`).

        Computed in at least float32 with autocast off (under ``--amp`` the model's outputs may be float16, whose
        range the :math:`1/\theta` scaling and the log-sum-exp would strain).
        """
        dtype = torch.promote_types(z.dtype, torch.float32)
        with torch.autocast(device_type=z.device.type, enabled=False):
            z, logits, z_adv, logits_adv = (t.to(dtype) for t in (z, logits, z_adv, logits_adv))
            cost = got_cost(z, logits, z_adv, logits_adv, self.lam)
            mask = self.mask(y)
            self.phi_step(z, cost, mask)
            with torch.no_grad():
                phi = self.potential(z)
            return semi_dual(phi, cost, self.theta, mask)

    @abstractmethod
    def adversarial(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The adversarial batch (detached)."""

    @abstractmethod
    def task_loss(
        self, logits: torch.Tensor, logits_adv: torch.Tensor, y: torch.Tensor
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """The adversarial-training loss the OT term is added to, and its named parts."""

    def loss(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        x_adv = self.adversarial(model, x, y)
        z, z_adv = self._latent(model, x), self._latent(model, x_adv)
        head = cast(LatentModel, model).logits_from_features
        logits, logits_adv = head(z), head(z_adv)
        task, parts = self.task_loss(logits, logits_adv, y)
        w = self.ot_term(z, logits, z_adv, logits_adv, y)
        return task + self.beta * self.ramp * w, {**parts, "got_w": w.item()}

    def state_dict(self) -> dict[str, Any]:
        if self.phi is None or self.phi_opt is None:
            return {}
        return {"phi": self.phi.state_dict(), "phi_opt": self.phi_opt.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if "phi" not in state:
            return
        weight = state["phi"]["weight"]
        if self.phi is None:
            self._make_phi(torch.empty(0, weight.shape[1], dtype=weight.dtype, device=self.device))
        phi, opt = self._require_phi()
        if tuple(phi.weight.shape) != tuple(weight.shape):
            raise UserError(
                f"defense {self.name!r}: the saved potential has latent size {weight.shape[1]}, "
                f"the model {phi.weight.shape[1]}"
            )
        phi.load_state_dict(state["phi"])
        opt.load_state_dict(state["phi_opt"])


@register_defense
class GOTPGD(GOT):
    r"""GOT-PGD (the paper's Eq. 3 with App. A.3): :math:`\alpha\,\mathrm{CE}(f(x'), y) + c\,\mathrm{CE}(f(x), y) +
    \beta F_\theta`, :math:`x'` from L∞ PGD from a random start (:class:`~kit.defenses.madry.Madry`'s adversary).

    Eq. 3 weighs the adversarial CE by α = 1 and the clean CE by 1, but App. A.3 says that for MNIST and CIFAR "only
    the adversarial loss was used", so the default clean weight ``clean_weight`` is 0 (SVHN: α = 2,
    ``clean_weight = 0.5``). The adversary follows App. A.3: 20 steps of 2/255 at ε = 8/255 (``rel_step`` 0.25 keeps
    that ratio at other radii; MNIST: 40 steps of 0.01 at 0.3). ``label_matching=false`` is GOT-PGD-S,
    ``label_matching=true`` GOT-PGD-LM. See :class:`GOT` for the OT term and its parameters.
    """

    name = "got-pgd"
    description = "adversarial CE + beta * entropic OT between clean and PGD (latent, prediction) pairs (GOT-PGD)"
    defaults = {
        **Madry.defaults,
        "steps": 20,
        "rel_step": 0.25,
        "alpha": 1.0,
        "clean_weight": 0.0,
        **GOT.ot_defaults,
    }

    def setup(self, model: nn.Module) -> None:
        super().setup(model)
        self.alpha = _number(self.params, "alpha", self.name, 0.0, strict=False)
        self.clean_weight = _number(self.params, "clean_weight", self.name, 0.0, strict=False)
        self.madry = Madry(**{k: self.params[k] for k in Madry.defaults})
        self.madry.setup(model)

    def start_epoch(self, epoch: int, epochs: int) -> None:
        super().start_epoch(epoch, epochs)
        self.madry.adversary.eps = self.eps()  # the held-out adversarial accuracy follows the training radius

    def adversarial(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.madry.adversarial(model, x, y)

    def task_loss(
        self, logits: torch.Tensor, logits_adv: torch.Tensor, y: torch.Tensor
    ) -> tuple[torch.Tensor, dict[str, float]]:
        adv_ce = F.cross_entropy(logits_adv, y)
        parts = {"adv_ce": adv_ce.item()}
        loss = self.alpha * adv_ce
        if self.clean_weight > 0:
            ce = F.cross_entropy(logits, y)
            loss = loss + self.clean_weight * ce
            parts["ce"] = ce.item()
        return loss, parts


@register_defense
class GOTTrades(GOT):
    r"""GOT-TRADES (the paper's Eq. 4): :math:`\mathrm{CE}(f(x), y) + \alpha\,\mathrm{KL}(f(x) \,\|\, f(x')) +
    \beta F_\theta`, :math:`x'` from TRADES' KL adversary (:func:`kit.defenses.trades.kl_adversary`).

    α = 6 (App. A.3, MNIST and CIFAR; 3 for SVHN); the KL has TRADES' direction and batch mean (as
    :class:`~kit.defenses.trades.TRADES`). The adversary follows App. A.3: 20 steps of 2/255 at ε = 8/255
    (``rel_step`` 0.25), from TRADES' start :math:`x + 0.001\,\mathcal{N}(0, I)`, in eval mode.
    ``label_matching=false`` is GOT-TRADES-S, ``label_matching=true`` GOT-TRADES-LM. See :class:`GOT` for the OT term.
    """

    name = "got-trades"
    description = "clean CE + alpha * KL(clean || adv) + beta * entropic OT of (latent, prediction) pairs (GOT-TRADES)"
    defaults = {
        "eps": 8 / 255,
        "steps": 20,
        "rel_step": 0.25,
        "norm": "linf",
        "alpha": 6.0,
        **GOT.ot_defaults,
    }

    def setup(self, model: nn.Module) -> None:
        super().setup(model)
        self.alpha = _number(self.params, "alpha", self.name, 0.0, strict=False)

    def adversarial(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        p = self.params
        return kl_adversary(model, x, self.eps(), int(p["steps"]), float(p["rel_step"]), p["norm"])

    def task_loss(
        self, logits: torch.Tensor, logits_adv: torch.Tensor, y: torch.Tensor
    ) -> tuple[torch.Tensor, dict[str, float]]:
        ce, kl = F.cross_entropy(logits, y), kl_div_logits(logits, logits_adv)
        return ce + self.alpha * kl, {"ce": ce.item(), "kl": kl.item()}
