r"""Audit a deployed engine against its PyTorch twin: twin-guided attack sweeps scored on both, fidelity statistics,
black-box cross-check, release gates, and the report document (schema ``otkit.report/1``).

The method (``docs/audit.md`` explains it at length):

1. **Twins?** Clean logits of the twin and the engine on the audited examples: accuracies, top-1 agreement, largest
   logit gap. Agreement below ``tolerances.agreement`` makes the verdict ``mismatch`` on its own.
2. **Sweeps.** For every attack, one minimum-epsilon search with two judges (:func:`kit.attacks.search.judged_search`)
   crafts every candidate with the twin's gradients and judges it by the twin (eps*_twin) and by the engine
   (eps*_engine): the search goes on with an example until both sides are fooled, each side with its own ladder and
   bisection state, so the twin's passes are spent once where the sides agree. Each side's adversarials are then
   evaluated on the other side too, and each example's eps* on a side is the smallest adversarial for that side among
   all candidates. For an FP32 engine both sides take the same path and the curves coincide.
3. **Fidelity**, per attack, on one grid of ``points`` radii from 0 to eps_max: the largest gap between the two
   accuracy curves, the AUAC gap (engine - twin) with a paired bootstrap interval (examples resampled together), and
   McNemar's exact test on the paired robust / fooled outcomes at each grid radius. Verdict ``mismatch`` when
   ``|AUAC gap| > tolerances.auac``, or when at some grid radius the curves differ by more than ``tolerances.curve``
   and McNemar's test finds the difference significant (p < ``tolerances.alpha``); else ``match``.
4. **Black box.** The Square attack (forward passes only) runs on the engine itself for the first
   ``blackbox_samples`` examples, per L-inf / L2 threat model: one run at eps_max, then bisection (each step
   warm-started from its smallest adversarial) that stops once Square resisted at a radius some twin-guided attack
   already needed (it can no longer lower a worst case there); where it fools an example below every twin-guided attack's radius, the
   ``black-box-beats-white-box`` flag says so (and whether the twin falls there too). **Engine-only**: the
   differential attack on a replica of the engine's arithmetic (int8 fake quantisation, fp16), judged by the engine.
5. **Worst case** per threat model: per example the smallest eps* of any attack of that norm, the black box and the
   engine-only attack included, and its curve and AUAC: the report's headline (an empirical upper bound, as every
   AUAC here).
6. **Gates**: ``min_auac`` on the lower end of the engine's AUAC interval, for a threat model's worst case or one
   attack. The report's ``status`` is ``fail`` when the verdict is
   ``mismatch``, a gate failed, or a validity check raised an ``error`` flag that the user did not allow by id
   (``--allow-flag``, recorded in the report) (``otkit audit`` exits 1), else ``pass``.

Long audits keep per-batch state under ``OUT/.audit-state/`` and resume from it (:func:`run_audit` ``resume=True``);
the report files are removed when an audit starts (after the resume state was checked) and written (report.json last)
only when it completed.
"""

from __future__ import annotations

import datetime as _dt
import logging
import math
import secrets
import shutil
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn

import kit
from evaluators import checks as C
from evaluators.curves import accuracy_at, auac, auac_bootstrap_ci, eps_grid, paired_gap_ci
from evaluators.evaluate import AttackRequest
from evaluators.state import BatchState, refuse_changed, saved_key
from exporters.engines import Engine
from exporters.parity import compare_logits
from kit.attacks.base import LP_NORMS, Norm
from kit.attacks.registry import AttackSpec, get_attack
from kit.attacks.search import SearchResult, judged_search, min_eps_search
from kit.distributed import World, device_name, host_label
from kit.errors import UserError
from kit.runtime import open_bar, progress_bar

log = logging.getLogger(__name__)

#: what every AUAC of an audit is; the report says so in its ``auac_bound`` field, its pages and the CLI's summary
AUAC_BOUND = "empirical upper bound from attacks"

SCHEMA = "otkit.report/1"
STATE_DIR = ".audit-state"
#: the arrays each batch saves (and sends to the other ranks): a twin-guided search, the black box
GUIDED_KEYS = ("eps_twin", "eps_engine", "x_twin", "x_engine", "fwd", "bwd", "engine_fwd")
BLACKBOX_KEYS = ("found", "found_t", "fools_twin", "fools_engine")


class Verdict:
    MATCH = "match"
    MISMATCH = "mismatch"


@dataclass(frozen=True)
class Tolerances:
    """How far the engine may be from its twin and still be called a match.

    Attributes
    ----------
    auac : float
        Largest allowed ``|AUAC(engine) - AUAC(twin)|`` per attack.
    curve : float
        Largest allowed gap between the two accuracy curves at any grid radius.
    agreement : float
        Smallest allowed clean top-1 agreement between twin and engine.
    alpha : float
        Significance level of McNemar's test: a curve gap above ``curve`` is a mismatch only where the paired
        outcomes differ significantly (p < alpha), so a gap made of one or two boundary examples of a small audit is
        not called a mismatch.
    """

    auac: float = 0.01
    curve: float = 0.02
    agreement: float = 0.98
    alpha: float = 0.05

    def __post_init__(self) -> None:
        for name in ("auac", "curve", "agreement", "alpha"):
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and 0 <= v <= 1):
                raise UserError(f"tolerance {name} must be in [0, 1], got {v!r}")


@dataclass(frozen=True)
class Gate:
    """A release gate: the lower end of the engine's AUAC interval under ``attack`` (an attack's name, or a threat
    model ``linf``/``l2``/``wasserstein`` for its worst case) must be at least ``min_auac``."""

    attack: str
    min_auac: float

    @classmethod
    def parse(cls, text: str) -> Gate:
        """``ATTACK=VALUE`` or ``NORM=VALUE``, e.g. ``pgd-linf=0.25``, ``linf=0.25``."""
        name, sep, value = text.partition("=")
        try:
            v = float(value)
        except ValueError:
            v = math.nan
        if not sep or not name.strip() or not 0 <= v <= 1:
            raise UserError(f"bad gate {text!r}: expected ATTACK=MIN_AUAC with MIN_AUAC in [0, 1], e.g. pgd-linf=0.25")
        return cls(name.strip(), v)


@dataclass
class AuditConfig:
    """What an audit runs; everything that changes its numbers is part of the resume key."""

    attacks: Sequence[AttackRequest]
    batch_size: int = 256
    rungs: int = 8
    tol: float | None = None
    seed: int = 0
    points: int = 33
    tolerances: Tolerances = field(default_factory=Tolerances)
    gates: Sequence[Gate] = ()
    blackbox_samples: int = 100
    blackbox_queries: int = 500
    n_boot: int = 1000
    allowed_flags: Sequence[str] = ()
    engine_only: bool = True
    engine_only_steps: int = 20
    spot_check: int = 1000

    def __post_init__(self) -> None:
        unknown = [f for f in self.allowed_flags if f not in C.CHECKS]
        if unknown:
            raise UserError(f"unknown flag id(s) {', '.join(unknown)} in --allow-flag; known: {', '.join(C.CHECKS)}")
        if not self.attacks:
            raise UserError("no attack requested: give at least one --attack")
        names = [r.spec.name for r in self.attacks]
        if len(set(names)) != len(names):
            raise UserError(f"an attack is requested twice: {', '.join(names)}")
        norms = sorted({r.spec.norm.value for r in self.attacks})
        for g in self.gates:
            if g.attack not in names and g.attack not in norms:
                raise UserError(f"gate on {g.attack!r}, which is neither an audited attack ({', '.join(names)}) nor "
                                f"an audited threat model ({', '.join(norms)})")
        if self.batch_size < 1 or self.rungs < 1 or self.points < 2 or self.blackbox_samples < 0 \
                or self.spot_check < 0:
            raise UserError("batch size and rungs must be >= 1, points >= 2, black-box samples and the spot check "
                            ">= 0")
        for r in self.attacks:  # the parameters' values (steps >= 1, ...) are checked by the attack itself, now
            try:
                r.spec.build(nn.Identity())
            except UserError as e:
                raise UserError(f"--attack {r.spec.name}: {e}") from None

    def key(self) -> dict[str, Any]:
        """The JSON-able identity of the run's numbers (for ``--resume``)."""
        return {"attacks": [[r.spec.name, r.eps_max, r.spec.kwargs] for r in self.attacks],
                "batch_size": self.batch_size,
                "rungs": self.rungs, "tol": self.tol, "seed": self.seed}


