r"""``otkit certify``: provable robustness of the deployed engine by randomized smoothing (docs/certify.md).

The engine itself is the base classifier f; the certificate is about the smoothed classifier

.. math::

    g(x) = \arg\max_c \; P_\delta\big(f(x + \delta) = c\big),

with Gaussian noise (L2 radii, Cohen, Rosenfeld & Kolter, ICML 2019) or Laplace noise on the flows between
neighbouring pixels (Wasserstein radii, Levine & Feizi, AISTATS 2020); :mod:`kit.smoothing` holds the noise models,
the bounds and CERTIFY. Only forward passes of the engine are needed, so any engine the kit runs is certified as
deployed (ONNX in any precision, TensorRT).

Per example (noise seeded by the run's seed and the example's index, so a certificate does not depend on batching or
on how many processes ran it): ``n0`` samples choose the class, ``n`` fresh samples count it, the one-sided
Clopper-Pearson bound ``p_lower`` at confidence 1 - alpha gives the radius (0 for an abstention or a wrong class).
The certified accuracy curve over radii and the **certified AUAC** ``mean(min(R, r_max)) / r_max`` are lower bounds:
each radius holds with probability at least 1 - alpha over the sampling.

With a twin, the smoothed engine is also attacked (:mod:`kit.attacks.smoothadv`: the twin's gradients averaged over
noise, each candidate judged by the engine's smoothed prediction, PREDICT): its curve is an empirical upper bound, and
the report shows both. An attack that beats a certified radius is the ``certificate-violated`` error flag.

Long runs keep per-batch state under ``OUT/.certify-state/`` (:class:`evaluators.state.BatchState`) and resume.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import math
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn

import kit
from evaluators import checks as C
from evaluators.audit import EngineModule, failing_flags, load_audit_inputs, placement
from evaluators.certificate import ATTACK_BOUND, CERTIFIED_BOUND, certified_curve, remove_certificate
from evaluators.curves import auac
from evaluators.state import BatchState
from exporters.engines import Engine
from kit.distributed import World
from kit.errors import UserError
from kit.runtime import open_bar

SCHEMA = "otkit.certificate/1"
STATE_DIR = ".certify-state"



#: default noise samples per example (``--n``) by device: Cohen et al. use 100,000; a CPU gets a tenth
DEFAULT_N = {"cuda": 100_000, "cpu": 10_000}


@dataclass(frozen=True)
class CertifyConfig:
    """What a certificate runs; everything that changes its numbers is part of the resume key."""

    smoothing: str
    sigma: float
    n: int
    n0: int = 100
    alpha: float = 0.001
    noise_batch: int | None = None  # noisy copies per engine call; None: the engine's max batch
    batch_size: int = 16
    seed: int = 0
    points: int = 33
    r_max: float | None = None
    min_certified_auac: float | None = None
    allowed_flags: Sequence[str] = ()
    attack: bool = True
    attack_n: int = 1000
    attack_m: int = 8
    attack_steps: int = 10
    attack_radii: int = 8

    def __post_init__(self) -> None:
        from kit.smoothing import make_noise

        make_noise(self.smoothing, self.sigma)  # the kind and sigma, checked once
        for name in ("n", "n0", "noise_batch", "batch_size", "attack_n", "attack_m", "attack_steps", "attack_radii"):
            v = getattr(self, name)
            if v is None and name == "noise_batch":
                continue
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise UserError(f"{name.replace('_', '-')} must be an integer >= 1, got {v!r}")
        if not (isinstance(self.alpha, float | int) and 0 < self.alpha < 1):
            raise UserError(f"alpha must be in (0, 1), got {self.alpha!r}")
        if self.points < 2:
            raise UserError(f"points must be >= 2, got {self.points}")
        if self.r_max is not None and not (math.isfinite(self.r_max) and self.r_max > 0):
            raise UserError(f"r-max must be a positive number, got {self.r_max!r}")
        if self.min_certified_auac is not None and not 0 <= self.min_certified_auac <= 1:
            raise UserError(f"min-certified-auac must be in [0, 1], got {self.min_certified_auac!r}")
        unknown = [f for f in self.allowed_flags if f not in C.CHECKS]
        if unknown:
            raise UserError(f"unknown flag id(s) {', '.join(unknown)} in --allow-flag; known: {', '.join(C.CHECKS)}")

    def noise(self) -> Any:
        from kit.smoothing import make_noise

        return make_noise(self.smoothing, self.sigma)

    def key(self) -> dict[str, Any]:
        """The JSON-able identity of the certificate's numbers (for ``--resume``)."""
        return {"smoothing": self.smoothing, "sigma": self.sigma, "n": self.n, "n0": self.n0, "alpha": self.alpha,
                "batch_size": self.batch_size, "seed": self.seed,  # not noise_batch: the noise is batch-independent
                "attack": [self.attack, self.attack_n, self.attack_m, self.attack_steps, self.attack_radii]}


