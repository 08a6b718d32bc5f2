"""The audit's black box: Square in a ladder of radii against one run at the top radius, then bisection (issue 20).

Square does not warm-start: each radius it is run at starts afresh from its stripes, so a ladder of rungs below the
radius that matters gives it more tries, not a better start. This bench measures what the audit's black box gives up
and saves by running Square once per example at the top radius (then bisecting where it fooled), on the deployed
fp32 ONNX engine of ``bench/audit.py``'s models:

1. **Square alone** (no white-box radius known), ``min_eps_search`` with ``rungs=8`` (the old black box) against
   ``rungs=1`` (one run at eps_max, then bisection): the accuracy curve's AUAC of each (lower = stronger), examples
   fooled, per-example eps* smaller / larger than the other's, queries and CPU seconds;
2. **as the audit runs it**: the per-example radius known to fool (the twin-guided PGD search's, on either side)
   given as ``known``, where the search stops once Square resisted: queries, CPU seconds and the examples Square
   fools below the white-box radius, for the old ladder without it, the ladder with it, and the audit's one run at
   eps_max with it; and per example whether the worst case (min of the white-box and the black-box radius) is the
   old ladder's. Square draws its random numbers for the whole batch, so a different set of examples still in the
   search changes every path: the counts move by one or two between seeds (``--seed``).

Run::

    python bench/blackbox.py [--models cnn-small,mnist,resnet20] [--samples 100] [--seed 0]

One thread; prints one JSON document on stdout, progress on stderr.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def square_search(model, x, y, eps_max: float, rungs: int, known=None, seed: int = 0) -> tuple[object, float]:
    from kit.attacks.registry import get_attack
    from kit.attacks.search import min_eps_search

    square = get_attack("square-linf").build(model, seed=seed, queries=500)
    t0 = time.process_time()
    res = min_eps_search(square, x, y, eps_max, rungs, known=known)
    return res, time.process_time() - t0


def auac(eps_star, eps_max: float) -> float:
    import torch

    grid = torch.linspace(0, eps_max, 33, dtype=torch.float64)
    acc = torch.stack([(eps_star > g).double().mean() for g in grid])
    return float(torch.trapezoid(acc, grid) / eps_max)


def compare(a, b, tol: float) -> dict[str, int]:
    return {"smaller": int((b < a - tol).sum()), "larger": int((b > a + tol).sum()),
            "same": int(((b - a).abs() <= tol).sum() + (a.isinf() & b.isinf()).sum())}


def bench_model(name: str, n: int, seed: int = 0) -> dict:
    import torch

    from bench.audit import EPS, prepare
    from evaluators.audit import EngineModule, load_audit_inputs, twin_guided_search

    files = prepare(name)
    eps_max = EPS[name]
    inp = load_audit_inputs(Path(files["engine"]), Path(files["twin"]), files["data"], "test", n, 0,
                            torch.device("cpu"))
    x, y, engine = inp.x, inp.y, EngineModule(inp.engine)
    tol = eps_max / 256
    out: dict = {"samples": n, "eps_max": eps_max}

    alone = {}
    for label, rungs in (("ladder", 8), ("one_run", 1)):
        res, cpu = square_search(engine, x, y, eps_max, rungs, seed=seed)
        alone[label] = res.eps_star
        out.setdefault("square_alone", {})[label] = {
            "auac": round(auac(res.eps_star, eps_max), 4), "fooled": int(torch.isfinite(res.eps_star).sum()),
            "queries": int(res.forwards.sum()), "cpu_s": round(cpu, 1)}
        log(f"{name} Square alone, {label}: {out['square_alone'][label]}")
    out["square_alone"]["one_run_vs_ladder"] = compare(alone["ladder"], alone["one_run"], tol)

    rt, re_, _ = twin_guided_search("pgd-linf", inp.twin.eval(), inp.engine, x, y, eps_max, seed=0)
    known = torch.maximum(rt.eps_star, re_.eps_star)
    worst = {}
    for label, rungs, k in (("ladder", 8, None), ("ladder_stopped_at_known", 8, known),
                            ("one_run_then_bisection_stopped_at_known", 1, known)):
        res, cpu = square_search(engine, x, y, eps_max, rungs, k, seed=seed)
        worst[label] = torch.minimum(re_.eps_star, res.eps_star)
        out.setdefault("in_the_audit", {})[label] = {
            "queries": int(res.forwards.sum()), "cpu_s": round(cpu, 1),
            "below_white_box": int((res.eps_star + tol < re_.eps_star).sum())}
        log(f"{name} in the audit, {label}: {out['in_the_audit'][label]}")
    out["in_the_audit"]["worst_case_vs_ladder"] = {k: compare(worst["ladder"], v, 0.0) for k, v in worst.items()
                                                   if k != "ladder"}
    out["in_the_audit"]["white_box_fooled"] = int(torch.isfinite(re_.eps_star).sum())
    return out


def main() -> None:
    import torch

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default="cnn-small,mnist,resnet20")
    ap.add_argument("--samples", type=int, default=100)
    ap.add_argument("--seed", type=int, default=0, help="Square's seed")
    args = ap.parse_args()
    torch.set_num_threads(1)
    result: dict = {"seed": args.seed, "load_before": os.getloadavg(), "models": {}}
    for name in args.models.split(","):
        result["models"][name] = bench_model(name, args.samples, args.seed)
    result["load_after"] = os.getloadavg()
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
