"""Projected Sinkhorn benchmark (figures go to docs/BENCHMARKS.md).

For a batch of 32 at 1x28x28 and 3x32x32 with 5x5 local plans:

1. seconds per projection iteration, with 1 and with 2 CPU threads (or on the GPU when there is one), measured as
   ``(t(n2 iterations) - t(n1 iterations)) / (n2 - n1)`` so that set-up and the final plan repair cancel out;
2. iterations to converge (defaults: ``reg=100`` per unit mass, annealed from 1, ``tol=1e-5``, ``marginal_tol=1e-3``),
   cold and warm-started from the duals of the previous projection as in PGD;
3. budget use: the exact cost (POT's network simplex on the full image, a few examples) of the output divided by eps,
   ours with its defaults and ours at the paper's settings (λ = 1000 for 1x28x28 and 3000 for 3x32x32, absolute, no
   annealing, no over-relaxation),
   for the "dense" target (the radius binds) and for the "step" target at eps 0.1 (it does not: the exact projection
   needs much less) and 0.01 (it binds).

Data (synthetic, no download): ``x`` uniform in [0, 1] (dense images). Two targets: "step" is
``w = x + 4/255 * sign(g)`` with ``g`` standard normal (an L-inf step of 4/255 in a random direction, a stand-in for a
gradient step); "dense" is an independent uniform image ``w`` (far away, so the radius binds).

For reference, the published projection took about 11 ms/iteration (32 iterations) at 1x28x28 and 59 ms/iteration
(28 iterations) at 3x32x32 on one core of such a machine.

Run: ``python bench/ot_projection.py [--quick] [--json out.json]``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import warnings
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import timed  # noqa: E402
from kit.ot.local import exact_local_wasserstein  # noqa: E402
from kit.ot.projection import ProjectionConvergenceWarning, project_wasserstein  # noqa: E402


def _data(shape: tuple[int, ...], device: torch.device, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(shape, generator=g)
    step = x + 4 / 255 * torch.sign(torch.randn(shape, generator=g))
    dense = torch.rand(shape, generator=g)
    step2 = step + 4 / 255 * torch.sign(torch.randn(shape, generator=g))  # the next PGD step, for warm starts
    return {k: v.to(device) for k, v in {"x": x, "step": step, "dense": dense, "step2": step2}.items()}


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name()
    name = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            name = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), name)
    except OSError:
        pass
    return f"{name or 'cpu'} ({os.cpu_count()} logical CPUs)"


def seconds_per_iteration(x: torch.Tensor, w: torch.Tensor, eps: float, n1: int, n2: int, repeat: int) -> dict:
    """Cost of one iteration when every example runs exactly n iterations (unreachable tolerances): the marginal
    ``(t(n2) - t(n1)) / (n2 - n1)`` and the plain ``t(n2) / n2`` (which includes set-up and the final repair)."""

    def run(n: int):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ProjectionConvergenceWarning)
            return project_wasserstein(w, x, eps, max_iter=n, tol=1e-30, marginal_tol=1e-30, check_inside=False)

    t1 = timed(lambda: run(n1), repeat=repeat)
    t2 = timed(lambda: run(n2), repeat=repeat)
    return {"marginal": (t2 - t1) / (n2 - n1), "total_over_iterations": t2 / n2}


def convergence(d: dict[str, torch.Tensor], eps: float) -> dict:
    """Iterations to converge, cold (annealed) and warm (previous step's duals), for the "step" target."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ProjectionConvergenceWarning)
        cold = project_wasserstein(d["step"], d["x"], eps)
        warm = project_wasserstein(d["step2"], d["x"], eps, warm=cold.duals)
        dense = project_wasserstein(d["dense"], d["x"], eps)
    return {
        "step_cold_iterations_mean": cold.iterations.float().mean().item(),
        "step_cold_converged": cold.converged.float().mean().item(),
        "step_warm_iterations_mean": warm.iterations.float().mean().item(),
        "step_warm_converged": warm.converged.float().mean().item(),
        "dense_cold_iterations_mean": dense.iterations.float().mean().item(),
        "dense_cold_converged": dense.converged.float().mean().item(),
        "step_cost_over_eps_mean": (cold.cost / eps).mean().item(),
    }


def budget_use(d: dict[str, torch.Tensor], eps: float, n_exact: int, target: str = "dense",
               paper_reg: float = 1000.0) -> dict:
    """Exact cost of the output / eps on the first n_exact examples of a target."""
    x, w = d["x"][:n_exact], d[target][:n_exact]
    out = {}
    settings: dict[str, dict[str, Any]] = {
        "ours_default": {},
        "ours_at_paper_settings": {"reg": paper_reg, "reg_scale": "absolute", "reg_start": None, "relax": 1.0},
    }
    for name, kw in settings.items():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ProjectionConvergenceWarning)
            r = project_wasserstein(w, x, eps, **kw)
        m = r.mass.double().cpu().view(-1, 1, 1, 1)
        exact = exact_local_wasserstein(x.double().cpu() / m, r.z.double().cpu() / m)
        out[name] = {"exact_over_eps": [round(v, 4) for v in (exact / eps).tolist()],
                     "plan_cost_over_eps": [round(v, 4) for v in (r.cost.double().cpu() / eps).tolist()],
                     "iterations": r.iterations.tolist(), "converged": r.converged.tolist()}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="smaller timing runs and one exact LP per size")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--repeat", type=int, default=3, help="timing repeats (best of), after one warm-up")
    ap.add_argument("--no-exact", action="store_true", help="skip the exact LPs (budget use)")
    ap.add_argument("--sizes", default="1x28x28,3x32x32", help="comma-separated CxHxW among the defaults")
    ap.add_argument("--json", type=Path, help="also write the figures here")
    args = ap.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    out: dict = {"device": _device_name(device),
                 "torch": torch.__version__, "batch": args.batch, "kernel_size": 5,
                 "data": "x ~ U[0,1]; step: w = x + 4/255 sign(N(0,1)); dense: w ~ U[0,1] independent"}
    n1, n2 = (10, 30) if args.quick else (20, 60)
    n_exact = 1 if args.quick else 3
    for shape, eps, paper_reg in (((1, 28, 28), 0.1, 1000.0), ((3, 32, 32), 0.1, 3000.0)):
        name = "x".join(map(str, shape))
        if name not in args.sizes.split(","):
            continue
        d = _data((args.batch, *shape), device)
        row: dict = {"eps": eps}
        threads = [None] if device.type == "cuda" else [1, 2]
        for t in threads:
            old = torch.get_num_threads()
            if t is not None:
                torch.set_num_threads(t)
            try:
                key = "gpu" if t is None else f"threads_{t}"
                row[f"seconds_per_iteration_{key}"] = seconds_per_iteration(d["x"], d["step"], eps, n1, n2,
                                                                          args.repeat)
                if t in (None, 1):
                    row["convergence"] = convergence(d, eps)
            finally:
                torch.set_num_threads(old)
        if not args.no_exact:
            row["budget_use_dense"] = budget_use(d, eps, n_exact, "dense", paper_reg)
            # the small step: at eps = 0.1 the exact projection needs far less than eps (the radius does not bind;
            # the entropic plan still spends it); at eps = 0.01 it binds
            for e in (0.1, 0.01):
                row[f"budget_use_step_eps_{e}"] = budget_use(d, e, n_exact, "step", paper_reg)
        out[name] = row
        print(json.dumps({name: row}, indent=1), flush=True)
    if args.json:
        args.json.write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
