"""How many Square queries per rung the ``autoattack`` preset needs (issue 18): the kit's Square in the minimum-epsilon
search an audit runs (a ladder of rungs, each warm-started from the last, then bisection) against AutoAttack's Square
(torchattacks, 5000 queries) run once at each fixed radius, on the same model and examples.

Robust at radius r means: the search's eps* is above r (kit), or Square-5000 at r failed (reference). The reference
attacks each radius from scratch; the kit's search spends its budget along the ladder, so its per-rung budget can be
lower for the same strength. Run (torchattacks installed apart from the project, see bench/autoattack_reference.py)::

    PYTHONPATH=/tmp/ta_pkg python bench/square_budget.py --data ../shared/data/mnist-10k [--queries 300 1000]

Prints one JSON document; progress on stderr. Without torchattacks, ``--no-reference`` runs the kit's side only.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from autoattack_reference import checked_fooled, get_model, import_torchattacks, log, predict  # same folder


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", type=Path, required=True, help="folder of the four MNIST IDX files (mnist:DIR)")
    ap.add_argument("--model", default="auto", help="kit checkpoint, or 'auto' (the reference bench's cnn-small)")
    ap.add_argument("--samples", type=int, default=200)
    ap.add_argument("--eps", type=float, nargs="+", default=[0.1, 0.2])
    ap.add_argument("--eps-max", type=float, default=0.3)
    ap.add_argument("--queries", type=int, nargs="+", default=[300, 1000])
    ap.add_argument("--no-reference", action="store_true")
    args = ap.parse_args()

    from bench.common import cpu_model, load_average
    from kit.attacks.registry import get_attack
    from kit.attacks.search import min_eps_search
    from kit.data import load_dataset

    torch.set_num_threads(1)
    model, info = get_model(args.model, args.data)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    test = load_dataset(f"mnist:{args.data}", "test")
    idx = torch.randperm(len(test.x), generator=torch.Generator().manual_seed(0))[:args.samples].sort().values
    x, y = test.x[idx].float().contiguous(), test.y[idx].long()
    clean = predict(model, x) == y

    kit_rows = []
    for q in args.queries:
        log(f"kit square-linf, {q} queries per rung, minimum-epsilon search to {args.eps_max}")
        t0 = time.perf_counter()
        res = min_eps_search(get_attack("square-linf").build(model, seed=0, queries=q), x, y, args.eps_max, 8)
        dt = time.perf_counter() - t0
        kit_rows.append({"queries_per_rung": q, "seconds": round(dt, 1),
                         "forwards_per_example": round(float(res.forwards.float().mean()), 1),
                         "robust": {str(e): int((res.eps_star > e).sum()) for e in args.eps}})
    ref = None
    if not args.no_reference:
        ta, ta_info = import_torchattacks()
        ref = {"torchattacks": ta_info["version"], "queries": 5000, "robust": {}, "seconds": {}}
        for e in args.eps:
            log(f"torchattacks Square, 5000 queries, at eps {e}")
            atk = ta.Square(model, norm="Linf", eps=e, n_queries=5000, n_restarts=1, seed=0, verbose=False)
            t0 = time.perf_counter()
            x_adv = atk(x, y).detach()
            ref["seconds"][str(e)] = round(time.perf_counter() - t0, 1)
            fooled, _ = checked_fooled(model, x, x_adv, y, e)
            ref["robust"][str(e)] = int((clean & ~fooled).sum())
    print(json.dumps({"benchmark": "Square budget per rung in the kit's search vs AutoAttack's Square at fixed eps",
                      "samples": len(x), "clean_correct": int(clean.sum()), "model": info, "kit": kit_rows,
                      "reference": ref, "machine": {"cpu": cpu_model(), "threads": 1,
                                                    "load_average_at_end": load_average()}}, indent=2))


if __name__ == "__main__":
    main()