def default_n(device: Any) -> int:
    """``--n`` when not given: :data:`DEFAULT_N` for the device's type."""
    return DEFAULT_N["cuda" if torch.device(device).type == "cuda" else "cpu"]


@dataclass
class CertifyInputs:
    """What is certified on what: the engine (and its file), an optional twin, the examples."""

    engine: Engine
    engine_path: Path
    engine_format: str
    twin: nn.Module | None
    twin_path: Path | None
    twin_info: Any
    x: torch.Tensor
    y: torch.Tensor
    data: dict[str, Any]  # spec, split, fingerprint, n, seed


def load_certify_inputs(engine_path: Path, twin_path: Path | None, data_spec: str | None, split: str, samples: int,
                        seed: int, device: Any, providers: tuple[str, ...] = (), *, arch: str | None = None,
                        twin_options: Any = None, engine_input: Any = None) -> CertifyInputs:
    """Load and cross-check the engine, the optional twin and the data, before any work.

    With a twin this is the audit's loading (:func:`evaluators.audit.load_audit_inputs`: the same checks, the data
    the twin records by default); without one, ``data_spec`` is required and checked against the engine.
    """
    from exporters.formats import engine_kind

    if twin_path is not None:
        a = load_audit_inputs(engine_path, twin_path, data_spec, split, samples, seed, device, providers, arch=arch,
                              twin_options=twin_options, engine_input=engine_input)
        return CertifyInputs(engine=a.engine, engine_path=a.engine_path, engine_format=a.engine_format,
                             twin=a.twin.eval(), twin_path=a.twin_path, twin_info=a.twin_info, x=a.x, y=a.y,
                             data=a.data)
    from exporters.engines import check_compatible, load_engine
    from kit.data import load_dataset

    if not data_spec:
        raise UserError("give --data SPEC (or --twin, whose checkpoint records its dataset)")
    engine = load_engine(engine_path, device, providers=list(providers) or None, arch=arch,
                         input_convention=engine_input)
    ds = load_dataset(data_spec, split, seed=0)
    check_compatible(engine, ds.input_shape, ds.num_classes, data_spec)
    ds = ds.subset(samples, seed=seed)
    data = {"spec": data_spec, "split": split, "fingerprint": ds.fingerprint, "n": len(ds), "seed": seed}
    return CertifyInputs(engine=engine, engine_path=Path(engine_path), engine_format=engine_kind(engine_path),
                         twin=None, twin_path=None, twin_info=None, x=ds.x.to(device), y=ds.y.to(device), data=data)


def _state(out: Path, key: dict[str, Any], resume: bool) -> BatchState:
    return BatchState(out, key, resume, dirname=STATE_DIR, what="certificate", report="certificate.json",
                      remove_report=remove_certificate)


class _Labels:
    """The engine as CERTIFY's base classifier: a batch of noisy images -> predicted labels, counting forwards."""

    def __init__(self, engine: Engine) -> None:
        self.engine, self.forwards = engine, 0

    @torch.no_grad()
    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        self.forwards += len(x)
        return self.engine(x).argmax(1)


