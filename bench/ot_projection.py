"""Projected Sinkhorn benchmark (figures go to docs/BENCHMARKS.md; ``bench/ot.py`` runs the synthetic part).

**Real images against the published code (issue 20; the default run).** Wong et al.'s own projection, their PyPI
package ``projected_sinkhorn==0.2``, is installed apart from the project into ``bench/.cache`` by this script (pip,
no dependencies; never a dependency of the kit; ``--no-install`` to forbid it, then it is used if already there, else
the peer columns are empty) and called as their attack calls it (``pgd.attack``): both images divided by the mass of
``x``, their ``wasserstein_cost(p=1, kernel_size=5)`` -- the kit's Euclidean ``p=2``: their ``p`` is the exponent
of the *squared* distance, so their ``p=2`` would be the squared Euclidean cost --, the absolute λ of the paper, their
stopping rule (the dual objective changes by at most 1e-4 + 1e-4 |g| for every example of the batch) and their
attack's ``sinkhorn_maxiters=400``. Their output as returned (not clamped, not feasible: its mass and box errors are
recorded); for its budget use it is clamped to [0, 1] as their attack does and each channel rescaled to the mass of
x's channel.

For each dataset, a batch of 32 test images (seeded choice) and eps = 0.1 (unit mass), one thread for both sides:

- ``mnist`` (``--data-root``/mnist-10k) and ``fashion-mnist`` (``--data-root``/fashion-mnist), 1x28x28, IDX files;
- ``cifar-shaped``, 3x32x32: no CIFAR-10 on disk, so Fashion-MNIST test images (another seeded choice) resized to
  32x32 (bilinear), tinted by a random colour whose largest channel is 1, quantised to 8 bits: real shapes on an
  empty background, i.e. as sparse as Fashion-MNIST (CIFAR's natural images are dense; see the synthetic part).

Absent datasets are skipped and listed under ``skipped``. Targets: ``step`` = x + 0.1 sign(g) (the first step of both
attacks, whose L-inf step is 0.1; a random direction stands in for the gradient), ``other`` = another image of the
batch (far: the radius binds) and ``step2`` = (the projection of ``step``) + 0.1 sign(g'), the second PGD step,
warm-started from the first projection's duals on our side (the published code has no warm start: cold). Settings:

- ``defaults``: ours with ``project_wasserstein``'s defaults (``reg=500`` per unit mass, certified to ``ztol`` = 2e-3
  RMS per pixel of the exact regularised projection), against theirs at the paper's λ (their only problem);
- ``paper_problem``: ours on the paper's problem (λ = 1000 absolute at 1x28x28, 3000 at 3x32x32; our solver's
  defaults otherwise, so at these λ no annealing), against theirs on the same problem;
- ``paper_problem_wong_rule``: the same with their stopping rule instead of our certificate (``ztol=None``, the dual
  rise <= 1e-4 relative, no row-error requirement), per example.

Figures per dataset, setting and target: CPU seconds (median of ``--repeat`` runs; process time, so a loaded machine
inflates it less than wall time, also recorded), their time over ours, iterations (ours mean / max over the batch;
theirs, one number for the whole batch), our convergence and largest certified bound, and budget use: POT's exact
local W of the output over eps, on the first 4 examples, for both sides. The load average before and after is in the
output; a table goes to stderr.

**Synthetic dense images (issue 4; ``--synthetic``, also what ``bench/ot.py`` runs).** For a batch of 32 at 1x28x28
and 3x32x32 with 5x5 local plans, on the CPU with 1 and with 2 threads (or on the GPU):

1. seconds per projection iteration, measured as ``(t(n2 iterations) - t(n1 iterations)) / (n2 - n1)`` with every
   example running exactly n iterations (unreachable tolerances, no annealing), so that set-up and the final plan
   repair cancel out; the median over ``repeat`` interleaved pairs;
2. the whole converged projection with the defaults: wall seconds (median of ``repeat`` runs), iterations (mean and max
   over the batch) and the largest certified bound, cold and warm-started from the duals of the previous projection as
   in PGD (the dense target: cold, one thread only); next to the published projection's total measured in issue 4
   (its per-iteration time times its iterations: 11 ms x 32 at 1x28x28, 59 ms x 28 at 3x32x32, one core); the same
   figures at the paper's problem (below) and at the settings of the kit's Wasserstein PGD attack (``reg=100``);
3. budget use: the exact cost (POT's network simplex on the full image, a few examples) of the output divided by eps,
   ours with its defaults, on the paper's problem (λ = 1000 for 1x28x28 and 3000 for 3x32x32, absolute) and at the
   attack's, for the "dense" target (the radius binds) and for the "step" target at eps 0.1 (it does not: the exact
   projection needs much less) and 0.01 (it binds).

Data (synthetic, no download): ``x`` uniform in [0, 1] (dense images). Two targets: "step" is
``w = x + 4/255 * sign(g)`` with ``g`` standard normal; "dense" is an independent uniform image ``w``. The warm start
projects a second step ``step2 = step + 4/255 sign(g')`` from the duals of the "step" projection.

Every time is recorded as wall time and as process CPU time: on a shared, loaded machine the wall time includes the
wait for a core, and with one thread the CPU time is close to what an idle core would take.

Further settings of ours beside the defaults on the real images: ``--regs 100,250`` (the defaults at other ``reg``)
and ``--variant KEY=VALUE[,...]`` (repeatable; keywords of ``project_wasserstein``: numbers, ``ztol=none``,
``reg_scale=absolute``, ``check_inside=false``; e.g. ``--variant reg=250,ztol=1e-2``; tried on a tiny image when the
command line is read, so a setting the projection refuses fails at once), each timed and checked for budget use like
the defaults.

Run: ``python bench/ot_projection.py [--data-root ../shared/data] [--real mnist,fashion-mnist,cifar-shaped]
[--repeat 3] [--regs 100,250] [--variant reg=250,ztol=1e-2] [--quick] [--no-install] [--synthetic]
[--json out.json]``.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import inspect
import io
import re
import statistics
import subprocess
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

# Run as a script, this file's folder comes first on sys.path, where bench/ot.py would shadow POT (``import ot``).
_HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _HERE]
sys.path.insert(0, str(_HERE.parent))

from bench.common import CACHE, cpu_model, device_description, emit, load_average, median_times  # noqa: E402
from kit.attacks.wasserstein import WassersteinPGD  # noqa: E402
from kit.ot.local import exact_local_wasserstein  # noqa: E402
from kit.ot.projection import ProjectionConvergenceWarning, project_wasserstein  # noqa: E402

# the published projection on one core of a 2-core x86 machine (issue 4): seconds per iteration, iterations
PUBLISHED = {"1x28x28": (0.011, 32), "3x32x32": (0.059, 28)}
# the paper's regularisation (absolute lambda) at each size, for the budget-use comparison
PAPER_REG = {"1x28x28": 1000.0, "3x32x32": 3000.0}


def make_data(shape: tuple[int, ...], device: torch.device, seed: int = 0) -> dict[str, torch.Tensor]:
    """The synthetic batch of the module docstring: ``x``, targets ``step``, ``dense`` and ``step2``."""
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(shape, generator=g)
    step = x + 4 / 255 * torch.sign(torch.randn(shape, generator=g))
    dense = torch.rand(shape, generator=g)
    step2 = step + 4 / 255 * torch.sign(torch.randn(shape, generator=g))  # the next PGD step, for warm starts
    return {k: v.to(device) for k, v in {"x": x, "step": step, "dense": dense, "step2": step2}.items()}


def _quiet(fn, *args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ProjectionConvergenceWarning)
        return fn(*args, **kwargs)


def seconds_per_iteration(x: torch.Tensor, w: torch.Tensor, eps: float, n1: int, n2: int, repeat: int) -> dict:
    """Cost of one iteration when every example runs exactly n iterations at the final regularisation: the median
    over ``repeat`` runs of ``(t(n2) - t(n1)) / (n2 - n1)`` (the two runs of a pair back to back), in wall time
    (``median_s``) and in process CPU time (``cpu_median_s``, see :func:`bench.common.median_times`)."""

    def run(n: int) -> None:
        _quiet(project_wasserstein, w, x, eps, max_iter=n, tol=1e-30, marginal_tol=1e-30, ztol=None,
               check_inside=False, reg_start=None)

    run(n1)  # warm-up
    wall, cpu = [], []
    for _ in range(repeat):
        t1 = median_times(lambda: run(n1), repeat=1, warmup=0)
        t2 = median_times(lambda: run(n2), repeat=1, warmup=0)
        wall.append((t2["wall_s"] - t1["wall_s"]) / (n2 - n1))
        cpu.append((t2["cpu_s"] - t1["cpu_s"]) / (n2 - n1))
    return {"median_s": statistics.median(wall), "cpu_median_s": statistics.median(cpu),
            "all_s": [round(v, 5) for v in wall], "cpu_all_s": [round(v, 5) for v in cpu]}


def _summary(r) -> dict:
    return {"iterations_mean": round(r.iterations.float().mean().item(), 2),
            "iterations_max": int(r.iterations.max().item()),
            "converged": round(r.converged.float().mean().item(), 4),
            "z_error_bound_max": float(r.z_error_bound.nan_to_num(0.0).max().item()),
            "cost_over_eps_mean": round(r.cost.float().mean().item(), 6)}


def paper_settings(name: str) -> dict[str, Any]:
    """Keyword arguments that make :func:`project_wasserstein` solve the published projection's problem: the paper's
    absolute λ for this size; our solver's defaults otherwise (the annealing never starts below 64 per unit mass, so
    at these λ it starts at the final one)."""
    return {"reg": PAPER_REG.get(name, 1000.0), "reg_scale": "absolute"}


def attack_settings() -> dict[str, Any]:
    """The projection settings of the kit's Wasserstein PGD attack (its default ``reg``, read from its signature)."""
    return {"reg": inspect.signature(WassersteinPGD).parameters["reg"].default}


