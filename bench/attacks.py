"""Attack benchmarks, each a ratio measured in one run (figures go to docs/BENCHMARKS.md).

1. Cost of one PGD step vs the model's own forward+backward on the same batch (target <= 1.15).
2. The whole accuracy curve: the minimum-epsilon search vs a naive sweep (PGD-20 at each of 16 epsilons): passes per
   example, seconds and AUAC (target: <= 25% of the naive cost, AUAC <= naive + 0.005).
3. Strength: per-example eps* of the default procedure vs the best of all attacks with 10x budget (target mean >= 0.97).

4. ``--peer-only``: seconds per PGD step against torchattacks' PGD (installed apart, as for
   bench/autoattack_reference.py: ``PYTHONPATH=/tmp/ta_pkg``), early stopping off, same model, batch and steps
   (target: like for like <= 1; the paired median with a bootstrap interval), and each side's own tensor work around
   a model of negligible cost, per call and per step (``overhead_vs_torchattacks``).

Run: ``python bench/attacks.py [--quick]``. Uses the GPU when there is one (then also ResNet-18 at 3x32x32, batch 256).
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import models  # noqa: E402
from bench.common import digits_model, forward_backward_seconds, timed  # noqa: E402
from evaluators.curves import accuracy_at, auac, auac_trapezoid  # noqa: E402
from kit.attacks import APGD, FMN, PGD, Square, TrustRegion, min_eps_search  # noqa: E402
from kit.attacks.search import SearchResult  # noqa: E402
from kit.data import load_dataset  # noqa: E402


def step_cost(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, steps: int = 20) -> dict:
    """Seconds per PGD step (nothing fooled: tiny eps, clean-correct examples only) vs one forward+backward."""
    keep = model(x).argmax(1) == y
    x, y = x[keep], y[keep]

    t_fb = forward_backward_seconds(model, x, y)
    # every step runs (early_stop=False: a tiny ball's iterates stop moving, and would leave the batch)
    attack = PGD(model, eps=1e-6, steps=steps, random_start=False, early_stop=False)
    t_pgd = timed(lambda: attack(x, y))
    # the attack also spends one clean forward and one final forward: subtract them at forward-only cost
    with torch.no_grad():
        t_f = timed(lambda: model(x))
    per_step = (t_pgd - 2 * t_f) / steps
    return {"batch": len(x), "forward_backward_s": t_fb, "pgd_step_s": per_step, "ratio": per_step / t_fb}


def import_torchattacks():
    """torchattacks, installed apart from the project (see bench/autoattack_reference.py); None where absent."""
    try:
        from bench.autoattack_reference import import_torchattacks as imp

        return imp()[0]
    except SystemExit:
        return None


def vs_torchattacks(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, steps: int,
                    rounds: int = 40) -> dict | None:
    """Seconds per PGD step, the kit's against torchattacks' PGD: same model, batch, eps, step (alpha = 2.5 eps /
    steps), steps and random start; early stopping off. Rounds alternate the sides (every other round in reverse
    order); the fastest round of each is kept (on a shared machine the minimum is the stable estimate of the cost; the
    medians are in the output too). The like-for-like ratio is also given round by round, each round's two sides
    measured under the same load: the median of those paired ratios, their quartiles and a bootstrap 95% interval
    of the median.

    The kit's PGD returns which examples its output fools, so its run includes the forward that verifies the final
    iterate; torchattacks returns the iterate alone. Three comparisons:

    - ``kit``: the kit's call as a user makes it (with its clean check) against ``torchattacks.PGD`` alone;
    - ``kit_clean_given``: as the minimum-epsilon search calls it (the clean check once per search);
    - ``like_for_like``: the kit, clean logits given, against torchattacks followed by the one forward a user needs to
      learn which examples its output fools: the same work on both sides.
    """
    ta = import_torchattacks()
    if ta is None:
        return None
    alpha = 2.5 * eps / steps
    peer = ta.PGD(model, eps=eps, alpha=alpha, steps=steps, random_start=True)
    kit = PGD(model, eps=eps, steps=steps, random_start=True, early_stop=False)
    with torch.no_grad():
        clean = model(x)
    sides = {"kit": lambda: kit(x, y), "kit_clean_given": lambda: kit(x, y, clean_logits=clean),
             "torchattacks": lambda: peer(x, y), "torchattacks_verified": verified(peer, model, x, y)}
    times = alternated(sides, rounds)
    per_step = {k: min(v) / steps for k, v in times.items()}
    paired = [a / b for a, b in zip(times["kit_clean_given"], times["torchattacks_verified"])]
    quartiles = statistics.quantiles(paired, n=4)
    return {"batch": len(x), "steps": steps, "eps": eps, "rounds": rounds, "torchattacks": ta.__version__,
            "seconds_per_step": per_step,
            "median_seconds_per_step": {k: statistics.median(v) / steps for k, v in times.items()},
            "ratio_kit_vs_torchattacks": per_step["kit"] / per_step["torchattacks"],
            "ratio_kit_clean_given_vs_torchattacks": per_step["kit_clean_given"] / per_step["torchattacks"],
            "ratio_like_for_like": per_step["kit_clean_given"] / per_step["torchattacks_verified"],
            "ratio_like_for_like_paired_median": statistics.median(paired),
            "ratio_like_for_like_paired_quartiles": [quartiles[0], quartiles[2]],
            "ratio_like_for_like_paired_median_ci95": median_ci(paired)}


def verified(peer, model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor):
    """torchattacks' attack followed by the one forward a user needs to learn which examples its output fools."""
    def run() -> torch.Tensor:
        adv = peer(x, y)
        with torch.no_grad():
            return model(adv).argmax(1) != y

    return run