def run_certify(inp: CertifyInputs, cfg: CertifyConfig, out: Path, *, resume: bool = False, command: str = "",
                versions: dict[str, Any] | None = None, world: World | None = None) -> dict[str, Any] | None:
    """Certify every example of ``inp`` (and, with a twin, attack the smoothed engine); return the document.

    The caller writes it (:func:`evaluators.certificate.write_certificate`). Under ``torchrun`` (``world``), each
    process certifies its own batches (``batch % processes == rank``; the noise is drawn per example from (seed,
    index), so the counts do not depend on who computes them), every batch's arrays go to every rank, and the lead
    rank alone returns the document; the others get ``None``.
    """
    from exporters.onnx import engine_sha256
    from kit.io import sha256_file
    from kit.smoothing import certify, example_generator, lower_confidence_bound, noise_stream

    t0 = time.perf_counter()
    started = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    engine, x, y = inp.engine, inp.x, inp.y
    if cfg.noise_batch is None:
        cfg = dataclasses.replace(cfg, noise_batch=int(engine.max_batch))
    noise = cfg.noise()
    engine_sha = engine_sha256(inp.engine_path)
    twin_sha = "sha256:" + sha256_file(inp.twin_path) if inp.twin_path is not None else None
    world = world or World()
    hosts = placement(world, inp.engine_format, x.device)
    # the examples are split over the ranks: one stream only if every rank draws it (else verify compares statistically)
    streams = sorted(set(world.gather_text(noise_stream(x.device))))
    stream = streams[0] if len(streams) == 1 else "mixed: " + "; ".join(streams)
    # the noise stream is in the key: batches resumed on another device would draw other noise than those kept
    key = {**cfg.key(), "engine": engine_sha, "twin": twin_sha, "data": inp.data["fingerprint"],
           "engine_input": engine.input_convention.to_dict(), "noise_stream": stream}
    state = _state(out, key, resume)
    if world.lead:
        out.mkdir(parents=True, exist_ok=True)
    state.begin(world)

    # the audit's engine-as-module
    flags = C.check_outputs(EngineModule(engine), x[:200], "the engine") if world.lead else []
    labels = _Labels(engine)
    n_ex, bs = len(x), cfg.batch_size
    bar = open_bar(f"certify: {cfg.smoothing} sigma {cfg.sigma:g}", total=n_ex * (cfg.n0 + cfg.n), unit="sample")
    mine: dict[int, dict[str, np.ndarray]] = {}
    starts = list(range(0, n_ex, bs))
    for b, i in enumerate(starts):
        if not world.owns(b):
            continue
        saved = state.load("certify", b)
        if saved is None:
            rows = []
            for j in range(i, min(i + bs, n_ex)):
                gen = example_generator(cfg.seed, j, x.device)
                c = certify(labels, x[j], noise, cfg.n0, cfg.n, cfg.alpha, cfg.noise_batch, gen, engine.num_classes)
                rows.append((c.prediction, c.count))
                bar.set((j + 1) * (cfg.n0 + cfg.n))
            saved = {"prediction": np.array([r[0] for r in rows], dtype=np.int64),
                     "count": np.array([r[1] for r in rows], dtype=np.int64)}
            state.save("certify", b, saved)
        mine[b] = saved
        bar.set(min(i + bs, n_ex) * (cfg.n0 + cfg.n))
    bar.close()
    parts = [world.share(b, mine.get(b), ["prediction", "count"]) for b in range(len(starts))]
    prediction = np.concatenate([p["prediction"] for p in parts])
    count = np.concatenate([p["count"] for p in parts])
    # every derived figure from the counts alone, as `otkit verify` re-derives it
    p_lower = np.where(prediction >= 0, lower_confidence_bound(count, cfg.n, cfg.alpha), 0.0)
    radius = np.where(prediction >= 0, noise.radius(p_lower), 0.0)
    label = y.cpu().numpy().astype(np.int64)
    correct = prediction == label
    ceiling = float(noise.max_radius(cfg.n, cfg.alpha))
    r_max = float(cfg.r_max) if cfg.r_max is not None else ceiling
    curve = certified_curve(radius, correct, r_max, cfg.points)

    attack = None
    if inp.twin is not None and cfg.attack:
        attack = attack_smoothed(inp, cfg, noise, prediction, radius, r_max, state, world)
    engine_forwards = world.total(labels.forwards)  # every rank's
    if not world.lead:
        return None
    if attack is not None:
        if attack["violations"]:
            v = attack["violations"]
            flags.append(C.flag("certificate-violated",
                                f"the attack on the smoothed engine found {len(v)} example(s) classified as another "
                                f"class (PREDICT, p <= alpha) within their certified radius (first: example "
                                f"{v[0]['index']}, radius {v[0]['radius']:.4g}, attacked at {v[0]['eps']:.4g}): a "
                                "certificate is wrong, or the sampling failed at rate alpha",
                                attack=attack["name"]))

    checks = [f.to_dict() for f in flags]
    gates = []
    if cfg.min_certified_auac is not None:
        gates.append({"min_certified_auac": cfg.min_certified_auac, "certified_auac": curve["auac"],
                      "passed": curve["auac"] >= cfg.min_certified_auac})
    status = "pass" if all(g["passed"] for g in gates) and not failing_flags(checks, cfg.allowed_flags) else "fail"
    info = inp.twin_info
    doc = {
        "schema": SCHEMA,
        "status": status,
        "bound": CERTIFIED_BOUND,
        "engine": {"path": str(inp.engine_path), "sha256": engine_sha, "format": inp.engine_format,
                   "precision": engine.precision, "providers": list(getattr(engine, "providers", []) or []),
                   "input_convention": engine.input_convention.to_dict()},
        "twin": None if inp.twin_path is None else {"path": str(inp.twin_path), "sha256": twin_sha,
                                                    "arch": info.arch_name, "weights_sha256": info.weights_sha256},
        "data": dict(inp.data),
        "smoothing": {**noise.to_dict(), "n0": cfg.n0, "n": cfg.n, "alpha": cfg.alpha,
                      "noise_batch": cfg.noise_batch, "max_radius": ceiling},
        "examples": {"label": label.tolist(), "prediction": prediction.tolist(), "count": count.tolist(),
                     "p_lower": [float(v) for v in p_lower], "radius": [float(v) for v in radius]},
        "certified": {**curve, "smoothed_accuracy": float(correct.mean()) if len(correct) else 0.0,
                      "abstain_rate": float((prediction < 0).mean()) if len(prediction) else 0.0,
                      "mean_radius": float(np.where(correct, radius, 0.0).mean()) if len(correct) else 0.0},
        "attack": attack,
        "checks": checks,
        "allowed_flags": sorted(set(cfg.allowed_flags)),
        "gates": gates,
        "provenance": {"kit_version": kit.__version__, "versions": dict(versions or {}), "device": str(x.device),
                       "noise_stream": stream,  # whether verify can draw the same noise again
                       "seed": cfg.seed, "command": command, "started": started,
                       "engine_forwards": engine_forwards, "seconds": time.perf_counter() - t0,
                       "processes": world.size, "hosts": hosts},
    }
    return doc


