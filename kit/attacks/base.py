"""The thin base every attack stands on.

The base owns what all attacks share: input validation (shape, range [0, 1], finite values, epsilon >= 0, labels),
device and dtype (taken from the inputs; the model must live on the same device), switching the model to eval mode and
restoring its mode afterwards, per-example epsilons, warm starts, and ``__repr__``. A subclass writes only
:meth:`Attack._run`.

Epsilon may differ per example: ``attack(x, y, eps=tensor_of_shape_N)``. The minimum-epsilon search relies on this to
bisect every example on its own interval in one batch.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, ClassVar

import torch
import torch.nn as nn
import torch.nn.functional as F

from kit.errors import UserError
from kit.runtime import model_tensor


class Norm(str, Enum):
    """Threat models: the L-infinity and L2 balls, and the Wasserstein ball of :mod:`kit.ot` (local transport on
    images normalised to unit mass per example; see :mod:`kit.ot.local`)."""

    LINF = "linf"
    L2 = "l2"
    WASSERSTEIN = "wasserstein"


LP_NORMS = (Norm.LINF, Norm.L2)


def as_norm(norm: Norm | str, allowed: tuple[Norm, ...] = LP_NORMS) -> Norm:
    """Parse a norm name among ``allowed``; anything else is a :class:`UserError`."""
    try:
        parsed = Norm(norm)
    except ValueError:
        parsed = None
    if parsed not in allowed:
        raise UserError(f"unknown norm {norm!r}; known here: {', '.join(n.value for n in allowed)}")
    return parsed


def require_counts(low: int = 1, **counts: Any) -> None:
    """Refuse any of ``counts`` (name = value) that is not an integer >= ``low`` (bools are not counts).

    Raises
    ------
    UserError
        Naming the first offending parameter and its value.
    """
    for name, v in counts.items():
        if isinstance(v, bool) or not isinstance(v, int) or v < low:
            raise UserError(f"{name} must be an integer >= {low}, got {v!r}")


def lp_norm(delta: torch.Tensor, norm: Norm | str) -> torch.Tensor:
    """Per-example L-inf or L2 norm of a batch of perturbations (N, ...) -> (N,).

    A Wasserstein distance is not a norm of the difference: Wasserstein attacks report the cost of their transport
    plan instead, and asking for it here is a bug.
    """
    norm = Norm(norm)
    if norm not in LP_NORMS:
        raise ValueError(f"lp_norm is defined for {[n.value for n in LP_NORMS]}, not {norm.value!r}")
    flat = delta.flatten(1)
    return flat.abs().amax(1) if norm is Norm.LINF else flat.norm(dim=1)


def expand_as_batch(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """View a per-example vector (N,) as (N, 1, 1, ...) to broadcast against ``like`` (N, ...)."""
    return v.view(-1, *([1] * (like.dim() - 1)))


def project(delta: torch.Tensor, eps: torch.Tensor, norm: Norm) -> torch.Tensor:
    """Project perturbations (N, ...) onto the ``norm`` balls of per-example radii ``eps`` (N,)."""
    e = expand_as_batch(eps, delta)
    if norm is Norm.LINF:
        return torch.maximum(torch.minimum(delta, e), -e)
    n = expand_as_batch(delta.flatten(1).norm(dim=1).clamp_min(1e-12), delta)
    return delta * (e / n).clamp(max=1.0)


def margin_loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    r"""Per-example margin :math:`\max_{j \ne y} z_j - z_y` (positive exactly when misclassified)."""
    true = logits.gather(1, y[:, None]).squeeze(1)
    other = logits.masked_fill(F.one_hot(y, logits.shape[1]).bool(), float("-inf")).amax(1)
    return other - true


def dlr_loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    r"""Difference of Logits Ratio (Croce & Hein, ICML 2020), to be maximised.

    :math:`\mathrm{DLR}(z, y) = -\dfrac{z_y - \max_{i \ne y} z_i}{z_{\pi_1} - z_{\pi_3} + 10^{-12}}`,
    with :math:`\pi` the logits sorted in decreasing order. Invariant to shifting and scaling the logits.
    """
    srt = logits.sort(dim=1, descending=True).values
    return margin_loss(logits, y) / (srt[:, 0] - srt[:, 2] + 1e-12)


def ce_loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-example cross-entropy (to be maximised by an untargeted attack)."""
    return F.cross_entropy(logits, y, reduction="none")


LOSSES = {"ce": ce_loss, "margin": margin_loss, "dlr": dlr_loss}


_INPUT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def model_verdict(logits: torch.Tensor, y: torch.Tensor, targeted: bool = False) -> torch.Tensor:
    """The model's own verdict from its logits (N, K): fooled where the argmax is not ``y`` (is ``y``, targeted)."""
    pred = logits.argmax(1)
    return pred == y if targeted else pred != y