def time_to_converge(d: dict[str, torch.Tensor], eps: float, repeat: int, dense: bool = True,
                     **kw: Any) -> dict:
    """The converged projection (the defaults, or the settings ``kw``): cold (annealed) and warm (the next step from
    the previous duals) on the "step" target, and cold on the "dense" target; wall seconds (median of ``repeat``) and
    iterations."""
    x = d["x"]
    cold = _quiet(project_wasserstein, d["step"], x, eps, **kw)
    t_cold = median_times(lambda: _quiet(project_wasserstein, d["step"], x, eps, **kw), repeat=repeat, warmup=0)
    warm = _quiet(project_wasserstein, d["step2"], x, eps, warm=cold.duals, **kw)
    t_warm = median_times(lambda: _quiet(project_wasserstein, d["step2"], x, eps, warm=cold.duals, **kw),
                          repeat=repeat, warmup=0)
    out = {"step_cold": {"seconds": t_cold["wall_s"], "cpu_seconds": t_cold["cpu_s"], **_summary(cold),
                         "all_s": t_cold["wall_all_s"], "cpu_all_s": t_cold["cpu_all_s"]},
           "step_warm": {"seconds": t_warm["wall_s"], "cpu_seconds": t_warm["cpu_s"], **_summary(warm),
                         "all_s": t_warm["wall_all_s"], "cpu_all_s": t_warm["cpu_all_s"]}}
    if dense:
        t0, c0 = time.perf_counter(), time.process_time()
        r = _quiet(project_wasserstein, d["dense"], x, eps, **kw)
        out["dense_cold"] = {"seconds": time.perf_counter() - t0, "cpu_seconds": time.process_time() - c0,
                             **_summary(r)}
    return out