class EngineJudge:
    """The engine's verdict on candidates (``judge`` of :class:`kit.attacks.base.Attack`), counting its passes."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.forwards = 0

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        self.forwards += int(x.shape[0])
        return self.engine(x).argmax(1) != y


class EngineModule(nn.Module):
    """An engine as a parameter-free, gradient-free module, for forward-only attacks (Square) and checks.

    ``on_forward`` (settable) is called after every call, e.g. to move a progress bar by one query."""

    def __init__(self, engine: Engine) -> None:
        super().__init__()
        self.engine = engine
        self.on_forward: Callable[[], None] | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            out = self.engine(x.detach())
        if self.on_forward is not None:
            self.on_forward()
        return out


@torch.no_grad()
def _predict(fn: Any, x: torch.Tensor, batch: int, desc: str | None = None) -> torch.Tensor:
    if not len(x):
        return x.new_zeros(0)
    parts = []
    with progress_bar(desc or "predict", total=len(x), unit="ex") as bar:
        for i in range(0, len(x), batch):
            parts.append(fn(x[i : i + batch]))
            bar.advance(len(parts[-1]))
    return torch.cat(parts)


def _merge(own: SearchResult, other_eps: torch.Tensor, other_x: torch.Tensor, fooled: torch.Tensor) -> SearchResult:
    """Per example, the smaller of ``own`` and the other side's adversarial where it also fools this side."""
    better = fooled & torch.isfinite(other_eps) & (other_eps < own.eps_star)
    eps = torch.where(better, other_eps, own.eps_star)
    x_adv = torch.where(better.view(-1, 1, 1, 1), other_x, own.x_adv)
    return SearchResult(eps, x_adv, own.forwards, own.backwards)


def twin_guided_search(attack: str | AttackSpec, twin: nn.Module, engine: Engine, x: torch.Tensor, y: torch.Tensor,
                       eps_max: float, *, seed: int = 0, rungs: int = 8, tol: float | None = None,
                       on_step: Callable[[float], None] | None = None) -> tuple[SearchResult, SearchResult, int]:
    """eps* per example on the twin and on the engine, every candidate crafted with the twin's gradients.

    One minimum-epsilon search with two judges (:func:`kit.attacks.search.judged_search`): each candidate is judged by
    the twin (its logits are at hand) and by the engine, and each side keeps its own ladder and bisection state, so
    the twin's forward and backward passes are spent once for both sides where they agree. Then each side's
    adversarials are judged by the other side too, and count there where they are smaller.

    Parameters
    ----------
    attack : str or AttackSpec
        A registered attack's name, or its spec with the user's parameters (``NAME@EPS:key=value``, which the
        search builds with).
    twin : nn.Module
        The PyTorch model the engine was exported from (eval mode, on ``x``'s device).
    engine : Engine
        The deployed artifact.
    x : (N, C, H, W) tensor in [0, 1]
    y : (N,) int64 tensor
    eps_max : float
    on_step : callable, optional
        Progress of the search, a fraction in [0, 1] (see :func:`kit.attacks.search.min_eps_search`).

    Returns
    -------
    (twin_result, engine_result, engine_forwards)
        Each side's :class:`~kit.attacks.search.SearchResult` (``x_adv`` the adversarial for that side; the twin's
        passes of the one search in both, not to be added up) and the number of engine forward passes (images) spent.
    """
    spec = get_attack(attack) if isinstance(attack, str) else attack
    judge = EngineJudge(engine)
    sides = judged_search(spec.build(twin, seed=seed), x, y, eps_max, {"twin": None, "engine": judge}, rungs, tol,
                          on_step=on_step)
    res_t, res_e = sides["twin"], sides["engine"]
    # cross-evaluation: each side's adversarials on the other side
    engine_fooled = judge(res_t.x_adv, y)
    with torch.no_grad():
        twin_fooled = twin(res_e.x_adv).argmax(1) != y
    return _merge(res_t, res_e.eps_star, res_e.x_adv, twin_fooled), _merge(res_e, res_t.eps_star, res_t.x_adv,
                                                                            engine_fooled), judge.forwards


def mcnemar_exact(b: int, c: int) -> float:
    r"""Two-sided exact McNemar test on ``b`` and ``c`` discordant pairs: :math:`\min(1, 2 P[X \le \min(b, c)])`,
    :math:`X \sim \mathrm{Bin}(b + c, 1/2)` (computed in exact integer arithmetic)."""
    n = b + c
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, i) for i in range(min(b, c) + 1))
    return min(1.0, 2 * tail / 2**n)


def _as_float_array(v: torch.Tensor | np.ndarray) -> np.ndarray:
    return np.asarray(v.detach().cpu().double().numpy() if isinstance(v, torch.Tensor) else v, dtype=float)


def fidelity(eps_twin: Any, eps_engine: Any, eps_max: float, tolerances: Tolerances, *, points: int = 33,
             n_boot: int = 1000, seed: int = 0) -> dict[str, Any]:
    r"""Compare the twin's and the engine's accuracy curves from paired per-example eps*.

    Returns the ``fidelity`` record of the report: ``max_gap`` and ``max_gap_eps`` (largest
    :math:`|acc_{engine}(\varepsilon) - acc_{twin}(\varepsilon)|` on the grid and where), ``auac_gap``
    (:math:`AUAC_{engine} - AUAC_{twin}`, exact AUACs) with ``auac_gap_ci`` (paired percentile bootstrap, 95%),
    ``mcnemar_p`` (exact McNemar p-value of the paired robust/fooled outcomes at each grid radius), ``verdict`` and
    ``reason``. ``mismatch`` when ``|auac_gap| > tolerances.auac``, or where a curve gap above ``tolerances.curve`` is
    significant (McNemar p < ``tolerances.alpha``).
    """
    t, e = _as_float_array(eps_twin), _as_float_array(eps_engine)
    if t.shape != e.shape or t.ndim != 1 or t.size == 0:
        raise ValueError("eps_twin and eps_engine must be paired non-empty 1-D arrays")
    grid = eps_grid(eps_max, points)
    acc_t, acc_e = np.asarray(accuracy_at(t, grid)), np.asarray(accuracy_at(e, grid))
    gaps = np.abs(acc_e - acc_t)
    k = int(gaps.argmax())
    gap = auac(e, eps_max) - auac(t, eps_max)
    lo, hi = paired_gap_ci(t, e, eps_max, n_boot, seed)
    p = []
    for r in grid:
        rob_t, rob_e = t > r, e > r
        p.append(mcnemar_exact(int((rob_t & ~rob_e).sum()), int((~rob_t & rob_e).sum())))
    problems = []
    if abs(gap) > tolerances.auac:
        problems.append(f"AUAC gap {gap:+.4f} exceeds {tolerances.auac}")
    significant = [i for i in range(len(grid)) if gaps[i] > tolerances.curve and p[i] < tolerances.alpha]
    if significant:
        i = max(significant, key=lambda j: gaps[j])
        problems.append(f"curves differ by {gaps[i]:.4f} at eps {grid[i]:.4g} (tolerance {tolerances.curve}, "
                        f"McNemar p {p[i]:.2g} < {tolerances.alpha})")
    return {
        "max_gap": float(gaps[k]),
        "max_gap_eps": float(grid[k]),
        "auac_gap": float(gap),
        "auac_gap_ci": [float(lo), float(hi)],
        "mcnemar_p": [float(v) for v in p],
        "verdict": Verdict.MISMATCH if problems else Verdict.MATCH,
        "reason": "; ".join(problems) if problems else
                  f"AUAC gap {gap:+.4f} within {tolerances.auac}; largest curve gap {gaps[k]:.4f} "
                  f"(McNemar p {p[k]:.2g}) within {tolerances.curve} or not significant",
    }


