r"""Differential attack: adversarials that fool the deployed engine and not its twin (DIVA, Hao et al., MLSys 2022).

A twin-guided attack follows the twin's gradients, so it finds a weakness that exists only in the engine (int8
rounding, float16 overflow) only by chance. This attack follows the gradients of two models at once: the twin (the
float model the engine was exported from, ``model`` as for every attack) and a *replica*, a differentiable model of
the engine's own arithmetic, and it searches for inputs on which the two disagree (Hao et al., "A Tale of Two Models:
Constructing Evasive Attacks on Edge Models", MLSys 2022, arXiv 2204.10933).

Replicas
--------
The attack takes any ``nn.Module`` as the replica; it knows nothing of engines (the layering forbids it). Two are at
hand:

* int8 Q/DQ ONNX files: ``kit.twins.from_onnx.OnnxModule(proto, fake_quant=True)`` (or ``onnx_to_torch(path,
  fake_quant=True)``), which keeps every QuantizeLinear -> DequantizeLinear pair as fake quantisation (the engine's
  rounding and saturation forward, the clipped straight-through gradient backward);
* fp16 engines: the twin run in half precision, :class:`HalfPrecision` (``HalfPrecision(twin)``: a copy of the twin
  in float16, fed float16 inputs, logits back in float32), for twins that compute in their weights' dtype (the zoo's
  models; not an ``OnnxModule``, which always computes in float32).

Judging
-------
Success is decided as in :class:`kit.attacks.base.Attack`: a candidate counts when the judged model predicts
another class than ``y``. Without :attr:`~kit.attacks.base.Attack.judge` the judged model is the *replica* (the
model this attack is after); the audit sets ``judge`` to the real engine's verdict, as for every attack. With
``evasive=True`` (the default, DIVA's own success criterion) a candidate also needs the twin to still predict ``y``,
so every adversarial returned is engine-only; :func:`engine_only` counts those of any attack.

Using it in an audit
--------------------
Build the replica from the engine's file (``onnx_to_torch(path, fake_quant=True)`` for int8 Q/DQ,
``HalfPrecision(twin)`` for fp16; the twin itself for fp32, where the attack has nothing to find), make the attack on
the twin with ``replica=`` and ``judge`` = the engine's verdict, and run it through
:func:`kit.attacks.search.min_eps_search` like PGD: ``steps=20`` per rung (two forward and two backward passes per
step, one of each network). Its eps* is the radius of the smallest engine-only adversarial found.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from kit.attacks.base import Attack, AttackResult, Norm, as_norm, lp_norm, margin_loss, project, require_counts
from kit.attacks.pgd import random_in_ball, steepest_step
from kit.errors import UserError
from kit.runtime import model_tensor

__all__ = ["OBJECTIVES", "Differential", "HalfPrecision", "differential_objective", "engine_only"]

#: the objectives :class:`Differential` maximises (see its docstring)
OBJECTIVES = ("margin", "diva", "ce")


def differential_objective(name: str, twin_logits: torch.Tensor, replica_logits: torch.Tensor, y: torch.Tensor,
                           c: float = 1.0) -> torch.Tensor:
    """Per-example objective (N,) that :class:`Differential` maximises (``name`` in :data:`OBJECTIVES`)."""
    if name == "margin":
        return margin_loss(replica_logits, y) - c * F.relu(margin_loss(twin_logits, y))
    if name == "diva":
        p_twin = twin_logits.softmax(1).gather(1, y[:, None]).squeeze(1)
        p_replica = replica_logits.softmax(1).gather(1, y[:, None]).squeeze(1)
        return p_twin - c * p_replica
    if name == "ce":
        return (F.cross_entropy(replica_logits, y, reduction="none")
                - c * F.cross_entropy(twin_logits, y, reduction="none"))
    raise ValueError(f"unknown objective {name!r}")


class Differential(Attack):
    r"""Projected gradient ascent on the disagreement between the twin and a replica of the engine.

    Per example, with :math:`f` the twin, :math:`g` the replica, :math:`m_h(x) = \max_{j \ne y} h(x)_j - h(x)_y` the
    margin of model :math:`h` (positive exactly when it is wrong) and :math:`p_h(y \mid x) = \mathrm{softmax}(h(x))_y`,
    the attack maximises :math:`L(x')` over :math:`\|x' - x\| \le \varepsilon`, :math:`x' \in [0, 1]^d`, for one of:

    * ``objective="diva"``: DIVA's loss as the authors define and run it (Hao et al. 2022; their code maximises
      ``loss1 - c * loss2``, the full-precision and the quantised model's softmax outputs at the true class, with
      ``c = 1``):

      .. math:: L_\mathrm{diva}(x') = p_f(y \mid x') - c \, p_g(y \mid x').

      Bounded in :math:`[-c, 1]`, it rewards lowering the replica's confidence only while the twin's stays high.
    * ``objective="ce"``: :math:`L_\mathrm{ce}(x') = \mathrm{CE}(g(x'), y) - c \, \mathrm{CE}(f(x'), y)`, the same
      trade-off on log-probabilities (:math:`\log p_f - \log p_g` at :math:`c = 1`).
    * ``objective="margin"`` (the default):

      .. math:: L_\mathrm{margin}(x') = m_g(x') - c \, \max(m_f(x'), 0),

      at :math:`c = 1` the same as :math:`\min(m_g(x'),\, m_g(x') - m_f(x'))`: PGD on the replica's margin while the
      twin is right, and on the gap between the two margins once the twin would be wrong. It drives the iterate to
      the twin's decision boundary and holds it there, where the smallest disagreement of the two models is enough
      to fool the engine alone.

    Why ``margin`` is the default: the engine of an int8 or fp16 export differs from its twin by rounding, a logit
    gap of a few hundredths to tenths (see ``kit.twins.from_onnx``). With :math:`c = 1`, :math:`L_\mathrm{diva}` and
    :math:`L_\mathrm{ce}` have the gradient :math:`\nabla p_f - \nabla p_g` (or of the log-probabilities), which is
    that small gap's gradient alone wherever the two models agree, so the ascent never nears the decision boundary
    and finds nothing at small radii; a larger :math:`c` turns them into PGD on the replica, which stops at the first
    point that fools both. Measured when this was written on the cnn-small of ``tests/test_differential.py``
    (trained 3 epochs on digits:16) and its int8 export, 236 test digits both get right, 20 steps, judged by ONNX
    Runtime on the file; engine-only adversarials at L-inf 0.01 / 0.02 / 0.03 / 0.05: PGD on the twin 6 / 8 / 8 / 14,
    ``diva`` (c = 1) 0 / 0 / 1 / 2, ``diva`` (c = 3) 6 / 8 / 5 / 10, ``ce`` (c = 1) 0 / 3 / 3 / 3, ``ce``
    (c = 0.5) 3 / 6 / 6 / 7, ``margin`` (c = 1) 5 / 16 / 20 / 30 (and 4 / 7 / 11 / 11 with ``evasive=False``).
    At 0.01, about one step of the engine's input quantisation, gradients say little and it is a draw.

    Each step is the steepest ascent step of length ``rel_step * eps`` in the threat norm (the sign of the gradient in
    L-inf, as DIVA, the normalised gradient in L2), then the projection onto the ball and the clip to
    :math:`[0, 1]` (the loop of :class:`kit.attacks.pgd.PGD`). The first iterate is ``x`` itself (DIVA starts from
    the clean input, where the twin is right), or ``init`` (projected) when a call gives one; restarts after the
    first start from uniform random points of the ball. An example leaves the batch as soon as a candidate succeeds:
    the judged model (``judge``, else the replica) predicts another class than ``y`` and, with ``evasive`` (the
    default, DIVA's criterion), the twin still predicts ``y``. So the attack plugs into
    :func:`kit.attacks.search.min_eps_search` like PGD (a fixed budget of ``steps`` per rung, per-example radii,
    warm starts), and with ``evasive`` its eps* is the radius of the smallest *engine-only* adversarial found (an
    example the twin gets wrong clean is never a success then).

    Cost: ``forwards`` and ``backwards`` count the passes of both networks (each iterate costs two of each); the
    engine's passes, when it judges, are the judge's to count.

    Parameters
    ----------
    model : nn.Module
        The twin: logits for pixels in [0, 1].
    replica : nn.Module
        A differentiable model of the engine (logits for the same pixels), on the inputs' device; put in eval mode
        during the attack (its mode restored after).
    eps : float
        Default radius (in [0, 1] pixel units); a call may pass a per-example tensor instead.
    norm : {"linf", "l2"}
    steps : int
        Gradient steps per restart (every iterate, the last included, is checked).
    rel_step : float, optional
        Step length as a fraction of epsilon; default ``2.5 / steps`` (DIVA: 1/255 at 8/255 over 20 steps, 1/8).
    c : float
        The trade-off (>= 0): the weight of the twin's penalty for ``margin`` and ``ce``, of the replica's term for
        ``diva`` (the paper's ``c``).
    objective : {"margin", "diva", "ce"}
    restarts : int
        Independent runs for the examples not yet successful; the first starts from ``x`` (or ``init``).
    evasive : bool
        Count a candidate only when the twin still predicts ``y`` (every adversarial returned is then engine-only,
        as far as the judge and the twin say); ``False`` counts any candidate that fools the judged model, as
        :class:`~kit.attacks.pgd.PGD` does.
    seed : int
        Seeds the random starts of the restarts (on the inputs' device).
    """

    def __init__(
        self,
        model: nn.Module,
        replica: nn.Module,
        eps: float = 0.0,
        norm: Norm | str = Norm.LINF,
        steps: int = 20,
        rel_step: float | None = None,
        c: float = 1.0,
        objective: str = "margin",
        restarts: int = 1,
        evasive: bool = True,
        seed: int = 0,
    ) -> None:
        self.norm = as_norm(norm)
        super().__init__(model, eps)
        if not isinstance(replica, nn.Module):
            raise UserError(f"the replica must be a torch module, got {type(replica).__name__}")
        require_counts(steps=steps, restarts=restarts)
        if objective not in OBJECTIVES:
            raise UserError(f"unknown objective {objective!r}; known: {', '.join(OBJECTIVES)}")
        if isinstance(c, bool) or not isinstance(c, (int, float)) or not c >= 0 or c == float("inf"):
            raise UserError(f"c must be a finite number >= 0, got {c!r}")
        self.replica = replica
        self.steps, self.restarts, self.objective, self.c = int(steps), int(restarts), objective, float(c)
        self.evasive, self.seed = bool(evasive), int(seed)
        self.rel_step = float(rel_step) if rel_step is not None else 2.5 / self.steps
        if not self.rel_step > 0:
            raise UserError(f"rel_step must be positive, got {rel_step}")

    def _params(self) -> dict[str, Any]:
        return {**super()._params(), "steps": self.steps, "rel_step": self.rel_step, "c": self.c,
                "objective": self.objective, "restarts": self.restarts, "evasive": self.evasive}

    def _validate(self, x: torch.Tensor, y: torch.Tensor) -> None:
        super()._validate(x, y)
        p = model_tensor(self.replica)
        if p is not None and p.device != x.device:
            raise UserError(f"replica is on {p.device} but inputs are on {x.device}")

    def _success(self, twin_logits: torch.Tensor, replica_logits: torch.Tensor, y: torch.Tensor,
                 x: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        if not self.evasive:
            return self._fooled(replica_logits, y, x, rows=rows)
        right = twin_logits.argmax(1) == y
        fooled = torch.zeros_like(right)
        if right.any():  # the judge (the engine, in an audit) sees only the candidates the twin gets right
            fooled[right] = self._fooled(replica_logits[right], y[right], x[right], rows=rows[right])
        return fooled

    def _run(self, x: torch.Tensor, y: torch.Tensor, eps: torch.Tensor, init: torch.Tensor | None) -> AttackResult:
        was_training = self.replica.training
        self.replica.train(not self.eval_mode)
        try:
            return self._loop(x, y, eps, init)
        finally:
            self.replica.train(was_training)

    def _loop(self, x: torch.Tensor, y: torch.Tensor, eps: torch.Tensor, init: torch.Tensor | None) -> AttackResult:
        n = x.shape[0]
        fwd = torch.zeros(n, dtype=torch.long, device=x.device)
        bwd = torch.zeros_like(fwd)
        x_adv = x.clone()
        x_last = x.clone()
        if self._clean_given is not None:  # the caller checked them (both models): none is a success clean
            self._clean_seen = self._clean_given
            success = torch.zeros(n, dtype=torch.bool, device=x.device)
        else:
            with torch.no_grad():
                twin_clean = self.model(x)
                success = self._success(twin_clean, self.replica(x), y, x, torch.arange(n, device=x.device))
            self._clean_seen = twin_clean
            fwd += 2
        gen = torch.Generator(device=x.device).manual_seed(self.seed)

        for restart in range(self.restarts):
            idx = (~success & (eps > 0)).nonzero().squeeze(1)
            if idx.numel() == 0:
                break
            x0, y0, e0 = x[idx], y[idx], eps[idx]
            if restart == 0:
                delta = project(init[idx] - x0, e0, self.norm) if init is not None else torch.zeros_like(x0)
            else:
                delta = random_in_ball(x0, e0, self.norm, gen)
            delta = (x0 + delta).clamp(0, 1) - x0
            for step in range(self.steps + 1):
                last = step == self.steps
                xa = (x0 + delta).requires_grad_(not last)
                with torch.set_grad_enabled(not last):
                    twin_logits = self.model(xa)
                    replica_logits = self.replica(xa).to(twin_logits.dtype)
                fwd[idx] += 2
                fooled = self._success(twin_logits.detach(), replica_logits.detach(), y0, xa, idx)
                if fooled.any():
                    hit = idx[fooled]
                    x_adv[hit] = xa.detach()[fooled]
                    success[hit] = True
                keep = ~fooled
                if last or not keep.any():
                    x_last[idx] = xa.detach()
                    break
                obj = differential_objective(self.objective, twin_logits, replica_logits, y0, self.c)
                grad = torch.autograd.grad(obj[keep].sum(), xa)[0][keep]
                grad = torch.nan_to_num(grad, nan=0.0, posinf=0.0, neginf=0.0)  # an fp16 replica can overflow
                idx, x0, y0, e0, delta = idx[keep], x0[keep], y0[keep], e0[keep], delta[keep]
                bwd[idx] += 2
                delta = project(delta + steepest_step(grad, self.rel_step * e0, self.norm), e0, self.norm)
                delta = (x0 + delta).clamp(0, 1) - x0
        x_last[success] = x_adv[success]
        return AttackResult(x_adv, success, lp_norm(x_adv - x, self.norm), fwd, bwd, x_last)


@torch.no_grad()
def engine_only(x_adv: torch.Tensor, y: torch.Tensor, twin: Callable[[torch.Tensor], torch.Tensor],
                engine: Callable[[torch.Tensor], torch.Tensor], batch_size: int = 256) -> torch.Tensor:
    """Per example, whether ``x_adv`` fools the engine (or a replica) and not the twin.

    Parameters
    ----------
    x_adv : (N, C, H, W) tensor in [0, 1]
    y : (N,) int64 tensor
        True labels.
    twin, engine : callables
        Pixels (n, C, H, W) -> logits (n, K): modules, or deployed engines (``exporters`` runners are callables).
    batch_size : int
        Examples per call.

    Returns
    -------
    (N,) bool tensor on ``y``'s device
        ``engine(x_adv).argmax(1) != y`` and ``twin(x_adv).argmax(1) == y``.
    """
    if x_adv.shape[0] != y.shape[0]:
        raise UserError(f"x_adv has {x_adv.shape[0]} examples but y has {y.shape[0]}")
    out = []
    for i in range(0, x_adv.shape[0], max(1, int(batch_size))):
        xb, yb = x_adv[i:i + batch_size], y[i:i + batch_size]
        twin_right = twin(xb).argmax(1).to(yb.device) == yb
        engine_wrong = engine(xb).argmax(1).to(yb.device) != yb
        out.append(twin_right & engine_wrong)
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.bool, device=y.device)


class HalfPrecision(nn.Module):
    """The differentiable replica of an fp16 engine: a copy of the twin in float16, fed float16 inputs, returning
    float32 logits (an overflow shows as ``inf``/``nan`` logits, as in the engine).

    The kit's fp16 exports store weights and compute in float16 with float32 input and output
    (``exporters/onnx/quantize.py``), which this mirrors; it does not model an engine's own accumulation order or
    its float32 fallbacks. The twin itself is left untouched.

    Parameters
    ----------
    model : nn.Module
        The twin: a module that computes in its weights' dtype and whose operators run in float16 on its device (the
        zoo's models do, on CPU and CUDA). Not an ``OnnxModule``, which computes in float32 whatever its buffers.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.module = copy.deepcopy(model).half()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.module(x.to(torch.float16)).to(torch.float32)