def budget_use(d: dict[str, torch.Tensor], eps: float, n_exact: int, target: str = "dense",
               size: str = "1x28x28") -> dict:
    """Exact cost of the output / eps on the first ``n_exact`` examples of a target (POT, full image)."""
    x, w = d["x"][:n_exact], d[target][:n_exact]
    out = {}
    settings: dict[str, dict[str, Any]] = {
        "ours_default": {},
        "ours_at_paper_settings": paper_settings(size),
        "ours_at_attack_settings": attack_settings(),
    }
    for name, kw in settings.items():
        r = _quiet(project_wasserstein, w, x, eps, **kw)
        m = r.mass.double().cpu().view(-1, 1, 1, 1)
        exact = exact_local_wasserstein(x.double().cpu() / m, r.z.double().cpu() / m)
        out[name] = {"exact_over_eps": [round(v, 4) for v in (exact / eps).tolist()],
                     "plan_cost_over_eps": [round(v, 4) for v in (r.cost.double().cpu() / eps).tolist()],
                     "iterations": r.iterations.tolist(), "converged": r.converged.tolist()}
    return out


def run_size(shape: tuple[int, int, int], batch: int = 32, device: torch.device | None = None,
             threads: tuple[int, ...] = (1, 2), quick: bool = False, exact: bool = True, eps: float = 0.1,
             repeat: int = 5, log: Callable[[str], None] | None = None) -> dict:
    """Every figure of the module docstring for one image size (C, H, W); ``threads`` applies on the CPU only."""
    device = device or torch.device("cpu")
    name = "x".join(map(str, shape))
    d = make_data((batch, *shape), device)
    n1, n2 = (10, 30) if quick else (20, 60)
    row: dict = {"batch": batch, "eps": eps, "device": device_description(device)}
    published = PUBLISHED.get(name)
    if published is not None:
        row["published"] = {"seconds_per_iteration": published[0], "iterations": published[1],
                            "total_seconds": published[0] * published[1]}
    for t in ([None] if device.type == "cuda" else list(threads)):
        key = "gpu" if t is None else f"threads_{t}"
        old = torch.get_num_threads()
        if t is not None:
            torch.set_num_threads(t)
        try:
            load0 = load_average()
            if log:
                log(f"{name} {key}: seconds per iteration")
            per_it = seconds_per_iteration(d["x"], d["step"], eps, n1, n2, 3 if quick else repeat)
            entry = {"seconds_per_iteration": per_it}
            for suffix, settings in (("", {}), ("_paper_settings", paper_settings(name)),
                                     ("_attack_settings", attack_settings())):
                if log:
                    log(f"{name} {key}: converged projections{suffix.replace('_', ' ')}")
                # the dense target: slow, one thread only
                entry[f"converge{suffix}"] = time_to_converge(d, eps, 3 if quick else repeat, dense=t in (None, 1),
                                                              **settings)
            entry.update(load_before=load0, load_after=load_average())
            if published is not None:
                total = published[0] * published[1]
                for suffix in ("", "_paper_settings", "_attack_settings"):
                    c_all = entry[f"converge{suffix}"]
                    for kind in ("cold", "warm"):
                        c = c_all[f"step_{kind}"]
                        entry[f"published_total_over_ours_{kind}{suffix}"] = total / c["seconds"]
                        if t in (None, 1):  # one thread: CPU time is what an idle core would take
                            entry[f"published_total_over_ours_{kind}{suffix}_cpu_time"] = total / c["cpu_seconds"]
                entry["published_per_iteration_over_ours"] = published[0] / per_it["median_s"]
                if t in (None, 1):
                    entry["published_per_iteration_over_ours_cpu_time"] = published[0] / per_it["cpu_median_s"]
            row[key] = entry
        finally:
            torch.set_num_threads(old)
    if exact:
        if log:
            log(f"{name}: budget use (exact LPs)")
        n_exact = 1 if quick else 3
        row["budget_use_dense"] = budget_use(d, eps, n_exact, "dense", name)
        # the small step: at eps = 0.1 the exact projection needs far less than eps (the radius does not bind;
        # the entropic plan still spends it); at eps = 0.01 it binds
        for e in (0.1, 0.01):
            row[f"budget_use_step_eps_{e}"] = budget_use(d, e, n_exact, "step", name)
    return row