def side_record(eps_star: Any, eps_max: float, points: int, seed: int) -> dict[str, Any]:
    """Accuracy on the grid, exact AUAC with its bootstrap interval, and eps* (``None`` for never fooled)."""
    a = _as_float_array(eps_star)
    lo, hi = auac_bootstrap_ci(a, eps_max, seed=seed)
    return {
        "accuracy": [float(v) for v in accuracy_at(a, eps_grid(eps_max, points))],
        "auac": auac(a, eps_max),
        "auac_ci": [lo, hi],
        "eps_star": [None if not math.isfinite(v) or v > eps_max else float(v) for v in a],
    }


def build_replica(inp: AuditInputs) -> tuple[nn.Module | None, str]:
    """A differentiable replica of the engine's arithmetic for the engine-only attack, and what it is.

    An int8 Q/DQ ONNX file: its graph with the activation quantisation kept as fake quantisation
    (:class:`kit.twins.from_onnx.OnnxModule` ``fake_quant=True``), its input convention folded in. An fp16 engine: the
    twin in half precision (:class:`kit.attacks.differential.HalfPrecision`). An fp32 engine computes what the twin
    computes: no replica, nothing engine-only to search. A TensorRT engine's plan is not a graph: an int8 engine is
    replicated from the Q/DQ ONNX file it was built from (:func:`int8_graph`; TensorRT runs explicit quantisation at
    the graph's scales), an fp16 engine by the twin in half precision.
    """
    engine = inp.engine
    if engine.precision == "fp32":
        return None, "none: an fp32 engine computes what the twin computes"
    if engine.precision == "int8":
        graph, why = int8_graph(inp.engine_format, inp.engine_path)
        if graph is None:
            return None, why
        from kit.convention import InputModule
        from kit.twins.from_onnx import onnx_to_torch

        replica: nn.Module = onnx_to_torch(graph, fake_quant=True)
        if not engine.input_convention.identity:
            replica = InputModule(replica, engine.input_convention)
        return replica.to(inp.x.device).eval(), why
    if engine.precision == "fp16":
        half = _half_twin(inp.twin)
        if half is None:
            return None, "none: an fp16 replica needs a twin that computes in float16 (not a rebuilt ONNX graph)"
        return half, "the twin in float16"
    return None, f"none: no replica for a {engine.precision} {inp.engine_format} engine"


def _half_twin(twin: nn.Module) -> nn.Module | None:
    """The twin computing in float16 (what an fp16 engine computes), or ``None`` for a twin that cannot: a rebuilt
    ONNX graph computes in float32 whatever its buffers."""
    from kit.attacks.differential import HalfPrecision
    from kit.twins.from_onnx import OnnxModule

    if any(isinstance(m, OnnxModule) for m in twin.modules()):
        return None
    return HalfPrecision(twin).eval()


def int8_graph(engine_format: str, engine_path: Path) -> tuple[Path | None, str]:
    """The int8 Q/DQ ONNX graph an engine computes, and what the replica is; ``None`` and the reason where there is none.

    An ONNX engine is its own graph. A TensorRT engine names the ONNX file it was built from in its sidecar
    (``onnx.file``, ``onnx.sha256``): that file, beside the engine with the same sha256 and itself int8, is the graph;
    TensorRT runs a Q/DQ graph's quantisation at its scales (explicit quantisation), so its fake-quantised replica
    rounds where the engine rounds.
    """
    if engine_format == "onnx":
        return engine_path, "the int8 graph with fake quantisation (Q/DQ kept)"
    if engine_format != "tensorrt":
        return None, f"none: no replica for an int8 {engine_format} engine"
    from exporters.tensorrt.environment import read_sidecar
    from kit.io import sha256_file

    source = read_sidecar(engine_path).get("onnx") or {}
    name = source.get("file")
    if not isinstance(name, str) or not name or Path(name).name != name:
        return None, "none: the engine's sidecar names no ONNX file it was built from"
    graph = engine_path.parent / name
    if not graph.is_file():
        return None, f"none: {name}, the ONNX file the engine was built from, is not beside it"
    if "sha256:" + sha256_file(graph) != source.get("sha256"):
        return None, f"none: {name} beside the engine is not the file it was built from (sha256 differs)"
    if source.get("precision") != "int8":
        return None, f"none: the engine was built from a {source.get('precision')} ONNX file, not a Q/DQ graph"
    return graph, f"the int8 graph it was built from ({name}) with fake quantisation (Q/DQ kept)"


def _radii(v: torch.Tensor, eps_max: float) -> list[float | None]:
    """Per-example radii as the report stores them: ``None`` where nothing was found up to ``eps_max``."""
    return [float(r) if math.isfinite(r) and r <= eps_max else None for r in v.tolist()]


class TwinOnlyJudge:
    """The twin-only side of the differential search: a candidate counts when the twin is fooled and the engine is
    not (the mirror of the engine-only search, so both worst cases get the same effort)."""

    def __init__(self, twin: nn.Module, engine: Engine) -> None:
        self.twin, self.engine = twin, engine

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return (self.twin(x).argmax(1) != y) & (self.engine(x).argmax(1) == y)


def _engine_only_batch(twin: nn.Module, replica: nn.Module, engine: Engine, xb: torch.Tensor, yb: torch.Tensor,
                       norm: Norm, eps_max: float, cfg: AuditConfig,
                       on_step: Callable[[float], None] | None = None) -> dict[str, np.ndarray]:
    """For one batch: per example the smallest radius at which the differential attack found an input that fools the
    engine while the twin stays correct (``engine``), and the mirror search's (twin fooled, engine correct; the
    replica's gradients keep it right: ``twin``); ``inf`` where none was found up to eps_max."""
    from kit.attacks.differential import Differential

    out = {}
    for side, k, (model, other, judge) in (
            ("engine", 0, (twin, replica, EngineJudge(engine))),
            ("twin", 1, (replica, twin, TwinOnlyJudge(twin, engine)))):
        attack = Differential(model, replica=other, norm=norm.value, steps=cfg.engine_only_steps, seed=cfg.seed,
                              evasive=side == "engine")
        attack.judge = judge
        res = min_eps_search(attack, xb, yb, eps_max, cfg.rungs, cfg.tol,
                             on_step=None if on_step is None else (lambda f, k=k: on_step((k + f) / 2)))
        out[side] = res.eps_star.detach().cpu().double().numpy()
    return out


def _blackbox_batch(twin: nn.Module, engine: Engine, engine_mod: nn.Module, xb: torch.Tensor, yb: torch.Tensor,
                    norm: Norm, eps_max: float, known: torch.Tensor, cfg: AuditConfig,
                    on_step: Callable[[float], None] | None = None) -> dict[str, np.ndarray]:
    """For one batch: Square on the engine and on the twin (forward passes only), where it can still lower a worst
    case: one run per example at eps_max, then bisection, which stops with an example once Square resisted at
    ``known`` (the smallest radius a twin-guided attack needed on either side; inf where none did). Returns each
    search's radii (``found`` on the engine, ``found_t`` on the twin) and whether each search's adversarial fools
    the other model too."""
    results = []
    for k, model in enumerate((engine_mod, twin)):
        square = get_attack(f"square-{norm.value}").build(model, seed=cfg.seed, queries=cfg.blackbox_queries)
        results.append(min_eps_search(square, xb, yb, eps_max, 1, cfg.tol, known=known,
                                      on_step=None if on_step is None else (lambda f, k=k: on_step((k + f) / 2))))
    res, res_t = results
    with torch.no_grad():
        fools_twin = twin(res.x_adv).argmax(1) != yb
    fools_engine = engine(res_t.x_adv).argmax(1) != yb
    return {"found": res.eps_star.detach().cpu().double().numpy(), "found_t": res_t.eps_star.detach().cpu().double()
            .numpy(), "fools_twin": fools_twin.cpu().numpy(), "fools_engine": fools_engine.cpu().numpy()}