class RowJudge(ABC):
    """A judge told which example of the attack call each candidate belongs to.

    :meth:`Attack._fooled` calls :meth:`judge_rows` instead of ``judge(x, y)`` when the attack's :attr:`Attack.judge`
    is one. The minimum-epsilon search (:func:`kit.attacks.search.judged_search`) sets one to judge every candidate
    for several sides at once (the twin and the engine of an audit), keeping each side's own smallest adversarial.
    """

    @abstractmethod
    def judge_rows(self, x: torch.Tensor, y: torch.Tensor, logits: torch.Tensor, rows: torch.Tensor,
                   size: torch.Tensor | None) -> torch.Tensor:
        """Verdicts (M,) bool on candidates ``x`` (M, C, H, W) of labels ``y`` (M,), with the attacked model's
        ``logits`` (M, K) on them, for the examples ``rows`` (M,) of the call; ``size`` (M,) their Wasserstein costs
        (``None`` for an Lp attack). ``True`` ends the attack on that example."""


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
    x_last : (N, C, H, W) tensor, optional
        The final iterate of each example (its adversarial where one was found): a warm start for a larger epsilon.
    """

    x_adv: torch.Tensor
    success: torch.Tensor
    norm: torch.Tensor
    forwards: torch.Tensor
    backwards: torch.Tensor
    x_last: torch.Tensor | None = None
    #: The attacked model's logits on the clean inputs (N, K), where the attack computed or was given them: a caller
    #: that calls again on the same examples passes them back (``clean_logits=``) to spare the clean forward pass.
    clean_logits: torch.Tensor | None = field(default=None, kw_only=True)

    @property
    def robust_accuracy(self) -> float:
        """Fraction of examples the attack did not fool."""
        return 1.0 - self.success.float().mean().item()


class Attack(ABC):
    """Base class. Subclasses set ``self.norm`` and implement ``_run(x, y, eps, init) -> AttackResult``.

    Parameters
    ----------
    model : nn.Module
        Returns logits for pixels in [0, 1].
    eps : float
        Default radius, used when a call gives none. Minimum-norm attacks (``minimum_norm = True``) treat it as an
        optional cap and accept ``inf``.
    """

    minimum_norm: ClassVar[bool] = False
    norm: Norm
    #: Run the model in eval mode while attacking (the default, for evaluation). A defense may set it to False to
    #: craft its training adversaries in train mode, as the released SAT code does.
    eval_mode: bool = True
    #: Targeted attacks set it: ``y`` then holds target classes and success means predicting them.
    targeted: bool = False
    #: Who decides that a candidate is adversarial: ``None`` for the attacked model itself (its argmax), or a callable
    #: ``judge(x, y) -> (N,) bool`` called on every candidate the attack checks. The audit sets it to the deployed
    #: engine's verdict, so candidates crafted with the twin's gradients count only when the engine is fooled.
    judge: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | RowJudge | None = None
    #: Clean logits handed in by the caller for the current call (see :meth:`__call__`), and those the current call
    #: computed or was given (returned in :attr:`AttackResult.clean_logits`).
    _clean_given: torch.Tensor | None = None
    _clean_seen: torch.Tensor | None = None

    def __init__(self, model: nn.Module, eps: float = 0.0) -> None:
        self.model = model
        self.eps = self._check_eps(eps)

    def _check_eps(self, eps: float) -> float:
        if isinstance(eps, bool) or not isinstance(eps, (int, float)) or math.isnan(eps) or eps < 0:
            raise UserError(f"epsilon must be a number >= 0, got {eps!r}")
        if math.isinf(eps) and not self.minimum_norm:
            raise UserError(f"{type(self).__name__} needs a finite epsilon")
        return float(eps)

    def _fooled(self, logits: torch.Tensor, y: torch.Tensor, x: torch.Tensor, rows: torch.Tensor | None = None,
                size: torch.Tensor | None = None) -> torch.Tensor:
        """Per example, whether candidate ``x`` (with the model's ``logits`` on it) is adversarial for label ``y``.

        Every attack decides success here, so that :attr:`judge` can replace the model's own verdict. ``rows`` (M,)
        says which examples of the call the M candidates belong to (positions in the call's ``x``), and ``size`` (M,)
        the candidates' Wasserstein costs (a Wasserstein attack's transport plans; an Lp size is measured by whoever
        needs it): a :class:`RowJudge` needs them, and every fixed-budget attack gives them.
        """
        if isinstance(self.judge, RowJudge):
            if rows is None:
                raise RuntimeError(f"{type(self).__name__} does not tell its judge which example each candidate is")
            return self.judge.judge_rows(x.detach(), y, logits.detach(), rows, size)
        if self.judge is not None:
            return self.judge(x.detach(), y).to(device=y.device, dtype=torch.bool)
        return model_verdict(logits, y, self.targeted)

    def _clean_check(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
        """The clean logits, which examples are fooled clean, and the forward passes spent (per example).

        With ``clean_logits`` given to the call, nothing is run: the caller has checked that no example of the call
        is fooled clean (by this attack's own verdict, judge included).
        """
        n = x.shape[0]
        if self._clean_given is not None:
            self._clean_seen = self._clean_given
            return self._clean_given, torch.zeros(n, dtype=torch.bool, device=x.device), 0
        with torch.no_grad():
            logits = self.model(x)
        self._clean_seen = logits.detach()
        return logits, self._fooled(logits, y, x, rows=torch.arange(n, device=x.device)), 1

    def _params(self) -> dict[str, Any]:
        """Parameters shown by ``__repr__`` (subclasses extend)."""
        return {"eps": self.eps, "norm": self.norm.value}

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self._params().items())
        return f"{type(self).__name__}({args})"

    def _validate(self, x: torch.Tensor, y: torch.Tensor) -> None:
        if not isinstance(x, torch.Tensor) or x.dim() != 4:
            raise UserError(f"inputs must be a (N, C, H, W) tensor, got shape {tuple(getattr(x, 'shape', ()))}")
        if x.dtype not in _INPUT_DTYPES:  # float8 has no arithmetic to attack with
            raise UserError(f"inputs must be float16, bfloat16, float32 or float64 in [0, 1], got {x.dtype}")
        if x.numel():
            # one pass and one read-back: NaN and infinities fail the range test too
            lo, hi = torch.stack(torch.aminmax(x.detach())).tolist()
            if not (lo >= 0 and hi <= 1):
                if not torch.isfinite(x).all():
                    raise UserError("inputs contain NaN or infinite values")
                raise UserError(f"inputs must lie in [0, 1], got [{lo:.4g}, {hi:.4g}]")
        if not isinstance(y, torch.Tensor) or y.shape != (x.shape[0],) or y.is_floating_point():
            raise UserError(f"labels must be an integer tensor of shape ({x.shape[0]},)")
        p = model_tensor(self.model)
        if p is not None and p.device != x.device:
            raise UserError(f"model is on {p.device} but inputs are on {x.device}")

    def _eps_vector(self, eps: float | torch.Tensor | None, x: torch.Tensor) -> torch.Tensor:
        if eps is None:
            eps = self.eps
        if isinstance(eps, torch.Tensor):
            if eps.shape != (x.shape[0],):
                raise UserError(f"per-example epsilon must have shape ({x.shape[0]},), got {tuple(eps.shape)}")
            if torch.isnan(eps).any() or (eps < 0).any() or (not self.minimum_norm and torch.isinf(eps).any()):
                raise UserError("epsilon must be >= 0 (and finite for fixed-budget attacks)")
            return eps.to(device=x.device, dtype=x.dtype)
        return torch.full((x.shape[0],), self._check_eps(eps), device=x.device, dtype=x.dtype)

    def __call__(
        self,
        x: torch.Tensor,
        y: torch.Tensor,
        *,
        eps: float | torch.Tensor | None = None,
        init: torch.Tensor | None = None,
        clean_logits: torch.Tensor | None = None,
    ) -> AttackResult:
        """Attack ``x`` (N, C, H, W) in [0, 1] with true labels ``y`` (N,).

        Parameters
        ----------
        eps : float or (N,) tensor, optional
            Radius per call or per example; default the constructor's.
        init : (N, C, H, W) tensor, optional
            Warm start (e.g. the adversarial found at a smaller epsilon); projected into the ball before use.
        clean_logits : (N, K) tensor, optional
            The model's logits on ``x`` (:attr:`AttackResult.clean_logits` of an earlier call) for examples the caller
            knows are not fooled clean (an earlier call on them did not find them fooled clean): the attack skips its
            clean check. The minimum-epsilon search passes them, so that its ~20 calls per example check once.
        """
        self._validate(x, y)
        eps_v = self._eps_vector(eps, x)
        if init is not None:
            if init.shape != x.shape:
                raise UserError(f"init must have the inputs' shape {tuple(x.shape)}, got {tuple(init.shape)}")
            init = init.detach().to(device=x.device, dtype=x.dtype)
        if clean_logits is not None and (clean_logits.dim() != 2 or clean_logits.shape[0] != x.shape[0]):
            raise UserError(f"clean_logits must be (N, K) with N = {x.shape[0]}, got {tuple(clean_logits.shape)}")
        was_training = self.model.training
        self.model.train(not self.eval_mode)
        self._clean_given, self._clean_seen = clean_logits, None
        try:
            with torch.enable_grad():
                res = self._run(x.detach(), y.to(x.device), eps_v, init)
            if res.clean_logits is None:
                res.clean_logits = self._clean_seen
            return res
        finally:
            self._clean_given = self._clean_seen = None
            self.model.train(was_training)

    @abstractmethod
    def _run(self, x: torch.Tensor, y: torch.Tensor, eps: torch.Tensor, init: torch.Tensor | None) -> AttackResult:
        """The algorithm. ``x`` is detached and validated, ``eps`` is (N,) on x's device and dtype, ``init`` is None
        or a warm start of x's shape; the model is in eval mode and gradients are enabled."""
