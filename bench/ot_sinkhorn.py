"""Sinkhorn divergence benchmark: kit.ot.sinkhorn vs POT, forward + backward (figures go to docs/BENCHMARKS.md;
``bench/ot.py`` runs it with the rest).

The SAT setting (seed ``000_e2e3710bc929b9d7.txt``): 128 clean vs 128 adversarial points in 10-D (logits of a batch),
squared Euclidean cost, reg = 1, 50 iterations, float32. Both sides run exactly 50 iterations on each of the three
problems (tolerance 0) and differentiate w.r.t. both clouds:

- ``entropic``: ours ``sinkhorn_divergence(value="entropic")`` (one batched solve of the three problems, envelope
  gradient) vs ``ot.solve_sample(..., debias=True, grad="envelope").value`` (three solves, envelope gradient);
- ``transport``: ours ``value="transport"`` (gradient through the unrolled iterations) vs
  ``ot.solve_sample(..., debias=True, grad="autodiff").value_linear``.

Timings are medians of ``repeat`` calls after a warm-up, with the thread count in force (``torch.set_num_threads``), in
wall time and in process CPU time (see :func:`bench.common.median_times`).

Run: ``python bench/ot_sinkhorn.py [--threads 1] [--json out.json]``. Uses the GPU when there is one. Prints JSON.
"""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

import torch

# Run as a script, this file's folder comes first on sys.path, where bench/ot.py would shadow POT (``import ot``).
_HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _HERE]
sys.path.insert(0, str(_HERE.parent))

import ot  # noqa: E402  (POT)

from bench.common import device_description, emit, load_average, median_times  # noqa: E402
from kit.ot.sinkhorn import sinkhorn_divergence  # noqa: E402


def run(points: int = 128, dim: int = 10, iters: int = 50, reg: float = 1.0, device: torch.device | None = None,
        repeat: int = 5) -> dict:
    """Ours vs POT for both values (module docstring): seconds, ratio, values. Returns a dict."""
    device = device or torch.device("cpu")
    g = torch.Generator().manual_seed(0)
    clean = (3 * torch.randn(points, dim, generator=g)).to(device)  # logit-like scales
    adv = clean + 0.5 * torch.randn(points, dim, generator=g).to(device)

    def ours(value: str) -> tuple[float, float]:
        x, y = clean.clone().requires_grad_(True), adv.clone().requires_grad_(True)
        res = sinkhorn_divergence(x, y, reg=reg, value=value, max_iter=iters, tol=0.0)
        res.divergence.backward()
        return res.divergence.item(), res.marginal_error.item()

    def pot(grad: str, field: str) -> float:
        x, y = clean.clone().requires_grad_(True), adv.clone().requires_grad_(True)
        res = ot.solve_sample(x, y, reg=reg, debias=True, max_iter=iters, tol=0.0, grad=grad)
        out = getattr(res, field)
        out.backward()
        return out.item()

    report: dict = {
        "device": device_description(device), "torch_threads": torch.get_num_threads(),
        "setting": {"points": points, "dim": dim, "iters": iters, "reg": reg, "dtype": "float32",
                    "cost": "sqeuclidean"},
        "load_before": load_average(),
    }
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tol = 0 never converges, by design: both solvers would warn every call
        for name, value, grad, field in [("entropic", "entropic", "envelope", "value"),
                                         ("transport", "transport", "autodiff", "value_linear")]:
            t_ours = median_times(lambda value=value: ours(value), repeat=repeat)
            t_pot = median_times(lambda grad=grad, field=field: pot(grad, field), repeat=repeat)
            v_ours, err = ours(value)
            report[name] = {
                "ours_s": t_ours["wall_s"], "pot_s": t_pot["wall_s"],
                "pot_over_ours": t_pot["wall_s"] / t_ours["wall_s"],
                "ours_cpu_s": t_ours["cpu_s"], "pot_cpu_s": t_pot["cpu_s"],
                "pot_over_ours_cpu": t_pot["cpu_s"] / t_ours["cpu_s"],
                "ours_all_s": t_ours["wall_all_s"], "pot_all_s": t_pot["wall_all_s"],
                "ours_value": v_ours, "pot_value": pot(grad, field), "ours_marginal_error": err,
            }
    report["load_after"] = load_average()
    return report


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--points", type=int, default=128)
    ap.add_argument("--dim", type=int, default=10)
    ap.add_argument("--iters", type=int, default=50)
    ap.add_argument("--reg", type=float, default=1.0)
    ap.add_argument("--repeat", type=int, default=5, help="timed calls per figure (median)")
    ap.add_argument("--threads", type=int, help="torch threads (default: torch's own choice)")
    ap.add_argument("--json", type=Path, help="also write the figures here")
    args = ap.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    report = run(args.points, args.dim, args.iters, args.reg, device, args.repeat)
    emit(report, args.json)


if __name__ == "__main__":
    main()