def run(sizes: tuple[str, ...] = ("1x28x28", "3x32x32"), batch: int = 32, device: torch.device | None = None,
        quick: bool = False, exact: bool = True, repeat: int = 5, log: Callable[[str], None] | None = None
        ) -> dict:
    """:func:`run_size` for each size (names like ``"1x28x28"``); a dict keyed by size."""
    out = {}
    for name in sizes:
        shape = tuple(int(v) for v in name.split("x"))
        if len(shape) != 3:
            raise ValueError(f"size must be CxHxW, got {name!r}")
        out[name] = run_size(shape, batch=batch, device=device, quick=quick, exact=exact, repeat=repeat, log=log)
    return out


# ---------------------------------------------------------------- real images against the published code (issue 20)

#: The published projection: Wong et al.'s PyPI package, installed apart from the project (never a dependency).
WONG_PACKAGE = "projected_sinkhorn==0.2"
WONG_DIR = CACHE / "projected_sinkhorn-0.2"
#: Wong et al.'s attacks call the projection with at most this many iterations (``pgd.attack(sinkhorn_maxiters=400)``)
WONG_MAXITERS = 400
#: The L-inf step of both attacks (Wong et al.'s ``alpha=0.1``, the kit's ``WassersteinPGD(step=0.1)``)
ATTACK_STEP = 0.1
#: The real datasets: (IDX kind, folder under the data root, test images taken from, image shape)
REAL_DATA = {
    "mnist": ("mnist", "mnist-10k", (1, 28, 28)),
    "fashion-mnist": ("fashion-mnist", "fashion-mnist", (1, 28, 28)),
    "cifar-shaped": ("fashion-mnist", "fashion-mnist", (3, 32, 32)),
}