def placement(world: World, engine_format: str, device: Any) -> list[str]:
    """Every rank's host and device (:func:`kit.distributed.host_label`), after :func:`check_cluster` on their kinds."""
    hosts = world.gather_text(host_label(device))
    check_cluster(engine_format, world.gather_text(device_name(device)))
    return hosts


def check_cluster(engine_format: str, devices: Sequence[str]) -> None:
    """Refuse a TensorRT engine on processes whose devices differ (``devices``: one name per rank): an engine is
    built for one GPU type and TensorRT version, and a report must not mix what ran where."""
    kinds = sorted(set(devices))
    if engine_format == "tensorrt" and len(kinds) > 1:
        raise UserError(f"a TensorRT engine is built for one GPU type, but the processes run on {', '.join(kinds)}: "
                        "audit it on one kind of GPU, with one engine per GPU type (docs/distributed.md)")


#: The clean logit gap of an fp16 engine is held to this many times the gap of the twin itself run in float16 (the
#: size of float16's rounding: 6.3e-3 for a digits cnn at logit scale 17, whose fp16 export shows 2.3e-3), and never
#: below ``atol + rtol * logit scale`` of :data:`FP16_GAP_FLOOR` (0.18 there): room for an engine that accumulates in
#: float16 where torch does not (TensorRT on a GPU). An fp16 engine of another model (gap 0.98 for one more epoch of
#: training), a bias of 1 on one class, an input scaled by 0.8 (4.0) or softmax outputs (16.6) are then mismatches,
#: as they are in fp32; all four passed before, their predictions agreeing.
FP16_GAP_SLACK = 20.0
FP16_GAP_FLOOR = (1e-2, 1e-2)


def _fp16_gap_tolerance(twin: nn.Module, x: torch.Tensor, bs: int, twin_logits: torch.Tensor, scale: float
                        ) -> float | None:
    """The largest clean logit gap an honest fp16 engine may show (:data:`FP16_GAP_SLACK`), from the twin run in
    float16 on the same examples; ``None`` (the gap is reported, not judged) for a twin that cannot compute in
    float16 (:func:`_half_twin`)."""
    model = _half_twin(twin)
    if model is None:
        return None
    with torch.no_grad():
        half = _predict(model, x, bs, "clean: twin in float16")
    ref = float((half.double() - twin_logits.double()).abs().max()) if len(x) else 0.0
    if not math.isfinite(ref):  # the twin overflows in float16: nothing to calibrate on
        return None
    atol, rtol = FP16_GAP_FLOOR
    return max(FP16_GAP_SLACK * ref, atol + rtol * scale)


def clean_record(twin: nn.Module, engine: Engine, x: torch.Tensor, y: torch.Tensor, bs: int,
                 tols: Tolerances, runtime: str | None = None) -> dict[str, Any]:
    """1. The clean check: both models on the clean examples, their agreement and largest logit gap, judged (``otkit
    verify`` measures it again the same way: :func:`evaluators.replay.replay_report`). ``runtime`` (``onnxruntime``
    or ``tensorrt``) chooses the FP32 tolerance; by default the engine's :attr:`~exporters.base.Engine.parity_runtime`.
    """
    twin_logits = _predict(twin, x, bs, "clean: twin")
    engine_logits = _predict(engine, x, bs, "clean: engine")
    parity = compare_logits(twin_logits, engine_logits, precision=engine.precision, name=engine.name, labels=y,
                            runtime=runtime or engine.parity_runtime)
    # a gap tolerance holds where the engine computes on the very pixels the twin sees: export's FP32 tolerance for
    # an fp32 engine, the float16 twin's rounding for an fp16 engine (int8: the agreement only)
    gap_tol = None
    if engine.input_convention.dtype == "float32":
        gap_tol = parity.tolerance
        if engine.precision == "fp16":
            gap_tol = _fp16_gap_tolerance(twin, x, bs, twin_logits, parity.logit_scale)
    gap: float | None = parity.max_abs_diff
    if not math.isfinite(gap):  # NaN or inf logits: no gap to state, and no tolerance any engine could be within
        gap, gap_tol = None, 0.0
    return {
        "twin_accuracy": parity.twin_accuracy,
        "engine_accuracy": parity.engine_accuracy,
        "top1_agreement": parity.top1_agreement,
        "max_logit_gap": gap,
        "max_logit_gap_tolerance": gap_tol,
        **clean_judgement(parity.top1_agreement, len(x), tols, gap, gap_tol),
    }


def spot_check_record(twin: nn.Module, engine: Engine, pool: Any, n: int, seed: int, bs: int, tols: Tolerances,
                      device: Any) -> dict[str, Any]:
    """The clean comparison (:func:`clean_record`) on ``n`` examples of the whole split ``pool`` (a
    :class:`kit.data.Dataset`) drawn with ``seed``: the report's ``clean.spot_check``.

    The audited examples are a seeded subset that anyone can draw in advance, so an engine could be made to match its
    twin near them and compute something else elsewhere; the audit draws the spot check's seed from the operating
    system's entropy when it starts, and records it (with the examples' fingerprint) so that ``otkit verify`` draws
    the same examples again.
    """
    ds = pool.subset(n, seed=seed, notice=False)
    rec = clean_record(twin, engine, ds.x.to(device), ds.y.to(device), bs, tols)
    return {"n": len(ds), "seed": int(seed), "fingerprint": ds.fingerprint, **rec}


def with_spot_check(clean: Mapping[str, Any], spot: Mapping[str, Any]) -> dict[str, Any]:
    """The clean record with its spot check (:func:`combine_clean`); ``p_value`` stays the audited examples'."""
    verdict, reason = combine_clean(clean["verdict"], clean["reason"], spot["verdict"],
                                    f"on {spot['n']} examples drawn at random from the split: {spot['reason']}")
    return {**clean, "verdict": verdict, "reason": reason, "spot_check": dict(spot)}


def combine_clean(verdict: str, reason: str, spot_verdict: str, spot_reason: str) -> tuple[str, str]:
    """The clean verdict and reason with a spot check's: a mismatch on either is the clean comparison's mismatch (the
    audited examples' reason first)."""
    if verdict == Verdict.MATCH and spot_verdict == Verdict.MISMATCH:
        return Verdict.MISMATCH, spot_reason
    return verdict, reason


def worst_case_record(norm: str, eps_max: float, attacks: Sequence[str], engine_eps: Sequence[Any],
                      twin_eps: Sequence[Any], blackbox: Mapping[str, Any] | None, points: int,
                      seed: int, engine_only: Mapping[str, Any] | None = None, *,
                      tolerances: Tolerances | None = None, n_boot: int = 1000) -> dict[str, Any]:
    """The worst case of one threat model: per example, the smallest eps* of any attack of that norm (the twin-guided
    attacks on each side; on the engine side also the black-box radius at which Square fooled it, for the examples it
    ran on, and the engine-only attack's; on the twin side the black-box adversarials that fool the twin too), then
    its curve and AUAC with the bootstrap interval (:func:`side_record`), and, with ``tolerances``, the
    :func:`fidelity` of the two worst cases: the verdict fails when the engine's worst case is significantly apart
    from the twin's (a weakness only the engine has, found by any attack).

    Never above any single attack's AUAC (a per-example minimum can only lower every curve); ``otkit verify``
    re-derives it from the per-attack eps* and the stored black-box radii.
    """
    e = np.min(np.stack([np.where(np.isfinite(a), a, np.inf) for a in engine_eps]), axis=0)
    t = np.min(np.stack([np.where(np.isfinite(a), a, np.inf) for a in twin_eps]), axis=0)
    if blackbox is not None:
        bb = np.array([np.inf if v is None else float(v) for v in blackbox["eps"]])
        e[: bb.size] = np.minimum(e[: bb.size], bb)
        tb = np.array([np.inf if v is None else float(v) for v in blackbox.get("twin_eps") or []])
        t[: tb.size] = np.minimum(t[: tb.size], tb)
    if engine_only is not None:
        e = np.minimum(e, np.array([np.inf if v is None else float(v) for v in engine_only["eps"]]))
        if engine_only.get("twin_eps") is not None:  # absent in reports written before the mirror search
            t = np.minimum(t, np.array([np.inf if v is None else float(v) for v in engine_only["twin_eps"]]))
    extra = [f"{blackbox['attack']} (black box)"] if blackbox is not None else []
    extra += [f"{engine_only['attack']} (engine-only)"] if engine_only is not None else []
    return {
        "norm": norm,
        "eps_max": float(eps_max),
        "attacks": list(attacks) + extra,
        "eps_grid": [float(v) for v in eps_grid(eps_max, points)],
        "engine": side_record(e, eps_max, points, seed),
        "twin": side_record(t, eps_max, points, seed),
        "blackbox": dict(blackbox) if blackbox is not None else None,
        "engine_only": dict(engine_only) if engine_only is not None else None,
        **({"fidelity": fidelity(t, e, eps_max, tolerances, points=points, n_boot=n_boot, seed=seed)}
           if tolerances is not None and e.size else {}),
    }


