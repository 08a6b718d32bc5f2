"""Automatic validity checks on an evaluation: each finding is a flag with an id, a severity and a doc entry.

A robustness number is only as good as the attack behind it. These checks look for the known ways an evaluation goes
wrong (gradient masking, randomised or saturated outputs, weak attacks, unverifiable adversarials), after AutoAttack's
flags. Every id has a section in ``docs/checks.md`` saying what it means and what to do.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from enum import Enum
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from kit.attacks.base import Norm, lp_norm


class Severity(str, Enum):
    INFO = "info"
    WARNING = "warning"
    ERROR = "error"


#: id -> (severity, one-line title). docs/checks.md has one section per id (a test keeps them in step).
CHECKS: dict[str, tuple[Severity, str]] = {
    "curve-not-monotone": (Severity.WARNING, "accuracy rises with epsilon somewhere on the curve"),
    "not-zero-at-unbounded-eps": (Severity.ERROR, "accuracy is not near zero where the threat ball holds every image"),
    "zero-gradients": (Severity.WARNING, "many input gradients are exactly zero"),
    "non-finite-gradients": (Severity.ERROR, "input gradients contain NaN or inf"),
    "outputs-look-like-probabilities": (Severity.WARNING, "the model returns probabilities instead of logits"),
    "randomised-outputs": (Severity.ERROR, "the same input gives different outputs"),
    "single-step-beats-multi-step": (Severity.WARNING, "FGSM fools examples the multi-step attacks call robust"),
    "black-box-beats-white-box": (Severity.WARNING, "the Square attack fools examples the gradient attacks call robust"),
    "fixed-eps-contradiction": (Severity.WARNING, "fixed-epsilon PGD fools examples the minimum-epsilon curve calls robust"),
    "adversarial-not-verified": (Severity.ERROR, "a returned adversarial fails re-verification"),
    "precision-not-deployed": (Severity.ERROR, "the file's claimed precision is not what its graph computes"),
    "test-blind": (Severity.WARNING, "too few examples for the fidelity tests to see the tolerated differences"),
}


@dataclass(frozen=True)
class Flag:
    """One finding, in the shape ``curves.json`` and the audit report store."""

    id: str
    severity: str
    attack: str | None
    message: str

    def to_dict(self) -> dict:
        return asdict(self)


def flag(check_id: str, message: str, attack: str | None = None) -> Flag:
    """A flag with the severity registered for ``check_id``."""
    return Flag(check_id, CHECKS[check_id][0].value, attack, message)


@torch.no_grad()
def _logits(model: nn.Module, x: torch.Tensor, batch: int = 512) -> torch.Tensor:
    return torch.cat([model(x[i : i + batch]) for i in range(0, len(x), batch)])


def check_outputs(model: nn.Module, x: torch.Tensor) -> list[Flag]:
    """Probabilities instead of logits; randomised outputs (two passes over the same inputs differ)."""
    flags = []
    a, b = _logits(model, x), _logits(model, x)
    if not torch.allclose(a, b, rtol=1e-5, atol=1e-6):
        diff = (a - b).abs().max().item()
        flags.append(flag("randomised-outputs",
                          f"two forward passes on the same {len(x)} inputs differ by up to {diff:.3g}: gradients and "
                          "success are random; evaluate the expectation (EOT) or remove the randomness"))
    if (a >= 0).all() and (a <= 1).all() and torch.allclose(a.sum(1), torch.ones(len(a), dtype=a.dtype), atol=1e-3):
        flags.append(flag("outputs-look-like-probabilities",
                          "every output row is in [0, 1] and sums to 1: the model ends in softmax, which flattens the "
                          "cross-entropy gradient; export and attack the logits"))
    return flags


def check_gradients(model: nn.Module, x: torch.Tensor, y: torch.Tensor, max_zero_fraction: float = 0.1) -> list[Flag]:
    """Zero or non-finite input gradients of the cross-entropy (shattered or masked gradients)."""
    was_training = model.training
    model.eval()
    try:
        with torch.enable_grad():
            xg = x.detach().clone().requires_grad_(True)
            loss = F.cross_entropy(model(xg), y, reduction="sum")
            (g,) = torch.autograd.grad(loss, xg, allow_unused=True)
    finally:
        model.train(was_training)
    if g is None:
        g = torch.zeros_like(x)
    flat = g.flatten(1)
    flags = []
    bad = ~torch.isfinite(flat).all(1)
    if bad.any():
        flags.append(flag("non-finite-gradients", f"{int(bad.sum())} of {len(x)} examples have NaN or inf input "
                          "gradients; use log-softmax / logits, not log of softmax"))
    zero = (flat == 0).all(1) & ~bad
    if zero.float().mean() > max_zero_fraction:
        flags.append(flag("zero-gradients", f"{int(zero.sum())} of {len(x)} examples have an exactly zero input "
                          "gradient (a non-differentiable layer such as quantisation masks the gradient); trust only "
                          "gradient-free or BPDA attacks"))
    return flags


def check_monotone(attack: str, eps_grid: list[float], accuracy: list[float], tol: float = 1e-9) -> Flag | None:
    """Accuracy must not rise with epsilon (a larger ball contains the smaller one)."""
    rises = [(e, a0, a1) for e, a0, a1 in zip(eps_grid[1:], accuracy, accuracy[1:]) if a1 > a0 + tol]
    if not rises:
        return None
    e, a0, a1 = rises[0]
    return flag("curve-not-monotone", f"accuracy rises from {a0:.4f} to {a1:.4f} at eps {e:.4g} "
                f"({len(rises)} rise(s)): the attack is weaker at some larger epsilon", attack)


def unbounded_eps(norm: Norm, x: torch.Tensor) -> float:
    """A radius whose ball, intersected with [0, 1], holds every image: 1 for L-inf, sqrt(C*H*W) for L2."""
    return 1.0 if norm is Norm.LINF else math.sqrt(x[0].numel())


def check_unbounded(model: nn.Module, x: torch.Tensor, y: torch.Tensor, norm: Norm, seed: int = 0,
                    max_accuracy: float = 0.02) -> Flag | None:
    """PGD at a radius that holds every image must reach about zero accuracy, or the gradients are not usable."""
    from kit.attacks.pgd import PGD

    eps = unbounded_eps(norm, x)
    res = PGD(model, eps=eps, norm=norm, steps=20, seed=seed)(x, y)
    acc = res.robust_accuracy
    if acc <= max_accuracy:
        return None
    return flag("not-zero-at-unbounded-eps", f"PGD-{norm.value} at eps {eps:.3g} (every image reachable) leaves "
                f"{acc:.1%} accuracy: the gradients do not lead anywhere (masking); the curve is not a robustness "
                "measure", f"pgd-{norm.value}")


def check_fixed_eps(check_id: str, source: str, eps: float, fooled: torch.Tensor, eps_star: torch.Tensor,
                    attack: str | None = None, tol: float = 1e-6) -> Flag | None:
    """An attack at fixed ``eps`` fooled examples whose eps* (from the main attacks) is larger than ``eps``."""
    contra = fooled.cpu() & (eps_star.cpu() > eps * (1 + tol) + tol)
    if not contra.any():
        return None
    return flag(check_id, f"{source} at eps {eps:.4g} fools {int(contra.sum())} example(s) that the minimum-epsilon "
                f"curve counts as robust there: the curve overstates robustness; raise the search budget or add attacks",
                attack)


def check_reverify(model: nn.Module, x: torch.Tensor, y: torch.Tensor, x_adv: torch.Tensor, eps_star: torch.Tensor,
                   norm: Norm, attack: str) -> Flag | None:
    """Every claimed adversarial must be in [0, 1], within its recorded eps*, and misclassified when re-evaluated.

    For a Wasserstein attack the radius is the cost of the transport plan the attack used, which the image alone does
    not determine (an exact check is a linear program per image): only the box and the class are re-checked.
    """
    found = torch.isfinite(eps_star) & (eps_star > 0)
    if not found.any():
        return None
    xa, x0, y0, e0 = x_adv[found], x[found], y[found], eps_star[found]
    out_box = (xa.flatten(1).amin(1) < 0) | (xa.flatten(1).amax(1) > 1)
    if Norm(norm) is Norm.WASSERSTEIN:
        out_ball = torch.zeros(len(xa), dtype=torch.bool)
    else:
        out_ball = lp_norm(xa - x0, norm).double().cpu() > e0.cpu() * (1 + 1e-5) + 1e-7
    correct = (_logits(model, xa).argmax(1) == y0).cpu()
    bad = out_box.cpu() | out_ball | correct
    if not bad.any():
        return None
    return flag("adversarial-not-verified", f"{int(bad.sum())} of {int(found.sum())} adversarials fail "
                f"re-verification ({int(out_box.sum())} outside [0, 1], {int(out_ball.sum())} outside their radius, "
                f"{int(correct.sum())} classified correctly): results of this attack cannot be trusted", attack)


_PRECISION_BITS = {"int8": 8, "fp16": 16, "fp32": 32}
_PRECISION_WORDS = {"int8": "quantised to int8", "fp16": "float16 or narrower"}


def _share(part: int, whole: int) -> str:
    if whole == 0 or part == 0:
        return "0%"
    return "100%" if part == whole else f"{math.floor(1000 * part / whole) / 10:g}%"  # rounded down: never 90% at 89.96


def check_deployed_precision(claimed: str, census: dict[str, Any], engine: str) -> Flag | None:
    """The precision a file claims (its ``otkit.precision`` metadata, name or format) must be what its graph computes.

    ``census`` is :func:`exporters.graph.precision_census` of the file's graph; what it computes is
    :func:`exporters.graph.deployed_precision` of it (int8: at least 90% of the Conv/ConvTranspose/Gemm/MatMul weight
    elements quantised to int8; fp16: at least 90% float16 or narrower; else fp32). Any difference is flagged, in
    both directions: an int8 or fp16 claim on a graph that computes in fp32, and an fp32 claim on a quantised graph,
    misstate what was audited. A claim that is none of fp32, fp16 and int8 is flagged too; an empty claim is no claim.
    ``engine`` names the file in the message.
    """
    from exporters.graph import REDUCED_PRECISION_BAR, deployed_precision

    claim = str(claimed or "").strip().lower()
    if not claim:
        return None
    found = deployed_precision(census)
    if claim == found:
        return None
    w = census["weights"]
    ops = "/".join(w["ops"]) or "Conv/Gemm/MatMul"

    def numbers(precision: str) -> str:
        part = w["int8"] if precision == "int8" else {k: w["int8"][k] + w["fp16"][k] for k in ("tensors", "elements")}
        return (f"{part['tensors']} of {w['tensors']} {ops} weight tensors ({_share(part['elements'], w['elements'])} "
                f"of {w['elements']:,} elements) are {_PRECISION_WORDS[precision]}")

    if claim in _PRECISION_BITS:
        described = min(claim, found, key=_PRECISION_BITS.__getitem__)  # the narrower of the two: int8 or fp16
        head = f"{engine} claims {claim} but"
    else:
        described = "fp16" if found == "fp32" else found
        head = f"{engine} claims precision {claimed!r}, which is not fp32, fp16 or int8, and"
    if w["tensors"]:
        evidence = f"{numbers(described)} ({described} needs {REDUCED_PRECISION_BAR:.0%})"
    else:
        evidence = f"its graph has no constant {ops} weight to measure, and by its Q/DQ nodes and float16 constants"
    return flag("precision-not-deployed", f"{head} {evidence}: it computes in {found}, and the audit measured that, "
                f"not {claim}; export it again at the precision you deploy, or correct its claim")