def load_wong(install: bool = True, log: Callable[[str], None] | None = None) -> tuple[Any, str]:
    """Import Wong et al.'s ``projected_sinkhorn`` 0.2 from ``bench/.cache`` (installing it there with pip first, if
    ``install``). Returns (module or None, a sentence saying where it came from or why it is missing).

    The package's own module does ``from lambertw import lambertw`` (a path of the authors' machine is appended to
    ``sys.path`` for it), so its folder goes on ``sys.path`` too. The equivalent by hand::

        pip download --no-deps projected_sinkhorn==0.2 -d /tmp/ps
        pip install --no-deps --target bench/.cache/projected_sinkhorn-0.2 /tmp/ps/projected_sinkhorn-0.2.tar.gz
    """
    pkg = WONG_DIR / "projected_sinkhorn"
    if not (pkg / "projected_sinkhorn.py").exists():
        if not install:
            return None, f"{WONG_PACKAGE} is not installed in {WONG_DIR} (run without --no-install to install it)"
        if log:
            log(f"installing {WONG_PACKAGE} into {WONG_DIR} (pip, no dependencies)")
        dl = CACHE / "projected_sinkhorn-download"

        def pip(*args: str) -> None:
            subprocess.run([sys.executable, "-m", "pip", *args], check=True, capture_output=True, text=True,
                           timeout=600)

        try:
            pip("download", "--no-deps", WONG_PACKAGE, "-d", str(dl))
            files = sorted(dl.glob("projected_sinkhorn-0.2*"))  # the sdist (the package publishes no wheel)
            if not files:
                raise RuntimeError(f"pip downloaded nothing into {dl}")
            pip("install", "--no-deps", "--target", str(WONG_DIR), str(files[0]))
        except (OSError, RuntimeError, subprocess.SubprocessError) as exc:
            detail = getattr(exc, "stderr", "") or str(exc)
            return None, f"could not install {WONG_PACKAGE}: {detail.strip().splitlines()[-1] if detail else exc}"
    for path in (str(pkg), str(WONG_DIR)):
        if path not in sys.path:
            sys.path.insert(0, path)
    try:
        module = importlib.import_module("projected_sinkhorn")
    except Exception as exc:  # noqa: BLE001 - any import failure of peer code means: no peer
        return None, f"could not import {WONG_PACKAGE} from {WONG_DIR}: {exc!r}"
    return module, f"{WONG_PACKAGE} from {WONG_DIR}"


def wong_project(ps: Any, x: torch.Tensor, w: torch.Tensor, eps: float, lam: float,
                 maxiters: int = WONG_MAXITERS) -> tuple[torch.Tensor, int]:
    """Wong et al.'s projection of ``w`` onto the ball around ``x`` as their attack calls it (``pgd.attack``): both
    divided by the mass of ``x``, their ``wasserstein_cost(p=1, kernel_size=5)`` (the Euclidean pixel distance: their
    ``p`` is the exponent of the *squared* distance, so their ``p=2`` would be the squared one), absolute λ, their
    stopping rule (the dual objective changes by at most 1e-4 + 1e-4 |g| for every example, or ``maxiters``).
    Returns the output in the original scale, as returned (not clamped, not feasible), and the iterations run."""
    m = x.sum((1, 2, 3)).view(-1, 1, 1, 1)
    cost = ps.wasserstein_cost(x, p=1, kernel_size=5)
    out = io.StringIO()
    with contextlib.redirect_stdout(out), torch.no_grad():
        z = ps.projected_sinkhorn(x / m, w / m, cost, torch.full((x.shape[0],), eps, dtype=x.dtype), lam,
                                  verbose=True, maxiters=maxiters) * m
    found = re.search(r"terminate at iteration (\d+)", out.getvalue())
    return z, int(found.group(1)) if found else -1


def load_real(name: str, data_root: Path, batch: int, seed: int = 0) -> tuple[torch.Tensor | None, str]:
    """``batch`` test images of one of :data:`REAL_DATA` (seeded choice), or (None, why) when the data is absent.

    ``cifar-shaped``: no CIFAR-10 on disk, so Fashion-MNIST test images (another seeded choice) resized to 32x32
    (bilinear) and tinted with a random colour whose largest channel is 1, quantised to 1/255 like a real 8-bit image:
    three channels of real garment shapes on an empty background (sparse, unlike CIFAR's natural backgrounds)."""
    from kit.data.idx import load
    from kit.errors import UserError

    kind, folder, shape = REAL_DATA[name]
    root = data_root / folder
    try:
        images = load(kind, root, "test")[0]
    except UserError as exc:
        return None, f"{name}: no data ({exc})"
    g = torch.Generator().manual_seed(seed + (1 if name == "cifar-shaped" else 0))
    x = images[torch.randperm(images.shape[0], generator=g)[:batch]].float()
    if shape[0] == 3:
        x = F.interpolate(x, size=shape[1:], mode="bilinear", align_corners=False).clamp(0, 1)
        colour = 0.3 + 0.7 * torch.rand(x.shape[0], 3, 1, 1, generator=g)
        x = torch.round(x * colour / colour.amax(1, keepdim=True) * 255) / 255
    return x, f"{name}: {x.shape[0]} test images of {root}"