def binomial_tail(n: int, k: int, p: float) -> float:
    r""":math:`P[X \ge k]` for :math:`X \sim \mathrm{Bin}(n, p)` (exact; :math:`k \le 0` gives 1)."""
    if k <= 0:
        return 1.0
    return float(sum(math.comb(n, i) * p**i * (1 - p) ** (n - i) for i in range(k, n + 1)))


def smallest_detectable_disagreement(n: int, tolerances: Tolerances) -> float:
    """The smallest clean disagreement rate that the one-sided exact binomial test of :func:`clean_judgement` can
    call significant on ``n`` examples (1.0 when none can be)."""
    r0 = 1 - tolerances.agreement
    for k in range(n + 1):
        if k / n > r0 and binomial_tail(n, k, r0) < tolerances.alpha:
            return k / n
    return 1.0


def smallest_detectable_gap(n: int, alpha: float) -> float:
    """The smallest accuracy-curve gap that McNemar's exact test can call significant on ``n`` paired examples: all
    ``k`` discordant pairs one way gives p = 2 / 2^k, so ``k >= log2(2 / alpha)`` (1.0 when n is smaller)."""
    k = mcnemar_min_discordant(alpha)
    return k / n if k <= n else 1.0


def mcnemar_min_discordant(alpha: float) -> int:
    """The fewest discordant pairs (all one way) McNemar's exact test calls significant at ``alpha``."""
    return math.ceil(math.log2(2 / alpha))


def clean_judgement(top1_agreement: float, n: int, tolerances: Tolerances, max_logit_gap: float | None = None,
                    gap_tolerance: float | None = None) -> dict[str, Any]:
    r"""The clean comparison: ``verdict``, the exact ``p_value`` and a ``reason``.

    Judged like the curves, a tolerance and an exact test: with :math:`d` disagreements among :math:`n` examples and
    the allowed rate :math:`r_0 = 1 -` ``tolerances.agreement``, ``mismatch`` when :math:`d/n > r_0` and the one-sided
    binomial test :math:`P[\mathrm{Bin}(n, r_0) \ge d] <` ``tolerances.alpha`` (one disagreement among 48 is not
    evidence of a 2% rate). Where ``gap_tolerance`` is given (an fp32 engine: export's FP32 tolerance; an fp16 engine:
    the float16 twin's rounding, :func:`_fp16_gap_tolerance`) the largest logit gap must also be within it: an engine
    that computes something else (a wrong input convention, another model) is a mismatch even where its predictions
    happen to agree.
    """
    r0 = 1 - tolerances.agreement
    d = int(round((1 - top1_agreement) * n))
    p = binomial_tail(n, d, r0) if n else 1.0
    if n and d / n > r0 and p < tolerances.alpha:
        return {"verdict": Verdict.MISMATCH, "p_value": p,
                "reason": f"clean top-1 agreement {top1_agreement:.4f} ({d} of {n} examples disagree) is below "
                          f"{tolerances.agreement:g}, significantly (binomial p {p:.2g} < {tolerances.alpha:g})"}
    if gap_tolerance is not None and max_logit_gap is None:
        return {"verdict": Verdict.MISMATCH, "p_value": p,
                "reason": "the engine's clean logits are not finite (NaN or inf): it computes something other than "
                          "the twin"}
    if gap_tolerance is not None and not max_logit_gap <= gap_tolerance:
        return {"verdict": Verdict.MISMATCH, "p_value": p,
                "reason": f"clean max logit gap {max_logit_gap:.3g} exceeds its tolerance {gap_tolerance:.3g}: "
                          "the engine computes something other than the twin"}
    note = "" if d / max(n, 1) <= r0 else f" (below {tolerances.agreement:g}, but not significantly: p {p:.2g})"
    return {"verdict": Verdict.MATCH, "p_value": p,
            "reason": f"clean top-1 agreement {top1_agreement:.4f} ({d} of {n} examples disagree){note}"}


def clean_verdict(top1_agreement: float, tolerances: Tolerances, max_logit_gap: float | None = None,
                  gap_tolerance: float | None = None, n: int | None = None) -> str:
    """:func:`clean_judgement`'s verdict; without ``n`` (reports written before the test), the plain threshold."""
    if n is None:
        if top1_agreement < tolerances.agreement:
            return Verdict.MISMATCH
        if gap_tolerance is not None and not (max_logit_gap is not None and max_logit_gap <= gap_tolerance):
            return Verdict.MISMATCH
        return Verdict.MATCH
    return clean_judgement(top1_agreement, n, tolerances, max_logit_gap, gap_tolerance)["verdict"]


def decide(clean: Mapping[str, Any], records: Sequence[Mapping[str, Any]], gates: Sequence[Gate],
           checks: Sequence[Mapping[str, Any]] = (), allowed: Sequence[str] = (),
           worst: Sequence[Mapping[str, Any]] = (), *, lower_limit: bool = True
           ) -> tuple[str, list[dict[str, Any]], str]:
    """The audit's verdict, gate records and status from its parts (:func:`run_audit`; ``otkit verify`` re-derives).

    The verdict is ``match`` only when the clean comparison, every attack's fidelity and every threat model's
    worst-case fidelity (engine vs twin over all attacks, black box and engine-only included) match. A gate names a threat
    model (``linf``, ``l2``, ``wasserstein``: its worst case) or one attack, and passes when the **lower** end of the
    engine's AUAC bootstrap interval there is at least ``min_auac`` (an AUAC from attacks is itself an upper bound;
    the point estimate is recorded beside it; ``lower_limit=False`` re-derives reports written before, whose gates
    compared the point estimate). The status is ``pass`` when the verdict is ``match``, every gate passed
    and no ``error`` flag of ``checks`` is outside ``allowed`` (ids waived with ``--allow-flag``), else ``fail``.
    """
    verdict = Verdict.MATCH
    if clean["verdict"] == Verdict.MISMATCH or any(r["fidelity"]["verdict"] == Verdict.MISMATCH for r in records) \
            or any(w.get("fidelity", {}).get("verdict") == Verdict.MISMATCH for w in worst):
        verdict = Verdict.MISMATCH
    sides = {r["name"]: r["engine"] for r in records}
    sides.update({w["norm"]: w["engine"] for w in worst})
    out = []
    for g in gates:
        side = sides[g.attack]
        if not lower_limit:
            out.append({"attack": g.attack, "min_auac": g.min_auac, "engine_auac": side["auac"],
                        "passed": side["auac"] >= g.min_auac})
            continue
        lower = float(side["auac_ci"][0])
        out.append({"attack": g.attack, "min_auac": g.min_auac, "engine_auac": side["auac"],
                    "engine_auac_lower": lower, "passed": lower >= g.min_auac})
    status = "pass" if verdict == Verdict.MATCH and all(g["passed"] for g in out) and \
        not failing_flags(checks, allowed) else "fail"
    return verdict, out, status


def failing_flags(checks: Sequence[Mapping[str, Any]], allowed: Sequence[str]) -> list[Mapping[str, Any]]:
    """The ``error`` flags that fail an audit: those whose id the user did not allow (docs/checks.md)."""
    return [c for c in checks if c["severity"] == C.Severity.ERROR.value and c["id"] not in allowed]