def alternated(sides: dict, rounds: int) -> dict[str, list[float]]:
    """CPU seconds of each side per round (one warm-up call each first). Every other round runs the sides in reverse
    order, so that no side always follows the same other side."""
    times: dict[str, list[float]] = {k: [] for k in sides}
    for fn in sides.values():
        fn()  # warm-up
    for r in range(rounds):
        for k in (list(sides) if r % 2 == 0 else list(reversed(sides))):
            t0 = time.process_time()  # CPU seconds of this (one-thread) process: another tenant's load barely moves it
            sides[k]()
            times[k].append(time.process_time() - t0)
    return times


def median_ci(values: list[float], resamples: int = 2000, seed: int = 0) -> list[float]:
    """A percentile-bootstrap 95% interval of the median of ``values`` (the rounds resampled with replacement)."""
    t = torch.tensor(values, dtype=torch.float64)
    pick = torch.randint(0, len(t), (resamples, len(t)), generator=torch.Generator().manual_seed(seed))
    medians = t[pick].quantile(0.5, dim=1)  # the mean of the two middle values for an even count, as statistics'
    return [float(medians.quantile(0.025)), float(medians.quantile(0.975))]


def overhead_vs_torchattacks(x: torch.Tensor, y: torch.Tensor, eps: float, rounds: int = 200) -> dict | None:
    """The tensor work each side does around the model, set apart from the model's cost: both sides attack a model
    that costs next to nothing (one linear layer on the flattened batch), at 1 and at 10 steps; the line through the
    two median rounds gives each side's cost per call and per step. torchattacks is followed by its verifying
    forward, as in the like-for-like comparison."""
    ta = import_torchattacks()
    if ta is None:
        return None
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(x[0].numel(), 10)).eval()
    with torch.no_grad():
        clean = model(x)
    out: dict = {"batch": len(x), "rounds": rounds, "model": "Flatten + Linear(%d, 10)" % x[0].numel()}
    med: dict[int, dict[str, float]] = {}
    for steps in (1, 10):
        peer = ta.PGD(model, eps=eps, alpha=2.5 * eps / steps, steps=steps, random_start=True)
        kit = PGD(model, eps=eps, steps=steps, random_start=True, early_stop=False)
        times = alternated({"kit_clean_given": lambda kit=kit: kit(x, y, clean_logits=clean),
                            "torchattacks_verified": verified(peer, model, x, y)}, rounds)
        med[steps] = {k: statistics.median(v) for k, v in times.items()}
    for k in med[1]:
        per_step = (med[10][k] - med[1][k]) / 9
        out[k] = {"seconds_per_call_1_step": med[1][k], "seconds_per_call_10_steps": med[10][k],
                  "fixed_seconds": med[1][k] - per_step, "seconds_per_step": per_step}
    return out