def real_targets(x: torch.Tensor, seed: int = 0) -> dict[str, torch.Tensor]:
    """The targets of the real-image comparison: ``step`` = x + 0.1 sign(g) (the first PGD step of both attacks, a
    random direction standing in for the gradient), ``other`` = another image of the batch (far: the radius
    binds); ``step2`` is built later from the projection of ``step`` (the second PGD step)."""
    g = torch.Generator().manual_seed(seed + 100)
    step = x + ATTACK_STEP * torch.sign(torch.randn(x.shape, generator=g))
    return {"step": step, "other": torch.roll(x, 1, 0), "g2": torch.sign(torch.randn(x.shape, generator=g))}


def _budget(x: torch.Tensor, z: torch.Tensor, eps: float) -> list[float]:
    """Exact local W(x, z) / eps (POT, unit mass, the kit's Euclidean 5x5 cost) for outputs that are not feasible
    as they stand (Wong et al.'s): clamped to [0, 1] as their attack does, then each channel rescaled to the mass of
    x's channel (their output keeps the mass only approximately)."""
    xs, zs = x.double().cpu(), z.double().cpu().clamp(0, 1)
    zs = zs * (xs.sum((2, 3), keepdim=True) / zs.sum((2, 3), keepdim=True).clamp_min(1e-12))
    m = xs.sum((1, 2, 3)).view(-1, 1, 1, 1)
    return [round(v, 4) for v in (exact_local_wasserstein(xs / m, zs / m) / eps).tolist()]


def _feasibility(x: torch.Tensor, z: torch.Tensor) -> dict:
    """How far an output is from the kit's constraints before any repair: relative mass error and box violation."""
    mass = (z.sum((1, 2, 3)) / x.sum((1, 2, 3)) - 1).abs()
    box = torch.maximum(-z.amin((1, 2, 3)), z.amax((1, 2, 3)) - 1).clamp_min(0)
    return {"mass_error_max": float(mass.max()), "box_violation_max": float(box.max())}


def parse_variant(text: str) -> tuple[str, dict[str, Any]]:
    """``"reg=250,ztol=1e-2"`` -> (``"reg=250,ztol=0.01"``, ``{"reg": 250.0, "ztol": 0.01}``): keyword arguments of
    :func:`project_wasserstein` (numbers; ``none`` for ``ztol``; ``mass``/``absolute`` for ``reg_scale``;
    ``true``/``false`` for ``check_inside``), named in sorted order. Every variant is tried at once on a tiny image, so
    that a setting the projection refuses fails here, not after the peer and the other settings have been timed."""
    from kit.errors import UserError

    known = inspect.signature(project_wasserstein).parameters
    ints = {"kernel_size", "max_iter", "anderson"}
    kw: dict[str, Any] = {}
    for item in (part.strip() for part in text.split(",") if part.strip()):
        key, sep, value = (v.strip() for v in item.partition("="))
        if not sep or key not in known or key in ("w", "x", "eps", "warm", "return_plan"):
            raise argparse.ArgumentTypeError(f"not a project_wasserstein setting: {item!r}")
        if key in kw:
            raise argparse.ArgumentTypeError(f"{key} is given twice in {text!r}")
        low = value.lower()
        if key == "reg_scale":
            kw[key] = value
        elif key == "check_inside":
            if low not in ("true", "false"):
                raise argparse.ArgumentTypeError(f"check_inside needs true or false, got {value!r}")
            kw[key] = low == "true"
        elif key == "ztol" and low == "none":
            kw[key] = None
        else:
            try:
                number = float(value)
            except ValueError:
                raise argparse.ArgumentTypeError(f"{key} needs a number, got {value!r}") from None
            if key in ints:
                if not number.is_integer():
                    raise argparse.ArgumentTypeError(f"{key} needs an integer, got {value!r}")
                number = int(number)
            kw[key] = number
    if not kw:
        raise argparse.ArgumentTypeError(f"empty variant: {text!r}")
    x0 = torch.full((1, 1, 5, 5), 0.5)
    try:
        _quiet(project_wasserstein, torch.roll(x0, 1, -1), x0, 0.1, **kw)
    except UserError as exc:
        raise argparse.ArgumentTypeError(f"{text!r}: {exc}") from None
    name = ",".join(f"{k}={v:.10g}" if isinstance(v, float) else f"{k}={v}".lower() for k, v in sorted(kw.items()))
    return name, kw


