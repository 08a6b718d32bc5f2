"""Automatic validity checks on an evaluation: each finding is a flag with an id, a severity and a doc entry.

A robustness number is only as good as the attack behind it. These checks look for the known ways an evaluation goes
wrong (gradient masking, randomised or saturated outputs, weak attacks, unverifiable adversarials), after AutoAttack's
flags. Every id has a section in ``docs/checks.md`` saying what it means and what to do.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from enum import Enum
from typing import Any

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from evaluators.curves import paired_gap_ci
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
    "non-finite-outputs": (Severity.ERROR, "the model returns NaN or infinite outputs on clean inputs"),
    "single-step-beats-multi-step": (Severity.WARNING, "FGSM fools examples the multi-step attacks call robust"),
    "black-box-beats-white-box": (Severity.WARNING, "the Square attack fools examples the gradient attacks call robust"),
    "fixed-eps-contradiction": (Severity.WARNING, "fixed-epsilon PGD fools examples the minimum-epsilon curve calls robust"),
    "adversarial-not-verified": (Severity.ERROR, "a returned adversarial fails re-verification"),
    "precision-not-deployed": (Severity.ERROR, "the file's claimed precision is not what its graph computes"),
    "engine-weights-differ": (Severity.ERROR, "the engine records other weights than the twin's"),
    "engine-graph-differs": (Severity.ERROR, "the engine's graph is not the twin's export"),
    "test-blind": (Severity.ERROR, "too few examples for the fidelity tests to see the tolerated differences"),
    "engine-above-twin": (Severity.WARNING, "an attack finds the engine significantly more robust than its twin"),
    "certificate-violated": (Severity.ERROR, "an attack on the smoothed engine beat a certified radius"),
    "verifier-beats-attacks": (Severity.WARNING, "a formal verifier found adversarials the attacks missed"),
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


def check_outputs(model: nn.Module, x: torch.Tensor, name: str = "the model") -> list[Flag]:
    """NaN or infinite outputs; randomised outputs (two passes over the same inputs differ, NaN and inf compared as
    values: the same NaN twice is not randomness); probabilities instead of logits. ``name`` says whose outputs
    (the engine, the twin) in the messages."""
    flags = []
    a, b = _logits(model, x), _logits(model, x)
    bad = ~torch.isfinite(a)
    if bool(bad.any()):
        rows = int(bad.any(1).sum())
        flags.append(flag("non-finite-outputs",
                          f"{rows} of {len(x)} clean inputs get NaN or infinite outputs from {name}: no prediction, "
                          "gradient or attack means anything there; find the layer that overflows or divides by zero"))
    if not torch.allclose(a, b, rtol=1e-5, atol=1e-6, equal_nan=True):
        both = torch.isfinite(a) & torch.isfinite(b)
        gap = float((a - b)[both].abs().max()) if bool(both.any()) else 0.0
        # where both passes are finite they differ by gap; else NaN or inf sits in one pass where the other has a value
        diff = f"by up to {gap:.3g}" if gap > 1e-6 else "in which outputs are NaN or infinite"
        flags.append(flag("randomised-outputs",
                          f"two forward passes of {name} on the same {len(x)} inputs differ ({diff}): gradients and "
                          "success are random; evaluate the expectation (EOT) or remove the randomness"))
    if (a >= 0).all() and (a <= 1).all() and torch.allclose(a.sum(1), a.new_ones(len(a)), atol=1e-3):
        flags.append(flag("outputs-look-like-probabilities",
                          f"every output row of {name} is in [0, 1] and sums to 1: it ends in softmax, which flattens "
                          "the cross-entropy gradient; export and attack the logits"))
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


def check_engine_weights(recorded: str, weights: str, source: Mapping[str, Any] | None, engine: str
                         ) -> Flag | None:
    """The weights an engine file says it was made from (:attr:`exporters.base.Engine.recorded_weights`) must be its
    twin's: a kit export records its checkpoint's ``weights_sha256``, so a stale export, or the export of another
    checkpoint, is evidence against the audit even where the two models agree on every audited example (an int8
    engine is judged on its agreement only, and a stale export of a well-trained model agrees on most).

    ``weights`` is the twin's ``weights_sha256`` and ``source`` its import record (a twin trained elsewhere, or
    ``None``): a twin imported from a kit export is identified by the weights that file records
    (``recorded_weights_sha256``; ``None`` for an ONNX file that records none) as well as by its own. Nothing is
    compared where the engine records no weights (a file exported elsewhere), nor for a twin imported from an ONNX
    file before the import kept that record (no such key). A checkpoint given as the engine records its own weights.
    ``engine`` names the file in the message.
    """
    if not recorded:
        return None
    known = {weights}
    if source:
        if source.get("recorded_weights_sha256"):
            known.add(str(source["recorded_weights_sha256"]))
        elif source.get("kind") == "onnx" and "recorded_weights_sha256" not in source:
            return None  # imported before the record existed: what its file named is unknown
    if recorded in known:
        return None
    return flag("engine-weights-differ", f"{engine} records that it was exported from weights {recorded}, but the "
                f"twin's are {weights}: it is not an export of this twin (a stale export, or another checkpoint's); "
                "export the twin again, or audit the engine with the checkpoint it came from")


def compare_graph(engine: Any, engine_path: Any, twin: nn.Module | None, twin_info: Any | None
                  ) -> dict[str, str] | None:
    """Whether an ONNX engine's graph is its twin's export (:func:`exporters.onnx.compare.compare_to_export`: the twin
    exported again as the file says it was, then compared), as the report's ``engine.graph`` record
    ``{"status", "reason"}``; None for an engine that is not an ONNX file, or without a twin.

    Only a file that records the twin's own weights is compared (a kit export of this twin): a file that records other
    weights is ``engine-weights-differ``'s, and one that records none was not exported by the kit.
    """
    from pathlib import Path

    from exporters.formats import engine_kind

    path = Path(engine_path)
    if twin is None or twin_info is None or engine_kind(path) != "onnx":
        return None
    if not engine.recorded_weights:
        return {"status": "not compared", "reason": "the file records no weights it was exported from: not a kit "
                "export"}
    if engine.recorded_weights != twin_info.weights_sha256:
        return {"status": "not compared", "reason": "the file records other weights than the twin's (see "
                "engine-weights-differ, or a twin imported from the file itself)"}
    import onnx

    from exporters.graph import load_onnx, uses_external_data
    from exporters.onnx.compare import compare_to_export

    proto = load_onnx(path)[0]
    if uses_external_data(proto):
        onnx.load_external_data_for_model(proto, str(path.parent))
    return compare_to_export(proto, twin, tuple(twin_info.input_shape)).to_dict()


def check_graph(record: Mapping[str, Any] | None, engine: str) -> Flag | None:
    """``engine-graph-differs`` where :func:`compare_graph` found the file's graph is not its twin's export. ``engine``
    names the file in the message."""
    if not record or record.get("status") != "differs":
        return None
    return flag("engine-graph-differs", f"{engine} records this twin's weights, but {record['reason']}: the file was "
                "changed after its export, so the audit's attacks and clean checks only saw what it does near the "
                "examples they ran; export the twin again, or audit the file with the twin it really computes")


def check_files(engine: Any, engine_path: Any, twin_info: Any | None, graph: Mapping[str, Any] | None = None
                ) -> list[Flag]:
    """The flags that follow from the engine and twin files alone, without running either: ``precision-not-deployed``
    for an ONNX file (:func:`check_deployed_precision`), with the twin's checkpoint record ``twin_info``
    ``engine-weights-differ`` (:func:`check_engine_weights`), and with the record of :func:`compare_graph`
    ``engine-graph-differs`` (:func:`check_graph`). The audit raises them; ``otkit verify`` raises them again and
    requires them in the report (:func:`evaluators.replay.file_flags`)."""
    from pathlib import Path

    from exporters.formats import engine_kind

    path = Path(engine_path)
    found = []
    if engine_kind(path) == "onnx":  # the precision the file claims must be what its graph computes
        from exporters.graph import precision_census, read_graph

        found.append(check_deployed_precision(engine.precision, precision_census(read_graph(path)[0]), path.name))
    if twin_info is not None:
        found.append(check_engine_weights(engine.recorded_weights, twin_info.weights_sha256, twin_info.source,
                                          path.name))
    found.append(check_graph(graph, path.name))
    return [f for f in found if f is not None]


def _eps_array(values: Sequence[Any], eps_max: float) -> np.ndarray:
    """A report's ``eps_star`` list (``None``: not fooled up to its eps_max) as radii clipped at ``eps_max``."""
    a = np.array([math.inf if v is None else float(v) for v in values], dtype=float)
    return np.minimum(np.where(np.isnan(a), math.inf, a), eps_max)