def naive_sweep(model, x, y, eps_max: float, points: int = 16, steps: int = 20) -> dict:
    """PGD-20 independently at 16 radii eps_max*k/16: what a plain sweep does."""
    grid = [eps_max * k / points for k in range(1, points + 1)]
    eps_star = torch.full((len(x),), math.inf, dtype=torch.float64)
    acc, bwd, fwd = [], 0, 0
    t0 = time.perf_counter()
    for eps in grid:
        r = PGD(model, eps=eps, steps=steps)(x, y)
        acc.append(r.robust_accuracy)
        bwd += r.backwards.sum().item()
        fwd += r.forwards.sum().item()
        eps_star = torch.where(r.success & torch.isinf(eps_star), torch.tensor(eps, dtype=torch.float64), eps_star)
    secs = time.perf_counter() - t0
    clean = (model(x).argmax(1) == y).double().mean().item()
    eps_star[model(x).argmax(1) != y] = 0
    n = len(x)
    return {
        "seconds": secs,
        "backward_per_example": bwd / n,
        "forward_per_example": fwd / n,
        "full_steps_passes_per_example": points * steps,  # a sweep without early stopping: 16 x 20
        "auac_trapezoid": auac_trapezoid([0.0, *grid], [clean, *acc]),
        "auac_grid_eps_star": auac(eps_star, eps_max),
    }


def ours(model, x, y, eps_max: float, steps: int, rungs: int) -> tuple[dict, SearchResult]:
    t0 = time.perf_counter()
    res = min_eps_search(PGD(model, steps=steps), x, y, eps_max, rungs=rungs)
    secs = time.perf_counter() - t0
    return {"seconds": secs, "backward_per_example": res.backwards.double().mean().item(),
            "forward_per_example": res.forwards.double().mean().item(), "auac": auac(res.eps_star, eps_max)}, res


def strongest(model, x, y, eps_max: float) -> SearchResult:
    """All attacks together with about 10x the default budget."""
    results = [
        min_eps_search(PGD(model, steps=100, restarts=2), x, y, eps_max, rungs=16),
        min_eps_search(APGD(model, loss="ce", steps=100), x, y, eps_max, rungs=16),
        min_eps_search(APGD(model, loss="dlr", steps=100), x, y, eps_max, rungs=16),
        min_eps_search(FMN(model, steps=1000), x, y, eps_max),
        min_eps_search(TrustRegion(model, steps=1000), x, y, eps_max),
        min_eps_search(Square(model, queries=3000), x, y, eps_max, rungs=8),
    ]
    return SearchResult.combine(results)