# ----------------------------------------------------------------------------------------------------------------------
# per-batch state, for --resume


def _state(out: Path, key: dict[str, Any], resume: bool) -> BatchState:
    """The audit's per (attack, batch) results under ``OUT/.audit-state/`` (:class:`evaluators.state.BatchState`)."""
    from evaluators.report import remove_report

    return BatchState(out, key, resume, dirname=STATE_DIR, what="audit", report="report.json",
                      remove_report=remove_report)


def check_resumable(out: Path, cfg: AuditConfig) -> None:
    """Refuse now, before any work, an audit state in ``out`` that ``cfg`` could not resume (its configuration part of
    the key differs; the engine, twin and data parts are checked when the audit starts). No state: nothing to check."""
    if not (out / STATE_DIR / "key.json").exists():
        return
    key = cfg.key()
    refuse_changed(out, saved_key(out / STATE_DIR, out, "audit"), key, sorted(key), "audit")


# ----------------------------------------------------------------------------------------------------------------------


@dataclass
class AuditInputs:
    """Who is audited on what: the files (for hashes and the report) and the loaded objects."""

    engine: Engine
    engine_path: Path
    engine_format: str
    twin: nn.Module
    twin_path: Path
    twin_info: Any  # kit.checkpoint.CheckpointInfo
    x: torch.Tensor
    y: torch.Tensor
    data: dict[str, Any]  # spec, split, fingerprint, n, seed
    pool: Any = None  # the whole split (kit.data.Dataset) the spot check draws from; None: no spot check


def load_audit_inputs(engine_path: Path, twin_path: Path, data_spec: str | None, split: str, samples: int, seed: int,
                      device: Any, providers: tuple[str, ...] = (), *, arch: str | None = None,
                      twin_options: Any = None, engine_input: Any = None, notice: bool = True) -> AuditInputs:
    """Load and cross-check the engine, the twin and the data (everything a user can get wrong, before any work).

    ``arch`` (``FILE.py:NAME``, the user's ``--arch``) is needed for a twin (or checkpoint engine) whose architecture
    is a Python file: nothing is imported unless named here and matching the checkpoint's record. The twin may be
    anything ``otkit models import`` takes (:func:`exporters.twins.load_any_twin`, with ``twin_options`` saying what
    its file does not); ``engine_input`` (an :class:`~kit.convention.InputConvention`) what a foreign engine takes.
    An ONNX twin that is the engine's own file takes the engine's input convention unless told otherwise, and is
    checked against ONNX Runtime on the audited examples.
    """
    from exporters.engines import check_compatible, load_engine
    from exporters.formats import engine_kind
    from exporters.twins import TwinOptions, load_any_twin, source_kind, with_engine_input
    from kit.data import load_dataset

    options = twin_options if twin_options is not None else TwinOptions(arch=arch)
    engine = load_engine(engine_path, device, providers=list(providers) or None, arch=arch,
                         input_convention=engine_input)
    kind = source_kind(twin_path)
    if kind == "checkpoint":
        twin = load_any_twin(twin_path, device, options, kind=kind)
        spec = twin.info.data_spec(data_spec, str(twin_path))
        ds = load_dataset(spec, split, seed=0)
    else:  # a model trained elsewhere, imported on the fly: the data comes first (its check samples)
        spec = data_spec or options.dataset
        if not spec:
            raise UserError(f"{twin_path} records no dataset: give --data SPEC")
        ds = load_dataset(spec, split, seed=0)
        options = with_engine_input(options, twin_path, engine_path, engine.input_convention)
        twin = load_any_twin(twin_path, device, options, samples=ds.subset(samples, seed=seed, notice=False).x,
                             kind=kind)
    info = twin.info
    ds.require_fit(info.input_shape, info.num_classes, str(twin_path))
    check_compatible(engine, ds.input_shape, ds.num_classes, spec)
    pool = ds
    ds = ds.subset(samples, seed=seed, notice=notice)  # notice: off where samples is a default nobody asked for
    data = {"spec": spec, "split": split, "fingerprint": ds.fingerprint, "n": len(ds), "seed": seed}
    return AuditInputs(engine=engine, engine_path=Path(engine_path), engine_format=engine_kind(engine_path),
                       twin=twin.model, twin_path=Path(twin_path), twin_info=info, x=ds.x.to(device),
                       y=ds.y.to(device), data=data, pool=pool)