#: twin-guided attacks that search on past the twin's boundary, per norm (suggested by engine-above-twin)
_SEARCHERS = {"linf": "pgd-linf, fmn-linf", "l2": "pgd-l2, fmn-l2", "wasserstein": "fw-wasserstein"}


def check_engine_above_twin(record: Mapping[str, Any], worst: Mapping[str, Any] | None, *,
                            others: Sequence[Mapping[str, Any]] = (), tol_auac: float = 0.01, tol_curve: float = 0.02,
                            alpha: float = 0.05, n_boot: int = 1000, seed: int = 0) -> Flag | None:
    r"""An attack whose engine curve lies significantly above its twin's: a search artefact, or a real difference?

    ``record`` is one entry of the report's ``attacks`` (its ``twin`` / ``engine`` ``eps_star`` and ``accuracy``,
    its ``fidelity``); ``worst`` the ``worst_case`` record of its norm (the per-example minimum over every attack of
    that norm on the engine, the black box and the engine-only attack included), ``None`` when there is none;
    ``others`` the report's other attack records, to say which attacks fooled the engine (those of another norm are
    ignored). The tolerances are the audit's (``tolerances.auac``, ``.curve``, ``.alpha``).

    **Fires** when the engine is significantly more robust than the twin under this attack: the AUAC gap (engine -
    twin) and the lower end of its paired bootstrap interval both exceed ``tol_auac``, or at some grid radius the
    engine's accuracy exceeds the twin's by more than ``tol_curve`` with McNemar p < ``alpha`` (and the AUAC gap is
    positive). Otherwise ``None``.

    **Diagnosis.** The residual gap is the paired AUAC gap between the worst case's engine eps* and this attack's twin
    eps* (both clipped at this attack's eps_max), with a paired bootstrap interval (``n_boot`` resamples, ``seed``).
    *Search artefact* when it is at most ``tol_auac`` or its lower end is (the other attacks bring the engine back to
    the twin's level: this attack's search stopped short on the engine); the message says which attacks fooled the
    engine on the examples this attack lifted. *Engine genuinely more robust at these radii (as far as any attack
    found)* otherwise, with the numbers.
    """
    name, eps_max = str(record["name"]), float(record["eps_max"])
    fid = record["fidelity"]
    t = _eps_array(record["twin"]["eps_star"], eps_max)
    e = _eps_array(record["engine"]["eps_star"], eps_max)
    gap, (lo, hi) = float(fid["auac_gap"]), (float(v) for v in fid["auac_gap_ci"])
    acc_t, acc_e = np.asarray(record["twin"]["accuracy"]), np.asarray(record["engine"]["accuracy"])
    grid = np.asarray(record["eps_grid"], dtype=float)
    above = (acc_e - acc_t > tol_curve) & (np.asarray(fid["mcnemar_p"]) < alpha)
    if gap > tol_auac and lo > tol_auac:
        why = f"AUAC {record['engine']['auac']:.3f} on the engine vs {record['twin']['auac']:.3f} on the twin " \
              f"(gap {gap:+.3f}, 95% CI [{lo:+.3f}, {hi:+.3f}] above the tolerance {tol_auac:g})"
    elif gap > 0 and above.any():
        i = int(np.argmax(np.where(above, acc_e - acc_t, -np.inf)))
        why = f"accuracy {acc_e[i]:.3f} on the engine vs {acc_t[i]:.3f} on the twin at eps {grid[i]:.4g} " \
              f"(McNemar p {float(fid['mcnemar_p'][i]):.2g} < {alpha:g}; AUAC gap {gap:+.3f})"
    else:
        return None

    # the worst case on the engine (this attack's own engine eps* where there is no worst-case record)
    sources: dict[str, np.ndarray] = {}  # who may have fooled the engine: other attacks of this norm, then stages
    for r in others:
        if r.get("norm") == record.get("norm") and r["name"] != name:
            sources[str(r["name"])] = _eps_array(r["engine"]["eps_star"], eps_max)
    guided = list(sources)  # the other twin-guided attacks of this norm
    w = e.copy()
    names = [name]
    if worst is not None:
        w = np.minimum(w, _eps_array(worst["engine"]["eps_star"], eps_max))
        names = [str(a) for a in worst.get("attacks", [])] or names
        for key in ("blackbox", "engine_only"):
            extra = worst.get(key)
            if extra:
                bb = np.full(e.shape, eps_max)  # the black box ran on the first examples only
                got = _eps_array(extra["eps"], eps_max)[: e.size]
                bb[: got.size] = got
                sources[f"{extra['attack']} ({'black box' if key == 'blackbox' else 'engine-only'})"] = bb
    r_gap = float((w - t).mean() / eps_max) if w.size else 0.0
    r_lo, r_hi = paired_gap_ci(t, w, eps_max, n_boot, seed) if w.size else (0.0, 0.0)
    w_auac, t_auac = float(w.mean() / eps_max), float(t.mean() / eps_max)

    # the examples this attack lifted on the engine (engine eps* beyond the twin's by more than the search's default
    # bisection tolerance), and who fooled the engine there below this attack's engine eps*
    lifted = e > t + eps_max / 256
    k = int(lifted.sum())
    fixed = lifted & (w < e)
    who: dict[str, int] = {}
    for j in np.nonzero(fixed)[0]:
        best = min(sources, key=lambda s: sources[s][j], default=None)
        if best is not None and sources[best][j] <= w[j]:
            who[best] = who.get(best, 0) + 1
    ratio = float(np.median(w[fixed] / np.maximum(t[fixed], 1e-12))) if fixed.any() else math.nan
    rest = int(fixed.sum()) - sum(who.values())  # the worst case's own minimum, where ``others`` was not given
    found_by = ", ".join([f"{s} {n}" for s, n in sorted(who.items(), key=lambda kv: -kv[1])]
                         + ([f"attacks of the worst case {rest}"] if rest else [])) or "none"
    residual = f"engine AUAC {w_auac:.3f} vs the twin's {t_auac:.3f} under {name} (gap {r_gap:+.3f}, 95% CI " \
               f"[{r_lo:+.3f}, {r_hi:+.3f}])"
    consulted = ", ".join(names)
    if r_gap <= tol_auac or r_lo <= tol_auac:
        if "rungs" in record.get("config", {}):
            how = "its ladder and bisection along the twin's gradients missed adversarials of the engine"
        else:
            how = ("a minimum-norm attack runs once along the twin's gradients, and can stop where the twin is fooled "
                   "and the engine not yet")
        return flag("engine-above-twin",
                    f"search artefact: {why}, but the worst case over {consulted} brings the engine back to the "
                    f"twin's level: {residual}. On {k} example(s) {name} left the engine robust beyond the twin's "
                    f"eps*; other attacks fooled the engine on {int(fixed.sum())} of them (found by: {found_by}) at "
                    f"a median {ratio:.2f}x the twin's eps*. {name}'s search stopped short on the engine ({how}): "
                    f"do not read the engine's robustness from {name}'s engine curve or gate on it; use the worst "
                    f"case ({record.get('norm')})", name)
    norm = str(record.get("norm"))
    searchers = _SEARCHERS.get(norm, f"pgd-{norm}")
    if guided:
        caveat = ""
    elif sources:
        caveat = (f"; but no other twin-guided attack of this norm ran (the black box runs on the first "
                  f"--blackbox-samples examples only, with a query budget; the engine-only attack counts only inputs "
                  f"the twin still classifies correctly): add one that "
                  f"searches on past the twin's boundary ({searchers}) to rule out an artefact of {name}'s search")
    else:
        caveat = (f"; but no other attack ran: add {searchers} and the black box / engine-only stages to "
                  f"rule out an artefact of {name}'s search")
    return flag("engine-above-twin",
                f"engine genuinely more robust at these radii (as far as any attack found): {why}, and the worst "
                f"case over {consulted} keeps it above: {residual}"
                + (f"; other attacks fooled the engine below {name}'s radius on {int(fixed.sum())} of the {k} "
                   f"example(s) it lifted (found by: {found_by})" if k and sources else "")
                + f"{caveat}. The engine is then a different model from its twin: confirm with stronger attacks on "
                "the engine itself (more --blackbox-samples and queries, --engine-only), and find out which export "
                "step (quantisation, precision) moved the boundary", name)