def optimality(default: torch.Tensor, best: torch.Tensor) -> float:
    """Mean over examples of eps*_best / eps*_default (1 = the default procedure found the best; clean errors and
    examples never fooled by either are 1; fooled by the best only counts as eps*_best / eps_max)."""
    ratios = []
    for d, b in zip(default.tolist(), best.tolist()):
        if d == 0 or (math.isinf(d) and math.isinf(b)):
            ratios.append(1.0)
        elif math.isinf(d):
            ratios.append(0.0)
        else:
            ratios.append(min(b / d, 1.0))
    return sum(ratios) / len(ratios)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="fewer examples (for a smoke run)")
    ap.add_argument("--samples", type=int, default=300)
    ap.add_argument("--steps", type=int, default=10, help="PGD steps per rung of the search")
    ap.add_argument("--rungs", type=int, default=8)
    ap.add_argument("--json", type=Path, help="also write the figures here")
    ap.add_argument("--peer-only", action="store_true",
                    help="only the per-step comparison with torchattacks' PGD (cnn-small digits, resnet20 3x32x32)")
    args = ap.parse_args()
    if args.peer_only:
        rows = peer_rows()
        if args.json:
            args.json.write_text(json.dumps(rows, indent=1))
        return
    torch.manual_seed(0)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    n = 60 if args.quick else args.samples
    test = load_dataset("digits:16", "test").subset(n)
    x, y = test.x.to(device), test.y.to(device)
    out: dict = {"device": torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or "cpu",
                 "torch_threads": torch.get_num_threads(), "samples": n}
    eps_max = 0.3

    for name, kw in (("standard", {}), ("madry", {"eps": 0.1, "steps": 5})):
        model = digits_model(name, epochs=8, **kw).to(device)
        row = {"step_cost": step_cost(model, x, y)}
        naive = naive_sweep(model, x, y, eps_max)
        mine, res = ours(model, x, y, eps_max, args.steps, args.rungs)
        row["naive"], row["ours"] = naive, mine
        row["cost_ratio_vs_naive_full_steps"] = (mine["backward_per_example"] + mine["forward_per_example"]) / (
            2 * naive["full_steps_passes_per_example"])
        row["cost_ratio_vs_naive_early_stop"] = (mine["backward_per_example"] + mine["forward_per_example"]) / (
            naive["backward_per_example"] + naive["forward_per_example"])
        row["seconds_ratio_vs_naive_early_stop"] = mine["seconds"] / naive["seconds"]
        row["auac_minus_naive_trapezoid"] = mine["auac"] - naive["auac_trapezoid"]
        best = strongest(model, x, y, eps_max)
        row["strength"] = {"optimality_mean": optimality(res.eps_star, best.eps_star),
                           "auac_default": mine["auac"], "auac_best_10x": auac(best.eps_star, eps_max),
                           "acc_at_0.1_default": float(accuracy_at(res.eps_star, 0.1)),
                           "acc_at_0.1_best": float(accuracy_at(best.eps_star, 0.1))}
        out[f"digits16-cnn-small-{name}"] = row
        print(json.dumps({name: row}, indent=1), flush=True)

    if device.type == "cuda":
        model = models.create("resnet18", num_classes=10, input_shape=(3, 32, 32)).to(device).eval()
        xr, yr = torch.rand(256, 3, 32, 32, device=device), torch.randint(0, 10, (256,), device=device)
        out["resnet18-3x32x32-b256"] = {"step_cost": step_cost(model, xr, yr)}
        print(json.dumps(out["resnet18-3x32x32-b256"], indent=1))
    if args.json:
        args.json.write_text(json.dumps(out, indent=1))


def peer_rows() -> dict:
    """PGD per step against torchattacks on the digits cnn-small (batch 256) and resnet20 at 3x32x32 (batch 32), and
    the two sides' own tensor work around a model of negligible cost; printed, and returned for ``--json``."""
    torch.set_num_threads(1)
    test = load_dataset("digits:16", "test").subset(256)
    model = digits_model("standard", epochs=10).eval()
    rows = {"cnn-small-1x16x16-b256": vs_torchattacks(model, test.x, test.y, 0.1, 10, rounds=120)}
    torch.manual_seed(0)
    r20 = models.create("resnet20", 10, (3, 32, 32)).eval()
    xr = torch.rand(32, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        yr = r20(xr).argmax(1)
    rows["resnet20-3x32x32-b32"] = vs_torchattacks(r20, xr, yr, 8 / 255, 10, rounds=24)
    out = {"pgd_vs_torchattacks": rows, "overhead_vs_torchattacks": overhead_vs_torchattacks(test.x, test.y, 0.1),
           "threads": 1}
    print(json.dumps(out, indent=1))
    return out


if __name__ == "__main__":
    main()
