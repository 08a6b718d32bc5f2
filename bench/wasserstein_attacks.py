"""Wasserstein attack benchmark (figures go to docs/BENCHMARKS.md): strength and cost of the three attacks of issue 4.

On a cnn-small trained 10 epochs on ``digits:16`` (standard training, cached in ``bench/.cache``), the first ``N`` test
images the model classifies correctly, each Wasserstein attack of the registry with the budget the audit gives it
(20 steps) at fixed radii (unit-mass scale: moving all the mass by one pixel costs 1):

- success rate (fooled / attacked);
- seconds, and the gradient passes spent (the attacks' own accounting, ``AttackResult.backwards``; a fooled example
  leaves the batch);
- **cost per gradient pass over the model's own forward + backward** (per example, measured on the same batch in the
  same run): what one step of the attack costs beyond the model, i.e. the projection or the linear oracle;
- true radii: POT's exact distance (``ot.emd2`` over the same local cost, full image) of a few outputs over the radius
  the attack reports for them (must be <= 1). The unbalanced attack's outputs do not carry the input's mass (its plan
  creates and destroys mass), so for it the bench reports its ``mass_change`` and ``balanced_bound`` instead.

The same cost per gradient pass is also measured on a resnet20 at 3x32x32 (random weights, batch 32, 5 steps, every
example runs every step), where the model's own cost is no longer negligible.

Wu, Wang & Yu (ICML 2020) publish Frank-Wolfe as far stronger and faster than projected Sinkhorn; this measures it here.

Run: ``python bench/wasserstein_attacks.py [--quick] [--samples N] [--json FILE]``.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

_HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _HERE]  # bench/ot.py would shadow POT
sys.path.insert(0, str(_HERE.parent))

from bench.common import (  # noqa: E402
    device_description,
    digits_model,
    emit,
    forward_backward_seconds,
    load_average,
)
from kit.attacks.registry import ATTACKS  # noqa: E402
from kit.attacks.unbalanced import UnbalancedAttackResult  # noqa: E402
from kit.data import load_dataset  # noqa: E402
from kit.ot.local import exact_local_wasserstein  # noqa: E402

NAMES = ("wasserstein-pgd", "unbalanced-sinkhorn", "fw-wasserstein")
EPS = (0.02, 0.05, 0.1, 0.2)


def true_radii(x: torch.Tensor, x_adv: torch.Tensor, reported: torch.Tensor, fooled: torch.Tensor,
               n_exact: int) -> dict:
    """Exact W distance (POT, float64) of up to ``n_exact`` fooled outputs, over their reported radius."""
    sel = fooled.nonzero().squeeze(1)[:n_exact]
    if not sel.numel():
        return {"checked": 0}
    m = x[sel].sum((1, 2, 3)).double().view(-1, 1, 1, 1)
    exact = exact_local_wasserstein(x[sel].double() / m, x_adv[sel].double() / m)
    return {"checked": int(sel.numel()),
            "exact_over_reported_max": float((exact / reported[sel].double().clamp_min(1e-12)).max()),
            "exact": [round(v, 5) for v in exact.tolist()]}


def step_cost(arch: str = "resnet20", shape: tuple[int, int, int] = (3, 32, 32), batch: int = 32, steps: int = 5,
              eps: float = 0.1, names: tuple[str, ...] = NAMES, log: Callable[[str], None] | None = None) -> dict:
    """Cost per gradient pass over the model's forward + backward on a CIFAR-sized model (random weights, uniform
    images, nothing stops early: every example runs every step), where the model is no longer negligible."""
    import models

    torch.manual_seed(0)
    model = models.create(arch, 10, shape).eval()
    x = torch.rand(batch, *shape)
    with torch.no_grad():
        y = model(x).argmax(1)  # the model's own labels: every example starts correctly classified
    fb = forward_backward_seconds(model, x, y) / len(x)  # per example
    out: dict = {"model": f"{arch}, random weights, {batch} x {'x'.join(map(str, shape))}", "steps": steps,
                 "eps": eps, "forward_backward_s_per_example": fb, "attacks": {}}
    for name in names:
        if log:
            log(f"step cost on {arch}: {name}")
        attack = ATTACKS[name].build(model, steps=steps, early_stop=False)
        t0 = time.perf_counter()
        r = attack(x, y, eps=eps)
        seconds = time.perf_counter() - t0
        passes = int(r.backwards.sum())
        out["attacks"][name] = {"seconds": round(seconds, 3), "gradient_passes": passes,
                                "cost_per_pass_over_model_fb": round(seconds / max(passes, 1) / fb, 2)}
    return out


def run(samples: int = 100, eps_grid: tuple[float, ...] = EPS, names: tuple[str, ...] = NAMES, n_exact: int = 3,
        log: Callable[[str], None] | None = None) -> dict:
    """Every figure of the module docstring, as a JSON-able dict."""
    model = digits_model("standard")
    ds = load_dataset("digits:16", "test")
    with torch.no_grad():
        correct = model(ds.x).argmax(1) == ds.y
    x, y = ds.x[correct][:samples], ds.y[correct][:samples]
    fb = forward_backward_seconds(model, x, y) / len(x)  # per example
    out: dict = {"model": "cnn-small, standard, 10 epochs, digits:16", "examples": len(x),
                 "forward_backward_s_per_example": fb, "attacks": {}}
    for name in names:
        spec = ATTACKS[name]
        rows = {}
        for eps in eps_grid:
            if log:
                log(f"{name} at eps {eps}")
            attack = spec.build(model)
            t0 = time.perf_counter()
            r = attack(x, y, eps=eps)
            seconds = time.perf_counter() - t0
            passes = int(r.backwards.sum())
            fooled = r.success
            row: dict[str, Any] = {
                "success": round(float(fooled.float().mean()), 4),
                "seconds": round(seconds, 3),
                "gradient_passes": passes,
                "cost_per_pass_over_model_fb": round(seconds / max(passes, 1) / fb, 2),
                "reported_radius_over_eps_max": round(float((r.norm[fooled] / eps).max()), 5) if fooled.any() else None,
            }
            if isinstance(r, UnbalancedAttackResult) and r.mass_change is not None and r.balanced_bound is not None:
                # an unbalanced plan creates and destroys mass: no balanced distance to check with POT; the attack's
                # own figures say how far from a balanced transport its outputs are
                any_fooled = bool(fooled.any())
                row["mass_change_max"] = round(float(r.mass_change[fooled].max()), 5) if any_fooled else None
                row["balanced_bound_over_eps_max"] = (round(float((r.balanced_bound[fooled] / eps).max()), 3)
                                                      if any_fooled else None)
            else:
                row["true_radius"] = true_radii(x, r.x_adv, r.norm, fooled, n_exact)
            rows[str(eps)] = row
        out["attacks"][name] = {"config": spec.config(), "by_eps": rows}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="32 examples, two radii, one exact check each")
    ap.add_argument("--samples", type=int, default=100)
    ap.add_argument("--json", type=Path, help="also write the figures here (atomically)")
    args = ap.parse_args()
    device = torch.device("cpu")  # digits models are tiny: the CPU figures are the ones that mean something here
    t0 = time.perf_counter()
    load0 = load_average()
    kw = {"samples": 32, "eps_grid": (0.05, 0.1), "n_exact": 1} if args.quick else {"samples": args.samples}

    def log(m: str) -> None:
        print(f"[bench/wasserstein_attacks] {m}", file=sys.stderr, flush=True)

    doc = {"device": device_description(device), "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
           "load_start": load0, **run(**kw, log=log),
           "step_cost_cifar": step_cost(batch=8 if args.quick else 32, steps=2 if args.quick else 5, log=log),
           "load_end": load_average(), "wall_seconds": round(time.perf_counter() - t0, 1)}
    emit(doc, args.json)


if __name__ == "__main__":
    main()