def run_audit(inp: AuditInputs, cfg: AuditConfig, out: Path, *, resume: bool = False, command: str = "",
              versions: dict[str, Any] | None = None,
              world: World | None = None) -> tuple[dict[str, Any] | None, dict[str, dict[str, np.ndarray]]]:
    """Run the audit; return the report document and the engine-side adversarials (for ``adversarials.npz``).

    The caller writes them (:func:`evaluators.report.write_report`). Per-batch state is kept in
    ``out/.audit-state/`` while the audit runs; ``resume=True`` reuses the batches already done (the engine, twin,
    data and configuration must be the same).

    Under ``torchrun`` (``world``, :func:`kit.distributed.world`), every process calls this with the same inputs:
    each computes its own batches (``batch % processes == rank``), every batch's arrays go to every rank, and the
    lead rank alone derives the report; the others get ``(None, {})``. The report equals the one-process report but for
    the clean spot check's examples, drawn afresh by every audit (:func:`spot_check_record`).
    """
    from exporters.onnx import engine_sha256
    from kit.io import sha256_file

    t0 = time.perf_counter()
    started = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    engine, twin, x, y = inp.engine, inp.twin.eval(), inp.x, inp.y
    tols = cfg.tolerances
    engine_sha = engine_sha256(inp.engine_path)  # an ONNX file's external data files included
    twin_sha = "sha256:" + sha256_file(inp.twin_path)
    # everything that changes the numbers: the configuration, the files, what the engine takes, the twin as built
    # (an imported twin's weights and input convention, not only its source file) and the data
    key = {**cfg.key(), "engine": engine_sha, "twin": twin_sha, "data": inp.data["fingerprint"],
           "engine_input": engine.input_convention.to_dict(), "twin_weights": inp.twin_info.weights_sha256,
           "twin_input": _twin_origin(inp.twin_info).get("input_convention")}
    world = world or World()
    hosts = placement(world, inp.engine_format, x.device)
    state = _state(out, key, resume)  # checks only: a refused resume changes nothing on disk
    if world.lead:
        out.mkdir(parents=True, exist_ok=True)
    state.begin(world)
    bs = cfg.batch_size
    if world.lead:  # 1. clean twins check, on the audited examples and on examples drawn at random from the split
        clean = clean_record(twin, engine, x, y, bs, tols)
        if cfg.spot_check and inp.pool is not None:
            spot = spot_check_record(twin, engine, inp.pool, cfg.spot_check, secrets.randbits(32), bs, tols,
                                     x.device)
            clean = with_spot_check(clean, spot)

    # 2. sweeps, batch by batch: each batch independent of the others, resumable, and under torchrun computed by the
    # rank that owns it (batch % processes == rank); the black box and the engine-only search follow the same
    # batches, then every batch's arrays go to the lead rank, which alone judges and writes
    engine_mod = EngineModule(engine)
    records, flags, adversarials = [], [], {}
    starts = list(range(0, len(x), bs))
    parts: dict[str, dict[int, dict[str, np.ndarray]]] = {}  # this rank's batches, per part
    layout: list[tuple[str, int, Sequence[str]]] = []  # every part: its number of batches and array keys

    def shard(part: str, desc: str, total: int, keys: Sequence[str], work: Callable[[int, Callable], dict]) -> None:
        """Run ``work(b, on_step)`` (arrays ``keys``) for this rank's batches of ``part``, the batches of the first
        ``total`` examples (or load what a previous run saved)."""
        got = parts.setdefault(part, {})
        batches = [b for b, i in enumerate(starts) if i < total]
        layout.append((part, len(batches), keys))
        bar = open_bar(desc, total=total, unit="ex")  # moves within a batch, as its searches advance
        for b in (b for b in batches if world.owns(b)):
            i = starts[b]
            bar.set(i)
            saved = state.load(part, b)
            if saved is None:
                saved = work(b, bar.within(i, min(bs, total - i)))
                state.save(part, b, saved)
            got[b] = saved
        bar.close()

    for req in cfg.attacks:
        def guided(b: int, on_step: Callable, spec: AttackSpec = req.spec, eps_max: float = req.eps_max) -> dict:
            xb, yb = x[starts[b]:starts[b] + bs], y[starts[b]:starts[b] + bs]
            rt, re_, nfe = twin_guided_search(spec, twin, engine, xb, yb, eps_max, seed=cfg.seed, rungs=cfg.rungs,
                                              tol=cfg.tol, on_step=on_step)
            return {"eps_twin": rt.eps_star.cpu().numpy(), "eps_engine": re_.eps_star.cpu().numpy(),
                    "x_twin": rt.x_adv.cpu().float().numpy(), "x_engine": re_.x_adv.cpu().float().numpy(),
                    "fwd": rt.forwards.cpu().numpy(),  # one search for both sides
                    "bwd": rt.backwards.cpu().numpy(), "engine_fwd": np.array(nfe, dtype=np.int64)}
        shard(req.spec.name, req.spec.name, len(x), GUIDED_KEYS, guided)

    # 3. black box: Square (forward passes only) on the engine and on the twin, where it can still teach something, as
    # AutoAttack runs it only on the points still robust: one run per example at eps_max, then bisection, each step
    # warm-started from the smallest adversarial so far, which stops with an example once Square resisted at a radius
    # a twin-guided attack of the norm already needed on either side (below it, a radius lowers a worst case). Its
    # radii join the worst case, and where it fools an example below every twin-guided attack, a flag says so (and
    # whether the twin falls there too). No ladder: Square does not warm-start from its last iterate, and the warm
    # start that counts is the bisection's, from an adversarial found above; as strong as the ladder of every rung,
    # for about half its queries or less (bench/blackbox.py, docs/BENCHMARKS.md). The same search on the twin gives
    # both worst cases the same black-box effort, each side's adversarials judged by the other side too (as the
    # twin-guided search does): a search too weak on both models, or more effort on one side, does not read as an
    # engine defect.
    n_bb = min(cfg.blackbox_samples, len(x))
    eps_by_norm: dict[Norm, float] = {}
    for req in cfg.attacks:
        eps_by_norm[req.spec.norm] = max(eps_by_norm.get(req.spec.norm, 0.0), req.eps_max)
    names_by_norm = {norm: [r.spec.name for r in cfg.attacks if r.spec.norm is norm] for norm in eps_by_norm}
    for norm, eps_max in eps_by_norm.items():
        if norm not in LP_NORMS or n_bb == 0:
            continue

        def blackbox_batch(b: int, on_step: Callable, norm: Norm = norm, eps_max: float = eps_max) -> dict:
            m = min(bs, n_bb - starts[b])
            own = [parts[name][b] for name in names_by_norm[norm]]
            best = np.min([p["eps_engine"][:m] for p in own], axis=0)
            best_t = np.min([p["eps_twin"][:m] for p in own], axis=0)
            known = torch.from_numpy(np.maximum(best, best_t)).to(x.device)  # below it, a radius lowers a worst case
            xb, yb = x[starts[b]:starts[b] + m], y[starts[b]:starts[b] + m]
            return _blackbox_batch(twin, engine, engine_mod, xb, yb, norm, eps_max, known, cfg, on_step)
        shard(f"blackbox-{norm.value}", f"black box: square-{norm.value}, engine and twin", n_bb, BLACKBOX_KEYS,
              blackbox_batch)

    # 3b. engine-only: where the engine's own arithmetic (int8 rounding, fp16) is weaker than the twin's, found by the
    # differential attack on a differentiable replica of it (kit/attacks/differential.py), judged by the engine
    replica, replica_kind = build_replica(inp) if cfg.engine_only else (None, "not run (--no-engine-only)")
    for norm, eps_max in eps_by_norm.items():
        if replica is None or norm not in LP_NORMS:
            continue

        def engine_only_batch(b: int, on_step: Callable, norm: Norm = norm, eps_max: float = eps_max) -> dict:
            xb, yb = x[starts[b]:starts[b] + bs], y[starts[b]:starts[b] + bs]
            return _engine_only_batch(twin, replica, engine, xb, yb, norm, eps_max, cfg, on_step)
        shard(f"engine-only-{norm.value}", f"engine-only: differential-{norm.value}", len(x), ("engine", "twin"),
              engine_only_batch)

    # every batch's arrays on every rank, bit for bit (each from the rank that computed it); the lead goes on alone
    all_parts: dict[str, list[dict[str, np.ndarray]]] = {}
    for part, n_batches, keys in layout:
        all_parts[part] = [world.share(b, parts[part].get(b), keys) for b in range(n_batches)]
    if not world.lead:
        return None, {}

    flags += C.check_outputs(engine_mod, x[:200], "the engine")
    flags += C.check_outputs(twin, x[:200], "the twin")
    flags += C.check_gradients(twin, x[:200], y[:200])
    log.debug("comparing the engine's graph with the twin's export")
    graph = C.compare_graph(engine, inp.engine_path, twin, inp.twin_info)
    flags += C.check_files(engine, inp.engine_path, inp.twin_info, graph)
    by_norm: dict[Norm, list[tuple[float, torch.Tensor]]] = {}
    twin_by_norm: dict[Norm, list[torch.Tensor]] = {}
    for req in cfg.attacks:
        name, eps_max = req.spec.name, req.eps_max
        got = all_parts[name]
        cat = {k: np.concatenate([p[k] for p in got]) for k in ("eps_twin", "eps_engine", "x_twin", "x_engine",
                                                                "fwd", "bwd")}
        engine_fwd = sum(int(p["engine_fwd"]) for p in got)
        eps_t = torch.from_numpy(cat["eps_twin"])
        eps_e = torch.from_numpy(cat["eps_engine"])
        x_e = torch.from_numpy(cat["x_engine"]).to(x.device)
        x_t = torch.from_numpy(cat["x_twin"]).to(x.device)
        grid = eps_grid(eps_max, cfg.points)
        cfg_extra = {} if req.spec.cls in ("FMN", "TrustRegion") else {"rungs": cfg.rungs,
                                                                       "tol": cfg.tol or eps_max / 256}
        records.append({
            "name": name,
            "norm": req.spec.norm.value,
            "eps_max": eps_max,
            "config": {**req.spec.config(), **cfg_extra},
            "eps_grid": [float(v) for v in grid],
            "twin": side_record(eps_t, eps_max, cfg.points, cfg.seed),
            "engine": side_record(eps_e, eps_max, cfg.points, cfg.seed),
            "fidelity": fidelity(eps_t, eps_e, eps_max, tols, points=cfg.points, n_boot=cfg.n_boot, seed=cfg.seed),
            "passes": {"forward_per_example": float(cat["fwd"].mean()),
                       "backward_per_example": float(cat["bwd"].mean()),
                       "engine_forward_per_example": engine_fwd / max(len(x), 1)},
        })
        for model, xa, eps in ((twin, x_t, eps_t), (engine_mod, x_e, eps_e)):
            f = C.check_reverify(model, x, y, xa, eps.to(x.device), req.spec.norm, name)
            flags += [f] if f else []
        fooled = torch.isfinite(eps_e) & (eps_e <= eps_max)
        sel = fooled.nonzero().squeeze(1)
        with torch.no_grad():
            pred = _predict(engine, x_e[sel.to(x.device)], bs).argmax(1).cpu() if sel.numel() else sel
        adversarials[name] = {"x": cat["x_engine"][sel.numpy()], "y": y.cpu()[sel].numpy().astype(np.int64),
                              "index": sel.numpy().astype(np.int64), "eps": cat["eps_engine"][sel.numpy()],
                              "pred": pred.numpy().astype(np.int64)}
        by_norm.setdefault(req.spec.norm, []).append((eps_max, eps_e))
        twin_by_norm.setdefault(req.spec.norm, []).append(eps_t)

    blackbox: dict[Norm, dict[str, Any]] = {}
    for norm, items in by_norm.items():
        if norm not in LP_NORMS or n_bb == 0:
            continue
        eps_max = eps_by_norm[norm]
        got = all_parts[f"blackbox-{norm.value}"]
        bb = {k: np.concatenate([p[k] for p in got]) for k in BLACKBOX_KEYS}
        best = torch.stack([e for _, e in items]).min(0).values[:n_bb].cpu().double()
        found, found_t = torch.from_numpy(bb["found"]), torch.from_numpy(bb["found_t"])
        fools_twin, fools_engine = torch.from_numpy(bb["fools_twin"]), torch.from_numpy(bb["fools_engine"])
        margin = cfg.tol or eps_max / 256  # both searches bisect to this: closer radii are the same boundary
        contra = torch.isfinite(found) & (found + margin < best)
        if contra.any():
            # Does Square's adversarial fool the twin too? Then the twin-guided attacks are merely too weak there;
            # if only the engine falls, the twin's gradients do not lead where the engine is vulnerable.
            n_c, n_t = int(contra.sum()), int((contra & fools_twin).sum())
            why = []
            if n_t:
                why.append(f"{n_t} of them fool the twin as well (the twin-guided attacks are too weak there)")
            if n_c - n_t:
                why.append(f"{n_c - n_t} fool only the engine (the twin's gradients do not represent the engine "
                           "there)")
            flags.append(C.flag("black-box-beats-white-box",
                                f"Square on the engine fools {n_c} of {n_bb} example(s) at a smaller radius than every "
                                f"twin-guided {norm.value} attack; " + "; ".join(why) + "; the worst-case curve counts "
                                "them", attack=f"square-{norm.value}"))
        inf = torch.full_like(found, math.inf)
        eng = torch.minimum(found, torch.where(fools_engine, found_t, inf))
        tw = torch.minimum(found_t, torch.where(fools_twin, found, inf))
        blackbox[norm] = {"attack": f"square-{norm.value}", "queries": cfg.blackbox_queries, "samples": n_bb,
                          "radii": "one run at eps_max, then bisection warm-started from each adversarial, stopped "
                                   "once Square resisted at a radius a twin-guided attack needed (on either side); "
                                   "on the engine and on the twin",
                          "eps": _radii(eng, eps_max), "twin_eps": _radii(tw, eps_max)}

    engine_only: dict[Norm, dict[str, Any]] = {}
    for norm, items in by_norm.items():
        if replica is None or norm not in LP_NORMS:
            continue
        eps_max = eps_by_norm[norm]
        got = all_parts[f"engine-only-{norm.value}"]
        eps_eo = torch.from_numpy(np.concatenate([p["engine"] for p in got]))
        eps_to = torch.from_numpy(np.concatenate([p["twin"] for p in got]))
        grid = eps_grid(eps_max, cfg.points)
        t_best = torch.stack(twin_by_norm[norm]).min(0).values.double().numpy()
        e_best = torch.stack([e for _, e in items]).min(0).values.double().numpy()
        engine_only[norm] = {
            "attack": f"differential-{norm.value}", "replica": replica_kind, "steps": cfg.engine_only_steps,
            "eps": [float(v) if math.isfinite(v) else None for v in eps_eo.tolist()],
            # the mirror search: twin fooled, engine right (the twin side of the worst case gets the same effort)
            "twin_eps": [float(v) if math.isfinite(v) else None for v in eps_to.tolist()],
            # engine-only adversarials within each grid radius: the differential attack's, and the twin-guided
            # search's (an engine eps* at most r where the twin held beyond r)
            "count": [int((eps_eo.numpy() <= r).sum()) for r in grid],
            "twin_guided_count": [int(((e_best <= r) & (t_best > r)).sum()) for r in grid],
        }

    # the worst case per threat model: per example, the smallest radius at which any attack fooled the engine (the
    # twin-guided attacks of that norm, the black box and the engine-only attack), as AutoAttack reports its ensemble
    worst = []
    for norm, items in by_norm.items():
        names = [r["name"] for r in records if r["norm"] == norm.value]
        worst.append(worst_case_record(norm.value, max(e for e, _ in items), names,
                                       [_as_float_array(e) for _, e in items],
                                       [_as_float_array(t) for t in twin_by_norm[norm]],
                                       blackbox.get(norm), cfg.points, cfg.seed, engine_only.get(norm),
                                       tolerances=tols, n_boot=cfg.n_boot))

    # an engine curve above its twin's: a search artefact (the worst case brings it back) or a real difference
    worst_by_norm = {w["norm"]: w for w in worst}
    for r in records:
        f = C.check_engine_above_twin(r, worst_by_norm.get(r["norm"]), others=records, tol_auac=tols.auac,
                                      tol_curve=tols.curve, alpha=tols.alpha, n_boot=cfg.n_boot, seed=cfg.seed)
        flags += [f] if f else []

    # how much these many examples can see: a test that cannot detect the tolerated difference says so
    blind_gap = smallest_detectable_gap(len(x), tols.alpha)
    blind_agree = smallest_detectable_disagreement(len(x), tols)
    if blind_gap > tols.curve:
        flags.append(C.flag("test-blind",
                            f"with {len(x)} examples McNemar's test at alpha {tols.alpha:g} detects curve gaps of "
                            f"{blind_gap:.3f} or more, above --tol-curve {tols.curve:g}; the clean test detects "
                            f"disagreement rates of {blind_agree:.3f} or more: a 'match' here cannot rule out smaller "
                            f"differences (audit about {math.ceil(mcnemar_min_discordant(tols.alpha) / tols.curve)} "
                            "examples to see the tolerated gap)"))

    # 4. verdict and gates (the same function re-derives them in `otkit verify`)
    checks = [f.to_dict() for f in flags]
    verdict, gates, status = decide(clean, records, cfg.gates, checks, cfg.allowed_flags, worst)

    info = inp.twin_info
    doc = {
        "schema": SCHEMA,
        "status": status,
        "verdict": verdict,
        "auac_bound": AUAC_BOUND,
        "engine": {"path": str(inp.engine_path), "sha256": engine_sha, "format": inp.engine_format,
                   "precision": engine.precision, "providers": list(getattr(engine, "providers", []) or []),
                   "input_convention": engine.input_convention.to_dict(),
                   **({"graph": graph} if graph is not None else {})},
        "twin": {"path": str(inp.twin_path), "sha256": twin_sha, "arch": info.arch_name,
                 "weights_sha256": info.weights_sha256, **_twin_origin(info)},
        "data": dict(inp.data),
        "clean": clean,
        "tolerances": asdict(tols),
        "worst_case": worst,
        "replica": replica_kind,
        "attacks": records,
        "checks": checks,
        "allowed_flags": sorted(set(cfg.allowed_flags)),
        "gates": gates,
        "statistics": {"points": cfg.points, "n_boot": cfg.n_boot},
        "artifacts": {"adversarials": "adversarials.npz" if adversarials else None},
        "provenance": {"kit_version": kit.__version__, "versions": dict(versions or {}), "device": str(x.device),
                       "seed": cfg.seed, "command": command, "started": started,
                       "seconds": time.perf_counter() - t0, "processes": world.size, "hosts": hosts},
    }
    return doc, adversarials


def _twin_origin(info: Any) -> dict[str, Any]:
    """The twin's input convention and, for a model trained elsewhere, how it was read (report fields)."""
    from kit.convention import InputConvention

    out: dict[str, Any] = {}
    folded = InputConvention.from_folded(info.normalization)
    if folded is not None:
        out["input_convention"] = folded.to_dict()
    if info.source:
        out["source"] = {k: v for k, v in info.source.items() if k != "conversion"}
    return out


def finish(out: Path) -> None:
    """Remove the per-batch state once the report is written."""
    shutil.rmtree(out / STATE_DIR, ignore_errors=True)