class SoftSmoothed(nn.Module):
    r"""The Monte Carlo soft smoothed classifier of ``model`` as a module: log of the average softmax over ``m`` noisy
    copies per input, fresh draws at every call (Salman et al. 2019, objective (S)).

    Any attack of the kit run on it is a SmoothAdv-style attack: PGD's cross-entropy on these log-probabilities is
    exactly :math:`-\log \frac1m \sum_i \mathrm{softmax}(f(x + \delta_i))_y`. The draws come from ``noise``
    (:class:`kit.smoothing.NoiseModel`), as additive offsets found at the input's own (detached) value, so the
    Wasserstein flow noise is the one the certificate used (it scales with the image's mass, which the balanced
    Wasserstein attacks keep).
    """

    def __init__(self, model: nn.Module, noise: Any, m: int, generator: torch.Generator) -> None:
        super().__init__()
        self.model, self.noise, self.m, self.generator = model, noise, int(m), generator

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from kit.attacks.smoothadv import soft_smoothed_log_probs

        with torch.no_grad():
            base = x.detach()
            offsets = torch.stack([self.noise.sample(xi, self.m, self.generator) - xi for xi in base], dim=1)
        return soft_smoothed_log_probs(self.model, x, offsets, 1.0)


#: the attack run on the soft smoothed twin per smoothing kind (its threat model is the certificate's)
SMOOTHED_ATTACK = {"gaussian": "pgd-l2", "wasserstein": "wasserstein-pgd"}


