"""Sinkhorn divergence benchmark: kit.ot.sinkhorn vs POT, forward + backward (figures go to docs/BENCHMARKS.md).

The SAT setting (seed ``000_e2e3710bc929b9d7.txt``): 128 clean vs 128 adversarial points in 10-D (logits of a batch),
squared Euclidean cost, reg = 1, 50 iterations, float32. Both sides run exactly 50 iterations on each of the three
problems (tolerance 0) and differentiate w.r.t. both clouds:

- ``entropic``: ours ``sinkhorn_divergence(value="entropic")`` (one batched solve of the three problems, envelope
  gradient) vs ``ot.solve_sample(..., debias=True, grad="envelope").value`` (three solves, envelope gradient);
- ``transport``: ours ``value="transport"`` (gradient through the unrolled iterations) vs
  ``ot.solve_sample(..., debias=True, grad="autodiff").value_linear``.

Run: ``python bench/ot_sinkhorn.py [--json out.json]``. Uses the GPU when there is one. Prints JSON.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import warnings
from pathlib import Path

import ot
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import timed  # noqa: E402
from kit.ot.sinkhorn import sinkhorn_divergence  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--points", type=int, default=128)
    ap.add_argument("--dim", type=int, default=10)
    ap.add_argument("--iters", type=int, default=50)
    ap.add_argument("--reg", type=float, default=1.0)
    ap.add_argument("--json", type=Path, help="also write the figures here")
    args = ap.parse_args()
    warnings.simplefilter("ignore")  # tol = 0 never converges, by design: both solvers would warn every call

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    g = torch.Generator().manual_seed(0)
    clean = (3 * torch.randn(args.points, args.dim, generator=g)).to(device)  # logit-like scales
    adv = clean + 0.5 * torch.randn(args.points, args.dim, generator=g).to(device)

    def ours(value: str) -> tuple[float, float]:
        x, y = clean.clone().requires_grad_(True), adv.clone().requires_grad_(True)
        res = sinkhorn_divergence(x, y, reg=args.reg, value=value, max_iter=args.iters, tol=0.0)
        res.divergence.backward()
        return res.divergence.item(), res.marginal_error.item()

    def pot(grad: str, field: str) -> float:
        x, y = clean.clone().requires_grad_(True), adv.clone().requires_grad_(True)
        res = ot.solve_sample(x, y, reg=args.reg, debias=True, max_iter=args.iters, tol=0.0, grad=grad)
        out = getattr(res, field)
        out.backward()
        return out.item()

    report: dict = {
        "device": torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or "cpu",
        "torch_threads": torch.get_num_threads(),
        "setting": {"points": args.points, "dim": args.dim, "iters": args.iters, "reg": args.reg, "dtype": "float32",
                    "cost": "sqeuclidean"},
    }
    for name, value, grad, field in [("entropic", "entropic", "envelope", "value"),
                                     ("transport", "transport", "autodiff", "value_linear")]:
        t_ours = timed(lambda: ours(value))
        t_pot = timed(lambda: pot(grad, field))
        v_ours, err = ours(value)
        report[name] = {
            "ours_s": t_ours, "pot_s": t_pot, "pot_over_ours": t_pot / t_ours,
            "ours_value": v_ours, "pot_value": pot(grad, field), "ours_marginal_error": err,
        }
        print(json.dumps({name: report[name]}, indent=1), flush=True)
    print(json.dumps({"device": report["device"], "torch_threads": report["torch_threads"]}))
    if args.json:
        args.json.write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
