"""Wasserstein adversarial training (Wong, Schmidt & Kolter 2019; seed ``002_7913be17f57a5a98.txt``): the
projected-Sinkhorn adversary with a growing radius, trained on the first adversarial found."""

from __future__ import annotations

import math
import warnings
from enum import Enum
from typing import Any, cast

import torch
import torch.nn as nn
import torch.nn.functional as F

from kit.attacks.wasserstein import WassersteinPGD, WassersteinResult
from kit.defenses.base import Defense, register_defense, warmup_factor
from kit.errors import UserError
from kit.ot.projection import ProjectionConvergenceWarning


class Preset(str, Enum):
    """Which of the paper's two schedules (Appendix B, released scripts) fills ``eps0`` and ``eps_factor``."""

    AUTO = "auto"
    MNIST = "mnist"
    CIFAR = "cifar"


class Fallback(str, Enum):
    """What an example the attack never fooled is trained on."""

    LAST = "last"
    CLEAN = "clean"


#: (ε₀, growth factor) of the paper's training adversary, per dataset family.
PRESETS: dict[Preset, tuple[float, float]] = {Preset.MNIST: (0.1, 1.4), Preset.CIFAR: (0.01, 1.5)}


def schedule_cap(steps: int, eps0: float, eps_factor: float, eps_every: int) -> float:
    r"""The largest radius the growing schedule reaches in ``steps`` steps: :math:`\varepsilon_0 g^{\lfloor (T-1)/s
    \rfloor}`."""
    return float(eps0) * float(eps_factor) ** ((int(steps) - 1) // int(eps_every))


def radius_schedule(steps: int, eps0: float, eps_factor: float, eps_every: int, cap: float | None = None
                    ) -> list[float]:
    r"""Radius of the projection at each attack step :math:`t = 0, \dots, T-1` for an example not yet fooled.

    :math:`\varepsilon_t = \min(\varepsilon_0 g^{\lfloor t/s \rfloor}, \varepsilon_{\max})`, the schedule that
    :class:`~kit.attacks.wasserstein.WassersteinPGD` runs in its growing mode (``cap=None``: no cap).

    Returns
    -------
    list of float, length ``steps``
    """
    top = math.inf if cap is None else float(cap)
    return [min(float(eps0) * float(eps_factor) ** (t // int(eps_every)), top) for t in range(int(steps))]


def _positive(name: str, value: Any, low: float = 0.0) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= low:
        raise UserError(f"wat: {name} must be a finite number > {low:g}, got {value!r}")
    return float(value)


@register_defense
class WAT(Defense):
    r"""Wasserstein adversarial training (Wong, Schmidt & Kolter, "Wasserstein adversarial examples via projected
    Sinkhorn iterations", ICML 2019; seed ``002_7913be17f57a5a98.txt``: Algorithm 1, §5.1 and §5.2 "Adversarial
    training").

    The paper trains on adversarial examples from projected gradient descent on the Wasserstein ball
    (:class:`~kit.attacks.wasserstein.WassersteinPGD`: an L-inf steepest-ascent step, then projected Sinkhorn), with
    "a weaker adversary [of] 50 iterations" whose radius is let "grow within a range", training "on the first
    adversarial example found (essentially a budget version of the attack used at test time)" (§5.1). The numbers of
    that schedule are in the paper's Appendix B, which the seed file does not contain; they are taken from the
    authors' released training scripts (``adv_training_mnist.py`` and ``adv_training_cifar.py`` of
    ``locuslab/projected_sinkhorn``):

    ========  ========  ======  =======  =====  =========  ==================  ==========
    data      start ε₀  growth  every    steps  step (L∞)  largest radius      λ (paper)
    ========  ========  ======  =======  =====  =========  ==================  ==========
    MNIST     0.1       x 1.4   5 steps  50     0.1        0.1·1.4⁹ ≈ 2.066    1000
    CIFAR-10  0.01      x 1.5   5 steps  50     0.1        0.01·1.5⁹ ≈ 0.3844  3000
    ========  ========  ======  =======  =====  =========  ==================  ==========

    The radius of the projection at attack step :math:`t = 0, \dots, T-1`, for an example not yet fooled, is

    .. math::

        \varepsilon_t = \min\big(\varepsilon_0\, g^{\lfloor t / s \rfloor},\ \varepsilon_{\max}\big)

    (:func:`radius_schedule`; g the growth, s the steps between growths), and the loss is the cross-entropy on the
    first adversarial found, :math:`\min_\theta \mathbb{E}\,\ell_{CE}(f_\theta(x^{adv}), y)` (Algorithm 1). Radii are
    in the unit-mass scale of :mod:`kit.ot.local` (moving all of an image's mass by one pixel costs 1), the paper's.

    Choices (also in ``docs/defenses.md``):

    - **Examples never fooled** (``fallback``). The paper does not say. The released code keeps, for the whole
      batch, its state at the last step where the batch's error count rose, so an example never fooled is trained
      on an intermediate PGD iterate, not on the clean image. ``"last"`` (default) trains it on its final iterate
      (the strongest point within the budget: the attack's ``x_last``); ``"clean"`` on the clean image (the attack's
      ``x_adv``). Examples misclassified clean are trained clean under both (their first adversarial is themselves).
    - **Cap.** The released code has no cap besides the 50 steps; ``eps=None`` (default) caps at the largest radius
      the schedule reaches, :math:`\varepsilon_0 g^{\lfloor (T-1)/s\rfloor}`, so the cap never binds. A number caps
      lower.
    - **Ramp over training** (``ramp_epochs``; ours, off by default). The cap grows linearly over the first
      ``ramp_epochs`` epochs, :math:`\varepsilon_{\max}(e) = \varepsilon_{\max}\min(1, (e+1)/R)` for 0-based epoch
      e: a pure function of the epoch, set by :meth:`start_epoch` (which the trainer calls before every epoch,
      resumed or not), so ``--resume`` stays exact. The paper does not ramp across epochs: its schedule restarts
      from ε₀ in every attack.
    - **Regularisation.** The kit's projection scales λ with each image's mass (``reg`` per unit mass; box-aware and
      mass-preserving, :mod:`kit.ot.projection`). The paper's λ = 1000 on MNIST (mass about 100) is ``reg`` about
      10, its 3000 on CIFAR-10 about 2; the default ``reg=100`` is the kit attack's (a sharper projection that spends
      the budget on real transport; measured stronger on digits, see :class:`~kit.attacks.wasserstein.WassersteinPGD`).
    - **Local plans** 5 x 5, Euclidean pixel distance: the paper's cost (§5 "Hyperparameters", the 1-Wasserstein
      distance). The released training scripts default to ``--p 2``, which in their code's convention (the exponent
      of the *squared* distance) is the squared Euclidean cost; the kit follows the paper.
    - **Model mode.** The adversary runs with the model in eval mode by default (``attack_eval_mode``), as the kit's
      other defenses; the released scripts attack in train mode (only the CIFAR ResNet has batch norm).
    - **Preset.** ``preset="auto"`` takes the CIFAR numbers for 3-channel inputs and the MNIST numbers otherwise;
      ``eps0`` and ``eps_factor`` given explicitly override the preset. The resolved values are recorded in the
      run's configuration.

    The released scripts' optimiser: SGD, lr 0.1, momentum 0.9, weight decay 5e-4, batch 128, constant learning rate
    (``--lr 0.1 --batch-size 128 --schedule constant``), random crop and flip on CIFAR-10 (``--augment auto``).

    Parameters
    ----------
    preset : {"auto", "mnist", "cifar"}
    eps0, eps_factor : float or None
        ε₀ and the growth factor (None: the preset's).
    eps_every : int
        Steps between two growths (5).
    steps : int
        Attack steps T (50).
    eps : float or None
        Cap of the radius (None: the largest radius the schedule reaches).
    ramp_epochs : int
        Epochs over which the cap ramps up linearly (0: no ramp, as the paper).
    step : float
        L-inf step of the steepest ascent, in pixels (0.1, the released scripts' ``alpha``).
    reg, proj_iter, kernel_size : float, int, int
        Projection regularisation (per unit mass), iterations per projection, local window.
    fallback : {"last", "clean"}
        What examples never fooled are trained on (above).
    attack_eval_mode : bool
        Craft the adversaries in eval mode (True) or train mode (False).
    """

    name = "wat"
    description = "CE on the first projected-Sinkhorn adversarial, radius growing per attack (Wong et al. 2019)"
    defaults = {"preset": Preset.AUTO.value, "eps0": None, "eps_factor": None, "eps_every": 5,
                "steps": 50, "eps": None, "ramp_epochs": 0, "step": 0.1, "reg": 100.0, "proj_iter": 50,
                "kernel_size": 5, "fallback": Fallback.LAST.value, "attack_eval_mode": True}

    def setup(self, model: nn.Module) -> None:
        p = self.params
        try:
            Preset(p["preset"])
        except ValueError:
            known = ", ".join(v.value for v in Preset)
            raise UserError(f"wat: unknown preset {p['preset']!r}; known: {known}") from None
        try:
            self.fallback = Fallback(p["fallback"])
        except ValueError:
            known = ", ".join(v.value for v in Fallback)
            raise UserError(f"wat: unknown fallback {p['fallback']!r}; known: {known}") from None
        ramp = p["ramp_epochs"]
        if isinstance(ramp, bool) or not isinstance(ramp, int) or ramp < 0:
            raise UserError(f"wat: ramp_epochs must be an integer >= 0, got {ramp!r}")
        if p["eps"] is not None:
            p["eps"] = _positive("eps", p["eps"])
        self.model = model
        self.adversary: WassersteinPGD | None = None
        self._cap_scale = 1.0
        shape = getattr(model, "input_shape", None)
        if shape is not None:
            self._resolve(int(shape[0]))

    # -- the schedule ---------------------------------------------------------------------------------------------

    def _resolve(self, channels: int) -> WassersteinPGD:
        """Fill ``eps0`` and ``eps_factor`` from the preset; build and return the adversary."""
        p = self.params
        preset = Preset(p["preset"])
        if preset is Preset.AUTO:
            preset = Preset.CIFAR if channels == 3 else Preset.MNIST
        eps0, factor = PRESETS[preset]
        p["eps0"] = _positive("eps0", eps0 if p["eps0"] is None else p["eps0"])
        p["eps_factor"] = _positive("eps_factor", factor if p["eps_factor"] is None else p["eps_factor"], 1.0)
        p["preset"] = preset.value
        self.adversary = WassersteinPGD(
            self.model, eps=self.cap(), steps=p["steps"], step=p["step"], eps0=p["eps0"], eps_factor=p["eps_factor"],
            eps_every=p["eps_every"], kernel_size=p["kernel_size"], reg=p["reg"], proj_iter=p["proj_iter"],
            early_stop=True)
        self.adversary.eval_mode = bool(p["attack_eval_mode"])
        return self.adversary

    def full_cap(self) -> float:
        """The cap once any ramp is over: ``eps``, or else the largest radius the schedule reaches."""
        p = self.params
        if p["eps"] is not None:
            return float(p["eps"])
        return schedule_cap(p["steps"], p["eps0"], p["eps_factor"], p["eps_every"])

    def cap(self) -> float:
        """The cap in force this epoch: :meth:`full_cap` times the ramp factor."""
        return self.full_cap() * self._cap_scale

    def start_epoch(self, epoch: int, epochs: int) -> None:
        r"""Set this epoch's cap: ramp factor :math:`\min(1, (e+1)/R)` for 0-based ``epoch`` (1 without a ramp)."""
        self._cap_scale = warmup_factor(epoch, int(self.params["ramp_epochs"]))
        if self.adversary is not None:
            self.adversary.eps = self.cap()  # the trainer's held-out evaluation copies the adversary as it is

    def radii(self) -> list[float]:
        """This epoch's radius at each attack step (:func:`radius_schedule` with the current cap)."""
        p = self.params
        return radius_schedule(p["steps"], p["eps0"], p["eps_factor"], p["eps_every"], self.cap())

    # -- the adversary and the loss -------------------------------------------------------------------------------

    def adversarial(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor
                    ) -> tuple[torch.Tensor, WassersteinResult]:
        """The batch to train on (N, C, H, W), each example's first adversarial or its fallback, and the result.

        The projections' convergence warnings are silenced (the result counts their iterations): with ``proj_iter``
        iterations per step the outputs are feasible whatever the convergence.
        """
        adversary = self.adversary if self.adversary is not None else self._resolve(int(x.shape[1]))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ProjectionConvergenceWarning)
            res = cast(WassersteinResult, adversary(x, y, eps=self.cap()))
        if self.fallback is Fallback.LAST and res.x_last is not None:
            return res.x_last.detach(), res
        return res.x_adv.detach(), res

    def loss(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        x_train, res = self.adversarial(model, x, y)
        ce = F.cross_entropy(model(x_train), y)
        # logged: the fraction trained on an adversarial (incl. misclassified clean) and this epoch's cap
        return ce, {"adv_ce": ce.item(), "adv_found": res.success.float().mean().item(), "eps_cap": self.cap()}