def attack_smoothed(inp: CertifyInputs, cfg: CertifyConfig, noise: Any, prediction: np.ndarray, radius: np.ndarray,
                    r_max: float, state: BatchState, world: World | None = None) -> dict[str, Any]:
    r"""The attack curve of the smoothed engine (an empirical upper bound) and the certificates it contradicts.

    Per example, a ladder of ``cfg.attack_radii`` radii up to ``r_max``: at each, the threat model's attack
    (:data:`SMOOTHED_ATTACK`, ``cfg.attack_steps`` steps) on the soft smoothed *twin* (:class:`SoftSmoothed`, m =
    ``cfg.attack_m``), warm-started from the last rung, and its candidate judged by the *engine's* smoothed
    prediction (Cohen et al.'s PREDICT, ``cfg.attack_n`` samples, the binomial test at ``cfg.alpha``). An example is
    fooled at the first radius where PREDICT names another class than its label (an abstention fools nobody: it
    proves nothing about g); its eps* is the candidate's distance (L2) or the rung's radius (Wasserstein, whose
    candidates lie inside it). Examples CERTIFY already assigned to a wrong class have eps* 0.

    A *violation* is a candidate inside an example's certified radius that PREDICT assigns to another class than the
    certified one: ``certificate-violated``. Per-example noise comes from (seed, index) generators, rung by rung.
    Under ``torchrun`` each process attacks its own batches (``world``), and every rank gets every batch's result.
    """
    world = world or World()
    from kit.attacks.registry import get_attack
    from kit.smoothing import example_generator, predict

    twin = inp.twin
    assert twin is not None  # the caller checks
    x, y, engine = inp.x, inp.y, inp.engine
    n_all = len(x)
    name = SMOOTHED_ATTACK[cfg.smoothing]
    rungs = [r_max * (k + 1) / cfg.attack_radii for k in range(cfg.attack_radii)]
    labels = _Labels(engine)
    eps_star = np.full(n_all, np.inf)
    eps_star[(prediction >= 0) & (prediction != y.cpu().numpy())] = 0.0
    violations: list[dict[str, Any]] = []
    bar = open_bar(f"attack: {name} on the smoothed engine", total=n_all * len(rungs), unit="rung")
    starts = list(range(0, n_all, cfg.batch_size))
    mine: dict[int, dict[str, np.ndarray]] = {}
    for b, i in enumerate(starts):
        if not world.owns(b):
            continue
        saved = state.load("attack", b)
        if saved is None:
            idx = np.arange(i, min(i + cfg.batch_size, n_all))
            xb, yb = x[i:i + len(idx)], y[i:i + len(idx)]
            found = eps_star[idx].copy()
            viol = np.full((len(idx), 4), -1.0)  # rung radius, distance, attacked class, p-value
            # the soft twin's draws: one stream per batch, apart from every PREDICT's (indices past theirs)
            gen = example_generator(cfg.seed, (cfg.attack_radii + 1) * n_all + i, x.device)
            soft = SoftSmoothed(twin, noise, cfg.attack_m, gen)
            attack = get_attack(name).build(soft, seed=cfg.seed, steps=cfg.attack_steps)
            x_adv = xb.clone()
            for k, r in enumerate(rungs):
                todo = np.nonzero(~np.isfinite(found))[0]
                bar.set(i * len(rungs) + (k + 1) * len(idx))
                if todo.size == 0:
                    break
                sel = torch.from_numpy(todo).to(x.device)
                res = attack(xb[sel], yb[sel], eps=r, init=x_adv[sel])
                x_adv[sel] = res.x_adv.detach()
                for t, j in zip(todo.tolist(), res.x_adv.detach()):
                    g = example_generator(cfg.seed, (k + 1) * n_all + int(idx[t]), x.device)
                    label, p_value = predict(labels, j, noise, cfg.attack_n, cfg.alpha, cfg.noise_batch, g,
                                             engine.num_classes)
                    if label < 0 or label == int(yb[t]):
                        continue
                    dist = float((j - xb[t]).flatten().norm()) if noise.norm == "l2" else r
                    found[t] = dist
                    cert = int(prediction[idx[t]])
                    if cert >= 0 and label != cert and dist < radius[idx[t]]:
                        viol[t] = (r, dist, label, p_value)
            saved = {"eps": found, "violations": viol}
            state.save("attack", b, saved)
        mine[b] = saved
        bar.set(min(i + cfg.batch_size, n_all) * len(rungs))
    bar.close()
    for b, i in enumerate(starts):
        saved = world.share(b, mine.get(b), ["eps", "violations"])
        eps_star[i:i + len(saved["eps"])] = saved["eps"]
        for t, (_r, dist, label, p_value) in enumerate(saved["violations"]):
            if label >= 0:
                j = i + t
                violations.append({"index": j, "radius": float(radius[j]), "eps": float(dist),
                                   "certified_class": int(prediction[j]), "attacked_class": int(label),
                                   "p_value": float(p_value)})
    grid = np.linspace(0.0, r_max, cfg.points)
    accuracy = [float((eps_star > r).mean()) if n_all else 0.0 for r in grid]
    return {"name": f"smoothadv-{name}", "bound": ATTACK_BOUND, "attack": name,
            "method": f"{name} on the soft smoothed twin (m {cfg.attack_m} noise samples per step), each candidate "
                      f"judged by the engine's smoothed prediction (PREDICT, {cfg.attack_n} samples)", "m": cfg.attack_m,
            "steps": cfg.attack_steps, "predict_n": cfg.attack_n, "radii": [float(r) for r in rungs],
            "eps_grid": [float(v) for v in grid],
            "eps_star": [float(v) if np.isfinite(v) else None for v in eps_star],
            "accuracy": accuracy, "auac": auac(eps_star, r_max) if n_all else 0.0,
            "violations": violations, "engine_forwards": world.total(labels.forwards)}


def finish(out: Path) -> None:
    """Remove the per-batch state once the certificate is written."""
    shutil.rmtree(out / STATE_DIR, ignore_errors=True)
