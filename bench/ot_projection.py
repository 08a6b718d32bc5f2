"""Projected Sinkhorn benchmark (figures go to docs/BENCHMARKS.md; ``bench/ot.py`` runs it with the rest).

For a batch of 32 at 1x28x28 and 3x32x32 with 5x5 local plans, on the CPU with 1 and with 2 threads (or on the GPU):

1. seconds per projection iteration, measured as ``(t(n2 iterations) - t(n1 iterations)) / (n2 - n1)`` with every
   example running exactly n iterations (unreachable tolerances, no annealing), so that set-up and the final plan
   repair cancel out; the median over ``repeat`` interleaved pairs;
2. the whole converged projection with the defaults (``reg=500`` per unit mass, annealed from 1, converged when the
   duality gap certifies the output within ``ztol`` = 2e-3 RMS per pixel of the exact regularised projection, or the
   row error is <= 1e-3): wall seconds (median of ``repeat`` runs), iterations (mean and max over the batch) and the
   largest certified bound, cold and warm-started from the duals of the previous projection as in PGD (the dense
   target: cold, one thread only); next to the published projection's total (its per-iteration time times its
   iterations); the same figures for ours at the paper's settings (below), i.e. on the very problem the published
   projection solves, which is the like-for-like comparison of the two implementations, and at the settings of the
   kit's Wasserstein PGD attack (``reg=100``);
3. budget use: the exact cost (POT's network simplex on the full image, a few examples) of the output divided by eps,
   ours with its defaults, at the paper's settings (λ = 1000 for 1x28x28 and 3000 for 3x32x32, absolute, no
   annealing, no over-relaxation) and at the attack's, for the "dense" target (the radius binds) and for the "step" target at eps 0.1 (it
   does not: the exact projection needs much less) and 0.01 (it binds).

Every time is recorded as wall time and as process CPU time: on a shared, loaded machine the wall time includes the
wait for a core, and with one thread the CPU time is close to what an idle core would take.

Data (synthetic, no download): ``x`` uniform in [0, 1] (dense images). Two targets: "step" is
``w = x + 4/255 * sign(g)`` with ``g`` standard normal (an L-inf step of 4/255 in a random direction, a stand-in for a
gradient step); "dense" is an independent uniform image ``w`` (far away, so the radius binds). The warm start projects
a second step ``step2 = step + 4/255 sign(g')`` from the duals of the "step" projection.

For reference, the published projection took about 11 ms/iteration (32 iterations) at 1x28x28 and 59 ms/iteration
(28 iterations) at 3x32x32 on one core of such a machine (issue 4).

Run: ``python bench/ot_projection.py [--quick] [--json out.json]``.
"""

from __future__ import annotations

import argparse
import inspect
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

# Run as a script, this file's folder comes first on sys.path, where bench/ot.py would shadow POT (``import ot``).
_HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _HERE]
sys.path.insert(0, str(_HERE.parent))

from bench.common import device_description, emit, load_average, median_times  # noqa: E402
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
    absolute λ for this size, no annealing, the paper's plain block ascent (no over-relaxation)."""
    return {"reg": PAPER_REG.get(name, 1000.0), "reg_scale": "absolute", "reg_start": None, "relax": 1.0}


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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="fewer timing runs and one exact LP per size")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--repeat", type=int, default=5, help="timing runs per figure (median)")
    ap.add_argument("--no-exact", action="store_true", help="skip the exact LPs (budget use)")
    ap.add_argument("--sizes", default="1x28x28,3x32x32", help="comma-separated CxHxW")
    ap.add_argument("--json", type=Path, help="also write the figures here")
    args = ap.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    out = {"device": device_description(device), "torch": torch.__version__, "kernel_size": 5,
           "data": "x ~ U[0,1]; step: w = x + 4/255 sign(N(0,1)); dense: w ~ U[0,1] independent",
           "sizes": run(tuple(args.sizes.split(",")), batch=args.batch, device=device, quick=args.quick,
                        exact=not args.no_exact, repeat=args.repeat,
                        log=lambda m: print(m, file=sys.stderr, flush=True))}
    emit(out, args.json)


if __name__ == "__main__":
    main()