def compare_real(x: torch.Tensor, ps: Any, name: str, eps: float = 0.1, repeat: int = 3, n_exact: int = 4,
                 regs: tuple[float, ...] = (), variants: dict[str, dict[str, Any]] | None = None,
                 log: Callable[[str], None] | None = None) -> dict:
    """Ours against Wong et al.'s code on one batch of real images, at the kit's defaults and at the paper's problem:
    CPU seconds (median of ``repeat``, one thread), iterations, budget use (exact W / eps on ``n_exact`` examples).
    ``regs``: also our defaults at each of these ``reg`` (per unit mass), settings named ``reg_<value>`` -- the
    trade-off between the problem's sharpness (budget use) and time. ``variants``: name -> keyword arguments of
    further settings of ours (:func:`parse_variant`), e.g. a looser certificate beside a smaller ``reg``."""
    size = "x".join(map(str, x.shape[1:]))
    lam_paper = PAPER_REG.get(size, 1000.0)
    t = real_targets(x)
    paper = {"reg": lam_paper, "reg_scale": "absolute"}
    settings: dict[str, dict[str, Any]] = {
        "defaults": {}, "paper_problem": paper,
        # their stopping rule: the dual rise alone (no row-error requirement), per example
        "paper_problem_wong_rule": {**paper, "ztol": None, "tol": 1e-4, "marginal_tol": float("inf")},
        **{f"reg_{r:g}": {"reg": float(r)} for r in regs}, **(variants or {})}
    out: dict = {"lambda_paper": lam_paper, "eps": eps, "mass_mean": round(float(x.sum((1, 2, 3)).mean()), 2),
                 "zero_pixels": round(float((x == 0).float().mean()), 4)}
    # Wong et al.'s side: the same call at every setting (their own defaults are the paper's lambda)
    wong: dict[str, dict] = {}
    if ps is not None:
        for tgt in ("step", "other"):
            z, iters = wong_project(ps, x, t[tgt], eps, lam_paper)
            tm = median_times(lambda tgt=tgt: wong_project(ps, x, t[tgt], eps, lam_paper), repeat=repeat, warmup=0)
            wong[tgt] = {"seconds": tm["cpu_s"], "wall_seconds": tm["wall_s"], "iterations": iters,
                         "budget_use": _budget(x[:n_exact], z[:n_exact], eps), **_feasibility(x, z)}
    for sname, kw in settings.items():
        if log:
            log(f"{name}: ours at the {sname.replace('_', ' ')}")
        res: dict = {}
        first = _quiet(project_wasserstein, t["step"], x, eps, **kw)
        targets = {"step": (t["step"], None), "other": (t["other"], None),
                   "step2": ((first.z + ATTACK_STEP * t["g2"]), first.duals)}
        for tgt, (w, warm) in targets.items():
            r = _quiet(project_wasserstein, w, x, eps, warm=warm, **kw)
            tm = median_times(lambda w=w, warm=warm, kw=kw: _quiet(project_wasserstein, w, x, eps, warm=warm, **kw),
                              repeat=repeat, warmup=0)
            m = r.mass.double().view(-1, 1, 1, 1)[:n_exact]
            exact = exact_local_wasserstein(x[:n_exact].double() / m, r.z[:n_exact].double() / m)
            row = {"seconds": tm["cpu_s"], "wall_seconds": tm["wall_s"], "start": "warm" if warm else "cold",
                   "iterations_mean": round(r.iterations.float().mean().item(), 1),
                   "iterations_max": int(r.iterations.max()), "converged": round(r.converged.float().mean().item(), 4),
                   "z_error_bound_max": round(float(r.z_error_bound.nan_to_num(0.0).max()), 5),
                   "budget_use": [round(v, 4) for v in (exact / eps).tolist()]}
            peer = wong.get(tgt)
            if tgt == "step2" and ps is not None:  # their code has no warm start: the same target, cold
                z, iters = wong_project(ps, x, w, eps, lam_paper)
                tmw = median_times(lambda w=w: wong_project(ps, x, w, eps, lam_paper), repeat=repeat, warmup=0)
                peer = {"seconds": tmw["cpu_s"], "wall_seconds": tmw["wall_s"], "iterations": iters,
                        "budget_use": _budget(x[:n_exact], z[:n_exact], eps), **_feasibility(x, z)}
                wong["step2_" + sname] = peer
            if peer is not None:
                row["wong_over_ours"] = round(peer["seconds"] / row["seconds"], 3)
            res[tgt] = row
        out[sname] = res
    out["wong"] = wong
    return out


