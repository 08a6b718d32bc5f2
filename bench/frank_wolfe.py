"""Frank-Wolfe step cost (issue 20; figures go to docs/BENCHMARKS.md): seconds per Frank-Wolfe step over seconds per
forward + backward of the same model and batch, with the capacity-aware oracle as it was (``before``: the oracle of
commit 3f028c6, kept verbatim as :func:`tests.test_frank_wolfe.reference_capacity_lmo`, which computes the plan (N, C, k*k, H, W) in every
sweep) and as it is (``after``: :func:`kit.attacks.frank_wolfe.capacity_lmo` on the target-side score, which sweeps on
images and builds the plan once).

Per model: random weights (seed 0), ``batch`` uniform images, the model's own labels (every example starts correctly
classified), ``fw-wasserstein`` with its defaults (capacity oracle, gamma 3e-2, 10 sweeps), ``steps`` steps at
radius 0.1 with ``early_stop=False`` (every example runs every step). A Frank-Wolfe step is the attack's seconds over
``steps`` (each call also spends the clean forward and the last forward: a step is charged slightly more than it
costs). The forward + backward is one pass of the whole batch to the input (cross-entropy), as in
:func:`bench.common.forward_backward_seconds`.

The three timings are interleaved: ``repeat`` rounds, each timing the forward + backward (best of 3), the attack after
and the attack before (their order alternating), so that a change of the machine's load hits all three alike. Reported:
the medians of the wall times and of the process CPU times (``time.process_time``, which leaves out the time spent
waiting for a core on a shared machine), the ratios of the medians, and the median of the per-round ratios.

Run: ``OMP_NUM_THREADS=1 python bench/frank_wolfe.py [--quick] [--repeat R] [--json FILE]``. Prints JSON.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

_HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _HERE]  # bench/ot.py would shadow POT
sys.path.insert(0, str(_HERE.parent))

import kit.attacks.frank_wolfe as fw  # noqa: E402
from bench.common import device_description, emit, load_average  # noqa: E402
from kit.ot.local import neighbours  # noqa: E402
from tests.test_frank_wolfe import reference_capacity_lmo  # noqa: E402  (the old oracle, verbatim)

CONFIGS = (("resnet20", (3, 32, 32)), ("cnn-small", (1, 28, 28)))


def _before(score, source, *args, **kwargs):
    """The old oracle behind the new call: the attack now passes the target-side score (N, C, H, W)."""
    if score.dim() == 4:
        score = neighbours(score, int(round(math.sqrt(args[1].numel()))))
    return reference_capacity_lmo(score, source, *args, **kwargs)


def _timed(fn: Callable[[], object]) -> tuple[float, float]:
    t0, c0 = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - t0, time.process_time() - c0


def step_cost(arch: str, shape: tuple[int, int, int], batch: int = 32, steps: int = 5, eps: float = 0.1,
              repeat: int = 5, log: Callable[[str], None] | None = None) -> dict:
    """The module docstring's figures for one model."""
    import models

    torch.manual_seed(0)
    model = models.create(arch, 10, shape).eval()
    x = torch.rand(batch, *shape)
    with torch.no_grad():
        y = model(x).argmax(1)

    def fb() -> None:
        xg = x.clone().requires_grad_(True)
        torch.autograd.grad(torch.nn.functional.cross_entropy(model(xg), y, reduction="sum"), xg)

    attack = fw.FrankWolfeWasserstein(model, eps=eps, steps=steps, early_stop=False)
    after_lmo = fw.capacity_lmo

    def run(lmo) -> Callable[[], object]:
        def call() -> object:
            fw.capacity_lmo = lmo
            try:
                return attack(x, y)
            finally:
                fw.capacity_lmo = after_lmo
        return call

    variants = {"after": run(after_lmo), "before": run(_before)}
    fb(), [v() for v in variants.values()]  # warm-up
    times: dict[str, dict[str, list[float]]] = {k: {"wall": [], "cpu": []} for k in ("fb", *variants)}
    for r in range(repeat):
        if log:
            log(f"{arch} {'x'.join(map(str, shape))}: round {r + 1}/{repeat}")
        best = min((_timed(fb) for _ in range(3)), key=lambda t: t[0])
        times["fb"]["wall"].append(best[0])
        times["fb"]["cpu"].append(best[1])
        for name in (("after", "before") if r % 2 == 0 else ("before", "after")):
            wall, cpu = _timed(variants[name])
            times[name]["wall"].append(wall / steps)
            times[name]["cpu"].append(cpu / steps)
    out: dict = {"model": f"{arch}, random weights, batch {batch} x {'x'.join(map(str, shape))}", "steps": steps,
                 "eps": eps, "repeat": repeat}
    for clock in ("wall", "cpu"):
        f = statistics.median(times["fb"][clock])
        row = {"forward_backward_s": round(f, 5)}
        for name in variants:
            s = times[name][clock]
            row[f"{name}_step_s"] = round(statistics.median(s), 5)
            row[f"{name}_step_over_fb"] = round(statistics.median(s) / f, 2)
            row[f"{name}_step_over_fb_per_round_median"] = round(
                statistics.median(a / b for a, b in zip(s, times["fb"][clock], strict=True)), 2)
        out[clock] = row
    # same iterates up to float rounding: the final iterates after vs before, next to before vs before on the input
    # moved by one float32 step (nextafter) in its interior pixels, which shows how far rounding alone carries them
    a, b = variants["after"](), variants["before"]()
    x_clean = x.clone()
    x.copy_(torch.where((x > 0) & (x < 1), torch.nextafter(x, torch.full_like(x, 2.0)), x))
    c = variants["before"]()
    x.copy_(x_clean)

    def diff(p, q) -> dict:
        per = (p.x_last - q.x_last).flatten(1).abs().amax(1)
        return {"median": float(per.median()), "max": float(per.max()), "examples_over_1e-4": int((per > 1e-4).sum())}

    out["x_last_max_abs_diff_per_example"] = {"after_vs_before": diff(a, b), "before_vs_before_one_ulp": diff(b, c)}
    out["success_after_before"] = [int(a.success.sum()), int(b.success.sum())]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="batch 8, 2 steps, 2 rounds")
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--json", type=Path, help="also write the figures here (atomically)")
    args = ap.parse_args()

    def log(m: str) -> None:
        print(f"[bench/frank_wolfe] {m}", file=sys.stderr, flush=True)

    t0 = time.perf_counter()
    kw = {"batch": 8, "steps": 2, "repeat": 2} if args.quick else {"repeat": args.repeat}
    doc = {"device": device_description(torch.device("cpu")), "torch": torch.__version__,
           "torch_threads": torch.get_num_threads(), "load_start": load_average(),
           "models": [step_cost(arch, shape, **kw, log=log) for arch, shape in CONFIGS],
           "load_end": load_average(), "wall_seconds": round(time.perf_counter() - t0, 1)}
    emit(doc, args.json)


if __name__ == "__main__":
    main()