def run_real(data_root: Path, names: tuple[str, ...] = tuple(REAL_DATA), batch: int = 32, repeat: int = 3,
             n_exact: int = 4, install: bool = True, regs: tuple[float, ...] = (),
             variants: dict[str, dict[str, Any]] | None = None, log: Callable[[str], None] | None = None) -> dict:
    """:func:`compare_real` on each real dataset (one thread); datasets that are absent are skipped and say so."""
    ps, source = load_wong(install, log)
    doc: dict = {"peer": source, "threads": 1, "load_before": load_average(), "datasets": {}, "skipped": []}
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for name in names:
            x, why = load_real(name, data_root, batch)
            if x is None:
                doc["skipped"].append(why)
                if log:
                    log(f"skipped: {why}")
                continue
            if log:
                log(why)
            doc["datasets"][name] = {"data": why, **compare_real(x, ps, name, repeat=repeat, n_exact=n_exact,
                                                                    regs=regs, variants=variants, log=log)}
    finally:
        torch.set_num_threads(old)
    doc["load_after"] = load_average()
    return doc


def summary_lines(doc: dict) -> list[str]:
    """The table of the real-image comparison, one line per dataset, setting and target."""
    lines = [f"peer: {doc['peer']}; one thread; CPU seconds (median); load {doc['load_before']} -> "
             f"{doc['load_after']}"]
    lines += [f"skipped: {s}" for s in doc["skipped"]]
    head = (f"{'data':14} {'setting':24} {'target':6} {'ours s':>8} {'Wong s':>8} {'ratio':>6} {'it mean/max':>12} "
            f"{'Wong it':>7} {'budget ours':>12} {'budget Wong':>12}")
    lines.append(head)
    for name, d in doc["datasets"].items():
        for sname in [k for k in d if k not in ("lambda_paper", "eps", "mass_mean", "zero_pixels", "wong", "data")]:
            for tgt, row in d[sname].items():
                peer = d["wong"].get(tgt if tgt != "step2" else "step2_" + sname, {})
                bo, bw = row["budget_use"], peer.get("budget_use")
                lines.append(
                    f"{name:14} {sname:24} {tgt:6} {row['seconds']:8.3f} {peer.get('seconds', float('nan')):8.3f} "
                    f"{row.get('wong_over_ours', float('nan')):6.2f} "
                    f"{row['iterations_mean']:7.1f}/{row['iterations_max']:<4d} {peer.get('iterations', -1):7d} "
                    f"{min(bo):5.3f}-{max(bo):5.3f} "
                    + (f"{min(bw):5.3f}-{max(bw):5.3f}" if bw else "-"))
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data-root", type=Path, default=_HERE.parent.parent / "shared" / "data",
                    help="folder holding mnist-10k/ and fashion-mnist/ (IDX); absent datasets are skipped")
    ap.add_argument("--real", default=",".join(REAL_DATA), help="comma-separated real datasets ('' for none)")
    ap.add_argument("--no-install", action="store_true", help="do not pip-install the peer into bench/.cache")
    ap.add_argument("--synthetic", action="store_true", help="also the synthetic U[0,1] figures (issue 4)")
    ap.add_argument("--quick", action="store_true", help="fewer timing runs and one exact LP per size")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--repeat", type=int, default=3, help="timing runs per figure (median)")
    ap.add_argument("--no-exact", action="store_true", help="synthetic part: skip the exact LPs (budget use)")
    ap.add_argument("--sizes", default="1x28x28,3x32x32", help="synthetic part: comma-separated CxHxW")
    ap.add_argument("--regs", default="", help="real part: also our defaults at these comma-separated reg values")
    ap.add_argument("--variant", action="append", default=[], type=parse_variant, metavar="KEY=VALUE[,...]",
                    help="real part: also ours at these project_wasserstein settings, e.g. 'reg=250,ztol=1e-2' "
                         "(repeatable)")
    ap.add_argument("--json", type=Path, help="also write the figures here")
    args = ap.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    log = lambda m: print(m, file=sys.stderr, flush=True)  # noqa: E731
    out: dict = {"device": device_description(device), "cpu": cpu_model(), "torch": torch.__version__,
                 "kernel_size": 5}
    names = tuple(n for n in args.real.split(",") if n)
    if names:
        out["real"] = run_real(args.data_root, names, batch=args.batch, repeat=1 if args.quick else args.repeat,
                               n_exact=1 if args.quick else 4, install=not args.no_install,
                               regs=tuple(float(r) for r in args.regs.split(",") if r),
                               variants=dict(args.variant), log=log)
        for line in summary_lines(out["real"]):
            log(line)
    if args.synthetic:
        out["data"] = "x ~ U[0,1]; step: w = x + 4/255 sign(N(0,1)); dense: w ~ U[0,1] independent"
        out["sizes"] = run(tuple(args.sizes.split(",")), batch=args.batch, device=device, quick=args.quick,
                           exact=not args.no_exact, repeat=args.repeat, log=log)
    emit(out, args.json)


if __name__ == "__main__":
    main()
